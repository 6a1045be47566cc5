"""DeconvolutionConfig: one checked place for every method setting, shared by API and CLI."""

from __future__ import annotations

import inspect
import json

import pytest

from spotlens._validation import InputError
from spotlens.deconv import (
    CellLevelConfig,
    DeconvolutionConfig,
    cell_level,
    deconvolve,
)


def test_signature_defaults_are_the_config_defaults():
    """The keywords of deconvolve repeat the config's defaults: they must not drift apart."""
    params = inspect.signature(deconvolve).parameters
    flat = DeconvolutionConfig().flat()
    assert set(flat) <= set(params)
    assert {name: params[name].default for name in flat} == flat
    cell = inspect.signature(cell_level).parameters
    assert {k: cell[k].default for k in CellLevelConfig().to_dict()} == CellLevelConfig().to_dict()


def test_flat_and_grouped_names_round_trip():
    cfg = DeconvolutionConfig.from_dict({"cv_folds": 3, "use_attention": False,
                                         "lambda_spatial": 0.1})
    assert cfg.cv.folds == 3 and cfg.attention.enabled is False and cfg.lambda_spatial == 0.1
    assert DeconvolutionConfig.from_dict(cfg.to_dict()) == cfg
    assert DeconvolutionConfig.from_dict(cfg.flat()) == cfg
    assert cfg.updated(k_neighbors=8).k_neighbors == 8 and cfg.k_neighbors == 6


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"k_neighbors": 0}, "k_neighbors"),
        ({"lambda_spatial": -1}, "lambda_spatial"),
        ({"lambda_ridge": "big"}, "lambda_ridge"),
        ({"likelihood": "nb"}, "likelihood must be"),
        ({"cv_folds": 1}, "cv_folds"),
        ({"attention_temperature": 0}, "attention_temperature"),
        ({"tile_size": -5}, "tile_size"),
        ({"lamda_spatial": 0.1}, "Unknown deconvolution setting.*lamda_spatial.*lambda_spatial"),
        ({"cv": {"fold": 3}}, "cv.fold"),
    ],
)
def test_bad_settings_are_named(settings, match):
    with pytest.raises(InputError, match=match):
        DeconvolutionConfig.from_dict(settings)


def test_config_files(tmp_path):
    toml = tmp_path / "settings.toml"
    toml.write_text('lambda_spatial = 0.3\nlikelihood = "poisson"\n[cv]\nfolds = 3\n')
    cfg = DeconvolutionConfig.from_file(toml)
    assert (cfg.lambda_spatial, cfg.likelihood, cfg.cv.folds) == (0.3, "poisson", 3)
    js = tmp_path / "settings.json"
    js.write_text(json.dumps(cfg.to_dict()))
    assert DeconvolutionConfig.from_file(js) == cfg
    bad = tmp_path / "settings.yaml"
    bad.write_text("a: 1")
    with pytest.raises(InputError, match=".json or .toml"):
        DeconvolutionConfig.from_file(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("lambda_spatial = = 1")
    with pytest.raises(InputError, match="not valid"):
        DeconvolutionConfig.from_file(broken)


def test_deconvolve_takes_a_config(synthetic):
    """config= gives the same fit as the same keywords, records them, and refuses a clash."""
    st, ref = synthetic.spatial, synthetic.reference
    kw = dict(lambda_ridge=0.0, lambda_spatial=0.03, likelihood="poisson", fit_quality=False)
    by_keywords = deconvolve(st, ref, inplace=False, progress=False, **kw)
    by_config = deconvolve(st, ref, inplace=False, progress=False,
                           config=DeconvolutionConfig(**kw))
    assert (by_config.proportions == by_keywords.proportions).all().all()
    assert by_config.uns["params"]["lambda_spatial"] == 0.03
    assert by_config.uns["params"]["likelihood"] == "poisson"
    with pytest.raises(InputError, match="lambda_spatial given both"):
        deconvolve(st, ref, inplace=False, progress=False, lambda_spatial=0.1,
                   config=DeconvolutionConfig(**kw))
    with pytest.raises(InputError, match="config must be"):
        deconvolve(st, ref, inplace=False, progress=False, config={"lambda_spatial": 0.1})


def test_cli_config_file_reaches_any_setting_and_flags_override(tmp_path, monkeypatch):
    """--config sets what has no flag (cv folds, attention temperature); a flag beats the file."""
    from typer.testing import CliRunner

    import spotlens.deconv as deconv
    from spotlens.cli import app

    seen = {}

    def fake(spatial, reference, **kwargs):
        seen.update(kwargs)
        raise InputError("stop here")

    monkeypatch.setattr(deconv, "deconvolve", fake)
    cfg = tmp_path / "settings.toml"
    cfg.write_text("lambda_spatial = 0.3\nk_neighbors = 8\n[cv]\nfolds = 3\n"
                   "[attention]\ntemperature = 2.0\n")
    st, ref = tmp_path / "st.h5ad", tmp_path / "ref.h5ad"
    from spotlens.datasets import osmfish_cortex

    a, b = osmfish_cortex()
    a.write_h5ad(st)
    b.write_h5ad(ref)
    result = CliRunner().invoke(app, ["deconvolve", "-s", str(st), "-r", str(ref), "-o",
                                      str(tmp_path / "out"), "--config", str(cfg),
                                      "--k-neighbors", "4", "--quiet"])
    assert result.exit_code == 2, result.output
    config = seen["config"]
    assert (config.lambda_spatial, config.cv.folds, config.attention.temperature) == (0.3, 3, 2.0)
    assert config.k_neighbors == 4  # the flag given on the command line wins
    bad = tmp_path / "bad.toml"
    bad.write_text("lamda_spatial = 0.3\n")
    result = CliRunner().invoke(app, ["deconvolve", "-s", str(st), "-r", str(ref), "-o",
                                      str(tmp_path / "out2"), "--config", str(bad), "--quiet"])
    assert result.exit_code == 2 and "lamda_spatial" in result.output
    # the file's names stay the file's names (not translated into flags)
    assert "k_neighbors" in result.output and "--k-neighbors" not in result.output


def test_cell_level_table_of_the_config_file(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text("lambda_spatial = 0.1\nseed = 4\n[cell_level]\nlambda_type = 0.2\n")
    assert DeconvolutionConfig.from_file(path).lambda_spatial == 0.1  # the table is skipped
    cell = CellLevelConfig.from_file(path, seed=4)
    assert (cell.lambda_type, cell.seed, cell.n_candidates) == (0.2, 4, 10)
    path.write_text("[cell_level]\nlambda_typ = 0.2\n")
    with pytest.raises(InputError, match="Unknown cell-level setting.*lambda_typ"):
        CellLevelConfig.from_file(path)
    with pytest.raises(InputError, match="max_cells"):
        CellLevelConfig(max_cells=1)


def test_config_with_default_keywords_of_numpy_type_is_accepted(synthetic):
    """A keyword left at its default (even as a NumPy integer) does not clash with config=."""
    import numpy as np

    st, ref = synthetic.spatial, synthetic.reference
    cfg = DeconvolutionConfig(lambda_ridge=0.0, lambda_spatial=0.0, likelihood="poisson",
                              fit_quality=False)
    res = deconvolve(st, ref, inplace=False, progress=False, seed=np.int64(0),
                     k_neighbors=np.int64(6), config=cfg)
    assert res.uns["params"]["k_neighbors"] == 6
    with pytest.raises(InputError, match="use_attention given both"):
        deconvolve(st, ref, inplace=False, progress=False, use_attention=1, config=cfg)
