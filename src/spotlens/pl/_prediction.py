"""Measured | predicted | uncertainty of one gene over the H&E, on one colour scale."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import HISTOLOGY_PREDICTION_KEY, SPATIAL_KEY, prediction_std_key
from .._metrics import pearson_columns
from .._validation import InputError, check_coordinates
from ._overlay import _background, _frame, _values
from ._proportions import _nearest_distance, _spots

#: colour scales of :func:`prediction`
SCALES = ("rank", "shared")
RANK_LABEL = "percentile rank among these spots\n(measured and predicted each ranked)"
SHARED_LABEL = "log-normalised expression\n(one scale for both)"
STD_LABEL = "uncertainty: s.d. of the prediction\n(log-normalised units)"
#: colour maps whose hues H&E lacks (no purple, no pink), so spots stand out from the tissue:
#: ranks diverge around the section's median (blue below, red above), expression runs
#: light to dark, the uncertainty white to dark green
RANK_CMAP, SHARED_CMAP, STD_CMAP = "RdYlBu_r", "YlOrBr", "Greens"
#: the H&E is blended this far towards white under the spots (tissue visible, spots legible)
FADE = 0.35


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Percentile rank of each value among ``values``: ``100 (rank − ½) / n`` (ties averaged).

    Parameters
    ----------
    values
        ``n`` numbers (NaN stays NaN and is not ranked).

    Returns
    -------
    ``n`` floats in ``(0, 100)``; a constant vector maps to 50 everywhere.

    Examples
    --------
    >>> percentile_ranks(np.array([3.0, 1.0, 2.0, 2.0]))
    array([87.5, 12.5, 50. , 50. ])
    """
    from scipy.stats import rankdata

    v = np.asarray(values, dtype=float)
    out = np.full(v.shape, np.nan)
    ok = np.isfinite(v)
    if ok.any():
        out[ok] = 100.0 * (rankdata(v[ok]) - 0.5) / ok.sum()
    return out


def _faded(thumb: np.ndarray) -> np.ndarray:
    """The thumbnail blended :data:`FADE` of the way to white (uint8 RGB kept, or floats)."""
    img = np.asarray(thumb)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    white = 255.0 if img.dtype == np.uint8 or img.max() > 1.0 else 1.0
    out = (1 - FADE) * img.astype(np.float32) + FADE * white
    return out.astype(np.uint8) if white == 255.0 else out


def _pearson_title(pred, meas, coords, n_boot: int, seed: int) -> str:
    """``r = 0.13 [−0.05, 0.30]`` (block-bootstrap 95 % interval), or why there is no r."""
    ok = np.isfinite(pred) & np.isfinite(meas)
    p, m = pred[ok], meas[ok]
    if ok.sum() < 3 or np.ptp(p) == 0 or np.ptp(m) == 0:
        return "Pearson r undefined (a constant map or < 3 spots)"
    r = float(pearson_columns(p[:, None], m[:, None])[0][0])  # the package's Pearson kernel
    if n_boot < 2:
        return f"Pearson r = {r:.2f} at {ok.sum()} measured spots"
    from ..histology import block_bootstrap_pearson

    try:
        ci = block_bootstrap_pearson(p[:, None], m[:, None], coords[ok], n_boot=n_boot,
                                     seed=seed)
    except InputError:  # too few spots or tiles for blocks
        return f"Pearson r = {r:.2f} at {ok.sum()} measured spots"
    return (f"Pearson r = {r:.2f} [95% CI {ci.low:.2f}, {ci.high:.2f}; spatial block bootstrap] "
            f"at {ok.sum()} measured spots")


def _column(adata: AnnData, key: str, gene: str, what: str) -> np.ndarray:
    table = adata.obsm[key]
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"adata.obsm[{key!r}] must be a DataFrame with one column per gene "
                         f"(as spotlens.histology.predict writes the {what}), got "
                         f"{type(table).__name__}.")
    if gene not in table.columns:
        raise InputError(f"Gene {gene!r} is not among the {what} in adata.obsm[{key!r}] (e.g. "
                         f"{list(table.columns[:5])}).")
    return table[gene].to_numpy(dtype=float)


