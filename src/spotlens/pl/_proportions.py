"""Spatial maps of cell-type proportions, and their copy into ``obs`` for scanpy."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial import cKDTree

from .._keys import colors_key, proportions_key
from .._validation import InputError, check_coordinates, check_int, check_number
from ._palette import type_colors

PANEL_INCHES = 3.0
COLORBAR_INCHES = 0.9
NO_COUNTS_COLOR = "#d9d9d9"
VMAX_HELP = (
    "None (each panel up to its own maximum), 'pN' with 0 < N <= 100 (each panel up to its "
    "N-th percentile, e.g. 'p99'), a positive number (one scale 0 to that number for every "
    "panel, e.g. 1.0), or a list of these, one per mapped cell type"
)


def proportions(
    adata: AnnData,
    *,
    key: str = proportions_key(),
    spatial_key: str = "spatial",
    cell_types: Sequence[str] | None = None,
    ncols: int = 4,
    spot_size: float | None = None,
    vmax: float | str | Sequence[float | str | None] | None = None,
    dominant: bool = True,
    ax=None,
):
    """Map each cell type's proportion over the tissue, plus the dominant type of each spot.

    One panel per cell type, spots coloured by proportion (viridis, from 0), then a panel with
    the dominant cell type of every spot (categorical colours, legend). By default each panel
    has its own scale and colour bar, up to that type's largest proportion, so rare types stay
    visible (as in ``sc.pl.spatial``); ``vmax=1.0`` puts every panel on one 0–1 scale with a
    single colour bar. Panels have equal aspect and the y axis points down, as in image
    coordinates (Visium pixels). Spots whose proportions are NaN (no counts over the genes
    used) are grey.

    The colours of the cell types come from ``adata.uns[key + "_colors"]`` (the scanpy
    convention: a list of colours aligned with the columns of ``obsm[key]``), so a type keeps
    its colour across calls, figures and :func:`spotlens.pl.cells`. Set that list yourself to
    choose the colours.

    Without ``ax`` the figure is built without pyplot, so no GUI backend is touched and nothing
    is shown; save it with :func:`spotlens.io.save_figure` or ``fig.savefig``, or let a notebook
    display it.

    Parameters
    ----------
    adata
        ``n_spots × n_genes`` AnnData with ``obsm[key]`` (``n_spots × n_types`` proportions,
        written by :func:`spotlens.deconv.deconvolve`) and ``obsm[spatial_key]``
        (``n_spots × 2`` coordinates ``(x, y)``).
    key
        ``obsm`` key of the proportions (a DataFrame with one column per cell type; a plain array
        takes its names from ``uns[key]["cell_types"]``).
    spatial_key
        ``obsm`` key of the coordinates.
    cell_types
        Cell types to map, in this order (default: all). The dominant-type panel always uses all
        types.
    ncols
        Panels per row (ignored with ``ax``).
    spot_size
        Spot diameter in coordinate units; ``None`` uses the median distance between nearest
        spots, so neighbouring spots just touch.
    vmax
        Top of the colour scale of the type panels (proportion, 0–1; the bottom is 0):
        ``None`` (default), each panel's largest proportion, one colour bar per panel;
        ``"p99"``-style strings, that percentile of each panel's proportions, one colour bar
        per panel; a number, the same scale for all panels and one shared colour bar; or a
        list with one of these per mapped cell type. A panel whose scale would be 0 (the type
        is absent) uses 1.
    dominant
        Add the dominant-cell-type panel after the type panels.
    ax
        A matplotlib Axes, or a sequence (or array) of Axes of one figure, to draw into: one
        per mapped cell type, then one for the dominant panel when ``dominant``. Default: a new
        figure with a grid of ``ncols`` panels per row.

    Returns
    -------
    :class:`matplotlib.figure.Figure` (with ``ax``, the figure holding those axes) with one
    axes per cell type, titled by type, then the ``"dominant cell type"`` axes, and the
    colour-bar axes (one per type panel, or one shared with a numeric ``vmax``).

    Writes ``adata.uns[key + "_colors"]`` (list of ``n_types`` hex colours aligned with the
    columns of ``obsm[key]``) when the dominant panel is drawn and that key is missing or
    shorter than the number of types (stored colours are kept; new types get colours not yet
    used). Nothing else in ``adata`` changes.

    Raises
    ------
    InputError
        ``obsm[key]`` is missing (run :func:`spotlens.deconv.deconvolve` first) or does not
        have one row per spot; coordinates are missing or not 2-D; an entry of ``cell_types`` is
        not a column of the proportions; ``ncols`` or ``spot_size`` is not positive; ``vmax``
        is not one of the forms above; ``ax`` is not Axes of one figure, or holds a number of
        Axes other than the number of panels; ``uns[key + "_colors"]`` is not a list of
        colours.

    Examples
    --------
    >>> import spotlens
    >>> st, ref = spotlens.datasets.osmfish_cortex()
    >>> spotlens.deconv.deconvolve(st, ref, progress=False)
    >>> fig = spotlens.pl.proportions(st, ncols=3)
    >>> spotlens.io.save_figure(fig, "proportions.png")  # doctest: +SKIP

    Into axes of your own, one type on a shared 0–1 scale:

    >>> import matplotlib.pyplot as plt  # doctest: +SKIP
    >>> fig, ax = plt.subplots()  # doctest: +SKIP
    >>> spotlens.pl.proportions(st, cell_types=["Astrocyte"], dominant=False, vmax=1.0,
    ...                         ax=ax)  # doctest: +SKIP
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    props = _proportions_frame(adata, key)
    coords = check_coordinates(adata, spatial_key)
    check_int("ncols", ncols, minimum=1, expected="a positive integer")
    check_number("spot_size", spot_size, above=0, none_ok=True,
                 expected="a positive number (coordinate units)")
    shown = list(props.columns) if cell_types is None else _select(props, cell_types)
    tops, shared = _scales(props, shown, vmax)
    diameter = float(spot_size) if spot_size is not None else _nearest_distance(coords)

    n_panels = len(shown) + bool(dominant)
    axes = _as_axes(ax)
    if axes is None:
        fig, axes = _new_panels(coords, diameter, n_panels, ncols,
                                extra=0.0 if shared else COLORBAR_INCHES)
    else:
        _check_count(axes, n_panels, f"{len(shown)} cell-type panel(s)"
                     + (" and the dominant-type panel" if dominant else ""))
        fig = _root(axes[0])

    cmap = colormaps["viridis"].with_extremes(bad=NO_COUNTS_COLOR)
    type_axes, mappable = axes[: len(shown)], None
    for ax_i, cell_type, top in zip(type_axes, shown, tops, strict=True):
        mappable = _spots(ax_i, coords, diameter, values=props[cell_type].to_numpy(float),
                          cmap=cmap, norm=Normalize(vmin=0.0, vmax=top))
        _frame(ax_i, coords, diameter, title=str(cell_type))
        if not shared:
            ax_i.figure.colorbar(mappable, ax=ax_i, label="proportion", shrink=0.8, aspect=20)
    if shared and type_axes:
        type_axes[0].figure.colorbar(mappable, ax=type_axes, label="proportion", shrink=0.8,
                                     aspect=30)
    if not dominant:
        return fig

    ax_d = axes[-1]
    values = props.to_numpy(float)
    valid = ~np.isnan(values).any(axis=1)
    dominant_type = np.full(len(values), -1)
    dominant_type[valid] = values[valid].argmax(axis=1)
    palette = list(type_colors(adata, colors_key(key), props.columns).values())
    colors = [palette[i] if i >= 0 else NO_COUNTS_COLOR for i in dominant_type]
    _spots(ax_d, coords, diameter, colors=colors)
    _frame(ax_d, coords, diameter, title="dominant cell type")
    handles = [
        Line2D([], [], linestyle="", marker="o", markersize=7, color=palette[i],
               label=str(props.columns[i]))
        for i in np.unique(dominant_type[dominant_type >= 0])  # the types that dominate somewhere
    ]
    if not valid.all():
        handles.append(Line2D([], [], linestyle="", marker="o", markersize=7,
                              color=NO_COUNTS_COLOR, label="no counts"))
    ax_d.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
                fontsize="small", ncols=1 if len(handles) <= 16 else 2, borderaxespad=0.0)
    return fig


