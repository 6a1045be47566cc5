"""Histology AnnData-native (issue 14, points 2-3): documented keys, inplace, spatial_key,
library_id; the model folder's schema; one model class over every model type.

Synthetic sections of test_histology_pipeline (tumour blob in pink tissue), colour features and
the ridge model, so no torch is needed except where a network is asked for.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_histology_pipeline import GENES, make_section, pairs

from spotlens._validation import InputError
from spotlens.histology import (
    MODEL_TYPES,
    HistologyModel,
    RidgeBaseline,
    image_features,
    load_model,
    predict,
    train,
)
from spotlens.histology import section_log_expression
from spotlens.histology._folder import ModelConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sections")
    return {s: make_section(s, folder, seed=i) for i, s in enumerate(["S1", "S2", "S3", "S4"])}


@pytest.fixture(scope="module")
def ridge_dir(data, tmp_path_factory):
    return train(pairs(data, ["S1", "S2", "S3"]), genes=GENES, model="ridge", encoder="colour",
                 out_px=32, tile_scales=(1, 2, 4), out=tmp_path_factory.mktemp("ridge"),
                 progress=False)


def _snapshot(adata):
    return {"obsm": set(adata.obsm), "uns": set(adata.uns), "obs": adata.obs.copy(),
            "var": adata.var.copy(), "X": adata.X.copy(), "layers": set(adata.layers)}


def _same(before, adata, *, obsm=(), uns=()):
    assert set(adata.obsm) == before["obsm"] | set(obsm)
    assert set(adata.uns) == before["uns"] | set(uns)
    assert set(adata.layers) == before["layers"]
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    pd.testing.assert_frame_equal(adata.var, before["var"])
    assert (adata.X != before["X"]).nnz == 0


# -- predict: documented keys --------------------------------------------------------------------


def test_predict_writes_only_its_documented_keys(data, ridge_dir):
    adata, image, _ = data["S4"]
    adata = adata.copy()
    before = _snapshot(adata)
    assert predict(adata, model=ridge_dir, image=image) is None
    _same(before, adata, obsm={"histology_prediction", "histology_prediction_std", "X_colour"},
          uns={"histology_prediction"})
    table = adata.obsm["histology_prediction"]
    std = adata.obsm["histology_prediction_std"]
    assert std.shape == table.shape and std.index.equals(table.index)
    assert list(std.columns) == GENES and (std.to_numpy() >= 0).all()
    assert list(table.columns) == GENES and table.index.equals(adata.obs_names)
    record = adata.uns["histology_prediction"]
    assert record["genes"] == GENES
    params = record["params"]
    assert params["model_type"] == "ridge" and params["encoder"] == "colour"
    assert params["spatial_key"] == "spatial" and params["library_id"] == "S4"
    assert params["tile_um"] == pytest.approx(20.0) and params["mpp"] == pytest.approx(1.0)
    assert "bootstrap" in params["uncertainty"]
    assert adata.obsm["X_colour"].shape == (adata.n_obs, 3 * 25)  # 3 tile scales
    # the same numbers as the array API, and the model learnt the image
    model = load_model(ridge_dir)
    np.testing.assert_allclose(table.to_numpy(), model.predict_section(data["S4"][0], image=image))
    truth = section_log_expression(adata, ["TUM"])[:, 0]
    assert np.corrcoef(table["TUM"], truth)[0, 1] > 0.6


def test_predict_inplace_false_returns_the_result_and_changes_nothing(data, ridge_dir):
    adata, image, _ = data["S4"]
    adata = adata.copy()
    before = _snapshot(adata)
    result = predict(adata, model=ridge_dir, image=image, inplace=False)
    _same(before, adata)
    written = adata.copy()
    predict(written, model=ridge_dir, image=image, key_added="pred", features_key="feats")
    assert {"pred", "pred_std", "feats"} <= set(written.obsm) and "pred" in written.uns
    pd.testing.assert_frame_equal(result.expression, written.obsm["pred"])
    pd.testing.assert_frame_equal(result.std, written.obsm["pred_std"])


def test_predict_honours_spatial_key_and_library_id(data, ridge_dir):
    adata, image, _ = data["S4"]
    base = predict(adata.copy(), model=ridge_dir, image=image, inplace=False).expression
    moved = adata.copy()
    moved.obsm["centres"] = moved.obsm.pop("spatial")
    again = predict(moved, model=ridge_dir, image=image, spatial_key="centres",
                    inplace=False).expression
    pd.testing.assert_frame_equal(base, again)
    with pytest.raises(InputError, match=r"no obsm\['spatial'\]"):
        predict(moved, model=ridge_dir, image=image)
    two = adata.copy()
    two.uns["spatial"] = {"S4": adata.uns["spatial"]["S4"], "other": {"scalefactors": {}}}
    with pytest.raises(InputError, match="2 libraries"):
        predict(two, model=ridge_dir, image=image)
    picked = predict(two, model=ridge_dir, image=image, library_id="S4",
                     inplace=False).expression
    pd.testing.assert_frame_equal(base, picked)
    with pytest.raises(InputError, match="no library 'nope'"):
        predict(two, model=ridge_dir, image=image, library_id="nope")


def test_predict_bad_input_names_the_fix(data, ridge_dir):
    adata, image, _ = data["S4"]
    with pytest.raises(InputError, match="takes an AnnData first.*predict_image"):
        predict(ridge_dir, model=ridge_dir, image=image)
    with pytest.raises(InputError, match="no config.json"):
        predict(adata.copy(), model=image.parent, image=image)
    with pytest.raises(InputError, match="coarser than the training scans"):
        predict(adata.copy(), model=ridge_dir, image=image, mpp=5.0)


def test_image_features_write_x_encoder(data, ridge_dir):
    adata, image, _ = data["S4"]
    adata = adata.copy()
    before = _snapshot(adata)
    feats = image_features(adata, model=ridge_dir, image=image, inplace=False)
    _same(before, adata)
    assert feats.shape == (adata.n_obs, 75) and feats.dtype == np.float32
    assert image_features(adata, model=ridge_dir, image=image) is None
    _same(before, adata, obsm={"X_colour"})
    np.testing.assert_array_equal(adata.obsm["X_colour"], feats)
    image_features(adata, model=ridge_dir, image=image, key_added="X_mine")
    assert "X_mine" in adata.obsm
    with pytest.raises(InputError, match="takes an AnnData first"):
        image_features(adata.X, model=ridge_dir, image=image)


# -- one model class; the folder ----------------------------------------------------------------


def test_model_class_fit_save_load_predict_round_trip(data, tmp_path):
    fitted = HistologyModel.fit(pairs(data, ["S1", "S2"]), genes=GENES, model="ridge",
                                encoder="colour", out_px=32, progress=False)
    assert fitted.path is None and fitted.genes == GENES
    s4, image, _ = data["S4"]
    before = fitted.predict(s4.copy(), image=image, inplace=False)
    folder = fitted.save(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.npz",
                                                        "uncertainty.npz"]
    again = HistologyModel.load(folder)
    after = again.predict(s4.copy(), image=image, inplace=False)
    pd.testing.assert_frame_equal(before.expression, after.expression)
    pd.testing.assert_frame_equal(before.std, after.std, rtol=1e-5)  # float32 on disk
    assert isinstance(again.predictor, RidgeBaseline)


def test_ridge_baseline_saves_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    xs = {s: rng.normal(size=(40, 6)) for s in "abc"}
    w = rng.normal(size=(6, 4))
    ys = {s: x @ w + 0.1 * rng.normal(size=(40, 4)) for s, x in xs.items()}
    ridge = RidgeBaseline(n_components=5).fit(xs, ys)
    ridge.save(tmp_path / "r.npz")
    back = RidgeBaseline.load(tmp_path / "r.npz")
    x_new = rng.normal(size=(7, 6))
    np.testing.assert_array_equal(back.predict(x_new), ridge.predict(x_new))
    assert back.alpha_ == ridge.alpha_ and back.n_features_in_ == 6
    with pytest.raises(InputError, match="not fitted"):
        RidgeBaseline().save(tmp_path / "x.npz")
    with pytest.raises(InputError, match="No ridge model file"):
        RidgeBaseline.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", coef=np.zeros(3))
    with pytest.raises(InputError, match="not a spotlens ridge model"):
        RidgeBaseline.load(tmp_path / "bad.npz")


def test_config_schema_round_trips_the_json_and_reads_old_folders(ridge_dir, data, tmp_path):
    raw = json.loads((ridge_dir / "config.json").read_text())
    settings = ModelConfig.read(ridge_dir)
    assert json.loads(json.dumps(settings.to_dict())) == raw  # the on-disk format is kept
    with pytest.raises(Exception):  # frozen
        settings.model_type = "graph"
    # a folder from before multi-scale tiles: no scales, standardize, identity, pitch px
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.npz").write_bytes((ridge_dir / "model.npz").read_bytes())
    for key in ("scales", "standardize", "tile_um_argument", "spot_pitch_px"):
        raw["tiles"].pop(key)
    (old / "config.json").write_text(json.dumps(raw))
    model = load_model(old)
    assert model.tile_scales == (1.0,) and not model.standardize and model.n_features == 25
    raw["format"] = "something/else"
    (old / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="not a spotlens histology model config"):
        load_model(old)


def test_every_model_type_is_registered_in_one_place():
    assert tuple(MODEL_TYPES) == ("attention", "graph", "ridge", "nucleus")
    assert MODEL_TYPES["ridge"].file == "model.npz" and not MODEL_TYPES["ridge"].trains_network
    # the nucleus model fits its own network from nuclei, not through TrainConfig
    assert MODEL_TYPES["nucleus"].file == "model.pt" and not MODEL_TYPES["nucleus"].trains_network
    assert all(MODEL_TYPES[k].file == "model.pt" and MODEL_TYPES[k].trains_network
               for k in ("attention", "graph"))


def test_networks_carry_their_own_loss():
    torch = pytest.importorskip("torch")
    from spotlens.histology import TrainConfig
    from spotlens.histology._models import graph_loss, spot_attention_loss
    from spotlens.histology._registry import network_class

    config = TrainConfig(hidden=8, latent=4, dropout=0.0, k_neighbors=3, recon_weight=0.5)
    coords = np.stack(np.meshgrid(np.arange(4.0), np.arange(3.0)), -1).reshape(-1, 2)
    x, y = torch.randn(12, 5), torch.randn(12, 2)
    for name in ("attention", "graph"):
        torch.manual_seed(0)
        net = network_class(name).from_config(5, 2, config)
        batch = [{"x": x[:6], "y": y[:6], **net.section_inputs(coords[:6], "cpu")},
                 {"x": x[6:], "y": y[6:], **net.section_inputs(coords[6:], "cpu")}]
        loss = net.loss(batch)
        if name == "attention":  # every spot against the other section's spots only
            exclude = torch.zeros(12, 12, dtype=torch.bool)
            exclude[:6, :6] = exclude[6:, 6:] = True
            expected = spot_attention_loss(y, *net(x, x, y, exclude=exclude))
        else:  # the mean over sections of each section's loss on its own graph
            expected = sum(graph_loss(t["y"], e, target, recon, recon_weight=0.5)
                           for t in batch
                           for e, recon, target in [net(t["x"], t["edges"], t["a_hat"])]) / 2
        assert torch.allclose(loss, expected)
        assert net.decode(x[:6], batch[0], (x, y)).shape == (6, 2)
