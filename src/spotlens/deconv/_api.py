"""``deconvolve``: the AnnData adapter of the type-level spotlens deconvolution.

It gathers the settings into one :class:`~spotlens.deconv.DeconvolutionConfig` (checked there),
runs the stages of :mod:`spotlens.deconv._run` and writes their result.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from anndata import AnnData

from .._backend import resolve_device
from .._keys import (
    abundance_key,
    connectivities_key,
    fit_score_key,
    poorly_fit_key,
    proportions_key,
    zero_counts_key,
)
from .._validation import InputError
from ._config import DeconvolutionConfig
from ._run import DataKeys, DeconvolutionResult, run_deconvolution
from ._tiled import check_tiling

#: The settings' defaults, which the signature below repeats (a test checks that they agree).
_DEFAULTS = DeconvolutionConfig().flat()


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
    cv_max_spots: int | None = None,
    gene_weights: Literal["poisson", "none"] = "poisson",
    likelihood: Literal["auto", "quasi_poisson", "poisson", "gaussian"] = "auto",
    fit_quality: bool | Literal["auto"] = "auto",
    n_genes_per_type: int | None = 200,
    min_cells_per_type: int = 5,
    cells_per_state: int | None = 50,
    max_states_per_type: int = 5,
    min_shared_genes: int = 10,
    n_iter: int = 200,
    tol: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    key_added: str = proportions_key(),
    inplace: bool = True,
    progress: bool = True,
    client=None,
    tile_size: float | None = None,
    halo_hops: int | None = None,
    config: DeconvolutionConfig | None = None,
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
        (the nearest to a random spot), which keeps the local graph the penalty acts on.
        ``None``: 2,000 spots under the count likelihood (used up to 5,000 spots; on 5,000-spot
        simulations a 2,000-spot patch chose the penalties of the whole slide or did better,
        in less time) and 5,000 under least squares (a patch of about 0.57 × 0.57 mm of 8 µm
        Visium HD bins). How often a patch picks the
        penalties of the whole slide: ``benchmarks/studies/results/cv_patch.md``. Raise it for
        very heterogeneous tissue.
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
        spots (the score costs O(n_spots · n_genes · n_types); timings in
        ``benchmarks/results/docstring_figures.md``; pass ``True`` on larger slides).
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
        Maximum sweeps; stop when the relative change of ``X`` is below ``tol``. ``None``:
        3e-4 under the count likelihood, whose every iteration is an accelerated step of
        three majorisation-minimisation steps (SQUAREM), and 1e-5 under least squares, whose
        sweeps are single Gauss-Seidel passes.
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
    config
        All the method settings above (from ``k_neighbors`` to ``halo_hops``, except the data
        keys, ``device``, ``key_added``, ``inplace``, ``progress`` and ``client``) as one
        :class:`~spotlens.deconv.DeconvolutionConfig`, e.g. read from a file with
        :meth:`~spotlens.deconv.DeconvolutionConfig.from_file`; the keywords then stay at
        their defaults. ``None``: built from the keywords.

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
        ``client``; tiles narrower than their halo; ``config`` together with a changed keyword
        setting.
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
    settings = {name: value for name, value in locals().items() if name in _DEFAULTS}
    config = resolve_config(config, settings)
    backend = resolve_device(device)
    client = check_tiling(client, config.dask.tile_size, config.dask.halo_hops)
    data = DataKeys(labels_key=labels_key, layer=layer, reference_layer=reference_layer,
                    spatial_key=spatial_key, library_key=library_key)
    result = run_deconvolution(spatial, reference, data, config, backend=backend, device=device,
                               client=client, progress=progress, key_added=key_added)
    if not inplace:
        return result
    spatial.obsm[key_added] = result.proportions
    spatial.obsm[abundance_key(key_added)] = result.abundance
    spatial.obs[zero_counts_key(key_added)] = result.zero_counts.to_numpy()
    spatial.obs[fit_score_key(key_added)] = result.fit_score.to_numpy()
    spatial.obs[poorly_fit_key(key_added)] = result.poorly_fit.to_numpy()
    spatial.obsp[connectivities_key(key_added)] = result.connectivities
    spatial.uns[key_added] = result.uns
    return None


def resolve_config(config: DeconvolutionConfig | None, settings: dict) -> DeconvolutionConfig:
    """``config``, or one built from the keyword ``settings`` of :func:`deconvolve`.

    Raises
    ------
    InputError
        ``config`` is not a :class:`DeconvolutionConfig`, or it is given together with a
        keyword setting changed from its default (one place per setting).
    """
    if config is None:
        return DeconvolutionConfig.from_dict(settings)
    if not isinstance(config, DeconvolutionConfig):
        raise InputError(
            f"config must be a spotlens.deconv.DeconvolutionConfig, got {type(config).__name__}; "
            "build one with DeconvolutionConfig(...) or DeconvolutionConfig.from_file(path)."
        )
    changed = sorted(name for name, value in settings.items()
                     if not _same(value, _DEFAULTS[name]))
    if changed:
        raise InputError(
            f"{', '.join(changed)} given both as keyword(s) and through config=; set them in "
            "one place, e.g. config.updated(" + ", ".join(f"{n}=..." for n in changed) + ")."
        )
    return config


def _same(a, b) -> bool:
    """``a`` equals the default ``b`` (a NumPy integer equals the int; True is not 1)."""
    if isinstance(a, (bool, np.bool_)) != isinstance(b, bool) or isinstance(a, str) != isinstance(
            b, str):
        return False
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


__all__ = ["DeconvolutionResult", "deconvolve"]
