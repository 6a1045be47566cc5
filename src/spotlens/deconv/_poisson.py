"""Count likelihood: the spatial regression with a (quasi-)Poisson data term (pure kernel).

Minimises, over ``X ≥ 0`` (``n_spots × n_states``)::

    F(X) = Σ_i Σ_g w_g [μ_ig − y_ig log μ_ig] + λ_r ||X||_F² + λ_s Tr(Zᵀ L Z),
    μ_ig = N_i (X S̄)_ig,    Z = X M,    L = D − W

where ``y`` are a spot's raw counts over the genes used, ``N_i`` its library size over them,
``S̄`` the signature matrix scaled so that an average cell's row sums to about 1 (so ``X_i``
reads as cells relative to an average cell, and ``Σ_k X_ik S̄_k`` as the spot's expected
profile), ``M`` the 0/1 map of cell states to cell types (identity without states) and ``W`` the
attention-weighted spot graph. The first term is the Poisson negative log-likelihood (up to a
constant), so each gene's residual is weighted by its own expected count in that spot rather
than by one variance per gene shared by all spots: where depth is low or a spot is dominated by
one type, that is the right noise model (RCTD, Cable et al. 2022, fits the same family with a
log-normal platform term). The gene weights ``w_g`` are 1 for the Poisson likelihood; the
quasi-Poisson one lowers the weight of genes whose counts scatter more than Poisson around a
first fit (:func:`~spotlens.deconv._count_fit.with_dispersion`), as a negative binomial model
with gene-wise dispersion would (its score equations at each gene's typical expected count;
Wedderburn, Biometrika 61, 439–447 (1974), doi:10.1093/biomet/61.3.439, for
quasi-likelihood).

The solver is a majorisation–minimisation (MM) algorithm, so the objective never increases:

- the data term is majorised by Jensen's inequality (the EM step of Lee & Seung's
  multiplicative updates for the Kullback–Leibler divergence), giving per coordinate
  ``N_i σ_k x − c_ik log x`` with ``σ_k = Σ_g w_g S̄_kg`` and
  ``c_ik = x̂_ik Σ_g w_g y_ig S̄_kg / (x̂_i S̄)_g``;
- each edge of the smoothing term is majorised by De Pierro's separable bound
  ``||z_i − z_j||² ≤ 2||z_i − m||² + 2||z_j − m||²`` with ``m = (ẑ_i + ẑ_j)/2``, which is exact
  at the current point and splits the graph term into one quadratic per spot;
- a type's squared sum over its states, ``(Σ_s x_s)²``, is majorised by
  ``Σ_s (Σ_s' x̂_s' / x̂_s) x_s²`` (convexity), exact at the current point.

Every coordinate then minimises ``a x² + b x − c log x`` on its own, in closed form (the
positive root of ``2a x² + b x − c = 0``), so all spots are updated at once, with no Python loop
over spots, in O(nnz(Y)·K + nnz(W)·T) per iteration.

References
----------
Lee & Seung, NeurIPS 13 (2001) (multiplicative updates, KL divergence). De Pierro, IEEE Trans
Med Imaging 14, 132–137 (1995), doi:10.1109/42.370409 (separable surrogate of a quadratic
smoothing penalty). Varadhan & Roland, Scand J Stat 35, 335–353 (2008),
doi:10.1111/j.1467-9469.2007.00585.x (SQUAREM acceleration). Lange, Hunter & Yang, J Comput
Graph Stat 9, 1–20 (2000) (MM algorithms).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from scipy import sparse

from ._ops import jit, map_threads, row_ranges
from ._solver import SolverResult


#: Floor of a coordinate in the state-sum bound and of an expected count in the logarithm.
_TINY = 1e-30
#: Share of non-zero counts from which :meth:`CountProblem.statistics` works on a dense copy
#: of the counts with matrix products (BLAS) instead of the compiled pass over the non-zeros:
#: the products cost the same at any density and the pass grows with it (break-even measured
#: in benchmarks/results/docstring_figures.md).
DENSE_MIN_DENSITY = 0.4
#: Largest dense copy (spots x genes entries, 8 bytes each) that is made.
DENSE_MAX_ENTRIES = 2**24
def _ratio_products(indptr, indices, data, x, s_t, lo, hi, acc, loglik, want_loglik):
    """Rows ``lo:hi``: ``acc_ik = Σ_g y_ig S̄_kg / (x_i S̄)_g`` and, if ``want_loglik``,
    ``Σ_g y_ig log (x_i S̄)_g`` (the logarithm is most of the cost: skipped where unused)."""
    n_types = x.shape[1]
    for i in range(lo, hi):
        xi = x[i]
        ai = np.zeros(n_types)
        ll = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            sg = s_t[indices[p]]
            m = 0.0
            for k in range(n_types):
                m += xi[k] * sg[k]
            if m < 1e-300:
                m = 1e-300
            y = float(data[p])
            if want_loglik:
                ll += y * np.log(m)
            r = y / m
            for k in range(n_types):
                ai[k] += r * sg[k]
        for k in range(n_types):
            acc[i, k] = ai[k]
        loglik[i] = ll


_ratio_products = jit(_ratio_products, reassociate=True)


@dataclass(frozen=True)
class CountProblem:
    """The data of the Poisson regression.

    Attributes
    ----------
    counts
        ``n_spots × n_genes`` raw counts over the genes used (CSR, float64).
    library
        ``n_spots`` library sizes ``N_i`` over those genes.
    s_bar
        ``n_states × n_genes`` signatures (expected counts per cell) divided by the mean library
        size of the reference types.
    weight
        ``n_genes`` weight ``w_g`` of each gene's term, or ``None`` (all 1): the quasi-Poisson
        data term ``Σ_g w_g [μ_ig − y_ig log μ_ig]``, whose estimating equations are those of a
        count model with variance ``μ_ig / w_g``. With ``w_g = 1 / (1 + φ_g μ̄_g)`` (see
        :func:`~spotlens.deconv._count_fit.with_dispersion`) a gene whose counts scatter more
        than Poisson around the fit —
        one the single-cell and spatial assays capture differently, or one whose reference
        profile is noisy — weighs less.
    """

    counts: sparse.csr_matrix
    library: np.ndarray
    s_bar: np.ndarray
    weight: np.ndarray | None = None

    @functools.cached_property
    def _data(self) -> np.ndarray:
        if self.weight is None:
            return self.counts.data
        return self.counts.data * self.weight[self.counts.indices]

    @functools.cached_property
    def _dense(self) -> np.ndarray | None:
        """The weighted counts as a dense array where they are dense enough, else ``None``."""
        c = self.counts
        size = c.shape[0] * c.shape[1]
        if size == 0 or size > DENSE_MAX_ENTRIES or c.nnz < DENSE_MIN_DENSITY * size:
            return None
        dense = c.toarray()
        if self.weight is not None:
            dense *= self.weight[None, :]
        return dense

    @functools.cached_property
    def _sigma(self) -> np.ndarray:
        w = 1.0 if self.weight is None else self.weight[None, :]
        return (self.s_bar * w).sum(axis=1)

    @classmethod
    def from_counts(cls, counts, s_bar: np.ndarray, weight: np.ndarray | None = None
                    ) -> CountProblem:
        """Problem of ``counts`` (``n_spots × n_genes``) against ``s_bar`` (gene ``weight``)."""
        counts = sparse.csr_matrix(counts, dtype=np.float64)
        return cls(counts=counts, library=np.asarray(counts.sum(axis=1)).ravel(), s_bar=s_bar,
                   weight=weight)

    @property
    def scale(self) -> float:
        """Curvature of the data term of an average spot: penalties are given relative to it.

        The mean diagonal of the Fisher information of ``x_i`` at an even composition,
        ``N̄ · mean_k Σ_g S̄_kg² / p̄_g`` with ``N̄`` the mean library size of the spots with
        counts and ``p̄`` the mean row of ``S̄`` — the counterpart of the mean ``diag(S Sᵀ)``
        that scales the least-squares penalties, so that a unit-free penalty weighs the
        smoothing against the data alike under both likelihoods and at any depth.
        """
        return float(self.scales()[0]) if self.library.size else 1.0

    def scales(self, sections: np.ndarray | None = None) -> np.ndarray:
        """:attr:`scale` of each spot's section (``n_spots``; one value without sections).

        Each section is scaled by its own depth, so a section's fit does not depend on the
        other sections fitted with it (no graph edge joins two sections).
        """
        mean = self.s_bar.mean(axis=0)
        codes = np.zeros(len(self.library), dtype=np.int64) if sections is None else sections
        out = np.empty(len(self.library))
        for code in np.unique(codes):
            members = codes == code
            lib = self.library[members]
            positive = lib[lib > 0]
            depth = float(positive.mean()) if positive.size else 1.0
            # variance per unit mean: 1 (Poisson) or 1 / w_g (quasi-Poisson)
            excess = 1.0 if self.weight is None else 1.0 / np.maximum(self.weight, _TINY)
            denom = mean * excess
            info = np.divide(self.s_bar**2, denom[None, :], out=np.zeros_like(self.s_bar),
                             where=denom[None, :] > 0).sum(axis=1).mean()
            out[members] = depth * (float(info) if info > 0 else 1.0)
        return out

    def statistics(self, x: np.ndarray, pool=None, *, loglik: bool = True
                   ) -> tuple[np.ndarray, np.ndarray]:
        """``acc`` (``n_spots × n_states``) and each spot's ``Σ_g y log (x S̄)_g``.

        One compiled pass over the non-zeros, or, where at least :data:`DENSE_MIN_DENSITY` of
        the counts are non-zero, matrix products on a dense copy (one BLAS thread per worker);
        rows split over threads (of ``pool`` if given). With ``loglik=False`` the second is
        all 0 (and the pass costs about two thirds, a third with the products).
        """
        n = x.shape[0]
        acc = np.empty_like(x)
        out = np.empty(n)
        s_t = np.ascontiguousarray(self.s_bar.T)
        dense = self._dense
        if dense is None:
            c = self.counts
            map_threads(
                lambda lo, hi: _ratio_products(c.indptr, c.indices, self._data, x, s_t, lo, hi,
                                               acc, out, loglik),
                row_ranges(n),
                pool,
            )
            return acc, out

        def rows(lo, hi):
            mu = x[lo:hi] @ self.s_bar
            np.maximum(mu, 1e-300, out=mu)  # the floor of the compiled pass
            np.matmul(dense[lo:hi] / mu, s_t, out=acc[lo:hi])
            if loglik:
                np.log(mu, out=mu)
                mu *= dense[lo:hi]
                out[lo:hi] = mu.sum(axis=1)
            else:
                out[lo:hi] = 0.0

        # one BLAS thread per worker: the workers already use every core
        with _blas_controller().limit(limits=1, user_api="blas"):
            map_threads(rows, row_ranges(n), pool)
        return acc, out

    def evaluate(self, x: np.ndarray, pool=None, *, loglik: bool = True
                 ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Per spot data term (``None`` with ``loglik=False``), ``acc`` and the linear
        coefficients ``b_ik = N_i σ_k`` of the MM step (``σ_k = Σ_g w_g S̄_kg``)."""
        acc, ll = self.statistics(x, pool, loglik=loglik)
        data = self.data_term(x, ll) if loglik else None
        return data, acc, self.library[:, None] * self._sigma[None, :]

    def data_term(self, x: np.ndarray, loglik: np.ndarray | None = None) -> np.ndarray:
        """Per spot ``Σ_g w_g [μ_ig − y_ig log (x_i S̄)_g]`` (the Poisson NLL up to a constant)."""
        if loglik is None:
            _, loglik = self.statistics(x)
        return self.library * (x @ self._sigma) - loglik

    def held_out_deviance(self, x: np.ndarray) -> float:
        """Poisson deviance of these counts under the composition ``x``, each spot at its depth.

        Each spot's prediction is ``N_i · x_i S̄ / Σ_g (x_i S̄)_g``: only the composition is
        judged, not the overall scale that a ridge shrinks. Spots with no counts add nothing.
        Unweighted: held-out parts are scored as plain counts whatever the fit's gene weights.
        """
        if self.weight is not None:
            return replace(self, weight=None).held_out_deviance(x)
        total = x @ self.s_bar.sum(axis=1)
        scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
        _, loglik = self.statistics(x * scale[:, None])
        c = self.counts
        y = c.data
        ylogy = np.zeros(c.shape[0])
        np.add.at(ylogy, np.repeat(np.arange(c.shape[0]), np.diff(c.indptr)), y * np.log(y))
        lib = self.library
        with np.errstate(divide="ignore", invalid="ignore"):
            ylogn = np.where(lib > 0, lib * np.log(np.where(lib > 0, lib, 1.0)), 0.0)
        # 2 Σ_g [y log(y/μ) − (y − μ)] with Σ μ = Σ y = N_i
        return float(2.0 * (ylogy - loglik - ylogn).sum())


