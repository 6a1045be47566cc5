"""Nucleus segmentation over a whole slide: tiles with a halo, run in parallel, stitched.

The slide is cut into square **cores** of ``tile_size`` px; each is read with a **halo** of
``halo_px`` on every side (clipped to the image) and segmented on its own. A nucleus is kept
by the one tile whose core holds the pixel of its centroid, ``(round(y), round(x))``, so a
nucleus on a border between cores is counted exactly once. With the halo at least as wide as
the largest nucleus plus the reach of the filters (:meth:`NucleusConfig.halo_px`), every kept
nucleus lies wholly inside its tile and sees the same neighbourhood as on the whole slide, so
the tiled result equals the untiled one.

Tiles run in the calling process (``n_jobs=1``), in a pool of processes (the kernels hold the
GIL, so threads do not help), or as tasks on a Dask cluster, where each worker reads its
tiles from the image file itself. Tiles whose core has no tissue (the thumbnail tissue mask,
grown by the halo) are skipped.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..io import SlideImage, read_image
from ._nuclei import NucleusConfig, measure_nuclei, segment_hematoxylin, stain_densities

logger = logging.getLogger("spotlens")


@dataclass(frozen=True)
class Tile:
    """One tile: its core (kept nuclei) and the window read around it, ``(x0, y0, x1, y1)``."""

    index: int
    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]


def plan_tiles(shape: tuple[int, int], tile_size: int, halo_px: int) -> list[Tile]:
    """Cut an image of ``shape = (height, width)`` px into cores with their halo windows.

    Returns
    -------
    Tiles in raster order; cores cover every pixel exactly once, windows are the cores grown
    by ``halo_px`` on each side and clipped to the image.
    """
    height, width = shape
    tiles = []
    for y0 in range(0, height, tile_size):
        for x0 in range(0, width, tile_size):
            x1, y1 = min(x0 + tile_size, width), min(y0 + tile_size, height)
            window = (max(x0 - halo_px, 0), max(y0 - halo_px, 0), min(x1 + halo_px, width),
                      min(y1 + halo_px, height))
            tiles.append(Tile(len(tiles), (x0, y0, x1, y1), window))
    return tiles


def tiles_on_tissue(tiles: list[Tile], mask: np.ndarray, scale: float,
                    halo_px: int) -> list[Tile]:
    """The tiles whose core touches tissue in ``mask`` (thumbnail, ``scale`` thumb px per px).

    The mask is grown by the halo (and 2 thumbnail px for rounding), so nuclei at the edge
    of the tissue are not lost.
    """
    grow = int(math.ceil(halo_px * scale)) + 2
    grown = ndimage.binary_dilation(mask, iterations=grow) if mask.any() else mask
    h, w = grown.shape
    kept = []
    for tile in tiles:
        x0, y0, x1, y1 = tile.core
        i0, j0 = min(int(y0 * scale), h - 1), min(int(x0 * scale), w - 1)
        i1, j1 = max(int(math.ceil(y1 * scale)), i0 + 1), max(int(math.ceil(x1 * scale)), j0 + 1)
        if grown[i0:i1, j0:j1].any():
            kept.append(tile)
    return kept


def classical_segmenter(mpp: float, config: NucleusConfig) -> Callable:
    """The classical kernel as ``rgb -> (labels, stains)`` (picklable, for process pools)."""
    return functools.partial(_classical, mpp=float(mpp), config=config)


def _classical(rgb: np.ndarray, *, mpp: float, config: NucleusConfig):
    stains = stain_densities(rgb)
    return segment_hematoxylin(stains[0], mpp=mpp, config=config), stains


def segment_window(rgb: np.ndarray, tile: Tile, segmenter: Callable, *,
                   keep_labels: bool) -> dict:
    """Segment one tile's window; keep the nuclei whose centroid pixel lies in its core.

    Returns
    -------
    ``{"index", "features"}``: the kept nuclei's ``k × 11`` measurements (``FEATURE_NAMES``)
    with centroids in slide px; with ``keep_labels`` also ``"labels"``, the window's label
    image holding only the kept nuclei, numbered 1..k in the rows' order.
    """
    result = segmenter(rgb)
    labels, stains = result if isinstance(result, tuple) else (result, None)
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    features = measure_nuclei(labels, rgb, n_labels=n, stains=stains)
    wx0, wy0 = tile.window[:2]
    features[:, 0] += wx0
    features[:, 1] += wy0
    x0, y0, x1, y1 = tile.core
    px, py = np.floor(features[:, 0] + 0.5), np.floor(features[:, 1] + 0.5)
    keep = (px >= x0) & (px < x1) & (py >= y0) & (py < y1) & (features[:, 2] > 0)
    out = {"index": tile.index, "features": features[keep]}
    if keep_labels:
        lut = np.zeros(n + 1, dtype=np.int32)
        lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        out["labels"] = lut[labels]
    return out


def _read(image: SlideImage, tile: Tile) -> np.ndarray:
    x0, y0, x1, y1 = tile.window
    return image.read_region(x0, y0, x1 - x0, y1 - y0)


def _pool_task(rgb, tile, segmenter, keep_labels):
    return segment_window(rgb, tile, segmenter, keep_labels=keep_labels)


@functools.lru_cache(maxsize=2)
def _worker_image(path: str, stamp: int, mpp: float | None) -> SlideImage:
    return read_image(path, mpp=mpp)


def _dask_task(task: dict) -> dict:
    """Run on a Dask worker: read the tile from the file (or take its pixels), segment."""
    rgb = task.get("rgb")
    if rgb is None:
        rgb = _read(_worker_image(task["path"], task["stamp"], task["mpp"]), task["tile"])
    return segment_window(rgb, task["tile"], task["segmenter"], keep_labels=task["labels"])


def resolve_jobs(n_jobs: int | None) -> int:
    """``n_jobs`` as a number of processes: None → 1, −1 → every core this process may use."""
    if n_jobs is None:
        return 1
    if n_jobs < 0:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - macOS, Windows
            cores = os.cpu_count() or 1
        return max(1, cores + 1 + n_jobs)
    return n_jobs


def run_tiles(image: SlideImage, tiles: list[Tile], segmenter: Callable, *,
              keep_labels: bool, n_jobs: int = 1, client=None,
              progress: bool = False) -> Iterator[dict]:
    """Segment ``tiles`` of ``image``; yield each tile's :func:`segment_window` result.

    Results arrive in completion order; each carries its tile's ``index``.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), desc="nuclei", unit="tile")
    try:
        if client is not None:
            yield from _run_dask(image, tiles, segmenter, keep_labels, client, bar)
        elif n_jobs <= 1 or len(tiles) <= 1:
            for tile in tiles:
                yield segment_window(_read(image, tile), tile, segmenter,
                                     keep_labels=keep_labels)
                if bar is not None:
                    bar.update()
        else:
            yield from _run_pool(image, tiles, segmenter, keep_labels, n_jobs, bar)
    finally:
        if bar is not None:
            bar.close()


