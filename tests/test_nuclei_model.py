"""The nucleus-level model (issue 16): nuclei sum to spots, recovery, round trip, bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse

from spotlens._validation import InputError
from spotlens.datasets import synthetic_nuclei
from spotlens.histology import (
    HistologyModel,
    NucleusModelConfig,
    NucleusPredictor,
    section_log_expression,
    train,
)
from spotlens.histology._metrics import pearson_per_gene
from spotlens.histology._nucleus_features import (
    MORPHOLOGY_FEATURES,
    nearest_spots,
    nucleus_spots,
    section_zscore_columns,
)
from spotlens.histology._nucleus_fit import spot_expression

torch = pytest.importorskip("torch")

FAST = NucleusModelConfig(context="none", max_epochs=150, eval_every=25, lr=1e-2, dropout=0.2)


def _inputs(section, genes, *, proportions=False):
    spots, nuclei = section["spots"], section["nuclei"]
    d = {"desc": section_zscore_columns(nuclei.obsm["X_nucleus"]),
         "spot": nucleus_spots(nuclei, spots.obs_names),
         "nearest": nearest_spots(nuclei.obsm["spatial"], spots.obsm["spatial"]),
         "features": section["features"], "y": section_log_expression(spots, genes),
         "library": np.asarray(spots.X.sum(1)).ravel()}
    if proportions:
        d["proportions"] = spots.obsm["true_proportions"].to_numpy()
    return d


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_nuclei(n_sections=3, n_spots=64, n_genes=12, nuclei_per_spot=10, seed=1)


@pytest.fixture(scope="module")
def fitted(synthetic):
    genes = list(synthetic[0]["nuclei"].var_names)
    types = list(synthetic[0]["signatures"].index)
    train_sets = {f"s{i}": _inputs(s, genes, proportions=True)
                  for i, s in enumerate(synthetic[:2])}
    return NucleusPredictor(genes, FAST, types=types).fit(train_sets)


def test_torch_and_numpy_aggregation_agree():
    from spotlens.histology._nucleus_module import aggregate_spots

    rng = np.random.default_rng(0)
    mu, rest = rng.gamma(1.0, 1.0, (30, 5)), rng.gamma(5.0, 1.0, 30)
    spot = rng.integers(-1, 6, 30)
    keep = spot >= 0
    expected = spot_expression(mu, rest, spot, 6)
    got = aggregate_spots(torch.tensor(mu[keep]), torch.tensor(rest[keep]),
                          torch.tensor(spot[keep]), 6).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # by hand for one spot: counts summed first, normalised after
    s = spot == 2
    by_hand = np.log1p(1e4 * mu[s].sum(0) / (mu[s].sum() + rest[s].sum()))
    np.testing.assert_allclose(expected[2], by_hand)


def test_nuclei_recovered_and_typed_on_held_out_section(fitted, synthetic):
    genes = fitted.genes
    test = synthetic[2]
    d = _inputs(test, genes)
    out = fitted.predict(d["desc"], d["features"], d["nearest"])
    nuclei = test["nuclei"]
    true = np.log1p(1e4 * nuclei.X / nuclei.obs["true_total"].to_numpy()[:, None])
    total = out["counts"].sum(1) + out["rest"]
    pred = np.log1p(1e4 * out["counts"] / total[:, None])
    assert pearson_per_gene(pred, true)[0].mean() > 0.5  # per nucleus, never seen
    accuracy = (out["types"].argmax(1) == nuclei.obs["cell_type"].cat.codes.to_numpy()).mean()
    assert accuracy > 0.8
    # spots: the sum of their nuclei predicts the measured spots
    spots = spot_expression(out["counts"], out["rest"], d["spot"], len(d["y"]))
    assert pearson_per_gene(spots, d["y"])[0].mean() > 0.3


def test_save_load_round_trip(fitted, synthetic, tmp_path):
    d = _inputs(synthetic[2], fitted.genes)
    fitted.save(tmp_path / "model.pt")
    back = NucleusPredictor.load(tmp_path / "model.pt")
    a = fitted.predict(d["desc"], d["features"], d["nearest"])
    b = back.predict(d["desc"], d["features"], d["nearest"])
    for key in ("counts", "rest", "types"):
        np.testing.assert_array_equal(a[key], b[key])
    assert back.types == fitted.types and back.validation == fitted.validation


def test_predictor_bad_input(fitted, synthetic):
    genes = fitted.genes
    sets = {f"s{i}": _inputs(s, genes) for i, s in enumerate(synthetic[:2])}
    with pytest.raises(InputError, match="at least 2"):
        NucleusPredictor(genes, FAST).fit({"s0": sets["s0"]})
    outside = {**sets, "s1": {**sets["s1"], "spot": np.full_like(sets["s1"]["spot"], -1)}}
    with pytest.raises(InputError, match="no nucleus lies in a spot"):
        NucleusPredictor(genes, FAST).fit(outside)
    with pytest.raises(InputError, match="genes"):
        NucleusPredictor(genes[:-1], FAST).fit(sets)
    with pytest.raises(InputError, match="proportions"):
        NucleusPredictor(genes, FAST, types=["a", "b"]).fit(sets)
    d = sets["s0"]
    with pytest.raises(InputError, match="n_nuclei × 34"):
        fitted.predict(d["desc"][:, :5], d["features"], d["nearest"])
    with pytest.raises(InputError, match="context"):
        NucleusModelConfig(context="neighbours")


# -- through train / HistologyModel, on a small image ---------------------------------------------

PITCH, SIZE = 40, 400


def _section(name, folder, seed):
    """An image with dark round 'nuclei' (type A, gene A up) and pale ones (type B)."""
    rng = np.random.default_rng(seed)
    img = np.full((SIZE, SIZE, 3), 235, np.uint8)
    centres = np.arange(PITCH, SIZE - PITCH + 1, PITCH, dtype=float)
    gx, gy = np.meshgrid(centres, centres)
    spots_xy = np.column_stack([gx.ravel(), gy.ravel()])
    xy = rng.uniform(20, SIZE - 20, (500, 2))
    dark = rng.uniform(0, 1, 500) < 0.5 * (1 + np.sin(xy[:, 0] / 60.0 + seed))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for (x, y), d in zip(xy, dark):
        m = (xx - x) ** 2 + (yy - y) ** 2 < 9
        img[m] = (70, 30, 120) if d else (200, 150, 200)
    dist = np.hypot(*(xy[:, None, :] - spots_xy[None]).transpose(2, 0, 1))
    spot = np.where(dist.min(1) <= PITCH / 4, dist.argmin(1), -1)
    genes = ["A", "B"] + [f"G{i}" for i in range(8)]
    lam = np.full((len(spots_xy), len(genes)), 2.0)
    for i in np.flatnonzero(spot >= 0):
        lam[spot[i], 0 if dark[i] else 1] += 6.0
    counts = rng.poisson(lam).astype(np.int32)
    names = [f"{name}_{i}" for i in range(len(spots_xy))]
    spots = ad.AnnData(sparse.csr_matrix(counts), obs=pd.DataFrame(index=names),
                       var=pd.DataFrame(index=genes))
    spots.obsm["spatial"] = spots_xy
    spots.uns["spatial"] = {name: {"scalefactors": {"spot_diameter_fullres": PITCH / 2},
                                   "metadata": {"microns_per_pixel": 1.0}}}
    obs = pd.DataFrame({c: rng.normal(size=500) for c in MORPHOLOGY_FEATURES},
                       index=[f"{name}_n{i}" for i in range(500)])
    obs["spot"] = pd.Categorical.from_codes(spot, categories=names)
    obs["dark"] = dark
    nuclei = ad.AnnData(obs=obs)
    nuclei.obsm["spatial"] = xy
    nuclei.uns["nuclei"] = {"params": {"mpp": 1.0}}
    path = folder / f"{name}_HE.png"
    Image.fromarray(img).save(path)
    return spots, path, nuclei


@pytest.fixture(scope="module")
def small_sections(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nuclei_sections")
    return [_section(f"S{i}", folder, i) for i in range(3)]


@pytest.fixture(scope="module")
def nucleus_model(small_sections, tmp_path_factory):
    out = tmp_path_factory.mktemp("nucleus_model")
    train([(s.copy(), p) for s, p, _ in small_sections[:2]], genes=["A", "B"],
          model="nucleus", encoder="colour", out_px=16, config=FAST, n_bootstrap=0,
          nuclei=[n for _, _, n in small_sections[:2]], out=out, progress=False)
    return out


def test_predict_nuclei_sums_to_spots_and_only_returns(nucleus_model, small_sections):
    spots, path, nuclei = small_sections[2]
    before = nuclei.copy()
    model = HistologyModel.load(nucleus_model)
    result = model.predict_nuclei(spots, image=path, cells=nuclei)
    assert result.n_obs == nuclei.n_obs and list(result.var_names) == ["A", "B"]
    np.testing.assert_array_equal(result.obsm["spatial"], nuclei.obsm["spatial"])
    assert (result.obs["spot"].astype(str) == nuclei.obs["spot"].astype(str)).all()
    # aggregation consistency: the stored spot predictions are the sums of the nuclei
    spot = result.obs["spot"].cat.codes.to_numpy()
    rest = result.obs["total_counts_predicted"].to_numpy() - result.layers["counts"].sum(1)
    again = spot_expression(result.layers["counts"].astype(np.float64), rest, spot, spots.n_obs)
    stored = result.uns["nucleus_prediction"]["spot_expression"]
    np.testing.assert_allclose(stored.to_numpy(), again, rtol=1e-4, atol=1e-5)
    assert list(stored.index) == list(spots.obs_names)
    # dark nuclei carry gene A, pale ones gene B: what the spots taught, seen in the crops
    dark = nuclei.obs["dark"].to_numpy()
    contrast = result.X[:, 0] - result.X[:, 1]
    assert contrast[dark].mean() > contrast[~dark].mean() + 0.5
    assert nuclei.obs.equals(before.obs) and "X_nucleus" not in nuclei.obsm  # not mutated


def test_predict_nuclei_bad_input(nucleus_model, small_sections, tmp_path):
    spots, path, nuclei = small_sections[2]
    model = HistologyModel.load(nucleus_model)
    with pytest.raises(InputError, match="no nuclei"):
        model.predict_nuclei(spots, image=path, cells=nuclei[:0].copy())
    with pytest.raises(InputError, match="another section"):
        model.predict_nuclei(spots, image=path, cells=small_sections[0][2])
    with pytest.raises(InputError, match="AnnData"):
        model.predict_nuclei(spots, image=path, cells=nuclei.obs)
    with pytest.raises(InputError, match="predict_nuclei"):
        model.predict(spots, image=path)
    sections = [(s.copy(), p) for s, p, _ in small_sections[:2]]
    with pytest.raises(InputError, match="one AnnData of nuclei"):
        train(sections, genes=["A"], model="nucleus", encoder="colour", nuclei=[nuclei],
              out=tmp_path / "m", progress=False)
    with pytest.raises(InputError, match="model='nucleus'"):
        train(sections, genes=["A"], model="ridge", encoder="colour",
              nuclei=[nuclei, nuclei], out=tmp_path / "m", progress=False)


def test_cli_predict_level_nucleus(nucleus_model, small_sections, tmp_path):
    from typer.testing import CliRunner

    from spotlens.cli import app

    spots, path, nuclei = small_sections[2]
    spots.write_h5ad(tmp_path / "S2.h5ad")
    nuclei.write_h5ad(tmp_path / "S2_nuclei.h5ad")
    out = tmp_path / "pred"
    args = ["histology", "predict", "-m", str(nucleus_model), "-i", str(path), "--mpp", "1",
            "--level", "nucleus", "--nuclei", str(tmp_path / "S2_nuclei.h5ad"),
            "--no-progress", "-q", "-o", str(out)]
    runner = CliRunner()
    res = runner.invoke(app, args + ["--section", str(tmp_path / "S2.h5ad"),
                                     "--plot-genes", "A"])
    assert res.exit_code == 0, res.output
    result = ad.read_h5ad(out / "nuclei_predicted.h5ad")
    table = pd.read_csv(out / "spots_from_nuclei.csv", index_col=0)
    assert result.n_obs == nuclei.n_obs and list(table.columns) == ["A", "B"]
    assert (out / "nuclei_A.png").is_file()
    # no --section: the image alone, nuclei summed into a grid of pseudo-spots over its
    # tissue (a pink background, which the tissue mask finds)
    pixels = np.asarray(Image.open(path)).copy()
    background = (pixels == 235).all(axis=2)
    background[:, SIZE * 3 // 4:] = False  # the right quarter stays glass
    pixels[background] = (225, 170, 205)
    Image.fromarray(pixels).save(tmp_path / "S2_tissue_HE.png")
    args[args.index(str(path))] = str(tmp_path / "S2_tissue_HE.png")
    res = runner.invoke(app, args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    alone = ad.read_h5ad(out / "nuclei_predicted.h5ad")
    assert alone.n_obs == nuclei.n_obs
    grid = pd.read_csv(out / "spots_from_nuclei.csv", index_col=0)
    assert list(grid.columns) == ["A", "B"] and not set(grid.index) & set(spots.obs_names)


def _with_proportions(spots, nuclei, key="proportions_ref"):
    """Spots with the share of dark / pale nuclei as their 'deconvolved' proportions."""
    spots = spots.copy()
    spot = nuclei.obs["spot"].cat.codes.to_numpy()
    dark = nuclei.obs["dark"].to_numpy()
    n = np.zeros((spots.n_obs, 2))
    np.add.at(n, (spot[spot >= 0], (~dark[spot >= 0]).astype(int)), 1.0)
    n[n.sum(1) == 0] = 1.0
    spots.obsm[key] = pd.DataFrame(n / n.sum(1, keepdims=True), index=spots.obs_names,
                                   columns=["dark_type", "pale_type"])
    return spots


def test_type_head_from_proportions_calls_types(small_sections, tmp_path):
    from dataclasses import replace

    config = replace(FAST, proportions_key="proportions_ref")
    sections = [(_with_proportions(s, n), p) for s, p, n in small_sections[:2]]
    out = train(sections, genes=["A", "B"], model="nucleus", encoder="colour", out_px=16,
                config=config, n_bootstrap=0, nuclei=[n for _, _, n in small_sections[:2]],
                out=tmp_path / "m", progress=False)
    spots, path, nuclei = small_sections[2]
    result = HistologyModel.load(out).predict_nuclei(spots, image=path, cells=nuclei)
    called = result.obs["cell_type"].astype(str).to_numpy()
    truth = np.where(nuclei.obs["dark"], "dark_type", "pale_type")
    assert (called == truth).mean() > 0.8
    confidence = result.obs["cell_type_confidence"].to_numpy()
    assert ((confidence >= 0.5) & (confidence <= 1)).all()  # max of 2 probabilities
    bad = [(s.copy(), p) for s, p in sections]
    bad[0][0].obsm["proportions_ref"] = bad[0][0].obsm["proportions_ref"] * 2
    with pytest.raises(InputError, match="summing to 1"):
        train(bad, genes=["A"], model="nucleus", encoder="colour", out_px=16, config=config,
              n_bootstrap=0, nuclei=[n for _, _, n in small_sections[:2]],
              out=tmp_path / "m2", progress=False)


def test_predict_image_nuclei_without_measured_spots(nucleus_model, small_sections):
    """An image alone: the nuclei are put on a grid of pseudo-spots and predicted as with
    measured spots (dark nuclei carry gene A); the nuclei given are not modified."""
    from spotlens.histology import predict_image_nuclei

    _, path, nuclei = small_sections[2]
    before = nuclei.obs.copy()
    result = predict_image_nuclei(nucleus_model, path, nuclei=nuclei, mpp=1.0,
                                  mask=np.ones((SIZE, SIZE), bool))
    assert result.n_obs == nuclei.n_obs and list(result.var_names) == ["A", "B"]
    entry = result.uns["nucleus_prediction"]
    grid = entry["grid"]
    assert len(grid) > 0 and entry["params"]["spacing_um"] > 0
    spot = result.obs["spot"]
    assert set(spot.cat.categories) == set(grid.index)
    assert spot.notna().any()
    # a nucleus in a pseudo-spot lies within its circle (the training spots' diameter)
    inside = spot.notna().to_numpy()
    centres = grid.loc[spot[inside].astype(str)].to_numpy()
    radius = PITCH / 4  # spot_diameter_fullres PITCH / 2 in the training sections
    assert (np.hypot(*(result.obsm["spatial"][inside] - centres).T) <= radius + 1e-9).all()
    dark = nuclei.obs["dark"].to_numpy()
    contrast = result.X[:, 0] - result.X[:, 1]
    assert contrast[dark].mean() > contrast[~dark].mean() + 0.5
    assert nuclei.obs.equals(before)


def test_predict_image_nuclei_needs_a_nucleus_model(small_sections, tmp_path):
    from spotlens.histology import predict_image_nuclei

    sections = [(s.copy(), p) for s, p, _ in small_sections[:2]]
    train(sections, genes=["A", "B"], model="ridge", encoder="colour", out_px=16,
          n_bootstrap=0, out=tmp_path / "ridge", progress=False)
    with pytest.raises(InputError, match="needs a nucleus model"):
        predict_image_nuclei(tmp_path / "ridge", small_sections[2][1], mpp=1.0)


# -- the "route" context: nuclei start from the spot-level route -------------------------------

ROUTE = NucleusModelConfig(context="route", max_epochs=40, eval_every=20, lr=1e-2)


@pytest.fixture(scope="module")
def four_sections():
    sections = synthetic_nuclei(n_sections=5, n_spots=64, n_genes=12, nuclei_per_spot=10,
                                seed=3)
    genes = list(sections[0]["nuclei"].var_names)
    return genes, {f"s{i}": _inputs(s, genes) for i, s in enumerate(sections[:4])}, \
        _inputs(sections[4], genes)


def test_route_context_is_cross_fitted_and_starts_at_the_route(four_sections, monkeypatch):
    from spotlens.histology import _nucleus_fit

    genes, train_sets, test = four_sections
    calls = []
    fit_route, prior = _nucleus_fit._fit_route, _nucleus_fit._prior

    def recording_fit(sections):
        route = fit_route(sections)
        route._fitted_on = {id(d["y"]) for d in sections}
        return route

    monkeypatch.setattr(_nucleus_fit, "_fit_route", recording_fit)
    monkeypatch.setattr(_nucleus_fit, "_prior", lambda route, d: (
        calls.append((route._fitted_on, id(d.get("y")))) or prior(route, d)))
    model = NucleusPredictor(genes, ROUTE).fit(train_sets)
    # no section's starting profile comes from a route fitted on that section
    train_ids = {id(d["y"]) for d in train_sets.values()}
    assert calls and all(target not in fitted for fitted, target in calls)
    assert {t for _, t in calls} == train_ids  # every training section got a prior
    calls.clear()
    assert model.config.context == "route" and 0 in model.validation["curve"]
    # with 0 epochs the network is the route: its nuclei add up to the route's prediction
    model._net = model._train(_nucleus_fit._with_priors(list(train_sets.values())),
                              model._pca, "route", 0)[0]
    out = model.predict(test["desc"], test["features"], test["nearest"])
    spots = spot_expression(out["counts"], out["rest"], test["spot"], len(test["y"]))
    route = np.log1p(np.maximum(np.expm1(model._route.predict(test["features"])), 1e-4))
    has_nuclei = np.bincount(test["spot"][test["spot"] >= 0], minlength=len(test["y"])) > 0
    np.testing.assert_allclose(spots[has_nuclei], route[has_nuclei], atol=1e-4)


def test_route_context_round_trip_and_needs_four_sections(four_sections, tmp_path):
    genes, train_sets, test = four_sections
    model = NucleusPredictor(genes, ROUTE).fit(train_sets)
    model.save(tmp_path / "route.pt")
    back = NucleusPredictor.load(tmp_path / "route.pt")
    a = model.predict(test["desc"], test["features"], test["nearest"])
    b = back.predict(test["desc"], test["features"], test["nearest"])
    np.testing.assert_array_equal(a["counts"], b["counts"])
    three = dict(list(train_sets.items())[:3])
    with pytest.raises(InputError, match="at least 4"):
        NucleusPredictor(genes, ROUTE).fit(three)
    # auto leaves the route out with three sections instead of failing
    auto = NucleusPredictor(genes, NucleusModelConfig(max_epochs=20, eval_every=10)).fit(three)
    assert set(auto.validation["context_scores"]) == {"spot", "none"}
