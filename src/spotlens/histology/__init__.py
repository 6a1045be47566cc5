"""Histology: H&E images, spot tiles, encoders, and models of expression from images.

The image layer (tiles, tissue masks, stain normalisation; images are read by
:mod:`spotlens.io`) needs no torch; encoders and models import torch when first used, so
``import spotlens.histology`` stays light.

- AnnData in, documented keys out: :func:`image_features` (``obsm["X_<encoder>"]``),
  :func:`predict` (``obsm[key_added]``, its uncertainty ``obsm[key_added + "_std"]``,
  ``uns[key_added]``; with ``inplace=False`` a :class:`HistologyPrediction`),
  :func:`predict_image` (a grid over an image alone, a new AnnData), :func:`evaluate`.
- :class:`HistologyModel`: fit / predict / save / load for every model type (``"attention"``,
  ``"graph"``, ``"ridge"``); :func:`train` fits one and writes its folder, :func:`load_model`
  reads it. Under it: the predictors (:class:`ExpressionModel` over an ``nn.Module``,
  :class:`RidgeBaseline`), the training loop (``_trainer.py``) and the model types
  (``_registry.py``).
- Nucleus level (``model="nucleus"``, :class:`NucleusPredictor`): expression of every
  segmented nucleus, fitted so that a spot's nuclei add up to it;
  :meth:`HistologyModel.predict_nuclei` returns an AnnData of nuclei;
  :func:`predict_image_nuclei` does it on an H&E image alone (a grid of pseudo-spots).
- :func:`run_protocol`: the frozen evaluation protocol (every choice nested in the training
  sections, each test section read once; :func:`block_bootstrap_pearson` intervals, gene sets
  from :func:`select_gene_sets`). :func:`train`'s defaults are the route it selects
  (``benchmarks/results/histology_her2st_protocol.md``).
- Features for your own models and benchmarks: :func:`multiscale_features` (tiles of several
  sizes around each spot, encoded and put side by side, cached), :func:`standardize_section`
  (z-score each feature over one section's spots), :data:`DEFAULT_TILE_SCALES` (the tile
  sides, in spot diameters, of a multi-scale model) and :data:`DEFAULT_RANKS` (the projection
  ranks a ridge model chooses from: ``RidgeBaseline(ranks=DEFAULT_RANKS)`` is ``train``'s
  ridge).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..io import SlideImage, read_image  # re-exported: images are read in spotlens.io
from ._stain import DEFAULT_REFERENCE, StainReference, fit_macenko, macenko_normalize
from ._rank import DEFAULT_RANKS
from ._tiles import DEFAULT_TILE_SCALES, TileGeometry, extract_tiles, spot_tiles, tile_geometry
from ._tissue import grid_spots, tissue_mask

_LAZY = {
    "Encoder": "._encoders",
    "available_encoders": "._encoders",
    "get_encoder": "._encoders",
    "register_encoder": "._encoders",
    "COLOUR_FEATURE_NAMES": "._features",
    "colour_features": "._features",
    "image_identity": "._features",
    "multiscale_features": "._features",
    "standardize_section": "._normalize",
    "tile_cache_key": "._features",
    "tile_features": "._features",
    "RidgeBaseline": "._baseline",
    "evaluate": "._metrics",
    "log_normalize": "._metrics",
    "section_log_expression": "._metrics",
    "select_target_genes": "._metrics",
    "ExpressionModel": "._expression",
    "Section": "._train_data",
    "TrainConfig": "._train_data",
    "HistologyModel": "._model",
    "HistologyPrediction": "._model",
    "MODEL_TYPES": "._registry",
    "image_features": "._predict",
    "load_model": "._predict",
    "predict": "._predict",
    "predict_image": "._predict",
    "predict_image_nuclei": "._predict_nuclei",
    "train": "._train",
    "BootstrapInterval": "._intervals",
    "block_bootstrap_pearson": "._intervals",
    "paired_block_bootstrap_pearson": "._intervals",
    "GeneFilter": "._gene_sets",
    "HOUSEKEEPING_GENES": "._gene_sets",
    "select_gene_sets": "._gene_sets",
    "EvalSection": "._protocol",
    "ProtocolConfig": "._protocol",
    "fit_protocol": "._protocol",
    "run_protocol": "._protocol",
    "score_protocol": "._protocol",
    "NucleusConfig": "._nuclei",
    "segment_tile": "._nuclei",
    "count_nuclei": "._segment",
    "segment_nuclei": "._segment",
    "nuclei_overlay": "._nuclei_overlay",
    "NucleusModelConfig": "._nucleus_fit",
    "NucleusPredictor": "._nucleus_fit",
    "nucleus_descriptors": "._nucleus_features",
}
# public name -> (module, attribute) where they differ
_ALIASES = {
    "evaluate_model": ("._predict", "evaluate"),
    "load_section": ("..io", "read_section"),  # sections are read in spotlens.io
}

__all__ = [
    "COLOUR_FEATURE_NAMES", "DEFAULT_REFERENCE", "Encoder", "ExpressionModel", "HistologyModel",
    "HistologyPrediction",
    "MODEL_TYPES", "RidgeBaseline", "Section", "SlideImage", "StainReference", "TileGeometry",
    "TrainConfig", "available_encoders", "colour_features", "evaluate", "evaluate_model",
    "extract_tiles", "fit_macenko", "get_encoder", "grid_spots", "image_features",
    "image_identity", "load_model", "load_section", "log_normalize", "macenko_normalize",
    "predict", "predict_image", "predict_image_nuclei", "read_image", "register_encoder", "section_log_expression",
    "select_target_genes", "spot_tiles", "tile_cache_key", "tile_features", "tile_geometry",
    "tissue_mask", "train",
    # the frozen evaluation protocol (issue 15)
    "BootstrapInterval", "EvalSection", "GeneFilter", "HOUSEKEEPING_GENES", "ProtocolConfig",
    "block_bootstrap_pearson", "fit_protocol", "paired_block_bootstrap_pearson", "run_protocol",
    "score_protocol", "select_gene_sets",
    # features and settings for benchmarks of one's own (issue 14)
    "DEFAULT_RANKS", "DEFAULT_TILE_SCALES", "multiscale_features", "standardize_section",
    # nucleus segmentation (issue 16)
    "NucleusConfig", "count_nuclei", "nuclei_overlay", "segment_nuclei", "segment_tile",
    # nucleus-level expression (issue 16)
    "NucleusModelConfig", "NucleusPredictor", "nucleus_descriptors",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY or name in _ALIASES:
        module, attr = _ALIASES.get(name, (_LAZY.get(name), name))
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spotlens.histology' has no attribute {name!r}")
