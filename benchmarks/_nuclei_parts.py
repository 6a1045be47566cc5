"""Parts of ``histology_nuclei.py``: section arrays, tables, timing, synthetic runs, figure.

Public spotlens names only (``spotlens.histology``, ``spotlens.datasets``, ``spotlens.deconv``).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from spotlens.histology import (
    NucleusModelConfig,
    NucleusPredictor,
    nucleus_descriptors,
    read_image,
    section_log_expression,
)


def _zscore(x):
    x = np.asarray(x, dtype=np.float64)
    mean, sd = x.mean(0), x.std(0)
    return ((x - mean) / np.where(sd > 1e-12, sd, 1.0) * (sd > 1e-12)).astype(np.float32)


def _spot_index(nuclei, spot_names):
    names = pd.Index(spot_names).astype(str)
    spot = nuclei.obs["spot"]
    index = np.full(nuclei.n_obs, -1, dtype=np.int64)
    given = spot.notna().to_numpy()
    index[given] = names.get_indexer(spot[given].astype(str))
    return index


def _nearest(nuclei_xy, spot_xy):
    from scipy.spatial import cKDTree

    return cKDTree(np.asarray(spot_xy, float)).query(np.asarray(nuclei_xy, float))[1]


def section_arrays(adata, nuclei, features) -> dict:
    """What ``NucleusPredictor`` reads of a section (as ``train(model="nucleus")`` builds it)."""
    return {"desc": _zscore(nuclei.obsm["X_nucleus"]),
            "spot": _spot_index(nuclei, adata.obs_names),
            "nearest": _nearest(nuclei.obsm["spatial"], adata.obsm["spatial"]),
            "features": features, "library": np.asarray(adata.X.sum(1), float).ravel()}


def spot_sums(counts, rest, spot, n_spots):
    """log1p(1e4 Σ counts / Σ totals) per spot over its nuclei (the model's aggregation)."""
    inside = spot >= 0
    summed = np.zeros((n_spots, counts.shape[1]))
    np.add.at(summed, spot[inside], counts[inside])
    total = summed.sum(1) + np.bincount(spot[inside], weights=rest[inside], minlength=n_spots)
    return np.log1p(1e4 * summed / np.where(total > 0, total, 1.0)[:, None])


def spot_prediction(out: dict, arrays: dict) -> np.ndarray:
    return spot_sums(out["counts"], out["rest"], arrays["spot"], len(arrays["library"]))


def loso_line(label, model, ridge, fit_s) -> str:
    v = model.validation
    ctx = ", ".join(f"{k} {s:.3f}" for k, s in v["context_scores"].items())
    per = ", ".join(f"{k} {s:.3f}" for k, s in v["per_section"].items())
    ridge_r = float(ridge.rank_scores_.mean(axis=1).max())
    return (f"- {label}: nucleus model — context chosen **{v['context']}** (LOSO mean r by "
            f"context: {ctx}), {v['best_epoch']} epochs, LOSO mean r {v['mean_pearson']:.3f} "
            f"(per held-out section: {per}); fit {fit_s:.0f} s. Spot route (ridge + rank) LOSO "
            f"mean r {ridge_r:.3f} (alpha {ridge.alpha_:.3g}, rank {ridge.rank_ or 'full'}).")


def result_table(rows) -> list[str]:
    def ci(b):
        return f"{b.estimate:.3f} [{b.low:.3f}, {b.high:.3f}]"

    lines = ["| section | gene set | nuclei summed per spot, mean r [95 % CI] | spot-level "
             "route (ridge + rank) [95 % CI] | Δ nuclei − spot, paired [95 % CI] | "
             "nuclei at least as good? |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        d = r["diff"]
        verdict = ("yes (better)" if d.low > 0 else "yes (no difference shown)" if d.high >= 0
                   else "**no** (worse)")
        lines.append(f"| {r['section']} | {r['gene_set']} | {ci(r['nuclei'])} | {ci(r['spot'])}"
                     f" | {d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {verdict} |")
    return lines


def time_per_1000(model, nuclei, arrays, features, image_path) -> list[str]:
    """Seconds per 1,000 nuclei: descriptors (crops) and the network, on this machine."""
    import torch

    image = read_image(image_path)
    image.read_region(0, 0, 1, 1)  # decode once, timed apart
    sample = nuclei[:5000].copy()
    t0 = time.perf_counter()
    nucleus_descriptors(sample, image=image)
    desc_s = (time.perf_counter() - t0) / sample.n_obs * 1000
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    model.predict(arrays["desc"], features, arrays["nearest"])
    net_s = (time.perf_counter() - t0) / nuclei.n_obs * 1000
    return ["## Prediction time", "",
            f"Per 1,000 nuclei of C6 ({nuclei.n_obs:,} nuclei), torch on {threads} threads: "
            f"descriptors (24 µm crops, colour statistics) **{desc_s:.2f} s**, network "
            f"**{net_s:.4f} s**; total **{desc_s + net_s:.2f} s** (segmentation apart: 1.5 s "
            "per 1,000 nuclei, `benchmarks/results/nuclei_segmentation.md`; the spot tiles' "
            "EfficientNet-Lite0 features, when the context is used, are the spot model's, "
            "≈ 1 s per spot and scale on 2 cores, cached). For comparison, EfficientNet-Lite0 "
            "on one 224-px crop per nucleus ran at 3–20 crops/s on this machine (≈ 50–300 s "
            "per 1,000 nuclei): why the nucleus descriptor is a colour/texture summary."]


# -- synthetic --------------------------------------------------------------------------------

def _syn_arrays(section, genes, proportions=None):
    spots, nuclei = section["spots"], section["nuclei"]
    d = section_arrays(spots, nuclei, section["features"])
    d["y"] = section_log_expression(spots, genes)
    if proportions is not None:
        d["proportions"] = proportions
    return d


def _per_nucleus(out, nuclei):
    from spotlens.histology import evaluate

    true = np.log1p(1e4 * nuclei.X / nuclei.obs["true_total"].to_numpy()[:, None])
    total = out["counts"].sum(1) + out["rest"]
    pred = np.log1p(1e4 * out["counts"] / total[:, None])
    return evaluate(pred, true, list(nuclei.var_names))["mean_pearson"]


def _deconvolved(sections, train_idx):
    """Proportions of every section's spots from spotlens.deconv with a nuclei reference."""
    import anndata as ad

    from spotlens.deconv import deconvolve

    rng = np.random.default_rng(0)
    cells = []
    for i in train_idx:  # training nuclei of known type, as single cells (Poisson counts)
        nuc = sections[i]["nuclei"]
        spots = sections[i]["spots"]
        pick = rng.choice(nuc.n_obs, size=min(nuc.n_obs, 300), replace=False)
        lam = np.zeros((len(pick), spots.n_vars))
        lam[:, :nuc.n_vars] = nuc.X[pick] * 20
        rest = nuc.obs["true_total"].to_numpy()[pick] * 20 - lam.sum(1)
        lam[:, nuc.n_vars:] = rest[:, None] / (spots.n_vars - nuc.n_vars)
        cells.append(ad.AnnData(rng.poisson(lam).astype(np.float32),
                                obs=nuc.obs.iloc[pick][["cell_type"]].copy(),
                                var=spots.var.copy()))
    reference = ad.concat(cells, index_unique="-")
    out = []
    for s in sections:
        spots = s["spots"].copy()
        deconvolve(spots, reference, key_added="proportions_ref", progress=False)
        out.append(spots.obsm["proportions_ref"].reindex(columns=list(
            s["signatures"].index)).fillna(0.0).to_numpy())
    return out


def synthetic_report() -> list[str]:
    from spotlens.datasets import synthetic_nuclei

    cfg = NucleusModelConfig(context="none", max_epochs=300, eval_every=20, lr=1e-2)
    lines = ["## Synthetic nuclei: recovery on a held-out section", "",
             "`synthetic_nuclei(n_sections=4, n_spots=150, n_types=4, n_genes=30)`: spots "
             "whose counts are Poisson sums of ≈ 15 nuclei of known type and expression (plus "
             "30 % nuclei outside spots); each nucleus's descriptor = its type's mean + noise "
             "(sd below; type means ≈ 1.5 sd apart per coordinate). Trained on 3 sections, "
             "scored on the 4th: per-nucleus r = mean over genes of the Pearson r across "
             "nuclei between predicted and true log1p(1e4 · counts / total); type accuracy = "
             "share of nuclei whose most probable type is the true one (chance 0.25 – 0.4). "
             "'with reference': proportions from `spotlens.deconv.deconvolve` with a "
             "reference of 900 training nuclei as single cells; 'true proportions': the "
             "spots' true type shares given to the type head; 'no types': expression only, "
             "each nucleus typed by the nearest true signature (correlation of log profiles).",
             "", "| descriptor noise sd | types from | per-nucleus r | spot r | type accuracy |"
             " r(type calls per spot, proportions) |", "|---:|---|---:|---:|---:|---:|"]
    for noise in (1.0, 3.0, 6.0):
        sections = synthetic_nuclei(n_sections=4, n_spots=150, n_types=4, n_genes=30,
                                    descriptor_noise=noise, seed=7)
        genes = list(sections[0]["nuclei"].var_names)
        types = list(sections[0]["signatures"].index)
        deconv = _deconvolved(sections, (0, 1, 2))
        for label in ("no types", "true proportions", "with reference"):
            props = [None] * 4
            if label == "true proportions":
                props = [s["spots"].obsm["true_proportions"].to_numpy() for s in sections]
            elif label == "with reference":
                props = deconv
            sets = {f"s{i}": _syn_arrays(sections[i], genes, props[i]) for i in range(3)}
            model = NucleusPredictor(genes, cfg, types=types if props[0] is not None else ())
            model.fit(sets)
            test = _syn_arrays(sections[3], genes, props[3])
            out = model.predict(test["desc"], test["features"], test["nearest"])
            nuclei = sections[3]["nuclei"]
            truth = nuclei.obs["cell_type"].cat.codes.to_numpy()
            from spotlens.histology import evaluate

            spot_r = evaluate(spot_prediction(out, test), test["y"], genes)["mean_pearson"]
            if out["types"] is None:
                sig = np.log1p(sections[0]["signatures"].to_numpy())
                pred = np.log1p(out["counts"])
                r = np.corrcoef(np.vstack([pred, sig]))[: len(pred), len(pred):]
                call = r.argmax(1)
            else:
                call = out["types"].argmax(1)
            acc = float((call == truth).mean())
            agree = "—"
            if props[3] is not None:
                inside = test["spot"] >= 0
                frac = np.zeros_like(props[3])
                np.add.at(frac, (test["spot"][inside], call[inside]), 1.0)
                keep = frac.sum(1) > 0
                frac = frac[keep] / frac[keep].sum(1, keepdims=True)
                agree = f"{np.corrcoef(frac.ravel(), props[3][keep].ravel())[0, 1]:.3f}"
            lines.append(f"| {noise:g} | {label} | {_per_nucleus(out, nuclei):.3f} | "
                         f"{spot_r:.3f} | {acc:.3f} | {agree} |")
            print(lines[-1], flush=True)
    return lines


# -- figure -----------------------------------------------------------------------------------

def figure(fitted, predictions, nuclei, spots, image_path, out_path) -> list[str]:
    """C6 nuclei coloured by expression cluster and by a marker gene, with a zoomed detail."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    # the gene set whose model predicts ERBB2 (the HER2 marker), else the first
    sets = [gs for gs in fitted if ("ERBB2" in fitted[gs].genes)] or list(fitted)
    gs = sets[0]
    model = fitted[gs]
    out = predictions[gs, "C6"][2]
    genes = model.genes
    total = out["counts"].sum(1) + out["rest"]
    x = np.log1p(1e4 * out["counts"] / total[:, None])
    gene = "ERBB2" if "ERBB2" in genes else genes[0]
    labels, names = _clusters(x, genes)
    image = read_image(image_path)
    xy = np.asarray(nuclei.obsm["spatial"])
    thumb, scale = image.thumbnail(1600)
    step = 1.0 / scale
    # the detail: around the spot with the most varied predicted clusters
    spot = _spot_codes(nuclei, spots)
    counts = np.zeros((spots.n_obs, labels.max() + 1))
    np.add.at(counts, (spot[spot >= 0], labels[spot >= 0]), 1.0)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    best = int(np.argmax(-(share * np.log(share + 1e-12)).sum(1) * (counts.sum(1) > 10)))
    centre = np.asarray(spots.obsm["spatial"])[best]
    half = 500
    x0, y0 = int(centre[0] - half), int(centre[1] - half)
    detail = image.read_region(x0, y0, 2 * half, 2 * half)
    inside = ((xy[:, 0] >= x0) & (xy[:, 0] < x0 + 2 * half) & (xy[:, 1] >= y0)
              & (xy[:, 1] < y0 + 2 * half))
    fig, axes = plt.subplots(2, 2, figsize=(13, 13))
    cmap = plt.get_cmap("tab10")
    for row, (title, values, kind) in enumerate((("expression cluster", labels, "cat"),
                                                 (f"{gene} (predicted)", x[:, genes.index(gene)],
                                                  "num"))):
        for col, (img, sel, scale, off, s) in enumerate((
                (thumb, np.ones(len(xy), bool), step, (0, 0), 0.4),
                (detail, inside, 1, (x0, y0), 6))):
            ax = axes[row, col]
            ax.imshow(img)
            px = (xy[sel] - off) / scale
            if kind == "cat":
                ax.scatter(px[:, 0], px[:, 1], c=[cmap(v) for v in values[sel]], s=s, lw=0)
            else:
                sc = ax.scatter(px[:, 0], px[:, 1], c=values[sel], cmap="magma", s=s, lw=0)
                fig.colorbar(sc, ax=ax, fraction=0.04, label="log1p(1e4 · counts / total)")
            ax.set_axis_off()
            ax.set_title(f"C6: {title}" + (" — detail" if col else ""))
            if col == 0:
                ax.add_patch(Rectangle((x0 / step, y0 / step), 2 * half / step, 2 * half / step,
                                       fill=False, ec="cyan", lw=1.5))
    handles = [plt.Line2D([], [], ls="", marker="o", color=cmap(k), label=n)
               for k, n in enumerate(names)]
    axes[0, 0].legend(handles=handles, loc="lower left", fontsize=8, title="cluster: top gene")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return ["## Figure", "",
            f"`docs/{out_path.name}`: the {len(xy):,} segmented nuclei of C6 (held out), coloured "
            f"by expression cluster (k-means, k = {len(names)}, on the predicted per-nucleus "
            f"{SET_LABEL_SHORT.get(gs, gs)} expression; each cluster named by its most "
            f"over-expressed gene) and by predicted {gene}, over the H&E; right: a "
            f"{2 * half} px (≈ {2 * half * 0.684:.0f} µm) detail. her2st has no single-cell "
            "reference here, so the colours are expression clusters, not cell types."]


def _spot_codes(nuclei, spots):
    return _spot_index(nuclei, spots.obs_names)


SET_LABEL_SHORT = {"svg": "SVG-50", "hvg": "HVG-50", "top_expressed": "top-250"}


def _clusters(x, genes, k=5):
    from scipy.cluster.vq import kmeans2

    z = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    rng = np.random.default_rng(0)
    sample = z[rng.choice(len(z), size=min(len(z), 20000), replace=False)]
    centres, _ = kmeans2(sample, k, seed=0, minit="++")
    labels = ((z[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
    names = [genes[int(np.argmax(c))] for c in centres]
    return labels, names