def proportions_to_obs(
    adata: AnnData,
    *,
    key: str = proportions_key(),
    prefix: str = "",
    cell_types: Sequence[str] | None = None,
    overwrite: bool = False,
) -> None:
    """Copy each cell type's proportions from ``obsm[key]`` into an ``obs`` column.

    Makes the result usable by any tool that colours by ``obs`` columns, e.g.
    ``sc.pl.spatial(adata, color=["Astro", "Neuron"])`` or ``sq.pl.spatial_scatter``, without
    copying by hand. Values are copied (later changes to ``obsm[key]`` do not follow).

    Parameters
    ----------
    adata
        ``n_spots × n_genes`` AnnData with ``obsm[key]`` (``n_spots × n_types`` proportions,
        written by :func:`spotlens.deconv.deconvolve`).
    key
        ``obsm`` key of the proportions.
    prefix
        Put before each cell-type name to make the column name, e.g. ``"prop_"``; use it when
        a cell type has the name of an ``obs`` column or of a gene.
    cell_types
        Cell types to copy (default: all columns of ``obsm[key]``).
    overwrite
        Replace ``obs`` columns that already have one of the new names.

    Returns
    -------
    ``None``; writes ``adata.obs[prefix + cell_type]`` for each cell type: float64
    proportions (0–1, NaN for spots with no counts over the genes used). Nothing else changes.

    Raises
    ------
    InputError
        ``adata`` is not an AnnData; ``obsm[key]`` is missing; a cell type is unknown; a new
        column name already is an ``obs`` column (pass ``overwrite=True`` or a ``prefix``) or a
        gene in ``var_names`` (``sc.pl`` could not tell them apart; pass a ``prefix``).

    Examples
    --------
    >>> import spotlens
    >>> st, ref = spotlens.datasets.osmfish_cortex()
    >>> spotlens.deconv.deconvolve(st, ref, progress=False)
    >>> spotlens.pl.proportions_to_obs(st, prefix="prop_")
    >>> import scanpy as sc  # doctest: +SKIP
    >>> sc.pl.spatial(st, color=["prop_Astrocyte"], spot_size=20)  # doctest: +SKIP
    """
    props = _proportions_frame(adata, key, what="proportions_to_obs")
    if not isinstance(prefix, str):
        raise InputError(f"prefix must be a string, got {type(prefix).__name__}.")
    shown = list(props.columns) if cell_types is None else _select(props, cell_types)
    names = {cell_type: f"{prefix}{cell_type}" for cell_type in shown}
    genes = [n for n in names.values() if n in adata.var_names]
    if genes:
        raise InputError(
            f"Columns {genes} would have the names of genes in adata.var_names, so "
            "sc.pl.spatial(color=...) could not tell them apart. Pass a prefix, e.g. "
            "prefix='prop_'."
        )
    clash = [n for n in names.values() if n in adata.obs.columns]
    if clash and not overwrite:
        raise InputError(
            f"adata.obs already has columns {clash}. Pass overwrite=True to replace them, or "
            "a prefix (e.g. prefix='prop_') to write new ones."
        )
    for cell_type, name in names.items():
        adata.obs[name] = props[cell_type].to_numpy(dtype=np.float64)


