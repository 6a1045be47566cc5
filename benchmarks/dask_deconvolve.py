"""``deconvolve(..., client=)`` on a Dask ``LocalCluster`` against the single-machine run.

Written to ``benchmarks/results/dask_deconvolve.md`` (``--out`` names another folder):
simulates ``--spots`` spots × 2,000 genes × 15 types with :func:`spotlens.datasets.synthetic`,
runs ``deconvolve`` on this machine and on a ``--workers``-worker ``LocalCluster`` (worker
processes, one thread each) with the same parameters, and reports wall time, peak memory of
this process (the driver) and of each worker, and the largest difference of proportions.
The halo-width study that set the default ``halo_hops`` is ``benchmarks/studies/dask_halo.py``.

Usage::

    python benchmarks/dask_deconvolve.py                     # 100k spots, 2 workers
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import time
from pathlib import Path

import numpy as np

import spotlens
from spotlens.deconv import deconvolve

HERE = Path(__file__).resolve().parent


def _peak_gb(reset: bool = False) -> float:
    """This process's peak RSS (VmHWM) in GB; ``reset`` first sets it to the current RSS."""
    if reset:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1e6
    return float("nan")


def _max_diff(a, b) -> float:
    return float(np.abs(a.proportions.to_numpy() - b.proportions.to_numpy()).max())


def timing(args, lines: list[str]) -> None:
    from distributed import Client, LocalCluster

    spatial, reference = spotlens.datasets.synthetic(args.spots, 2000, 15, seed=args.seed)
    lines += [
        f"## Timing: {args.spots:,} spots × 2,000 genes × 15 types, {args.workers}-worker "
        "LocalCluster", "",
        "| penalties | tiles | run | seconds | driver peak GB | worker peak GB | tiles × halo "
        "| max abs Δ proportions |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        client.run(_peak_gb, True)
        deconvolve(spatial[:2000].copy(), reference, client=client, progress=False,
                   lambda_spatial=0.1, inplace=False)  # warm the workers (imports, compiled code)
        for lam in args.lambda_spatial:
            fit = dict(progress=False, inplace=False)
            if lam != "auto":
                fit.update(lambda_ridge=0.01, lambda_spatial=float(lam))
            _peak_gb(reset=True)
            t0 = time.perf_counter()
            one = deconvolve(spatial, reference, **fit)
            t_one, mem_one = time.perf_counter() - t0, _peak_gb()
            chosen = (f"auto → λ_s = {one.uns['params']['lambda_spatial']:g}"
                      if lam == "auto" else f"λ_s = {lam}")
            lines.append(f"| {chosen} | – | one machine | {t_one:.1f} | {mem_one:.2f} | – | – "
                         "| – |")
            for tile in args.tile_size:
                size = None if tile == "auto" else float(tile)
                client.run(_peak_gb, True)
                _peak_gb(reset=True)
                t0 = time.perf_counter()
                many = deconvolve(spatial, reference, client=client, tile_size=size, **fit)
                t_many, mem_many = time.perf_counter() - t0, _peak_gb()
                workers = max(client.run(_peak_gb).values())
                tiles = many.uns["tiles"]
                shape = (f"{len(tiles)} × {int(tiles.halo_hops.iloc[0])} hops "
                         f"(+{tiles.n_halo.sum() / spatial.n_obs:.0%} spots)")
                lines.append(f"| {chosen} | {tile} | cluster | {t_many:.1f} | {mem_many:.2f} "
                             f"| {workers:.2f} | {shape} | {_max_diff(one, many):.1e} |")
                print(lines[-1], flush=True)
    lines.append("")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spots", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lambda-spatial", nargs="+", default=["0.1", "auto"])
    p.add_argument("--tile-size", nargs="+", default=["auto", "8000"],
                   help="tile sides in µm ('auto': about 50,000 spots per tile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from _machine import machine

    for part, name in [(timing, "dask_deconvolve.md")]:
        lines = ["# spotlens.deconv.deconvolve on a Dask LocalCluster", "",
                 f"{machine()}, {dt.date.today().isoformat()}, spotlens {spotlens.__version__}, "
                 "`python benchmarks/dask_deconvolve.py`. Same "
                 "parameters on both sides (default `tol=1e-5`, `n_iter=200` for the timing). "
                 "Load average at the start: "
                 + ", ".join(f"{v:.1f}" for v in os.getloadavg()) + ".", ""]
        part(args, lines)
        lines.append("Load average (1, 5, 15 min) at the end: "
                     + ", ".join(f"{v:.1f}" for v in os.getloadavg())
                     + " (other jobs share this machine; timings move with the load).")
        out = Path(args.out) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
