"""Command-line interface: ``spotlens deconvolve``, ``demo``, ``report`` and ``histology``.

Thin by design: parse arguments, call :mod:`spotlens.io` and the public API, write the outputs
atomically. Bad input prints ``error: ...`` and exits with code 2.

The commands live in :mod:`._app` (``deconvolve``, ``demo``), :mod:`._histology`
(``histology train|evaluate|predict``) and :mod:`._segment` (``histology segment``, added to
the ``histology`` group here, as command modules do not import each other) and
:mod:`._report` (``report``); what they share is in :mod:`._common`. This module joins them
into the one ``spotlens`` command.
"""

from ._app import app, main
from ._histology import histology_app
from ._report import report_command
from ._segment import segment_command

histology_app.command("segment", no_args_is_help=True,
                      short_help="Segment the nuclei of an H&E image; nuclei per spot.")(
    segment_command)
app.add_typer(histology_app, name="histology")
app.command("report", no_args_is_help=True,
            short_help="Write OUT/report.html: the results over the tissue, for a browser.")(
    report_command)

__all__ = ["app", "main"]
