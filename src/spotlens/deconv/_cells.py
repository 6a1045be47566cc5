"""Cell-level step: distribute each spot's cell-type abundance over individual reference cells.

Pure kernels: arrays in, arrays out. For spot ``i`` with raw counts ``y_i`` (library ``l_i``)
and candidate reference cells ``c`` with raw counts ``p_c``, the weights ``β_ic ≥ 0`` (expected
copies of cell ``c`` in spot ``i``; a true member cell has 1) minimise::

    || (y_i − Σ_c β_ic p_c) ∘ w / l_i ||²
      + s_i λ_ridge Σ_c β_ic²
      + s_i λ_type Σ_k (Σ_{c ∈ k} β_ic − A_ik)²
      + s_i λ_similar Σ_{c, c' same type} K_cc' (β_ic − β_ic')² / 2

with ``w`` the gene weights, ``A_ik`` the type-level abundance (cells of type ``k``), ``K`` a
Gaussian kernel on the reference cells' PCA embedding, and ``s_i`` the mean squared norm of the
spot's candidate profiles (so the penalties are unit-free). Only a few candidate cells per spot
and type are considered, so no dense ``n_spots × n_cells`` matrix is ever held.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import sparse


def candidate_cells(
    counts: sparse.csr_matrix,
    weights: np.ndarray,
    profiles: np.ndarray,
    cell_type: np.ndarray,
    signature: np.ndarray,
    abundance: np.ndarray,
    *,
    n_candidates: int,
    min_abundance: float,
) -> np.ndarray:
    """Top candidate cells of each present type for a block of spots.

    A cell of type ``k`` is scored by the cosine between its weighted profile and the part of
    the spot's expression left to type ``k``: the spot minus the expected expression of its other
    types (``Σ_{k'≠k} A_ik' S_k'``).

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` raw counts of the block.
    weights
        ``n_genes`` gene weights.
    profiles
        ``n_cells × n_genes`` raw counts of the reference cells (or metacell means).
    cell_type
        ``n_cells`` type codes.
    signature
        ``n_types × n_genes`` expected counts per cell of each type.
    abundance
        ``n_spots × n_types`` cells of each type per spot (type-level result).
    n_candidates
        Cells kept per present type.
    min_abundance
        Types with fewer cells than this in a spot get no candidates there, except the spot's
        most abundant type, which always does (when its abundance is > 0): a spot whose
        abundance is spread thinly over many types still gets candidate cells.

    Returns
    -------
    ``n_spots × M`` candidate cell indices, ``-1`` for padding; the candidates of one type are
    contiguous.
    """
    n, _ = counts.shape
    n_types = signature.shape[0]
    y = counts.toarray() * weights[None, :]
    s_w = signature * weights[None, :]
    expected = abundance @ s_w
    present = (abundance >= min_abundance) | (
        (abundance >= abundance.max(axis=1, keepdims=True, initial=0.0)) & (abundance > 0)
    )
    spot_ids, cell_ids = [], []
    for k in range(n_types):
        rows = np.flatnonzero(present[:, k])
        members = np.flatnonzero(cell_type == k)
        if len(rows) == 0 or len(members) == 0:
            continue
        prof = profiles[members] * weights[None, :]
        norm = np.linalg.norm(prof, axis=1)
        prof = prof / np.where(norm > 0, norm, 1.0)[:, None]
        resid = y[rows] - expected[rows] + abundance[rows, k : k + 1] * s_w[k][None, :]
        scores = resid @ prof.T
        m = min(n_candidates, len(members))
        top = np.argpartition(-scores, m - 1, axis=1)[:, :m] if m < len(members) else (
            np.tile(np.arange(len(members)), (len(rows), 1))
        )
        spot_ids.append(np.repeat(rows, m))
        cell_ids.append(members[top].ravel())
    if not spot_ids:
        return np.full((n, 1), -1, dtype=np.int64)
    spot_ids, cell_ids = np.concatenate(spot_ids), np.concatenate(cell_ids)
    # gather each spot's candidates into one padded row, types kept contiguous (stable sort)
    order = np.argsort(spot_ids, kind="stable")
    spot_ids, cell_ids = spot_ids[order], cell_ids[order]
    starts = np.searchsorted(spot_ids, np.arange(n))
    slot = np.arange(len(spot_ids)) - starts[spot_ids]
    out = np.full((n, int(slot.max()) + 1), -1, dtype=np.int64)
    out[spot_ids, slot] = cell_ids
    return out


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
    lambda_type: float,
    lambda_similar: float,
    n_iter: int,
    tol: float,
) -> np.ndarray:
    """Gauss–Seidel coordinate updates of the cell weights of a block of spots.

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
        ``n_spots × M`` from :func:`candidate_cells`.
    lambda_ridge, lambda_type, lambda_similar
        Penalty weights, relative to ``s_i``.
    n_iter
        Maximum passes over the candidates.
    tol
        Stop when no weight moves by more than ``tol`` (cells) in a pass.

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
    h += (lambda_type * scale)[:, None, None] * same
    lin += (lambda_type * scale)[:, None] * target
    if lambda_similar > 0:
        z = embedding[cand]
        d2 = ((z[:, :, None, :] - z[:, None, :, :]) ** 2).sum(-1)
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
    profiles: np.ndarray,
    cell_type: np.ndarray,
    embedding: np.ndarray,
    signature: np.ndarray,
    abundance: np.ndarray,
    *,
    n_candidates: int = 30,
    min_abundance: float = 0.1,
    lambda_ridge: float = 1e-3,
    lambda_type: float = 1.0,
    lambda_similar: float = 0.1,
    n_iter: int = 100,
    tol: float = 1e-3,
    block: int | None = None,
    on_block: Callable[[int], None] | None = None,
) -> sparse.csr_matrix:
    """Sparse ``n_spots × n_cells`` cell weights for all spots, block by block.

    See :func:`candidate_cells` and :func:`solve_cell_weights`; memory is
    O(block · M · (n_genes + M)) with ``M`` the candidates per spot.

    Returns
    -------
    CSR matrix ``n_spots × n_cells``; row ``i`` holds the expected copies of each reference cell
    in spot ``i``.
    """
    counts = sparse.csr_matrix(counts)
    n, n_genes = counts.shape
    if block is None:
        # about 40 M doubles for the block's M × (G + M) arrays; M is set by the spot with the
        # most types present
        most_types = int((abundance >= min_abundance).sum(axis=1).max(initial=1))
        width = max(1, most_types) * n_candidates
        block = int(np.clip(40_000_000 // (width * (n_genes + width)), 16, 4096))
    rows, cols, vals = [], [], []
    for start in range(0, n, block):
        stop = min(n, start + block)
        sub = counts[start:stop]
        cand = candidate_cells(
            sub, weights, profiles, cell_type, signature, abundance[start:stop],
            n_candidates=n_candidates, min_abundance=min_abundance,
        )
        beta = solve_cell_weights(
            sub, weights, profiles, cell_type, embedding, abundance[start:stop], cand,
            lambda_ridge=lambda_ridge, lambda_type=lambda_type, lambda_similar=lambda_similar,
            n_iter=n_iter, tol=tol,
        )
        keep = (cand >= 0) & (beta > 0)
        r, j = np.nonzero(keep)
        rows.append(r + start)
        cols.append(cand[r, j])
        vals.append(beta[r, j])
        if on_block is not None:
            on_block(stop - start)
    out = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, profiles.shape[0]),
    )
    out.sum_duplicates()
    return out
