"""Cell-level deconvolution against ground truth on the osmFISH cortex pseudo-spots.

Every pseudo-spot is the sum of known reference cells (``reference.obs["spot"]``), so two things
can be scored (Codeluppi et al. 2018 data, bundled as ``spotlens.datasets.osmfish_cortex``):

- **recall of member cells**: for spot ``i`` with ``n_i`` true cells, the fraction of the
  ``n_i`` highest-weighted reference cells that truly sit in spot ``i`` (mean over spots);
- **cell counts per type**: mean absolute error of the estimated number of cells of each type
  per spot against ``truth_cell_counts``, and of the total cells per spot.

Baselines, given the same type-level result: (a) random cells of the estimated types (as many
of each type as the rounded type-level abundance); (b) cells sampled by the type proportions
alone (each cell's type drawn from the spot's proportions, then a random cell of that type).
Both baselines are averaged over 5 seeds. Counts are also scored on the held-out split (left-half
reference, right-half spots), where member recall is undefined (no spot is made of reference
cells). The row "before issue 17" repeats the numbers of the previous search (cosine of the
raw, Poisson-weighted residual after the other types; 10 candidates per type, ``lambda_type``
0.1 and ``lambda_similar`` 0.01 at every spot) from the results file of 2026-11-21; the code
that made them is no longer in the package.

Usage::

    python benchmarks/cell_level_osmfish.py
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

import spotlens
from spotlens.metrics import count_error, member_recall

from _machine import machine, markdown_table  # benchmarks/_machine.py (the script's folder)

HERE = Path(__file__).resolve().parent
N_SEEDS = 5
# benchmarks/results/cell_level_osmfish.md of 2026-11-21 (spotlens 0.1.0, before issue 17)
BEFORE = {
    "full": {"method": "spotlens cell level, before issue 17", "seconds (type + cell level)":
             "1.1 + 5.1", "count MAE per type": 0.216, "total cells MAE": 1.039,
             "member recall": 0.341},
    "held-out": {"method": "spotlens cell level, before issue 17",
                 "seconds (type + cell level)": "0.3 + 1.4", "count MAE per type": 0.276,
                 "total cells MAE": 1.412},
}


# the rounding spotlens.deconv.cell_level uses (its private _largest_remainder), kept here
# so the baseline rounds the same way through the public API only
def largest_remainder(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Round each row of ``values`` to integers that add up to ``totals`` (largest remainder)."""
    values = np.maximum(np.nan_to_num(values), 0.0)
    row_sum = values.sum(axis=1, keepdims=True)
    scaled = np.divide(values * totals[:, None], row_sum, out=np.zeros_like(values),
                       where=row_sum > 0)
    floor = np.floor(scaled)
    # a row with nothing to share out stays at zero, whatever its total
    missing = np.where(row_sum[:, 0] > 0, totals - floor.sum(axis=1), 0).astype(int)
    order = np.argsort(-(scaled - floor), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(values.shape[1])[None, :], axis=1)
    return (floor + (rank < missing[:, None])).astype(np.int64)


def baseline_weights(counts: np.ndarray, codes: np.ndarray, rng) -> sparse.csr_matrix:
    """Random cells of each type, as many as ``counts[i, k]``, in random order.

    Returned as spots × cells weights falling with the (random) rank, so that
    :func:`spotlens.metrics.member_recall` scores a baseline exactly as it scores spotlens.
    """
    pools = [np.flatnonzero(codes == k) for k in range(counts.shape[1])]
    rows, cols, vals = [], [], []
    for i, row in enumerate(counts):
        picks = [rng.choice(pools[k], size=min(n, len(pools[k])), replace=False)
                 for k, n in enumerate(row) if n > 0]
        cells = rng.permutation(np.concatenate(picks)) if picks else np.zeros(0, dtype=int)
        rows.append(np.full(len(cells), i))
        cols.append(cells)
        vals.append(np.arange(len(cells), 0, -1, dtype=float))
    return sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(counts), len(codes)),
    )


def recall_of(spatial, reference, weights) -> float:
    spatial.obsm["benchmark_weights"] = weights
    return member_recall(spatial, reference, key="benchmark_weights")["recall"]


def count_errors(est: np.ndarray, truth: pd.DataFrame) -> tuple[float, float]:
    """Cells per type (MAE over spots × types) and cells per spot (MAE over spots)."""
    frame = pd.DataFrame(est, index=truth.index, columns=truth.columns)
    total = float(np.abs(est.sum(axis=1) - truth.to_numpy().sum(axis=1)).mean())
    return count_error(frame, truth), total


