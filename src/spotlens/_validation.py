"""``check_*`` helpers that turn bad input into clear, actionable errors.

Every error names the problem and the fix; none of these helpers modifies its input.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse


class InputError(ValueError):
    """Bad user input; the message names the problem and the fix."""


def get_matrix(adata: AnnData, layer: str | None, *, what: str):
    """Return ``adata.X`` or ``adata.layers[layer]`` (not copied), with a clear error if absent."""
    if layer is None:
        matrix = adata.X
        if matrix is None:
            raise InputError(f"The {what} has no X matrix. Pass layer='...' naming the raw counts.")
        return matrix
    if layer not in adata.layers:
        have = ", ".join(map(repr, adata.layers.keys())) or "none"
        raise InputError(
            f"The {what} has no layer {layer!r} (layers: {have}). "
            "Pass layer=None to use X, or the name of the layer that holds raw counts."
        )
    return adata.layers[layer]


def check_not_empty(adata: AnnData, *, what: str, obs_name: str) -> None:
    """Raise if ``adata`` has no observations or no genes."""
    if not isinstance(adata, AnnData):
        raise InputError(
            f"The {what} must be an AnnData object, got {type(adata).__name__}. "
            "Read it with anndata.read_h5ad or spotlens.io.read_spatial."
        )
    if adata.n_obs == 0:
        raise InputError(f"The {what} is empty: it has 0 {obs_name}.")
    if adata.n_vars == 0:
        raise InputError(f"The {what} is empty: it has 0 genes.")


def check_unique_names(adata: AnnData, *, what: str, obs_name: str) -> None:
    """Raise if observation or gene names repeat."""
    axes = (("obs", adata.obs_names, obs_name), ("var", adata.var_names, "gene"))
    for axis, names, label in axes:
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:5].tolist()
            fix = f"adata.{axis}_names_make_unique()"
            raise InputError(
                f"The {what} has duplicate {label} names, e.g. {dup}. Make them unique first, "
                f"e.g. with {fix}."
            )


def _values(matrix) -> np.ndarray:
    if sparse.issparse(matrix):
        if matrix.format not in ("csr", "csc", "coo", "bsr"):
            # lil/dok/dia hold values in other shapes (lil.data is an object array of lists)
            matrix = matrix.tocsr()
        return np.asarray(matrix.data)
    return np.asarray(matrix).ravel()  # flat, so an argmax indexes one value


def check_counts(matrix, *, what: str) -> None:
    """Raise unless ``matrix`` holds finite, non-negative, integer-valued counts.

    Normalised or log-transformed input is the common mistake this catches.
    """
    values = _values(matrix)
    if not np.issubdtype(values.dtype, np.number):
        raise InputError(f"The {what} holds non-numeric values ({values.dtype}); expected counts.")
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        n_bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise InputError(
            f"The {what} contains {n_bad} NaN or infinite values. Raw counts are finite: "
            "fix or drop those entries first."
        )
    if values.min() < 0:
        raise InputError(
            f"The {what} contains negative values (min {values.min():g}); raw counts cannot be "
            "negative. It looks scaled or batch-corrected: pass the raw counts "
            "(e.g. layer='counts')."
        )
    if np.issubdtype(values.dtype, np.integer):
        return
    frac = np.abs(values - np.round(values))
    if frac.max() > 1e-3:
        raise InputError(
            f"The {what} holds non-integer values (e.g. {values[np.argmax(frac)]:g}); spotlens "
            "expects raw counts. It looks normalised or log-transformed: pass the raw counts, "
            "e.g. layer='counts', or adata.raw.to_adata()."
        )


def check_labels(
    reference: AnnData, labels_key: str, *, min_cells_per_type: int
) -> pd.Series:
    """Return the cell-type labels as strings, raising on missing, NaN or too-rare types."""
    if labels_key not in reference.obs.columns:
        have = ", ".join(map(repr, reference.obs.columns[:10])) or "none"
        raise InputError(
            f"The reference has no obs column {labels_key!r} (columns: {have}). "
            "Pass labels_key= naming the column of cell-type labels."
        )
    labels = reference.obs[labels_key]
    missing = labels.isna()
    if missing.any():
        raise InputError(
            f"{int(missing.sum())} reference cells have no label (NaN) in obs[{labels_key!r}]. "
            "Drop them or give them a label before deconvolution."
        )
    labels = labels.astype(str)
    counts = labels.value_counts()
    if len(counts) < 2:
        raise InputError(
            f"obs[{labels_key!r}] holds a single cell type ({counts.index[0]!r}); deconvolution "
            "needs at least two."
        )
    rare = counts[counts < min_cells_per_type]
    if len(rare):
        listed = ", ".join(f"{name!r} ({n} cells)" for name, n in rare.items())
        raise InputError(
            f"These cell types have fewer than {min_cells_per_type} reference cells: {listed}. "
            "Their signatures would be noise. Drop or merge them, or lower min_cells_per_type."
        )
    return labels


def check_coordinates(adata: AnnData, spatial_key: str) -> np.ndarray:
    """Return ``n_spots × 2`` float64 coordinates; raise if missing, not 2-D or not finite."""
    if spatial_key not in adata.obsm:
        have = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise InputError(
            f"The spatial data has no obsm[{spatial_key!r}] (obsm keys: {have}). Store the spot "
            "coordinates there as an n_spots × 2 array, or pass spatial_key=."
        )
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise InputError(
            f"obsm[{spatial_key!r}] must be n_spots × 2 (x, y), got shape {coords.shape}."
        )
    if coords.shape[1] > 2:
        raise InputError(
            f"obsm[{spatial_key!r}] has {coords.shape[1]} columns; spotlens needs 2-D coordinates "
            "(x, y). Pass only the two spatial columns."
        )
    try:
        coords = coords.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(f"obsm[{spatial_key!r}] is not numeric.") from err
    if not np.all(np.isfinite(coords)):
        raise InputError(
            f"obsm[{spatial_key!r}] contains NaN or infinite coordinates; every spot needs a "
            "position."
        )
    return coords


def check_shared_genes(
    reference_genes: Sequence[str], spatial_genes: Sequence[str], *, min_genes: int, n_types: int
) -> pd.Index:
    """Return the genes shared by both, in spatial order; raise if there are too few."""
    shared = pd.Index(spatial_genes).intersection(pd.Index(reference_genes), sort=False)
    needed = max(min_genes, n_types)
    if len(shared) < needed:
        example_ref = list(pd.Index(reference_genes)[:3])
        example_st = list(pd.Index(spatial_genes)[:3])
        raise InputError(
            f"The reference and the spatial data share {len(shared)} genes; at least {needed} are "
            f"needed (and more than the {n_types} cell types). Check that both use the same gene "
            f"identifiers (reference: {example_ref}, spatial: {example_st}) — e.g. symbols in one "
            "and Ensembl IDs in the other, or another species."
        )
    return shared
