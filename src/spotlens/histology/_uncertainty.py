"""Per-spot, per-gene uncertainty of a prediction: a block-bootstrap ensemble of ridge heads.

At fit time the training spots are resampled ``n_boot`` times by spatial blocks (square tiles
of 4 spot spacings within each section, drawn with replacement as in
:mod:`spotlens.histology._intervals`: neighbouring spots share tissue, so resampling single
spots would make the spread too small), and a ridge regression from the model's features to
expression is refitted on each replicate (closed form, one ``k × k`` solve each). At
prediction every ensemble member predicts the spot, and the uncertainty is the standard
deviation over the members (``ddof=1``), in log-normalised expression units:

``std[s, g] = sd_b( z_s · W_b[:, g] + c_b[g] )``, ``z_s`` = the spot's projected features.

What it measures: how much a linear readout of these features at this spot changes when the
training data are resampled. It grows where the spot's features lie outside the bulk of the
training spots (few similar training spots: extrapolation) and for genes the features explain
poorly (noisy targets). It is not a prediction interval for the measured value (which adds the
spot's own noise, far larger) and not calibrated coverage.

- ``"ridge"`` models: the ensemble refits the model's own ridge (same standardisation and PCA,
  same penalty, same reduced-rank projection folded in): the bootstrap spread of the model.
- Networks (``"attention"``, ``"graph"``): a network ensemble would need ``n_boot`` trainings.
  The ensemble is instead a ridge readout of the same (standardised) features, penalty and
  projection rank chosen by leave-one-section-out CV as for ``"ridge"``: the spread of a
  linear surrogate, a measure of how well the training data cover the spot, not of the
  network's own weights.

Bootstrap: Efron B. & Tibshirani R.J., *An Introduction to the Bootstrap*, Chapman & Hall 1993;
spatial blocks: Lahiri S.N., *Resampling Methods for Dependent Data*, Springer 2003, ch. 12.
The ensemble is stored in the model folder as ``uncertainty.npz`` (:data:`ENSEMBLE_FILE`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._validation import InputError, check_int
from ._intervals import DEFAULT_BLOCK_SPACINGS, bootstrap_weights, spatial_blocks, spot_spacing

logger = logging.getLogger("spotlens")

#: the ensemble's file in the model folder
ENSEMBLE_FILE = "uncertainty.npz"
#: ensemble members fitted by default (``train(..., n_bootstrap=)``)
DEFAULT_N_BOOTSTRAP = 16
METHOD_RIDGE = "block-bootstrap ensemble of the ridge model"
METHOD_SURROGATE = "block-bootstrap ensemble of a ridge readout of the model's features"


# --------------------------------------------------------------------------------------------
# Kernels (arrays only)
# --------------------------------------------------------------------------------------------


def weighted_ridge(z: np.ndarray, y: np.ndarray, weights: np.ndarray,
                   alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression of ``y`` on ``z`` with spot multiplicities ``weights``, for each replicate.

    For each row ``w`` of ``weights`` it minimises
    ``Σ_s w_s ||y_s − ȳ_w − (z_s − z̄_w) W||² + alpha ||W||²`` (``z̄_w``, ``ȳ_w`` the
    ``w``-weighted means), whose solution is
    ``W = (Z_cᵀ diag(w) Z_c + alpha I)⁻¹ Z_cᵀ diag(w) Y_c`` and intercept ``c = ȳ_w − z̄_w W``.
    With ``w = 1`` it is :func:`~spotlens.histology._baseline._ridge_path`'s fit.

    Parameters
    ----------
    z
        ``n_spots × k`` inputs (projected features).
    y
        ``n_spots × n_genes`` targets.
    weights
        ``n_boot × n_spots`` non-negative multiplicities (a block-bootstrap replicate each).
    alpha
        Ridge penalty, > 0.

    Returns
    -------
    ``coef`` ``n_boot × k × n_genes`` and ``intercept`` ``n_boot × n_genes`` (float64).
    """
    n_boot, k = weights.shape[0], z.shape[1]
    coef = np.empty((n_boot, k, y.shape[1]))
    intercept = np.empty((n_boot, y.shape[1]))
    eye = alpha * np.eye(k)
    for b, w in enumerate(weights):
        total = w.sum()
        zm, ym = (w @ z) / total, (w @ y) / total
        zc, yc = z - zm, y - ym
        zw = zc * w[:, None]
        coef[b] = np.linalg.solve(zw.T @ zc + eye, zw.T @ yc)
        intercept[b] = ym - zm @ coef[b]
    return coef, intercept


