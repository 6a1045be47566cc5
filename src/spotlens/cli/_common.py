"""What every ``spotlens`` command shares: exit codes, common options, errors and logging.

The command modules (:mod:`._app` for ``deconvolve``/``demo``, :mod:`._histology` for
``histology ...``) import from here and never from each other; :mod:`spotlens.cli` joins their
typer apps into one command.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from .._backend import BackendError, resolve_device
from .._validation import InputError
from ._messages import cli_message

logger = logging.getLogger("spotlens")

#: Exit code of bad input (a one-line ``error: ...`` on stderr).
EXIT_INPUT = 2
#: Exit code of a failed read or write, or a missing optional piece.
EXIT_FAILURE = 1

OutOption = Annotated[
    Path,
    typer.Option("--out", "-o", metavar="DIR", show_default=False,
                 help="Output folder (created if missing). A folder with another run's "
                      "results is refused unless --overwrite."),
]
DeviceOption = Annotated[
    str,
    typer.Option(help="'cpu' (NumPy), 'torch' (torch on CPU), 'cuda', 'cuda:N', or 'auto' "
                      "(CUDA if available)."),
]
SeedOption = Annotated[int, typer.Option(
    help="Seed for count splitting, PCA, cell states and graph colouring (and, with "
         "--cell-level, metacells and cell positions).")]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress",
                                              help="Show a progress bar.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q",
                                           help="Log warnings only, not each stage.")]


def check_device(device: str) -> None:
    """Raise :class:`InputError` (exit code 2) before any work if ``device`` is unusable."""
    try:
        resolve_device(device)
    except ValueError as err:  # an unknown device string
        raise InputError(str(err)) from err


class SettingsFileError(InputError):
    """Bad input in a ``--config`` file: its message keeps the file's setting names."""


@contextmanager
def errors(*, cli_terms: bool = False) -> Iterator[None]:
    """Turn bad input into a one-line message and exit code 2; a failed read/write into code 1.

    With ``cli_terms`` the library's parameter names in the message become the running
    command's flags (``labels_key=`` -> ``--labels-key``, see :func:`._messages.cli_message`).
    """
    try:
        yield
    except (InputError, BackendError) as err:
        message = " ".join(str(err).split())
        translate = cli_terms and not isinstance(err, SettingsFileError)
        typer.echo(f"error: {cli_message(message) if translate else message}", err=True)
        raise typer.Exit(EXIT_INPUT) from None
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        typer.echo(f"error: {where}{err.strerror or err}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:  # advice in flags, as in the errors
            return cli_message(text).replace(" ", f" {record.levelname.lower()}: ", 1)
        return text


@contextmanager
def log_to_stderr(quiet: bool) -> Iterator[None]:
    """Print the ``spotlens`` logger's records to the current stderr while a command runs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    before = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]
