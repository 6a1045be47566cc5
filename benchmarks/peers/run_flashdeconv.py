"""FlashDeconv (PyPI ``flashdeconv`` 0.2.0) with its defaults.

``flashdeconv.tl.deconvolve(spatial, reference, cell_type_key=labels_key)`` with every argument
at its default (log-CPM preprocessing, 2,000 HVGs + 50 markers per type, deterministic
"expected" gene weighting, k = 6 nearest-neighbour spatial graph on ``obsm['spatial']``,
``lambda_spatial="auto"``, ``random_state=0``). It intersects genes itself
(``flashdeconv.io.align_genes``) and neither drops spots nor types. Proportions are read from
``obsm['flashdeconv']``.

The venv pins ``numpy<2.4`` (flashdeconv's own requirement; numba 0.63 does not support 2.4).
``seconds`` includes numba's just-in-time compilation on a first run in a fresh venv.

    python run_flashdeconv.py --spatial S.h5ad --reference R.h5ad --labels-key cell_type --out DIR
"""

from __future__ import annotations

import _runner
import flashdeconv as fd
import numpy as np
import pandas as pd


def fit(st, ref, labels_key, notes):
    fd.tl.deconvolve(st, ref, cell_type_key=labels_key)
    props = st.obsm["flashdeconv"]
    if not isinstance(props, pd.DataFrame):
        types = st.uns["flashdeconv_params"]["cell_type_names"]
        props = pd.DataFrame(np.asarray(props), index=st.obs_names, columns=types)
    p = st.uns["flashdeconv_params"]
    notes.append(f"{p['n_genes_used']} genes used, lambda_spatial={p['lambda_spatial']:.4g}, "
                 f"converged={p['converged']} after {p['n_iterations']} iterations")
    return props, 0, []


if __name__ == "__main__":
    raise SystemExit(_runner.main("flashdeconv", fd.__version__, fit,
                                  description=__doc__.splitlines()[0]))
