"""spotlens.datasets: bundled osmFISH example, shared real pairs, synthetic factory."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from spotlens import datasets
from spotlens._validation import InputError
from spotlens.datasets import _pairs

N_SPOTS, N_CELLS, N_GENES = 1036, 4839, 33


@pytest.fixture(scope="module")
def osmfish() -> tuple[AnnData, AnnData]:
    return datasets.osmfish_cortex()


@pytest.fixture(scope="module")
def small() -> tuple[AnnData, AnnData]:
    return datasets.synthetic(400, 300, 6, n_cells_per_type=40, seed=3)


def _integer_csr(x) -> bool:
    return (
        sparse.isspmatrix_csr(x)
        and x.dtype == np.float32
        and np.array_equal(x.data, np.round(x.data))
        and (x.data > 0).all()
    )


def _pearson(a: pd.DataFrame, b: pd.DataFrame) -> float:
    b = b.loc[a.index, a.columns]
    return float(np.corrcoef(a.to_numpy().ravel(), b.to_numpy().ravel())[0, 1])


# --- bundled osmFISH example ---------------------------------------------------------------


def test_osmfish_shapes_and_keys(osmfish):
    st, ref = osmfish
    assert st.shape == (N_SPOTS, N_GENES) and ref.shape == (N_CELLS, N_GENES)
    assert list(st.var_names) == list(ref.var_names)
    assert _integer_csr(st.X) and _integer_csr(ref.X)
    assert st.obsm["spatial"].shape == (N_SPOTS, 2) and ref.obsm["spatial"].shape == (N_CELLS, 2)
    assert {"cell_type", "cell_type_fine", "region", "spot", "half", "sample"} <= set(ref.obs)
    assert {"n_cells", "half", "dominant_region", "nUMI"} <= set(st.obs)
    assert ref.obs["cell_type"].nunique() == 11 and ref.obs["cell_type_fine"].nunique() == 31
    # coordinates in µm: 50 µm bins, centres 25 ... 3125
    xy = np.asarray(st.obsm["spatial"])
    assert xy.min() == pytest.approx(25) and xy.max() == pytest.approx(3125)


@pytest.mark.parametrize(
    ("prop_key", "count_key", "label_col", "n_types"),
    [
        ("true_proportions", "true_cell_counts", "cell_type", 11),
        ("true_proportions_fine", "true_cell_counts_fine", "cell_type_fine", 31),
    ],
)
def test_osmfish_truth_is_the_cells_of_each_spot(osmfish, prop_key, count_key, label_col, n_types):
    st, ref = osmfish
    props, counts = st.obsm[prop_key], st.obsm[count_key]
    for frame in (props, counts):
        assert isinstance(frame, pd.DataFrame)
        assert frame.shape == (N_SPOTS, n_types)
        assert frame.index.equals(st.obs_names)
    assert np.allclose(props.sum(axis=1), 1.0, atol=1e-12)
    assert np.allclose(props, counts.div(counts.sum(axis=1), axis=0))
    assert (counts.sum(axis=1).to_numpy() == st.obs["n_cells"].to_numpy()).all()
    # independent check: count the reference cells of each type in each spot
    table = pd.crosstab(ref.obs["spot"].astype(str), ref.obs[label_col].astype(str))
    table = table.reindex(index=st.obs_names, columns=counts.columns)
    assert (table.to_numpy() == counts.to_numpy()).all()


def test_osmfish_spot_counts_are_sums_of_their_cells(osmfish):
    st, ref = osmfish
    member = sparse.csr_matrix(
        (np.ones(ref.n_obs), (st.obs_names.get_indexer(ref.obs["spot"].astype(str)),
                              np.arange(ref.n_obs))),
        shape=(st.n_obs, ref.n_obs),
    )
    assert abs(member @ ref.X - st.X).max() == 0


def test_osmfish_returns_independent_copies():
    st, ref = datasets.osmfish_cortex()
    st.X.data[:] = 0
    st.obsm["true_proportions"].iloc[:, :] = -1.0
    st.obs["half"] = "mutated"
    ref.obs["cell_type"] = "mutated"
    st2, ref2 = datasets.osmfish_cortex()
    assert st2.X.sum() > 0
    assert (st2.obsm["true_proportions"].to_numpy() >= 0).all()
    assert set(st2.obs["half"]) == {"left", "right"}
    assert ref2.obs["cell_type"].nunique() == 11


def test_osmfish_fine_switches_labels_and_truth():
    st, ref = datasets.osmfish_cortex(fine=True)
    assert ref.obs["cell_type"].nunique() == 31
    assert ref.obs["cell_type_coarse"].nunique() == 11
    assert st.obsm["true_proportions"].shape == (N_SPOTS, 31)
    assert st.obsm["true_proportions_coarse"].shape == (N_SPOTS, 11)
    assert set(st.obsm["true_proportions"].columns) == set(ref.obs["cell_type"].astype(str))


def test_osmfish_heldout_split():
    st, ref = datasets.osmfish_heldout()
    assert st.shape == (519, N_GENES) and ref.shape == (2538, N_GENES)
    assert set(st.obs["half"]) == {"right"} and set(ref.obs["half"]) == {"left"}
    assert list(st.obs["half"].cat.categories) == ["right"]
    truth = st.obsm["true_proportions"]
    assert truth.index.equals(st.obs_names)
    assert np.allclose(truth.sum(axis=1), 1.0)
    # no spot is made of reference cells
    assert not set(ref.obs["spot"].astype(str)) & set(st.obs_names)


def test_bundled_files_are_small():
    folder = resources.files("spotlens.datasets") / "data"
    sizes = [len(f.read_bytes()) for f in folder.iterdir() if f.name.endswith(".h5ad")]
    assert len(sizes) == 2 and sum(sizes) < 1.5e6
    assert (folder / "README.md").is_file()


# --- shared real pairs ----------------------------------------------------------------------


def test_load_pair_unknown_name():
    with pytest.raises(InputError, match="Unknown dataset 'nope'.*spacexr_cerebellum_slideseq"):
        datasets.load_pair("nope")
    with pytest.raises(InputError, match="osmfish_cortex()"):
        datasets.load_pair("osmfish_cortex_pseudospots")


def test_load_pair_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="lacks spatial.h5ad, sc_reference.h5ad"):
        datasets.load_pair("spacexr_hippocampus_visium", data_dir=tmp_path)
    monkeypatch.setenv(_pairs.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(InputError, match="SPOTLENS_DATA"):
        datasets.load_pair("spacexr_hippocampus_visium")


@pytest.mark.skipif(_pairs.default_data_dir() is None, reason="shared data folder not present")
def test_load_pair_reads_shared_data():
    st, ref = datasets.load_pair("spacexr_cerebellum_slideseq")
    assert st.n_obs == 100 and ref.n_obs == 475
    assert ref.obs["cell_type"].nunique() == 19
    assert st.obsm["spatial"].shape == (100, 2)
    assert len(ref.var_names.intersection(st.var_names)) == 378
    st.obs["x"] = 1
    assert "x" not in datasets.load_pair("spacexr_cerebellum_slideseq")[0].obs


# --- synthetic factory ------------------------------------------------------------------------


def test_synthetic_shapes_and_types(small):
    st, ref = small
    assert st.shape == (400, 300) and ref.shape == (6 * 40, 300)
    assert _integer_csr(st.X) and _integer_csr(ref.X)
    assert st.var_names.equals(ref.var_names)
    assert ref.obs["cell_type"].value_counts().eq(40).all()
    truth = st.obsm["true_proportions"]
    assert list(truth.columns) == list(ref.obs["cell_type"].cat.categories)
    assert st.uns["synthetic"]["params"]["seed"] == 3


def test_synthetic_truth_consistent(small):
    st, _ = small
    props, counts = st.obsm["true_proportions"], st.obsm["true_cell_counts"]
    assert props.index.equals(st.obs_names) and counts.index.equals(st.obs_names)
    assert np.allclose(props.sum(axis=1), 1.0, atol=1e-12)
    assert np.allclose(counts.div(counts.sum(axis=1), axis=0), props)
    assert counts.dtypes.eq(np.int64).all() and (counts.to_numpy() >= 0).all()
    n_cells = counts.sum(axis=1).to_numpy()
    assert (n_cells >= 1).all() and (n_cells == st.obs["n_cells"].to_numpy()).all()
    assert 7.0 < n_cells.mean() < 9.0  # Poisson(8), floored at 1


def test_synthetic_library_matches_cells(small):
    """A spot's total counts follow its cells: Σ_k cells_k · (mean counts per cell of type k)."""
    st, _ = small
    cells = st.obsm["true_cell_counts"]
    per_cell = st.varm["true_profiles"].sum(axis=0)[cells.columns]
    expected = cells.to_numpy() @ per_cell.to_numpy()
    observed = np.asarray(st.X.sum(axis=1)).ravel()
    assert observed.sum() / expected.sum() == pytest.approx(1.0, abs=0.02)
    assert np.corrcoef(observed, expected)[0, 1] > 0.9


