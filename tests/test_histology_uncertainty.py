"""The uncertainty predict stores (issue 15, item 4): a block-bootstrap ensemble of ridge heads.

Kernel against an independent ridge, the spread's properties (fewer or noisier training data,
features far from the training spots -> larger), the keys predict and predict_image write,
save/load, old model folders without an ensemble, and the measured | predicted | uncertainty
figure (one colour scale, atomic PNG).
"""

from __future__ import annotations

import json
import logging
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_histology_pipeline import GENES, make_section, pairs

import spotlens.pl
from spotlens._validation import InputError
from spotlens.histology import (
    RidgeBaseline,
    load_model,
    predict,
    predict_image,
    section_log_expression,
    train,
)
from spotlens.histology._baseline import _ridge_path
from spotlens.histology._uncertainty import (
    RidgeEnsemble,
    check_n_bootstrap,
    fit_ensemble,
    section_block_weights,
    weighted_ridge,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sections")
    return {s: make_section(s, folder, seed=i) for i, s in enumerate(["S1", "S2", "S3", "S4"])}


@pytest.fixture(scope="module")
def ridge_dir(data, tmp_path_factory):
    return train(pairs(data, ["S1", "S2", "S3"]), genes=GENES, model="ridge", encoder="colour",
                 out_px=32, out=tmp_path_factory.mktemp("ridge"), progress=False,
                 n_bootstrap=8)


# -- the kernel ----------------------------------------------------------------------------------


def test_weighted_ridge_matches_ridge_on_repeated_rows():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 3))
    coef, intercept = weighted_ridge(z, y, np.ones((1, 30)), 2.0)
    _, ref = _ridge_path(z, y, np.array([2.0]))
    w_ref, b_ref = ref(0)
    np.testing.assert_allclose(coef[0], w_ref, atol=1e-10)
    np.testing.assert_allclose(intercept[0], b_ref, atol=1e-10)
    # multiplicities = rows drawn that many times (the bootstrap), against an explicit copy
    w = rng.integers(0, 3, size=30).astype(float)
    coef, intercept = weighted_ridge(z, y, w[None], 2.0)
    rows = np.repeat(np.arange(30), w.astype(int))
    _, ref = _ridge_path(z[rows], y[rows], np.array([2.0]))
    np.testing.assert_allclose(coef[0], ref(0)[0], atol=1e-10)
    np.testing.assert_allclose(intercept[0], ref(0)[1], atol=1e-10)


def test_block_weights_resample_tiles_within_each_section():
    grid = np.stack(np.meshgrid(np.arange(12.0), np.arange(12.0)), -1).reshape(-1, 2)
    w = section_block_weights([grid, grid + 100], 50, np.random.default_rng(0))
    assert w.shape == (50, 288)
    # each section keeps its size on average and spots of one 4x4 tile share a weight
    assert np.allclose(w[:, :144].sum(axis=1).mean(), 144, rtol=0.1)
    tile = (grid[:, 0] < 4) & (grid[:, 1] < 4)
    assert np.all(w[:, :144][:, tile] == w[:, :144][:, tile][:, :1])


# -- properties of the spread --------------------------------------------------------------------


def _sections(rng, n_spots, noise, n_sections=3):
    """Sections of features ~ N(0, 1) on a grid; gene j = x·beta_j + noise_j·ε."""
    beta = rng.normal(size=(5, len(noise)))
    side = int(np.ceil(np.sqrt(n_spots)))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_spots]
    data = {}
    for k in range(n_sections):
        x = rng.normal(size=(n_spots, 5))
        y = x @ beta + rng.normal(size=(n_spots, len(noise))) * np.asarray(noise)
        data[f"s{k}"] = {"features": x, "coords": coords * 100.0, "y": y}
    return data


def _ensemble(data, n_boot=16, seed=0):
    names = list(data)
    ridge = RidgeBaseline(n_components=5, alpha=1.0).fit(
        {n: data[n]["features"] for n in names}, {n: data[n]["y"] for n in names})
    return fit_ensemble(names, data, ridge=ridge, n_boot=n_boot, seed=seed)


