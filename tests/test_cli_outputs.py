"""Output folders of the command line: one run per folder, a manifest written last, clean-up.

Each test runs ``spotlens deconvolve`` in-process on a part of the bundled osmFISH example
(``bundled_files`` in conftest.py; about a second a run with fixed penalties) and inspects the
folder it leaves.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import pytest
from typer.testing import CliRunner

from spotlens.cli import app

OUTPUTS = ("spatial.h5ad", "proportions.csv", "proportions.png")
MANIFEST = "spotlens_run.json"
FAST = ["--lambda-ridge", "0.01", "--lambda-spatial", "0.3", "--n-iter", "20", "--no-progress"]

runner = CliRunner()


@pytest.fixture
def data(bundled_files):
    return bundled_files


def deconvolve(data, out, *args):
    spatial, reference = data
    return runner.invoke(app, ["deconvolve", "-s", str(spatial), "-r", str(reference),
                               "-o", str(out), *map(str, args), *FAST])


def error_line(result) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_manifest_is_written_last_and_records_the_run(data, tmp_path):
    out = tmp_path / "run"
    result = deconvolve(data, out, "--seed", "3", "-q")
    assert result.exit_code == 0, result.output
    record = manifest(out)
    assert record["complete"] is True and record["format"] == 1
    assert record["command"] == "spotlens deconvolve"
    from spotlens import __version__

    assert record["spotlens_version"] == __version__
    assert record["inputs"]["spatial"]["shape"] == list(ad.read_h5ad(data[0]).shape)
    assert record["inputs"]["reference"]["path"] == str(data[1].resolve())
    assert record["inputs"]["reference"]["size"] == data[1].stat().st_size
    assert record["parameters"]["seed"] == 3 and record["parameters"]["lambda_spatial"] == 0.3
    # every file written is listed with its size, and nothing else is in the folder
    sizes = {f["name"]: f["size"] for f in record["files"]}
    assert sizes == {name: (out / name).stat().st_size for name in OUTPUTS}
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, MANIFEST])
    assert record["started"] <= record["finished"]
    # the manifest is the last file written
    assert all((out / MANIFEST).stat().st_mtime_ns >= (out / n).stat().st_mtime_ns
               for n in OUTPUTS)
    assert str(out / MANIFEST) in result.stdout


def test_another_runs_results_are_refused_unless_overwrite(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # an earlier --cell-level run (no manifest: written by an older spotlens) and a user's file
    (out / "cells.h5ad").write_bytes(b"old cells")
    (out / "cells.png").write_bytes(b"old map")
    (out / "notes.txt").write_text("mine")

    refused = deconvolve(data, out)
    assert refused.exit_code == 2
    line = error_line(refused)
    assert "cells.h5ad" in line and "--overwrite" in line
    assert "stage 1/5" not in refused.stderr  # refused before any work
    assert (out / "cells.h5ad").read_bytes() == b"old cells"
    assert not (out / "proportions.csv").exists() and not (out / MANIFEST).exists()

    replaced = deconvolve(data, out, "--overwrite", "-q")
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "cells.h5ad").exists() and not (out / "cells.png").exists()
    assert (out / "notes.txt").read_text() == "mine"  # never a file spotlens did not write
    assert all((out / name).is_file() for name in OUTPUTS)

    # a complete run is refused the same way, and --overwrite removes only what it lists
    again = deconvolve(data, out)
    assert again.exit_code == 2 and "--overwrite" in error_line(again)
    assert "spotlens deconvolve" in error_line(again)
    assert manifest(out)["complete"] is True


def killed_run(out: Path, **record) -> None:
    """What kill -9 during the writes leaves: the manifest written when the writes began, one
    finished output, the temporary file of the one being written, a user's file."""
    out.mkdir()
    record = {"complete": False, "command": "spotlens deconvolve", "pid": dead_pid(),
              "host": socket.gethostname(), "started": "2024-01-01T00:00:00+00:00",
              "outputs": [*OUTPUTS, "cells.h5ad", "cells.png"],
              "files": [{"name": "spatial.h5ad", "size": 3}], **record}
    (out / MANIFEST).write_text(json.dumps({k: v for k, v in record.items() if v is not None}))
    (out / "spatial.h5ad").write_bytes(b"old")
    (out / "cells.png").write_bytes(b"old")
    (out / ".proportions.png.k2x9_q0a.tmp").write_bytes(b"\0" * 3_800_000)
    (out / "notes.txt").write_text("mine")