def test_synthetic_hex_grid_in_micrometres(small):
    xy = small[0].obsm["spatial"]
    d, _ = cKDTree(xy).query(xy, k=7)
    assert np.allclose(d[:, 1], 100.0)
    interior = (d[:, 1:] < 100.01).sum(axis=1)
    assert interior.max() == 6  # hexagonal: six neighbours at 100 µm


def test_synthetic_reproducible_by_seed():
    a, ra = datasets.synthetic(200, 100, 4, seed=7)
    b, rb = datasets.synthetic(200, 100, 4, seed=7, n_jobs=2)
    c, _ = datasets.synthetic(200, 100, 4, seed=8)
    assert abs(a.X - b.X).max() == 0 and abs(ra.X - rb.X).max() == 0
    pd.testing.assert_frame_equal(a.obsm["true_proportions"], b.obsm["true_proportions"])
    assert abs(a.X - c.X).max() > 0
    # spots do not depend on the reference size
    d, rd = datasets.synthetic(200, 100, 4, seed=7, n_cells_per_type=10)
    assert abs(a.X - d.X).max() == 0 and rd.n_obs == 40


def test_count_assembly_without_reservation_is_identical():
    from spotlens.datasets import _simulate

    rng = np.random.default_rng(0)
    n, n_genes = 50, 40
    dense = rng.poisson(0.5, size=(n, n_genes))
    slices = [slice(0, 7), slice(7, 30), slice(30, 50)]

    def pieces():
        for sl in slices:
            block = dense[sl]
            at = np.flatnonzero(block)
            yield (np.count_nonzero(block, axis=1), (at % n_genes).astype(np.int32),
                   block.ravel()[at].astype(np.float32))

    for reserve in (True, False):
        m = _simulate._assemble(pieces(), slices, n, n_genes, reserve=reserve)
        assert m.shape == (n, n_genes) and m.nnz == np.count_nonzero(dense)
        assert np.array_equal(m.toarray(), dense)


