"""Tiled fit of the type-level model on a Dask cluster: spatial tiles with a halo of neighbours.

The driver (the process that calls :func:`spotlens.deconv.deconvolve`) computes everything that
is global exactly as the single-machine run does: signatures, gene weights, the sufficient
statistics ``B = Y Sᵀ`` (one sparse product), the PCA embedding, the k-nearest-neighbour graph
with ``alpha`` and attention, and the penalties (one cross-validation on a patch). The fit
itself — graph colouring and projected Gauss–Seidel sweeps, and the solver's state — runs on
the workers, one task per tile:

- a tile's **core** is the spots of one section inside a square of side ``tile_size``;
- its **halo** is every spot within ``halo_hops`` graph hops of the core (never across
  sections, since the graph never links two sections);
- each task receives only its own rows: of ``B`` (``n_rows × n_states``, ~70 times smaller
  than the rows' counts at 15 states), of the graph restricted to core + halo (the global edge
  weights, so ties on regular grids break as on one machine) and, between attention
  re-estimates, its own last iterate; it solves the same problem on that subgraph and the
  driver keeps the core rows.

The influence of the spots beyond the halo on a core spot decays geometrically with the number
of hops (measured in ``docs/dask.md``); the default halo keeps the proportions' tiling error
near 1e-5, and each run reports a per-tile ``halo_check``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from .._backend import resolve_client, resolve_device
from .._validation import InputError, check_int, check_number
from ._graph import color_graph
from ._model import Problem, _normalise_rows, fit
from ._ops import NumpyOps, get_ops
from ._solver import objective

logger = logging.getLogger("spotlens")

#: spots per tile core when ``tile_size`` is not given (on a fully covered section)
DEFAULT_TILE_SPOTS = 50_000
#: target of the default halo: largest proportion error it lets through (see docs/dask.md)
HALO_TARGET = 1e-5
#: ``halo_check`` above this is logged as a warning (suggesting more ``halo_hops``)
HALO_WARN = 1e-3


# ------------------------------------------------------------------ parameters and the client


def check_tiling(client, tile_size, halo_hops):
    """Resolve ``client`` (a ``distributed.Client``, ``"default"`` or ``None``) and check the rest.

    Returns
    -------
    The client, or ``None`` for the single-machine run.

    Raises
    ------
    InputError
        ``client="default"`` with no running client; ``client`` of another type; ``tile_size``
        not > 0; ``halo_hops`` not an integer ≥ 0; either given without a client.
    """
    if client is None:
        if tile_size is not None or halo_hops is not None:
            raise InputError(
                "tile_size and halo_hops apply to the tiled run on a Dask cluster; pass "
                "client=distributed.Client(...) (or client='default') as well, or leave them out."
            )
        return None
    check_number("tile_size", tile_size, above=0, none_ok=True,
                 expected="a number > 0 (coordinate units), or None")
    check_int("halo_hops", halo_hops, minimum=0, none_ok=True)
    return resolve_client(client)  # the one resolver of client=, shared with histology


# ------------------------------------------------------------------------------------ tiling


def tile_labels(
    coords: np.ndarray,
    sections: np.ndarray | None,
    tile_size: float | None,
    target_spots: int = DEFAULT_TILE_SPOTS,
) -> tuple[np.ndarray, pd.DataFrame]:
    """Assign every spot to one square tile of its own section.

    Parameters
    ----------
    coords
        ``n_spots × 2`` coordinates.
    sections
        ``n_spots`` integer section codes, or ``None`` for one section.
    tile_size
        Side of the squares, in coordinate units; ``None`` picks, per section, the side that
        puts about ``target_spots`` spots in a tile of its bounding box.
    target_spots
        See ``tile_size``.

    Returns
    -------
    labels, table
        ``n_spots`` tile index per spot, and one row per tile: ``section``, ``ix``, ``iy`` (tile
        position in its section's grid), ``x0``, ``y0`` (lower corner, coordinate units),
        ``tile_size``, ``n_core`` (spots in the tile).
    """
    n = coords.shape[0]
    sections = np.zeros(n, dtype=np.int64) if sections is None else np.asarray(sections)
    labels = np.empty(n, dtype=np.int64)
    rows = []
    for s in np.unique(sections):
        members = np.flatnonzero(sections == s)
        xy = coords[members]
        low = xy.min(axis=0)
        span = xy.max(axis=0) - low
        size = tile_size
        if size is None:
            area = float(np.prod(np.maximum(span, 1e-12)))
            size = float(np.sqrt(area * target_spots / len(members)))
            size = max(size, float(span.max()) / 1e4, 1e-12)
        cell = np.floor((xy - low) / size).astype(np.int64)
        keys, inverse = np.unique(cell, axis=0, return_inverse=True)
        counts = np.bincount(inverse.ravel(), minlength=len(keys))
        labels[members] = len(rows) + inverse.ravel()
        for (ix, iy), c in zip(keys, counts, strict=True):
            rows.append({
                "section": int(s), "ix": int(ix), "iy": int(iy),
                "x0": float(low[0] + ix * size), "y0": float(low[1] + iy * size),
                "tile_size": float(size), "n_core": int(c),
            })
    return labels, pd.DataFrame(rows)


def halo_rows(
    adjacency: sparse.csr_matrix, core: np.ndarray, hops: int
) -> tuple[np.ndarray, np.ndarray]:
    """Spots within ``hops`` graph hops of ``core`` (breadth-first, over ``adjacency``'s edges).

    Returns
    -------
    rows, hop
        The core spots first (in the order given), then the halo spots ring by ring (each ring
        sorted), and each one's hop distance from the core (0 for the core).
    """
    n = adjacency.shape[0]
    member = np.zeros(n, dtype=bool)
    member[core] = True
    frontier, rings = core, []
    for _ in range(hops):
        near = adjacency[frontier].indices
        near = np.unique(near[~member[near]])
        if near.size == 0:
            break
        member[near] = True
        rings.append(near)
        frontier = near
    rows = np.concatenate([core, *rings]).astype(np.int64)
    hop = np.repeat(np.arange(len(rings) + 1), [len(core)] + [len(r) for r in rings])
    return rows, hop


def default_halo_hops(lambda_spatial: float) -> int:
    """Halo width (graph hops) that keeps the tiling error of proportions near ``HALO_TARGET``.

    The error a tile's truncated graph causes in its core decays geometrically with the number
    of hops ``h`` between the core and the halo's outer edge, ``≈ 0.7 ρ^h``; measured per-hop
    factors (docs/dask.md) are 0.3, 0.43, 0.6 and 0.72 at ``lambda_spatial`` 0.1, 0.3, 1 and 3,
    bounded above by ``ρ = 0.6 λ^0.3``. Returns ``ceil(log(HALO_TARGET / 0.7) / log ρ)``,
    between 4 and 64 hops.
    """
    rho = min(0.95, 0.6 * float(lambda_spatial) ** 0.3)
    return int(np.clip(np.ceil(np.log(HALO_TARGET / 0.7) / np.log(rho)), 4, 64))


# ------------------------------------------------------------------------- the task (worker)


@dataclass(frozen=True)
class _Shared:
    """What every tile needs (scattered once to every worker)."""

    gram: np.ndarray
    scale: float
    metric: np.ndarray | None
    lambda_ridge: float
    lambda_spatial: float
    tol: float
    device: str
    seed: int


@dataclass(frozen=True)
class _Tile:
    """One task's own rows (core first, then halo): ``B = Y Sᵀ``, graph block, start."""

    index: int
    n_core: int
    b: np.ndarray
    w: sparse.csr_matrix | None
    x0: np.ndarray | None
    n_iter: int


def _solve_tile(tile: _Tile, shared: _Shared) -> dict:
    """Fit one tile (core + halo) and return its core rows; runs on a worker."""
    t0 = time.perf_counter()
    # ||Y||² only shifts the objective, which the driver evaluates on the stitched solution
    problem = Problem(b=tile.b, gram=shared.gram, yy=0.0, scale=shared.scale)
    colors = None if tile.w is None else color_graph(tile.w, seed=shared.seed)
    x, _, n_sweeps, converged, _ = fit(
        problem, tile.w, colors, lambda_ridge=shared.lambda_ridge,
        lambda_spatial=shared.lambda_spatial, n_iter=tile.n_iter, tol=shared.tol,
        ops=get_ops(resolve_device(shared.device)), x0=tile.x0, metric=shared.metric,
        track_objective=False,
    )
    try:
        from distributed import get_worker

        worker = str(get_worker().name)
    except (ImportError, ValueError):
        worker = "driver"
    return {
        "index": tile.index, "x": x, "n_sweeps": int(n_sweeps), "converged": bool(converged),
        "seconds": time.perf_counter() - t0, "worker": worker,
    }


# ------------------------------------------------------------------------ the driver's loop


def _run_tiles(client, tiles: list[Callable[[], _Tile]], shared: _Shared, progress: bool):
    """Run ``_solve_tile`` on every tile (built lazily); yield results as they complete."""
    bar = tqdm(total=len(tiles), desc="spotlens tiles", disable=not progress, leave=False)
    try:
        if client is None:  # in this process, one tile after another
            for make in tiles:
                yield _solve_tile(make(), shared)
                bar.update(1)
            return
        from distributed import as_completed

        shared_f = client.scatter(shared, broadcast=True, hash=False)
        futures = []
        for make in tiles:  # each payload is built, shipped and dropped in turn
            tile = make()
            futures.append(client.submit(
                _solve_tile, client.scatter(tile, hash=False), shared_f, pure=False,
                key=f"spotlens-tile-{tile.index}-{time.monotonic_ns()}",
            ))
            del tile
        try:
            for future in as_completed(futures):
                yield future.result()  # a task's error is raised here
                future.release()
                bar.update(1)
        finally:
            client.cancel(futures)  # nothing left running after an error (no-op when done)
    finally:
        bar.close()


def fit_tiled(
    client,
    problem: Problem,
    w: sparse.csr_matrix,
    coords: np.ndarray,
    sections: np.ndarray | None,
    *,
    lambda_ridge: float,
    lambda_spatial: float,
    n_iter: int,
    tol: float,
    device: str,
    seed: int,
    metric: np.ndarray | None,
    attention_update: tuple[int, Callable[[np.ndarray], sparse.csr_matrix]] | None,
    tile_size: float | None,
    halo_hops: int | None,
    to_types: sparse.spmatrix | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, int, bool, sparse.csr_matrix, pd.DataFrame]:
    """Fit :func:`spotlens.deconv._model.fit`'s problem over spatial tiles with halos.

    Parameters
    ----------
    client
        ``distributed.Client``, or ``None`` to run the tiles one after another in this process.
    problem
        The global sufficient statistics (``B`` is ``n_spots × n_states``); each tile gets its
        rows of ``B``.
    w
        ``n_spots × n_spots`` global spot graph; each tile gets its core + halo block.
    coords, sections
        ``n_spots × 2`` coordinates and integer section codes (or ``None``).
    lambda_ridge, lambda_spatial, n_iter, tol, metric
        As for ``fit`` (relative penalties).
    device, seed
        Backend each worker resolves, and the seed of the tiles' graph colouring.
    attention_update
        ``(every, rebuild)`` as for ``fit``: the tiles run ``every`` sweeps per round, the
        driver stitches the cores and rebuilds the global graph from them (the attention
        embedding is a PCA of all spots, a global quantity), and in the next round each tile
        restarts from its own last iterate on the new graph — as the single-machine fit does.
    tile_size, halo_hops
        Tile side (coordinate units; ``None``: about ``DEFAULT_TILE_SPOTS`` spots) and halo
        width in graph hops (``None``: :func:`default_halo_hops`; 0 when
        ``lambda_spatial = 0``, where spots are independent).
    to_types
        ``n_states × n_types`` 0/1 map of states to types (``None``: states are types); used for
        ``halo_check``.

    Returns
    -------
    x, objective, n_sweeps, converged, w, tiles
        ``n_spots × n_states`` solution (core rows stitched), the global objective after each
        round, the most sweeps any tile ran (summed over rounds), whether every tile converged,
        the graph used last, and one row per tile (see :func:`tile_labels`, plus
        ``halo_hops``, ``n_halo``, ``halo_check``, ``n_sweeps``, ``converged``, ``seconds``,
        ``worker`` of the last round). ``halo_check`` is the largest difference of cell-type
        proportions between the tile's solution on its first halo ring and the neighbouring
        tiles' cores there: the tiling error is largest next to the halo's edge and decays
        inwards, so this overestimates the error in the core (plus the solvers' stopping error).
    """
    t0 = time.perf_counter()
    n, n_states = problem.b.shape
    smooth = lambda_spatial > 0 and w is not None and w.nnz > 0
    hops = 0
    if smooth:
        hops = default_halo_hops(lambda_spatial) if halo_hops is None else int(halo_hops)
    labels, table = tile_labels(coords, sections, tile_size)
    adjacency = sparse.csr_matrix(w) if smooth else None
    if smooth and len(table) > 1:
        _check_tile_size(table, w, coords, hops)
    order = np.argsort(labels, kind="stable")
    cores = np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)
    members = [halo_rows(adjacency, c, hops) if smooth else (c, np.zeros(len(c), int))
               for c in cores]
    table["n_halo"] = [len(rows) - len(c) for (rows, _), c in zip(members, cores, strict=True)]
    table["halo_hops"] = hops
    logger.info(
        "tiles: %d (tile side %s coordinate units), halo %d hops: %.0f%% extra spots",
        len(table), ", ".join(f"{v:g}" for v in np.unique(table.tile_size)), hops,
        100.0 * table.n_halo.sum() / n,
    )
    shared = _Shared(
        gram=np.asarray(problem.gram, dtype=np.float64), scale=float(problem.scale),
        metric=metric, lambda_ridge=float(lambda_ridge), lambda_spatial=float(lambda_spatial),
        tol=float(tol), device=device, seed=seed,
    )
    every = attention_update[0] if attention_update and smooth else n_iter
    x = np.zeros((n, n_states))
    # each tile restarts from its own last iterate (core and halo): its halo must not jump to
    # the neighbours' core values, which solve a different (wider) problem
    x_tiles: list[np.ndarray | None] = [None] * len(cores)
    rings: list[np.ndarray] = [np.empty((0, n_states))] * len(cores)
    history, done, converged = [], 0, False
    stats = {}
    while done < n_iter and not converged:
        budget = min(every, n_iter - done)
        w_now = adjacency

        def make(i, budget=budget, w_now=w_now):
            rows = members[i][0]
            return _Tile(
                index=i, n_core=len(cores[i]), b=problem.b[rows],
                w=None if not smooth else w_now[rows][:, rows].tocsr(),
                x0=x_tiles[i], n_iter=budget,
            )

        x_new = x.copy()
        for res in _run_tiles(client, [lambda i=i: make(i) for i in range(len(cores))],
                              shared, progress):
            i = res["index"]
            rings[i] = res["x"][members[i][1] == 1]
            if every < n_iter:  # more rounds may follow
                x_tiles[i] = res["x"]
            x_new[cores[i]] = res["x"][: len(cores[i])]
            stats[i] = res
        x = x_new
        round_sweeps = max(r["n_sweeps"] for r in stats.values())
        done += round_sweeps
        converged = all(r["converged"] for r in stats.values())
        history.append(_objective(x, problem, w_now, lambda_ridge,
                                  lambda_spatial if smooth else 0.0, metric))
        if not converged and smooth and attention_update and done < n_iter:
            logger.info("round done after %d sweeps; re-estimating attention", done)
            w = attention_update[1](_normalise_rows(x))
            adjacency = sparse.csr_matrix(w)
    table["halo_check"] = [
        _max_fraction_difference(rings[i], x[members[i][0][members[i][1] == 1]], to_types)
        if hops or not smooth else np.nan
        for i in range(len(table))
    ]
    for key in ("n_sweeps", "converged", "seconds", "worker"):
        table[key] = [stats[i][key] for i in range(len(table))]
    if smooth and hops == 0 and len(table) > 1:
        logger.warning("halo_hops=0 cuts the spot graph at tile borders: proportions there "
                       "differ from the single-machine fit")
    worst = float(table.halo_check.max())
    (logger.warning if worst > HALO_WARN else logger.info)(  # NaN (no halo) compares False
        "halo check: tiles' halos differ from their neighbours' cores by up to %.1e in "
        "proportions%s", worst,
        f" (above {HALO_WARN:g}: pass a larger halo_hops)" if worst > HALO_WARN else "",
    )
    logger.info("tiles fitted in %.1f s", time.perf_counter() - t0)
    return x, np.asarray(history), done, converged, w, table


def _max_fraction_difference(a: np.ndarray, b: np.ndarray, to_types) -> float:
    """Largest difference of cell-type proportions between two ``n × n_states`` solutions."""
    if len(a) == 0:
        return 0.0
    if to_types is not None:
        a, b = np.asarray(a @ to_types), np.asarray(b @ to_types)
    return float(np.abs(_normalise_rows(a) - _normalise_rows(b)).max())


def _objective(x, problem: Problem, w, lambda_ridge, lambda_spatial, metric) -> float:
    """Return the global objective of the stitched solution (relative penalties)."""
    deg = None if w is None else np.asarray(w.sum(axis=1)).ravel()
    return float(objective(x, problem.b, problem.gram, problem.yy, w, deg,
                           lambda_ridge * problem.scale, lambda_spatial * problem.scale,
                           NumpyOps(), metric))


def _check_tile_size(table: pd.DataFrame, w: sparse.csr_matrix, coords: np.ndarray, hops: int):
    """Refuse tiles narrower than their halo (each task would solve mostly halo)."""
    coo = sparse.triu(w, k=1).tocoo()
    if coo.nnz == 0 or hops == 0:
        return
    step = float(np.median(np.linalg.norm(coords[coo.row] - coords[coo.col], axis=1)))
    width = hops * step
    small = table.tile_size.min()
    if small < width:
        raise InputError(
            f"tile_size={small:g} is smaller than the halo ({hops} hops × {step:g} median edge "
            f"length = {width:g} coordinate units): every task would solve mostly halo. Pass a "
            f"tile_size of at least {width:g} (several times that is efficient), or fewer "
            "halo_hops."
        )
