"""Compiled per-spot solves of the cell level (numba when present).

:func:`solve_spots` minimises, for every spot of a block independently, the objective of
:mod:`spotlens.deconv._cells` over its candidate cells — the same problem and the same
Gauss–Seidel updates as the NumPy reference :func:`spotlens.deconv._cells.solve_cell_weights`,
in scalar loops without a Python step per spot, spots split over threads. Each spot's Hessian
is built from the sparse rows of its candidates, so a spot costs
O(M² · nnz + passes · M²) with ``M`` its candidates and ``nnz`` the non-zero genes of a
reference cell, and memory per thread is O(n_genes + M²).
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from ._ops import jit, map_threads, row_ranges


def _solve_rows(start, stop, y_ptr, y_idx, y_val, w, p_ptr, p_idx, p_wval, cell_type, emb,
                abundance, cand, bandwidth, lam_ridge, lam_type, lam_sim, n_iter, tol, beta):
    """Fit the weights of spots ``start:stop`` in place (``beta``: n_spots × M).

    ``p_wval`` holds the reference's non-zero values times their gene weights (``p ∘ w``).
    """
    n_genes = w.shape[0]
    width = cand.shape[1]
    n_types = abundance.shape[1]
    dense = np.zeros(n_genes)
    h = np.empty((width, width))
    lin = np.empty(width)
    grad = np.empty(width)
    b = np.empty(width)
    target = np.empty(width)
    cells = np.empty(width, dtype=np.int64)
    slots = np.empty(width, dtype=np.int64)
    per_type = np.zeros(n_types, dtype=np.int64)
    d = emb.shape[1]
    for i in range(start, stop):
        for j in range(width):
            beta[i, j] = 0.0
        m = 0
        for j in range(width):
            if cand[i, j] >= 0:
                cells[m] = cand[i, j]
                slots[m] = j
                m += 1
        if m == 0:
            continue
        lib = 0.0
        for t in range(y_ptr[i], y_ptr[i + 1]):
            lib += y_val[t]
        inv2 = 1.0 / (lib * lib) if lib > 0 else 0.0
        # linear term: <p_c ∘ w, y ∘ w> / l²
        for t in range(y_ptr[i], y_ptr[i + 1]):
            g = y_idx[t]
            dense[g] = y_val[t] * w[g]
        for a in range(m):
            c = cells[a]
            s = 0.0
            for t in range(p_ptr[c], p_ptr[c + 1]):
                s += p_wval[t] * dense[p_idx[t]]
            lin[a] = s * inv2
        for t in range(y_ptr[i], y_ptr[i + 1]):
            dense[y_idx[t]] = 0.0
        # Gram: <p_a ∘ w, p_b ∘ w> / l², one candidate scattered at a time
        for a in range(m):
            ca = cells[a]
            for t in range(p_ptr[ca], p_ptr[ca + 1]):
                dense[p_idx[t]] = p_wval[t]
            for bb in range(a + 1):
                cb = cells[bb]
                s = 0.0
                for t in range(p_ptr[cb], p_ptr[cb + 1]):
                    s += p_wval[t] * dense[p_idx[t]]
                h[a, bb] = s * inv2
                h[bb, a] = s * inv2
            for t in range(p_ptr[ca], p_ptr[ca + 1]):
                dense[p_idx[t]] = 0.0
        scale = 0.0
        for a in range(m):
            scale += h[a, a]
        scale /= m
        if not scale > 0:
            scale = 1.0
        for k in range(n_types):
            per_type[k] = 0
        for a in range(m):
            per_type[cell_type[cells[a]]] += 1
        tie = lam_type[i] * scale
        sim = lam_sim * scale
        for a in range(m):
            ka = cell_type[cells[a]]
            target[a] = abundance[i, ka]
            lin[a] += tie * target[a]
            h[a, a] += lam_ridge * scale
            for bb in range(m):
                if cell_type[cells[bb]] == ka:
                    h[a, bb] += tie
                    if sim > 0 and bb != a:
                        d2 = 0.0
                        for q in range(d):
                            diff = emb[cells[a], q] - emb[cells[bb], q]
                            d2 += diff * diff
                        kern = sim * np.exp(-d2 / bandwidth)
                        h[a, bb] -= kern
                        h[a, a] += kern
        # start from the tie: each type's abundance spread evenly over its candidates
        for a in range(m):
            b[a] = target[a] / per_type[cell_type[cells[a]]]
        for a in range(m):
            s = -lin[a]
            for bb in range(m):
                s += h[a, bb] * b[bb]
            grad[a] = s
        for _ in range(n_iter):
            moved = 0.0
            for j in range(m):
                if not h[j, j] > 0:
                    continue
                new = b[j] - grad[j] / h[j, j]
                if new < 0.0:
                    new = 0.0
                delta = new - b[j]
                if delta == 0.0:
                    continue
                b[j] = new
                for a in range(m):
                    grad[a] += delta * h[a, j]
                if abs(delta) > moved:
                    moved = abs(delta)
            if moved < tol:
                break
        for a in range(m):
            beta[i, slots[a]] = b[a]


_solve_rows = jit(_solve_rows)


def _rest_rows(start, stop, y_ptr, y_idx, y_val, p_ptr, p_idx, p_val, cand, beta, out):
    """``out[i] = max(y_i − Σ_j β_ij p_{cand_ij}, 0)`` for rows ``start:stop`` (dense)."""
    for i in range(start, stop):
        for g in range(out.shape[1]):
            out[i, g] = 0.0
        for t in range(y_ptr[i], y_ptr[i + 1]):
            out[i, y_idx[t]] = y_val[t]
        for j in range(cand.shape[1]):
            c = cand[i, j]
            if c < 0 or beta[i, j] == 0.0:
                continue
            for t in range(p_ptr[c], p_ptr[c + 1]):
                out[i, p_idx[t]] -= beta[i, j] * p_val[t]
        for g in range(out.shape[1]):
            if out[i, g] < 0.0:
                out[i, g] = 0.0


_rest_rows = jit(_rest_rows)


def unexplained(counts: sparse.csr_matrix, profiles: sparse.csr_matrix, candidates: np.ndarray,
                beta: np.ndarray) -> np.ndarray:
    """Dense ``n_spots × n_genes`` ``max(y_i − Σ_j β_ij p_{c_ij}, 0)``: what the cells fitted to
    each spot leave unexplained (float32; compiled, threaded)."""
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    profiles = sparse.csr_matrix(profiles, dtype=np.float64)
    n = counts.shape[0]
    out = np.empty((n, counts.shape[1]), dtype=np.float32)
    args = (counts.indptr, counts.indices, counts.data, profiles.indptr, profiles.indices,
            profiles.data, np.ascontiguousarray(candidates, dtype=np.int64),
            np.ascontiguousarray(beta, dtype=np.float64), out)
    map_threads(lambda a, b: _rest_rows(a, b, *args), row_ranges(n))
    return out


def solve_spots(
    counts: sparse.csr_matrix,
    weights: np.ndarray,
    profiles: sparse.csr_matrix,
    cell_type: np.ndarray,
    embedding: np.ndarray,
    abundance: np.ndarray,
    candidates: np.ndarray,
    *,
    bandwidth: float,
    lambda_ridge: float,
    lambda_type: float | np.ndarray,
    lambda_similar: float,
    n_iter: int,
    tol: float,
    weighted: np.ndarray | None = None,
) -> np.ndarray:
    """``n_spots × M`` cell weights of a block of spots, each spot solved on its own.

    The problem and parameters of :func:`spotlens.deconv._cells.solve_cell_weights` (with the
    similarity kernel's ``bandwidth`` given, not taken from the block), except that each spot
    stops after its own first pass that moves no weight by ``tol`` or more, so a spot's
    weights do not depend on the other spots of the block. ``lambda_type`` may be one value
    per spot (``n_spots``). ``profiles`` is the sparse
    ``n_cells × n_genes`` reference; ``embedding`` the ``n_cells × d`` cell embedding of the
    similarity kernel. ``weighted``: ``profiles.data`` times the gene weights of its columns,
    when the caller has it (computed here otherwise).
    """
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    profiles = sparse.csr_matrix(profiles, dtype=np.float64)
    weights = np.asarray(weights, np.float64)
    if weighted is None:
        weighted = profiles.data * weights[profiles.indices]
    candidates = np.ascontiguousarray(candidates, dtype=np.int64)
    n = candidates.shape[0]
    beta = np.zeros(candidates.shape)
    args = (counts.indptr, counts.indices, counts.data, weights,
            profiles.indptr, profiles.indices, weighted,
            np.ascontiguousarray(cell_type, dtype=np.int64),
            np.ascontiguousarray(embedding, dtype=np.float64),
            np.ascontiguousarray(abundance, dtype=np.float64), candidates,
            float(bandwidth), float(lambda_ridge),
            np.ascontiguousarray(np.broadcast_to(lambda_type, (n,)), dtype=np.float64),
            float(lambda_similar),
            int(n_iter), float(tol), beta)
    map_threads(lambda a, b: _solve_rows(a, b, *args), row_ranges(n))
    return beta
