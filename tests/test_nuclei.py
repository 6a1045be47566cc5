"""Nucleus segmentation: stitching, geometry, spots, eye-counted real tiles, back-ends, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from spotlens._validation import InputError
from spotlens.cli import app
from spotlens.histology import (
    NucleusConfig,
    count_nuclei,
    nuclei_overlay,
    segment_nuclei,
    segment_tile,
)
from spotlens.io import SlideImage

DATA = Path(__file__).parent / "data" / "nuclei"
with open(DATA / "counts.json", encoding="utf-8") as _f:
    EYE_COUNTS = json.load(_f)

BACKGROUND = (236, 226, 234)  # glass/pale stroma: haematoxylin OD ≈ 0.007
NUCLEUS = (70, 50, 140)  # haematoxylin OD ≈ 0.14


def draw(shape, discs, *, ellipses=()):
    """Synthetic H&E: ``discs`` = [(x, y, r)] and ``ellipses`` = [(x, y, a, b)] (axis-aligned,
    ``a`` along x) in nucleus colour on a pale background."""
    image = np.empty((*shape, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for x, y, r in discs:
        image[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] = NUCLEUS
    for x, y, a, b in ellipses:
        image[((xx - x) / a) ** 2 + ((yy - y) / b) ** 2 <= 1] = NUCLEUS
    return image


def grid_discs(shape, step, r, rng, jitter=5):
    """Discs on a jittered grid at multiples of ``step``: with ``step`` dividing 256, a column
    and a row of them lie across each tile border (multiples of 256)."""
    out = []
    for y in range(step, shape[0] - r - jitter, step):
        for x in range(step, shape[1] - r - jitter, step):
            out.append((x + rng.integers(-jitter, jitter + 1),
                        y + rng.integers(-jitter, jitter + 1), r))
    return out


def spots_adata(centres, diameter, *, mpp=None):
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(len(centres))]))
    adata.obsm["spatial"] = np.asarray(centres, dtype=float)
    scalefactors = {"spot_diameter_fullres": float(diameter)}
    metadata = {} if mpp is None else {"microns_per_pixel_est": mpp}
    adata.uns["spatial"] = {"lib": {"scalefactors": scalefactors, "metadata": metadata}}
    return adata


# --- stitching ------------------------------------------------------------------------------


def test_a_nucleus_on_a_tile_corner_is_counted_once():
    # tiles of 256 px: the disc sits on the corner of four tiles
    image = draw((512, 512), [(256, 256, 9)])
    nuclei = segment_nuclei(image, mpp=0.5, tile_size=256, tissue=False)
    assert nuclei.n_obs == 1
    np.testing.assert_allclose(nuclei.obsm["spatial"][0], [256, 256], atol=0.05)
    assert nuclei.uns["nuclei"]["params"]["n_tiles"] == 4


def test_tiled_result_equals_untiled():
    discs = grid_discs((600, 700), 32, 7, np.random.default_rng(0), jitter=2)  # x or y = 256, 512: on borders
    image = draw((600, 700), discs)
    whole = segment_nuclei(image, mpp=0.5, tile_size=1024, tissue=False, return_labels=True)
    tiled = segment_nuclei(image, mpp=0.5, tile_size=256, tissue=False, return_labels=True)
    assert whole.uns["nuclei"]["params"]["n_tiles"] == 1
    assert tiled.uns["nuclei"]["params"]["n_tiles"] == 9
    assert whole.n_obs == tiled.n_obs == len(discs)
    pd.testing.assert_frame_equal(whole.obs, tiled.obs)
    np.testing.assert_array_equal(whole.uns["nuclei"]["labels"], tiled.uns["nuclei"]["labels"])


def test_labels_match_the_table():
    image = draw((200, 260), [(40, 50, 8), (150, 60, 10), (100, 150, 7)])
    nuclei = segment_nuclei(image, mpp=0.5, return_labels=True)
    labels = nuclei.uns["nuclei"]["labels"]
    assert labels.dtype == np.int32 and labels.shape == image.shape[:2]
    for k in range(1, nuclei.n_obs + 1):
        rows, cols = np.nonzero(labels == k)
        row = nuclei.obs.iloc[k - 1]
        assert len(rows) == row["area_px"]
        np.testing.assert_allclose([cols.mean(), rows.mean()], [row["x_px"], row["y_px"]])


def test_only_tissue_tiles_are_segmented():
    rng = np.random.default_rng(1)
    image = draw((1024, 1024), [])
    # a textured "tissue" block in one corner, nuclei inside it
    tissue = rng.integers(150, 200, size=(400, 400, 3)).astype(np.uint8)
    tissue[..., 1] -= 60
    image[:400, :400] = tissue
    image[:400, :400] = np.where(draw((400, 400), grid_discs((400, 400), 48, 8, rng)) ==
                                 NUCLEUS, NUCLEUS, image[:400, :400])
    on = segment_nuclei(image, mpp=0.5, tile_size=256, tissue=True)
    off = segment_nuclei(image, mpp=0.5, tile_size=256, tissue=False)
    assert on.uns["nuclei"]["params"]["n_tiles_segmented"] < 16
    assert off.uns["nuclei"]["params"]["n_tiles_segmented"] == 16
    pd.testing.assert_frame_equal(on.obs, off.obs)


@pytest.mark.slow  # starts worker processes (≈ 5 s)
def test_parallel_processes_equal_one_process():
    image = draw((600, 600), grid_discs((600, 600), 32, 7, np.random.default_rng(2)))
    one = segment_nuclei(image, mpp=0.5, tile_size=256, tissue=False, n_jobs=1)
    two = segment_nuclei(image, mpp=0.5, tile_size=256, tissue=False, n_jobs=2)
    pd.testing.assert_frame_equal(one.obs, two.obs)


@pytest.mark.slow
def test_dask_equals_local(thread_client, tmp_path):
    image = draw((600, 600), grid_discs((600, 600), 32, 7, np.random.default_rng(3)))
    local = segment_nuclei(image, mpp=0.5, tile_size=256, tissue=False)
    on_array = segment_nuclei(image, mpp=0.5, tile_size=256, tissue=False,
                              client=thread_client)
    path = tmp_path / "synthetic.png"
    Image.fromarray(image).save(path)  # workers read their tiles from the file
    on_file = segment_nuclei(str(path), mpp=0.5, tile_size=256, tissue=False,
                             client=thread_client)
    pd.testing.assert_frame_equal(local.obs, on_array.obs)
    pd.testing.assert_frame_equal(local.obs, on_file.obs)


# --- geometry -------------------------------------------------------------------------------


@pytest.mark.parametrize("mpp", [0.25, 0.5])
def test_disc_geometry_in_px_and_um(mpp):
    r_um = 4.0  # a nucleus of 8 µm diameter
    r = r_um / mpp
    x, y = 61.3, 47.0
    nuclei = segment_nuclei(draw((120, 130), [(x, y, r)]), mpp=mpp)
    assert nuclei.n_obs == 1
    row = nuclei.obs.iloc[0]
    np.testing.assert_allclose([row["x_px"], row["y_px"]], [x, y], atol=0.5)
    np.testing.assert_allclose([row["x_um"], row["y_um"]], [row["x_px"] * mpp,
                                                            row["y_px"] * mpp])
    assert row["area_um2"] == pytest.approx(row["area_px"] * mpp**2)
    assert row["area_um2"] == pytest.approx(np.pi * r_um**2, rel=0.1)
    assert row["perimeter_um"] == pytest.approx(2 * np.pi * r_um, rel=0.1)
    assert row["eccentricity"] < 0.5  # a digitised circle; a 2:1 ellipse has 0.87
    assert 0.85 < row["solidity"] <= 1.0
    assert row["hematoxylin"] > 0.1  # the nucleus colour's OD is 0.14


def test_ellipse_eccentricity():
    nuclei = segment_nuclei(draw((100, 120), [], ellipses=[(60, 50, 14, 7)]), mpp=0.5)
    assert nuclei.n_obs == 1
    assert nuclei.obs["eccentricity"].iloc[0] == pytest.approx(np.sqrt(1 - 0.25), abs=0.05)


def test_size_filter_is_in_square_micrometres():
    # a disc of ≈ 28 µm² at both scales
    for mpp in (0.25, 0.5):
        image = draw((100, 100), [(50, 50, 3.0 / mpp)])
        assert segment_nuclei(image, mpp=mpp).n_obs == 1
        small = NucleusConfig(min_area_um2=40.0)
        assert segment_nuclei(image, mpp=mpp, config=small).n_obs == 0


def test_touching_nuclei_are_split():
    image = draw((80, 100), [(38, 40, 8), (54, 40, 8)])  # overlapping by 2 px
    assert segment_tile(image, mpp=0.5).max() == 2


# --- spots ----------------------------------------------------------------------------------


def test_nuclei_are_assigned_to_the_spot_around_them():
    image = draw((200, 300), [(60, 100, 6), (75, 110, 6), (240, 100, 6), (150, 30, 6)])
    spots = spots_adata([(65, 100), (240, 100)], diameter=60, mpp=0.5)
    before = spots.copy()
    nuclei = segment_nuclei(image, adata=spots)  # µm/px from the spots' metadata
    assert nuclei.uns["nuclei"]["params"]["mpp"] == 0.5
    assert spots.obs.equals(before.obs) and spots.uns.keys() == before.uns.keys()
    found = dict(zip(map(tuple, np.round(nuclei.obsm["spatial"]).astype(int)),
                     nuclei.obs["spot"], strict=True))
    assert found[(60, 100)] == "s0" and found[(75, 110)] == "s0"
    assert found[(240, 100)] == "s1" and pd.isna(found[(150, 30)])

    counts = count_nuclei(spots, nuclei, inplace=False)
    assert counts.to_dict() == {"s0": 2, "s1": 1}
    assert "n_nuclei" not in spots.obs  # inplace=False changes nothing
    assert count_nuclei(spots, nuclei) is None
    assert list(spots.obs.columns) == ["n_nuclei"]  # the one documented key
    assert spots.obs["n_nuclei"].tolist() == [2, 1]


def test_count_nuclei_needs_assigned_nuclei():
    nuclei = segment_nuclei(draw((64, 64), [(32, 32, 6)]), mpp=0.5)
    with pytest.raises(InputError, match="segment_nuclei\\(image, adata=adata\\)"):
        count_nuclei(spots_adata([(32, 32)], 20), nuclei)


# --- real H&E counted by eye ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EYE_COUNTS))
def test_counts_on_real_tiles_are_within_20_percent_of_the_eye(name):
    entry = EYE_COUNTS[name]
    tile = np.asarray(Image.open(DATA / f"{name}.png").convert("RGB"))
    n = segment_nuclei(tile, mpp=entry["mpp"]).n_obs
    assert abs(n / entry["eye_count"] - 1) <= 0.2, (n, entry["eye_count"])


def test_eye_count_points_agree_with_the_counts():
    for name, entry in EYE_COUNTS.items():
        points = pd.read_csv(DATA / f"{name}_points.csv")
        assert len(points) == entry["eye_count"]
        assert points.to_numpy().min() >= 0 and points.to_numpy().max() < entry["size"]


# --- back-ends ------------------------------------------------------------------------------


class FakeCellpose:
    """Stands in for cellpose.models.CellposeModel: eval(img, diameter, channels)."""

    def __init__(self):
        self.calls = []

    def eval(self, image, diameter=None, channels=None):
        self.calls.append((image.shape, diameter, channels))
        return segment_tile(image, mpp=0.5), None, None


class FakeStarDist:
    """Stands in for stardist.models.StarDist2D: predict_instances(img) -> (labels, details)."""

    def __init__(self):
        self.ranges = []

    def predict_instances(self, image):
        self.ranges.append((float(image.min()), float(image.max())))
        labels = segment_tile((np.clip(image, 0, 1) * 255).astype(np.uint8), mpp=0.5)
        return labels, {}


def test_cellpose_adapter_with_a_stand_in_model():
    image = draw((300, 300), [(60, 60, 8), (200, 150, 9), (256, 256, 3)])  # last: < 12 µm²
    model = FakeCellpose()
    nuclei = segment_nuclei(image, mpp=0.5, backend="cellpose", model=model, tissue=False,
                            tile_size=256)
    assert nuclei.n_obs == 2  # the size filter applies to every back-end
    assert all(d == pytest.approx(8.0 / 0.5) and c == [0, 0] for _, d, c in model.calls)
    assert nuclei.uns["nuclei"]["params"]["backend"] == "cellpose"


def test_stardist_adapter_with_a_stand_in_model():
    image = draw((200, 200), [(60, 60, 8), (140, 120, 9)])
    model = FakeStarDist()
    nuclei = segment_nuclei(image, mpp=0.5, backend="stardist", model=model)
    assert nuclei.n_obs == 2
    low, high = model.ranges[0]
    assert 0.0 <= low < 0.3 and 0.9 < high <= 1.0  # RGB / 255


def test_backend_errors_name_the_fix(tmp_path, monkeypatch):
    image = draw((64, 64), [(32, 32, 6)])
    with pytest.raises(InputError, match="needs model=.*backend='classical'"):
        segment_nuclei(image, mpp=0.5, backend="cellpose")
    with pytest.raises(InputError, match="do not exist"):
        segment_nuclei(image, mpp=0.5, backend="cellpose", model=tmp_path / "missing.pth")
    weights = tmp_path / "nuclei.pth"
    weights.write_bytes(b"not really weights")
    monkeypatch.setitem(__import__("sys").modules, "cellpose", None)  # not installed
    with pytest.raises(InputError, match="pip install cellpose"):
        segment_nuclei(image, mpp=0.5, backend="cellpose", model=weights)
    with pytest.raises(InputError, match="predict_instances"):
        segment_nuclei(image, mpp=0.5, backend="stardist", model=object())
    with pytest.raises(InputError, match="backend must be one of"):
        segment_nuclei(image, mpp=0.5, backend="unet")
    with pytest.raises(InputError, match="classical back-end only"):
        segment_nuclei(image, mpp=0.5, backend="cellpose", model=FakeCellpose(),
                       client="default")


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mpp": None}, "needs the image scale.*pass mpp="),
        ({"mpp": -1.0}, "mpp must be a positive number"),
        ({"tile_size": 64}, "tile_size=64 px is smaller than the halo"),
        ({"halo_px": 5}, "halo_px=5 is narrower than the largest nucleus"),
        ({"n_jobs": 0}, "n_jobs must be"),
        ({"config": {"min_area_um2": 5}}, "config must be a NucleusConfig"),
        ({"adata": "spots.h5ad"}, "adata must be an AnnData"),
    ],
)
def test_bad_input_names_the_problem_and_the_fix(kwargs, message):
    image = draw((128, 128), [(64, 64, 6)])
    kwargs = {"mpp": 0.5, **kwargs}
    with pytest.raises(InputError, match=message):
        segment_nuclei(image, **kwargs)


def test_bad_images_and_settings():
    with pytest.raises(InputError, match="float64"):
        segment_nuclei(np.zeros((64, 64, 3)), mpp=0.5)
    with pytest.raises(InputError, match="uint8 RGB"):
        segment_tile(np.zeros((64, 64, 3), dtype=np.float32), mpp=0.5)
    with pytest.raises(InputError, match="height × width × 3"):
        segment_tile(np.zeros((64, 64), dtype=np.uint8), mpp=0.5)
    with pytest.raises(InputError, match="must be below max_area_um2"):
        NucleusConfig(min_area_um2=500)
    with pytest.raises(InputError, match="block_um must be a finite number > 0"):
        NucleusConfig(block_um=0)
    spots = spots_adata([(10, 10)], 20)
    del spots.uns["spatial"]["lib"]["scalefactors"]["spot_diameter_fullres"]
    with pytest.raises(InputError, match="spot_diameter_fullres"):
        segment_nuclei(draw((64, 64), []), mpp=0.5, adata=spots)


def test_inputs_are_not_modified():
    image = draw((128, 128), [(64, 64, 6)])
    copy = image.copy()
    slide = SlideImage.from_array(image, mpp=0.5)
    segment_nuclei(slide, return_labels=True)
    segment_tile(image, mpp=0.5)
    np.testing.assert_array_equal(image, copy)


# --- overlay and command line ---------------------------------------------------------------


def test_overlay_draws_outlines_and_spots():
    image = draw((200, 200), [(60, 60, 8), (140, 140, 8)])
    spots = spots_adata([(60, 60)], diameter=50, mpp=0.5)
    nuclei = segment_nuclei(image, adata=spots)
    picture = nuclei_overlay(nuclei, image=image, adata=spots, size_px=200)
    assert picture.shape == (200, 200, 3) and picture.dtype == np.uint8
    outline = np.all(picture == (0, 230, 0), axis=-1)
    assert outline[60, 52] and outline[140, 148] and not outline[60, 60]
    assert np.all(picture[60, 60 - 25 + 1] == (255, 200, 0))  # on the spot circle
    stored = segment_nuclei(image, adata=spots, return_labels=True)  # from the labels
    np.testing.assert_array_equal(
        nuclei_overlay(stored, image=image, adata=spots, size_px=200), picture)


runner = CliRunner()


def test_cli_segment_writes_nuclei_counts_and_overlay(tmp_path):
    image = draw((300, 300), [(60, 60, 8), (80, 70, 8), (220, 220, 8), (150, 20, 8)])
    Image.fromarray(image).save(tmp_path / "slide.png")
    spots_adata([(70, 65), (220, 220)], diameter=60, mpp=0.5).write_h5ad(tmp_path / "s.h5ad")
    out = tmp_path / "out"
    result = runner.invoke(app, ["histology", "segment", str(tmp_path / "slide.png"), "-s",
                                 str(tmp_path / "s.h5ad"), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"nuclei.h5ad", "nuclei_per_spot.csv",
                                               "nuclei_overlay.png", "spotlens_run.json"}
    nuclei = ad.read_h5ad(out / "nuclei.h5ad")
    assert nuclei.n_obs == 4 and nuclei.uns["nuclei"]["params"]["mpp"] == 0.5
    table = pd.read_csv(out / "nuclei_per_spot.csv", index_col=0)
    assert table["n_nuclei"].to_dict() == {"s0": 2, "s1": 1}
    manifest = json.loads((out / "spotlens_run.json").read_text())
    assert manifest["complete"] is True


def test_cli_segment_bad_input_exits_2(tmp_path):
    Image.fromarray(draw((64, 64), [(32, 32, 6)])).save(tmp_path / "slide.png")
    result = runner.invoke(app, ["histology", "segment", str(tmp_path / "slide.png"), "-o",
                                 str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2
    assert "--mpp" in result.stderr
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder
