"""Target gene sets chosen on training sections: most expressed, HVG, spatially variable.

Which genes a model is scored on decides what the score means. The 250 most expressed genes
of a breast tumour or an olfactory bulb are dominated by mitochondrial, ribosomal and
housekeeping transcripts whose spot-to-spot variation follows one tissue axis (cell density,
tumour vs stroma), so a model that predicts that axis scores well without predicting any
marker. :func:`select_gene_sets` therefore drops those genes by default (:class:`GeneFilter`)
and adds a third set, the genes with the most spatial structure (Moran's I on the training
sections). Every set is chosen from the training sections' counts only.

Sets (names as keys of the result):

- ``"top_expressed"``: highest mean ``log1p(normalize_total(counts, 1e4))`` over all training
  spots;
- ``"hvg"``: scanpy's ``seurat_v3`` highly variable genes, batch = section, among genes
  detected in ≥ ``min_spot_fraction`` of training spots;
- ``"svg"``: highest mean Moran's I over the training sections (:func:`morans_i`, k = 6
  nearest-neighbour graph, row-standardised), same detection threshold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import InputError, check_counts, check_int
from ._metrics import _concat_counts, log_normalize

#: Housekeeping genes dropped by default (matched case-insensitively, so mouse ``Actb`` too):
#: the ten candidate reference genes of Vandesompele J. et al., "Accurate normalization of
#: real-time quantitative RT-PCR data by geometric averaging of multiple internal control
#: genes", Genome Biol. 3, research0034 (2002), https://doi.org/10.1186/gb-2002-3-7-research0034
#: (ACTB, B2M, GAPDH, HMBS, HPRT1, RPL13A, SDHA, TBP, UBC, YWHAZ), and six transcripts that are
#: among the most abundant in almost every tissue (EEF1A1, EEF2, TPT1, PPIA, TMSB4X, TMSB10;
#: Eisenberg E., Levanon E.Y., "Human housekeeping genes, revisited", Trends Genet. 29, 569–574,
#: 2013, https://doi.org/10.1016/j.tig.2013.05.010).
HOUSEKEEPING_GENES: tuple[str, ...] = (
    "ACTB", "B2M", "GAPDH", "HMBS", "HPRT1", "RPL13A", "SDHA", "TBP", "UBC", "YWHAZ",
    "EEF1A1", "EEF2", "TPT1", "PPIA", "TMSB4X", "TMSB10",
)

_MITO = re.compile(r"^MT-", re.IGNORECASE)
# cytosolic ribosomal proteins: RPL5, RPL13A, RPL36AL, RPL10L, RPS4X, RPS4Y1, RPS27A, RPLP0–2,
# RPSA (and mouse Rpl/Rps); not RPS6KA1 (a kinase) or mitochondrial MRPL/MRPS genes
_RIBO = re.compile(r"^(RP[SL]\d+(A|AL|L|X|Y\d?)?|RPLP[0-2]|RPSA)$", re.IGNORECASE)

# ribosomal RNA and its artefacts: human RNA18SN5/RNA45SN5, mouse Rn18s/Rn45s/Rn18s-rs5,
# the 7SK/7SL RNAs (RN7SK, RN7SL1) and Gm42418 (an rRNA-overlapping locus that dominates many
# mouse libraries); not RNF*/RNASE* genes
_RRNA = re.compile(r"^(RNA\d+SN?\d*|RN\d+S.*|GM42418)$", re.IGNORECASE)

GENE_SET_NAMES = ("top_expressed", "hvg", "svg")


def is_mitochondrial(genes: Iterable[str]) -> np.ndarray:
    """True for mitochondrially encoded genes (``MT-`` / ``mt-`` / ``Mt-`` prefix)."""
    return np.array([bool(_MITO.match(str(g))) for g in genes], dtype=bool)


def is_ribosomal(genes: Iterable[str]) -> np.ndarray:
    """True for cytosolic ribosomal protein genes (``RPL*``, ``RPS*``, ``RPLP0–2``, ``RPSA``).

    Kinases and other genes that merely start with ``RPS``/``RPL`` (``RPS6KA1``) and the
    mitochondrial ribosomal ``MRPL*``/``MRPS*`` genes are not matched.
    """
    return np.array([bool(_RIBO.match(str(g))) for g in genes], dtype=bool)


def is_ribosomal_rna(genes: Iterable[str]) -> np.ndarray:
    """True for ribosomal and other structural RNAs (``RNA18SN5``, ``Rn45s``, ``Rn18s-rs5``,
    ``RN7SK``, ``RN7SL1``) and the rRNA artefact ``Gm42418``; not ``RNF*``/``RNASE*``."""
    return np.array([bool(_RRNA.match(str(g))) for g in genes], dtype=bool)


@dataclass(frozen=True)
class GeneFilter:
    """Which genes are never targets.

    Attributes
    ----------
    mitochondrial
        Drop ``MT-`` genes.
    ribosomal
        Drop ribosomal protein genes (:func:`is_ribosomal`) and ribosomal/structural RNAs
        (:func:`is_ribosomal_rna`).
    housekeeping
        Names dropped (case-insensitive); :data:`HOUSEKEEPING_GENES` by default, ``()`` for none.
    """

    mitochondrial: bool = True
    ribosomal: bool = True
    housekeeping: tuple[str, ...] = HOUSEKEEPING_GENES

    def excluded(self, genes: Sequence[str]) -> np.ndarray:
        """``len(genes)`` bool: True for the genes this filter drops."""
        genes = [str(g) for g in genes]
        out = np.zeros(len(genes), dtype=bool)
        if self.mitochondrial:
            out |= is_mitochondrial(genes)
        if self.ribosomal:
            out |= is_ribosomal(genes) | is_ribosomal_rna(genes)
        if self.housekeeping:
            names = {h.upper() for h in self.housekeeping}
            out |= np.array([g.upper() in names for g in genes], dtype=bool)
        return out


#: The default: mitochondrial, ribosomal and :data:`HOUSEKEEPING_GENES` excluded.
DEFAULT_FILTER = GeneFilter()

#: No gene excluded (the definition of the sets before issue 15).
NO_FILTER = GeneFilter(mitochondrial=False, ribosomal=False, housekeeping=())


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------


def morans_i(values: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Moran's I of every column over a k-nearest-neighbour graph with row-standardised weights.

    ``I_g = (n / S0) · Σ_ij w_ij z_ig z_jg / Σ_i z_ig²`` with ``z = x − mean(x)`` and
    ``w_ij = 1/k_i`` for the ``k_i`` neighbours ``j`` of spot ``i`` (so ``S0 = n``). ``I``
    is near ``−1/(n−1)`` for spatially random values and approaches 1 for smooth patterns
    (Moran P.A.P., "Notes on continuous stochastic phenomena", Biometrika 37, 17–23, 1950,
    https://doi.org/10.2307/2332142).

    Parameters
    ----------
    values
        ``n_spots × n_genes``.
    neighbours
        ``n_spots × k`` neighbour indices (``-1`` = none), e.g. :func:`spotlens.pp.knn`.

    Returns
    -------
    ``n_genes`` Moran's I; 0 for constant columns.
    """
    z = values - values.mean(axis=0)
    valid = neighbours >= 0
    k = np.maximum(valid.sum(axis=1, keepdims=True), 1)
    lag = np.zeros_like(z)
    for c in range(neighbours.shape[1]):
        has = valid[:, c]
        lag[has] += z[neighbours[has, c]]
    lag /= k
    weight_sum = float(valid.any(axis=1).sum())  # S0 = number of spots with a neighbour
    num = (z * lag).sum(axis=0)
    den = (z * z).sum(axis=0)
    return np.where(den > 0, len(z) / max(weight_sum, 1.0) * num / np.where(den > 0, den, 1.0),
                    0.0)


