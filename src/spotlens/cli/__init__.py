"""Command-line interface: ``spotlens deconvolve`` and ``spotlens demo`` (typer).

Thin by design: parse arguments, call :mod:`spotlens.io` and :func:`spotlens.deconv.deconvolve`,
write the outputs atomically. Bad input prints ``error: ...`` and exits with code 2.
"""

from ._app import app, main

__all__ = ["app", "main"]
