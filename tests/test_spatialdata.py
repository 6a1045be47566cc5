"""SpatialData in and out (issue 18): the Visium HD fixture and a real pair round-trip.

Stores are built with spatialdata's own models (``ShapesModel``, ``TableModel``,
``Image2DModel``) the way spatialdata-io's readers lay them out, and written with
``SpatialData.write``: no hand-written Zarr.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

sd = pytest.importorskip("spatialdata", reason="spatialdata is an optional dependency: "
                                               "pip install 'spotlens[spatialdata]'")

from test_io import make_visium_hd, osmfish_block  # noqa: E402, F401 (a fixture)

import spotlens.io as sio  # noqa: E402
from spotlens import InputError  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")

# least squares with fixed penalties: the solver reaches the optimum to ~1e-8, so any
# difference between two runs comes from what was read
FIT = {"labels_key": "cell_type", "lambda_ridge": 0.01, "lambda_spatial": 0.1,
       "progress": False, "likelihood": "gaussian"}


def to_spatialdata(st, *, name: str, table: str, squares: bool, image: bool = True,
                   extra_tables: dict | None = None):
    """A SpatialData object as spatialdata-io lays out Visium (HD): shapes, table, image."""
    import geopandas as gpd
    import shapely
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    (library,) = st.uns["spatial"] if "spatial" in st.uns else ["x"]
    sf = st.uns["spatial"][library]["scalefactors"] if "spatial" in st.uns else {}
    xy = st.obsm["spatial"]
    diameter = sf.get("spot_diameter_fullres", 50.0)
    ids = np.arange(st.n_obs)
    if squares:  # Visium HD bins: square polygons, side = bin size in full-resolution px
        h = diameter / 2
        geometry = [shapely.box(x - h, y - h, x + h, y + h) for x, y in xy]
        frame = gpd.GeoDataFrame(geometry=geometry, index=ids)
    else:  # Visium spots: circles
        frame = gpd.GeoDataFrame({"radius": np.full(st.n_obs, diameter / 2)},
                                 geometry=shapely.points(xy), index=ids)
    shapes = ShapesModel.parse(frame, transformations={"global": Identity()})
    counts = st.copy()
    del counts.obsm["spatial"]
    counts.uns.pop("spatial", None)
    counts.obs["region"] = pd.Categorical([name] * st.n_obs)
    counts.obs["location_id"] = ids
    tables = {table: TableModel.parse(counts, region=name, region_key="region",
                                      instance_key="location_id")}
    tables.update(extra_tables or {})
    images = {}
    if image:
        hires = np.asarray(st.uns["spatial"][library]["images"]["hires"])
        pixels = np.moveaxis((np.clip(hires, 0, 1) * 255).astype(np.uint8)[..., :3], -1, 0)
        scalef = sf["tissue_hires_scalef"]
        images[f"{library}_hires_image"] = Image2DModel.parse(
            pixels, dims=("c", "y", "x"),
            transformations={"global": Scale([1 / scalef, 1 / scalef], axes=("y", "x"))})
    return sd.SpatialData(images=images, shapes={name: shapes}, tables=tables)


def write_store(sdata, path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")
        sdata.write(path)
    return path


@pytest.fixture()
def hd(tmp_path, osmfish_block):
    """The Visium HD fixture read by the Space Ranger reader, and the same bins as SpatialData."""
    st, ref = osmfish_block
    hd = sio.read_spatial(make_visium_hd(tmp_path, st, bin_sizes=(8,)), bin_size=8)
    sdata = to_spatialdata(hd, name="hd_sample_square_008um", table="square_008um",
                           squares=True)
    return hd, write_store(sdata, tmp_path / "hd_sample.zarr"), ref


def test_read_spatial_takes_a_visium_hd_store_like_the_space_ranger_folder(hd):
    direct, store, _ = hd
    st = sio.read_spatial(store)  # one table: chosen without arguments
    assert list(st.obs_names) == list(direct.obs_names)
    np.testing.assert_array_equal(st.X.toarray(), direct.X.toarray())
    # centroids of the square bins = the bin centres, in full-resolution px ("global")
    np.testing.assert_allclose(st.obsm["spatial"], direct.obsm["spatial"], rtol=1e-9)
    (library,) = st.uns["spatial"]
    assert library == "hd_sample_square_008um"
    sf = st.uns["spatial"][library]["scalefactors"]
    want = direct.uns["spatial"]["hd_sample"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(want["spot_diameter_fullres"])
    assert sf["tissue_hires_scalef"] == pytest.approx(want["tissue_hires_scalef"])
    assert st.uns["spatial"][library]["images"]["hires"].shape == (40, 60, 3)
    # the region annotation is kept, so results can annotate the same shapes
    assert st.uns["spatialdata_attrs"]["region"] == "hd_sample_square_008um"
    # a SpatialData object works as well as its path
    again = sio.read_spatial(sd.read_zarr(store), load_images=False)
    np.testing.assert_array_equal(again.obsm["spatial"], st.obsm["spatial"])
    assert not again.uns["spatial"][library]["images"]


def test_visium_hd_round_trip_gives_the_same_proportions(hd):
    """read -> deconvolve -> write -> read back with spatialdata: the proportions of the
    Space Ranger reader's run, in a table annotating the same bins."""
    from spotlens.deconv import deconvolve

    direct, store, ref = hd
    deconvolve(direct, ref, **FIT)
    st = sio.read_spatial(store)
    deconvolve(st, ref, **FIT)
    props = st.obsm["proportions_spotlens"]
    np.testing.assert_allclose(props.to_numpy(), direct.obsm["proportions_spotlens"].to_numpy(),
                               atol=1e-8)
    sio.write_spatialdata(st, store)

    back = sd.read_zarr(store)
    table = back.tables["proportions_spotlens"]
    assert list(table.var_names) == list(props.columns)
    np.testing.assert_array_equal(table.X, props.to_numpy())
    np.testing.assert_array_equal(table.layers["abundance"],
                                  st.obsm["abundance_spotlens"].to_numpy())
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "hd_sample_square_008um" and attrs["instance_key"] == "location_id"
    # every row names its bin: matched to the shapes, the proportions sit on the right bins
    shapes = back.shapes["hd_sample_square_008um"]
    centroids = shapes.loc[table.obs["location_id"].to_numpy()].geometry.centroid
    np.testing.assert_allclose(np.column_stack([centroids.x, centroids.y]),
                               direct.obsm["spatial"])
    assert table.obs["dominant_type"].tolist() == props.idxmax(axis=1).tolist()
    assert table.uns["spotlens"]["params"]["likelihood"] == "gaussian"
    assert "proportions_spotlens_zero_counts" in table.obs
    # the counts table is untouched, and spotlens reads the results table back the same
    assert "square_008um" in back.tables
    reread = sio.read_spatialdata(store, table_key="proportions_spotlens", load_images=False)
    np.testing.assert_array_equal(reread.X, props.to_numpy())
    np.testing.assert_allclose(reread.obsm["spatial"], direct.obsm["spatial"])

    # a second write needs overwrite=True, and then replaces the table
    with pytest.raises(InputError, match=r"already holds \['proportions_spotlens'\]"):
        sio.write_spatialdata(st, store)
    st.obsm["proportions_spotlens"] = props * 0 + 1 / props.shape[1]
    sio.write_spatialdata(st, store, overwrite=True)
    np.testing.assert_allclose(sd.read_zarr(store).tables["proportions_spotlens"].X,
                               1 / props.shape[1])


