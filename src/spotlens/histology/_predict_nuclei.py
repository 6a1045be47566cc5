"""Every nucleus of an H&E-only image: the nucleus model without measured spots."""

from __future__ import annotations

import logging
from pathlib import Path

from anndata import AnnData

from .._keys import NUCLEUS_SPOT_KEY, SPATIAL_KEY, SPATIAL_UNS_KEY
from .._validation import InputError
from ..io import SlideImage
from ._nucleus_features import check_nuclei
from ._nucleus_level import NUCLEUS_PREDICTION_KEY
from ._predict import _model, image_grid
from ._segment import assign_spots

logger = logging.getLogger("spotlens")


def predict_image_nuclei(
    model_dir,
    image_path,
    *,
    nuclei: AnnData | None = None,
    mpp: float | None = None,
    spacing_um: float | None = None,
    mask=None,
    cache_dir=None,
    device: str = "cpu",
    progress: bool = False,
) -> AnnData:
    """Predict the expression of every nucleus of an H&E-only image (no measured spots).

    A nucleus model reads each nucleus's own crop and, for context, the image tiles of the spot
    it lies in; on an image alone the spots are a grid of pseudo-spots over the tissue, laid as
    :func:`predict_image` lays them (the training spots' pitch and tile side). The nuclei are
    segmented here (:func:`segment_nuclei`, defaults) unless given, then predicted by
    :meth:`HistologyModel.predict_nuclei` on the grid.

    Parameters
    ----------
    model_dir
        Folder written by :func:`train` with ``model="nucleus"`` (or a loaded
        :class:`HistologyModel`).
    image_path
        Full-resolution H&E image (a file, or a :class:`SlideImage` read from one).
    nuclei
        :func:`segment_nuclei`'s AnnData of this image's nuclei (``obsm["spatial"]`` in
        full-resolution px); its ``obs["spot"]``, if any, is replaced by the grid's
        pseudo-spots (the input is not modified). None: segment them.
    mpp
        µm per full-resolution px; None = from the file (TIFF/SVS), which JPEG/PNG lack.
    spacing_um
        Grid pitch in µm; None = the training spots' pitch.
    mask, cache_dir, device, progress
        As in :func:`predict_image`.

    Returns
    -------
    AnnData ``n_nuclei × n_genes`` as :meth:`HistologyModel.predict_nuclei` returns it, with
    ``obs["spot"]`` naming the grid's pseudo-spots (NA between them) and
    ``uns["nucleus_prediction"]["spot_expression"]`` the pseudo-spots' sums; also
    ``uns["nucleus_prediction"]["grid"]``: the pseudo-spots' centres ``(x, y)`` in
    full-resolution px (DataFrame indexed by spot name) and
    ``uns["nucleus_prediction"]["params"]["spacing_um"]``.

    Raises
    ------
    InputError
        A model that is not a nucleus model; ``nuclei`` that is not an AnnData of nuclei or has
        none; and as :func:`predict_image` (µm/px unknown, no tissue, image far coarser than
        the training scans).
    """
    import pandas as pd

    model = _model(model_dir, device)
    if model.settings.model_type != "nucleus":
        raise InputError(f"predict_image_nuclei needs a nucleus model (train with "
                         f"model='nucleus'); this one is {model.settings.model_type!r}.")
    if nuclei is not None:
        check_nuclei(nuclei)
    path = image_path if isinstance(image_path, SlideImage) else Path(image_path).expanduser()
    image, mpp, spacing, grid = image_grid(model, path, mpp=mpp, spacing_um=spacing_um,
                                           mask=mask)
    logger.info("%d pseudo-spots on tissue", grid.n_obs)
    if nuclei is not None:
        library = next(iter(grid.uns[SPATIAL_UNS_KEY].values()))
        radius = library["scalefactors"]["spot_diameter_fullres"] / 2
        nuclei = nuclei.copy()
        nuclei.obs[NUCLEUS_SPOT_KEY] = assign_spots(nuclei.obsm[SPATIAL_KEY],
                                                    grid.obsm[SPATIAL_KEY], radius,
                                                    grid.obs_names)
    result = model.predict_nuclei(grid, image=image, cells=nuclei, mpp=mpp, cache_dir=cache_dir,
                                  progress=progress, check_image=False)
    entry = result.uns[NUCLEUS_PREDICTION_KEY]
    entry["grid"] = pd.DataFrame(grid.obsm[SPATIAL_KEY], index=grid.obs_names.copy(),
                                 columns=["x", "y"])
    entry.setdefault("params", {})["spacing_um"] = spacing
    return result


__all__ = ["predict_image_nuclei"]
