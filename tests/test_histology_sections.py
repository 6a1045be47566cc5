"""`train` refuses bad sections before it encodes a tile (issue 13, point 7).

Unknown µm per pixel, unknown gene names, another section's image padded to the right size, a
truncated JPEG: each used to surface only after minutes of encoding, or never. Synthetic
sections of test_histology_pipeline (tumour blob in pink tissue); real-data tests use the
mouse olfactory bulb (stutility_mob) and her2st sections when ``shared/data`` is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from PIL import Image
from test_histology_pipeline import GENES, LO, SIZE, make_section, pairs

from spotlens._validation import InputError
from spotlens.histology import _featurize, read_image, train
from spotlens.histology import evaluate_model as evaluate
from spotlens.histology._image_check import MIN_IMAGE_R, image_agreement

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MOB, HER2ST = DATA / "stutility_mob", DATA / "her2st"
MOB_MPP = 100 / 24.05  # not documented; a 100 µm spot over its 24.05 px diameter


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sections")
    return {s: make_section(s, folder, seed=i) for i, s in enumerate(["S1", "S2", "S3"])}


@pytest.fixture
def no_encoding(monkeypatch):
    """Fail the test if train gets as far as encoding a tile."""
    def encode(*args, **kwargs):
        raise AssertionError("train encoded tiles before refusing the input")

    monkeypatch.setattr(_featurize, "section_features", encode)


def without_scale(adata: ad.AnnData) -> ad.AnnData:
    """A copy of the section that records no µm per pixel (like the MOB sections)."""
    out = adata.copy()
    (name,) = out.uns["spatial"].keys()
    entry = dict(out.uns["spatial"][name])
    entry["metadata"] = {}
    out.uns["spatial"] = {name: entry}
    return out


def another_section_image(path: Path) -> None:
    """Another, smaller section's scan padded with glass to this section's size."""
    rng = np.random.default_rng(7)
    img = np.full((SIZE, SIZE, 3), 245.0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    disc = (xx - 170) ** 2 + (yy - 300) ** 2 < 140**2
    img[disc] = [200.0, 120.0, 180.0]
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)


# -- the scale ---------------------------------------------------------------------------------


def test_unknown_scale_is_refused_before_encoding_and_names_mpp(data, tmp_path, no_encoding):
    sections = [(without_scale(data[s][0]), data[s][1]) for s in ("S1", "S2")]
    with pytest.raises(InputError, match=r"scale of section S1 .*unknown.*--mpp \(mpp=") as err:
        train(sections, genes=GENES, model="ridge", encoder="colour", out=tmp_path / "m",
              progress=False)
    assert "spot_diameter_fullres (20 px here)" in str(err.value)
    assert not (tmp_path / "m").exists()  # nothing written either
    with pytest.raises(InputError, match=r"mpp \(--mpp\) has 3 values for 2 sections"):
        train(sections, mpp=[1.0, 1.0, 1.0], genes=GENES, model="ridge", encoder="colour",
              out=tmp_path / "m", progress=False)
    with pytest.raises(InputError, match=r"mpp\[1\] must be a positive number"):
        train(sections, mpp=[1.0, 0], genes=GENES, model="ridge", encoder="colour",
              out=tmp_path / "m", progress=False)


def test_mpp_argument_sets_the_scale_of_the_model(data, tmp_path):
    sections = [(without_scale(data[s][0]), data[s][1]) for s in ("S1", "S2")]
    before = {k: dict(v) for k, v in sections[0][0].uns["spatial"].items()}
    out = train(sections, mpp=1.0, genes=GENES, model="ridge", encoder="colour", out_px=16,
                tile_scales=(1.0,), out=tmp_path / "m", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tiles"]["mpp"] == pytest.approx(1.0)
    assert cfg["tiles"]["tile_um"] == pytest.approx(20.0)  # predict can tile in µm now
    assert [s["mpp_source"] for s in cfg["sections"]] == ["argument", "argument"]
    assert all(s["image_check_r"] > 0.95 for s in cfg["sections"])
    assert sections[0][0].uns["spatial"].keys() == before.keys()  # inputs unchanged
    assert sections[0][0].uns["spatial"]["S1"]["metadata"] == {}
    # one value per section; None = the section's own
    out = train([(without_scale(data["S1"][0]), data["S1"][1]), pairs(data, ["S2"])[0]],
                mpp=[2.0, None], genes=GENES, model="ridge", encoder="colour", out_px=16,
                tile_scales=(1.0,), out=tmp_path / "m2", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert [(s["mpp"], s["mpp_source"]) for s in cfg["sections"]] == [
        (2.0, "argument"), (1.0, "metadata")]


# -- genes ---------------------------------------------------------------------------------------


def test_unknown_genes_are_refused_before_encoding_with_close_matches(data, tmp_path,
                                                                        no_encoding):
    with pytest.raises(InputError, match="in none of the training sections") as err:
        train(pairs(data, ["S1", "S2"]), genes=["TUM", "tum", "STRR", "NOPE"], encoder="colour",
              out=tmp_path / "m", progress=False)
    message = str(err.value)
    assert "3 of 4 genes" in message and "['tum', 'STRR', 'NOPE']" in message
    assert "tum → TUM" in message and "STRR → STR" in message
    assert "NOPE →" not in message


# -- the image -----------------------------------------------------------------------------------


def test_another_sections_image_padded_to_size_is_refused(data, tmp_path, no_encoding):
    other = tmp_path / "other_HE.png"
    another_section_image(other)
    s1, own, _ = data["S1"]
    assert image_agreement(s1, read_image(own))["r"] > 0.95
    assert image_agreement(s1, read_image(other))["r"] < MIN_IMAGE_R
    sections = [(s1.copy(), other), pairs(data, ["S2"])[0]]
    with pytest.raises(InputError, match=r"other_HE.png does not look like section S1's image"
                                         r".*\['hires'\].*r = -?0\.\d\d"):
        train(sections, genes=GENES, model="ridge", encoder="colour", out=tmp_path / "m",
              progress=False)
    # the way out the message names: drop the stored images
    kept = s1.copy()
    del kept.uns["spatial"]["S1"]["images"]
    assert image_agreement(kept, read_image(other)) is None


def test_evaluate_refuses_another_sections_image(data, tmp_path):
    model = train(pairs(data, ["S1", "S2"]), genes=GENES, model="ridge", encoder="colour",
                  out_px=16, tile_scales=(1.0,), out=tmp_path / "m", progress=False)
    other = tmp_path / "other_HE.png"
    another_section_image(other)
    with pytest.raises(InputError, match="does not look like section S3's image"):
        evaluate(model, [(data["S3"][0].copy(), other)])
    assert evaluate(model, pairs(data, ["S3"])).loc["S3", "n_spots"] == data["S3"][0].n_obs


def test_jpeg_overview_agrees_with_the_stored_image(data, tmp_path):
    s2, png, _ = data["S2"]
    jpeg = tmp_path / "S2_HE.jpg"
    with Image.open(png) as im:
        im.save(jpeg, quality=85)
    assert image_agreement(s2, read_image(jpeg))["r"] > 0.95  # decoded at 1/2 scale


def test_truncated_jpeg_names_the_file(data, tmp_path, no_encoding):
    s1, png, _ = data["S1"]
    whole, cut = tmp_path / "whole.jpg", tmp_path / "S1_cut.jpg"
    with Image.open(png) as im:
        im.save(whole, quality=90)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(InputError, match=r"Cannot decode the pixels of .*S1_cut\.jpg.*truncated"):
        read_image(cut).read_region(LO, LO, 40, 40)
    bare = s1.copy()
    del bare.uns["spatial"]["S1"]["images"]
    for adata in (s1.copy(), bare):  # with a stored image to compare with, and without
        with pytest.raises(InputError, match=r"S1_cut\.jpg.*copy it again"):
            train([(adata, cut), pairs(data, ["S2"])[0]], genes=GENES, model="ridge",
                  encoder="colour", out=tmp_path / "m", progress=False)


# -- command line --------------------------------------------------------------------------------


def test_cli_train_takes_mpp(data, tmp_path):
    from typer.testing import CliRunner

    from spotlens.cli import app

    for s in ("S1", "S2"):
        without_scale(data[s][0]).write_h5ad(tmp_path / f"{s}.h5ad")
        Image.open(data[s][1]).save(tmp_path / f"{s}_HE.png")
    args = ["histology", "train", "--sections", str(tmp_path / "S1.h5ad"),
            str(tmp_path / "S2.h5ad"), "--genes", ",".join(GENES), "--model-type", "ridge",
            "--encoder", "colour", "--out-px", "16", "--tile-scales", "1", "--no-progress",
            "-q", "-o", str(tmp_path / "model")]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "error: The scale of section S1" in res.output
    assert "pass --mpp" in res.output
    res = runner.invoke(app, [*args, "--mpp", "x"])
    assert res.exit_code == 2 and "--mpp must be µm per pixel" in res.output
    res = runner.invoke(app, [*args, "--mpp", "1,-1"])
    assert res.exit_code == 2 and "--mpp must be a positive number" in res.output
    res = runner.invoke(app, [*args, "--mpp", "1"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert cfg["tiles"]["mpp"] == pytest.approx(1.0)
    res = runner.invoke(app, [*args, "--mpp", "1,2", "--overwrite"])  # a finished run
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "model" / "config.json").read_text())
    assert [s["mpp"] for s in cfg["sections"]] == [1.0, 2.0]


# -- real data (optional) ------------------------------------------------------------------------


@pytest.mark.skipif(not (MOB / "MOB2_HE.jpg").is_file(), reason=f"MOB data not found at {MOB}")
def test_mob_without_mpp_is_refused_and_another_sections_image_too(tmp_path, no_encoding):
    mob = {i: ad.read_h5ad(MOB / f"MOB{i}.h5ad") for i in (1, 2)}
    with pytest.raises(InputError, match=r"scale of section MOB1 \(MOB1_HE.jpg\) is unknown"
                                         r".*--mpp.*24\.05 px here"):
        train([(mob[1], MOB / "MOB1_HE.jpg"), (mob[2], MOB / "MOB2_HE.jpg")], genes="hvg",
              model="ridge", encoder="colour", out=tmp_path / "m", progress=False)
    # the same size (1905 × 1905 px), so only the stored image tells MOB2's scan from MOB1's
    with pytest.raises(InputError, match=r"MOB2_HE.jpg does not look like section MOB1's image"
                                         r".*\(MOB1_HE.jpg\)"):
        train([(mob[1], MOB / "MOB2_HE.jpg"), (mob[2], MOB / "MOB2_HE.jpg")], mpp=MOB_MPP,
              genes="hvg", model="ridge", encoder="colour", out=tmp_path / "m", progress=False)


def _agreements(sections: dict[str, tuple[Path, Path]]) -> tuple[list[float], list[float]]:
    adatas = {s: ad.read_h5ad(h5ad) for s, (h5ad, _) in sections.items()}
    own, other = [], []
    for s, adata in adatas.items():
        for t, (_, image) in sections.items():
            r = image_agreement(adata, read_image(image))["r"]
            (own if s == t else other).append(r)
    return own, other


@pytest.mark.skipif(not (MOB / "MOB4_HE.jpg").is_file(), reason=f"MOB data not found at {MOB}")
def test_threshold_separates_own_and_other_images_mob():
    own, other = _agreements({f"MOB{i}": (MOB / f"MOB{i}.h5ad", MOB / f"MOB{i}_HE.jpg")
                              for i in (1, 2, 3, 4)})
    # measured: own 0.985–0.989, other 0.23–0.66 (12 pairs)
    assert min(own) > 0.97 and max(other) < 0.7
    assert max(other) < MIN_IMAGE_R < min(own)


@pytest.mark.slow
@pytest.mark.skipif(not (HER2ST / "C6_HE_fullres.jpg").is_file(),
                    reason=f"her2st data not found at {HER2ST}")
def test_threshold_separates_own_and_other_images_her2st():
    """Whole-slide JPEGs (≈ 9,300 × 9,900 px) compared at the stored lowres scale (× 0.06)."""
    own, other = _agreements({s: (HER2ST / f"{s}.h5ad", HER2ST / f"{s}_HE_fullres.jpg")
                              for s in ("B4", "C2", "C3", "C4", "C5", "C6")})
    # measured: own 0.984–0.995, other −0.01–0.65 (30 pairs; serial sections C3–C5 the closest)
    assert min(own) > 0.97 and max(other) < 0.7
    assert max(other) < MIN_IMAGE_R < min(own)
