"""Cell-level deconvolution: AnnData adapters around :mod:`spotlens.deconv._cells`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from tqdm.auto import tqdm

from .._version import __version__
from .._keys import (
    SPATIAL_KEY,
    SPOT_DIAMETER_KEY,
    cell_counts_key,
    cell_weights_key,
    proportions_key,
)
from .._validation import InputError, check_cells_per_spot, check_labels, get_matrix
from ..pp import cell_states, log_pca, signature_kernel
from ._config import CellLevelConfig
from ._cell_checks import (
    footprint_diameter,
    read_rows,
    read_spot_counts,
    type_level,
)
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
    cells_per_spot: str | None = None,
    n_candidates: int = 10,
    lambda_type: float = 0.1,
    lambda_similar: float = 0.01,
    lambda_ridge: float = 1e-3,
    max_cells: int = 20_000,
    n_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    key_added: str = CELL_WEIGHTS_KEY,
    inplace: bool = True,
    progress: bool = True,
) -> CellLevelResult | None:
    """Distribute each spot's cell types over individual reference cells.

    Step 2 of spotlens, after :func:`deconvolve`. For each spot, non-negative weights over
    reference cells — the expected number of copies of each cell in the spot (a cell that is
    really there has weight 1) — are fitted by Gauss–Seidel coordinate updates to minimise the
    error of rebuilding the spot's counts from the cells' counts, plus a ridge term, a term tying
    the weights of each type's cells to the type-level abundance of that type, and a term that
    keeps transcriptionally similar cells (Gaussian kernel on a PCA of the reference) at similar
    weights. Only the ``n_candidates`` best-matching cells of each type present in a spot are
    considered (scored against the spot's expression minus its other types), so memory is
    O(n_spots · n_candidates), never a dense spots × cells matrix. References larger than
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
    use known numbers instead (then a spot given 0 cells gets none).

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
        ``obs`` column with a known number of cells (e.g. a nucleus count from the image) per
        spot. The type-level proportions are then scaled to it; else the type-level abundance
        (from library sizes) is used, at least one cell in every spot with counts (above).
    n_candidates
        Candidate cells per type present in a spot.
    lambda_type, lambda_similar, lambda_ridge
        Weights of the tie to the type level, of the similarity term and of the ridge, relative
        to the spot's mean squared candidate norm (unit-free). A large ``lambda_type`` makes the
        weights of each type add up to the type-level abundance.
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
        ``cells_per_spot`` missing, not numeric, negative or NaN, or 0 in every spot; no cell
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
    if cells_per_spot is not None:
        totals = check_cells_per_spot(spatial, cells_per_spot)
        abundance = proportions * totals[:, None]
    else:
        abundance, raised = at_least_one_cell(
            np.maximum(np.nan_to_num(ab[types].to_numpy(dtype=np.float64)), 0.0),
            proportions, has_counts,
        )
        _log_raised(raised, has_counts, ab[types].to_numpy(dtype=np.float64))

    logger.info("cell level 1/3: reference %d cells, %d genes", reference.n_obs, len(genes))
    embedding = log_pca(profiles_all, 20, seed=seed)
    metacell = np.full(reference.n_obs, -1, dtype=np.int64)
    if reference.n_obs > max_cells:
        per = int(np.ceil(reference.n_obs / max_cells))
        metacell, owner = cell_states(
            embedding, codes, len(types), cells_per_state=per,
            max_states_per_type=reference.n_obs, seed=seed,
        )
        mean, _, lib, n_members = signature_kernel(profiles_all, metacell, len(owner))
        profiles = mean * lib[:, None]
        col_type = owner
        emb_cols = np.asarray(
            sparse.csr_matrix((np.ones(len(metacell)), (metacell, np.arange(len(metacell)))))
            @ embedding
        ) / np.maximum(n_members, 1)[:, None]
        rank = np.concatenate([np.arange((owner == k).sum()) for k in range(len(types))])
        columns = np.asarray([f"{types[k]}#{r}" for k, r in zip(owner, rank, strict=True)])
        logger.info("summarised %d cells into %d metacells", reference.n_obs, len(owner))
    else:
        profiles = profiles_all.toarray().astype(np.float64)
        col_type, emb_cols, columns = codes, embedding, np.asarray(reference.obs_names)

    signature = np.vstack([
        profiles[col_type == k].mean(axis=0) if (col_type == k).any() else np.zeros(len(genes))
        for k in range(len(types))
    ])
    weights = poisson_gene_weights(signature, "poisson")

    logger.info("cell level 2/3: weights for %d spots (%d candidates per type)",
                spatial.n_obs, n_candidates)
    bar = tqdm(total=spatial.n_obs, desc="spotlens cell level", disable=not progress,
               leave=False)
    try:
        w = cell_weights(
            counts, weights, profiles, col_type, emb_cols, signature,
            abundance, n_candidates=n_candidates, lambda_ridge=lambda_ridge,
            lambda_type=lambda_type, lambda_similar=lambda_similar, n_iter=n_iter, tol=tol,
            on_block=bar.update,
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
    if cells_per_spot is None:
        # every spot with counts holds at least one cell; a spot without counts, none
        totals = np.where(has_counts, np.maximum(np.round(per_type.sum(axis=1)), 1), 0)
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
               "cell types" if cells_per_spot is not None else
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
        "cells_per_spot= (--cells-per-spot) with known numbers of cells to set them.",
        n, n_counts, median)


def assign_cells(
    spatial: AnnData,
    reference: AnnData,
    *,
    key: str = CELL_WEIGHTS_KEY,
    spatial_key: str = "spatial",
    reference_layer: str | None = None,
    spot_diameter: float | None = None,
    seed: int = 0,
) -> AnnData:
    """Single-cell map: reference cells placed in the spots, as many as each spot's abundance.

    In every spot, ``cell_counts[i, k]`` cells of type ``k`` are taken: the highest-weighted
    cells of that type (cycling through them if fewer have weight; with metacells, a random
    member of each chosen metacell). Each is placed uniformly at random inside the spot's
    footprint, a disc of ``spot_diameter`` around the spot centre.

    Parameters
    ----------
    spatial
        Spatial AnnData after :func:`cell_level`.
    reference
        The reference used by :func:`cell_level` (may be backed: only the rows or genes
        needed are read, in chunks).
    key
        ``key_added`` of :func:`cell_level`.
    spatial_key
        ``obsm`` key of the spot coordinates.
    reference_layer
        Reference layer copied into the cells' ``X`` (``None`` = ``X``).
    spot_diameter
        Footprint diameter in coordinate units. ``None``: ``spot_diameter_fullres`` from
        ``uns["spatial"][library]["scalefactors"]`` when there is one, else half the median
        distance between neighbouring spots.
    seed
        Seed for the positions (and metacell members).

    Returns
    -------
    ``n_assigned_cells × n_genes`` AnnData: ``X`` the source cells' counts; ``obs``: ``spot``,
    ``cell_type``, ``source_cell``, ``weight``; ``obsm["spatial"]`` positions in the spots'
    coordinate units; ``uns["spot_diameter"]``.

    Raises
    ------
    InputError
        :func:`cell_level` has not been run, or ``reference`` does not match it.
    """
    if key not in spatial.obsm or key not in spatial.uns:
        raise InputError(
            f"No cell-level result under obsm[{key!r}]. Run spotlens.deconv.cell_level first."
        )
    counts_key = cell_counts_key(key)
    w = sparse.csr_matrix(spatial.obsm[key])
    cell_counts = spatial.obsm[counts_key]
    info = spatial.uns[key]
    columns = pd.Index(np.asarray(info["columns"]).astype(str))
    metacell = np.asarray(info["metacell"])
    labels_key = info["params"]["labels_key"]
    if len(metacell) != reference.n_obs or labels_key not in reference.obs:
        raise InputError("This reference is not the one cell_level used (cells differ).")
    use_meta = (metacell >= 0).any()
    if not use_meta and not columns.equals(pd.Index(reference.obs_names)):
        raise InputError("This reference is not the one cell_level used (cell names differ).")
    types = pd.Index(cell_counts.columns)
    labels = reference.obs[labels_key].astype(str)
    rng = np.random.default_rng(seed)
    if use_meta:
        col_type = np.array([types.get_loc(c.rsplit("#", 1)[0]) for c in columns])
    else:
        col_type = types.get_indexer(labels)

    coo = w.tocoo()
    spot, col, weight = coo.row, coo.col, coo.data
    ctype = col_type[col]
    order = np.lexsort((-weight, ctype, spot))
    spot, col, weight, ctype = spot[order], col[order], weight[order], ctype[order]
    group = spot * len(types) + ctype
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, len(group)])
    need = cell_counts.to_numpy()[spot[starts], ctype[starts]].astype(np.int64)
    take = np.repeat(starts, need) + np.concatenate(
        [np.arange(k) % s for k, s in zip(need, sizes, strict=True)]
    ) if need.sum() else np.zeros(0, dtype=np.int64)
    out_spot, out_col, out_w = spot[take], col[take], weight[take]
    # types a spot needs but no candidate carries (rare): random cells of that type
    have = np.zeros(cell_counts.shape, dtype=np.int64)
    np.add.at(have, (out_spot, ctype[take]), 1)
    short = cell_counts.to_numpy() - have
    extra_spot, extra_col = [], []
    for i, k in zip(*np.nonzero(short > 0), strict=True):
        pool = np.flatnonzero(col_type == k)
        extra_spot.append(np.full(short[i, k], i))
        extra_col.append(rng.choice(pool, short[i, k]))
    if extra_spot:
        out_spot = np.concatenate([out_spot, *extra_spot])
        out_col = np.concatenate([out_col, *extra_col])
        out_w = np.concatenate([out_w, np.zeros(sum(len(e) for e in extra_spot))])
    if use_meta:
        members = pd.Series(np.arange(reference.n_obs)).groupby(metacell).apply(np.asarray)
        source = np.array([rng.choice(members[m]) for m in out_col], dtype=np.int64)
    else:
        source = out_col

    coords = np.asarray(spatial.obsm[spatial_key], dtype=np.float64)
    diameter = footprint_diameter(spatial, coords, spot_diameter)
    radius = diameter / 2 * np.sqrt(rng.random(len(source)))
    angle = rng.random(len(source)) * 2 * np.pi
    xy = coords[out_spot] + np.c_[radius * np.cos(angle), radius * np.sin(angle)]

    x = read_rows(get_matrix(reference, reference_layer, what="reference"), rows=source)
    obs = pd.DataFrame(
        {
            "spot": pd.Categorical(np.asarray(spatial.obs_names)[out_spot]),
            "cell_type": pd.Categorical(types[col_type[out_col]]),
            "source_cell": np.asarray(reference.obs_names)[source],
            "weight": out_w,
        },
        index=[f"cell_{i}" for i in range(len(source))],
    )
    cells = AnnData(X=x, obs=obs, var=pd.DataFrame(index=reference.var_names.copy()))
    cells.obsm[SPATIAL_KEY] = xy
    cells.uns[SPOT_DIAMETER_KEY] = float(diameter)
    return cells