# --------------------------------------------------------------------------------------------
# Selection on training sections
# --------------------------------------------------------------------------------------------


def _check_sections(sections, spatial_key: str | None) -> None:
    if not isinstance(sections, Mapping) or len(sections) == 0:
        raise InputError("sections must be a non-empty dict of section name -> AnnData.")
    for name, adata in sections.items():
        if not isinstance(adata, AnnData):
            raise InputError(f"Section {name!r} is a {type(adata).__name__}, not an AnnData.")
        if adata.X is None:
            raise InputError(f"Section {name!r} has no counts in X.")
        check_counts(adata.X, what=f"section {name!r} X")
        if spatial_key is not None and spatial_key not in adata.obsm:
            raise InputError(
                f"Section {name!r} has no obsm[{spatial_key!r}]: spot coordinates are needed "
                "for spatially variable genes."
            )


def spatial_variability(sections: Mapping[str, AnnData], *, k: int = 6,
                        spatial_key: str = "spatial") -> pd.Series:
    """Mean Moran's I per gene over sections (log-normalised expression, k-NN graph).

    A gene absent from a section's table counts as 0 counts there (Moran's I 0).

    Returns
    -------
    ``pd.Series`` indexed by the union of the sections' genes.
    """
    from ..pp import knn

    genes = pd.Index([])
    for adata in sections.values():
        genes = genes.union(adata.var_names, sort=False)
    total = np.zeros(len(genes))
    for adata in sections.values():
        coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
        _, idx = knn(coords, k)
        total[genes.get_indexer(adata.var_names)] += morans_i(log_normalize(adata.X), idx)
    return pd.Series(total / len(sections), index=genes.astype(str), name="morans_i")


