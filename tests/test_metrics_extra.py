"""spotlens._metrics.accuracy: per-type Pearson and presence AUPR on hand-computable examples."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from spotlens._metrics import accuracy

SPOTS = ["s1", "s2", "s3"]
TRUTH = pd.DataFrame({"A": [1.0, 0.0, 0.5], "B": [0.0, 1.0, 0.5]}, index=SPOTS)
PRED = pd.DataFrame({"A": [0.45, 0.3, 0.5], "B": [0.55, 0.7, 0.5]}, index=SPOTS)


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ over positives of the precision at that positive's rank / n_positives (no ties)."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(float)
    precision_at = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float((precision_at * hits).sum() / hits.sum())


def test_perfect_prediction_scores_one():
    scores = accuracy(TRUTH.iloc[::-1], TRUTH)  # rows matched by name
    assert scores["mean_type_pearson"] == pytest.approx(1.0)
    assert scores["aupr_presence"] == 1.0


def test_existing_keys_are_kept():
    scores = accuracy(PRED, TRUTH)
    assert {"pearson_r", "rmse", "mean_jsd", "n_spots", "n_types"} <= set(scores)
    assert scores["n_spots"] == 3 and scores["n_types"] == 2
    assert scores["rmse"] == pytest.approx(np.sqrt(np.mean((PRED - TRUTH).to_numpy() ** 2)))


def test_mean_type_pearson_by_hand():
    # type A: truth (1, 0, .5), deviations (.5, -.5, 0); pred (.45, .3, .5), mean 5/12,
    # deviations (1/30, -7/60, 1/12). cov = .5/30 + .5·7/60 = 0.075, Σt² = .5, Σp² = 78/3600:
    # r = 0.075 / √(.5 · 78/3600) = 4.5/√39. Type B = 1 − A in both tables: the same r.
    r = accuracy(PRED, TRUTH)["mean_type_pearson"]
    assert r == pytest.approx(4.5 / np.sqrt(39))
    assert r == pytest.approx(np.corrcoef(PRED["A"], TRUTH["A"])[0, 1])


def test_mean_type_pearson_is_a_mean_over_types():
    rng = np.random.default_rng(0)
    truth = pd.DataFrame(rng.dirichlet(np.ones(4), 30), columns=list("ABCD"))
    pred = truth + rng.normal(0, 0.1, truth.shape)
    expected = np.mean([np.corrcoef(pred[k], truth[k])[0, 1] for k in truth])
    assert accuracy(pred, truth)["mean_type_pearson"] == pytest.approx(expected)


def test_mean_type_pearson_skips_constant_types(caplog):
    truth = TRUTH.assign(C=0.0)  # C absent everywhere: constant truth
    pred = PRED.assign(C=[0.1, 0.2, 0.3], D=0.25)  # D: constant prediction, not in truth
    with caplog.at_level(logging.INFO, logger="spotlens"):
        r = accuracy(pred, truth)["mean_type_pearson"]
    assert r == pytest.approx(4.5 / np.sqrt(39))  # only A and B are scored
    assert "mean_type_pearson" in caplog.text and "'C'" in caplog.text and "'D'" in caplog.text
    flat = pd.DataFrame({"A": [0.5, 0.5, 0.5], "B": [0.5, 0.5, 0.5]}, index=SPOTS)
    assert np.isnan(accuracy(flat, TRUTH)["mean_type_pearson"])


def test_aupr_presence_by_hand():
    # entries (score, present): s1A (.45, +), s1B (.55, −), s2A (.3, −), s2B (.7, +),
    # s3A (.5, +), s3B (.5, +); 4 present. Thresholds, best first: .7 → P 1, R 1/4;
    # .55 → P 1/2, R 1/4; .5 → P 3/4, R 3/4; .45 → P 4/5, R 1.
    # AP = Σ ΔR · P = 1/4 · 1 + 0 + 1/2 · 3/4 + 1/4 · 4/5 = 0.825.
    assert accuracy(PRED, TRUTH)["aupr_presence"] == pytest.approx(0.825)


def test_aupr_presence_against_a_direct_implementation():
    rng = np.random.default_rng(1)
    truth = pd.DataFrame(rng.dirichlet(np.full(5, 0.3), 40), columns=list("ABCDE"))
    truth[truth < 0.1] = 0.0
    truth = truth.div(truth.sum(axis=1), axis=0)
    pred = pd.DataFrame(rng.dirichlet(np.ones(5), 40), columns=list("ABCDE"))
    expected = _average_precision(truth.to_numpy().ravel() > 0, pred.to_numpy().ravel())
    assert accuracy(pred, truth)["aupr_presence"] == pytest.approx(expected)


def test_aupr_presence_depends_on_ranking_only():
    # a prediction far off in value but ranking every present entry first still scores 1
    pred = pd.DataFrame({"A": [0.6, 0.4, 0.55], "B": [0.4, 0.6, 0.45]}, index=SPOTS)
    scores = accuracy(pred, TRUTH)
    assert scores["aupr_presence"] == 1.0 and scores["rmse"] > 0.1


def test_aupr_presence_undefined_when_every_type_is_present():
    truth = pd.DataFrame({"A": [0.5, 0.2], "B": [0.5, 0.8]}, index=["s1", "s2"])
    assert np.isnan(accuracy(truth, truth)["aupr_presence"])


def test_type_missing_from_prediction_scores_zero():
    # B is absent from pred: scored 0 everywhere, so its entries tie last. Ranking: s1A (.9, +),
    # s3A (.5, +), s2A (.1, −), then s1B −, s2B +, s3B + tied at 0. AP = 1/4 · 1 + 1/4 · 1
    # + 0 · 2/3 + 1/2 · 4/6 = 5/6.
    pred = pd.DataFrame({"A": [0.9, 0.1, 0.5]}, index=SPOTS)
    scores = accuracy(pred, TRUTH)
    assert scores["aupr_presence"] == pytest.approx(5 / 6)
    assert scores["mean_type_pearson"] == pytest.approx(np.corrcoef(pred["A"], TRUTH["A"])[0, 1])
