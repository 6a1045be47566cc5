"""A self-contained HTML report: the tissue as a zoomable pyramid with the results on top.

One file, no server and no network: the viewer (OpenSeadragon, BSD-3-Clause, vendored in
``report_assets/`` with its licence), the script drawing the spots, the data and (for an image
that fits ``max_image_side``) the image tiles are all inlined; a larger image's tiles go to a
folder beside the file (``tiles=``). Spots are drawn on a canvas over the image, one path per
colour, and the hover read-out finds the spot under the pointer through a grid index, so
100,000 spots stay interactive.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from importlib import resources
from contextlib import nullcontext
from os import PathLike
from pathlib import Path
from urllib.parse import quote

import numpy as np
from anndata import AnnData

from .._keys import SPATIAL_KEY, colors_key, proportions_key
from .._validation import InputError, check_coordinates, check_int
from ..io import as_slide_image, atomic_path
from ._overlay import _library
from ._palette import type_colors
from ._proportions import _nearest_distance, _proportions_frame
from ._report_layers import (
    abundance_frame,
    b64,
    categorical,
    choose_genes,
    gene_layers,
    luts,
    predictions,
    proportion_layers,
    qc_layers,
    qc_summary,
    sections,
    to_json,
)
from ._report_tiles import folder_for, pyramid, remove_stale, tile_folder, to_uint8

#: Longest side, px, of the pyramid's bottom level when the report has no image.
BLANK_SIDE = 2048
#: Where the image tiles go: ``tiles=`` of :func:`report`.
TILE_MODES = ("auto", "embed", "folder")
_ASSETS = ("report.html", "report.css", "openseadragon.min.js", "report.js")


def report(
    adata: AnnData,
    path: str | PathLike,
    *,
    key: str = proportions_key(),
    cells: AnnData | None = None,
    image=None,
    library_id: str | None = None,
    spatial_key: str = SPATIAL_KEY,
    genes: Sequence[str] | None = None,
    max_genes: int = 24,
    max_image_side: int = 4096,
    tiles: str = "auto",
    title: str | None = None,
    run: Mapping | None = None,
) -> None:
    """Write one self-contained HTML file to look at the results over the tissue.

    Open it in any browser (double-click; no server, no network). It shows the tissue image as
    a zoomable pyramid (mouse wheel, drag; the mini-map at the corner), and over it, one layer
    at a time (the *layer* menu): the dominant cell type, each cell type's proportion, the
    estimated cells per type, the QC flags (zero-count and poorly fit spots, the fit score),
    the predicted genes and their uncertainty; the placed cells on top (a check box). A legend
    explains the colours; hovering a spot reads out its name, coordinates, proportions, flags
    and the layer's value. The run's parameters and QC summary are in the side panel.

    The image is a Deep Zoom pyramid of 256 px JPEG tiles (``tiles=``): embedded in the file,
    reduced to ``max_image_side`` px (about 5 MB for a 4096 px image), or, for a larger image,
    at full resolution in a folder beside the file,
    ``<report stem>_files/<level>/<col>_<row>.jpg`` (the Deep Zoom layout; the page refers to
    it by a relative path, so keep the two together when moving them). Tiles are made band by
    band: a 100,000 px slide is never held whole in memory (a TIFF/SVS is read region by
    region; a JPEG/PNG is decoded whole). Without an image the spots are drawn on a blank
    canvas in the same coordinates (always embedded).

    Parameters
    ----------
    adata
        Spots with spotlens results: proportions in ``obsm[key]`` (and the keys
        :func:`spotlens.deconv.deconvolve` writes beside them), and/or a histology prediction
        (``obsm["histology_prediction"]`` and ``obsm["histology_prediction_std"]``, or the
        AnnData of :func:`spotlens.histology.predict_image`); ``obsm[spatial_key]``.
    path
        The ``.html`` file to write (atomically: a temporary file, then renamed).
    key
        ``obsm`` key of the proportions.
    cells
        Placed cells of :func:`spotlens.deconv.assign_cells` (``obsm["spatial"]``,
        ``obs["cell_type"]``), drawn as dots.
    image
        The tissue image (path, :class:`spotlens.io.SlideImage` or ``H × W × 3`` array) in the
        coordinates' pixels; ``None`` takes ``uns["spatial"][library_id]["images"]`` (hires,
        else lowres, with its scale factor).
    library_id
        Library of ``uns["spatial"]``; ``None``: the only one.
    spatial_key
        ``obsm`` key of the coordinates (image px when there is an image).
    genes
        Predicted genes to show; ``None``: the ``max_genes`` varying most across spots.
    max_genes
        Most predicted genes shown when ``genes`` is None.
    max_image_side
        Longest side, px, of an embedded image (a larger one is reduced).
    tiles
        Where the image's tiles go. ``"embed"``: inside the HTML file, the image reduced to
        ``max_image_side``. ``"folder"``: at full resolution in ``<report stem>_files/`` beside
        the file. ``"auto"``: ``"folder"`` when the image's longest side exceeds
        ``max_image_side``, else ``"embed"``. The folder is written atomically (into a
        temporary folder, then renamed) and replaces an earlier report's tile folder; an
        embedded report removes an earlier report's tile folder of its name.
    title
        Page title; ``None``: "spotlens report — <library>".
    run
        Extra rows for the parameter panel (the CLI passes the run's inputs).

    Raises
    ------
    InputError
        ``adata`` is not an AnnData, has no valid coordinates, or holds neither proportions
        (``obsm[key]``) nor a histology prediction; ``genes`` names genes not predicted;
        ``max_genes``/``max_image_side`` are not positive integers; ``tiles`` is not one of
        ``"auto"``, ``"embed"``, ``"folder"``; the tile folder exists and is not an earlier
        report's; ``cells`` lacks coordinates or ``obs["cell_type"]``.

    Examples
    --------
    >>> import spotlens
    >>> spatial, reference = spotlens.datasets.osmfish_cortex()
    >>> spotlens.deconv.deconvolve(spatial, reference, progress=False)  # doctest: +SKIP
    >>> spotlens.pl.report(spatial, "report.html")  # doctest: +SKIP
    >>> spotlens.pl.report(spatial, "report.html", image="slide.svs",
    ...                    tiles="folder")  # doctest: +SKIP
    """
    if not isinstance(adata, AnnData):
        raise InputError(f"report needs an AnnData object, got {type(adata).__name__}.")
    check_coordinates(adata, spatial_key)
    check_int("max_genes", max_genes, minimum=1)
    check_int("max_image_side", max_image_side, minimum=16)
    if tiles not in TILE_MODES:
        raise InputError(f"tiles must be one of {', '.join(TILE_MODES)}, got {tiles!r}.")
    path = Path(path).expanduser()
    if path.suffix.lower() not in (".html", ".htm"):
        raise InputError(f"The report is an HTML file; name it .html, got {path.name}.")
    layers = _spot_layers(adata, key, genes, max_genes)
    xy = np.asarray(adata.obsm[spatial_key], dtype=float)
    library, entry = _library(adata, library_id)
    scalefactors = dict(entry.get("scalefactors", {}) or {}) if entry else {}
    diameter = float(scalefactors.get("spot_diameter_fullres") or _nearest_distance(xy))
    pixels, scale, origin, beside = _background(adata, image, library_id, xy, diameter,
                                                max_image_side, tiles)
    px = (xy - origin) * scale
    payload = {
        "title": title or f"spotlens report — {library or 'spots'}",
        "spots": {"x": b64(px[:, 0].astype("<f4")), "y": b64(px[:, 1].astype("<f4")),
                  "n": int(adata.n_obs), "names": [str(n) for n in adata.obs_names],
                  "diameter": diameter * scale, "scale": scale, "origin": list(map(float, origin)),
                  "shape": "square" if "bin_size_um" in scalefactors else "circle"},
        "layers": layers, "luts": luts(),
        "blank": image is None and not _has_image(entry),
        "cells": _cells(cells, adata, key, origin, scale, diameter),
        "params": sections(adata, key, run), "qc": qc_summary(adata, key),
    }
    folder = folder_for(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tile_folder(pixels, folder) if beside else nullcontext((None, None)) as (info, commit):
        if beside:  # the page finds its tiles by a relative URL
            payload["image"] = {**info, "folder": quote(folder.name), "format": "jpg"}
        else:
            payload["image"] = pyramid(pixels)
        _write(path, payload, before_rename=commit)
    if not beside:
        remove_stale(folder)


def _spot_layers(adata: AnnData, key: str, genes, max_genes: int) -> list[dict]:
    layers = []
    if key in adata.obsm:
        props = _proportions_frame(adata, key, what="report")
        colors = type_colors(adata, colors_key(key), list(props.columns), write=False)
        layers += proportion_layers(props, colors, abundance_frame(adata, key))
        layers += qc_layers(adata, key)
    predicted, std = predictions(adata)
    if predicted is not None:
        if genes is not None:
            genes = [genes] if isinstance(genes, str) else list(genes)
            unknown = [g for g in genes if g not in predicted.columns]
            if unknown:
                raise InputError(f"genes {unknown} are not predicted (e.g. "
                                 f"{list(predicted.columns[:5])}).")
        layers += gene_layers(predicted, std, choose_genes(predicted, genes, max_genes))
    if not layers:
        raise InputError(
            f"Nothing to report: adata has no proportions (obsm[{key!r}]; run "
            "spotlens.deconv.deconvolve, or pass key=) and no histology prediction.")
    return layers


def _has_image(entry: dict | None) -> bool:
    images = entry.get("images", {}) if entry else {}
    return any(name in images for name in ("hires", "lowres"))


def _background(adata, image, library_id, xy, diameter, max_side, tiles):
    """``(image, image px per coordinate unit, coordinate origin, tiles in a folder?)``.

    ``image`` is an ``H × W × 3`` uint8 array, or the SlideImage itself (read band by band)
    when its tiles go to a folder.
    """
    if image is not None:
        slide = as_slide_image(image)
        if tiles == "folder" or (tiles == "auto" and max(slide.shape) > max_side):
            return slide, 1.0, np.zeros(2), True
        pixels, scale = slide.thumbnail(max_side)
        return to_uint8(pixels), float(scale), np.zeros(2), False
    _, entry = _library(adata, library_id)
    scalefactors = dict(entry.get("scalefactors", {}) or {}) if entry else {}
    images = entry.get("images", {}) if entry else {}
    for name in ("hires", "lowres"):
        factor = scalefactors.get(f"tissue_{name}_scalef")
        if name in images and factor is not None:
            pixels = to_uint8(np.asarray(images[name]))
            scale = float(factor)
            beside = tiles == "folder" or (tiles == "auto" and max(pixels.shape[:2]) > max_side)
            if max(pixels.shape[:2]) > max_side and not beside:
                pixels, shrink = as_slide_image(pixels).thumbnail(max_side)
                scale *= float(shrink)
            return pixels, scale, np.zeros(2), beside
    pad = diameter
    lo = np.nanmin(xy, axis=0) - pad
    extent = np.maximum(np.nanmax(xy, axis=0) + pad - lo, 1e-9)
    scale = BLANK_SIDE / float(extent.max())
    shape = np.maximum(np.ceil(extent * scale).astype(int), 1)
    return np.full((shape[1], shape[0], 3), 250, dtype=np.uint8), scale, lo, False


def _cells(cells, adata, key, origin, scale, diameter) -> dict | None:
    if cells is None:
        return None
    if not isinstance(cells, AnnData) or "cell_type" not in cells.obs:
        raise InputError("cells= needs the AnnData of spotlens.deconv.assign_cells, with "
                         "obs['cell_type'] and obsm['spatial'].")
    check_coordinates(cells, SPATIAL_KEY)
    kinds = cells.obs["cell_type"].astype("category")
    names = [str(c) for c in kinds.cat.categories]
    seed = None
    if key in adata.obsm:
        props = _proportions_frame(adata, key, what="report")
        seed = type_colors(adata, colors_key(key), list(props.columns), write=False)
    colors = type_colors(cells, colors_key("cell_type"), names, seed=seed, write=False)
    layer = categorical("placed cells", kinds.cat.codes.to_numpy(), names,
                        [colors[n] for n in names], group="cells")
    xy = (np.asarray(cells.obsm[SPATIAL_KEY], dtype=float) - origin) * scale
    return {**layer, "x": b64(xy[:, 0].astype("<f4")), "y": b64(xy[:, 1].astype("<f4")),
            "n": int(cells.n_obs), "diameter": max(diameter * scale / 6, 1e-6)}


def _asset(name: str) -> str:
    return resources.files("spotlens.pl").joinpath("report_assets", name).read_text("utf-8")


def _write(path: Path, payload: dict, *, before_rename=None) -> None:
    """Write the page atomically; ``before_rename()`` (the tiles' commit) runs just before."""
    template, css, viewer, script = (_asset(name) for name in _ASSETS)
    for name, text in (("openseadragon.min.js", viewer), ("report.js", script)):
        if "</script" in text.lower():
            raise InputError(f"report_assets/{name} holds '</script' and cannot be inlined.")
    parts = {"/*TITLE*/": _escape(payload["title"]), "/*CSS*/": css, "/*DATA*/": to_json(payload),
             "/*OPENSEADRAGON*/": viewer, "/*SCRIPT*/": script}
    pieces = re.split(r"(/\*[A-Z]+\*/)", template)  # one pass: inserted text is not scanned
    missing = set(parts) - set(pieces)
    if missing:
        raise InputError(f"report_assets/report.html lacks {sorted(missing)}.")
    html = "".join(parts.get(piece, piece) for piece in pieces)
    with atomic_path(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
        if before_rename is not None:
            before_rename()


def _escape(text: str) -> str:
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))
