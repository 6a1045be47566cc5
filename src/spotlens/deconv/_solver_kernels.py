"""Compiled per-spot kernels of :func:`spotlens.deconv._solver.solve` (numba when present).

- :func:`_sweep_spots`: one Gauss–Seidel visit of a set of spots that share no graph edge,
  each solving its own ``n_types × n_types`` non-negative quadratic problem (coordinate
  descent, then an exact solve on the support, :func:`_polish`),
- :func:`_objective_terms`: the objective's data, ridge and smoothing sums over a block of
  spots.
"""

from __future__ import annotations

import numpy as np

from ._ops import jit


def _half_gradient(xi, c, gram, metric, own, smooth, g):
    """``g = H x − c`` with ``H = G + own · I (+ smooth · P)``, from the non-zeros of ``x``."""
    n_types = xi.shape[0]
    has_metric = metric.shape[0] > 0
    for k in range(n_types):
        g[k] = own * xi[k] - c[k]
    for m in range(n_types):
        xm = xi[m]
        if xm != 0.0:
            for k in range(n_types):
                g[k] += gram[m, k] * xm
            if has_metric:
                sm = smooth * xm
                for k in range(n_types):
                    g[k] += metric[m, k] * sm


def _polish(xi, c, gram, metric, own, smooth, support, n_sup, chol, z, g):
    """Solve ``H_SS z = c_S`` on the support ``S``; if ``z > 0`` take it.

    Returns ``||Δx||²`` when taken (and updates ``g``), else ``-1`` (``x`` unchanged).
    """
    has_metric = metric.shape[0] > 0
    for a in range(n_sup):
        ka = support[a]
        for bb in range(a + 1):
            kb = support[bb]
            v = gram[ka, kb]
            if has_metric:
                v += smooth * metric[ka, kb]
            if a == bb:
                v += own
            chol[a, bb] = v
        z[a] = c[ka]
    # Cholesky H_SS = L Lᵀ in place (lower triangle), then L Lᵀ z = c_S
    for j in range(n_sup):
        d = chol[j, j]
        for p in range(j):
            d -= chol[j, p] * chol[j, p]
        if not d > 1e-12 * chol[j, j]:
            return -1.0
        d = np.sqrt(d)
        chol[j, j] = d
        for r in range(j + 1, n_sup):
            v = chol[r, j]
            for p in range(j):
                v -= chol[r, p] * chol[j, p]
            chol[r, j] = v / d
    for r in range(n_sup):
        v = z[r]
        for p in range(r):
            v -= chol[r, p] * z[p]
        z[r] = v / chol[r, r]
    for r in range(n_sup - 1, -1, -1):
        v = z[r]
        for p in range(r + 1, n_sup):
            v -= chol[p, r] * z[p]
        z[r] = v / chol[r, r]
    for a in range(n_sup):
        if not z[a] > 0.0:
            return -1.0
    step = 0.0
    for a in range(n_sup):
        d = z[a] - xi[support[a]]
        step += d * d
        xi[support[a]] = z[a]
    _half_gradient(xi, c, gram, metric, own, smooth, g)
    return step


_half_gradient = jit(_half_gradient)
_polish = jit(_polish)


