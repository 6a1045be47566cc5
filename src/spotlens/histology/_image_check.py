"""Is this full-resolution image the section's own? A check against the image stored with it.

A Visium-style AnnData keeps a downscaled copy of its section's H&E in
``uns["spatial"][library_id]["images"]["lowres"|"hires"]``, with the factor in
``scalefactors["tissue_lowres_scalef"|"tissue_hires_scalef"]`` (stored px per full-resolution
px). Another section's image padded or cropped to the right size passes every size check and
gives predictions with r ≈ 0; downsampling the full image to the stored copy's scale and
correlating grey levels tells them apart. On the her2st and stutility_mob sections the own
image's r and another section's fall on either side of a wide gap, and :data:`MIN_IMAGE_R`
sits in its middle (the measured ranges: ``benchmarks/results/docstring_figures.md``;
``tests/test_histology_sections.py`` recomputes them when ``shared/data`` is present). Cost:
one JPEG decoded at 1/8 of its size, or a pyramid level of a TIFF.
"""

from __future__ import annotations

import math

import numpy as np
from anndata import AnnData
from PIL import Image

from .._validation import InputError
from ..io import SlideImage

#: Below this Pearson r between the grey levels of the full image (downsampled) and the
#: section's stored image, the full image is refused as another section's.
MIN_IMAGE_R = 0.8
_MAX_SIDE = 1000  # the comparison is made at most this many px on a side
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L" mode


def _grey(array: np.ndarray) -> np.ndarray | None:
    """``h × w`` float32 luma of a grey, RGB or RGBA array (any numeric scale); None if unusable."""
    array = np.asarray(array)
    if array.dtype.kind not in "uifb" or array.ndim not in (2, 3) or array.size == 0:
        return None
    array = array.astype(np.float32)
    if array.ndim == 3:
        if array.shape[2] >= 3:
            array = array[..., :3] @ _LUMA.astype(np.float32)
        elif array.shape[2] in (1, 2):
            array = array[..., 0]
        else:
            return None
    return array if np.all(np.isfinite(array)) else None


def stored_image(adata: AnnData, library_id: str | None) -> tuple[str, np.ndarray, float] | None:
    """The smallest usable stored image of a library: ``(key, grey h × w, scale factor)``.

    ``scale factor`` = stored px per full-resolution px. None when the library stores no image
    with a positive scale factor (nothing to compare with).
    """
    spatial = adata.uns.get("spatial")
    if library_id is None or not hasattr(spatial, "get"):
        return None
    entry = spatial.get(library_id)
    entry = entry if hasattr(entry, "get") else {}
    images = entry.get("images") or {}
    scalefactors = entry.get("scalefactors") or {}
    best = None
    for key in ("lowres", "hires"):
        array = images.get(key) if hasattr(images, "get") else None
        try:
            scale = float(scalefactors.get(f"tissue_{key}_scalef"))
        except (TypeError, ValueError):
            continue
        grey = None if array is None else _grey(array)
        if grey is None or not (math.isfinite(scale) and scale > 0) or np.ptp(grey) == 0:
            continue
        if best is None or grey.size < best[1].size:
            best = (key, grey, scale)
    return best


def _agreement(stored: np.ndarray, scale: float, overview: np.ndarray, sx: float,
               sy: float) -> float:
    """Pearson r of the stored grey image and the overview resampled onto its pixels."""
    f = max(1, math.ceil(max(stored.shape) / _MAX_SIDE))
    if f > 1:  # box-average the stored image down to at most _MAX_SIDE px
        h, w = stored.shape[0] // f, stored.shape[1] // f
        stored = stored[:h * f, :w * f].reshape(h, f, w, f).mean(axis=(1, 3))
        scale = scale / f
    hs, ws = stored.shape
    box = (0.0, 0.0, ws / scale * sx, hs / scale * sy)  # the stored frame, in overview px
    need_h, need_w = math.ceil(box[3]), math.ceil(box[2])
    if need_h > overview.shape[0] or need_w > overview.shape[1]:  # beyond the image: glass
        canvas = np.full((max(need_h, overview.shape[0]), max(need_w, overview.shape[1])),
                         255.0, dtype=np.float32)
        canvas[:overview.shape[0], :overview.shape[1]] = overview
        overview = canvas
    resampled = np.asarray(Image.fromarray(np.ascontiguousarray(overview, np.float32), "F")
                           .resize((ws, hs), Image.Resampling.BOX, box=box), dtype=np.float64)
    a = resampled.ravel() - resampled.mean()
    b = stored.ravel().astype(np.float64) - stored.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / denom) if denom > 0 else 0.0


