"""The public ``deconvolve``: documented outputs, mutation rules, accuracy, backends, bad input."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.optimize import nnls

from spotlens._backend import BackendError
from spotlens._validation import InputError
from spotlens.deconv import DeconvolutionResult, deconvolve

KEY = "proportions_spotlens"
ABUNDANCE = "abundance_spotlens"
ZERO = "proportions_spotlens_zero_counts"
CONN = "proportions_spotlens_connectivities"
# fixed penalties where cross-validation is not the point; on the `bundled` part of the osmFISH
# example (conftest.py) the fit converges in ~40 sweeps, under a second
FIXED = dict(lambda_ridge=0.1, lambda_spatial=0.1, progress=False)
# calibrated on the synthetic pair: r ≈ 0.967 here against ≈ 0.92 for per-spot NNLS
FIXED_SYN = dict(lambda_ridge=0.01, lambda_spatial=0.3, progress=False)


# ---------------------------------------------------------------- helpers


def _assert_same_matrix(a, b, what):
    assert type(a) is type(b), what
    assert a.shape == b.shape and a.dtype == b.dtype, what
    if sparse.issparse(a):
        for attr in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr), err_msg=what)
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)


def _assert_same_value(a, b, what):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for k in a:
            _assert_same_value(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=what)
    elif isinstance(a, np.ndarray) or sparse.issparse(a):
        _assert_same_matrix(a, b, what)
    else:
        assert type(a) is type(b) and a == b, what


def assert_adata_identical(before: ad.AnnData, after: ad.AnnData) -> None:
    """Every slot of ``after`` equals ``before``: values, dtypes, keys, order."""
    assert after.shape == before.shape
    pd.testing.assert_index_equal(after.obs_names, before.obs_names, exact=True)
    pd.testing.assert_index_equal(after.var_names, before.var_names, exact=True)
    _assert_same_matrix(before.X, after.X, "X")
    pd.testing.assert_frame_equal(after.obs, before.obs, check_exact=True)
    pd.testing.assert_frame_equal(after.var, before.var, check_exact=True)
    for slot in ("layers", "obsm", "varm", "obsp", "varp"):
        b, a = getattr(before, slot), getattr(after, slot)
        assert list(a.keys()) == list(b.keys()), slot
        for k in b.keys():
            _assert_same_value(b[k], a[k], f"{slot}[{k!r}]")
    _assert_same_value(dict(before.uns), dict(after.uns), "uns")
    assert (before.raw is None) == (after.raw is None)


def _drop_documented_outputs(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    del out.obsm[KEY], out.obsm[ABUNDANCE], out.obsp[CONN], out.uns[KEY]
    out.obs = out.obs.drop(columns=[ZERO, f"{KEY}_fit_score", f"{KEY}_poorly_fit"])
    return out


def _set_rows_to_zero(adata: ad.AnnData, rows) -> None:
    keep = np.ones(adata.n_obs)
    keep[rows] = 0
    x = sparse.csr_matrix(sparse.diags(keep) @ adata.X, dtype=adata.X.dtype)
    x.eliminate_zeros()
    adata.X = x


def _pearson(est: pd.DataFrame, truth: pd.DataFrame) -> float:
    return float(np.corrcoef(est[truth.columns].to_numpy().ravel(), truth.to_numpy().ravel())[0, 1])


def _rmse(est: pd.DataFrame, truth: pd.DataFrame) -> float:
    return float(np.sqrt(np.mean((est[truth.columns].to_numpy() - truth.to_numpy()) ** 2)))


# ---------------------------------------------------------------- outputs and mutation


def test_writes_every_documented_key(bundled):
    st, ref = bundled
    assert deconvolve(st, ref, **FIXED) is None
    types = sorted(ref.obs["cell_type"].astype(str).unique())

    props = st.obsm[KEY]
    assert isinstance(props, pd.DataFrame)
    pd.testing.assert_index_equal(props.index, st.obs_names)
    assert props.columns.tolist() == types
    assert (props.to_numpy() >= 0).all()
    np.testing.assert_allclose(props.sum(axis=1), 1.0, rtol=1e-10)

    abundance = st.obsm[ABUNDANCE]
    assert isinstance(abundance, pd.DataFrame)
    pd.testing.assert_index_equal(abundance.index, st.obs_names)
    assert abundance.columns.tolist() == types
    assert (abundance.to_numpy() >= 0).all()
    # abundance is the unnormalised scale of the same solution
    np.testing.assert_allclose(abundance.div(abundance.sum(axis=1), axis=0), props, atol=1e-12)

    zero = st.obs[ZERO]
    assert zero.dtype == bool and not zero.any()  # every spot has counts

    w = st.obsp[CONN]
    assert sparse.issparse(w) and w.shape == (st.n_obs, st.n_obs)
    assert abs(w - w.T).max() < 1e-12 and w.min() >= 0 and np.all(w.diagonal() == 0)
    assert w.nnz >= st.n_obs * 6  # k_neighbors=6, symmetrised

    uns = st.uns[KEY]
    params = uns["params"]
    assert params["lambda_ridge"] == 0.1 and params["lambda_spatial"] == 0.1
    assert params["alpha"] > 0 and params["k_neighbors"] == 6
    assert params["labels_key"] == "cell_type" and params["version"]
    genes = list(uns["genes"])
    assert len(genes) >= len(types) and set(genes) <= set(st.var_names) & set(ref.var_names)
    assert list(uns["cell_types"]) == types
    objective = np.asarray(uns["objective"])
    assert len(objective) == params["n_sweeps"] + 1
    assert np.all(np.diff(objective) <= 1e-9 * abs(objective[0]))
    assert objective[-1] < objective[0]


def test_inplace_changes_only_documented_keys(bundled):
    st, ref = bundled
    st.uns["keep_me"] = {"a": 1}
    st.obsm["X_umap"] = np.zeros((st.n_obs, 2))
    st_before, ref_before = st.copy(), ref.copy()
    deconvolve(st, ref, **FIXED)
    assert_adata_identical(st_before, _drop_documented_outputs(st))
    assert_adata_identical(ref_before, ref)


def test_inplace_false_returns_result_and_leaves_inputs_identical(bundled):
    st, ref = bundled
    st_before, ref_before = st.copy(), ref.copy()
    result = deconvolve(st, ref, inplace=False, **FIXED)
    assert isinstance(result, DeconvolutionResult)
    assert_adata_identical(st_before, st)
    assert_adata_identical(ref_before, ref)
    # the returned result is what inplace=True writes
    deconvolve(st, ref, **FIXED)
    pd.testing.assert_frame_equal(result.proportions, st.obsm[KEY])
    pd.testing.assert_frame_equal(result.abundance, st.obsm[ABUNDANCE])
    np.testing.assert_array_equal(result.zero_counts.to_numpy(), st.obs[ZERO].to_numpy())
    assert (result.connectivities != st.obsp[CONN]).nnz == 0


def test_results_round_trip_through_h5ad(bundled, tmp_path):
    st, ref = bundled
    deconvolve(st, ref, **FIXED)
    st.write_h5ad(tmp_path / "out.h5ad")
    back = ad.read_h5ad(tmp_path / "out.h5ad")
    pd.testing.assert_frame_equal(back.obsm[KEY], st.obsm[KEY])
    assert back.uns[KEY]["params"]["lambda_spatial"] == 0.1


def test_torch_matches_cpu_within_documented_tolerance(bundled):
    pytest.importorskip("torch")
    st, ref = bundled
    cpu = deconvolve(st, ref, inplace=False, likelihood="gaussian", **FIXED)
    tch = deconvolve(st, ref, inplace=False, device="torch", **FIXED)
    assert tch.uns["params"]["likelihood"] == "gaussian"  # "auto" on torch
    diff = np.abs(tch.proportions.to_numpy() - cpu.proportions.to_numpy()).max()
    assert diff < 1e-3  # the docstring's promise for float32 torch
    pd.testing.assert_index_equal(tch.proportions.columns, cpu.proportions.columns)


def test_zero_count_spot_is_kept_and_flagged(bundled):
    st, ref = bundled
    empty = [3, 42]
    _set_rows_to_zero(st, empty)
    res = deconvolve(st, ref, inplace=False, **FIXED)
    pd.testing.assert_index_equal(res.proportions.index, st.obs_names)
    flagged = res.zero_counts.to_numpy()
    assert flagged.dtype == bool and np.flatnonzero(flagged).tolist() == empty
    # smoothing fills it from its neighbours; it holds no cells of its own (library 0)
    np.testing.assert_allclose(res.proportions.iloc[empty].sum(axis=1), 1.0, rtol=1e-10)
    assert np.all(res.abundance.iloc[empty].to_numpy() == 0)
    # without smoothing nothing can be said about it: NaN, still present and flagged
    res0 = deconvolve(st, ref, inplace=False, lambda_ridge=0.1, lambda_spatial=0.0, progress=False)
    assert res0.proportions.shape[0] == st.n_obs
    assert res0.proportions.iloc[empty].isna().all(axis=None)
    assert not res0.proportions.drop(index=st.obs_names[empty]).isna().any(axis=None)
    assert res0.zero_counts.iloc[empty].all()


# ---------------------------------------------------------------- accuracy on synthetic truth


def test_recovers_known_proportions(synthetic):
    res = deconvolve(synthetic.spatial, synthetic.reference, inplace=False, **FIXED_SYN)
    truth = synthetic.true_proportions
    assert res.proportions.columns.tolist() == truth.columns.tolist()
    r = _pearson(res.proportions, truth)
    assert r > 0.95, r  # achieved ≈ 0.967; per-spot NNLS alone reaches ≈ 0.92 here


def test_abundance_counts_cells_when_capture_matches_the_reference(synthetic):
    res = deconvolve(synthetic.spatial, synthetic.reference, inplace=False, **FIXED_SYN)
    total = res.abundance.sum(axis=1)
    assert np.corrcoef(total, synthetic.true_cells)[0, 1] > 0.95
    # reference cells carry a log-normal size factor (mean ≈ 1.05), so a slight undercount
    assert 0.8 < float(np.median(total / synthetic.true_cells)) < 1.2


def test_spatial_term_improves_recovery_of_smooth_truth(synthetic):
    truth = synthetic.true_proportions
    kw = dict(inplace=False, progress=False, lambda_ridge=0.01)
    plain = deconvolve(synthetic.spatial, synthetic.reference, lambda_spatial=0.0, **kw)
    smooth = deconvolve(synthetic.spatial, synthetic.reference, lambda_spatial=0.3, **kw)
    assert _rmse(smooth.proportions, truth) < 0.8 * _rmse(plain.proportions, truth)


def test_auto_penalties_by_cross_validation(synthetic):
    from spotlens.deconv._run import RIDGE_GRID, SPATIAL_GRID

    res = deconvolve(synthetic.spatial, synthetic.reference, inplace=False, progress=False)
    params, cv = res.uns["params"], res.uns["cv"]
    assert params["lambda_ridge"] in RIDGE_GRID and params["lambda_spatial"] in SPATIAL_GRID
    assert np.isfinite(cv["error"]).all()
    chosen = cv[cv.lambda_ridge == params["lambda_ridge"]]
    best = chosen.loc[chosen.error.idxmin()]
    assert best.lambda_spatial == params["lambda_spatial"]  # the held-out error's argmin
    assert params["lambda_spatial"] > 0  # the truth is smooth, so smoothing predicts better
    assert _pearson(res.proportions, synthetic.true_proportions) > 0.95


def test_cell_states_are_summed_back_to_types(make_pair):
    # 100 cells per type: each type is split into 2 states of ~50 cells (the default)
    pair = make_pair(cells_per_type=100)
    res = deconvolve(pair.spatial, pair.reference, inplace=False, **FIXED_SYN)
    assert res.uns["params"]["n_states"] == 16
    assert res.proportions.columns.tolist() == pair.true_proportions.columns.tolist()
    np.testing.assert_allclose(res.proportions.sum(axis=1), 1.0, rtol=1e-10)
    assert _pearson(res.proportions, pair.true_proportions) > 0.95


@pytest.mark.parametrize("gene_weights", ["none", "poisson"])
def test_no_penalties_equals_per_spot_nnls_of_the_weighted_problem(synthetic, gene_weights):
    st, ref = synthetic.spatial, synthetic.reference
    res = deconvolve(st, ref, inplace=False, progress=False, lambda_ridge=0.0, lambda_spatial=0.0,
                     gene_weights=gene_weights, likelihood="gaussian", n_iter=5000, tol=1e-12)
    genes = list(res.uns["genes"])
    types = res.proportions.columns.tolist()
    # signature: mean of library-normalised cells (library over all reference genes) ...
    rc = ref.X.toarray().astype(float)
    lib_cell = rc.sum(axis=1, keepdims=True)
    labels = ref.obs["cell_type"].astype(str).to_numpy()
    shared = ref.var_names.get_indexer(ref.var_names.intersection(st.var_names))
    prof = np.stack([(rc[labels == t] / lib_cell[labels == t]).mean(0) for t in types])[:, shared]
    lib_type = np.array([lib_cell[labels == t].mean() for t in types])
    # ... shrunk by the gamma-Poisson posterior mean towards the count-weighted pooled profile,
    # alpha by the method of moments over the shared genes ...
    total = np.array([(labels == t).sum() for t in types]) * lib_type
    m = total @ prof / total.sum()
    alpha = (len(types) * m**2).sum() / ((prof - m) ** 2 - m / total[:, None]).sum()
    shrunk = np.stack([(total[k] * prof[k] + alpha) / (total[k] + alpha / m)
                       for k in range(len(types))])
    shrunk[:, m == 0] = 0.0
    # ... times the type's mean library, over the genes used
    names = ref.var_names[shared]
    sig = (shrunk * lib_type[:, None])[:, names.get_indexer(genes)]
    # spots: library-normalised over the genes used
    y = st[:, genes].X.toarray().astype(float)
    lib = y.sum(axis=1)
    yn = y / lib[:, None]
    if gene_weights == "poisson":
        # 1/sqrt(m_g), m = mean of the unit-sum type profiles, floored at its 5 % quantile
        m = (sig / sig.sum(axis=1, keepdims=True)).mean(axis=0)
        weights = 1 / np.sqrt(np.maximum(m, np.quantile(m[m > 0], 0.05)))
    else:
        weights = np.ones(len(genes))
    x = np.stack([nnls((sig * weights).T, yn[i] * weights)[0] for i in range(st.n_obs)])
    np.testing.assert_allclose(res.proportions.to_numpy(), x / x.sum(1, keepdims=True), atol=1e-6)
    # abundance = cells per spot: the NNLS coefficients scaled by the spot's library
    np.testing.assert_allclose(res.abundance.to_numpy(), x * lib[:, None], rtol=1e-5, atol=1e-6)


def test_sections_are_never_linked(synthetic):
    st = synthetic.spatial
    x = st.obsm["spatial"][:, 0]
    st.obs["section"] = pd.Categorical(np.where(x < np.median(x), "left", "right"))
    res = deconvolve(st, synthetic.reference, inplace=False, library_key="section", **FIXED_SYN)
    left = (st.obs["section"] == "left").to_numpy()
    w = res.connectivities
    assert w[left][:, ~left].nnz == 0
    assert w[left][:, left].nnz > 0 and w[~left][:, ~left].nnz > 0


def test_storage_format_does_not_change_the_answer(bundled):
    st, ref = bundled
    sparse_res = deconvolve(st, ref, inplace=False, **FIXED)
    st.X = st.X.toarray().astype(np.int64)
    ref.X = ref.X.toarray().astype(np.int32)
    dense_res = deconvolve(st, ref, inplace=False, **FIXED)
    pd.testing.assert_frame_equal(dense_res.proportions, sparse_res.proportions, atol=1e-10)


def test_counts_layer_is_used_instead_of_normalised_x(bundled):
    st, ref = bundled
    expected = deconvolve(st, ref, inplace=False, **FIXED)
    for a in (st, ref):
        a.layers["counts"] = a.X.copy()
        _log_normalise(a)
    res = deconvolve(st, ref, layer="counts", reference_layer="counts", inplace=False, **FIXED)
    pd.testing.assert_frame_equal(res.proportions, expected.proportions, atol=1e-10)


def test_single_spot_section_is_fitted_without_warnings(synthetic):
    st = synthetic.spatial
    section = np.array(["main"] * st.n_obs, dtype=object)
    section[0] = "lonely"
    st.obs["section"] = pd.Categorical(section)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = deconvolve(st, synthetic.reference, inplace=False, library_key="section",
                         **FIXED_SYN)
    assert res.connectivities[0].nnz == 0
    assert res.proportions.iloc[0].sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- bad input


def _quiet(fn):
    """Run a setup step that anndata warns about (e.g. duplicate names)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn()


