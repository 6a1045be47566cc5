"""Preprocessing: reference signatures, informative genes, and the kernels both wings share.

- :func:`reference_signatures`: cell-type signatures of a single-cell reference (AnnData in).
- :func:`aggregate_bins`: bins smaller than a cell summed into larger bins or segmented cells.
- Pure kernels (arrays in, arrays out) that :mod:`spotlens.deconv` and :mod:`spotlens.histology`
  build on: :func:`knn` (the spot graph, never across sections), :func:`log_pca` and
  :func:`fit_log_pca` (PCA of log-normalised expression), :func:`cell_states` (k-means states
  within each cell type), :func:`signature_kernel` and :func:`shrink_profiles`.
"""

from ._bins import aggregate_bins
from ._embedding import fit_log_pca, log_pca
from ._neighbors import knn
from ._signatures import Signatures, reference_signatures, shrink_profiles, signature_kernel
from ._states import cell_states

__all__ = [
    "Signatures",
    "aggregate_bins",
    "cell_states",
    "fit_log_pca",
    "knn",
    "log_pca",
    "reference_signatures",
    "shrink_profiles",
    "signature_kernel",
]
