"""Spatial block-bootstrap intervals for the mean per-gene Pearson r on one section.

Neighbouring spots share tissue, so their errors are correlated and a section of ``n`` spots
holds far fewer than ``n`` independent observations. Resampling single spots would make the
interval too narrow. Here the section is cut into square tiles of side ``block_size`` (in the
coordinates' unit); one bootstrap replicate draws as many tiles as the section has, uniformly
with replacement, keeps every spot of each tile drawn (as often as the tile is drawn) and
recomputes the score. The interval is the percentile interval of the replicates (Künsch H.R.,
"The jackknife and the bootstrap for general stationary observations", Ann. Statist. 17,
1217–1241, 1989, https://doi.org/10.1214/aos/1176347265, for the moving-block idea; Lahiri
S.N., *Resampling Methods for Dependent Data*, Springer 2003, ch. 12 for spatial blocks).

The paired version resamples the same tiles for two models' predictions of the same spots and
scores their difference per replicate, so what the two share (the section, its hard regions)
cancels; a model against itself gives exactly ``[0, 0]``.

Kernels take arrays only. A replicate is a vector of spot multiplicities ``w`` (the number of
times a spot's tile was drawn); the Pearson r of the resampled spots is the ``w``-weighted r,
computed for every replicate at once from ``W @ x``-type products.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._validation import InputError, check_int

#: Tile side, in nearest-neighbour spot spacings, when ``block_size`` is not given.
DEFAULT_BLOCK_SPACINGS = 4.0


@dataclass(frozen=True)
class BootstrapInterval:
    """A point estimate and its block-bootstrap percentile interval.

    Attributes
    ----------
    estimate
        The score on all spots (mean per-gene Pearson r, or the difference of two).
    low, high
        The ``level`` percentile interval of the replicates.
    level
        Coverage asked for (0.95).
    n_boot
        Bootstrap replicates.
    n_blocks
        Tiles the section was cut into (tiles holding at least one spot).
    block_size
        Tile side, in the coordinates' unit.
    replicates
        ``n_boot`` replicate scores (not shown in the repr).
    """

    estimate: float
    low: float
    high: float
    level: float
    n_boot: int
    n_blocks: int
    block_size: float
    replicates: np.ndarray = field(repr=False, compare=False)

    @property
    def sd(self) -> float:
        """Standard deviation of the replicates (the bootstrap standard error)."""
        return float(np.std(self.replicates, ddof=1))

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


# --------------------------------------------------------------------------------------------
# Kernels (arrays only)
# --------------------------------------------------------------------------------------------


def spot_spacing(coords: np.ndarray) -> float:
    """Median distance from a spot to its nearest other spot (the grid pitch on a regular array).

    Parameters
    ----------
    coords
        ``n_spots × 2`` spot centres, ``n_spots ≥ 2``.
    """
    from scipy.spatial import cKDTree

    d, _ = cKDTree(coords).query(coords, k=2)
    return float(np.median(d[:, 1]))


def spatial_blocks(coords: np.ndarray, block_size: float) -> np.ndarray:
    """Label each spot with the square tile it falls in.

    Tile ``(i, j)`` holds the spots with ``floor((x - min x) / block_size) = i`` and
    ``floor((y - min y) / block_size) = j``; empty tiles get no label.

    Parameters
    ----------
    coords
        ``n_spots × 2`` spot centres (any unit).
    block_size
        Tile side, same unit as ``coords``, > 0.

    Returns
    -------
    ``n_spots`` integer labels ``0 … n_blocks − 1`` (tiles ordered by ``(i, j)``).
    """
    cells = np.floor((coords - coords.min(axis=0)) / block_size).astype(np.int64)
    _, labels = np.unique(cells, axis=0, return_inverse=True)
    return labels.ravel()


def bootstrap_weights(blocks: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Spot multiplicities of ``n_boot`` block-bootstrap replicates.

    Each replicate draws ``n_blocks`` tiles uniformly with replacement (tile counts
    ``c ~ Multinomial(n_blocks, 1/n_blocks)``); a spot's weight is its tile's count.

    Returns
    -------
    ``n_boot × n_spots`` float64.
    """
    n_blocks = int(blocks.max()) + 1
    counts = rng.multinomial(n_blocks, np.full(n_blocks, 1.0 / n_blocks), size=n_boot)
    return counts[:, blocks].astype(np.float64)


