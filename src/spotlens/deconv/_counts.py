"""Reading the spatial counts of the genes used, in chunks of rows, with validation.

The input may be a SciPy sparse matrix, a dense array, or a matrix that stays on disk (an
AnnData read with ``backed="r"``: its ``X`` is an ``anndata.abc.CSRDataset``; an ``h5py``
dataset). Only the selected genes are kept, as one CSR matrix, so a backed slide never has all
its genes in memory, and no temporary of the size of the whole matrix is built.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from .._validation import CHUNK_VALUES, CountCheck

def read_counts(matrix, columns: np.ndarray, *, what: str = "spatial counts") -> sparse.csr_matrix:
    """Raw counts of the columns ``columns``, validated, read in chunks of rows.

    Parameters
    ----------
    matrix
        ``n_spots × n_genes`` counts: SciPy sparse (any format), a dense array, or a backed
        matrix that supports row slicing (``matrix[start:stop]``), such as ``adata.X`` of an
        AnnData read with ``backed="r"``.
    columns
        Indices of the genes to keep, in the order wanted.
    what
        Name of the matrix in error messages.

    Returns
    -------
    ``n_spots × len(columns)`` CSR matrix (floating point: float32 unless the input already
    was floating). Shares the input's arrays when it is an in-memory CSR matrix of floats and
    ``columns`` keeps every column in order.

    Raises
    ------
    InputError
        Non-numeric, NaN/infinite, negative or non-integer values anywhere in ``matrix`` (all
        genes are checked, not only ``columns``).
    """
    columns = np.asarray(columns, dtype=np.int64)
    check = CountCheck(what)
    n, n_genes = matrix.shape
    if sparse.issparse(matrix):
        m = sparse.csr_matrix(matrix)  # no copy when it already is CSR
        for start in range(0, m.data.size, CHUNK_VALUES):
            check.add(m.data[start : start + CHUNK_VALUES])
        check.finish()
        keep_all = len(columns) == n_genes and np.array_equal(columns, np.arange(n_genes))
        out = m if keep_all else m[:, columns]
        return out if np.issubdtype(out.dtype, np.floating) else out.astype(np.float32)
    step = max(1, CHUNK_VALUES // max(1, n_genes))
    pieces = []
    for start in range(0, n, step):
        block = matrix[start : start + step]
        if sparse.issparse(block):
            block = sparse.csr_matrix(block)
            check.add(block.data)
        else:
            block = np.asarray(block)
            check.add(block)
            block = sparse.csr_matrix(block)
        block = block[:, columns]
        if not np.issubdtype(block.dtype, np.floating):
            block = block.astype(np.float32)
        pieces.append(block)
    check.finish()
    return _stack_rows(pieces, n, len(columns))


def _stack_rows(pieces: list[sparse.csr_matrix], n: int, n_cols: int) -> sparse.csr_matrix:
    """Concatenate CSR row blocks, freeing each block once copied (peak ≈ the result)."""
    nnz = sum(p.nnz for p in pieces)
    index_dtype = np.int32 if max(nnz, n_cols) < np.iinfo(np.int32).max else np.int64
    dtype = np.result_type(*[p.dtype for p in pieces]) if pieces else np.float32
    indptr = np.zeros(n + 1, dtype=index_dtype)
    indices = np.empty(nnz, dtype=index_dtype)
    data = np.empty(nnz, dtype=dtype)
    row = at = 0
    while pieces:
        p = pieces.pop(0)
        indptr[row + 1 : row + p.shape[0] + 1] = at + p.indptr[1:]
        indices[at : at + p.nnz] = p.indices
        data[at : at + p.nnz] = p.data
        row, at = row + p.shape[0], at + p.nnz
    return sparse.csr_matrix((data, indices, indptr), shape=(n, n_cols))
