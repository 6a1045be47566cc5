"""What a report shows, as compact arrays: spot layers, placed cells, parameters and QC.

Values travel as base64 of little-endian arrays, decoded in the browser into typed arrays:
a continuous layer as uint16 codes of ``(value - lo) / (hi - lo)`` on 0..65534 (65535 = NaN;
the hover read-out decodes them to within ``(hi - lo) / 65534``), a categorical one as uint8
or uint16 category codes (the largest code = missing). 100,000 spots cost about 270 kB of
base64 per continuous layer.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._keys import (
    HISTOLOGY_PREDICTION_KEY,
    abundance_key,
    cell_weights_key,
    fit_score_key,
    poorly_fit_key,
    prediction_std_key,
    zero_counts_key,
)

#: Colour scales (matplotlib names) of the continuous layers, sampled at :data:`LUT_SIZE`.
SCALES = {"proportion": "viridis", "gene": "plasma", "uncertainty": "magma", "qc": "cividis"}
LUT_SIZE = 64
MISSING_COLOR = "#9e9e9e"


def b64(array: np.ndarray) -> str:
    """Base64 of the array's bytes, little-endian."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return base64.b64encode(array.tobytes()).decode("ascii")


def luts() -> dict[str, list[str]]:
    """``{scale name: LUT_SIZE hex colours}`` for the scales in :data:`SCALES`."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    steps = (np.arange(LUT_SIZE) + 0.5) / LUT_SIZE
    return {name: [to_hex(c) for c in colormaps[name](steps)] for name in set(SCALES.values())}


def continuous(name: str, values, *, group: str, scale: str, unit: str = "",
               clip: float | None = None, floor: float | None = None) -> dict:
    """Return a continuous layer; the colour scale spans [min, max], or [p(100-clip), p(clip)].

    ``floor`` fixes the scale's lower end (0 for proportions and abundances).
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    vmin, vmax = lo, hi
    if clip is not None and finite.size:
        vmin, vmax = (float(np.percentile(finite, 100 - clip)), float(np.percentile(finite, clip)))
        if vmax <= vmin:
            vmin, vmax = lo, hi
    if floor is not None:
        lo, vmin = min(lo, floor), floor
        vmax = max(vmax, floor + 1e-12)
    codes = np.full(values.shape, 65535, dtype="<u2")
    ok = np.isfinite(values)
    codes[ok] = np.rint((values[ok] - lo) / (hi - lo) * 65534).astype("<u2")
    return {"name": name, "group": group, "kind": "continuous", "values": b64(codes),
            "lo": lo, "hi": hi, "vmin": vmin, "vmax": vmax, "scale": SCALES[scale], "unit": unit}


def categorical(name: str, codes, categories: Sequence[str], colors: Sequence[str], *,
                group: str) -> dict:
    """Return a categorical layer: ``codes`` index ``categories`` (-1 or NaN = missing)."""
    n = len(categories)
    dtype = "<u1" if n < 255 else "<u2"
    missing = 255 if n < 255 else 65535
    codes = np.asarray(codes, dtype=float)
    out = np.where(np.isfinite(codes) & (codes >= 0), codes, missing).astype(dtype)
    return {"name": name, "group": group, "kind": "categorical", "values": b64(out),
            "dtype": "u8" if n < 255 else "u16", "categories": [str(c) for c in categories],
            "colors": list(colors), "counts": np.bincount(out[out != missing], minlength=n)
            .astype(int).tolist()}


def proportion_layers(props: pd.DataFrame, colors: Mapping[str, str],
                      abundance: pd.DataFrame | None) -> list[dict]:
    """Return the dominant type and one layer per type (and its abundance when given)."""
    values = props.to_numpy(dtype=float)
    empty = ~np.isfinite(values).any(axis=1)
    dominant = np.where(empty, -1, np.nan_to_num(values, nan=-1).argmax(axis=1))
    names = [str(c) for c in props.columns]
    layers = [categorical("dominant cell type", dominant, names, [colors[n] for n in names],
                          group="cell types")]
    for i, name in enumerate(names):
        layers.append(continuous(name, values[:, i], group="proportions", scale="proportion",
                                 unit="fraction of cells", floor=0.0))
    if abundance is not None:
        for name in names:
            if name in abundance.columns:
                layers.append(continuous(f"{name} (cells)", abundance[name].to_numpy(float),
                                         group="abundance", scale="proportion",
                                         unit="cells per spot", floor=0.0))
    return layers


def qc_layers(adata: AnnData, key: str) -> list[dict]:
    """Zero-count spots, poorly fit spots and the fit score of a deconvolution."""
    layers = []
    flags = [(zero_counts_key(key), "zero-count spots", ["counts", "no counts"]),
             (poorly_fit_key(key), "poorly fit spots", ["fit", "poorly fit"])]
    for column, name, labels in flags:
        if column in adata.obs:
            codes = np.asarray(adata.obs[column], dtype=bool).astype(int)
            layers.append(categorical(name, codes, labels, ["#d9d9d9", "#d62728"], group="QC"))
    if fit_score_key(key) in adata.obs:
        layers.append(continuous("fit score", adata.obs[fit_score_key(key)].to_numpy(float),
                                 group="QC", scale="qc", unit="1 = typical spot", clip=99))
    return layers


