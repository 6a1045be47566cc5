"""Input checks and readers of the cell-level step (:mod:`spotlens.deconv._cell_api`).

The readers accept in-memory matrices (SciPy sparse, NumPy) and matrices that stay on disk (an
AnnData read with ``backed="r"``: ``X`` is an ``anndata`` CSR/CSC dataset or an ``h5py``
dataset). Backed matrices are read in chunks of rows; nothing is written to the file.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial import cKDTree

from .._keys import SPATIAL_UNS_KEY, abundance_key
from .._validation import (
    InputError,
    check_number,
    get_matrix,
)
from ._counts import CHUNK_VALUES, read_counts


def type_level(spatial: AnnData, key: str) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Proportions, abundance and ``uns`` of the type-level result under ``key``.

    Raises
    ------
    InputError
        :func:`~spotlens.deconv.deconvolve` has not written ``key``.
    """
    ab_key = abundance_key(key)
    if key not in spatial.obsm or ab_key not in spatial.obsm or key not in spatial.uns:
        raise InputError(
            f"No type-level result under obsm[{key!r}] / obsm[{ab_key!r}] / uns[{key!r}]. Run "
            "spotlens.deconv.deconvolve(spatial, reference, ...) first, or pass key= naming "
            "its key_added."
        )
    props, ab = spatial.obsm[key], spatial.obsm[ab_key]
    if not isinstance(props, pd.DataFrame) or not isinstance(ab, pd.DataFrame):
        raise InputError(f"obsm[{key!r}] and obsm[{ab_key!r}] must be DataFrames from deconvolve.")
    return props, ab, spatial.uns[key]


def read_spot_counts(adata: AnnData, layer: str | None, columns: np.ndarray, *,
                     what: str) -> sparse.csr_matrix:
    """Validated raw counts of the genes ``columns`` of ``adata`` (``X`` or a layer).

    Works on a backed AnnData (read in chunks of rows, all genes checked); ``what`` is
    ``"spatial data"`` or ``"reference"``. Raises :class:`InputError` as
    :func:`~spotlens._validation.check_counts` does.
    """
    matrix = get_matrix(adata, layer, what=what)
    name = "spatial counts" if what == "spatial data" else f"{what} counts"
    return read_counts(matrix, np.asarray(columns, dtype=np.int64), what=name)


def read_rows(matrix, rows: np.ndarray | None = None,
              columns: np.ndarray | None = None) -> sparse.csr_matrix:
    """Rows ``rows`` (any order, repeats allowed) and columns ``columns`` as a CSR matrix.

    ``None`` keeps all. A backed matrix is read in chunks of rows, so only the rows and columns
    asked for are ever held in memory; values are not validated, and the dtype is kept.
    """
    if sparse.issparse(matrix) or isinstance(matrix, np.ndarray):
        m = sparse.csr_matrix(matrix)
        m = m if rows is None else m[np.asarray(rows, dtype=np.int64)]
        return m if columns is None else m[:, np.asarray(columns, dtype=np.int64)]
    n, n_genes = matrix.shape
    wanted = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    unique, inverse = np.unique(wanted, return_inverse=True)
    step = max(1, CHUNK_VALUES // max(1, n_genes))
    pieces = []
    for start in range(0, n, step):
        lo, hi = np.searchsorted(unique, [start, start + step])
        if lo == hi:
            continue
        block = sparse.csr_matrix(matrix[start : start + step])[unique[lo:hi] - start]
        pieces.append(block if columns is None else block[:, np.asarray(columns, np.int64)])
    width = n_genes if columns is None else len(columns)
    out = sparse.vstack(pieces, format="csr") if pieces else sparse.csr_matrix((0, width))
    return out if rows is None else out[inverse.ravel()]


def footprint_diameter(spatial: AnnData, coords: np.ndarray, given: float | None) -> float:
    """Footprint diameter: ``given``, else ``spot_diameter_fullres``, else half the spacing."""
    if given is not None:
        return check_number("spot_diameter", given, above=0, finite=False, expected="> 0")
    for lib in (spatial.uns.get(SPATIAL_UNS_KEY) or {}).values():
        scale = (lib or {}).get("scalefactors", {}) if isinstance(lib, dict) else {}
        if "spot_diameter_fullres" in scale:
            return float(scale["spot_diameter_fullres"])
    if len(coords) < 2:
        return 1.0
    dist, _ = cKDTree(coords).query(coords, k=2)
    return float(np.median(dist[:, 1]) / 2)
