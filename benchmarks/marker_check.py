"""Marker check for real pairs without truth: do estimated proportions follow held-out markers?

For each cell type, markers are chosen from the reference among the genes shared with the
spatial data, removed from the spatial data before the fit, and scored on the full spatial
data; the check is the Pearson correlation across spots between a type's estimated
proportion and its marker score. The markers never enter the fit, so a high correlation is
evidence from genes the method did not see.

The check is checked itself on pseudo-spots with truth (``spotlens.datasets.pseudo_spots``
on the lymph-node reference): applied to the TRUE proportions it should give high
correlations, which bounds what a perfect method can reach.

Usage::

    python benchmarks/marker_check.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

import spotlens

from _machine import machine, write_atomic  # benchmarks/_machine.py (the script's folder)

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results" / "marker_check.md"
PAIRS = ("spacexr_lymphnode_visium", "spacexr_hippocampus_visium", "spacexr_cerebellum_slideseq")

Method = Callable[[AnnData, AnnData], pd.DataFrame]


def _dense(m) -> np.ndarray:
    return m.toarray() if sparse.issparse(m) else np.asarray(m)


def select_markers(
    reference: AnnData,
    genes,
    labels_key: str = "cell_type",
    n_per_type: int = 3,
    min_log_fc: float = 1.0,
    min_fraction: float = 0.25,
) -> dict[str, list[str]]:
    """Up to ``n_per_type`` marker genes per type among ``genes`` (the shared genes).

    A gene's expression is its count divided by the cell's total over all reference genes
    (library-normalised). Its log fold change for type t is ``log2((m_t + ε) / (max_{u≠t} m_u
    + ε))`` with ``m`` the type means and ``ε`` 1 % of the median positive mean; a marker has
    ``log fc ≥ min_log_fc`` against the HIGHEST other type and is detected (count > 0) in at
    least ``min_fraction`` of the type's cells. A positive fold change against the highest
    other type can hold for one type only, so a gene marks at most one type. Types with no
    qualifying gene get an empty list.
    """
    x = reference.X
    lib = np.asarray(x.sum(axis=1)).ravel()
    lib = np.where(lib > 0, lib, 1.0)
    genes = pd.Index(genes).intersection(reference.var_names, sort=False)
    cols = reference.var_names.get_indexer(genes)
    expr = _dense(x[:, cols]) / lib[:, None]
    labels = reference.obs[labels_key].astype(str).to_numpy()
    types = sorted(set(labels))
    means = np.vstack([expr[labels == t].mean(axis=0) for t in types])
    frac = np.vstack([(expr[labels == t] > 0).mean(axis=0) for t in types])
    eps = 0.01 * float(np.median(means[means > 0])) if (means > 0).any() else 1e-9
    markers: dict[str, list[str]] = {}
    for k, t in enumerate(types):
        other = np.delete(means, k, axis=0).max(axis=0)
        lfc = np.log2((means[k] + eps) / (other + eps))
        ok = (lfc >= min_log_fc) & (frac[k] >= min_fraction)
        order = np.argsort(-lfc)
        markers[t] = [genes[g] for g in order if ok[g]][:n_per_type]
    return markers


def _all_markers(markers: Mapping[str, list[str]]) -> list[str]:
    return [g for genes in markers.values() for g in genes]


def hold_out(spatial: AnnData, markers: Mapping[str, list[str]]) -> AnnData:
    """A copy of ``spatial`` without the marker genes (to fit on)."""
    drop = spatial.var_names.isin(_all_markers(markers))
    return spatial[:, ~drop].copy()


def marker_scores(spatial: AnnData, markers: Mapping[str, list[str]]) -> pd.DataFrame:
    """``n_spots × n_types`` mean ``log1p`` CPM of each type's markers (full spatial data).

    CPM divides by the spot's total over all its genes. Types without markers present in the
    spatial data are left out.
    """
    lib = np.asarray(spatial.X.sum(axis=1)).ravel()
    lib = np.where(lib > 0, lib, 1.0)
    out = {}
    for t, genes in markers.items():
        genes = [g for g in genes if g in spatial.var_names]
        if not genes:
            continue
        cols = spatial.var_names.get_indexer(genes)
        out[t] = np.log1p(_dense(spatial.X[:, cols]) / lib[:, None] * 1e6).mean(axis=1)
    return pd.DataFrame(out, index=spatial.obs_names)


def marker_check(proportions: pd.DataFrame, scores: pd.DataFrame) -> tuple[pd.Series, dict]:
    """Per-type Pearson r between proportion and marker score across spots, and a summary.

    A type is scored when it has a marker score and both columns vary across spots; spots
    with NaN proportions are dropped. Summary: ``mean_r`` over scored types, ``n_scored``,
    ``n_types`` (columns of ``proportions``).
    """
    common = [t for t in proportions.columns if t in scores.columns]
    r = {}
    for t in common:
        p = proportions[t].astype(float)
        s = scores[t].reindex(p.index).astype(float)
        ok = p.notna() & s.notna()
        if ok.sum() < 3 or p[ok].std() == 0 or s[ok].std() == 0:
            continue
        r[t] = float(np.corrcoef(p[ok], s[ok])[0, 1])
    r = pd.Series(r, name="pearson_r", dtype=float)
    summary = {"mean_r": float(r.mean()) if len(r) else float("nan"), "n_scored": len(r),
               "n_types": proportions.shape[1]}
    return r, summary


def dominant_types(proportions: pd.DataFrame, n: int = 3) -> str:
    """The ``n`` types that have the largest proportion in the most spots, with their counts."""
    top = proportions.dropna(how="all").idxmax(axis=1).value_counts().head(n)
    return ", ".join(f"{t} {c}" for t, c in top.items())


def spotlens_defaults(spatial: AnnData, reference: AnnData) -> pd.DataFrame:
    """spotlens with its defaults."""
    res = spotlens.deconv.deconvolve(spatial, reference, progress=False, inplace=False)
    return res.proportions


def peer_method(peer: str, workdir: Path, timeout: float = 3600) -> Method:
    """A peer from ``benchmarks/peers`` (its own venv) as a method: inputs go through h5ad files.

    Raises ``RuntimeError`` with the runner's message when the peer fails.
    """
    from peers import peers  # benchmarks/peers/peers.py

    def fn(spatial: AnnData, reference: AnnData) -> pd.DataFrame:
        out = workdir / peer / str(time.time_ns())
        out.mkdir(parents=True)
        sp, rf = out / "spatial.h5ad", out / "reference.h5ad"
        spatial.write_h5ad(sp)
        reference.write_h5ad(rf)
        res = peers.run_peer(peer, sp, rf, out / "run", labels_key="cell_type", timeout=timeout)
        if res.get("error"):
            raise RuntimeError(f"{peer}: {res['error']}")
        return res["proportions"]

    return fn


def sanity_check(reference: AnnData, seed: int = 0) -> tuple[pd.Series, dict]:
    """The marker check on the TRUE proportions of pseudo-spots built from ``reference``."""
    spatial, half = spotlens.datasets.pseudo_spots(
        reference, n_spots=500, regions=("dominant",) * 4 + ("diverse", "uniform"),
        library_size=5_000, seed=seed,
    )
    markers = select_markers(half, spatial.var_names.intersection(half.var_names))
    return marker_check(spatial.obsm["proportions_true"], marker_scores(spatial, markers))


def main(argv: list[str] | None = None, methods: Mapping[str, Method] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--peers", nargs="*", default=[],
                        help="peers of benchmarks/peers to score too (installed by its setup.sh)")
    parser.add_argument("--work", type=Path, default=HERE / ".cache" / "marker_check")
    args = parser.parse_args(argv)
    methods = {"spotlens": spotlens_defaults, **(methods or {}),
               **{p: peer_method(p, args.work) for p in args.peers}}
    lines = [
        "# Marker check on the real pairs (no truth)", "",
        f"- date: {time.strftime('%Y-%m-%d')}", f"- machine: {machine()}",
        f"- command: `python benchmarks/marker_check.py {' '.join(argv or sys.argv[1:])}`",
        "- markers: 3 per type from the reference among shared genes, log2 fold change ≥ 1 vs "
        "the highest other type, detected in ≥ 25 % of the type's cells; held out of the fit; "
        "score = mean log1p CPM of the markers on the full spatial data; r = Pearson across "
        "spots.", "",
    ]
    ref_lymph = spotlens.datasets.load_pair("spacexr_lymphnode_visium", args.data)[1]
    r_true, s_true = sanity_check(ref_lymph)
    lines += [
        "## Sanity check: the check applied to TRUE proportions", "",
        f"pseudo-spots from the lymph-node reference (500 spots, 5,000 UMI, seed 0): mean r = "
        f"{s_true['mean_r']:.3f} over {s_true['n_scored']} of {s_true['n_types']} types "
        f"(min {r_true.min():.3f}, {r_true.idxmin()}). This is about what a perfect method "
        "can reach; the check is meaningful where this is high.", "",
    ]
    print(f"sanity (true proportions): mean r {s_true['mean_r']:.3f} "
          f"({s_true['n_scored']}/{s_true['n_types']} types)")
    rows = []
    for name in PAIRS:
        spatial, reference = spotlens.datasets.load_pair(name, args.data)
        shared = spatial.var_names.intersection(reference.var_names)
        markers = select_markers(reference, shared)
        fit_on = hold_out(spatial, markers)
        scores = marker_scores(spatial, markers)
        for method, fn in methods.items():
            t0 = time.perf_counter()
            props = fn(fit_on, reference)
            seconds = time.perf_counter() - t0
            r, summary = marker_check(props, scores)
            dominant = dominant_types(props)
            print(f"{name} {method}: mean r {summary['mean_r']:.3f} "
                  f"({summary['n_scored']}/{summary['n_types']} types), {seconds:.1f} s; "
                  f"dominant: {dominant}")
            print("  " + ", ".join(f"{t} {v:.2f}" for t, v in r.items()))
            rows.append((name, method, len(shared), len(_all_markers(markers)), summary,
                         dominant, r, seconds))
    lines += ["## Results", "",
              "'dominant': the types with the largest proportion in the most spots (spots).", "",
              "| pair | method | shared genes | held-out markers | types scored | mean r | "
              "dominant | seconds |", "|---|---|---:|---:|---:|---:|---|---:|"]
    for name, method, n_shared, n_mark, summary, dominant, _, seconds in rows:
        lines.append(f"| {name} | {method} | {n_shared} | {n_mark} | {summary['n_scored']}/"
                     f"{summary['n_types']} | {summary['mean_r']:.3f} | {dominant} | "
                     f"{seconds:.1f} |")
    lines += ["", "## Per type", ""]
    for name, method, *_, r, _ in rows:
        lines.append(f"- {name}, {method}: " + ", ".join(f"{t} {v:.2f}" for t, v in r.items()))
    write_atomic(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
