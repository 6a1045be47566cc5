"""SpatialData in: read a table with the coordinates of its shapes and an image.

Only the :mod:`spatialdata` API touches the store (``read_zarr``, the element models,
``write_element``): nothing here writes Zarr by hand. :mod:`spatialdata` is an optional
dependency (``pip install 'spotlens[spatialdata]'``), imported when a function here is called.

The conventions followed (those of spatialdata-io's readers): a table (``AnnData``) annotates a
*region* — a shapes element (spots as circles with a ``radius`` column, Visium HD bins or cells
as polygons) or a labels element — through ``uns["spatialdata_attrs"]``: ``region`` (element
name or names), ``region_key`` (``obs`` column naming each row's element) and ``instance_key``
(``obs`` column matching the element's index). Coordinates are read in one coordinate system
(``"global"`` by default) through the elements' transformations. Writing back is in
:mod:`._spatialdata_write`.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import (
    SPATIAL_KEY,
    SPATIAL_UNS_KEY,
)
from .._validation import InputError, check_coordinates

logger = logging.getLogger("spotlens")

#: ``uns`` key of a SpatialData table's region annotation (``spatialdata.models.TableModel``).
ATTRS_KEY = "spatialdata_attrs"
#: Largest side, px, of the image level :func:`read_spatialdata` loads into ``uns["spatial"]``.
MAX_IMAGE_SIDE = 4000
_INSTALL = "pip install 'spotlens[spatialdata]'"


def is_spatialdata(path: Any) -> bool:
    """Whether ``path`` is a SpatialData object or names a SpatialData Zarr store (a folder).

    A folder counts when its name ends in ``.zarr`` or it holds Zarr group metadata
    (``zarr.json`` or ``.zgroup``) next to a ``tables``, ``shapes`` or ``images`` group.
    """
    if type(path).__name__ == "SpatialData":
        return True
    if not isinstance(path, (str, PathLike)):
        return False
    path = Path(path).expanduser()
    if not path.is_dir():
        return False
    if path.suffix == ".zarr":
        return True
    has_meta = (path / "zarr.json").is_file() or (path / ".zgroup").is_file()
    return has_meta and any((path / g).is_dir() for g in ("tables", "shapes", "images"))


def _spatialdata():
    try:
        import spatialdata
    except ImportError as err:
        raise InputError(f"Reading and writing SpatialData needs spatialdata: {_INSTALL}.") \
            from err
    return spatialdata


@contextmanager
def quiet_zarr():
    """Silence zarr's notice about a future default (not about the data) while writing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")
        yield


def _open(sdata):
    sd = _spatialdata()
    if isinstance(sdata, sd.SpatialData):
        return sdata
    if not isinstance(sdata, (str, PathLike)):
        raise InputError("Expected a SpatialData object or the path of a SpatialData .zarr "
                         f"store, got {type(sdata).__name__}.")
    path = Path(sdata).expanduser()
    if not path.is_dir():
        raise InputError(f"The SpatialData store {path} does not exist (expected a .zarr "
                         "folder written by spatialdata or spatialdata-io).")
    try:
        with warnings.catch_warnings():  # repeated gene names are fixed (and reported) later
            warnings.filterwarnings("ignore", message="Variable names are not unique")
            return sd.read_zarr(path)
    except Exception as err:  # noqa: BLE001 - zarr/ome-zarr raise many types
        raise InputError(f"Could not read {path} as a SpatialData store ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no details'}).") from err


def _choose_table(sdata, table_key: str | None, bin_size: int | None) -> str:
    names = list(sdata.tables.keys())
    if not names:
        raise InputError("The SpatialData object has no table: spotlens reads the counts from "
                         "a table (AnnData) annotating spots, bins or cells.")
    if table_key is not None:
        if table_key not in sdata.tables:
            raise InputError(f"The SpatialData object has no table {table_key!r} "
                             f"(tables: {names}).")
        return table_key
    if bin_size is not None:  # spatialdata-io's Visium HD tables: square_002um, square_008um
        found = [n for n in names if f"square_{bin_size:03d}um" in n]
        if len(found) == 1:
            return found[0]
        raise InputError(f"No table of {bin_size} µm bins (named like square_{bin_size:03d}um) "
                         f"among the tables {names}; pass table_key=.")
    annotating = [n for n in names if ATTRS_KEY in sdata.tables[n].uns]
    binned = [n for n in annotating if "square_008um" in n]
    for pick in ([names[0]] if len(names) == 1 else [], ["table"] if "table" in names else [],
                 binned, annotating if len(annotating) == 1 else []):
        if len(pick) == 1:
            return pick[0]
    raise InputError(f"The SpatialData object holds several tables ({names}); pass "
                     "table_key= (CLI: --table) to choose one.")


def _attrs(table: AnnData, name: str) -> tuple[list[str], str, str]:
    attrs = table.uns.get(ATTRS_KEY)
    if not isinstance(attrs, dict) or not {"region", "region_key", "instance_key"} <= set(attrs):
        raise InputError(f"Table {name!r} annotates no region: its uns[{ATTRS_KEY!r}] lacks "
                         "region, region_key and instance_key (spatialdata's TableModel), so "
                         "there are no spot coordinates to read.")
    region = attrs["region"]
    regions = [region] if isinstance(region, str) else [str(r) for r in region]
    return regions, str(attrs["region_key"]), str(attrs["instance_key"])


