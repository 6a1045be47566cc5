"""HEST-style linear baseline: standardise, PCA, ridge; alpha by leave-one-section-out CV.

The HEST-Benchmark protocol (Jaume G. et al., "HEST-1k: a dataset for spatial transcriptomics
and histology image analysis", NeurIPS 2024, https://arxiv.org/abs/2406.16192) fits a ridge
regression on PCA-reduced (256 components) patch-encoder features. Here the ridge penalty is
chosen on the training sections by leave-one-section-out cross-validation over a log grid,
scored with the evaluation metric (mean per-gene Pearson r on the held-out section).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._validation import InputError, check_int
from ._metrics import pearson_per_gene
from ._rank import ExpressionAxes, candidate_ranks, check_rank, rank_label

logger = logging.getLogger("spotlens")

DEFAULT_ALPHAS = np.logspace(-2, 6, 33)


# --------------------------------------------------------------------------------------------
# Kernels (arrays only)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Projection:
    """Standardisation and PCA fitted on training features."""

    mean: np.ndarray  # n_features
    scale: np.ndarray  # n_features (1 where a feature is constant)
    components: np.ndarray  # n_components × n_features, orthonormal rows

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.components.T


def _fit_projection(x: np.ndarray, n_components: int) -> _Projection:
    """Standardise ``n_samples × n_features`` and keep the top ``n_components`` PCs.

    ``n_components`` is capped by ``min(n_samples, n_features)``.
    """
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (x - mean) / scale
    k = min(int(n_components), z.shape[0], z.shape[1])
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return _Projection(mean, scale, vt[:k])


def _ridge_path(z: np.ndarray, y: np.ndarray, alphas: np.ndarray):
    """Ridge solutions for every alpha from one SVD.

    Minimises ``||y - y_mean - (z - z_mean) W||² + alpha ||W||²`` per alpha.

    Parameters
    ----------
    z
        ``n_samples × n_components`` inputs.
    y
        ``n_samples × n_genes`` targets.
    alphas
        ``n_alphas`` penalties (> 0).

    Returns
    -------
    A function ``predict(z_new, i) -> n_new × n_genes`` for the ``i``-th alpha, and a
    function ``coef(i) -> (W: n_components × n_genes, intercept: n_genes)``.
    """
    z_mean, y_mean = z.mean(axis=0), y.mean(axis=0)
    u, s, vt = np.linalg.svd(z - z_mean, full_matrices=False)
    uty = u.T @ (y - y_mean)  # rank × n_genes

    def coef(i: int):
        shrink = s / (s**2 + alphas[i])
        w = vt.T @ (shrink[:, None] * uty)
        return w, y_mean - z_mean @ w

    def predict(z_new: np.ndarray, i: int) -> np.ndarray:
        w, b = coef(i)
        return z_new @ w + b

    return predict, coef


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------


def _check_sections(features_by_section, expression_by_section):
    for what, value in (("features_by_section", features_by_section),
                        ("expression_by_section", expression_by_section)):
        if not isinstance(value, Mapping) or len(value) == 0:
            raise InputError(f"{what} must be a non-empty dict of section name -> array.")
    if set(features_by_section) != set(expression_by_section):
        raise InputError(
            "features_by_section and expression_by_section name different sections: "
            f"{sorted(map(str, features_by_section))} vs {sorted(map(str, expression_by_section))}."
        )
    xs, ys = {}, {}
    n_features = n_genes = None
    for name in features_by_section:
        x = np.asarray(features_by_section[name], dtype=np.float64)
        y = np.asarray(expression_by_section[name], dtype=np.float64)
        if x.ndim != 2 or y.ndim != 2:
            raise InputError(
                f"Section {name!r}: features must be n_spots × n_features and expression "
                f"n_spots × n_genes, got {x.shape} and {y.shape}."
            )
        if x.shape[0] != y.shape[0]:
            raise InputError(
                f"Section {name!r}: {x.shape[0]} feature rows but {y.shape[0]} expression rows; "
                "both need one row per spot, in the same order."
            )
        if n_features is None:
            n_features, n_genes = x.shape[1], y.shape[1]
        if x.shape[1] != n_features or y.shape[1] != n_genes:
            raise InputError(
                f"Section {name!r} has {x.shape[1]} features and {y.shape[1]} genes; the first "
                f"section has {n_features} and {n_genes}. Use the same encoder and gene list."
            )
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise InputError(f"Section {name!r} has NaN or infinite features or expression.")
        xs[name], ys[name] = x, y
    return xs, ys


class RidgeBaseline:
    """Standardise → PCA → ridge regression from tile features to spot expression.

    Parameters
    ----------
    n_components
        PCA components kept (256 as in HEST-Benchmark), capped by the number of training spots
        and of features.
    alphas
        Ridge penalties tried by leave-one-section-out CV (default ``logspace(-2, 6, 33)``).
    alpha
        A fixed penalty instead of CV (then a single training section suffices).
    ranks
        ``None`` (the HEST protocol): predict every gene freely. A list of ranks (``None`` in
        it = no projection), e.g. :data:`~spotlens.histology._rank.DEFAULT_RANKS`: after
        alpha, choose by the same leave-one-section-out CV a rank ``r`` and project the
        predictions onto the top ``r`` principal axes of the z-scored training expression
        (reduced-rank regression; see :mod:`spotlens.histology._rank`). The projection is
        folded into ``coef_`` and ``intercept_``. Needs CV (not with a fixed ``alpha``).

    Attributes
    ----------
    alpha_
        The penalty used for the final fit.
    rank_
        The rank chosen (``None``: no projection).
    cv_scores_
        ``n_alphas × n_sections`` DataFrame: mean per-gene Pearson r on each held-out training
        section for each alpha, without projection (``None`` with a fixed ``alpha``).
    rank_scores_
        ``n_ranks × n_sections`` DataFrame at ``alpha_``, index = rank labels (``"10"``,
        ``"full"``); ``None`` without ``ranks``.

    Raises
    ------
    InputError
        ``n_components`` not a positive integer; ``alphas`` empty, non-finite or not
        positive; ``alpha`` not positive and finite; a rank in ``ranks`` that is not a
        positive integer or ``None``; ``ranks`` together with a fixed ``alpha``.
    n_components_
        PCA components actually kept.
    sections_
        Training section names.

    Examples
    --------
    >>> model = RidgeBaseline().fit({"C2": f2, "C3": f3}, {"C2": y2, "C3": y3})  # doctest: +SKIP
    >>> pred = model.predict(f6)  # n_spots × n_genes  # doctest: +SKIP
    >>> model.save("model.npz"); RidgeBaseline.load("model.npz").predict(f6)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        n_components: int = 256,
        alphas: np.ndarray | None = None,
        alpha: float | None = None,
        ranks=None,
    ):
        check_int("n_components", n_components, minimum=1, expected="a positive integer")
        grid = DEFAULT_ALPHAS if alphas is None else np.asarray(alphas, dtype=np.float64).ravel()
        if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
            raise InputError("alphas must be a non-empty list of positive, finite penalties.")
        if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
            raise InputError(f"alpha must be positive and finite, got {alpha!r}.")
        if ranks is not None:
            ranks = [check_rank(r, allow_auto=False) for r in ranks]
            if not ranks:
                raise InputError("ranks must hold at least one rank (None = no projection).")
            if alpha is not None:
                raise InputError("ranks are chosen by cross-validation; drop alpha= or ranks=.")
        self.n_components = int(n_components)
        self.alphas = np.sort(grid)
        self.alpha = alpha
        self.ranks = ranks

    def _cv(self, xs: dict, ys: dict) -> tuple[pd.DataFrame, dict]:
        """Held-out mean Pearson r per alpha and section, and each section's predictions."""
        names = list(xs)
        scores = np.zeros((len(self.alphas), len(names)))
        held_out = {}
        for j, held in enumerate(names):
            train = [n for n in names if n != held]
            x_tr = np.vstack([xs[n] for n in train])
            y_tr = np.vstack([ys[n] for n in train])
            proj = _fit_projection(x_tr, self.n_components)
            predict, _ = _ridge_path(proj(x_tr), y_tr, self.alphas)
            z_held = proj(xs[held])
            held_out[held] = [predict(z_held, i) for i in range(len(self.alphas))]
            for i, pred in enumerate(held_out[held]):
                r, _ = pearson_per_gene(pred, ys[held])
                scores[i, j] = r.mean()
        table = pd.DataFrame(scores, index=pd.Index(self.alphas, name="alpha"), columns=names)
        return table, held_out

    def _choose_rank(self, ys: dict, held_out: dict, best: int) -> None:
        """Leave-one-section-out choice of the projection rank at the chosen alpha."""
        names = list(ys)
        n_genes = next(iter(ys.values())).shape[1]
        n_train = min(sum(len(ys[n]) for n in names if n != held) for held in names)
        ranks = candidate_ranks(n_genes, n_train, self.ranks)
        scores = np.zeros((len(ranks), len(names)))
        for j, held in enumerate(names):
            axes = ExpressionAxes.fit(np.vstack([ys[n] for n in names if n != held]))
            for i, rank in enumerate(ranks):
                r, _ = pearson_per_gene(axes.project(held_out[held][best], rank), ys[held])
                scores[i, j] = r.mean()
        self.rank_scores_ = pd.DataFrame(
            scores, index=pd.Index([rank_label(r) for r in ranks], name="rank"), columns=names)
        mean = scores.mean(axis=1)
        self.rank_ = ranks[int(len(mean) - 1 - np.argmax(mean[::-1]))]  # ties -> higher rank

    def fit(
        self,
        features_by_section: Mapping[str, np.ndarray],
        expression_by_section: Mapping[str, np.ndarray],
    ) -> RidgeBaseline:
        """Fit on training sections; choose alpha by leave-one-section-out CV.

        Parameters
        ----------
        features_by_section
            Section name -> ``n_spots × n_features`` tile features.
        expression_by_section
            Section name -> ``n_spots × n_genes`` targets, ``log1p(normalize_total(counts,
            1e4))`` of the gene set (:func:`~spotlens.histology._metrics.section_log_expression`),
            rows in the same spot order as the features.

        Returns
        -------
        ``self``, fitted.

        Raises
        ------
        InputError
            Mismatched sections, rows, feature or gene counts; non-finite values; fewer than
            two sections without a fixed ``alpha``.
        """
        xs, ys = _check_sections(features_by_section, expression_by_section)
        if self.alpha is None:
            if len(xs) < 2:
                raise InputError(
                    "Choosing alpha by leave-one-section-out CV needs at least 2 training "
                    f"sections, got {len(xs)}. Pass alpha= to fit on one section."
                )
            self.cv_scores_, held_out = self._cv(xs, ys)
            mean = self.cv_scores_.mean(axis=1).to_numpy()
            best = int(len(mean) - 1 - np.argmax(mean[::-1]))  # ties -> the larger penalty
            self.alpha_ = float(self.alphas[best])
            if best in (0, len(mean) - 1) and len(mean) > 1:
                logger.info("RidgeBaseline: alpha %.3g is at the edge of the grid", self.alpha_)
        else:
            self.cv_scores_ = None
            self.alpha_ = float(self.alpha)
        self.rank_, self.rank_scores_ = None, None
        if self.ranks is not None:
            self._choose_rank(ys, held_out, best)
            logger.info("RidgeBaseline: expression rank %s", rank_label(self.rank_))
        x = np.vstack(list(xs.values()))
        y = np.vstack(list(ys.values()))
        self._projection = _fit_projection(x, self.n_components)
        _, coef = _ridge_path(self._projection(x), y, np.array([self.alpha_]))
        self.coef_, self.intercept_ = coef(0)
        if self.rank_ is not None:
            m, c = ExpressionAxes.fit(y).linear_map(self.rank_)
            self.coef_, self.intercept_ = self.coef_ @ m, self.intercept_ @ m + c
        self.n_components_ = self._projection.components.shape[0]
        self.n_features_in_ = x.shape[1]
        self.sections_ = list(xs)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predict ``n_spots × n_genes`` log-normalised expression from ``n_spots × n_features``.

        Raises
        ------
        InputError
            If the model is not fitted, or ``features`` has the wrong width or bad values.
        """
        if not hasattr(self, "coef_"):
            raise InputError("RidgeBaseline is not fitted yet: call fit() first.")
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise InputError(
                f"features must be n_spots × {self.n_features_in_} (as in training), got "
                f"{x.shape}."
            )
        if not np.all(np.isfinite(x)):
            raise InputError("features contains NaN or infinite values.")
        return self._projection(x) @ self.coef_ + self.intercept_

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted arrays to an ``.npz`` file atomically (no pickle).

        The file holds ``mean``, ``scale`` (``n_features``), ``components``
        (``n_components × n_features``), ``coef`` (``n_components × n_genes``, the projection
        folded in), ``intercept`` (``n_genes``) and ``alpha``; the layout of ``model.npz`` in a
        model folder since its first release.

        Raises
        ------
        InputError
            If the model is not fitted.
        """
        from ..io import atomic_path

        if not hasattr(self, "coef_"):
            raise InputError("Nothing to save: RidgeBaseline is not fitted yet.")
        proj = self._projection
        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, mean=proj.mean, scale=proj.scale, components=proj.components,
                     coef=self.coef_, intercept=self.intercept_, alpha=np.array(self.alpha_))

    @classmethod
    def load(cls, path: str | os.PathLike) -> RidgeBaseline:
        """Read a model written by :meth:`save`, ready to :meth:`predict`.

        The cross-validation tables are not stored: ``cv_scores_`` and ``rank_scores_`` are
        None, and ``rank_`` is None (the projection is folded into ``coef_``).

        Raises
        ------
        InputError
            If the file is missing or lacks one of the arrays.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"No ridge model file at {path}.")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("mean", "scale", "components", "coef",
                                            "intercept", "alpha")}
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"{path} is not a spotlens ridge model ({err}).") from err
        model = cls(alpha=float(arrays["alpha"]))
        model._projection = _Projection(arrays["mean"], arrays["scale"], arrays["components"])
        model.coef_, model.intercept_ = arrays["coef"], arrays["intercept"]
        model.alpha_, model.rank_ = float(arrays["alpha"]), None
        model.cv_scores_ = model.rank_scores_ = None
        model.n_components_ = arrays["components"].shape[0]
        model.n_features_in_ = arrays["mean"].shape[0]
        model.sections_ = []
        return model
