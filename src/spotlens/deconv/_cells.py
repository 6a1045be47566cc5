"""Cell-level step: distribute each spot's cell-type abundance over individual reference cells.

Pure kernels: arrays in, arrays out. For spot ``i`` with raw counts ``y_i`` (library ``l_i``)
and candidate reference cells ``c`` with raw counts ``p_c``, the weights ``β_ic ≥ 0`` (expected
copies of cell ``c`` in spot ``i``; a true member cell has 1) minimise::

    || (y_i − Σ_c β_ic p_c) ∘ w / l_i ||²
      + s_i λ_ridge Σ_c β_ic²
      + s_i λ_type Σ_k (Σ_{c ∈ k} β_ic − A_ik)²
      + s_i λ_similar Σ_{c, c' same type} K_cc' (β_ic − β_ic')² / 2

with ``w`` the gene weights, ``A_ik`` the type-level abundance (cells of type ``k``), ``K`` a
Gaussian kernel on the reference cells' embedding, and ``s_i`` the mean squared norm of the
spot's candidate profiles (so the penalties are unit-free). Only a few candidate cells per spot
and type are considered (:mod:`._cell_search`), so no dense ``n_spots × n_cells`` matrix is
ever held. :func:`solve_cell_weights` is the NumPy reference of the solve;
:func:`cell_weights` streams over blocks of spots with the compiled search and solves
(:mod:`._cell_kernels`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import sparse

from ._cell_kernels import solve_spots, unexplained
from ._cell_search import ScoreSpace, embed, present_types, search_cells


def at_least_one_cell(
    abundance: np.ndarray, proportions: np.ndarray, has_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Raise the abundance of spots with counts but fewer than one estimated cell to one cell.

    A bead or bin smaller than a cell (Slide-seq, Visium HD, Stereo-seq) captures part of one
    or two cells, so its abundance estimated from library sizes is often well below 1. A spot
    with counts holds at least one cell: its row is rescaled to sum to 1, keeping its
    composition (``A_i / Σ_k A_ik``; the type-level proportions when ``A_i`` is all 0).

    Parameters
    ----------
    abundance
        ``n_spots × n_types`` estimated cells per type (finite, ≥ 0).
    proportions
        ``n_spots × n_types`` type-level proportions (finite, ≥ 0; rows sum to 1 or are 0).
    has_counts
        ``n_spots`` flag: the spot has counts over the genes used.

    Returns
    -------
    The ``n_spots × n_types`` abundance with those rows rescaled, and the ``n_spots`` flag of
    the rows that were raised. Spots without counts, or with neither abundance nor
    proportions, are left as they are.
    """
    abundance = np.array(abundance, dtype=np.float64)
    total = abundance.sum(axis=1)
    share = proportions.sum(axis=1)
    raised = has_counts & (total < 1) & ((total > 0) | (share > 0))
    from_ab = raised & (total > 0)
    abundance[from_ab] /= total[from_ab, None]
    from_props = raised & ~(total > 0)
    abundance[from_props] = proportions[from_props] / share[from_props, None]
    return abundance, raised


