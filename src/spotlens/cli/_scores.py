"""Scores of the cell-level step against spots made of known reference cells (``demo``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._validation import InputError


def member_recall(
    spatial: AnnData,
    reference: AnnData,
    *,
    key: str = "cell_weights_spotlens",
    n_cells_key: str = "n_cells",
    spot_key: str = "spot",
) -> dict[str, float]:
    """Recall of each spot's true member cells among its highest-weighted reference cells.

    For spot ``i`` with ``n_i`` true cells, the ``n_i`` reference cells with the largest weight
    in row ``i`` of ``obsm[key]`` are taken (fewer if fewer have weight); the recall is the
    fraction of ``n_i`` of them whose ``reference.obs[spot_key]`` is the spot's name. It is
    averaged over the spots with ``n_i > 0``. The random baseline is the same quantity for
    ``n_i`` cells drawn at random from the reference, ``n_i / n_cells``, averaged likewise.

    Parameters
    ----------
    spatial
        Spatial AnnData after :func:`spotlens.deconv.cell_level` (columns = reference cells),
        with the true number of cells per spot in ``obs[n_cells_key]``.
    reference
        The reference, with the spot each cell belongs to in ``obs[spot_key]``.
    key, n_cells_key, spot_key
        Where the weights, the true cell numbers and the cells' spots are.

    Returns
    -------
    dict with ``"recall"``, ``"random"`` (the baseline) and ``"n_spots"`` (spots scored).

    Raises
    ------
    InputError
        A key is missing, the weights are over metacells, or their columns are not the
        reference's cells.
    """
    for where, adata, name in (("spatial.obsm", spatial.obsm, key),
                               ("spatial.obs", spatial.obs, n_cells_key),
                               ("reference.obs", reference.obs, spot_key)):
        if name not in adata:
            raise InputError(f"{where} has no {name!r} to score the cell level with.")
    w = sparse.csr_matrix(spatial.obsm[key])
    if w.shape != (spatial.n_obs, reference.n_obs):
        raise InputError(
            f"obsm[{key!r}] is {w.shape[0]} × {w.shape[1]}, not spots × reference cells "
            f"({spatial.n_obs} × {reference.n_obs}); metacell weights cannot be scored per cell."
        )
    n_true = np.round(spatial.obs[n_cells_key].to_numpy(dtype=np.float64)).astype(np.int64)
    spot_of_cell = reference.obs[spot_key].astype(str).to_numpy()
    names = np.asarray(spatial.obs_names).astype(str)
    recall = []
    for i in np.flatnonzero(n_true > 0):
        start, stop = w.indptr[i], w.indptr[i + 1]
        top = w.indices[start:stop][np.argsort(-w.data[start:stop], kind="stable")][: n_true[i]]
        recall.append(np.count_nonzero(spot_of_cell[top] == names[i]) / n_true[i])
    scored = n_true[n_true > 0]
    return {
        "recall": float(np.mean(recall)) if recall else float("nan"),
        "random": float(np.mean(scored / reference.n_obs)) if len(scored) else float("nan"),
        "n_spots": len(recall),
    }


def count_error(pred: pd.DataFrame, truth: pd.DataFrame) -> float:
    """Mean absolute error of cells per spot and type, matching spots and types by name.

    Types missing from one table count as 0 cells there; only spots in both are scored.

    Raises
    ------
    InputError
        The tables share no spot names.
    """
    spots = pred.index.intersection(truth.index, sort=False)
    if len(spots) == 0:
        raise InputError("The estimated and true cell counts share no spot names.")
    types = truth.columns.union(pred.columns, sort=False)
    a = pred.loc[spots].reindex(columns=types, fill_value=0).to_numpy(dtype=np.float64)
    b = truth.loc[spots].reindex(columns=types, fill_value=0).to_numpy(dtype=np.float64)
    return float(np.mean(np.abs(a - b)))
