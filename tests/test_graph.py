"""The spot graph: kNN, distance kernel, attention, colouring."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import sparse
from scipy.spatial.distance import cdist

from spotlens.deconv._graph import attention, color_graph, default_alpha, edge_weights, knn


def _coords(n=120, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1000, size=(n, 2))
    xy[5] = xy[4]  # duplicated positions are routine (e.g. merged beads)
    xy[6] = xy[4]
    return xy


def test_knn_is_the_true_k_nearest_excluding_self_within_sections():
    xy = _coords()
    sections = np.repeat([0, 1, 2], 40)
    k = 6
    dist, idx = knn(xy, k, sections)
    assert dist.shape == idx.shape == (120, k)
    full = cdist(xy, xy)
    for i in range(120):
        assert i not in idx[i]
        assert np.all(sections[idx[i]] == sections[i])
        assert len(set(idx[i])) == k
        np.testing.assert_allclose(dist[i], full[i, idx[i]], atol=1e-9)
        same = np.flatnonzero((sections == sections[i]) & (np.arange(120) != i))
        np.testing.assert_allclose(np.sort(dist[i]), np.sort(full[i, same])[:k], atol=1e-9)


def test_knn_pads_small_sections():
    xy = _coords(12)
    sections = np.array([0] * 9 + [1] * 2 + [2])  # a 2-spot and a 1-spot section
    dist, idx = knn(xy, 4, sections)
    assert np.all(idx[9:11, 1:] == -1) and np.all(np.isinf(dist[9:11, 1:]))
    assert idx[9, 0] == 10 and idx[10, 0] == 9
    assert np.all(idx[11] == -1) and np.all(np.isinf(dist[11]))


def _graph(xy, k=6, sections=None, attn=None, alpha=None):
    dist, idx = knn(xy, k, sections)
    a = default_alpha(dist) if alpha is None else alpha
    return dist, idx, a, edge_weights(dist, idx, a, attn)


def test_edge_weights_distance_only_is_the_symmetrised_gaussian_kernel():
    xy = _coords()
    dist, idx, alpha, w = _graph(xy)
    n = len(xy)
    knn_ind = np.zeros((n, n))
    knn_ind[np.repeat(np.arange(n), idx.shape[1]), idx.ravel()] = 1.0
    kernel = np.exp(-alpha * cdist(xy, xy) ** 2)
    expected = kernel * (knn_ind + knn_ind.T) / 2  # documented (W + Wᵀ)/2
    wd = w.toarray()
    np.testing.assert_allclose(wd, expected, rtol=1e-12, atol=1e-15)
    mutual = (knn_ind > 0) & (knn_ind.T > 0)
    assert mutual.sum() > n  # many mutual pairs, where W is exactly exp(-alpha d²)
    np.testing.assert_allclose(wd[mutual], kernel[mutual], rtol=1e-12)


def test_edge_weights_symmetric_non_negative_zero_diagonal_with_attention():
    xy = _coords()
    dist, idx = knn(xy, 6)
    z = np.random.default_rng(1).normal(size=(len(xy), 5))
    w = edge_weights(dist, idx, default_alpha(dist), attention(z, idx))
    assert sparse.issparse(w)
    assert abs(w - w.T).max() < 1e-15
    assert w.min() >= 0
    assert np.all(w.diagonal() == 0)
    # edges only between kNN pairs
    allowed = np.zeros(w.shape, dtype=bool)
    allowed[np.repeat(np.arange(len(xy)), 6), idx.ravel()] = True
    allowed |= allowed.T
    assert np.all(w.toarray()[~allowed] == 0)
    assert np.all(w.toarray()[allowed] > 0)


def test_default_alpha_is_unit_free():
    xy = _coords()
    *_, w_um = _graph(xy)
    *_, w_mm = _graph(xy / 1000.0)
    *_, w_px = _graph(xy * 1000.0)
    np.testing.assert_allclose(w_mm.toarray(), w_um.toarray(), rtol=1e-9)
    np.testing.assert_allclose(w_px.toarray(), w_um.toarray(), rtol=1e-9)
    dist, _ = knn(xy, 6)
    d_med = np.median(dist[dist > 0])
    assert np.exp(-default_alpha(dist) * d_med**2) == pytest.approx(0.5)


def test_knn_and_graph_never_link_sections():
    xy = _coords()
    xy[60:] = xy[:60] + 1e-3  # second section overlaps the first almost exactly
    sections = np.repeat([0, 1], 60)
    *_, w = _graph(xy, sections=sections)
    assert w[:60, 60:].nnz == 0 and w[60:, :60].nnz == 0


def test_attention_rows_sum_to_one_over_valid_neighbours():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(50, 8))
    idx = np.stack([rng.choice(np.delete(np.arange(50), i), 5, replace=False) for i in range(50)])
    idx[3, 2:] = -1
    att = attention(z, idx, temperature=0.7)
    np.testing.assert_allclose(att.sum(axis=1), 1.0, rtol=1e-12)
    assert np.all(att >= 0)
    assert np.all(att[3, 2:] == 0)


def test_attention_favours_transcriptionally_similar_neighbours():
    # spot 0 sits at the centre of four equidistant neighbours; only spot 1 expresses like it
    xy = np.array([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=float)
    z = np.array([[3, 0, 0], [3, 0.2, 0], [-3, 0, 0], [0, 3, 0], [0, 0, -3]], dtype=float)
    dist, idx = knn(xy, 4)
    att = attention(z, idx)
    row0 = dict(zip(idx[0], att[0], strict=True))
    assert row0[1] == max(row0.values())
    assert row0[1] > 0.5 and row0[2] < 0.05
    # and the similar neighbour gets the strongest edge even though distances are equal
    w = edge_weights(dist, idx, default_alpha(dist), att).toarray()
    assert w[0, 1] > 2 * max(w[0, 2], w[0, 3], w[0, 4])
    # large temperature → close to uniform, i.e. the distance-only graph
    uniform = attention(z, idx, temperature=1e6)
    np.testing.assert_allclose(uniform[0], 0.25, atol=1e-5)


def test_attention_spot_without_neighbours_is_silent_and_zero():
    z = np.random.default_rng(0).normal(size=(3, 4))
    idx = np.array([[1], [0], [-1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        att = attention(z, idx)
    np.testing.assert_array_equal(att, [[1.0], [1.0], [0.0]])


def test_color_classes_are_independent_and_cover_every_spot_once():
    xy = _coords(300, seed=4)
    dist, idx = knn(xy, 8)
    w = edge_weights(dist, idx, default_alpha(dist), None)
    colors = color_graph(w, seed=0)
    allspots = np.concatenate(colors)
    assert np.array_equal(np.sort(allspots), np.arange(300))  # each exactly once
    wb = (w != 0).astype(int)
    for c in colors:
        assert len(c) > 0
        assert wb[c][:, c].nnz == 0
    assert len(colors) < 30  # few classes, so each sweep stays vectorised


def test_color_graph_is_seeded():
    xy = _coords(100, seed=5)
    *_, w = _graph(xy)
    a = color_graph(w, seed=3)
    b = color_graph(w, seed=3)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_sparse_expression_embedding_is_the_exact_pca_of_log_normalised_counts():
    """Oracle: the PCA (dense SVD) of library-size-normalised log1p counts, up to signs."""
    from spotlens.deconv._graph import expression_embedding

    rng = np.random.default_rng(6)
    counts = rng.poisson(rng.gamma(0.5, 2.0, size=(300, 60))).astype(np.float64)
    counts[4] = 0  # an empty spot stays at the embedding of zero expression
    lib = counts.sum(axis=1, keepdims=True)
    logged = np.log1p(np.divide(counts, lib, out=np.zeros_like(counts), where=lib > 0)
                      * np.median(lib[lib > 0]))
    # all spots, then a subsample of 200 (the seeded rows the PCA is fitted on)
    for max_fit, rows in [(300, np.arange(300)),
                          (200, np.sort(np.random.default_rng(1).choice(300, 200, replace=False)))]:
        fast = expression_embedding(sparse.csr_matrix(counts), 8, seed=1, max_fit=max_fit)
        assert fast.shape == (300, 8)
        mean = logged[rows].mean(axis=0)
        components = np.linalg.svd(logged[rows] - mean, full_matrices=False)[2][:8]
        exact = (logged - mean) @ components.T
        exact /= np.sqrt(np.mean(exact**2))
        signs = np.sign((fast * exact).sum(axis=0))
        np.testing.assert_allclose(fast * signs, exact, rtol=0,
                                   atol=1e-8 * np.abs(exact).max())


def test_color_graph_is_greedy_in_decreasing_random_priority():
    """Oracle: the vectorised Jones–Plassmann rounds this replaced give this same colouring."""
    xy = _coords(200, seed=7)
    *_, w = _graph(xy, k=7)
    colors = color_graph(w, seed=11)
    got = np.empty(200, dtype=int)
    for c, members in enumerate(colors):
        got[members] = c
    priority = np.random.default_rng(11).permutation(200)
    a = w.tocsr()
    expected = np.full(200, -1)
    for v in np.argsort(-priority):
        taken = {expected[u] for u in a.indices[a.indptr[v] : a.indptr[v + 1]] if u != v}
        expected[v] = min(set(range(len(taken) + 1)) - taken)
    np.testing.assert_array_equal(got, expected)


def test_knn_on_a_grid_does_not_depend_on_units_or_rounding():
    """Equally distant neighbours (a square grid cut at k = 6) are chosen the same way
    whatever the unit, offset or last bits of the coordinates."""
    grid = np.stack(np.meshgrid(np.arange(30), np.arange(30)), -1).reshape(-1, 2).astype(float)
    _, base = knn(grid * 32.0, 6)
    noise = 1e-12 * np.random.default_rng(0).standard_normal(grid.shape)
    for coords in (grid * 29.21 + 3.3, grid * 0.2738, grid * 32.0 * (1 + noise)):
        _, idx = knn(coords, 6)
        np.testing.assert_array_equal(idx, base)
    # an interior spot gets its 4 orthogonal neighbours and then the lowest-index diagonals
    centre = 15 * 30 + 15
    d, idx = knn(grid, 6)
    np.testing.assert_allclose(d[centre], [1, 1, 1, 1, np.sqrt(2), np.sqrt(2)])
    assert set(idx[centre, :4]) == {centre - 30, centre - 1, centre + 1, centre + 30}
    assert list(idx[centre, 4:]) == [centre - 31, centre - 29]
