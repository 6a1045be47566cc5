"""The tissue image of a report as a Deep Zoom pyramid of JPEG tiles: embedded, or in a folder.

Levels follow the Deep Zoom (DZI) convention that OpenSeadragon reads: level ``L`` is the
image reduced ``2 ** (max_level - L)`` times (sides rounded up), ``max_level =
ceil(log2(longest side))``; each level is cut into ``tile_size`` squares from the top left
(edge tiles smaller), without overlap. Only levels from the one that fits in a single tile up
to the full image are written.

The pyramid is built in one pass over the image, in bands of rows (:func:`_cascade`): each
band of ``tile_size`` rows of a level is cut into tiles, then box-averaged 2 × 2 into half a
band of the next level down. At any time each level holds at most one band, so a 100,000 px
slide read region by region (:class:`spotlens.io.SlideImage`) never sits whole in memory.
:func:`pyramid` embeds the tiles as base64 strings; :func:`tile_folder` writes them as
``<folder>/<level>/<col>_<row>.jpg`` beside the report.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .._validation import InputError

#: Names inside a tile folder: ``<level>/<col>_<row>.jpg``.
_LEVEL = re.compile(r"^\d+$")
_TILE = re.compile(r"^\d+_\d+\.jpg$")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as ``H × W × 3`` uint8 (floats in [0, 1] scaled; grey repeated)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if array.dtype != np.uint8:
        array = array.astype(np.float32)
        if np.nanmax(array, initial=0) > 1.0:  # 0-255 floats or wider integers
            array = array / (255.0 if np.nanmax(array) <= 255 else np.nanmax(array))
        array = np.clip(np.nan_to_num(array), 0, 1) * 255 + 0.5
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def levels(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """``(min_level, max_level)`` of the Deep Zoom pyramid of a ``width × height`` image."""
    max_level = max(0, math.ceil(math.log2(max(width, height, 1))))
    level, side = max_level, max(width, height)
    while side > tile_size and level > 0:
        level, side = level - 1, math.ceil(side / 2)
    return level, max_level


def _reader(image) -> tuple[int, int, Callable[[int, int], np.ndarray]]:
    """``(width, height, read_rows(y0, y1))`` of an ``H × W × 3`` array or a SlideImage."""
    if hasattr(image, "read_region"):  # spotlens.io.SlideImage: read lazily, band by band
        height, width = image.shape
        return width, height, lambda y0, y1: image.read_region(0, y0, width, y1 - y0)
    height, width = image.shape[:2]
    return width, height, lambda y0, y1: image[y0:y1]


def _cascade(image, tile_size: int, emit: Callable[[int, int, list], None]) -> dict:
    """Cut ``image`` into the pyramid's tiles, one band of rows at a time.

    ``emit(level, row, tiles)`` receives each row of tiles (PIL images, left to right) once,
    rows of a level in order top to bottom; levels interleave.
    """
    from PIL import Image

    width, height, read_rows = _reader(image)
    min_level, max_level = levels(width, height, tile_size)
    pending: dict[int, list[np.ndarray]] = {lv: [] for lv in range(min_level, max_level + 1)}
    rows_done = dict.fromkeys(pending, 0)

    def feed(level: int, band: np.ndarray | None, final: bool) -> None:
        if band is not None and band.shape[0]:
            pending[level].append(band)
        parts = pending[level]
        buffer = parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else None)
        while buffer is not None and (buffer.shape[0] >= tile_size
                                      or (final and buffer.shape[0] > 0)):
            chunk, buffer = Image.fromarray(buffer[:tile_size]), buffer[tile_size:]
            emit(level, rows_done[level], [
                chunk.crop((left, 0, min(left + tile_size, chunk.width), chunk.height))
                for left in range(0, chunk.width, tile_size)])
            rows_done[level] += 1
            if level > min_level:  # 2 × 2 box average (edges rounded up): the next level down
                feed(level - 1, np.asarray(chunk.reduce(2)), final=False)
        pending[level] = [buffer] if buffer is not None and buffer.shape[0] else []

    for top in range(0, height, tile_size):
        feed(max_level, np.asarray(read_rows(top, min(top + tile_size, height))), final=False)
    for level in range(max_level, min_level - 1, -1):  # the last, partial bands, top down
        feed(level, None, final=True)
    return {"width": int(width), "height": int(height), "tile_size": int(tile_size),
            "min_level": int(min_level), "max_level": int(max_level)}


def _jpeg(tile, quality: int) -> bytes:
    buffer = io.BytesIO()
    tile.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def pyramid(image, *, tile_size: int = 256, quality: int = 85) -> dict:
    """Cut ``image`` (``H × W × 3`` uint8 or a SlideImage) into a pyramid of base64 JPEG tiles.

    Returns
    -------
    ``{"width", "height", "tile_size", "min_level", "max_level", "tiles"}``: ``width``/``height``
    of the full image in px, and ``tiles[str(level)]`` a list of rows (top to bottom) of base64
    JPEG strings (left to right).
    """
    tiles: dict[str, list[list[str]]] = {}

    def keep(level: int, row: int, row_tiles: list) -> None:
        tiles.setdefault(str(level), []).append(
            [base64.b64encode(_jpeg(t, quality)).decode("ascii") for t in row_tiles])

    return {**_cascade(image, tile_size, keep), "tiles": tiles}


def folder_for(path: Path) -> Path:
    """The tile folder of the report ``path``: ``<stem>_files`` beside it (the DZI name)."""
    return path.with_name(f"{path.stem}_files")


def is_tile_folder(folder: Path) -> bool:
    """Whether ``folder`` holds only ``<level>/<col>_<row>.jpg`` (a tile folder to replace)."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    for level in folder.iterdir():
        if not (_LEVEL.match(level.name) and level.is_dir() and not level.is_symlink()):
            return False
        if not all(_TILE.match(tile.name) and tile.is_file() for tile in level.iterdir()):
            return False
    return True


