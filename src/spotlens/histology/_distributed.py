"""Histology inference on a Dask cluster: image regions as tasks, predictions stitched.

The driver lays out the spots (only their centres, never pixels), splits the slide into square
image regions and submits one task per region. Each worker opens the image file itself, reads
only the tiles of its region's spots (lazily: TIFF/SVS tiles or strips; a JPEG/PNG is decoded
once per worker process) at the model's tile scales and encodes them; the features stay on
the workers. When the model z-scores features within a section, each region sends back only
the feature sums of its core spots, the driver adds them up into the slide's mean and standard
deviation, and the prediction tasks standardise with those, exactly as one machine standardises
the whole slide. The driver stitches the regions' cores.

Which spots a region must see depends on the model:

- ``"ridge"`` and ``"attention"`` predict each spot from its own tile (the attention model
  attends to the bank of training spots stored in the model, not to other spots of the
  slide), so a region is just its own spots;
- ``"graph"`` predicts over the spots' k-nearest-neighbour graph with 2 graph attention and
  2 GCN layers, so a spot's prediction depends on every spot within 4 hops (and on the degrees
  of those within 3). The graph is built once on the driver from all centres, exactly as the
  single-machine run builds it, and each region is sent its core spots plus the 4-hop halo,
  with their block of the graph; the halo's predictions are computed and discarded.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import numpy as np
from scipy import sparse

from .._backend import resolve_client
from .._validation import InputError
from ..io import read_image
from ._featurize import spot_pitch_px
from ._train_data import spot_graph

logger = logging.getLogger("spotlens")

#: Default region side, in spot pitches (about 4,096 spots per full region).
REGION_PITCHES = 64


def graph_adjacency(coords: np.ndarray, k: int) -> sparse.csr_matrix:
    """Symmetric 0/1 spot graph of all spots, built by the graph model's own code.

    ``coords`` are the ``n_spots × 2`` centres; returns the ``n_spots × n_spots`` CSR adjacency
    (k nearest neighbours, symmetrised) without self loops.
    """
    return spot_graph(np.asarray(coords, dtype=np.float64), k)


def plan_regions(
    coords: np.ndarray,
    region_px: float,
    *,
    adjacency: sparse.csr_matrix | None = None,
    hops: int = 0,
) -> list[dict]:
    """Split spots into square image regions, each with the halo its predictions need.

    Parameters
    ----------
    coords
        ``n_spots × 2`` centres ``(x, y)``, full-resolution px.
    region_px
        Side of a region, px.
    adjacency
        ``n_spots × n_spots`` spot graph (from :func:`graph_adjacency`); needed when ``hops > 0``.
    hops
        Graph hops of halo around each region's core.

    Returns
    -------
    One dict per non-empty region: ``"core"`` (global indices of its spots; every spot is in
    exactly one core), ``"local"`` (global indices of the spots it computes: the core first,
    then the halo, every spot within ``hops`` graph hops of the core) and ``"box"`` (the
    region's ``(x0, y0, x1, y1)`` in px).
    """
    coords = np.asarray(coords, dtype=np.float64)
    origin = coords.min(axis=0)
    cell = np.floor((coords - origin) / region_px).astype(np.int64)
    order = np.lexsort((cell[:, 0], cell[:, 1]))
    keys = cell[order]
    bounds = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    max_edge = 0.0
    if hops > 0:
        a = adjacency.tocoo()
        if a.nnz:
            max_edge = float(np.max(np.linalg.norm(coords[a.row] - coords[a.col], axis=1)))
    regions = []
    for core in np.split(order, bounds):
        core = np.sort(core)
        cx, cy = cell[core[0]]
        x0, y0 = origin + np.array([cx, cy]) * region_px
        local = core
        if hops > 0:
            # any path of `hops` edges from the core stays within hops × the longest edge
            lo = coords[core].min(axis=0) - hops * max_edge - 1e-9
            hi = coords[core].max(axis=0) + hops * max_edge + 1e-9
            near = np.flatnonzero(np.all((coords >= lo) & (coords <= hi), axis=1))
            sub = adjacency[near][:, near]
            reach = np.isin(near, core)
            for _ in range(hops):
                reach = reach | (sub @ reach.astype(np.float64) > 0)
            halo = np.setdiff1d(near[reach], core)
            local = np.concatenate([core, halo])
        regions.append({"core": core, "local": local,
                        "box": (float(x0), float(y0), float(x0 + region_px),
                                float(y0 + region_px))})
    return regions


def region_tasks(
    regions: list[dict],
    coords: np.ndarray,
    *,
    model_path: Path,
    image_path: Path,
    mpp: float,
    side_px: float,
    device: str,
    adjacency: sparse.csr_matrix | None,
    encoder_weights: str | None = None,
) -> list[dict]:
    """Build each region's task: spot centres and graph block, never pixels.

    ``encoder_weights``: the encoder checkpoint's path when it differs from the one the model
    recorded (:func:`~spotlens.histology.load_model`).
    """
    stamps = {"model_stamp": (Path(model_path) / "config.json").stat().st_mtime_ns,
              "image_stamp": Path(image_path).stat().st_mtime_ns}
    tasks = []
    for region in regions:
        local = region["local"]
        tasks.append({
            "model": str(model_path), "encoder_weights": encoder_weights,
            "image": str(image_path), "mpp": float(mpp),
            "device": device, "side_px": float(side_px),
            "centres": np.ascontiguousarray(coords[local], dtype=np.float64),
            "n_core": len(region["core"]), "core": region["core"],
            "adjacency": None if adjacency is None else adjacency[local][:, local].tocsr(),
            **stamps,
        })
    return tasks


@functools.lru_cache(maxsize=2)
def _worker_model(path: str, stamp: int, device: str, encoder_weights: str | None = None):
    from ._predict import load_model

    return load_model(path, device=device, encoder_weights=encoder_weights)


@functools.lru_cache(maxsize=2)
def _worker_image(path: str, stamp: int, mpp: float):
    return read_image(path, mpp=mpp)


def region_features(task: dict) -> np.ndarray:
    """Run on a worker: read the region's tiles (core and halo) from the image file, encode.

    Returns
    -------
    ``n_local × n_features`` features at the model's tile scales (through its fine-tuned head
    when it has one; not standardised).
    """
    model = _worker_model(task["model"], task["model_stamp"], task["device"],
                          task.get("encoder_weights"))
    image = _worker_image(task["image"], task["image_stamp"], task["mpp"])
    return model.encode_tiles(image, task["centres"], task["side_px"])


def region_moments(features: np.ndarray, n_core: int) -> dict[str, np.ndarray]:
    """Run on a worker: the feature sums of the region's core spots (each spot counted once)."""
    from ._normalize import feature_moments

    return feature_moments(features[:n_core])


