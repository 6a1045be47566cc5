"""Training defaults are the protocol's route (issue 15), and what the CLI and API share.

- ``spotlens histology train`` with no options and ``spotlens.histology.train()`` have the same
  defaults, those of ``_defaults.py`` (the route the frozen protocol selected);
- the default route is the protocol's ``"ridge_rank"`` on section-standardised features: with
  the same features and genes the two give the same predictions;
- the gene rules choose the protocol's sets;
- the one Pearson kernel scores the networks' validation.
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from spotlens.histology import _defaults
from spotlens.histology._protocol_models import FeatureBank, fit_ridge_cv
from spotlens.histology._train_data import _pearson_mean

# the synthetic H&E sections of the pipeline tests (pink tissue, purple tumour; µm/px = 1)
from test_histology_pipeline import GENES, make_section  # noqa: E402


def _cli_defaults() -> dict:
    from spotlens.cli._histology import train_command

    return {name: p.default for name, p in inspect.signature(train_command).parameters.items()}


def test_cli_and_api_defaults_are_the_protocols_route():
    from spotlens.histology import train
    from spotlens.histology._train import fit_model

    cli = _cli_defaults()
    assert cli["model_type"] == _defaults.DEFAULT_MODEL == "ridge"
    assert cli["genes"] == _defaults.DEFAULT_GENES == "hvg"
    assert tuple(float(v) for v in cli["tile_scales"].split(",")) == \
        _defaults.DEFAULT_TRAIN_SCALES
    assert cli["standardize"] is _defaults.DEFAULT_STANDARDIZE
    for func in (train, fit_model):
        params = inspect.signature(func).parameters
        assert params["model"].default is None  # None: config.model if given, else ridge
        assert params["genes"].default == _defaults.DEFAULT_GENES
        assert tuple(params["tile_scales"].default) == _defaults.DEFAULT_TRAIN_SCALES
        assert params["standardize"].default is _defaults.DEFAULT_STANDARDIZE


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    folder = tmp_path_factory.mktemp("defaults")
    return [make_section(s, folder, seed=i) for i, s in enumerate(["S1", "S2", "S3"])]


def test_default_train_is_the_protocols_ridge_rank_on_the_same_features(sections, tmp_path):
    from spotlens.histology import (
        DEFAULT_RANKS,
        load_model,
        read_image,
        section_log_expression,
        standardize_section,
        tile_geometry,
        train,
    )
    from spotlens.histology._featurize import section_features

    pairs = [(adata, image) for adata, image, _ in sections]
    out = train(pairs, genes=GENES, encoder="colour", out_px=32, out=tmp_path / "m",
                progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "ridge"
    assert tuple(cfg["tiles"]["scales"]) == _defaults.DEFAULT_TRAIN_SCALES
    assert cfg["tiles"]["standardize"] == ("section" if _defaults.DEFAULT_STANDARDIZE else "none")
    model = load_model(out)
    # the protocol's candidate on the same features: per-section z-scored colour statistics
    feats, ys = {}, {}
    for (adata, image, _), name in zip(sections, ["S1", "S2", "S3"], strict=True):
        img = read_image(image)
        geometry = tile_geometry(adata, image=img)
        x = section_features(img, None, geometry, 32, _defaults.DEFAULT_TRAIN_SCALES)
        feats[name] = standardize_section(x) if _defaults.DEFAULT_STANDARDIZE else x
        ys[name] = section_log_expression(adata, GENES)
    predict, alpha, rank = fit_ridge_cv(FeatureBank(feats, 256), tuple(feats), ys,
                                        ranks=DEFAULT_RANKS)
    assert cfg["validation"]["alpha"] == pytest.approx(alpha)
    assert cfg["validation"]["expression_rank"] == ("full" if rank is None else str(rank))
    np.testing.assert_allclose(model.predictor.predict(feats["S1"]), predict(feats["S1"]),
                               rtol=1e-5, atol=1e-6)


def test_a_train_config_without_a_model_type_keeps_its_network(sections, tmp_path):
    from spotlens.histology import TrainConfig, train

    pairs = [(adata, image) for adata, image, _ in sections[:2]]
    out = train(pairs, genes=GENES, encoder="colour", out_px=32,
                config=TrainConfig(model="graph", hidden=8, epochs=2), out=tmp_path / "g",
                progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "graph"


def test_gene_rules_choose_the_protocols_sets(sections):
    from spotlens.histology import select_gene_sets
    from spotlens.histology._sections import GENE_RULES, _choose_genes

    adatas = {f"S{i}": adata for i, (adata, _, _) in enumerate(sections)}
    adatas["S0"] = adatas["S0"].copy()
    adatas["S0"].var_names = ["MT-CO1", *adatas["S0"].var_names[1:]]  # excluded, as there
    sets = select_gene_sets(adatas, n_top=40, n_hvg=0, n_svg=0)
    assert set(GENE_RULES) == {"hvg", "top_expressed", "svg"}
    chosen, rule = _choose_genes("hvg", adatas)
    assert rule == "hvg" and chosen == select_gene_sets(adatas, n_top=0, n_hvg=50, n_svg=0)["hvg"]
    assert "MT-CO1" not in chosen and "MT-CO1" not in sets["top_expressed"]
    svg, _ = _choose_genes("svg", adatas)
    assert len(svg) == 50 and "MT-CO1" not in svg


def test_pearson_mean_is_the_one_kernel_with_results_unchanged():
    rng = np.random.default_rng(3)
    pred = rng.normal(size=(40, 6)).astype(np.float32)
    obs = rng.normal(size=(40, 6)) + pred
    obs[:, 2] = 1.5  # constant: r undefined, counts 0

    def old(p, o):  # the separate formula it replaced
        p = p - p.mean(0)
        o = o - o.mean(0)
        denom = np.sqrt((p**2).sum(0) * (o**2).sum(0))
        return float(np.divide((p * o).sum(0), denom, out=np.zeros(p.shape[1]),
                               where=denom > 0).mean())

    assert _pearson_mean(pred, obs) == pytest.approx(old(pred, obs), abs=1e-6)
    assert _pearson_mean(obs, obs) == pytest.approx(5 / 6)
