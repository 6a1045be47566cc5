"""Histology inference over image regions on a Dask cluster equals the single-machine run.

Real images: small models are trained on the mouse olfactory bulb section MOB1 (colour
features, a few epochs) and predict on a 1,000 × 1,000 px crop of the MOB3 H&E saved as a tiled
TIFF, on a 2-worker LocalCluster (threads, one process).
"""

from __future__ import annotations

import math
import pickle
import threading
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from spotlens._validation import InputError
from spotlens.histology import TrainConfig, load_model, read_image, train
from spotlens.histology import predict_image as predict
from spotlens.histology._distributed import (
    graph_adjacency,
    plan_regions,
    predict_on_cluster,
    region_tasks,
)
from spotlens.histology._tiles import tile_geometry
from spotlens.io import SlideImage

MOB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stutility_mob"
# µm/px of the MOB JPEGs is not documented; assume a 100 µm spot over its 24.05 px diameter
MPP = 100 / 24.05
GENES = ["Pcp4", "Nrgn", "Penk", "Apod", "Mbp", "Fabp7"]
REGION_UM = 1000.0  # 240 px: a dozen regions on the crop
TOL = 1e-4  # float32

# slow: the module trains two models on MOB1 before its first test (~1 min in all)
pytestmark = [pytest.mark.skipif(not (MOB / "MOB3_HE.jpg").is_file(),
                                 reason=f"MOB data not found at {MOB}"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def crop(tmp_path_factory):
    import tifffile

    with Image.open(MOB / "MOB3_HE.jpg") as im:
        pixels = np.asarray(im)[400:1400, 400:1400]
    path = tmp_path_factory.mktemp("image") / "MOB3_crop.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256))  # read tile by tile, lazily
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    section = (ad.read_h5ad(MOB / "MOB1.h5ad"), read_image(MOB / "MOB1_HE.jpg", mpp=MPP))
    out = tmp_path_factory.mktemp("models")
    return {
        kind: train([section], genes=GENES, model=kind, encoder="colour", out_px=32,
                    config=TrainConfig(hidden=16, epochs=epochs, patience=50),
                    out=out / kind, progress=False)
        for kind, epochs in (("attention", 12), ("graph", 6))
    }


@pytest.fixture(scope="module")
def client(thread_client):
    return thread_client


@pytest.fixture(scope="module")
def single(models, crop):
    return {kind: predict(path, crop, mpp=MPP) for kind, path in models.items()}


@pytest.mark.parametrize("kind", ["attention", "graph"])
def test_cluster_prediction_equals_single_machine(kind, models, crop, client, single):
    one = single[kind]
    many = predict(models[kind], crop, mpp=MPP, client=client, region_um=REGION_UM)
    assert list(many.obs_names) == list(one.obs_names)
    np.testing.assert_array_equal(many.obsm["spatial"], one.obsm["spatial"])
    assert list(many.var_names) == list(one.var_names) == GENES
    assert many.X.dtype == np.float32
    np.testing.assert_allclose(many.X, one.X, atol=TOL, rtol=0)
    assert np.ptp(one.X, axis=0).min() > 10 * TOL  # the predictions vary across the crop
    std = "histology_prediction_std"  # the uncertainty: the same, region by region
    np.testing.assert_allclose(many.layers[std], one.layers[std], atol=TOL, rtol=1e-4)
    cluster = many.uns["histology_prediction"]["params"].pop("cluster")
    assert cluster["n_regions"] >= 8 and cluster["region_um"] == REGION_UM
    # attention reads the stored training bank, not the slide's other spots: no halo needed
    assert cluster["halo_hops"] == (4 if kind == "graph" else 0)
    assert (cluster["n_computed"] > many.n_obs) == (kind == "graph")
    assert many.uns["histology_prediction"] == one.uns["histology_prediction"]


def test_graph_model_needs_its_halo(models, crop, client, single):
    """Without the 4-hop halo, spots near region borders see other neighbours: not the same."""
    model = load_model(models["graph"])
    grid = single["graph"]
    side = tile_geometry(grid, tile_um=model.config["tiles"]["tile_um"], mpp=MPP).side_px
    pred, _, info = predict_on_cluster(model, grid, crop, client=client, mpp=MPP, side_px=side,
                                    region_um=REGION_UM, halo_hops=0)
    assert info["halo_hops"] == 0
    assert np.abs(pred - grid.X).max() > 100 * TOL


def test_regions_cover_every_spot_once_with_their_graph_neighbourhood(single):
    coords = single["graph"].obsm["spatial"]
    adjacency = graph_adjacency(coords, 6)
    region_px = REGION_UM / MPP
    regions = plan_regions(coords, region_px, adjacency=adjacency, hops=4)
    cores = np.concatenate([r["core"] for r in regions])
    assert np.array_equal(np.sort(cores), np.arange(len(coords)))
    for region in regions:
        x0, y0, x1, y1 = region["box"]
        xy = coords[region["core"]]
        assert np.all((xy >= [x0, y0]) & (xy < [x1, y1]))
        # every spot within 4 hops of the core (on the graph of all spots) is computed
        reach = np.isin(np.arange(len(coords)), region["core"])
        for _ in range(4):
            reach |= adjacency @ reach.astype(float) > 0
        assert set(np.flatnonzero(reach)) == set(region["local"])
        assert list(region["local"][: len(region["core"])]) == list(region["core"])


def test_tasks_carry_spot_centres_not_pixels(models, single, crop):
    model = load_model(models["graph"])
    grid = single["graph"]
    coords = grid.obsm["spatial"]
    adjacency = graph_adjacency(coords, 6)
    regions = plan_regions(coords, REGION_UM / MPP, adjacency=adjacency, hops=4)
    tasks = region_tasks(regions, coords, model_path=model.path, image_path=crop, mpp=MPP,
                         side_px=20.0, device="cpu", adjacency=adjacency)
    for task in tasks:
        n = len(task["centres"])
        # one 32 × 32 RGB tile alone is 3 kB; a task needs ~100 bytes per spot
        assert len(pickle.dumps(task)) < 2000 + 200 * n


def test_workers_read_the_image_region_by_region(models, crop, client, monkeypatch):
    calls = []
    original = SlideImage.read_region

    def spy(self, x0, y0, width, height):
        calls.append((threading.current_thread() is threading.main_thread(), width, height))
        return original(self, x0, y0, width, height)

    monkeypatch.setattr(SlideImage, "read_region", spy)
    pred = predict(models["attention"], crop, mpp=MPP, client=client, region_um=REGION_UM)
    scales = load_model(models["attention"]).tile_scales
    # one window per spot and tile scale, read where it is predicted
    assert len(calls) == pred.n_obs * len(scales)
    assert not any(main for main, _, _ in calls)  # none on this machine
    side = pred.uns["spatial"]["MOB3_crop"]["scalefactors"]["spot_diameter_fullres"] * max(scales)
    margin = math.ceil(3 * max(1.0, side / 32)) + 1  # Lanczos support of extract_tiles
    assert max(max(w, h) for _, w, h in calls) <= math.ceil(side) + 2 * margin + 1


def test_cluster_bad_input(models, crop, client):
    with pytest.raises(InputError, match="distributed.Client"):
        predict(models["attention"], crop, mpp=MPP, client="localhost:8786")
    with pytest.raises(InputError, match="pass client= too"):
        predict(models["attention"], crop, mpp=MPP, region_um=500)
    for bad in (0, -1.0, float("nan"), "500"):
        with pytest.raises(InputError, match="region_um must be a number of µm > 0"):
            predict(models["attention"], crop, mpp=MPP, client=client, region_um=bad)


def test_fine_tuned_head_model_on_the_cluster_equals_single_machine(client, tmp_path):
    """An EfficientNet-Lite0 model with a fine-tuned head: workers run the trunk and the head."""
    pytest.importorskip("efficientnet_lite_pytorch")
    import tifffile

    adata = ad.read_h5ad(MOB / "MOB1.h5ad")[:80].copy()
    model_dir = train([(adata, read_image(MOB / "MOB1_HE.jpg", mpp=MPP))], genes=GENES,
                      model="attention", tile_scales=(1.0, 2.0),
                      config=TrainConfig(hidden=16, epochs=5, finetune_head=True),
                      out=tmp_path / "model",
                      progress=False)
    model = load_model(model_dir)
    info = model.config["encoder"]
    assert info["name"] == "efficientnet-lite0-prehead-pool2" and info["head"]["dim"] == 1280
    assert model.config["train_config"]["finetune_head"] is True
    assert model.n_features == 2 * 1280  # what is standardised and modelled: the head's output
    with Image.open(MOB / "MOB3_HE.jpg") as im:
        pixels = np.asarray(im)[700:1100, 700:1100]
    crop = tmp_path / "MOB3_small.tif"
    tifffile.imwrite(crop, pixels, tile=(128, 128))
    one = predict(model_dir, crop, mpp=MPP)
    many = predict(model_dir, crop, mpp=MPP, client=client, region_um=500.0)
    assert one.n_obs >= 20 and many.uns["histology_prediction"]["params"]["cluster"][
        "n_regions"] >= 4
    np.testing.assert_allclose(many.X, one.X, atol=TOL, rtol=0)
    assert np.ptp(one.X, axis=0).min() > 10 * TOL


def test_vit_model_whose_weights_moved_predicts_the_same_on_the_cluster(client, tmp_path):
    """Workers load the encoder from where the user says the checkpoint is now."""
    import shutil

    import tifffile
    import torch

    from spotlens.histology._vit import VisionTransformerFeatures, ViTConfig

    torch.manual_seed(0)
    net = VisionTransformerFeatures(ViTConfig(dim=64, depth=1, num_heads=1, patch_size=8,
                                              grid=4, mlp_hidden=64))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    weights = tmp_path / "trained_here" / "vit.bin"
    weights.parent.mkdir()
    torch.save(net.state_dict(), weights)
    sections = [(ad.read_h5ad(MOB / f"MOB{i}.h5ad")[:80].copy(),
                 read_image(MOB / f"MOB{i}_HE.jpg", mpp=MPP)) for i in (1, 2)]
    model_dir = train(sections, genes=GENES, model="ridge", encoder="vit",
                      encoder_weights=weights, tile_scales=(1.0,), out=tmp_path / "model",
                      progress=False)
    moved = tmp_path / "moved" / "vit.bin"
    moved.parent.mkdir()
    shutil.move(weights, moved)
    with Image.open(MOB / "MOB3_HE.jpg") as im:
        pixels = np.asarray(im)[700:1100, 700:1100]
    crop = tmp_path / "MOB3_small.tif"
    tifffile.imwrite(crop, pixels, tile=(128, 128))
    model = load_model(model_dir, encoder_weights=moved)
    one = predict(model, crop, mpp=MPP)
    many = predict(model, crop, mpp=MPP, client=client, region_um=500.0)
    np.testing.assert_allclose(many.X, one.X, atol=TOL, rtol=0)
    assert np.ptp(one.X, axis=0).min() > 10 * TOL
