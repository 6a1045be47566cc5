"""Cell-level deconvolution: the AnnData adapter around :mod:`spotlens.deconv._cells`.

Its products (cells placed in spots, expression per type) are in :mod:`._cell_products`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from tqdm.auto import tqdm

from .._backend import resolve_client
from .._version import __version__
from .._keys import cell_counts_key, cell_weights_key, proportions_key
from .._validation import (
    InputError,
    check_cells_per_spot,
    check_cells_per_spot_mode,
    check_labels,
)
from ..pp import cell_states, log_pca, signature_kernel
from ._config import CellLevelConfig
from ._cell_checks import read_spot_counts, type_level
from ._capture import cells_per_spot_from
from ._cell_search import embed, fit_score_space, similarity_bandwidth
from ._cells import at_least_one_cell, cell_weights
from ._model import poisson_gene_weights

logger = logging.getLogger("spotlens")

CELL_WEIGHTS_KEY = cell_weights_key()


@dataclass
class CellLevelResult:
    """What :func:`cell_level` computes (returned with ``inplace=False``).

    Attributes
    ----------
    weights
        ``n_spots × n_columns`` sparse weights: expected copies of each reference cell (or
        metacell) in each spot.
    cell_counts
        ``n_spots × n_types`` estimated number of cells of each type (integers).
    uns
        Parameters, the column names of ``weights`` and, with metacells, the metacell of each
        reference cell.
    """

    weights: sparse.csr_matrix
    cell_counts: pd.DataFrame
    uns: dict = field(default_factory=dict)


def _largest_remainder(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Round each row of ``values`` to integers that add up to ``totals`` (largest remainder)."""
    values = np.maximum(np.nan_to_num(values), 0.0)
    row_sum = values.sum(axis=1, keepdims=True)
    scaled = np.divide(values * totals[:, None], row_sum, out=np.zeros_like(values),
                       where=row_sum > 0)
    floor = np.floor(scaled)
    # a row with nothing to share out stays at zero, whatever its total
    missing = np.where(row_sum[:, 0] > 0, totals - floor.sum(axis=1), 0).astype(int)
    order = np.argsort(-(scaled - floor), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(values.shape[1])[None, :], axis=1)
    return (floor + (rank < missing[:, None])).astype(np.int64)


