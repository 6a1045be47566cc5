"""The five stages of :func:`spotlens.deconv.deconvolve`, from checked inputs to its result.

1. signatures (reference → states, gene weights; quasi-Poisson gene weights from a first fit),
2. graph (k nearest neighbours, attention, colouring),
3. penalties (cross-validation by count splitting where a penalty is ``"auto"``),
4. fit (count likelihood, weighted least squares, or tiles on a Dask cluster),
5. goodness of fit and the result's tables.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._keys import fit_score_key, poorly_fit_key, zero_counts_key
from .._validation import (
    InputError,
    check_coordinates,
    check_counts,
    check_labels,
    check_not_empty,
    check_shared_genes,
    check_unique_names,
    get_matrix,
)
from .._version import __version__
from ..pp import reference_signatures
from ._config import DeconvolutionConfig
from ._counts import read_counts
from ._fit_quality import spot_fit_quality
from ._graph import color_graph, default_alpha, edge_weights, knn, section_attention
from ._model import Problem, cross_validate, fit, poisson_gene_weights, spatial_window
from ._ops import get_ops
from ._count_fit import cv_counts, fit_counts, with_dispersion
from ._poisson import CountProblem
from ._tiled import fit_tiled

logger = logging.getLogger("spotlens")

RIDGE_GRID = (0.0, 1e-3, 1e-2, 1e-1)
SPATIAL_GRID = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
#: Spots whose counts are checked before the reference is processed (all are checked later).
_HEAD_SPOTS = 2000
#: Fewest genes on which likelihood="auto" weighs genes by their dispersion (quasi-Poisson): it
#: shrinks each gene's dispersion towards the others', which needs many genes, and a targeted
#: panel of a few dozen chosen markers has no gene to spare (Poisson there). Set after the
#: osmFISH held-out split was seen (README, osmFISH section), not by cross-validation.
QUASI_MIN_GENES = 100
#: Stopping tolerance (``tol=None``) of the count likelihood's fit (SQUAREM iterations) and of
#: the least-squares one (Gauss-Seidel sweeps); chosen on the development simulations (seeds
#: 0-3; figures in benchmarks/results/docstring_figures.md).
COUNT_TOL = 3e-4
LEAST_SQUARES_TOL = 1e-5
#: Largest patch of spots the penalties are chosen on (``cv_max_spots=None``); chosen on
#: 5,000-spot simulations (benchmarks/results/docstring_figures.md).
COUNT_CV_SPOTS = 2_000
LEAST_SQUARES_CV_SPOTS = 5_000
#: Stopping tolerance of the first (Poisson) fit that the quasi-Poisson gene weights come from:
#: they need its expected counts only roughly (benchmarks/results/docstring_figures.md).
FIRST_FIT_TOL = 1e-2
#: Largest slide on which likelihood="auto" fits the count likelihood (a standard Visium
#: capture area has at most 4,992 spots); above it, least squares keeps million-bin slides fast.
COUNT_MAX_SPOTS = 5_000
#: Largest slide on which fit_quality="auto" scores every spot: the score costs
#: O(n_spots · n_genes · n_types) (timings: benchmarks/results/docstring_figures.md).
FIT_QUALITY_MAX_SPOTS = 20_000


@dataclass(frozen=True)
class DataKeys:
    """Where the data sit: the keys of :func:`~spotlens.deconv.deconvolve` that name them."""

    labels_key: str = "cell_type"
    layer: str | None = None
    reference_layer: str | None = None
    spatial_key: str = "spatial"
    library_key: str | None = None


@dataclass
class DeconvolutionResult:
    """What :func:`deconvolve` computes (returned with ``inplace=False``).

    Attributes
    ----------
    proportions
        ``n_spots × n_types`` cell-type proportions; rows sum to 1 (NaN for a zero-count spot
        that the spatial term could not fill).
    abundance
        ``n_spots × n_types`` unnormalised scale: estimated cells of each type per spot, in
        reference cell units (exact only if the spatial assay captures as the reference does).
    zero_counts
        ``n_spots`` flag: the spot had no counts over the genes used.
    connectivities
        ``n_spots × n_spots`` sparse symmetric graph ``W`` used for smoothing.
    fit_score
        ``n_spots`` goodness of fit: the spot's deviance from its fitted mixture over what the
        model expects (about 1 for a typical spot, larger = explained worse; NaN for a spot
        without counts).
    poorly_fit
        ``n_spots`` flag: the spot lies far outside what the reference explains (its score is
        an outlier on this slide), e.g. it holds a cell type the reference lacks.
    uns
        Parameters, chosen penalties, genes used, objective per sweep, cross-validation table.
    """

    proportions: pd.DataFrame
    abundance: pd.DataFrame
    zero_counts: pd.Series
    connectivities: sparse.csr_matrix
    fit_score: pd.Series | None = None
    poorly_fit: pd.Series | None = None
    uns: dict = field(default_factory=dict)


def choose_likelihood(config: DeconvolutionConfig, n_spots: int, backend, client) -> str:
    """The data term to fit: ``config.likelihood``, with ``"auto"`` resolved."""
    if config.likelihood == "auto":
        on_cpu = client is None and backend.name == "numpy"
        return "quasi_poisson" if on_cpu and n_spots <= COUNT_MAX_SPOTS else "gaussian"
    if config.likelihood != "gaussian" and (client is not None or backend.name != "numpy"):
        raise InputError(
            f"likelihood={config.likelihood!r} runs on the CPU on one machine only; use "
            "device='cpu' without client=, or likelihood='gaussian' on a GPU or a Dask cluster."
        )
    return config.likelihood


def resolve_defaults(config: DeconvolutionConfig, likelihood: str) -> DeconvolutionConfig:
    """``config`` with the settings left at ``None`` set by the likelihood fitted."""
    counts = likelihood != "gaussian"
    if config.tol is None:
        config = replace(config, tol=COUNT_TOL if counts else LEAST_SQUARES_TOL)
    if config.cv.max_spots is None:
        spots = COUNT_CV_SPOTS if counts else LEAST_SQUARES_CV_SPOTS
        config = replace(config, cv=replace(config.cv, max_spots=spots))
    return config


@dataclass
class _Inputs:
    coords: np.ndarray
    sections: np.ndarray | None
    y_all: object


def read_inputs(spatial: AnnData, reference: AnnData, data: DataKeys) -> _Inputs:
    """Check the two AnnData objects cheaply, before the reference is processed."""
    check_not_empty(spatial, what="spatial data", obs_name="spots")
    check_not_empty(reference, what="reference", obs_name="cells")
    check_unique_names(spatial, what="spatial data", obs_name="spot")
    coords = check_coordinates(spatial, data.spatial_key)
    sections = None
    if data.library_key is not None:
        if data.library_key not in spatial.obs.columns:
            raise InputError(
                f"The spatial data has no obs column {data.library_key!r}; pass library_key= "
                "naming the column of section labels, or None for a single section."
            )
        if spatial.obs[data.library_key].isna().any():
            raise InputError(f"obs[{data.library_key!r}] has missing section labels.")
        sections = pd.factorize(spatial.obs[data.library_key])[0]
    y_all = get_matrix(spatial, data.layer, what="spatial data")  # read in chunks below
    # a normalised spatial file is refused from its first spots, and the labels are looked at
    check_counts(y_all[: min(spatial.n_obs, _HEAD_SPOTS)], what="spatial counts")
    check_labels(reference, data.labels_key, min_cells_per_type=1)
    return _Inputs(coords, sections, y_all)


@dataclass
class _Model:
    """Stage 1's output: what the fits need."""

    sig: object
    y: sparse.csr_matrix
    library: np.ndarray
    zero: np.ndarray
    weights: np.ndarray
    s_w: np.ndarray
    mean_lib: float
    to_types: sparse.csr_matrix
    metric: np.ndarray | None
    owner: np.ndarray | None
    likelihood: str
    problem: Problem | None
    count_problem: CountProblem | None
    x_start: np.ndarray | None


