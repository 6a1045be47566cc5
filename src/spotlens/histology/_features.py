"""Tile features: encoder features with an on-disk cache, and simple colour statistics.

Encoding is the slow step (EfficientNet-Lite0 runs at about 10–25 tiles/s on two CPU cores), so
:func:`tile_features` stores each result as a ``.npy`` file named by a hash of everything that
determines it: the image, the tile geometry, the encoder and its weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .._validation import InputError, check_int
from ._encoders import Encoder, check_tiles, torch
from ._tiles import DEFAULT_TILE_SCALES, check_tile_scales

logger = logging.getLogger("spotlens")

_CACHE_VERSION = "spotlens-tile-features-v1"


# --------------------------------------------------------------------------------------------
# Cache keys
# --------------------------------------------------------------------------------------------


def image_identity(path: str | os.PathLike) -> str:
    """Return a cheap identity of an image file: resolved path, size in bytes and mtime (ns).

    A changed, moved or rewritten file gets a new identity. For an identity that survives
    copying, pass a content hash (e.g. :func:`spotlens.histology._encoders.file_sha256`) to
    :func:`tile_cache_key` instead.

    Raises
    ------
    InputError
        If ``path`` is not an existing file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"Image file {str(path)!r} does not exist.")
    info = path.stat()
    return f"{path.resolve()}|{info.st_size}|{info.st_mtime_ns}"


def tile_cache_key(
    image_id: str,
    centres: np.ndarray,
    *,
    tile_um: float | None = None,
    tile_px: float | None = None,
    mpp: float | None = None,
    out_px: int = 224,
) -> str:
    """Hash the image identity and the tile geometry into a key for :func:`tile_features`.

    Parameters
    ----------
    image_id
        Identity of the source image, e.g. :func:`image_identity` or a content hash.
    centres
        ``n_tiles × 2`` tile centres (x, y) in full-resolution pixels.
    tile_um, tile_px, mpp
        Tile side in µm and/or full-resolution pixels, and the image's µm per pixel — whichever
        define the crop (``None`` entries are hashed as such).
    out_px
        Side in pixels of the tiles after resizing.

    Returns
    -------
    A 64-character hex string (SHA-256).

    Raises
    ------
    InputError
        If ``centres`` is not ``n × 2`` and finite.
    """
    centres = np.asarray(centres, dtype=np.float64)
    if centres.ndim != 2 or centres.shape[1] != 2 or not np.all(np.isfinite(centres)):
        raise InputError(f"centres must be a finite n_tiles × 2 array, got shape {centres.shape}.")
    digest = hashlib.sha256()
    geometry = f"{image_id}|tile_um={tile_um!r}|tile_px={tile_px!r}|mpp={mpp!r}|out_px={out_px}"
    digest.update(geometry.encode())
    digest.update(np.round(centres, 3).tobytes())
    return digest.hexdigest()


def _content_key(tiles: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=32)
    digest.update(str(tiles.shape).encode())
    digest.update(np.ascontiguousarray(tiles).data)
    return "content:" + digest.hexdigest()


def _cache_path(cache_dir: Path, cache_key: str, n_tiles: int, encoder: Encoder) -> Path:
    full = f"{_CACHE_VERSION}|{cache_key}|n={n_tiles}|{encoder.identity}"
    digest = hashlib.sha256(full.encode()).hexdigest()[:40]
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", encoder.name)[:40]
    return cache_dir / f"{label}-{digest}.npy"


