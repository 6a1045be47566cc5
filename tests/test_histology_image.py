"""Image layer of spotlens.histology: reading, spot tiles, tissue detection, stain normalisation."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from spotlens._validation import InputError
from spotlens.histology import (
    SlideImage,
    StainReference,
    fit_macenko,
    grid_spots,
    macenko_normalize,
    read_image,
    spot_tiles,
    tile_geometry,
    tissue_mask,
)
from spotlens.histology._tissue import tissue_mask_kernel

tifffile = pytest.importorskip("tifffile")

HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"

# Beer–Lambert optical-density vectors (RGB) of haematoxylin and eosin, and shifted versions
H_OD = np.array([0.65, 0.70, 0.29]) / np.linalg.norm([0.65, 0.70, 0.29])
E_OD = np.array([0.07, 0.99, 0.11]) / np.linalg.norm([0.07, 0.99, 0.11])
H_SHIFT = np.array([0.45, 0.80, 0.40]) / np.linalg.norm([0.45, 0.80, 0.40])
E_SHIFT = np.array([0.20, 0.90, 0.38]) / np.linalg.norm([0.20, 0.90, 0.38])


def _render(c_h, c_e, h=H_OD, e=E_OD, background=240.0):
    """RGB uint8 from stain concentrations (Beer–Lambert, I0 = background)."""
    od = c_h[..., None] * h + c_e[..., None] * e
    return np.clip(np.rint(background * np.exp(-od)), 0, 255).astype(np.uint8)


def _concentrations(shape, rng):
    """Per-pixel H/E mixtures from nearly pure H to nearly pure E."""
    frac = rng.beta(0.5, 0.5, size=shape)
    total = rng.uniform(0.4, 1.6, size=shape)
    return 1.4 * frac * total, (1 - frac) * total


def _spots(coords, *, diameter=None, library="lib", metadata=None, names=None):
    coords = np.asarray(coords, dtype=float)
    names = names or [f"s{i}" for i in range(len(coords))]
    adata = ad.AnnData(
        X=np.zeros((len(coords), 1), dtype=np.float32),
        obs=pd.DataFrame(index=names), var=pd.DataFrame(index=["g"]),
    )
    adata.obsm["spatial"] = coords
    scalefactors = {} if diameter is None else {"spot_diameter_fullres": float(diameter)}
    adata.uns["spatial"] = {library: {"scalefactors": scalefactors, "metadata": metadata or {}}}
    return adata


def _dots(shape, centres, radius):
    """White image with a red disc of ``radius`` px around each integer centre (x, y)."""
    img = np.full((*shape, 3), 255, dtype=np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for x, y in centres:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = (255, 0, 0)
    return img


def _red_centroid(tile):
    red = (tile[..., 0].astype(int) - tile[..., 1]) > 100
    yy, xx = np.nonzero(red)
    return xx.mean(), yy.mean(), red


# --- reading ---------------------------------------------------------------------------------


def test_read_region_equals_slice_and_pads_white():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    img = SlideImage.from_array(array, mpp=0.5)
    assert img.shape == (90, 120) and img.mpp == 0.5
    np.testing.assert_array_equal(img.read_region(10, 20, 30, 40), array[20:60, 10:40])
    region = img.read_region(-5, 80, 20, 15)  # sticks out left and bottom
    assert region.shape == (15, 20, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region[:10, 5:], array[80:90, 0:15])
    assert (region[:, :5] == 255).all() and (region[10:] == 255).all()
    assert (img.read_region(500, 500, 4, 4) == 255).all()


def test_png_decoded_once_and_equal(tmp_path):
    array = np.random.default_rng(1).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "he.png")
    img = read_image(tmp_path / "he.png")
    assert img.shape == (50, 70) and img.mpp is None
    np.testing.assert_array_equal(img.read_region(0, 0, 70, 50), array)
    decoded = img._source.array
    img.read_region(3, 4, 5, 6)
    assert img._source.array is decoded  # cached, not decoded again
    assert read_image(tmp_path / "he.png", mpp=0.25).mpp == 0.25


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tile": (32, 32), "compression": "zlib"},  # tiled, read tile by tile
        {"rowsperstrip": 7, "compression": "zlib"},  # strips
        {},  # uncompressed: memory-mapped
    ],
)
def test_tiff_round_trip_with_resolution(tmp_path, kwargs):
    array = np.random.default_rng(2).integers(0, 256, size=(100, 130, 3), dtype=np.uint8)
    path = tmp_path / "he.tif"
    # 0.5 µm/px = 20,000 px per cm
    tifffile.imwrite(path, array, resolution=(2e4, 2e4), resolutionunit="CENTIMETER", **kwargs)
    img = read_image(path)
    assert img.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(img.read_region(0, 0, 130, 100), array)
    np.testing.assert_array_equal(img.read_region(33, 61, 50, 20), array[61:81, 33:83])
    assert read_image(path, mpp=0.3).mpp == 0.3  # the argument wins


def test_tiff_without_scale_and_pyramid_thumbnail(tmp_path):
    array = np.random.default_rng(3).integers(0, 256, size=(128, 96, 3), dtype=np.uint8)
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:  # 72 dpi = no microscope scale
        tw.write(array, subifds=1, tile=(32, 32), resolution=(72, 72), photometric="rgb")
        tw.write(array[::2, ::2], subfiletype=1, tile=(32, 32), photometric="rgb")
    img = read_image(path)
    assert img.mpp is None
    thumb, scale = img.thumbnail(64)
    assert thumb.shape == (64, 48, 3) and scale == pytest.approx(0.5)


def test_thumbnail_box_average():
    array = np.zeros((100, 60, 3), dtype=np.uint8)
    array[:10, :10] = 200
    thumb, scale = SlideImage.from_array(array).thumbnail(10)
    assert thumb.shape == (10, 6, 3) and scale == pytest.approx(0.1)
    assert thumb[0, 0, 0] == 200 and thumb[1, 1, 0] == 0


# --- tiles -----------------------------------------------------------------------------------


def test_tiles_centred_on_spots():
    centres = [(40, 50), (120, 47), (81, 130), (161, 101)]
    img = SlideImage.from_array(_dots((180, 200), centres, radius=5))  # 10-px dots
    adata = _spots(centres, diameter=30)
    for out_px in (30, 64):
        tiles = spot_tiles(adata, img, out_px=out_px)
        assert tiles.shape == (4, out_px, out_px, 3) and tiles.dtype == np.uint8
        for tile in tiles:
            cx, cy, _ = _red_centroid(tile)
            assert cx == pytest.approx((out_px - 1) / 2, abs=0.3)
            assert cy == pytest.approx((out_px - 1) / 2, abs=0.3)


def test_tile_side_in_micrometres():
    # a 30 × 30 px red square at 0.5 µm/px is 15 µm wide; a 30 µm tile is 60 px: half of it
    array = np.full((200, 200, 3), 255, dtype=np.uint8)
    array[85:115, 85:115] = (255, 0, 0)
    img = SlideImage.from_array(array, mpp=0.5)
    adata = _spots([(99.5, 99.5)], diameter=40)
    geometry = tile_geometry(adata, image=img, tile_um=30)
    assert geometry.side_px == pytest.approx(60) and geometry.mpp_source == "image"
    tile = spot_tiles(adata, img, tile_um=30, out_px=64)[0]
    _, _, red = _red_centroid(tile)
    assert red.any(axis=0).sum() == pytest.approx(32, abs=1)
    assert red.any(axis=1).sum() == pytest.approx(32, abs=1)
    # default tile = one spot diameter (px), and its size in µm when mpp is known
    default = tile_geometry(adata, image=img)
    assert default.side_px == 40 and default.tile_um == pytest.approx(20)
    # mpp from the argument beats the image's; mpp from the scale factors when nothing else
    assert tile_geometry(adata, image=img, tile_um=30, mpp=1.0).side_px == pytest.approx(30)
    adata.uns["spatial"]["lib"]["scalefactors"]["microns_per_pixel"] = 0.25
    geometry = tile_geometry(adata, tile_um=30)
    assert geometry.side_px == pytest.approx(120) and geometry.mpp_source == "scalefactors"


def test_border_tile_is_padded():
    rng = np.random.default_rng(4)
    array = rng.integers(0, 200, size=(60, 80, 3), dtype=np.uint8)
    img = SlideImage.from_array(array)
    adata = _spots([(5, 7), (78, 58)], diameter=21)
    tiles = spot_tiles(adata, img, out_px=21)  # odd side, same size: an exact copy
    np.testing.assert_array_equal(tiles[0], img.read_region(5 - 10, 7 - 10, 21, 21))
    np.testing.assert_array_equal(tiles[0][3:, 5:], array[0:18, 0:16])
    assert (tiles[0][:3] == 255).all() and (tiles[0][:, :5] == 255).all()
    assert (tiles[1][12:] == 255).all() and (tiles[1][:, 12:] == 255).all()


def test_spot_tiles_leaves_adata_alone():
    adata = _spots([(20, 20)], diameter=10)
    before = adata.copy()
    spot_tiles(adata, np.full((40, 40, 3), 128, np.uint8), out_px=8)
    assert adata.uns["spatial"]["lib"]["scalefactors"] == before.uns["spatial"]["lib"][
        "scalefactors"]
    np.testing.assert_array_equal(adata.obsm["spatial"], before.obsm["spatial"])
    assert list(adata.obsm) == ["spatial"] and list(adata.obs.columns) == []


# --- tissue and grid -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob_slide():
    """An 800 × 600 px slide: H&E ellipse with a hole, a dust speck, grey noisy glass."""
    rng = np.random.default_rng(5)
    height, width = 600, 800
    yy, xx = np.mgrid[:height, :width]
    blob = ((xx - 400) / 250) ** 2 + ((yy - 300) / 150) ** 2 <= 1
    hole = (xx - 450) ** 2 + (yy - 300) ** 2 <= 20**2
    c_h, c_e = _concentrations((height, width), rng)
    tissue = blob & ~hole
    image = _render(c_h * tissue, c_e * tissue)
    glass = ~tissue
    image[glass] = np.clip(238 + rng.normal(0, 3, size=(glass.sum(), 1)), 0, 255).astype(np.uint8)
    image[40:52, 40:52] = _render(np.full((12, 12), 1.0), np.full((12, 12), 0.5))  # dust
    return image, blob


def test_tissue_mask_finds_blob(blob_slide):
    image, blob = blob_slide
    mask, scale = tissue_mask(image, level_px=200)
    assert mask.shape == (150, 200) and scale == pytest.approx(0.25)
    truth = blob[::4, ::4]
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.9
    assert mask[round(300 * scale), round(450 * scale)]  # the hole is filled
    assert not mask[round(46 * scale), round(46 * scale)]  # the speck is dropped
    blank = np.full((100, 100, 3), 240, np.uint8)
    assert not tissue_mask(blank, level_px=50)[0].any()


def test_tissue_mask_keeps_pale_textured_tissue_and_leaves_a_smooth_smear():
    """Tinted glass, a dense cellular core, pale fibrous stroma beside it, a smooth pink smear.

    Saturation alone (Otsu) separates the dense core from everything else; the pale stroma
    that touches it is textured and joins, the equally pale but smooth smear does not.
    """
    rng = np.random.default_rng(8)
    height, width = 400, 800
    yy, xx = np.mgrid[:height, :width]
    core = (xx > 100) & (xx < 300) & (yy > 100) & (yy < 300)
    stroma = (xx >= 300) & (xx < 500) & (yy > 100) & (yy < 300)
    smear = (xx > 600) & (xx < 750) & (yy > 100) & (yy < 300)
    c_h, c_e = _concentrations((height, width), rng)
    fibres = (np.sin(xx / 3.0 + 2 * np.sin(yy / 9.0)) > 0.3).astype(float)  # thin pink fibres
    image = _render(c_h * core + 0.02 * stroma, c_e * core + stroma * (0.05 + 0.35 * fibres)
                    + 0.12 * smear, background=235.0)
    image = np.clip(image * np.array([1.0, 0.97, 1.0]) + rng.normal(0, 1.5, image.shape), 0,
                    255).astype(np.uint8)  # lavender-tinted glass, sensor noise
    mask, scale = tissue_mask(image, level_px=800)
    assert mask[core].mean() > 0.97 and mask[stroma].mean() > 0.9
    assert mask[smear].mean() < 0.05 and mask[~(core | stroma | smear)].mean() < 0.02
    saturation_only = tissue_mask_kernel(image, texture_factor=np.inf)
    assert saturation_only[stroma].mean() < 0.5  # what the texture pass adds


@pytest.mark.skipif(not (HER2ST / "B4_HE_fullres.jpg").is_file(),
                    reason="shared her2st data folder is absent")
def test_tissue_mask_covers_every_measured_spot_of_her2st_b4():
    """B4 is half pale stroma and fat: the mask must hold its measured spots, not the glass."""
    spots = ad.read_h5ad(HER2ST / "B4.h5ad")
    mask, scale = tissue_mask(HER2ST / "B4_HE_fullres.jpg")
    xy = np.asarray(spots.obsm["spatial"], dtype=float) * scale
    on = mask[np.round(xy[:, 1]).astype(int), np.round(xy[:, 0]).astype(int)]
    assert on.mean() > 0.97
    assert mask.mean() < 0.35  # the tissue is ~28 % of the image; the glass stays out


def test_grid_spots_cover_blob(blob_slide):
    image, blob = blob_slide
    img = SlideImage.from_array(image, mpp=2.0)
    grid = grid_spots(img, spacing_um=40, level_px=200)  # 20 px pitch
    xy = grid.obsm["spatial"]
    sf = grid.uns["spatial"]["grid"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(10) and sf["microns_per_pixel"] == 2.0
    assert np.allclose(np.diff(np.unique(xy[:, 0])) % 20, 0)
    inside = ((xy[:, 0] - 400) / 260) ** 2 + ((xy[:, 1] - 300) / 160) ** 2 <= 1
    assert inside.all()  # no grid point off the tissue
    # every grid position well inside the blob is present
    gx, gy = np.meshgrid(np.unique(xy[:, 0]), np.unique(xy[:, 1]))
    core = ((gx - 400) / 235) ** 2 + ((gy - 300) / 135) ** 2 <= 1
    present = {(round(x), round(y)) for x, y in xy}
    assert all((round(x), round(y)) in present for x, y in zip(gx[core], gy[core], strict=True))
    # the result plugs into spot_tiles
    tiles = spot_tiles(grid, img, out_px=8)
    assert tiles.shape == (grid.n_obs, 8, 8, 3)
    assert tile_geometry(grid, tile_um=40).side_px == pytest.approx(20)


# --- Macenko ---------------------------------------------------------------------------------


def test_macenko_recovers_stains_and_normalises_a_shifted_copy():
    rng = np.random.default_rng(6)
    c_h, c_e = _concentrations((64, 64), rng)
    original = _render(c_h, c_e)
    shifted = _render(1.3 * c_h, 0.7 * c_e, h=H_SHIFT, e=E_SHIFT)
    target = fit_macenko(original)
    assert target.stain_matrix[:, 0] @ H_OD > 0.995 and target.stain_matrix[:, 1] @ E_OD > 0.995
    shifted_copy = shifted.copy()
    normalised = macenko_normalize(shifted, target=target)
    np.testing.assert_array_equal(shifted, shifted_copy)  # input untouched
    assert normalised.shape == shifted.shape and normalised.dtype == np.uint8
    before = np.abs(shifted.astype(float) - original).mean()
    after = np.abs(normalised.astype(float) - original).mean()
    assert after < 0.3 * before
    # an image as target is the same as its fitted reference
    np.testing.assert_array_equal(macenko_normalize(shifted, target=original), normalised)


def test_macenko_batch_shapes():
    rng = np.random.default_rng(7)
    batch = np.stack([_render(*_concentrations((16, 16), rng)) for _ in range(3)])
    batch[2] = 240  # a tile of glass: per_tile falls back to the batch fit
    for per_tile in (False, True):
        out = macenko_normalize(batch, per_tile=per_tile)
        assert out.shape == batch.shape and out.dtype == np.uint8
    assert isinstance(fit_macenko(batch), StainReference)


# --- bad input -------------------------------------------------------------------------------


def test_bad_inputs_tiles():
    img = SlideImage.from_array(np.full((100, 100, 3), 200, np.uint8))
    adata = _spots([(50, 50), (60, 60)], diameter=20)
    no_xy = adata.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(InputError, match=r"no obsm\['spatial'\]"):
        spot_tiles(no_xy, img)
    with pytest.raises(InputError, match="no 'spot_diameter_fullres'"):
        spot_tiles(_spots([(50, 50)]), img)
    no_uns = _spots([(50, 50)])
    del no_uns.uns["spatial"]
    with pytest.raises(InputError, match="no 'spatial' entry"):
        spot_tiles(no_uns, img)
    with pytest.raises(InputError, match="needs the image scale in µm per px.*spot diameter"):
        spot_tiles(adata, img, tile_um=50)
    with pytest.raises(InputError, match="mpp must be a positive"):
        spot_tiles(adata, img, tile_um=50, mpp=-1)
    with pytest.raises(InputError, match="out_px must be a positive integer"):
        spot_tiles(adata, img, out_px=0)
    two = _spots([(50, 50)], diameter=20)
    two.uns["spatial"]["other"] = {}
    with pytest.raises(InputError, match="holds 2 libraries"):
        spot_tiles(two, img)
    with pytest.raises(InputError, match="no library 'nope'"):
        spot_tiles(adata, img, library_id="nope")
    with pytest.raises(InputError, match="must be a SlideImage"):
        spot_tiles(adata, [[1, 2]])


def test_bad_inputs_image_mismatch():
    img = SlideImage.from_array(np.full((100, 100, 3), 200, np.uint8))
    one_out = _spots([(50, 50), (60, 60), (10, 110)], diameter=20)
    with pytest.raises(InputError, match=r"1 of 3 spot centres lie outside.*'s2' at \(x, y\)"):
        spot_tiles(one_out, img)
    # every spot beyond a smaller image: the hires image passed instead of the full one
    hires = _spots([(300, 300), (420, 380)], diameter=20)
    hires.uns["spatial"]["lib"]["scalefactors"]["tissue_hires_scalef"] = 0.2
    with pytest.raises(InputError, match="does not match these spots: 2 of 2.*hires image"):
        spot_tiles(hires, img)
    other = _spots([(50, 50)], diameter=20, metadata={"fullres_width": 120, "fullres_height": 90})
    with pytest.raises(InputError, match="records its full-resolution image as 120 × 90 px"):
        spot_tiles(other, img)


def test_bad_inputs_reading(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "he.xyz").write_bytes(b"0")
    with pytest.raises(InputError, match="Unsupported image format '.xyz'"):
        read_image(tmp_path / "he.xyz")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="Cannot read"):
        read_image(tmp_path / "broken.jpg")
    (tmp_path / "broken.tif").write_bytes(b"not a tiff")
    with pytest.raises(InputError, match="Cannot read .* as a TIFF"):
        read_image(tmp_path / "broken.tif")
    with pytest.raises(InputError, match="mpp must be a positive"):
        read_image(tmp_path / "broken.jpg", mpp=0)
    with pytest.raises(InputError, match="float64 values"):
        SlideImage.from_array(np.zeros((4, 4, 3)))
    with pytest.raises(InputError, match=r"\(height, width, 3\|4\)"):
        SlideImage.from_array(np.zeros((4, 4, 7), np.uint8))
    img = SlideImage.from_array(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="width, height >= 1"):
        img.read_region(0, 0, 0, 3)


def test_bad_inputs_tissue_and_stain(blob_slide):
    image, _ = blob_slide
    with pytest.raises(InputError, match="needs the image scale"):
        grid_spots(image, spacing_um=40)
    with pytest.raises(InputError, match="No grid point"):
        grid_spots(np.full((100, 100, 3), 240, np.uint8), spacing_um=10, mpp=1.0)
    with pytest.raises(InputError, match="does not match the image"):
        grid_spots(image, spacing_um=40, mpp=1.0, mask=(np.ones((10, 10), bool), 0.1))
    with pytest.raises(InputError, match="2-D bool array"):
        grid_spots(image, spacing_um=40, mpp=1.0, mask=np.ones((150, 200)))
    with pytest.raises(InputError, match="spacing_um must be a positive"):
        grid_spots(image, spacing_um=0, mpp=1.0)
    with pytest.raises(InputError, match="must be uint8 RGB"):
        macenko_normalize(np.zeros((8, 8, 3)))
    with pytest.raises(InputError, match=r"h × w × 3\) or a batch"):
        macenko_normalize(np.zeros((8, 8), np.uint8))
    with pytest.raises(InputError, match="Cannot estimate two stains"):
        macenko_normalize(np.full((8, 8, 3), 240, np.uint8))


# --- real data -------------------------------------------------------------------------------


@pytest.mark.skipif(not HER2ST.is_dir(), reason=f"her2st data not found at {HER2ST}")
def test_her2st_c6_tiles():
    adata = ad.read_h5ad(HER2ST / "C6.h5ad")
    img = read_image(HER2ST / "C6_HE_fullres.jpg")
    tiles = spot_tiles(adata, img, tile_um=100)  # µm/px from the section's metadata
    assert tiles.shape == (178, 224, 224, 3) and tiles.dtype == np.uint8
    geometry = tile_geometry(adata, tile_um=100)
    assert geometry.side_px == pytest.approx(146.3, abs=0.5)  # 100 µm = one spot diameter
    # spots sit on tissue: tiles are stained, not glass
    assert np.mean(tiles.reshape(178, -1).mean(axis=1) < 215) > 0.95
    mask, scale = tissue_mask(img)
    xy = np.round(adata.obsm["spatial"] * scale).astype(int)
    assert mask[xy[:, 1], xy[:, 0]].mean() > 0.9
    hires = adata.uns["spatial"]["C6"]["images"]["hires"]
    with pytest.raises(InputError, match="another section or resolution"):
        spot_tiles(adata, hires)
