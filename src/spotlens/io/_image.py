"""Lazy access to full-resolution histology images: JPEG/PNG via PIL, TIFF/SVS via tifffile.

Pixel convention used everywhere in spotlens: a point ``(x, y)`` is in full-resolution pixels,
``x`` = column, ``y`` = row, and pixel ``(i, j)`` has its centre at ``x = j, y = i`` (the
convention of ``obsm["spatial"]`` in scanpy/squidpy). The readers of each format are in
``_slide_sources.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from .._validation import InputError
from ._slide_sources import (
    _FILL,
    _OPENSLIDE_ONLY,
    _PIL_SUFFIXES,
    _TIFF_SUFFIXES,
    _ArraySource,
    _decode_error,
    _OpenSlideSource,
    _open_pil,
    _PILSource,
    _TiffSource,
    _to_rgb_uint8,
    check_mpp,
)


_BAND_ROWS = 1024  # rows read at a time when a thumbnail is built from the full image
_JPEG_SUFFIXES = {".jpg", ".jpeg"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as PIL's "L" mode


class SlideImage:
    """A full-resolution histology image read lazily, region by region.

    Create it with :func:`read_image` (files) or :meth:`SlideImage.from_array` (arrays).

    Attributes
    ----------
    shape
        ``(height, width)`` of the full-resolution image in pixels.
    mpp
        Microns per pixel (µm/px) of the full-resolution image, or None when unknown.
    path
        The file it was read from, or None for an in-memory array.
    """

    def __init__(self, source, *, mpp: float | None, path: Path | None):
        self._source = source
        self.shape: tuple[int, int] = source.shape
        self.mpp = mpp
        self.path = path

    @classmethod
    def from_array(cls, array: np.ndarray, *, mpp: float | None = None) -> SlideImage:
        """Wrap an in-memory ``height × width × 3`` uint8 (or grey ``height × width``) image.

        Parameters
        ----------
        array
            ``height × width`` or ``height × width × 3|4`` uint8 (or uint16) image; not copied.
        mpp
            Microns per pixel (µm/px), or None.

        Raises
        ------
        InputError
            If the array has another shape or dtype, or ``mpp`` is not positive.
        """
        array = np.asarray(array)
        _to_rgb_uint8(array[:1, :1], what="image array")
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise InputError(f"The image array is empty (shape {array.shape}).")
        return cls(_ArraySource(array), mpp=check_mpp(mpp), path=None)

    def __repr__(self) -> str:
        name = self.path.name if self.path is not None else "array"
        mpp = "unknown" if self.mpp is None else f"{self.mpp:.4g}"
        return f"SlideImage({name}, {self.shape[1]} × {self.shape[0]} px, mpp={mpp} µm/px)"

    def read_region(self, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """Read a ``height × width`` window whose top-left pixel is ``(x0, y0)``.

        Parameters
        ----------
        x0, y0
            Column and row of the window's top-left pixel, full-resolution px; may be negative
            or beyond the image (the part outside is padded).
        width, height
            Window size in px (>= 1).

        Returns
        -------
        ``height × width × 3`` uint8 RGB; pixels outside the image are white (255).

        Raises
        ------
        InputError
            If ``width`` or ``height`` is not a positive integer.
        """
        x0, y0, width, height = (int(v) for v in (x0, y0, width, height))
        if width < 1 or height < 1:
            raise InputError(f"read_region needs width, height >= 1 px, got {width} × {height}.")
        out = np.full((height, width, 3), _FILL, dtype=np.uint8)
        ih, iw = self.shape
        ax0, ay0 = max(x0, 0), max(y0, 0)
        ax1, ay1 = min(x0 + width, iw), min(y0 + height, ih)
        if ax1 > ax0 and ay1 > ay0:
            out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0] = self._source.read(ay0, ay1, ax0, ax1)
        return out

    def thumbnail(self, max_size: int = 2000) -> tuple[np.ndarray, float]:
        """Return a box-averaged (anti-aliased) overview whose long side is at most ``max_size``.

        Parameters
        ----------
        max_size
            Longest side of the thumbnail in px.

        Returns
        -------
        thumbnail
            ``h × w × 3`` uint8.
        scale
            Thumbnail px per full-resolution px (the same in x and y):
            ``thumbnail_xy = full_xy * scale``.

        Raises
        ------
        InputError
            If ``max_size`` is not a positive integer.
        """
        if int(max_size) != max_size or max_size < 1:
            raise InputError(f"max_size must be a positive number of px, got {max_size!r}.")
        factor = max(1, math.ceil(max(self.shape) / int(max_size)))
        source, level_scale = self._source.thumbnail_source(factor)
        # remaining integer reduction on the chosen level
        sub = max(1, math.ceil(max(source.shape) / int(max_size)))
        thumb = _reduce(source.read, source.shape, sub)
        return thumb, level_scale / sub

    def _is_jpeg_file(self) -> bool:
        return (isinstance(self._source, _PILSource) and self.path is not None
                and self.path.suffix.lower() in _JPEG_SUFFIXES)

    def overview(self, scale: float) -> tuple[np.ndarray, float, float]:
        """Grey overview of the whole image at (about) ``scale`` overview px per full-res px.

        A JPEG file is decoded straight at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling)
        without decoding the full image; a pyramidal TIFF
        reads its smallest adequate level; other images are box-averaged (:meth:`thumbnail`).

        Parameters
        ----------
        scale
            Wanted overview px per full-resolution px, in (0, 1].

        Returns
        -------
        overview
            ``h × w`` float32 grey levels (luma, 0–255).
        sx, sy
            Overview px per full-resolution px along x and y (at least ``scale`` where the
            format allows).

        Raises
        ------
        InputError
            If the file's pixels cannot be decoded (e.g. a truncated JPEG); the message names it.
        """
        height, width = self.shape
        if self._is_jpeg_file():
            with _open_pil(self.path) as im:
                try:
                    im.draft("RGB", (max(1, math.ceil(width * scale)),
                                     max(1, math.ceil(height * scale))))
                    grey = np.asarray(im.convert("L"), dtype=np.float32)
                except (OSError, SyntaxError, ValueError) as err:
                    raise _decode_error(self.path, err) from err
            return grey, grey.shape[1] / width, grey.shape[0] / height
        factor = max(1, math.floor(1 / scale))
        thumb, t = self.thumbnail(max(1, math.ceil(max(height, width) / factor)))
        return thumb.astype(np.float32) @ _LUMA, t, t

    def check_decodes(self) -> None:
        """Decode a JPEG file at 1/8 of its size (every byte is read, the pixels not kept).

        Other formats are left to their first read (PNG is decoded whole then; TIFF tile by
        tile).

        Raises
        ------
        InputError
            If the JPEG is truncated or corrupt; the message names the file.
        """
        if self._is_jpeg_file():
            self.overview(0.125)

    def close(self) -> None:
        """Release the file handle (TIFF/OpenSlide) or the decoded pixels (JPEG/PNG)."""
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
        if isinstance(self._source, _PILSource):
            self._source._array = None

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reduce(read: Callable[[int, int, int, int], np.ndarray], shape, factor: int) -> np.ndarray:
    """Box-average ``factor × factor`` blocks, reading the image in bands of rows."""
    height, width = shape
    if factor == 1:
        return read(0, height, 0, width)
    step = factor * max(1, _BAND_ROWS // factor)
    bands = []
    for y0 in range(0, height, step):
        band = read(y0, min(y0 + step, height), 0, width)
        bands.append(np.asarray(Image.fromarray(band).reduce(factor)))
    return np.concatenate(bands, axis=0)


def read_image(path, *, mpp: float | None = None) -> SlideImage:
    """Open a full-resolution H&E image lazily.

    JPEG/PNG are decoded by PIL once, on the first :meth:`SlideImage.read_region`, and kept in
    memory as a ``height × width × 3`` uint8 array (≈ 280 MB for a 9,300 × 9,900 px scan).
    TIFF, pyramidal (OME-)TIFF and SVS are read by tifffile from the level-0 page, only the
    tiles or strips a region touches (uncompressed pages are memory-mapped); thumbnails use the
    smallest adequate pyramid level. Other slide formats (NDPI, MRXS, ...) need openslide-python,
    which is used for them, and for SVS, when it is installed.

    Parameters
    ----------
    path
        Image file.
    mpp
        Microns per pixel (µm/px) of the full-resolution image. Overrides the file's metadata.
        When None it is read from an SVS description (``MPP = ...``) or the TIFF resolution tags
        (XResolution with ResolutionUnit cm/mm/µm, or inch at > 600 dpi); JPEG/PNG carry no
        trustworthy scale, so their ``mpp`` stays None.

    Returns
    -------
    A :class:`SlideImage` with ``shape = (height, width)`` px and ``mpp`` (µm/px or None).

    Raises
    ------
    InputError
        If the file does not exist, its format is not supported, it cannot be decoded, or
        ``mpp`` is not a positive number.

    Examples
    --------
    >>> from spotlens.io import read_image
    >>> img = read_image("shared/data/her2st/C6_HE_fullres.jpg", mpp=0.684)  # doctest: +SKIP
    >>> img.shape, img.read_region(4800, 2300, 146, 146).shape  # doctest: +SKIP
    ((9907, 9288), (146, 146, 3))
    """
    mpp = check_mpp(mpp)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Image file not found: {path}.")
    suffix = path.suffix.lower()
    openslide = None
    if suffix in _OPENSLIDE_ONLY or suffix == ".svs":
        try:
            import openslide
        except ImportError:
            if suffix in _OPENSLIDE_ONLY:
                raise InputError(
                    f"{path.name}: {suffix} slides need openslide-python (pip install "
                    "openslide-python openslide-bin), or convert the slide to a pyramidal TIFF."
                ) from None
    if openslide is not None:
        source = _OpenSlideSource(path, openslide)
    elif suffix in _TIFF_SUFFIXES:
        try:
            import tifffile  # noqa: F401
        except ImportError:
            raise InputError(
                "Reading TIFF/SVS needs tifffile: pip install 'spotlens[histology]'."
            ) from None
        source = _TiffSource(path)
    elif suffix in _PIL_SUFFIXES:
        source = _PILSource(path)
    else:
        raise InputError(
            f"Unsupported image format {suffix!r} for {path.name}: use JPEG, PNG, TIFF "
            "(incl. pyramidal/OME-TIFF) or SVS."
        )
    if mpp is None:
        mpp = getattr(source, "mpp", None)
    return SlideImage(source, mpp=mpp, path=path)


def as_slide_image(image, *, mpp: float | None = None) -> SlideImage:
    """Return ``image`` as a :class:`SlideImage` (a path is opened, an array wrapped).

    Raises
    ------
    InputError
        If ``image`` is neither a SlideImage, a path nor an image array.
    """
    if isinstance(image, SlideImage):
        return image
    if isinstance(image, (str, Path)):
        return read_image(image, mpp=mpp)
    if isinstance(image, np.ndarray):
        return SlideImage.from_array(image, mpp=mpp)
    raise InputError(
        f"image must be a SlideImage (spotlens.io.read_image), a file path or a "
        f"height × width × 3 uint8 array, got {type(image).__name__}."
    )
