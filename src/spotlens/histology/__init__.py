"""Histology: H&E images, spot tiles, tissue detection and stain normalisation."""

from ._image import SlideImage, read_image
from ._stain import DEFAULT_REFERENCE, StainReference, fit_macenko, macenko_normalize
from ._tiles import TileGeometry, extract_tiles, spot_tiles, tile_geometry
from ._tissue import grid_spots, tissue_mask

__all__ = [
    "DEFAULT_REFERENCE",
    "SlideImage",
    "StainReference",
    "TileGeometry",
    "extract_tiles",
    "fit_macenko",
    "grid_spots",
    "macenko_normalize",
    "read_image",
    "spot_tiles",
    "tile_geometry",
    "tissue_mask",
]
