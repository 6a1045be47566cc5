"""Reduced-rank expression output: exact projection, chosen by held-out sections, persisted."""

from __future__ import annotations

import numpy as np
import pytest

from spotlens._validation import InputError
from spotlens.histology._baseline import RidgeBaseline
from spotlens.histology._metrics import pearson_per_gene
from spotlens.histology._rank import DEFAULT_RANKS, ExpressionAxes, candidate_ranks


def _low_rank_sections(n_sections=4, n=150, d=30, g=60, rank=3, noise=2.0, seed=0):
    """Expression = rank-3 function of the features + heavy per-gene noise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, rank))
    loadings = rng.normal(size=(rank, g))
    xs, ys, clean = {}, {}, {}
    for i in range(n_sections):
        x = rng.normal(size=(n, d))
        signal = x @ w @ loadings / np.sqrt(d)
        xs[f"s{i}"] = x
        clean[f"s{i}"] = signal + 5.0
        ys[f"s{i}"] = signal + 5.0 + noise * rng.normal(size=(n, g))
    return xs, ys, clean


def test_projection_is_the_orthogonal_projection_onto_the_leading_axes():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(80, 3)) @ rng.normal(size=(3, 12)) * rng.uniform(0.5, 3, 12) + 2.0
    axes = ExpressionAxes.fit(y)
    assert axes.axes.shape == (3, 12)  # a rank-3 matrix has 3 axes
    np.testing.assert_allclose(axes.axes @ axes.axes.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(axes.project(y, 3), y, atol=1e-9)  # in the span: unchanged
    pred = y + rng.normal(size=y.shape)
    once = axes.project(pred, 2)
    np.testing.assert_allclose(axes.project(once, 2), once, atol=1e-9)  # idempotent
    m, c = axes.linear_map(2)
    np.testing.assert_allclose(pred @ m + c, once, atol=1e-9)  # the folded linear form
    assert axes.project(pred, None) is pred and axes.project(pred, 12) is pred


def test_candidate_ranks_stay_below_genes_and_spots():
    assert candidate_ranks(250, 700) == [5, 10, 20, 50, None]
    assert candidate_ranks(8, 120) == [5, None]
    assert candidate_ranks(60, 12) == [5, 10, None]


def test_reduced_rank_ridge_beats_free_ridge_on_noisy_low_rank_expression():
    xs, ys, clean = _low_rank_sections()
    train = {k: v for k, v in xs.items() if k != "s3"}
    free = RidgeBaseline().fit(train, {k: ys[k] for k in train})
    reduced = RidgeBaseline(ranks=DEFAULT_RANKS).fit(train, {k: ys[k] for k in train})
    assert free.rank_ is None and reduced.rank_ == 5  # the smallest rank >= the true 3
    assert list(reduced.rank_scores_.index) == ["5", "10", "20", "50", "full"]
    r_free = pearson_per_gene(free.predict(xs["s3"]), clean["s3"])[0].mean()
    r_reduced = pearson_per_gene(reduced.predict(xs["s3"]), clean["s3"])[0].mean()
    assert r_reduced > r_free + 0.02
    # the projection is folded into the coefficients: same as projecting the free prediction
    axes = ExpressionAxes.fit(np.vstack([ys[k] for k in train]))
    same_alpha = RidgeBaseline(alpha=reduced.alpha_).fit(train, {k: ys[k] for k in train})
    np.testing.assert_allclose(reduced.predict(xs["s3"]),
                               axes.project(same_alpha.predict(xs["s3"]), 5), atol=1e-8)


def test_rank_arguments_are_checked():
    with pytest.raises(InputError, match="expression_rank must be"):
        RidgeBaseline(ranks=[0])
    with pytest.raises(InputError, match="expression_rank must be"):
        RidgeBaseline(ranks=["auto"])
    with pytest.raises(InputError, match="drop alpha= or ranks="):
        RidgeBaseline(alpha=1.0, ranks=[5])


def _network_sections():
    pytest.importorskip("torch")
    from spotlens.histology import Section

    xs, ys, _ = _low_rank_sections(n=96, d=12, g=30, noise=1.5, seed=3)
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(8)), -1).reshape(-1, 2).astype(float)
    return {k: Section(k, xs[k].astype(np.float32), grid, ys[k].astype(np.float32)) for k in xs}


@pytest.mark.slow
def test_network_rank_is_chosen_on_validation_and_survives_save_load(tmp_path):
    secs = _network_sections()
    from spotlens.histology import ExpressionModel, Section, TrainConfig

    genes = [f"g{i}" for i in range(30)]
    cfg = TrainConfig(model="attention", epochs=40, hidden=32, dropout=0.0, lr=1e-2)
    model = ExpressionModel(genes, cfg).fit([secs["s0"], secs["s1"]],
                                            validation=secs["s2"], progress=False)
    assert set(model.rank_scores) == {"5", "10", "20", "full"}
    best = max(model.rank_scores, key=model.rank_scores.get)
    assert model.rank_ == (None if best == "full" else int(best))
    test = Section("s3", secs["s3"].features, secs["s3"].coords)
    model.save(tmp_path / "m.pt")
    again = ExpressionModel.load(tmp_path / "m.pt")
    assert again.rank_ == model.rank_
    np.testing.assert_allclose(again.predict(test), model.predict(test), rtol=1e-5, atol=1e-5)


def test_network_with_a_fixed_rank_is_the_free_network_projected():
    secs = _network_sections()
    from spotlens.histology import ExpressionModel, Section, TrainConfig

    genes = [f"g{i}" for i in range(30)]
    train = [secs["s0"], secs["s1"]]
    test = Section("s3", secs["s3"].features, secs["s3"].coords)
    free = ExpressionModel(genes, TrainConfig(epochs=10, hidden=16, expression_rank=None))
    free.fit(train, progress=False)
    ranked = ExpressionModel(genes, TrainConfig(epochs=10, hidden=16, expression_rank=4))
    ranked.fit(train, progress=False)
    assert free.rank_ is None and ranked.rank_ == 4
    axes = ExpressionAxes.fit(np.vstack([s.expression for s in train]))
    # same seed, same training: the ranked model is the free one projected onto 4 axes
    np.testing.assert_allclose(ranked.predict(test), axes.project(free.predict(test), 4),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="expression_rank must be"):
        TrainConfig(expression_rank=-1)