def _scales(props: pd.DataFrame, shown: list, vmax) -> tuple[list[float], bool]:
    """Return the top of each panel's colour scale, and whether one scale is shared."""
    if vmax is None or isinstance(vmax, (str, int, float, np.number)):
        specs, shared = [vmax] * len(shown), vmax is not None and not isinstance(vmax, str)
    elif isinstance(vmax, (Sequence, np.ndarray)):
        specs, shared = list(np.ravel(np.asarray(vmax, dtype=object))), False
        if len(specs) != len(shown):
            raise InputError(
                f"vmax holds {len(specs)} values but {len(shown)} cell types are mapped; pass "
                "one per cell type, or a single value."
            )
    else:
        raise InputError(f"vmax must be {VMAX_HELP}; got {vmax!r}.")
    return [_scale(props[t].to_numpy(float), spec) for t, spec in zip(shown, specs,
                                                                         strict=True)], shared


def _scale(values: np.ndarray, spec) -> float:
    finite = values[np.isfinite(values)]
    if spec is None:
        top = finite.max() if finite.size else 1.0
    elif isinstance(spec, str):
        match = re.fullmatch(r"p(\d+(?:\.\d*)?)", spec.strip())
        q = float(match.group(1)) if match else -1.0
        if not 0 < q <= 100:
            raise InputError(f"vmax must be {VMAX_HELP}; got {spec!r}.")
        top = np.percentile(finite, q) if finite.size else 1.0
    elif isinstance(spec, (int, float, np.number)) and not isinstance(spec, (bool, np.bool_)) \
            and np.isfinite(spec) and spec > 0:
        return float(spec)
    else:
        raise InputError(f"vmax must be {VMAX_HELP}; got {spec!r}.")
    return float(top) if top > 0 else 1.0


def _as_axes(ax) -> list | None:
    """Return ``ax`` as a list of Axes of one figure (``None`` stays ``None``)."""
    from matplotlib.axes import Axes

    if ax is None:
        return None
    axes = [ax] if isinstance(ax, Axes) else list(np.asarray(ax, dtype=object).ravel())
    bad = [a for a in axes if not isinstance(a, Axes)]
    if bad or not axes:
        raise InputError(
            f"ax must be a matplotlib Axes or a sequence of Axes, got {type(ax).__name__}"
            + (f" holding {type(bad[0]).__name__}" if bad and bad[0] is not ax else "")
            + ". Create them with e.g. fig, axs = plt.subplots(1, n)."
        )
    if len({id(_root(a)) for a in axes}) > 1:
        raise InputError("The Axes in ax belong to different figures; pass Axes of one figure.")
    return axes