def section_block_weights(coords_by_section: list[np.ndarray], n_boot: int,
                          rng: np.random.Generator,
                          block_spacings: float = DEFAULT_BLOCK_SPACINGS) -> np.ndarray:
    """Spot multiplicities of ``n_boot`` block-bootstrap replicates, sections kept apart.

    Each section is cut into square tiles of ``block_spacings`` × its median spot spacing
    (:func:`~spotlens.histology._intervals.spatial_blocks`) and each replicate draws as many
    tiles of each section as it has, with replacement; a section of fewer than 3 spots is kept
    whole in every replicate.

    Returns
    -------
    ``n_boot × n_spots`` float64, sections in the order given.
    """
    parts = []
    for coords in coords_by_section:
        coords = np.asarray(coords, dtype=np.float64)
        if len(coords) < 3:
            parts.append(np.ones((n_boot, len(coords))))
            continue
        spacing = spot_spacing(coords)
        blocks = spatial_blocks(coords, block_spacings * spacing if spacing > 0 else 1.0)
        if blocks.max() == 0:  # one tile: resample single spots instead
            blocks = np.arange(len(coords))
        parts.append(bootstrap_weights(blocks, n_boot, rng))
    return np.hstack(parts)


# --------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RidgeEnsemble:
    """Ridge heads refitted on block-bootstrap replicates of the training spots.

    Attributes
    ----------
    mean, scale
        ``n_features`` standardisation of the features (scale 1 where a feature is constant).
    components
        ``k × n_features`` PCA axes (orthonormal rows).
    coef
        ``n_boot × k × n_genes`` ridge coefficients (the reduced-rank projection folded in).
    intercept
        ``n_boot × n_genes``.
    alpha
        The ridge penalty.
    method
        :data:`METHOD_RIDGE` or :data:`METHOD_SURROGATE`.
    """

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    alpha: float
    method: str

    @property
    def n_boot(self) -> int:
        """Ensemble members."""
        return int(self.coef.shape[0])

    def members(self, features: np.ndarray) -> np.ndarray:
        """Every member's prediction: ``n_boot × n_spots × n_genes`` (float32).

        ``features`` are ``n_spots × n_features``, standardised as the model's predictor reads
        them.
        """
        z = ((np.asarray(features, dtype=np.float64) - self.mean) / self.scale) @ self.components.T
        return (np.einsum("sk,bkg->bsg", z, self.coef)
                + self.intercept[:, None, :]).astype(np.float32)

    def std(self, features: np.ndarray, *, chunk_size: int = 4096) -> np.ndarray:
        """``n_spots × n_genes`` standard deviation over the members (log-normalised units).

        Computed ``chunk_size`` spots at a time, so memory stays at
        ``n_boot × chunk_size × n_genes`` whatever the number of spots.

        Raises
        ------
        InputError
            If ``features`` is not ``n_spots × n_features`` of the training width.
        """
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise InputError(f"features must be n_spots × {self.mean.shape[0]}, got {x.shape}.")
        out = np.empty((x.shape[0], self.coef.shape[2]), dtype=np.float32)
        for lo in range(0, x.shape[0], chunk_size):
            out[lo:lo + chunk_size] = self.members(x[lo:lo + chunk_size]).std(axis=0, ddof=1)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the arrays to an ``.npz`` file atomically (float32 coefficients, no pickle)."""
        from ..io import atomic_path

        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, mean=self.mean, scale=self.scale, components=self.components,
                     coef=self.coef.astype(np.float32),
                     intercept=self.intercept.astype(np.float32),
                     alpha=np.array(self.alpha), method=np.array(self.method))

    @classmethod
    def load(cls, path: str | os.PathLike) -> RidgeEnsemble:
        """Read an ensemble written by :meth:`save`.

        Raises
        ------
        InputError
            If the file is missing or is not an ensemble.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"No uncertainty ensemble at {path}.")
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in ("mean", "scale", "components", "coef", "intercept",
                                       "alpha", "method")}
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"{path} is not a spotlens uncertainty ensemble ({err}).") from err
        return cls(a["mean"], a["scale"], a["components"], a["coef"].astype(np.float64),
                   a["intercept"].astype(np.float64), float(a["alpha"]), str(a["method"]))