def test_spread_is_larger_for_fewer_and_noisier_training_spots():
    rng = np.random.default_rng(1)
    test_x = rng.normal(size=(200, 5))
    few = _ensemble(_sections(rng, 25, [0.5, 2.0])).std(test_x)
    many = _ensemble(_sections(rng, 400, [0.5, 2.0])).std(test_x)
    assert few.shape == (200, 2) and (few >= 0).all() and (many >= 0).all()
    # fewer training spots: wider everywhere (median over spots), for both genes
    assert np.all(np.median(few, axis=0) > 2 * np.median(many, axis=0))
    # the noisier gene (noise 2 vs 0.5) is less certain, spot by spot
    assert np.mean(many[:, 1] > many[:, 0]) > 0.95


def test_spread_grows_away_from_the_training_spots():
    rng = np.random.default_rng(2)
    ens = _ensemble(_sections(rng, 100, [1.0]))
    inside = ens.std(rng.normal(size=(100, 5)))
    outside = ens.std(rng.normal(size=(100, 5)) * 6)  # far out of the training range
    assert np.median(outside) > 3 * np.median(inside)


def test_ridge_ensemble_centres_on_the_model_and_saves(tmp_path):
    rng = np.random.default_rng(3)
    data = _sections(rng, 100, [0.3, 0.3])
    names = list(data)
    ridge = RidgeBaseline(n_components=5, alpha=1.0).fit(
        {n: data[n]["features"] for n in names}, {n: data[n]["y"] for n in names})
    ens = fit_ensemble(names, data, ridge=ridge, n_boot=30)
    x = rng.normal(size=(50, 5))
    members = ens.members(x)
    assert members.shape == (30, 50, 2)
    # the members scatter around the model's own prediction
    assert np.abs(members.mean(axis=0) - ridge.predict(x)).max() < 3 * ens.std(x).max()
    np.testing.assert_allclose(ens.std(x, chunk_size=7), members.std(axis=0, ddof=1),
                               rtol=1e-6)  # spots in chunks: the same numbers
    ens.save(tmp_path / "u.npz")
    back = RidgeEnsemble.load(tmp_path / "u.npz")
    np.testing.assert_allclose(back.std(x), ens.std(x), rtol=1e-4, atol=1e-6)
    assert back.method == ens.method and back.n_boot == 30
    with pytest.raises(InputError, match="No uncertainty ensemble"):
        RidgeEnsemble.load(tmp_path / "missing.npz")
    with pytest.raises(InputError, match=r"n_spots × 5"):
        ens.std(np.zeros((3, 4)))


# -- predict: keys, save/load, old folders -------------------------------------------------------


def test_predict_writes_the_uncertainty_and_it_survives_save_load(data, ridge_dir, tmp_path):
    adata, image, _ = data["S4"]
    adata = adata.copy()
    predict(adata, model=ridge_dir, image=image)
    std = adata.obsm["histology_prediction_std"]
    assert std.shape == (adata.n_obs, len(GENES)) and list(std.columns) == GENES
    assert std.index.equals(adata.obs_names)
    assert np.isfinite(std.to_numpy()).all() and (std.to_numpy() >= 0).all()
    assert (std.to_numpy() > 0).any()
    params = adata.uns["histology_prediction"]["params"]
    assert "8 members" in params["uncertainty"]
    record = json.loads((ridge_dir / "config.json").read_text())["uncertainty"]
    assert record["file"] == "uncertainty.npz" and record["n_boot"] == 8
    # the folder copied elsewhere gives the same numbers; the h5ad keeps them
    moved = shutil.copytree(ridge_dir, tmp_path / "moved")
    again = predict(data["S4"][0].copy(), model=moved, image=image, inplace=False)
    np.testing.assert_allclose(again.std.to_numpy(), std.to_numpy(), rtol=1e-5)
    adata.write_h5ad(tmp_path / "p.h5ad")
    back = ad.read_h5ad(tmp_path / "p.h5ad")
    np.testing.assert_allclose(np.asarray(back.obsm["histology_prediction_std"]),
                               std.to_numpy())


