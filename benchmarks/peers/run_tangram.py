"""Tangram (PyPI ``tangram-sc``), clusters mode, on CPU.

Following the Tangram tutorial:

1. training genes: ``scanpy.tl.rank_genes_groups(reference, groupby=labels_key)`` (scanpy's
   default t-test) on a library-normalised, log1p copy of the reference; the top 100 genes per
   cell type, pooled; ``tg.pp_adatas(reference, spatial, genes=markers)`` keeps those present in
   both (lower-cased, as Tangram does) and adds the default ``rna_count_based`` density prior;
2. ``tg.map_cells_to_space(reference, spatial, mode="clusters", cluster_label=labels_key,
   device="cpu", random_state=seed)``, otherwise defaults (1,000 epochs, learning rate 0.1,
   lambda_g1 = 1, lambda_d = 1 with the density prior). Mapping uses ``X`` as given: raw counts
   (the cluster profiles are Tangram's ``adata_to_cluster_expression`` of them);
3. ``tg.project_cell_annotations(ad_map, spatial, annotation=labels_key)`` and the projected
   ``obsm['tangram_ct_pred']`` normalised per spot = proportions.

No spots or types are dropped. ``seconds`` covers steps 1–3 (marker selection included).

    python run_tangram.py --spatial S.h5ad --reference R.h5ad --labels-key cell_type --out DIR
"""

from __future__ import annotations

import logging
from importlib.metadata import version

import _runner
import numpy as np
import pandas as pd
import scanpy as sc
import tangram as tg
import torch

N_MARKERS = 100  # per cell type, as in the Tangram tutorial
SEED = 0


def fit(st, ref, labels_key, notes):
    logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(SEED)
    norm = ref.copy()
    sc.pp.normalize_total(norm)
    sc.pp.log1p(norm)
    sc.tl.rank_genes_groups(norm, groupby=labels_key, use_raw=False)
    names = pd.DataFrame(norm.uns["rank_genes_groups"]["names"]).iloc[:N_MARKERS]
    markers = sorted(set(np.ravel(names.to_numpy()).astype(str)))
    tg.pp_adatas(ref, st, genes=markers)
    n_train = len(ref.uns["training_genes"])
    ad_map = tg.map_cells_to_space(ref, st, mode="clusters", cluster_label=labels_key,
                                   device="cpu", random_state=SEED, verbose=False)
    tg.project_cell_annotations(ad_map, st, annotation=labels_key)
    props = pd.DataFrame(st.obsm["tangram_ct_pred"])
    props.index = st.obs_names
    props.columns = props.columns.astype(str)
    score = ad_map.uns.get("train_genes_df")
    notes.append(f"{len(markers)} marker genes (top {N_MARKERS}/type, t-test on log-normalised "
                 f"reference), {n_train} shared training genes; clusters mode, 1000 epochs, "
                 f"CPU, seed {SEED}")
    if score is not None and "train_score" in score:
        notes.append(f"mean training-gene cosine similarity {score['train_score'].mean():.3f}")
    return props, 0, []


if __name__ == "__main__":
    raise SystemExit(_runner.main("tangram", version("tangram-sc"), fit,
                                  description=__doc__.splitlines()[0]))