def _scale(transformation) -> float:
    """Length scale of an affine transformation in (x, y): sqrt |det|."""
    matrix = np.asarray(transformation.to_affine_matrix(("x", "y"), ("x", "y")), dtype=float)
    return float(math.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def _coordinate_system(sdata, element_names: list[str], wanted: str | None) -> str:
    from spatialdata.transformations import get_transformation

    systems = None
    for name in element_names:
        have = set(get_transformation(sdata[name], get_all=True))
        systems = have if systems is None else systems & have
    systems = sorted(systems or ())
    if wanted is not None:
        if wanted not in systems:
            raise InputError(f"The region {element_names} is not in coordinate system "
                             f"{wanted!r} (it is in: {systems}).")
        return wanted
    if not systems:
        raise InputError(f"The region {element_names} shares no coordinate system.")
    return "global" if "global" in systems else systems[0]


def _diameter(element, scale: float) -> float | None:
    """Spot diameter in coordinate-system units: circles' 2 × radius, polygons' side/diameter."""
    if hasattr(element, "geometry"):
        if "radius" in element.columns:
            return float(2 * np.median(np.asarray(element["radius"], dtype=float)) * scale)
        areas = np.asarray(element.geometry.area, dtype=float)
        bounds = np.asarray(element.geometry.bounds, dtype=float)
        boxes = (bounds[:, 2] - bounds[:, 0]) * (bounds[:, 3] - bounds[:, 1])
        area = float(np.median(areas))
        if area <= 0:
            return None
        square = np.allclose(areas, boxes, rtol=1e-3)  # axis-aligned squares: Visium HD bins
        return float((math.sqrt(area) if square else 2 * math.sqrt(area / math.pi)) * scale)
    return None


def _centroids(sdata, table: AnnData, regions: list[str], region_key: str,
               instance_key: str, system: str) -> tuple[np.ndarray, float | None]:
    sd = _spatialdata()
    from spatialdata.transformations import get_transformation

    xy = np.full((table.n_obs, 2), np.nan)
    diameters = []
    row_region = (np.asarray(table.obs[region_key].astype(str)) if region_key in table.obs
                  else np.full(table.n_obs, regions[0]))
    if instance_key not in table.obs:
        raise InputError(f"The table has no obs[{instance_key!r}] (its instance_key).")
    for name in regions:
        rows = np.flatnonzero(row_region == name)
        if name not in sdata or not len(rows):
            if len(rows):
                raise InputError(f"The table annotates {name!r}, which is not an element of "
                                 "the SpatialData object.")
            continue
        element = sdata[name]
        with warnings.catch_warnings():  # its points model asks for a sorted index: not ours
            warnings.filterwarnings("ignore", message="The index of the dataframe is not mono")
            found = sd.get_centroids(element, coordinate_system=system).compute()
        ids = table.obs[instance_key].iloc[rows]
        index = found.index if found.index.dtype == ids.dtype else found.index.astype(str)
        where = pd.Index(index).get_indexer(ids if found.index.dtype == ids.dtype
                                            else ids.astype(str))
        if (where < 0).any():
            missing = list(ids[where < 0][:3])
            raise InputError(f"{(where < 0).sum()} rows of the table name instances missing "
                             f"from {name!r} (e.g. {missing}).")
        xy[rows] = found[["x", "y"]].to_numpy(float)[where]
        diameters.append(_diameter(element, _scale(get_transformation(element, system))))
    known = [d for d in diameters if d is not None]
    return xy, (float(np.median(known)) if known else None)


def _pick_image(sdata, system: str, image_key: str | None):
    from spatialdata.transformations import get_transformation

    names = [n for n in sdata.images.keys()
             if system in get_transformation(sdata.images[n], get_all=True)]
    if image_key is not None:
        if image_key not in sdata.images:
            raise InputError(f"The SpatialData object has no image {image_key!r} (images: "
                             f"{list(sdata.images.keys())}).")
        return image_key
    hires = [n for n in names if n.endswith("hires_image")]
    return (hires or names or [None])[0]


def _image(sdata, name: str, system: str, max_side: int) -> tuple[np.ndarray, float]:
    """Return ``(H × W × 3 image, image px per unit)`` from the finest level that fits."""
    from spatialdata.transformations import get_transformation

    element = sdata.images[name]
    levels = ([element[k].ds["image"] for k in element.keys()] if hasattr(element, "children")
              else [element])
    full = levels[0]
    chosen = next((lv for lv in levels if max(lv.sizes["y"], lv.sizes["x"]) <= max_side),
                  levels[-1])
    downscale = full.sizes["x"] / chosen.sizes["x"]
    px_per_unit = 1.0 / (_scale(get_transformation(element, system)) * downscale)
    pixels = np.asarray(chosen.transpose("y", "x", "c").values)
    pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, -1)
    if pixels.dtype != np.uint8:
        top = float(np.nanpercentile(pixels, 99.9)) or 1.0
        pixels = np.clip(pixels.astype(np.float32) / top, 0, 1)
    return pixels, px_per_unit


