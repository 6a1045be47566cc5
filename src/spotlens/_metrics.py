"""Accuracy against known truth: proportions, member cells and cell counts per spot."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.spatial.distance import jensenshannon

from ._keys import N_CELLS_KEY, cell_weights_key
from ._validation import InputError

logger = logging.getLogger("spotlens")


def accuracy(pred: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    """Compare estimated with true proportions, matching spots and cell types by name.

    Rows (spots) are matched on the index and only shared spots are scored; columns (cell types)
    are matched by name over their union, a type missing from one table counting as proportion 0
    there (logged). Spots with a NaN in either table (e.g. no counts) are left out (logged).

    Parameters
    ----------
    pred
        ``n_spots × n_types`` estimated proportions, e.g. ``obsm["proportions_spotlens"]``.
    truth
        ``n_spots × n_types`` true proportions (rows sum to 1).

    Returns
    -------
    dict with

    - ``"pearson_r"``: Pearson correlation over all ``spot × type`` entries, flattened (NaN
      when either table is constant, to rounding),
    - ``"rmse"``: root mean squared error over the same entries (proportion units),
    - ``"mean_jsd"``: mean over spots of the Jensen–Shannon divergence between the two
      proportion vectors (base 2, so in ``[0, 1]``; the squared ``jensenshannon`` distance),
    - ``"mean_type_pearson"``: mean over cell types of the Pearson correlation, across spots,
      between the predicted and the true proportion of that type. Types whose true or predicted
      proportion is the same in every scored spot (e.g. absent everywhere, or missing from one
      table) have no correlation and are skipped (logged); NaN if every type is skipped,
    - ``"aupr_presence"``: average precision (area under the precision–recall curve,
      ``sklearn.metrics.average_precision_score``) of the predicted proportions as scores for
      the presence of each type in each spot (true proportion > 0), over all ``spot × type``
      entries; 1 when every present entry is scored above every absent one. NaN when no entry
      or every entry is present (precision–recall is then undefined or trivially 1),
    - ``"n_spots"``, ``"n_types"``: what was scored.

    Raises
    ------
    InputError
        Either argument is not a DataFrame, or they share no spot names or no cell-type names,
        or no shared spot is free of NaN.

    Examples
    --------
    >>> import pandas as pd
    >>> truth = pd.DataFrame({"A": [1.0, 0.5], "B": [0.0, 0.5]}, index=["s1", "s2"])
    >>> accuracy(truth, truth)["rmse"]
    0.0
    >>> accuracy(truth, truth)["aupr_presence"]
    1.0
    """
    for name, df in (("pred", pred), ("truth", truth)):
        if not isinstance(df, pd.DataFrame):
            raise InputError(
                f"{name} must be a DataFrame of proportions (spots × cell types), got "
                f"{type(df).__name__}."
            )
    spots = pred.index.intersection(truth.index, sort=False)
    if len(spots) == 0:
        raise InputError(
            f"The predicted and true proportions share no spot names (pred: "
            f"{list(pred.index[:3])}, truth: {list(truth.index[:3])})."
        )
    types = pred.columns.intersection(truth.columns, sort=False)
    if len(types) == 0:
        raise InputError(
            f"The predicted and true proportions share no cell-type names (pred: "
            f"{list(pred.columns)}, truth: {list(truth.columns)})."
        )
    all_types = pred.columns.union(truth.columns, sort=False)
    if len(all_types) > len(types):
        logger.warning(
            "cell types in only one table are scored as 0 in the other: %s",
            sorted(map(str, all_types.difference(types))),
        )
    p = pred.loc[spots].reindex(columns=all_types, fill_value=0.0).to_numpy(dtype=float)
    t = truth.loc[spots].reindex(columns=all_types, fill_value=0.0).to_numpy(dtype=float)
    keep = ~(np.isnan(p).any(axis=1) | np.isnan(t).any(axis=1))
    if not keep.any():
        raise InputError(
            "Every shared spot has NaN proportions in pred or truth; nothing to score."
        )
    if not keep.all():
        logger.warning("%d spots with NaN proportions are not scored", int((~keep).sum()))
    p, t = p[keep], t[keep]
    with np.errstate(invalid="ignore", divide="ignore"):  # all-zero rows: NaN
        jsd = jensenshannon(p, t, base=2, axis=1) ** 2
    # the one Pearson kernel; a table constant to rounding has no correlation: NaN
    r_col, undefined = pearson_columns(p.reshape(-1, 1), t.reshape(-1, 1))
    r = np.nan if undefined[0] or p.size < 2 else r_col[0]
    return {
        "pearson_r": float(r),
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "mean_jsd": float(np.nanmean(jsd)) if np.isfinite(jsd).any() else float("nan"),
        "mean_type_pearson": _mean_type_pearson(p, t, all_types),
        "aupr_presence": _aupr_presence(p, t),
        "n_spots": int(keep.sum()),
        "n_types": len(all_types),
    }


def _mean_type_pearson(p: np.ndarray, t: np.ndarray, types: pd.Index) -> float:
    """Mean Pearson r of the columns of ``p`` and ``t``, skipping constant columns.

    ``p`` and ``t`` are ``n_spots × n_types``; a column constant in either has no correlation.
    """
    ok = (np.ptp(p, axis=0) > 0) & (np.ptp(t, axis=0) > 0)
    if not ok.all():
        logger.info(
            "cell types with constant true or predicted proportions are left out of "
            "mean_type_pearson: %s", sorted(map(str, types[~ok])),
        )
    if not ok.any():
        return float("nan")
    r, _ = pearson_columns(p[:, ok], t[:, ok])
    return float(np.mean(r))


def pearson_columns(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r between each column of ``a`` and the same column of ``b``.

    ``r_j = Σ_i (a_ij − ā_j)(b_ij − b̄_j) / (‖a_j − ā_j‖ ‖b_j − b̄_j‖)``, clipped to [−1, 1].
    The one Pearson kernel of the package: proportions per cell type (:func:`accuracy`) and
    expression per gene (histology) are scored with it.

    Parameters
    ----------
    a, b
        ``n_obs × n_columns`` (e.g. spots × genes, spots × cell types).

    Returns
    -------
    r
        ``n_columns`` correlations; 0 where either column is constant (r undefined).
    undefined
        ``n_columns`` bool, True where either column is constant: its centred norm is at most
        ``1e-12 · √n_obs · max(1, max |column|)``, rounding error rather than variation.

    Examples
    --------
    >>> a = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0]])
    >>> r, undefined = pearson_columns(a, a[::-1])
    >>> r.round(6).tolist(), undefined.tolist()
    ([-1.0, 0.0], [False, True])
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    a_norm = np.sqrt((ac**2).sum(axis=0))
    b_norm = np.sqrt((bc**2).sum(axis=0))
    tol = 1e-12 * np.sqrt(a.shape[0])
    undefined = (a_norm <= tol * np.maximum(1.0, np.abs(a).max(axis=0))) | (
        b_norm <= tol * np.maximum(1.0, np.abs(b).max(axis=0))
    )
    denom = np.where(undefined, 1.0, a_norm * b_norm)
    r = np.where(undefined, 0.0, (ac * bc).sum(axis=0) / denom)
    return np.clip(r, -1.0, 1.0), undefined


def _aupr_presence(p: np.ndarray, t: np.ndarray) -> float:
    """Average precision of the scores ``p`` for the labels ``t > 0``, over all entries."""
    from sklearn.metrics import average_precision_score

    present = (t > 0).ravel()
    if present.all() or not present.any():
        return float("nan")
    return float(average_precision_score(present, p.ravel()))


def member_recall(
    spatial: AnnData,
    reference: AnnData,
    *,
    key: str = cell_weights_key(),
    n_cells_key: str = N_CELLS_KEY,
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
