"""Accuracy of spotlens against ground truth on the osmFISH cortex pseudo-spots.

Compares, on the full data and the held-out split (left-half reference, right-half spots), at
full depth and downsampled to ~300 counts per spot:

- plain per-spot NNLS on mean-normalised type signatures (the reference baseline),
- spotlens without smoothing (lambda_spatial = 0),
- spotlens with a purely distance-weighted graph and with the attention-weighted graph, both
  with penalties chosen automatically, and both at fixed lambda_spatial values.

Metrics (against truth.csv, cell fractions): Pearson r and RMSE over all spot × type entries,
mean Jensen–Shannon divergence per spot (base 2).

Usage::

    python benchmarks/accuracy_osmfish.py [--data ../shared/data/osmfish_cortex_pseudospots]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import nnls

import spotlens
from spotlens.metrics import accuracy

from _machine import machine, markdown_table  # benchmarks/_machine.py (the script's folder)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "osmfish_cortex_pseudospots"


def nnls_baseline(st: ad.AnnData, ref: ad.AnnData, labels_key: str = "cell_type") -> pd.DataFrame:
    """Per-spot NNLS of raw spot counts on mean-normalised (unit-sum) type signatures."""
    genes = st.var_names.intersection(ref.var_names)
    x = sparse.csr_matrix(ref[:, genes].X, dtype=float)
    lib = np.asarray(x.sum(axis=1)).ravel()
    xn = sparse.diags(1 / np.maximum(lib, 1)) @ x
    types = sorted(ref.obs[labels_key].astype(str).unique())
    lab = ref.obs[labels_key].astype(str).to_numpy()
    sig = np.vstack([np.asarray(xn[lab == t].mean(axis=0)).ravel() for t in types])
    y = sparse.csr_matrix(st[:, genes].X, dtype=float).toarray()
    coef = np.array([nnls(sig.T, row)[0] for row in y])
    total = coef.sum(axis=1, keepdims=True)
    props = np.divide(coef, total, out=np.zeros_like(coef), where=total > 0)
    return pd.DataFrame(props, index=st.obs_names, columns=types)


def downsample(st: ad.AnnData, depth: float, seed: int = 0) -> ad.AnnData:
    """Binomially thin each spot to about ``depth`` counts."""
    rng = np.random.default_rng(seed)
    out = st.copy()
    x = sparse.csr_matrix(out.X, dtype=np.float64)
    lib = np.asarray(x.sum(axis=1)).ravel()
    p = np.repeat(np.minimum(1.0, depth / np.maximum(lib, 1)), np.diff(x.indptr))
    x.data = rng.binomial(np.rint(x.data).astype(np.int64), p).astype(np.float32)
    x.eliminate_zeros()
    out.X = x.astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "accuracy_osmfish.md")
    parser.add_argument("--depth", type=float, default=300.0)
    args = parser.parse_args(argv)
    if not args.data.exists():
        print(f"osmFISH data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    ref = ad.read_h5ad(args.data / "sc_reference.h5ad")
    st = ad.read_h5ad(args.data / "spatial.h5ad")
    truth = pd.read_csv(args.data / "truth.csv", index_col=0)
    right = (st.obs["half"] == "right").to_numpy()
    settings = {
        "full": (st, ref),
        "held-out": (st[right].copy(), ref[(ref.obs["half"] == "left").to_numpy()].copy()),
    }
    settings[f"full, ~{args.depth:.0f} counts/spot"] = (downsample(st, args.depth), ref)
    settings[f"held-out, ~{args.depth:.0f} counts/spot"] = (
        downsample(settings["held-out"][0], args.depth), settings["held-out"][1],
    )
    ls = dict(likelihood="gaussian")  # the least-squares data term
    methods = {
        "NNLS (baseline)": None,
        "spotlens (defaults: count likelihood)": dict(),
        "spotlens, least squares, no smoothing": dict(lambda_spatial=0.0, **ls),
        "spotlens, least squares, distance graph, auto": dict(use_attention=False, **ls),
        "spotlens, least squares, attention graph, auto": dict(**ls),
    }
    for lam in (0.1, 0.3):  # the two graphs at the same, fixed smoothing strength
        methods[f"spotlens, least squares, distance graph, lambda_spatial={lam}"] = dict(
            use_attention=False, lambda_spatial=lam, **ls
        )
        methods[f"spotlens, least squares, attention graph, lambda_spatial={lam}"] = dict(
            lambda_spatial=lam, **ls
        )
    rows = []
    for setting, (s, r) in settings.items():
        for name, kw in methods.items():
            t0 = time.perf_counter()
            if kw is None:
                pred = nnls_baseline(s, r)
                chosen = ""
            else:
                res = spotlens.deconv.deconvolve(s, r, inplace=False, progress=False, **kw)
                pred = res.proportions
                p = res.uns["params"]
                chosen = f"{p['lambda_ridge']:g} / {p['lambda_spatial']:g}"
            m = accuracy(pred, truth)
            scores = {"pearson_r": m["pearson_r"], "rmse": m["rmse"], "jsd": m["mean_jsd"]}
            rows.append({"data": setting, "method": name, **scores,
                         "lambda_ridge / spatial": chosen,
                         "seconds": time.perf_counter() - t0})
            print(f"{setting:32s} {name:62s} r={m['pearson_r']:.3f} rmse={m['rmse']:.3f} "
                  f"jsd={m['mean_jsd']:.3f} {chosen}", flush=True)
    table = pd.DataFrame(rows)
    header = (
        f"# Accuracy on osmFISH cortex pseudo-spots\n\n"
        f"Date: {datetime.date.today()} · machine: {machine()} · "
        f"spotlens {spotlens.__version__}\n\n"
        f"Command: `python benchmarks/accuracy_osmfish.py`\n\n"
        "Truth: cell fractions per 50 µm pseudo-spot (Codeluppi et al. 2018). Pearson r and RMSE "
        "over all spot × type entries; JSD = mean Jensen–Shannon divergence per spot (base 2). "
        "Held-out: reference from the left half, spots from the right half. "
        f"Downsampled: spot counts thinned binomially to ~{args.depth:.0f} per spot.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(header + markdown_table(table) + "\n")
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
