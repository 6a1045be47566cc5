"""spotlens.io: Space Ranger and h5ad readers, atomic writers."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import spotlens.io as sio
from spotlens._validation import InputError

# spot barcode -> (pxl_row_in_fullres, pxl_col_in_fullres), i.e. (y, x)
PIXELS = {"AAAC-1": (100, 2000), "AAAG-1": (150, 2050), "AACT-1": (200, 2100)}
GENES = ["Gapdh", "Actb", "Actb", "Mbp"]  # a repeated symbol, as in real 10x references
COUNTS = np.array([[5, 0, 1, 2, 7], [0, 3, 0, 1, 9], [2, 2, 4, 0, 1]])  # spots × features


def write_10x_h5(file: Path, counts, barcodes, names, types, *, attrs: dict) -> None:
    """Write a 10x v3 HDF5 feature-barcode matrix (``counts``: barcodes × features)."""
    m = sparse.csc_matrix(counts.T)  # 10x stores features × barcodes, compressed by barcode
    with h5py.File(file, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        feats = g.create_group("features")
        feats["id"] = np.array([f"ENSMUSG{i:05d}" for i in range(len(names))], dtype="S")
        feats["name"] = np.array(names, dtype="S")
        feats["feature_type"] = np.array(types, dtype="S")
        feats["genome"] = np.array(["mm10"] * len(names), dtype="S")
        feats["_all_tag_keys"] = np.array([b"genome"])


def make_spaceranger(root: Path, *, legacy_positions: bool = False) -> Path:
    """Write a minimal Space Ranger outs/ folder (10x v3 HDF5 matrix + spatial/)."""
    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True)
    barcodes = list(PIXELS)
    names = [*GENES, "CD3"]  # the last feature is an antibody, not a gene
    types = ["Gene Expression"] * len(GENES) + ["Antibody Capture"]
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", COUNTS, barcodes, names, types,
                 attrs={"library_ids": np.array([b"section1"]),
                        "chemistry_description": "Spatial 3' v1",
                        "software_version": "spaceranger-2.1.0"})
    # positions list every spot of the slide, in another order than the matrix
    rows = [("TTTT-1", 0, 0, 0, 900, 900)] + [
        (bc, 1, i, i, y, x) for i, (bc, (y, x)) in reversed(list(enumerate(PIXELS.items())))
    ]
    table = pd.DataFrame(rows, columns=["barcode", "in_tissue", "array_row", "array_col",
                                        "pxl_row_in_fullres", "pxl_col_in_fullres"])
    if legacy_positions:
        table.to_csv(outs / "spatial" / "tissue_positions_list.csv", header=False, index=False)
    else:
        table.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    scalefactors = {"spot_diameter_fullres": 89.4, "tissue_hires_scalef": 0.17,
                    "tissue_lowres_scalef": 0.05, "fiducial_diameter_fullres": 144.4}
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    return outs


@pytest.mark.parametrize("legacy_positions", [False, True])
def test_spaceranger_counts_coordinates_and_metadata(tmp_path, caplog, legacy_positions):
    outs = make_spaceranger(tmp_path, legacy_positions=legacy_positions)
    with caplog.at_level(logging.INFO, logger="spotlens"):
        st = sio.read_spatial(outs)

    # raw counts, gene-expression features only, barcodes in matrix order
    assert list(st.obs_names) == list(PIXELS)
    np.testing.assert_array_equal(st.X.toarray(), COUNTS[:, : len(GENES)])
    assert st.var_names.is_unique and list(st.var_names) == ["Gapdh", "Actb", "Actb-1", "Mbp"]
    assert "Actb" in caplog.text and "more than once" in caplog.text
    # (x, y) = (pixel column, pixel row), matched by barcode, not by file order
    expected = np.array([[x, y] for y, x in PIXELS.values()], dtype=float)
    np.testing.assert_array_equal(st.obsm["spatial"], expected)
    assert st.obs["in_tissue"].tolist() == [1, 1, 1]
    assert st.uns["spatial"]["section1"]["scalefactors"]["spot_diameter_fullres"] == 89.4
    assert st.uns["spatial"]["section1"]["metadata"]["software_version"] == "spaceranger-2.1.0"


def test_spaceranger_parent_folder_is_accepted(tmp_path):
    make_spaceranger(tmp_path)
    st = sio.read_spatial(tmp_path)
    assert st.n_obs == len(PIXELS) and "spatial" in st.obsm


def test_folder_without_count_matrix_names_the_expected_file(tmp_path):
    with pytest.raises(InputError, match="filtered_feature_bc_matrix.h5"):
        sio.read_spatial(tmp_path)


def test_missing_positions_names_the_expected_file(tmp_path):
    outs = make_spaceranger(tmp_path)
    (outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(InputError, match="tissue_positions.csv"):
        sio.read_spatial(outs)


def test_positions_from_another_run_are_rejected(tmp_path):
    outs = make_spaceranger(tmp_path)
    file = outs / "spatial" / "tissue_positions.csv"
    table = pd.read_csv(file)
    table[table["barcode"] != "AAAG-1"].to_csv(file, index=False)
    with pytest.raises(InputError, match="1 of 3 barcodes"):
        sio.read_spatial(outs)


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        sio.read_spatial(tmp_path / "missing.h5ad")
    outs = make_spaceranger(tmp_path)
    with pytest.raises(InputError, match="outs/ folder"):
        sio.read_spatial(outs / "filtered_feature_bc_matrix.h5")
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="Could not read"):
        sio.read_reference(broken)
    with pytest.raises(InputError, match="expected an .h5ad"):
        sio.read_reference(outs)


def test_h5ad_without_coordinates_is_rejected(tmp_path):
    path = tmp_path / "st.h5ad"
    ad.AnnData(np.ones((3, 2), dtype=np.float32)).write_h5ad(path)
    with pytest.raises(InputError, match=r"obsm\['spatial'\]"):
        sio.read_spatial(path)


def test_reference_labels_are_checked_on_read(tmp_path):
    path = tmp_path / "ref.h5ad"
    ref = ad.AnnData(np.ones((4, 2), dtype=np.float32),
                     obs=pd.DataFrame({"cell_type": ["a", "a", "b", "b"]},
                                      index=[f"c{i}" for i in range(4)]))
    ref.write_h5ad(path)
    assert list(sio.read_reference(path, labels_key="cell_type").obs["cell_type"]) == list("aabb")
    with pytest.raises(InputError, match="no obs column 'celltype'"):
        sio.read_reference(path, labels_key="celltype")


@pytest.fixture(scope="module")
def deconvolved(_bundled_session):
    """The bundled osmFISH part (conftest.py), deconvolved."""
    from spotlens.deconv import deconvolve

    st, ref = (adata.copy() for adata in _bundled_session)
    # 'auto' penalties so that uns holds the cross-validation table
    deconvolve(st, ref, labels_key="cell_type", n_iter=20, progress=False)
    return st


def test_deconvolve_result_round_trips_and_caller_is_untouched(deconvolved, tmp_path):
    st = deconvolved
    key = "proportions_spotlens"
    uns_before = dict(st.uns[key])
    obs_dtypes = st.obs.dtypes.copy()

    sio.write_h5ad(st, tmp_path / "st.h5ad")
    back = ad.read_h5ad(tmp_path / "st.h5ad")

    pd.testing.assert_frame_equal(back.obsm[key], st.obsm[key])
    assert back.obsp[f"{key}_connectivities"].nnz == st.obsp[f"{key}_connectivities"].nnz
    assert list(back.uns[key]["cell_types"]) == list(st.uns[key]["cell_types"])
    assert list(back.uns[key]["genes"]) == list(st.uns[key]["genes"])
    pd.testing.assert_frame_equal(back.uns[key]["cv"], st.uns[key]["cv"], check_dtype=False)
    assert back.uns[key]["params"]["lambda_ridge"] == st.uns[key]["params"]["lambda_ridge"]
    # the caller's object is not modified by writing
    assert all(st.uns[key][k] is v for k, v in uns_before.items())
    pd.testing.assert_series_equal(st.obs.dtypes, obs_dtypes)


def test_uns_values_anndata_cannot_store_are_converted(tmp_path):
    adata = ad.AnnData(np.zeros((2, 2), dtype=np.float32))
    adata.uns["run"] = {"shape": (2, 2), "path": Path("/data/x"), 3: "three",
                        "mixed": np.array(["a", 1], dtype=object)}
    sio.write_h5ad(adata, tmp_path / "a.h5ad")
    run = ad.read_h5ad(tmp_path / "a.h5ad").uns["run"]
    assert list(run["shape"]) == [2, 2]
    assert run["path"] == str(Path("/data/x"))
    assert run["3"] == "three"
    assert list(run["mixed"]) == ["a", "1"]
    assert isinstance(adata.uns["run"]["shape"], tuple)  # caller's uns unchanged


def test_atomic_writes_leave_only_the_final_files(tmp_path):
    df = pd.DataFrame({"A": [0.25, 1.0], "B": [0.75, 0.0]}, index=["s1", "s2"])
    sio.write_csv(df, tmp_path / "p.csv")
    sio.write_h5ad(ad.AnnData(np.ones((2, 2), dtype=np.float32)), tmp_path / "a.h5ad")
    from matplotlib.figure import Figure

    sio.save_figure(Figure(), tmp_path / "f.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "f.png", "p.csv"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "p.csv", index_col=0), df)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # usual permissions, not the owner-only mode of temporary files
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "p.csv").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch, error):
    path = tmp_path / "p.csv"
    sio.write_csv(pd.DataFrame({"A": [1.0]}), path)
    before = path.read_bytes()

    def half_write(self, target, **kwargs):
        Path(target).write_text("A\n0.")  # partial content, then the failure
        raise error

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_write)
    with pytest.raises(type(error)):
        sio.write_csv(pd.DataFrame({"A": [2.0]}), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.csv"]


def test_writer_errors_are_clear(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        sio.write_csv(pd.DataFrame({"A": [1]}), tmp_path / "no" / "p.csv")
    from matplotlib.figure import Figure

    with pytest.raises(InputError, match=r"\.png"):
        sio.save_figure(Figure(), tmp_path / "f.docx")
    with pytest.raises(InputError, match="AnnData"):
        sio.write_h5ad(pd.DataFrame(), tmp_path / "a.h5ad")


# -- Visium HD binned outputs ------------------------------------------------------------------

# µm per full-resolution px of a 40x scan; 8 / 0.25 = 32 px per bin exactly, so bin centres are
# exact multiples of the µm grid and equidistant neighbours stay exactly equidistant (the kNN
# graph breaks such ties by rounding, so a scale with rounding could pick other diagonals)
HD_MPP = 0.25
HD_HIRES_SCALEF = 0.08


@pytest.fixture(scope="module")
def osmfish_block():
    """300 contiguous osmFISH pseudo-spots (real counts, µm coordinates) and the reference."""
    from spotlens.datasets import osmfish_cortex

    st, ref = osmfish_cortex()
    xy = st.obsm["spatial"]
    centre = xy[np.argmin(np.linalg.norm(xy - np.median(xy, axis=0), axis=1))]
    keep = np.sort(np.argsort(np.linalg.norm(xy - centre, axis=1))[:300])
    return st[keep].copy(), ref


def _grid_index(st):
    """(array_row, array_col) of the 50 µm osmFISH pseudo-spot grid (centres at 25 + 50 i µm)."""
    ij = np.rint((st.obsm["spatial"] - 25) / 50).astype(int)
    return ij[:, 1], ij[:, 0]


def make_visium_hd(root: Path, st, *, bin_sizes=(8, 16), library_id: bytes | None = None,
                   images: bool = True) -> Path:
    """Write Space Ranger Visium HD ``outs/`` with ``binned_outputs/square_<NNN>um/`` folders.

    Each spot of ``st`` becomes one bin (the osmFISH grid index is the bin grid index), with the
    layout of Space Ranger ≥ 3.0: the 10x HDF5 matrix, ``spatial/tissue_positions.parquet``
    (every bin of the grid, in_tissue 0 for bins outside the matrix, rows in another order) and
    ``spatial/scalefactors_json.json`` with ``bin_size_um`` and ``microns_per_pixel``. The
    tissue images lie in ``outs/spatial/`` only.
    """
    outs = root / "hd_sample" / "outs"
    rows, cols = _grid_index(st)
    counts = sparse.csr_matrix(st.X).astype(np.int64)
    genes = list(st.var_names)
    for size in bin_sizes:
        folder = outs / "binned_outputs" / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True)
        barcodes = [f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
        attrs = {"software_version": "spaceranger-3.1.1",
                 "chemistry_description": "Visium HD v1"}
        if library_id is not None:
            attrs["library_ids"] = np.array([library_id])
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes, genes,
                     ["Gene Expression"] * len(genes), attrs=attrs)
        all_r, all_c = np.meshgrid(np.arange(rows.max() + 2), np.arange(cols.max() + 2),
                                   indexing="ij")
        grid = pd.DataFrame({"array_row": all_r.ravel(), "array_col": all_c.ravel()})
        grid["barcode"] = [f"s_{size:03d}um_{r:05d}_{c:05d}-1"
                           for r, c in zip(grid.array_row, grid.array_col, strict=True)]
        grid["in_tissue"] = grid.barcode.isin(barcodes).astype(np.int32)
        grid["pxl_row_in_fullres"] = (grid.array_row + 0.5) * size / HD_MPP
        grid["pxl_col_in_fullres"] = (grid.array_col + 0.5) * size / HD_MPP
        grid = grid[["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                     "pxl_col_in_fullres"]].iloc[::-1]
        grid.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
        scalefactors = {"spot_diameter_fullres": size / HD_MPP, "bin_size_um": float(size),
                        "microns_per_pixel": HD_MPP, "regist_target_img_scalef": 0.2,
                        "tissue_lowres_scalef": 0.024, "fiducial_diameter_fullres": 1000.0,
                        "tissue_hires_scalef": HD_HIRES_SCALEF}
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    if images:
        from matplotlib.image import imsave

        (outs / "spatial").mkdir(parents=True, exist_ok=True)
        imsave(outs / "spatial" / "tissue_hires_image.png", np.full((40, 60, 3), 0.8))
    return outs


def test_visium_hd_bins_counts_coordinates_and_scalefactors(tmp_path, osmfish_block):
    st, _ = osmfish_block
    outs = make_visium_hd(tmp_path, st, library_id=b"hd_section")
    hd = sio.read_spatial(outs, bin_size=8)

    rows, cols = _grid_index(st)
    names = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    assert list(hd.obs_names) == names
    # raw counts, unchanged and in matrix order
    np.testing.assert_array_equal(hd.X.toarray(), sparse.csr_matrix(st.X).toarray())
    assert list(hd.var_names) == list(st.var_names)
    # bin centres (x, y) in full-resolution px: the 8 µm bin grid over microns_per_pixel
    expected = np.column_stack([(cols + 0.5) * 8 / HD_MPP, (rows + 0.5) * 8 / HD_MPP])
    np.testing.assert_allclose(hd.obsm["spatial"], expected)
    assert hd.obs["array_row"].tolist() == rows.tolist()
    assert hd.obs["in_tissue"].eq(1).all()
    lib = hd.uns["spatial"]["hd_section"]
    sf = lib["scalefactors"]
    assert sf["bin_size_um"] == 8.0 and sf["microns_per_pixel"] == HD_MPP
    assert sf["spot_diameter_fullres"] * sf["microns_per_pixel"] == pytest.approx(8.0)
    assert lib["metadata"]["software_version"] == "spaceranger-3.1.1"
    assert lib["images"]["hires"].shape[:2] == (40, 60)  # found in outs/spatial/

    # the same bins from the bin folder itself, from the sample folder, and by default (8 µm)
    for path, size in [(outs / "binned_outputs" / "square_008um", None),
                       (outs.parent, 8), (outs / "binned_outputs", None), (outs, None)]:
        other = sio.read_spatial(path, bin_size=size, load_images=False)
        assert list(other.obs_names) == list(hd.obs_names)
        np.testing.assert_array_equal(other.obsm["spatial"], hd.obsm["spatial"])
    # another bin size: same grid, 16 µm apart
    hd16 = sio.read_spatial(outs, bin_size=16, load_images=False)
    assert hd16.obs_names[0].startswith("s_016um_")
    np.testing.assert_allclose(hd16.obsm["spatial"], 2 * hd.obsm["spatial"])
    assert hd16.uns["spatial"]["hd_section"]["scalefactors"]["bin_size_um"] == 16.0


def test_visium_hd_8um_bins_summed_into_16um_match_the_bin_grid(tmp_path, osmfish_block):
    from spotlens.pp import aggregate_bins

    st, _ = osmfish_block
    hd = sio.read_spatial(make_visium_hd(tmp_path, st, bin_sizes=(8,), images=False))
    # the scale factors give µm per pixel: no unit has to be passed
    big = aggregate_bins(hd, bin_size_um=16.0)
    group = big.uns["aggregate_bins"]["bin_group"]
    blocks = hd.obs["array_row"].to_numpy() // 2 * 10_000 + hd.obs["array_col"].to_numpy() // 2
    assert big.n_obs == len(np.unique(blocks))
    for row in range(big.n_obs):  # each 16 µm bin is one 2 × 2 block of the 8 µm grid
        assert len(np.unique(blocks[group == row])) == 1
    np.testing.assert_allclose(np.asarray(big.X.sum(axis=0)).ravel(),
                               np.asarray(hd.X.sum(axis=0)).ravel())
    assert big.uns["spatial"].keys() == hd.uns["spatial"].keys()


def test_visium_hd_library_id_and_missing_microns_per_pixel(tmp_path, osmfish_block):
    st, _ = osmfish_block
    outs = make_visium_hd(tmp_path, st[:20], bin_sizes=(16,), images=False)
    sf_file = outs / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_file.read_text())
    del sf["microns_per_pixel"]
    sf_file.write_text(json.dumps(sf))
    hd = sio.read_spatial(outs)  # the only bin size there is
    # no library id in the matrix: the sample folder's name; µm/px from the bin side in px
    assert list(hd.uns["spatial"]) == ["hd_sample"]
    got = hd.uns["spatial"]["hd_sample"]["scalefactors"]
    assert got["microns_per_pixel"] == pytest.approx(HD_MPP)


def test_visium_hd_errors_name_what_is_missing(tmp_path, osmfish_block):
    st, _ = osmfish_block
    outs = make_visium_hd(tmp_path, st[:20], bin_sizes=(2, 16), images=False)
    with pytest.raises(InputError, match=r"no 8 µm bins.*2 µm \(square_002um\), 16 µm"):
        sio.read_spatial(outs, bin_size=8)
    with pytest.raises(InputError, match="several bin sizes and none is 8 µm; pass bin_size"):
        sio.read_spatial(outs)
    for bad in ("8", 0, 2.5, True):
        with pytest.raises(InputError, match="positive whole number of µm"):
            sio.read_spatial(outs, bin_size=bad)
    folder = outs / "binned_outputs" / "square_016um"
    with pytest.raises(InputError, match="holds 16 µm bins, but bin_size=2"):
        sio.read_spatial(folder, bin_size=2)
    sf_file = folder / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_file.read_text())
    sf_file.write_text(json.dumps({**sf, "bin_size_um": 2.0}))
    with pytest.raises(InputError, match="bin_size_um=2.0, but the folder holds 16 µm bins"):
        sio.read_spatial(folder)
    (folder / "spatial" / "tissue_positions.parquet").unlink()
    with pytest.raises(InputError, match=r"no spatial/tissue_positions.parquet"):
        sio.read_spatial(outs, bin_size=16)
    # bin_size on data that are not Visium HD
    make_spaceranger(tmp_path / "visium")
    with pytest.raises(InputError, match="applies to Visium HD binned outputs"):
        sio.read_spatial(tmp_path / "visium" / "outs", bin_size=8)
    h5ad = tmp_path / "st.h5ad"
    st.write_h5ad(h5ad)
    with pytest.raises(InputError, match="applies to Visium HD binned outputs"):
        sio.read_spatial(h5ad, bin_size=8)


def test_deconvolve_on_visium_hd_bins_equals_the_h5ad_run(tmp_path, osmfish_block):
    """Read from the HD layout, the fit is the one on the same counts in µm (graph unit-free)."""
    from spotlens._metrics import accuracy
    from spotlens.deconv import deconvolve

    st, ref = osmfish_block
    hd = sio.read_spatial(make_visium_hd(tmp_path, st, bin_sizes=(8,)), bin_size=8)
    # least squares: its Gauss–Seidel sweeps reach the optimum to 1e-8, so any difference
    # would come from the reader
    kwargs = {"labels_key": "cell_type", "lambda_ridge": 0.01, "lambda_spatial": 0.1,
              "progress": False, "likelihood": "gaussian"}
    deconvolve(hd, ref, **kwargs)
    direct = st.copy()
    deconvolve(direct, ref, **kwargs)
    props = hd.obsm["proportions_spotlens"]
    assert list(props.index) == list(hd.obs_names)
    np.testing.assert_allclose(props.to_numpy(), direct.obsm["proportions_spotlens"].to_numpy(),
                               atol=1e-8)
    scores = accuracy(pd.DataFrame(props.to_numpy(), index=st.obs_names, columns=props.columns),
                      st.obsm["true_proportions"])
    assert scores["pearson_r"] > 0.8


def test_cli_deconvolve_reads_visium_hd(tmp_path, osmfish_block):
    from typer.testing import CliRunner

    from spotlens.cli import app

    st, ref = osmfish_block
    outs = make_visium_hd(tmp_path, st, bin_sizes=(8, 16))
    ref.write_h5ad(tmp_path / "ref.h5ad")
    base = ["deconvolve", "-s", str(outs), "-r", str(tmp_path / "ref.h5ad"),
            "--lambda-ridge", "0.01", "--lambda-spatial", "0.1", "--no-progress", "-q"]
    res = CliRunner().invoke(app, [*base, "--bin-size", "16", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "out" / "proportions.csv", index_col=0)
    assert table.index[0].startswith("s_016um_") and len(table) == st.n_obs
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-6)
    # a fresh folder: the CLI refuses to write over an earlier run's results
    res = CliRunner().invoke(app, [*base, "--bin-size", "4", "-o", str(tmp_path / "out4")])
    assert res.exit_code == 2
    assert "error:" in res.output and "8 µm (square_008um), 16 µm" in res.output


# -- repeated gene names (issue 13, point 5) and names with '/' --------------------------------


def _with_repeated_gene(tmp_path, *, spatial: bool) -> Path:
    """An .h5ad whose genes 'Actb' and 'Mbp' each occur twice (as in 10x matrices)."""
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        sparse.csr_matrix(rng.poisson(2.0, size=(6, 5)).astype(np.float32)),
        obs=pd.DataFrame({"cell_type": list("aaabbb")}, index=[f"c{i}" for i in range(6)]),
    )
    adata.var_names = ["Gapdh", "Actb", "Actb", "Mbp", "Mbp"]
    if spatial:
        adata.obsm["spatial"] = rng.uniform(0, 100, size=(6, 2))
    path = tmp_path / ("st.h5ad" if spatial else "ref.h5ad")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        adata.write_h5ad(path)
    return path


@pytest.mark.parametrize("spatial", [True, False], ids=["read_spatial", "read_reference"])
def test_repeated_gene_names_are_renamed_with_a_warning_naming_them(tmp_path, caplog, spatial):
    path = _with_repeated_gene(tmp_path, spatial=spatial)
    read = sio.read_spatial if spatial else sio.read_reference
    with caplog.at_level(logging.WARNING, logger="spotlens"):
        adata = read(path)
    assert list(adata.var_names) == ["Gapdh", "Actb", "Actb-1", "Mbp", "Mbp-1"]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, "the renaming must not be silent"
    text = warned[0].getMessage()
    assert "Actb" in text and "Mbp" in text and "2 gene names occur more than once" in text
    assert "NAME-1" in text and "sum the repeated columns" in text


def test_cli_warns_about_renamed_genes(tmp_path, osmfish_block):
    """The CLI reads through the same readers: a repeated gene is reported, not dropped
    silently, even with -q."""
    from typer.testing import CliRunner

    from spotlens.cli import app

    st, ref = osmfish_block
    st = st.copy()
    names = list(st.var_names)
    names[1] = names[0]
    st.var_names = names
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        st.write_h5ad(tmp_path / "st.h5ad")
    ref.write_h5ad(tmp_path / "ref.h5ad")
    res = CliRunner().invoke(app, [
        "deconvolve", "-s", str(tmp_path / "st.h5ad"), "-r", str(tmp_path / "ref.h5ad"),
        "--lambda-ridge", "0.01", "--lambda-spatial", "0.1", "--n-iter", "3", "--no-progress",
        "-q", "-o", str(tmp_path / "out"),
    ])
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and f"e.g. {names[0]}" in res.output


def test_storage_names_are_reversible():
    from spotlens._keys import name_from_storage, storage_name

    for name in ["Microglia/Macrophage", "T/NK/ILC", "CD4+ 5%", "a%2Fb", "%25/", "plain"]:
        stored = storage_name(name)
        assert "/" not in stored and name_from_storage(stored) == name
    assert storage_name("plain") == "plain"


def test_cell_types_with_slash_round_trip_without_warning(tmp_path, osmfish_block, caplog):
    """'Microglia/Macrophage' stays the label in memory and after reading back; the h5ad file
    holds no '/' key, so anndata's next release (which refuses them) writes it too."""

    from spotlens.deconv import deconvolve

    st, ref = osmfish_block
    st, ref = st.copy(), ref.copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.rename_categories(
        {"Microglia-Macrophage": "Microglia/Macrophage"})
    deconvolve(st, ref, labels_key="cell_type", lambda_ridge=0.01, lambda_spatial=0.1,
               n_iter=5, progress=False)
    key = "proportions_spotlens"
    props = st.obsm[key]
    assert "Microglia/Macrophage" in props.columns  # the user's label, not a storage name
    st.uns["by_type"] = {"Microglia/Macrophage": {"T/NK": 1}, "plain": 2}
    path = tmp_path / "st.h5ad"
    caplog.clear()
    with warnings.catch_warnings(), ad.settings.override(disallow_forward_slash_in_h5ad=True), \
            caplog.at_level(logging.INFO, logger="spotlens"):
        warnings.simplefilter("error")  # FutureWarning included
        sio.write_h5ad(st, path)
        back = sio.read_spatial(path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert st.obsm[key] is props and "Microglia/Macrophage" in props.columns  # caller untouched
    pd.testing.assert_frame_equal(back.obsm[key], props)
    pd.testing.assert_frame_equal(back.obsm["abundance_spotlens"], st.obsm["abundance_spotlens"])
    assert list(back.uns[key]["cell_types"]) == list(props.columns)
    assert back.uns["by_type"] == {"Microglia/Macrophage": {"T/NK": 1}, "plain": 2}
    assert "spotlens_stored_names" not in back.uns
    with h5py.File(path, "r") as f:  # no nested group 'Microglia' holding 'Macrophage'
        assert "Microglia" not in f[f"obsm/{key}"]
        assert "Microglia%2FMacrophage" in f[f"obsm/{key}"]
    # plain anndata sees the storage names and the table that maps them back
    plain = ad.read_h5ad(path)
    assert "Microglia%2FMacrophage" in plain.obsm[key].columns
    assert "Microglia/Macrophage" in set(plain.uns["spotlens_stored_names"]["name"])
