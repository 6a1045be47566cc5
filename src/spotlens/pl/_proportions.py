"""Spatial maps of cell-type proportions."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial import cKDTree

from .._keys import proportions_key
from .._validation import InputError, check_coordinates

PANEL_INCHES = 3.0
NO_COUNTS_COLOR = "#d9d9d9"


def proportions(
    adata: AnnData,
    *,
    key: str = proportions_key(),
    spatial_key: str = "spatial",
    cell_types: Sequence[str] | None = None,
    ncols: int = 4,
    spot_size: float | None = None,
):
    """Map each cell type's proportion over the tissue, plus the dominant type of each spot.

    One panel per cell type, spots coloured by proportion on a shared 0–1 scale (one colourbar),
    then a panel with the dominant cell type of every spot (categorical colours, legend). Panels
    have equal aspect and the y axis points down, as in image coordinates (Visium pixels). Spots
    whose proportions are NaN (no counts over the genes used) are grey.

    The figure is built without pyplot, so no GUI backend is touched and nothing is shown; save it
    with :func:`spotlens.io.save_figure` or ``fig.savefig``, or let a notebook display it.

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
        Panels per row.
    spot_size
        Spot diameter in coordinate units; ``None`` uses the median distance between nearest
        spots, so neighbouring spots just touch.

    Returns
    -------
    :class:`matplotlib.figure.Figure` with one axes per cell type, titled by type, then the
    ``"dominant cell type"`` axes, and the colourbar axes.

    Raises
    ------
    InputError
        ``obsm[key]`` is missing (run :func:`spotlens.deconv.deconvolve` first) or does not
        have one row per spot; coordinates are missing or not 2-D; an entry of ``cell_types`` is
        not a column of the proportions; ``ncols`` or ``spot_size`` is not positive.

    Examples
    --------
    >>> import spotlens
    >>> st, ref = spotlens.datasets.osmfish_cortex()
    >>> spotlens.deconv.deconvolve(st, ref, progress=False)
    >>> fig = spotlens.pl.proportions(st, ncols=3)
    >>> spotlens.io.save_figure(fig, "proportions.png")  # doctest: +SKIP
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    props = _proportions_frame(adata, key)
    coords = check_coordinates(adata, spatial_key)
    if not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise InputError(f"ncols must be a positive integer, got {ncols!r}.")
    if spot_size is not None and not (np.isfinite(spot_size) and spot_size > 0):
        raise InputError(
            f"spot_size must be a positive number (coordinate units), got {spot_size!r}."
        )
    shown = list(props.columns) if cell_types is None else _select(props, cell_types)
    diameter = float(spot_size) if spot_size is not None else _nearest_distance(coords)

    n_panels = len(shown) + 1
    ncols = min(int(ncols), n_panels)
    nrows = math.ceil(n_panels / ncols)
    width, height = _panel_inches(coords, diameter)
    fig = Figure(figsize=(width * ncols + 2.5, (height + 0.3) * nrows), layout="constrained")
    grid = fig.add_gridspec(nrows, ncols)
    axes = [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(n_panels)]

    cmap = colormaps["viridis"].with_extremes(bad=NO_COUNTS_COLOR)
    norm = Normalize(vmin=0.0, vmax=1.0)
    mappable = None
    for ax, cell_type in zip(axes[:-1], shown, strict=True):
        mappable = _spots(ax, coords, diameter, values=props[cell_type].to_numpy(float),
                          cmap=cmap, norm=norm)
        _frame(ax, coords, diameter, title=str(cell_type))
    fig.colorbar(mappable, ax=axes[:-1], label="proportion", shrink=0.8, aspect=30)

    ax = axes[-1]
    values = props.to_numpy(float)
    valid = ~np.isnan(values).any(axis=1)
    dominant = np.full(len(values), -1)
    dominant[valid] = values[valid].argmax(axis=1)
    # colours go to the types that dominate somewhere, so few types get well-separated colours
    present = np.unique(dominant[dominant >= 0])
    palette = dict(zip(present, _palette(len(present)), strict=True))
    colors = [palette.get(i, NO_COUNTS_COLOR) for i in dominant]
    _spots(ax, coords, diameter, colors=colors)
    _frame(ax, coords, diameter, title="dominant cell type")
    handles = [
        Line2D([], [], linestyle="", marker="o", markersize=7, color=palette[i],
               label=str(props.columns[i]))
        for i in present
    ]
    if not valid.all():
        handles.append(Line2D([], [], linestyle="", marker="o", markersize=7,
                              color=NO_COUNTS_COLOR, label="no counts"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False,
              fontsize="small", ncols=1 if len(handles) <= 16 else 2, borderaxespad=0.0)
    return fig


def _proportions_frame(adata: AnnData, key: str) -> pd.DataFrame:
    if not isinstance(adata, AnnData):
        raise InputError(f"proportions needs an AnnData object, got {type(adata).__name__}.")
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


def _palette(n: int) -> list[str]:
    """Return ``n`` distinct colours (tab10; tab20 dark shades, then light; tab20b, tab20c)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if n <= 10:
        names = ["tab10"]
    elif n <= 20:
        names = ["tab20"]
    else:
        names = ["tab20", "tab20b", "tab20c"]
    colors = [to_hex(c) for name in names for c in colormaps[name].colors]
    if n > 10:  # tab20 pairs a dark and a light shade of each hue: all dark ones first
        colors[:20] = colors[0:20:2] + colors[1:20:2]
    return [colors[i % len(colors)] for i in range(n)]