@functools.cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _type_sums(x: np.ndarray, owner: np.ndarray | None, n_groups: int) -> np.ndarray:
    if owner is None:
        return x
    z = np.zeros((x.shape[0], n_groups))
    for k, t in enumerate(owner):
        z[:, t] += x[:, k]
    return z


def solve_counts(
    problem: CountProblem,
    *,
    w: sparse.spmatrix | None = None,
    penalty_ridge: float = 0.0,
    penalty_spatial: float = 0.0,
    owner: np.ndarray | None = None,
    x0: np.ndarray | None = None,
    n_iter: int = 500,
    tol: float = 1e-6,
    on_iter: Callable[[int, float, float], None] | None = None,
) -> SolverResult:
    """Minimise ``F(X)`` (module docstring) by MM iterations from ``x0``.

    Parameters
    ----------
    problem
        Counts, library sizes and signatures.
    w
        ``n_spots × n_spots`` symmetric sparse graph; used when ``penalty_spatial > 0``.
    penalty_ridge, penalty_spatial
        Absolute penalty weights ``λ_r``, ``λ_s`` of ``F``, in counts (the caller multiplies
        the unit-free ``lambda_ridge`` / ``lambda_spatial`` of ``deconvolve`` by
        ``problem.scales``): numbers, or one per spot (``n_spots``), which must then be equal
        at the two ends of every edge of ``w`` (e.g. one value per section).
    owner
        ``n_states`` cell type of each column (``Z = X M``); ``None``: columns are types.
    x0
        Positive start (``n_spots × n_states``); ``None`` gives an even composition at each
        spot's depth. Coordinates that start at 0 stay 0.
    n_iter
        Maximum iterations.
    tol
        Stop when ``||X_t − X_{t−1}||_F / ||X_t||_F < tol`` (as the least-squares solver).
    on_iter
        Called as ``on_iter(iteration, objective, relative_change)``.

    Returns
    -------
    :class:`~spotlens.deconv._solver.SolverResult`; ``objective`` holds ``F`` after every
    iteration (index 0 is the start) and never increases.
    """
    lambda_ridge, lambda_spatial = penalty_ridge, penalty_spatial
    s_bar = problem.s_bar
    n, n_states = problem.counts.shape[0], s_bar.shape[0]
    sigma = s_bar.sum(axis=1)
    lib = problem.library
    if x0 is None:
        x = np.full((n, n_states), 1.0 / max(float(sigma.sum()), _TINY))
    else:
        x = np.array(x0, dtype=np.float64)
    x[lib == 0] = 0.0  # a spot without counts gets its composition from its neighbours only
    lam_r = np.broadcast_to(np.asarray(lambda_ridge, dtype=np.float64), (n,))
    lam_s = np.broadcast_to(np.asarray(lambda_spatial, dtype=np.float64), (n,))
    spatial = bool((lam_s > 0).any()) and w is not None and w.nnz > 0
    if spatial:
        w = sparse.csr_matrix(w, dtype=np.float64)
        deg = np.asarray(w.sum(axis=1)).ravel()
        empty = lib == 0
        if empty.any():  # start empty spots from their neighbours' mean
            x[empty] = np.asarray(w[empty] @ x) / np.maximum(deg[empty], _TINY)[:, None]
            x[empty & (x.sum(axis=1) == 0)] = 1.0 / max(float(sigma.sum()), _TINY)
    n_groups = int(owner.max()) + 1 if owner is not None else n_states
    tasks = row_ranges(n)
    pool = ThreadPoolExecutor(len(tasks)) if len(tasks) > 1 else None
    try:
        return _iterate(problem, x, w if spatial else None, lam_r[:, None], lam_s[:, None],
                        owner, n_groups, n_iter, tol, on_iter, pool)
    finally:
        if pool is not None:
            pool.shutdown()


