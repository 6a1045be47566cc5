"""Time and peak memory of the cell level on Visium HD-sized slides, next to the type level.

For each size (default 10k and 100k bins; ``--sizes 10000 100000 1000000`` for the goal):

1. a 100,000-cell reference (20 types × 5,000 cells, 2,000 genes) and the bins are simulated
   with :func:`spotlens.datasets.synthetic` (square grid of 8 µm bins, about 2 cells and 300
   counts per bin, negative-binomial counts, spatially coherent composition). The reference
   is drawn once (``n_cells_per_type=5000`` on a small slide) and the bins of each size
   separately (``n_cells_per_type=1``): the factory draws the spots independently of the
   reference cells, so both come from the same type profiles. Cells of one type differ only
   by library size and counting noise (no sub-states): the bins' cells are **not** reference
   cells, so only the counts per type can be scored, not which cells were found;
2. ``spotlens.deconv.deconvolve`` (library defaults) then ``spotlens.deconv.cell_level``
   (library defaults) run on them in this process after a warm-up call on a tiny slide
   (imports and JIT compilation excluded). Each call is timed (wall clock) after a reset of
   the RSS high-water mark (``/proc/self/clear_refs``), so the peak includes the data already
   in memory.

The goal (issue 17): linear in the number of bins, 100k bins under 60 s and 1M under 10 minutes
for the cell level, peak memory under 8 GB, on 2 cores. The load average is recorded: the
machine may be shared, which inflates times.

Usage::

    python benchmarks/cell_level_scaling.py                       # 10k and 100k bins
    python benchmarks/cell_level_scaling.py --sizes 10000 100000 1000000

Writes ``benchmarks/results/cell_level_scaling.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import time
from pathlib import Path

import pandas as pd

import spotlens
from spotlens.metrics import count_error

from _machine import machine, markdown_table, write_atomic  # benchmarks/_machine.py

HERE = Path(__file__).resolve().parent
SIM = {"n_genes": 2000, "n_types": 20, "cells_per_spot": 2.0, "counts_per_cell": 150.0,
       "grid": "square", "spacing_um": 8.0, "seed": 0}
GOAL = {100_000: 60.0, 1_000_000: 600.0}


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _timed(call) -> dict:
    """Wall seconds and peak RSS (GB) of ``call()``, the high-water mark reset just before."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    load = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    call()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = _status_kb("VmHWM") if reset else None
    return {"seconds": seconds, "cpu": cpu, "peak_gb": peak / 2**20 if peak else float("nan"),
            "load": load}


def reference(cells_per_type: int):
    _, ref = spotlens.datasets.synthetic(100, n_cells_per_type=cells_per_type, **SIM)
    return ref


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--cells-per-type", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cell_level_scaling.md")
    args = parser.parse_args()

    t0 = time.perf_counter()
    ref = reference(args.cells_per_type)
    print(f"reference: {ref.n_obs} cells × {ref.n_vars} genes, "
          f"{ref.X.nnz / ref.n_obs:.0f} non-zero genes per cell "
          f"(simulated in {time.perf_counter() - t0:.0f} s)", flush=True)

    # warm-up: imports and JIT compilation
    warm, _ = spotlens.datasets.synthetic(200, n_cells_per_type=1, **SIM)
    spotlens.deconv.deconvolve(warm, ref[::50].copy(), progress=False)
    spotlens.deconv.cell_level(warm, ref[::50].copy(), progress=False)

    rows = []
    for n in args.sizes:
        t0 = time.perf_counter()
        st, _ = spotlens.datasets.synthetic(n, n_cells_per_type=1, **SIM)
        print(f"\n{n:,} bins: {st.X.sum() / n:.0f} counts per bin, "
              f"{st.obs['n_cells'].mean():.2f} cells per bin "
              f"(simulated in {time.perf_counter() - t0:.0f} s)", flush=True)
        typ = _timed(lambda st=st: spotlens.deconv.deconvolve(st, ref, progress=False))
        print(f"  type level: {typ['seconds']:.1f} s, peak {typ['peak_gb']:.2f} GB", flush=True)
        cel = _timed(lambda st=st: spotlens.deconv.cell_level(st, ref, progress=False))
        types = st.obsm["cell_counts_spotlens"].columns
        mae = count_error(st.obsm["cell_counts_spotlens"], st.obsm["true_cell_counts"][types])
        per_spot = st.obsm["cell_weights_spotlens"].getnnz(axis=1).mean()
        print(f"  cell level: {cel['seconds']:.1f} s ({1000 * cel['seconds'] / n:.2f} s per "
              f"1,000 bins), peak {cel['peak_gb']:.2f} GB; count MAE per type {mae:.3f}",
              flush=True)
        rows.append({
            "bins": f"{n:,}", "type level s": typ["seconds"], "type level peak GB":
            typ["peak_gb"], "cell level s": cel["seconds"],
            "cell level s per 1,000 bins": 1000 * cel["seconds"] / n,
            "cell level CPU s": cel["cpu"],
            "cell level peak GB": cel["peak_gb"], "cells with weight per bin": per_spot,
            "cells per type MAE": mae, "load avg (type / cell)":
            f"{typ['load']:.1f} / {cel['load']:.1f}",
        })
        del st
        gc.collect()

    table = pd.DataFrame(rows)
    print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    verdicts = []
    for row, n in zip(rows, args.sizes, strict=True):
        if n in GOAL:
            ok = row["cell level s"] < GOAL[n] and row["cell level peak GB"] < 8
            verdicts.append(
                f"- {n:,} bins: cell level {row['cell level s']:.1f} s (goal {GOAL[n]:.0f} s), "
                f"peak {row['cell level peak GB']:.2f} GB (goal 8 GB) — "
                + ("meets the goal" if ok else "misses the goal")
            )
    text = (
        "# Cell level at Visium HD scale\n\n"
        f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- Machine: {machine()}; spotlens {spotlens.__version__}\n"
        f"- Command: `python benchmarks/cell_level_scaling.py --sizes "
        f"{' '.join(map(str, args.sizes))}`\n"
        f"- Reference: {ref.n_obs:,} simulated cells ({SIM['n_types']} types × "
        f"{args.cells_per_type:,}) × {SIM['n_genes']:,} genes, "
        f"`spotlens.datasets.synthetic(100, n_cells_per_type={args.cells_per_type}, "
        f"**{SIM})`; bins: the same call with `n_spots` = bins and `n_cells_per_type=1` "
        "(8 µm bins, about 2 cells and 300 counts each). The bins' cells are not reference "
        "cells and cells of one type differ only by library size and counting noise, so only "
        "cells per type are scored.\n"
        "- Timing: wall seconds of each call with library defaults, in one process after a "
        "warm-up on a tiny slide (imports and JIT compilation excluded); peak RSS: the "
        "high-water mark during the call, reset before it (it includes the data in memory). "
        "'load avg': the 1-minute load average when the call started; above the 2 cores, other "
        "work shared the machine and times are inflated. 'CPU s': CPU seconds of the process "
        "over all its threads (less sensitive to the load; on an idle machine the wall time is "
        "about CPU s / cores where the work is threaded).\n\n"
        + markdown_table(table) + "\n" + "\n".join(verdicts) + "\n"
    )
    write_atomic(args.out, text)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
