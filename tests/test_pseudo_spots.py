"""spotlens.datasets.pseudo_spots: synthspot-style spots summed from held-out reference cells."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from spotlens._validation import InputError
from spotlens.datasets import pseudo_spots
from spotlens.datasets._pseudo_spots import pick_cells, thin_counts

LYMPH = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "spacexr_lymphnode_visium"
    / "sc_reference.h5ad"
)
TYPES = ["B/plasma", "Endo", "Fibro", "Mono", "NK", "T"]  # sorted; a "/" as in real labels
CELLS_PER_TYPE = 12


def make_reference(seed: int = 0, cells_per_type: int = CELLS_PER_TYPE) -> ad.AnnData:
    """6 types × ``cells_per_type`` cells × 80 genes of Poisson counts, ~500 counts per cell.

    Cells are listed type-interleaved (not grouped), labels are a categorical with an unused
    category, so neither order nor categories can be relied on by accident.
    """
    rng = np.random.default_rng(seed)
    n_genes = 80
    base = rng.gamma(0.8, 1.0, size=(len(TYPES), n_genes))
    for k in range(len(TYPES)):
        base[k, 5 * k : 5 * k + 5] *= 8.0
    base /= base.sum(axis=1, keepdims=True)
    codes = np.tile(np.arange(len(TYPES)), cells_per_type)
    mu = base[codes] * rng.uniform(300, 700, size=(codes.size, 1))
    x = rng.poisson(mu).astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(
                np.array(TYPES)[codes], categories=[*TYPES[::-1], "unused"]
            ),
            "batch": rng.integers(3, size=codes.size),
        },
        index=[f"c{i:03d}" for i in range(codes.size)],
    )
    return ad.AnnData(
        X=sparse.csr_matrix(x), obs=obs,
        var=pd.DataFrame(index=[f"g{g:02d}" for g in range(n_genes)]),
    )


@pytest.fixture(scope="module")
def _reference() -> ad.AnnData:
    return make_reference()


@pytest.fixture
def reference(_reference) -> ad.AnnData:
    return _reference.copy()


@pytest.fixture(scope="module")
def _lymph() -> ad.AnnData:
    if not LYMPH.is_file():
        pytest.skip(f"lymph-node reference not found at {LYMPH} (needs the shared/data checkout)")
    return ad.read_h5ad(LYMPH)


@pytest.fixture
def lymph(_lymph) -> ad.AnnData:
    return _lymph.copy()


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


def _region_view(spatial: ad.AnnData, name: str) -> pd.DataFrame:
    return spatial.obsm["proportions_true"][(spatial.obs["region"] == name).to_numpy()]


# --- truth and counts --------------------------------------------------------------------------


def test_truth_tables_are_consistent(reference):
    spatial, _ = pseudo_spots(reference, n_spots=300, cells_per_spot=(3, 7), seed=1)
    props, cells = spatial.obsm["proportions_true"], spatial.obsm["cell_counts_true"]
    assert list(props.columns) == sorted(TYPES) == list(cells.columns)  # all types, sorted
    assert (props.index == spatial.obs_names).all() and (cells.index == spatial.obs_names).all()
    np.testing.assert_allclose(props.sum(axis=1), 1.0)
    assert cells.dtypes.eq(np.int64).all()
    n = spatial.obs["n_cells"].to_numpy()
    assert np.array_equal(cells.sum(axis=1).to_numpy(), n)
    assert n.min() >= 3 and n.max() <= 7 and set(np.unique(n)) == set(range(3, 8))
    np.testing.assert_allclose(props.to_numpy(), cells.to_numpy() / n[:, None])


def test_counts_are_nonnegative_integer_csr_over_all_genes(reference):
    spatial, ref_half = pseudo_spots(reference, n_spots=200, seed=2)
    for x in (spatial.X, ref_half.X):
        assert sparse.isspmatrix_csr(x) and x.dtype == np.float32
        assert np.array_equal(x.data, np.round(x.data)) and (x.data >= 0).all()
    assert list(spatial.var_names) == list(reference.var_names) == list(ref_half.var_names)


def test_hex_grid_100_um_and_contiguous_equal_regions(reference):
    regions = ("dominant", "uniform", "missing", "rare", "diverse")
    spatial, _ = pseudo_spots(reference, n_spots=600, regions=regions, seed=3)
    xy = spatial.obsm["spatial"]
    d, _ = cKDTree(xy).query(xy, k=7)
    np.testing.assert_allclose(d[:, 1], 100.0)  # nearest neighbour 100 µm
    interior = np.isclose(d[:, 1:], 100.0).sum(axis=1) == 6
    assert interior.mean() > 0.8  # hexagonal: six neighbours at 100 µm

    region = spatial.obs["region"]
    assert isinstance(region.dtype, pd.CategoricalDtype)
    assert list(region.cat.categories) == list(regions)
    sizes = region.value_counts()
    assert sizes.min() >= 0.5 * 600 / len(regions)  # roughly equal
    graph = cKDTree(xy).sparse_distance_matrix(cKDTree(xy), 100.5, output_type="coo_matrix")
    for name in regions:  # each region is one connected patch of neighbouring spots
        idx = np.flatnonzero((region == name).to_numpy())
        n_parts, _ = connected_components(sparse.csr_matrix(graph)[idx][:, idx])
        assert n_parts == 1, name


def test_repeated_region_kinds_get_unique_names(reference):
    spatial, _ = pseudo_spots(reference, n_spots=90, regions=("dominant", "rare", "dominant"))
    assert list(spatial.obs["region"].cat.categories) == ["dominant", "rare", "dominant_2"]
    priors = pd.DataFrame(**spatial.uns["pseudo_spots"]["region_priors"])
    assert list(priors.index) == ["dominant", "rare", "dominant_2"]
    assert list(priors.columns) == sorted(TYPES)
    np.testing.assert_allclose(priors.sum(axis=1), 1.0)


def test_one_cell_spots_equal_one_simulation_cell_of_their_type(reference):
    spatial, ref_half = pseudo_spots(reference, n_spots=150, cells_per_spot=(1, 1), seed=4)
    info = spatial.uns["pseudo_spots"]
    sim = reference[info["simulation_cells"]]
    sim_x = _dense(sim.X)
    spot_x = _dense(spatial.X)
    spot_type = spatial.obsm["cell_counts_true"].idxmax(axis=1).to_numpy()
    sim_type = sim.obs["cell_type"].astype(str).to_numpy()
    for s in range(spatial.n_obs):
        same = np.flatnonzero((sim_x == spot_x[s]).all(axis=1))
        assert same.size and (sim_type[same] == spot_type[s]).any()
    # and no spot equals a cell of the returned reference half
    ref_x = _dense(ref_half.X)
    assert not (spot_x[:, None, :] == ref_x[None, :, :]).all(axis=2).any()


def test_spot_is_sum_of_its_cells_when_pools_are_singletons(caplog):
    # two cells per type: one goes to the reference, one builds spots. A spot of n cells of a
    # single type then holds n copies of that cell (reported) — the sum is still exact.
    ref = make_reference(cells_per_type=2)
    with caplog.at_level(logging.WARNING, logger="spotlens"):
        spatial, ref_half = pseudo_spots(
            ref, n_spots=60, regions=("dominant",), cells_per_spot=(3, 3), seed=5
        )
    assert ref_half.n_obs == len(TYPES)
    sim = ref[spatial.uns["pseudo_spots"]["simulation_cells"]]
    one_hot = pd.get_dummies(sim.obs["cell_type"].astype(str)).reindex(columns=sorted(TYPES))
    expected = spatial.obsm["cell_counts_true"].to_numpy() @ one_hot.to_numpy(float).T
    np.testing.assert_array_equal(_dense(spatial.X), expected @ _dense(sim.X))
    assert spatial.uns["pseudo_spots"]["n_repeated_cells"] > 0
    assert "used twice" in caplog.text


# --- library size ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["synthetic", "lymph"])
def test_library_size_sets_median_and_only_removes_counts(which, request):
    ref = request.getfixturevalue("reference" if which == "synthetic" else "lymph")
    kw = {"n_spots": 800, "seed": 6}
    full, _ = pseudo_spots(ref, **kw)
    thin, _ = pseudo_spots(ref, library_size=400, **kw)
    lib = np.asarray(thin.X.sum(axis=1)).ravel()
    assert abs(np.median(lib) - 400) <= 0.15 * 400
    assert lib.std() > 0.1 * 400  # targets vary around the median (lognormal, sd 0.3)
    assert (_dense(thin.X) <= _dense(full.X)).all()  # thinning of the same spots, never more
    pd.testing.assert_frame_equal(thin.obsm["proportions_true"], full.obsm["proportions_true"])
    assert thin.uns["pseudo_spots"]["params"]["library_size"] == 400


def test_library_size_above_depth_keeps_spots(reference):
    full, _ = pseudo_spots(reference, n_spots=100, seed=7)
    same, _ = pseudo_spots(reference, n_spots=100, seed=7, library_size=1e9)
    assert (full.X != same.X).nnz == 0


def test_thin_counts_kernel_expectation():
    x = sparse.csr_matrix(np.array([[10.0, 30.0, 60.0], [1.0, 2.0, 0.0]], dtype=np.float32))
    rng = np.random.default_rng(0)
    draws = np.stack([_dense(thin_counts(x, np.array([50.0, 10.0]), rng)) for _ in range(2000)])
    np.testing.assert_allclose(draws[:, 0].mean(axis=0), [5, 15, 30], rtol=0.05)
    assert (draws[:, 1] == [1, 2, 0]).all()  # below target: untouched


def test_pick_cells_distinct_and_uniform():
    rng = np.random.default_rng(0)
    counts = np.full(20000, 3)
    picks = pick_cells(counts, 5, rng)
    srt = np.sort(picks, axis=1)
    assert (np.diff(srt, axis=1) > 0).all() and picks.min() >= 0 and picks.max() < 5
    freq = np.bincount(picks.ravel(), minlength=5) / picks.size
    np.testing.assert_allclose(freq, 0.2, atol=0.01)
    # every 3-subset of 5 equally likely (10 subsets)
    keys = srt @ np.array([25, 5, 1])
    np.testing.assert_allclose(np.unique(keys, return_counts=True)[1] / counts.size, 0.1,
                               atol=0.01)
    ragged = pick_cells(np.array([0, 2, 4]), 10, rng)
    assert (ragged[0] == -1).all() and (ragged[1, 2:] == -1).all() and (ragged[2] >= 0).all()


# --- region patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["synthetic", "lymph"])
def test_region_patterns(which, request):
    ref = request.getfixturevalue("reference" if which == "synthetic" else "lymph")
    spatial, _ = pseudo_spots(
        ref, n_spots=1200, regions=("dominant", "uniform", "missing", "rare"), seed=8
    )
    special = spatial.uns["pseudo_spots"]["region_types"]
    types = spatial.obsm["proportions_true"].columns
    n_types = len(types)

    missing = list(special["missing"])
    assert len(missing) == n_types // 2
    counts = spatial.obsm["cell_counts_true"][(spatial.obs["region"] == "missing").to_numpy()]
    assert (counts[missing] == 0).all().all()  # absent from every spot of the region
    assert (counts.drop(columns=missing).sum() > 0).sum() >= 2

    (dominant,) = special["dominant"]
    mean = _region_view(spatial, "dominant").mean()
    assert mean.idxmax() == dominant and mean[dominant] > 0.4

    (rare,) = special["rare"]
    assert _region_view(spatial, "rare").mean()[rare] < 0.08

    uniform = _region_view(spatial, "uniform").mean()
    np.testing.assert_allclose(uniform, 1 / n_types, atol=0.5 / n_types)
    assert len(special["uniform"]) == 0


def test_unknown_region_kind_lists_the_valid_ones(reference):
    with pytest.raises(InputError, match=r"valid kinds are \['uniform', 'dominant', 'missing'"):
        pseudo_spots(reference, regions=("dominant", "stripes"))


# --- reference split ---------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_reference_half_is_disjoint_from_simulation_cells(reference, fraction):
    spatial, ref_half = pseudo_spots(
        reference, n_spots=100, reference_fraction=fraction, seed=9
    )
    info = spatial.uns["pseudo_spots"]
    sim, held = set(info["simulation_cells"]), set(ref_half.obs_names)
    assert not sim & held
    assert set(info["reference_cells"]) == held
    assert sim | held == set(reference.obs_names)
    per_type = ref_half.obs["cell_type"].value_counts()
    assert (per_type == round(fraction * CELLS_PER_TYPE)).all() and len(per_type) == len(TYPES)
    # the reference half keeps the cells' raw counts and obs
    src = reference[ref_half.obs_names]
    np.testing.assert_array_equal(_dense(ref_half.X), _dense(src.X))
    assert (ref_half.obs["batch"] == src.obs["batch"]).all()


def test_reference_half_of_real_data(lymph):
    spatial, ref_half = pseudo_spots(lymph, n_spots=200, reference_fraction=0.5, seed=10)
    assert (ref_half.obs["cell_type"].value_counts() == 15).all()  # 11 types × 30 cells
    assert not set(spatial.uns["pseudo_spots"]["simulation_cells"]) & set(ref_half.obs_names)
    assert spatial.shape == (200, lymph.n_vars)


def test_exclude_from_reference_keeps_type_in_spots_only(reference):
    kw = {"n_spots": 150, "regions": ("uniform",), "seed": 11}
    spatial, ref_half = pseudo_spots(reference, exclude_from_reference=["NK"], **kw)
    assert "NK" not in set(ref_half.obs["cell_type"])
    assert "NK" not in ref_half.obs["cell_type"].cat.categories
    assert ref_half.n_obs == (len(TYPES) - 1) * CELLS_PER_TYPE // 2
    assert spatial.obsm["cell_counts_true"]["NK"].sum() > 0
    assert "NK" in spatial.obsm["proportions_true"].columns
    plain, _ = pseudo_spots(reference, **kw)  # the spots do not depend on the exclusion
    assert (plain.X != spatial.X).nnz == 0
    assert list(spatial.uns["pseudo_spots"]["params"]["exclude_from_reference"]) == ["NK"]


# --- reproducibility, inputs, outputs ----------------------------------------------------------


def test_deterministic_by_seed(reference):
    kw = {"n_spots": 120, "library_size": 300}
    a, ra = pseudo_spots(reference, seed=12, **kw)
    b, rb = pseudo_spots(reference, seed=12, **kw)
    c, rc = pseudo_spots(reference, seed=13, **kw)
    assert (a.X != b.X).nnz == 0 and list(ra.obs_names) == list(rb.obs_names)
    pd.testing.assert_frame_equal(a.obsm["cell_counts_true"], b.obsm["cell_counts_true"])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert (a.X != c.X).nnz > 0
    assert list(ra.obs_names) != list(rc.obs_names)
    assert not a.obsm["cell_counts_true"].equals(c.obsm["cell_counts_true"])


def test_platform_effect_scales_genes_and_keeps_truth(reference):
    kw = {"n_spots": 400, "regions": ("uniform", "dominant"), "seed": 21}
    plain, ref_plain = pseudo_spots(reference, **kw)
    shifted, ref_shifted = pseudo_spots(reference, platform_effect=0.8, **kw)
    # same cells, same truth, same reference half: only the counts differ
    pd.testing.assert_frame_equal(plain.obsm["cell_counts_true"], shifted.obsm["cell_counts_true"])
    assert list(ref_plain.obs_names) == list(ref_shifted.obs_names)
    assert (plain.var["platform_effect_true"] == 1.0).all()
    factor = shifted.var["platform_effect_true"].to_numpy()
    assert factor.min() > 0 and np.log(factor).std() > 0.4  # σ = 0.8, 80 genes
    # each gene's total moves by its factor (Poisson noise over 400 spots is small)
    before = np.asarray(plain.X.sum(axis=0)).ravel()
    after = np.asarray(shifted.X.sum(axis=0)).ravel()
    big = before > 200
    ratio = after[big] / before[big]
    np.testing.assert_allclose(np.log(ratio), np.log(factor[big]), atol=0.25)
    # the total depth is kept on average, and the counts are still integers
    assert 0.8 < after.sum() / before.sum() < 1.25
    np.testing.assert_array_equal(shifted.X.data, np.round(shifted.X.data))
    assert shifted.uns["pseudo_spots"]["params"]["platform_effect"] == 0.8


def test_input_is_not_modified(reference):
    reference.layers["counts"] = reference.X.copy()
    reference.X = reference.X.multiply(0.5).tocsr()  # X not counts: must read the layer
    before = reference.copy()
    spatial, ref_half = pseudo_spots(reference, layer="counts", n_spots=80, library_size=200)
    assert (reference.X != before.X).nnz == 0
    assert (reference.layers["counts"] != before.layers["counts"]).nnz == 0
    pd.testing.assert_frame_equal(reference.obs, before.obs)
    pd.testing.assert_frame_equal(reference.var, before.var)
    assert set(reference.uns) == set(before.uns) and set(reference.obsm) == set(before.obsm)
    # outputs hold the layer's counts, and do not share memory with the input
    np.testing.assert_array_equal(
        _dense(ref_half.X), _dense(before.layers["counts"][before.obs_names.get_indexer(
            ref_half.obs_names)])
    )
    ref_half.X.data[:] = 0
    spatial.X.data[:] = 0
    assert (reference.layers["counts"] != before.layers["counts"]).nnz == 0


def test_uns_records_parameters_and_writes_to_h5ad(reference, tmp_path):
    spatial, ref_half = pseudo_spots(reference, n_spots=50, regions=("rare", "diverse"), seed=14)
    info = spatial.uns["pseudo_spots"]
    params = info["params"]
    assert params["seed"] == 14 and params["n_spots"] == 50 and params["library_size"] is None
    assert list(params["cells_per_spot"]) == [2, 10] and list(params["regions"]) == [
        "rare", "diverse"]
    assert params["reference_fraction"] == 0.5 and params["labels_key"] == "cell_type"
    assert "10.7554/eLife.88431" in info["source"]
    spatial.write_h5ad(tmp_path / "spots.h5ad")
    ref_half.write_h5ad(tmp_path / "ref.h5ad")
    back = ad.read_h5ad(tmp_path / "spots.h5ad")
    pd.testing.assert_frame_equal(
        pd.DataFrame(**back.uns["pseudo_spots"]["region_priors"]),
        pd.DataFrame(**info["region_priors"]), check_dtype=False,
    )
    assert (back.X != spatial.X).nnz == 0


def test_fresh_seed_is_recorded(reference):
    spatial, _ = pseudo_spots(reference, n_spots=20, regions=("uniform",), seed=None)
    seed = spatial.uns["pseudo_spots"]["params"]["seed"]
    again, _ = pseudo_spots(reference, n_spots=20, regions=("uniform",), seed=int(seed))
    assert (again.X != spatial.X).nnz == 0


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regions": ("dominant", "checkerboard")}, r"Unknown region kinds \['checkerboard'\]"),
        ({"regions": ()}, "regions is empty"),
        ({"cells_per_spot": (5, 2)}, r"cells_per_spot must be a pair of integers"),
        ({"cells_per_spot": 5}, r"cells_per_spot must be a pair"),
        ({"cells_per_spot": (0, 3)}, r"1 ≤ min ≤ max"),
        ({"cells_per_spot": (2.5, 4)}, r"cells_per_spot"),
        ({"library_size": 0}, r"library_size must be a finite number > 0"),
        ({"library_size": -10.0}, r"library_size"),
        ({"reference_fraction": 1.0}, r"reference_fraction must be a number strictly between"),
        ({"reference_fraction": 0}, r"reference_fraction"),
        ({"exclude_from_reference": ["Endo", "Neuron"]}, r"not in obs\['cell_type'\]: \['Neuron"),
        ({"exclude_from_reference": TYPES}, "every cell type"),
        ({"labels_key": "celltype"}, r"no obs column 'celltype'.*labels_key="),
        ({"n_spots": 3}, r"n_spots=3 is fewer than the 4 regions"),
        ({"n_spots": 10.5}, r"n_spots must be an integer"),
        ({"layer": "raw"}, r"no layer 'raw'"),
        ({"platform_effect": -0.5}, r"platform_effect must be a finite number ≥ 0"),
        ({"platform_effect": "big"}, r"platform_effect"),
    ],
)
def test_bad_arguments(reference, kwargs, match):
    with pytest.raises(InputError, match=match):
        pseudo_spots(reference, **kwargs)


def test_duplicate_cell_names_are_rejected(reference):
    reference.obs_names = ["same"] * reference.n_obs
    with pytest.raises(InputError, match="duplicate cell names"):
        pseudo_spots(reference)


def test_single_region_kind_as_a_string(reference):
    spatial, _ = pseudo_spots(reference, n_spots=30, regions="rare")
    assert list(spatial.obs["region"].cat.categories) == ["rare"]


def test_type_with_one_cell_cannot_be_split(reference):
    reference.obs["cell_type"] = reference.obs["cell_type"].cat.add_categories("Solo")
    reference.obs.iloc[0, reference.obs.columns.get_loc("cell_type")] = "Solo"
    with pytest.raises(InputError, match=r"'Solo' \(1 cell\).*at least two"):
        pseudo_spots(reference)


def test_non_count_input_is_rejected(reference):
    reference.X = reference.X.multiply(0.37).tocsr()
    with pytest.raises(InputError, match="non-integer values"):
        pseudo_spots(reference)
    with pytest.raises(InputError, match="must be an AnnData"):
        pseudo_spots(reference.to_df())