def test_an_old_model_folder_without_ensemble_still_predicts(data, ridge_dir, tmp_path, caplog):
    old = shutil.copytree(ridge_dir, tmp_path / "old")
    (old / "uncertainty.npz").unlink()
    raw = json.loads((old / "config.json").read_text())
    raw.pop("uncertainty")
    (old / "config.json").write_text(json.dumps(raw))
    adata, image, _ = data["S4"]
    model = load_model(old)
    assert not model.has_uncertainty
    result = predict(adata.copy(), model=old, image=image, inplace=False)
    assert result.std is None
    reference = predict(adata.copy(), model=ridge_dir, image=image, inplace=False)
    pd.testing.assert_frame_equal(result.expression, reference.expression)
    written = adata.copy()
    with caplog.at_level(logging.WARNING, logger="spotlens"):
        predict(written, model=old, image=image)
    assert "histology_prediction_std" not in written.obsm
    assert written.uns["histology_prediction"]["params"]["uncertainty"].startswith(
        "not available")
    assert "no uncertainty" in caplog.text
    with pytest.raises(InputError, match="no uncertainty ensemble.*retrain"):
        model.uncertainty_features(np.zeros((2, model.n_features), np.float32))
    # config.json naming an ensemble whose file is gone: a warning, not a crash
    (old / "config.json").write_text(json.dumps({**raw, "uncertainty": {
        "file": "uncertainty.npz"}}))
    with caplog.at_level(logging.WARNING, logger="spotlens"):
        assert not load_model(old).has_uncertainty
    assert "uncertainty.npz is missing" in caplog.text


def test_train_n_bootstrap_zero_writes_no_ensemble_and_bad_values_are_refused(data, tmp_path):
    out = train(pairs(data, ["S1", "S2"]), genes=GENES, model="ridge", encoder="colour",
                out_px=32, out=tmp_path / "none", progress=False, n_bootstrap=0)
    assert not (out / "uncertainty.npz").exists()
    assert json.loads((out / "config.json").read_text())["uncertainty"] is None
    for bad in (1, -2, 2.5, True):
        with pytest.raises(InputError, match="n_bootstrap must be 0"):
            train(pairs(data, ["S1", "S2"]), genes=GENES, model="ridge", encoder="colour",
                  out=tmp_path / "bad", progress=False, n_bootstrap=bad)


@pytest.mark.parametrize("good", [0, 2, 30, np.int64(5), np.int64(0)])
def test_check_n_bootstrap_accepts_zero_and_integers_from_two(good):
    assert check_n_bootstrap(good) == good and type(check_n_bootstrap(good)) is int


@pytest.mark.parametrize(
    ("bad", "allow_zero", "message"),
    [
        (1, True, r"n_bootstrap must be 0 \(no uncertainty\) or an integer ≥ 2, got 1\."),
        (-2, True, r"or an integer ≥ 2, got -2\."),
        (np.int64(1), True, r"or an integer ≥ 2, got np\.int64\(1\)\."),
        (2.5, True, r"or an integer ≥ 2, got 2\.5\."),
        (2.0, True, r"or an integer ≥ 2, got 2\.0\."),
        (True, True, r"or an integer ≥ 2, got True\."),
        ("3", True, r"or an integer ≥ 2, got '3'\."),
        (None, True, r"or an integer ≥ 2, got None\."),
        (0, False, r"^n_bootstrap must be an integer ≥ 2, got 0\.$"),
        (1, False, r"^n_bootstrap must be an integer ≥ 2, got 1\.$"),
    ],
)
def test_check_n_bootstrap_names_the_argument_and_the_allowed_values(bad, allow_zero, message):
    with pytest.raises(InputError, match=message):
        check_n_bootstrap(bad, allow_zero=allow_zero)


def test_predict_image_returns_the_uncertainty_layer(data, ridge_dir):
    _, image, _ = data["S4"]
    grid = predict_image(ridge_dir, image, mpp=1.0)
    std = grid.layers["histology_prediction_std"]
    assert std.shape == grid.X.shape and std.dtype == np.float32 and (std >= 0).all()
    assert "members" in grid.uns["histology_prediction"]["params"]["uncertainty"]