def weighted_pearson(pred: np.ndarray, observed: np.ndarray,
                     weights: np.ndarray) -> np.ndarray:
    """Per-gene Pearson r under each row of spot weights.

    For weights ``w`` (``n_spots``), ``r_g = cov_w(p_g, o_g) / sqrt(var_w(p_g) var_w(o_g))``
    with ``cov_w(a, b) = Σ w a b / Σ w − (Σ w a / Σ w)(Σ w b / Σ w)``: the Pearson r of the
    sample in which spot ``i`` appears ``w_i`` times. As
    :func:`~spotlens.histology._metrics.pearson_per_gene`, r is 0 where either column is
    constant over the spots with weight > 0 (variance ≤ 1e-12 × its variance over all spots).

    Parameters
    ----------
    pred, observed
        ``n_spots × n_genes``.
    weights
        ``n_boot × n_spots`` non-negative, each row with a positive sum.

    Returns
    -------
    ``n_boot × n_genes`` correlations in [−1, 1].
    """
    # centre on all spots first: the raw-moment formulas below then lose no precision
    p = pred - pred.mean(axis=0)
    o = observed - observed.mean(axis=0)
    total = weights.sum(axis=1, keepdims=True)
    mp, mo = weights @ p / total, weights @ o / total
    vp = weights @ (p * p) / total - mp**2
    vo = weights @ (o * o) / total - mo**2
    cov = weights @ (p * o) / total - mp * mo
    full_vp, full_vo = (p * p).mean(axis=0), (o * o).mean(axis=0)
    undefined = ((vp <= 1e-12 * full_vp) | (full_vp == 0)
                 | (vo <= 1e-12 * full_vo) | (full_vo == 0))
    denom = np.sqrt(np.where(undefined, 1.0, vp * vo))
    return np.clip(np.where(undefined, 0.0, cov / denom), -1.0, 1.0)


