"""Nucleus segmentation of whole her2st sections: speed and nuclei per spot (issue 16).

For each section: ``spotlens.histology.segment_nuclei`` on the full-resolution H&E JPEG with
the classical back-end (no weights), tile by tile over the tissue, on ``--n-jobs`` processes;
``count_nuclei`` into the section's 100 µm ST spots. Reports the time per 1,000 nuclei (JPEG
decoding timed apart), and the distribution of nuclei per spot (median, IQR, share of spots
with none). Also scores the eye-counted fixture tiles (``tests/data/nuclei``) and draws
``docs/nuclei_C6.png``: nucleus outlines and the spot circles over a zoomed region of C6.

Plausibility reference: a 100 µm ST spot in breast tumour holds roughly 10-40 cells; a 10-16
µm section cuts only part of them, but also shows profiles of nuclei centred just outside it.

Only public API (``spotlens.histology``).

Run:  python benchmarks/nuclei_segmentation.py [--sections C6 B4 ...] [--n-jobs 2]
Writes benchmarks/results/nuclei_segmentation.md and docs/nuclei_C6.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from PIL import Image

from spotlens.histology import count_nuclei, nuclei_overlay, read_image, segment_nuclei

from _machine import machine, markdown_table, write_atomic  # benchmarks/_machine.py

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = Path(os.environ.get("SPOTLENS_DATA", HERE.parents[1] / "shared" / "data")) / "her2st"
FIXTURES = ROOT / "tests" / "data" / "nuclei"
SECTIONS = ["B4", "C2", "C3", "C4", "C5", "C6"]


def run_section(name: str, n_jobs: int) -> tuple[dict, ad.AnnData, ad.AnnData, object]:
    spots = ad.read_h5ad(DATA / f"{name}.h5ad")
    image = read_image(DATA / f"{name}_HE_fullres.jpg")
    started = time.perf_counter()
    image.read_region(0, 0, 1, 1)  # decodes the whole JPEG once
    decode = time.perf_counter() - started
    started = time.perf_counter()
    nuclei = segment_nuclei(image, adata=spots, n_jobs=n_jobs)
    seconds = time.perf_counter() - started
    count_nuclei(spots, nuclei)
    per_spot = spots.obs["n_nuclei"]
    params = nuclei.uns["nuclei"]["params"]
    row = {
        "section": name, "nuclei": nuclei.n_obs,
        "tiles": f"{params['n_tiles_segmented']}/{params['n_tiles']}",
        "decode s": f"{decode:.1f}", "segment s": f"{seconds:.0f}", "_seconds": seconds,
        "s per 1,000 nuclei": f"{1000 * seconds / max(nuclei.n_obs, 1):.2f}",
        "spots": len(per_spot), "median per spot": f"{per_spot.median():.0f}",
        "IQR": f"{per_spot.quantile(0.25):.0f}-{per_spot.quantile(0.75):.0f}",
        "min-max": f"{per_spot.min()}-{per_spot.max()}",
        "share of spots with 0": f"{(per_spot == 0).mean():.3f}",
        "share of nuclei in spots": f"{nuclei.obs['spot'].notna().mean():.3f}",
        "median area µm²": f"{nuclei.obs['area_um2'].median():.0f}",
    }
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return row, spots, nuclei, image


def fixture_table() -> pd.DataFrame:
    with open(FIXTURES / "counts.json", encoding="utf-8") as f:
        counts = json.load(f)
    rows = []
    for name, entry in counts.items():
        tile = np.asarray(Image.open(FIXTURES / f"{name}.png").convert("RGB"))
        n = segment_nuclei(tile, mpp=entry["mpp"]).n_obs
        rows.append({"tile": name, "section": entry["section"], "size px": entry["size"],
                     "eye count": entry["eye_count"], "segmented": n,
                     "difference": f"{n / entry['eye_count'] - 1:+.0%}",
                     "what": entry["description"]})
    return pd.DataFrame(rows)


def figure(spots, nuclei, image, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = spots.obs["n_nuclei"]
    spot = counts.index[np.argmin(np.abs(counts - counts.median()))]  # a typical spot
    centre = spots[spot].obsm["spatial"][0]
    size = 700
    picture = nuclei_overlay(nuclei, image=image, adata=spots, center=tuple(centre),
                             size_px=size)
    mpp = nuclei.uns["nuclei"]["params"]["mpp"]
    fig, ax = plt.subplots(figsize=(7.5, 7.8))
    ax.imshow(picture)
    bar = 100 / mpp
    ax.plot([20, 20 + bar], [size - 25, size - 25], color="black", lw=3)
    ax.text(20 + bar / 2, size - 35, "100 µm", ha="center", va="bottom", fontsize=9)
    ax.set_title(f"her2st C6: segmented nuclei (green) and 100 µm ST spots (yellow)\n"
                 f"spot {spot}: {counts[spot]} nuclei; section median {counts.median():.0f}",
                 fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def plausibility(table: pd.DataFrame, fixtures: pd.DataFrame) -> str:
    """The nuclei-per-spot medians against the 10-40 cells per 100 µm spot reference."""
    medians = table.set_index("section")["median per spot"].astype(float)
    inside = [s for s, m in medians.items() if 10 <= m <= 40]
    above = [s for s, m in medians.items() if m > 40]
    below = [s for s, m in medians.items() if m < 10]
    text = ("Plausibility: a 100 µm ST spot in breast tumour holds roughly 10-40 cells. Median "
            f"nuclei per spot within that range: {', '.join(inside) or 'none'}")
    if above:
        text += f"; above it: {', '.join(f'{s} ({medians[s]:.0f})' for s in above)}"
    if below:
        text += f"; below it: {', '.join(f'{s} ({medians[s]:.0f})' for s in below)}"
    eye = fixtures.set_index("tile")
    if "C6_mixed" in eye.index:
        side_um = eye.loc["C6_mixed", "size px"] * 0.6836
        per_spot = eye.loc["C6_mixed", "eye count"] * np.pi * 50**2 / side_um**2
        n_eye = eye.loc["C6_mixed", "eye count"]
        text += (f". For scale, the eye count of the C6 fixture tile ({n_eye} nuclei in "
                 f"{side_um:.0f} × {side_um:.0f} µm) is ≈ {per_spot:.0f} nuclei per 100 µm "
                 "circle of such tissue")
    shares = table["share of nuclei in spots"].astype(float)
    return text + (f". The share of nuclei that fall in a spot ({shares.min():.2f}-"
                   f"{shares.max():.2f}) is about the share of the tissue the spots cover "
                   "(π·50² / 200² = 0.196 on the 200 µm grid, less where spots miss the "
                   "tissue's edge).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=SECTIONS)
    parser.add_argument("--n-jobs", type=int, default=2)
    args = parser.parse_args()
    fixtures = fixture_table()
    print(fixtures.to_string(index=False), flush=True)
    load_before = os.getloadavg()[0]
    rows = []
    for name in args.sections:
        row, spots, nuclei, image = run_section(name, args.n_jobs)
        rows.append(row)
        if name == "C6":
            figure(spots, nuclei, image, ROOT / "docs" / "nuclei_C6.png")
        image.close()
    load_after = os.getloadavg()[0]
    table = pd.DataFrame(rows)
    seconds = table.pop("_seconds")
    total = table["nuclei"].sum()
    per_1000 = 1000 * seconds.sum() / max(total, 1)
    text = f"""# Nucleus segmentation of whole her2st sections

