"""The HTML report (issue 18): what it holds, how big and fast it is, and what a browser shows.

The browser tests run headless Chromium (Debian's ``chromium``; ``$SPOTLENS_CHROMIUM`` names
another binary) and skip, saying why, where none is installed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

import spotlens
from spotlens import InputError

FIT = {"labels_key": "cell_type", "lambda_ridge": 0.01, "lambda_spatial": 0.1,
       "progress": False, "likelihood": "gaussian"}


@pytest.fixture(scope="module")
def osmfish_run():
    """The bundled osmFISH example, deconvolved, with placed cells."""
    from spotlens.deconv import assign_cells, cell_level, deconvolve

    st, ref = spotlens.datasets.osmfish_cortex()
    deconvolve(st, ref, **FIT)
    cell_level(st, ref, progress=False)
    return st, assign_cells(st, ref)


def payload(path: Path) -> dict:
    html = path.read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="spotlens-data">(.*?)</script>', html,
                      re.S)
    return json.loads(match.group(1))


def decode(layer: dict) -> np.ndarray:
    raw = base64.b64decode(layer["values"])
    if layer["kind"] == "continuous":
        codes = np.frombuffer(raw, "<u2").astype(float)
        out = layer["lo"] + codes / 65534 * (layer["hi"] - layer["lo"])
        out[codes == 65535] = np.nan
        return out
    return np.frombuffer(raw, "<u1" if layer["dtype"] == "u8" else "<u2")


def prediction_adata(n: int = 400, n_genes: int = 30, *, image: bool = True) -> AnnData:
    """Spots of a histology prediction (predict_image's layout) over a synthetic image."""
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    ij = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n]
    xy = 200.0 + ij * 100.0  # full-resolution px
    genes = [f"G{i}" for i in range(n_genes)]
    x = rng.gamma(2.0, 1.0, (n, n_genes)).astype(np.float32)
    x[:, 3] *= 10  # the most variable gene
    adata = AnnData(x, obs=pd.DataFrame(index=[f"grid_{i}" for i in range(n)]),
                    var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    adata.layers["histology_prediction_std"] = (0.1 * x).astype(np.float32)
    adata.uns["histology_prediction"] = {"params": {"model_type": "ridge", "tile_um": 100.0}}
    if image:
        scalef = 0.25
        size = (np.ceil((xy.max(axis=0) + 300) * scalef)).astype(int)
        pixels = np.zeros((size[1], size[0], 3), np.uint8)
        pixels[...] = (230, 60, 200)  # magenta "tissue", to find in a screenshot
        adata.uns["spatial"] = {"section": {
            "images": {"hires": pixels},
            "scalefactors": {"tissue_hires_scalef": scalef, "spot_diameter_fullres": 80.0}}}
    return adata


# -- what the file holds ---------------------------------------------------------------------

def test_the_report_holds_every_layer_the_parameters_and_the_qc(tmp_path, osmfish_run):
    st, cells = osmfish_run
    before = {k: set(getattr(st, k).keys()) for k in ("obs", "obsm", "uns")}
    path = tmp_path / "out" / "report.html"
    spotlens.pl.report(st, path, cells=cells)
    assert {k: set(getattr(st, k).keys()) for k in before} == before  # nothing written to st
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # atomic: no temp left
    data = payload(path)
    types = list(st.obsm["proportions_spotlens"].columns)
    names = [layer["name"] for layer in data["layers"]]
    assert names[0] == "dominant cell type"
    assert names[1:1 + len(types)] == types
    assert {"zero-count spots", "poorly fit spots", "fit score"} <= set(names)
    dominant = data["layers"][0]
    assert dominant["categories"] == types
    np.testing.assert_array_equal(
        decode(dominant), st.obsm["proportions_spotlens"].to_numpy().argmax(axis=1))
    # a proportion layer decodes to the proportions to within the 16-bit step
    first = data["layers"][1]
    np.testing.assert_allclose(decode(first), st.obsm["proportions_spotlens"][types[0]],
                               atol=(first["hi"] - first["lo"]) / 65534)
    assert first["vmin"] == 0.0 and first["unit"] == "fraction of cells"
    # the run's settings and QC, the placed cells
    (deconv,) = [s for s in data["params"] if s["title"] == "deconvolution"]
    assert dict(deconv["rows"])["lambda_spatial"] == pytest.approx(0.1)
    assert dict(data["qc"])["spots"] == f"{st.n_obs:,}"
    assert "zero-count spots" in dict(data["qc"])
    assert data["cells"]["n"] == cells.n_obs and data["cells"]["categories"]
    assert data["spots"]["n"] == st.n_obs and data["blank"] is True
    # self-contained: the viewer is inlined, nothing is fetched
    html = path.read_text(encoding="utf-8")
    assert "OpenSeadragon" in html and "<link" not in html
    assert not re.search(r"""src=["']?(https?:)?//""", html)


def test_predicted_genes_uncertainty_and_the_image_pyramid(tmp_path):
    adata = prediction_adata()
    path = tmp_path / "pred.html"
    spotlens.pl.report(adata, path, max_genes=5)
    data = payload(path)
    genes = [layer for layer in data["layers"] if layer["group"] == "predicted genes"]
    std = [layer for layer in data["layers"] if layer["group"] == "uncertainty (s.d.)"]
    assert len(genes) == 5 and "G3" in [g["name"] for g in genes]  # the most variable one
    assert [s["std_of"] for s in std] == [g["name"] for g in genes]
    np.testing.assert_allclose(decode(genes[0]), adata[:, genes[0]["name"]].X.ravel(),
                               atol=(genes[0]["hi"] - genes[0]["lo"]) / 65534)
    # the image: a Deep Zoom pyramid of JPEG tiles, spots in its pixels (coordinates × scalef)
    image = data["image"]
    hires = adata.uns["spatial"]["section"]["images"]["hires"]
    assert (image["height"], image["width"]) == hires.shape[:2]
    from PIL import Image

    top = image["tiles"][str(image["max_level"])]
    tile = Image.open(io.BytesIO(base64.b64decode(top[0][0])))
    assert tile.format == "JPEG" and tile.size == (256, 256)
    assert len(image["tiles"][str(image["min_level"])]) == 1  # the coarsest level is one tile
    x = np.frombuffer(base64.b64decode(data["spots"]["x"]), "<f4")
    np.testing.assert_allclose(x, adata.obsm["spatial"][:, 0] * 0.25, rtol=1e-6)
    assert data["spots"]["diameter"] == pytest.approx(80.0 * 0.25)
    assert data["blank"] is False
    # chosen genes
    spotlens.pl.report(adata, path, genes=["G7", "G1"])
    assert [g["name"] for g in payload(path)["layers"] if "gene" in g] == ["G7", "G1"]


def test_bad_input_says_what_to_pass(tmp_path, osmfish_run):
    st, _ = osmfish_run
    with pytest.raises(InputError, match="needs an AnnData"):
        spotlens.pl.report(st.to_df(), tmp_path / "r.html")
    with pytest.raises(InputError, match="name it .html"):
        spotlens.pl.report(st, tmp_path / "r.png")
    bare = AnnData(np.ones((3, 2), np.float32))
    bare.obsm["spatial"] = np.arange(6.0).reshape(3, 2)
    with pytest.raises(InputError, match="Nothing to report"):
        spotlens.pl.report(bare, tmp_path / "r.html")
    with pytest.raises(InputError, match=r"genes \['NOPE'\] are not predicted"):
        spotlens.pl.report(prediction_adata(image=False), tmp_path / "r.html", genes=["NOPE"])
    with pytest.raises(InputError, match="max_genes"):
        spotlens.pl.report(st, tmp_path / "r.html", max_genes=0)
    with pytest.raises(InputError, match="cells= needs"):
        spotlens.pl.report(st, tmp_path / "r.html", cells=bare)
    assert not list(tmp_path.iterdir())


def synthetic_spots(n: int, n_types: int = 10) -> AnnData:
    rng = np.random.default_rng(1)
    side = int(np.ceil(np.sqrt(n)))
    ij = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n]
    adata = AnnData(np.zeros((n, 1), np.float32),
                    obs=pd.DataFrame(index=[f"s_{i}" for i in range(n)]))
    adata.obsm["spatial"] = ij * 16.0
    props = rng.dirichlet(np.full(n_types, 0.3), n)
    adata.obsm["proportions_spotlens"] = pd.DataFrame(
        props, index=adata.obs_names, columns=[f"type {i}" for i in range(n_types)])
    adata.obs["proportions_spotlens_zero_counts"] = rng.random(n) < 0.01
    adata.obs["proportions_spotlens_poorly_fit"] = rng.random(n) < 0.01
    adata.obs["proportions_spotlens_fit_score"] = rng.gamma(4.0, 0.25, n)
    return adata