def test_no_shared_genes(bundled):
    st, ref = bundled
    st.var_names = ["ENSMUSG" + g for g in st.var_names]
    with pytest.raises(InputError, match="share 0 genes.*same gene identifiers"):
        deconvolve(st, ref, **FIXED)


def test_too_few_shared_genes(bundled):
    st, ref = bundled
    st = st[:, :5].copy()  # 11 cell types need at least 11 genes (and min_shared_genes=10)
    with pytest.raises(InputError, match="share 5 genes; at least 11 are needed"):
        deconvolve(st, ref, **FIXED)


def test_labels_key_missing(bundled):
    st, ref = bundled
    with pytest.raises(InputError, match=r"no obs column 'celltype'.*labels_key="):
        deconvolve(st, ref, labels_key="celltype", **FIXED)


def test_nan_labels(bundled):
    st, ref = bundled
    labels = ref.obs["cell_type"].astype(object)
    labels.iloc[[0, 10, 20]] = np.nan
    ref.obs["cell_type"] = labels
    with pytest.raises(InputError, match=r"3 reference cells have no label \(NaN\)"):
        deconvolve(st, ref, **FIXED)


def test_cell_type_with_too_few_cells(bundled):
    st, ref = bundled
    ependymal = np.flatnonzero(ref.obs["cell_type"] == "Ependymal")
    ref = ref[np.setdiff1d(np.arange(ref.n_obs), ependymal[3:])].copy()
    with pytest.raises(InputError, match=r"fewer than 5 reference cells: 'Ependymal' \(3 cells\)"):
        deconvolve(st, ref, **FIXED)


