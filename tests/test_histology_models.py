"""Expression-from-image models: loss terms, overfitting real tiles, persistence, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spotlens._validation import InputError  # noqa: E402
from spotlens.histology._models import (  # noqa: E402
    GraphAttentionLayer,
    SpotAttention,
    spot_attention_loss,
)
from spotlens.histology import ExpressionModel, Section, TrainConfig  # noqa: E402

HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


def _synthetic(n=120, d=16, g=8, seed=0, name="s"):
    """A section whose expression is one fixed function of its (spatially smooth) features."""
    w = np.random.default_rng(12345).normal(size=(d, g))  # the same relation in every section
    rng = np.random.default_rng(seed)
    xy = np.stack(np.meshgrid(np.arange(12), np.arange(n // 12)), -1).reshape(-1, 2)[:n]
    centres = rng.normal(size=(4, d))
    anchors = rng.uniform(0, 12, size=(4, 2))
    near = np.exp(-((xy[:, None, :] - anchors[None]) ** 2).sum(-1) / 8)
    x = (near / near.sum(1, keepdims=True)) @ centres + 0.3 * rng.normal(size=(n, d))
    y = np.tanh(x @ w / 4) + 0.05 * rng.normal(size=(n, g))
    return Section(name, x.astype(np.float32), xy.astype(float), y.astype(np.float32))


def test_loss_has_both_terms_and_both_heads_learn():
    torch.manual_seed(0)
    net = SpotAttention(6, 3, hidden=8, dropout=0.0)
    x, y = torch.randn(10, 6), torch.randn(10, 3)
    direct, attended = net(x, x, y, exclude=torch.eye(10, dtype=torch.bool))
    loss = spot_attention_loss(y, direct, attended)
    expected = ((direct - y) ** 2).mean() + ((attended - y) ** 2).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    # the attention term reaches G (only it uses G), the direct term reaches the head
    assert net.g.weight.grad.abs().sum() > 0
    assert net.head.weight.grad.abs().sum() > 0


def test_attention_never_reads_an_excluded_spot():
    torch.manual_seed(0)
    net = SpotAttention(4, 2, hidden=8, dropout=0.0)
    x = torch.randn(5, 4)
    bank_y = torch.zeros(5, 2)
    bank_y[0] = 1000.0  # only spot 0 carries signal
    exclude = torch.zeros(5, 5, dtype=torch.bool)
    exclude[:, 0] = True
    _, attended = net(x, x, bank_y, exclude=exclude)
    assert torch.all(attended == 0)


def test_graph_attention_weights_are_a_softmax_over_neighbours():
    torch.manual_seed(0)
    layer = GraphAttentionLayer(3, 3)
    with torch.no_grad():
        layer.w.weight.copy_(torch.eye(3))
    h = torch.randn(4, 3)
    edges = torch.tensor([[0, 0, 1, 1, 2, 3], [0, 1, 1, 0, 2, 3]])  # (target, source)
    out = layer(h, edges)
    # nodes 2 and 3 only see themselves: output equals their own (identity-mapped) features
    assert torch.allclose(out[2:], h[2:], atol=1e-6)
    # node 0 averages nodes 0 and 1 with weights in (0, 1): it lies between them
    lo, hi = torch.minimum(h[0], h[1]), torch.maximum(h[0], h[1])
    assert torch.all(out[0] >= lo - 1e-6) and torch.all(out[0] <= hi + 1e-6)


# the graph model decodes through neighbour averaging (GCN), so per-spot noise in the features
# is partly lost: it is held to a lower bar than the attention model; untrained models give ~0
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "bar"), [("attention", 0.6), ("graph", 0.4)])
def test_models_learn_a_planted_relation(kind, bar):
    train = [_synthetic(seed=1, name="a"), _synthetic(seed=2, name="b")]
    test = _synthetic(seed=3, name="c")
    cfg = TrainConfig(model=kind, epochs=150, hidden=32, latent=16, dropout=0.0, lr=1e-2,
                      weight_decay=0.0)
    model = ExpressionModel([f"g{i}" for i in range(8)], cfg).fit(train, progress=False)
    pred = model.predict(test)
    r = [np.corrcoef(pred[:, j], test.expression[:, j])[0, 1] for j in range(8)]
    assert np.mean(r) > bar


@pytest.mark.parametrize("kind", ["attention", "graph"])
def test_one_seed_gives_the_same_model_on_several_threads(kind):
    train = [_synthetic(n=240, seed=1, name="a"), _synthetic(n=240, seed=2, name="b")]
    test = _synthetic(n=240, seed=3, name="c")
    cfg = TrainConfig(model=kind, epochs=15, hidden=32, latent=16, dropout=0.3, seed=7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # reductions split over threads are where runs could differ
    try:
        preds = [ExpressionModel([f"g{i}" for i in range(8)], cfg).fit(train, progress=False)
                 .predict(test) for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(preds[0], preds[1])


@pytest.mark.slow
@pytest.mark.skipif(not HER2ST.exists(), reason="shared her2st data folder is absent")
def test_attention_model_overfits_a_tiny_real_subset():
    import anndata as ad

    from spotlens.histology import spot_tiles
    from spotlens.histology._features import colour_features
    from spotlens.histology._metrics import section_log_expression

    adata = ad.read_h5ad(HER2ST / "C2.h5ad")[:60].copy()
    tiles = spot_tiles(adata, HER2ST / "C2_HE_fullres.jpg", out_px=64)
    x = colour_features(tiles)
    counts = np.asarray(adata.X.sum(axis=0)).ravel()
    genes = list(adata.var_names[np.argsort(-counts)[:20]])
    y = section_log_expression(adata, genes).astype(np.float32)
    half = Section("C2a", x[:30], adata.obsm["spatial"][:30], y[:30])
    other = Section("C2b", x[30:], adata.obsm["spatial"][30:], y[30:])
    cfg = TrainConfig(model="attention", epochs=400, hidden=64, dropout=0.0, lr=3e-3,
                      weight_decay=0.0)
    model = ExpressionModel(genes, cfg).fit([half, other], progress=False)
    fitted = model.predict(half)
    r = [np.corrcoef(fitted[:, j], y[:30, j])[0, 1] for j in range(20) if y[:30, j].std() > 0]
    assert np.mean(r) > 0.8  # a model that can learn fits its own training spots


def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    train = [_synthetic(seed=1, name="a"), _synthetic(seed=2, name="b")]
    test = _synthetic(seed=3, name="c")
    model = ExpressionModel([f"g{i}" for i in range(8)],
                            TrainConfig(epochs=5, hidden=16)).fit(train, progress=False)
    model.save(tmp_path / "model.pt")
    again = ExpressionModel.load(tmp_path / "model.pt")
    np.testing.assert_allclose(again.predict(test), model.predict(test), rtol=1e-6)
    assert again.genes == model.genes and again.config == model.config
    assert not list(tmp_path.glob(".*tmp*"))


@pytest.mark.slow
def test_training_resumes_from_its_checkpoint(tmp_path):
    train = [_synthetic(seed=1, name="a"), _synthetic(seed=2, name="b")]
    val = _synthetic(seed=4, name="v")
    genes = [f"g{i}" for i in range(8)]
    ckpt = tmp_path / "ckpt.pt"
    first = ExpressionModel(genes, TrainConfig(epochs=20, hidden=16, patience=1000))
    first.fit(train, validation=val, checkpoint=ckpt, progress=False)
    assert ckpt.exists() and len(first.history) == 20
    # an interrupted run asked for 30 epochs continues at 21 instead of starting again
    second = ExpressionModel(genes, TrainConfig(epochs=30, hidden=16, patience=1000))
    second.fit(train, validation=val, checkpoint=ckpt, progress=False)
    assert [h["epoch"] for h in second.history] == list(range(1, 31))


@pytest.mark.slow
def test_validation_keeps_the_best_epoch():
    train = [_synthetic(seed=1, name="a")]
    val = _synthetic(seed=5, name="v")
    model = ExpressionModel([f"g{i}" for i in range(8)],
                            TrainConfig(epochs=60, hidden=16, patience=1000,
                                        expression_rank=None))  # the network's own output
    model.fit(train, validation=val, progress=False)
    scores = [h["val_pearson"] for h in model.history]
    assert model.best_epoch == int(np.argmax(scores)) + 1
    final = np.mean([np.corrcoef(model.predict(val)[:, j], val.expression[:, j])[0, 1]
                     for j in range(8)])
    assert final == pytest.approx(max(scores), abs=1e-5)


def test_bad_input(tmp_path):
    with pytest.raises(InputError, match="model must be 'attention' or 'graph'"):
        TrainConfig(model="cnn")
    with pytest.raises(InputError, match="epochs must be a positive integer"):
        TrainConfig(epochs=0)
    genes = [f"g{i}" for i in range(8)]
    s = _synthetic()
    with pytest.raises(InputError, match="has no expression"):
        ExpressionModel(genes).fit([Section("x", s.features, s.coords, None)], progress=False)
    with pytest.raises(InputError, match="expected"):
        ExpressionModel(genes[:3]).fit([s], progress=False)
    with pytest.raises(InputError, match="not trained"):
        ExpressionModel(genes).predict(s)
    model = ExpressionModel(genes, TrainConfig(epochs=2, hidden=8)).fit([s], progress=False)
    with pytest.raises(InputError, match="features per spot"):
        model.predict(Section("w", s.features[:, :5], s.coords))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(Exception, match="not a spotlens expression model|pickle|load"):
        ExpressionModel.load(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="No model file"):
        ExpressionModel.load(tmp_path / "missing.pt")