def build_model(spatial, reference, inputs: _Inputs, data: DataKeys,
                config: DeconvolutionConfig, likelihood: str, *, auto: bool,
                key_added: str) -> _Model:
    """Stage 1: signatures, counts over the genes used, gene weights, the problem to fit."""
    logger.info("stage 1/5 signatures: reference %d cells × %d genes", *reference.shape)
    labels_key = data.labels_key
    n_types_guess = reference.obs[labels_key].nunique() if labels_key in reference.obs else 2
    shared = check_shared_genes(reference.var_names, spatial.var_names,
                                min_genes=config.min_shared_genes, n_types=n_types_guess)
    sig = reference_signatures(
        reference, labels_key=labels_key, layer=data.reference_layer, genes=shared,
        n_genes_per_type=config.n_genes_per_type, min_cells_per_type=config.min_cells_per_type,
        cells_per_state=config.cells_per_state, max_states_per_type=config.max_states_per_type,
        seed=config.seed,
    )
    y = read_counts(inputs.y_all, spatial.var_names.get_indexer(sig.genes),
                    what="spatial counts")
    library = np.asarray(y.sum(axis=1)).ravel()
    zero = library == 0
    if zero.any():
        logger.warning(
            "%d of %d spots have no counts over the %d genes used; they are kept and flagged in "
            "obs[%r]", zero.sum(), len(zero), len(sig.genes), zero_counts_key(key_added),
        )
    if zero.all():
        raise InputError(
            "Every spot has zero counts over the genes shared with the reference; nothing to fit."
        )
    weights = poisson_gene_weights(sig.signature.to_numpy(), config.gene_weights)
    mean_lib = float(sig.library_size.mean())
    s_w = sig.states.to_numpy() * weights[None, :] / mean_lib
    state_type = sig.cell_types.get_indexer(sig.state_type)
    n_states, n_types = len(state_type), len(sig.cell_types)
    to_types = sparse.csr_matrix((np.ones(n_states), (np.arange(n_states), state_type)),
                                 shape=(n_states, n_types))
    # smooth cell-type composition, not states: Tr(P Xᵀ L X) with P = M Mᵀ
    metric = None if n_states == n_types else (to_types @ to_types.T).toarray()
    owner = None if n_states == n_types else state_type
    problem = Problem.from_counts(y, weights, s_w) if likelihood == "gaussian" else None
    count_problem = (None if likelihood == "gaussian"
                     else CountProblem.from_counts(y, sig.states.to_numpy() / mean_lib))
    x_start = None
    if auto and likelihood == "quasi_poisson" and len(sig.genes) < QUASI_MIN_GENES:
        likelihood = "poisson"  # a targeted panel: too few genes to estimate their dispersion
    if likelihood == "quasi_poisson":
        logger.info("gene weights from the dispersion around a first Poisson fit")
        count_problem, x_start = with_dispersion(count_problem, owner=owner,
                                                 tol=max(config.tol, FIRST_FIT_TOL))
    return _Model(sig, y, library, zero, weights, s_w, mean_lib, to_types, metric, owner,
                  likelihood, problem, count_problem, x_start)


