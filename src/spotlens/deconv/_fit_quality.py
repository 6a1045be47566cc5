"""Per-spot goodness of fit: which spots the reference cannot explain.

Pure kernel: arrays in, arrays out. The counts stay sparse; the fitted means are formed one
block of spots at a time, so memory does not grow with the number of spots.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import brentq
from scipy.special import digamma, gammaln

from .._validation import InputError, check_number
from ._fit_quality_kernels import _row_deviance_sums
from ._ops import map_threads, row_ranges

#: Spots per block of fitted means (a block is ``_BLOCK × n_genes`` float64).
_BLOCK = 4096
#: Below this dispersion the negative binomial is treated as Poisson.
_POISSON_PHI = 1e-8
#: Fitted means below this count as 0 in the expected deviance (contribution < 4e-7 a gene).
_MU_MIN = 1e-8
#: The expected unit deviance is tabulated exactly up to this mean, then extrapolated in 1/µ.
_MU_TABLE_MAX = 1e3
#: A fitted mean of exactly 0 where a count was seen is floored here (a large, finite misfit).
_MU_FLOOR = 1e-10
#: Spots (at most) and spot × gene entries (at most) used to estimate the dispersion.
_DISPERSION_SPOTS = 2000
_DISPERSION_CELLS = 500_000
#: Largest dispersion searched, and the precision of the root search on ``log φ`` (1 % in φ).
_MAX_PHI = 100.0
_LOG_PHI_TOL = 1e-2
#: Upper ends tried, in order, to bracket the dispersion (the last is ``_MAX_PHI``).
_BRACKETS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, _MAX_PHI)
#: Consistency constant of the MAD for a normal distribution.
_MAD_NORMAL = 1.4826


def spot_fit_quality(
    counts: sparse.spmatrix | np.ndarray,
    x: np.ndarray,
    signature: np.ndarray,
    *,
    library: np.ndarray | None = None,
    n_parameters: np.ndarray | None = None,
    dispersion: float | None = None,
    n_mads: float = 3.0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Misfit of each spot to its fitted mixture, and a flag for spots far outside the rest.

    The fitted mean of gene ``g`` in spot ``i`` is ``µ_ig = N_i Σ_k x_ik S_kg``. The score is
    the spot's negative-binomial deviance divided by the deviance the fitted model itself
    would produce:

    ``score_i = D_i / (Σ_g E_φ[d(Y, µ_ig)] − p_i)``, ``D_i = Σ_g d(y_ig, µ_ig)``,

    with the NB2 unit deviance (variance ``µ + φµ²``, ``r = 1/φ``)

    ``d(y, µ) = 2 [y log(y/µ) − (y + r) log((y + r)/(µ + r))]``

    (Poisson ``2 [y log(y/µ) − (y − µ)]`` when ``φ = 0``), ``Y ~ NB(µ_ig, φ)`` and ``p_i`` the
    number of parameters fitted to the spot (``n_parameters``; by default the non-zero entries
    of ``x_i``): fitting them lowers the deviance by about that much. A spot the model explains scores about 1 at any depth; 2 means twice the misfit
    that sampling noise explains.

    *Why this score.* The expected deviance of a gene is about 1 only for large means; at
    small means it falls to ``≈ −2µ log µ`` (0.09 at ``µ = 0.01``). A 400-UMI spot spreads
    its counts over genes whose means are mostly below 1, so ``D_i / n_genes`` would call
    shallow spots well fitted just for being shallow. Dividing by the exact expectation (a
    table of ``E_φ[d(Y, µ)]`` summed over ``y`` for ``µ ≤ 1000``, extended by its ``1/µ``
    expansion towards the large-mean limit ``2r (log r − ψ(r))``) removes that. The Pearson
    statistic ``Σ (y − µ)² / (µ + φµ²)`` has expectation 1 per gene at any ``µ`` but its
    variance ``≈ 2 + 1/µ`` makes it heavy-tailed at small means; the deviance weighs
    near-silent genes less and is the steadier of the two. The dispersion matters for deep
    spots: under a Poisson model a fixed relative misfit ``δ`` adds ``≈ δ² µ`` per gene, so
    every deep spot would look worse; with ``φ > 0`` it adds at most ``≈ δ² / φ``.

    ``φ`` (when not given) is the deviance estimator of the dispersion made robust: the ``φ``
    at which the *median* score over spots is 1, or 0 if the median is at most 1 under the
    Poisson model already (McCullagh & Nelder §4.5.2 and §11.3 match the pooled deviance or
    Pearson statistic to its degrees of freedom; the median keeps a minority of badly fitted
    spots from inflating ``φ``). So with an estimated ``φ`` the typical spot scores 1 and the
    score says how much worse than typical a spot is. The Pearson statistic is not used here:
    on real counts its ``1/µ`` terms of near-silent genes dominate it and the ``φ`` it gives
    (many times the deviance's; ``benchmarks/results/docstring_figures.md``) makes nearly
    every spot look well fitted. ``φ`` is found on a seeded subsample of at most 2,000 spots.

    The flag is a one-sided robust outlier rule on ``log score`` across the scored spots:
    ``log score_i > median + n_mads · 1.4826 · MAD`` (1.4826 makes the MAD a standard
    deviation for normal data; Hampel, J Am Stat Assoc 69, 383–393, 1974). The rule is
    relative: it flags spots far outside what the reference explains *in this slide*, and
    flags none when every spot fits equally (badly or well).

    Everything is computed from the non-zeros of ``counts`` and the fitted means of one block
    of spots at a time (``x_block @ signature``): O(n_spots · n_genes · n_types) time, O(nnz +
    4096 · n_genes) memory; nothing ``n_spots × n_genes`` is formed.

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` non-negative counts over the genes the fit used (CSR preferred;
        dense is accepted).
    x
        ``n_spots × n_types`` non-negative fitted composition (types or cell states).
    signature
        ``n_types × n_genes`` non-negative signatures, scaled so that ``N_i · x_i S`` is the
        expected count vector of spot ``i`` (e.g. unit-sum profiles with ``x_i`` summing to
        about 1).
    library
        ``n_spots`` library sizes ``N_i`` (counts); ``None``: the row sums of ``counts``.
    n_parameters
        ``n_spots`` numbers ``p_i`` of parameters fitted to each spot; ``None``: the non-zero
        entries of ``x_i``. When ``x`` holds several nearly collinear states per cell type,
        the number of cell types present is the better count: on a small gene panel
        (tens of genes) the number of non-zero states can reach the expected deviance itself
        and leave no spot scored.
    dispersion
        NB2 dispersion ``φ ≥ 0`` (``0``: Poisson); ``None`` estimates it from all spots.
    n_mads
        Width of the flag rule in robust standard deviations of ``log score``.

    Returns
    -------
    score
        ``n_spots`` float64 misfit ratio (≈ 1 for a spot the model explains). NaN for spots
        with no counts, no fitted mean, or too few counts to judge (``Σ_g E[d] − p_i < 1``).
    flag
        ``n_spots`` bool: ``score`` above ``info["threshold"]``; False where ``score`` is NaN.
    info
        ``"threshold"`` (score above which a spot is flagged), ``"median"`` (median score),
        ``"mad"`` (MAD of ``log score``), ``"n_mads"``, ``"dispersion"`` (``φ`` used),
        ``"dispersion_estimated"`` (bool), ``"n_scored"``, ``"n_flagged"``, and per spot
        ``"deviance"`` (``D_i``) and ``"expected"`` (``Σ_g E[d] − p_i``).

    Raises
    ------
    InputError
        Shapes that do not match; negative, NaN or infinite counts, compositions, signatures,
        library sizes or ``n_parameters``; ``dispersion`` not ``None`` or a finite number ≥ 0; ``n_mads`` not > 0.

    References
    ----------
    McCullagh & Nelder, *Generalized Linear Models*, 2nd ed., Chapman & Hall 1989, §2.3 and
    §6.2 (deviance) and §11.3 (negative binomial). Hampel 1974 (MAD).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy import sparse
    >>> rng = np.random.default_rng(0)
    >>> s = rng.dirichlet(np.ones(200), size=4)           # 4 types × 200 genes, unit-sum
    >>> x = rng.dirichlet(np.ones(4), size=500)           # 500 spots
    >>> lib = rng.uniform(500, 5000, size=500)
    >>> y = sparse.csr_matrix(rng.poisson(lib[:, None] * (x @ s)).astype(float))
    >>> score, flag, info = spot_fit_quality(y, x, s, library=lib, dispersion=0.0)
    >>> bool(abs(np.mean(score) - 1) < 0.05), int(flag.sum()) <= 10
    (True, True)
    """
    y, x, s, lib = _check_inputs(counts, x, signature, library)
    p = _check_parameters(n_parameters, x)
    n_mads = _check_positive("n_mads", n_mads)
    if dispersion is None:
        phi = _estimate_dispersion(y, x, s, lib, p)
    else:
        phi = check_number(
            "dispersion", dispersion, at_least=0,
            expected="None (estimate it) or a finite number ≥ 0 (0: Poisson)",
        )
    grid, table, e_inf = _expected_deviance_table(phi)
    deviance, expected = _deviance_and_expectation(y, x, s, lib, phi, grid, table, e_inf)
    expected = expected - p
    ok = (lib > 0) & (expected >= 1.0)
    score = np.full(y.shape[0], np.nan)
    score[ok] = deviance[ok] / expected[ok]
    flag = np.zeros(y.shape[0], dtype=bool)
    scored = ok & (score > 0)
    info = {"n_mads": n_mads, "dispersion": phi, "dispersion_estimated": dispersion is None,
            "n_scored": int(ok.sum())}
    if scored.any():
        log_score = np.log(score[scored])
        med = float(np.median(log_score))
        mad = float(np.median(np.abs(log_score - med)))
        cut = med + n_mads * _MAD_NORMAL * mad
        flag[scored] = log_score > cut
        info.update(threshold=float(np.exp(cut)), median=float(np.exp(med)), mad=mad)
    else:
        info.update(threshold=np.nan, median=np.nan, mad=np.nan)
    info.update(n_flagged=int(flag.sum()), deviance=deviance, expected=expected)
    return score, flag, info