def test_write_spots_from_an_h5ad_and_the_cells_as_points(tmp_path, osmfish_block):
    """Spots without a region become circles; placed cells become points."""
    from spotlens.deconv import assign_cells, cell_level, deconvolve

    st, ref = osmfish_block
    st = st[:80].copy()
    deconvolve(st, ref, **FIT)
    cell_level(st, ref, progress=False)
    cells = assign_cells(st, ref)
    sdata = sd.SpatialData()
    sio.write_spatialdata(st, sdata, cells=cells)  # in memory: no store
    assert set(sdata.shapes) == {"proportions_spotlens_spots"}
    circles = sdata.shapes["proportions_spotlens_spots"]
    np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]),
                               st.obsm["spatial"])
    points = sdata.points["cells_spotlens"].compute()
    assert len(points) == cells.n_obs
    assert points["cell_type"].astype(str).tolist() == cells.obs["cell_type"].astype(str).tolist()
    path = write_store(sdata, tmp_path / "from_h5ad.zarr")
    back = sio.read_spatialdata(path, table_key="proportions_spotlens")
    np.testing.assert_allclose(back.obsm["spatial"], st.obsm["spatial"])
    np.testing.assert_array_equal(back.X, st.obsm["proportions_spotlens"].to_numpy())


def test_table_choice_and_bad_input_say_what_to_pass(tmp_path, osmfish_block):
    from spatialdata.models import TableModel

    st, _ = osmfish_block
    st = st[:30].copy()
    st.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 50.0}}}
    loose = TableModel.parse(st.copy())  # annotates no region
    other = to_spatialdata(st, name="spots", table="table", squares=False, image=False)
    sdata = to_spatialdata(st, name="spots", table="counts", squares=False, image=False,
                           extra_tables={"more": other.tables["table"].copy(), "loose": loose})
    with pytest.raises(InputError, match=r"several tables \(\['counts', 'more', 'loose'\]\); "
                                         r"pass table_key"):
        sio.read_spatialdata(sdata)
    with pytest.raises(InputError, match="no table 'nope'"):
        sio.read_spatialdata(sdata, table_key="nope")
    with pytest.raises(InputError, match="annotates no region"):
        sio.read_spatialdata(sdata, table_key="loose")
    with pytest.raises(InputError, match="No table of 8 µm bins"):
        sio.read_spatialdata(sdata, bin_size=8)
    with pytest.raises(InputError, match="not in coordinate system 'aligned'"):
        sio.read_spatialdata(sdata, table_key="counts", coordinate_system="aligned")
    got = sio.read_spatialdata(sdata, table_key="counts")
    np.testing.assert_allclose(got.obsm["spatial"], st.obsm["spatial"])
    assert got.uns["spatial"]["spots"]["scalefactors"]["spot_diameter_fullres"] == 50.0
    with pytest.raises(InputError, match="does not exist"):
        sio.read_spatialdata(tmp_path / "missing.zarr")
    with pytest.raises(InputError, match="Nothing to write"):
        sio.write_spatialdata(st, sdata)


