"""Pixel sources behind :class:`~spotlens.io.SlideImage`: arrays, JPEG/PNG, TIFF/SVS, OpenSlide.

Each source has ``shape = (height, width)`` in px, ``read(y0, y1, x0, x1) -> (y1 - y0) ×
(x1 - x0) × 3`` uint8 RGB (inside the image only) and ``thumbnail_source(factor)`` (a smaller
pyramid level to build overviews from, and its scale). No analysis; no AnnData.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from .._validation import InputError

_PIL_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".ome.tif"}
_OPENSLIDE_ONLY = {".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif"}
_FILL = 255  # white, the background of a bright-field slide


def check_mpp(mpp, *, what: str = "mpp", unit: str = "µm per pixel") -> float | None:
    """Return ``mpp`` as a positive float (default unit µm per pixel), or None; raise otherwise."""
    if mpp is None:
        return None
    example = " (e.g. 0.5 for a 20× scan)" if unit == "µm per pixel" else ""
    try:
        value = float(mpp)
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must be a number of {unit}, got {mpp!r}.") from err
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"{what} must be a positive number of {unit}{example}, got {mpp!r}.")
    return value


def _to_rgb_uint8(array: np.ndarray, *, what: str) -> np.ndarray:
    """Return ``array`` as ``(h, w, 3)`` uint8: grey is repeated, alpha dropped, 16-bit scaled."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise InputError(
            f"The {what} must be (height, width) or (height, width, 3|4), got shape "
            f"{array.shape}. Multi-channel fluorescence images are not bright-field H&E."
        )
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise InputError(
            f"The {what} holds {array.dtype} values; spotlens reads 8-bit (or 16-bit) RGB H&E. "
            "Convert it to uint8 first."
        )
    if array.shape[2] in (1, 2):
        array = np.repeat(array[..., :1], 3, axis=2)
    elif array.shape[2] == 4:
        array = array[..., :3]
    return array


class _ArraySource:
    """An in-memory (or memory-mapped) ``(h, w, c)`` image."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = (int(array.shape[0]), int(array.shape[1]))

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return _to_rgb_uint8(self.array[y0:y1, x0:x1], what="image")

    def thumbnail_source(self, factor: int):
        return self, 1.0


class _PILSource:
    """A JPEG/PNG decoded once, on first use, and kept as a uint8 array."""

    def __init__(self, path: Path):
        self.path = path
        with _open_pil(path) as im:
            self.shape = (int(im.height), int(im.width))
        self._array: np.ndarray | None = None
        self._lock = threading.Lock()

    @property
    def array(self) -> np.ndarray:
        with self._lock:
            if self._array is None:
                with _open_pil(self.path) as im:
                    try:
                        if im.mode not in ("RGB", "L"):
                            im = im.convert("RGB")
                        self._array = np.asarray(im)
                    except (OSError, SyntaxError, ValueError) as err:
                        raise _decode_error(self.path, err) from err
            return self._array

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return _to_rgb_uint8(self.array[y0:y1, x0:x1], what="image")

    def thumbnail_source(self, factor: int):
        return self, 1.0


def _decode_error(path: Path, err: Exception) -> InputError:
    """The error for an image file whose pixels cannot be decoded (truncated, corrupt)."""
    return InputError(
        f"Cannot decode the pixels of {path}: {err}. The file is damaged or incomplete (e.g. "
        "an interrupted download or copy); copy it again from its source."
    )


def _open_pil(path: Path):
    """Open an image with PIL, allowing whole-slide sizes (no decompression-bomb warning)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except OSError as err:
        raise InputError(f"Cannot read {path} as an image: {err}") from err
    finally:
        Image.MAX_IMAGE_PIXELS = old