def _sweep_spots(
    x, b, gram, metric, ridge, lam_s, spots, indptr, indices, data, deg, inner, tol
):
    """Update the spots ``spots`` (no two adjacent) in place; return ``Σ ||Δx_i||², Σ ||x_i||²``.

    Compiled kernel of one Gauss–Seidel block: for each spot, ``c = b_i + λ_s (W X)_i P`` and
    up to ``inner`` passes of exact coordinate descent on ``x H_i xᵀ − 2 c xᵀ`` with
    ``H_i = G + ridge · I + λ_s d_i P``, from the spot's current value. A spot stops early
    after a pass that moved it by at most ``tol · ||x_i||`` (``tol = 0``: only by nothing).
    A coordinate that does not move costs nothing, so a spot with few cell types present is
    cheap. Without smoothing (``lam_s`` 0: independent spots, solved to ``tol``), when a pass
    leaves the set of non-zero coordinates unchanged, the spot's problem is solved exactly on
    that set (Cholesky of ``H_i`` restricted to it); the solution is kept
    if it is positive (it then lowers the objective), and the passes end if it also satisfies
    the optimality conditions off the set. This ends coordinate descent's slow tail on
    correlated signatures. ``gram`` and ``metric`` (``P``; ``0 × 0`` for the identity) must be
    symmetric, so that their rows are read contiguously. ``indptr``/``indices``/``data`` hold
    the CSR graph (ignored when ``lam_s`` is 0). Scalar loops in float64, no allocation per
    spot.
    """
    n_types = x.shape[1]
    has_metric = metric.shape[0] > 0
    g = np.empty(n_types)
    c = np.empty(n_types)
    wx = np.empty(n_types)
    xi = np.empty(n_types)
    inv_h = np.empty(n_types)
    support = np.empty(n_types, dtype=np.int64)
    chol = np.empty((n_types, n_types))
    z = np.empty(n_types)
    tol2 = tol * tol
    total = 0.0
    norm = 0.0
    for t in range(spots.shape[0]):
        i = spots[t]
        for k in range(n_types):
            c[k] = b[i, k]
            xi[k] = x[i, k]
        smooth = 0.0
        if lam_s > 0.0:
            smooth = lam_s * deg[i]
            for k in range(n_types):
                wx[k] = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                v = data[p]
                for k in range(n_types):
                    wx[k] += v * x[j, k]
            if has_metric:
                for m in range(n_types):
                    a = lam_s * wx[m]
                    if a != 0.0:
                        for k in range(n_types):
                            c[k] += a * metric[m, k]
            else:
                for k in range(n_types):
                    c[k] += lam_s * wx[k]
        # g = H_i x − c (half the gradient), from the non-zero coordinates only
        own = ridge if has_metric else ridge + smooth
        for k in range(n_types):
            h = gram[k, k] + own + (smooth * metric[k, k] if has_metric else 0.0)
            inv_h[k] = 1.0 / h if h > 0.0 else 0.0
        _half_gradient(xi, c, gram, metric, own, smooth, g)
        n_prev = -1
        for _ in range(inner):
            moved = 0.0
            for k in range(n_types):
                if inv_h[k] == 0.0:
                    continue
                new = xi[k] - g[k] * inv_h[k]
                if new < 0.0:
                    new = 0.0
                delta = new - xi[k]
                if delta == 0.0:
                    continue
                xi[k] = new
                moved += delta * delta
                for m in range(n_types):
                    g[m] += gram[k, m] * delta
                g[k] += own * delta
                if has_metric:
                    sd = smooth * delta
                    for m in range(n_types):
                        g[m] += metric[k, m] * sd
            if moved == 0.0:
                break
            # same support as after the previous pass: try the exact solution on it
            n_sup = 0
            same = True
            for k in range(n_types):
                if xi[k] > 0.0:
                    if n_sup >= n_prev or support[n_sup] != k:
                        same = False
                    support[n_sup] = k
                    n_sup += 1
            same = same and n_sup == n_prev
            n_prev = n_sup
            if same and n_sup > 0 and lam_s == 0.0:
                step = _polish(xi, c, gram, metric, own, smooth, support, n_sup, chol, z, g)
                if step >= 0.0:
                    moved += step
                    optimal = True
                    for k in range(n_types):
                        if xi[k] == 0.0 and g[k] < -1e-12 * abs(c[k]):
                            optimal = False
                    if optimal:
                        break
            if tol2 > 0.0:
                size = 0.0
                for k in range(n_types):
                    size += xi[k] * xi[k]
                if moved <= tol2 * size:
                    break
        for k in range(n_types):
            d = xi[k] - x[i, k]
            total += d * d
            norm += xi[k] * xi[k]
            x[i, k] = xi[k]
    return total, norm


def _objective_terms(x, b, gram, metric, indptr, indices, data, deg, lo, hi):
    """Objective sums over spots ``lo:hi`` (compiled kernel).

    Returns ``Σ_i [x_i G x_iᵀ − 2 x_i·b_i]``, ``Σ_i ||x_i||²`` and
    ``Σ_i [d_i x_i P x_iᵀ − x_i P (W X)_iᵀ]`` (0 when ``indptr`` is empty).
    """
    n_types = x.shape[1]
    has_metric = metric.shape[0] > 0
    has_graph = indptr.shape[0] > 0
    px = np.empty(n_types)
    fit = 0.0
    sq = 0.0
    smooth = 0.0
    for i in range(lo, hi):
        for k in range(n_types):
            xk = x[i, k]
            sq += xk * xk
            fit -= 2.0 * xk * b[i, k]
            if xk != 0.0:
                acc = 0.0
                for m in range(n_types):
                    acc += gram[k, m] * x[i, m]
                fit += xk * acc
        if not has_graph:
            continue
        for k in range(n_types):
            if has_metric:
                acc = 0.0
                for m in range(n_types):
                    acc += metric[k, m] * x[i, m]
                px[k] = acc
            else:
                px[k] = x[i, k]
        quad = 0.0
        for k in range(n_types):
            quad += px[k] * x[i, k]
        cross = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            v = data[p]
            for k in range(n_types):
                cross += v * px[k] * x[j, k]
        smooth += deg[i] * quad - cross
    return fit, sq, smooth


_sweep_spots = jit(_sweep_spots)
_objective_terms = jit(_objective_terms)


__all__: list[str] = []