def _log_normalise(adata):
    x = adata.X.astype(np.float32).tocsr()
    x.data = np.log1p(x.data * 1.7)
    adata.X = x


def test_normalised_spatial_counts(bundled):
    st, ref = bundled
    _log_normalise(st)
    with pytest.raises(InputError, match="spatial counts holds non-integer values"):
        deconvolve(st, ref, **FIXED)


def test_normalised_spatial_counts_are_refused_before_the_reference_is_processed(
    bundled, monkeypatch
):
    """A wrong spatial file must fail in seconds, not after a large reference is processed."""
    import spotlens.deconv._run as api

    def heavy(*args, **kwargs):
        raise AssertionError("the reference was processed before the spatial counts were checked")

    monkeypatch.setattr(api, "reference_signatures", heavy)
    st, ref = bundled
    _log_normalise(st)
    with pytest.raises(InputError, match="spatial counts holds non-integer values"):
        deconvolve(st, ref, **FIXED)
    ref.obs = ref.obs.drop(columns="cell_type")
    st.X = st.layers["counts"] if "counts" in st.layers else sparse.csr_matrix(
        np.round(np.expm1(st.X.toarray()) / 1.7))
    with pytest.raises(InputError, match="cell_type"):
        deconvolve(st, ref, **FIXED)


