"""cell2location (PyPI ``cell2location`` 0.1.5, scvi-tools / pyro), on CPU, small cases only.

Following the cell2location Visium tutorial (lymph node):

1. reference genes filtered with ``cell2location.utils.filtering.filter_genes`` at the
   tutorial's cutoffs (``cell_count_cutoff=5, cell_percentage_cutoff2=0.03,
   nonz_mean_cutoff=1.12``), then restricted to genes shared with the spatial data;
2. ``RegressionModel`` (negative-binomial regression of reference signatures; labels_key as
   the labels, no batch key) trained for ``REF_EPOCHS`` = 250 epochs (the tutorial's value),
   posterior exported with 1,000 samples; signatures = ``means_per_cluster_mu_fg``;
3. ``Cell2location(spatial, cell_state_df=signatures, N_cells_per_location=6,
   detection_alpha=20)`` trained full-batch for ``SP_EPOCHS`` epochs, posterior exported with
   1,000 samples;
4. proportions = posterior mean cell abundance (``means_cell_abundance_w_sf``) normalised per
   spot. The q05 version (``q05_cell_abundance_w_sf``, the tutorial's reported quantity) is
   written too, as ``proportions_q05.csv``.

Deviations: the spatial model is trained for ``SP_EPOCHS`` = 3,000 epochs instead of the
tutorial's 30,000 (CPU, 2 cores). On ~1,000 spots the ELBO's relative change over the last 10%
of epochs is reported in ``notes`` to show how far from converged it is. Both epoch counts can
be changed with the environment variables ``SPOTLENS_C2L_REF_EPOCHS`` / ``SPOTLENS_C2L_SP_EPOCHS``.
``N_cells_per_location=6`` is the value chosen for these benchmarks (the lymph-node tutorial
uses 30); ``SPOTLENS_C2L_N_CELLS`` changes it. No batch key is used for either model. Spots are
not dropped; reference types are not dropped.

The venv needs ``pyro-ppl==1.9.1`` (1.9.2 removed a function cell2location 0.1.5 imports).

    python run_cell2location.py --spatial S.h5ad --reference R.h5ad --labels-key cell_type --out DIR
"""

from __future__ import annotations

import logging
import os
import warnings

os.environ.setdefault("MPLBACKEND", "Agg")

import _runner  # noqa: E402
import cell2location  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scvi  # noqa: E402
from cell2location.models import Cell2location, RegressionModel  # noqa: E402
from cell2location.utils.filtering import filter_genes  # noqa: E402

REF_EPOCHS = int(os.environ.get("SPOTLENS_C2L_REF_EPOCHS", 250))
SP_EPOCHS = int(os.environ.get("SPOTLENS_C2L_SP_EPOCHS", 3000))
N_CELLS = float(os.environ.get("SPOTLENS_C2L_N_CELLS", 6))
DETECTION_ALPHA = 20
SEED = 0
EXTRA: dict[str, pd.DataFrame] = {}


def _elbo_tail_change(model) -> float:
    h = np.asarray(model.history["elbo_train"]).ravel()
    n = max(2, len(h) // 10)
    return float(abs(h[-1] - h[-n]) / abs(h[-n]))


def fit(st, ref, labels_key, notes):
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    scvi.settings.seed = SEED
    train_kw = dict(accelerator="cpu", enable_progress_bar=False)

    keep = filter_genes(ref, cell_count_cutoff=5, cell_percentage_cutoff2=0.03,
                        nonz_mean_cutoff=1.12)
    genes = pd.Index(keep).intersection(st.var_names)
    ref = ref[:, genes].copy()
    RegressionModel.setup_anndata(ref, labels_key=labels_key)
    reg = RegressionModel(ref)
    reg.train(max_epochs=REF_EPOCHS, **train_kw)
    ref = reg.export_posterior(ref, sample_kwargs={"num_samples": 1000, "batch_size": 2500})
    factors = ref.uns["mod"]["factor_names"]
    sig = ref.varm["means_per_cluster_mu_fg"][[f"means_per_cluster_mu_fg_{f}" for f in factors]]
    sig.columns = list(map(str, factors))

    sp = st[:, genes].copy()
    Cell2location.setup_anndata(sp)
    mod = Cell2location(sp, cell_state_df=sig, N_cells_per_location=N_CELLS,
                        detection_alpha=DETECTION_ALPHA)
    mod.train(max_epochs=SP_EPOCHS, batch_size=None, train_size=1, **train_kw)
    sp = mod.export_posterior(sp, sample_kwargs={"num_samples": 1000, "batch_size": sp.n_obs})
    names = list(map(str, sp.uns["mod"]["factor_names"]))
    mean = pd.DataFrame(np.asarray(sp.obsm["means_cell_abundance_w_sf"]),
                        index=st.obs_names, columns=names)
    EXTRA["proportions_q05.csv"] = pd.DataFrame(np.asarray(sp.obsm["q05_cell_abundance_w_sf"]),
                                                index=st.obs_names, columns=names)
    notes.append(f"{len(genes)} genes (tutorial filter_genes ∩ spatial); reference model "
                 f"{REF_EPOCHS} epochs (ELBO rel. change over last 10%: "
                 f"{_elbo_tail_change(reg):.2e}); spatial model {SP_EPOCHS} epochs full batch "
                 f"(tutorial: 30000; ELBO rel. change over last 10%: "
                 f"{_elbo_tail_change(mod):.2e}); N_cells_per_location={N_CELLS:g}, "
                 f"detection_alpha={DETECTION_ALPHA}; proportions = posterior mean abundance "
                 "normalised per spot (q05 version in proportions_q05.csv)")
    return mean, 0, []


def main() -> int:
    rc = _runner.main("cell2location", cell2location.__version__, fit,
                      description=__doc__.splitlines()[0])
    args = _runner.parse_args("")
    for name, df in EXTRA.items():
        df = _runner.finish(df, df.index, sorted(df.columns))
        _runner.write_atomic(args.out / name, df.to_csv())
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