def test_synthetic_domains_are_spatially_coherent():
    def neighbour_similarity(layout):
        st, _ = datasets.synthetic(900, 50, 6, seed=2, layout=layout)
        p = st.obsm["true_proportions"].to_numpy()
        _, j = cKDTree(st.obsm["spatial"]).query(st.obsm["spatial"], k=2)
        return np.corrcoef(p.ravel(), p[j[:, 1]].ravel())[0, 1]

    smooth, scattered = neighbour_similarity("domains"), neighbour_similarity("random")
    assert smooth > scattered + 0.1


def test_synthetic_from_reference_keeps_its_genes_and_profiles(osmfish):
    _, real = osmfish
    st, ref = datasets.synthetic(300, seed=1, reference=real, n_cells_per_type=20)
    assert st.var_names.equals(real.var_names)
    assert list(st.obsm["true_proportions"].columns) == sorted(real.obs["cell_type"].unique())
    assert ref.n_obs == 11 * 20
    # simulated cells resemble real ones: per-type mean profiles agree
    def profile(adata):
        x = sparse.csr_matrix(adata.X).toarray()
        x = x / np.maximum(x.sum(axis=1, keepdims=True), 1)
        return pd.DataFrame(x, index=adata.obs_names).groupby(
            adata.obs["cell_type"].astype(str).to_numpy()).mean()
    real_profile, sim_profile = profile(real).to_numpy(), profile(ref).to_numpy()
    assert np.corrcoef(real_profile.ravel(), sim_profile.ravel())[0, 1] > 0.95
    # real library sizes are resampled
    real_lib = np.asarray(real.X.sum(axis=1)).ravel()
    sim_lib = np.asarray(ref.X.sum(axis=1)).ravel()
    assert np.median(sim_lib) == pytest.approx(np.median(real_lib), rel=0.25)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_spots": 0}, "n_spots must be an integer ≥ 1"),
        ({"n_spots": 10.5}, "n_spots must be an integer"),
        ({"n_types": 1}, "n_types must be an integer ≥ 2"),
        ({"n_genes": 3, "n_types": 5}, "n_genes must be an integer ≥ 5"),
        ({"cells_per_spot": 0}, "cells_per_spot must be a finite number > 0"),
        ({"dispersion": -1}, "dispersion must be a finite number ≥ 0"),
        ({"layout": "spiral"}, "layout must be one of"),
        ({"grid": "tri"}, "grid must be one of"),
        ({"n_domains": 0}, "n_domains must be an integer ≥ 1"),
        ({"reference": "ref.h5ad"}, "reference must be an AnnData"),
    ],
)
def test_synthetic_bad_input(kwargs, message):
    with pytest.raises(InputError, match=message):
        datasets.synthetic(**{"n_spots": 10, "n_genes": 20, "n_types": 3, **kwargs})