def _check_count(axes: list, n: int, panels: str) -> None:
    if len(axes) != n:
        raise InputError(
            f"ax holds {len(axes)} Axes but this plot draws {n} panel(s) ({panels}). Pass "
            f"{'one Axes' if n == 1 else f'{n} Axes'}, e.g. from plt.subplots(1, {n})."
        )


def _root(ax):
    """Return the top-level Figure of ``ax`` (not a SubFigure)."""
    try:
        return ax.get_figure(root=True)
    except TypeError:  # matplotlib < 3.10
        fig = ax.figure
        while getattr(fig, "figure", fig) is not fig:
            fig = fig.figure
        return fig


def _new_panels(coords, diameter, n_panels: int, ncols: int, *, extra: float):
    """Return a new Figure (no pyplot) and a grid of ``n_panels`` axes shaped like the tissue."""
    from matplotlib.figure import Figure

    ncols = min(int(ncols), n_panels)
    nrows = math.ceil(n_panels / ncols)
    width, height = _panel_inches(coords, diameter)
    fig = Figure(figsize=((width + extra) * ncols + 2.5, (height + 0.3) * nrows),
                 layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    return fig, [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(n_panels)]


def _proportions_frame(adata: AnnData, key: str, what: str = "proportions") -> pd.DataFrame:
    if not isinstance(adata, AnnData):
        raise InputError(f"{what} needs an AnnData object, got {type(adata).__name__}.")
    if key not in adata.obsm:
        have = ", ".join(map(repr, adata.obsm.keys())) or "none"
        raise InputError(
            f"adata.obsm has no {key!r} (obsm keys: {have}). Run spotlens.deconv.deconvolve "
            "first, which writes it, or pass key= naming the proportions."
        )
    value = adata.obsm[key]
    if isinstance(value, pd.DataFrame):
        return value
    array = np.asarray(value, dtype=float)
    if array.ndim != 2:
        raise InputError(f"obsm[{key!r}] must be n_spots × n_types, got shape {array.shape}.")
    meta = adata.uns.get(key)
    names = meta.get("cell_types") if isinstance(meta, dict) else None
    if names is None or len(names) != array.shape[1]:
        names = [f"type {i}" for i in range(array.shape[1])]
    return pd.DataFrame(array, index=adata.obs_names, columns=[str(n) for n in names])


def _select(props: pd.DataFrame, cell_types: Sequence[str]) -> list:
    if isinstance(cell_types, str):
        cell_types = [cell_types]
    unknown = [t for t in cell_types if t not in props.columns]
    if unknown:
        raise InputError(
            f"Unknown cell types {unknown}; the proportions have {list(props.columns)}."
        )
    if not len(cell_types):
        raise InputError("cell_types is empty; pass None to map every cell type.")
    return list(cell_types)


def _nearest_distance(coords: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot (1.0 if undefined)."""
    unique = np.unique(coords, axis=0)
    if len(unique) < 2:
        return 1.0
    dist, _ = cKDTree(unique).query(unique, k=2)
    d = float(np.median(dist[:, 1]))
    return d if d > 0 else 1.0


def _panel_inches(coords: np.ndarray, diameter: float) -> tuple[float, float]:
    """Panel width and height following the tissue's aspect ratio, longest side PANEL_INCHES."""
    extent = np.ptp(coords, axis=0) + 2 * diameter
    ratio = extent[1] / extent[0]
    if ratio >= 1:
        return max(PANEL_INCHES / ratio, 1.2), PANEL_INCHES
    return PANEL_INCHES, max(PANEL_INCHES * ratio, 1.2)


def _spots(ax, coords, diameter, *, values=None, colors=None, cmap=None, norm=None):
    """Draw spots as circles of ``diameter`` in data units (they scale with the axes)."""
    from matplotlib.collections import EllipseCollection

    n = len(coords)
    circles = EllipseCollection(
        np.full(n, diameter), np.full(n, diameter), np.zeros(n), units="xy",
        offsets=coords, offset_transform=ax.transData, linewidths=0,
    )
    if values is not None:
        circles.set_array(np.ma.masked_invalid(values))
        circles.set_cmap(cmap)
        circles.set_norm(norm)
    else:
        circles.set_facecolor(colors)
    ax.add_collection(circles, autolim=False)
    return circles


def _frame(ax, coords, diameter, *, title):
    pad = diameter
    ax.set_xlim(coords[:, 0].min() - pad, coords[:, 0].max() + pad)
    ax.set_ylim(coords[:, 1].max() + pad, coords[:, 1].min() - pad)  # y down, as in images
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize="medium")
