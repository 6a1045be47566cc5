"""Expression from H&E end to end: train -> evaluate -> predict through the files written.

Synthetic sections: a pink tissue square on white glass with a purple "tumour" blob whose place
differs per section; gene TUM is up under the blob, STR away from it. Features are the 25 colour
statistics, so a model that learns anything must predict TUM high on purple tiles.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse

from spotlens._validation import InputError
from spotlens.histology import TrainConfig, load_model, load_section, train
from spotlens.histology import evaluate_model as evaluate
from spotlens.histology import predict_image as predict

PINK = np.array([235.0, 160.0, 200.0])
PURPLE = np.array([110.0, 50.0, 150.0])
SIZE, LO, PITCH = 480, 60, 40  # px; µm/px = 1, so 40 µm pitch and 20 µm spots
GENES = ["TUM", "STR", "G02"]
FAST = TrainConfig(hidden=16, epochs=12, patience=50)
HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


def _tumour_weight(cx, cy):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 70.0**2))


def make_section(name: str, folder: Path, *, seed: int, n_genes: int = 60):
    """Write ``<name>.h5ad`` and ``<name>_HE.png``; return (adata, image path, tumour weight)."""
    rng = np.random.default_rng(seed)
    img = np.full((SIZE, SIZE, 3), 245.0)
    tissue = np.zeros((SIZE, SIZE), bool)
    tissue[LO:SIZE - LO, LO:SIZE - LO] = True
    cx, cy = rng.uniform(LO + 80, SIZE - LO - 80, size=2)
    w = _tumour_weight(cx, cy)
    colour = PINK * (1 - w[..., None]) + PURPLE * w[..., None]
    img[tissue] = colour[tissue]
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    centres = np.arange(LO + PITCH // 2, SIZE - LO, PITCH, dtype=float)
    gx, gy = np.meshgrid(centres, centres)
    xy = np.column_stack([gx.ravel(), gy.ravel()])
    spot_w = w[xy[:, 1].astype(int), xy[:, 0].astype(int)]
    mu = np.tile(rng.lognormal(0, 0.5, n_genes) * 5, (len(xy), 1))
    mu[:, 0] *= 1 + 8 * spot_w
    mu[:, 1] *= 1 + 8 * (1 - spot_w)
    counts = rng.poisson(mu * rng.uniform(0.8, 1.2, (len(xy), 1))).astype(np.int32)
    genes = ["TUM", "STR"] + [f"G{i:02d}" for i in range(2, n_genes)]
    adata = ad.AnnData(sparse.csr_matrix(counts),
                       obs=pd.DataFrame(index=[f"{name}_{i}" for i in range(len(xy))]),
                       var=pd.DataFrame(index=genes))
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {name: {
        "images": {"hires": np.asarray(Image.fromarray(img).reduce(2))},
        "scalefactors": {"spot_diameter_fullres": PITCH / 2, "tissue_hires_scalef": 0.5},
        "metadata": {"microns_per_pixel": 1.0},
    }}
    folder.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(folder / f"{name}.h5ad")
    Image.fromarray(img).save(folder / f"{name}_HE.png")
    return adata, folder / f"{name}_HE.png", w


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sections")
    return {s: make_section(s, folder, seed=i) for i, s in enumerate(["S1", "S2", "S3", "S4"])}


def pairs(data, names):
    return [(data[s][0].copy(), data[s][1]) for s in names]


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    return train(pairs(data, ["S1", "S2", "S3"]), genes=GENES, model="attention",
                 encoder="colour", out_px=32, tile_scales=(1, 2, 4), config=FAST, out=out,
                 progress=False)


# -- round trip ----------------------------------------------------------------------------------


def test_config_records_genes_geometry_encoder(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["genes"] == GENES and cfg["gene_rule"] == "list"
    assert cfg["model_type"] == "attention" and (model_dir / cfg["model_file"]).is_file()
    assert cfg["encoder"]["name"] == "colour" and cfg["encoder"]["dim"] == 25
    tiles = cfg["tiles"]
    assert tiles["tile_um"] == pytest.approx(20.0) and tiles["tile_px"] == pytest.approx(20.0)
    assert tiles["out_px"] == 32 and tiles["mpp"] == pytest.approx(1.0)
    assert tiles["spot_pitch_um"] == pytest.approx(PITCH)
    # the default features: three fields of view, z-scored within each section
    assert tiles["scales"] == [1.0, 2.0, 4.0] and tiles["standardize"] == "section"
    model = load_model(model_dir)
    assert model.n_features == 3 * 25
    with pytest.raises(InputError, match="3 tile scale"):
        model.predict_features(np.zeros((5, 25), np.float32), np.zeros((5, 2)))
    assert [s["name"] for s in cfg["sections"]] == ["S1", "S2", "S3"]
    assert cfg["validation"]["section"] == "S3" and cfg["seed"] == 0
    assert cfg["train_config"]["epochs"] >= 10 and cfg["spotlens_version"]
    # 3 genes: no rank below 3 to project onto, so the final model keeps every axis
    assert cfg["validation"]["expression_rank"] == "full"
    assert cfg["validation"]["rank_scores"].keys() == {"full"}
    assert cfg["train_config"]["expression_rank"] is None


def test_evaluate_held_out_section_learns_the_image(model_dir, data):
    table = evaluate(model_dir, pairs(data, ["S4"]))
    assert list(table.index) == ["S4"]
    row = table.loc["S4"]
    assert row["n_spots"] == data["S4"][0].n_obs and row["n_genes"] == 3
    assert row["n_genes_missing"] == 0 and np.isfinite(row["mse"])
    per_gene = pd.DataFrame(table.attrs["per_gene"])
    assert per_gene.loc["TUM", "S4"] > 0.6 and per_gene.loc["STR", "S4"] > 0.6


def test_predict_grid_over_tissue(model_dir, data, tmp_path):
    from spotlens.io import write_h5ad

    _, image, weight = data["S4"]
    pred = predict(model_dir, image, mpp=1.0)
    assert list(pred.var_names) == GENES and pred.X.shape == (pred.n_obs, 3)
    xy = pred.obsm["spatial"]
    assert np.all((xy >= LO - 1) & (xy <= SIZE - LO + 1))  # only on tissue
    sf = pred.uns["spatial"]["S4_HE"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(20.0)
    assert sf["spot_spacing_fullres"] == pytest.approx(PITCH)
    truth = weight[xy[:, 1].round().astype(int), xy[:, 0].round().astype(int)]
    assert np.corrcoef(pred[:, "TUM"].X.ravel(), truth)[0, 1] > 0.6
    write_h5ad(pred, tmp_path / "pred.h5ad")
    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    np.testing.assert_allclose(back.X, pred.X)
    assert back.uns["histology_prediction"]["params"]["tile_um"] == pytest.approx(20.0)


def test_ridge_model_saves_arrays_without_pickle(data, tmp_path):
    out = train(pairs(data, ["S1", "S2", "S3"]), genes=GENES, model="ridge", encoder="colour",
                out_px=32, out=tmp_path / "ridge", progress=False)
    with np.load(out / "model.npz", allow_pickle=False) as z:
        assert z["coef"].shape[1] == 3
    validation = json.loads((out / "config.json").read_text())["validation"]
    assert validation["expression_rank"] == "full" and validation["rank_scores"].keys() == {"full"}
    model = load_model(out)
    s4, image, _ = data["S4"]
    pred = model.predict_section(s4, image=image)
    from spotlens.histology._metrics import section_log_expression

    r = np.corrcoef(pred[:, 0], section_log_expression(s4, ["TUM"])[:, 0])[0, 1]
    assert r > 0.6


# -- resume --------------------------------------------------------------------------------------


def test_resume_continues_an_interrupted_run(data, tmp_path, caplog):
    out = tmp_path / "m"
    sections = pairs(data, ["S1", "S2", "S3"])
    small = TrainConfig(hidden=16, epochs=4, patience=50)
    train(sections, genes=GENES, encoder="colour", out_px=32, config=small, out=out,
          progress=False)
    first = json.loads((out / "config.json").read_text())["validation"]
    assert first["epochs_run"] == 4
    with caplog.at_level(logging.INFO, logger="spotlens"):
        train(sections, genes=GENES, encoder="colour", out_px=32,
              config=TrainConfig(hidden=16, epochs=8, patience=50), out=out, progress=False)
    assert any("resumed from" in r.getMessage() and "epoch 4" in r.getMessage()
               for r in caplog.records)
    second = json.loads((out / "config.json").read_text())["validation"]
    assert second["epochs_run"] == 8
    assert second["val_pearson_history"][:4] == first["val_pearson_history"]
    # another run into the same folder is refused, unless resume=False
    with pytest.raises(InputError, match="different training run"):
        train(sections, genes=["TUM", "STR"], encoder="colour", out_px=32, config=small,
              out=out, progress=False)
    train(sections, genes=["TUM", "STR"], encoder="colour", out_px=32, config=small, out=out,
          resume=False, progress=False)
    assert json.loads((out / "config.json").read_text())["genes"] == ["TUM", "STR"]


# -- bad input -----------------------------------------------------------------------------------


def test_load_section_finds_the_image_or_says_to_pass_it(data, tmp_path):
    adata, image, _ = data["S1"]
    adata.write_h5ad(tmp_path / "A.h5ad")
    with pytest.raises(InputError, match="No H&E image beside .*Pass"):
        load_section(tmp_path / "A.h5ad")
    loaded, path = load_section(tmp_path / "A.h5ad", image)
    assert path == image and loaded.n_obs == adata.n_obs
    with Image.open(image) as im:
        im.save(tmp_path / "A_HE.png")
        im.convert("RGB").save(tmp_path / "A_HE_small.jpg")
    with pytest.raises(InputError, match="Several H&E images.*explicitly"):
        load_section(tmp_path / "A.h5ad")
    with pytest.raises(InputError, match="not found"):
        load_section(tmp_path / "missing.h5ad")


def test_image_of_another_size_is_refused(data, model_dir, tmp_path):
    small = tmp_path / "small.png"
    with Image.open(data["S4"][1]) as im:
        im.reduce(4).save(small)  # a downscaled copy: spots fall outside
    with pytest.raises(InputError, match="does not match these spots"):
        evaluate(model_dir, [(data["S4"][0].copy(), small)])
    with pytest.raises(InputError, match="does not match these spots"):
        train([(data["S1"][0].copy(), small), (data["S2"][0].copy(), data["S2"][1])],
              genes=GENES, model="ridge", encoder="colour", out=tmp_path / "m",
              progress=False)


def test_evaluate_without_shared_genes_is_refused(data, model_dir):
    adata = data["S4"][0].copy()
    adata.var_names = [f"ENSG{i:05d}" for i in range(adata.n_vars)]
    with pytest.raises(InputError, match="shares none of the model's 3 genes"):
        evaluate(model_dir, [(adata, data["S4"][1])])


def test_predict_needs_the_scale_and_a_fine_enough_scan(data, model_dir, tmp_path):
    image = data["S4"][1]
    with pytest.raises(InputError, match="pass --mpp"):
        predict(model_dir, image)
    with pytest.raises(InputError, match="coarser than the training scans"):
        predict(model_dir, image, mpp=5.0)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 245, np.uint8)).save(blank)
    with pytest.raises(InputError, match="No grid point"):
        predict(model_dir, blank, mpp=1.0)
    with pytest.raises(InputError, match="no config.json"):
        load_model(tmp_path)


def test_train_bad_arguments(data, tmp_path):
    sections = pairs(data, ["S1", "S2"])
    with pytest.raises(InputError, match="model must be one of"):
        train(sections, model="forest", encoder="colour", out=tmp_path / "m")
    with pytest.raises(InputError, match="in none of the training sections"):
        train(sections, genes=["NOPE"], encoder="colour", out=tmp_path / "m")
    with pytest.raises(InputError, match="at least 2 training sections"):
        train(sections[:1], genes=GENES, model="ridge", encoder="colour", out=tmp_path / "m")
    with pytest.raises(InputError, match="'colour' has none to fine-tune"):
        train(sections, genes=GENES, encoder="colour", config=TrainConfig(finetune_head=True),
              out=tmp_path / "m")


# -- overlay -------------------------------------------------------------------------------------


def test_overlay_one_panel_per_gene_with_colourbar(model_dir, data, tmp_path):
    import spotlens
    from spotlens.io import save_figure

    pred = predict(model_dir, data["S4"][1], mpp=1.0)
    fig = spotlens.pl.overlay(pred, ["TUM", "STR"])
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == ["TUM", "STR"]
    assert len(fig.axes) == 4  # two panels, two colourbars
    assert titled[0].images  # the H&E thumbnail is drawn under the spots
    save_figure(fig, tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as im:
        assert im.size[0] > 100
    with pytest.raises(InputError, match="not in adata.var_names"):
        spotlens.pl.overlay(pred, ["ERBB2"])


# -- command line --------------------------------------------------------------------------------


def test_cli_train_evaluate_predict(data, tmp_path):
    from typer.testing import CliRunner

    from spotlens.cli import app

    runner = CliRunner()
    folder = data["S1"][1].parent
    model = tmp_path / "model"
    res = runner.invoke(app, [
        "histology", "train", "--sections", str(folder / "S1.h5ad"), str(folder / "S2.h5ad"),
        "--genes", "hvg", "--model-type", "attention", "--encoder", "colour", "--out-px", "32",
        "--epochs", "3",
        "--no-progress", "-q", "-o", str(model)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["gene_rule"] == "hvg" and len(cfg["genes"]) == 50
    assert [s["name"] for s in cfg["sections"]] == ["S1", "S2"]
    res = runner.invoke(app, ["histology", "evaluate", "-m", str(model), "--sections",
                              str(folder / "S4.h5ad"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    assert "S4" in res.output and "mean_pearson" in res.output
    gene = cfg["genes"][0]
    res = runner.invoke(app, ["histology", "predict", "-m", str(model), "-i",
                              str(folder / "S4_HE.png"), "--mpp", "1", "-q",
                              "--plot-genes", gene, "-o", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p" / "predicted.h5ad").is_file()
    assert (tmp_path / "p" / f"{gene}.png").is_file()
    # bad input: one line "error: ..." and exit code 2 (and no new output folder)
    res = runner.invoke(app, ["histology", "predict", "-m", str(model), "-i",
                              str(folder / "S4_HE.png"), "-q", "-o", str(tmp_path / "p2")])
    assert res.exit_code == 2 and "error:" in res.output and "--mpp" in res.output
    res = runner.invoke(app, ["histology", "predict", "-m", str(model), "-i",
                              str(folder / "S4_HE.png"), "--mpp", "1", "-q",
                              "--plot-genes", "ERBB2", "-o", str(tmp_path / "p2")])
    assert res.exit_code == 2 and "not among the model's" in res.output
    assert not (tmp_path / "p2").exists()
    res = runner.invoke(app, ["histology", "train", "--sections", str(tmp_path / "x.h5ad"),
                              "-q", "-o", str(tmp_path / "m2")])
    assert res.exit_code == 2 and "error: Section file not found" in res.output
    res = runner.invoke(app, ["histology", "train", "--sections", str(folder / "S1.h5ad"),
                              str(folder / "S2.h5ad"), "--tile-scales", "1,x", "-q",
                              "-o", str(tmp_path / "m3")])
    assert res.exit_code == 2 and "error: --tile-scales must be numbers" in res.output
    res = runner.invoke(app, ["histology", "train", "--sections", str(folder / "S1.h5ad"),
                              str(folder / "S2.h5ad"), "--tile-scales", "1,1", "-q",
                              "-o", str(tmp_path / "m4")])
    assert res.exit_code == 2 and "--tile-scales has repeats" in res.output
    for bad, message in [("x", "--expression-rank must be 'auto', 'full' or a positive"),
                         ("0", "--expression-rank must be a positive integer")]:
        res = runner.invoke(app, ["histology", "train", "--sections", str(folder / "S1.h5ad"),
                                  str(folder / "S2.h5ad"), "--expression-rank", bad,
                                  "--model-type", "attention", "-q",
                                  "-o", str(tmp_path / "m5")])
        assert res.exit_code == 2 and message in res.output
    res = runner.invoke(app, ["histology", "train", "--sections", str(folder / "S1.h5ad"),
                              str(folder / "S2.h5ad"), "--encoder", "colour", "--finetune-head",
                              "--model-type", "attention", "-q", "-o", str(tmp_path / "m6")])
    assert res.exit_code == 2 and "'colour' has none to fine-tune" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "p"]  # no failed run's


# -- real data (optional) ------------------------------------------------------------------------


@pytest.mark.skipif(not (HER2ST / "C3.h5ad").is_file(), reason="her2st data not available")
def test_her2st_colour_ridge_predicts_erbb2(tmp_path):
    sections = [load_section(HER2ST / f"{s}.h5ad") for s in ("C3", "C4", "C5")]
    out = train(sections[:2], genes=["ERBB2", "IGKC", "ACTB"], model="ridge", encoder="colour",
                tile_um=100, out_px=64, out=tmp_path / "m", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tiles"]["spot_pitch_um"] == pytest.approx(200, rel=0.02)
    table = evaluate(out, sections[2:])
    assert table.loc["C5", "n_spots"] == 181
    assert pd.DataFrame(table.attrs["per_gene"]).loc["ERBB2", "C5"] > 0.2
