"""Measured | predicted | uncertainty maps of held-out her2st H&E (C6, B4), as a user runs it.

1. ``spotlens.histology.train`` on her2st C2–C5 with the package's defaults (the route the
   frozen protocol selected: ridge on EfficientNet-Lite0 features of spot-diameter tiles,
   z-scored per section, alpha and projection rank by leave-one-section-out CV), 100 µm tiles,
   genes = the 250 most expressed (so ERBB2, IGKC and MUCL1 are among them), and the default
   uncertainty ensemble (16 refits of the ridge on spatial block-bootstrap replicates of the
   training spots);
2. ``spotlens.histology.predict`` at each held-out section's measured spots (its expression is
   not used): predicted expression and its uncertainty (``obsm["histology_prediction"]``,
   ``obsm["histology_prediction_std"]``); and ``predict_image`` on the image alone, a
   pseudo-spot grid over the detected tissue every ``--spacing-um`` (100 µm);
3. scores, per gene, Pearson r between prediction and measurement at the measured spots with a
   95 % spatial block-bootstrap interval (``block_bootstrap_pearson``, tiles of 4 spot
   spacings), the grid prediction's r (each measured spot against its nearest pseudo-spot),
   the predicted spread as a share of the measured one, where the spots measured highest rank
   in the prediction, and whether the uncertainty follows the error;
4. draws ``spotlens.pl.prediction`` figures into ``docs/``: measured | predicted | uncertainty
   over the H&E, measured and predicted on one colour scale of per-gene percentile ranks.

Only public API (``spotlens.histology``, ``spotlens.metrics``, ``spotlens.pl``).

Run:  python benchmarks/histology_overlays.py [--genes ERBB2 IGKC MUCL1] [--sections C6 B4]
Writes benchmarks/results/histology_overlays.md and docs/her2st_<section>_<gene>.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from scipy.stats import rankdata, spearmanr

from spotlens.histology import (
    block_bootstrap_pearson,
    load_model,
    load_section,
    predict,
    predict_image,
    section_log_expression,
    train,
)
from spotlens.metrics import pearson_columns
from spotlens.pl import prediction

from _machine import machine  # benchmarks/_machine.py (the script's folder)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path(os.environ.get("SPOTLENS_DATA", HERE.parents[1] / "shared" / "data")) / "her2st"
N_BOOT = 1000


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` whole or not at all (a temporary file beside it, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def interval(pred: np.ndarray, meas: np.ndarray, coords: np.ndarray) -> str:
    """``0.13 [−0.05, 0.30]``: mean per-gene r with its 95 % block-bootstrap interval."""
    ci = block_bootstrap_pearson(pred, meas, coords, n_boot=N_BOOT, seed=0)
    return f"{ci.estimate:.2f} [{ci.low:.2f}, {ci.high:.2f}]"


def quartile_ranks(pred: np.ndarray, meas: np.ndarray) -> tuple[float, float]:
    """Mean percentile rank in the prediction of the spots measured in the top and in the bottom
    quartile (measured ranks with ties averaged, so a gene zero on most spots has no bottom
    quartile: NaN)."""
    rp = 100.0 * (rankdata(pred) - 0.5) / len(pred)
    rm = 100.0 * (rankdata(meas) - 0.5) / len(meas)
    top, bottom = rm > 75, rm < 25
    return (float(rp[top].mean()) if top.any() else float("nan"),
            float(rp[bottom].mean()) if bottom.any() else float("nan"))


def hot_spot_shift(pred: np.ndarray, meas: np.ndarray, xy: np.ndarray) -> float:
    """Distance (px) between the centres of the top-quartile spots, predicted vs measured."""
    rp = rankdata(pred) / len(pred)
    rm = rankdata(meas) / len(meas)
    return float(np.linalg.norm(xy[rp > 0.75].mean(axis=0) - xy[rm > 0.75].mean(axis=0)))


def verdict(top: float, bottom: float) -> str:
    """How far apart the prediction puts the highest- and lowest-measured spots."""
    if np.isnan(bottom):
        return "(most spots measure 0, so there is no bottom quartile)"
    gap = top - bottom
    if gap < 0:
        return "the wrong way round: the prediction ranks the highest-measured spots lower"
    if gap < 10:
        return "the prediction hardly separates them"
    if gap < 25:
        return "in the right direction, weakly"
    return "clearly separated"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", nargs="+", default=["ERBB2", "IGKC", "MUCL1"])
    parser.add_argument("--sections", nargs="+", default=["C6", "B4"])
    parser.add_argument("--spacing-um", type=float, default=100.0)
    parser.add_argument("--model", default=None,
                        help="model type; default: train's default (ridge)")
    parser.add_argument("--model-dir", default=str(HERE / ".cache" / "her2st_C2-C5_overlays"))
    parser.add_argument("--cache-dir", default=str(HERE / ".cache"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--out", default=str(HERE / "results" / "histology_overlays.md"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)
    start = time.perf_counter()

    sections = [load_section(DATA / f"{s}.h5ad") for s in ("C2", "C3", "C4", "C5")]
    model_dir = train(sections, genes="top_expressed", model=args.model, tile_um=100,
                      cache_dir=args.cache_dir, out=args.model_dir, resume=False,
                      progress=False)
    model = load_model(model_dir)
    missing = [g for g in args.genes if g not in model.genes]
    if missing:
        raise SystemExit(f"{missing} are not among the model's genes.")

    gene_index = {g: i for i, g in enumerate(model.genes)}
    docs = Path(args.docs)
    validation = model.config["validation"]
    ensemble = model.config["uncertainty"]
    lines = [
        "# Measured | predicted | uncertainty maps on held-out her2st images",
        "",
        f"- date: {dt.date.today().isoformat()}; machine: {machine()}",
        "- command: `python benchmarks/histology_overlays.py`",
        f"- model: `spotlens.histology.train` on C2–C5, {model.config['model_type']} model, "
        f"{model.config['encoder']['name']} at tile scales {list(model.tile_scales)} "
        f"(features z-scored per section: {model.standardize}), {len(model.genes)} genes "
        f"(250 most expressed on C2–C5), expression rank {validation['expression_rank']} "
        f"(chosen by {validation['section']}), train's defaults otherwise",
        f"- uncertainty: {ensemble['method']}, {ensemble['n_boot']} members, tiles of "
        f"{ensemble['block_spacings']:g} spot spacings (alpha {ensemble['alpha']:.3g}); stored "
        "as `obsm[\"histology_prediction_std\"]` by `spotlens.histology.predict`",
        "- prediction: `spotlens.histology.predict` at the measured spots (expression unused), "
        f"and `predict_image` on each image alone, pseudo-spots every {args.spacing_um:g} µm on "
        "the detected tissue (the ST array's pitch is 200 µm)",
        f"- r: Pearson r across the measured spots, 95 % spatial block-bootstrap interval "
        f"({N_BOOT} replicates, tiles of 4 spot spacings, `block_bootstrap_pearson`)",
        "",
        "| section | gene | r at the measured spots [95 % CI] | r, H&E-only grid (nearest "
        "pseudo-spot) | predicted spread, % of measured | mean percentile in the prediction "
        "of the spots measured in the top / bottom quartile | median uncertainty (s.d.) | "
        "Spearman(uncertainty, abs. error) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes, figures, findings = [], [], []
    for name in args.sections:
        adata, image = load_section(DATA / f"{name}.h5ad")
        mpp = float(adata.uns["spatial"][name]["metadata"]["microns_per_pixel_est"])
        measured = section_log_expression(adata, model.genes)
        xy = np.asarray(adata.obsm["spatial"], dtype=float)
        spots = ad.AnnData(measured.astype(np.float32), obs=adata.obs[[]].copy(),
                           var=pd.DataFrame(index=pd.Index(model.genes)))
        spots.obsm["spatial"] = xy
        spots.uns["spatial"] = {name: adata.uns["spatial"][name]}
        predict(spots, model=model, image=image, cache_dir=args.cache_dir)
        pred = spots.obsm["histology_prediction"].to_numpy()
        std = spots.obsm["histology_prediction_std"].to_numpy()
        grid = predict_image(model, image, mpp=mpp, spacing_um=args.spacing_um,
                             cache_dir=args.cache_dir)
        dist, nearest = cKDTree(grid.obsm["spatial"]).query(xy)
        r_grid, _ = pearson_columns(np.asarray(grid.X)[nearest], measured)
        for gene in args.genes:
            i = gene_index[gene]
            path = docs / f"her2st_{name}_{gene}.png"
            prediction(spots, gene, image=image, title=f"her2st {name} (held out)",
                       n_boot=N_BOOT, save=path)
            figures.append(path)
            p, m, s = pred[:, i], measured[:, i], std[:, i]
            rho = spearmanr(s, np.abs(p - m)).statistic
            top, bottom = quartile_ranks(p, m)
            shift = hot_spot_shift(p, m, xy) * mpp
            findings.append(
                f"{name} {gene}: the spots measured in the top quartile sit on average at "
                f"percentile {top:.0f} of the prediction"
                + ("" if np.isnan(bottom) else
                   f", those in the bottom quartile at {bottom:.0f}")
                + f": {verdict(top, bottom)}; the centre of the highest-predicted quarter of "
                f"spots lies {shift:.0f} µm from that of the highest-measured quarter")
            lines.append(
                f"| {name} | {gene} | {interval(p[:, None], m[:, None], xy)} | "
                f"{r_grid[i]:.2f} | {100 * p.std() / m.std():.0f} | "
                f"{top:.0f} / {'—' if np.isnan(bottom) else f'{bottom:.0f}'} | "
                f"{np.median(s):.3f} | {rho:.2f} |")
        cols = [gene_index[g] for g in args.genes]
        pairs = [(a, b) for k, a in enumerate(args.genes) for b in args.genes[k + 1:]]
        same_p, same_m = np.corrcoef(pred[:, cols].T), np.corrcoef(measured[:, cols].T)
        findings.append(
            f"{name}: how alike the maps of different genes are (Pearson r across spots, "
            "predicted vs measured): " + "; ".join(
                f"{a}–{b} {same_p[args.genes.index(a), args.genes.index(b)]:.2f} vs "
                f"{same_m[args.genes.index(a), args.genes.index(b)]:.2f}" for a, b in pairs)
            + f" (the predictions of all {len(model.genes)} genes are projected onto "
            f"{validation['expression_rank']} axes of the training expression)")
        spread = 100 * np.median(pred.std(axis=0) / np.maximum(measured.std(axis=0), 1e-12))
        lines.append(f"| {name} | mean over all {len(model.genes)} genes | "
                     f"{interval(pred, measured, xy)} | {np.mean(r_grid):.2f} | "
                     f"{spread:.0f} (median) | | {np.median(std):.3f} | |")
        notes.append(f"{name}: {adata.n_obs} measured spots; {grid.n_obs} pseudo-spots, median "
                     f"distance from a measured spot to its nearest pseudo-spot "
                     f"{np.median(dist) * mpp:.0f} µm; grid uncertainty "
                     f"`layers[\"histology_prediction_std\"]` median "
                     f"{np.median(grid.layers['histology_prediction_std']):.3f}")
    lines += [
        "",
        *[f"- {n}" for n in notes],
        "",
        "## What the maps show",
        "",
        "Predictions are shrunk towards the training mean (the spread column): on one absolute "
        "scale the predicted map would be nearly flat, so the figures colour measured and "
        "predicted by percentile rank among the same spots (equal colour = equal rank, what "
        "Pearson r compares). A rank map always uses the full colour range, even for a "
        "prediction that varies by a few hundredths: read the spread in the predicted panel's "
        "title before trusting its contrast.",
        "",
        *[f"- {f}" for f in findings],
        f"- The uncertainty is the s.d. of the prediction over {ensemble['n_boot']} refits of "
        f"the model's ridge ({ensemble['method']}) on block-bootstrap replicates of the "
        "training spots: it marks spots whose image features the training sections cover "
        "poorly (e.g. tiles at the tissue's edge). It is not a prediction interval: it is "
        "far smaller than the error against the measurement (mostly the spot's own counting "
        "noise and the shrinkage), and its Spearman correlation with the absolute error "
        "(last column) says whether it points at the spots predicted worst.",
        "",
        "Figures (measured | predicted on one scale of per-gene percentile ranks among the "
        "measured spots, uncertainty on its own absolute scale; spots at 60 % opacity over the "
        "H&E): " + ", ".join(f"`{p.relative_to(ROOT)}`" if p.is_relative_to(ROOT) else f"`{p}`"
                             for p in figures),
        "",
        f"Total run {time.perf_counter() - start:.0f} s (encoder features cached in "
        f"`{Path(args.cache_dir).name}/`).",
    ]
    write_atomic(Path(args.out), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