def _replicates(preds: list[np.ndarray], observed: np.ndarray, blocks: np.ndarray,
                n_boot: int, seed, chunk: int = 256) -> np.ndarray:
    """``n_boot`` replicates of mean r (one prediction) or of the difference (two)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        w = bootstrap_weights(blocks, min(chunk, n_boot - start), rng)
        scores = [weighted_pearson(p, observed, w).mean(axis=1) for p in preds]
        out[start:start + len(w)] = scores[0] if len(scores) == 1 else scores[0] - scores[1]
    return out


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _check(arrays: dict[str, np.ndarray], coords, block_size, n_boot, level):
    checked = {}
    shape = None
    for name, value in arrays.items():
        x = np.asarray(value, dtype=np.float64)
        if x.ndim != 2:
            raise InputError(f"{name} must be n_spots × n_genes, got shape {x.shape}.")
        if shape is not None and x.shape != shape:
            raise InputError(
                f"{name} has shape {x.shape}, the other arrays {shape}: predictions and "
                "observations need the same spots and genes, in the same order."
            )
        if not np.all(np.isfinite(x)):
            raise InputError(f"{name} contains NaN or infinite values.")
        shape = x.shape
        checked[name] = x
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape != (shape[0], 2) or not np.all(np.isfinite(xy)):
        raise InputError(
            f"coords must be finite, n_spots × 2 = ({shape[0]}, 2), got shape {xy.shape}."
        )
    if shape[0] < 3:
        raise InputError("A bootstrap of correlations across spots needs at least 3 spots.")
    check_int("n_boot", n_boot, minimum=2)
    if not (isinstance(level, (int, float)) and 0 < level < 1):
        raise InputError(f"level must be between 0 and 1 (e.g. 0.95), got {level!r}.")
    if block_size is None:
        block_size = DEFAULT_BLOCK_SPACINGS * spot_spacing(xy)
    if not (np.isfinite(block_size) and block_size > 0):
        raise InputError(f"block_size must be positive and finite, got {block_size!r}.")
    blocks = spatial_blocks(xy, float(block_size))
    if blocks.max() < 1:
        raise InputError(
            f"block_size {block_size:g} puts every spot in one tile; a bootstrap needs at "
            "least 2 tiles. Use a smaller block_size."
        )
    return checked, blocks, float(block_size)


def _interval(estimate, reps, level, n_boot, blocks, block_size) -> BootstrapInterval:
    low, high = np.quantile(reps, [(1 - level) / 2, 1 - (1 - level) / 2])
    return BootstrapInterval(float(estimate), float(low), float(high), float(level),
                             int(n_boot), int(blocks.max()) + 1, block_size, reps)


def block_bootstrap_pearson(
    pred,
    observed,
    coords,
    *,
    block_size: float | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | np.random.Generator | None = 0,
) -> BootstrapInterval:
    """Mean per-gene Pearson r of one section with a spatial block-bootstrap interval.

    Parameters
    ----------
    pred, observed
        ``n_spots × n_genes`` predicted and measured log-normalised expression, same spots and
        genes in the same order.
    coords
        ``n_spots × 2`` spot centres (e.g. ``obsm["spatial"]``, full-resolution pixels).
    block_size
        Tile side in the unit of ``coords``. ``None``: ``4 ×`` the median nearest-neighbour
        spacing (:data:`DEFAULT_BLOCK_SPACINGS`), 800 µm tiles of 16 spots on a legacy ST
        array (200 µm pitch).
    n_boot
        Bootstrap replicates.
    level
        Coverage of the percentile interval.
    seed
        Seed or generator of the tile draws.

    Returns
    -------
    :class:`BootstrapInterval` with ``estimate`` = mean over genes of the per-gene r on all
    spots (as :func:`~spotlens.histology.evaluate`; genes constant there count as 0).

    Raises
    ------
    InputError
        Arrays of other shapes or with NaN; coords not ``n_spots × 2``; fewer than 3 spots;
        ``block_size`` that leaves one tile; ``n_boot < 2``; ``level`` outside (0, 1).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> xy = np.stack(np.meshgrid(np.arange(15), np.arange(15)), -1).reshape(-1, 2) * 200.0
    >>> obs = rng.normal(size=(225, 5)); pred = obs + rng.normal(size=(225, 5))
    >>> ci = block_bootstrap_pearson(pred, obs, xy, n_boot=200)
    >>> ci.low < ci.estimate < ci.high
    True
    """
    arrays, blocks, block_size = _check({"pred": pred, "observed": observed}, coords,
                                        block_size, n_boot, level)
    p, o = arrays["pred"], arrays["observed"]
    estimate = weighted_pearson(p, o, np.ones((1, len(p)))).mean()
    reps = _replicates([p], o, blocks, int(n_boot), seed)
    return _interval(estimate, reps, level, n_boot, blocks, block_size)


def paired_block_bootstrap_pearson(
    pred_a,
    pred_b,
    observed,
    coords,
    *,
    block_size: float | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int | np.random.Generator | None = 0,
) -> BootstrapInterval:
    """Difference of two models' mean per-gene Pearson r on the same spots, with its interval.

    Both models are scored on the same resampled spots in every replicate; the interval is
    that of ``mean r(pred_a) − mean r(pred_b)``. An interval above 0 says model a is better on
    this section beyond what the choice of spots explains.

    Parameters
    ----------
    pred_a, pred_b
        ``n_spots × n_genes`` predictions of two models.
    observed, coords, block_size, n_boot, level, seed
        As :func:`block_bootstrap_pearson`.

    Returns
    -------
    :class:`BootstrapInterval` of the difference (a − b); ``[0, 0]`` when the two predictions
    are equal.

    Raises
    ------
    InputError
        As :func:`block_bootstrap_pearson`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> xy = np.stack(np.meshgrid(np.arange(15), np.arange(15)), -1).reshape(-1, 2) * 200.0
    >>> obs = rng.normal(size=(225, 5)); pred = obs + rng.normal(size=(225, 5))
    >>> d = paired_block_bootstrap_pearson(pred, pred, obs, xy, n_boot=200)
    >>> (d.low, d.high)
    (0.0, 0.0)
    """
    arrays, blocks, block_size = _check(
        {"pred_a": pred_a, "pred_b": pred_b, "observed": observed}, coords, block_size, n_boot,
        level)
    a, b, o = arrays["pred_a"], arrays["pred_b"], arrays["observed"]
    ones = np.ones((1, len(o)))
    estimate = weighted_pearson(a, o, ones).mean() - weighted_pearson(b, o, ones).mean()
    reps = _replicates([a, b], o, blocks, int(n_boot), seed)
    return _interval(estimate, reps, level, n_boot, blocks, block_size)
