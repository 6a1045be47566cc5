"""Speed, memory and accuracy of spotlens and FlashDeconv as the number of spots grows.

For each size (default 10k, 100k and 1M spots) one run

1. simulates a Visium HD-like slide with :func:`spotlens.datasets.synthetic` (square grid of
   8 µm bins, about 2 cells and 300 counts per bin, ``--genes`` genes × ``--types`` cell
   types, reference of 50 cells per type, ground truth included) and writes it to h5ad files
   in ``--data-dir`` (kept and reused while the simulation settings are unchanged);
2. runs ``spotlens.deconv.deconvolve`` (library defaults: penalties ``"auto"``; and a fixed
   ``λ_spatial``) and FlashDeconv (``flashdeconv.tl.deconvolve``, its defaults) on the same
   files, each in a fresh subprocess that reads the h5ad files, makes a warm-up call on a tiny
   slide (imports and JIT compilation excluded), resets the RSS high-water mark
   (``/proc/self/clear_refs``) and times the call (wall clock). Peak RSS therefore includes
   the data already in memory ('RSS before');
3. scores both against the same truth: Pearson r over all spot × type entries, and RMSE.

FlashDeconv needs numpy < 2.4, so it runs in its own virtual environment::

    python3 -m venv /tmp/flashvenv
    /tmp/flashvenv/bin/pip install "flashdeconv[io]" "numpy<2.4"

(``--flash-python`` to point elsewhere). Without it those rows are skipped, saying so.
Each subprocess is watched: above ``--mem-limit-gb`` RSS or ``--timeout`` seconds it is
stopped and the row records why (the machine is shared).

Usage::

    python benchmarks/scaling.py                       # 10k, 100k, 1M spots
    python benchmarks/scaling.py --sizes 100000 --methods spotlens --profile

Writes ``benchmarks/results/scaling.md`` and ``scaling.csv`` (``--out`` to change). The goal
(issue 5): 1M spots × 2,000 genes × 20 types in under 60 s on 2 cores, peak memory under 8 GB,
faster than FlashDeconv at every size with accuracy at least as good.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import io
import json
import os
import platform
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL_SPOTS, GOAL_SECONDS, GOAL_GB = 1_000_000, 60.0, 8.0
FLASH_PYTHON = "/tmp/flashvenv/bin/python"
FLASH_SETUP = (
    'python3 -m venv /tmp/flashvenv && /tmp/flashvenv/bin/pip install "flashdeconv[io]" '
    '"numpy<2.4"'
)


# --- measurement helpers (stdlib + numpy only: they also run in FlashDeconv's venv) ----------


def _status_kb(field: str, pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _PeakTracer:
    """Sample RSS every ``interval`` s in a thread; keep the main thread's stack at the peak."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.interval, self.peak_kb, self.stack = interval, 0.0, []
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import traceback

        while not self._stop.is_set():
            rss = _status_kb("VmRSS") or 0.0
            if rss > self.peak_kb:
                frame = sys._current_frames().get(self._main)
                self.peak_kb = rss
                self.stack = [
                    f"{Path(f.filename).name}:{f.lineno} {f.name}"
                    for f in traceback.extract_stack(frame)
                ][-10:] if frame is not None else []
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _score(est, truth) -> dict:
    """Pearson r over all spot × type entries and RMSE; ``est``/``truth`` are DataFrames."""
    e = est.loc[truth.index, truth.columns].to_numpy(dtype=np.float64)
    t = truth.to_numpy(dtype=np.float64)
    ok = np.isfinite(e) & np.isfinite(t)
    return {
        "pearson_r": round(float(np.corrcoef(e[ok], t[ok])[0, 1]), 4),
        "rmse": round(float(np.sqrt(np.mean((e[ok] - t[ok]) ** 2))), 4),
        "nan_spots": int((~np.isfinite(e)).any(axis=1).sum()),
    }


