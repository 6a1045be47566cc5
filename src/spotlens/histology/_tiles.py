"""Spot-centred image tiles: geometry from the AnnData, pixels from a :class:`SlideImage`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from anndata import AnnData
from PIL import Image

from .._validation import InputError, check_coordinates, check_int
from ..io import SlideImage, as_slide_image, check_mpp

_MPP_SCALEFACTOR = "microns_per_pixel"  # Space Ranger (Visium HD) name; grid_spots writes it
_MPP_METADATA = ("microns_per_pixel", "microns_per_pixel_est")


@dataclass(frozen=True)
class TileGeometry:
    """Where each spot's tile lies on the full-resolution image.

    Attributes
    ----------
    centres_px
        ``n_spots × 2`` tile centres ``(x, y)`` in full-resolution px (= ``obsm[spatial_key]``).
    side_px
        Side of every (square) tile in full-resolution px, before resizing.
    mpp
        µm per full-resolution px used, or None when the tile was sized in px only.
    tile_um
        Side of every tile in µm (``side_px × mpp``), or None when ``mpp`` is unknown.
    library_id
        The ``uns["spatial"]`` library the scale factors came from, or None.
    mpp_source
        Where ``mpp`` came from: ``"argument"``, ``"image"``, ``"scalefactors"``,
        ``"metadata"`` or None.
    """

    centres_px: np.ndarray
    side_px: float
    mpp: float | None
    tile_um: float | None
    library_id: str | None
    mpp_source: str | None


def _library(adata: AnnData, library_id: str | None) -> tuple[str | None, dict]:
    """Return ``(library_id, uns["spatial"][library_id])``; ``(None, {})`` when there is none."""
    spatial = adata.uns.get("spatial")
    if spatial is None or not hasattr(spatial, "keys") or len(spatial) == 0:
        if library_id is not None:
            raise InputError(
                f"library_id={library_id!r} was given but adata.uns has no 'spatial' entry; "
                "there are no scale factors to look it up in."
            )
        return None, {}
    libraries = list(spatial.keys())
    if library_id is None:
        if len(libraries) > 1:
            raise InputError(
                f"adata.uns['spatial'] holds {len(libraries)} libraries ({libraries[:5]}); pass "
                "library_id= naming the section whose image this is (and subset adata to its "
                "spots)."
            )
        library_id = libraries[0]
    elif library_id not in spatial:
        raise InputError(
            f"adata.uns['spatial'] has no library {library_id!r} (libraries: {libraries[:5]}). "
            "Pass one of those as library_id=."
        )
    entry = spatial[library_id]
    return library_id, (entry if hasattr(entry, "get") else {})


def _stored_mpp(image: SlideImage | None, entry: dict, library_id) -> tuple[float | None,
                                                                          str | None]:
    """µm/px of a section and where it came from: the image, the scale factors, the metadata."""
    scalefactors = entry.get("scalefactors", {}) or {}
    metadata = entry.get("metadata", {}) or {}
    where = f"adata.uns['spatial'][{library_id!r}]"
    if image is not None and image.mpp is not None:
        return image.mpp, "image"
    if scalefactors.get(_MPP_SCALEFACTOR) is not None:
        return check_mpp(scalefactors[_MPP_SCALEFACTOR], what=f"{where}['scalefactors']"
                         f"[{_MPP_SCALEFACTOR!r}]"), "scalefactors"
    for key in _MPP_METADATA:
        if metadata.get(key) is not None:
            return check_mpp(metadata[key], what=f"{where}['metadata'][{key!r}]"), "metadata"
    return None, None


def section_mpp(adata: AnnData, *, image: SlideImage | None = None,
                library_id: str | None = None) -> tuple[float | None, str | None]:
    """Return the µm per full-resolution px a section records, and where it was found.

    Looked up as in :func:`tile_geometry` without an ``mpp`` argument: ``image.mpp``, then
    ``uns["spatial"][library_id]["scalefactors"]["microns_per_pixel"]``, then
    ``["metadata"]["microns_per_pixel"]`` or ``["metadata"]["microns_per_pixel_est"]``.

    Returns
    -------
    mpp
        µm/px, or None when the section records none.
    source
        ``"image"``, ``"scalefactors"``, ``"metadata"`` or None.

    Raises
    ------
    InputError
        If the library is ambiguous or unknown, or a recorded value is not a positive number.
    """
    library_id, entry = _library(adata, library_id)
    return _stored_mpp(image, entry, library_id)


def tile_geometry(
    adata: AnnData,
    *,
    image: SlideImage | None = None,
    library_id: str | None = None,
    tile_um: float | None = None,
    mpp: float | None = None,
    spatial_key: str = "spatial",
) -> TileGeometry:
    """Compute each spot's tile centre and the tile side in full-resolution px.

    The tile side is ``tile_um / mpp`` px, or, when ``tile_um`` is None, the spot diameter
    ``uns["spatial"][library_id]["scalefactors"]["spot_diameter_fullres"]`` px (then no µm/px
    is needed). µm per px is taken from, in order: ``mpp``; ``image.mpp``;
    ``scalefactors["microns_per_pixel"]``; ``metadata["microns_per_pixel"]`` or
    ``metadata["microns_per_pixel_est"]`` of the same library.

    Parameters
    ----------
    adata
        Spots with centres ``(x, y)`` in full-resolution px in ``obsm[spatial_key]``.
    image
        Optional; only its ``mpp`` is used.
    library_id
        Key of ``adata.uns["spatial"]``; None = its only library.
    tile_um
        Tile side in µm; None = the spot diameter.
    mpp
        µm per full-resolution px; overrides the image's and the AnnData's.
    spatial_key
        ``obsm`` key of the spot centres.

    Returns
    -------
    TileGeometry

    Raises
    ------
    InputError
        If the coordinates are missing or not finite, the library is ambiguous or unknown,
        the spot diameter is needed but absent (the message names the key), ``tile_um`` is
        given but no µm/px is known, or a size is not positive.
    """
    if not isinstance(adata, AnnData):
        raise InputError(f"adata must be an AnnData object, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise InputError("The spatial data has 0 spots; there is nothing to tile.")
    coords = check_coordinates(adata, spatial_key)
    mpp = check_mpp(mpp)
    if tile_um is not None:
        tile_um = check_mpp(tile_um, what="tile_um", unit="µm")
    library_id, entry = _library(adata, library_id)
    scalefactors = entry.get("scalefactors", {}) or {}
    where = f"adata.uns['spatial'][{library_id!r}]"
    source = "argument" if mpp is not None else None
    if mpp is None:
        mpp, source = _stored_mpp(image, entry, library_id)

    if tile_um is None:
        if library_id is None:
            raise InputError(
                "The tile size defaults to the spot diameter, but adata.uns has no 'spatial' "
                "entry holding uns['spatial'][library_id]['scalefactors']"
                "['spot_diameter_fullres']. Pass tile_um= (µm) and mpp=, or add the scale "
                "factors."
            )
        diameter = scalefactors.get("spot_diameter_fullres")
        if diameter is None:
            raise InputError(
                f"{where}['scalefactors'] has no 'spot_diameter_fullres' (keys: "
                f"{sorted(scalefactors)}), which sizes the tile when tile_um is None. Pass "
                "tile_um= (µm) and mpp=, or store the spot diameter in full-resolution px there."
            )
        side_px = check_mpp(
            diameter, what=f"{where}['scalefactors']['spot_diameter_fullres']", unit="px"
        )
        tile_um = side_px * mpp if mpp is not None else None
    else:
        if mpp is None:
            hint = ""
            diameter = scalefactors.get("spot_diameter_fullres")
            if diameter is not None:
                hint = (
                    f" If you know the spot diameter in µm (Visium 55 µm, legacy ST 100 µm), "
                    f"mpp = that / spot_diameter_fullres ({float(diameter):.4g} px here)."
                )
            raise InputError(
                f"tile_um={tile_um:g} µm needs the image scale in µm per px, but none is known: "
                "pass mpp=, open the image with read_image(path, mpp=...), or store "
                f"{where}['scalefactors']['microns_per_pixel']." + hint
            )
        side_px = tile_um / mpp
    if side_px < 1:
        raise InputError(
            f"The tile is {side_px:.3g} px wide (< 1 px); check tile_um and mpp (µm per px)."
        )
    return TileGeometry(coords, float(side_px), mpp, tile_um, library_id, source)


def extract_tiles(
    image: SlideImage | np.ndarray, centres_px: np.ndarray, side_px: float, *, out_px: int = 224
) -> np.ndarray:
    """Crop a square of ``side_px`` around each centre and resize it to ``out_px`` (kernel).

    Sub-pixel exact: the crop box is ``[x - side_px/2, x + side_px/2]`` in a frame where pixel
    ``j`` covers ``[j - 0.5, j + 0.5]``, resampled with a Lanczos filter (anti-aliased when
    shrinking). Parts outside the image are white.

    Parameters
    ----------
    image
        The full-resolution image (a :class:`SlideImage` or ``height × width × 3`` uint8).
    centres_px
        ``n_tiles × 2`` centres ``(x, y)`` in full-resolution px.
    side_px
        Tile side in full-resolution px.
    out_px
        Side of the returned tiles in px.

    Returns
    -------
    ``n_tiles × out_px × out_px × 3`` uint8 RGB.
    """
    image = as_slide_image(image)
    centres_px = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    out = np.empty((centres_px.shape[0], out_px, out_px, 3), dtype=np.uint8)
    margin = math.ceil(3 * max(1.0, side_px / out_px)) + 1  # Lanczos-3 support, in source px
    for i, (cx, cy) in enumerate(centres_px):
        bx0, by0 = cx + 0.5 - side_px / 2, cy + 0.5 - side_px / 2  # PIL frame: pixel j = [j, j+1]
        rx0, ry0 = math.floor(bx0) - margin, math.floor(by0) - margin
        size = math.ceil(side_px) + 2 * margin + 1
        region = image.read_region(rx0, ry0, size, size)
        box = (bx0 - rx0, by0 - ry0, bx0 - rx0 + side_px, by0 - ry0 + side_px)
        tile = Image.fromarray(region).resize((out_px, out_px), Image.Resampling.LANCZOS, box=box)
        out[i] = np.asarray(tile)
    return out


def _check_on_image(
    adata: AnnData, geometry: TileGeometry, image: SlideImage, spatial_key: str
) -> None:
    """Raise if spot centres fall outside the image, or the image is clearly another one."""
    height, width = image.shape
    x, y = geometry.centres_px[:, 0], geometry.centres_px[:, 1]
    outside = (x < -0.5) | (x > width - 0.5) | (y < -0.5) | (y > height - 0.5)
    n_out, n = int(outside.sum()), len(x)
    entry = {}
    if geometry.library_id is not None:
        entry = adata.uns["spatial"][geometry.library_id]
        entry = entry if hasattr(entry, "get") else {}
    metadata = entry.get("metadata", {}) or {}
    scalefactors = entry.get("scalefactors", {}) or {}
    span = f"x {x.min():.0f}–{x.max():.0f}, y {y.min():.0f}–{y.max():.0f} px"
    fw, fh = metadata.get("fullres_width"), metadata.get("fullres_height")
    if fw is not None and fh is not None and (abs(fw - width) > 1 or abs(fh - height) > 1):
        name = metadata.get("fullres_image_file")
        raise InputError(
            f"The image is {width} × {height} px, but adata.uns['spatial']"
            f"[{geometry.library_id!r}]['metadata'] records its full-resolution image as "
            f"{fw} × {fh} px" + (f" ({name})" if name else "") + ". This image belongs to "
            "another section or resolution; pass that section's full-resolution image."
        )
    if n_out == 0:
        return
    if n_out == n or n_out > n / 2 or x.max() > 1.25 * width or y.max() > 1.25 * height:
        hint = ""
        for key in ("tissue_hires_scalef", "tissue_lowres_scalef"):
            s = scalefactors.get(key)
            if s and np.all((x * s <= width) & (y * s <= height)) and s < 0.9:
                hint = (
                    f" The coordinates × {key} ({s:.3g}) fit inside it: it looks like the "
                    f"{key.split('_')[1]} image, not the full-resolution one."
                )
                break
        raise InputError(
            f"The image ({width} × {height} px) does not match these spots: {n_out} of {n} spot "
            f"centres in obsm[{spatial_key!r}] fall outside it (coordinates span {span}). "
            "The coordinates are in full-resolution pixels: is this image from another "
            "section, or a downscaled copy?" + hint
        )
    first = int(np.flatnonzero(outside)[0])
    raise InputError(
        f"{n_out} of {n} spot centres lie outside the {width} × {height} px image, e.g. spot "
        f"{adata.obs_names[first]!r} at (x, y) = ({x[first]:.1f}, {y[first]:.1f}) px. A tile "
        "needs its spot centre on the image: drop those spots (adata[mask]) or check the "
        "coordinates."
    )


def spot_tiles(
    adata: AnnData,
    image,
    *,
    library_id: str | None = None,
    tile_um: float | None = None,
    mpp: float | None = None,
    out_px: int = 224,
    spatial_key: str = "spatial",
) -> np.ndarray:
    """Cut a square H&E tile centred on every spot, resized to ``out_px × out_px``.

    Each tile covers ``tile_um`` µm (default: one spot diameter) of tissue around the spot
    centre ``obsm[spatial_key]`` (full-resolution px), whatever the scan resolution, so tiles
    from different scanners show the same physical area. Tiles that overlap the image border
    are padded with white. ``adata`` is not modified.

    Parameters
    ----------
    adata
        Spots; ``obsm[spatial_key]`` = centres ``(x, y)`` in full-resolution px, and
        ``uns["spatial"][library_id]["scalefactors"]["spot_diameter_fullres"]`` when
        ``tile_um`` is None.
    image
        The section's full-resolution image: a :class:`SlideImage` (:func:`read_image`), a
        file path, or a ``height × width × 3`` uint8 array.
    library_id
        Key of ``adata.uns["spatial"]``; None = its only library.
    tile_um
        Tile side in µm. None = the spot diameter (``spot_diameter_fullres`` px, which needs
        no µm/px).
    mpp
        µm per full-resolution px. None = ``image.mpp``, else
        ``uns["spatial"][library_id]["scalefactors"]["microns_per_pixel"]``, else
        ``uns["spatial"][library_id]["metadata"]["microns_per_pixel(_est)"]``. For legacy ST
        arrays µm/px = 200 µm / the centre-to-centre spot pitch in px.
    out_px
        Side of each returned tile in px (224 for ImageNet encoders).
    spatial_key
        ``obsm`` key of the spot centres.

    Returns
    -------
    ``n_spots × out_px × out_px × 3`` uint8 RGB tiles, in ``adata.obs_names`` order.

    Raises
    ------
    InputError
        If ``obsm[spatial_key]`` is missing, a needed scale factor is missing (the message
        names the key), no µm/px is known for ``tile_um``, a spot centre lies outside the image
        (count and an example are given), or the image clearly belongs to another section or
        resolution (e.g. every spot outside it, or the hires image passed by mistake).

    See Also
    --------
    tile_geometry : the tile centres and side in px, without reading pixels.

    Examples
    --------
    >>> import anndata as ad
    >>> from spotlens.histology import read_image, spot_tiles
    >>> adata = ad.read_h5ad("shared/data/her2st/C6.h5ad")  # doctest: +SKIP
    >>> img = read_image("shared/data/her2st/C6_HE_fullres.jpg")  # doctest: +SKIP
    >>> spot_tiles(adata, img).shape  # one spot diameter (100 µm) per tile  # doctest: +SKIP
    (178, 224, 224, 3)
    """
    check_int("out_px", out_px, minimum=1, expected="a positive integer (px)")
    image = as_slide_image(image)
    geometry = tile_geometry(
        adata, image=image, library_id=library_id, tile_um=tile_um, mpp=mpp,
        spatial_key=spatial_key,
    )
    _check_on_image(adata, geometry, image, spatial_key)
    return extract_tiles(image, geometry.centres_px, geometry.side_px, out_px=int(out_px))


#: Tile sides, as multiples of the base tile (the spot diameter by default), whose features are
#: put side by side: the spot itself, and twice and four times its width for tissue context.
DEFAULT_TILE_SCALES = (1.0, 2.0, 4.0)


def check_tile_scales(scales) -> tuple[float, ...]:
    """Validate tile scales: a non-empty sequence of distinct positive numbers.

    Raises
    ------
    InputError
        If ``scales`` is empty, holds a non-positive or non-finite value, or a repeat.
    """
    try:
        values = tuple(float(s) for s in np.atleast_1d(np.asarray(scales, dtype=float)))
    except (TypeError, ValueError) as err:
        raise InputError(f"tile_scales must be positive numbers, got {scales!r}.") from err
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"tile_scales must be positive numbers, got {scales!r}.")
    if len(set(values)) != len(values):
        raise InputError(f"tile_scales has repeats: {scales!r}.")
    return values