class _TiffPageSource:
    """One TIFF page read lazily, tile by tile or strip by strip, with a small decoded cache."""

    def __init__(self, tif, page, *, cache_bytes: int = 256 * 2**20):
        self.tif = tif
        self.page = page
        self.shape = (int(page.imagelength), int(page.imagewidth))
        if page.imagedepth > 1:
            raise InputError(f"{tif.filename} is a volumetric TIFF; expected a 2-D slide image.")
        self.samples = int(page.samplesperpixel)
        self.planar = page.planarconfig == 2 and self.samples > 1
        if page.is_tiled:
            self.seg_h, self.seg_w = int(page.tilelength), int(page.tilewidth)
        else:
            self.seg_h, self.seg_w = int(page.rowsperstrip), self.shape[1]
        self.seg_h = min(self.seg_h, self.shape[0])
        self.n_rows = math.ceil(self.shape[0] / self.seg_h)
        self.n_cols = math.ceil(self.shape[1] / self.seg_w)
        self._cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()
        self._memmap = None
        if page.is_memmappable:
            offset = page.dataoffsets[0]
            shape = page.shaped[1:] if not self.planar else None
            if shape is not None:
                # normalized shape: (separate samples, depth, length, width, contig samples)
                self._memmap = np.memmap(
                    tif.filehandle.path, dtype=np.dtype(tif.byteorder + page.dtype.char),
                    mode="r", offset=offset, shape=(self.shape[0], self.shape[1], shape[-1]),
                )

    def _segment(self, index: int) -> np.ndarray | None:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
            page = self.page
            fh = self.tif.filehandle
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data = None
            if count > 0:
                fh.seek(offset)
                data = fh.read(count)
            try:
                segment, _, shape = page.decode(
                    data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader
                )
            except (ValueError, NotImplementedError) as err:
                raise InputError(
                    f"tifffile cannot decode {self.tif.filename} ({page.compression!r}): {err}. "
                    "Install the 'imagecodecs' package (JPEG/LZW/JPEG2000 tiles), or "
                    "openslide-python for SVS slides."
                ) from err
            if segment is not None:
                segment = segment.reshape(shape[1:])  # (length, width, contig samples)
            self._cache[index] = segment
            self._cached += 0 if segment is None else segment.nbytes
            while self._cached > self._cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= 0 if old is None else old.nbytes
            return segment

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._memmap is not None:
            return _to_rgb_uint8(np.array(self._memmap[y0:y1, x0:x1]), what="TIFF image")
        n_planes = self.samples if self.planar else 1
        contig = 1 if self.planar else self.samples
        out = np.zeros((y1 - y0, x1 - x0, n_planes * contig), dtype=self.page.dtype)
        per_plane = self.n_rows * self.n_cols
        for plane in range(n_planes):
            for row in range(y0 // self.seg_h, (y1 - 1) // self.seg_h + 1):
                for col in range(x0 // self.seg_w, (x1 - 1) // self.seg_w + 1):
                    seg = self._segment(plane * per_plane + row * self.n_cols + col)
                    sy, sx = row * self.seg_h, col * self.seg_w
                    ay0, ay1 = max(y0, sy), min(y1, sy + self.seg_h, self.shape[0])
                    ax0, ax1 = max(x0, sx), min(x1, sx + self.seg_w, self.shape[1])
                    if seg is None or ay1 <= ay0 or ax1 <= ax0:
                        continue
                    block = seg[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx]
                    channels = slice(plane, plane + 1) if self.planar else slice(None)
                    out[ay0 - y0:ay0 - y0 + block.shape[0], ax0 - x0:ax0 - x0 + block.shape[1],
                        channels] = block
        return _to_rgb_uint8(out, what="TIFF image")

    def thumbnail_source(self, factor: int):
        return self, 1.0


class _TiffSource:
    """Level 0 of a (possibly pyramidal) TIFF/SVS; thumbnails come from a smaller level."""

    def __init__(self, path: Path):
        import tifffile

        try:
            self.tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError) as err:
            raise InputError(f"Cannot read {path} as a TIFF: {err}") from err
        weakref.finalize(self, self.tif.close)  # the file closes when the image is dropped
        series = self.tif.series[0]
        pages = [level.keyframe for level in series.levels]
        self.level0 = _TiffPageSource(self.tif, pages[0])
        self.shape = self.level0.shape
        self._levels = pages[1:]
        self._level_sources: dict[int, _TiffPageSource] = {}
        self.mpp = _tiff_mpp(self.tif, pages[0])

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.level0.read(y0, y1, x0, x1)

    def thumbnail_source(self, factor: int):
        """Return the smallest pyramid level at least ``1 / factor`` of level 0, and its scale."""
        best, best_scale = self.level0, 1.0
        for i, page in enumerate(self._levels):
            scale = page.imagewidth / self.shape[1]
            if scale * factor >= 1.0 - 1e-9 and scale < best_scale and page.samplesperpixel >= 1:
                if i not in self._level_sources:
                    self._level_sources[i] = _TiffPageSource(self.tif, page)
                best, best_scale = self._level_sources[i], scale
        return best, best_scale

    def close(self) -> None:
        self.tif.close()


class _OpenSlideSource:
    """Any slide format OpenSlide reads (SVS, NDPI, MRXS, ...), when openslide is installed."""

    def __init__(self, path: Path, openslide):
        try:
            self.slide = openslide.OpenSlide(str(path))
        except Exception as err:  # openslide raises its own error types
            raise InputError(f"OpenSlide cannot read {path}: {err}") from err
        weakref.finalize(self, self.slide.close)
        width, height = self.slide.dimensions
        self.shape = (int(height), int(width))
        mpp = self.slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._read_level(0, y0, y1, x0, x1)

    def _read_level(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        down = self.slide.level_downsamples[level]
        location = (int(round(x0 * down)), int(round(y0 * down)))  # level-0 coordinates
        rgba = np.asarray(self.slide.read_region(location, level, (x1 - x0, y1 - y0)))
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0  # transparent = outside the scan
        rgb = rgba[..., :3] * alpha + _FILL * (1.0 - alpha)
        return np.round(rgb).astype(np.uint8)

    def thumbnail_source(self, factor: int):
        """Return a reader of the smallest level at least ``1 / factor`` of level 0, its scale."""
        level = self.slide.get_best_level_for_downsample(factor)
        width, height = self.slide.level_dimensions[level]
        reader = _LevelReader((int(height), int(width)), level, self._read_level)
        return reader, width / self.shape[1]

    def close(self) -> None:
        self.slide.close()


class _LevelReader:
    """``read(y0, y1, x0, x1)`` on one level of a multi-resolution source."""

    def __init__(self, shape, level: int, read_level):
        self.shape = shape
        self._level, self._read_level = level, read_level

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._read_level(self._level, y0, y1, x0, x1)


def _tiff_mpp(tif, page) -> float | None:
    """µm per pixel from an SVS description (``MPP = ...``) or the X resolution tags."""
    description = page.description or ""
    if tif.is_svs and "MPP" in description:
        for part in description.split("|"):
            key, _, value = part.partition("=")
            if key.strip() == "MPP":
                try:
                    return check_mpp(float(value))
                except (ValueError, InputError):
                    break
    if 282 not in page.tags:  # XResolution
        return None
    unit = page.tags.valueof(296, default=2)  # 1 none, 2 inch, 3 cm, 4 mm, 5 µm
    um_per_unit = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}.get(unit)
    if um_per_unit is None:
        return None
    px_per_unit = page.get_resolution()[0]
    if not px_per_unit or px_per_unit <= 1:  # the default 1 px/unit (or 72 dpi) carries no scale
        return None
    if unit == 2 and px_per_unit <= 600:  # screen/print DPI, not a microscope scale
        return None
    return um_per_unit / px_per_unit
