"""Expression of genes drawn as coloured spots over the H&E image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from anndata import AnnData
from scipy import sparse

from .._validation import InputError, check_coordinates, check_int
from ..io import as_slide_image
from ._proportions import _as_axes, _check_count, _nearest_distance, _root, _spots


def _library(adata: AnnData, library_id: str | None) -> tuple[str | None, dict]:
    spatial = adata.uns.get("spatial")
    if not hasattr(spatial, "keys") or len(spatial) == 0:
        return None, {}
    if library_id is None:
        if len(spatial) > 1:
            raise InputError(f"adata.uns['spatial'] holds several libraries ({list(spatial)}); "
                             "pass library_id=.")
        library_id = next(iter(spatial))
    if library_id not in spatial:
        raise InputError(f"adata.uns['spatial'] has no library {library_id!r} "
                         f"(libraries: {list(spatial)}).")
    return library_id, spatial[library_id]


def _background(adata, image, library_id):
    """Return ``(thumbnail or None, thumbnail px per full-res px, spot diameter, full-res px)``."""
    library_id, entry = _library(adata, library_id)
    scalefactors = dict(entry.get("scalefactors", {}) or {}) if entry else {}
    diameter = scalefactors.get("spot_diameter_fullres")
    if image is not None:
        thumb, scale = as_slide_image(image).thumbnail(2000)
        return thumb, float(scale), diameter
    images = entry.get("images", {}) if entry else {}
    for name in ("hires", "lowres"):
        factor = scalefactors.get(f"tissue_{name}_scalef")
        if name in images and factor is not None:
            return np.asarray(images[name]), float(factor), diameter
    return None, 1.0, diameter


def _values(adata: AnnData, gene: str, layer: str | None) -> np.ndarray:
    if gene not in adata.var_names:
        raise InputError(f"Gene {gene!r} is not in adata.var_names (e.g. "
                         f"{list(adata.var_names[:5])}).")
    matrix = adata.X if layer is None else adata.layers[layer]
    column = matrix[:, adata.var_names.get_loc(gene)]
    column = column.toarray() if sparse.issparse(column) else np.asarray(column)
    return column.ravel().astype(float)


def overlay(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    image=None,
    library_id: str | None = None,
    layer: str | None = None,
    spatial_key: str = "spatial",
    ncols: int = 3,
    cmap: str = "viridis",
    percentiles: tuple[float, float] = (1.0, 99.0),
    alpha: float = 0.85,
    spot_scale: float = 1.0,
    label: str = "log-normalised expression",
    crop: bool = True,
    panel_size: float = 4.0,
    ax=None,
):
    """Draw each gene's expression as coloured spots over the H&E thumbnail, one panel per gene.

    Parameters
    ----------
    adata
        ``n_spots × n_genes``; values from ``X`` (or ``layers[layer]``), e.g. the predictions of
        :func:`spotlens.histology.predict_image` or measured log-normalised expression.
        ``obsm[spatial_key]`` = centres ``(x, y)`` in full-resolution px. The background is
        ``uns["spatial"][library_id]["images"]["hires"]`` (or ``"lowres"``) placed with
        ``scalefactors["tissue_hires_scalef"]`` (``"tissue_lowres_scalef"``), and spots are
        drawn ``scalefactors["spot_diameter_fullres"]`` px wide.
    genes
        Gene name or names (``var_names``), one panel each.
    image
        Full-resolution image (path, :class:`~spotlens.io.SlideImage` or array) to use
        instead of the stored thumbnail.
    library_id
        Key of ``uns["spatial"]``; None = its only library.
    layer
        Layer holding the values; None = ``X``.
    spatial_key
        ``obsm`` key of the centres.
    ncols
        Panels per row.
    cmap
        Matplotlib colormap.
    percentiles
        Colour scale of each gene from these percentiles of its values (clips outliers).
    alpha
        Opacity of the spots over the image.
    spot_scale
        Multiplies the drawn spot diameter.
    label
        Colourbar label.
    crop
        Show only the part of the image around the spots.
    panel_size
        Longest side of each panel, inches (ignored with ``ax``).
    ax
        A matplotlib Axes (one gene), or a sequence (or array) of Axes of one figure, one per
        gene in order, to draw into. Default: a new figure, ``ncols`` panels per row.

    Returns
    -------
    :class:`matplotlib.figure.Figure` (with ``ax``, the figure holding those axes), one axes
    per gene with its own colourbar. Nothing in ``adata`` changes.

    Raises
    ------
    InputError
        A gene is not in ``var_names``, the coordinates are missing, the library is ambiguous,
        ``ncols``/``spot_scale`` is not positive, or ``ax`` is not Axes of one figure or does
        not hold one Axes per gene.

    Examples
    --------
    >>> pred = spotlens.histology.predict_image("model", "slide.jpg", mpp=0.5)  # doctest: +SKIP
    >>> fig = spotlens.pl.overlay(pred, ["ERBB2", "CD74"])  # doctest: +SKIP
    >>> spotlens.io.save_figure(fig, "ERBB2.png")  # doctest: +SKIP
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not isinstance(adata, AnnData):
        raise InputError(f"overlay needs an AnnData object, got {type(adata).__name__}.")
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        raise InputError("genes is empty: name at least one gene to draw.")
    check_int("ncols", ncols, minimum=1, expected="a positive integer")
    if not (np.isfinite(spot_scale) and spot_scale > 0):
        raise InputError(f"spot_scale must be positive, got {spot_scale!r}.")
    if layer is not None and layer not in adata.layers:
        raise InputError(f"adata.layers has no {layer!r} (layers: {list(adata.layers)}).")
    values = {g: _values(adata, g, layer) for g in genes}
    coords = check_coordinates(adata, spatial_key)
    thumb, scale, diameter = _background(adata, image, library_id)
    xy = coords * scale
    diameter = (float(diameter) * scale if diameter is not None else _nearest_distance(xy))
    diameter *= spot_scale

    pad = 2 * diameter
    if thumb is not None and not crop:
        x0, y0, x1, y1 = 0.0, 0.0, thumb.shape[1], thumb.shape[0]
    else:
        x0, y0 = xy.min(axis=0) - pad
        x1, y1 = xy.max(axis=0) + pad
    ratio = (y1 - y0) / max(x1 - x0, 1e-9)
    if not (np.isfinite(panel_size) and panel_size > 0):
        raise InputError(f"panel_size must be a positive number of inches, got {panel_size!r}.")
    width, height = (panel_size, panel_size * ratio) if ratio < 1 else (
        panel_size / ratio, panel_size)
    axes = _as_axes(ax)
    if axes is None:
        ncols = min(int(ncols), len(genes))
        nrows = math.ceil(len(genes) / ncols)
        fig = Figure(figsize=((width + 1.1) * ncols, (height + 0.4) * nrows),
                     layout="constrained")
        grid = fig.add_gridspec(nrows, ncols)
        axes = [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(len(genes))]
    else:
        _check_count(axes, len(genes), "one per gene")
        fig = _root(axes[0])
    for ax, gene in zip(axes, genes, strict=True):
        if thumb is not None:
            ax.imshow(thumb, extent=(-0.5, thumb.shape[1] - 0.5, thumb.shape[0] - 0.5, -0.5),
                      interpolation="antialiased")
        v = values[gene]
        finite = v[np.isfinite(v)]
        lo, hi = (np.percentile(finite, percentiles) if finite.size else (0.0, 1.0))
        if hi <= lo:
            hi = lo + 1e-9
        circles = _spots(ax, xy, diameter, values=v, cmap=colormaps[cmap],
                         norm=Normalize(vmin=lo, vmax=hi))
        circles.set_alpha(alpha)
        circles.set_edgecolor("white")  # separates dark spots from dark (haematoxylin) tissue
        circles.set_linewidth(0.3)
        _frame(ax, (x0, x1, y0, y1), gene)
        ax.figure.colorbar(circles, ax=ax, label=label, shrink=0.8, aspect=25)
    return fig


def _frame(ax, extent: tuple[float, float, float, float], title: str) -> None:
    """Show ``extent = (x0, x1, y0, y1)`` of the image at equal aspect, y down, no ticks."""
    x0, x1, y0, y1 = extent
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # y down, as in the image
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize="medium")