def test_a_killed_runs_leftovers_are_cleaned_by_the_next_run(data, tmp_path):
    out = tmp_path / "out"
    killed_run(out)
    tmp = out / ".proportions.png.k2x9_q0a.tmp"
    result = deconvolve(data, out)
    assert result.exit_code == 0, result.output
    assert "unfinished run" in result.stderr  # a manifest without "complete": true
    assert not tmp.exists()
    assert not (out / "cells.png").exists()  # the killed run's output, not this run's
    assert (out / "notes.txt").read_text() == "mine"
    assert ad.read_h5ad(out / "spatial.h5ad").n_obs == ad.read_h5ad(data[0]).n_obs  # the new one
    assert manifest(out)["complete"] is True
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUTS, MANIFEST, "notes.txt"])


@pytest.mark.parametrize(("complete", "refused"),
                         [(False, False), (None, False), ("true", False), (True, True)],
                         ids=["false", "missing", "not-true", "true"])
def test_only_complete_true_marks_a_finished_run(tmp_path, complete, refused):
    """Without "complete": true (exactly) a run is unfinished: cleaned, not refused."""
    from spotlens import InputError
    from spotlens.cli._outputs import output_folder

    out = tmp_path / "out"
    killed_run(out, complete=complete, command="spotlens")
    if refused:
        with pytest.raises(InputError, match="--overwrite"):
            output_folder(out, known=OUTPUTS).__enter__()
        assert (out / ".proportions.png.k2x9_q0a.tmp").exists()  # refused: nothing touched
        return
    with output_folder(out, known=OUTPUTS) as run:
        assert not (out / ".proportions.png.k2x9_q0a.tmp").exists()
        assert (out / "spatial.h5ad").exists()  # kept until this run writes
        run.start_writing(["proportions.csv"])
        assert not (out / "spatial.h5ad").exists() and not (out / "cells.png").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "notes.txt"])
    assert manifest(out)["complete"] is True


def test_a_run_still_writing_into_the_folder_is_never_disturbed(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / MANIFEST).write_text(json.dumps({
            "complete": False, "command": "spotlens deconvolve", "pid": other.pid,
            "host": socket.gethostname(), "outputs": list(OUTPUTS), "files": []}))
        tmp = out / ".spatial.h5ad.abcdefgh.tmp"
        tmp.write_bytes(b"being written")
        result = deconvolve(data, out, "--overwrite")
        assert result.exit_code == 2
        assert f"process {other.pid}" in error_line(result)
        assert tmp.exists()
    finally:
        other.kill()
        other.wait()


def test_a_failed_run_leaves_no_folder_behind(data, tmp_path):
    out = tmp_path / "new" / "results"
    result = deconvolve(data, out, "--labels-key", "celltype")
    assert result.exit_code == 2
    assert not (tmp_path / "new").exists()  # both levels it created are gone

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    result = deconvolve(data, existing, "--labels-key", "celltype")
    assert result.exit_code == 2
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]  # left as it was