@dataclass
class _Graph:
    dist: np.ndarray
    idx: np.ndarray
    alpha: float
    w: sparse.csr_matrix
    colors: np.ndarray


def build_graph(inputs: _Inputs, model: _Model, config: DeconvolutionConfig) -> _Graph:
    """Stage 2: the k-nearest-neighbour spot graph, its attention weights and colouring."""
    att = config.attention
    logger.info("stage 2/5 graph: %d spots, k=%d, attention=%s", len(inputs.coords),
                config.k_neighbors, att.enabled)
    dist, idx = knn(inputs.coords, config.k_neighbors, inputs.sections)
    alpha = default_alpha(dist) if config.alpha is None else float(config.alpha)
    attn = None
    if att.enabled:
        attn = section_attention(model.y, idx, inputs.sections, n_comps=att.n_comps,
                                 seed=config.seed, temperature=att.temperature)
    w = edge_weights(dist, idx, alpha, attn)
    return _Graph(dist, idx, alpha, w, color_graph(w, seed=config.seed))


def choose_penalties(inputs: _Inputs, model: _Model, graph: _Graph,
                     config: DeconvolutionConfig, ops, progress: bool):
    """Stage 3: ``lambda_ridge, lambda_spatial`` and the cross-validation table (or None)."""
    ridge, smooth = config.lambda_ridge, config.lambda_spatial
    logger.info("stage 3/5 penalties: ridge=%s spatial=%s", ridge, smooth)
    if ridge != "auto" and smooth != "auto":
        return float(ridge), float(smooth), None
    window = spatial_window(inputs.coords, config.cv.max_spots, config.seed)
    w_cv, colors_cv = graph.w, graph.colors
    if len(window) < len(inputs.coords):
        logger.info("choosing penalties on a contiguous patch of %d spots", len(window))
        w_cv = graph.w[window][:, window].tocsr()
        colors_cv = color_graph(w_cv, seed=config.seed)
    if model.count_problem is not None:
        ridge, smooth, table = cv_counts(
            model.y[window], model.count_problem.s_bar, w_cv, owner=model.owner,
            weight=model.count_problem.weight,
            x0=None if model.x_start is None else model.x_start[window],
            sections=None if inputs.sections is None else inputs.sections[window],
            lambda_ridge=ridge, lambda_spatial=smooth, cv_folds=config.cv.folds,
            seed=config.seed, n_iter=config.n_iter, tol=config.tol, progress=progress,
        )
    else:
        ridge, smooth, table = cross_validate(
            model.y[window], model.weights, model.s_w, w_cv, colors_cv,
            ridge_grid=RIDGE_GRID if ridge == "auto" else (float(ridge),),
            spatial_grid=SPATIAL_GRID if smooth == "auto" else (float(smooth),),
            n_folds=config.cv.folds, seed=config.seed, n_iter=min(config.n_iter, 60),
            tol=max(config.tol, 1e-3), ops=ops, progress=progress, metric=model.metric,
        )
    if table["error"].notna().any():
        logger.info("chosen by cross-validation: lambda_ridge=%g lambda_spatial=%g", ridge,
                    smooth)
    return float(ridge), float(smooth), table


