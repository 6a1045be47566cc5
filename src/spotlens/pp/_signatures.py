"""Reference signature matrix and informative genes (CARD-style)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._validation import (
    InputError,
    check_labels,
    check_not_empty,
    check_unique_names,
    get_matrix,
)
from ._embedding import log_pca
from ._reference_counts import finish_sums, group_sums, read_columns, reference_statistics
from ._states import cell_states

logger = logging.getLogger("spotlens")


@dataclass(frozen=True)
class Signatures:
    """Cell-type signatures of a reference.

    Attributes
    ----------
    signature
        ``n_types × n_genes`` signature matrix S: the mean library-size-normalised expression of
        each type, scaled by the type's mean library size — expected counts per cell.
    library_size
        Mean library size (counts per cell over all reference genes) per type.
    n_cells
        Number of reference cells per type.
    states
        ``n_states × n_genes`` signatures of the cell states within each type (same scaling as
        ``signature``); equal to ``signature`` when every type is one state.
    state_type
        ``n_states`` cell type of each state (index: state names such as ``"B#1"``).
    """

    signature: pd.DataFrame
    library_size: pd.Series
    n_cells: pd.Series
    states: pd.DataFrame | None = None
    state_type: pd.Series | None = None

    @property
    def genes(self) -> pd.Index:
        """Genes (columns) of the signature matrix."""
        return self.signature.columns

    @property
    def cell_types(self) -> pd.Index:
        """Cell types (rows) of the signature matrix."""
        return self.signature.index


def signature_kernel(
    counts: sparse.spmatrix | np.ndarray, codes: np.ndarray, n_types: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-type signature statistics from raw counts.

    Parameters
    ----------
    counts
        ``n_cells × n_genes`` raw counts (dense or sparse).
    codes
        ``n_cells`` integer type codes in ``[0, n_types)``.
    n_types
        Number of types.

    Returns
    -------
    mean_norm
        ``n_types × n_genes`` mean of each cell's expression divided by its library size.
    var_norm
        ``n_types × n_genes`` within-type variance of the same.
    library_size
        ``n_types`` mean library size (counts per cell).
    n_cells
        ``n_types`` cells per type.

    Notes
    -----
    One sparse indicator product, no loop over cells: cost O(nnz(counts)).
    Cells with zero counts contribute a zero profile and their library size.
    :func:`reference_signatures` accumulates the same sums over blocks of rows
    (:func:`~spotlens.pp._reference_counts.group_sums`), so a reference on disk is never read
    whole.
    """
    return finish_sums(*group_sums(counts, codes, n_types)[:4])


def shrink_profiles(
    profiles: np.ndarray, total_counts: np.ndarray, prior: np.ndarray
) -> tuple[np.ndarray, float]:
    """Empirical-Bayes (gamma–Poisson) shrinkage of noisy expression profiles.

    Model: group ``k`` (a cell type or state) has true profile ``p_kg`` (expression of gene g
    per count) drawn from ``Gamma(shape α, mean prior_kg)``, and its reference cells supply
    ``T_k`` counts, so its observed profile ``p̂_kg`` has Poisson sampling variance
    ``prior_kg / T_k``. The posterior mean is a weighted average::

        p̃_kg = (T_k p̂_kg + α) / (T_k + α / prior_kg)
             = w_kg p̂_kg + (1 − w_kg) prior_kg,      w_kg = T_k prior_kg / (T_k prior_kg + α)

    so a gene is pulled towards the prior only where the reference holds few counts of it
    (``T_k prior_kg`` small compared with ``α``); deep references are left almost unchanged.
    ``α`` (``1/α`` is the squared coefficient of variation of true profiles around the prior)
    is estimated from the data by the method of moments, pooled over all groups and genes:
    ``E(p̂ − prior)² = prior / T + prior² / α``.

    Parameters
    ----------
    profiles
        ``n_groups × n_genes`` observed profiles ``p̂`` (mean library-size-normalised
        expression of the group's cells).
    total_counts
        ``n_groups`` reference counts behind each profile (cells × mean library size).
    prior
        ``n_groups × n_genes`` prior means (e.g. the pooled profile of all groups, repeated).

    Returns
    -------
    shrunk
        ``n_groups × n_genes`` posterior means; equal to ``prior`` where the groups differ no
        more than sampling noise explains (``α = ∞``), to ``profiles`` where ``T_k = ∞``.
    alpha
        The estimated ``α`` (``inf`` when the profiles are indistinguishable from noise).

    References
    ----------
    Robbins, "An empirical Bayes approach to statistics" (1956); the gamma–Poisson posterior
    mean as in Efron, *Large-Scale Inference* (2010), ch. 1.
    """
    t = np.asarray(total_counts, dtype=float)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        noise = np.where(t > 0, prior / t, 0.0)
    between = float(((profiles - prior) ** 2 - noise).sum())
    scale = float((prior**2).sum())
    if not between > 0 or scale == 0:
        return prior.copy(), np.inf
    alpha = scale / between
    info = t * prior
    weight = np.divide(info, info + alpha, out=np.zeros_like(info), where=info > 0)
    return weight * profiles + (1.0 - weight) * prior, alpha