def test_normalised_reference_counts(bundled):
    st, ref = bundled
    _log_normalise(ref)
    with pytest.raises(InputError, match="reference counts holds non-integer values"):
        deconvolve(st, ref, **FIXED)


def test_dense_normalised_spatial_counts(bundled):
    st, ref = bundled
    _log_normalise(st)
    st.X = st.X.toarray()
    with pytest.raises(InputError, match="spatial counts holds non-integer values"):
        deconvolve(st, ref, **FIXED)


@pytest.mark.parametrize("which", ["spatial", "reference"])
def test_negative_counts(bundled, which):
    st, ref = bundled
    target = st if which == "spatial" else ref
    target.X.data[5] = -3
    with pytest.raises(InputError, match=f"{which} counts contains negative values"):
        deconvolve(st, ref, **FIXED)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("which", ["spatial", "reference"])
def test_non_finite_counts(bundled, which, bad):
    st, ref = bundled
    target = st if which == "spatial" else ref
    target.X.data[[1, 7]] = bad
    with pytest.raises(InputError, match=f"{which} counts contains 2 NaN or infinite values"):
        deconvolve(st, ref, **FIXED)


def test_coordinates_missing(bundled):
    st, ref = bundled
    del st.obsm["spatial"]
    with pytest.raises(InputError, match=r"no obsm\['spatial'\].*spatial_key="):
        deconvolve(st, ref, **FIXED)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda xy: xy[:, 0], r"must be n_spots × 2 \(x, y\)"),
        (lambda xy: np.column_stack([xy, np.zeros(len(xy))]), "has 3 columns"),
    ],
    ids=["1-D", "3 columns"],
)
def test_coordinates_wrong_shape(bundled, make, message):
    st, ref = bundled
    st.obsm["spatial"] = make(np.asarray(st.obsm["spatial"]))
    with pytest.raises(InputError, match=message):
        deconvolve(st, ref, **FIXED)