def _read_cache(path: Path, n_tiles: int, dim: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        features = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.info("Ignoring unreadable feature cache %s (%s)", path, err)
        return None
    if features.shape != (n_tiles, dim) or features.dtype != np.float32:
        logger.info("Ignoring feature cache %s: shape %s", path, features.shape)
        return None
    return features


def _write_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Encoder features
# --------------------------------------------------------------------------------------------


def tile_features(
    tiles: np.ndarray,
    encoder: Encoder,
    *,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
    progress: bool = True,
    num_threads: int | None = None,
    stats: dict[str, Any] | None = None,
) -> np.ndarray:
    """Encode tiles in batches, reading and writing an on-disk cache.

    Parameters
    ----------
    tiles
        ``n_tiles × H × W × 3`` uint8 RGB, e.g. from ``spot_tiles``; resized to the encoder's
        input size if needed.
    encoder
        From :func:`~spotlens.histology._encoders.get_encoder`.
    batch_size
        Tiles per forward pass.
    cache_dir
        Folder for cached features (created if needed); ``None`` disables the cache.
    cache_key
        Identity of the image and the tile geometry, from :func:`tile_cache_key`. The file name
        is a hash of this key, the number of tiles and the encoder's identity (name, weights
        SHA-256, input size, normalisation), so another encoder or geometry misses. ``None``
        with a ``cache_dir``: the key is a hash of the tiles' pixels (always correct; costs a
        pass over the tiles, still far cheaper than encoding).
    progress
        Show a progress bar (tqdm, on stderr).
    num_threads
        torch CPU threads while encoding; default: the cores this process may use
        (``os.sched_getaffinity``). The previous setting is restored afterwards.
    stats
        Optional dict filled with ``n_tiles``, ``seconds``, ``tiles_per_s`` (encoding
        throughput; ``nan`` on a cache hit), ``cache`` (``"hit"``, ``"miss"`` or ``"off"``) and
        ``path`` (the cache file or ``None``).

    Returns
    -------
    ``n_tiles × encoder.dim`` float32 features. Files are written atomically (a temporary
    file in ``cache_dir``, then ``os.replace``), so parallel runs never read half a file.

    Raises
    ------
    InputError
        If ``tiles`` is not an ``n × H × W × 3`` uint8 array, ``batch_size`` is not a positive
        integer, or ``encoder`` is not an :class:`Encoder`.

    Examples
    --------
    >>> enc = get_encoder("efficientnet-lite0")  # doctest: +SKIP
    >>> key = tile_cache_key(image_identity("C3.jpg"), xy, tile_um=100, mpp=0.69)  # doctest: +SKIP
    >>> feats = tile_features(tiles, enc, cache_dir="cache", cache_key=key)  # doctest: +SKIP
    """
    tiles = check_tiles(tiles)
    if not isinstance(encoder, Encoder):
        raise InputError(
            f"encoder must be a spotlens Encoder (from get_encoder), got {type(encoder).__name__}."
        )
    check_int("batch_size", batch_size, minimum=1, expected="a positive integer")
    n_tiles = tiles.shape[0]
    info: dict[str, Any] = {"n_tiles": n_tiles, "cache": "off", "path": None}

    path = None
    if cache_dir is not None:
        key = cache_key if cache_key is not None else _content_key(tiles)
        path = _cache_path(Path(cache_dir).expanduser(), str(key), n_tiles, encoder)
        info["path"] = path
        cached = _read_cache(path, n_tiles, encoder.dim)
        if cached is not None:
            info.update(cache="hit", seconds=0.0, tiles_per_s=float("nan"))
            if stats is not None:
                stats.update(info)
            logger.info("Features of %d tiles read from %s", n_tiles, path)
            return cached
        info["cache"] = "miss"

    from tqdm.auto import tqdm

    threads = num_threads
    if threads is None and encoder.device == "cpu":
        threads = _usable_cores()
    out = np.empty((n_tiles, encoder.dim), dtype=np.float32)
    start = time.perf_counter()
    with _torch_threads(threads), tqdm(
        total=n_tiles, unit="tile", disable=not progress, desc=encoder.name
    ) as bar:
        for lo in range(0, n_tiles, int(batch_size)):
            hi = min(lo + int(batch_size), n_tiles)
            out[lo:hi] = encoder.encode(tiles[lo:hi])
            bar.update(hi - lo)
    seconds = time.perf_counter() - start
    info.update(seconds=seconds, tiles_per_s=n_tiles / seconds if seconds > 0 else float("inf"))
    logger.info(
        "Encoded %d tiles with %s in %.1f s (%.1f tiles/s)",
        n_tiles, encoder.name, seconds, info["tiles_per_s"],
    )
    if not np.all(np.isfinite(out)):
        raise FloatingPointError(
            f"{encoder.name} returned NaN or infinite features; the weights may be corrupt."
        )
    if path is not None:
        _write_atomic(path, out)
    if stats is not None:
        stats.update(info)
    return out


# --------------------------------------------------------------------------------------------
# Colour features
# --------------------------------------------------------------------------------------------

#: Stain vectors (optical density per R, G, B) of haematoxylin and eosin from Ruifrok A.C. &
#: Johnston D.A., "Quantification of histochemical staining by color deconvolution",
#: Anal. Quant. Cytol. Histol. 23, 291–299 (2001); the third row completes the basis
#: orthogonally (residual). Rows are normalised to unit length.
_H = np.array([0.650, 0.704, 0.286])
_E = np.array([0.072, 0.990, 0.105])
_H, _E = _H / np.linalg.norm(_H), _E / np.linalg.norm(_E)
_R = np.cross(_H, _E)
HE_STAIN_MATRIX = np.vstack([_H, _E, _R / np.linalg.norm(_R)])
_UNMIX = np.linalg.inv(HE_STAIN_MATRIX)

_PERCENTILES = (10, 50, 90)
_STATS = ("mean", "std") + tuple(f"p{q}" for q in _PERCENTILES)
COLOUR_FEATURE_NAMES = tuple(
    f"{channel}_{stat}" for channel in ("R", "G", "B", "H_od", "E_od") for stat in _STATS
)


def _channel_stats(values: np.ndarray) -> np.ndarray:
    """``n × n_pixels × n_channels`` -> ``n × (n_channels · 5)`` (mean, std, p10, p50, p90)."""
    stats = [values.mean(axis=1), values.std(axis=1)]
    stats.extend(np.percentile(values, _PERCENTILES, axis=1))  # each n × n_channels
    return np.stack(stats, axis=2).reshape(values.shape[0], -1)


def colour_features(tiles: np.ndarray, *, chunk_size: int = 64) -> np.ndarray:
    """Per-tile colour statistics in RGB and in haematoxylin/eosin optical density.

    For each tile and each of five channels — R, G, B (intensity 0..255) and the haematoxylin
    and eosin concentrations from colour deconvolution with a fixed stain matrix
    (:data:`HE_STAIN_MATRIX`, Ruifrok & Johnston 2001) — the mean, standard deviation and the
    10th, 50th and 90th percentiles over the tile's pixels. Optical density is
    ``OD = -log10(max(I, 1) / 255)`` per channel; concentrations are ``OD @ inv(M)``.

    Parameters
    ----------
    tiles
        ``n_tiles × H × W × 3`` uint8 RGB.
    chunk_size
        Tiles processed at once (bounds memory).

    Returns
    -------
    ``n_tiles × 25`` float32, columns named by :data:`COLOUR_FEATURE_NAMES`.

    Raises
    ------
    InputError
        If ``tiles`` is not an ``n × H × W × 3`` uint8 array.
    """
    tiles = check_tiles(tiles)
    n_tiles = tiles.shape[0]
    out = np.empty((n_tiles, len(COLOUR_FEATURE_NAMES)), dtype=np.float32)
    chunk_size = max(int(chunk_size), 1)
    for lo in range(0, n_tiles, chunk_size):
        part = tiles[lo : lo + chunk_size]
        block = part.reshape(part.shape[0], -1, 3)
        rgb = block.astype(np.float32)
        od = -np.log10(np.maximum(rgb, 1.0) / 255.0)
        conc = (od @ _UNMIX.astype(np.float32))[..., :2]
        out[lo : lo + block.shape[0]] = np.concatenate(
            [_channel_stats(rgb), _channel_stats(conc)], axis=1
        )
    return out


# --------------------------------------------------------------------------------------------
# Several fields of view
# --------------------------------------------------------------------------------------------


def multiscale_features(
    image,
    centres_px: np.ndarray,
    side_px: float,
    encoder: Encoder | None,
    *,
    scales=DEFAULT_TILE_SCALES,
    out_px: int = 224,
    cache_dir: str | os.PathLike | None = None,
    image_id: str | None = None,
    tile_um: float | None = None,
    mpp: float | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Features of square tiles of several sizes around each spot, side by side.

    For each scale ``s`` a tile of side ``s · side_px`` is cut around every centre
    (:func:`~spotlens.histology._tiles.extract_tiles`; parts outside the image are white),
    resized to ``out_px`` and encoded (:func:`tile_features`, cached per scale) or summarised
    by :func:`colour_features` when ``encoder`` is None. Larger tiles give the model the
    tissue around the spot (a tumour nest, a layer of the olfactory bulb) at a coarser
    resolution, as multi-scale patch models of histology do (e.g. Hist2ST, HIPT).

    Parameters
    ----------
    image
        The full-resolution image (:class:`~spotlens.histology.SlideImage` or
        ``height × width × 3`` uint8).
    centres_px
        ``n_spots × 2`` tile centres ``(x, y)``, full-resolution px.
    side_px
        Side of the scale-1 tile, full-resolution px.
    encoder
        An :class:`Encoder`, or None for colour statistics.
    scales
        Tile sides as multiples of ``side_px`` (default :data:`DEFAULT_TILE_SCALES`).
    out_px
        Side of every tile after resizing, px.
    cache_dir
        Feature cache folder; used only with ``image_id``.
    image_id
        Identity of the image for the cache key (:func:`image_identity`).
    tile_um, mpp
        Scale-1 tile side in µm and µm per px, hashed into the cache key where known.
    progress
        Progress bars while encoding.

    Returns
    -------
    ``n_spots × (n_scales · dim)`` float32, the scales' blocks in the order of ``scales``.
    Tiles are cut and encoded 4,096 spots at a time, so memory does not grow with the slide.

    Raises
    ------
    InputError
        Bad ``scales`` or ``side_px``.
    """
    from ._tiles import extract_tiles

    scales = check_tile_scales(scales)
    if not (np.isfinite(side_px) and side_px > 0):
        raise InputError(f"side_px must be a positive number of pixels, got {side_px!r}.")
    centres_px = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    blocks = []
    for scale in scales:
        parts = []
        # spots in chunks, so a slide of 100,000 pseudo-spots never holds all its tiles at once
        # (each chunk is cached under the key of its own centres)
        for lo in range(0, len(centres_px), _SPOTS_PER_CHUNK):
            chunk = centres_px[lo:lo + _SPOTS_PER_CHUNK]
            tiles = extract_tiles(image, chunk, side_px * scale, out_px=out_px)
            if encoder is None:
                parts.append(colour_features(tiles))
                continue
            key = None
            if image_id is not None:
                key = tile_cache_key(
                    image_id, chunk, tile_um=None if tile_um is None else tile_um * scale,
                    tile_px=side_px * scale, mpp=mpp, out_px=out_px,
                )
            parts.append(tile_features(
                tiles, encoder, cache_dir=cache_dir if key is not None else None, cache_key=key,
                progress=progress,
            ))
        blocks.append(np.vstack(parts) if parts else np.empty((0, 0), np.float32))
    return np.hstack(blocks).astype(np.float32, copy=False)


_SPOTS_PER_CHUNK = 4096  # tiles cut and encoded at once (~620 MB of 224-px RGB tiles)