# -- the figure ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predicted(data, ridge_dir):
    adata, image, _ = data["S4"]
    spots = ad.AnnData(section_log_expression(adata, GENES).astype(np.float32),
                       obs=adata.obs[[]].copy(), var=pd.DataFrame(index=GENES))
    spots.obsm["spatial"] = adata.obsm["spatial"].copy()
    spots.uns["spatial"] = adata.uns["spatial"]
    predict(spots, model=ridge_dir, image=image)
    return spots


def _norms(fig, n):
    return [(ax.collections[0].norm.vmin, ax.collections[0].norm.vmax) for ax in fig.axes[:n]]


def test_prediction_figure_puts_both_maps_on_one_scale(predicted):
    before = {k: v.copy() for k, v in predicted.obsm.items()}
    fig = spotlens.pl.prediction(predicted, "TUM", n_boot=200, title="S4")
    (m, p, s) = _norms(fig, 3)
    assert m == p == (0.0, 100.0)  # percentile ranks, one scale
    assert s[0] == 0.0 and s[1] > 0  # the uncertainty: its own absolute scale
    colours = [np.asarray(ax.collections[0].get_array()) for ax in fig.axes[:2]]
    assert all(c.min() > 0 and c.max() < 100 for c in colours)
    assert [ax.collections[0].get_alpha() for ax in fig.axes[:3]] == [0.6] * 3
    title = fig._suptitle.get_text()
    assert "S4: TUM" in title and "Pearson r = " in title and "95% CI" in title
    assert any("percentile rank" in ax.get_xlabel() for ax in fig.axes[3:])
    shared = spotlens.pl.prediction(predicted, "TUM", scale="shared", n_boot=0)
    (m, p, _) = _norms(shared, 3)
    assert m == p and m[0] < m[1]
    both = np.concatenate([np.asarray(predicted.X[:, 0]).ravel(),
                           predicted.obsm["histology_prediction"]["TUM"].to_numpy()])
    np.testing.assert_allclose(m, np.percentile(both, [1, 99]), rtol=1e-6)
    assert set(predicted.obsm) == set(before)  # nothing written
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(predicted.obsm[k]), np.asarray(v))


def test_prediction_figure_without_uncertainty_has_two_panels(predicted):
    two = predicted.copy()
    del two.obsm["histology_prediction_std"]
    fig = spotlens.pl.prediction(two, "STR", n_boot=0)
    assert [ax.get_title().split()[0] for ax in fig.axes[:2]] == ["measured", "predicted"]
    assert len([ax for ax in fig.axes if ax.collections and ax.get_title()]) == 2


def test_prediction_figure_writes_a_png_atomically(predicted, tmp_path, monkeypatch):
    path = tmp_path / "TUM.png"
    spotlens.pl.prediction(predicted, "TUM", n_boot=0, save=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TUM.png"]  # no temporary left
    first = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        spotlens.pl.prediction(predicted, "STR", n_boot=0, save=path)
    assert path.read_bytes() == first  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TUM.png"]


def test_prediction_figure_bad_input_names_the_fix(predicted):
    with pytest.raises(InputError, match="scale must be one of"):
        spotlens.pl.prediction(predicted, "TUM", scale="absolute")
    with pytest.raises(InputError, match="run spotlens.histology.predict first"):
        spotlens.pl.prediction(predicted, "TUM", key="nope")
    with pytest.raises(InputError, match="'NOPE' is not in adata.var_names"):
        spotlens.pl.prediction(predicted, "NOPE")
    with pytest.raises(InputError, match="alpha must be in"):
        spotlens.pl.prediction(predicted, "TUM", alpha=0)
    with pytest.raises(InputError, match="obsm has no 'sd'"):
        spotlens.pl.prediction(predicted, "TUM", std_key="sd")
    with pytest.raises(InputError, match="needs an AnnData"):
        spotlens.pl.prediction(predicted.X, "TUM")
