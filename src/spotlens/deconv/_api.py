"""``deconvolve``: the AnnData adapter of the type-level spotlens deconvolution."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._version import __version__
from .._backend import resolve_device
from .._keys import (
    abundance_key,
    fit_score_key,
    poorly_fit_key,
    proportions_key,
    zero_counts_key,
)
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
from ..pp import reference_signatures
from ._counts import read_counts
from ._fit_quality import spot_fit_quality
from ._graph import color_graph, default_alpha, edge_weights, knn, section_attention
from ._model import Problem, cross_validate, fit, poisson_gene_weights, spatial_window
from ._params import check_params
from ._poisson import CountProblem, cv_counts, fit_counts, with_dispersion
from ._ops import get_ops
from ._tiled import check_tiling, fit_tiled

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
#: Stopping tolerance of the first (Poisson) fit that the quasi-Poisson gene weights come from.
FIRST_FIT_TOL = 1e-3
#: Largest slide on which likelihood="auto" fits the count likelihood (a standard Visium
#: capture area has at most 4,992 spots); above it, least squares keeps million-bin slides fast.
COUNT_MAX_SPOTS = 5_000
#: Largest slide on which fit_quality="auto" scores every spot: the score costs
#: O(n_spots · n_genes · n_types), about 2 s per 10,000 spots of 2,000 genes on 2 cores.
FIT_QUALITY_MAX_SPOTS = 20_000


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
    fit_score
        ``n_spots`` goodness of fit: the spot's deviance from its fitted mixture over what the
        model expects (about 1 for a typical spot, larger = explained worse; NaN for a spot
        without counts).
    poorly_fit
        ``n_spots`` flag: the spot lies far outside what the reference explains (its score is
        an outlier on this slide), e.g. it holds a cell type the reference lacks.
    connectivities
        ``n_spots × n_spots`` sparse symmetric graph ``W`` used for smoothing.
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


def deconvolve(
    spatial: AnnData,
    reference: AnnData,
    *,
    labels_key: str = "cell_type",
    layer: str | None = None,
    reference_layer: str | None = None,
    spatial_key: str = "spatial",
    library_key: str | None = None,
    k_neighbors: int = 6,
    alpha: float | None = None,
    use_attention: bool = True,
    attention_temperature: float = 1.0,
    attention_update_every: int | None = None,
    n_comps: int = 20,
    lambda_ridge: float | Literal["auto"] = "auto",
    lambda_spatial: float | Literal["auto"] = "auto",
    cv_folds: int = 2,
    cv_max_spots: int = 5_000,
    gene_weights: Literal["poisson", "none"] = "poisson",
    likelihood: Literal["auto", "quasi_poisson", "poisson", "gaussian"] = "auto",
    fit_quality: bool | Literal["auto"] = "auto",
    n_genes_per_type: int | None = 200,
    min_cells_per_type: int = 5,
    cells_per_state: int | None = 50,
    max_states_per_type: int = 5,
    min_shared_genes: int = 10,
    n_iter: int = 200,
    tol: float = 1e-5,
    device: str = "cpu",
    seed: int = 0,
    key_added: str = proportions_key(),
    inplace: bool = True,
    progress: bool = True,
    client=None,
    tile_size: float | None = None,
    halo_hops: int | None = None,
) -> DeconvolutionResult | None:
    """Cell-type proportions of every spot by attention-regularised spatial regression.

    Solves, over ``X ≥ 0`` (``n_spots × n_types``)::

        ||Y − X S||_F² + λ_ridge ||X||_F² + λ_spatial Tr(Xᵀ L X)

    where ``Y`` (``n_spots × n_genes``) is each spot's expression divided by its library size,
    ``S`` (``n_types × n_genes``) the reference signature matrix (mean counts per cell of each
    type, as in CARD), both with genes weighted by ``1/sqrt(mean expression)`` (Poisson variance),
    and ``L = D − W`` the Laplacian of a sparse k-nearest-neighbour spot graph with
    ``W_ij = exp(−alpha d_ij²) · Attn(i, j)``: attention is a scaled dot-product softmax over
    each spot's neighbours on a PCA embedding of its expression, so the smoothing follows spots
    that are both close and transcriptionally alike. The solver runs projected block
    Gauss–Seidel sweeps over the colour classes of the graph (exact Gauss–Seidel, vectorised),
    each spot solving its ``n_types × n_types`` non-negative problem with its neighbours' current
    values; the objective never increases. With ``"auto"``, penalties are chosen by
    count-splitting cross-validation: each spot's counts are split at random into parts, the
    model is fitted on some and scored on the others (``λ_spatial = 0`` is on the grid, so
    smoothing is only used where it removes more noise than it adds bias).

    Parameters
    ----------
    spatial
        ``n_spots × n_genes`` AnnData: raw counts in ``X`` (or ``layers[layer]``), coordinates in
        ``obsm[spatial_key]`` (any unit: µm, pixels, array units).
    reference
        ``n_cells × n_genes`` AnnData: raw counts in ``X`` (or ``layers[reference_layer]``), cell
        types in ``obs[labels_key]``.
    labels_key
        Reference ``obs`` column with cell types.
    layer, reference_layer
        Layers with raw counts (``None`` = ``X``).
    spatial_key
        ``obsm`` key of the ``n_spots × 2`` coordinates.
    library_key
        ``obs`` column naming the section of each spot (several sections in one AnnData, one
        fit). The graph never links two sections, even where their coordinates overlap, and the
        attention embedding is fitted to each section alone. Shared by all sections: the
        signatures and gene weights (from the reference), the penalties (chosen on all
        sections with ``"auto"``) and ``alpha`` (from all sections' neighbour distances, so
        give every section's coordinates in one unit). Fitting sections together therefore
        equals fitting each alone with ``lambda_ridge``, ``lambda_spatial`` and ``alpha`` set
        to the joint fit's ``uns[key_added]["params"]`` (to the solver tolerance).
    k_neighbors
        Neighbours per spot in the graph.
    alpha
        Distance decay in 1/(coordinate unit)²; ``None`` gives weight 1/2 at the median
        neighbour distance (unit-free).
    use_attention
        ``False`` gives the purely distance-weighted graph.
    attention_temperature
        Softmax temperature; larger is closer to uniform.
    attention_update_every
        Re-estimate attention from the current proportions every this many sweeps (``None``:
        never). The objective is monotone between re-estimates.
    n_comps
        PCA components of the attention embedding.
    lambda_ridge, lambda_spatial
        Penalty weights relative to the mean squared norm of the weighted signatures
        (unit-free), or ``"auto"`` for count-splitting cross-validation.
    cv_folds
        Parts each count is split into for cross-validation (``F`` ≥ 2; the model is fitted on
        ``F − 1`` parts and scored on the last, ``F`` times).
    cv_max_spots
        On larger slides the penalties are chosen on a contiguous patch of this many spots
        (the nearest to a random spot), which keeps the local graph the penalty acts on. 5,000
        covers a whole standard Visium capture area (at most 4,992 spots); on a Visium HD slide
        it is a patch of about 0.57 × 0.57 mm of 8 µm bins. Patches of a quarter and a half
        of the Visium lymph node and osmFISH slides, and of 5,000 bins of a 100,000-bin
        synthetic slide, chose the same penalties as the whole slide (or a 20,000-bin patch)
        in 19 of 20 random placements (``benchmarks/cv_patch.py``); raise it for very
        heterogeneous tissue.
    gene_weights
        With ``likelihood="gaussian"``: ``"poisson"`` (weights ``1/sqrt(mean expression)``) or
        ``"none"``.
    likelihood
        The data term. ``"poisson"``: the Poisson negative log-likelihood of each spot's raw
        counts, ``Σ_g μ_ig − y_ig log μ_ig`` with ``μ_i = N_i X_i S̄`` (``N_i`` the library
        size), solved by majorisation–minimisation (the objective never increases; see
        ``spotlens.deconv._poisson``): each gene's residual is weighed by its expected count
        in that spot, the right noise model for sparse spots and for spots dominated by one
        type. ``"quasi_poisson"``: the same with a weight per gene, ``w_g = 1 / (1 + φ_g μ̄_g)``,
        where ``φ_g`` is the gene's negative binomial dispersion around a first Poisson fit
        (moment estimate, shrunk across genes) and ``μ̄_g`` its typical expected count: genes
        that scatter more than Poisson — those the single-cell and spatial assays capture
        differently (the platform effect), or whose reference profile is noisy — weigh less;
        it costs one extra fit. ``"gaussian"``: weighted least squares on library-normalised
        expression with ``gene_weights`` (block Gauss–Seidel; runs on GPU and Dask).
        ``"auto"``: ``"quasi_poisson"`` on the CPU without ``client`` and on slides of at most
        5,000 spots (a whole standard Visium capture area) when at least 100 genes are used
        (``"poisson"`` on a targeted panel of fewer genes: too few to estimate and shrink their
        dispersions, and each one a chosen marker), else ``"gaussian"`` (the count
        likelihoods have no GPU or Dask path yet, and cost several times a least-squares fit,
        which keeps Visium HD slides of millions of bins fast). The penalties are relative to
        each data term's curvature, so a fixed ``lambda_spatial`` does not mean the same under
        each; the one used is in ``uns[key_added]["params"]["likelihood"]``.
    fit_quality
        Score how well the fit explains each spot and flag spots far outside what the
        reference explains (``obs`` keys below). ``"auto"``: on slides of at most 20,000
        spots (the score costs O(n_spots · n_genes · n_types), about 2 s per 10,000 spots of
        2,000 genes on 2 cores; pass ``True`` on larger slides).
    n_genes_per_type
        Informative genes per type (see :func:`spotlens.pp.reference_signatures`).
    min_cells_per_type
        Reference types with fewer cells raise an error.
    cells_per_state, max_states_per_type
        Each type is split into up to ``max_states_per_type`` transcriptional states of about
        ``cells_per_state`` reference cells (k-means on a PCA of the reference); the regression
        uses one signature per state and sums the states back to their type. ``None`` fits one
        signature per type. See :func:`spotlens.pp.reference_signatures`.
    min_shared_genes
        Fewest shared genes accepted.
    n_iter, tol
        Maximum sweeps; stop when the relative change of ``X`` is below ``tol``.
    device
        ``"cpu"`` (NumPy/SciPy reference), ``"torch"`` (torch on CPU), ``"cuda"``, ``"cuda:N"``
        or ``"auto"``. torch runs in float32; proportions agree with ``"cpu"`` within 1e-3.
    seed
        Seed for count splitting, PCA, cell states and graph colouring.
    key_added
        ``obsm`` key for proportions.
    inplace
        Write into ``spatial`` and return ``None``; with ``False`` return a
        :class:`DeconvolutionResult` and change nothing.
    progress
        Show a progress bar.
    client
        ``None`` (default): fit on this machine. A ``distributed.Client``, or ``"default"`` for
        the current Dask client: fit over spatial tiles on that cluster (see ``docs/dask.md``).
        Everything global (signatures, gene weights, embedding, graph, ``alpha``, penalties) is
        computed here once; each task gets only its tile's rows (of ``Y Sᵀ``, ``n_spots ×
        n_states``, and of the graph) and returns its core's solution. Workers need spotlens
        installed; ``device`` is resolved on each worker. Proportions differ from the
        single-machine run by the halo's truncation error (about 1e-5 with the default
        ``halo_hops``) plus both solvers' stopping error, which ``tol`` sets (below 1e-4 in the
        tests at ``tol=1e-8``; see ``docs/dask.md`` for measurements at the default).
    tile_size
        With ``client``: side of the square tiles, in the units of ``obsm[spatial_key]``;
        ``None`` gives about 50,000 spots per tile. Each section is tiled on its own.
    halo_hops
        With ``client``: graph hops of neighbours solved with each tile and then discarded
        (``None``: chosen from ``lambda_spatial`` for a tiling error near 1e-5; unused without
        spatial smoothing). More hops, closer agreement; ``uns[key_added]["tiles"]`` holds a
        ``halo_check`` per tile, and a warning says when the halo looks too narrow.

    Returns
    -------
    ``None`` with ``inplace=True``, which writes

    - ``spatial.obsm[key_added]``: DataFrame ``n_spots × n_types`` of proportions (rows sum to 1),
    - ``spatial.obsm["abundance_<method>"]``: DataFrame of estimated cells per type,
    - ``spatial.obs[key_added + "_zero_counts"]``: spots with no counts over the genes used,
    - ``spatial.obs[key_added + "_fit_score"]``: goodness of fit of each spot, its
      negative-binomial deviance from the fitted mixture divided by the deviance the model
      expects at its depth (about 1 for a typical spot; dispersion estimated so that the
      median spot scores 1; see ``spotlens.deconv._fit_quality``; NaN without
      ``fit_quality``),
    - ``spatial.obs[key_added + "_poorly_fit"]``: spots whose log score lies more than 3
      scaled MADs above the slide's median — far outside what the reference explains (a
      cell type missing from the reference, a damaged spot; all False without
      ``fit_quality``),
    - ``spatial.obsp[key_added + "_connectivities"]``: the graph ``W``,
    - ``spatial.uns[key_added]``: ``params`` (all settings, chosen penalties, ``alpha``,
      version), ``fit_quality`` (dispersion, median, MAD and threshold of the flag), ``genes``,
      ``cell_types``, ``objective`` (per sweep; with ``client``, of the
      stitched solution per round), ``cv`` (error per grid point), and with ``client``
      ``tiles`` (one row per tile: section, position, spots in core and halo, sweeps, worker);

    else a :class:`DeconvolutionResult`.

    Raises
    ------
    InputError
        Empty inputs; duplicate spot, cell or gene names; missing or NaN labels; a cell type with
        fewer than ``min_cells_per_type`` cells; non-integer, negative, NaN or infinite counts;
        missing or non-2-D coordinates; too few shared genes; bad parameter values;
        ``client="default"`` with no running Dask client; ``tile_size``/``halo_hops`` without
        ``client``; tiles narrower than their halo.
    BackendError
        ``device`` needs torch or CUDA that is not there.

    References
    ----------
    Ma & Zhou, Nat Biotechnol 40, 1349–1359 (2022), doi:10.1038/s41587-022-01273-7 (CARD:
    signatures, spatially regularised regression). Vaswani et al., NeurIPS 2017,
    arXiv:1706.03762 (scaled dot-product attention). Neufeld et al., JMLR 25 (2024) (data
    thinning, used to choose the penalties).

    Examples
    --------
    >>> import spotlens
    >>> st, ref = spotlens.datasets.osmfish_cortex()
    >>> spotlens.deconv.deconvolve(st, ref, labels_key="cell_type", progress=False)
    >>> st.obsm["proportions_spotlens"].sum(axis=1).round(6).unique()
    array([1.])
    """
    t0 = time.perf_counter()
    check_params(
        k_neighbors=k_neighbors, lambda_ridge=lambda_ridge, lambda_spatial=lambda_spatial,
        n_iter=n_iter, tol=tol, cv_folds=cv_folds, cv_max_spots=cv_max_spots, alpha=alpha,
        gene_weights=gene_weights, likelihood=likelihood, fit_quality=fit_quality,
        attention_temperature=attention_temperature, attention_update_every=attention_update_every,
    )
    backend = resolve_device(device)
    client = check_tiling(client, tile_size, halo_hops)
    auto_likelihood = likelihood == "auto"
    if auto_likelihood:
        likelihood = (
            "quasi_poisson"
            if client is None and backend.name == "numpy" and spatial.n_obs <= COUNT_MAX_SPOTS
            else "gaussian"
        )
    elif likelihood != "gaussian" and (client is not None or backend.name != "numpy"):
        raise InputError(
            f"likelihood={likelihood!r} runs on the CPU on one machine only; use device='cpu' "
            "without client=, or likelihood='gaussian' on a GPU or a Dask cluster."
        )
    counts_model = likelihood != "gaussian"
    check_not_empty(spatial, what="spatial data", obs_name="spots")
    check_not_empty(reference, what="reference", obs_name="cells")
    check_unique_names(spatial, what="spatial data", obs_name="spot")
    coords = check_coordinates(spatial, spatial_key)
    sections = None
    if library_key is not None:
        if library_key not in spatial.obs.columns:
            raise InputError(
                f"The spatial data has no obs column {library_key!r}; pass library_key= naming "
                "the column of section labels, or None for a single section."
            )
        if spatial.obs[library_key].isna().any():
            raise InputError(f"obs[{library_key!r}] has missing section labels.")
        sections = pd.factorize(spatial.obs[library_key])[0]
    y_all = get_matrix(spatial, layer, what="spatial data")  # read in chunks below
    # cheap checks before the reference is processed (which can take minutes on a large one):
    # a normalised spatial file is refused from its first spots, and the labels are looked at
    check_counts(y_all[: min(spatial.n_obs, _HEAD_SPOTS)], what="spatial counts")
    check_labels(reference, labels_key, min_cells_per_type=1)

    logger.info("stage 1/5 signatures: reference %d cells × %d genes", *reference.shape)
    n_types_guess = reference.obs[labels_key].nunique() if labels_key in reference.obs else 2
    shared = check_shared_genes(
        reference.var_names, spatial.var_names, min_genes=min_shared_genes, n_types=n_types_guess
    )
    sig = reference_signatures(
        reference, labels_key=labels_key, layer=reference_layer, genes=shared,
        n_genes_per_type=n_genes_per_type, min_cells_per_type=min_cells_per_type,
        cells_per_state=cells_per_state, max_states_per_type=max_states_per_type, seed=seed,
    )
    genes = sig.genes
    types = sig.cell_types
    y = read_counts(y_all, spatial.var_names.get_indexer(genes), what="spatial counts")
    library = np.asarray(y.sum(axis=1)).ravel()
    zero = library == 0
    if zero.any():
        logger.warning(
            "%d of %d spots have no counts over the %d genes used; they are kept and flagged in "
            "obs[%r]", zero.sum(), len(zero), len(genes), zero_counts_key(key_added),
        )
    if zero.all():
        raise InputError(
            "Every spot has zero counts over the genes shared with the reference; nothing to fit."
        )
    weights = poisson_gene_weights(sig.signature.to_numpy(), gene_weights)
    mean_lib = float(sig.library_size.mean())
    s_w = sig.states.to_numpy() * weights[None, :] / mean_lib
    state_type = types.get_indexer(sig.state_type)
    to_types = sparse.csr_matrix(
        (np.ones(len(state_type)), (np.arange(len(state_type)), state_type)),
        shape=(len(state_type), len(types)),
    )
    # smooth cell-type composition, not states: Tr(P Xᵀ L X) with P = M Mᵀ
    metric = None if len(state_type) == len(types) else (to_types @ to_types.T).toarray()
    problem = Problem.from_counts(y, weights, s_w) if likelihood == "gaussian" else None
    owner = None if len(state_type) == len(types) else state_type
    count_problem = (
        CountProblem.from_counts(y, sig.states.to_numpy() / mean_lib) if counts_model else None
    )
    x_start = None
    if auto_likelihood and likelihood == "quasi_poisson" and len(genes) < QUASI_MIN_GENES:
        likelihood = "poisson"  # a targeted panel: too few genes to estimate their dispersion
    if likelihood == "quasi_poisson":
        logger.info("gene weights from the dispersion around a first Poisson fit")
        count_problem, x_start = with_dispersion(count_problem, owner=owner,
                                                 tol=max(tol, FIRST_FIT_TOL))

    logger.info("stage 2/5 graph: %d spots, k=%d, attention=%s", len(coords), k_neighbors,
                use_attention)
    dist, idx = knn(coords, k_neighbors, sections)
    alpha_used = default_alpha(dist) if alpha is None else float(alpha)
    attn = None
    if use_attention:
        attn = section_attention(y, idx, sections, n_comps=n_comps, seed=seed,
                                  temperature=attention_temperature)
    w = edge_weights(dist, idx, alpha_used, attn)
    colors = color_graph(w, seed=seed)
    ops = get_ops(backend)

    logger.info("stage 3/5 penalties: ridge=%s spatial=%s", lambda_ridge, lambda_spatial)
    cv_table = None
    if lambda_ridge == "auto" or lambda_spatial == "auto":
        window = spatial_window(coords, cv_max_spots, seed)
        if len(window) < len(coords):
            logger.info("choosing penalties on a contiguous patch of %d spots", len(window))
            w_cv = w[window][:, window].tocsr()
            colors_cv = color_graph(w_cv, seed=seed)
        else:
            w_cv, colors_cv = w, colors
    if counts_model and (lambda_ridge == "auto" or lambda_spatial == "auto"):
        lambda_ridge, lambda_spatial, cv_table = cv_counts(
            y[window], count_problem.s_bar, w_cv, owner=owner, weight=count_problem.weight,
            x0=None if x_start is None else x_start[window],
            sections=None if sections is None else sections[window], lambda_ridge=lambda_ridge,
            lambda_spatial=lambda_spatial, cv_folds=cv_folds, seed=seed, n_iter=n_iter,
            tol=tol, progress=progress,
        )
        logger.info("chosen by cross-validation: lambda_ridge=%g lambda_spatial=%g",
                    lambda_ridge, lambda_spatial)
    elif lambda_ridge == "auto" or lambda_spatial == "auto":
        lambda_ridge, lambda_spatial, cv_table = cross_validate(
            y[window], weights, s_w, w_cv, colors_cv,
            ridge_grid=RIDGE_GRID if lambda_ridge == "auto" else (float(lambda_ridge),),
            spatial_grid=SPATIAL_GRID if lambda_spatial == "auto" else (float(lambda_spatial),),
            n_folds=cv_folds, seed=seed, n_iter=min(n_iter, 60), tol=max(tol, 1e-3), ops=ops,
            progress=progress, metric=metric,
        )
        logger.info("chosen by cross-validation: lambda_ridge=%g lambda_spatial=%g",
                    lambda_ridge, lambda_spatial)

    logger.info("stage 4/5 fit: %d spots × %d types on %s", len(coords), len(types),
                backend.device)
    update = (
        None if not (use_attention and attention_update_every) else
        (attention_update_every, lambda xx: edge_weights(
            dist, idx, alpha_used,
            section_attention(xx, idx, sections, n_comps=n_comps, seed=seed,
                               temperature=attention_temperature)))
    )
    tiles = None
    if counts_model:
        x_states, history, n_sweeps, converged, w = fit_counts(
            count_problem, w, owner=owner, sections=sections, lambda_ridge=float(lambda_ridge),
            lambda_spatial=float(lambda_spatial), n_iter=n_iter, tol=tol, progress=progress,
            attention_update=update, x0=x_start,
        )
    elif client is None:
        x_states, history, n_sweeps, converged, w = fit(
            problem, w, colors, lambda_ridge=float(lambda_ridge),
            lambda_spatial=float(lambda_spatial), n_iter=n_iter, tol=tol, ops=ops,
            progress=progress, metric=metric, attention_update=update,
        )
    else:
        x_states, history, n_sweeps, converged, w, tiles = fit_tiled(
            client, problem, w, coords, sections, lambda_ridge=float(lambda_ridge),
            lambda_spatial=float(lambda_spatial), n_iter=n_iter, tol=tol, device=device,
            seed=seed, metric=metric, attention_update=update, tile_size=tile_size,
            halo_hops=halo_hops, to_types=to_types, progress=progress,
        )
    if not converged:
        logger.warning("stopped after %d sweeps before reaching tol=%g; raise n_iter for a "
                       "tighter fit", n_sweeps, tol)

    logger.info("stage 5/5 goodness of fit and write")
    if fit_quality == "auto":
        fit_quality = spatial.n_obs <= FIT_QUALITY_MAX_SPOTS
    score, flag, fit_info = np.full(len(coords), np.nan), np.zeros(len(coords), bool), {}
    if fit_quality:
        score, flag, fit_info = spot_fit_quality(
            y, x_states, sig.states.to_numpy() / mean_lib, library=library
        )
    if flag.any():
        logger.warning(
            "%d of %d spots are explained far worse than the rest of the slide (flagged in "
            "obs[%r]); they may hold cell types the reference lacks", int(flag.sum()), len(flag),
            poorly_fit_key(key_added),
        )
    x = np.asarray(to_types.T @ x_states.T).T
    total = x.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        props = np.where(total > 0, x / np.where(total > 0, total, 1), np.nan)
    abundance = x * (library / mean_lib)[:, None]
    obs_names = spatial.obs_names
    uns = {
        "params": {
            "method": "spotlens attention-regularised spatial regression",
            "version": __version__,
            "labels_key": labels_key, "layer": layer, "reference_layer": reference_layer,
            "spatial_key": spatial_key, "library_key": library_key,
            "cv_folds": cv_folds, "cv_max_spots": cv_max_spots, "k_neighbors": k_neighbors,
            "alpha": alpha_used, "use_attention": use_attention,
            "attention_temperature": attention_temperature,
            "attention_update_every": attention_update_every, "n_comps": n_comps,
            "lambda_ridge": float(lambda_ridge), "lambda_spatial": float(lambda_spatial),
            "gene_weights": gene_weights, "likelihood": likelihood,
            "fit_quality": bool(fit_quality),
            "n_genes_per_type": n_genes_per_type,
            "cells_per_state": cells_per_state, "max_states_per_type": max_states_per_type,
            "n_states": len(state_type),
            "n_iter": n_iter, "tol": tol, "n_sweeps": n_sweeps, "converged": converged,
            "device": device, "backend": f"{backend.name}:{backend.device}", "seed": seed,
            "seconds": round(time.perf_counter() - t0, 3),
        },
        "genes": np.asarray(genes, dtype=object),
        "cell_types": np.asarray(types, dtype=object),
        "states": pd.DataFrame({"state": sig.state_type.index, "cell_type": sig.state_type.values}),
        "objective": np.asarray(history),
    }
    if fit_quality:
        uns["fit_quality"] = {
            k: v for k, v in fit_info.items() if np.ndim(v) == 0 and v is not None
        }
    if cv_table is not None:
        uns["cv"] = cv_table
    if tiles is not None:
        uns["tiles"] = tiles
        uns["params"].update(tile_size=tile_size, halo_hops=int(tiles.halo_hops.iloc[0]),
                             n_tiles=len(tiles))
    result = DeconvolutionResult(
        proportions=pd.DataFrame(props, index=obs_names, columns=types),
        abundance=pd.DataFrame(abundance, index=obs_names, columns=types),
        zero_counts=pd.Series(zero, index=obs_names, name=zero_counts_key(key_added)),
        connectivities=w,
        fit_score=pd.Series(score, index=obs_names, name=fit_score_key(key_added)),
        poorly_fit=pd.Series(flag, index=obs_names, name=poorly_fit_key(key_added)),
        uns=uns,
    )
    logger.info("done in %.1f s", time.perf_counter() - t0)
    if not inplace:
        return result
    spatial.obsm[key_added] = result.proportions
    spatial.obsm[abundance_key(key_added)] = result.abundance
    spatial.obs[zero_counts_key(key_added)] = result.zero_counts.to_numpy()
    spatial.obs[fit_score_key(key_added)] = result.fit_score.to_numpy()
    spatial.obs[poorly_fit_key(key_added)] = result.poorly_fit.to_numpy()
    spatial.obsp[f"{key_added}_connectivities"] = w
    spatial.uns[key_added] = uns
    return None


__all__ = ["DeconvolutionResult", "deconvolve"]