def read_spatialdata(
    sdata,
    *,
    table_key: str | None = None,
    image_key: str | None = None,
    coordinate_system: str | None = None,
    spatial_key: str = SPATIAL_KEY,
    library_id: str | None = None,
    load_images: bool = True,
    bin_size: int | None = None,
    max_image_side: int = MAX_IMAGE_SIDE,
) -> AnnData:
    """Read spots (or bins, or cells) from a SpatialData object or ``.zarr`` store.

    The table is chosen by ``table_key``; else, with ``bin_size``, the Visium HD table of that
    bin size (``square_008um``); else the only table, the one named ``"table"``, the 8 µm bins,
    or the only table annotating a region. Its ``uns["spatialdata_attrs"]`` names the region
    (shapes or labels); each row's coordinates are the centroid of its instance
    (:func:`spatialdata.get_centroids`) in ``coordinate_system``.

    Parameters
    ----------
    sdata
        A :class:`spatialdata.SpatialData` or the path of its Zarr store.
    table_key, image_key
        Table and image to use (names in ``sdata.tables`` / ``sdata.images``).
    coordinate_system
        Coordinate system of the coordinates; ``None``: ``"global"`` when the region is in
        it, else the first one it is in.
    spatial_key
        ``obsm`` key receiving the coordinates.
    library_id
        Key under ``uns["spatial"]``; ``None``: the region's name.
    load_images
        Load an image: ``image_key``, else one whose name ends in ``hires_image``, else the
        first in the coordinate system; from a multiscale image the finest level whose longer
        side is at most ``max_image_side`` px.
    bin_size
        Visium HD bin side, µm, choosing the table when ``table_key`` is None.
    max_image_side
        Largest image side loaded, px.

    Returns
    -------
    ``n_obs × n_genes`` AnnData: a copy of the table (``X``, layers, ``obs``, ``var``,
    ``uns["spatialdata_attrs"]`` kept, so :func:`write_spatialdata` annotates the same region),
    repeated gene names made unique as :func:`read_spatial` does for ``.h5ad`` files (NAME-1,
    NAME-2, ..., with a logged warning naming them; the first copy keeps the name),
    ``obsm[spatial_key]`` = centroids ``(x, y)`` in coordinate-system units (full-resolution
    px for spatialdata-io's Visium readers), ``uns["spatial"][library_id]`` =
    ``{"scalefactors": {"spot_diameter_fullres" (circles: 2 × radius; square bins: side;
    other polygons: diameter of the circle of equal area; coordinate units),
    "tissue_hires_scalef" (image px per unit)}, "images": {"hires": H × W × 3},
    "metadata": {"coordinate_system", "table", "region"}}``.

    Raises
    ------
    InputError
        spatialdata is not installed; the store cannot be read; no table, several tables and
        no choice, an unknown ``table_key``/``image_key``; the table annotates no region, or
        instances missing from it; the region is not in ``coordinate_system``.

    Examples
    --------
    >>> st = spotlens.io.read_spatialdata("visium_hd.zarr", bin_size=8)  # doctest: +SKIP
    >>> st.obsm["spatial"][:1]  # doctest: +SKIP
    array([[20480.5, 9312.25]])
    """
    sdata = _open(sdata)
    name = _choose_table(sdata, table_key, bin_size)
    table = sdata.tables[name]
    regions, region_key, instance_key = _attrs(table, name)
    present = [r for r in regions if r in sdata]
    system = _coordinate_system(sdata, present or regions, coordinate_system)
    xy, diameter = _centroids(sdata, table, regions, region_key, instance_key, system)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")
        adata = table.copy()
    adata.obs_names_make_unique()
    from ._read import _make_var_names_unique  # _read imports this module at load

    store = getattr(sdata, "path", None)  # where it was read from; None for one in memory
    where = Path(store).name if store else "SpatialData"
    _make_var_names_unique(adata, Path(f"{where}, table {name!r}"))  # names it in the warning
    adata.obsm[spatial_key] = xy
    library_id = library_id or (regions[0] if len(regions) == 1 else name)
    scalefactors: dict[str, float] = {}
    if diameter is not None:
        scalefactors["spot_diameter_fullres"] = diameter
    entry: dict[str, Any] = {"scalefactors": scalefactors, "images": {},
                             "metadata": {"coordinate_system": system, "table": name,
                                          "region": regions if len(regions) > 1 else regions[0]}}
    image = _pick_image(sdata, system, image_key) if load_images else None
    if image is not None:
        pixels, scalef = _image(sdata, image, system, max_image_side)
        entry["images"]["hires"] = pixels
        scalefactors["tissue_hires_scalef"] = scalef
        entry["metadata"]["image"] = image
    adata.uns[SPATIAL_UNS_KEY] = {library_id: entry}
    check_coordinates(adata, spatial_key)
    logger.info("SpatialData: table %r (%d rows) on %s in coordinate system %r", name,
                adata.n_obs, regions, system)
    return adata

