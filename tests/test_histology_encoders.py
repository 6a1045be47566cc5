"""Encoders, feature cache, colour features, ridge baseline and metrics for expression from H&E."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

import anndata as ad  # noqa: E402
from scipy import sparse, stats  # noqa: E402

from spotlens._validation import InputError  # noqa: E402
from spotlens.histology._baseline import RidgeBaseline  # noqa: E402
from spotlens.histology._encoders import (  # noqa: E402
    Encoder,
    ResNet50Features,
    available_encoders,
    get_encoder,
)
from spotlens.histology._features import (  # noqa: E402
    COLOUR_FEATURE_NAMES,
    HE_STAIN_MATRIX,
    colour_features,
    tile_cache_key,
    tile_features,
)
from spotlens.histology._metrics import (  # noqa: E402
    evaluate,
    log_normalize,
    section_log_expression,
    select_target_genes,
)


def _tiles(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


class TinyNet(torch.nn.Module):
    """A small encoder: conv -> ReLU -> global average pool -> n × 8."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class MapNet(torch.nn.Module):
    """Returns a feature map (n × 8 × h × w), not n × d."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet():
    return get_encoder("efficientnet-lite0")


def test_efficientnet_lite0_offline_features_are_deterministic(effnet):
    assert "efficientnet-lite0" in available_encoders()
    assert (effnet.dim, effnet.input_size, effnet.name) == (1280, 224, "efficientnet-lite0")
    tiles = _tiles(2)  # 64 px, resized to 224 inside
    first, second = effnet.encode(tiles), effnet.encode(tiles)
    assert first.shape == (2, 1280) and first.dtype == np.float32
    assert np.all(np.isfinite(first)) and np.all(first >= 0)  # pooled ReLU6 activations
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first[0], first[1])  # different tiles, different features
    # ImageNet weights, not a random init: the classifier head is the pretrained one
    head = effnet.module.net._fc.weight
    assert head.shape == (1000, 1280) and float(head.abs().mean()) > 0.01


def test_preprocess_normalises_with_imagenet_statistics(effnet):
    white = np.full((1, 224, 224, 3), 255, np.uint8)
    batch = effnet.preprocess(white)
    expected = (1 - np.array(effnet.mean)) / np.array(effnet.std)
    np.testing.assert_allclose(batch[0, :, 5, 5].numpy(), expected, rtol=1e-6)
    with pytest.raises(InputError, match="uint8"):
        effnet.preprocess(white.astype(np.float32))
    with pytest.raises(InputError, match="n_tiles × H × W × 3"):
        effnet.preprocess(white[0])


# --------------------------------------------------------------------------------------------
# ResNet-50 with torchvision parameter names
# --------------------------------------------------------------------------------------------


def _torchvision_resnet50_keys():
    """torchvision resnet50 state_dict keys, written out from its naming scheme."""

    def bn(prefix):
        return [f"{prefix}.{s}" for s in
                ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = ["conv1.weight", *bn("bn1")]
    for layer, blocks in enumerate([3, 4, 6, 3], start=1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            for i in (1, 2, 3):
                keys += [f"{p}.conv{i}.weight", *bn(f"{p}.bn{i}")]
            if b == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = ResNet50Features().eval()
    # default (Kaiming) conv init, random BatchNorm statistics and affine terms: activations
    # stay O(1) through the 50 layers (tiny weights everywhere would underflow to denormals)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith("num_batches_tracked") or tensor.ndim != 1:
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("weight") and not name.startswith("fc"):
                tensor.normal_(1.0, 0.1)
            else:
                tensor.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("resnet") / "resnet50_small_random.pth"
    state = net.state_dict()
    torch.save(state, path)
    return path, state, net


def test_resnet50_architecture_matches_torchvision_names_and_size():
    net = ResNet50Features()
    state = net.state_dict()
    assert sorted(state) == sorted(_torchvision_resnet50_keys())
    assert sum(p.numel() for p in net.parameters()) == 25_557_032  # torchvision's count
    assert tuple(state["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)
    assert net.layer2[0].conv2.stride == (2, 2)  # v1.5: stride on the 3×3 convolution
    assert tuple(state["layer4.0.downsample.0.weight"].shape) == (2048, 1024, 1, 1)
    assert tuple(state["fc.weight"].shape) == (1000, 2048)


@pytest.mark.slow
def test_resnet50_loads_checkpoint_strictly_and_reproduces_features(resnet_checkpoint, tmp_path):
    path, state, net = resnet_checkpoint
    enc = get_encoder("resnet50", weights=path, input_size=64)
    assert (enc.dim, enc.name) == (2048, "resnet50")
    loaded = enc.module.state_dict()
    for key in ("conv1.weight", "layer3.5.bn3.running_var", "fc.bias"):
        torch.testing.assert_close(loaded[key], state[key])
    tiles = _tiles(2, size=64, seed=1)
    feats = enc.encode(tiles)
    assert feats.shape == (2, 2048) and np.all(np.isfinite(feats)) and feats.std() > 1e-3
    with torch.inference_mode():
        direct = net(enc.preprocess(tiles).contiguous()).numpy()
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-5)

    # the forms checkpoints come in: {"state_dict": ...}, a DataParallel "module." prefix,
    # no classifier head; all load to the same weights
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()
                              if not k.startswith("fc.")}, "epoch": 3}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    enc2 = get_encoder("resnet50", weights=tmp_path / "wrapped.pth", input_size=64)
    torch.testing.assert_close(enc2.module.state_dict()["layer4.2.conv3.weight"],
                               state["layer4.2.conv3.weight"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", r"missing keys \['layer3\.2\.bn2\.weight'\]"),
        ("unexpected", r"unexpected keys \['layer5\.0\.conv1\.weight'\]"),
        ("shape", r"'layer1\.0\.conv1\.weight' has shape \(64, 64, 3, 3\)"),
    ],
)
def test_resnet50_mismatched_checkpoint_names_the_key(resnet_checkpoint, tmp_path, edit, message):
    _, state, _ = resnet_checkpoint
    bad = dict(state)
    if edit == "missing":
        del bad["layer3.2.bn2.weight"]
    elif edit == "unexpected":
        bad["layer5.0.conv1.weight"] = torch.zeros(1)
    else:
        bad["layer1.0.conv1.weight"] = torch.zeros(64, 64, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=message):
        get_encoder("resnet50", weights=tmp_path / "bad.pth")


def test_get_encoder_bad_input(tmp_path):
    with pytest.raises(InputError, match="needs weights="):
        get_encoder("resnet50")
    with pytest.raises(InputError, match="does not exist"):
        get_encoder("resnet50", weights=tmp_path / "nope.pth")
    with pytest.raises(InputError, match="Unknown encoder 'vit-huge'"):
        get_encoder("vit-huge")
    with pytest.raises(InputError, match="Unknown device"):
        get_encoder("efficientnet-lite0", device="tpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="state_dict of tensors"):
        get_encoder("resnet50", weights=tmp_path / "junk.pth")


# --------------------------------------------------------------------------------------------
# TorchScript and pickled modules
# --------------------------------------------------------------------------------------------


def test_torchscript_file_loads_and_matches_the_module(tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path / "tiny.pt"
    torch.jit.save(torch.jit.script(net), str(path))
    enc = get_encoder(path, input_size=32)
    assert (enc.dim, enc.input_size, enc.name) == (8, 32, "file:tiny.pt")
    assert enc.weights_id.startswith("torchscript:")
    tiles = _tiles(3, size=32)
    with torch.inference_mode():
        direct = net(enc.preprocess(tiles)).numpy()
    np.testing.assert_allclose(enc.encode(tiles), direct, rtol=1e-6)


def test_pickled_module_needs_allow_pickle(tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    path = tmp_path / "tiny_pickled.pt"
    torch.save(net, path)
    with pytest.raises(InputError, match="allow_pickle=True"):
        get_encoder(path)
    enc = get_encoder(path, input_size=32, allow_pickle=True)
    assert enc.dim == 8 and enc.weights_id.startswith("pickle:")
    # a state_dict is not a module
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(InputError, match="holds a state_dict"):
        get_encoder(tmp_path / "sd.pt", allow_pickle=True)
    # a module must return n × n_features
    torch.jit.save(torch.jit.script(MapNet()), str(tmp_path / "map.pt"))
    with pytest.raises(InputError, match=r"n × n_features tensor, got \(2, 8, 30, 30\)"):
        get_encoder(tmp_path / "map.pt", input_size=32)


# --------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _counting_encoder(weights_id="w1"):
    torch.manual_seed(0)
    return Encoder(name="tiny", module=Counting(TinyNet().eval()), dim=8, input_size=32,
                   weights_id=weights_id, channels_last=False)


def test_cache_hit_skips_the_encoder_and_misses_on_new_geometry_or_encoder(tmp_path):
    tiles = _tiles(5, size=32)
    centres = np.arange(10.0).reshape(5, 2)
    key = tile_cache_key("img.jpg|123|456", centres, tile_um=100.0, mpp=0.69, out_px=32)
    enc = _counting_encoder()
    info: dict = {}
    first = tile_features(tiles, enc, batch_size=2, cache_dir=tmp_path, cache_key=key,
                          progress=False, stats=info)
    assert enc.module.calls == 3 and info["cache"] == "miss" and info["tiles_per_s"] > 0
    assert first.shape == (5, 8) and first.dtype == np.float32
    again = tile_features(tiles, enc, cache_dir=tmp_path, cache_key=key, progress=False,
                          stats=info)
    assert enc.module.calls == 3 and info["cache"] == "hit"
    np.testing.assert_array_equal(again, first)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file

    other_tile = tile_cache_key("img.jpg|123|456", centres, tile_um=150.0, mpp=0.69, out_px=32)
    moved = tile_cache_key("img.jpg|123|456", centres + 1, tile_um=100.0, mpp=0.69, out_px=32)
    for other in (other_tile, moved):
        tile_features(tiles, enc, cache_dir=tmp_path, cache_key=other, progress=False)
    assert enc.module.calls == 3 + 2  # one batch of 5 each
    enc_b = _counting_encoder(weights_id="w2")  # other weights, same name
    tile_features(tiles, enc_b, cache_dir=tmp_path, cache_key=key, progress=False)
    assert enc_b.module.calls == 1
    assert len(list(tmp_path.glob("*.npy"))) == 4


def test_content_keyed_cache_and_bad_input(tmp_path):
    tiles = _tiles(4, size=32)
    enc = _counting_encoder()
    a = tile_features(tiles, enc, cache_dir=tmp_path, progress=False)
    b = tile_features(tiles.copy(), enc, cache_dir=tmp_path, progress=False)
    assert enc.module.calls == 1
    np.testing.assert_array_equal(a, b)
    changed = tiles.copy()
    changed[0, 0, 0, 0] ^= 1
    tile_features(changed, enc, cache_dir=tmp_path, progress=False)
    assert enc.module.calls == 2
    np.testing.assert_array_equal(tile_features(tiles, enc, progress=False), a)  # no cache
    with pytest.raises(InputError, match="batch_size"):
        tile_features(tiles, enc, batch_size=0, progress=False)
    with pytest.raises(InputError, match="Encoder"):
        tile_features(tiles, "efficientnet-lite0", progress=False)
    with pytest.raises(InputError, match="n_tiles × 2"):
        tile_cache_key("x", np.zeros(4), tile_um=1.0)


# --------------------------------------------------------------------------------------------
# Colour features
# --------------------------------------------------------------------------------------------


def test_colour_features_recover_stain_concentrations():
    # pixels of pure haematoxylin at concentration 0.5 and pure eosin at 0.3 (Beer–Lambert)
    h_px = 255 * 10 ** (-0.5 * HE_STAIN_MATRIX[0])
    e_px = 255 * 10 ** (-0.3 * HE_STAIN_MATRIX[1])
    tiles = np.stack([np.broadcast_to(np.round(c), (16, 16, 3)) for c in (h_px, e_px)])
    tiles = np.concatenate([tiles, np.full((1, 16, 16, 3), 255.0)]).astype(np.uint8)
    feats = pd.DataFrame(colour_features(tiles), columns=list(COLOUR_FEATURE_NAMES))
    assert feats.shape == (3, 25)
    np.testing.assert_allclose(feats["H_od_mean"], [0.5, 0.0, 0.0], atol=0.02)
    np.testing.assert_allclose(feats["E_od_mean"], [0.0, 0.3, 0.0], atol=0.02)
    np.testing.assert_allclose(feats.loc[2, "R_mean"], 255.0)
    assert feats.filter(like="_std").to_numpy().max() < 1e-6  # uniform tiles


# --------------------------------------------------------------------------------------------
# Ridge baseline
# --------------------------------------------------------------------------------------------


def _planted(n_sections=4, n=60, d=20, g=6, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, g))
    xs, ys = {}, {}
    for s in range(n_sections):
        x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
        xs[f"S{s}"] = x
        ys[f"S{s}"] = x @ w + 2.0 + noise * rng.normal(size=(n, g))
    return xs, ys, w


def test_ridge_recovers_planted_linear_relation():
    xs, ys, _ = _planted()
    test_x, test_y = xs.pop("S3"), ys.pop("S3")
    model = RidgeBaseline().fit(xs, ys)
    assert model.n_components_ == 20  # capped by the number of features
    res = evaluate(model.predict(test_x), test_y, [f"g{i}" for i in range(6)])
    assert res["mean_pearson"] > 0.99
    assert res["mse"] < 0.05 * test_y.var()


def test_ridge_matches_sklearn_and_chooses_alpha_by_leave_one_section_out_cv():
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xs, ys, _ = _planted(n=25, d=40, noise=3.0, seed=1)  # few spots, noisy: needs a penalty
    alphas = np.logspace(-1, 4, 11)
    model = RidgeBaseline(n_components=10, alphas=alphas).fit(xs, ys)

    def pipe(alpha):
        return make_pipeline(StandardScaler(), PCA(10, svd_solver="full"), Ridge(alpha=alpha))

    expected = np.zeros((len(alphas), len(xs)))
    for j, held in enumerate(xs):
        x_tr = np.vstack([xs[s] for s in xs if s != held])
        y_tr = np.vstack([ys[s] for s in xs if s != held])
        for i, alpha in enumerate(alphas):
            pred = pipe(alpha).fit(x_tr, y_tr).predict(xs[held])
            expected[i, j] = np.mean([stats.pearsonr(pred[:, k], ys[held][:, k])[0]
                                      for k in range(pred.shape[1])])
    np.testing.assert_allclose(model.cv_scores_.to_numpy(), expected, atol=1e-8)
    assert model.alpha_ == alphas[np.argmax(expected.mean(axis=1))]
    assert model.alpha_ > alphas[0]  # the noisy case is regularised

    x_all, y_all = np.vstack(list(xs.values())), np.vstack(list(ys.values()))
    oracle = pipe(model.alpha_).fit(x_all, y_all).predict(x_all[:7])
    np.testing.assert_allclose(model.predict(x_all[:7]), oracle, atol=1e-8)


def test_ridge_bad_input():
    xs, ys, _ = _planted(n_sections=2, n=10)
    with pytest.raises(InputError, match="at least 2 training sections"):
        RidgeBaseline().fit({"S0": xs["S0"]}, {"S0": ys["S0"]})
    RidgeBaseline(alpha=1.0).fit({"S0": xs["S0"]}, {"S0": ys["S0"]})  # fixed alpha: fine
    with pytest.raises(InputError, match="9 expression rows"):
        RidgeBaseline().fit(xs, {"S0": ys["S0"][:9], "S1": ys["S1"]})
    with pytest.raises(InputError, match="different sections"):
        RidgeBaseline().fit(xs, {"S0": ys["S0"], "S9": ys["S1"]})
    with pytest.raises(InputError, match="not fitted"):
        RidgeBaseline().predict(xs["S0"])
    model = RidgeBaseline().fit(xs, ys)
    with pytest.raises(InputError, match="n_spots × 20"):
        model.predict(xs["S0"][:, :5])


# --------------------------------------------------------------------------------------------
# Metrics and target genes
# --------------------------------------------------------------------------------------------


def test_evaluate_perfect_constant_and_oracle():
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(30, 4))
    obs[:, 3] = 1.5  # constant in the held-out section
    res = evaluate(obs.copy(), obs, ["a", "b", "c", "d"])
    np.testing.assert_allclose(res["pearson"].to_numpy(), [1, 1, 1, 0])
    assert res["mean_pearson"] == pytest.approx(0.75)  # the constant gene counts as 0
    assert res["constant_genes"] == ["d"] and res["mse"] == 0.0

    pred = rng.normal(size=(30, 4))
    pred[:, 2] = 0.0  # constant prediction
    res = evaluate(pred, obs, ["a", "b", "c", "d"])
    oracle = [stats.pearsonr(pred[:, k], obs[:, k])[0] for k in range(2)]
    np.testing.assert_allclose(res["pearson"].to_numpy()[:2], oracle, rtol=1e-10)
    assert res["constant_predictions"] == ["c"] and res["pearson"]["c"] == 0.0
    assert res["mse"] == pytest.approx(np.mean((pred - obs) ** 2))
    assert evaluate(-obs, obs, list("abcd"))["pearson"]["a"] == pytest.approx(-1.0)
    with pytest.raises(InputError, match="n_spots × n_genes"):
        evaluate(pred[:, :3], obs, list("abcd"))
    with pytest.raises(InputError, match="5 gene names for 4 columns"):
        evaluate(pred, obs, list("abcde"))


def test_log_normalize_matches_scanpy_and_missing_genes_are_zero():
    import scanpy as sc

    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(20, 12)).astype(np.int32)
    counts[3] = 0
    a = ad.AnnData(sparse.csr_matrix(counts))
    a.var_names = [f"g{i}" for i in range(12)]
    ref = a.copy()
    ref.X = ref.X.astype(np.float64)
    with warnings.catch_warnings():  # scanpy warns about the empty spot
        warnings.simplefilter("ignore", UserWarning)
        sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    np.testing.assert_allclose(log_normalize(a.X), ref.X.toarray(), rtol=1e-10)
    out = section_log_expression(a, ["g2", "absent", "g0"])
    np.testing.assert_allclose(out[:, [0, 2]], ref.X.toarray()[:, [2, 0]])
    assert np.all(out[:, 1] == 0)


def test_select_target_genes_on_training_sections():
    pytest.importorskip("skmisc")  # scanpy's seurat_v3 needs scikit-misc
    rng = np.random.default_rng(0)
    n_genes = 80
    base = np.linspace(0.2, 8, n_genes)  # g79 highest mean, g0 lowest
    sections = {}
    for s in range(3):
        lam = np.tile(base, (40, 1))
        lam[:20, :5] *= 12  # g0..g4: strongly variable across spots
        a = ad.AnnData(sparse.csr_matrix(rng.poisson(lam).astype(np.int32)))
        a.var_names = [f"g{i}" for i in range(n_genes)]
        sections[f"S{s}"] = a
    genes = select_target_genes(sections, n_hvg=5, n_top=10)
    assert set(genes["hvg"]) == {f"g{i}" for i in range(5)}
    # oracle: mean of log1p(normalize_total) over all training spots, computed independently
    log_mean = np.vstack([
        np.log1p(a.X.toarray() / a.X.toarray().sum(1, keepdims=True) * 1e4)
        for a in sections.values()
    ]).mean(axis=0)
    order = np.argsort(-log_mean)[:10]
    assert genes["top_expressed"] == [f"g{i}" for i in order]
    assert {"g79", "g78"} <= set(genes["top_expressed"])
    with pytest.raises(InputError, match="non-integer"):
        bad = sections["S0"].copy()
        bad.X = bad.X * 0.5
        select_target_genes({"S0": bad, "S1": sections["S1"]})
