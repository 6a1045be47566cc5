"""Histology: H&E images, spot tiles, encoders, and models of expression from images.

The image layer (reading slides, tiles, tissue masks, stain normalisation) needs no torch;
encoders and models import torch when first used, so ``import spotlens.histology`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._image import SlideImage, read_image
from ._stain import DEFAULT_REFERENCE, StainReference, fit_macenko, macenko_normalize
from ._tiles import TileGeometry, extract_tiles, spot_tiles, tile_geometry
from ._tissue import grid_spots, tissue_mask

_LAZY = {
    "Encoder": "._encoders",
    "available_encoders": "._encoders",
    "get_encoder": "._encoders",
    "register_encoder": "._encoders",
    "COLOUR_FEATURE_NAMES": "._features",
    "colour_features": "._features",
    "image_identity": "._features",
    "tile_cache_key": "._features",
    "tile_features": "._features",
    "RidgeBaseline": "._baseline",
    "evaluate": "._metrics",
    "log_normalize": "._metrics",
    "section_log_expression": "._metrics",
    "select_target_genes": "._metrics",
    "ExpressionModel": "._train",
    "Section": "._train",
    "TrainConfig": "._train",
    "HistologyModel": "._inference",
    "load_model": "._inference",
    "load_section": "._sections",
    "predict": "._inference",
    "train": "._pipeline",
}
# public name -> (module, attribute) where they differ
_ALIASES = {"evaluate_model": ("._inference", "evaluate")}

__all__ = [
    "DEFAULT_REFERENCE",
    "SlideImage",
    "StainReference",
    "TileGeometry",
    "extract_tiles",
    "fit_macenko",
    "grid_spots",
    "macenko_normalize",
    "read_image",
    "spot_tiles",
    "tile_geometry",
    "tissue_mask",
    *sorted(_LAZY),
    *sorted(_ALIASES),
]


def __getattr__(name: str) -> Any:
    if name in _LAZY or name in _ALIASES:
        module, attr = _ALIASES.get(name, (_LAZY.get(name), name))
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spotlens.histology' has no attribute {name!r}")
