"""Output folders of ``spotlens histology train|evaluate|predict``: manifest, refusal, clean-up.

The same rules as ``deconvolve`` (tests/test_cli_outputs.py): ``OUT/spotlens_run.json`` is
written last with ``"complete": true`` and lists the files, a rerun into a finished folder is
refused without ``--overwrite``, a failing run leaves no new folder, and the library's errors
name the command's flags. ``train`` keeps an unfinished run's checkpoints for ``--resume``.
Sections are the synthetic H&E squares of tests/test_histology_pipeline.py with the 25 colour
features, so a model trains in a second or two.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from test_histology_pipeline import make_section
from typer.testing import CliRunner

from spotlens.cli import app

MANIFEST = "spotlens_run.json"
NETWORK_FILES = ("config.json", "model.pt", "uncertainty.npz", "checkpoint.pt",
                 "checkpoint-final.pt", "checkpoint.json")
runner = CliRunner()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sections")
    for i, name in enumerate(["S1", "S2", "S4"]):
        make_section(name, folder, seed=i)
    return folder


def train(folder, out, *args):
    return runner.invoke(app, [
        "histology", "train", "--sections", str(folder / "S1.h5ad"), str(folder / "S2.h5ad"),
        "--genes", "TUM,STR,G02", "--model-type", "attention", "--encoder", "colour",
        "--out-px", "32", "--no-progress", "-o", str(out), *map(str, args)])


def predict(folder, model, out, *args):
    return runner.invoke(app, ["histology", "predict", "-m", str(model), "-i",
                               str(folder / "S4_HE.png"), "--no-progress", "-q", "-o", str(out),
                               *map(str, args)])


def evaluate(folder, model, *args):
    return runner.invoke(app, ["histology", "evaluate", "-m", str(model), "--sections",
                               str(folder / "S4.h5ad"), "--no-progress", "-q",
                               *map(str, args)])


@pytest.fixture(scope="module")
def model(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "model"
    result = train(folder, out, "--epochs", "3", "-q")
    assert result.exit_code == 0, result.output
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def listed(out: Path) -> dict[str, int]:
    return {f["name"]: f["size"] for f in manifest(out)["files"]}


def contents(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- train ---------------------------------------------------------------------------------------


def test_train_manifest_lists_the_model_files_and_is_complete(model, folder):
    record = manifest(model)
    assert record["complete"] is True and record["command"] == "spotlens histology train"
    assert listed(model) == {n: (model / n).stat().st_size for n in NETWORK_FILES}
    assert sorted(p.name for p in model.iterdir()) == sorted([*NETWORK_FILES, MANIFEST])
    assert all((model / MANIFEST).stat().st_mtime_ns >= (model / n).stat().st_mtime_ns
               for n in NETWORK_FILES)
    assert record["inputs"]["section_1"]["path"] == str((folder / "S1.h5ad").resolve())
    assert record["inputs"]["section_2"]["shape"][1] == 60
    assert record["inputs"]["image_2"]["path"] == str((folder / "S2_HE.png").resolve())
    assert record["parameters"]["epochs"] == 3 and record["parameters"]["encoder"] == "colour"


def test_train_rerun_into_a_finished_model_is_refused_unless_overwrite(folder, tmp_path):
    out = tmp_path / "model"
    assert train(folder, out, "--epochs", "2", "-q").exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = contents(out)
    refused = train(folder, out, "--epochs", "2", "-q")
    assert refused.exit_code == 2
    line = error_line(refused)
    assert "--overwrite" in line and "spotlens histology train" in line
    assert contents(out) == before  # refused before anything was touched

    replaced = train(folder, out, "--model-type", "ridge", "--overwrite", "-q")
    assert replaced.exit_code == 0, replaced.output
    # the network run's files are gone, the user's file stays, the ridge model is listed
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.npz", "uncertainty.npz", MANIFEST, "notes.txt"])
    assert set(listed(out)) == {"config.json", "model.npz", "uncertainty.npz"}
    assert manifest(out)["complete"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "ridge"
    assert f"wrote {out / MANIFEST}" in replaced.stdout


def interrupted(out: Path) -> None:
    """Make a finished run look killed during training: its manifest still unfinished."""
    record = manifest(out)
    record.update(complete=False, finished=None, pid=dead_pid(), files=[])
    (out / MANIFEST).write_text(json.dumps(record))


def test_train_resumes_an_unfinished_run_and_no_resume_starts_over(folder, tmp_path):
    out = tmp_path / "model"
    assert train(folder, out, "--epochs", "2", "-q").exit_code == 0
    interrupted(out)
    resumed = train(folder, out, "--epochs", "4")
    assert resumed.exit_code == 0, resumed.output
    assert "keeping the files of the earlier run" in resumed.stderr
    assert "resumed from" in resumed.stderr  # the checkpoints were there to continue from
    history = json.loads((out / "config.json").read_text())["validation"]
    assert history["epochs_run"] == 4
    assert manifest(out)["complete"] is True
    assert set(listed(out)) == set(NETWORK_FILES)  # kept checkpoints are this run's model

    interrupted(out)
    fresh = train(folder, out, "--epochs", "2", "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    assert "unfinished run" in fresh.stderr and "resumed from" not in fresh.stderr
    assert json.loads((out / "config.json").read_text())["validation"]["epochs_run"] == 2


def test_failing_train_leaves_no_new_folder(folder, tmp_path):
    out = tmp_path / "new" / "model"
    # refused inside train(), after the run's manifest was written: still no folder left
    result = train(folder, out, "--genes", "NOPE", "-q")
    assert result.exit_code == 2 and "in none of the training sections" in error_line(result)
    assert not (tmp_path / "new").exists()
    result = train(folder, out, "--tile-scales", "1,1", "-q")
    assert result.exit_code == 2 and not (tmp_path / "new").exists()
    # an existing folder keeps the user's files; the failed run is recorded, not finished
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    result = train(folder, existing, "--genes", "NOPE", "-q")
    assert result.exit_code == 2
    assert (existing / "notes.txt").read_text() == "mine"
    record = manifest(existing)
    assert record["complete"] is False and "in none of the training sections" in record["error"]
    assert train(folder, existing, "--epochs", "2", "-q").exit_code == 0  # no --overwrite


# -- predict and evaluate ------------------------------------------------------------------------


def test_predict_manifest_refusal_and_overwrite(model, folder, tmp_path):
    out = tmp_path / "pred"
    result = predict(folder, model, out, "--mpp", "1", "--plot-genes", "TUM,STR")
    assert result.exit_code == 0, result.output
    files = ["predicted.h5ad", "TUM.png", "STR.png"]
    assert list(listed(out)) == files and manifest(out)["complete"] is True
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, MANIFEST])
    assert manifest(out)["inputs"]["model"]["path"] == str(model.resolve())
    assert [line.split()[-1] for line in result.stdout.splitlines()] == [
        str(out / n) for n in [*files, MANIFEST]]

    before = contents(out)
    refused = predict(folder, model, out, "--mpp", "1")
    assert refused.exit_code == 2 and "--overwrite" in error_line(refused)
    assert contents(out) == before

    again = predict(folder, model, out, "--mpp", "1", "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == ["predicted.h5ad", MANIFEST]  # PNGs gone


def test_predict_report_shows_the_predicted_genes_and_their_sd(model, folder, tmp_path):
    import anndata as ad
    from test_report import payload

    out = tmp_path / "pred"
    result = predict(folder, model, out, "--mpp", "1", "--report")
    assert result.exit_code == 0, result.output
    assert list(listed(out)) == ["predicted.h5ad", "report.html"]
    assert manifest(out)["complete"] is True
    assert sorted(p.name for p in out.iterdir()) == ["predicted.h5ad", "report.html", MANIFEST]
    data = payload(out / "report.html")
    genes = [layer["name"] for layer in data["layers"] if layer["group"] == "predicted genes"]
    assert genes == ["TUM", "STR", "G02"]  # the model's genes, in its order
    assert [layer["std_of"] for layer in data["layers"]
            if layer["group"] == "uncertainty (s.d.)"] == genes
    predicted = ad.read_h5ad(out / "predicted.h5ad")
    assert data["spots"]["n"] == predicted.n_obs and data["blank"] is False
    assert "tiles" in data["image"]  # a small image: embedded
    (command,) = [s for s in data["params"] if s["title"] == "run"]
    assert dict(command["rows"])["command"] == "spotlens histology predict"
    # a rerun without --report replaces the page with nothing
    again = predict(folder, model, out, "--mpp", "1", "--overwrite")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == ["predicted.h5ad", MANIFEST]
    nuclei = predict(folder, model, tmp_path / "n", "--level", "nucleus", "--report")
    assert nuclei.exit_code == 2 and "--level spot" in error_line(nuclei)
    assert not (tmp_path / "n").exists()


def test_evaluate_manifest_refusal_and_overwrite(model, folder, tmp_path):
    out = tmp_path / "scores"
    result = evaluate(folder, model, "-o", out)
    assert result.exit_code == 0, result.output
    assert "mean_pearson" in result.stdout
    assert list(listed(out)) == ["evaluation.csv", "pearson_per_gene.csv"]
    record = manifest(out)
    assert record["complete"] is True and record["command"] == "spotlens histology evaluate"
    assert set(record["inputs"]) == {"section_1", "image_1", "model"}

    before = contents(out)
    refused = evaluate(folder, model, "-o", out)
    assert refused.exit_code == 2 and "--overwrite" in error_line(refused)
    assert "mean_pearson" not in refused.stdout  # refused before scoring
    assert contents(out) == before
    assert evaluate(folder, model, "-o", out, "--overwrite").exit_code == 0
    assert manifest(out)["started"] >= record["started"]

    # without -o nothing is written, and --overwrite alone is a mistake
    assert evaluate(folder, model).exit_code == 0
    alone = evaluate(folder, model, "--overwrite")
    assert alone.exit_code == 2 and "--out" in error_line(alone)


def test_failing_predict_and_evaluate_leave_no_new_folder(model, folder, tmp_path):
    result = predict(folder, model, tmp_path / "new" / "pred")  # a PNG has no scale
    assert result.exit_code == 2 and "--mpp" in error_line(result)
    result = predict(folder, model, tmp_path / "new" / "pred", "--mpp", "1",
                     "--plot-genes", "ERBB2")
    assert result.exit_code == 2 and "not among the model's" in error_line(result)
    result = evaluate(folder, tmp_path / "no_model", "-o", tmp_path / "new" / "scores")
    assert result.exit_code == 2
    assert not (tmp_path / "new").exists()


def test_a_model_folder_is_not_an_output_folder_for_predict(model, folder):
    before = contents(model)
    result = predict(folder, model, model, "--mpp", "1")
    assert result.exit_code == 2 and "spotlens histology train" in error_line(result)
    assert contents(model) == before


# -- errors in flag terms ------------------------------------------------------------------------


def test_train_errors_name_flags(folder, tmp_path):
    result = train(folder, tmp_path / "m", "--tile-scales", "1,1", "-q")
    line = error_line(result)
    assert "--tile-scales has repeats" in line and "tile_scales" not in line
    result = train(folder, tmp_path / "m", "--expression-rank", "0", "-q")
    assert "--expression-rank must be a positive integer" in error_line(result)
    result = train(folder, tmp_path / "m", "--finetune-head", "-q")
    line = error_line(result)
    assert "Use --encoder efficientnet-lite0 or --no-finetune-head" in line
    assert "=" not in line


def _command(name):
    return typer.main.get_command(app).commands["histology"].commands[name]


@pytest.mark.parametrize(("command", "expected"), [
    ("train", "Use --model-type ridge, or pass --out"),
    ("evaluate", "Use model='ridge', or pass --out"),
    ("predict", "Use model='ridge', or pass --out"),
])
def test_api_model_is_the_model_type_not_the_model_folder(command, expected):
    """``model=`` of the API is the architecture; ``--model`` of evaluate/predict a folder."""
    from spotlens.cli._messages import cli_message

    assert cli_message("Use model='ridge', or pass out=", _command(command)) == expected
    folder = cli_message("model_dir= must be a folder.", _command(command))
    assert folder == ("model_dir= must be a folder." if command == "train"
                      else "--model must be a folder.")