def _pooled_profile(mean_norm: np.ndarray, total_counts: np.ndarray) -> np.ndarray:
    """Count-weighted mean of the groups' profiles (``1 × n_genes``)."""
    return (mean_norm * total_counts[:, None]).sum(axis=0, keepdims=True) / total_counts.sum()


#: Natural-log fold change over the other types' mean from which a gene counts as a strong
#: marker (4-fold): on a small panel, it is never dropped for being over-dispersed.
STRONG_MARKER_LOG_FC = float(np.log(4.0))


def _informative_genes(
    mean_norm: np.ndarray,
    var_norm: np.ndarray,
    genes: pd.Index,
    *,
    n_genes_per_type: int | None,
    min_log_fc: float,
    drop_overdispersed: float,
) -> pd.Index:
    """Marker genes: top log fold change per type, minus the most over-dispersed genes.

    A panel of no more than ``n_genes_per_type × n_types`` genes keeps every expressed gene but
    still loses its most over-dispersed genes among those that mark no type (whose largest log
    fold change over the other types' mean is below :data:`STRONG_MARKER_LOG_FC`): a few broadly
    expressed genes that vary wildly between cells of a type (ribosomal, immediate-early,
    ``TMSB10``) can swamp a fit on a small panel when the spatial assay also captures them
    differently (benchmarks/results/peers_panel.md), while a strong marker (``Ttr``, ``Plp1``)
    is the best evidence of its type however much it varies.
    """
    expressed = mean_norm.max(axis=0) > 0
    n_types = mean_norm.shape[0]
    if n_genes_per_type is None:
        return genes[expressed]
    eps = 1e-9
    total = mean_norm.sum(axis=0, keepdims=True)
    others = (total - mean_norm) / max(n_types - 1, 1)
    log_fc = np.log((mean_norm + eps) / (others + eps))
    log_fc[:, ~expressed] = -np.inf
    if expressed.sum() <= n_genes_per_type * n_types:
        keep = expressed.copy()
        droppable = keep & (log_fc.max(axis=0) < STRONG_MARKER_LOG_FC)
    else:
        keep = np.zeros(len(genes), dtype=bool)
        for k in range(n_types):
            order = np.argsort(-log_fc[k])[:n_genes_per_type]
            keep[order[log_fc[k, order] > min_log_fc]] = True
        droppable = keep
    n_drop = int(np.floor(drop_overdispersed * keep.sum())) if keep.sum() > 10 else 0
    if n_drop > 0 and droppable.any():
        # only kept genes: each is expressed in some type, so no column is all-NaN
        kept = np.flatnonzero(droppable)
        m, v = mean_norm[:, kept], var_norm[:, kept]
        ratio = np.divide(v, m, out=np.full_like(m, np.nan), where=m > 0)
        dispersion = np.nanmean(ratio, axis=0)
        keep[kept[np.argsort(-dispersion, kind="stable")[:n_drop]]] = False
    return genes[keep]


