"""A model folder on disk: what :class:`~spotlens.histology.HistologyModel` saves and loads.

A folder (:meth:`~spotlens.histology.HistologyModel.save`,
:meth:`~spotlens.histology.HistologyModel.load`) holds the predictor's file (named by the model
type, ``_registry.py``), the uncertainty ensemble ``uncertainty.npz`` when the model has one
(``_uncertainty.py``) and ``config.json`` (:class:`~spotlens.histology._folder.ModelConfig`),
written last so that a folder with a ``config.json`` is complete.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .._validation import InputError
from ._folder import ModelConfig, model_dir
from ._registry import MODEL_TYPES, ModelType
from ._uncertainty import ENSEMBLE_FILE, RidgeEnsemble

logger = logging.getLogger("spotlens")


def write_model_folder(path, settings: ModelConfig, model_type: ModelType, predictor,
                       ensemble: RidgeEnsemble | None) -> Path:
    """Write the predictor's file, ``uncertainty.npz`` (with an ensemble), then ``config.json``.

    Each file is written atomically. Returns the folder.

    Raises
    ------
    InputError
        If ``path`` is a file or cannot be created.
    """
    folder = model_dir(path, create=True)
    model_type.save(predictor, folder / settings.model_file)
    if ensemble is not None:
        ensemble.save(folder / ENSEMBLE_FILE)
    settings.write(folder)
    return folder


def read_model_folder(path, *, device: str = "cpu"
                      ) -> tuple[Path, ModelConfig, object, RidgeEnsemble | None]:
    """Read a model folder: ``(folder, settings, predictor on device, ensemble or None)``.

    A folder without an uncertainty ensemble (written before spotlens stored one) reads with
    ``ensemble = None``; one whose ``config.json`` records an ensemble that is missing reads
    the same, with a warning.

    Raises
    ------
    InputError
        If the folder or its ``config.json`` is missing, unreadable or not a spotlens model,
        its model type is unknown, or the model file is missing.
    """
    path = model_dir(path)
    settings = ModelConfig.read(path)
    if settings.model_type not in MODEL_TYPES:
        raise InputError(f"{path} holds a {settings.model_type!r} model; this spotlens "
                         f"reads {tuple(MODEL_TYPES)}.")
    model_path = path / settings.model_file
    if not model_path.is_file():
        raise InputError(f"{path} has no {settings.model_file}; training did not finish.")
    predictor = MODEL_TYPES[settings.model_type].load(model_path, device=device)
    ensemble = None
    if settings.uncertainty is not None:
        ens_path = path / settings.uncertainty.get("file", ENSEMBLE_FILE)
        if ens_path.is_file():
            ensemble = RidgeEnsemble.load(ens_path)
        else:
            logger.warning("%s records an uncertainty ensemble but %s is missing; "
                           "predictions will carry no uncertainty", path, ens_path.name)
    return path, settings, predictor, ensemble
