"""Does choosing the penalties on a patch of the slide pick what the whole slide picks?

A one-off study (it settled the default ``cv_max_spots``); the result is in
``benchmarks/studies/results/cv_patch.md``.

``deconvolve(..., lambda_ridge="auto", lambda_spatial="auto")`` cross-validates on a contiguous
patch of at most ``cv_max_spots`` spots (the nearest to a random spot). This script compares,
for each seed (which places the patch), the penalties chosen on the whole slide with those
chosen on patches of a half and a quarter of it, and the largest change of any proportion.
Same seed on both sides, so the count splits, cell states and embedding are the same; only the
patch differs.

Slides: the real Visium lymph node and osmFISH cortex pairs from ``../shared/data`` (the only
real slides here with over 1,000 spots), and, when ``benchmarks/scaling.py`` has written it,
its 100,000-spot synthetic Visium HD-like slide (patches of 20,000 and 5,000 spots).

Usage::

    python benchmarks/studies/cv_patch.py [--seeds 4] [--out benchmarks/studies/results/cv_patch.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np

import spotlens

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the shared helper benchmarks/_machine.py, not spotlens
from _machine import machine  # noqa: E402

DATA = HERE.parents[2] / "shared" / "data"
SYNTHETIC = Path("/tmp/spotlens_scaling_data/synthetic_100000_2000g_20t_c2_l150_s0")


def slides(data: Path, synthetic: Path):
    """``(name, spatial, reference, patch sizes)`` for every slide found."""
    if (data / "spacexr_lymphnode_visium").exists():
        spatial, reference = spotlens.datasets.load_pair("spacexr_lymphnode_visium", data)
        yield "Visium lymph node (real)", spatial, reference, None
    osm = data / "osmfish_cortex_pseudospots"
    if osm.exists():
        yield ("osmFISH cortex pseudo-spots (real)", ad.read_h5ad(osm / "spatial.h5ad"),
               ad.read_h5ad(osm / "sc_reference.h5ad"), None)
    spatial_file = synthetic.with_name(synthetic.name + "_spatial.h5ad")
    if spatial_file.exists():
        yield ("synthetic Visium HD-like, 100k bins", ad.read_h5ad(spatial_file),
               ad.read_h5ad(synthetic.with_name(synthetic.name + "_reference.h5ad")),
               (20_000, 5_000))


def run(spatial, reference, cv_max_spots: int, seed: int) -> tuple[dict, np.ndarray, float]:
    t0 = time.perf_counter()
    res = spotlens.deconv.deconvolve(
        spatial, reference, labels_key="cell_type", cv_max_spots=cv_max_spots, seed=seed,
        progress=False, inplace=False,
    )
    return res.uns["params"], res.proportions.to_numpy(), time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--synthetic", type=Path, default=SYNTHETIC,
                        help="prefix of the scaling benchmark's 100k slide files")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cv_patch.md")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", FutureWarning)

    rows, same, total = [], 0, 0
    for name, spatial, reference, sizes in slides(args.data, args.synthetic):
        n = spatial.n_obs
        whole_size, patch_sizes = (n, (n // 2, n // 4)) if sizes is None else (sizes[0],
                                                                               sizes[1:])
        for seed in range(args.seeds):
            whole, props, whole_s = run(spatial, reference, whole_size, seed)
            for m in patch_sizes:
                params, p, seconds = run(spatial, reference, m, seed)
                agree = (params["lambda_ridge"], params["lambda_spatial"]) == (
                    whole["lambda_ridge"], whole["lambda_spatial"])
                same, total = same + agree, total + 1
                row = (f"| {name} | {n:,} | {whole_size:,} | {m:,} | {seed} | "
                       f"{whole['lambda_ridge']:g} / {whole['lambda_spatial']:g} | "
                       f"{params['lambda_ridge']:g} / {params['lambda_spatial']:g} | "
                       f"{'yes' if agree else 'no'} | {np.nanmax(np.abs(p - props)):.3f} | "
                       f"{whole_s:.1f} / {seconds:.1f} |")
                rows.append(row)
                print(row, flush=True)
    if not rows:
        print(f"no slide found under {args.data}", file=sys.stderr)
        return 2
    lines = [
        "# Penalties chosen on a patch vs on the whole slide",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine()}",
        "- command: `python benchmarks/studies/cv_patch.py`",
        "- 'reference' = cross-validation on the whole slide (real slides) or on the patch of "
        "the previous default 20,000 spots (100k synthetic); 'patch' = on the nearest "
        "`cv_max_spots` spots to a random spot (placed by the seed). Both runs share the seed.",
        "",
        "| slide | spots | reference CV spots | patch spots | seed | λ_ridge / λ_spatial "
        "(reference) | λ_ridge / λ_spatial (patch) | same | max \\|Δ proportion\\| | "
        "seconds (reference / patch) |",
        "|---|---:|---:|---:|---:|---|---|---|---:|---:|",
        *rows,
        "",
        f"Same penalties in {same} of {total} placements.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(args.out)
    print(f"same penalties in {same} of {total} placements; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