def predict_region(task: dict, features: np.ndarray,
                   moments: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Run on a worker: predict the region's spots from their features.

    ``moments`` are the whole slide's feature sums when the model standardises features within
    a section, so every region is scaled exactly as on one machine.

    Returns
    -------
    The core's global spot indices, their ``n_core × n_genes`` float32 predictions and their
    uncertainty (same shape; None when the model has no ensemble).
    """
    model = _worker_model(task["model"], task["model_stamp"], task["device"],
                          task.get("encoder_weights"))
    # the graph model decodes over the driver's graph block, not one rebuilt from the centres
    pred = model.predict_features(features, task["centres"], moments=moments,
                                  adjacency=task["adjacency"])
    n_core = task["n_core"]
    std = None
    if model.has_uncertainty:  # the ensemble reads each spot's own tile: no halo needed
        std = model.uncertainty_features(features[:n_core], moments=moments)
    return task["core"], np.asarray(pred[:n_core], dtype=np.float32), std


def predict_on_cluster(
    model,
    spots,
    image_path: Path,
    *,
    client,
    mpp: float,
    side_px: float,
    region_um: float | None = None,
    device: str = "cpu",
    halo_hops: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Predict every spot of ``spots`` on a Dask cluster, one task per image region.

    Parameters
    ----------
    model
        A :class:`HistologyModel` (its folder must be readable by the workers).
    spots
        AnnData with centres ``(x, y)`` in full-resolution px in ``obsm["spatial"]``.
    image_path
        The full-resolution image file (readable by the workers at the same path).
    client
        A ``distributed.Client`` (or ``"default"``).
    mpp
        µm per full-resolution px.
    side_px
        Tile side, full-resolution px.
    region_um
        Side of a region, µm; None = 64 spot pitches.
    device
        Device on the workers.
    halo_hops
        Graph hops of halo; None = what the model needs (its network's ``halo_hops``). Fewer
        is wrong for the graph model (kept for tests that show it).

    Returns
    -------
    ``n_spots × n_genes`` float32 predictions (rows in ``spots`` order), their uncertainty
    (same shape; None when the model has no ensemble), and a summary
    (``n_regions``, ``region_um``, ``halo_hops``, ``n_computed``: spots computed including
    halos).
    """
    client = resolve_client(client)
    coords = np.asarray(spots.obsm["spatial"], dtype=np.float64)
    needs = model.model_type.halo_hops()  # > 0: the model decodes over the spot graph
    hops = needs if halo_hops is None else int(halo_hops)
    if region_um is None:
        pitch = spot_pitch_px(coords) or side_px
        region_px = REGION_PITCHES * pitch
        region_um = region_px * mpp
    else:
        region_px = region_um / mpp
    adjacency = None
    if needs > 0:  # the driver builds the graph of all spots once; regions get their blocks
        k = (model.settings.train_config or {}).get("k_neighbors", 6)
        adjacency = graph_adjacency(coords, int(k))
    regions = plan_regions(coords, region_px, adjacency=adjacency, hops=hops)
    tasks = region_tasks(regions, coords, model_path=model.path, image_path=image_path,
                         mpp=mpp, side_px=side_px, device=device, adjacency=adjacency,
                         encoder_weights=model.encoder_weights)
    n_computed = sum(len(r["local"]) for r in regions)
    logger.info("%d spots in %d regions of %.0f µm (%d spots computed with halos) on %s",
                len(coords), len(tasks), region_um, n_computed, client)
    from distributed import as_completed

    features = client.map(region_features, tasks, pure=False)
    moments = None
    if model.standardize:
        # the slide's feature mean and sd, from every region's core sums (features stay put)
        parts = client.gather(client.map(region_moments, features,
                                         [t["n_core"] for t in tasks], pure=False))
        moments = {k: sum(p[k] for p in parts) for k in parts[0]}
    futures = client.map(predict_region, tasks, features, moments=moments, pure=False)
    out = np.empty((len(coords), len(model.genes)), dtype=np.float32)
    std = np.empty_like(out) if model.has_uncertainty else None
    for done, future in enumerate(as_completed(futures), start=1):
        core, pred, spread = future.result()
        out[core] = pred
        if std is not None:
            std[core] = spread
        logger.debug("region %d of %d done", done, len(futures))
    return out, std, {"n_regions": len(tasks), "region_um": float(region_um), "halo_hops": hops,
                 "n_computed": int(n_computed)}


def check_region_um(region_um) -> float | None:
    """Raise unless ``region_um`` is None or a finite number > 0 (µm)."""
    if region_um is None:
        return None
    ok = isinstance(region_um, (int, float, np.integer, np.floating)) and not isinstance(
        region_um, bool)
    if not ok or not math.isfinite(region_um) or region_um <= 0:
        raise InputError(f"region_um must be a number of µm > 0, or None, got {region_um!r}.")
    return float(region_um)