def test_100k_spots_give_a_compact_file_quickly(tmp_path):
    adata = synthetic_spots(100_000)
    start = time.perf_counter()
    spotlens.pl.report(adata, tmp_path / "big.html")
    seconds = time.perf_counter() - start
    size = (tmp_path / "big.html").stat().st_size
    assert seconds < 30, f"{seconds:.1f} s"
    assert size < 20e6, f"{size / 1e6:.1f} MB"  # ~ 270 kB per layer and 100k spots


def test_cli_report_of_an_output_folder(tmp_path, osmfish_run):
    from typer.testing import CliRunner

    from spotlens.cli import app
    from spotlens.io import write_h5ad

    st, cells = osmfish_run
    write_h5ad(st, tmp_path / "spatial.h5ad")
    write_h5ad(cells, tmp_path / "cells.h5ad")
    res = CliRunner().invoke(app, ["report", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    data = payload(tmp_path / "report.html")
    assert data["cells"]["n"] == cells.n_obs and data["title"].endswith(tmp_path.name)
    res = CliRunner().invoke(app, ["report", str(tmp_path), "--tiles", "beside"])
    assert res.exit_code == 2 and "tiles must be one of auto, embed, folder" in res.output
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "is not a folder" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "holds no spotlens results" in res.output


# -- a large image: tiles in a folder beside the page -----------------------------------------

def big_image(width: int = 5000, height: int = 3000) -> np.ndarray:
    """Magenta tissue with a green band on the right (to tell tiles apart)."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[...] = (230, 60, 200)
    pixels[:, width - 1000:] = (40, 200, 60)
    return pixels


def expected_tiles(width: int, height: int, tile: int = 256) -> dict[int, tuple[int, int]]:
    """``{level: (columns, rows)}`` of the Deep Zoom pyramid, from its definition."""
    top = int(np.ceil(np.log2(max(width, height))))
    out = {}
    for level in range(top, -1, -1):
        w, h = (int(np.ceil(side / 2 ** (top - level))) for side in (width, height))
        out[level] = (int(np.ceil(w / tile)), int(np.ceil(h / tile)))
        if max(w, h) <= tile:
            break
    return out


def test_tiles_in_a_folder_follow_the_deep_zoom_layout(tmp_path, monkeypatch):
    from PIL import Image

    adata = prediction_adata(image=False)
    slide = spotlens.io.SlideImage.from_array(big_image())
    bands = []
    read = slide.read_region
    monkeypatch.setattr(slide, "read_region",
                        lambda x0, y0, w, h: bands.append(h) or read(x0, y0, w, h))
    path = tmp_path / "pred.html"
    spotlens.pl.report(adata, path, image=slide, tiles="folder")
    assert max(bands) <= 256 and sum(bands) == 3000  # read band by band, never whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.html", "pred_files"]
    image = payload(path)["image"]
    assert image["folder"] == "pred_files" and "tiles" not in image  # a relative path
    assert (image["width"], image["height"], image["max_level"]) == (5000, 3000, 13)
    folder = tmp_path / "pred_files"
    want = expected_tiles(5000, 3000)
    assert {int(p.name) for p in folder.iterdir()} == set(want) == set(
        range(image["min_level"], image["max_level"] + 1))
    for level, (cols, rows) in want.items():
        names = {p.name for p in (folder / str(level)).iterdir()}
        assert names == {f"{c}_{r}.jpg" for c in range(cols) for r in range(rows)}, level
    assert want[13] == (20, 12) and want[8] == (1, 1)
    with Image.open(folder / "13" / "19_11.jpg") as corner:
        assert corner.format == "JPEG" and corner.size == (5000 - 19 * 256, 3000 - 11 * 256)
        assert np.abs(np.asarray(corner, int)[50, 50] - (40, 200, 60)).max() < 12  # green
    with Image.open(folder / "13" / "0_0.jpg") as first:
        assert np.abs(np.asarray(first, int)[9, 9] - (230, 60, 200)).max() < 12
    with Image.open(folder / "8" / "0_0.jpg") as whole:
        assert whole.size == (157, 94)
    assert path.stat().st_size < 2e6  # the page holds no tiles


def test_auto_tiles_rewrite_replace_and_refuse(tmp_path):
    adata = prediction_adata(image=False)
    path = tmp_path / "r.html"
    pixels = big_image(900, 500)
    spotlens.pl.report(adata, path, image=pixels, max_image_side=512)  # auto: too large
    assert payload(path)["image"]["folder"] == "r_files"
    assert {p.name for p in (tmp_path / "r_files").iterdir()} == {"8", "9", "10"}
    # a rewrite replaces the folder whole (no tiles of the earlier pyramid left)
    spotlens.pl.report(adata, path, image=pixels[:300, :300], tiles="folder")
    assert {p.name for p in (tmp_path / "r_files").iterdir()} == {"8", "9"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r_files"]
    # an image that fits is embedded, and the earlier tile folder goes
    spotlens.pl.report(adata, path, image=pixels)
    assert "tiles" in payload(path)["image"] and "folder" not in payload(path)["image"]
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    # a folder of that name holding anything else is left alone, and nothing is written
    (tmp_path / "r_files").mkdir()
    (tmp_path / "r_files" / "notes.txt").write_text("mine")
    before = path.read_bytes()
    with pytest.raises(InputError, match="not the tile folder of an earlier report"):
        spotlens.pl.report(adata, path, image=pixels, tiles="folder")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r_files"]
    with pytest.raises(InputError, match="tiles must be one of auto, embed, folder"):
        spotlens.pl.report(adata, path, tiles="beside")


# -- what a browser shows --------------------------------------------------------------------

def chromium() -> str:
    for name in (os.environ.get("SPOTLENS_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless Chromium here (Debian: apt-get install chromium; or set "
                "SPOTLENS_CHROMIUM)")


def browse(html: Path, tmp_path: Path, *, screenshot: Path | None = None,
           hash: str = "") -> str:
    """Open ``html`` in headless Chromium; return the DOM after its scripts ran."""
    args = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
            "--window-size=1200,900", "--virtual-time-budget=8000",
            f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    url = html.resolve().as_uri() + hash
    args += [f"--screenshot={screenshot}", url] if screenshot else ["--dump-dom", url]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def body_data(dom: str) -> dict:
    tag = re.search(r"<body[^>]*>", dom).group(0)  # the first: the page's own body tag
    import html as html_lib

    return {k: html_lib.unescape(v) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', tag)}


def screenshot_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def near(pixels: np.ndarray, color: str, tol: int = 40) -> int:
    rgb = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - rgb).max(axis=-1) <= tol).sum())


@pytest.mark.slow
def test_every_layer_renders_in_a_browser(tmp_path, osmfish_run):
    st, cells = osmfish_run
    path = tmp_path / "report.html"
    spotlens.pl.report(st, path, cells=cells)
    body = body_data(browse(path, tmp_path, hash="#selftest"))
    assert "error" not in body, body["error"]
    assert body["ready"] == "1" and int(body["tiles-loaded"]) >= 1
    result = json.loads(body["selftest"])
    n_layers = len(payload(path)["layers"])
    assert len(result["layers"]) == n_layers
    assert all(n == st.n_obs for n in result["layers"].values()), result["layers"]
    assert result["cells"] == cells.n_obs and result["hover"] > 0


@pytest.mark.slow
def test_a_screenshot_shows_the_tissue_with_spots_on_it(tmp_path):
    adata = prediction_adata(n=400)
    path = tmp_path / "pred.html"
    spotlens.pl.report(adata, path)
    shot = tmp_path / "shot.png"
    browse(path, tmp_path, screenshot=shot)
    pixels = screenshot_pixels(shot)
    viewer = pixels[40:, :900]  # left of the side panel, below the header
    assert near(viewer, "#e63cc8") > 5000  # the magenta tissue tiles
    data = payload(path)
    gene = data["layers"][0]
    assert gene["group"] == "predicted genes"
    lut = data["luts"][gene["scale"]]
    on_spots = sum(near(viewer, c, tol=12) for c in lut[::4])
    assert on_spots > 20000, on_spots  # spots coloured by the scale cover the tissue
    assert len(np.unique(viewer.reshape(-1, 3), axis=0)) > 50  # not blank


@pytest.mark.slow
def test_a_deconvolution_screenshot_has_the_dominant_colours(tmp_path, osmfish_run):
    st, _ = osmfish_run
    path = tmp_path / "report.html"
    spotlens.pl.report(st, path)
    shot = tmp_path / "shot.png"
    browse(path, tmp_path, screenshot=shot)
    viewer = screenshot_pixels(shot)[40:, :900]
    dominant = payload(path)["layers"][0]
    seen = [c for c, n in zip(dominant["colors"], dominant["counts"], strict=True)
            if n > 20 and near(viewer, c, tol=30) > 200]
    assert len(seen) >= 3, seen


@pytest.mark.slow
def test_100k_spots_draw_quickly_in_a_browser(tmp_path):
    path = tmp_path / "big.html"
    spotlens.pl.report(synthetic_spots(100_000), path)
    start = time.perf_counter()
    body = body_data(browse(path, tmp_path))
    seconds = time.perf_counter() - start  # start, parse ~6 MB, decode, index, draw
    assert "error" not in body, body["error"]
    assert int(body["spots-drawn"]) == 100_000
    assert seconds < 60, f"{seconds:.1f} s"


@pytest.mark.slow
def test_a_report_with_a_tile_folder_renders_the_image(tmp_path):
    path = tmp_path / "big.html"
    spotlens.pl.report(prediction_adata(), path, image=big_image(), tiles="folder")
    body = body_data(browse(path, tmp_path, hash="#selftest"))
    assert "error" not in body, body["error"]
    assert int(body["tiles-loaded"]) >= 1 and "tiles-failed" not in body
    shot = tmp_path / "shot.png"
    browse(path, tmp_path, screenshot=shot)
    viewer = screenshot_pixels(shot)[40:, :900]
    assert near(viewer, "#e63cc8") > 5000  # the magenta tissue, read from the folder
