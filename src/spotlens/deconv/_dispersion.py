"""Gene-wise negative binomial dispersion of spatial counts around a fit, shrunk across genes.

Spatial counts scatter more than Poisson around what a reference explains: cells of one type
differ from the reference's average, and the single-cell and spatial assays capture some genes
differently (the platform effect; Cable et al. 2022, doi:10.1038/s41587-021-00830-w). Under a
negative binomial model ``Var(y) = μ + φ_g μ²`` a gene with large ``φ_g`` weighs less in the fit.

``φ_g`` is estimated by moments around the expected counts ``μ`` of a first fit,
``φ̂_g = Σ_i [(y_ig − μ_ig)² − μ_ig] / Σ_i μ_ig²``, and shrunk towards the common value by an
empirical Bayes normal–normal step: a gene with few counts (a large sampling error of ``φ̂_g``,
which low depth brings) keeps little of its own estimate, a gene with many counts keeps it (the
approach of edgeR/DESeq2 of borrowing dispersion across genes: Robinson & Smyth, Biostatistics
9, 321–332 (2008), doi:10.1093/biostatistics/kxm030; Love et al. 2014,
doi:10.1186/s13059-014-0550-8).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import sparse

from ._ops import jit, map_threads, row_ranges

#: Smallest dispersion kept (a size of 10⁴: indistinguishable from Poisson at spot depths).
MIN_DISPERSION = 1e-4
#: Spots per dense block of expected counts when summing over all entries.
_BLOCK = 512


def _mean_powers(mu, out, lo, hi):
    """Add column sums of ``μ``, ``μ²``, ``μ³``, ``μ⁴`` over rows ``lo:hi`` to ``out`` (4 × genes)."""
    for i in range(lo, hi):
        for g in range(mu.shape[1]):
            m = mu[i, g]
            m2 = m * m
            out[0, g] += m
            out[1, g] += m2
            out[2, g] += m2 * m
            out[3, g] += m2 * m2


_mean_powers = jit(_mean_powers)


def _moments(counts, expected, n_spots_block: int) -> dict[str, np.ndarray]:
    """Per-gene sums over spots: ``(y − μ)² − μ``, ``μ``, ``μ²``, ``μ³``, ``μ⁴`` (one pass).

    ``Σ (y − μ)² = Σ y² − 2 Σ y μ + Σ μ²``: the terms with ``y`` need only its non-zeros; the
    powers of ``μ`` are summed by a compiled pass, rows split over threads.
    """
    counts = sparse.csr_matrix(counts)
    n, n_genes = counts.shape
    y2 = np.bincount(counts.indices, weights=np.asarray(counts.data, np.float64) ** 2,
                     minlength=n_genes)
    cross = np.zeros(n_genes)
    ranges = row_ranges(min(n, n_spots_block))
    powers = np.zeros((len(ranges), 4, n_genes))
    for lo in range(0, n, n_spots_block):
        hi = min(lo + n_spots_block, n)
        mu = np.ascontiguousarray(expected(lo, hi), dtype=np.float64)
        block = counts[lo:hi]
        rows = np.repeat(np.arange(hi - lo), np.diff(block.indptr))
        cross += np.bincount(block.indices, weights=block.data * mu[rows, block.indices],
                             minlength=n_genes)
        parts = row_ranges(hi - lo)
        map_threads(lambda a, b, t, mu=mu: _mean_powers(mu, powers[t], a, b),
                    [(a, b, t) for t, (a, b) in enumerate(parts)])
    mu_sum, mu2, mu3, mu4 = powers.sum(axis=0)
    return {"resid": y2 - 2.0 * cross + mu2 - mu_sum, "mu": mu_sum, "mu2": mu2, "mu3": mu3,
            "mu4": mu4}


def _shrunk(m: dict[str, np.ndarray]) -> np.ndarray:
    """Moment estimate of ``φ_g`` shrunk towards the common value (module docstring)."""
    mu_sum, mu2, mu3, mu4 = m["mu"], m["mu2"], m["mu3"], m["mu4"]
    usable = mu2 > 0
    raw = np.where(usable, m["resid"] / np.where(usable, mu2, 1.0), 0.0)
    if usable.sum() < 3:
        return np.maximum(raw, MIN_DISPERSION)
    common = float(np.median(np.maximum(raw[usable], 0.0)))
    # sampling variance of the moment estimate at the common dispersion: for v = μ + φμ²,
    # Var[(y − μ)²] ≈ 2v² + v (Poisson fourth cumulant), summed over spots
    var_num = 2.0 * (mu2 + 2 * common * mu3 + common**2 * mu4) + mu_sum + common * mu2
    se2 = np.where(usable, var_num / np.where(usable, mu2, 1.0) ** 2, np.inf)
    spread = raw[usable] - common
    mad = 1.4826 * float(np.median(np.abs(spread)))
    prior_var = max(mad**2 - float(np.median(se2[usable])), (0.1 * max(common, MIN_DISPERSION))**2)
    weight = prior_var / (prior_var + se2)  # 0 where the gene has no expected counts
    shrunk = common + weight * (raw - common)
    return np.maximum(shrunk, MIN_DISPERSION)


def gene_dispersion(
    counts: sparse.csr_matrix,
    expected: Callable[[int, int], np.ndarray],
    n_spots_block: int = _BLOCK,
) -> np.ndarray:
    """Shrunken negative binomial dispersion ``φ_g`` of each gene (``n_genes``).

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` observed counts (CSR).
    expected
        ``expected(lo, hi)`` returns the ``(hi − lo) × n_genes`` expected counts ``μ`` of spots
        ``lo:hi`` under the first fit (so the full dense matrix is never held).
    n_spots_block
        Spots per block.

    Returns
    -------
    ``φ_g ≥`` :data:`MIN_DISPERSION`, shrunk towards the genes' common value.
    """
    return _shrunk(_moments(counts, expected, n_spots_block))


def quasi_poisson_weights(
    counts: sparse.csr_matrix,
    expected: Callable[[int, int], np.ndarray],
    n_spots_block: int = _BLOCK,
) -> np.ndarray:
    """Gene weights ``w_g = Σ_i μ_ig / Σ_i μ_ig (1 + φ_g μ_ig)``, the largest scaled to 1.

    The information-weighted mean over spots of the negative binomial's ``1 / (1 + φ_g μ)``,
    with ``φ_g`` from :func:`gene_dispersion`; computed from the same single pass over the
    spots (``Σ μ (1 + φ μ) = Σ μ + φ Σ μ²``). Genes without expected counts get weight 1 before
    scaling. Arguments as :func:`gene_dispersion`; returns ``n_genes`` weights in ``(0, 1]``.
    """
    m = _moments(counts, expected, n_spots_block)
    phi = _shrunk(m)
    info = m["mu"] + phi * m["mu2"]
    weight = np.divide(m["mu"], info, out=np.ones_like(info), where=info > 0)
    return weight / weight.max()
