"""Score any tile encoder under spotlens' protocol: the issue-4 table for your own weights.

For a pathology foundation model you have on disk (no such weights are available where
spotlens is developed), e.g.

    python benchmarks/histology_encoder.py --encoder vit \\
        --encoder-weights ~/models/uni/pytorch_model.bin

The issue-4 protocol (the study `benchmarks/studies/histology_her2st_legacy.py`): her2st train
C2–C5 → C6 and B4, stutility_mob MOB1–3 → MOB4; tiles of 1, 2 and 4 spot diameters, features
side by side and z-scored within each section; ridge (alpha and expression rank by
leave-one-section-out CV), attention and graph models (early stopping on the last training
section, refit on all; the mean over ``--seeds`` seeds). Mean per-gene Pearson r over the 250
most expressed genes (and the top-50 HVGs with ``--gene-sets hvg top_expressed``), beside the
issue's goals. Features are cached (``--cache-dir``), so only the first run pays the encoder.

Writes benchmarks/results/histology_encoder_<encoder>.md (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np

from _histology import DATA, DATASETS, HERE, fit_network, machine_line
from _machine import write_atomic
from spotlens.histology import (
    DEFAULT_RANKS,
    DEFAULT_TILE_SCALES,
    RidgeBaseline,
    Section,
    evaluate,
    get_encoder,
    image_identity,
    multiscale_features,
    section_log_expression,
    select_target_genes,
    standardize_section,
    tile_geometry,
)
from spotlens.io import read_image
GOALS = {"C6": 0.30, "B4": 0.20, "MOB4": 0.40}  # issue 4, top-250 genes
GENE_SET_LABEL = {"hvg": "HVG-50", "top_expressed": "top-250 expressed"}


def encode_dataset(spec: dict, encoder, cache_dir, log) -> tuple[dict, dict, dict]:
    """Multi-scale features (z-scored per section), spot centres and AnnData per section."""
    folder = DATA / spec["dir"]
    feats, coords, adatas = {}, {}, {}
    for s in spec["train"] + spec["test"]:
        t0 = time.perf_counter()
        adata = ad.read_h5ad(folder / f"{s}.h5ad")
        path = folder / spec["image"].format(s=s)
        image = read_image(path)
        geometry = tile_geometry(adata, image=image, tile_um=spec["tile_um"])
        x = multiscale_features(
            image, geometry.centres_px, geometry.side_px, encoder, scales=DEFAULT_TILE_SCALES,
            out_px=encoder.input_size, cache_dir=cache_dir,
            image_id="spot_tiles|" + image_identity(path), tile_um=geometry.tile_um,
            mpp=geometry.mpp, progress=True,
        )
        feats[s] = standardize_section(x)
        coords[s] = np.asarray(adata.obsm["spatial"], dtype=float)
        adatas[s] = adata
        log(f"  {s}: {adata.n_obs} spots × {len(DEFAULT_TILE_SCALES)} scales encoded or read "
            f"from the cache in {time.perf_counter() - t0:.0f} s")
    return feats, coords, adatas


def score_dataset(spec: dict, feats, coords, adatas, gene_sets, seeds: int, log) -> list[dict]:
    genes = select_target_genes({s: adatas[s] for s in spec["train"]})
    rows = []
    for gene_set in gene_sets:
        gene_list = genes[gene_set]
        expr = {s: section_log_expression(adatas[s], gene_list) for s in adatas}
        preds = {}
        ridge = RidgeBaseline(ranks=DEFAULT_RANKS).fit(
            {s: feats[s] for s in spec["train"]}, {s: expr[s] for s in spec["train"]})
        preds["ridge"] = {s: [ridge.predict(feats[s])] for s in spec["test"]}
        for kind in ("attention", "graph"):
            fits = [fit_network(kind, gene_list, feats, coords, expr, spec, seed=seed)
                    for seed in range(seeds)]
            preds[kind] = {s: [f.predict(Section(s, feats[s], coords[s])) for f in fits]
                           for s in spec["test"]}
        for model, by_section in preds.items():
            for s, ps in by_section.items():
                r = [evaluate(p, expr[s], gene_list)["mean_pearson"] for p in ps]
                rows.append({"section": s, "gene_set": gene_set, "model": model,
                             "r": float(np.mean(r)), "lo": min(r), "hi": max(r), "n": len(r)})
                log(f"  {s} {GENE_SET_LABEL[gene_set]} {model}: r {np.mean(r):.3f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="efficientnet-lite0",
                        help="name for get_encoder ('vit', 'resnet50', ...) or a TorchScript file")
    parser.add_argument("--encoder-weights", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--gene-sets", nargs="+", default=["top_expressed"],
                        choices=list(GENE_SET_LABEL))
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the networks")
    parser.add_argument("--cache-dir", default=str(HERE / ".cache"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)

    def log(msg):
        print(msg, flush=True)

    start = time.perf_counter()
    encoder = get_encoder(args.encoder, device=args.device, weights=args.encoder_weights)
    rows = []
    for name in args.datasets:
        log(f"{name}:")
        feats, coords, adatas = encode_dataset(DATASETS[name], encoder, args.cache_dir, log)
        rows += score_dataset(DATASETS[name], feats, coords, adatas, args.gene_sets,
                              args.seeds, log)
    total = time.perf_counter() - start
    table = ["| section | gene set | model | mean Pearson r | over seeds (min–max, n) | goal |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        spread = "–" if r["n"] == 1 else f"{r['lo']:.3f}–{r['hi']:.3f} ({r['n']})"
        goal = GOALS.get(r["section"]) if r["gene_set"] == "top_expressed" else None
        table.append(f"| {r['section']} | {GENE_SET_LABEL[r['gene_set']]} | {r['model']} | "
                     f"{r['r']:.3f} | {spread} | {'—' if goal is None else f'{goal:.2f}'} |")
    print("\n".join(table))
    label = Path(str(args.encoder)).stem
    weights = "" if args.encoder_weights is None else f" --encoder-weights {args.encoder_weights}"
    lines = [
        f"# Expression from H&E with the {encoder.name} encoder ({encoder.dim} features)", "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine_line()}",
        f"- command: `python benchmarks/histology_encoder.py --encoder {args.encoder}{weights} "
        f"--seeds {args.seeds}`",
        f"- encoder identity: `{encoder.identity}`",
        "- protocol: as benchmarks/histology_her2st.py, spotlens' default features (tiles of "
        f"{DEFAULT_TILE_SCALES} spot diameters, z-scored per section); ridge with alpha and "
        "expression rank by leave-one-section-out CV; attention and graph models with early "
        "stopping on the last training section, then refitted on all training sections.",
        f"- total run: {total:.0f} s", "", *table, "",
    ]
    out = write_atomic(args.out or HERE / "results" / f"histology_encoder_{label}.md",
                       "\n".join(lines))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
