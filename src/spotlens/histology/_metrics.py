"""Targets and scores for expression-from-H&E: gene sets, log-normalisation, per-gene Pearson r.

The protocol (issue 4, "Gene expression from H&E at spot level"): models are trained on some
sections and scored on a held-out one. Targets are ``log1p(normalize_total(counts, 1e4))`` of
two gene sets chosen on the training sections only — the 50 most highly variable genes
(scanpy's ``seurat_v3`` flavour, batch = section, among genes detected in ≥ 10 % of training
spots) and the 250 most expressed genes (mean log-normalised expression over training spots).
The score is the Pearson correlation between predicted and observed expression across the
held-out spots, per gene, averaged over the gene set, plus the mean squared error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._keys import SECTION_KEY
from .._metrics import pearson_columns
from .._validation import InputError, check_counts


def log_normalize(counts, *, target_sum: float = 1e4) -> np.ndarray:
    """Return ``log1p(counts / total · target_sum)`` per spot, as scanpy's ``normalize_total``.

    Parameters
    ----------
    counts
        ``n_spots × n_genes`` raw counts (dense or sparse), *all* genes of the section: the
        totals are taken over every gene before any gene subset is selected.
    target_sum
        Counts per spot after scaling (10,000 by default).

    Returns
    -------
    ``n_spots × n_genes`` float64, dense. Spots with no counts stay 0.
    """
    matrix = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
    matrix = matrix.astype(np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(matrix * scale)


def section_log_expression(adata: AnnData, genes: Sequence[str]) -> np.ndarray:
    """Log-normalised expression of ``genes`` in one section; genes it lacks are 0.

    Normalisation uses the section's totals over all its genes; a gene absent from the
    section's count table (ST tables drop all-zero genes) is treated as zero counts.

    Returns
    -------
    ``n_spots × len(genes)`` float64.
    """
    check_counts(adata.X, what=f"section {adata.obs_names[:1].tolist()} counts")
    log_x = log_normalize(adata.X)
    out = np.zeros((adata.n_obs, len(genes)))
    index = adata.var_names.get_indexer(pd.Index(genes))
    present = index >= 0
    out[:, present] = log_x[:, index[present]]
    return out


def _concat_counts(sections: Mapping[str, AnnData]) -> AnnData:
    """Stack raw counts over sections on the union of genes (absent genes = 0 counts)."""
    genes = pd.Index([])
    for adata in sections.values():
        genes = genes.union(adata.var_names, sort=False)
    blocks, labels = [], []
    for name, adata in sections.items():
        x = sparse.csr_matrix(adata.X)
        index = genes.get_indexer(adata.var_names)
        mapping = sparse.csr_matrix(
            (np.ones(len(index)), (np.arange(len(index)), index)), shape=(adata.n_vars, len(genes))
        )
        blocks.append((x @ mapping).tocsr())
        labels.extend([name] * adata.n_obs)
    joined = AnnData(sparse.vstack(blocks).tocsr().astype(np.float32))
    joined.var_names = genes.astype(str)
    joined.obs_names = [f"{lab}_{i}" for i, lab in enumerate(labels)]
    joined.obs[SECTION_KEY] = pd.Categorical(labels)
    return joined


def select_target_genes(
    sections: Mapping[str, AnnData],
    *,
    n_hvg: int = 50,
    n_top: int = 250,
    min_spot_fraction: float = 0.10,
) -> dict[str, list[str]]:
    """Choose the two target gene sets on the training sections.

    Parameters
    ----------
    sections
        Training sections by name, each ``n_spots × n_genes`` with raw counts in ``X``.
        Genes are matched by name over the union; a gene missing from a section counts 0 there.
    n_hvg
        Number of highly variable genes: scanpy ``highly_variable_genes(flavor="seurat_v3",
        batch_key="section")`` on the concatenated raw counts, among genes detected (count > 0)
        in at least ``min_spot_fraction`` of all training spots.
    n_top
        Number of most expressed genes by mean log-normalised expression
        (:func:`log_normalize`, per section over all its genes) over all training spots.
    min_spot_fraction
        Detection threshold for HVG candidates (0.10 = 10 % of spots).

    Returns
    -------
    ``{"hvg": [...], "top_expressed": [...]}``, gene names, HVGs in scanpy's rank order and the
    most expressed genes by decreasing mean.

    Raises
    ------
    InputError
        If ``sections`` is empty, a section does not hold raw counts, or fewer than ``n_hvg``
        genes pass the detection threshold.
    ImportError
        If ``scikit-misc`` (needed by scanpy's ``seurat_v3``) is not installed.

    Notes
    -----
    seurat_v3: Stuart T. et al., "Comprehensive integration of single-cell data", Cell 177,
    1888–1902 (2019), as implemented in scanpy (Wolf et al., Genome Biol. 19, 15, 2018).
    """
    import scanpy as sc

    if not isinstance(sections, Mapping) or len(sections) == 0:
        raise InputError("sections must be a non-empty dict of section name -> AnnData.")
    for name, adata in sections.items():
        if not isinstance(adata, AnnData):
            raise InputError(f"Section {name!r} is a {type(adata).__name__}, not an AnnData.")
        check_counts(adata.X, what=f"section {name!r} X")
    joined = _concat_counts(sections)
    detected = np.asarray((joined.X > 0).mean(axis=0)).ravel()
    candidates = joined[:, detected >= min_spot_fraction].copy()
    if candidates.n_vars < n_hvg:
        raise InputError(
            f"Only {candidates.n_vars} genes are detected in ≥ {min_spot_fraction:.0%} of "
            f"training spots; {n_hvg} HVGs were asked for. Lower n_hvg or min_spot_fraction."
        )
    sc.pp.highly_variable_genes(
        candidates, flavor="seurat_v3", n_top_genes=n_hvg, batch_key=SECTION_KEY
    )
    table = candidates.var
    hvg = table.index[table["highly_variable"]]
    rank = table.loc[hvg, "highly_variable_rank"].to_numpy()
    hvg = list(hvg[np.argsort(rank, kind="stable")])

    genes = joined.var_names
    log_sum = np.zeros(len(genes))
    n_spots = 0
    for adata in sections.values():
        log_x = log_normalize(adata.X)
        log_sum[genes.get_indexer(adata.var_names)] += log_x.sum(axis=0)
        n_spots += adata.n_obs
    mean = log_sum / n_spots
    order = np.argsort(-mean, kind="stable")[:n_top]
    return {"hvg": hvg, "top_expressed": list(genes[order])}


def pearson_per_gene(pred: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r between columns of ``pred`` and ``observed`` (the kernel of :func:`evaluate`).

    Parameters
    ----------
    pred, observed
        ``n_spots × n_genes``.

    Returns
    -------
    r
        ``n_genes`` correlations; 0 where either column is constant (r undefined).
    undefined
        ``n_genes`` bool, True where either column is constant.
    """
    return pearson_columns(pred, observed)


def evaluate(pred, observed, genes: Sequence[str]) -> dict:
    """Score predicted against observed log-normalised expression on a held-out section.

    Parameters
    ----------
    pred
        ``n_spots × n_genes`` predicted ``log1p(normalize_total(counts, 1e4))``.
    observed
        ``n_spots × n_genes`` observed values on the same scale, same spot and gene order
        (e.g. :func:`section_log_expression`).
    genes
        ``n_genes`` gene names (column labels).

    Returns
    -------
    dict with

    - ``"mean_pearson"``: mean over genes of the per-gene Pearson r across spots; genes whose
      observed (or predicted) values are constant count as r = 0;
    - ``"median_pearson"``;
    - ``"pearson"``: ``pd.Series`` of r per gene;
    - ``"mse"``: mean squared error over all spots and genes;
    - ``"constant_genes"``: genes constant in the held-out section (r set to 0);
    - ``"constant_predictions"``: genes whose prediction is constant (r set to 0);
    - ``"n_spots"``, ``"n_genes"``.

    Raises
    ------
    InputError
        If shapes disagree with each other or with ``genes``, values are not finite, or there
        are fewer than 2 spots.
    """
    pred = np.asarray(pred, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    genes = pd.Index([str(g) for g in genes])
    if pred.ndim != 2 or pred.shape != observed.shape:
        raise InputError(
            f"pred and observed must both be n_spots × n_genes, got {pred.shape} and "
            f"{observed.shape}."
        )
    if pred.shape[1] != len(genes):
        raise InputError(f"{len(genes)} gene names for {pred.shape[1]} columns.")
    if pred.shape[0] < 2:
        raise InputError("A correlation across spots needs at least 2 spots.")
    for what, values in (("pred", pred), ("observed", observed)):
        if not np.all(np.isfinite(values)):
            raise InputError(f"{what} contains NaN or infinite values.")
    r, undefined = pearson_per_gene(pred, observed)
    const_obs = np.ptp(observed, axis=0) == 0
    const_pred = undefined & ~const_obs
    return {
        "mean_pearson": float(r.mean()),
        "median_pearson": float(np.median(r)),
        "pearson": pd.Series(r, index=genes, name="pearson_r"),
        "mse": float(np.mean((pred - observed) ** 2)),
        "constant_genes": list(genes[const_obs]),
        "constant_predictions": list(genes[const_pred]),
        "n_spots": int(pred.shape[0]),
        "n_genes": int(pred.shape[1]),
    }
