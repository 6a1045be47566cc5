"""Nucleus-level expression from H&E (issue 16, points 2-3): her2st and synthetic nuclei.

her2st, under the frozen histology protocol (train C2-C5, test C6 and B4; targets
log1p(normalize_total(counts, 1e4)); gene sets chosen on the training sections with
``select_gene_sets``): the nucleus model (``NucleusPredictor``, the ``"nucleus"`` model type)
reads each segmented nucleus's descriptor (morphology, stain, colour statistics of a 24 µm
crop) and, if leave-one-section-out on C2-C5 says so, its nearest spot's multi-scale
EfficientNet-Lite0 tile features; its nuclei's expected counts are summed per spot and
normalised as the measurement is. It is compared with the spot-level default route (ridge +
rank on the same multi-scale features, section standardisation: ``train``'s defaults) on the same
genes, with spatial block-bootstrap 95 % intervals and paired intervals of the difference. Every
choice (context, epochs; ridge penalty and rank) is made on C2-C5; the test sections'
expression is read once, after all predictions.

Synthetic (``spotlens.datasets.synthetic_nuclei``): spots summed from nuclei of known type and
expression; per-nucleus expression and types recovered on a held-out section, at three levels
of descriptor noise; with a reference (nuclei of the training sections as single cells),
``spotlens.deconv.deconvolve`` gives the spots' proportions, the type head learns from them,
and the nuclei's type calls are compared with those proportions.

Also: prediction time per 1,000 nuclei (descriptors + network; segmentation apart), and the
figure docs/nuclei_C6_types.png.

Run:  python benchmarks/histology_nuclei.py [--n-boot 1000] [--skip-synthetic]
Writes benchmarks/results/histology_nuclei.md. Nuclei, descriptors and encoder features are
cached under benchmarks/.cache/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import pickle
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np

from _histology import DATA, DATASETS, HERE, machine_line
from _machine import write_atomic
import _nuclei_parts as parts  # arrays, tables, timing, synthetic runs, figure
from histology_her2st import MULTI, frozen_features
from spotlens.histology import (
    DEFAULT_RANKS,
    NucleusModelConfig,
    NucleusPredictor,
    RidgeBaseline,
    block_bootstrap_pearson,
    get_encoder,
    nucleus_descriptors,
    paired_block_bootstrap_pearson,
    read_image,
    section_log_expression,
    segment_nuclei,
    select_gene_sets,
    standardize_section,
)


SPEC = DATASETS["her2st"]
FOLDER = DATA / SPEC["dir"]
CACHE = HERE / ".cache"
SET_LABEL = {"top_expressed": "top-250", "hvg": "HVG-50", "svg": "SVG-50"}
GENE_SETS = ("hvg", "svg", "top_expressed")


def nuclei_of(section: str, spots: ad.AnnData) -> ad.AnnData:
    """The section's nuclei (``segment_nuclei`` defaults), with descriptors in obsm, cached."""
    path = CACHE / "nuclei" / f"{section}.h5ad"
    image = FOLDER / SPEC["image"].format(s=section)
    if path.exists():
        nuclei = ad.read_h5ad(path)
    else:
        nuclei = segment_nuclei(read_image(image), adata=spots, n_jobs=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        nuclei.write_h5ad(path)
    desc = path.with_name(f"{section}_desc.npy")
    if not desc.exists():
        np.save(desc, nucleus_descriptors(nuclei, image=read_image(image)))
    nuclei.obsm["X_nucleus"] = np.load(desc)
    return nuclei


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--gene-sets", nargs="+", default=list(GENE_SETS))
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the last run's fits and predictions (tables, figure)")
    parser.add_argument("--out", default=str(HERE / "results" / "histology_nuclei.md"))
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)
    start = time.perf_counter()
    train, test = SPEC["train"], SPEC["test"]
    adatas = {s: ad.read_h5ad(FOLDER / f"{s}.h5ad") for s in train + test}
    encoder = get_encoder("efficientnet-lite0")
    feats = {s: standardize_section(frozen_features(
        adatas[s], FOLDER / SPEC["image"].format(s=s), SPEC["tile_um"], encoder, str(CACHE),
        (MULTI,))[MULTI]) for s in train + test}
    nuclei = {s: nuclei_of(s, adatas[s]) for s in train + test}
    inputs = {s: parts.section_arrays(adatas[s], nuclei[s], feats[s]) for s in train + test}
    gene_sets = select_gene_sets({s: adatas[s] for s in train})
    lines, loso_lines, fitted, predictions = [], [], {}, {}
    saved = CACHE / "histology_nuclei.pkl"  # the fits and predictions, to redo the rest
    if args.reuse:
        loso_lines, fitted, predictions = pickle.loads(saved.read_bytes())
    for gs in [] if args.reuse else args.gene_sets:
        genes = gene_sets[gs]
        t0 = time.perf_counter()
        sections = {s: {**inputs[s], "y": section_log_expression(adatas[s], genes)}
                    for s in train}
        model = NucleusPredictor(genes, NucleusModelConfig()).fit(sections)
        fit_s = time.perf_counter() - t0
        ridge = RidgeBaseline(ranks=DEFAULT_RANKS).fit({s: feats[s] for s in train},
                                                       {s: sections[s]["y"] for s in train})
        fitted[gs] = model
        loso_lines.append(parts.loso_line(SET_LABEL[gs], model, ridge, fit_s))
        for s in test:  # predictions first; the test expression is read after all of them
            out = model.predict(inputs[s]["desc"], feats[s], inputs[s]["nearest"])
            predictions[gs, s] = (parts.spot_prediction(out, inputs[s]),
                                  ridge.predict(feats[s]), out)
    if not args.reuse:
        saved.write_bytes(pickle.dumps((loso_lines, fitted, predictions)))
    rows = []
    for gs in args.gene_sets:
        for s in test:
            observed = section_log_expression(adatas[s], gene_sets[gs])  # read once, here
            coords = np.asarray(adatas[s].obsm["spatial"], dtype=np.float64)
            nuc, spot, _ = predictions[gs, s]
            boot = {"n_boot": args.n_boot, "seed": 0}
            rows.append({"section": s, "gene_set": SET_LABEL[gs],
                         "nuclei": block_bootstrap_pearson(nuc, observed, coords, **boot),
                         "spot": block_bootstrap_pearson(spot, observed, coords, **boot),
                         "diff": paired_block_bootstrap_pearson(nuc, spot, observed, coords,
                                                                **boot)})
    lines += parts.result_table(rows)
    timing = parts.time_per_1000(fitted[args.gene_sets[0]], nuclei["C6"], inputs["C6"],
                                 feats["C6"], FOLDER / SPEC["image"].format(s="C6"))
    figure = parts.figure(fitted, predictions, nuclei["C6"], adatas["C6"],
                          FOLDER / SPEC["image"].format(s="C6"),
                          HERE.parent / "docs" / "nuclei_C6_types.png")
    synthetic = [] if args.skip_synthetic else parts.synthetic_report()
    body = [
        "# Nucleus-level expression from H&E (issue 16, points 2-3)", "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine_line()}",
        "- command: `python benchmarks/histology_nuclei.py" + "".join(
            f" {a}" for a in (argv or [])) + "`",
        "- protocol: the frozen histology protocol's split and targets: train C2–C5, test C6 "
        "(same patient) and B4 (another patient); log1p(normalize_total(counts, 1e4)); gene "
        "sets chosen on C2–C5 (`select_gene_sets`); every choice made by leave-one-section-out "
        "on C2–C5; each test section's expression read once, after every prediction.",
        "- nucleus model: `NucleusPredictor` (`model=\"nucleus\"`): nuclei from "
        "`segment_nuclei` (classical, defaults); per nucleus 9 morphology/stain features and "
        "the 25 colour statistics of a 24 µm crop (16 px), z-scored within the section; "
        "optionally its nearest spot's multi-scale EfficientNet-Lite0 features (1, 2, 4 "
        "spot diameters; 32 principal components fitted on the training spots). MLP "
        "encoder (128 → latent 32, dropout 0.2) → log-rate decoder (exp; started at the "
        "training spots' mean profile, or at zero over the route's profile) to expected "
        "counts of each gene and of all other genes; a spot's prediction = log1p(1e4 · Σ "
        "nuclei counts / Σ nuclei totals) over the nuclei whose centroid lies in its 100 µm "
        "circle; loss = MSE on "
        "per-gene z-scores of the spots' log-normalised expression (AdamW, full batch). "
        "Context and epochs (every 10 up to 120; from 0 for the route context) chosen by "
        "leave-one-section-out on C2–C5: 'none' = the descriptor only, 'spot' = and the "
        "nearest spot's features, 'route' = as 'spot', with every nucleus starting from its "
        "nearest spot's profile as predicted by the spot-level route below (cross-fitted: a "
        "training section's starting profiles come from a route fitted on the other training "
        "sections, and inside each fold without the held-out one; decoder started at zero, so "
        "0 epochs is the route itself). A spot without a segmented nucleus is predicted 0.",
        "- spot-level route: `RidgeBaseline(ranks=DEFAULT_RANKS)` (penalty and projection rank "
        "by leave-one-section-out) on the same multi-scale features, section standardisation "
        "— `spotlens histology train`'s default route "
        "(`benchmarks/results/histology_her2st_protocol.md`).",
        f"- intervals: spatial block bootstrap ({args.n_boot} replicates, tiles of 4 × the "
        "spot spacing, percentile 95 %); Δ is paired (same tiles).",
        "", "## Choices on the training sections (leave-one-section-out, C2–C5)", "",
        *loso_lines, "",
        "## Held-out sections: nuclei summed per spot vs the spot-level route", "",
        *lines, "",
        *timing, "", *figure, "", *synthetic, "",
        f"Total run time: {time.perf_counter() - start:.0f} s.",
    ]
    out = write_atomic(args.out, "\n".join(body) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
