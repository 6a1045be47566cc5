"""Type-level solver: projected block Gauss–Seidel for the attention-regularised regression.

Pure kernel: arrays in, arrays out. Minimises over ``X ≥ 0`` (``n_spots × n_types``)::

    f(X) = ||Y − X S||_F² + λ_r ||X||_F² + λ_s Tr(Xᵀ L X),   L = D − W

through the sufficient statistics ``B = Y Sᵀ`` (``n_spots × n_types``), ``G = S Sᵀ``
(``n_types × n_types``) and ``||Y||_F²``, so ``Y`` never enters the sweeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from ._ops import MIN_TASK, NumpyOps, TorchOps, map_threads, numba, row_ranges, usable_threads
from ._solver_kernels import _objective_terms, _sweep_spots


@dataclass
class SolverResult:
    """Output of :func:`solve`.

    Attributes
    ----------
    x
        ``n_spots × n_types`` non-negative solution.
    objective
        Objective after each sweep (index 0 is the start).
    n_sweeps
        Sweeps run.
    converged
        Whether the relative change fell below ``tol``.
    """

    x: np.ndarray
    objective: np.ndarray
    n_sweeps: int
    converged: bool


def objective(
    x, b, gram, yy: float, w, deg, lambda_ridge: float, lambda_spatial: float, ops, metric=None
):
    """Objective ``f(X)`` from sufficient statistics, O(n·K² + nnz(W)·K)."""
    fit = yy - 2 * ops.scalar((x * b).sum()) + ops.scalar(((x @ gram) * x).sum())
    ridge = lambda_ridge * ops.scalar((x * x).sum())
    smooth = 0.0
    if lambda_spatial > 0:
        xp = x if metric is None else x @ metric
        smooth = ops.scalar((deg * (xp * x).sum(1)).sum()) - ops.scalar((xp * (w @ x)).sum())
    return fit + ridge + lambda_spatial * smooth


def _update_block(x, c, gram, ridge: float, smooth, metric, n_types: int, inner: int, ops):
    """Exact coordinate descent passes on ``min_{x≥0} x H xᵀ − 2 c xᵀ`` for a block of spots.

    ``H_i = gram + ridge · I + smooth_i · P`` (``P`` = ``metric``, identity when ``None``);
    every coordinate step is an exact minimisation, so the objective cannot increase. Works on
    type-major copies (``n_types × n_block``) so that each coordinate's row is contiguous.
    """
    xt = ops.transposed(x)
    g = gram @ xt + ridge * xt - ops.transposed(c)
    g += smooth[None, :] * (xt if metric is None else metric @ xt)
    for _ in range(inner):
        for k in range(n_types):
            p_kk = 1.0 if metric is None else metric[k, k]
            h = gram[k, k] + ridge + smooth * p_kk
            new = (xt[k] - g[k] / h).clip(min=0)
            delta = new - xt[k]
            xt[k] = new
            g += gram[:, k : k + 1] * delta[None, :]
            g[k] += ridge * delta
            if metric is None:
                g[k] += smooth * delta
            else:
                g += metric[:, k : k + 1] * (smooth * delta)[None, :]
    return xt.T


_MAX_PASSES = 200


def solve(
    b: np.ndarray,
    gram: np.ndarray,
    yy: float,
    *,
    w: sparse.spmatrix | None = None,
    colors: Sequence[np.ndarray] | None = None,
    penalty_ridge: float = 0.0,
    penalty_spatial: float = 0.0,
    x0: np.ndarray | None = None,
    n_iter: int = 200,
    tol: float = 1e-5,
    inner: int = 4,
    ops: NumpyOps | TorchOps | None = None,
    on_sweep: Callable[[int, float, float], None] | None = None,
    metric: np.ndarray | None = None,
    track_objective: bool = True,
    n_threads: int | None = None,
) -> SolverResult:
    """Projected block Gauss–Seidel sweeps.

    Each sweep visits the colour classes of ``W`` in turn; the spots of one class share no edge,
    so they are updated together, each solving its own ``n_types × n_types`` non-negative
    quadratic problem with its neighbours' current values (exact Gauss–Seidel). On NumPy the
    spots of a class are updated by a compiled kernel (numba) split over ``n_threads`` threads,
    with no Python work per spot or per cell type; on torch by vectorised array operations.

    Parameters
    ----------
    b
        ``n_spots × n_types`` ``Y Sᵀ``.
    gram
        ``n_types × n_types`` ``S Sᵀ``.
    yy
        ``||Y||_F²`` (only shifts the objective).
    w
        ``n_spots × n_spots`` symmetric sparse graph; required when ``penalty_spatial > 0``.
    colors
        Independent sets covering the spots (from ``color_graph``); required with ``w``.
    penalty_ridge, penalty_spatial
        Absolute penalty weights ``λ_ridge``, ``λ_spatial`` of the objective (≥ 0), in the
        units of ``||Y − X S||²`` — not the unit-free ``lambda_ridge`` / ``lambda_spatial`` of
        :func:`~spotlens.deconv.deconvolve`, which are multiplied by the data's scale first.
    x0
        Start (``n_spots × n_types``, ≥ 0); zeros when ``None``.
    n_iter
        Maximum sweeps.
    tol
        Stop when ``||X_t − X_{t−1}||_F / ||X_t||_F < tol``.
    inner
        Coordinate-descent passes per block per sweep. The compiled NumPy path stops a spot's
        passes early once a pass moves it by less than ``tol / 10`` (relative); without a
        spatial term the spots are independent, and it solves each spot to that precision
        within a sweep (up to 200 passes), so one or two sweeps suffice.
    ops
        Array backend; NumPy float64 when ``None``.
    on_sweep
        Called as ``on_sweep(sweep, objective, relative_change)`` after every sweep.
    metric
        ``n_types × n_types`` positive semi-definite ``P`` of the smoothing term
        ``λ_s Tr(P Xᵀ L X)``; identity when ``None``. With ``P = M Mᵀ`` for a 0/1 matrix ``M``
        mapping columns (cell states) to groups (cell types), the smoothing acts on the group
        sums: neighbours are asked to agree on cell-type composition, not on states.
    track_objective
        Evaluate the objective after every sweep (else NaN, and a little faster).
    n_threads
        Threads of the compiled NumPy kernel (``None``: the cores this process may use). The
        result does not depend on it: the spots of one colour class are independent.

    Returns
    -------
    :class:`SolverResult`. Cost per sweep O(n·K² + nnz(W)·K).
    """
    lambda_ridge, lambda_spatial = penalty_ridge, penalty_spatial
    ops = ops or NumpyOps()
    if numba is not None and isinstance(ops, NumpyOps):
        return _solve_compiled(
            b, gram, yy, w=w, colors=colors, lambda_ridge=lambda_ridge,
            lambda_spatial=lambda_spatial, x0=x0, n_iter=n_iter, tol=tol, inner=inner,
            on_sweep=on_sweep, metric=metric, track_objective=track_objective,
            n_threads=usable_threads(n_threads),
        )
    n, n_types = b.shape
    spatial = lambda_spatial > 0 and w is not None and w.nnz > 0
    b_ = ops.array(b)
    gram_ = ops.array(gram)
    x = ops.array(np.zeros((n, n_types)) if x0 is None else x0)
    if spatial:
        w = sparse.csr_matrix(w)
        deg_np = np.asarray(w.sum(axis=1)).ravel()
        if colors is None:
            raise ValueError("colors are required with a spatial graph")
        blocks = [
            (ops.index(idx), ops.sparse(w[idx]), ops.array(lambda_spatial * deg_np[idx]))
            for idx in colors
            if len(idx)
        ]
        w_, deg_ = ops.sparse(w), ops.array(deg_np)
    else:
        w_, deg_ = None, None
        blocks = [(None, None, ops.array(np.zeros(n)))]
    lam_s = lambda_spatial if spatial else 0.0
    metric_ = None if metric is None or not spatial else ops.array(metric)

    def f(xx):
        return objective(xx, b_, gram_, yy, w_, deg_, lambda_ridge, lam_s, ops, metric_)

    if not track_objective:
        def f(xx):  # noqa: ARG001
            return float("nan")

    history = [f(x)]
    converged = False
    sweep = 0
    for sweep in range(1, n_iter + 1):
        x_prev = x.clone() if hasattr(x, "clone") else x.copy()
        for idx, w_rows, smooth in blocks:
            if idx is None:
                x = _update_block(x, b_, gram_, lambda_ridge, smooth, None, n_types, inner, ops)
            else:
                wx = w_rows @ x
                c = b_[idx] + lam_s * (wx if metric_ is None else wx @ metric_)
                x[idx] = _update_block(
                    x[idx], c, gram_, lambda_ridge, smooth, metric_, n_types, inner, ops
                )
        history.append(f(x))
        norm = ops.scalar((x * x).sum()) ** 0.5
        change = ops.scalar(((x - x_prev) ** 2).sum()) ** 0.5 / max(norm, 1e-300)
        if on_sweep is not None:
            on_sweep(sweep, history[-1], change)
        if change < tol:
            converged = True
            break
    return SolverResult(
        x=ops.numpy(x), objective=np.asarray(history), n_sweeps=sweep, converged=converged
    )


def _solve_compiled(
    b, gram, yy, *, w, colors, lambda_ridge, lambda_spatial, x0, n_iter, tol, inner, on_sweep,
    metric, track_objective, n_threads,
) -> SolverResult:
    """:func:`solve` on NumPy with the compiled kernels (float64 throughout)."""
    n, n_types = b.shape
    b_ = np.ascontiguousarray(b, dtype=np.float64)
    gram_ = np.asarray(gram, dtype=np.float64)
    gram_ = np.ascontiguousarray((gram_ + gram_.T) * 0.5)  # exact for a symmetric S Sᵀ
    x = np.zeros((n, n_types)) if x0 is None else np.array(x0, dtype=np.float64, order="C")
    spatial = lambda_spatial > 0 and w is not None and w.nnz > 0
    empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0)
    if spatial:
        if colors is None:
            raise ValueError("colors are required with a spatial graph")
        w = sparse.csr_matrix(w)
        indptr = w.indptr.astype(np.int64)
        indices = w.indices.astype(np.int64)
        data = w.data.astype(np.float64)
        deg = np.asarray(w.sum(axis=1), dtype=np.float64).ravel()
        blocks = [np.asarray(idx, dtype=np.int64) for idx in colors if len(idx)]
        lam_s = float(lambda_spatial)
    else:
        indptr, indices, data, deg = empty_i, empty_i, empty_f, empty_f
        blocks = [np.arange(n, dtype=np.int64)]
        lam_s = 0.0
    metric_ = np.zeros((0, 0))
    if metric is not None and spatial:
        metric_ = np.asarray(metric, dtype=np.float64)
        metric_ = np.ascontiguousarray((metric_ + metric_.T) * 0.5)
    ridge = float(lambda_ridge)
    # independent spots (no smoothing): solve each to tol / 10 within one sweep, so that the
    # next sweep only confirms it; with smoothing, up to `inner` passes between neighbour
    # updates (4 halves the sweeps of 2 at the same accuracy; more gain nothing)
    passes, spot_tol = (inner, 0.1 * tol) if spatial else (max(inner, _MAX_PASSES), 0.1 * tol)
    # a few hundred spots per task at least: below that, threads cost more than they save
    pieces = [
        [p for p in np.array_split(idx, min(n_threads, max(1, len(idx) // MIN_TASK))) if len(p)]
        for idx in blocks
    ]
    pool = ThreadPoolExecutor(n_threads) if n_threads > 1 and n >= 2 * MIN_TASK else None

    def run(fn, tasks):
        return map_threads(fn, tasks, pool)

    ranges = row_ranges(n, n_threads)

    def f(xx):
        if not track_objective:
            return float("nan")
        terms = run(
            lambda lo, hi: _objective_terms(xx, b_, gram_, metric_, indptr, indices, data, deg,
                                            lo, hi),
            ranges,
        )
        fit, sq, smooth = (sum(t[j] for t in terms) for j in range(3))
        return yy + fit + ridge * sq + lam_s * smooth

    history = [f(x)]
    converged = False
    sweep = 0
    try:
        for sweep in range(1, n_iter + 1):
            moved = size = 0.0
            for block in pieces:
                for dm, ds in run(
                    lambda spots: _sweep_spots(x, b_, gram_, metric_, ridge, lam_s, spots,
                                               indptr, indices, data, deg, passes, spot_tol),
                    [(p,) for p in block],
                ):
                    moved, size = moved + dm, size + ds  # every spot is in one block
            history.append(f(x))
            change = moved**0.5 / max(size**0.5, 1e-300)
            if on_sweep is not None:
                on_sweep(sweep, history[-1], change)
            if change < tol:
                converged = True
                break
    finally:
        if pool is not None:
            pool.shutdown()
    return SolverResult(x=x, objective=np.asarray(history), n_sweeps=sweep, converged=converged)
