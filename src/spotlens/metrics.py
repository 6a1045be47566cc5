"""Scores against ground truth: the synthetic factories and the bundled example carry it.

- :func:`accuracy`: estimated vs true proportions (Pearson r, RMSE, Jensen–Shannon divergence,
  per-type Pearson r, presence AUPR).
- :func:`member_recall`: how many of each spot's true cells the cell level ranks on top.
- :func:`count_error`: error of the estimated cells per spot and type.
- :func:`pearson_columns`: the column-wise Pearson kernel the scores use.

Example
-------
>>> import pandas as pd
>>> from spotlens.metrics import accuracy
>>> truth = pd.DataFrame({"A": [1.0, 0.5], "B": [0.0, 0.5]}, index=["s1", "s2"])
>>> accuracy(truth, truth)["rmse"]
0.0
"""

from ._metrics import accuracy, count_error, member_recall, pearson_columns

__all__ = ["accuracy", "count_error", "member_recall", "pearson_columns"]
