"""spotlens.io: Space Ranger and h5ad readers, atomic writers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import spotlens.io as sio
from spotlens._validation import InputError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "spacexr_cerebellum_slideseq"

# spot barcode -> (pxl_row_in_fullres, pxl_col_in_fullres), i.e. (y, x)
PIXELS = {"AAAC-1": (100, 2000), "AAAG-1": (150, 2050), "AACT-1": (200, 2100)}
GENES = ["Gapdh", "Actb", "Actb", "Mbp"]  # a repeated symbol, as in real 10x references
COUNTS = np.array([[5, 0, 1, 2, 7], [0, 3, 0, 1, 9], [2, 2, 4, 0, 1]])  # spots × features


def make_spaceranger(root: Path, *, legacy_positions: bool = False) -> Path:
    """Write a minimal Space Ranger outs/ folder (10x v3 HDF5 matrix + spatial/)."""
    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True)
    barcodes = list(PIXELS)
    names = [*GENES, "CD3"]  # the last feature is an antibody, not a gene
    types = ["Gene Expression"] * len(GENES) + ["Antibody Capture"]
    m = sparse.csc_matrix(COUNTS.T)  # 10x stores features × barcodes, compressed by barcode
    with h5py.File(outs / "filtered_feature_bc_matrix.h5", "w") as f:
        f.attrs["library_ids"] = np.array([b"section1"])
        f.attrs["chemistry_description"] = "Spatial 3' v1"
        f.attrs["software_version"] = "spaceranger-2.1.0"
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
def deconvolved():
    if not (DATA / "spatial.h5ad").exists():
        pytest.skip(f"real test data not found at {DATA}")
    from spotlens.deconv import deconvolve

    st = ad.read_h5ad(DATA / "spatial.h5ad")
    ref = ad.read_h5ad(DATA / "sc_reference.h5ad")
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
