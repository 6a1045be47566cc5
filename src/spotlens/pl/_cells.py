"""Single-cell spatial map: assigned cells as dots over the spot footprints."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.spatial import cKDTree

from .._keys import SPATIAL_KEY, SPOT_DIAMETER_KEY, colors_key, proportions_key
from .._validation import InputError, check_coordinates, check_int, check_number
from ._palette import type_colors
from ._proportions import (
    _as_axes,
    _check_count,
    _nearest_distance,
    _proportions_frame,
    _root,
    _spots,
)

SPOT_COLOR = "#e3e3e3"
ZOOM_EDGE = "#333333"
OVERVIEW_INCHES = 6.0
ZOOM_INCHES = 4.5
AUTO_ZOOM_SPOTS = 25  # a 5 × 5 block of spots
AUTO_ZOOM_MIN_SPOTS = 200  # smaller slides show their cells well enough without a zoom panel
CELL_FRACTION = 0.2  # cell dot diameter relative to the spot footprint
MIN_DOT_POINTS = 2.0  # overview dots are at least this wide, so the pattern stays visible


def cells(
    cells: AnnData,
    spatial: AnnData | None = None,
    *,
    spatial_key: str = "spatial",
    color: str = "cell_type",
    zoom: int | Sequence[float] | str | None = "auto",
    cell_size: float | None = None,
    spot_size: float | None = None,
    title: str | None = None,
    key: str | None = None,
    ax=None,
):
    """Map the cells placed in the spots, coloured by cell type, over the spot footprints.

    Each cell of ``cells`` (from :func:`spotlens.deconv.assign_cells`) is a dot at its position,
    coloured by ``obs[color]`` (categorical colours and a legend; a numeric column gets a
    colour scale). The spots of ``spatial`` are drawn underneath as light grey discs of the
    footprint size. Dots and discs are drawn in data units, so they scale with the axes and
    keep their true size relative to the tissue. Axes have equal aspect and the y axis points
    down, as in image coordinates.

    On a large slide a second panel zooms on a small window (drawn as a rectangle on the
    overview) so individual cells can be told apart.

    Categorical colours follow the scanpy convention: ``cells.uns[color + "_colors"]`` is a
    list of colours aligned with the categories of ``obs[color]``, reused when present. Types
    without a stored colour take the colour they have in the proportions of ``spatial``
    (``spatial.uns[key + "_colors"]``, or the default :func:`spotlens.pl.proportions` would
    give them), so cells and spots of a type look the same in every figure.

    Parameters
    ----------
    cells
        ``n_cells × n_genes`` AnnData with ``obsm["spatial"]`` (``n_cells × 2`` positions in the
        spots' coordinate units), ``obs[color]`` and ``uns["spot_diameter"]`` (coordinate
        units), as :func:`spotlens.deconv.assign_cells` writes them.
    spatial
        ``n_spots × n_genes`` AnnData whose spots are drawn as footprints (``None``: cells only).
    spatial_key
        ``obsm`` key of the spot coordinates in ``spatial``.
    color
        ``obs`` column of ``cells`` to colour by (categorical or string: one colour per value;
        numeric: viridis with a colourbar).
    zoom
        Second panel: an integer ``n`` zooms on a square holding a block of about ``√n × √n``
        spots (``(√n − 1)`` spot pitches plus one footprint wide, the pitch being the median
        distance between neighbouring spots), centred on the spot whose window holds the most
        distinct values of ``color`` (then the most cells); ``(x_min, y_min, x_max, y_max)``
        zooms on that box (coordinate units); ``"auto"`` is ``25`` on slides of more than 200
        spots and no zoom on smaller ones (their cells show in the overview); ``None``:
        overview only.
    cell_size
        Diameter of a cell dot in coordinate units (default: a fifth of the spot diameter,
        about a cell in a 55 µm Visium spot). In the overview dots are drawn at least
        2 points wide, so the pattern of types stays visible on a large slide.
    spot_size
        Spot footprint diameter in coordinate units (default ``cells.uns["spot_diameter"]``,
        else half the median distance between neighbouring spots).
    title
        Title of the overview (default: how many cells in how many spots).
    key
        ``obsm`` key of the proportions in ``spatial`` whose cell-type colours the cells take
        (default ``"proportions_spotlens"`` when ``spatial`` has it; a given key must exist).
    ax
        A matplotlib Axes (the overview), or a sequence of two Axes of one figure (overview,
        zoom), to draw into. With ``ax``, ``zoom="auto"`` means no zoom for one Axes and a
        block of 25 spots for two; an explicit ``zoom`` needs two Axes, ``zoom=None`` one.

    Returns
    -------
    :class:`matplotlib.figure.Figure` (with ``ax``, the figure holding those axes) with the
    overview axes, then the zoom axes if any, and a colourbar axes for a numeric ``color``. In
    each map axes, ``collections[0]`` holds the spot discs (when ``spatial`` is given) and the
    last collection the cell dots.

    Writes ``cells.uns[color + "_colors"]`` (list of hex colours aligned with the categories of
    ``obs[color]``, as scanpy) for a categorical ``color`` when it is missing or shorter than
    the categories (stored colours are kept; new types get colours not yet used). Nothing else
    changes, in ``cells`` or in ``spatial``.

    Raises
    ------
    InputError
        ``cells`` or ``spatial`` is not an AnnData; positions or spot coordinates are missing or
        not 2-D; ``obs[color]`` is missing; ``zoom``, ``cell_size`` or ``spot_size`` is not valid;
        ``key`` is given but not in ``spatial.obsm``; ``ax`` is not Axes of one figure or holds
        the wrong number of Axes; a stored ``uns[... + "_colors"]`` is not a list of colours.

    Examples
    --------
    >>> import spotlens
    >>> st, ref = spotlens.datasets.osmfish_cortex()
    >>> spotlens.deconv.deconvolve(st, ref, progress=False)
    >>> spotlens.deconv.cell_level(st, ref, progress=False)
    >>> sc = spotlens.deconv.assign_cells(st, ref)
    >>> fig = spotlens.pl.cells(sc, st)
    >>> spotlens.io.save_figure(fig, "cells.png")  # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    if not isinstance(cells, AnnData):
        raise InputError(f"cells needs an AnnData object, got {type(cells).__name__}.")
    if SPATIAL_KEY not in cells.obsm:
        raise InputError(
            "cells.obsm has no 'spatial' positions. Pass the AnnData returned by "
            "spotlens.deconv.assign_cells."
        )
    xy = check_coordinates(cells, SPATIAL_KEY)
    if color not in cells.obs.columns:
        have = ", ".join(map(repr, cells.obs.columns[:10])) or "none"
        raise InputError(f"cells.obs has no column {color!r} to colour by (columns: {have}).")
    spots = None
    if spatial is not None:
        if not isinstance(spatial, AnnData):
            raise InputError(f"spatial needs an AnnData object, got {type(spatial).__name__}.")
        spots = check_coordinates(spatial, spatial_key)
    for name, value in (("cell_size", cell_size), ("spot_size", spot_size)):
        check_number(name, value, above=0, none_ok=True,
                     expected="a positive number (coordinate units)")
    diameter = _diameter(cells, spots, xy, spot_size)
    dot = float(cell_size) if cell_size is not None else CELL_FRACTION * diameter
    values = cells.obs[color]
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    codes = np.zeros(len(xy), dtype=np.int64) if numeric else \
        pd.Categorical(values.astype(str)).codes
    given = _as_axes(ax)
    if given is not None and isinstance(zoom, str) and zoom == "auto":
        zoom = AUTO_ZOOM_SPOTS if len(given) == 2 else None
    window = _zoom_window(zoom, spots if spots is not None else xy, xy, codes, diameter)

    everything = xy if spots is None else np.vstack([xy, spots])
    extent = _bounds(everything, diameter / 2)
    width, height = _inches(extent, OVERVIEW_INCHES)
    boxes = [extent] if window is None else [extent, window]
    if given is None:
        zoom_side = min(height, ZOOM_INCHES)
        fig = Figure(figsize=(width + (zoom_side + 0.3 if window else 0) + 2.4, height + 0.5),
                     layout="constrained")
        grid = fig.add_gridspec(1, len(boxes), width_ratios=[width, zoom_side][: len(boxes)])
        axes = [fig.add_subplot(grid[0, i]) for i in range(len(boxes))]
    else:
        _check_count(given, len(boxes), "the overview" if window is None else
                     "the overview and the zoom; one Axes draws no zoom")
        fig, axes = _root(given[0]), given
        width = axes[0].get_position().width * fig.get_figwidth()  # overview width, inches

    if numeric:
        from matplotlib import colormaps
        from matplotlib.colors import Normalize

        data = values.to_numpy(dtype=float)
        finite = data[np.isfinite(data)]
        norm = Normalize(*(finite.min(), finite.max()) if finite.size else (0.0, 1.0))
        style = {"values": data, "cmap": colormaps["viridis"], "norm": norm}
    else:
        labels = values if isinstance(values.dtype, pd.CategoricalDtype) else \
            values.astype("category")
        colors = type_colors(cells, colors_key(color), labels.cat.categories.astype(str),
                             seed=_spot_palette(spatial, key))
        palette = {c: colors[str(c)] for c in labels.cat.categories if (labels == c).any()}
        style = {"colors": [palette[v] for v in labels]}

    mappable = None
    for i, (ax, box) in enumerate(zip(axes, boxes, strict=True)):
        if spots is not None:
            _spots(ax, spots, diameter, colors=SPOT_COLOR)
        # the overview keeps a minimum dot width; the zoom shows cells at their drawn size
        points_per_unit = width * 72 / (box[2] - box[0])
        size = dot if i or dot * points_per_unit >= MIN_DOT_POINTS \
            else MIN_DOT_POINTS / points_per_unit
        mappable = _spots(ax, xy, size, **style)
        ax.set_xlim(box[0], box[2])
        ax.set_ylim(box[3], box[1])  # y down, as in images
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            where = f" in {len(spots)} spots" if spots is not None else ""
            ax.set_title(title if title is not None else f"{cells.n_obs} cells{where}",
                         fontsize="medium")
        else:
            where = f", {int(_in_box(spots, box).sum())} spots" if spots is not None else ""
            ax.set_title(f"zoom: {int(_in_box(xy, box).sum())} cells{where}", fontsize="medium")
            _outline(axes[0], box)
            for side in ax.spines.values():
                side.set_edgecolor(ZOOM_EDGE)
    if numeric:
        axes[0].figure.colorbar(mappable, ax=axes, label=color, shrink=0.8, aspect=30)
    else:
        handles = _legend_handles(palette)
        axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                        frameon=False, fontsize="small", title=color,
                        ncols=1 if len(handles) <= 16 else 2, borderaxespad=0.0)
    return fig


