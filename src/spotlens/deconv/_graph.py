"""The sparse spot graph with attention-weighted edges, and its colouring.

Pure kernels: arrays in, arrays out. Nothing here builds a dense ``n_spots × n_spots`` matrix.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from ..pp import fit_log_pca, knn, log_pca  # noqa: F401 - knn: part of the graph kernels' API
from ._ops import jit, map_threads, row_ranges

_CHUNK = 65536


def _log_project(indptr, indices, data, factor, comps, offset, lo, hi, z):
    """Rows ``lo:hi``: ``z_i = log1p(counts_i · factor_i) @ comps − offset`` (compiled)."""
    n_comps = comps.shape[1]
    for i in range(lo, hi):
        for c in range(n_comps):
            z[i, c] = -offset[c]
        f = factor[i]
        for p in range(indptr[i], indptr[i + 1]):
            v = np.log1p(float(data[p]) * f)
            g = indices[p]
            for c in range(n_comps):
                z[i, c] += v * comps[g, c]


def _greedy_colors(indptr, indices, order):
    """Colour the vertices in ``order``, each with the smallest colour no earlier neighbour has."""
    n = indptr.shape[0] - 1
    color = np.full(n, -1, dtype=np.int64)
    seen = np.full(n + 1, -1, dtype=np.int64)  # seen[c] == v: colour c is taken next to v
    for t in range(order.shape[0]):
        v = order[t]
        for p in range(indptr[v], indptr[v + 1]):
            u = indices[p]
            if u != v and color[u] >= 0:
                seen[color[u]] = v
        c = 0
        while seen[c] == v:
            c += 1
        color[v] = c
    return color


_log_project = jit(_log_project)
_greedy_colors = jit(_greedy_colors)


def expression_embedding(
    counts: sparse.spmatrix | np.ndarray,
    n_comps: int = 20,
    *,
    seed: int = 0,
    max_fit: int = 5_000,
    iterated_power: int = 3,
) -> np.ndarray:
    """PCA embedding of ``log1p`` library-size-normalised expression, for the attention.

    The same embedding as :func:`spotlens.pp.log_pca` (rows divided by their sum,
    scaled to the median library size, ``log1p``; randomized PCA fitted on at most ``max_fit``
    seeded random rows; scaled to mean squared entry 1), but sparse counts are transformed
    without densifying them: ``log1p`` keeps zeros at zero, so each row is normalised and
    projected from its non-zeros alone, in one compiled pass (float64, rows split over the
    usable cores), O(nnz · n_comps). Dense input goes to ``log_pca``.

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` non-negative counts, dense or sparse.
    n_comps
        Components, capped at ``min(n_spots, n_genes) − 1``.
    seed
        Seed for the subsample and the randomized SVD.
    max_fit
        Rows used to fit the PCA. 5,000 random spots estimate the leading components of a
        slide well; more rows cost time, not attention quality. Sparse counts stay sparse: the
        components are computed exactly by ARPACK on the implicitly centred rows (sklearn's
        ``PCA(svd_solver="arpack")``), faster than densifying them for a randomized SVD
        (``benchmarks/results/docstring_figures.md``).
    iterated_power
        Power iterations of the randomized SVD used for dense counts. 3 (sklearn's ``"auto"``
        takes 7 here): the leading components the attention compares spots on converge in a
        few (Halko, Martinsson & Tropp, SIAM Review 53, 2011).

    Returns
    -------
    ``n_spots × n_comps`` float64 embedding.
    """
    if not sparse.issparse(counts):
        return log_pca(counts, n_comps, seed=seed, max_fit=max_fit,
                       iterated_power=iterated_power)
    counts = sparse.csr_matrix(counts)
    n = counts.shape[0]
    # one BLAS thread: on these thin matrices (``n_comps`` + 10 columns) more threads gain
    # little, and on a busy machine OpenBLAS's waiting threads made the fit 4× slower
    pca, scale, lib = fit_log_pca(counts, n_comps, seed=seed, max_fit=max_fit,
                                  iterated_power=iterated_power, blas_threads=1,
                                  solver="arpack")
    n_comps = pca.n_components_
    factor = np.divide(scale, lib, out=np.zeros_like(lib), where=lib > 0)
    # PCA.transform is (X − mean) @ componentsᵀ; X is sparse, so subtract mean @ componentsᵀ
    comps = np.ascontiguousarray(pca.components_.T, dtype=np.float64)
    offset = np.asarray(pca.mean_, dtype=np.float64) @ comps
    z = np.empty((n, n_comps))
    map_threads(
        lambda lo, hi: _log_project(
            counts.indptr, counts.indices, counts.data, factor, comps, offset, lo, hi, z
        ),
        row_ranges(n),
    )
    rms = float(np.sqrt(np.mean(z**2)))
    return z / rms if rms > 0 else z


def default_alpha(distances: np.ndarray) -> float:
    """``alpha`` that gives weight 1/2 at the median neighbour distance: ``ln 2 / median(d)²``.

    This makes the distance kernel unit-free (µm, pixels or array units all give the same graph).
    """
    finite = distances[np.isfinite(distances) & (distances > 0)]
    if finite.size == 0:
        return 1.0
    return float(np.log(2.0) / np.median(finite) ** 2)


def attention(
    embedding: np.ndarray, indices: np.ndarray, temperature: float = 1.0
) -> np.ndarray:
    """Scaled dot-product softmax attention of each spot over its neighbours.

    ``Attn(i, j) = softmax_j(z_i · z_j / (√d · temperature))`` over the neighbours ``j`` of
    ``i``.

    Parameters
    ----------
    embedding
        ``n_spots × d`` embedding.
    indices
        ``n_spots × k`` neighbour indices (``-1`` for none).
    temperature
        Softmax temperature; larger is closer to uniform.

    Returns
    -------
    ``n_spots × k`` weights; each row sums to 1 over its valid neighbours.
    """
    n, k = indices.shape
    d = embedding.shape[1]
    out = np.zeros((n, k))
    valid = indices >= 0
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(n, start + _CHUNK))
        j = np.where(valid[sl], indices[sl], 0)
        s = np.einsum("id,ikd->ik", embedding[sl], embedding[j]) / (np.sqrt(d) * temperature)
        # a spot with no neighbour (a one-spot section) keeps an all-zero row
        s = np.where(valid[sl], s, -np.inf)
        top = s.max(axis=1, keepdims=True)
        e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
        total = e.sum(axis=1, keepdims=True)
        out[sl] = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return out


def edge_weights(
    distances: np.ndarray, indices: np.ndarray, alpha: float, attn: np.ndarray | None
) -> sparse.csr_matrix:
    """Symmetric sparse spot graph ``W``.

    ``W_ij = exp(-alpha d_ij²) · k · Attn(i, j)``, symmetrised as ``(W + Wᵀ) / 2``. The factor
    ``k`` makes uniform attention (``Attn = 1/k``) equal to the pure distance kernel, so
    ``attn=None`` gives the distance-only graph on the same scale.

    Parameters
    ----------
    distances, indices
        ``n_spots × k`` from :func:`knn`.
    alpha
        Distance decay (1 / coordinate unit²).
    attn
        ``n_spots × k`` attention weights, or ``None`` for distance only.

    Returns
    -------
    ``n_spots × n_spots`` CSR matrix with zero diagonal.
    """
    n, k = indices.shape
    valid = indices >= 0
    w = np.exp(-alpha * np.where(valid, distances, 0.0) ** 2)
    if attn is not None:
        w = w * attn * valid.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(n), k)[valid.ravel()]
    cols = indices.ravel()[valid.ravel()]
    vals = w.ravel()[valid.ravel()]
    a = sparse.csr_matrix((vals, (rows, cols)), shape=(n, n))
    return ((a + a.T) * 0.5).tocsr()


def color_graph(adjacency: sparse.csr_matrix, seed: int = 0) -> list[np.ndarray]:
    """Partition the spots into independent sets (no edge inside a set).

    Jones–Plassmann colouring: spots get random priorities, and a spot is coloured once every
    neighbour of higher priority is, with the smallest colour that none of them has. That is
    greedy colouring in order of decreasing priority, which this computes in one compiled
    pass over the edges (O(nnz)). It needs at most ``max degree + 1`` colours — about 5–8 on
    a kNN graph — so a Gauss–Seidel sweep has few blocks. Spots of one colour can be updated
    together with exact Gauss–Seidel semantics.

    Parameters
    ----------
    adjacency
        ``n_spots × n_spots`` symmetric sparse graph (its diagonal is ignored).
    seed
        Seed for the priorities.

    Returns
    -------
    List of index arrays, one per colour, covering every spot once.
    """
    n = adjacency.shape[0]
    a = sparse.csr_matrix(adjacency)
    priority = np.random.default_rng(seed).permutation(n).astype(np.int64)
    order = np.argsort(-priority, kind="stable")
    color = _greedy_colors(a.indptr.astype(np.int64), a.indices.astype(np.int64), order)
    order = np.argsort(color, kind="stable")
    bounds = np.flatnonzero(np.diff(color[order])) + 1
    return np.split(order, bounds)


def section_attention(
    values, idx: np.ndarray, sections: np.ndarray | None, *, n_comps: int, seed: int,
    temperature: float,
) -> np.ndarray:
    """Attention over each spot's neighbours, on a PCA embedding fitted to each section alone.

    ``values`` is ``n_spots × n_features`` (counts, or proportions when attention is
    re-estimated). The graph never links two sections, and each section's embedding (centring,
    components, scale) comes from its own spots only, so a section's attention does not depend
    on which other sections share the AnnData: fitting sections together equals fitting them
    apart. Returns ``n_spots × k`` weights (see :func:`attention`).
    """
    if sections is None:
        return attention(expression_embedding(values, n_comps, seed=seed), idx, temperature)
    out = np.zeros(idx.shape)
    local = np.zeros(len(sections), dtype=np.int64)
    for code in np.unique(sections):
        members = np.flatnonzero(sections == code)
        if len(members) < 2:  # no neighbour, no attention
            continue
        local[members] = np.arange(len(members))
        neighbours = idx[members]
        neighbours = np.where(neighbours >= 0, local[np.maximum(neighbours, 0)], -1)
        embedding = expression_embedding(values[members], n_comps, seed=seed)
        out[members] = attention(embedding, neighbours, temperature)
    return out
