"""Command-line interface: ``spotlens deconvolve``, ``spotlens demo`` and ``spotlens histology``.

Thin by design: parse arguments, call :mod:`spotlens.io` and the public API, write the outputs
atomically. Bad input prints ``error: ...`` and exits with code 2.

The commands live in :mod:`._app` (``deconvolve``, ``demo``) and :mod:`._histology`
(``histology train|evaluate|predict``); what they share is in :mod:`._common`. This module
joins them into the one ``spotlens`` command.
"""

from ._app import app, main
from ._histology import histology_app

app.add_typer(histology_app, name="histology")

__all__ = ["app", "main"]
