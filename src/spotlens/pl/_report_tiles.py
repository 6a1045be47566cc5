"""The tissue image of a report as a Deep Zoom pyramid of JPEG tiles, embedded as base64.

Levels follow the Deep Zoom (DZI) convention that OpenSeadragon reads: level ``L`` is the
image reduced ``2 ** (max_level - L)`` times (sides rounded up), ``max_level =
ceil(log2(longest side))``; each level is cut into ``tile_size`` squares from the top left
(edge tiles smaller), without overlap. Only levels from the one that fits in a single tile up
to the full image are written.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np


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


def pyramid(image: np.ndarray, *, tile_size: int = 256, quality: int = 85) -> dict:
    """Cut ``image`` (``H × W × 3`` uint8) into a Deep Zoom pyramid of base64 JPEG tiles.

    Returns
    -------
    ``{"width", "height", "tile_size", "min_level", "max_level", "tiles"}``: ``width``/``height``
    of the full image in px, and ``tiles[str(level)]`` a list of rows (top to bottom) of base64
    JPEG strings (left to right).
    """
    from PIL import Image

    height, width = image.shape[:2]
    max_level = max(0, math.ceil(math.log2(max(width, height))))
    level_image = Image.fromarray(image)
    tiles: dict[str, list[list[str]]] = {}
    level = max_level
    while True:
        w, h = level_image.size
        rows = []
        for top in range(0, h, tile_size):
            row = []
            for left in range(0, w, tile_size):
                tile = level_image.crop((left, top, min(left + tile_size, w),
                                         min(top + tile_size, h)))
                buffer = io.BytesIO()
                tile.save(buffer, format="JPEG", quality=quality)
                row.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
            rows.append(row)
        tiles[str(level)] = rows
        if max(w, h) <= tile_size or level == 0:
            break
        level -= 1
        size = (max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2)))
        level_image = level_image.resize(size, Image.Resampling.BOX)
    return {"width": int(width), "height": int(height), "tile_size": int(tile_size),
            "min_level": int(level), "max_level": int(max_level), "tiles": tiles}
