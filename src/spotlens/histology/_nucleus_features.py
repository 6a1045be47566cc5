"""What the nucleus-level model reads of each nucleus: descriptors, its spot, its context.

- :func:`nucleus_descriptors`: the segmentation's morphology and stain features
  (:data:`MORPHOLOGY_FEATURES`) beside the colour statistics (:func:`colour_features`: RGB and
  haematoxylin/eosin, mean, sd, 10/50/90th percentiles) of a small nucleus-centred crop
  (:data:`DEFAULT_CROP_UM` µm), ``n_nuclei × 34``.
- :func:`nucleus_spots`: the index of the spot each nucleus lies in (-1 outside), from the
  segmentation's ``obs["spot"]``.
- :func:`nearest_spots`: the nearest spot of every nucleus, whose tile features (the spot
  model's multi-scale EfficientNet-Lite0 features) are the nucleus's context.

Why a colour/texture descriptor and not an ImageNet encoder on each crop: EfficientNet-Lite0
reads 224-px inputs only; on the 2 shared CPU cores of the benchmark it encoded 3-20 tiles/s,
i.e. 3-20 hours for the ≈ 210,000 nuclei of six her2st sections. The colour statistics of
16-px crops take seconds per section; the encoder's view enters through the spot context
(``benchmarks/results/histology_nuclei.md`` reports both timings).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import NUCLEI_KEY, NUCLEUS_SPOT_KEY, SPATIAL_KEY
from .._validation import InputError
from ._features import COLOUR_FEATURE_NAMES, colour_features
from ._tiles import extract_tiles

#: the segmentation's ``obs`` columns the model reads (``segment_nuclei``)
MORPHOLOGY_FEATURES = ("area_um2", "perimeter_um", "eccentricity", "solidity", "hematoxylin",
                       "eosin", "red", "green", "blue")
#: side of the nucleus-centred crop, µm (about three nucleus diameters)
DEFAULT_CROP_UM = 24.0
#: crop side after resizing, px
CROP_PX = 16
#: descriptor column names
DESCRIPTOR_NAMES = MORPHOLOGY_FEATURES + tuple(f"crop_{n}" for n in COLOUR_FEATURE_NAMES)


def check_nuclei(nuclei, *, what: str = "nuclei") -> AnnData:
    """Refuse something that is not an AnnData of nuclei from :func:`segment_nuclei`.

    Raises
    ------
    InputError
        If ``nuclei`` is not an AnnData, has no nuclei, no ``obsm["spatial"]`` (n × 2) or
        lacks a column of :data:`MORPHOLOGY_FEATURES`.
    """
    if not isinstance(nuclei, AnnData):
        raise InputError(f"{what} must be the AnnData of segment_nuclei, got "
                         f"{type(nuclei).__name__}.")
    if nuclei.n_obs == 0:
        raise InputError(f"{what} holds no nuclei: nothing to predict (segment_nuclei found "
                         "none on this image).")
    xy = nuclei.obsm.get(SPATIAL_KEY)
    if xy is None or np.asarray(xy).ndim != 2 or np.asarray(xy).shape[1] != 2:
        raise InputError(f"{what} needs centroids (x, y) in full-resolution px in "
                         "obsm['spatial'] (n_nuclei × 2), as segment_nuclei writes.")
    missing = [c for c in MORPHOLOGY_FEATURES if c not in nuclei.obs.columns]
    if missing:
        raise InputError(f"{what} lacks the obs columns {missing} of segment_nuclei.")
    return nuclei


def nucleus_descriptors(cells: AnnData, *, image, mpp: float | None = None,
                        crop_um: float = DEFAULT_CROP_UM) -> np.ndarray:
    """Morphology, stain and crop colour statistics of every nucleus (not standardised).

    Parameters
    ----------
    cells
        The nuclei: AnnData of :func:`segment_nuclei` (centroids in ``obsm["spatial"]``,
        full-resolution px).
    image
        The full-resolution H&E the nuclei were segmented on.
    mpp
        µm per full-resolution px; None = the segmentation's
        (``nuclei.uns["nuclei"]["params"]["mpp"]``).
    crop_um
        Side of the nucleus-centred crop, µm (resized to :data:`CROP_PX` px).

    Returns
    -------
    ``n_nuclei × 34`` float32, columns :data:`DESCRIPTOR_NAMES`.

    Raises
    ------
    InputError
        If ``cells`` is not an AnnData of nuclei (:func:`check_nuclei`) or its µm/px is
        unknown.

    Examples
    --------
    >>> cells = segment_nuclei("C6_HE_fullres.jpg", adata=spots)  # doctest: +SKIP
    >>> nucleus_descriptors(cells, image="C6_HE_fullres.jpg").shape  # doctest: +SKIP
    (38125, 34)
    """
    nuclei = check_nuclei(cells)
    if mpp is None:
        mpp = nuclei.uns.get(NUCLEI_KEY, {}).get("params", {}).get("mpp")
        if mpp is None:
            raise InputError("The nuclei's µm/px is unknown: pass mpp (the segmentation "
                             "records it in uns['nuclei']['params']['mpp']).")
    morph = nuclei.obs.loc[:, list(MORPHOLOGY_FEATURES)].to_numpy(dtype=np.float64)
    xy = np.asarray(nuclei.obsm[SPATIAL_KEY], dtype=np.float64)
    side = float(crop_um) / float(mpp)
    crops = [colour_features(extract_tiles(image, xy[lo: lo + 4096], side, out_px=CROP_PX))
             for lo in range(0, len(xy), 4096)]
    return np.hstack([morph, np.vstack(crops)]).astype(np.float32)


def nucleus_spots(nuclei: AnnData, spot_names) -> np.ndarray:
    """``n_nuclei`` int64: the index in ``spot_names`` of each nucleus's spot, -1 outside.

    Raises
    ------
    InputError
        If ``nuclei`` has no ``obs["spot"]`` or names spots that ``spot_names`` lacks (nuclei
        of another section).
    """
    if NUCLEUS_SPOT_KEY not in nuclei.obs.columns:
        raise InputError(f"nuclei has no obs[{NUCLEUS_SPOT_KEY!r}]: segment them with "
                         "segment_nuclei(image, adata=spots) so each nucleus knows its spot.")
    names = pd.Index(pd.Index(spot_names).astype(str))
    spot = nuclei.obs[NUCLEUS_SPOT_KEY]
    given = spot.notna().to_numpy()
    index = np.full(nuclei.n_obs, -1, dtype=np.int64)
    found = names.get_indexer(spot[given].astype(str))
    if (found < 0).any():
        unknown = pd.unique(spot[given].astype(str)[found < 0])
        raise InputError(f"nuclei.obs[{NUCLEUS_SPOT_KEY!r}] names {len(unknown)} spots the "
                         f"section lacks (e.g. {list(unknown[:3])}): nuclei of another "
                         "section?")
    index[given] = found
    return index


def nearest_spots(nuclei_xy: np.ndarray, spot_xy: np.ndarray) -> np.ndarray:
    """``n_nuclei`` int64: index of the nearest spot centre to each nucleus (px)."""
    from scipy.spatial import cKDTree

    _, nearest = cKDTree(np.asarray(spot_xy, dtype=np.float64)).query(
        np.asarray(nuclei_xy, dtype=np.float64), k=1)
    return np.asarray(nearest, dtype=np.int64)


def section_zscore_columns(x: np.ndarray) -> np.ndarray:
    """Z-score each column over one section's nuclei (a constant column becomes 0)."""
    x = np.asarray(x, dtype=np.float64)
    mean, sd = x.mean(0), x.std(0)
    return ((x - mean) / np.where(sd > 1e-12, sd, 1.0) * (sd > 1e-12)).astype(np.float32)
