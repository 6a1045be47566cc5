"""What every peer runner shares: the command line, reading inputs, timing, writing outputs.

Imported by ``run_<peer>.py`` inside that peer's own venv, so it needs only numpy, pandas and
anndata (present in every peer venv). Each runner supplies one function::

    fit(spatial, reference, labels_key, notes) -> (proportions, spots_dropped, types_dropped)

``proportions`` is a DataFrame indexed by the spot names the method kept (any subset of
``spatial.obs_names``), one column per cell type. This module reindexes it to all input spots
(rows of spots the method dropped become NaN), renormalises kept rows to sum to 1, and writes

- ``OUT/proportions.csv``: spots × cell types;
- ``OUT/run.json``: ``seconds`` (wall time of ``fit``, without imports or reading files),
  ``peak_memory_mb`` (``ru_maxrss`` of this process, MiB), ``spots_dropped`` (int),
  ``types_dropped`` (list), ``version`` (the peer package), ``notes`` (list of strings),
  plus ``peer``, ``n_spots``, ``n_types``, ``python``.

Both files are written to a temporary name beside the target and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

FitFn = Callable[[ad.AnnData, ad.AnnData, str, list], tuple[pd.DataFrame, int, list]]


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """``--spatial S.h5ad --reference R.h5ad --labels-key cell_type --out DIR [--seed 0]``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--spatial", type=Path, required=True, help="spots × genes raw counts")
    p.add_argument("--reference", type=Path, required=True, help="cells × genes raw counts")
    p.add_argument("--labels-key", default="cell_type", help="reference obs column of types")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def read_inputs(args: argparse.Namespace) -> tuple[ad.AnnData, ad.AnnData]:
    """Read both AnnData, check the documented inputs, make names unique and X float32 CSR."""
    from scipy import sparse

    st = ad.read_h5ad(args.spatial)
    ref = ad.read_h5ad(args.reference)
    if args.labels_key not in ref.obs:
        raise SystemExit(f"reference has no obs[{args.labels_key!r}]")
    if "spatial" not in st.obsm:
        raise SystemExit("spatial AnnData has no obsm['spatial']")
    for a in (st, ref):
        a.var_names_make_unique()
        a.X = sparse.csr_matrix(a.X, dtype=np.float32)
    ref.obs[args.labels_key] = ref.obs[args.labels_key].astype(str).astype("category")
    return st, ref


def finish(props: pd.DataFrame, spots: pd.Index, types: list[str]) -> pd.DataFrame:
    """All input spots in input order, all reference types; NaN rows for dropped spots."""
    props = props.reindex(index=spots, columns=types).astype(float)
    props.index.name = "spot"
    kept = props.notna().any(axis=1)
    block = props.loc[kept].fillna(0.0).clip(lower=0.0)
    total = block.sum(axis=1)
    block = block.div(total.where(total > 0), axis=0)  # all-zero rows become NaN too
    props.loc[kept] = block
    return props


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(peer: str, version: str, fit: FitFn, argv: list[str] | None = None,
         description: str = "") -> int:
    args = parse_args(description or f"Run {peer} on a spatial/reference pair.", argv)
    st, ref = read_inputs(args)
    types = sorted(ref.obs[args.labels_key].cat.categories.astype(str))
    notes: list[str] = []
    args.out.mkdir(parents=True, exist_ok=True)
    np.random.seed(args.seed)
    t0 = time.perf_counter()
    props, spots_dropped, types_dropped = fit(st, ref, args.labels_key, notes)
    seconds = time.perf_counter() - t0
    props = finish(props, st.obs_names, types)
    n_nan = int(props.isna().all(axis=1).sum())
    if n_nan != spots_dropped:
        notes.append(f"{n_nan} NaN rows in proportions.csv ({spots_dropped} reported dropped)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    info = {
        "peer": peer,
        "version": version,
        "seconds": round(seconds, 3),
        "peak_memory_mb": round(peak, 1),
        "spots_dropped": int(spots_dropped),
        "types_dropped": sorted(map(str, types_dropped)),
        "n_spots": int(st.n_obs),
        "n_types": len(types),
        "notes": notes,
        "python": sys.executable,
    }
    write_atomic(args.out / "proportions.csv", props.to_csv())
    write_atomic(args.out / "run.json", json.dumps(info, indent=2) + "\n")
    dom = props.dropna().idxmax(axis=1).value_counts()
    print(f"{peer} {version}: {seconds:.1f} s, peak {peak:.0f} MiB, dropped {spots_dropped} "
          f"spots, types dropped {types_dropped}; most frequent dominant type "
          f"{dom.index[0] if len(dom) else None} ({dom.iloc[0] if len(dom) else 0} spots)")
    return 0
