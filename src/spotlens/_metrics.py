"""Accuracy of estimated cell-type proportions against known ones."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon

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

    - ``"pearson_r"``: Pearson correlation over all ``spot × type`` entries, flattened,
    - ``"rmse"``: root mean squared error over the same entries (proportion units),
    - ``"mean_jsd"``: mean over spots of the Jensen–Shannon divergence between the two
      proportion vectors (base 2, so in ``[0, 1]``; the squared ``jensenshannon`` distance),
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
    with np.errstate(invalid="ignore", divide="ignore"):  # constant input or all-zero rows: NaN
        jsd = jensenshannon(p, t, base=2, axis=1) ** 2
        r = np.corrcoef(p.ravel(), t.ravel())[0, 1] if p.size > 1 else np.nan
    return {
        "pearson_r": float(r),
        "rmse": float(np.sqrt(np.mean((p - t) ** 2))),
        "mean_jsd": float(np.nanmean(jsd)) if np.isfinite(jsd).any() else float("nan"),
        "n_spots": int(keep.sum()),
        "n_types": len(all_types),
    }
