"""Speed, memory and accuracy of ``spotlens.deconv.deconvolve`` as the number of spots grows.

Each (size, penalty) run happens in its own subprocess, which

1. simulates ``n_spots`` spots × ``--genes`` genes × ``--types`` cell types with
   :func:`spotlens.datasets.synthetic` (ground truth included),
2. resets the process's RSS high-water mark (``/proc/self/clear_refs``), so the memory reported
   is that of ``deconvolve`` with the data already in memory, not of the simulation,
3. times ``deconvolve(spatial, reference, inplace=False, progress=False, ...)`` (wall clock),
4. scores the proportions against the truth (Pearson r over all spot × type entries, RMSE).

A numeric ``--lambda-spatial`` fixes both penalties (``lambda_ridge=--lambda-ridge``), so no
cross-validation runs; ``auto`` uses the library defaults (both penalties cross-validated).

Usage::

    python benchmarks/scaling.py                       # 1k, 10k, 100k spots; λ_spatial 0.1 and auto
    python benchmarks/scaling.py --sizes 1000 10000 --lambda-spatial 0.1 --profile

Writes ``benchmarks/results/scaling.md`` and ``scaling.csv`` (``--out`` to change). The goal
(from the issue): time linear in spots, 100k spots in under 60 s on 2 cores.
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
GOAL_SPOTS, GOAL_SECONDS = 100_000, 60.0


# --- measurement helpers ------------------------------------------------------------------------


def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
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


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def _parse_lambda(value: str) -> float | str:
    return value if value == "auto" else float(value)


# --- worker: one size, one setting ------------------------------------------------------------


def worker(args: argparse.Namespace) -> dict:
    import spotlens.datasets as datasets
    from spotlens.deconv import deconvolve

    t0 = time.perf_counter()
    spatial, reference = datasets.synthetic(
        args.n_spots, args.genes, args.types, seed=args.seed, n_jobs=None
    )
    t_gen = time.perf_counter() - t0
    truth = spatial.obsm["true_proportions"]

    lam_s = _parse_lambda(args.lambda_spatial)
    kwargs = {
        "lambda_spatial": lam_s,
        "lambda_ridge": "auto" if lam_s == "auto" else args.lambda_ridge,
    }
    if args.device != "cpu":
        kwargs["device"] = args.device
    # warm-up on a tiny problem: lazy imports and first-call costs stay out of the timing
    t0 = time.perf_counter()
    tiny, tiny_ref = datasets.synthetic(200, 200, args.types, seed=args.seed + 1)
    deconvolve(tiny, tiny_ref, inplace=False, progress=False, **kwargs)
    t_warm = time.perf_counter() - t0
    del tiny, tiny_ref
    gc.collect()
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak()
    profiler = cProfile.Profile() if args.profile else None
    tracer = _PeakTracer() if args.profile else None
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    if profiler:
        tracer.__enter__()
        profiler.enable()
    result = deconvolve(spatial, reference, inplace=False, progress=False, **kwargs)
    if profiler:
        profiler.disable()
        tracer.__exit__()
    seconds = time.perf_counter() - t0

    peak = _status_kb("VmHWM") if reset else None
    est = result.proportions.loc[truth.index, truth.columns].to_numpy()
    true = truth.to_numpy()
    params = result.uns.get("params", {})
    out = {
        "n_spots": args.n_spots,
        "n_genes": args.genes,
        "n_types": args.types,
        "setting": args.lambda_spatial,
        "lambda_ridge": params.get("lambda_ridge"),
        "lambda_spatial": params.get("lambda_spatial"),
        "n_sweeps": params.get("n_sweeps"),
        "converged": params.get("converged"),
        "seconds": round(seconds, 2),
        "generate_seconds": round(t_gen, 2),
        "warmup_seconds": round(t_warm, 2),
        "rss_before_gb": None if rss_before is None else round(rss_before / 1e6, 3),
        "peak_rss_gb": None if peak is None else round(peak / 1e6, 3),
        "max_rss_process_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "pearson_r": round(_pearson(est.ravel(), true.ravel()), 4),
        "rmse": round(float(np.sqrt(np.nanmean((est - true) ** 2))), 4),
        "load_avg_1min": round(load, 2),
    }
    if profiler:
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.sort_stats("cumulative").print_stats(r"spotlens", args.profile_top)
        stats.sort_stats("tottime").print_stats(args.profile_top)
        buf.write(f"RSS peak {tracer.peak_kb / 1e6:.2f} GB (sampled every 20 ms) at:\n  ")
        buf.write("\n  ".join(tracer.stack) + "\n")
        out["profile"] = buf.getvalue()
    return out


# --- parent: run the grid, print and write the table ------------------------------------------


def _machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem_gb = round(float(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    import numpy
    import scipy

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        commit += " + uncommitted changes in src/" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": model, "cores": cores, "ram_gb": mem_gb, "python": platform.python_version(),
        "numpy": numpy.__version__, "scipy": scipy.__version__, "commit": commit,
    }


def _run_one(args: argparse.Namespace, n: int, setting: str) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--n-spots", str(n),
        "--genes", str(args.genes), "--types", str(args.types), "--seed", str(args.seed),
        "--lambda-spatial", setting, "--lambda-ridge", str(args.lambda_ridge),
        "--device", args.device, "--profile-top", str(args.profile_top),
    ]
    if args.profile:
        cmd.append("--profile")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"n_spots": n, "setting": setting, "error": f"timeout after {args.timeout} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        error = f"exit {proc.returncode}: {' | '.join(tail)}"
        return {"n_spots": n, "setting": setting, "error": error}
    return json.loads(lines[-1])


COLUMNS = [
    ("n_spots", "spots"), ("setting", "λ_spatial arg"), ("lambda_ridge", "λ_ridge used"),
    ("lambda_spatial", "λ_spatial used"), ("n_sweeps", "sweeps"), ("seconds", "deconvolve s"),
    ("s_per_1k", "s / 1k spots"), ("peak_rss_gb", "peak RSS GB"),
    ("rss_before_gb", "RSS before GB"), ("pearson_r", "Pearson r"), ("rmse", "RMSE"),
    ("generate_seconds", "simulate s"), ("load_avg_1min", "load avg"),
]


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    body = []
    for r in rows:
        if "error" in r:
            body.append(f"| {r['n_spots']:,} | {r['setting']} | error: {r['error']} |")
            continue
        r = {**r, "s_per_1k": r["seconds"] / r["n_spots"] * 1000}
        body.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join([head, sep, *body])


def _scaling_notes(rows: list[dict]) -> list[str]:
    notes = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        ok = sorted((r for r in rows if r["setting"] == setting and "error" not in r),
                    key=lambda r: r["n_spots"])
        for a, b in zip(ok[:-1], ok[1:], strict=True):
            slope = np.log(b["seconds"] / a["seconds"]) / np.log(b["n_spots"] / a["n_spots"])
            notes.append(
                f"- λ_spatial={setting}: {a['n_spots']:,} → {b['n_spots']:,} spots, time × "
                f"{b['seconds'] / a['seconds']:.1f} for spots × {b['n_spots'] / a['n_spots']:.0f} "
                f"(exponent {slope:.2f}; 1 = linear)"
            )
        goal = [r for r in ok if r["n_spots"] == GOAL_SPOTS]
        if goal:
            s = goal[0]["seconds"]
            verdict = "meets" if s < GOAL_SECONDS else "misses"
            notes.append(
                f"- λ_spatial={setting}: {GOAL_SPOTS:,} spots in {s:.1f} s — {verdict} the "
                f"{GOAL_SECONDS:.0f} s goal"
            )
    return notes


def parent(args: argparse.Namespace) -> None:
    machine = _machine()
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    started = dt.datetime.now().astimezone()
    rows = []
    for setting in args.lambda_spatial_list:
        for n in args.sizes:
            row = _run_one(args, n, setting)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "profile"}
            print(json.dumps(shown), flush=True)
    table = _table(rows)
    notes = _scaling_notes(rows)
    print()
    print(table)
    print("\n".join(notes))

    lines = [
        "# Scaling of `spotlens.deconv.deconvolve` with the number of spots",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M %Z}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gb']} GB RAM; "
        f"Python {machine['python']}, NumPy {machine['numpy']}, SciPy {machine['scipy']}",
        f"- Code: git {machine['commit']}",
        f"- Command: `{command}`",
        f"- Data: `spotlens.datasets.synthetic(n_spots, {args.genes}, {args.types}, "
        f"seed={args.seed})` (hexagonal grid 100 µm apart, ~8 cells and ~4,000 counts per spot, "
        f"reference of 50 cells per type).",
        "- Timing: wall seconds of the `deconvolve` call only (simulation excluded), one run per "
        "row, each in a fresh process after a warm-up call on 200 spots (imports and first-call "
        "costs excluded). Peak RSS: the process's high-water mark during "
        "`deconvolve` (reset after simulating, so it includes the data already in memory: "
        "'RSS before'). Accuracy: Pearson r over all spot × type entries and RMSE against "
        "`obsm['true_proportions']`.",
        f"- A numeric λ_spatial fixes both penalties (λ_ridge = {args.lambda_ridge}, no "
        "cross-validation); `auto` is the library default (both cross-validated).",
        "- 'load avg' is the 1-minute load average when the call started: above the core "
        "count, other work shared the machine and times are inflated.",
        "",
        table,
        "",
        *notes,
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

    keys = [k for k, _ in COLUMNS if k != "s_per_1k"]
    keys += ["converged", "warmup_seconds", "max_rss_process_gb", "error"]
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out / 'scaling.md'} and {out / 'scaling.csv'}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--types", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lambda-spatial", nargs="+", default=["0.1", "auto"],
                   help="values to run: numbers and/or 'auto' (default: 0.1 auto)")
    p.add_argument("--lambda-ridge", type=float, default=0.0,
                   help="ridge used with a numeric λ_spatial (default 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true",
                   help="cProfile each deconvolve call and record where RSS peaks")
    p.add_argument("--profile-top", type=int, default=20)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n-spots", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.lambda_spatial = args.lambda_spatial[0]
        print(json.dumps(worker(args)), flush=True)
        return
    for v in args.lambda_spatial:
        if v != "auto":
            float(v)
    args.lambda_spatial_list = args.lambda_spatial
    parent(args)


if __name__ == "__main__":
    main()