def _iterate(problem, x, w, lambda_ridge, lambda_spatial, owner, n_groups, n_iter, tol, on_iter,
             pool) -> SolverResult:
    """The iterations of :func:`solve_counts` (``w`` is ``None`` without smoothing).

    ``lambda_ridge`` and ``lambda_spatial`` are ``n_spots × 1`` columns.

    Each iteration is one SQUAREM step (Varadhan & Roland 2008, scheme S3, with its stabilising
    MM step): from two MM steps ``x → x₁ → x₂`` it extrapolates to ``x_e`` and takes one MM step
    from there; that point is kept if its objective is not above the objective at ``x``, else
    the iteration falls back to an MM step from ``x₂``. So the objective never increases, and
    the objective (whose logarithms are most of a pass's cost) is computed once per iteration
    in the common case: three passes over the counts, one with logarithms.
    """
    lib = problem.library
    spatial = w is not None
    deg = np.asarray(w.sum(axis=1)).ravel() if spatial else None
    has_counts = lib > 0

    def evaluate(xx, objective=True):
        data, acc, lin = problem.evaluate(xx, pool, loglik=objective)
        zz = _type_sums(xx, owner, n_groups)
        if not objective:
            return np.nan, acc, lin, zz
        value = float(data.sum()) + float((lambda_ridge * xx * xx).sum())
        if spatial:
            value += float((lambda_spatial * (deg[:, None] * zz - w @ zz) * zz).sum())
        return value, acc, lin, zz

    def step(xx, acc, lin, zz):
        c = xx * acc
        b = np.array(lin, dtype=np.float64)
        a = np.broadcast_to(lambda_ridge, xx.shape).copy()
        if spatial:
            v = deg[:, None] * zz + np.asarray(w @ zz)
            ratio = 1.0 if owner is None else zz[:, owner] / np.maximum(xx, _TINY)
            a = a + 2.0 * lambda_spatial * deg[:, None] * ratio
            b = b - 2.0 * lambda_spatial * (v if owner is None else v[:, owner])
        return _positive_root(a, b, c)

    current = evaluate(x)
    history = [current[0]]
    converged = False
    it = 0
    for it in range(1, n_iter + 1):
        x1 = step(x, *current[1:])
        x2 = step(x1, *evaluate(x1, objective=False)[1:])
        r, v = x1 - x, x2 - 2.0 * x1 + x
        alpha = -np.sqrt((r * r).sum() / max(float((v * v).sum()), 1e-300))
        new = None
        if alpha < -1.0:
            # extrapolate; a coordinate is kept off 0 where its spot has counts, else an MM
            # step (multiplicative in the data term) could never move it again
            xe = x - 2.0 * alpha * r + alpha * alpha * v
            floor = np.where(has_counts[:, None], 1e-12 * np.maximum(x2.max(1, keepdims=True),
                                                                      _TINY), 0.0)
            xe = np.maximum(xe, floor)
            xn = step(xe, *evaluate(xe, objective=False)[1:])
            en = evaluate(xn)
            if en[0] <= current[0]:
                new = xn, en
        if new is None:  # plain MM steps: the objective cannot increase (up to rounding)
            xn = step(x2, *evaluate(x2, objective=False)[1:])
            en = evaluate(xn)
            new = (xn, en) if en[0] <= current[0] else (x, current)
        x_prev = x
        x, current = new
        history.append(current[0])
        change = np.sqrt(((x - x_prev) ** 2).sum() / max(float((x * x).sum()), 1e-300))
        if on_iter is not None:
            on_iter(it, history[-1], change)
        if change < tol:
            converged = True
            break
    return SolverResult(x=x, objective=np.asarray(history), n_sweeps=it, converged=converged)


def _positive_root(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Minimiser over ``x ≥ 0`` of ``a x² + b x − c log x`` (``a, c ≥ 0``), elementwise.

    The positive root of ``2a x² + b x − c = 0`` in the form that does not cancel:
    ``2c / (b + √(b² + 8ac))`` for ``b > 0``, ``(−b + √(b² + 8ac)) / (4a)`` otherwise; with
    ``c = 0`` it is ``max(0, −b / 2a)``.
    """
    root = np.sqrt(b * b + 8.0 * a * c)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = np.where(b > 0, 2.0 * c / (b + root), (root - b) / (4.0 * a))
    return np.where(np.isfinite(pos), np.maximum(pos, 0.0), 0.0)