def _spot_palette(spatial: AnnData | None, key: str | None) -> dict[str, str] | None:
    """Return the cell-type colours of ``spatial``'s proportions, writing nothing."""
    if spatial is None:
        if key is not None:
            raise InputError(f"key={key!r} names proportions of spatial, but spatial is None.")
        return None
    if key is None:
        key = proportions_key()
        if key not in spatial.obsm:
            return None
    types = _proportions_frame(spatial, key, what="cells").columns
    return type_colors(spatial, colors_key(key), types, write=False)


def _diameter(cells: AnnData, spots, xy, given) -> float:
    if given is not None:
        return float(given)
    stored = cells.uns.get(SPOT_DIAMETER_KEY)
    if stored is not None:
        stored = float(np.asarray(stored))
        if np.isfinite(stored) and stored > 0:
            return stored
    return _nearest_distance(spots if spots is not None else xy) / 2


def _zoom_window(zoom, centres: np.ndarray, xy: np.ndarray, codes: np.ndarray,
                 diameter: float):
    """Return ``(x_min, y_min, x_max, y_max)`` of the zoom panel, or ``None`` for no panel.

    An integer ``n`` gives a square holding a block of ``√n × √n`` spots, centred on the spot
    whose window holds the most distinct ``codes`` (colours), then the most cells, then the
    spot nearest the middle of the slide.
    """
    if zoom is None or len(centres) == 0:
        return None
    if isinstance(zoom, str):
        if zoom != "auto":
            raise InputError(
                f"zoom must be 'auto', None, a number of spots or a box, got {zoom!r}."
            )
        if len(centres) <= AUTO_ZOOM_MIN_SPOTS:
            return None
        zoom = AUTO_ZOOM_SPOTS
    if isinstance(zoom, (int, np.integer)) and not isinstance(zoom, bool):
        zoom = check_int("zoom", zoom, minimum=1, expected="a positive number of spots")
        # a block of √n × √n spots around the centre spot, whole footprints, nothing beyond
        half = (math.sqrt(zoom) - 1) / 2 * _nearest_distance(centres) + 0.55 * diameter
        inside = cKDTree(xy).query_ball_point(centres, half, p=np.inf) if len(xy) else \
            [[] for _ in centres]
        crowd = np.array([len(members) for members in inside])
        kinds = np.array([len(np.unique(codes[members])) for members in inside])
        far = ((centres - np.median(centres, axis=0)) ** 2).sum(axis=1)
        x, y = centres[np.lexsort((far, -crowd, -kinds))[0]]
        return (x - half, y - half, x + half, y + half)
    try:
        box = tuple(float(v) for v in zoom)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or box[2] <= box[0] \
            or box[3] <= box[1]:
        raise InputError(
            f"zoom must be 'auto', None, a number of spots or a box (x_min, y_min, x_max, y_max) "
            f"with x_min < x_max and y_min < y_max, got {zoom!r}."
        )
    return box


def _bounds(points: np.ndarray, pad: float) -> tuple[float, float, float, float]:
    lo, hi = points.min(axis=0) - pad, points.max(axis=0) + pad
    if hi[0] - lo[0] <= 0:
        lo[0], hi[0] = lo[0] - 1, hi[0] + 1
    if hi[1] - lo[1] <= 0:
        lo[1], hi[1] = lo[1] - 1, hi[1] + 1
    return (lo[0], lo[1], hi[0], hi[1])


def _inches(box, longest: float) -> tuple[float, float]:
    ratio = (box[3] - box[1]) / (box[2] - box[0])
    if ratio >= 1:
        return max(longest / ratio, 2.0), longest
    return longest, max(longest * ratio, 2.0)


def _in_box(points: np.ndarray, box) -> np.ndarray:
    return ((points[:, 0] >= box[0]) & (points[:, 0] <= box[2])
            & (points[:, 1] >= box[1]) & (points[:, 1] <= box[3]))


def _outline(ax, box) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                           edgecolor=ZOOM_EDGE, linewidth=1.0))


def _legend_handles(palette: dict) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], linestyle="", marker="o", markersize=7, color=c, label=str(name))
            for name, c in palette.items()]
