"""Reading and writing: Space Ranger ``outs/`` folders, ``.h5ad`` files, tables and figures.

Space Ranger folders may be Visium or Visium HD (``read_spatial(outs, bin_size=8)`` reads the
8 µm bins of ``binned_outputs/square_008um/``).

SpatialData objects and ``.zarr`` stores (optional ``spatialdata``): :func:`read_spatial`
reads them like an ``.h5ad`` (:func:`read_spatialdata` chooses the table, shapes and image by
name), and :func:`write_spatialdata` adds the results as new tables annotating the same region.

Full-resolution H&E images are read lazily, region by region (:func:`read_image`,
:class:`SlideImage`); :func:`read_section` reads a section's ``.h5ad`` with its image.

Readers keep raw counts and put coordinates in ``obsm["spatial"]``; writers are atomic (a
temporary file in the same folder, then ``os.replace``), so an interrupted run never leaves a
half-written file. No analysis happens here.
"""

from ._image import SlideImage, as_slide_image, check_mpp, read_image
from ._read import read_reference, read_spatial
from ._sections import read_section
from ._spatialdata import read_spatialdata
from ._spatialdata_write import write_spatialdata
from ._write import atomic_path, save_figure, temporary_files, write_csv, write_h5ad

__all__ = [
    "SlideImage", "as_slide_image", "atomic_path", "check_mpp", "read_image", "read_reference",
    "read_section", "read_spatial", "read_spatialdata", "save_figure", "temporary_files",
    "write_csv", "write_h5ad", "write_spatialdata",
]
