"""spotlens: cell-type deconvolution and histology-based expression for spatial transcriptomics.

Sub-packages are imported lazily, so ``import spotlens`` is cheap and never imports torch.
Bad input raises :class:`spotlens.InputError` (a ``ValueError``) naming the problem and the fix.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__

_SUBMODULES = ("cli", "datasets", "deconv", "histology", "io", "metrics", "pl", "pp")

__all__ = [*_SUBMODULES, "InputError", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from . import cli, datasets, deconv, histology, io, metrics, pl, pp  # noqa: F401
    from ._validation import InputError  # noqa: F401


def __getattr__(name: str):
    if name == "InputError":  # ``from spotlens import InputError``, loaded on first use
        from ._validation import InputError

        globals()[name] = InputError
        return InputError
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'spotlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
