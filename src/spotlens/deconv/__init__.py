"""Cell-type deconvolution: public API and pure kernels.

- :class:`DeconvolutionConfig`: every method setting of :func:`deconvolve` in one checked,
  frozen object (also read from a JSON/TOML file); :class:`CellLevelConfig` for the cell level.
- :func:`deconvolve`: type-level proportions (step 1); with ``client=`` the fit runs on a
  Dask cluster over spatial tiles with a halo of graph neighbours (``docs/dask.md``).
- :func:`cell_level`: weights over individual reference cells (step 2).
- :func:`assign_cells`: a single-cell AnnData of reference cells placed in the spots.
- :func:`cell_type_expression`: expression of chosen genes split by cell type per spot.
"""

from ._api import DeconvolutionResult, deconvolve
from ._cell_api import CellLevelResult, cell_level
from ._cell_products import assign_cells, cell_type_expression
from ._config import (
    AttentionSettings,
    CellLevelConfig,
    CVSettings,
    DaskSettings,
    DeconvolutionConfig,
)

__all__ = [
    "AttentionSettings",
    "CVSettings",
    "CellLevelConfig",
    "CellLevelResult",
    "DaskSettings",
    "DeconvolutionConfig",
    "DeconvolutionResult",
    "assign_cells",
    "cell_level",
    "cell_type_expression",
    "deconvolve",
]