def test_duplicate_spot_names(bundled):
    st, ref = bundled
    names = st.obs_names.tolist()
    names[1] = names[0]
    _quiet(lambda: setattr(st, "obs_names", names))
    with pytest.raises(InputError, match=rf"duplicate spot names, e.g. \['{names[0]}'\]"):
        deconvolve(st, ref, **FIXED)


def test_duplicate_cell_names(bundled):
    st, ref = bundled
    names = ref.obs_names.tolist()
    names[3] = names[2]
    _quiet(lambda: setattr(ref, "obs_names", names))
    with pytest.raises(InputError, match="reference has duplicate cell names"):
        deconvolve(st, ref, **FIXED)


@pytest.mark.parametrize("which", ["spatial data", "reference"])
def test_duplicate_gene_names(bundled, which):
    st, ref = bundled
    target = st if which == "spatial data" else ref
    genes = target.var_names.tolist()
    genes[1] = genes[0]
    _quiet(lambda: setattr(target, "var_names", genes))
    message = rf"{which} has duplicate gene names, e.g. \['{genes[0]}'\]"
    with pytest.raises(InputError, match=message):
        deconvolve(st, ref, **FIXED)


def test_empty_spatial(bundled):
    st, ref = bundled
    with pytest.raises(InputError, match="spatial data is empty: it has 0 spots"):
        deconvolve(st[:0].copy(), ref, **FIXED)


