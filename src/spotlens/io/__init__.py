"""Reading and writing: Space Ranger ``outs/`` folders, ``.h5ad`` files, tables and figures.

Space Ranger folders may be Visium or Visium HD (``read_spatial(outs, bin_size=8)`` reads the
8 µm bins of ``binned_outputs/square_008um/``).

Readers keep raw counts and put coordinates in ``obsm["spatial"]``; writers are atomic (a
temporary file in the same folder, then ``os.replace``), so an interrupted run never leaves a
half-written file. No analysis happens here.
"""

from ._read import read_reference, read_spatial
from ._write import atomic_path, save_figure, temporary_files, write_csv, write_h5ad

__all__ = [
    "atomic_path", "read_reference", "read_spatial", "save_figure", "temporary_files",
    "write_csv", "write_h5ad",
]
