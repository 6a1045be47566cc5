"""Sufficient statistics, the fit loop and cross-validation of the penalties (pure arrays)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from ._ops import NumpyOps, TorchOps, jit, map_threads, row_ranges
from ._solver import SolverResult, solve


def _count_statistics(indptr, indices, data, sw, w2, lo, hi, b, row_sq, library):
    """Rows ``lo:hi``: ``b = counts · sw``, ``Σ counts² w2`` and the row sums (compiled)."""
    n_types = sw.shape[1]
    for i in range(lo, hi):
        for k in range(n_types):
            b[i, k] = 0.0
        total = 0.0
        sq = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            g = indices[p]
            v = float(data[p])
            total += v
            sq += v * v * w2[g]
            for k in range(n_types):
                b[i, k] += v * sw[g, k]
        library[i] = total
        row_sq[i] = sq


_count_statistics = jit(_count_statistics)


@dataclass(frozen=True)
class Problem:
    """Sufficient statistics of ``||Y − X S||²``.

    Attributes
    ----------
    b
        ``n_spots × n_types`` ``Y Sᵀ``.
    gram
        ``n_types × n_types`` ``S Sᵀ``.
    yy
        ``||Y||_F²``.
    scale
        Mean of ``diag(S Sᵀ)``: penalties are given relative to it.
    """

    b: np.ndarray
    gram: np.ndarray
    yy: float
    scale: float

    @classmethod
    def from_matrices(
        cls, y: sparse.spmatrix | np.ndarray, s: np.ndarray, scale: float | None = None
    ):
        """Statistics of ``y`` (``n_spots × n_genes``) and ``s`` (``n_types × n_genes``)."""
        b = np.asarray(y @ s.T)
        gram = s @ s.T
        yy = float(y.multiply(y).sum()) if sparse.issparse(y) else float((y * y).sum())
        scale = float(np.mean(np.diag(gram))) if scale is None else scale
        return cls(b=b, gram=gram, yy=yy, scale=scale)

    @classmethod
    def from_counts(
        cls,
        counts: sparse.csr_matrix,
        weights: np.ndarray,
        s: np.ndarray,
        scale: float | None = None,
    ):
        """Statistics of ``Y = diag(1/library) · counts · diag(weights)`` without forming ``Y``.

        Parameters
        ----------
        counts
            ``n_spots × n_genes`` raw counts (CSR); a spot's library size is its row sum.
        weights
            ``n_genes`` gene weights.
        s
            ``n_types × n_genes`` signature matrix, already weighted.
        scale
            Penalty scale; mean ``diag(S Sᵀ)`` of ``s`` when ``None``.

        Notes
        -----
        O(nnz · n_types) time in one compiled pass over the non-zeros (float64, rows split over
        the usable cores) and O(n_spots · n_types) extra memory.
        """
        counts = sparse.csr_matrix(counts)
        sw = np.ascontiguousarray((s * weights[None, :]).T, dtype=np.float64)
        w2 = np.asarray(weights, dtype=np.float64) ** 2
        n = counts.shape[0]
        b = np.empty((n, s.shape[0]))
        row_sq = np.empty(n)
        library = np.empty(n)
        # one pass over the non-zeros in float64, rows split over threads
        map_threads(
            lambda lo, hi: _count_statistics(
                counts.indptr, counts.indices, counts.data, sw, w2, lo, hi, b, row_sq, library
            ),
            row_ranges(n),
        )
        inv = np.divide(1.0, library, out=np.zeros_like(library), where=library > 0)
        b *= inv[:, None]
        yy = float((row_sq * inv**2).sum())
        gram = s @ s.T
        return cls(b=b, gram=gram, yy=yy,
                   scale=float(np.mean(np.diag(gram))) if scale is None else scale)

    def held_out_error(self, x: np.ndarray) -> float:
        """Scale-free error ``Σ_i min_c ||Y_i − c X_i S||²`` of predicting these statistics.

        Each spot's prediction is rescaled by its best factor ``c_i ≥ 0``, so only the
        composition ``X_i / |X_i|`` is judged, not the overall scale that a ridge shrinks.
        """
        cross = (x * self.b).sum(axis=1)
        norm = ((x @ self.gram) * x).sum(axis=1)
        gain = np.divide(np.maximum(cross, 0) ** 2, norm, out=np.zeros_like(norm), where=norm > 0)
        return self.yy - float(gain.sum())


def fit(
    problem: Problem,
    w: sparse.csr_matrix,
    colors: Sequence[np.ndarray],
    *,
    lambda_ridge: float,
    lambda_spatial: float,
    n_iter: int,
    tol: float,
    ops: NumpyOps | TorchOps,
    x0: np.ndarray | None = None,
    progress: bool = False,
    attention_update: tuple[int, Callable[[np.ndarray], sparse.csr_matrix]] | None = None,
    metric: np.ndarray | None = None,
    track_objective: bool = True,
) -> tuple[np.ndarray, np.ndarray, int, bool, sparse.csr_matrix]:
    """Solve with relative penalties; optionally rebuild ``W`` from ``X`` every few sweeps.

    Returns
    -------
    x, objective per sweep, sweeps run, converged, and the graph used last.
    """
    lam_r = lambda_ridge * problem.scale
    lam_s = lambda_spatial * problem.scale
    bar = tqdm(total=n_iter, desc="spotlens sweeps", disable=not progress, leave=False)

    def tick(sweep, obj, change):
        bar.update(1)
        bar.set_postfix(objective=f"{obj:.4g}", change=f"{change:.2e}")

    def stretch(graph, x, n):
        return solve(
            problem.b, problem.gram, problem.yy, w=graph, colors=colors,
            penalty_ridge=lam_r, penalty_spatial=lam_s, x0=x, n_iter=n, tol=tol, ops=ops,
            on_sweep=tick, metric=metric, track_objective=track_objective,
        )

    try:
        return run_stretches(stretch, w, x0, n_iter=n_iter,
                             attention_update=attention_update if lambda_spatial > 0 else None)
    finally:
        bar.close()


def run_stretches(
    stretch: Callable[[sparse.csr_matrix, np.ndarray | None, int], SolverResult],
    w: sparse.csr_matrix,
    x0: np.ndarray | None,
    *,
    n_iter: int,
    attention_update: tuple[int, Callable[[np.ndarray], sparse.csr_matrix]] | None,
) -> tuple[np.ndarray, np.ndarray, int, bool, sparse.csr_matrix]:
    """Run a solver in stretches of fixed graph, rebuilding the graph between them.

    ``stretch(w, x, n)`` runs at most ``n`` iterations from ``x`` on graph ``w``. With
    ``attention_update = (every, rebuild)`` the graph is rebuilt as ``rebuild(proportions)``
    every ``every`` iterations until convergence or ``n_iter`` (the objective never increases
    within a stretch); without it one stretch of ``n_iter``. Shared by both data terms.

    Returns
    -------
    x, objective per iteration, iterations run, converged, and the graph used last.
    """
    every = attention_update[0] if attention_update else n_iter
    x, history, done, converged = x0, [], 0, False
    while done < n_iter and not converged:
        res = stretch(w, x, min(every, n_iter - done))
        x, converged = res.x, res.converged
        history.extend(res.objective if not history else res.objective[1:])
        done += res.n_sweeps
        if attention_update and not converged and done < n_iter:
            w = attention_update[1](_normalise_rows(x))
    return x, np.asarray(history), done, converged, w


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    total = x.sum(axis=1, keepdims=True)
    return np.divide(x, total, out=np.zeros_like(x), where=total > 0)


def spatial_window(coords: np.ndarray, n_max: int, seed: int = 0) -> np.ndarray:
    """Return the ``n_max`` spots nearest to a random spot: a contiguous patch of tissue.

    Used to choose the penalties on a large slide: the patch keeps the local graph structure
    that the spatial term acts on, at a fraction of the cost.
    """
    from scipy.spatial import cKDTree

    n = coords.shape[0]
    if n <= n_max:
        return np.arange(n)
    centre = coords[np.random.default_rng(seed).integers(n)]
    _, idx = cKDTree(coords).query(centre, k=n_max)
    return np.sort(np.asarray(idx))


def thin_counts(
    counts: sparse.csr_matrix, n_folds: int, rng: np.random.Generator
) -> list[sparse.csr_matrix]:
    """Split every count at random into ``n_folds`` parts that add up to it (multinomial thinning).

    For Poisson counts the parts are independent Poisson matrices with means ``counts_mean / F``.
    """
    counts = sparse.csr_matrix(counts)
    remaining = np.rint(counts.data).astype(np.int64)
    parts = []
    for f in range(n_folds - 1):
        draw = rng.binomial(remaining, 1.0 / (n_folds - f))
        remaining = remaining - draw
        parts.append(draw)
    parts.append(remaining)
    out = []
    for data in parts:
        m = sparse.csr_matrix(
            (data.astype(np.float32), counts.indices.copy(), counts.indptr.copy()),
            shape=counts.shape,
        )
        m.eliminate_zeros()
        out.append(m)
    return out


def cross_validate(
    counts: sparse.csr_matrix,
    weights: np.ndarray,
    s: np.ndarray,
    w: sparse.csr_matrix,
    colors: Sequence[np.ndarray],
    *,
    ridge_grid: Sequence[float],
    spatial_grid: Sequence[float],
    n_folds: int,
    seed: int,
    n_iter: int,
    tol: float,
    ops: NumpyOps | TorchOps,
    progress: bool = False,
    metric: np.ndarray | None = None,
    patience: int | None = 2,
) -> tuple[float, float, pd.DataFrame]:
    """Choose ``lambda_ridge`` then ``lambda_spatial`` by count-splitting cross-validation.

    Each spot's counts are split at random into ``n_folds`` parts (multinomial thinning, exact
    for Poisson counts: the parts are independent). For each part, the model is fitted on the
    other parts and scored by how well it predicts the held-out part's normalised expression,
    ``||Y_test − X S||²``. Unlike held-out genes, this rewards smoothing only when it removes
    sampling noise, and penalises it when neighbours differ in composition. The noise of the
    training data is ``F/(F−1)`` times that of the full data, so the penalties chosen there are
    scaled by ``(F−1)/F`` for the full fit. The ridge is chosen first with no smoothing, then the
    spatial weight with that ridge, along each grid with warm starts (the spatial path from the
    best unsmoothed fit). Each path, in increasing order, stops once the held-out error has
    risen at two grid points in a row past the best so far (for the spatial path including no
    smoothing), as larger weights only shrink or smooth more: their rows of the table are NaN
    (not run). ``patience``
    sets how many rises (``None``: run the whole grid).

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` raw counts over the genes used.
    weights
        ``n_genes`` gene weights (``Y = counts / library · weights``).
    s
        ``n_types × n_genes`` weighted signature matrix.
    w, colors
        Spot graph and its colour classes.
    ridge_grid, spatial_grid
        Candidate penalties (relative to the mean ``diag(S Sᵀ)``), on the full-data scale.
    n_folds
        Parts per count (``F`` ≥ 2).

    Returns
    -------
    lambda_ridge, lambda_spatial, and a table of the held-out error per grid point (NaN:
    not run).

    References
    ----------
    Neufeld, Dharamshi, Gao & Witten, "Data thinning for convolution-closed distributions",
    JMLR 25 (2024). Leiner, Duan, Wasserman & Ramdas, "Data fission", JASA (2023).
    """
    scale = float(np.mean(np.diag(s @ s.T)))
    shrink = (n_folds - 1) / n_folds
    parts = thin_counts(counts, n_folds, np.random.default_rng(seed))
    total = sum(parts[1:], parts[0])
    splits = [
        (
            Problem.from_counts(total - part, weights, s, scale=scale),
            Problem.from_counts(part, weights, s, scale=scale),
        )
        for part in parts
    ]
    del parts, total
    smooth_grid = sorted(float(v) for v in spatial_grid if v > 0)
    n_fits = n_folds * (len(ridge_grid) + len(smooth_grid))
    bar = tqdm(total=n_fits, desc="spotlens cross-validation", disable=not progress, leave=False)

    def path(pairs, starts, best=np.inf, stop=False):
        """Held-out error along ``pairs`` (NaN where not run), and each fold's fits."""
        errors = np.full(len(pairs), np.nan)
        fits: list[list[np.ndarray]] = []
        x = list(starts)
        rises = 0
        for g, (lr, ls) in enumerate(pairs):
            errors[g] = 0.0
            for f, (train, held) in enumerate(splits):
                x[f], *_ = fit(train, w, colors, lambda_ridge=lr / shrink,
                               lambda_spatial=ls / shrink, n_iter=n_iter, tol=tol, ops=ops,
                               x0=x[f], metric=metric, track_objective=False)
                errors[g] += held.held_out_error(x[f]) / n_folds
                bar.update(1)
            fits.append(list(x))
            rises = 0 if errors[g] < best else rises + 1
            best = min(best, errors[g])
            if stop and patience is not None and rises >= patience:
                break
        return errors, fits

    try:
        ridge_pairs = [(float(v), 0.0) for v in ridge_grid]
        # increasing ridge shrinks more; stop once the error rose twice past the best so far
        ridge_err, ridge_fits = path(ridge_pairs, [None] * n_folds, stop=True)
        at = int(np.nanargmin(ridge_err))
        best_r = ridge_pairs[at][0]
        smooth_pairs = [(best_r, v) for v in smooth_grid]
        # from the best unsmoothed fit; stop once the error rose twice past the best so far
        smooth_err, _ = path(smooth_pairs, ridge_fits[at],
                             best=ridge_err[at] if 0.0 in spatial_grid else np.inf, stop=True)
    finally:
        bar.close()
    table = pd.DataFrame(ridge_pairs + smooth_pairs, columns=["lambda_ridge", "lambda_spatial"])
    table["error"] = np.concatenate([ridge_err, smooth_err])
    candidates = table[table.lambda_ridge == best_r]
    if 0.0 not in spatial_grid:
        candidates = candidates[candidates.lambda_spatial > 0]
    best = candidates.loc[candidates.error.idxmin()]
    return best_r, float(best.lambda_spatial), table


def poisson_gene_weights(signature: np.ndarray, how: str) -> np.ndarray:
    """Poisson weights ``1/sqrt(m_g)``, ``m`` the mean of the unit-sum type profiles.

    Under Poisson sampling the variance of a spot's normalised expression of gene g is
    proportional to its expected value, whose prior mean is ``m_g``. Floored at the 5 % quantile
    so that near-silent genes do not dominate. The one Poisson weight of the package: the type
    level (``signature`` = types × genes) and the cell level (its type means) both use it. A
    type without counts has a zero profile.
    """
    g = signature.shape[1]
    if how == "none":
        return np.ones(g)
    profiles = signature / np.maximum(signature.sum(axis=1, keepdims=True), 1e-300)
    mean = profiles.mean(axis=0)
    positive = mean[mean > 0]
    floor = np.quantile(positive, 0.05) if positive.size else 1.0
    return 1.0 / np.sqrt(np.maximum(mean, floor))
