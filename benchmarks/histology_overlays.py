"""Predicted vs measured expression maps on held-out H&E images (her2st C6, B4), as a user runs it.

1. ``spotlens.histology.train`` on her2st C2–C5 (default model and features: the attention
   model on EfficientNet-Lite0 features of 1×, 2× and 4× spot-diameter tiles, z-scored per
   section, reduced-rank output), genes = the 250 most expressed;
2. ``spotlens.histology.predict`` on each held-out image alone (C6: same patient, B4: another
   patient): a pseudo-spot grid over the detected tissue, no expression used, at
   ``--spacing-um`` (default 100 µm, the spot diameter: twice as dense as the ST array);
3. scores, per gene, Pearson r between the grid prediction and the measured spots (each
   measured spot against its nearest grid pseudo-spot), and also the prediction at the measured
   spots' own positions (``HistologyModel.predict_section``);
4. draws predicted and measured overlays of chosen genes into ``docs/``.

Run:  python benchmarks/histology_overlays.py [--genes ERBB2 IGKC MUCL1] [--sections C6 B4]
Writes benchmarks/results/histology_overlays.md and
docs/her2st_<section>_{predicted,measured}_<gene>.png.
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
from scipy.spatial import cKDTree

from spotlens.histology import load_model, load_section, predict_image, train
from spotlens.histology._metrics import pearson_per_gene, section_log_expression
from spotlens.io import save_figure
from spotlens.pl import overlay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path(os.environ.get("SPOTLENS_DATA", HERE.parents[1] / "shared" / "data")) / "her2st"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes", nargs="+", default=["ERBB2", "IGKC", "MUCL1"])
    parser.add_argument("--sections", nargs="+", default=["C6", "B4"])
    parser.add_argument("--spacing-um", type=float, default=100.0)
    parser.add_argument("--model-dir", default=str(HERE / ".cache" / "her2st_C2-C5_attention"))
    parser.add_argument("--cache-dir", default=str(HERE / ".cache"))
    parser.add_argument("--docs", default=str(ROOT / "docs"))
    parser.add_argument("--out", default=str(HERE / "results" / "histology_overlays.md"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)
    start = time.perf_counter()

    sections = [load_section(DATA / f"{s}.h5ad") for s in ("C2", "C3", "C4", "C5")]
    model_dir = train(sections, genes="top_expressed", model="attention", tile_um=100,
                      cache_dir=args.cache_dir, out=args.model_dir, resume=False,
                      progress=False)
    model = load_model(model_dir)
    missing = [g for g in args.genes if g not in model.genes]
    if missing:
        raise SystemExit(f"{missing} are not among the model's genes.")

    gene_index = {g: i for i, g in enumerate(model.genes)}
    docs = Path(args.docs)
    validation = model.config["validation"]
    lines = [
        "# Predicted vs measured maps on held-out her2st images",
        "",
        f"- date: {dt.date.today().isoformat()}; machine: {machine()}",
        "- command: `python benchmarks/histology_overlays.py`",
        f"- model: `spotlens.histology.train` on C2–C5, {model.config['model_type']} model, "
        f"{model.config['encoder']['name']} at tile scales {list(model.tile_scales)} "
        f"(features z-scored per section: {model.standardize}), {len(model.genes)} genes "
        f"(250 most expressed on C2–C5), expression rank {validation['expression_rank']} "
        f"(chosen on {validation['section']})",
        f"- prediction: `spotlens.histology.predict` on each image alone, pseudo-spots every "
        f"{args.spacing_um:g} µm on the detected tissue (the ST array's pitch is 200 µm)",
        "",
        "| section | gene | r, grid prediction vs measured (nearest pseudo-spot) | r, prediction "
        "at the measured spots | measured range (log-normalised) |",
        "|---|---|---:|---:|---:|",
    ]
    notes = []
    for name in args.sections:
        adata, image = load_section(DATA / f"{name}.h5ad")
        mpp = float(adata.uns["spatial"][name]["metadata"]["microns_per_pixel_est"])
        grid = predict_image(model, image, mpp=mpp, spacing_um=args.spacing_um,
                       cache_dir=args.cache_dir)
        measured = section_log_expression(adata, model.genes)
        xy = np.asarray(adata.obsm["spatial"], dtype=float)
        dist, nearest = cKDTree(grid.obsm["spatial"]).query(xy)
        r_grid, _ = pearson_per_gene(np.asarray(grid.X)[nearest], measured)
        r_spots, _ = pearson_per_gene(model.predict_section(adata, image=image,
                                                            cache_dir=args.cache_dir), measured)
        truth = ad.AnnData(measured.astype(np.float32), obs=adata.obs[[]].copy(),
                           var=grid.var.copy())
        truth.obsm["spatial"] = xy
        truth.uns["spatial"] = {name: adata.uns["spatial"][name]}
        for gene in args.genes:
            fig = overlay(grid, [gene], image=image,
                          label="predicted log-normalised expression")
            save_figure(fig, docs / f"her2st_{name}_predicted_{gene}.png")
            fig = overlay(truth, [gene], image=image,
                          label="measured log-normalised expression")
            save_figure(fig, docs / f"her2st_{name}_measured_{gene}.png")
            i = gene_index[gene]
            lines.append(f"| {name} | {gene} | {r_grid[i]:.3f} | {r_spots[i]:.3f} | "
                         f"{measured[:, i].min():.2f}–{measured[:, i].max():.2f} |")
        lines.append(f"| {name} | mean over all {len(model.genes)} genes | "
                     f"{np.mean(r_grid):.3f} | {np.mean(r_spots):.3f} | |")
        notes.append(f"{name}: {grid.n_obs} pseudo-spots, {adata.n_obs} measured spots, median "
                     f"distance from a measured spot to its nearest pseudo-spot "
                     f"{np.median(dist) * mpp:.0f} µm")
    lines += [
        "",
        *[f"- {n}" for n in notes],
        "",
        f"Total run {time.perf_counter() - start:.0f} s (encoder features cached in "
        f"`{Path(args.cache_dir).name}/`). Figures: "
        + ", ".join(f"`docs/her2st_{s}_{{predicted,measured}}_{g}.png`"
                    for s in args.sections for g in args.genes),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
