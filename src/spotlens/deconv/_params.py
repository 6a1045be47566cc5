"""Validation of the scalar parameters of :func:`spotlens.deconv.deconvolve`."""

from __future__ import annotations

import numpy as np

from .._validation import InputError


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def check_params(**p) -> None:
    """Raise :class:`InputError` naming the first parameter out of range."""
    k = p["k_neighbors"]
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise InputError(f"k_neighbors must be a positive integer, got {k!r}.")
    for name in ("lambda_ridge", "lambda_spatial"):
        v = p[name]
        if isinstance(v, str) and v == "auto":
            continue
        if not _is_number(v) or not np.isfinite(v) or v < 0:
            raise InputError(f"{name} must be a number ≥ 0 or 'auto', got {v!r}.")
    n_iter = p["n_iter"]
    if not isinstance(n_iter, (int, np.integer)) or isinstance(n_iter, bool) or n_iter < 1:
        raise InputError(f"n_iter must be a positive integer, got {n_iter!r}.")
    if not _is_number(p["tol"]) or not p["tol"] > 0:
        raise InputError(f"tol must be > 0, got {p['tol']!r}.")
    folds = p["cv_folds"]
    if not isinstance(folds, (int, np.integer)) or isinstance(folds, bool) or folds < 2:
        raise InputError(f"cv_folds must be an integer ≥ 2, got {folds!r}.")
    cv_max = p["cv_max_spots"]
    if not isinstance(cv_max, (int, np.integer)) or isinstance(cv_max, bool) or cv_max < 100:
        raise InputError(f"cv_max_spots must be an integer ≥ 100, got {cv_max!r}.")
    alpha = p["alpha"]
    if alpha is not None and not (_is_number(alpha) and np.isfinite(alpha) and alpha > 0):
        raise InputError(f"alpha must be > 0 or None (automatic), got {alpha!r}.")
    if p["fit_quality"] not in ("auto", True, False):
        raise InputError(f"fit_quality must be True, False or 'auto', got {p['fit_quality']!r}.")
    if p["likelihood"] not in ("auto", "quasi_poisson", "poisson", "gaussian"):
        raise InputError(
            "likelihood must be 'auto', 'quasi_poisson', 'poisson' or 'gaussian', got "
            f"{p['likelihood']!r}."
        )
    if p["gene_weights"] not in ("poisson", "none"):
        raise InputError(f"gene_weights must be 'poisson' or 'none', got {p['gene_weights']!r}.")
    temp = p["attention_temperature"]
    if not _is_number(temp) or not temp > 0:
        raise InputError(f"attention_temperature must be > 0, got {temp!r}.")
    every = p["attention_update_every"]
    if every is not None and (
        not isinstance(every, (int, np.integer)) or isinstance(every, bool) or every < 1
    ):
        raise InputError(
            f"attention_update_every must be a positive integer or None, got {every!r}."
        )
