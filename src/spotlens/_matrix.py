"""Reading a count matrix in blocks of rows, in memory or on disk (``backed="r"``).

A lower-layer helper of :mod:`spotlens._validation` (``check_counts`` of a backed matrix) and of
the subpackages that sum or check counts block by block; it imports no subpackage.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import sparse

#: Values (non-zeros of a sparse matrix, entries of a dense one) read and checked per chunk.
CHUNK_VALUES = 1 << 24


def row_blocks(matrix, *, chunk_values: int | None = None) -> Iterator[tuple[int, object]]:
    """Yield ``(start, block)``: consecutive blocks of rows of an ``n_obs × n_genes`` matrix.

    Each block holds ``max(1, chunk_values // n_genes)`` rows whatever the storage, so an
    in-memory matrix and the same matrix on disk are cut at the same rows (and sums over the
    blocks agree to the last bit). A block is a CSR matrix (sparse input, in memory or backed)
    or a NumPy array (dense input), in the stored dtype; no block is validated or converted.

    Parameters
    ----------
    matrix
        SciPy sparse (any format), a NumPy array, or a matrix that stays on disk and supports
        row slicing (``matrix[start:stop]``): ``X`` of an AnnData read with ``backed="r"``
        (``anndata`` CSR/CSC dataset) or an ``h5py`` dataset.
    chunk_values
        Values per block, counting every entry of a row (``n_genes``) even when sparse;
        ``None`` takes :data:`CHUNK_VALUES` (``2**24``).
    """
    chunk_values = CHUNK_VALUES if chunk_values is None else chunk_values
    n, n_genes = matrix.shape
    step = max(1, chunk_values // max(1, n_genes))
    if sparse.issparse(matrix):
        matrix = sparse.csr_matrix(matrix)  # no copy when it already is CSR
    for start in range(0, n, step):
        block = matrix[start : start + step]
        yield start, (sparse.csr_matrix(block) if sparse.issparse(block) else np.asarray(block))


def is_backed(matrix) -> bool:
    """Whether ``matrix`` is a 2-D matrix read from disk on demand (not NumPy, not SciPy)."""
    shape = getattr(matrix, "shape", None)
    return (
        not sparse.issparse(matrix)
        and not isinstance(matrix, np.ndarray)
        and shape is not None
        and len(shape) == 2
        and hasattr(matrix, "__getitem__")
    )