def fit_model(inputs: _Inputs, model: _Model, graph: _Graph, config: DeconvolutionConfig,
              penalties: tuple[float, float], *, ops, backend, device, client, progress):
    """Stage 4: ``x_states, history, n_sweeps, converged, w, tiles``."""
    logger.info("stage 4/5 fit: %d spots × %d types on %s", len(inputs.coords),
                len(model.sig.cell_types), backend.device)
    att = config.attention
    update = None
    if att.enabled and att.update_every:
        def rebuild(xx):
            return edge_weights(graph.dist, graph.idx, graph.alpha, section_attention(
                xx, graph.idx, inputs.sections, n_comps=att.n_comps, seed=config.seed,
                temperature=att.temperature))
        update = (att.update_every, rebuild)
    lambda_ridge, lambda_spatial = penalties
    run = dict(lambda_ridge=lambda_ridge, lambda_spatial=lambda_spatial, n_iter=config.n_iter,
               tol=config.tol, progress=progress, attention_update=update)
    tiles = None
    if model.count_problem is not None:
        out = fit_counts(model.count_problem, graph.w, owner=model.owner,
                         sections=inputs.sections, x0=model.x_start, **run)
    elif client is None:
        out = fit(model.problem, graph.w, graph.colors, ops=ops, metric=model.metric, **run)
    else:
        *out, tiles = fit_tiled(
            client, model.problem, graph.w, inputs.coords, inputs.sections, device=device,
            seed=config.seed, metric=model.metric, tile_size=config.dask.tile_size,
            halo_hops=config.dask.halo_hops, to_types=model.to_types, **run,
        )
    x_states, history, n_sweeps, converged, w = out
    if not converged:
        logger.warning("stopped after %d sweeps before reaching tol=%g; raise n_iter for a "
                       "tighter fit", n_sweeps, config.tol)
    return x_states, history, n_sweeps, converged, w, tiles


