"""Fine-tuning the encoder's head: the split encoder, the trainable head, training and reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")

from spotlens._validation import InputError  # noqa: E402
from spotlens.histology._encoders import Encoder, get_encoder  # noqa: E402
from spotlens.histology._head import pre_head_encoder  # noqa: E402
from spotlens.histology._models import TileHead, section_zscore  # noqa: E402
from spotlens.histology._normalize import standardize_section  # noqa: E402
from spotlens.histology import ExpressionModel, Section, TrainConfig  # noqa: E402

HER2ST = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


@pytest.fixture(scope="module")
def effnet():
    return get_encoder("efficientnet-lite0")


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(6, 28, 28, 3), dtype=np.uint8)
    return np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)  # 112 px, structure at 4 px


@pytest.mark.slow
def test_pretrained_head_with_folded_batch_norm_reproduces_the_encoder(effnet, tiles):
    """Unpooled trunk maps + the folded head = EfficientNet-Lite0's own 1280 features."""
    trunk, head = pre_head_encoder(effnet, pool=1)
    assert trunk.name == "efficientnet-lite0-prehead-pool1" and trunk.dim == 320 * 49
    assert trunk.identity != effnet.identity  # its own feature-cache entries
    tile_head = TileHead(head["weight"], head["bias"], n_scales=1, cells=head["cells"])
    with torch.no_grad():
        ours = tile_head(torch.as_tensor(trunk.encode(tiles))).numpy()
    np.testing.assert_allclose(ours, effnet.encode(tiles), atol=1e-4, rtol=1e-3)
    # the default 2 × 2 pooling of the 7 × 7 map (what training reads) stays close to it
    trunk2, head2 = pre_head_encoder(effnet)
    assert head2["cells"] == 16 and trunk2.dim == 320 * 16
    with torch.no_grad():
        pooled = TileHead(head2["weight"], head2["bias"], n_scales=1,
                          cells=16)(torch.as_tensor(trunk2.encode(tiles))).numpy()
    r = np.corrcoef(pooled.ravel(), effnet.encode(tiles).ravel())[0, 1]
    assert r > 0.9


def test_only_efficientnet_lite0_has_a_head_to_fine_tune():
    other = Encoder(name="mine", module=torch.nn.Identity(), dim=3, input_size=32,
                    weights_id="x")
    with pytest.raises(InputError, match="efficientnet-lite0.*finetune_head=False"):
        pre_head_encoder(other)


def test_section_zscore_is_standardize_section_and_keeps_gradients_finite():
    rng = np.random.default_rng(1)
    h = rng.normal(2.0, 3.0, size=(50, 6)).astype(np.float32)
    h[:, 2] = 0.0  # a unit the ReLU6 switched off in the whole section
    t = torch.tensor(h, requires_grad=True)
    z = section_zscore(t)
    np.testing.assert_allclose(z.detach().numpy(), standardize_section(h), atol=1e-5)
    (z * torch.arange(6.0)).sum().backward()
    assert torch.isfinite(t.grad).all()


@pytest.fixture(scope="module")
def real_maps(effnet):
    """The first 60 spots of her2st C2: trunk maps of 100 µm tiles at one scale, top genes."""
    if not HER2ST.exists():
        pytest.skip("shared her2st data folder is absent")
    import anndata as ad

    from spotlens.histology import spot_tiles
    from spotlens.histology._metrics import section_log_expression

    adata = ad.read_h5ad(HER2ST / "C2.h5ad")[:60].copy()
    trunk, head = pre_head_encoder(effnet)
    maps = trunk.encode(spot_tiles(adata, HER2ST / "C2_HE_fullres.jpg", tile_um=100,
                                   out_px=224))
    counts = np.asarray(adata.X.sum(axis=0)).ravel()
    genes = list(adata.var_names[np.argsort(-counts)[:20]])
    y = section_log_expression(adata, genes).astype(np.float32)
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    return genes, head, [Section("C2a", maps[:30], xy[:30], y[:30]),
                         Section("C2b", maps[30:], xy[30:], y[30:])]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "epochs", "bar"), [("attention", 150, 0.8), ("graph", 30, 0.3)])
def test_fine_tuned_head_learns_real_tiles_and_round_trips(kind, epochs, bar, real_maps,
                                                           tmp_path):
    genes, head, sections = real_maps
    cfg = TrainConfig(model=kind, epochs=epochs, hidden=64, dropout=0.0, lr=3e-3, head_lr=3e-3,
                      weight_decay=0.0, expression_rank=None, finetune_head=True)
    model = ExpressionModel(genes, cfg).fit(sections, head=head, progress=False)
    assert model.finetunes_head
    moved = (model._head.weight.detach()[0] - torch.as_tensor(head["weight"])).abs().max()
    assert moved > 1e-3  # the head learned, it did not stay the pretrained one
    for s in sections:  # predicting = head features, z-scored within the section, then the model
        features = standardize_section(model.head_features(s.features))
        fitted = model.predict(Section(s.name, features, s.coords))
        r = [np.corrcoef(fitted[:, j], s.expression[:, j])[0, 1]
             for j in range(len(genes)) if s.expression[:, j].std() > 0]
        # attention fits its own training spots; the graph model (smoothing over 30-spot
        # graphs) learns them too, less closely
        assert np.mean(r) > bar
    model.save(tmp_path / "model.pt")
    again = ExpressionModel.load(tmp_path / "model.pt")
    s = sections[1]
    np.testing.assert_allclose(again.head_features(s.features), model.head_features(s.features),
                               rtol=1e-6)
    features = standardize_section(again.head_features(s.features))
    np.testing.assert_allclose(again.predict(Section("x", features, s.coords)),
                               model.predict(Section("x", features, s.coords)), rtol=1e-5)


def test_fine_tuning_bad_input(real_maps):
    genes, head, sections = real_maps
    with pytest.raises(InputError, match="finetune_head must be True or False"):
        TrainConfig(finetune_head="yes")
    with pytest.raises(InputError, match="head_lr must be a learning rate > 0"):
        TrainConfig(head_lr=0)
    with pytest.raises(InputError, match="lr must be a learning rate > 0"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(InputError, match="needs the encoder's pretrained head"):
        ExpressionModel(genes, TrainConfig(finetune_head=True, epochs=1)).fit(
            sections, progress=False)
    with pytest.raises(InputError, match="set TrainConfig\\(finetune_head=True\\)"):
        ExpressionModel(genes, TrainConfig(epochs=1)).fit(sections, head=head, progress=False)
    tune = TrainConfig(epochs=2, hidden=8, finetune_head=True)
    pooled = [Section(s.name, s.features[:, :1280], s.coords, s.expression) for s in sections]
    with pytest.raises(InputError, match="last-block maps"):
        ExpressionModel(genes, tune).fit(pooled, head=head, progress=False)
    frozen = ExpressionModel(genes, TrainConfig(epochs=2, hidden=8)).fit(pooled, progress=False)
    with pytest.raises(InputError, match="no fine-tuned head"):
        frozen.head_features(sections[0].features)
    tuned = ExpressionModel(genes, tune).fit(sections, head=head, progress=False)
    with pytest.raises(InputError, match="head expects n_spots × 5120"):
        tuned.head_features(sections[0].features[:, :100])
    with pytest.raises(InputError, match="reads 1280 head features.*head_features"):
        tuned.predict(sections[0])  # maps given where the head's features are expected