def cell_type_expression(
    spatial: AnnData,
    reference: AnnData,
    genes: list[str] | pd.Index,
    *,
    key: str = CELL_WEIGHTS_KEY,
    reference_layer: str | None = None,
) -> pd.DataFrame:
    """Expression of chosen genes in each spot, split by the cell type it comes from.

    ``E[i, (g, k)] = Σ_{c ∈ k} β_ic · counts_c[g]``: the counts of gene ``g`` that the cells of
    type ``k`` placed in spot ``i`` carry (reference count units).

    Parameters
    ----------
    spatial
        Spatial AnnData after :func:`cell_level`.
    reference
        The reference used by :func:`cell_level` (may be backed: only the rows or genes
        needed are read, in chunks).
    genes
        Genes of the reference.
    key
        ``key_added`` of :func:`cell_level`.
    reference_layer
        Reference layer with counts (``None`` = ``X``).

    Returns
    -------
    DataFrame ``n_spots × (n_genes · n_types)`` with columns ``(gene, cell_type)``.

    Raises
    ------
    InputError
        No cell-level result, or genes missing from the reference.
    """
    if key not in spatial.obsm or key not in spatial.uns:
        raise InputError(
            f"No cell-level result under obsm[{key!r}]. Run spotlens.deconv.cell_level first."
        )
    genes = pd.Index(genes).astype(str)
    missing = genes.difference(reference.var_names)
    if len(missing):
        raise InputError(f"Genes not in the reference: {list(missing[:5])}.")
    info = spatial.uns[key]
    w = sparse.csr_matrix(spatial.obsm[key])
    metacell = np.asarray(info["metacell"])
    labels = reference.obs[info["params"]["labels_key"]].astype(str)
    types = pd.Index(spatial.obsm[cell_counts_key(key)].columns)
    x = read_rows(get_matrix(reference, reference_layer, what="reference"),
                  columns=reference.var_names.get_indexer(genes)).astype(np.float64)
    codes = types.get_indexer(labels)
    if (metacell >= 0).any():
        n_meta = w.shape[1]
        member = sparse.csr_matrix(
            (np.ones(len(metacell)), (metacell, np.arange(len(metacell)))),
            shape=(n_meta, len(metacell)),
        )
        size = np.asarray(member.sum(axis=1)).ravel()
        x = sparse.diags(1 / np.maximum(size, 1)) @ member @ x  # metacell mean counts
        col_type = np.asarray(member @ sparse.csr_matrix(
            (np.ones(len(codes)), (np.arange(len(codes)), codes)), shape=(len(codes), len(types))
        ).todense()).argmax(axis=1)
    else:
        col_type = codes
    blocks = {}
    for k, name in enumerate(types):
        cols = np.flatnonzero(col_type == k)
        part = np.asarray((w[:, cols] @ x[cols]).todense())
        for j, g in enumerate(genes):
            blocks[(g, name)] = part[:, j]
    frame = pd.DataFrame(blocks, index=spatial.obs_names)
    order = [(g, name) for g in genes for name in types]  # genes in the order asked for
    frame = frame[order]
    frame.columns = pd.MultiIndex.from_tuples(order, names=["gene", "cell_type"])
    return frame