def predictions(adata: AnnData) -> tuple[pd.DataFrame | None, np.ndarray | None]:
    """Predicted expression (spots × genes) and its s.d., from ``obsm`` or a predict_image X."""
    std_key = prediction_std_key(HISTOLOGY_PREDICTION_KEY)
    if HISTOLOGY_PREDICTION_KEY in adata.obsm:
        genes = pd.DataFrame(adata.obsm[HISTOLOGY_PREDICTION_KEY])
        std = adata.obsm[std_key] if std_key in adata.obsm else None
        return genes, None if std is None else pd.DataFrame(std).to_numpy(dtype=float)
    if HISTOLOGY_PREDICTION_KEY in adata.uns:
        x = adata.X.toarray() if sparse.issparse(adata.X) else np.asarray(adata.X)
        std = np.asarray(adata.layers[std_key], dtype=float) if std_key in adata.layers else None
        return pd.DataFrame(x, index=adata.obs_names, columns=adata.var_names), std
    return None, None


def gene_layers(genes: pd.DataFrame, std: np.ndarray | None, chosen: Sequence[str]) -> list:
    """One layer per chosen gene, and its uncertainty when there is one."""
    layers = []
    for gene in chosen:
        i = genes.columns.get_loc(gene)
        layers.append({**continuous(str(gene), genes.iloc[:, i].to_numpy(float),
                                    group="predicted genes", scale="gene",
                                    unit="log-normalised expression", clip=99),
                       "gene": str(gene)})
        if std is not None:
            layers.append({**continuous(f"{gene} ± s.d.", std[:, i], group="uncertainty (s.d.)",
                                        scale="uncertainty", unit="log-normalised s.d.",
                                        clip=99), "std_of": str(gene)})
    return layers


def choose_genes(genes: pd.DataFrame, wanted: Sequence[str] | None, most: int) -> list[str]:
    """``wanted`` (all must be there), else the ``most`` genes varying most across spots."""
    if wanted is not None:
        return [str(g) for g in wanted]
    variance = np.nan_to_num(genes.to_numpy(dtype=float).var(axis=0), nan=-1)
    order = np.argsort(-variance, kind="stable")[:most]
    return [str(genes.columns[i]) for i in sorted(order)]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(value)
        if len(items) > 12:
            return f"[{len(items)} values: {', '.join(map(str, items[:5]))}, ...]"
        return [_plain(v) for v in items]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if value is None or isinstance(value, (int, str)):
        return value
    return str(value)


def sections(adata: AnnData, key: str, run: Mapping | None) -> list[dict]:
    """Return the parameter tables: deconvolution, cell level, histology prediction, the run."""
    out = []
    for title, uns_key in [("deconvolution", key), ("cell level", cell_weights_key()),
                           ("histology prediction", HISTOLOGY_PREDICTION_KEY)]:
        entry = adata.uns.get(uns_key)
        params = entry.get("params") if isinstance(entry, Mapping) else None
        if isinstance(params, Mapping):
            out.append({"title": title, "rows": sorted(_plain(params).items())})
    if run:
        out.append({"title": "run", "rows": sorted(_plain(run).items())})
    return out


def qc_summary(adata: AnnData, key: str) -> list[list]:
    """``[label, value]`` rows: spots, zero-count and poorly fit spots, fit and convergence."""
    n = adata.n_obs
    rows: list[list] = [["spots", f"{n:,}"]]
    for column, label in [(zero_counts_key(key), "zero-count spots"),
                          (poorly_fit_key(key), "poorly fit spots")]:
        if column in adata.obs:
            k = int(np.asarray(adata.obs[column], dtype=bool).sum())
            rows.append([label, f"{k:,} ({100 * k / max(n, 1):.1f}%)"])
    if fit_score_key(key) in adata.obs:
        score = adata.obs[fit_score_key(key)].to_numpy(float)
        rows.append(["median fit score", f"{np.nanmedian(score):.2f}" if np.isfinite(
            score).any() else "n/a"])
    entry = adata.uns.get(key)
    params = entry.get("params", {}) if isinstance(entry, Mapping) else {}
    for name in ("converged", "n_sweeps", "likelihood", "lambda_ridge", "lambda_spatial"):
        if name in params:
            rows.append([name.replace("_", " "), _short(params[name])])
    quality = entry.get("fit_quality") if isinstance(entry, Mapping) else None
    if isinstance(quality, Mapping):
        rows += [[f"fit quality: {k}", _short(v)] for k, v in sorted(quality.items())
                 if not isinstance(v, (Mapping, list, np.ndarray))]
    return rows


def _short(value: Any) -> str:
    value = _plain(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def abundance_frame(adata: AnnData, key: str) -> pd.DataFrame | None:
    """Return the abundance table of ``key`` (``obsm[abundance_key(key)]``), or None."""
    value = adata.obsm.get(abundance_key(key)) if abundance_key(key) in adata.obsm else None
    return None if value is None else pd.DataFrame(value)


def to_json(payload: dict) -> str:
    """JSON safe inside ``<script>``: no ``</`` sequence."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