def _timed(call, *, profile: bool = False, profile_top: int = 20) -> dict:
    """Run ``call()`` after a GC and a reset of the RSS high-water mark; time and peak."""
    gc.collect()
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak()
    load = os.getloadavg()[0]
    profiler = cProfile.Profile() if profile else None
    tracer = _PeakTracer() if profile else None
    t0 = time.perf_counter()
    if profiler:
        tracer.__enter__()
        profiler.enable()
    value = call()
    if profiler:
        profiler.disable()
        tracer.__exit__()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if reset else None
    out = {
        "value": value,
        "seconds": round(seconds, 2),
        "rss_before_gb": None if rss_before is None else round(rss_before / 1e6, 3),
        "peak_rss_gb": None if peak is None else round(peak / 1e6, 3),
        "max_rss_process_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "load_avg_1min": round(load, 2),
    }
    if profiler:
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.sort_stats("cumulative").print_stats(r"spotlens", profile_top)
        stats.sort_stats("tottime").print_stats(profile_top)
        buf.write(f"RSS peak {tracer.peak_kb / 1e6:.2f} GB (sampled every 20 ms) at:\n  ")
        buf.write("\n  ".join(tracer.stack) + "\n")
        out["profile"] = buf.getvalue()
    return out


def _parse_lambda(value: str) -> float | str:
    return value if value == "auto" else float(value)


# --- subprocess: simulate and write one size ----------------------------------------------------


def _sim_params(args: argparse.Namespace) -> dict:
    return {
        "n_genes": args.genes, "n_types": args.types, "seed": args.seed,
        "cells_per_spot": args.cells_per_spot, "counts_per_cell": args.counts_per_cell,
        "grid": "square", "spacing_um": 8.0, "n_cells_per_type": 50,
    }


def _data_paths(args: argparse.Namespace, n: int) -> tuple[Path, Path, Path]:
    p = _sim_params(args)
    stem = (f"synthetic_{n}_{p['n_genes']}g_{p['n_types']}t_c{p['cells_per_spot']:g}"
            f"_l{p['counts_per_cell']:g}_s{p['seed']}")
    d = Path(args.data_dir)
    return d / f"{stem}_spatial.h5ad", d / f"{stem}_reference.h5ad", d / f"{stem}.json"


def make_data(args: argparse.Namespace) -> dict:
    import spotlens.datasets as datasets

    p = _sim_params(args)
    t0 = time.perf_counter()
    spatial, reference = datasets.synthetic(
        args.n_spots, p["n_genes"], p["n_types"], seed=p["seed"],
        cells_per_spot=p["cells_per_spot"], counts_per_cell=p["counts_per_cell"],
        grid=p["grid"], spacing_um=p["spacing_um"], n_cells_per_type=p["n_cells_per_type"],
        n_jobs=None,
    )
    seconds = time.perf_counter() - t0
    counts = spatial.X
    info = {
        "n_spots": args.n_spots, **p,
        "simulate_seconds": round(seconds, 1),
        "simulate_peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "counts_per_spot": round(float(counts.sum()) / args.n_spots, 1),
        "nonzero_per_spot": round(counts.nnz / args.n_spots, 1),
        "matrix_gb": round((counts.data.nbytes + counts.indices.nbytes
                            + counts.indptr.nbytes) / 1e9, 2),
    }
    spatial_path, ref_path, info_path = _data_paths(args, args.n_spots)
    spatial_path.parent.mkdir(parents=True, exist_ok=True)
    spatial.uns.pop("synthetic", None)  # params are in the sidecar json
    spatial.write_h5ad(spatial_path)
    reference.write_h5ad(ref_path)
    info_path.write_text(json.dumps(info))
    return info


# --- subprocess: one method, one size -----------------------------------------------------------


