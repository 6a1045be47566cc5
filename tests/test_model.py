"""Penalty selection (count splitting), the CV patch, and attention re-estimation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import sparse

import spotlens
from spotlens._validation import InputError, check_counts
from spotlens.deconv._counts import read_counts
from spotlens.deconv._model import Problem, spatial_window, thin_counts
from spotlens.deconv._count_fit import SPATIAL_GRID as COUNT_SPATIAL_GRID


def _counts(seed=0, n=60, g=30):
    rng = np.random.default_rng(seed)
    return sparse.csr_matrix(rng.poisson(3.0, (n, g)).astype(np.float32))


def test_thinning_parts_add_up_and_leave_the_input_alone():
    counts = _counts()
    before = (counts.data.copy(), counts.indices.copy(), counts.indptr.copy())
    parts = thin_counts(counts, 3, np.random.default_rng(1))
    assert len(parts) == 3
    np.testing.assert_array_equal(sum(parts[1:], parts[0]).toarray(), counts.toarray())
    for part in parts:
        assert (part.data >= 0).all() and np.all(part.data == np.round(part.data))
    # the caller's matrix is untouched (eliminate_zeros once corrupted shared index arrays)
    np.testing.assert_array_equal(counts.data, before[0])
    np.testing.assert_array_equal(counts.indices, before[1])
    np.testing.assert_array_equal(counts.indptr, before[2])


def test_thinning_splits_counts_evenly_in_expectation():
    counts = sparse.csr_matrix(np.full((200, 50), 40.0))
    first, second = thin_counts(counts, 2, np.random.default_rng(0))
    assert abs(first.sum() / counts.sum() - 0.5) < 0.005
    assert abs(second.sum() / counts.sum() - 0.5) < 0.005


def test_statistics_from_counts_match_the_normalised_matrix():
    rng = np.random.default_rng(2)
    counts = _counts(2)
    weights = rng.uniform(0.5, 2.0, counts.shape[1])
    s = rng.gamma(1.0, 1.0, (4, counts.shape[1]))
    dense = counts.toarray().astype(np.float64)
    y = dense / dense.sum(axis=1, keepdims=True) * weights
    direct = Problem.from_matrices(y, s)
    fast = Problem.from_counts(counts, weights, s)
    np.testing.assert_allclose(fast.b, direct.b, rtol=1e-10)
    np.testing.assert_allclose(fast.yy, direct.yy, rtol=1e-10)


def test_held_out_error_ignores_each_spots_scale():
    rng = np.random.default_rng(3)
    s = rng.gamma(1.0, 1.0, (3, 20))
    x = rng.dirichlet(np.ones(3), 10)
    problem = Problem.from_matrices(x @ s, s)
    assert problem.held_out_error(x) == pytest.approx(0.0, abs=1e-9)
    # shrinking every spot's abundance (what a ridge does) changes nothing
    assert problem.held_out_error(0.3 * x) == pytest.approx(0.0, abs=1e-9)
    assert problem.held_out_error(x[::-1]) > 1e-3


def test_spatial_window_is_a_contiguous_patch():
    xy = np.stack(np.meshgrid(np.arange(100.0), np.arange(100.0)), -1).reshape(-1, 2)
    idx = spatial_window(xy, 400, seed=0)
    assert len(idx) == 400 and len(np.unique(idx)) == 400
    centre = xy[idx].mean(axis=0)
    # a disc of 400 grid points has radius ~11.3; a random subset would span the whole grid
    assert np.max(np.linalg.norm(xy[idx] - centre, axis=1)) < 16
    np.testing.assert_array_equal(spatial_window(xy[:50], 400), np.arange(50))


def test_penalties_chosen_on_a_patch_of_a_large_slide():
    spatial, reference = spotlens.datasets.synthetic(900, 120, 5, n_cells_per_type=30, seed=4)
    res = spotlens.deconv.deconvolve(
        spatial, reference, cv_max_spots=300, progress=False, inplace=False
    )
    params = res.uns["params"]
    assert params["cv_max_spots"] == 300
    assert params["lambda_spatial"] in COUNT_SPATIAL_GRID  # the count likelihood's grid
    truth = spatial.obsm["true_proportions"][res.proportions.columns].to_numpy()
    r = np.corrcoef(truth.ravel(), res.proportions.to_numpy().ravel())[0, 1]
    assert r > 0.9
    with pytest.raises(spotlens._validation.InputError, match="cv_max_spots"):
        spotlens.deconv.deconvolve(spatial, reference, cv_max_spots=5, progress=False)


def test_attention_re_estimation_updates_the_graph_and_keeps_descending():
    spatial, reference = spotlens.datasets.synthetic(400, 120, 5, n_cells_per_type=30, seed=5)
    common = dict(lambda_ridge=0.0, lambda_spatial=0.3, n_iter=40, tol=1e-9, progress=False,
                  inplace=False)
    fixed = spotlens.deconv.deconvolve(spatial, reference, **common)
    updated = spotlens.deconv.deconvolve(spatial, reference, attention_update_every=10, **common)
    # same sparsity pattern, re-estimated weights
    assert (fixed.connectivities != 0).nnz == (updated.connectivities != 0).nnz
    assert abs(fixed.connectivities - updated.connectivities).max() > 1e-6
    # the objective never increases within a stretch of fixed attention
    obj = updated.uns["objective"]
    for start in range(0, len(obj) - 1, 10):
        stretch = obj[start : start + 11] if start == 0 else obj[start + 1 : start + 11]
        assert np.all(np.diff(stretch) <= 1e-9 * abs(stretch[0]))
    np.testing.assert_allclose(updated.proportions.sum(axis=1), 1.0)


@pytest.fixture
def small_chunks(monkeypatch):
    """Read counts a few values at a time, so that every matrix spans many chunks."""
    from spotlens.deconv import _counts

    monkeypatch.setattr(_counts, "CHUNK_VALUES", 37)


@pytest.mark.parametrize("form", ["csr", "csc", "dense", "int"])
def test_read_counts_selects_columns_in_order_whatever_the_storage(small_chunks, form):
    counts = _counts(5, n=50, g=20)
    columns = np.array([7, 3, 19, 0, 3])
    matrix = {"csr": counts, "csc": counts.tocsc(), "dense": counts.toarray(),
              "int": counts.astype(np.int64)}[form]
    out = read_counts(matrix, columns)
    assert sparse.isspmatrix_csr(out) and np.issubdtype(out.dtype, np.floating)
    np.testing.assert_array_equal(out.toarray(), counts.toarray()[:, columns])


def test_read_counts_from_a_backed_h5ad_in_chunks(small_chunks, tmp_path):
    import anndata as ad

    counts = _counts(6, n=80, g=25)
    ad.AnnData(counts).write_h5ad(tmp_path / "x.h5ad")
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")
    try:
        out = read_counts(backed.X, np.arange(24, -1, -2))
    finally:
        backed.file.close()
    np.testing.assert_array_equal(out.toarray(), counts.toarray()[:, 24::-2])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({3: np.nan, 900: np.inf, 1100: np.nan}, "contains 3 NaN or infinite values"),
        ({3: -1.0, 900: -7.0}, r"contains negative values \(min -7\)"),
        ({3: 2.2, 900: 5.5}, r"holds non-integer values \(e.g. 5.5\)"),
    ],
    ids=["non-finite", "negative", "fractional"],
)
def test_read_counts_reports_the_whole_matrix_not_one_chunk(small_chunks, bad, message):
    counts = _counts(7, n=60, g=40)
    for at, value in bad.items():
        counts.data[at] = value
    with pytest.raises(InputError, match=f"spatial counts {message}"):
        read_counts(counts, np.arange(5))
    # the same message as one check of the whole matrix
    with pytest.raises(InputError, match=message):
        check_counts(counts, what="spatial counts")


def _cv_inputs(layout, seed):
    from spotlens.deconv._graph import color_graph, default_alpha, edge_weights, knn

    # few counts and three large domains: smoothing pays on "domains", never on "random"
    spatial, reference = spotlens.datasets.synthetic(
        600, 120, 5, n_cells_per_type=30, layout=layout, seed=seed, counts_per_cell=30.0,
        n_domains=3,
    )
    sig = spotlens.pp.reference_signatures(reference, labels_key="cell_type", cells_per_state=None)
    counts = sparse.csr_matrix(spatial[:, sig.genes].X)
    s = sig.signature.to_numpy() / float(sig.library_size.mean())
    dist, idx = knn(spatial.obsm["spatial"], 6)
    w = edge_weights(dist, idx, default_alpha(dist), None)
    return counts, np.ones(s.shape[1]), s, w, color_graph(w)


@pytest.mark.parametrize(("layout", "seed"), [("random", 1), ("domains", 2)])
def test_spatial_path_stops_early_without_changing_the_choice(layout, seed):
    from spotlens.deconv._model import cross_validate
    from spotlens.deconv._ops import NumpyOps

    counts, weights, s, w, colors = _cv_inputs(layout, seed)
    common = dict(ridge_grid=(0.0, 0.01), spatial_grid=(0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
                  n_folds=2, seed=0, n_iter=60, tol=1e-3, ops=NumpyOps())
    full = cross_validate(counts, weights, s, w, colors, patience=None, **common)
    early = cross_validate(counts, weights, s, w, colors, **common)
    assert early[:2] == full[:2]  # the same penalties
    err, ref = early[2].error.to_numpy(), full[2].error.to_numpy()
    ran = ~np.isnan(err)
    np.testing.assert_allclose(err[ran], ref[ran], rtol=1e-2)
    assert not np.isnan(ref).any()
    # what was skipped comes after two rises past the best, and is worse than the choice
    smooth = full[2][full[2].lambda_spatial > 0].error.to_numpy()
    if (~ran).any():
        assert np.nanmin(err) <= smooth[~ran[-len(smooth):]].min()
    if layout == "random":  # smoothing only hurts: most of the grid is skipped
        assert early[1] == 0.0 and (~ran).sum() >= 3
    else:  # an intermediate weight wins, and the two largest are skipped
        assert 0.0 < early[1] < 1.0 and (~ran).sum() >= 2
