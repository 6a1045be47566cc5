"""How wide must the halo of a tile be? Tiled vs single-machine ``deconvolve`` per halo width.

A one-off study (it set the default ``halo_hops``, ``docs/dask.md``); the result is in
``benchmarks/studies/results/dask_halo_study.md``. On ``--spots`` simulated spots, the largest
difference of proportions between the tiled fit on a one-worker ``LocalCluster`` and the
single-machine fit (both at ``tol=1e-9``, so the solvers' stopping error does not hide the
tiling error) per halo width and ``lambda_spatial``, beside the ``halo_check`` the tiled run
reports. The "default hops" column is the ``halo_hops`` a run with ``halo_hops=None`` used.

Usage::

    python benchmarks/studies/dask_halo.py [--spots 10000] [--tile 2500]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import sys
from pathlib import Path

import numpy as np

import spotlens
from spotlens.deconv import deconvolve

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the shared helper benchmarks/_machine.py, not spotlens
from _machine import machine  # noqa: E402

HOPS = (0, 1, 2, 4, 6, 8, 10, 12, 16, 20, 24)


def _max_diff(a, b) -> float:
    return float(np.abs(a.proportions.to_numpy() - b.proportions.to_numpy()).max())


def halo_study(args, lines: list[str]) -> None:
    from distributed import Client, LocalCluster

    spatial, reference = spotlens.datasets.synthetic(args.spots, 500, 10, seed=2)
    lines += [
        f"## Halo study: {args.spots:,} spots, {args.tile:g} µm tiles, tol=1e-9",
        "", "Largest |Δ proportion| over all spots, tiled vs one machine (in brackets: the "
        "largest `halo_check` the tiled run reported).", "",
        "| λ_spatial | default hops | " + " | ".join(f"{h} hops" for h in HOPS) + " |",
        "|---:|---:|" + "---:|" * len(HOPS),
    ]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        for lam in (0.1, 0.3, 1.0):
            fit = dict(lambda_ridge=0.01, lambda_spatial=lam, progress=False, inplace=False,
                       tol=1e-9, n_iter=20_000)
            one = deconvolve(spatial, reference, **fit)
            default = deconvolve(spatial, reference, client=client, tile_size=args.tile, **fit)
            cells = []
            for h in HOPS:
                many = deconvolve(spatial, reference, client=client, tile_size=args.tile,
                                  halo_hops=h, **fit)
                check = many.uns["tiles"].halo_check.max()
                cells.append(f"{_max_diff(one, many):.1e} ({check:.0e})")
                print(lam, h, cells[-1], flush=True)
            hops = default.uns["params"]["halo_hops"]
            lines.append(f"| {lam} | {hops} | " + " | ".join(cells) + " |")
    lines.append("")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spots", type=int, default=10_000)
    p.add_argument("--tile", type=float, default=2500.0, help="tile side in µm")
    p.add_argument("--out", type=Path, default=HERE / "results" / "dask_halo_study.md")
    args = p.parse_args()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    lines = ["# spotlens.deconv.deconvolve on a Dask LocalCluster: the halo", "",
             f"{machine()}, {dt.date.today().isoformat()}, spotlens {spotlens.__version__}, "
             "`python benchmarks/studies/dask_halo.py`. Load average at the start: "
             + ", ".join(f"{v:.1f}" for v in os.getloadavg()) + ".", ""]
    halo_study(args, lines)
    lines.append("Load average (1, 5, 15 min) at the end: "
                 + ", ".join(f"{v:.1f}" for v in os.getloadavg())
                 + " (other jobs share this machine).")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