def fit_ensemble(names: list[str], data: dict, *, ridge=None, n_boot: int = DEFAULT_N_BOOTSTRAP,
                 seed: int = 0) -> RidgeEnsemble:
    """Fit the block-bootstrap ensemble on the training sections.

    Parameters
    ----------
    names
        Training sections, in order.
    data
        ``data[name]`` with ``features`` (``n_spots × n_features``, standardised as the
        predictor reads them), ``coords`` (``n_spots × 2``) and ``y`` (``n_spots × n_genes``).
    ridge
        The fitted :class:`~spotlens.histology.RidgeBaseline` whose bootstrap this is (a
        ``"ridge"`` model); None = fit one by leave-one-section-out CV (the surrogate of a
        network), with a fixed penalty of 1 when there is a single section.
    n_boot
        Ensemble members, ≥ 2.
    seed
        Seed of the block draws.

    Returns
    -------
    :class:`RidgeEnsemble`.

    Raises
    ------
    InputError
        If ``n_boot`` is not an integer ≥ 2.
    """
    from ._baseline import RidgeBaseline
    from ._rank import DEFAULT_RANKS, ExpressionAxes

    check_n_bootstrap(n_boot, allow_zero=False)
    xs = {n: data[n]["features"] for n in names}
    ys = {n: data[n]["y"] for n in names}
    method = METHOD_RIDGE
    if ridge is None:
        method = METHOD_SURROGATE
        ridge = (RidgeBaseline(ranks=DEFAULT_RANKS) if len(names) >= 2
                 else RidgeBaseline(alpha=1.0)).fit(xs, ys)
    x = np.vstack([np.asarray(xs[n], dtype=np.float64) for n in names])
    y = np.vstack([np.asarray(ys[n], dtype=np.float64) for n in names])
    proj = ridge._projection
    z = proj(x)
    weights = section_block_weights([data[n]["coords"] for n in names], int(n_boot),
                                    np.random.default_rng(seed))
    coef, intercept = weighted_ridge(z, y, weights, ridge.alpha_)
    if ridge.rank_ is not None:
        m, c = ExpressionAxes.fit(y).linear_map(ridge.rank_)
        coef, intercept = coef @ m, intercept @ m + c
    logger.info("uncertainty: %d ridge heads on block-bootstrap replicates (alpha %.3g)",
                n_boot, ridge.alpha_)
    return RidgeEnsemble(proj.mean, proj.scale, proj.components, coef, intercept,
                         float(ridge.alpha_), method)


def check_n_bootstrap(n_boot, *, allow_zero: bool = True) -> int:
    """Return ``n_boot`` as an int; raise unless it is 0 (no ensemble) or an integer ≥ 2.

    Raises
    ------
    InputError
        ``n_boot`` is not an integer (a bool or float included), is 1 or negative, or is 0
        with ``allow_zero=False``.
    """
    expected = "0 (no uncertainty) or an integer ≥ 2" if allow_zero else "an integer ≥ 2"
    if allow_zero and check_int("n_bootstrap", n_boot, minimum=0, expected=expected) == 0:
        return 0
    return check_int("n_bootstrap", n_boot, minimum=2, expected=expected)