def evaluate(spatial, reference, *, recall: bool) -> list[dict]:
    # warm-up on a copy: JIT compilation of the compiled kernels is not timed
    warm = spatial.copy()
    spotlens.deconv.deconvolve(warm, reference, progress=False)
    spotlens.deconv.cell_level(warm, reference, progress=False)
    t0 = time.perf_counter()
    spotlens.deconv.deconvolve(spatial, reference, progress=False)
    t1 = time.perf_counter()
    spotlens.deconv.cell_level(spatial, reference, progress=False)
    t2 = time.perf_counter()
    types = pd.Index(spatial.obsm["cell_counts_spotlens"].columns)
    truth = spatial.obsm["true_cell_counts"][types]
    codes = types.get_indexer(reference.obs["cell_type"].astype(str))
    abundance = np.nan_to_num(spatial.obsm["abundance_spotlens"][types].to_numpy())
    props = np.nan_to_num(spatial.obsm["proportions_spotlens"][types].to_numpy())
    total = np.round(abundance.sum(axis=1))
    rows = []

    est = spatial.obsm["cell_counts_spotlens"].to_numpy()
    row = {"method": "spotlens cell level", "seconds (type + cell level)":
           f"{t1 - t0:.1f} + {t2 - t1:.1f}"}
    row["count MAE per type"], row["total cells MAE"] = count_errors(est, truth)
    if recall:
        row["member recall"] = member_recall(spatial, reference)["recall"]
    rows.append(row)
    rows.append(dict(BEFORE["full" if recall else "held-out"]))

    base_a = largest_remainder(abundance, total)
    res_a, res_b, cnt_b = [], [], []
    for seed in range(N_SEEDS):
        rng = np.random.default_rng(seed)
        draws = np.stack([rng.multinomial(int(t), p / p.sum()) if p.sum() > 0 else
                          np.zeros(len(p), dtype=int) for t, p in zip(total, props, strict=True)])
        cnt_b.append(count_errors(draws, truth))
        if recall:
            res_a.append(recall_of(spatial, reference, baseline_weights(base_a, codes, rng)))
            res_b.append(recall_of(spatial, reference, baseline_weights(draws, codes, rng)))
    row = {"method": "baseline: random cells of the estimated types",
           "seconds (type + cell level)": ""}
    row["count MAE per type"], row["total cells MAE"] = count_errors(base_a, truth)
    if recall:
        row["member recall"] = float(np.mean(res_a))
    rows.append(row)
    row = {"method": "baseline: cells sampled by type proportions",
           "seconds (type + cell level)": ""}
    row["count MAE per type"] = float(np.mean([c[0] for c in cnt_b]))
    row["total cells MAE"] = float(np.mean([c[1] for c in cnt_b]))
    if recall:
        row["member recall"] = float(np.mean(res_b))
    rows.append(row)
    return rows


def main() -> int:
    out = HERE / "results" / "cell_level_osmfish.md"
    tables = []
    for label, loader, recall in (
        ("full (reference = the spots' cells)", spotlens.datasets.osmfish_cortex, True),
        ("held-out (left-half reference, right-half spots)", spotlens.datasets.osmfish_heldout,
         False),
    ):
        spatial, reference = loader()
        rows = evaluate(spatial, reference, recall=recall)
        table = pd.DataFrame(rows)
        print(f"\n{label}: {spatial.n_obs} spots, {reference.n_obs} reference cells")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        tables.append(f"## {label}\n\n{spatial.n_obs} spots, {reference.n_obs} reference cells.\n\n"
                      + markdown_table(table))
    text = (
        "# Cell-level deconvolution on osmFISH cortex pseudo-spots\n\n"
        f"Date: {datetime.date.today()} · machine: {machine()} · spotlens {spotlens.__version__}"
        "\n\nCommand: `python benchmarks/cell_level_osmfish.py`\n\n"
        "Member recall: for a spot with n true cells, the fraction of its n highest-weighted "
        "reference cells that truly belong to it (chance level is about n / 4,839). Count MAE: "
        "mean absolute error of cells per type per spot against the truth; total cells MAE: of "
        f"cells per spot. Baselines use the same type-level result, averaged over {N_SEEDS} "
        "seeds. 'before issue 17': the previous candidate search and defaults (numbers from "
        "the results of 2026-11-21). Seconds exclude JIT compilation (a warm-up run first)."
        "\n\n" + "\n\n".join(tables) + "\n"
    )
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