# --- validation ------------------------------------------------------------------------------


def _check_positive(name: str, value) -> float:
    return check_number(name, value, above=0)


def _check_parameters(n_parameters, x: np.ndarray) -> np.ndarray:
    if n_parameters is None:
        return np.count_nonzero(x > 0, axis=1)
    p = _as_float_array(n_parameters, "n_parameters", 1)
    if p.shape != (x.shape[0],):
        raise InputError(f"n_parameters has shape {p.shape}; it needs one number per spot "
                         f"({x.shape[0]},).")
    _check_finite_nonneg(p, "n_parameters")
    return p


def _check_finite_nonneg(values: np.ndarray, what: str) -> None:
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise InputError(f"The {what} contain NaN or infinite values; every entry must be finite.")
    if values.min() < 0:
        raise InputError(
            f"The {what} contain negative values (min {values.min():g}); they must be ≥ 0."
        )


def _as_float_array(value, what: str, ndim: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"The {what} must be numeric.") from err
    if arr.ndim != ndim:
        raise InputError(f"The {what} must be a {ndim}-D array, got shape {arr.shape}.")
    return arr


def _check_inputs(counts, x, signature, library):
    if sparse.issparse(counts):
        y = sparse.csr_matrix(counts, dtype=np.float64)
        if not y.has_canonical_format:  # summed on a copy: the caller's matrix is not touched
            y = y.copy()
            y.sum_duplicates()
    else:
        y = sparse.csr_matrix(_as_float_array(counts, "counts", 2))
    x = _as_float_array(x, "compositions x", 2)
    s = _as_float_array(signature, "signatures", 2)
    n, g = y.shape
    if x.shape[0] != n:
        raise InputError(
            f"x has {x.shape[0]} rows but counts has {n} spots; pass one composition row per "
            "spot (n_spots × n_types)."
        )
    if s.shape[1] != g:
        raise InputError(
            f"signature has {s.shape[1]} genes but counts has {g}; pass both over the same "
            "genes, in the same order (the genes the fit used)."
        )
    if s.shape[0] != x.shape[1]:
        raise InputError(
            f"signature has {s.shape[0]} rows but x has {x.shape[1]} columns; both must list "
            "the same cell types (or states)."
        )
    _check_finite_nonneg(y.data, "counts")
    _check_finite_nonneg(x, "compositions x")
    _check_finite_nonneg(s, "signatures")
    if library is None:
        lib = np.asarray(y.sum(axis=1)).ravel()
    else:
        lib = _as_float_array(library, "library sizes", 1)
        if lib.shape[0] != n:
            raise InputError(
                f"library has {lib.shape[0]} entries but counts has {n} spots; pass one library "
                "size per spot."
            )
        _check_finite_nonneg(lib, "library sizes")
    return y, x, s, lib