def cell_level(
    spatial: AnnData,
    reference: AnnData,
    *,
    labels_key: str = "cell_type",
    layer: str | None = None,
    reference_layer: str | None = None,
    key: str = proportions_key(),
    cells_per_spot: str | float | None = None,
    n_candidates: int = 10,
    lambda_type: float = 0.03,
    lambda_similar: float = 0.0,
    lambda_ridge: float = 1e-3,
    max_cells: int = 200_000,
    n_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    key_added: str = CELL_WEIGHTS_KEY,
    inplace: bool = True,
    progress: bool = True,
    client=None,
) -> CellLevelResult | None:
    """Distribute each spot's cell types over individual reference cells.

    Step 2 of spotlens, after :func:`deconvolve`. For each spot, non-negative weights over
    reference cells — the expected number of copies of each cell in the spot (a cell that is
    really there has weight 1) — are fitted by Gauss–Seidel coordinate updates to minimise the
    error of rebuilding the spot's counts from the cells' counts, plus a ridge term, a term tying
    the weights of each type's cells to the type-level abundance of that type, and a term that
    keeps transcriptionally similar cells (Gaussian kernel in the score space below) at similar
    weights (off by default: ``lambda_similar=0``). Only the ``n_candidates`` best-matching
    cells of each type present in a spot are considered: spots and cells are compared by the
    cosine of their log-normalised expression, each gene standardised over the reference cells
    and projected on the reference's 64 leading principal axes (when more genes are used), an
    exhaustive search, so memory is O(n_spots · n_candidates), never a dense spots × cells
    matrix. Spots are processed in blocks, each spot's search and solve on its own (compiled,
    on all cores), so the result does not depend on the blocks. References larger than
    ``max_cells`` are first summarised into metacells (k-means per type on a PCA of the
    reference, documented in ``uns[key_added]["metacell"]``).

    Spots smaller than a cell: without ``cells_per_spot``, the number of cells in a spot is
    estimated from its library size relative to the reference cells', and a bead or bin
    smaller than a cell (Slide-seq, Visium HD, Stereo-seq) is often estimated at well under one
    cell. Every spot with counts over the genes used is given **at least one cell**: a spot
    estimated below one cell is fitted as holding one cell of its type-level composition and
    gets the one cell of its most likely type (the placed cell is its best-matching reference
    cell of that type); other spots keep their estimated number of cells, rounded. Spots
    without counts get none. The number of spots raised to one cell is logged and stored in
    ``uns[key_added]["params"]["n_spots_raised_to_one_cell"]``. Pass ``cells_per_spot`` to
    use known numbers instead (then a spot given 0 cells gets none). For bins much smaller
    than a cell (Visium HD 2 µm), whole cells belong to groups of bins: sum them first with
    :func:`spotlens.pp.aggregate_bins`, into squares of 16 µm or more or into the cells of a
    segmentation (``by=``; then each row is one cell: pass an ``obs`` column of ones as
    ``cells_per_spot``, not the number 1, which is a mean), and run the cell level on those;
    the type-level proportions of the small bins themselves stay fractional.

    Parameters
    ----------
    spatial
        ``n_spots × n_genes`` AnnData holding the type-level result of :func:`deconvolve` under
        ``key`` (raw counts in ``X`` or ``layers[layer]``). May be backed
        (``anndata.read_h5ad(path, backed="r")``): the counts are read in chunks of rows and
        only the genes used are kept in memory; the file is never written to.
    reference
        The ``n_cells × n_genes`` reference that :func:`deconvolve` used; may be backed too.
    labels_key
        Reference ``obs`` column with cell types.
    layer, reference_layer
        Layers with raw counts (``None`` = ``X``).
    key
        ``key_added`` of the type-level result.
    cells_per_spot
        How many cells each spot holds (the type-level proportions are scaled to it):

        - ``None``: the type-level abundance, i.e. library sizes over the reference cells'
          (at least one cell in every spot with counts, above). Right only when the spatial
          assay captures a cell's RNA as the reference does (pseudo-spots of the reference's
          own cells, imaging panels); Visium against single-cell RNA-seq captures far less,
          and this counts far too few cells.
        - ``"estimate"``: the **capture ratio** (spatial counts of a cell over its reference
          counts) estimated from the counts, by how far spots scatter around the type-level
          fit: cells vary, so a spot of many cells lies closer to its type means than a spot of
          few (:mod:`spotlens.deconv._capture`). Cells per spot = abundance / ratio, at least
          one in every spot with counts. It assumes the cells of a spot are independent draws
          of their types: where neighbouring cells are more alike than that (layers, zones)
          it counts too few; finer labels in the reference help.
        - a number: the mean number of cells per spot (a prior, as cell2location's
          ``N_cells_per_location``); each spot gets cells in proportion to its abundance.
        - another string: an ``obs`` column with a known number of cells per spot (e.g. a
          nucleus count from the image).

        The ratio used is written to ``uns[key_added]["params"]["capture_ratio"]`` (1 for
        ``None``, NaN for a column).
    n_candidates
        Candidate cells per type present in a spot.
    lambda_type, lambda_similar, lambda_ridge
        Weights of the tie to the type level, of the similarity term and of the ridge, relative
        to the spot's mean squared candidate norm (unit-free). A large ``lambda_type`` makes the
        weights of each type add up to the type-level abundance. ``lambda_type`` is the tie's
        weight for a spot with one reference cell's counts (the reference's median library
        over the genes used); a spot with ``l`` times as many counts gets ``lambda_type / l``,
        since its counts say ``l`` times more (Poisson), so beads and bins smaller than a cell
        follow the type level closely and spots of many cells follow their own counts. A
        smaller ``lambda_type`` finds more of a spot's own cells, a larger one keeps the cells
        counted per type closer to the type level; the default was chosen on simulations for
        the first (``benchmarks/studies/results/cell_level_defaults.md``). After
        the first solve, the best cells for what it left unexplained are searched and the spot
        is solved again (at most ``n_candidates`` per type).
    max_cells
        Larger references are summarised into about this many metacells.
    n_iter, tol
        Maximum passes and the stopping change (in cells).
    seed
        Seed for the PCA and the metacells.
    key_added
        ``obsm`` key of the weights.
    inplace
        Write into ``spatial`` and return ``None``; else return a :class:`CellLevelResult`.
    progress
        Show a progress bar.
    client
        A ``distributed.Client`` (or ``"default"``, the current one): each block of 8,192
        spots is solved as a task on that cluster, the reference side sent to every worker
        once; the weights equal this machine's (every step is per spot). None: this machine.

    Returns
    -------
    ``None`` with ``inplace=True``, which writes

    - ``spatial.obsm[key_added]``: sparse CSR ``n_spots × n_columns`` weights (columns: the
      reference cells, or metacells, named in ``uns[key_added]["columns"]``),
    - ``spatial.obsm["cell_counts_spotlens"]``: DataFrame ``n_spots × n_types`` of estimated
      cells per type (integers; the abundance, distinct from proportions),
    - ``spatial.uns[key_added]``: ``params``, ``columns``, ``metacell`` (metacell code of each
      reference cell, or -1 when cells are used directly);

    else a :class:`CellLevelResult`.

    Raises
    ------
    InputError
        Type-level result missing, or from another reference (other cell types or genes);
        ``client`` not a Dask client (or ``"default"`` with none running);
        ``cells_per_spot`` not None, ``"estimate"``, a number > 0 or an obs column; its column
        missing, not numeric, negative or NaN, or 0 in every spot; ``"estimate"`` on counts
        that vary no more than counting noise; no cell
        could be placed in any spot; counts not raw; bad parameters.

    References
    ----------
    Zhou et al., "Spatial transcriptomics deconvolution at single-cell resolution using
    Redeconve", Nat Commun 14, 7930 (2023), doi:10.1038/s41467-023-43600-9 (cell-level
    weights); Vahid et al., "High-resolution alignment of
    single-cell and spatial transcriptomes with CytoSPACE", Nat Biotechnol 41, 1543–1548 (2023)
    (cells assigned to spots).

    Examples
    --------
    >>> import spotlens
    >>> st, ref = spotlens.datasets.osmfish_cortex()
    >>> spotlens.deconv.deconvolve(st, ref, progress=False)
    >>> spotlens.deconv.cell_level(st, ref, progress=False)
    >>> st.obsm["cell_weights_spotlens"].shape
    (1036, 4839)
    """
    t0 = time.perf_counter()
    CellLevelConfig(n_candidates=n_candidates, lambda_type=lambda_type,  # checks them all
                    lambda_similar=lambda_similar, lambda_ridge=lambda_ridge,
                    max_cells=max_cells, n_iter=n_iter, tol=tol, seed=seed)
    known = check_cells_per_spot_mode(cells_per_spot) == "column"
    client = None if client is None else resolve_client(client)
    props, ab, uns = type_level(spatial, key)
    types = pd.Index(uns.get("cell_types", props.columns)).astype(str)
    labels = check_labels(reference, labels_key, min_cells_per_type=1)
    ref_types = set(labels.unique())
    if set(types) != ref_types:
        raise InputError(
            f"The type-level result under {key!r} has cell types {sorted(types)[:5]}…, but this "
            f"reference's obs[{labels_key!r}] has {sorted(ref_types)[:5]}…: it comes from another "
            "reference. Run deconvolve with this reference first."
        )
    genes = pd.Index(uns["genes"]).astype(str)
    missing = genes.difference(reference.var_names).union(genes.difference(spatial.var_names))
    if len(missing):
        raise InputError(
            f"{len(missing)} genes of the type-level fit (e.g. {list(missing[:3])}) are missing "
            "from the reference or the spatial data: the result comes from other data."
        )
    # in memory or backed: read in chunks, all genes validated, only the genes used kept
    counts = read_spot_counts(spatial, layer, spatial.var_names.get_indexer(genes),
                              what="spatial data")
    profiles_all = read_spot_counts(reference, reference_layer,
                                    reference.var_names.get_indexer(genes), what="reference")
    codes = types.get_indexer(labels)

    proportions = np.nan_to_num(props[types].to_numpy(dtype=np.float64))
    has_counts = np.asarray(counts.sum(axis=1)).ravel() > 0
    raised = np.zeros(spatial.n_obs, dtype=bool)
    capture = {"capture_ratio": 1.0, "capture_ratio_from": "library size"}
    if known:
        totals = check_cells_per_spot(spatial, cells_per_spot)
        abundance = proportions * totals[:, None]
        capture = {"capture_ratio": np.nan, "capture_ratio_from": f"obs[{cells_per_spot!r}]"}
    else:
        estimated = ab[types].to_numpy(dtype=np.float64)
        if cells_per_spot is not None:
            n_cells, capture = cells_per_spot_from(cells_per_spot, counts, proportions,
                                                   profiles_all, codes)
            estimated = proportions * n_cells[:, None]
            logger.info("capture ratio %.3g (%s): %.2f cells per spot with counts on average",
                        capture["capture_ratio"], capture["capture_ratio_from"],
                        float(n_cells[has_counts].mean()) if has_counts.any() else 0.0)
        abundance, raised = at_least_one_cell(np.maximum(np.nan_to_num(estimated), 0.0),
                                              proportions, has_counts)
        _log_raised(raised, has_counts, estimated)

    logger.info("cell level 1/3: reference %d cells, %d genes", reference.n_obs, len(genes))
    metacell = np.full(reference.n_obs, -1, dtype=np.int64)
    if reference.n_obs > max_cells:
        embedding = log_pca(profiles_all, 20, seed=seed)
        per = int(np.ceil(reference.n_obs / max_cells))
        metacell, owner = cell_states(
            embedding, codes, len(types), cells_per_state=per,
            max_states_per_type=reference.n_obs, seed=seed,
        )
        mean, _, lib, _ = signature_kernel(profiles_all, metacell, len(owner))
        profiles = sparse.csr_matrix(mean * lib[:, None])
        col_type = owner
        rank = np.concatenate([np.arange((owner == k).sum()) for k in range(len(types))])
        columns = np.asarray([f"{types[k]}#{r}" for k, r in zip(owner, rank, strict=True)])
        logger.info("summarised %d cells into %d metacells", reference.n_obs, len(owner))
    else:
        profiles = sparse.csr_matrix(profiles_all, dtype=np.float64)
        col_type, columns = codes, np.asarray(reference.obs_names)

    if not known and cells_per_spot is not None:
        # a cell in a spot yields the capture ratio times its reference counts: a weight of 1
        # then means one whole cell
        profiles = sparse.csr_matrix(profiles * capture["capture_ratio"])
    # type means of the columns (a type without columns has a zero mean)
    onehot = sparse.csr_matrix((np.ones(len(col_type)), (col_type, np.arange(len(col_type)))),
                               shape=(len(types), len(col_type)))
    size = np.asarray(onehot.sum(axis=1)).ravel()
    signature = np.asarray((onehot @ profiles).todense()) / np.maximum(size, 1)[:, None]
    weights = poisson_gene_weights(signature, "poisson")
    space = fit_score_space(profiles, seed=seed)
    cell_emb = embed(profiles, space)
    bandwidth = similarity_bandwidth(cell_emb, col_type, seed=seed)

    logger.info("cell level 2/3: weights for %d spots (%d candidates per type)",
                spatial.n_obs, n_candidates)
    bar = tqdm(total=spatial.n_obs, desc="spotlens cell level", disable=not progress,
               leave=False)
    try:
        w = cell_weights(
            counts, weights, profiles, col_type, space, cell_emb, abundance,
            n_candidates=n_candidates, lambda_ridge=lambda_ridge, lambda_type=lambda_type,
            lambda_similar=lambda_similar, bandwidth=bandwidth, n_iter=n_iter, tol=tol,
            on_block=bar.update, client=client,
        )
    finally:
        bar.close()

    logger.info("cell level 3/3: cells per type")
    to_types = sparse.csr_matrix(
        (np.ones(len(col_type)), (np.arange(len(col_type)), col_type)),
        shape=(len(col_type), len(types)),
    )
    per_type = np.asarray((w @ to_types).todense())
    # spots without cell weights (no counts, or no candidates) share their cells by the
    # type-level proportions, when there are any
    empty = per_type.sum(axis=1) <= 0
    per_type[empty] = proportions[empty]
    if not known:
        # every spot with counts holds at least one cell; a spot without counts, none. The
        # number is the estimated abundance, rounded, not the sum of the weights: the weights
        # favour the cells that match the spot best, not cells of average size, so their sum
        # counts cells only when the spot's own cells are in the reference
        count = abundance.sum(axis=1)
        totals = np.where(has_counts, np.maximum(np.round(count), 1), 0)
    else:
        unknown = empty & (per_type.sum(axis=1) <= 0) & (totals > 0)
        if unknown.any():
            logger.warning(
                "%d spots have a cell count in obs[%r] but no estimate of their cell types (no "
                "counts and no smoothing): they get 0 cells", unknown.sum(), cells_per_spot,
            )
    cell_counts = pd.DataFrame(
        _largest_remainder(per_type, totals), index=spatial.obs_names, columns=types
    )
    if not cell_counts.to_numpy().any():
        raise InputError(
            "No cell could be placed in any spot: "
            + (f"no spot with a cell count in obs[{cells_per_spot!r}] has an estimate of its "
               "cell types" if known else
               f"no spot has both counts over the {len(genes)} genes of the type-level fit and "
               "a type-level estimate")
            + ". Pass cells_per_spot= (--cells-per-spot on the command line) naming an obs "
            "column with the number of cells in each spot, and check that the spots have counts."
        )
    out_uns = {
        "params": {
            "method": "spotlens cell-level Gauss-Seidel", "version": __version__, "key": key,
            "labels_key": labels_key, "layer": layer, "reference_layer": reference_layer,
            "cells_per_spot": cells_per_spot, "n_candidates": n_candidates,
            "lambda_type": lambda_type, "lambda_similar": lambda_similar,
            "lambda_ridge": lambda_ridge, "max_cells": max_cells, "n_iter": n_iter, "tol": tol,
            "seed": seed, "metacells": bool((metacell >= 0).any()),
            "n_spots_raised_to_one_cell": int(raised.sum()),
            "score_space_dims": space.dim,
            **capture,
            "seconds": round(time.perf_counter() - t0, 3),
        },
        "columns": columns.astype(object),
        "metacell": metacell,
    }
    result = CellLevelResult(weights=w, cell_counts=cell_counts, uns=out_uns)
    logger.info("cell level done in %.1f s", time.perf_counter() - t0)
    if not inplace:
        return result
    spatial.obsm[key_added] = w
    spatial.obsm[cell_counts_key(key_added)] = cell_counts
    spatial.uns[key_added] = out_uns
    return None


def _log_raised(raised: np.ndarray, has_counts: np.ndarray, abundance: np.ndarray) -> None:
    """Say how many spots with counts were estimated below one cell and raised to one."""
    if not raised.any():
        return
    n, n_counts = int(raised.sum()), int(has_counts.sum())
    median = float(np.median(np.nan_to_num(abundance[raised]).sum(axis=1)))
    # routine for a few spots of a Visium slide; for most spots (beads, bins) worth a warning
    log = logger.warning if n > n_counts / 2 else logger.info
    log("%d of %d spots with counts are estimated below one cell (median %.2f cells; beads or "
        "bins smaller than a cell): each is given one cell, of its most likely type. Pass "
        "cells_per_spot= (--cells-per-spot) with known numbers of cells to set them, or sum "
        "the bins into whole cells first with spotlens.pp.aggregate_bins.",
        n, n_counts, median)