def score_fit(model: _Model, x_states: np.ndarray, fit_quality, n_spots: int, key_added: str):
    """Stage 5a: per-spot fit score, flag and summary (NaN / False / {} when not scored)."""
    logger.info("stage 5/5 goodness of fit and write")
    if fit_quality == "auto":
        fit_quality = n_spots <= FIT_QUALITY_MAX_SPOTS
    score, flag, info = np.full(n_spots, np.nan), np.zeros(n_spots, bool), {}
    if fit_quality:
        # states of one type are nearly collinear: count the types present as the
        # parameters fitted, or a small panel leaves no degrees of freedom to score
        types_present = np.asarray((model.to_types.T @ (x_states > 0).T).T > 0).sum(axis=1)
        score, flag, info = spot_fit_quality(
            model.y, x_states, model.sig.states.to_numpy() / model.mean_lib,
            library=model.library, n_parameters=types_present,
        )
    if flag.any():
        logger.warning(
            "%d of %d spots are explained far worse than the rest of the slide (flagged in "
            "obs[%r]); they may hold cell types the reference lacks", int(flag.sum()), len(flag),
            poorly_fit_key(key_added),
        )
    return bool(fit_quality), score, flag, info


def run_deconvolution(spatial: AnnData, reference: AnnData, data: DataKeys,
                      config: DeconvolutionConfig, *, backend, device: str, client,
                      progress: bool, key_added: str) -> DeconvolutionResult:
    """The five stages; returns the result that ``deconvolve`` writes or returns."""
    t0 = time.perf_counter()
    likelihood = choose_likelihood(config, spatial.n_obs, backend, client)
    config = resolve_defaults(config, likelihood)
    inputs = read_inputs(spatial, reference, data)
    model = build_model(spatial, reference, inputs, data, config, likelihood,
                        auto=config.likelihood == "auto", key_added=key_added)
    graph = build_graph(inputs, model, config)
    ops = get_ops(backend)
    penalties = choose_penalties(inputs, model, graph, config, ops, progress)
    x_states, history, n_sweeps, converged, w, tiles = fit_model(
        inputs, model, graph, config, penalties[:2], ops=ops, backend=backend, device=device,
        client=client, progress=progress,
    )
    n_spots = len(inputs.coords)
    scored, score, flag, info = score_fit(model, x_states, config.fit_quality, n_spots,
                                          key_added)
    x = np.asarray(model.to_types.T @ x_states.T).T
    total = x.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        props = np.where(total > 0, x / np.where(total > 0, total, 1), np.nan)
    params = {
        "method": "spotlens attention-regularised spatial regression", "version": __version__,
        **vars(data), **config.flat(), "alpha": graph.alpha,
        "lambda_ridge": penalties[0], "lambda_spatial": penalties[1],
        "likelihood": model.likelihood, "fit_quality": scored,
        "n_states": len(model.sig.state_type), "n_sweeps": n_sweeps, "converged": converged,
        "device": device, "backend": f"{backend.name}:{backend.device}",
        "seconds": round(time.perf_counter() - t0, 3),
    }
    for key in ("tile_size", "halo_hops"):  # written only for a tiled run (below)
        params.pop(key)
    sig = model.sig
    uns = {
        "params": params,
        "genes": np.asarray(sig.genes, dtype=object),
        "cell_types": np.asarray(sig.cell_types, dtype=object),
        "states": pd.DataFrame({"state": sig.state_type.index, "cell_type": sig.state_type.values}),
        "objective": np.asarray(history),
    }
    if scored:
        uns["fit_quality"] = {k: v for k, v in info.items() if np.ndim(v) == 0 and v is not None}
    if penalties[2] is not None:
        uns["cv"] = penalties[2]
    if tiles is not None:
        uns["tiles"] = tiles
        params.update(tile_size=config.dask.tile_size, halo_hops=int(tiles.halo_hops.iloc[0]),
                      n_tiles=len(tiles))
    names, types = spatial.obs_names, sig.cell_types
    return DeconvolutionResult(
        proportions=pd.DataFrame(props, index=names, columns=types),
        abundance=pd.DataFrame(x * (model.library / model.mean_lib)[:, None], index=names,
                               columns=types),
        zero_counts=pd.Series(model.zero, index=names, name=zero_counts_key(key_added)),
        connectivities=w,
        fit_score=pd.Series(score, index=names, name=fit_score_key(key_added)),
        poorly_fit=pd.Series(flag, index=names, name=poorly_fit_key(key_added)),
        uns=uns,
    )
