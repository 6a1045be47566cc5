"""Cells per spot when the spatial assay captures less RNA per cell than the reference.

Issue 17, point 4. The cell level counts the cells in a spot as its abundance in reference-cell
units over the **capture ratio** (spatial counts of a cell over its reference counts). Three
ways to get it are compared with the truth:

- ``cells_per_spot=None`` (the default): ratio 1, i.e. library size over the reference cells';
- ``cells_per_spot="estimate"``: estimated from how far spots scatter around the type-level fit
  (``spotlens.deconv._capture``);
- ``cells_per_spot=<true mean>``: a prior on the mean cells per spot, set to the truth
  (an oracle: what a user who knows the mean gets; the spread over spots is still estimated).

Cases:

1. **Visium-like simulation** (the issue's): ``spotlens.datasets.synthetic`` with 10,000 spots
   (hexagonal grid 100 µm apart; ``max(1, Poisson(6))`` cells per spot), 20 types × 2,000
   genes, a 50,000-cell reference (2,500 per type) at 2,000 counts per cell; the spots' counts
   are then thinned binomially to a median of ~3,000 UMI (the spatial assay captures a quarter
   of what the reference does).
2. **Lymph-node pseudo-spots** (real cells): ``spotlens.datasets.pseudo_spots`` from the spacexr
   lymph-node reference, 1,000 spots of 2–10 cells; the method gets the other half of the
   reference (15 cells per type). Each spot is thinned to a depth drawn around 3,000 UMI
   whatever its number of cells, so its counts do not grow with its cells: the capture ratio
   differs from spot to spot, against the estimate's assumption of one ratio per slide (and
   15 cells per type give noisy type means).
3. **osmFISH cortex** (real tissue, same assay: the capture ratio is 1): pseudo-spots of the
   reference's own cells; cells in a spot are neighbours, more alike than random cells of
   their type (cortical layers), against the estimate's assumption of independent cells.

Scores: mean cells per spot (estimate against truth; "error of the mean" is their relative
difference), the mean absolute error of cells per spot and of cells per spot and type
(``spotlens.metrics.count_error``), the capture ratio used, and wall seconds of the cell level.

Usage::

    python benchmarks/cell_level_capture.py [--spots 10000]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

import spotlens
from spotlens.metrics import count_error

from _machine import machine, markdown_table, write_atomic  # benchmarks/_machine.py

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
TARGET_UMI = 3000


def visium_like(n_spots: int):
    spatial, reference = spotlens.datasets.synthetic(
        n_spots, n_genes=2000, n_types=20, cells_per_spot=6.0, n_cells_per_type=2500,
        counts_per_cell=2000.0, seed=7,
    )
    counts = sparse.csr_matrix(spatial.X).astype(np.int64)
    share = TARGET_UMI / float(np.median(np.asarray(counts.sum(axis=1)).ravel()))
    counts.data = np.random.default_rng(7).binomial(counts.data, min(share, 1.0))
    counts.eliminate_zeros()
    spatial.X = counts.astype(np.float32)
    truth = spatial.obsm["true_cell_counts"]
    return spatial, reference, truth, f"thinned to {share:.3f} of its counts"


def lymph_node():
    from spotlens.datasets import load_pair, pseudo_spots

    _, reference = load_pair("spacexr_lymphnode_visium", DATA)
    spatial, half = pseudo_spots(reference, n_spots=1000, library_size=TARGET_UMI, seed=7)
    return spatial, half, spatial.obsm["cell_counts_true"], "real cells, independent draws"


def osmfish():
    spatial, reference = spotlens.datasets.osmfish_cortex()
    return spatial, reference, spatial.obsm["true_cell_counts"], "real tissue, same assay"


def score(spatial, reference, truth: pd.DataFrame, mode) -> dict:
    t0 = time.perf_counter()
    res = spotlens.deconv.cell_level(spatial, reference, cells_per_spot=mode, inplace=False,
                                     progress=False)
    seconds = time.perf_counter() - t0
    est = res.cell_counts
    true_total = truth.sum(axis=1).to_numpy(float)
    est_total = est.loc[truth.index].sum(axis=1).to_numpy(float)
    return {
        "cells per spot, true": true_total.mean(),
        "cells per spot, estimated": est_total.mean(),
        "error of the mean": abs(est_total.mean() - true_total.mean()) / true_total.mean(),
        "total cells MAE": float(np.abs(est_total - true_total).mean()),
        "count MAE per type": count_error(est, truth),
        "capture ratio": res.uns["params"]["capture_ratio"],
        "seconds": seconds,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spots", type=int, default=10_000, help="spots of the Visium-like case")
    p.add_argument("--out", type=Path, default=HERE / "results" / "cell_level_capture.md")
    args = p.parse_args()
    logging.getLogger("spotlens").setLevel(logging.ERROR)
    cases = [(f"Visium-like simulation, {args.spots:,} spots", lambda: visium_like(args.spots))]
    if (DATA / "spacexr_lymphnode_visium").exists():
        cases.append(("lymph-node pseudo-spots, 1,000 spots", lymph_node))
    cases.append(("osmFISH cortex, 1,036 spots", osmfish))
    rows = []
    for name, make in cases:
        spatial, reference, truth, note = make()
        spotlens.deconv.deconvolve(spatial, reference, progress=False)
        mean_true = float(truth.sum(axis=1).mean())
        for label, mode in (("library size (default)", None), ("estimate", "estimate"),
                            (f"prior: true mean {mean_true:.2f}", mean_true)):
            row = {"case": name, "cells_per_spot": label, **score(spatial, reference, truth, mode)}
            rows.append(row)
            print(f"{name} ({note}) · {label}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    table = pd.DataFrame(rows)
    text = "\n".join([
        "# Cells per spot when the assays capture differently (issue 17, point 4)", "",
        f"Date: {datetime.date.today()} · machine: {machine()} · spotlens {spotlens.__version__}",
        "", f"Command: `python benchmarks/cell_level_capture.py --spots {args.spots}`", "",
        __doc__.split("\n\n", 1)[1].split("Usage::")[0].strip(), "",
        markdown_table(table), "",
    ])
    write_atomic(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
