"""spotlens.pp.aggregate_bins: small bins summed into squares or segmented cells."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse

import spotlens
from spotlens import InputError
from spotlens.pp import aggregate_bins


def fine_bins(n: int = 12, spacing: float = 2.0, seed: int = 0) -> AnnData:
    """``n × n`` bins ``spacing`` µm apart (a square grid), Poisson counts over 20 genes."""
    rng = np.random.default_rng(seed)
    ij = np.array([(i, j) for i in range(n) for j in range(n)], dtype=float)
    counts = sparse.csr_matrix(rng.poisson(0.7, size=(n * n, 20)).astype(np.float64))
    adata = AnnData(counts)
    adata.obs_names = [f"bin{k}" for k in range(n * n)]
    adata.var_names = [f"g{k}" for k in range(20)]
    adata.obsm["spatial"] = ij * spacing + spacing / 2
    return adata


def members(out: AnnData, row: int) -> np.ndarray:
    return np.flatnonzero(out.uns["aggregate_bins"]["bin_group"] == row)


def test_square_bins_sum_counts_and_keep_every_bin():
    hd = fine_bins()
    out = aggregate_bins(hd, bin_size_um=8.0, microns_per_unit=1.0)
    assert out.n_obs == 9  # 24 µm of bins in 8 µm squares: 3 × 3
    assert out.obs["n_bins"].sum() == hd.n_obs and (out.obs["n_bins"] == 16).all()
    np.testing.assert_allclose(np.asarray(out.X.sum(axis=0)).ravel(),
                               np.asarray(hd.X.sum(axis=0)).ravel())
    for row in range(out.n_obs):
        idx = members(out, row)
        np.testing.assert_allclose(out.X[row].toarray().ravel(),
                                   np.asarray(hd.X[idx].sum(axis=0)).ravel())
        xy = hd.obsm["spatial"][idx]
        assert np.ptp(np.floor(xy / 8.0), axis=0).max() == 0  # one square each
        np.testing.assert_allclose(out.obsm["spatial"][row], xy.mean(axis=0))
    assert out.var_names.equals(hd.var_names)


def test_pixel_coordinates_use_the_stated_microns_per_pixel():
    hd = fine_bins()
    hd.obsm["spatial"] = hd.obsm["spatial"] * 4.0  # pixels of 0.25 µm
    hd.uns["spatial"] = {"hd": {"scalefactors": {"microns_per_pixel": 0.25}}}
    out = aggregate_bins(hd, bin_size_um=8.0)
    assert out.n_obs == 9
    assert out.uns["aggregate_bins"]["params"]["microns_per_unit"] == 0.25
    assert out.uns["spatial"] == hd.uns["spatial"]
    assert out.uns["spatial"] is not hd.uns["spatial"]


def test_segmented_cells_group_bins_and_unlabelled_bins_are_left_out():
    hd = fine_bins()
    labels = np.array(["cellA", "cellB", "cellC", None] * (hd.n_obs // 4), dtype=object)
    hd.obs["cell_id"] = labels
    out = aggregate_bins(hd, by="cell_id")
    assert sorted(out.obs_names) == ["cellA", "cellB", "cellC"]
    group = out.uns["aggregate_bins"]["bin_group"]
    assert (group[pd.isna(labels)] == -1).all()
    for name in out.obs_names:
        row = out.obs_names.get_loc(name)
        idx = np.flatnonzero(labels == name)
        assert set(members(out, row)) == set(idx)
        np.testing.assert_allclose(out.X[row].toarray().ravel(),
                                   np.asarray(hd.X[idx].sum(axis=0)).ravel())
    assert (out.obs["cell_id"].to_numpy() == out.obs_names.to_numpy()).all()


def test_sections_are_never_summed_together():
    a, b = fine_bins(seed=1), fine_bins(seed=2)
    b.obs_names = [f"b{n}" for n in b.obs_names]
    both = AnnData(sparse.vstack([a.X, b.X]).tocsr(), var=a.var)
    both.obs_names = list(a.obs_names) + list(b.obs_names)
    both.obsm["spatial"] = np.vstack([a.obsm["spatial"], b.obsm["spatial"]])  # same positions
    both.obs["section"] = ["s1"] * a.n_obs + ["s2"] * b.n_obs
    out = aggregate_bins(both, bin_size_um=8.0, microns_per_unit=1.0, library_key="section")
    assert out.n_obs == 18
    assert (out.obs.groupby("section")["n_bins"].sum() == a.n_obs).all()
    for row in range(out.n_obs):
        assert both.obs["section"].iloc[members(out, row)].nunique() == 1


def test_the_input_is_not_changed():
    hd = fine_bins()
    hd.obs["cell_id"] = ["c1", "c2"] * (hd.n_obs // 2)
    before = (hd.X.copy(), hd.obs.copy(), hd.obsm["spatial"].copy(), dict(hd.uns))
    aggregate_bins(hd, bin_size_um=4.0, microns_per_unit=1.0)
    aggregate_bins(hd, by="cell_id")
    assert (hd.X != before[0]).nnz == 0
    pd.testing.assert_frame_equal(hd.obs, before[1])
    np.testing.assert_array_equal(hd.obsm["spatial"], before[2])
    assert dict(hd.uns) == before[3]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of bin_size_um"),
    ({"bin_size_um": 8.0, "by": "cell_id"}, "exactly one of bin_size_um"),
    ({"by": "nope"}, "no column 'nope'"),
    ({"bin_size_um": 8.0}, "Pass microns_per_unit="),
    ({"bin_size_um": 0.0, "microns_per_unit": 1.0}, "bin_size_um must be a finite number > 0"),
    ({"bin_size_um": 8.0, "microns_per_unit": -1.0},
     "microns_per_unit must be a finite number > 0"),
    ({"bin_size_um": 8.0, "microns_per_unit": 1.0, "spatial_key": "xy"}, r"no obsm\['xy'\]"),
    ({"bin_size_um": 8.0, "microns_per_unit": 1.0, "layer": "counts"}, "no layer 'counts'"),
    ({"by": "empty"}, "Every bin has a missing label"),
    ({"by": "cell_id", "library_key": "empty"}, "missing section labels"),
    ({"by": "cell_id", "layer": "normalised"}, "spatial counts"),
])
def test_bad_input_is_refused_with_the_fix(kwargs, message):
    hd = fine_bins()
    hd.obs["cell_id"] = "c"
    hd.obs["empty"] = pd.Series([None] * hd.n_obs, index=hd.obs_names, dtype=object)
    hd.layers["normalised"] = hd.X * 0.37
    with pytest.raises(InputError, match=message):
        aggregate_bins(hd, **kwargs)


def test_cells_are_counted_on_summed_bins_not_on_bins_smaller_than_a_cell():
    # spots of about one cell, each cut into 4 × 4 bins: a bin holds a sixteenth of a cell
    spots, reference = spotlens.datasets.synthetic(n_spots=120, n_genes=200, n_types=4,
                                                   cells_per_spot=1.0, n_cells_per_type=40,
                                                   grid="square", spacing_um=16.0, seed=3)
    rng = np.random.default_rng(0)
    y = spots.X.toarray() if sparse.issparse(spots.X) else np.asarray(spots.X)
    pieces = np.stack([rng.multinomial(int(v), np.full(16, 1 / 16)) if v else np.zeros(16, int)
                       for v in y.ravel()]).reshape(y.shape[0], y.shape[1], 16)
    offsets = (np.array([(i, j) for i in range(4) for j in range(4)]) + 0.5) * 4.0  # 0-16 µm
    bins = AnnData(sparse.csr_matrix(pieces.transpose(0, 2, 1).reshape(-1, y.shape[1])
                                     .astype(np.float64)), var=spots.var[[]].copy())
    bins.obs_names = [f"b{k}" for k in range(bins.n_obs)]
    bins.obsm["spatial"] = (spots.obsm["spatial"][:, None, :] + offsets[None]).reshape(-1, 2)
    truth = float(spots.obs["n_cells"].sum())

    per_bin = bins.copy()
    spotlens.deconv.deconvolve(per_bin, reference, progress=False)
    spotlens.deconv.cell_level(per_bin, reference, progress=False)
    summed = aggregate_bins(bins, bin_size_um=16.0, microns_per_unit=1.0)
    spotlens.deconv.deconvolve(summed, reference, progress=False)
    spotlens.deconv.cell_level(summed, reference, progress=False)

    placed_bins = float(per_bin.obsm["cell_counts_spotlens"].to_numpy().sum())
    placed_summed = float(summed.obsm["cell_counts_spotlens"].to_numpy().sum())
    assert summed.n_obs == spots.n_obs
    assert placed_bins > 5 * truth  # every bin is raised to one whole cell
    assert abs(placed_summed - truth) < 0.35 * truth


def test_segmented_cells_get_one_cell_each_with_a_column_of_ones():
    # the documented route for bins grouped by a segmentation: each row is one cell
    spots, reference = spotlens.datasets.synthetic(n_spots=60, n_genes=150, n_types=3,
                                                   cells_per_spot=1.0, n_cells_per_type=30,
                                                   seed=5)
    bins = AnnData(sparse.csr_matrix(spots.X, dtype=np.float64), var=spots.var[[]].copy())
    bins.obs_names = [f"b{k}" for k in range(bins.n_obs)]
    bins.obsm["spatial"] = spots.obsm["spatial"]
    bins.obs["cell_id"] = [f"cell{k // 2}" for k in range(bins.n_obs)]  # two bins per cell
    cells = aggregate_bins(bins, by="cell_id")
    cells.obs["n_cells"] = 1
    spotlens.deconv.deconvolve(cells, reference, progress=False)
    spotlens.deconv.cell_level(cells, reference, cells_per_spot="n_cells", progress=False)
    placed = cells.obsm["cell_counts_spotlens"].to_numpy().sum(axis=1)
    assert cells.n_obs == 30
    np.testing.assert_array_equal(placed, np.ones(cells.n_obs))
