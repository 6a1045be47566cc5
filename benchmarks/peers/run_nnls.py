"""Baseline: per-spot non-negative least squares on cell-type mean signatures.

The simplest defensible deconvolution, written here (no package):

1. genes = spatial ∩ reference (all shared genes, no selection);
2. each reference cell is library-normalised over those genes (counts / total), and the
   signature of type t is the mean of its normalised cells: ``S`` (genes × types, columns sum 1);
3. each spot is library-normalised the same way: ``y = counts / total``;
4. ``w = argmin_{w >= 0} ||S w - y||_2`` by ``scipy.optimize.nnls``, proportions ``w / sum(w)``
   (solved as the equivalent ``min ||R w - Q^T y||`` with ``S = QR``: same minimiser, fast with
   thousands of genes).

Spots with no counts in the shared genes (or an all-zero fit) cannot be resolved: NaN rows,
counted in ``spots_dropped``. No cell type is dropped. Deterministic.

    python run_nnls.py --spatial S.h5ad --reference R.h5ad --labels-key cell_type --out DIR
"""

from __future__ import annotations

import _runner
import numpy as np
import pandas as pd
import scipy
from scipy import sparse
from scipy.optimize import nnls


def fit(st, ref, labels_key, notes):
    genes = st.var_names.intersection(ref.var_names)
    notes.append(f"{len(genes)} shared genes, all used")
    x = sparse.csr_matrix(ref[:, genes].X, dtype=np.float64)
    lib = np.asarray(x.sum(axis=1)).ravel()
    xn = sparse.diags(1.0 / np.maximum(lib, 1e-12)) @ x
    lab = ref.obs[labels_key].astype(str).to_numpy()
    types = sorted(set(lab))
    sig = np.vstack([np.asarray(xn[lab == t].mean(axis=0)).ravel() for t in types]).T
    y = sparse.csr_matrix(st[:, genes].X, dtype=np.float64).toarray()
    tot = y.sum(axis=1)
    ok = tot > 0
    # ||S w - y|| = ||R w - Q'y|| + const for S = QR (reduced), so the small n_types × n_types
    # problem has the same solution and is much faster when genes >> types.
    q, r = np.linalg.qr(sig)
    qy = (y[ok] / tot[ok, None]) @ q
    w = np.full((st.n_obs, len(types)), np.nan)
    for i, row in zip(np.flatnonzero(ok), qy, strict=True):
        w[i] = nnls(r, row)[0]
    ok &= np.nansum(w, axis=1) > 0
    props = pd.DataFrame(w[ok], index=st.obs_names[ok], columns=types)
    return props, int((~ok).sum()), []


if __name__ == "__main__":
    raise SystemExit(_runner.main("nnls", f"scipy {scipy.__version__}", fit,
                                  description=__doc__.splitlines()[0]))