def test_repeated_gene_names_are_made_unique_with_a_warning(tmp_path, osmfish_block, caplog):
    """As read_spatial does for an .h5ad: NAME-1, NAME-2, ... and a warning naming them."""
    import logging

    st, _ = osmfish_block
    st = st[:30].copy()
    st.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 50.0}}}
    genes = list(st.var_names)
    genes[1] = genes[2] = genes[3] = genes[0]  # one symbol four times (10x matrices repeat some)
    genes[5] = genes[4]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        st.var_names = genes
        sdata = to_spatialdata(st, name="spots", table="table", squares=False, image=False)
        store = write_store(sdata, tmp_path / "dup.zarr")
    with caplog.at_level(logging.WARNING, logger="spotlens"):
        got = sio.read_spatial(store)
    assert got.var_names.is_unique
    assert list(got.var_names[:6]) == [genes[0], f"{genes[0]}-1", f"{genes[0]}-2",
                                       f"{genes[0]}-3", genes[4], f"{genes[4]}-1"]
    assert list(got.var_names[6:]) == genes[6:]
    np.testing.assert_array_equal(np.asarray(got.X.todense() if hasattr(got.X, "todense")
                                             else got.X),
                                  np.asarray(st.X.todense() if hasattr(st.X, "todense")
                                             else st.X))  # columns kept, in order
    (warned,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned.startswith("dup.zarr, table 'table': 2 gene names occur more than once")
    assert "the 4 repeats were renamed NAME-1" in warned and genes[0] in warned
    # an object in memory (never written): the same renaming; its table is left as it is
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        fresh = to_spatialdata(st, name="spots", table="table", squares=False, image=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spotlens"):
        again = sio.read_spatialdata(fresh)
    assert list(again.var_names) == list(got.var_names)
    assert list(fresh.tables["table"].var_names) == genes
    assert "SpatialData, table 'table': 2 gene names" in caplog.text


def test_cli_deconvolve_reads_a_store(hd, tmp_path):
    from typer.testing import CliRunner

    from spotlens.cli import app

    direct, store, ref = hd
    ref.write_h5ad(tmp_path / "ref.h5ad")
    base = ["deconvolve", "-s", str(store), "-r", str(tmp_path / "ref.h5ad"),
            "--lambda-ridge", "0.01", "--lambda-spatial", "0.1", "--likelihood", "gaussian",
            "--no-progress", "-q"]
    res = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "out"), "--table",
                                   "square_008um", "--write-spatialdata", "--report"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "out" / "proportions.csv", index_col=0)
    assert list(table.index) == list(direct.obs_names)
    np.testing.assert_allclose(table.sum(axis=1), 1.0, atol=1e-6)
    assert (tmp_path / "out" / "report.html").is_file()
    written = sd.read_zarr(store).tables["proportions_spotlens"]
    np.testing.assert_allclose(written.X, table.to_numpy(), atol=1e-12)
    # a second run into the store needs --overwrite; an .h5ad input cannot be written back
    res = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "out2"), "--write-spatialdata"])
    assert res.exit_code == 2 and "already holds ['proportions_spotlens']" in res.output
    assert not (tmp_path / "out2").exists()
    direct.write_h5ad(tmp_path / "hd.h5ad")
    res = CliRunner().invoke(app, [*base[:2], str(tmp_path / "hd.h5ad"), *base[3:], "-o",
                                   str(tmp_path / "out3"), "--write-spatialdata"])
    assert res.exit_code == 2 and "is not one (.zarr)" in res.output


