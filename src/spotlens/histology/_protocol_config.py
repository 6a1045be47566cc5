"""Inputs of the frozen protocol: :class:`EvalSection`, :class:`ProtocolConfig`, their checks.

The settings are fixed before any section is read; ``_protocol.py`` runs the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from anndata import AnnData

from .._validation import InputError
from ._gene_sets import DEFAULT_FILTER, GENE_SET_NAMES, GeneFilter
from ._protocol_models import MODELS as RIDGE_MODELS
from ._protocol_networks import NETWORK_MODELS

STANDARDIZATIONS = ("training", "section")
BASELINES = ("ridge", "rank1")
#: how the nested selection picks a model type from the candidates' leave-one-section-out
#: scores (``ProtocolConfig.selection``)
SELECTION_RULES = ("one_se", "best")
#: the model types from fewest to most free parameters, for 50 genes from 256 principal
#: components (the networks: from 3,840 features): rank-1 and ridge with a projection rank r
#: (a rank-r coefficient matrix: r × (256 + 50 − r), at most ridge's), ridge (256 × 50), the
#: attention network (1.1 million), the graph network (1.5 million); the one-standard-error
#: rule takes the first within reach of the best
PARSIMONY = ("rank1", "ridge_rank", "ridge", "attention", "graph")
#: every model type the protocol can fit: the ridge family and the package's networks
MODELS = {**RIDGE_MODELS, **NETWORK_MODELS}
#: the gene set of ``ProtocolConfig.markers`` (named genes, fixed before any section is read)
MARKERS = "markers"


@dataclass(frozen=True)
class EvalSection:
    """One section as the protocol sees it.

    Attributes
    ----------
    name
        Section name (``"C6"``).
    adata
        ``n_spots × n_genes`` raw counts in ``X`` and spot centres in ``obsm["spatial"]``.
    features
        ``n_spots × n_features`` frozen image features of the spots' tiles, rows in
        ``adata``'s spot order.
    """

    name: str
    adata: AnnData
    features: np.ndarray


@dataclass(frozen=True)
class ProtocolConfig:
    """Settings of the protocol (all fixed before any section is read).

    Attributes
    ----------
    gene_sets
        Sets scored, from ``("top_expressed", "hvg", "svg")``.
    n_top, n_hvg, n_svg
        Their sizes.
    exclude
        Genes never targets (:class:`~spotlens.histology._gene_sets.GeneFilter`).
    markers
        Named genes scored as one more gene set, ``"markers"`` (those in at least one training
        section); its per-gene r get block-bootstrap intervals. ``()``: none.
    candidates
        Model types the nested selection chooses from (names of :data:`MODELS`:
        ``"ridge"``, ``"rank1"``, ``"ridge_rank"``, ``"attention"``, ``"graph"``).
    selection
        How the nested selection picks among ``candidates`` from their per-section
        leave-one-section-out scores: ``"one_se"`` (default), the one-standard-error rule — the
        candidate with the fewest parameters (:data:`PARSIMONY`) whose mean score is at least
        the best mean minus the standard error of the best candidate's per-section scores
        (Breiman L. et al., *Classification and Regression Trees*, 1984; Hastie T.,
        Tibshirani R. & Friedman J., *The Elements of Statistical Learning*, 2nd ed., 2009,
        §7.10) — a larger model has to beat a smaller one by more than the sections disagree;
        ``"best"``: the best mean score (ties: the first listed).
    reported
        Model types fitted once on all training sections with their fixed settings and
        reported beside the others, never selected.
    network_epochs
        Epochs of the network models: several values, chosen by leave-one-section-out inside
        the sections each network is fitted on (``_protocol_networks.py``); one value: fixed.
        No early stopping.
    standardizations
        Feature standardisations reported, from ``("training", "section")``.
    alphas
        Ridge penalties tried (None: ``logspace(-2, 6, 33)``).
    n_components
        PCA components of the ridge models.
    n_boot, level, block_size, seed
        Block bootstrap (:func:`~spotlens.histology._intervals.block_bootstrap_pearson`).
    spatial_key
        ``obsm`` key of the spot centres.
    """

    gene_sets: tuple[str, ...] = GENE_SET_NAMES
    n_top: int = 250
    n_hvg: int = 50
    n_svg: int = 50
    exclude: GeneFilter = DEFAULT_FILTER
    markers: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ("ridge", "ridge_rank")
    selection: str = "one_se"
    reported: tuple[str, ...] = ()
    network_epochs: int | tuple[int, ...] = (10, 20, 30, 50, 75, 100)
    standardizations: tuple[str, ...] = STANDARDIZATIONS
    alphas: tuple[float, ...] | None = None
    n_components: int = 256
    n_boot: int = 1000
    level: float = 0.95
    block_size: float | None = None
    seed: int = 0
    spatial_key: str = "spatial"

    def __post_init__(self):
        for what, values, allowed in (
            ("gene_sets", self.gene_sets, GENE_SET_NAMES),
            ("candidates", self.candidates, tuple(MODELS)),
            ("standardizations", self.standardizations, STANDARDIZATIONS),
        ):
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise InputError(f"{what} must be a non-empty subset of {allowed}; got "
                                 f"{tuple(values)!r}.")
        if self.selection not in SELECTION_RULES:
            raise InputError(f"selection must be one of {SELECTION_RULES}, got "
                             f"{self.selection!r}.")
        bad = [v for v in self.reported if v not in MODELS]
        if bad:
            raise InputError(f"reported must be a subset of {tuple(MODELS)}; got {bad!r}.")
        if isinstance(self.markers, str) or not all(isinstance(g, str) for g in self.markers):
            raise InputError(f"markers must be a tuple of gene names, got {self.markers!r}.")
        epochs = self.network_epochs
        values = (epochs,) if isinstance(epochs, (int, np.integer)) else epochs
        if (not isinstance(values, (tuple, list)) or not values or any(
                isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 1
                for e in values)):
            raise InputError(f"network_epochs must be a positive integer or a tuple of them, "
                             f"got {epochs!r}.")
        object.__setattr__(self, "network_epochs", tuple(sorted({int(e) for e in values})))
        if isinstance(self.n_boot, bool) or not isinstance(self.n_boot, int) or self.n_boot < 2:
            raise InputError(f"n_boot must be an integer ≥ 2, got {self.n_boot!r}.")
        if not (isinstance(self.level, float) and 0 < self.level < 1):
            raise InputError(f"level must be a fraction in (0, 1) (e.g. 0.95), got "
                             f"{self.level!r}.")

    @property
    def scored_sets(self) -> tuple[str, ...]:
        """``gene_sets`` and, with ``markers``, ``"markers"``."""
        return (*self.gene_sets, MARKERS) if self.markers else tuple(self.gene_sets)

    @property
    def models(self) -> tuple[str, ...]:
        """Every model fitted: the baselines, the candidates, the reported ones."""
        return tuple(dict.fromkeys((*BASELINES, *self.candidates, *self.reported)))

    def set_sizes(self, gene_set: str | None = None) -> dict[str, int]:
        """``n_top``/``n_hvg``/``n_svg`` keywords; sets not asked for (or not ``gene_set``): 0."""
        sizes = {"top_expressed": self.n_top, "hvg": self.n_hvg, "svg": self.n_svg}
        wanted = self.gene_sets if gene_set is None else (gene_set,)
        return {f"n_{k.split('_')[0]}": (v if k in wanted else 0) for k, v in sizes.items()}


def _check_sections(sections, what: str, *, need_counts: bool, spatial_key: str):
    if isinstance(sections, EvalSection):
        sections = [sections]
    sections = list(sections)
    if not sections:
        raise InputError(f"{what} must hold at least one EvalSection.")
    names = [s.name for s in sections if isinstance(s, EvalSection)]
    if len(names) != len(sections):
        raise InputError(f"{what} must be EvalSection objects.")
    if len(set(names)) != len(names):
        raise InputError(f"{what} has repeated section names: {names}.")
    for s in sections:
        x = np.asarray(s.features)
        if x.ndim != 2 or x.shape[0] != s.adata.n_obs:
            raise InputError(
                f"Section {s.name!r}: features must be n_spots × n_features with "
                f"n_spots = {s.adata.n_obs}, got shape {x.shape}.")
        if not np.all(np.isfinite(x)):
            raise InputError(f"Section {s.name!r}: features contain NaN or infinite values.")
        if spatial_key not in s.adata.obsm:
            raise InputError(f"Section {s.name!r} has no obsm[{spatial_key!r}].")
        if need_counts and s.adata.X is None:
            raise InputError(f"Training section {s.name!r} has no counts in X.")
    return sections