def select_gene_sets(
    sections: Mapping[str, AnnData],
    *,
    n_top: int = 250,
    n_hvg: int = 50,
    n_svg: int = 50,
    exclude: GeneFilter = DEFAULT_FILTER,
    min_spot_fraction: float = 0.10,
    spatial_key: str = "spatial",
) -> dict[str, list[str]]:
    """Choose the target gene sets on the training sections only.

    Parameters
    ----------
    sections
        Training sections by name, raw counts in ``X`` (``n_spots × n_genes``), spot centres
        in ``obsm[spatial_key]`` (for ``"svg"``). Genes are matched by name over the union.
    n_top, n_hvg, n_svg
        Sizes of the three sets; 0 leaves a set out.
    exclude
        Genes never chosen (:class:`GeneFilter`: mitochondrial, ribosomal and
        :data:`HOUSEKEEPING_GENES` by default); :data:`NO_FILTER` keeps every gene, which
        gives the sets of :func:`~spotlens.histology.select_target_genes` for
        ``"top_expressed"`` and ``"hvg"``.
    min_spot_fraction
        Detection threshold (fraction of all training spots with count > 0) for HVG and SVG
        candidates.
    spatial_key
        ``obsm`` key of the spot centres.

    Returns
    -------
    ``{"top_expressed": [...], "hvg": [...], "svg": [...]}`` (sets of size 0 left out), each
    in rank order.

    Raises
    ------
    InputError
        No sections, a section without raw counts or (for ``n_svg > 0``) coordinates; fewer
        candidate genes than asked for; a size that is not a non-negative integer.
    """
    import scanpy as sc

    for name, n in (("n_top", n_top), ("n_hvg", n_hvg), ("n_svg", n_svg)):
        check_int(name, n, minimum=0, expected="a non-negative integer")
    if not isinstance(exclude, GeneFilter):
        raise InputError(f"exclude must be a GeneFilter, got {type(exclude).__name__}.")
    _check_sections(sections, spatial_key if n_svg else None)
    joined = _concat_counts(sections)
    keep = ~exclude.excluded(joined.var_names)
    detected = np.asarray((joined.X > 0).mean(axis=0)).ravel() >= min_spot_fraction
    out: dict[str, list[str]] = {}

    def enough(what, n_candidates, n):
        if n_candidates < n:
            raise InputError(
                f"Only {n_candidates} genes are candidates for {what} (after the exclusions "
                f"and the ≥ {min_spot_fraction:.0%} detection threshold); {n} were asked for."
            )

    if n_top:
        log_sum = np.zeros(joined.n_vars)
        for adata in sections.values():
            log_sum[joined.var_names.get_indexer(adata.var_names)] += (
                log_normalize(adata.X).sum(axis=0))
        mean = np.where(keep, log_sum / joined.n_obs, -np.inf)
        enough("top_expressed", int(keep.sum()), n_top)
        out["top_expressed"] = list(joined.var_names[np.argsort(-mean, kind="stable")[:n_top]])
    if n_hvg:
        candidates = joined[:, keep & detected].copy()
        enough("hvg", candidates.n_vars, n_hvg)
        sc.pp.highly_variable_genes(candidates, flavor="seurat_v3", n_top_genes=n_hvg,
                                    batch_key="section")
        table = candidates.var
        hvg = table.index[table["highly_variable"]]
        rank = table.loc[hvg, "highly_variable_rank"].to_numpy()
        out["hvg"] = list(hvg[np.argsort(rank, kind="stable")])
    if n_svg:
        moran = spatial_variability(sections, spatial_key=spatial_key)
        moran = moran.reindex(joined.var_names)[keep & detected]
        enough("svg", len(moran), n_svg)
        order = np.argsort(-moran.to_numpy(), kind="stable")[:n_svg]
        out["svg"] = list(moran.index[order])
    return out
