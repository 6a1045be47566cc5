"""Log-normalised PCA embedding, fitted on a subsample and applied in chunks."""

from __future__ import annotations

import numpy as np
from scipy import sparse

_CHUNK_ELEMENTS = 20_000_000  # dense values per chunk (160 MB in float64)


def _log_normalise(block, scale: float) -> np.ndarray:
    if sparse.issparse(block):
        # log1p keeps zeros at zero: transform the non-zeros only, densify at the end
        return _log_normalise_sparse(block, scale).toarray()
    dense = np.asarray(block, dtype=np.float64)
    lib = dense.sum(axis=1, keepdims=True)
    dense = np.divide(dense, lib, out=np.zeros_like(dense), where=lib > 0)
    return np.log1p(dense * scale)


def _log_normalise_sparse(block, scale: float) -> sparse.csr_matrix:
    block = sparse.csr_matrix(block, dtype=np.float64, copy=True)
    lib = np.asarray(block.sum(axis=1)).ravel()
    factor = np.divide(scale, lib, out=np.zeros_like(lib), where=lib > 0)
    block.data *= np.repeat(factor, np.diff(block.indptr))
    np.log1p(block.data, out=block.data)
    return block


def fit_log_pca(counts, n_comps: int, *, seed: int, max_fit: int, iterated_power="auto",
                blas_threads: int | None = None, solver: str = "randomized"):
    """Fit the PCA of :func:`log_pca` on at most ``max_fit`` seeded random rows.

    For callers that project the rows themselves (e.g. sparse rows in a compiled pass): each
    row ``x`` is embedded as ``pca.transform(log1p(x · scale / lib))``.

    Parameters
    ----------
    counts
        ``n_obs × n_genes`` non-negative expression, dense or sparse.
    n_comps
        Components, capped at ``min(n_obs, n_genes) − 1``.
    seed
        Seed for the subsample and the SVD.
    max_fit
        Rows used to fit the PCA.
    iterated_power
        Power iterations of the randomized SVD (sklearn's ``PCA``).
    blas_threads
        Cap on BLAS threads during the fit (None: no cap).
    solver
        ``"randomized"`` densifies the fitted rows (sklearn's randomized SVD); ``"arpack"``
        keeps sparse ``counts`` sparse (sklearn centres them implicitly) and computes the
        leading components exactly, several times faster on sparse counts (dense counts always
        use the randomized solver).

    Returns
    -------
    pca
        The fitted ``sklearn.decomposition.PCA``.
    scale
        The median library size that rows are scaled to.
    lib
        The ``n_obs`` library sizes (float64).
    """
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    n, g = counts.shape
    lib = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    scale = float(np.median(lib[lib > 0])) if np.any(lib > 0) else 1.0
    n_comps = int(max(1, min(n_comps, g - 1, n - 1)))
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, size=max_fit, replace=False)) if n > max_fit else np.arange(n)
    with threadpool_limits(blas_threads, user_api="blas"):
        if solver == "arpack" and sparse.issparse(counts):
            pca = PCA(n_components=n_comps, svd_solver="arpack", random_state=seed)
            pca.fit(_log_normalise_sparse(counts[fit_rows], scale))
        else:
            pca = PCA(n_components=n_comps, svd_solver="randomized", random_state=seed,
                      iterated_power=iterated_power)
            pca.fit(_log_normalise(counts[fit_rows], scale))
    return pca, scale, lib


def log_pca(
    counts: sparse.spmatrix | np.ndarray,
    n_comps: int = 20,
    *,
    seed: int = 0,
    max_fit: int = 20_000,
    iterated_power: int | str = "auto",
) -> np.ndarray:
    """PCA embedding of ``log1p`` library-size-normalised expression.

    Each row is divided by its sum, scaled to the median library size and ``log1p``-transformed;
    a randomized PCA is fitted on at most ``max_fit`` rows (random, seeded) and applied to every
    row in chunks, so memory stays O(chunk × n_genes) whatever the number of rows. The result
    is scaled so that its mean squared entry is 1.

    Parameters
    ----------
    counts
        ``n_obs × n_genes`` non-negative expression (counts or normalised), dense or sparse.
    n_comps
        Components, capped at ``min(n_obs, n_genes) − 1``.
    seed
        Seed for the subsample and the randomized SVD.
    max_fit
        Rows used to fit the PCA.
    iterated_power
        Power iterations of the randomized SVD (sklearn's ``PCA``; ``"auto"`` = its default).

    Returns
    -------
    ``n_obs × n_comps`` embedding (float64).
    """
    counts = sparse.csr_matrix(counts) if sparse.issparse(counts) else np.asarray(counts)
    n, g = counts.shape
    pca, scale, _ = fit_log_pca(counts, n_comps, seed=seed, max_fit=max_fit,
                                iterated_power=iterated_power)
    n_comps = pca.n_components_
    z = np.empty((n, n_comps))
    chunk = max(1, _CHUNK_ELEMENTS // max(g, 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        z[start:stop] = pca.transform(_log_normalise(counts[start:stop], scale))
    rms = float(np.sqrt(np.mean(z**2)))
    return z / rms if rms > 0 else z