def check_replaceable(folder: Path) -> None:
    """Raise unless ``folder`` is missing or an earlier report's tile folder.

    Raises
    ------
    InputError
        ``folder`` exists and holds anything but ``<level>/<col>_<row>.jpg`` tiles.
    """
    if (folder.exists() or folder.is_symlink()) and not is_tile_folder(folder):
        raise InputError(
            f"The report's tiles go to {folder}, which exists and is not the tile folder of an "
            "earlier report (only <level>/<col>_<row>.jpg files); move it away, or name the "
            "report differently.")


@contextmanager
def tile_folder(image, folder: Path, *, tile_size: int = 256,
                quality: int = 85) -> Iterator[tuple[dict, Callable[[], None]]]:
    """Write the pyramid of ``image`` into a temporary folder beside ``folder``.

    Yields ``(info, commit)``: ``info`` as :func:`pyramid` returns it without ``"tiles"``, and
    ``commit()``, which puts the tiles in place as ``folder/<level>/<col>_<row>.jpg`` (an
    earlier report's tile folder is replaced: renamed aside, the new one renamed in, the old
    one removed). The temporary folder (``.<name>.<random>.tmp``) is removed if the block
    raises before ``commit``; ``folder`` is never seen half-written.

    Raises
    ------
    InputError
        ``folder`` exists and is not an earlier report's tile folder (:func:`check_replaceable`).
    """
    check_replaceable(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old: Path | None = None
    try:
        def save(level: int, row: int, row_tiles: list) -> None:
            target = tmp / str(level)
            target.mkdir(exist_ok=True)
            for col, tile in enumerate(row_tiles):
                tile.save(target / f"{col}_{row}.jpg", format="JPEG", quality=quality)

        info = _cascade(image, tile_size, save)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it readable by its owner only

        def commit() -> None:
            nonlocal old
            check_replaceable(folder)
            if folder.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp",
                                            dir=folder.parent))
                os.replace(folder, old / "tiles")
            os.replace(tmp, folder)

        yield info, commit
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once committed
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale(folder: Path) -> None:
    """Remove an earlier report's tile folder that an embedded report no longer uses."""
    if is_tile_folder(folder):
        shutil.rmtree(folder)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