def solve_cell_weights(
    counts: sparse.csr_matrix,
    weights: np.ndarray,
    profiles: np.ndarray,
    cell_type: np.ndarray,
    embedding: np.ndarray,
    abundance: np.ndarray,
    candidates: np.ndarray,
    *,
    lambda_ridge: float,
    lambda_type: float | np.ndarray,
    lambda_similar: float,
    n_iter: int,
    tol: float,
    bandwidth: float | None = None,
) -> np.ndarray:
    """Gauss–Seidel coordinate updates of the cell weights of a block of spots (NumPy).

    Each spot's problem is a non-negative quadratic over its ``M`` candidates with Hessian
    ``H_i`` (``M × M``); all spots of the block are updated together, one candidate slot at a
    time, each update an exact minimisation, so each spot's objective never increases.

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` raw counts of the block.
    weights
        ``n_genes`` gene weights.
    profiles
        ``n_cells × n_genes`` raw counts of the reference cells.
    cell_type
        ``n_cells`` type codes.
    embedding
        ``n_cells × d`` embedding of the reference cells (for the similarity term).
    abundance
        ``n_spots × n_types`` type-level cells per type.
    candidates
        ``n_spots × M`` candidate cell indices, ``-1`` for padding (from
        :func:`spotlens.deconv._cell_search.search_cells`).
    lambda_ridge, lambda_type, lambda_similar
        Penalty weights, relative to ``s_i``; ``lambda_type`` may be one value per spot
        (``n_spots``).
    n_iter
        Maximum passes over the candidates.
    tol
        Stop when no weight of the block moves by more than ``tol`` (cells) in a pass.
    bandwidth
        Bandwidth of the similarity kernel ``K = exp(−d² / bandwidth)``; ``None``: the median
        squared distance of the block's same-type candidate pairs.

    Returns
    -------
    ``n_spots × M`` weights (0 in padding slots).
    """
    n, m = candidates.shape
    valid = candidates >= 0
    cand = np.where(valid, candidates, 0)
    library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    inv = np.divide(1.0, library, out=np.zeros_like(library), where=library > 0)
    y = counts.toarray() * weights[None, :] * inv[:, None]
    c = profiles[cand] * (weights[None, None, :] * inv[:, None, None])  # n × M × G
    c *= valid[:, :, None]
    h = np.einsum("img,ing->imn", c, c)
    lin = np.einsum("img,ig->im", c, y)
    del c
    diag = np.einsum("imm->im", h)
    n_valid = np.maximum(valid.sum(axis=1), 1)
    scale = diag.sum(axis=1) / n_valid
    scale = np.where(scale > 0, scale, 1.0)
    types = np.where(valid, cell_type[cand], -1)
    same = (types[:, :, None] == types[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    target = np.where(valid, np.take_along_axis(abundance, np.maximum(types, 0), axis=1), 0.0)
    tie = np.broadcast_to(np.asarray(lambda_type, dtype=np.float64), (n,)) * scale
    h += tie[:, None, None] * same
    lin += tie[:, None] * target
    if lambda_similar > 0:
        z = embedding[cand]
        d2 = ((z[:, :, None, :] - z[:, None, :, :]) ** 2).sum(-1)
        if bandwidth is None:
            pos = d2[same & ~np.eye(m, dtype=bool)[None]]
            bandwidth = np.median(pos) if pos.size else 1.0
        kernel = np.exp(-d2 / max(bandwidth, 1e-12)) * same
        kernel[:, np.arange(m), np.arange(m)] = 0.0
        laplacian = -kernel
        laplacian[:, np.arange(m), np.arange(m)] = kernel.sum(axis=2)
        h += (lambda_similar * scale)[:, None, None] * laplacian
    ridge = (lambda_ridge * scale)[:, None] * valid
    idx = np.arange(m)
    h[:, idx, idx] += ridge + ~valid  # padding slots: H = 1, lin = 0, weight stays 0
    # start from the tie: each type's abundance spread evenly over its candidates
    per_type = same.sum(axis=2)
    beta = np.where(valid, target / np.maximum(per_type, 1), 0.0)
    grad = np.einsum("imn,in->im", h, beta) - lin
    for _ in range(n_iter):
        moved = 0.0
        for j in range(m):
            new = np.maximum(beta[:, j] - grad[:, j] / h[:, j, j], 0.0)
            delta = new - beta[:, j]
            if not delta.any():
                continue
            beta[:, j] = new
            grad += delta[:, None] * h[:, :, j]
            moved = max(moved, float(np.abs(delta).max()))
        if moved < tol:
            break
    return np.where(valid, beta, 0.0)


def cell_weights(
    counts: sparse.csr_matrix,
    weights: np.ndarray,
    profiles: sparse.csr_matrix,
    cell_type: np.ndarray,
    space: ScoreSpace,
    cell_emb: np.ndarray,
    abundance: np.ndarray,
    *,
    n_candidates: int = 10,
    min_abundance: float = 0.1,
    lambda_ridge: float = 1e-3,
    lambda_type: float = 0.03,
    lambda_similar: float = 0.0,
    bandwidth: float = 1.0,
    n_iter: int = 100,
    tol: float = 1e-3,
    refine: bool = True,
    block: int = 8192,
    on_block: Callable[[int], None] | None = None,
    client=None,
) -> sparse.csr_matrix:
    """Sparse ``n_spots × n_cells`` cell weights for all spots, streamed in blocks of spots.

    Each block is embedded in the score space (:func:`~._cell_search.embed`), searched for the
    ``n_candidates`` best cells of each present type (:func:`~._cell_search.search_cells`) and
    solved spot by spot (:func:`~._cell_kernels.solve_spots`); then searched again for what
    the solve left unexplained and solved again (``refine``). Every step is per spot, so the
    result does not depend on ``block``; memory is O(block · (d + M) + n_cells · d) besides
    the inputs, with ``M`` the candidates per spot.

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` raw counts.
    weights
        ``n_genes`` gene weights.
    profiles
        ``n_cells × n_genes`` sparse counts of the reference cells (or metacells).
    cell_type
        ``n_cells`` type codes.
    space, cell_emb
        The score space and the ``n_cells × d`` cell embeddings in it (also the embedding of
        the similarity term).
    abundance
        ``n_spots × n_types`` cells of each type per spot.
    n_candidates, min_abundance
        Candidates per present type; see :func:`~._cell_search.present_types`.
    lambda_ridge, lambda_type, lambda_similar, bandwidth, n_iter, tol
        See :func:`solve_cell_weights`; ``lambda_type`` is the tie's weight for a spot with
        one reference cell's counts (``space.scale``), and is scaled by ``scale / l_i`` for
        spot ``i`` with ``l_i`` counts.
    refine
        Search again for what the first solve left unexplained (``max(y_i − Σ_c β_ic p_c,
        0)``) and solve again over the cells that kept a weight and the best new ones, still
        at most ``n_candidates`` per type (:func:`_refined`).
    block
        Spots per block.
    on_block
        Called with the number of spots of each finished block.
    client
        A ``distributed.Client``: each block is a task on that cluster (the reference side is
        sent to every worker once); the result equals the single pass. None: this process.

    Returns
    -------
    CSR matrix ``n_spots × n_cells``; row ``i`` holds the expected copies of each reference cell
    in spot ``i``.
    """
    counts = sparse.csr_matrix(counts)
    n = counts.shape[0]
    profiles = sparse.csr_matrix(profiles, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    settings = dict(n_candidates=n_candidates, min_abundance=min_abundance,
                    lambda_ridge=lambda_ridge, lambda_type=lambda_type,
                    lambda_similar=lambda_similar, bandwidth=bandwidth, n_iter=n_iter, tol=tol,
                    refine=refine)
    shared = _Shared(weights, profiles, profiles.data * weights[profiles.indices],
                     np.asarray(cell_type), space, np.asarray(cell_emb),
                     np.ascontiguousarray(cell_emb, dtype=np.float64), settings)
    starts = list(range(0, n, block))
    parts = []
    if client is None:
        for start in starts:
            stop = min(n, start + block)
            parts.append(_block_weights(shared, counts[start:stop], abundance[start:stop]))
            if on_block is not None:
                on_block(stop - start)
    else:
        # one task per block; the reference side goes to every worker once
        remote = client.scatter(shared, broadcast=True)
        futures = [client.submit(_block_weights, remote, counts[s:min(n, s + block)],
                                 abundance[s:min(n, s + block)], pure=False) for s in starts]
        for start, future in zip(starts, futures, strict=True):
            parts.append(future.result())
            if on_block is not None:
                on_block(min(n, start + block) - start)
    rows = [r + start for start, (r, _, _) in zip(starts, parts, strict=True)]
    out = sparse.csr_matrix(
        (np.concatenate([v for *_, v in parts]) if parts else np.zeros(0),
         (np.concatenate(rows) if rows else np.zeros(0, int),
          np.concatenate([c for _, c, _ in parts]) if parts else np.zeros(0, int))),
        shape=(n, shared.profiles.shape[0]),
    )
    out.sum_duplicates()
    return out


@dataclass(frozen=True)
class _Shared:
    """The reference side of the cell weights, the same for every block of spots."""

    weights: np.ndarray
    profiles: sparse.csr_matrix
    weighted: np.ndarray  # profiles.data times the weights of their genes
    cell_type: np.ndarray
    space: ScoreSpace
    cell_emb: np.ndarray  # as given (the search's dtype)
    emb64: np.ndarray  # float64, C-contiguous (the solve's)
    settings: dict


def _block_weights(shared: _Shared, sub: sparse.csr_matrix, abundance: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (within the block), columns and values of one block's non-zero weights."""
    opts = shared.settings
    profiles, space, cell_emb, cell_type = (shared.profiles, shared.space, shared.cell_emb,
                                            shared.cell_type)
    present = present_types(abundance, opts["min_abundance"])
    cand = search_cells(embed(sub, space), cell_emb, cell_type, present,
                        n_candidates=opts["n_candidates"])
    # the tie's weight against the data grows as the spot's counts shrink (the data's
    # Poisson information is proportional to them): λ_type at one reference cell's counts
    lib = np.asarray(sub.sum(axis=1), dtype=np.float64).ravel()
    tie = opts["lambda_type"] * np.where(lib > 0, space.scale / np.where(lib > 0, lib, 1.0), 1.0)
    solve = partial(
        solve_spots, sub, shared.weights, profiles, cell_type, shared.emb64, abundance,
        bandwidth=opts["bandwidth"], lambda_ridge=opts["lambda_ridge"], lambda_type=tie,
        lambda_similar=opts["lambda_similar"], n_iter=opts["n_iter"], tol=opts["tol"],
        weighted=shared.weighted,
    )
    beta = solve(cand)
    if opts["refine"]:
        cand = _refined(sub, profiles, cand, beta, space, cell_emb, cell_type, present,
                        opts["n_candidates"])
        beta = solve(cand)
    keep = (cand >= 0) & (beta > 0)
    r, j = np.nonzero(keep)
    return r, cand[r, j], beta[r, j]


def _refined(counts: sparse.csr_matrix, profiles: sparse.csr_matrix, cand: np.ndarray,
             beta: np.ndarray, space: ScoreSpace, cell_emb: np.ndarray, cell_type: np.ndarray,
             present: np.ndarray, n_candidates: int) -> np.ndarray:
    """Candidates of the second solve: cells with weight, then the best cells for the rest.

    The rest of spot ``i`` is ``max(y_i − Σ_c β_ic p_c, 0)``. For each present type, the
    cells that kept a weight come first, then the type's best-scoring cells for the rest (in
    score order), up to ``n_candidates`` per type. Returns ``n_spots × M`` indices, ``-1``
    padding, each cell once per row, the candidates of one type contiguous.
    """
    n = cand.shape[0]
    keep = (cand >= 0) & (beta > 0)
    r, j = np.nonzero(keep)
    rest_emb = embed(unexplained(counts, profiles, cand, beta), space)
    more = search_cells(rest_emb, cell_emb, cell_type, present, n_candidates=n_candidates)
    r2, j2 = np.nonzero(more >= 0)
    score = np.einsum("id,id->i", rest_emb[r2], cell_emb[more[r2, j2]])
    rows = np.concatenate([r, r2])
    cells = np.concatenate([cand[r, j], more[r2, j2]])
    priority = np.concatenate([np.full(len(r), np.inf), score])  # kept cells first
    types = cell_type[cells]
    order = np.lexsort((-priority, types, rows))
    rows, cells, types = rows[order], cells[order], types[order]
    # each (spot, cell) once: its first (highest-priority) occurrence
    _, first = np.unique(rows.astype(np.int64) * len(cell_type) + cells, return_index=True)
    first.sort()
    rows, cells, types = rows[first], cells[first], types[first]
    group = np.r_[True, (rows[1:] != rows[:-1]) | (types[1:] != types[:-1])]
    starts = np.flatnonzero(group)
    rank = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    ok = rank < n_candidates
    rows, cells = rows[ok], cells[ok]
    slot_start = np.searchsorted(rows, np.arange(n))
    slot = np.arange(len(rows)) - slot_start[rows]
    out = np.full((n, int(slot.max(initial=0)) + 1), -1, dtype=np.int64)
    out[rows, slot] = cells
    return out
