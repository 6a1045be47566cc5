"""The AnnData side of :class:`~spotlens.histology.HistologyModel`: tiles, results, keys.

Where the model's tiles go on a section's spots, and what
:meth:`~spotlens.histology.HistologyModel.predict` returns and writes:

- :func:`check_scale` refuses an image much coarser (µm/px) than the training scans;
- :func:`place_tiles` opens a section's image and places the model's tiles on its spots, with
  every check;
- :class:`HistologyPrediction` is what ``predict(..., inplace=False)`` returns;
- :func:`prediction_params` and :func:`write_prediction` build and write
  ``obsm[key_added]``, ``obsm[key_added + "_std"]``, ``uns[key_added]`` and the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import prediction_std_key
from .._validation import InputError
from ..io import SlideImage, read_image
from ._folder import TileSettings
from ._image_check import check_section_image
from ._tiles import TileGeometry, _check_on_image, tile_geometry

VALUES = "log1p(normalize_total(counts, 1e4)), predicted"
STD_VALUES = "s.d. over the uncertainty ensemble, log-normalised units"
NO_UNCERTAINTY = ("not available: the model folder has no uncertainty ensemble (written before "
                  "spotlens stored one, or trained with n_bootstrap=0); retrain to get it")
_MAX_MPP_RATIO = 2.0  # a scan this much coarser than the training scans is refused


@dataclass(frozen=True)
class HistologyPrediction:
    """What :meth:`HistologyModel.predict` returns with ``inplace=False``.

    Attributes
    ----------
    expression
        DataFrame ``n_spots × n_genes``, predicted ``log1p(normalize_total(counts, 1e4))``,
        index = ``obs_names``, columns = the model's genes (written as ``obsm[key_added]``).
    std
        DataFrame of the same shape: the per-spot, per-gene uncertainty, the standard
        deviation over the model's block-bootstrap ensemble (log-normalised units, ≥ 0;
        ``_uncertainty.py``), written as ``obsm[key_added + "_std"]``; None when the model
        folder has no ensemble.
    """

    expression: pd.DataFrame
    std: pd.DataFrame | None = None


def check_scale(tiles: TileSettings, image: SlideImage, mpp: float | None) -> None:
    """Refuse an image much coarser (µm/px) than the training scans described by ``tiles``.

    Raises
    ------
    InputError
        If ``mpp`` (or the image's) is over twice the training scans' µm/px.
    """
    mpp = mpp if mpp is not None else image.mpp
    if mpp is not None and tiles.mpp is not None and mpp > _MAX_MPP_RATIO * tiles.mpp:
        raise InputError(
            f"The image has {mpp:.3g} µm/px, more than {_MAX_MPP_RATIO:g}× coarser than the "
            f"training scans ({tiles.mpp:.3g} µm/px): a {tiles.tile_um:.0f} µm tile "
            f"would be {tiles.tile_um / mpp:.0f} px instead of {tiles.tile_px:.0f} px. Use "
            "the full-resolution image (not a downscaled copy), or check --mpp."
        )


def place_tiles(adata: AnnData, image, tiles: TileSettings, *, mpp: float | None,
                spatial_key: str, library_id: str | None,
                check_image: bool) -> tuple[SlideImage, TileGeometry]:
    """Open ``image`` and place the model's tiles on ``adata``'s spots, with every check.

    Returns the opened image and the tiles' :class:`~spotlens.histology.TileGeometry` (centres
    and scale-1 side in full-resolution px, µm/px).

    Raises
    ------
    InputError
        If ``adata`` is not an AnnData, the image is much coarser than the training scans
        (:func:`check_scale`), its scale is unknown, the tiles fall off it, or (with
        ``check_image``) it is another section's image.
    """
    if not isinstance(adata, AnnData):
        raise InputError(f"adata must be an AnnData object, got {type(adata).__name__}.")
    image = image if isinstance(image, SlideImage) else read_image(image)
    tile_um = tiles.tile_um
    check_scale(tiles, image, mpp)
    geometry = tile_geometry(adata, image=image, tile_um=tile_um, mpp=mpp,
                             library_id=library_id, spatial_key=spatial_key)
    if tile_um is not None and geometry.mpp is not None:
        check_scale(tiles, image, geometry.mpp)  # with the resolved µm/px
    _check_on_image(adata, geometry, image, spatial_key)
    if check_image:
        name = geometry.library_id or (image.path.stem if image.path else "section")
        check_section_image(adata, image, section=name, library_id=geometry.library_id)
    return image, geometry


def prediction_params(model, geometry: TileGeometry, image: SlideImage,
                      spatial_key: str) -> dict:
    """``uns[key_added]["params"]`` of a :class:`HistologyModel`'s prediction on a section.

    Model folder, model type, encoder, ``tile_um`` (µm), ``mpp`` (µm/px), ``spatial_key``,
    ``library_id``, image path, the values' units, the uncertainty and the spotlens version;
    entries that are None are left out.
    """
    from .._version import __version__

    params = {"model": None if model.path is None else str(model.path),
              "model_type": model.settings.model_type,
              "encoder": model.settings.encoder.name, "tile_um": geometry.tile_um,
              "mpp": geometry.mpp, "spatial_key": spatial_key,
              "library_id": geometry.library_id,
              "image": None if image.path is None else str(image.path), "values": VALUES,
              "uncertainty": model.uncertainty_description(),
              "spotlens_version": __version__}
    return {k: v for k, v in params.items() if v is not None}


def write_prediction(adata: AnnData, prediction: HistologyPrediction, features: np.ndarray, *,
                     genes: list[str], params: dict, key_added: str, features_key: str) -> None:
    """Write a prediction and its features into ``adata``.

    Writes ``obsm[key_added]`` (``prediction.expression``), ``obsm[key_added + "_std"]``
    (``prediction.std``, when not None), ``uns[key_added] = {"genes": genes, "params":
    params}`` and ``obsm[features_key]`` (``features``, ``n_spots × n_features``).
    """
    adata.obsm[key_added] = prediction.expression
    if prediction.std is not None:
        adata.obsm[prediction_std_key(key_added)] = prediction.std
    adata.uns[key_added] = {"genes": list(genes), "params": params}
    adata.obsm[features_key] = features
