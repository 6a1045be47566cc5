"""A reference's counts read in blocks of rows: validation and per-group statistics.

The reference may be in memory (SciPy sparse, NumPy) or stay on disk (an AnnData read with
``anndata.read_h5ad(path, backed="r")``: its ``X`` is an ``anndata`` CSR/CSC dataset or an
``h5py`` dataset). Either way the matrix is cut into the same blocks of rows
(:func:`spotlens._validation.row_blocks`) and per-group sums are accumulated block by block, so a
backed reference gives results identical, bit for bit, to the same reference in memory, and no
temporary of the size of the whole matrix is built.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from .._validation import CHUNK_VALUES, CountCheck, row_blocks


def group_sums(
    counts: sparse.spmatrix | np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    *,
    lib: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-group sums of library-size-normalised expression (the additive part of the kernel).

    With ``x_c`` the counts of cell ``c`` and ``l_c`` its library size (``Σ_g x_cg``, or
    ``lib[c]``), ``n_c = x_c / l_c`` (0 for an empty cell)::

        sum_norm[k] = Σ_{c in k} n_c,   sum_sq[k] = Σ_{c in k} n_c²,   sum_lib[k] = Σ_{c in k} l_c

    Parameters
    ----------
    counts
        ``n_cells × n_genes`` raw counts (dense or sparse).
    codes
        ``n_cells`` integer group codes in ``[0, n_groups)``.
    n_groups
        Number of groups.
    lib
        ``n_cells`` library sizes to divide by (e.g. over all genes when ``counts`` holds only
        some); ``None`` sums the rows of ``counts``.

    Returns
    -------
    sum_norm, sum_sq
        ``n_groups × n_genes``.
    sum_lib, n_cells
        ``n_groups`` (float64).
    lib
        ``n_cells`` library sizes used.

    Notes
    -----
    One sparse indicator product, no loop over cells: cost O(nnz(counts)).
    """
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    n = counts.shape[0]
    if lib is None:
        lib = np.asarray(counts.sum(axis=1)).ravel()
    inv = np.divide(1.0, lib, out=np.zeros_like(lib), where=lib > 0)
    norm = sparse.diags(inv) @ counts
    onehot = sparse.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_groups, n))
    n_cells = np.asarray(onehot.sum(axis=1)).ravel()
    sum_norm = np.asarray((onehot @ norm).todense())
    sum_sq = np.asarray((onehot @ norm.multiply(norm)).todense())
    return sum_norm, sum_sq, onehot @ lib, n_cells, lib


def finish_sums(
    sum_norm: np.ndarray, sum_sq: np.ndarray, sum_lib: np.ndarray, n_cells: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Means from :func:`group_sums`: ``(mean_norm, var_norm, library_size, n_cells)``.

    ``mean_norm = sum_norm / n``, ``var_norm = max(sum_sq / n − mean_norm², 0)``,
    ``library_size = sum_lib / n`` with ``n = max(n_cells, 1)`` (an empty group gives zeros).
    """
    denom = np.maximum(n_cells, 1)[:, None]
    mean_norm = sum_norm / denom
    var_norm = np.maximum(sum_sq / denom - mean_norm**2, 0.0)
    return mean_norm, var_norm, sum_lib / denom.ravel(), n_cells


def reference_statistics(
    matrix, codes: np.ndarray, n_types: int, *, what: str = "reference counts"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the counts and compute per-type statistics in one pass over blocks of rows.

    Parameters
    ----------
    matrix
        ``n_cells × n_genes`` raw counts: SciPy sparse, NumPy, or a backed matrix that supports
        row slicing (``X`` of an AnnData read with ``backed="r"``).
    codes
        ``n_cells`` type codes in ``[0, n_types)``.
    n_types
        Number of types.
    what
        Name of the matrix in error messages.

    Returns
    -------
    mean_norm, var_norm
        ``n_types × n_genes`` as :func:`~spotlens.pp.signature_kernel`.
    library_size, n_cells
        ``n_types``.
    cell_library
        ``n_cells`` library size of each cell (counts over all genes, float64).

    Raises
    ------
    InputError
        Non-numeric, NaN/infinite, negative or non-integer counts anywhere in ``matrix``, with
        the message one check of the whole matrix would give.
    """
    check = CountCheck(what)
    totals = None
    libs = []
    for start, block in row_blocks(matrix, chunk_values=CHUNK_VALUES):
        check.add(block.data if sparse.issparse(block) else block)
        if check.non_finite:  # NaN would spread through the sums; finish() raises below
            continue
        part = group_sums(block, codes[start : start + block.shape[0]], n_types)
        libs.append(part[4])
        totals = part[:4] if totals is None else tuple(a + b for a, b in zip(totals, part[:4],
                                                                              strict=True))
    check.finish()
    if totals is None:  # no rows: check_not_empty refuses this before
        g = matrix.shape[1]
        totals = (np.zeros((n_types, g)), np.zeros((n_types, g)), np.zeros(n_types),
                  np.zeros(n_types))
    return (*finish_sums(*totals), np.concatenate(libs) if libs else np.zeros(0))


def read_columns(matrix, columns: np.ndarray) -> sparse.csr_matrix:
    """``n_cells × len(columns)`` CSR matrix of the columns ``columns``, read in row blocks.

    The stored dtype is kept and values are not validated (see :func:`reference_statistics`).
    """
    columns = np.asarray(columns, dtype=np.int64)
    pieces = [sparse.csr_matrix(block)[:, columns]
              for _, block in row_blocks(matrix, chunk_values=CHUNK_VALUES)]
    if not pieces:
        return sparse.csr_matrix((0, len(columns)))
    return sparse.vstack(pieces, format="csr")