def test_synthetic_bad_reference(osmfish):
    _, real = osmfish
    with pytest.raises(InputError, match="no obs column 'celltype'"):
        datasets.synthetic(10, reference=real, labels_key="celltype")
    normalised = real.copy()
    normalised.X = normalised.X * 0.5
    with pytest.raises(InputError, match="non-integer"):
        datasets.synthetic(10, reference=normalised)


def test_synthetic_writes_to_h5ad(small, tmp_path):
    import anndata as ad

    st, ref = small
    st.write_h5ad(tmp_path / "st.h5ad")
    ref.write_h5ad(tmp_path / "ref.h5ad")
    st2, ref2 = ad.read_h5ad(tmp_path / "st.h5ad"), ad.read_h5ad(tmp_path / "ref.h5ad")
    # the simulation, its truth and its reference survive the round trip unchanged
    np.testing.assert_array_equal(st2.X.toarray(), st.X.toarray())
    np.testing.assert_array_equal(ref2.X.toarray(), ref.X.toarray())
    pd.testing.assert_frame_equal(st2.obsm["true_proportions"], st.obsm["true_proportions"])
    np.testing.assert_array_equal(st2.obsm["spatial"], st.obsm["spatial"])
    assert (ref2.obs["cell_type"].astype(str) == ref.obs["cell_type"].astype(str)).all()


def test_deconvolve_recovers_synthetic_truth(small):
    from spotlens.deconv import deconvolve

    st, ref = small
    before = st.copy()
    result = deconvolve(st, ref, progress=False, inplace=False)
    assert _pearson(result.proportions, st.obsm["true_proportions"]) > 0.93
    assert set(st.obsm) == set(before.obsm)  # inplace=False changed nothing