@pytest.mark.slow
def test_a_real_pair_round_trips(tmp_path):
    """Human lymph node Visium (1,000 spots) as a SpatialData store: same proportions."""
    from spotlens.datasets import load_pair
    from spotlens.datasets._pairs import default_data_dir
    from spotlens.deconv import deconvolve

    data = default_data_dir()
    if data is None or not (data / "spacexr_lymphnode_visium").is_dir():
        pytest.skip("the shared data folder (../shared/data or $SPOTLENS_DATA) with "
                    "spacexr_lymphnode_visium is not here")
    st, ref = load_pair("spacexr_lymphnode_visium", data)
    store = write_store(to_spatialdata(st, name="lymph_node", table="table", squares=False,
                                       image=False), tmp_path / "lymph_node.zarr")
    kwargs = {"labels_key": "cell_type", "progress": False, "lambda_ridge": 0.01,
              "lambda_spatial": 0.1, "likelihood": "gaussian"}
    deconvolve(st, ref, **kwargs)
    read = sio.read_spatial(store)
    np.testing.assert_allclose(read.obsm["spatial"], st.obsm["spatial"])
    deconvolve(read, ref, **kwargs)
    sio.write_spatialdata(read, store)
    table = sd.read_zarr(store).tables["proportions_spotlens"]
    np.testing.assert_allclose(table.X, st.obsm["proportions_spotlens"].to_numpy(), atol=1e-8)
    assert list(table.obs_names) == list(st.obs_names)
