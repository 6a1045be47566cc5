"""Nucleus outlines (and spot circles) drawn on a crop of the H&E, as an RGB array."""

from __future__ import annotations

import numpy as np
from anndata import AnnData
from PIL import Image, ImageDraw

from .._keys import NUCLEI_KEY, SPATIAL_KEY
from .._validation import InputError, check_coordinates, check_int
from ..io import SlideImage, as_slide_image
from ._nuclei import NucleusConfig
from ._nuclei_tiling import Tile, classical_segmenter, segment_window


def nuclei_overlay(
    cells: AnnData,
    *,
    image,
    adata: AnnData | None = None,
    spatial_key: str = SPATIAL_KEY,
    center: tuple[float, float] | None = None,
    size_px: int = 768,
    color: tuple[int, int, int] = (0, 230, 0),
    spot_color: tuple[int, int, int] = (255, 200, 0),
) -> np.ndarray:
    """Draw the outlines of segmented nuclei on a square crop of the H&E.

    Outlines come from ``cells.uns["nuclei"]["labels"]`` when the segmentation stored its
    label image; otherwise the crop (with the recorded halo) is segmented again with the
    recorded classical settings and only the nuclei whose centroid is in ``cells`` are drawn
    — the same nuclei, as segmentation is tile-independent.

    Parameters
    ----------
    cells
        Nuclei from :func:`segment_nuclei` (``obsm["spatial"]``, ``uns["nuclei"]``).
    image
        The image they were segmented on (:class:`SlideImage`, path or array).
    adata
        Optional spots: their circles are drawn too (radius from ``uns["nuclei"]["params"]
        ["spot_radius_px"]``, centres from ``adata.obsm[spatial_key]``).
    spatial_key
        ``obsm`` key of the spot centres.
    center
        ``(x, y)`` px of the crop's centre; None = the nucleus nearest the median centroid.
    size_px
        Side of the crop, full-resolution px.
    color, spot_color
        RGB of the outlines and of the spot circles.

    Returns
    -------
    ``size_px × size_px × 3`` uint8 RGB (cut at the image's edge).

    Raises
    ------
    InputError
        If ``cells`` lacks ``uns["nuclei"]``, has no stored labels and was not segmented by
        the classical back-end, or ``size_px`` is not a positive integer.
    """
    from skimage.segmentation import find_boundaries

    slide = as_slide_image(image)
    size_px = check_int("size_px", size_px, minimum=8, expected="an integer ≥ 8 px")
    entry = cells.uns.get(NUCLEI_KEY) if isinstance(cells, AnnData) else None
    if entry is None or "params" not in entry:
        raise InputError("cells must be the nuclei AnnData of segment_nuclei (it has no "
                         f"uns[{NUCLEI_KEY!r}]['params']).")
    params = entry["params"]
    xy = np.asarray(cells.obsm[SPATIAL_KEY], dtype=np.float64)
    height, width = slide.shape
    if center is None:
        center = (xy[np.argmin(np.abs(xy - np.median(xy, axis=0)).sum(axis=1))] if len(xy)
                  else (width / 2, height / 2))
    x0 = int(np.clip(round(center[0] - size_px / 2), 0, max(width - size_px, 0)))
    y0 = int(np.clip(round(center[1] - size_px / 2), 0, max(height - size_px, 0)))
    x1, y1 = min(x0 + size_px, width), min(y0 + size_px, height)
    crop = slide.read_region(x0, y0, x1 - x0, y1 - y0)
    labels = _crop_labels(entry, params, slide, cells, (x0, y0, x1, y1))
    out = crop.copy()
    out[find_boundaries(labels, mode="inner")] = color
    if adata is not None and "spot_radius_px" in params:
        coords = check_coordinates(adata, spatial_key)
        radius = float(params["spot_radius_px"])
        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        for x, y in coords:
            if x0 - radius <= x <= x1 + radius and y0 - radius <= y <= y1 + radius:
                draw.ellipse([x - x0 - radius, y - y0 - radius, x - x0 + radius,
                              y - y0 + radius], outline=tuple(spot_color), width=3)
        out = np.asarray(canvas)
    return out


def _crop_labels(entry, params, slide: SlideImage, cells: AnnData, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    if "labels" in entry:
        return np.asarray(entry["labels"])[y0:y1, x0:x1]
    if params.get("backend") != "classical":
        raise InputError(
            f"The nuclei were segmented with backend={params.get('backend')!r} without their "
            "label image; segment with return_labels=True to draw their outlines."
        )
    known = set(NucleusConfig.__dataclass_fields__)
    config = NucleusConfig.from_dict({k: v for k, v in params.items() if k in known})
    halo = int(params["halo_px"])
    height, width = slide.shape
    window = (max(x0 - halo, 0), max(y0 - halo, 0), min(x1 + halo, width),
              min(y1 + halo, height))
    rgb = slide.read_region(window[0], window[1], window[2] - window[0], window[3] - window[1])
    grow = int(np.ceil(config.max_diameter_px(float(params["mpp"]))))  # nuclei cut by the crop
    core = (max(x0 - grow, window[0]), max(y0 - grow, window[1]), min(x1 + grow, window[2]),
            min(y1 + grow, window[3]))
    tile = Tile(0, core, window)
    result = segment_window(rgb, tile, classical_segmenter(float(params["mpp"]), config),
                            keep_labels=True)
    labels = result["labels"][y0 - window[1]:y1 - window[1], x0 - window[0]:x1 - window[0]]
    # keep only nuclei that are in `cells` (a subset of the nuclei may have been passed)
    found = result["features"][:, :2]
    xy = np.asarray(cells.obsm[SPATIAL_KEY], dtype=np.float64)
    if len(found) and len(xy):
        from scipy.spatial import cKDTree

        distance, _ = cKDTree(xy).query(found, k=1)
        keep = np.r_[False, distance < 0.5]
    else:
        keep = np.zeros(len(found) + 1, dtype=bool)
    return np.where(keep[labels], labels, 0)