def _run_pool(image, tiles, segmenter, keep_labels, n_jobs, bar) -> Iterator[dict]:
    """``n_jobs`` worker processes (joblib's loky: no ``__main__`` guard needed); the parent
    reads the tiles lazily, at most two per worker ahead."""
    from joblib import Parallel, delayed

    jobs = (delayed(_pool_task)(_read(image, tile), tile, segmenter, keep_labels)
            for tile in tiles)
    parallel = Parallel(n_jobs=n_jobs, backend="loky", return_as="generator_unordered",
                        pre_dispatch="2*n_jobs")
    for result in parallel(jobs):
        yield result
        if bar is not None:
            bar.update()


def _run_dask(image, tiles, segmenter, keep_labels, client, bar) -> Iterator[dict]:
    from distributed import as_completed

    from .._backend import resolve_client

    client = resolve_client(client)
    if image.path is not None:
        stamp = image.path.stat().st_mtime_ns
        tasks = [{"path": str(image.path), "stamp": stamp, "mpp": image.mpp, "tile": t,
                  "segmenter": segmenter, "labels": keep_labels} for t in tiles]
    else:  # an in-memory image: each task carries its window's pixels
        tasks = [{"rgb": _read(image, t), "tile": t, "segmenter": segmenter,
                  "labels": keep_labels} for t in tiles]
    logger.info("segmenting %d tiles on %s", len(tasks), client)
    futures = client.map(_dask_task, tasks, pure=False)
    for future in as_completed(futures):
        yield future.result()
        if bar is not None:
            bar.update()