Date: {dt.date.today().isoformat()}. Machine: {machine()} (shared with other jobs).
Command: `python benchmarks/nuclei_segmentation.py --sections {' '.join(args.sections)} \
--n-jobs {args.n_jobs}`.

`spotlens.histology.segment_nuclei` with the classical back-end (no weights; default
`NucleusConfig`: haematoxylin by colour deconvolution, local threshold over 40 µm with a floor
of 0.05 OD, distance-transform watershed, 12-400 µm²), 1,024 px tiles with the default halo,
only tiles on tissue, {args.n_jobs} worker processes; `count_nuclei` into the 100 µm ST spots
(a nucleus counts in a spot when its centroid lies in the spot's circle).

## Eye-counted fixture tiles (`tests/data/nuclei`)

Nuclei counted by eye on each tile before the algorithm's count was looked at (points in
`<tile>_points.csv`); the test asserts the segmented count is within 20 %.

{markdown_table(fixtures)}
## Whole sections

Time per 1,000 nuclei over all sections: **{per_1000:.2f} s** on {args.n_jobs} processes
({total:,} nuclei in {seconds.sum():.0f} s; JPEG decoding, ≈ 1-2 s per section, apart). The
machine is shared: its 1-minute load average was {load_before:.1f} before and {load_after:.1f}
after the run (2 cores), so these times include waiting for other jobs.

{markdown_table(table)}
{plausibility(table, fixtures)}

Figure: `docs/nuclei_C6.png` (outlines over a zoomed region of C6 with the spot circles).
"""
    write_atomic(HERE / "results" / "nuclei_segmentation.md", text)
    print(text)


if __name__ == "__main__":
    main()