def spotlens_worker(args: argparse.Namespace) -> dict:
    import anndata as ad

    import spotlens.datasets as datasets
    from spotlens.deconv import deconvolve

    spatial_path, ref_path, _ = _data_paths(args, args.n_spots)
    setting, _, mode = args.setting.partition(":")
    backed = args.backed or mode == "backed"
    lam_s = _parse_lambda(setting)
    kwargs = {"lambda_spatial": lam_s, "lambda_ridge": "auto" if lam_s == "auto" else 0.0}
    if args.device != "cpu":
        kwargs["device"] = args.device
    tiny, tiny_ref = datasets.synthetic(300, 200, args.types, seed=args.seed + 1)
    deconvolve(tiny, tiny_ref, inplace=False, progress=False, **kwargs)
    del tiny, tiny_ref
    spatial = ad.read_h5ad(spatial_path, backed="r" if backed else None)
    reference = ad.read_h5ad(ref_path)
    truth = spatial.obsm["true_proportions"]
    res = _timed(
        lambda: deconvolve(spatial, reference, inplace=False, progress=False, **kwargs),
        profile=args.profile, profile_top=args.profile_top,
    )
    result = res.pop("value")
    params = result.uns.get("params", {})
    return {
        **res, **_score(result.proportions, truth),
        "lambda_ridge": params.get("lambda_ridge"),
        "lambda_spatial": params.get("lambda_spatial"),
        "iterations": params.get("n_sweeps"), "converged": params.get("converged"),
    }


def flash_worker(args: argparse.Namespace) -> dict:
    import anndata as ad
    import flashdeconv as fd

    spatial_path, ref_path, _ = _data_paths(args, args.n_spots)
    reference = ad.read_h5ad(ref_path)
    spatial = ad.read_h5ad(spatial_path)
    truth = spatial.obsm.pop("true_proportions")
    tiny = spatial[:300].copy()  # warm-up: numba compilation stays out of the timing
    fd.tl.deconvolve(tiny, reference, cell_type_key="cell_type")
    del tiny
    res = _timed(lambda: fd.tl.deconvolve(spatial, reference, cell_type_key="cell_type"))
    res.pop("value")
    params = spatial.uns.get("flashdeconv_params", {})
    return {
        **res, **_score(spatial.obsm["flashdeconv"], truth),
        "lambda_spatial": params.get("lambda_spatial"),
        "iterations": params.get("n_iterations"), "converged": params.get("converged"),
        "version": fd.__version__,
    }


# --- parent: run the grid, print and write the tables -----------------------------------------