def test_empty_reference(bundled):
    st, ref = bundled
    with pytest.raises(InputError, match="reference is empty: it has 0 cells"):
        deconvolve(st, ref[:0].copy(), **FIXED)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k_neighbors=0), "k_neighbors must be a positive integer, got 0"),
        (dict(k_neighbors=2.5), "k_neighbors must be a positive integer, got 2.5"),
        (dict(lambda_spatial=-1), "lambda_spatial must be a number ≥ 0 or 'auto', got -1"),
        (dict(lambda_spatial="high"), "lambda_spatial must be a number ≥ 0 or 'auto', got 'high'"),
        (dict(lambda_ridge=np.nan), "lambda_ridge must be a number ≥ 0 or 'auto', got nan"),
        (dict(n_iter=0), "n_iter must be a positive integer"),
        (dict(tol=0.0), "tol must be > 0"),
        (dict(cv_folds=1), "cv_folds must be an integer ≥ 2"),
        (dict(alpha=-1.0), "alpha must be > 0 or None"),
        (dict(gene_weights="tfidf"), "gene_weights must be 'poisson' or 'none'"),
        (dict(attention_temperature=0.0), "attention_temperature must be > 0"),
        (dict(attention_update_every=0), "attention_update_every must be a positive integer"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_parameter_values(bundled, kwargs, message):
    st, ref = bundled
    params = {**FIXED, **kwargs}
    with pytest.raises(InputError, match=message):
        deconvolve(st, ref, **params)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha="auto"), "alpha must be > 0 or None"),
        (dict(tol="tight"), "tol must be > 0"),
        (dict(attention_temperature="high"), "attention_temperature must be > 0"),
    ],
    ids=["alpha='auto'", "tol='tight'", "attention_temperature='high'"],
)
def test_non_numeric_parameters_are_input_errors(bundled, kwargs, message):
    st, ref = bundled
    with pytest.raises(InputError, match=message):
        deconvolve(st, ref, **{**FIXED, **kwargs})


