"""SpatialData out: spotlens results as new tables (and points) annotating the same region.

Through the :mod:`spatialdata` API only (element models, ``write_element``); see
:mod:`._spatialdata` for the conventions.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import (
    HISTOLOGY_PREDICTION_KEY,
    SPATIAL_KEY,
    SPATIAL_UNS_KEY,
    SPOT_DIAMETER_KEY,
    abundance_key,
    fit_score_key,
    poorly_fit_key,
    prediction_std_key,
    proportions_key,
    zero_counts_key,
)
from .._validation import InputError, check_coordinates
from ._spatialdata import ATTRS_KEY, _open, quiet_zarr

logger = logging.getLogger("spotlens")


def write_spatialdata(
    adata: AnnData,
    sdata,
    *,
    key: str = proportions_key(),
    cells: AnnData | None = None,
    table_key: str | None = None,
    cells_key: str = "cells_spotlens",
    coordinate_system: str = "global",
    overwrite: bool = False,
) -> None:
    """Write spotlens results into a SpatialData object or store, as new elements.

    Each result becomes a table annotating the region the spots came from (the
    ``uns["spatialdata_attrs"]`` and ``obs`` columns that :func:`read_spatialdata` kept), so
    napari-spatialdata and squidpy colour the same shapes by it. Spots that came from an
    ``.h5ad`` (no region) are first written as a shapes element ``<table>_spots`` (circles of
    the spot diameter, identity transformation to ``coordinate_system``).

    Parameters
    ----------
    adata
        Spots with spotlens results: proportions in ``obsm[key]`` (after
        :func:`spotlens.deconv.deconvolve`) and/or a histology prediction
        (``obsm["histology_prediction"]`` of :func:`spotlens.histology.predict`, or the
        AnnData of :func:`spotlens.histology.predict_image`, genes in ``X``).
    sdata
        A :class:`spatialdata.SpatialData` or the path of its ``.zarr`` store. A path, or an
        object read from a store (``sdata.path`` set), gets the new elements written into the
        store with ``SpatialData.write_element``; an in-memory object only holds them.
    key
        ``obsm`` key of the proportions.
    cells
        Placed cells of :func:`spotlens.deconv.assign_cells` (``obsm["spatial"]``,
        ``obs["cell_type"]``): written as points ``cells_key``.
    table_key
        Name of the proportions table; ``None``: ``key``.
    cells_key
        Name of the points element of the cells.
    coordinate_system
        Coordinate system of new shapes and points (the coordinates' units).
    overwrite
        Replace elements of the same names; otherwise an existing name is an error.

    Notes
    -----
    Written (``T`` = ``table_key``): ``tables[T]`` — ``X`` = proportions (``n_spots ×
    n_types``, rows sum to 1), ``layers["abundance"]``, ``obs``: the region and instance
    columns, ``dominant_type``, and the QC columns of the run (``<key>_zero_counts``,
    ``_fit_score``, ``_poorly_fit``), ``uns["spotlens"]`` = the run's ``params``;
    ``tables["histology_prediction"]`` — ``X`` = predicted log-normalised expression
    (``n_spots × n_genes``), ``layers["std"]`` its uncertainty when present; ``points[cells_key]``
    — ``x``, ``y``, ``cell_type``, ``spot``.

    Raises
    ------
    InputError
        spatialdata is not installed; no result in ``adata``; an element name exists and
        ``overwrite`` is False; ``cells`` lacks coordinates or ``obs["cell_type"]``.

    Examples
    --------
    >>> st = spotlens.io.read_spatial("sample.zarr")  # doctest: +SKIP
    >>> spotlens.deconv.deconvolve(st, ref)  # doctest: +SKIP
    >>> spotlens.io.write_spatialdata(st, "sample.zarr")  # doctest: +SKIP
    >>> spatialdata.read_zarr("sample.zarr").tables["proportions_spotlens"]  # doctest: +SKIP
    """
    sdata = _open(sdata)
    tables = _result_tables(adata, key)
    if not tables and cells is None:
        raise InputError(f"Nothing to write: adata has no proportions (obsm[{key!r}]) and no "
                         "histology prediction, and no cells were given.")
    if table_key is not None and key in tables:
        tables[table_key] = tables.pop(key)
    new: dict[str, Any] = {}
    region, region_key, instance_key, shapes = _region(adata, sdata, next(iter(tables), None),
                                                       coordinate_system)
    if shapes is not None:
        new[region] = shapes
    from spatialdata.models import TableModel

    for name, table in tables.items():
        if shapes is None:  # the region the spots were read from
            table.obs[region_key] = adata.obs[region_key].to_numpy() \
                if region_key in adata.obs else np.full(adata.n_obs, region)
            table.obs[instance_key] = adata.obs[instance_key].to_numpy()
        else:  # the spots just written as shapes, one instance per obs name
            table.obs[region_key] = np.full(adata.n_obs, region)
            table.obs[instance_key] = adata.obs_names.to_numpy()
        regions = list(pd.unique(np.asarray(table.obs[region_key], dtype=str)))
        table.obs[region_key] = pd.Categorical(table.obs[region_key].astype(str))
        new[name] = TableModel.parse(table, region=regions if len(regions) > 1 else regions[0],
                                     region_key=region_key, instance_key=instance_key)
    if cells is not None:
        new[cells_key] = _cell_points(cells, coordinate_system)
    _store(sdata, new, overwrite=overwrite)


def _result_tables(adata: AnnData, key: str) -> dict[str, AnnData]:
    out = {}
    if key in adata.obsm:
        props = pd.DataFrame(adata.obsm[key])
        table = AnnData(props.to_numpy(dtype=float), obs=pd.DataFrame(index=adata.obs_names),
                        var=pd.DataFrame(index=[str(c) for c in props.columns]))
        if abundance_key(key) in adata.obsm:
            table.layers["abundance"] = pd.DataFrame(adata.obsm[abundance_key(key)]).to_numpy(
                dtype=float)
        top = np.nan_to_num(props.to_numpy(dtype=float), nan=-1).argmax(axis=1)
        table.obs["dominant_type"] = pd.Categorical.from_codes(top, table.var_names)
        for column in (zero_counts_key(key), fit_score_key(key), poorly_fit_key(key)):
            if column in adata.obs:
                table.obs[column] = adata.obs[column].to_numpy()
        params = adata.uns.get(key, {}).get("params", {}) if isinstance(
            adata.uns.get(key), dict) else {}
        table.uns["spotlens"] = {"key": key, "params": json.loads(json.dumps(params,
                                                                             default=str))}
        out[key] = table
    genes, std = _prediction(adata)
    if genes is not None:
        table = AnnData(genes.to_numpy(dtype=np.float32), obs=pd.DataFrame(index=adata.obs_names),
                        var=pd.DataFrame(index=[str(g) for g in genes.columns]))
        if std is not None:
            table.layers["std"] = np.asarray(std, dtype=np.float32)
        out[HISTOLOGY_PREDICTION_KEY] = table
    return out


def _prediction(adata: AnnData) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """Predicted genes (spots × genes) and their s.d., from ``obsm`` or a predict_image AnnData."""
    from scipy import sparse

    std_key = prediction_std_key(HISTOLOGY_PREDICTION_KEY)
    if HISTOLOGY_PREDICTION_KEY in adata.obsm:
        genes = pd.DataFrame(adata.obsm[HISTOLOGY_PREDICTION_KEY])
        std = adata.obsm.get(std_key)
        return genes, (None if std is None else pd.DataFrame(std).to_numpy())
    if HISTOLOGY_PREDICTION_KEY in adata.uns:  # predict_image: genes in X, s.d. in a layer
        x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
        std = adata.layers[std_key] if std_key in adata.layers else None
        return pd.DataFrame(x, index=adata.obs_names, columns=adata.var_names), std
    return None, None


def _region(adata: AnnData, sdata, table: str | None, system: str):
    """``(region, region_key, instance_key, new shapes or None)`` the tables annotate."""
    attrs = adata.uns.get(ATTRS_KEY)
    if isinstance(attrs, dict) and {"region", "region_key", "instance_key"} <= set(attrs):
        region, region_key, instance_key = attrs["region"], attrs["region_key"], \
            attrs["instance_key"]
        regions = [region] if isinstance(region, str) else list(region)
        if instance_key in adata.obs and all(r in sdata for r in regions):
            return regions[0], region_key, instance_key, None
    import geopandas as gpd
    import shapely
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    check_coordinates(adata, SPATIAL_KEY)
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=float)
    radius = np.full(adata.n_obs, _spot_diameter(adata, xy) / 2)
    shapes = gpd.GeoDataFrame({"radius": radius}, geometry=shapely.points(xy),
                              index=pd.Index(adata.obs_names, dtype=str))
    shapes = ShapesModel.parse(shapes, transformations={system: Identity()})
    return f"{table or 'spotlens'}_spots", "region", "spot", shapes


def _spot_diameter(adata: AnnData, xy: np.ndarray) -> float:
    for entry in (adata.uns.get(SPATIAL_UNS_KEY) or {}).values():
        value = (entry.get("scalefactors") or {}).get("spot_diameter_fullres")
        if value:
            return float(value)
    if len(xy) < 2:
        return 1.0
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(distance[:, 1]))


def _cell_points(cells: AnnData, system: str):
    from spatialdata.models import PointsModel
    from spatialdata.transformations import Identity

    check_coordinates(cells, SPATIAL_KEY)
    if "cell_type" not in cells.obs:
        raise InputError("cells= needs obs['cell_type'] (the AnnData of "
                         "spotlens.deconv.assign_cells).")
    xy = np.asarray(cells.obsm[SPATIAL_KEY], dtype=float)
    frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1],
                          "cell_type": pd.Categorical(cells.obs["cell_type"].astype(str))})
    if "spot" in cells.obs:
        frame["spot"] = cells.obs["spot"].astype(str).to_numpy()
    points = PointsModel.parse(frame, transformations={system: Identity()})
    diameter = cells.uns.get(SPOT_DIAMETER_KEY)
    if diameter is not None:
        points.attrs["spot_diameter"] = float(diameter)
    return points


def _store(sdata, new: dict[str, Any], *, overwrite: bool) -> None:
    clash = [name for name in new if name in sdata]
    if clash and not overwrite:
        raise InputError(f"The SpatialData object already holds {clash}; pass overwrite=True "
                         "(CLI: --overwrite) to replace them, or another table_key.")
    backed = sdata.path is not None
    on_disk = set(sdata.elements_paths_on_disk()) if backed else set()
    for name, element in new.items():
        kind = ("tables" if isinstance(element, AnnData) else
                "shapes" if hasattr(element, "geometry") else "points")
        if backed and f"{kind}/{name}" in on_disk:
            sdata.delete_element_from_disk(name)
        if name in sdata:
            del sdata[name]
        getattr(sdata, kind)[name] = element
        if backed:
            with quiet_zarr():
                sdata.write_element(name)
    logger.info("SpatialData: wrote %s%s", list(new), f" into {sdata.path}" if backed else "")
