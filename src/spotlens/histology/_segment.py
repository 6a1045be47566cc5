"""Nucleus segmentation of a whole H&E section as an AnnData of nuclei, and nuclei per spot."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import N_NUCLEI_KEY, NUCLEI_KEY, NUCLEUS_SPOT_KEY, SPATIAL_KEY
from .._validation import InputError, check_coordinates, check_int
from ..io import as_slide_image, check_mpp
from ._nuclei import FEATURE_NAMES, NucleusConfig
from ._nuclei_backends import backend_segmenter, check_backend, load_backend_model
from ._nuclei_tiling import (
    classical_segmenter,
    plan_tiles,
    resolve_jobs,
    run_tiles,
    tiles_on_tissue,
)
from ._tiles import _library, _stored_mpp
from ._tissue import tissue_mask as _tissue_mask

logger = logging.getLogger("spotlens")

#: obs columns of the nuclei AnnData, in order.
NUCLEUS_COLUMNS = (
    "x_px", "y_px", "x_um", "y_um", "area_px", "area_um2", "perimeter_um", "eccentricity",
    "solidity", "hematoxylin", "eosin", "red", "green", "blue",
)


def segment_nuclei(
    image,
    *,
    mpp: float | None = None,
    adata: AnnData | None = None,
    spatial_key: str = SPATIAL_KEY,
    library_id: str | None = None,
    backend: str = "classical",
    model=None,
    config: NucleusConfig | None = None,
    tile_size: int = 1024,
    halo_px: int | None = None,
    tissue: bool = True,
    n_jobs: int | None = 1,
    client=None,
    return_labels: bool = False,
    progress: bool = False,
) -> AnnData:
    """Segment the nuclei of an H&E image, tile by tile, into an AnnData of nuclei.

    The image is cut into ``tile_size`` px tiles read with a halo of ``halo_px``; each tile
    is segmented on its own and keeps the nuclei whose centroid falls in its core, so a
    nucleus on a tile border is counted once and the result does not depend on the tiling.
    Only tiles on tissue are segmented. The classical back-end needs no weights: colour
    deconvolution to haematoxylin, a local threshold, a distance-transform watershed and size
    filters in µm² (:class:`NucleusConfig`; steps in :func:`segment_tile`).

    Parameters
    ----------
    image
        A :class:`SlideImage`, an image path, or an ``height × width × 3`` uint8 array; the
        full-resolution H&E (the frame of ``obsm["spatial"]``).
    mpp
        µm per full-resolution px. None = ``image.mpp``, else the section's
        ``uns["spatial"][library_id]["scalefactors"]["microns_per_pixel"]`` or
        ``["metadata"]["microns_per_pixel"|"microns_per_pixel_est"]`` when ``adata`` is given.
    adata
        Optional spots, centres ``(x, y)`` in full-resolution px in ``obsm[spatial_key]`` and
        their diameter in ``uns["spatial"][library_id]["scalefactors"]
        ["spot_diameter_fullres"]``: each nucleus is assigned to the spot whose circle holds
        its centroid. Not modified.
    spatial_key
        ``obsm`` key of the spot centres.
    library_id
        Key of ``adata.uns["spatial"]``; None = its only library.
    backend
        ``"classical"`` (no weights), ``"cellpose"`` or ``"stardist"`` (need ``model``).
    model
        For Cellpose: a weights file; for StarDist: a model folder; or a loaded model object
        (``eval`` / ``predict_instances``). Nothing is downloaded.
    config
        Segmentation settings; None = :class:`NucleusConfig` defaults.
    tile_size
        Side of a tile's core, px.
    halo_px
        Overlap read around each core, px; None = :meth:`NucleusConfig.halo_px` (largest
        nucleus + reach of the filters; ≈ 100 px at 0.69 µm/px). Must be at least the
        diameter of the largest nucleus.
    tissue
        Segment only tiles on tissue (:func:`tissue_mask` of a thumbnail, grown by the halo);
        False = every tile. An image of one tile is segmented whole either way.
    n_jobs
        Processes for the tiles (the classical back-end); −1 = every core, None or 1 = this
        process. Cellpose and StarDist run in this process.
    client
        A ``distributed.Client`` (or ``"default"``): tiles become Dask tasks; workers read
        their tiles from the image file (or get their pixels for an array). Same result as a
        local run. Classical back-end only.
    return_labels
        Also store the ``height × width`` int32 label image in ``uns["nuclei"]["labels"]``
        (label ``k`` = row ``k − 1`` of ``obs``; 4 bytes per pixel, ≈ 370 MB for a
        9,300 × 9,900 px scan).
    progress
        Show a progress bar over tiles.

    Returns
    -------
    AnnData with one observation per nucleus (``n_nuclei × 0``; rows ordered by ``y``, then
    ``x``): ``obsm["spatial"]`` = ``n_nuclei × 2`` centroids ``(x, y)`` in full-resolution px
    (the spots' frame); ``obs`` columns ``x_px``, ``y_px``, ``x_um``, ``y_um`` (centroid),
    ``area_px``, ``area_um2``, ``perimeter_um``, ``eccentricity`` (0 = circle),
    ``solidity`` (area / convex hull area), ``hematoxylin``, ``eosin`` (mean optical density,
    ``rgb2hed`` units), ``red``, ``green``, ``blue`` (mean, 0-255) and, with ``adata``,
    ``spot`` (the spot's ``obs_name``, categorical; NA outside every spot);
    ``uns["nuclei"]["params"]``: the settings, ``mpp``, ``backend``, ``tile_size``,
    ``halo_px``, ``n_tiles``, ``n_tiles_segmented``, ``image_shape``, ``seconds`` (and
    ``library_id``, ``spot_radius_px`` with spots).

    Raises
    ------
    InputError
        If the image is not an RGB image, no µm/px is known, a size is not positive, the
        halo is narrower than the largest nucleus or ``tile_size`` is smaller than the halo,
        the spots lack coordinates or a diameter, the back-end is unknown or lacks its
        weights or package, or ``client`` is not a Dask client.

    References
    ----------
    Ruifrok & Johnston, Anal Quant Cytol Histol 23, 291–299 (2001) (colour deconvolution of
    H&E). Vincent & Soille, IEEE Trans Pattern Anal Mach Intell 13, 583–598 (1991)
    (watershed). Stringer et al., Nat Methods 18, 100–106 (2021) (Cellpose); Schmidt et al.,
    MICCAI 2018 (StarDist) — the optional back-ends.

    Examples
    --------
    >>> from spotlens.histology import count_nuclei, read_image, segment_nuclei
    >>> import anndata as ad
    >>> spots = ad.read_h5ad("her2st/C6.h5ad")  # doctest: +SKIP
    >>> img = read_image("her2st/C6_HE_fullres.jpg")  # doctest: +SKIP
    >>> nuclei = segment_nuclei(img, adata=spots, n_jobs=2)  # doctest: +SKIP
    >>> count_nuclei(spots, nuclei)  # doctest: +SKIP
    >>> spots.obs["n_nuclei"].median()  # doctest: +SKIP
    """
    started = time.perf_counter()
    slide = as_slide_image(image)
    backend = check_backend(backend)
    config = NucleusConfig() if config is None else config
    if not isinstance(config, NucleusConfig):
        raise InputError(f"config must be a NucleusConfig, got {type(config).__name__}.")
    tile_size = check_int("tile_size", tile_size, minimum=16, expected="an integer ≥ 16 px")
    n_jobs = resolve_jobs(check_int("n_jobs", n_jobs, none_ok=True))
    if n_jobs == 0:
        raise InputError("n_jobs must be a number of processes ≥ 1, or −1 for every core, "
                         "got 0.")
    spots = _spots(adata, spatial_key, library_id) if adata is not None else None
    mpp = _resolve_mpp(mpp, slide, adata, spots)
    need = int(math.ceil(config.max_diameter_px(mpp)))
    halo = config.halo_px(mpp) if halo_px is None else check_int(
        "halo_px", halo_px, minimum=0, expected="a number of px ≥ 0")
    if halo < need:
        raise InputError(
            f"halo_px={halo} is narrower than the largest nucleus ({need} px: max_area_um2="
            f"{config.max_area_um2:g} µm² at {mpp:.4g} µm/px); a nucleus on a tile border "
            f"would be cut. Pass halo_px ≥ {need}, or None for the default "
            f"({config.halo_px(mpp)} px)."
        )
    if tile_size < halo:
        raise InputError(
            f"tile_size={tile_size} px is smaller than the halo ({halo} px), so most of each "
            f"tile would be overlap. Pass tile_size ≥ {halo} (e.g. 1024)."
        )
    if backend == "classical":
        segmenter = classical_segmenter(mpp, config)
    else:
        if client is not None:
            raise InputError(f"client= runs the classical back-end only; run backend="
                             f"{backend!r} on one machine (client=None).")
        segmenter = backend_segmenter(backend, load_backend_model(backend, model), mpp=mpp,
                                      config=config)
        n_jobs = 1
    if client is not None:
        from .._backend import resolve_client

        client = resolve_client(client)

    height, width = slide.shape
    tiles = plan_tiles(slide.shape, tile_size, halo)
    n_tiles = len(tiles)
    if tissue and n_tiles > 1:
        mask, scale = _tissue_mask(slide)
        tiles = tiles_on_tissue(tiles, mask, scale, halo)
        if not tiles:
            logger.warning("no tissue found on the image's thumbnail, so no tile is "
                           "segmented; pass tissue=False to segment every tile")
    logger.info("segmenting nuclei in %d of %d tiles of %d px (halo %d px, %.4g µm/px)",
                len(tiles), n_tiles, tile_size, halo, mpp)
    features, labels = _collect(slide, tiles, segmenter, return_labels, n_jobs, client,
                                progress)
    nuclei = _nuclei_anndata(features, mpp)
    params = {**config.to_dict(), "backend": backend, "mpp": float(mpp),
              "tile_size": tile_size, "halo_px": int(halo), "n_tiles": n_tiles,
              "n_tiles_segmented": len(tiles), "image_shape": [int(height), int(width)],
              "tissue": bool(tissue)}
    if spots is not None:
        names, coords, radius, lib = spots
        nuclei.obs[NUCLEUS_SPOT_KEY] = assign_spots(nuclei.obsm[SPATIAL_KEY], coords, radius,
                                                    names)
        params.update(spot_radius_px=float(radius), spatial_key=spatial_key)
        if lib is not None:
            params["library_id"] = lib
    params["seconds"] = round(time.perf_counter() - started, 3)
    nuclei.uns[NUCLEI_KEY] = {"params": params}
    if labels is not None:
        nuclei.uns[NUCLEI_KEY]["labels"] = labels
    return nuclei


def _spots(adata, spatial_key: str, library_id):
    if not isinstance(adata, AnnData):
        raise InputError(f"adata must be an AnnData of spots, got {type(adata).__name__}.")
    coords = check_coordinates(adata, spatial_key)
    lib, entry = _library(adata, library_id)
    diameter = (entry.get("scalefactors", {}) or {}).get("spot_diameter_fullres")
    if diameter is None:
        raise InputError(
            "Assigning nuclei to spots needs the spot diameter in full-resolution px in "
            "adata.uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres']; add "
            "it (Visium: 55 µm / mpp, legacy ST: 100 µm / mpp) or pass adata=None."
        )
    radius = check_mpp(diameter, what="spot_diameter_fullres", unit="px") / 2
    return adata.obs_names.copy(), coords, radius, lib


def _resolve_mpp(mpp, slide, adata, spots) -> float:
    mpp = check_mpp(mpp)
    if mpp is None and slide.mpp is not None:
        mpp = slide.mpp
    if mpp is None and spots is not None:
        _, entry = _library(adata, spots[3])
        mpp, _ = _stored_mpp(None, entry, spots[3])
    if mpp is None:
        raise InputError(
            "segment_nuclei needs the image scale (areas and the size filter are in µm): pass "
            "mpp= (µm per px; e.g. 0.5 for a 20× scan), or spots (adata=) whose "
            "uns['spatial'][library_id] records 'microns_per_pixel' in its scalefactors or "
            "metadata."
        )
    return mpp


def _collect(slide, tiles, segmenter, return_labels, n_jobs, client, progress):
    """Run the tiles; return the stitched ``n × 11`` features and the label image (or None)."""
    parts: dict[int, np.ndarray] = {}
    labels = np.zeros(slide.shape, dtype=np.int32) if return_labels else None
    offsets: dict[int, int] = {}
    next_id = 0
    by_index = {t.index: t for t in tiles}
    for result in run_tiles(slide, tiles, segmenter, keep_labels=return_labels,
                            n_jobs=n_jobs, client=client, progress=progress):
        parts[result["index"]] = result["features"]
        if labels is not None:  # paste with provisional ids, in arrival order
            offsets[result["index"]] = next_id
            x0, y0, x1, y1 = by_index[result["index"]].window
            local = result["labels"]
            inside = local > 0
            labels[y0:y1, x0:x1][inside] = local[inside] + next_id
            next_id += len(result["features"])
    order_tiles = sorted(parts)
    features = (np.concatenate([parts[i] for i in order_tiles]) if parts
                else np.zeros((0, len(FEATURE_NAMES))))
    order = np.lexsort((features[:, 0], features[:, 1]))  # by y, then x
    if labels is not None:
        provisional = np.concatenate([offsets[i] + np.arange(1, len(parts[i]) + 1)
                                      for i in order_tiles]) if parts else np.zeros(0, int)
        lut = np.zeros(next_id + 1, dtype=np.int32)
        lut[provisional[order]] = np.arange(1, len(order) + 1, dtype=np.int32)
        labels = lut[labels]
    return features[order], labels


def _nuclei_anndata(features: np.ndarray, mpp: float) -> AnnData:
    f = dict(zip(FEATURE_NAMES, features.T, strict=True))
    table = {
        "x_px": f["x_px"], "y_px": f["y_px"], "x_um": f["x_px"] * mpp, "y_um": f["y_px"] * mpp,
        "area_px": f["area_px"].astype(np.int64), "area_um2": f["area_px"] * mpp**2,
        "perimeter_um": f["perimeter_px"] * mpp, "eccentricity": f["eccentricity"],
        "solidity": f["solidity"], "hematoxylin": f["hematoxylin"], "eosin": f["eosin"],
        "red": f["red"], "green": f["green"], "blue": f["blue"],
    }
    obs = pd.DataFrame(table, index=pd.Index([f"nucleus_{i}" for i in range(len(features))]))
    nuclei = AnnData(obs=obs)
    nuclei.obsm[SPATIAL_KEY] = np.column_stack([f["x_px"], f["y_px"]]).astype(np.float64)
    return nuclei


def assign_spots(centroids: np.ndarray, spot_coords: np.ndarray, radius: float,
                 names) -> pd.Categorical:
    """The spot whose circle holds each centroid (the nearest one if circles overlap).

    Parameters
    ----------
    centroids
        ``n_nuclei × 2`` ``(x, y)`` px.
    spot_coords
        ``n_spots × 2`` spot centres ``(x, y)`` px.
    radius
        Spot radius, px; a centroid at distance ≤ ``radius`` is inside.
    names
        ``n_spots`` spot names.

    Returns
    -------
    ``n_nuclei`` categorical of spot names (categories: all ``names``), NA outside spots.
    """
    from scipy.spatial import cKDTree

    names = pd.Index(names).astype(str)
    codes = np.full(len(centroids), -1, dtype=np.int64)
    if len(centroids) and len(spot_coords):
        distance, nearest = cKDTree(spot_coords).query(centroids, k=1)
        inside = distance <= radius
        codes[inside] = nearest[inside]
    return pd.Categorical.from_codes(codes, categories=names)


def count_nuclei(
    adata: AnnData,
    cells: AnnData,
    *,
    key_added: str = N_NUCLEI_KEY,
    inplace: bool = True,
) -> pd.Series | None:
    """Count the segmented nuclei in each spot.

    Parameters
    ----------
    adata
        The spots given to :func:`segment_nuclei`.
    cells
        Its nuclei AnnData, with ``obs["spot"]`` (from ``segment_nuclei(..., adata=adata)``).
    key_added
        ``obs`` column to write.
    inplace
        True: write ``adata.obs[key_added]`` and return None. False: return the counts and
        change nothing.

    Returns
    -------
    None, or with ``inplace=False`` an int64 Series of nuclei per spot indexed by
    ``adata.obs_names`` (0 where none).

    Writes ``adata.obs[key_added]`` (int64, nuclei whose centroid lies in the spot's circle)
    when ``inplace``.

    Raises
    ------
    InputError
        If ``cells`` has no ``obs["spot"]`` or names spots that ``adata`` lacks.

    Examples
    --------
    >>> nuclei = segment_nuclei(image, adata=spots)  # doctest: +SKIP
    >>> count_nuclei(spots, nuclei)  # doctest: +SKIP
    >>> spots.obs["n_nuclei"].describe()  # doctest: +SKIP
    """
    for name, value in (("adata", adata), ("cells", cells)):
        if not isinstance(value, AnnData):
            raise InputError(f"{name} must be an AnnData, got {type(value).__name__}.")
    if NUCLEUS_SPOT_KEY not in cells.obs.columns:
        raise InputError(
            f"cells has no obs[{NUCLEUS_SPOT_KEY!r}]: segment the nuclei with "
            "segment_nuclei(image, adata=adata) so each nucleus is assigned to a spot."
        )
    spot = cells.obs[NUCLEUS_SPOT_KEY]
    counts = spot.dropna().astype(str).value_counts()
    unknown = counts.index.difference(adata.obs_names)
    if len(unknown):
        raise InputError(
            f"cells.obs[{NUCLEUS_SPOT_KEY!r}] names {len(unknown)} spots that adata lacks (e.g. "
            f"{list(unknown[:3])}); pass the spots the nuclei were segmented with."
        )
    result = counts.reindex(adata.obs_names, fill_value=0).astype(np.int64)
    result.name = key_added
    if not inplace:
        return result
    adata.obs[key_added] = result.to_numpy()
    return None