# --- kernels ---------------------------------------------------------------------------------


def _y_log_y_over_mu(y: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """``y log(y/µ)``, 0 at ``y = 0``: the part of the unit deviance that ``φ`` leaves alone."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0)


def _unit_deviance(y: np.ndarray, mu: np.ndarray, phi: float,
                   ylog: np.ndarray | None = None) -> np.ndarray:
    """NB2 (Poisson when ``φ ≈ 0``) unit deviance ``d(y, µ)``; ``y log(y/µ) = 0`` at ``y = 0``.

    ``ylog``: :func:`_y_log_y_over_mu` of the same ``y, µ``, when the caller reuses it.
    """
    if ylog is None:
        ylog = _y_log_y_over_mu(y, mu)
    if phi < _POISSON_PHI:
        return 2.0 * (ylog - (y - mu))
    r = 1.0 / phi
    return 2.0 * (ylog - (y + r) * np.log1p((y - mu) / (mu + r)))


def _zero_deviance(mu: np.ndarray, phi: float) -> np.ndarray:
    """``d(0, µ)``: ``2µ`` (Poisson) or ``(2/φ) log(1 + φµ)``."""
    if phi < _POISSON_PHI:
        return 2.0 * mu
    return (2.0 / phi) * np.log1p(phi * mu)


def _log_grid() -> np.ndarray:
    """The grid of ``log µ`` on which the expected deviance is tabulated."""
    return np.linspace(np.log(_MU_MIN), np.log(_MU_TABLE_MAX), 161)


def _expected_deviance_table(phi: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``E_φ[d(Y, µ)]`` on a grid of ``log µ`` in ``[log 1e-8, log 1000]``, and its limit.

    Each entry is ``Σ_y P(Y = y) d(y, µ)`` over ``0 ≤ y ≤ µ + 15 sd + 30`` (the pmf in closed
    form, renormalised over that range). The large-mean limit is 1 (Poisson) or
    ``2r (log r − ψ(r))``: for ``µ → ∞`` with ``r`` fixed, ``Y/µ → Gamma(r, 1/r)`` and
    ``d → 2r (t − 1 − log t)``.
    """
    log_grid = _log_grid()
    poisson = phi < _POISSON_PHI
    r = np.inf if poisson else 1.0 / phi
    # every (µ, y) pair of the table at once: group j holds y = 0 … its upper end
    mus = np.exp(log_grid)
    sd = np.sqrt(mus + (0.0 if poisson else phi * mus * mus))
    sizes = (mus + 15.0 * sd).astype(np.int64) + 31
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    group = np.repeat(np.arange(len(mus)), sizes)
    ys = (np.arange(int(sizes.sum())) - starts[group]).astype(np.float64)
    mu = mus[group]
    if poisson:
        logp = ys * np.log(mu) - mu - gammaln(ys + 1.0)
    else:
        logp = (gammaln(ys + r) - gammaln(r) - gammaln(ys + 1.0)
                + r * np.log(r / (r + mu)) + ys * np.log(mu / (r + mu)))
    p = np.exp(logp - np.maximum.reduceat(logp, starts)[group])
    table = (np.bincount(group, weights=p * _unit_deviance(ys, mu, phi), minlength=len(mus))
             / np.bincount(group, weights=p, minlength=len(mus)))
    e_inf = 1.0 if poisson else float(2.0 * r * (np.log(r) - digamma(r)))
    return log_grid, table, e_inf


def _expected(mu: np.ndarray, grid: np.ndarray, table: np.ndarray, e_inf: float) -> np.ndarray:
    """``E[d(Y, µ)]`` elementwise: table lookup, ``1/µ`` extrapolation above it, 0 below."""
    out = np.zeros_like(mu)
    inside = (mu >= _MU_MIN) & (mu <= _MU_TABLE_MAX)
    out[inside] = np.interp(np.log(mu[inside]), grid, table)
    above = mu > _MU_TABLE_MAX
    out[above] = e_inf + (table[-1] - e_inf) * _MU_TABLE_MAX / mu[above]
    return out


def _row_lookup(mu: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """What :func:`_expected` needs to give row sums of ``E[d(Y, µ)]`` for any table.

    ``mu`` (``n_rows × n_genes``) becomes a sparse ``n_rows × n_grid`` matrix of linear
    interpolation weights on the table's grid, with, per row, the number of means above the
    table and the sum of ``_MU_TABLE_MAX / µ`` over them: then each new dispersion costs a
    product with its table instead of an interpolation of every mean.
    """
    grid = _log_grid()
    rows, cols = np.nonzero((mu >= _MU_MIN) & (mu <= _MU_TABLE_MAX))
    pos = (np.log(mu[rows, cols]) - grid[0]) / (grid[1] - grid[0])
    left = np.clip(np.floor(pos).astype(np.int64), 0, len(grid) - 2)
    frac = np.clip(pos - left, 0.0, 1.0)
    weights = sparse.csr_matrix(
        (np.concatenate([1.0 - frac, frac]), (np.concatenate([rows, rows]),
                                              np.concatenate([left, left + 1]))),
        shape=(mu.shape[0], len(grid)),
    )
    above = mu > _MU_TABLE_MAX
    inverse = np.where(above, _MU_TABLE_MAX / np.where(above, mu, 1.0), 0.0).sum(axis=1)
    return weights, above.sum(axis=1), inverse


def _row_expected(lookup, grid: np.ndarray, table: np.ndarray, e_inf: float) -> np.ndarray:
    """Row sums of :func:`_expected` from :func:`_row_lookup`'s summary of the means."""
    weights, n_above, inverse = lookup
    return weights @ table + n_above * e_inf + (table[-1] - e_inf) * inverse


def _blocks(n: int):
    for start in range(0, n, _BLOCK):
        yield start, min(n, start + _BLOCK)


def _estimate_dispersion(y: sparse.csr_matrix, x, s, lib, p) -> float:
    """``φ`` at which the median score over spots is 1 (0 if it is at most 1 at ``φ = 0``).

    The score is decreasing in ``φ`` (the deviance falls, its expectation rises from 1 towards
    2 a gene), so it is bracketed between decades from ``1e-8`` up to ``100`` and found by
    Brent's root search on ``log φ`` inside the bracket. A seeded
    subsample of at most ``_DISPERSION_SPOTS`` spots (and ``_DISPERSION_CELLS / n_genes``) is
    formed densely.
    """
    n, g = y.shape
    m = min(n, _DISPERSION_SPOTS, max(100, _DISPERSION_CELLS // max(g, 1)))
    rows = np.sort(np.random.default_rng(0).choice(n, size=m, replace=False)) if m < n else (
        np.arange(n))
    rows = rows[lib[rows] > 0]
    if rows.size == 0:
        return 0.0
    mu = lib[rows, None] * (x[rows] @ s)
    yy = y[rows].toarray()
    safe = np.maximum(mu, _MU_FLOOR)
    p = p[rows]

    lookup = _row_lookup(mu)
    ylog = _y_log_y_over_mu(yy, safe)

    def excess(phi: float) -> float:
        dev = _unit_deviance(yy, safe, phi, ylog).sum(axis=1)
        expected = _row_expected(lookup, *_expected_deviance_table(phi)) - p
        ok = expected >= 1.0
        if not ok.any():
            return -1.0
        return float(np.median(dev[ok] / expected[ok])) - 1.0

    if excess(0.0) <= 0:
        return 0.0
    # bracket the root going up by decades (a large φ makes a long, costly table), then
    # Brent's search inside the bracket; values at the bracket's ends are reused
    seen: dict[float, float] = {}

    def score(log_phi: float) -> float:
        if log_phi not in seen:
            seen[log_phi] = excess(float(np.exp(log_phi)))
        return seen[log_phi]

    lo = np.log(_POISSON_PHI)
    for phi in _BRACKETS:
        hi = float(np.log(phi))
        if score(hi) <= 0:
            break
        lo = hi
    else:
        return _MAX_PHI
    if score(lo) <= 0:
        return float(np.exp(lo))
    root = brentq(score, lo, hi, xtol=_LOG_PHI_TOL)
    return float(np.exp(root))


def _deviance_and_expectation(y, x, s, lib, phi, grid, table, e_inf):
    """Per spot ``D_i = Σ_g d(y_ig, µ_ig)`` and ``Σ_g E[d(Y, µ_ig)]``, one block at a time.

    ``D_i = Σ_g d(0, µ_ig) + Σ_nz [d(y, µ) − d(0, µ)]``: the dense block of means gives the
    first sum and the expectation, the non-zeros correct the first sum (one compiled pass,
    :func:`spotlens.deconv._fit_quality_kernels._row_deviance_sums`, rows split over threads).
    """
    n = y.shape[0]
    deviance = np.empty(n)
    expected = np.empty(n)
    step = float(grid[1] - grid[0])
    buffer = np.empty((min(n, _BLOCK), s.shape[1]))  # reused: a fresh block costs page faults
    for lo, hi in _blocks(n):
        mu = np.matmul(x[lo:hi] * lib[lo:hi, None], s, out=buffer[: hi - lo])
        block = y[lo:hi]

        def rows(a, b, mu=mu, block=block, lo=lo):
            _row_deviance_sums(mu, block.indptr, block.indices, block.data, phi,
                               phi < _POISSON_PHI, _MU_MIN, _MU_TABLE_MAX, _MU_FLOOR,
                               float(grid[0]), step, table, e_inf,
                               deviance[lo:hi], expected[lo:hi], a, b)

        map_threads(rows, row_ranges(hi - lo))
    return deviance, expected


__all__ = ["spot_fit_quality"]