def prediction(
    adata: AnnData,
    gene: str,
    *,
    key: str = HISTOLOGY_PREDICTION_KEY,
    std_key: str | None = None,
    layer: str | None = None,
    scale: str = "rank",
    image=None,
    library_id: str | None = None,
    spatial_key: str = SPATIAL_KEY,
    alpha: float = 0.6,
    spot_scale: float = 1.0,
    n_boot: int = 1000,
    seed: int = 0,
    title: str | None = None,
    panel_size: float = 4.0,
    save=None,
):
    """Measured and predicted expression of one gene side by side on one colour scale, and the
    prediction's uncertainty, as semi-transparent spots over the H&E.

    Predictions of expression from H&E are shrunk towards the mean (their spread across spots
    is a fraction of the measured spread), so on one absolute scale the predicted map is flat.
    ``scale="rank"`` (default) therefore colours both maps by percentile rank among the spots
    shown: equal colours mean equal rank, which is what a per-gene Pearson r compares.
    ``scale="shared"`` puts both on one absolute scale (the 1st–99th percentiles of both
    together): it shows how much flatter the prediction is. The colourbar says which.

    Parameters
    ----------
    adata
        ``n_spots`` spots with measured log-normalised expression
        (``log1p(normalize_total(counts, 1e4))``) in ``X`` (or ``layers[layer]``), the
        predictions of :func:`spotlens.histology.predict` in ``obsm[key]`` (DataFrame, one
        column per gene) and their uncertainty in ``obsm[std_key]``; centres ``(x, y)`` in
        full-resolution px in ``obsm[spatial_key]``; the background as in
        :func:`spotlens.pl.overlay`.
    gene
        The gene drawn (in ``var_names`` and the predictions' columns).
    key
        ``obsm`` key of the predictions (default ``"histology_prediction"``).
    std_key
        ``obsm`` key of the uncertainty; None = ``key + "_std"`` when present (else the figure
        has two panels).
    layer
        Layer of the measured values; None = ``X``.
    scale
        ``"rank"`` or ``"shared"`` (see above). The uncertainty panel has its own absolute
        scale (s.d., log-normalised units).
    image
        Full-resolution image (path, :class:`~spotlens.io.SlideImage` or array) instead of the
        stored thumbnail.
    library_id
        Key of ``uns["spatial"]``; None = its only library.
    spatial_key
        ``obsm`` key of the centres.
    alpha
        Opacity of the spots (0.6: the tissue shows through).
    spot_scale
        Multiplies the drawn spot diameter.
    n_boot
        Block-bootstrap replicates of the interval of the Pearson r in the title
        (:func:`spotlens.histology.block_bootstrap_pearson`, tiles of 4 spot spacings);
        0 = r without an interval.
    seed
        Seed of the bootstrap.
    title
        First line of the title (e.g. the section's name); the r and the spread follow.
    panel_size
        Longest side of each panel, inches.
    save
        Path of a PNG (or any suffix matplotlib writes) to save the figure to, atomically
        (:func:`spotlens.io.save_figure`); None = not saved.

    Returns
    -------
    :class:`matplotlib.figure.Figure` with the panels measured, predicted (and uncertainty)
    as its first axes, then their colourbars. Nothing in ``adata`` changes.

    Raises
    ------
    InputError
        ``adata`` is not an AnnData; ``gene`` is not in ``var_names`` or the predictions;
        ``obsm[key]`` (or an explicit ``std_key``) is missing or not a DataFrame; ``layer``
        is missing; ``scale`` is not ``"rank"`` or ``"shared"``; ``alpha`` not in (0, 1];
        ``spot_scale`` or ``panel_size`` not positive; the coordinates are missing.

    Examples
    --------
    >>> spotlens.histology.predict(adata, model="her2st_model", image=img)  # doctest: +SKIP
    >>> adata.X = log_expression  # measured, same genes  # doctest: +SKIP
    >>> spotlens.pl.prediction(adata, "ERBB2", image=img, save="ERBB2.png")  # doctest: +SKIP
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not isinstance(adata, AnnData):
        raise InputError(f"prediction needs an AnnData object, got {type(adata).__name__}.")
    if scale not in SCALES:
        raise InputError(f"scale must be one of {SCALES}, got {scale!r}.")
    if not (np.isfinite(alpha) and 0 < alpha <= 1):
        raise InputError(f"alpha must be in (0, 1], got {alpha!r}.")
    for name, value in (("spot_scale", spot_scale), ("panel_size", panel_size)):
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"{name} must be positive, got {value!r}.")
    if key not in adata.obsm:
        raise InputError(f"adata.obsm has no {key!r}: run spotlens.histology.predict first "
                         f"(obsm keys: {list(adata.obsm)}).")
    if std_key is not None and std_key not in adata.obsm:
        raise InputError(f"adata.obsm has no {std_key!r} (obsm keys: {list(adata.obsm)}).")
    if layer is not None and layer not in adata.layers:
        raise InputError(f"adata.layers has no {layer!r} (layers: {list(adata.layers)}).")
    gene = str(gene)
    measured = _values(adata, gene, layer)
    predicted = _column(adata, key, gene, "predictions")
    std_key = std_key or prediction_std_key(key)
    std = _column(adata, std_key, gene, "uncertainties") if std_key in adata.obsm else None
    coords = check_coordinates(adata, spatial_key)
    thumb, px_scale, diameter = _background(adata, image, library_id)
    if thumb is not None:
        thumb = _faded(thumb)
    xy = coords * px_scale
    diameter = (float(diameter) * px_scale if diameter is not None else _nearest_distance(xy))
    diameter *= spot_scale

    if scale == "rank":
        shown = [percentile_ranks(measured), percentile_ranks(predicted)]
        lo, hi, label, cmap = 0.0, 100.0, RANK_LABEL, RANK_CMAP
    else:
        shown = [measured, predicted]
        both = np.concatenate(shown)
        both = both[np.isfinite(both)]
        lo, hi = np.percentile(both, [1, 99]) if both.size else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1e-9
        label, cmap = SHARED_LABEL, SHARED_CMAP
    norm = Normalize(vmin=float(lo), vmax=float(hi))

    pad = 1.5 * diameter
    x0, y0 = xy.min(axis=0) - pad
    x1, y1 = xy.max(axis=0) + pad
    ratio = (y1 - y0) / max(x1 - x0, 1e-9)
    width, height = (panel_size, panel_size * ratio) if ratio < 1 else (
        panel_size / ratio, panel_size)
    n_panels = 3 if std is not None else 2
    fig = Figure(figsize=((width + 0.9) * n_panels, height + 1.3), layout="constrained")
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]

    def draw(ax, values, norm_, cmap_, name):
        if thumb is not None:
            ax.imshow(thumb, extent=(-0.5, thumb.shape[1] - 0.5, thumb.shape[0] - 0.5, -0.5),
                      interpolation="antialiased")
        circles = _spots(ax, xy, diameter, values=values, cmap=colormaps[cmap_], norm=norm_)
        circles.set_alpha(alpha)
        circles.set_edgecolor("0.15")  # dark rim: a spot's edge on faded tissue
        circles.set_linewidth(0.3)
        _frame(ax, (x0, x1, y0, y1), name)
        return circles

    sd_m, sd_p = np.nanstd(measured), np.nanstd(predicted)
    draw(axes[0], shown[0], norm, cmap, f"measured {gene}")
    circles = draw(axes[1], shown[1], norm, cmap,
                   f"predicted {gene} (spread {100 * sd_p / sd_m:.0f}% of measured)"
                   if sd_m > 0 else f"predicted {gene}")
    fig.colorbar(circles, ax=axes[:2], label=label, shrink=0.8, aspect=30, location="bottom")
    if std is not None:
        finite = std[np.isfinite(std)]
        top = float(np.percentile(finite, 99)) if finite.size else 1.0
        sd_norm = Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)
        median = float(np.median(finite)) if finite.size else float("nan")
        spots_sd = draw(axes[2], std, sd_norm, STD_CMAP,
                        f"uncertainty (median {median:.2g}; predicted spread {sd_p:.2g})")
        fig.colorbar(spots_sd, ax=axes[2], label=STD_LABEL, shrink=0.8, aspect=15,
                     location="bottom")
    head = f"{title}: {gene}" if title else gene
    fig.suptitle(f"{head} — {_pearson_title(predicted, measured, coords, int(n_boot), seed)}",
                 fontsize="medium")
    if save is not None:
        from ..io import save_figure

        save_figure(fig, save)
    return fig