def test_a_run_that_fails_while_writing_is_marked_unfinished(data, tmp_path, monkeypatch):
    import spotlens.io

    def disk_full(fig, path, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(spotlens.io, "save_figure", disk_full)
    out = tmp_path / "out"
    failed = deconvolve(data, out, "-q")
    assert failed.exit_code == 1
    record = manifest(out)
    assert record["complete"] is False and "No space left" in record["error"]
    assert [f["name"] for f in record["files"]] == ["spatial.h5ad", "proportions.csv"]

    monkeypatch.undo()
    result = deconvolve(data, out, "-q")  # no --overwrite needed for an unfinished run
    assert result.exit_code == 0, result.output
    assert manifest(out)["complete"] is True
    assert all((out / name).is_file() for name in OUTPUTS)


def test_output_path_that_is_a_file_is_refused(data, tmp_path):
    path = tmp_path / "results"
    path.write_text("a file")
    result = deconvolve(data, path)
    assert result.exit_code == 2
    assert "is a file; pass a folder with -o" in error_line(result)
    assert path.read_text() == "a file"


def test_temporary_files_match_what_the_writers_leave(tmp_path):
    from spotlens.io import atomic_path, temporary_files

    class Killed(BaseException):
        pass

    with pytest.raises(Killed), atomic_path(tmp_path / "x.csv") as tmp:
        left = tmp  # a kill -9 here would leave this file
        assert temporary_files(tmp_path) == [left]
        raise Killed
    (tmp_path / ".model.pt.tmp-4242").write_bytes(b"")  # the histology checkpoint writer
    (tmp_path / ".hidden").write_bytes(b"")
    (tmp_path / "notes.tmp").write_bytes(b"")
    assert [p.name for p in temporary_files(tmp_path)] == [".model.pt.tmp-4242"]


def test_output_folder_helper_outside_a_command(tmp_path):
    """The helper the histology commands use, driven directly."""
    from spotlens import InputError
    from spotlens.cli._outputs import output_folder

    out = tmp_path / "model"
    with output_folder(out, known=("model.pt",)) as run:
        run.start_writing(["model.pt"])
        (out / "model.pt").write_bytes(b"weights")  # written by other code
        assert run.record_changed() == [out / "model.pt"]
    record = manifest(out)
    assert record["complete"] is True and record["files"] == [{"name": "model.pt", "size": 7}]

    with pytest.raises(InputError, match="--overwrite"), output_folder(out, known=()):
        pass
    with pytest.raises(RuntimeError), output_folder(tmp_path / "never", known=()):
        raise RuntimeError("failed before writing")
    assert not (tmp_path / "never").exists()
    # keep_unfinished (a resumable command) keeps an unfinished run's files
    (out / MANIFEST).write_text(json.dumps({**record, "complete": False,
                                            "pid": os.getpid() + 10**7}))
    with output_folder(out, known=("model.pt",), keep_unfinished=True) as run:
        run.start_writing()
        assert (out / "model.pt").read_bytes() == b"weights"


def test_report_tile_folders_go_with_their_report(tmp_path):
    """A report's tile folder (report_files/) is removed with the earlier run's report, and a
    tile folder half-written by a killed run (.report_files.<random>.tmp) is cleaned up."""
    from spotlens.cli._outputs import output_folder

    out = tmp_path / "out"
    known = ("spatial.h5ad", "report.html")
    with output_folder(out, known=known) as run:
        run.start_writing(["spatial.h5ad", "report.html"])
        run.write("spatial.h5ad", lambda path: Path(path).write_text("a"))
        run.write("report.html", lambda path: Path(path).write_text("<html>"))
        (out / "report_files" / "8").mkdir(parents=True)
        (out / "report_files" / "8" / "0_0.jpg").write_bytes(b"jpg")
        run.finish()
    (out / ".report_files.x1y2.tmp" / "9").mkdir(parents=True)
    (out / "notes_files").mkdir()  # not a report's: kept
    with output_folder(out, known=known, overwrite=True) as run:
        assert not (out / ".report_files.x1y2.tmp").exists()
        run.start_writing(["spatial.h5ad"])
        run.write("spatial.h5ad", lambda path: Path(path).write_text("b"))
        run.finish()
    assert not (out / "report.html").exists() and not (out / "report_files").exists()
    assert (out / "notes_files").is_dir()