def _watch(cmd: list[str], *, timeout: float, mem_limit_gb: float) -> tuple[dict | None, str]:
    """Run ``cmd``; stop it above ``mem_limit_gb`` RSS or after ``timeout`` s.

    Returns the last JSON line it printed (or None) and an error string ('' if none).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, peak, error = time.perf_counter(), 0.0, ""
    while proc.poll() is None:
        rss = (_status_kb("VmRSS", proc.pid) or 0.0) / 1e6
        peak = max(peak, rss)
        if rss > mem_limit_gb:
            error = (f"stopped at {rss:.1f} GB RSS after {time.perf_counter() - t0:.0f} s "
                     f"(limit {mem_limit_gb:g} GB on this shared machine)")
        elif time.perf_counter() - t0 > timeout:
            error = f"stopped after {timeout:.0f} s (timeout)"
        if error:
            proc.kill()
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if error:
        return None, error
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return None, f"exit {proc.returncode}: {' | '.join(tail)}"
    return json.loads(lines[-1]), ""


def _common_args(args: argparse.Namespace, n: int) -> list[str]:
    return [
        str(Path(__file__).resolve()), "--n-spots", str(n), "--genes", str(args.genes),
        "--types", str(args.types), "--seed", str(args.seed),
        "--cells-per-spot", str(args.cells_per_spot),
        "--counts-per-cell", str(args.counts_per_cell), "--data-dir", args.data_dir,
    ]


def _ensure_data(args: argparse.Namespace, n: int) -> tuple[dict | None, str]:
    spatial_path, ref_path, info_path = _data_paths(args, n)
    if spatial_path.exists() and ref_path.exists() and info_path.exists() and not args.regenerate:
        return json.loads(info_path.read_text()), ""
    cmd = [sys.executable, *_common_args(args, n), "--make-data"]
    return _watch(cmd, timeout=args.timeout, mem_limit_gb=args.mem_limit_gb)


def _run(args: argparse.Namespace, n: int, method: str, setting: str) -> dict:
    row = {"n_spots": n, "method": method, "setting": setting}
    if method == "flashdeconv":
        if not Path(args.flash_python).exists():
            return {**row, "error": f"skipped: no {args.flash_python} (make it: {FLASH_SETUP})"}
        cmd = [args.flash_python, *_common_args(args, n), "--worker", "flashdeconv"]
    else:
        cmd = [sys.executable, *_common_args(args, n), "--worker", "spotlens",
               "--setting", setting, "--device", args.device,
               "--profile-top", str(args.profile_top)]
        cmd += ["--profile"] if args.profile else []
        cmd += ["--backed"] if args.backed else []
    out, error = _watch(cmd, timeout=args.timeout, mem_limit_gb=args.mem_limit_gb)
    return {**row, **(out or {}), **({"error": error} if error else {})}


COLUMNS = [
    ("n_spots", "spots"), ("method", "method"), ("setting", "λ_spatial arg"),
    ("lambda_ridge", "λ_ridge used"), ("lambda_spatial", "λ_spatial used"),
    ("iterations", "sweeps / iterations"), ("seconds", "seconds"),
    ("peak_rss_gb", "peak RSS GB"), ("rss_before_gb", "RSS before GB"),
    ("pearson_r", "Pearson r"), ("rmse", "RMSE"), ("load_avg_1min", "load avg"),
]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---:" if i not in (1,) else ":---" for i in range(len(COLUMNS))) + "|"
    body = []
    for r in rows:
        if "error" in r:
            body.append(f"| {r['n_spots']:,} | {r['method']} | {r['setting']} | "
                        f"{r['error']} |" + " |" * (len(COLUMNS) - 4))
            continue
        body.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join([head, sep, *body])


def _side_by_side(rows: list[dict], sizes: list[int], settings: list[str]) -> str:
    ok = {(r["n_spots"], r["method"], r["setting"]): r for r in rows if "error" not in r}
    err = {(r["n_spots"], r["method"], r["setting"]): r["error"] for r in rows if "error" in r}
    runs = [("spotlens", s) for s in settings] + [("flashdeconv", "auto")]
    head = "| spots | " + " | ".join(
        f"{m if m == 'flashdeconv' else 'spotlens'}{'' if m == 'flashdeconv' else f' λ={s}'}"
        " s / GB / r / RMSE" for m, s in runs
    ) + " | FlashDeconv ÷ spotlens (auto) time |"
    sep = "|---:|" + "---:|" * (len(runs) + 1)
    body = []
    for n in sizes:
        cells = []
        for key in ((n, m, s) for m, s in runs):
            r = ok.get(key)
            if r is None:
                cells.append("not run" if key not in err else err[key].split(":")[0])
            else:
                cells.append(f"{r['seconds']:.1f} / {r['peak_rss_gb']:.2f} / "
                             f"{r['pearson_r']:.3f} / {r['rmse']:.3f}")
        a, f = ok.get((n, "spotlens", "auto")), ok.get((n, "flashdeconv", "auto"))
        ratio = f"{f['seconds'] / a['seconds']:.1f}×" if a and f else "–"
        body.append(f"| {n:,} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join([head, sep, *body])


def _goal_notes(rows: list[dict]) -> list[str]:
    notes = []
    for r in rows:
        if r["n_spots"] != GOAL_SPOTS or r["method"] != "spotlens" or "error" in r:
            continue
        fast, lean = r["seconds"] < GOAL_SECONDS, (r["peak_rss_gb"] or 1e9) < GOAL_GB
        verdict = "meets" if fast and lean else "misses"
        notes.append(
            f"- spotlens λ_spatial={r['setting']}: {GOAL_SPOTS:,} spots in {r['seconds']:.1f} s, "
            f"peak {r['peak_rss_gb']:.2f} GB — {verdict} the goal ({GOAL_SECONDS:.0f} s, "
            f"{GOAL_GB:.0f} GB) at load average {r['load_avg_1min']}"
        )
    for n in sorted({r["n_spots"] for r in rows}):
        a = next((r for r in rows if r["n_spots"] == n and r["method"] == "spotlens"
                  and r["setting"] == "auto" and "error" not in r), None)
        f = next((r for r in rows if r["n_spots"] == n and r["method"] == "flashdeconv"
                  and "error" not in r), None)
        if a and f:
            faster = "faster" if a["seconds"] < f["seconds"] else "slower"
            acc = "at least as accurate" if a["pearson_r"] >= f["pearson_r"] and \
                a["rmse"] <= f["rmse"] else "less accurate"
            notes.append(
                f"- {n:,} spots: spotlens (auto) {a['seconds']:.1f} s vs FlashDeconv "
                f"{f['seconds']:.1f} s — {faster}; r {a['pearson_r']:.3f} vs {f['pearson_r']:.3f}, "
                f"RMSE {a['rmse']:.3f} vs {f['rmse']:.3f} — {acc}"
            )
    return notes


def _commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        used = ["src/spotlens/deconv", "src/spotlens/datasets", "src/spotlens/pp",
                "src/spotlens/_validation.py"]  # what the benchmark runs
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", *used],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return commit + (" + uncommitted changes in " + ", ".join(used) if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parent(args: argparse.Namespace) -> None:
    import scipy
    from _machine import machine  # benchmarks/_machine.py (the script's folder)

    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    started = dt.datetime.now().astimezone()
    flash_version = None
    rows, data = [], {}
    for n in args.sizes:
        info, error = _ensure_data(args, n)
        if error:
            print(f"{n:,} spots: simulation failed: {error}", flush=True)
            rows += [{"n_spots": n, "method": m, "setting": "–", "error": f"no data: {error}"}
                     for m in args.methods]
            continue
        data[n] = info
        print(json.dumps({"data": info}), flush=True)
        for method in args.methods:
            settings = args.lambda_spatial if method == "spotlens" else ["auto"]
            for setting in settings:
                row = _run(args, n, method, setting)
                flash_version = row.pop("version", flash_version)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    table = _table(rows)
    summary = _side_by_side(rows, args.sizes, args.lambda_spatial)
    notes = _goal_notes(rows)
    print()
    print(summary)
    print()
    print(table)
    print("\n".join(notes))

    p = _sim_params(args)
    data_lines = [
        f"  - {n:,} spots: {d['counts_per_spot']:,.0f} counts and {d['nonzero_per_spot']:,.0f} "
        f"non-zero genes per spot, CSR {d['matrix_gb']} GB; simulated in "
        f"{d['simulate_seconds']} s (peak {d['simulate_peak_gb']} GB)"
        for n, d in data.items()
    ]
    lines = [
        "# Scaling: spotlens and FlashDeconv on the same simulated slides",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M %Z}",
        f"- Machine: {machine()}; Python {platform.python_version()}, NumPy {np.__version__}, "
        f"SciPy {scipy.__version__}",
        f"- Code: spotlens git {_commit()}; FlashDeconv {flash_version or 'not run'} "
        f"(`{args.flash_python}`, its defaults: `flashdeconv.tl.deconvolve(spatial, reference, "
        "cell_type_key='cell_type')`)",
        f"- Command: `{command}`",
        f"- Data: `spotlens.datasets.synthetic(n_spots, {p['n_genes']}, {p['n_types']}, "
        f"cells_per_spot={p['cells_per_spot']:g}, counts_per_cell={p['counts_per_cell']:g}, "
        f"grid='square', spacing_um=8, seed={p['seed']})`: a Visium HD-like slide of 8 µm bins "
        f"with spatially coherent composition; reference of {p['n_cells_per_type']} cells per "
        "type drawn from the same profiles. Both methods read the same h5ad files and are "
        "scored against the same `obsm['true_proportions']`.",
        *data_lines,
        "- Timing: wall seconds of the deconvolution call only (reading and simulating "
        "excluded), one run per row, each in a fresh process after a warm-up call on a tiny "
        "slide (imports and JIT compilation excluded). Peak RSS: the process's high-water mark "
        "during the call, reset just before it, so it includes the data already in memory "
        "('RSS before'). Accuracy: Pearson r over all spot × type entries and RMSE against the "
        "truth.",
        "- spotlens: `auto` is the library default (both penalties chosen by count-splitting "
        "cross-validation on a patch of at most `cv_max_spots` = 5,000 spots); a number fixes "
        "λ_spatial with λ_ridge = 0 (no cross-validation). `:backed`: the slide is opened with "
        "`anndata.read_h5ad(..., backed='r')`, so its counts stay on disk and `deconvolve` reads "
        "them in chunks of rows, keeping only the genes it uses.",
        "- 'load avg' is the 1-minute load average when the call started: above the core count "
        "(2), other work shared the machine and times are inflated.",
        "",
        "## Side by side (seconds / peak RSS GB / Pearson r / RMSE)",
        "",
        summary,
        "",
        *notes,
        "",
        "## All runs",
        "",
        table,
        "",
    ]
    profiles = [r for r in rows if r.get("profile")]
    if profiles:
        lines += ["## Profiles (cProfile)", ""]
        for r in profiles:
            lines += [f"### {r['n_spots']:,} spots, λ_spatial={r['setting']}", "", "```",
                      r["profile"].strip(), "```", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text("\n".join(lines))
    import csv

    keys = [k for k, _ in COLUMNS] + ["converged", "nan_spots", "max_rss_process_gb", "error"]
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out / 'scaling.md'} and {out / 'scaling.csv'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--methods", nargs="+", default=["spotlens", "flashdeconv"],
                   choices=["spotlens", "flashdeconv"])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--types", type=int, default=20)
    p.add_argument("--cells-per-spot", type=float, default=2.0)
    p.add_argument("--counts-per-cell", type=float, default=150.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lambda-spatial", nargs="+", default=["auto", "0.1", "auto:backed"],
                   help="spotlens settings: numbers and/or 'auto'; ':backed' reads the slide "
                   "with backed='r' (default: auto 0.1 auto:backed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backed", action="store_true",
                   help="spotlens reads the slide with backed='r' (counts read in chunks)")
    p.add_argument("--flash-python", default=FLASH_PYTHON)
    p.add_argument("--data-dir", default="/tmp/spotlens_scaling_data")
    p.add_argument("--regenerate", action="store_true", help="simulate even if files exist")
    p.add_argument("--profile", action="store_true",
                   help="cProfile each spotlens call and record where RSS peaks")
    p.add_argument("--profile-top", type=int, default=20)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    p.add_argument("--mem-limit-gb", type=float, default=12.0,
                   help="stop a subprocess above this RSS (the machine is shared)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--make-data", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=["spotlens", "flashdeconv"], help=argparse.SUPPRESS)
    p.add_argument("--setting", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--n-spots", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_data:
        print(json.dumps(make_data(args)), flush=True)
        return
    if args.worker:
        work = spotlens_worker if args.worker == "spotlens" else flash_worker
        print(json.dumps(work(args)), flush=True)
        return
    for v in args.lambda_spatial:
        value, _, mode = v.partition(":")
        if value != "auto":
            float(value)
        if mode not in ("", "backed"):
            p.error(f"unknown mode {mode!r} in --lambda-spatial {v!r} (only ':backed')")
    parent(args)


if __name__ == "__main__":
    main()
