"""Pure kernels of :func:`spotlens.datasets.pseudo_spots`: which cells a spot holds, and its counts.

Cells per type per spot, the draw of distinct reference cells, the gene-wise platform effect and
the binomial thinning to a target depth; each takes and returns arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

#: Dirichlet precision of a spot's proportions around its region prior: ``Dirichlet(20 · π)``.
SPOT_CONCENTRATION = 20.0


def spot_cells(
    prior: np.ndarray, n_cells: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Cells of each type per spot: ``Multinomial(n_s, p_s)``, ``p_s ~ Dirichlet(20 · π_s)``.

    Types with prior 0 get no cells. The Dirichlet is drawn as normalised gamma variates
    (``Gamma(0)`` is 0), falling back to ``π_s`` if all of a spot's draws underflow.

    Parameters
    ----------
    prior
        ``n_spots × n_types`` prior of each spot's region (rows sum to 1).
    n_cells
        ``n_spots`` cells per spot (≥ 1).
    rng
        Random generator.

    Returns
    -------
    ``n_spots × n_types`` int64 cell counts; row ``s`` sums to ``n_cells[s]``.
    """
    g = rng.standard_gamma(SPOT_CONCENTRATION * prior)
    total = g.sum(axis=1, keepdims=True)
    p = np.where(total > 0, g / np.where(total > 0, total, 1.0), prior)
    return rng.multinomial(n_cells, p / p.sum(axis=1, keepdims=True)).astype(np.int64)


def pick_cells(counts: np.ndarray, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``counts[i]`` distinct indices from ``[0, pool_size)`` for every row ``i``.

    Exact sampling without replacement, vectorised over rows: the ``j``-th pick is a uniform
    rank ``t`` among the ``pool_size − j`` indices not yet taken, turned into an index by
    stepping over the taken ones in increasing order. Rows are independent (a cell can be in
    many rows). Where ``counts[i] > pool_size`` the pool is used up and the picks beyond it
    repeat the first ones (the caller reports this).

    Parameters
    ----------
    counts
        ``n_rows`` non-negative numbers of picks.
    pool_size
        Size of the pool (≥ 1).
    rng
        Random generator.

    Returns
    -------
    ``n_rows × max(counts)`` int64 indices; entries ``j ≥ counts[i]`` of row ``i`` are −1.
    """
    m = int(counts.max(initial=0))
    picks = np.full((counts.size, m), -1, dtype=np.int64)
    for j in range(min(m, pool_size)):
        rows = np.flatnonzero(counts > j)
        t = rng.integers(0, pool_size - j, size=rows.size)
        for taken in np.sort(picks[rows, :j], axis=1).T:
            t += t >= taken
        picks[rows, j] = t
    for j in range(pool_size, m):
        rows = np.flatnonzero(counts > j)
        picks[rows, j] = picks[rows, j - pool_size]
    return picks


def _platform(
    x: sparse.csr_matrix, gene_totals: np.ndarray, sigma: float, rng: np.random.Generator
) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Gene-wise capture factors ``f`` (mean total kept) and ``Poisson(f_g · x_sg)`` counts."""
    factor = np.exp(rng.normal(0.0, sigma, size=x.shape[1]))
    total = float(gene_totals.sum())
    if total > 0:
        factor *= total / float(gene_totals @ factor)
    data = rng.poisson(x.data * factor[x.indices]).astype(x.dtype)
    out = sparse.csr_matrix((data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    out.eliminate_zeros()
    return out, factor


def thin_counts(
    x: sparse.csr_matrix, target: np.ndarray, rng: np.random.Generator
) -> sparse.csr_matrix:
    """Binomial thinning of each row towards a target library size; never adds counts.

    Row ``s`` with total ``N_s > T_s`` has every entry replaced by ``Binomial(x_sg, T_s / N_s)``
    (expected total ``T_s``); rows with ``N_s ≤ T_s`` are kept as they are.

    Parameters
    ----------
    x
        ``n_spots × n_genes`` CSR matrix of integer counts (float).
    target
        ``n_spots`` target library sizes (counts).
    rng
        Random generator.

    Returns
    -------
    A new ``n_spots × n_genes`` CSR matrix of the same dtype, explicit zeros removed.
    """
    total = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    keep = np.ones_like(total)
    np.divide(target, total, out=keep, where=total > target)
    row_p = np.repeat(keep, np.diff(x.indptr))
    data = rng.binomial(np.round(x.data).astype(np.int64), row_p).astype(x.dtype)
    out = sparse.csr_matrix((data, x.indices.copy(), x.indptr.copy()), shape=x.shape)
    out.eliminate_zeros()
    return out