def image_agreement(adata: AnnData, image: SlideImage, *,
                    library_id: str | None = None) -> dict | None:
    """Correlate a full-resolution image with the downscaled image stored in its section.

    The full image is read at the stored image's scale (:meth:`SlideImage.overview`),
    resampled onto the stored image's pixels (box filter; a frame larger than the image is
    padded with white) and both are turned to grey levels (luma); the result is their Pearson
    r over all pixels.
    Stored images over 1,000 px on a side are box-averaged to at most 1,000 px first.

    Parameters
    ----------
    adata
        The section; reads ``uns["spatial"][library_id]["images"]["lowres"|"hires"]`` (grey,
        RGB or RGBA, any numeric scale) and ``["scalefactors"]["tissue_lowres_scalef"|
        "tissue_hires_scalef"]``. The smaller usable image is used.
    image
        The full-resolution image said to be the section's.
    library_id
        Key of ``adata.uns["spatial"]``; None = its only library (none, or several: no check).

    Returns
    -------
    ``{"r": Pearson r, "stored": "lowres" | "hires", "scale": stored px per full-res px}``, or
    None when the section stores no usable image (nothing is compared).

    Raises
    ------
    InputError
        If the image's pixels cannot be decoded (the message names the file).
    """
    if library_id is None:
        spatial = adata.uns.get("spatial")
        if not hasattr(spatial, "keys") or len(spatial) != 1:
            return None
        library_id = next(iter(spatial.keys()))
    found = stored_image(adata, library_id)
    if found is None:
        return None
    key, stored, scale = found
    f = max(1, math.ceil(max(stored.shape) / _MAX_SIDE))
    overview, sx, sy = image.overview(min(1.0, scale / f))
    return {"r": _agreement(stored, scale, overview, sx, sy), "stored": key, "scale": scale}


def check_section_image(adata: AnnData, image: SlideImage, *, section: str,
                        library_id: str | None = None) -> float | None:
    """Refuse a full-resolution image that is not the section's own (:func:`image_agreement`).

    Parameters
    ----------
    adata
        The section (read only).
    image
        Its full-resolution image.
    section
        The section's name, for the message.
    library_id
        Key of ``adata.uns["spatial"]``; None = its only library.

    Returns
    -------
    The Pearson r of the comparison, or None when the section stores no image to compare with.

    Raises
    ------
    InputError
        If r < :data:`MIN_IMAGE_R` (the message names the image, the section and the file the
        section records as its own, and how to skip the check), or the image cannot be decoded.
    """
    result = image_agreement(adata, image, library_id=library_id)
    if result is None or result["r"] >= MIN_IMAGE_R:
        return None if result is None else result["r"]
    if library_id is None:
        library_id = next(iter(adata.uns["spatial"].keys()))
    entry = adata.uns["spatial"][library_id]
    metadata = (entry.get("metadata") if hasattr(entry, "get") else None) or {}
    own = metadata.get("fullres_image_file") if hasattr(metadata, "get") else None
    name = image.path.name if image.path is not None else "the image array"
    where = f"adata.uns['spatial'][{library_id!r}]['images']"
    raise InputError(
        f"{name} does not look like section {section}'s image: downsampled to the scale of "
        f"{where}[{result['stored']!r}] (× {result['scale']:.3g}), its grey levels correlate "
        f"with that stored image at r = {result['r']:.2f} (< {MIN_IMAGE_R}; a section's own "
        "image gives r > 0.98). Is it another section's image, padded or cropped to this size? "
        "Pass section " + section + "'s full-resolution image"
        + (f" ({own})" if own else "") + ". If this image is right and the stored one differs "
        f"on purpose, delete {where} to skip this check."
    )
