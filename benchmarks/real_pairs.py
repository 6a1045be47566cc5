"""Deconvolve the real spatial/reference pairs that have no ground truth and save their maps.

For each pair in ``../shared/data`` (Slide-seq cerebellum, Visium hippocampus, Visium lymph
node; Cable et al. 2022) this runs :func:`spotlens.deconv.deconvolve` with its defaults, prints
the time, the chosen penalties and the most frequent dominant cell types, and writes
``docs/<pair>_proportions.png``. Without truth, "plausible" is judged from the maps: e.g.
Purkinje and Bergmann cells along the Purkinje layer of the cerebellum, CA1/CA3/dentate layers
in the hippocampus, B-cell follicles and T-cell zones in the lymph node.

Usage::

    python benchmarks/real_pairs.py [--data ../shared/data] [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import spotlens

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs")
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"data folder not found: {args.data}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in spotlens.datasets.PAIRS:
        spatial, reference = spotlens.datasets.load_pair(name, args.data)
        t0 = time.perf_counter()
        spotlens.deconv.deconvolve(spatial, reference, labels_key="cell_type", progress=False)
        seconds = time.perf_counter() - t0
        params = spatial.uns["proportions_spotlens"]["params"]
        props = spatial.obsm["proportions_spotlens"]
        dominant = props.idxmax(axis=1).value_counts().head(4)
        print(
            f"{name}: {spatial.n_obs} spots × {len(spatial.uns['proportions_spotlens']['genes'])} "
            f"genes, {props.shape[1]} types, {seconds:.1f} s, lambda_ridge="
            f"{params['lambda_ridge']:g} lambda_spatial={params['lambda_spatial']:g}; dominant: "
            + ", ".join(f"{t} {n}" for t, n in dominant.items())
        )
        fig = spotlens.pl.proportions(spatial)
        spotlens.io.save_figure(fig, args.out / f"{name}_proportions.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
