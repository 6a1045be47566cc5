"""RCTD (PyPI ``rctd-py`` 0.4.0), full mode, on CPU.

``rctd.run_rctd(spatial, rctd.Reference(reference, cell_type_col=labels_key), mode="full",
config=RCTDConfig(device="cpu", compile=False))``; everything else at rctd-py's defaults
(which follow spacexr: UMI_min = 100 per spot, counts_MIN = 10, gene_cutoff / fc_cutoff DE gene
selection, sigma chosen by ``choose_sigma``; Reference ``cell_min = 25``, ``min_UMI = 100``
per cell). Proportions = full-mode weights normalised per spot (spacexr's
``normalize_weights``).

Deviations and workarounds, all outside the package (nothing installed is patched):

- ``compile=False``: the default ``torch.compile`` spent ~800 s compiling on 2 CPU cores; eager
  mode gives the same weights to 1e-9 in ~20 s.
- The likelihood table ``q_matrices.npz`` (404 MB, downloaded from GitHub at first use) is
  computed locally by ``rctd_table.py`` and passed with rctd-py's documented environment
  variable ``RCTD_Q_MATRICES``; the runner sets it to ``$SPOTLENS_PEERS_HOME/rctd`` unless it is
  already set, and stops with a message if the file is missing.
- rctd-py drops spots (UMI < UMI_min, or < counts_MIN counts in the bulk gene list) and cell
  types (fewer than ``cell_min`` cells after its cell filters) with only a printed line or a
  warning. Here dropped spots are NaN rows in ``proportions.csv`` and counted in
  ``spots_dropped``; dropped types are listed in ``types_dropped`` (their column is 0).
  With fewer than 2 types left rctd raises and the runner exits non-zero. References with
  fewer than 25 cells per type (e.g. pseudo-spot reference halves of 12-15 cells) need
  ``SPOTLENS_RCTD_CELL_MIN`` set lower: a deviation, recorded in ``notes``.

    python run_rctd.py --spatial S.h5ad --reference R.h5ad --labels-key cell_type --out DIR
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import _runner
import numpy as np
import pandas as pd

PEERS_HOME = Path(os.environ.get("SPOTLENS_PEERS_HOME", Path.home() / ".cache/spotlens/peers"))
os.environ.setdefault("RCTD_Q_MATRICES", str(PEERS_HOME / "rctd" / "q_matrices.npz"))
if not Path(os.environ["RCTD_Q_MATRICES"]).exists():
    raise SystemExit(
        f"RCTD likelihood table not found at {os.environ['RCTD_Q_MATRICES']}; compute it once "
        f"with: python {Path(__file__).with_name('rctd_table.py')} --out {PEERS_HOME / 'rctd'}"
    )

import rctd  # noqa: E402
import torch  # noqa: E402

#: rctd's (and spacexr's) default minimum number of reference cells per type; the environment
#: variable SPOTLENS_RCTD_CELL_MIN lowers it (a deviation, recorded in notes).
CELL_MIN = int(os.environ.get("SPOTLENS_RCTD_CELL_MIN", 25))


def fit(st, ref, labels_key, notes):
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = rctd.Reference(ref, cell_type_col=labels_key, cell_min=CELL_MIN)
        config = rctd.RCTDConfig(device="cpu", compile=False)
        res = rctd.run_rctd(st, reference, mode="full", config=config)
    for w in caught:
        if issubclass(w.category, UserWarning):
            notes.append(f"rctd warning: {w.message}")
    all_types = sorted(ref.obs[labels_key].astype(str).unique())
    types_dropped = [t for t in all_types if t not in set(map(str, reference.cell_type_names))]
    mask = np.ones(st.n_obs, bool) if res.pixel_mask is None else np.asarray(res.pixel_mask)
    w = np.asarray(res.weights, dtype=np.float64)
    props = pd.DataFrame(w, index=st.obs_names[mask], columns=list(map(str, res.cell_type_names)))
    if CELL_MIN != 25:
        notes.append(f"cell_min={CELL_MIN} (rctd default 25), from SPOTLENS_RCTD_CELL_MIN")
    notes.append(f"full mode, CPU eager (compile=False); converged "
                 f"{int(np.sum(res.converged))}/{len(res.converged)} spots")
    notes.append(f"likelihood table: {os.environ['RCTD_Q_MATRICES']} (computed by rctd_table.py)")
    return props, int((~mask).sum()), types_dropped


if __name__ == "__main__":
    raise SystemExit(_runner.main("rctd", rctd.__version__, fit,
                                  description=__doc__.splitlines()[0]))
