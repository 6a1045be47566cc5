"""Fitting the count likelihood of :mod:`spotlens.deconv._poisson`: penalties, gene weights.

- :func:`cross_validate_counts` / :func:`cv_counts`: the penalties by count splitting,
- :func:`with_dispersion`: quasi-Poisson gene weights from a first Poisson fit, and a start,
- :func:`fit_counts`: the final fit with unit-free penalties (scaled per section), with the
  attention graph optionally rebuilt from the current proportions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pandas as pd
from scipy import sparse
from tqdm.auto import tqdm

from ._dispersion import quasi_poisson_weights
from ._model import run_stretches, thin_counts
from ._poisson import CountProblem, solve_counts

#: Penalty grids of the count likelihood (unit-free: relative to the data term's curvature).
#: No ridge: a ridge only shrinks every type towards 0 under this likelihood.
RIDGE_GRID = (0.0,)
SPATIAL_GRID = (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
#: Stopping tolerance of the cross-validation fits (warm-started along the grid) and how many
#: grid points in a row may score worse than the best before the path stops; both set on the
#: development simulations (seeds 0-3; benchmarks/results/docstring_figures.md).
CV_TOL = 3e-3
CV_PATIENCE = 1
#: Share of an even composition mixed into the start that :func:`with_dispersion` returns.
START_EVEN = 0.1



def cross_validate_counts(
    counts: sparse.csr_matrix,
    s_bar: np.ndarray,
    w: sparse.csr_matrix,
    *,
    owner: np.ndarray | None,
    sections: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    ridge_grid: tuple[float, ...],
    spatial_grid: tuple[float, ...],
    n_folds: int,
    seed: int,
    n_iter: int,
    tol: float,
    patience: int = CV_PATIENCE,
    on_fit: Callable[[], None] | None = None,
    x0: np.ndarray | None = None,
) -> tuple[float, float, pd.DataFrame]:
    """Choose the penalties of the count likelihood by count-splitting cross-validation.

    As :func:`spotlens.deconv._model.cross_validate`, with the fit of :func:`solve_counts` and
    the score the Poisson deviance of the held-out part (:meth:`CountProblem.held_out_deviance`,
    composition only). Each spot's counts are split at random into ``n_folds`` parts (binomial
    thinning: independent Poisson parts); the model is fitted on all but one and scored on it.
    Penalties are unit-free (multiplied by each training problem's
    :meth:`CountProblem.scales` per section, which already follow the training depth). The
    ridge is chosen first without smoothing, then the spatial weight from the best unsmoothed fits (warm starts); each path stops once
    the held-out deviance has risen ``patience`` times in a row past the best so far.

    Returns
    -------
    lambda_ridge, lambda_spatial, and the table of held-out deviance per grid point (NaN: not
    run).
    """
    parts = thin_counts(counts, n_folds, np.random.default_rng(seed))
    total = sum(parts[1:], parts[0])
    splits = [
        (CountProblem.from_counts(total - part, s_bar, weight),
         CountProblem.from_counts(part, s_bar))
        for part in parts
    ]
    del parts, total

    scales = [train.scales(sections) for train, _ in splits]

    def path(pairs, starts, best=np.inf):
        errors = np.full(len(pairs), np.nan)
        fits, x, rises = [], list(starts), 0
        for g, (lr, ls) in enumerate(pairs):
            errors[g] = 0.0
            for f, (train, held) in enumerate(splits):
                res = solve_counts(train, w=w, penalty_ridge=lr * scales[f],
                                   penalty_spatial=ls * scales[f], owner=owner, x0=x[f],
                                   n_iter=n_iter, tol=tol)
                x[f] = res.x
                errors[g] += held.held_out_deviance(x[f]) / n_folds
                if on_fit is not None:
                    on_fit()
            fits.append(list(x))
            rises = 0 if errors[g] < best else rises + 1
            best = min(best, errors[g])
            if rises >= patience:
                break
        return errors, fits

    ridge_pairs = [(float(v), 0.0) for v in ridge_grid]
    ridge_err, ridge_fits = path(ridge_pairs, [x0] * n_folds)
    at = int(np.nanargmin(ridge_err))
    best_r = ridge_pairs[at][0]
    smooth_pairs = [(best_r, float(v)) for v in sorted(spatial_grid) if v > 0]
    smooth_err, _ = path(smooth_pairs, ridge_fits[at],
                         best=ridge_err[at] if 0.0 in spatial_grid else np.inf)
    table = pd.DataFrame(ridge_pairs + smooth_pairs, columns=["lambda_ridge", "lambda_spatial"])
    table["error"] = np.concatenate([ridge_err, smooth_err])
    candidates = table[table.lambda_ridge == best_r]
    if 0.0 not in spatial_grid:
        candidates = candidates[candidates.lambda_spatial > 0]
    best = candidates.loc[candidates.error.idxmin()]
    return best_r, float(best.lambda_spatial), table


def cv_counts(counts, s_bar, w, *, owner, sections, lambda_ridge, lambda_spatial, cv_folds, seed,
               n_iter, tol, progress, weight=None, x0=None):
    """Penalties of the count likelihood by count splitting, with a progress bar.

    ``"auto"`` searches :data:`RIDGE_GRID` / :data:`SPATIAL_GRID` (unit-free, relative to
    :meth:`CountProblem.scales`); a number is taken as given. Returns ``lambda_ridge,
    lambda_spatial`` and the table of held-out deviance (one row of NaN when nothing was
    chosen).
    """
    ridge = RIDGE_GRID if lambda_ridge == "auto" else (float(lambda_ridge),)
    smooth = SPATIAL_GRID if lambda_spatial == "auto" else (float(lambda_spatial),)
    if len(ridge) == 1 and len(smooth) == 1:  # nothing to choose (the ridge grid is one value)
        table = pd.DataFrame({"lambda_ridge": ridge, "lambda_spatial": smooth, "error": np.nan})
        return ridge[0], smooth[0], table
    bar = tqdm(total=cv_folds * (len(ridge) + len(smooth)), desc="spotlens cross-validation",
               disable=not progress, leave=False)
    try:
        return cross_validate_counts(
            counts, s_bar, w, owner=owner, sections=sections, weight=weight, ridge_grid=ridge,
            spatial_grid=smooth,
            n_folds=cv_folds, seed=seed, n_iter=min(n_iter, 200), tol=max(tol, CV_TOL),
            on_fit=lambda: bar.update(1), x0=x0,
        )
    finally:
        bar.close()


def fit_counts(problem, w, *, owner, sections, lambda_ridge, lambda_spatial, n_iter, tol,
                progress, attention_update, x0=None):
    """Fit the count likelihood with unit-free penalties (scaled per section).

    With ``attention_update = (every, rebuild)`` the graph is rebuilt from the current
    proportions every ``every`` iterations, as in :func:`spotlens.deconv._model.fit`; the
    objective never increases between two rebuilds. Returns ``x``, the objective per
    iteration, the iterations run, whether it converged and the graph used last.
    """
    scales = problem.scales(sections)
    bar = tqdm(total=n_iter, desc="spotlens MM iterations", disable=not progress, leave=False)

    def tick(it, obj, change):
        bar.update(1)
        bar.set_postfix(objective=f"{obj:.6g}", change=f"{change:.2e}")

    def stretch(graph, x, n):
        return solve_counts(
            problem, w=graph, penalty_ridge=lambda_ridge * scales,
            penalty_spatial=lambda_spatial * scales, owner=owner, x0=x, n_iter=n, tol=tol,
            on_iter=tick,
        )

    try:
        return run_stretches(stretch, w, x0, n_iter=n_iter,
                             attention_update=attention_update if lambda_spatial > 0 else None)
    finally:
        bar.close()


def with_dispersion(problem: CountProblem, *, owner, tol: float = 1e-4, n_iter: int = 200
                    ) -> tuple[CountProblem, np.ndarray]:
    """``problem`` with quasi-Poisson gene weights from a first, unsmoothed Poisson fit.

    Each gene's negative binomial dispersion ``φ_g`` is estimated around the first fit's
    expected counts ``μ`` and shrunk across genes
    (:func:`spotlens.deconv._dispersion.gene_dispersion`); its weight is the
    information-weighted mean of ``1 / (1 + φ_g μ_ig)`` over spots,
    ``w_g = Σ_i μ_ig / Σ_i μ_ig (1 + φ_g μ_ig)``, scaled so that the largest is 1. That is the
    negative binomial's weight of the gene at its typical expected count, held fixed across
    spots so that the fit stays sparse (a full negative binomial term needs every gene of every
    spot in every iteration and gave the same accuracy on the simulations).

    Also returns a start for the fits that follow: the first fit, mixed with an even
    composition at each spot's scale (share :data:`START_EVEN`) so that no coordinate starts at
    0 (the MM steps are multiplicative, so a 0 would stay 0).
    """
    first = solve_counts(replace(problem, weight=None), owner=owner, n_iter=n_iter, tol=tol).x
    lib = problem.library

    def expected(lo, hi):
        return lib[lo:hi, None] * (first[lo:hi] @ problem.s_bar)

    weight = quasi_poisson_weights(problem.counts, expected)
    even = first.sum(axis=1, keepdims=True) / first.shape[1]
    return replace(problem, weight=weight), (1.0 - START_EVEN) * first + START_EVEN * even