def reference_signatures(
    reference: AnnData,
    *,
    labels_key: str = "cell_type",
    layer: str | None = None,
    genes: Sequence[str] | None = None,
    n_genes_per_type: int | None = 200,
    min_log_fc: float = 0.5,
    drop_overdispersed: float = 0.01,
    min_cells_per_type: int = 5,
    cells_per_state: int | None = 50,
    max_states_per_type: int = 5,
    shrink: bool = True,
    seed: int = 0,
) -> Signatures:
    """Build the signature matrix of a labelled single-cell reference.

    For each cell type, the signature is the mean of the cells' library-size-normalised
    expression scaled by the type's mean library size, so it reads as expected counts per
    cell (as in CARD). With ``shrink`` (the default) each type's mean is first shrunk towards
    the pooled profile of all types by empirical Bayes (:func:`shrink_profiles`, strength
    estimated from the reference), which matters where the reference holds few counts per
    gene: a type's expression of a gene seen only a handful of times in its cells is mostly
    sampling noise, and taken at face value (zeros included) it biases every spot's fit in the
    same direction. Cell states are shrunk towards their (shrunk) type the same way, with
    their own strength. Informative genes are the top ``n_genes_per_type`` genes per type by log
    fold change against the mean of the other types, minus the ``drop_overdispersed`` fraction
    with the highest within-type dispersion (variance / mean).

    Parameters
    ----------
    reference
        ``n_cells × n_genes`` AnnData with raw counts in ``X`` or ``layers[layer]``. It may be
        backed (``anndata.read_h5ad(path, backed="r")``): the counts are then read from disk in
        blocks of rows (at most ``2**24`` values each), twice with cell states (all genes, then
        the informative ones), with results identical to the same reference in memory.
    labels_key
        ``obs`` column holding the cell types.
    layer
        Layer with raw counts; ``None`` uses ``X``.
    genes
        Restrict to these genes first (e.g. those shared with the spatial data).
    n_genes_per_type
        Marker genes kept per type; ``None`` keeps every expressed gene. When the genes on offer
        number no more than ``n_genes_per_type × n_types`` all expressed genes are kept, less
        the ``drop_overdispersed`` fraction, taken among genes that are not 4-fold markers.
    min_log_fc
        Minimum natural-log fold change for a marker.
    drop_overdispersed
        Fraction of the kept genes with the highest within-type dispersion to drop (not with
        ``n_genes_per_type=None``).
    min_cells_per_type
        Types with fewer cells raise an error.
    cells_per_state
        Split each type into ``min(max_states_per_type, n_cells // cells_per_state)`` cell
        states by k-means on a PCA of the reference (log-normalised, informative genes), and
        give each state its own signature. ``None`` keeps one state per type. Types are
        heterogeneous (e.g. excitatory neurons of each cortical layer); fitting their states and
        summing them back to types captures that.
    max_states_per_type
        Most states per type.
    shrink
        Shrink the profiles by empirical Bayes (see above); ``False`` gives the plain CARD
        means.
    seed
        Seed of the PCA and k-means.

    Returns
    -------
    :class:`Signatures` with an ``n_types × n_informative_genes`` signature matrix.

    Raises
    ------
    InputError
        Empty reference, duplicate cell or gene names, missing labels (NaN, or text such as
        ``"nan"``/``"None"``/``""``), a type with fewer than ``min_cells_per_type`` cells,
        counts that are not raw integers, or genes not found.

    References
    ----------
    Ma & Zhou, "Spatially informed cell-type deconvolution for spatial transcriptomics",
    Nat Biotechnol 40, 1349–1359 (2022), doi:10.1038/s41587-022-01273-7 (CARD).
    Efron, *Large-Scale Inference*, Cambridge University Press (2010) (empirical Bayes).

    Examples
    --------
    >>> import spotlens
    >>> st, ref = spotlens.datasets.osmfish_cortex()
    >>> sig = spotlens.pp.reference_signatures(ref, labels_key="cell_type")
    >>> sig.signature.shape
    (11, 33)
    """
    check_not_empty(reference, what="reference", obs_name="cells")
    check_unique_names(reference, what="reference", obs_name="cell")
    labels = check_labels(reference, labels_key, min_cells_per_type=min_cells_per_type)
    counts = get_matrix(reference, layer, what="reference")
    all_genes = reference.var_names
    types = pd.Index(sorted(labels.unique()))
    codes = types.get_indexer(labels)
    mean_norm, var_norm, lib, n_cells, cell_lib = reference_statistics(
        counts, codes, len(types), what="reference counts"
    )
    if genes is not None:
        genes = pd.Index(genes)
        idx = all_genes.get_indexer(genes)
        if (idx < 0).any():
            missing = genes[idx < 0][:5].tolist()
            raise InputError(f"Genes not in the reference: {missing}.")
        mean_norm, var_norm, all_genes = mean_norm[:, idx], var_norm[:, idx], genes
    if shrink:
        mean_norm, alpha = shrink_profiles(
            mean_norm, n_cells * lib, np.repeat(_pooled_profile(mean_norm, n_cells * lib),
                                                len(types), axis=0)
        )
        logger.info("signatures: empirical-Bayes shrinkage of type profiles, alpha=%.3g", alpha)
    kept = _informative_genes(
        mean_norm,
        var_norm,
        all_genes,
        n_genes_per_type=n_genes_per_type,
        min_log_fc=min_log_fc,
        drop_overdispersed=drop_overdispersed,
    )
    if len(kept) < len(types):
        raise InputError(
            f"Only {len(kept)} informative genes for {len(types)} cell types. Use more shared "
            "genes, or n_genes_per_type=None to keep every expressed gene."
        )
    cols = all_genes.get_indexer(kept)
    signature = pd.DataFrame(mean_norm[:, cols] * lib[:, None], index=types, columns=kept)
    states, state_type = signature, pd.Series(types, index=types, name="cell_type")
    if cells_per_state is not None and n_cells.max() >= 2 * cells_per_state:
        kept_counts = read_columns(counts, reference.var_names.get_indexer(kept))
        embedding = log_pca(kept_counts, 20, seed=seed)
        state_codes, owner = cell_states(
            embedding, codes, len(types), cells_per_state=cells_per_state,
            max_states_per_type=max_states_per_type, seed=seed,
        )
        # profiles over the informative genes, normalised by each cell's library (all genes)
        s_mean, _, s_lib, s_cells = finish_sums(
            *group_sums(kept_counts, state_codes, len(owner), lib=cell_lib)[:4]
        )
        if shrink:
            # a state towards its own (shrunk) type; a type's only state is that type
            type_mean = mean_norm[owner][:, cols]
            split = np.bincount(owner, minlength=len(types))[owner] > 1
            s_mean = np.where(split[:, None], s_mean, type_mean)
            if split.any():
                s_mean[split], alpha = shrink_profiles(
                    s_mean[split], (s_cells * s_lib)[split], type_mean[split]
                )
                logger.info("signatures: states shrunk towards their type, alpha=%.3g", alpha)
        rank = np.concatenate([np.arange((owner == k).sum()) for k in range(len(types))])
        names = [f"{types[k]}#{r}" for k, r in zip(owner, rank, strict=True)]
        states = pd.DataFrame(s_mean * s_lib[:, None], index=names, columns=kept)
        state_type = pd.Series(types[owner], index=names, name="cell_type")
    logger.info("signatures: %d cell types (%d states) × %d informative genes",
                len(types), len(states), len(kept))
    return Signatures(
        signature=signature,
        library_size=pd.Series(lib, index=types, name="library_size"),
        n_cells=pd.Series(n_cells.astype(int), index=types, name="n_cells"),
        states=states,
        state_type=state_type,
    )
