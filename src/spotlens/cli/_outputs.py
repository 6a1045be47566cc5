"""Output folders of the command line: one run's results per folder, recorded in a manifest.

A command that writes into ``OUT`` runs inside :func:`output_folder`, which

1. before any input is read, refuses ``OUT`` when it is a file, when it holds the results of
   another run (a complete manifest, or this command's output names without a manifest) unless
   ``--overwrite`` is given, or when another spotlens process is writing there now;
2. removes the temporary files an interrupted run left (``.<name>.<random>.tmp``, see
   :func:`spotlens.io.temporary_files`) and creates ``OUT`` if it is missing;
3. just before the first result is written (:meth:`OutputRun.start_writing`), removes the files
   of the earlier run — those its manifest lists and this command's output names, never any
   other file — and writes ``OUT/spotlens_run.json`` with ``"complete": false``;
4. on success writes the manifest again, atomically and last, with ``"complete": true``.

A run killed after step 3 leaves ``"complete": false`` behind: the next run into ``OUT`` treats
those files as unfinished and removes them before it writes (no ``--overwrite`` needed). A run
that fails before writing anything leaves ``OUT`` as it found it, and removes ``OUT`` if it
created it and ``OUT`` is still empty. Typical use::

    with output_folder(out, known=OUTPUTS, overwrite=overwrite) as run:
        run.add_input("spatial", path, adata=st)
        ...  # compute
        run.write("proportions.csv", lambda path: write_csv(table, path))
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import Annotated, Any

import typer

from .._validation import InputError

logger = logging.getLogger("spotlens")

MANIFEST_NAME = "spotlens_run.json"
#: Version of the manifest's layout; bump when a field changes meaning.
MANIFEST_FORMAT = 1

OverwriteOption = Annotated[bool, typer.Option(
    "--overwrite",
    help="Replace the results of an earlier run in the output folder: the files its "
         f"{MANIFEST_NAME} lists (or this command's output names) are removed before the new "
         "ones are written; other files are left alone.")]


@contextmanager
def output_folder(
    path: str | PathLike,
    *,
    known: Sequence[str],
    overwrite: bool = False,
    keep_unfinished: bool = False,
) -> Iterator[OutputRun]:
    """Run a command's writes into the folder ``path``; see the module docstring for the steps.

    Parameters
    ----------
    path
        The output folder (``-o``); created with its parents if missing.
    known
        File names this command writes (e.g. ``("spatial.h5ad", "proportions.csv")``). Without
        a manifest, any of them present means an earlier run's results.
    overwrite
        Replace an earlier run's results instead of refusing the folder.
    keep_unfinished
        Keep the files of an unfinished earlier run of the same command (or this command's
        output names without a manifest) instead of removing them, for a command that resumes
        from them (``histology train --resume``).

    Yields
    ------
    The :class:`OutputRun` to write through. Leaving the block normally writes the complete
    manifest (if :meth:`OutputRun.finish` was not called); an exception marks the run as failed
    in the manifest if it wrote anything, else removes the folder if this run created it and it
    is empty. The exception is re-raised.

    Raises
    ------
    InputError
        ``path`` is a file or cannot be created; it holds another run's results and
        ``overwrite`` is False; another spotlens process is writing into it.
    """
    run = OutputRun(Path(path).expanduser(), known=known, overwrite=overwrite,
                    keep_unfinished=keep_unfinished)
    try:
        yield run
    except BaseException as err:
        run._failed(err)
        raise
    if not run.finished:
        run.finish()


class OutputRun:
    """One command's writes into one folder (made by :func:`output_folder`, not directly).

    Attributes
    ----------
    folder
        The output folder.
    written
        Paths written so far, in order.
    inputs, parameters
        What the manifest records under ``"inputs"`` and ``"parameters"``; ``parameters``
        starts as the command's parsed options.
    """

    def __init__(self, folder: Path, *, known: Sequence[str], overwrite: bool,
                 keep_unfinished: bool) -> None:
        self.folder = folder
        self.written: list[Path] = []
        self.inputs: dict[str, dict] = {}
        self.command, self.parameters = _command_and_parameters()
        self.finished = False
        self._known = tuple(known)
        self._planned: list[str] = []
        self._writing = False
        self._started = _now()
        self._created: list[Path] = []
        if folder.exists() and not folder.is_dir():
            raise InputError(f"The output path {folder} is a file; pass a folder with -o.")
        self._old = _previous_run(folder, self._known)
        self._remove: list[str] = []
        if self._old is not None:
            self._remove = self._judge(overwrite=overwrite, keep_unfinished=keep_unfinished)
        for tmp in _temporary_files(folder):
            logger.info("removing %s, left by an interrupted run", tmp)
            tmp.unlink(missing_ok=True)
        for tmp in _temporary_folders(folder):
            logger.info("removing %s, left by an interrupted run", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        self._before = _snapshot(folder)
        self._created = _make_folder(folder)

    # --- what the manifest records ---------------------------------------------------------

    def add_input(self, name: str, path: str | PathLike | None = None, *, adata=None,
                  **details: Any) -> None:
        """Record an input: its path, size and modification time, the AnnData's shape.

        Parameters
        ----------
        name
            Role of the input, e.g. ``"spatial"``, ``"reference"``, ``"model"``.
        path
            File or folder read, if any (a folder's size is not recorded).
        adata
            The AnnData read from it; its ``n_obs × n_vars`` is recorded as ``"shape"``.
        **details
            Further JSON-serialisable facts, e.g. ``dataset="osmfish_cortex"``.
        """
        entry: dict[str, Any] = {}
        if path is not None:
            path = Path(path).expanduser()
            entry["path"] = str(path.resolve())
            try:
                stat = path.stat()
            except OSError:
                pass
            else:
                if path.is_file():
                    entry["size"] = stat.st_size
                entry["modified"] = _iso(stat.st_mtime)
        if adata is not None:
            entry["shape"] = [int(adata.n_obs), int(adata.n_vars)]
        entry.update(details)
        self.inputs[name] = entry

    # --- writing ---------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        """``folder / name`` for a plain file name (no folders, no ``..``)."""
        if not _plain_name(name):
            raise ValueError(f"output names are plain file names, got {name!r}")
        return self.folder / name

    def start_writing(self, planned: Iterable[str] = ()) -> None:
        """Clear the earlier run's files and mark this run as writing (once; later calls add names).

        Parameters
        ----------
        planned
            Names of the files this run is about to write; recorded as ``"outputs"`` in the
            manifest, so that files of a run killed part-way can be found and removed.
        """
        for name in planned:
            self.path(name)
            if name not in self._planned:
                self._planned.append(name)
        if self._writing:
            self._write_manifest(complete=False)
            return
        for name in self._remove:
            target = self.folder / name
            if target.is_file() or target.is_symlink():
                logger.info("removing %s of the earlier run", target)
                target.unlink(missing_ok=True)
            tiles = target.with_name(f"{target.stem}_files")  # a report's Deep Zoom tiles
            if target.suffix == ".html" and tiles.is_dir() and not tiles.is_symlink():
                logger.info("removing %s of the earlier run", tiles)
                shutil.rmtree(tiles)
        self._writing = True
        self._write_manifest(complete=False)

    def write(self, name: str, writer: Callable[[Path], object]) -> Path:
        """Write ``folder / name`` with ``writer(path)`` (an atomic writer) and record it.

        Parameters
        ----------
        name
            Plain file name inside the folder.
        writer
            Called with the destination path, e.g. ``lambda p: write_csv(table, p)``.

        Returns
        -------
        The path written.
        """
        path = self.path(name)
        self.start_writing([name])
        writer(path)
        self.record(path)
        return path

    def record(self, *paths: str | PathLike) -> None:
        """Record files written into the folder by other code (e.g. a training pipeline)."""
        if not self._writing:
            self.start_writing()
        for path in map(Path, paths):
            if path.parent.resolve() != self.folder.resolve() or not path.is_file():
                raise ValueError(f"{path} is not a file in {self.folder}")
            path = self.folder / path.name
            if path not in self.written:
                self.written.append(path)
        self._write_manifest(complete=False)

    def record_changed(self) -> list[Path]:
        """Record every file created or modified in the folder since the run began.

        Returns
        -------
        The files recorded by this call (the manifest and temporary files excluded).
        """
        now = _snapshot(self.folder)
        changed = [self.folder / name for name, stamp in now.items()
                   if self._before.get(name) != stamp]
        if changed:
            self.record(*changed)
        return changed

    def finish(self) -> Path:
        """Write the complete manifest, atomically and last; return its path."""
        if not self._writing:
            self.start_writing()
        path = self._write_manifest(complete=True)
        self.finished = True
        return path

    # --- internals -------------------------------------------------------------------------

    def _judge(self, *, overwrite: bool, keep_unfinished: bool) -> list[str]:
        """Refuse the folder or return the names to remove before writing."""
        old = self._old
        manifest = old["manifest"]
        where = self.folder
        if old["running"]:
            raise InputError(
                f"Another spotlens run ({manifest.get('command', '?')}, process "
                f"{manifest.get('pid')}, started {manifest.get('started', '?')}) is writing "
                f"into {where}. Wait for it to finish or choose another folder with -o; if no "
                f"spotlens run is going on, delete {where / MANIFEST_NAME}."
            )
        files = old["files"]
        listed = ", ".join(files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
        if overwrite:
            logger.info("--overwrite: the files of the earlier run in %s are replaced", where)
            return [*files, MANIFEST_NAME]
        same_command = manifest is None or manifest.get("command") == self.command
        if keep_unfinished and same_command and (manifest is None or not old["complete"]):
            logger.info("keeping the files of the earlier run in %s to resume from", where)
            return []
        if old["complete"]:
            what = (f"the results of an earlier run ({manifest.get('command', 'spotlens')}, "
                    f"finished {manifest.get('finished', '?')})" if manifest else
                    "spotlens results of an earlier run")
            raise InputError(
                f"The output folder {where} holds {what}: {listed or MANIFEST_NAME}. Pass "
                "--overwrite to replace them (only that run's files are removed), or choose "
                "another folder with -o."
            )
        logger.warning("%s holds the partial outputs of an unfinished run (started %s; killed "
                       "or failed): %s. They are removed before writing.", where,
                       manifest.get("started", "?"), listed or "none")
        return [*files, MANIFEST_NAME]

    def _write_manifest(self, *, complete: bool, error: str | None = None) -> Path:
        from .._version import __version__
        from ..io import atomic_path

        manifest = {
            "format": MANIFEST_FORMAT,
            "complete": complete,
            "spotlens_version": __version__,
            "python": sys.version.split()[0],
            "command": self.command,
            "folder": str(self.folder.resolve()),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self._started,
            "finished": _now() if complete else None,
            "inputs": self.inputs,
            "parameters": self.parameters,
            "outputs": list(self._planned),
            "files": [{"name": p.name, "size": p.stat().st_size}
                      for p in self.written if p.is_file()],
        }
        if error is not None:
            manifest["error"] = error
        path = self.folder / MANIFEST_NAME
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2, default=str, ensure_ascii=False) + "\n",
                           encoding="utf-8")
        return path

    def _failed(self, err: BaseException) -> None:
        """Mark a run that wrote something as failed; undo a folder that got nothing."""
        if self._writing and not self.finished:
            message = " ".join(str(err).split()) or type(err).__name__
            try:
                self._write_manifest(complete=False, error=f"{type(err).__name__}: {message}")
            except (OSError, InputError):  # the disk that failed the run may fail this too
                logger.warning("could not mark the run in %s as failed", self.folder)
            return
        for folder in reversed(self._created):  # deepest first
            try:
                folder.rmdir()  # only ever succeeds on an empty folder
            except OSError:
                break


def _previous_run(folder: Path, known: Sequence[str]) -> dict | None:
    """What an earlier run left in ``folder``, or None when it holds no spotlens results.

    Returns a dict with ``manifest`` (the parsed manifest or None), ``complete`` (True for a
    complete manifest and for results without a manifest), ``running`` (an unfinished run whose
    process is alive on this machine) and ``files`` (names to remove to clear that run).
    """
    if not folder.is_dir():
        return None
    present = [name for name in known if (folder / name).is_file()]
    path = folder / MANIFEST_NAME
    if not path.exists():
        if not present:
            return None
        return {"manifest": None, "complete": True, "running": False, "files": present}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        logger.warning("%s cannot be read (%s); treated as an earlier run's", path, err)
        return {"manifest": {}, "complete": True, "running": False, "files": present}
    listed = [entry.get("name") if isinstance(entry, dict) else entry
              for entry in manifest.get("files", [])]
    listed += list(manifest.get("outputs", []))
    files = []
    for name in [*listed, *present]:
        if isinstance(name, str) and _plain_name(name) and name != MANIFEST_NAME \
                and name not in files and (folder / name).exists():
            files.append(name)
    complete = manifest.get("complete") is True
    running = not complete and _alive(manifest.get("pid"), manifest.get("host"))
    return {"manifest": manifest, "complete": complete, "running": running, "files": files}


def _alive(pid: Any, host: Any) -> bool:
    """Whether process ``pid`` runs on this machine (not this process; other hosts: unknown)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _temporary_files(folder: Path) -> list[Path]:
    from ..io import temporary_files

    return temporary_files(folder)


def _temporary_folders(folder: Path) -> list[Path]:
    """Hidden ``.<name>_files.<random>.tmp`` folders of report tiles a killed run left."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.is_symlink() and p.name.startswith(".")
                  and p.name.endswith(".tmp") and "_files." in p.name)


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created, outermost first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(
            f"Cannot create the output folder {folder} ({err.strerror or err}). Pass a folder "
            "you can write to with -o."
        ) from err
    return missing


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time of each plain file in ``folder`` (manifest, temporaries out)."""
    if not folder.is_dir():
        return {}
    temporary = {p.name for p in _temporary_files(folder)}
    out = {}
    for p in folder.iterdir():
        if p.name == MANIFEST_NAME or p.name in temporary or not p.is_file():
            continue
        stat = p.stat()
        out[p.name] = (stat.st_size, stat.st_mtime_ns)
    return out


def _command_and_parameters() -> tuple[str, dict]:
    """The running command's path (``spotlens deconvolve``) and its parsed options."""
    from ._messages import current_context

    ctx = current_context()
    if ctx is None:
        return "spotlens", {}
    order = [p.name for p in getattr(ctx.command, "params", ()) if p.name in ctx.params]
    order += [name for name in ctx.params if name not in order]
    parameters: dict[str, Any] = {name: _jsonable(ctx.params[name]) for name in order}
    if ctx.args:
        parameters["arguments"] = list(ctx.args)
    path = ctx.command_path.split()
    return " ".join(["spotlens", *path[1:]]), parameters


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, PathLike):
        return str(Path(value).expanduser().resolve())
    return str(value)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and Path(name).name == name \
        and "/" not in name and "\\" not in name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")