def test_lambda_none_is_a_clear_input_error(bundled):
    st, ref = bundled
    with pytest.raises(InputError, match="lambda_spatial must be a number"):
        deconvolve(st, ref, lambda_ridge=0.01, lambda_spatial=None, progress=False)


def test_unknown_device(bundled):
    st, ref = bundled
    with pytest.raises(InputError, match="Unknown device 'tpu'.*'cpu', 'torch', 'cuda'"):
        deconvolve(st, ref, device="tpu", **FIXED)


def test_cuda_without_gpu_is_backend_error(bundled):
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    st, ref = bundled
    with pytest.raises(BackendError, match="(no CUDA GPU.*device='auto'|PyTorch, which is not)"):
        deconvolve(st, ref, device="cuda", **FIXED)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layer="counts"), r"spatial data has no layer 'counts' \(layers: none\)"),
        (dict(reference_layer="counts"), r"reference has no layer 'counts' \(layers: none\)"),
    ],
    ids=["spatial", "reference"],
)
def test_missing_layer(bundled, kwargs, message):
    st, ref = bundled
    with pytest.raises(InputError, match=message):
        deconvolve(st, ref, **kwargs, **FIXED)


def test_missing_library_key(bundled):
    st, ref = bundled
    with pytest.raises(InputError, match="no obs column 'section'.*library_key="):
        deconvolve(st, ref, library_key="section", **FIXED)


def test_backed_h5ad_gives_the_in_memory_answer(bundled, tmp_path):
    """A slide opened with ``backed="r"`` is read in chunks of rows, never loaded whole."""
    st, ref = bundled
    expected = deconvolve(st, ref, inplace=False, **FIXED)
    path = tmp_path / "st.h5ad"
    st.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert not sparse.issparse(backed.X)  # stays on disk
        res = deconvolve(backed, ref, inplace=False, **FIXED)
    finally:
        backed.file.close()
    pd.testing.assert_frame_equal(res.proportions, expected.proportions, atol=1e-12)


def test_bad_counts_in_a_backed_h5ad_are_reported_like_in_memory(bundled, tmp_path):
    st, ref = bundled
    st.X = st.X.astype(np.float32)
    st.X.data[[1, -1]] = np.nan  # far apart: different chunks when read in pieces
    path = tmp_path / "st.h5ad"
    st.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        with pytest.raises(InputError, match="spatial counts contains 2 NaN or infinite values"):
            deconvolve(backed, ref, **FIXED)
    finally:
        backed.file.close()


@pytest.mark.parametrize(("likelihood", "tol"), [("poisson", 3e-4), ("gaussian", 1e-5)])
def test_default_tolerance_follows_the_likelihood_and_is_recorded(bundled, likelihood, tol):
    st, ref = bundled
    res = deconvolve(st, ref, **{**FIXED, "likelihood": likelihood}, inplace=False)
    assert res.uns["params"]["tol"] == tol
    given = deconvolve(st, ref, **{**FIXED, "likelihood": likelihood, "tol": 1e-7},
                       inplace=False)
    assert given.uns["params"]["tol"] == 1e-7
    # the tighter tolerance takes more iterations to nearly the same fit
    assert given.uns["params"]["n_sweeps"] >= res.uns["params"]["n_sweeps"]
    loose, tight = res.uns["objective"][-1], given.uns["objective"][-1]
    assert tight <= loose <= tight + 1e-4 * abs(tight)
    assert np.abs(given.proportions - res.proportions).to_numpy().mean() < 0.005


@pytest.mark.parametrize(("likelihood", "spots"), [("poisson", 2_000), ("gaussian", 5_000)])
def test_default_cv_patch_follows_the_likelihood_and_is_recorded(bundled, likelihood, spots):
    st, ref = bundled
    res = deconvolve(st, ref, likelihood=likelihood, lambda_ridge=0.0, progress=False,
                     inplace=False)
    assert res.uns["params"]["cv_max_spots"] == spots
    assert res.uns["cv"]["error"].notna().any()  # the penalty was chosen
