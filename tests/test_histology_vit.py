"""Vision Transformer encoder from timm-format checkpoints (pathology foundation models).

The weights are small random ones we make; the real models (UNI, H-optimus-0, ...) are the same
architecture at a larger width and depth.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_histology_pipeline import GENES, make_section, pairs  # noqa: E402

from spotlens._validation import InputError  # noqa: E402
from spotlens.histology._encoders import get_encoder  # noqa: E402
from spotlens.histology._vit import VisionTransformerFeatures, ViTConfig, vit_config  # noqa: E402

SMALL = ViTConfig(dim=48, depth=2, num_heads=3, patch_size=8, grid=4, mlp_hidden=96)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic sections (tumour blob in pink tissue) of test_histology_pipeline."""
    folder = tmp_path_factory.mktemp("vit_sections")
    return {s: make_section(s, folder, seed=i) for i, s in enumerate(["S1", "S2", "S3", "S4"])}


def _random_vit(cfg: ViTConfig, seed: int = 0) -> VisionTransformerFeatures:
    torch.manual_seed(seed)
    net = VisionTransformerFeatures(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return net


def _batch(n=3, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_vit_equals_torch_transformer_encoder_layers():
    """Oracle: the same weights in torch's own pre-norm TransformerEncoderLayer."""
    net = _random_vit(SMALL)
    x = _batch()
    layers = []
    for block in net.blocks:
        layer = torch.nn.TransformerEncoderLayer(
            SMALL.dim, SMALL.num_heads, SMALL.mlp_hidden, dropout=0.0, activation="gelu",
            layer_norm_eps=1e-6, batch_first=True, norm_first=True).eval()
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(block.attn.qkv.weight)
            layer.self_attn.in_proj_bias.copy_(block.attn.qkv.bias)
            layer.self_attn.out_proj.weight.copy_(block.attn.proj.weight)
            layer.self_attn.out_proj.bias.copy_(block.attn.proj.bias)
            layer.linear1.load_state_dict(block.mlp.fc1.state_dict())
            layer.linear2.load_state_dict(block.mlp.fc2.state_dict())
            layer.norm1.load_state_dict(block.norm1.state_dict())
            layer.norm2.load_state_dict(block.norm2.state_dict())
        layers.append(layer)
    with torch.no_grad():
        patches = torch.nn.functional.conv2d(x, net.patch_embed.proj.weight,
                                             net.patch_embed.proj.bias, stride=8)
        tokens = torch.cat([net.cls_token.expand(3, -1, -1), patches.flatten(2).mT], 1)
        tokens = tokens + net.pos_embed
        for layer in layers:
            tokens = layer(tokens)
        expected = torch.nn.functional.layer_norm(tokens[:, 0], (SMALL.dim,), net.norm.weight,
                                                  net.norm.bias, eps=1e-6)
        got = net(x)
    assert got.shape == (3, SMALL.dim)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _direct(net: VisionTransformerFeatures, x):
    """The variant ViT written out with explicit sums, one image at a time."""
    cfg = net.cfg
    out = []
    for image in x:
        w = net.patch_embed.proj.weight
        p = cfg.patch_size
        rows = []
        for i in range(cfg.grid):
            for j in range(cfg.grid):
                crop = image[:, i * p:(i + 1) * p, j * p:(j + 1) * p]
                rows.append((w * crop).sum(dim=(1, 2, 3)) + net.patch_embed.proj.bias)
        t = torch.stack(rows) + net.pos_embed[0]  # position embedding on the patches only
        t = torch.cat([net.reg_token[0], t])  # no class token: registers only
        for b in net.blocks:
            h = torch.nn.functional.layer_norm(t, (cfg.dim,), b.norm1.weight, b.norm1.bias, 1e-6)
            q, k, v = (h @ b.attn.qkv.weight.T + b.attn.qkv.bias).split(cfg.dim, dim=1)
            d = cfg.dim // cfg.num_heads
            heads = []
            for head in range(cfg.num_heads):
                s = slice(head * d, (head + 1) * d)
                a = torch.softmax(q[:, s] @ k[:, s].T / d ** 0.5, dim=1)
                heads.append(a @ v[:, s])
            t = t + b.ls1.gamma * (torch.cat(heads, 1) @ b.attn.proj.weight.T + b.attn.proj.bias)
            h = torch.nn.functional.layer_norm(t, (cfg.dim,), b.norm2.weight, b.norm2.bias, 1e-6)
            u = h @ b.mlp.fc1.weight.T + b.mlp.fc1.bias
            gate, value = u[:, :cfg.mlp_hidden], u[:, cfg.mlp_hidden:]
            u = gate * torch.sigmoid(gate) * value
            t = t + b.ls2.gamma * (u @ b.mlp.fc2.weight.T + b.mlp.fc2.bias)
        pooled = t[cfg.reg_tokens:].mean(0)
        out.append(torch.nn.functional.layer_norm(pooled, (cfg.dim,), net.fc_norm.weight,
                                                  net.fc_norm.bias, 1e-6))
    return torch.stack(out)


def test_vit_variants_registers_layer_scale_swiglu_average_pool():
    cfg = ViTConfig(dim=48, depth=2, num_heads=4, patch_size=8, grid=4, mlp_hidden=64,
                    swiglu=True, class_token=False, reg_tokens=2, pos_embed_prefix=False,
                    layer_scale=True, pool="avg")
    net = _random_vit(cfg, seed=3)
    x = _batch(2)
    with torch.no_grad():
        torch.testing.assert_close(net(x), _direct(net, x), atol=1e-4, rtol=1e-4)
    # the architecture is read back off the tensors (heads from the sidecar)
    assert vit_config(net.state_dict(), {"model_args": {"num_heads": 4}}) == cfg


@pytest.mark.parametrize(("architecture", "dim", "heads"), [
    ("vit_large_patch16_224", 1024, 16),  # UNI
    ("vit_huge_patch14_224", 1280, 16),  # Virchow: 80 per head, not width / 64
    ("vit_giant_patch14_224", 1408, 16),
    ("vit_giant_patch14_reg4_dinov2", 1536, 24),  # H-optimus-0, Prov-GigaPath: width / 64
    ("", 768, 12),
])
def test_head_count_of_published_sizes_without_num_heads(architecture, dim, heads):
    from spotlens.histology._vit import _heads

    assert _heads(dim, {"architecture": architecture} if architecture else {}) == heads
    assert _heads(dim, {"model_args": {"num_heads": 7}}) == 7  # stated wins


@pytest.fixture
def checkpoint(tmp_path):
    """A timm-style checkpoint: state dict with an ImageNet head, config.json beside it."""
    net = _random_vit(SMALL)
    state = dict(net.state_dict())
    state["head.weight"] = torch.randn(10, SMALL.dim)
    state["head.bias"] = torch.zeros(10)
    folder = tmp_path / "hub"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch8_32", "global_pool": "token",
        "model_args": {"num_heads": 3, "img_size": 32},
        "pretrained_cfg": {"mean": [0.7, 0.58, 0.7], "std": [0.21, 0.23, 0.18]},
    }))
    return folder / "pytorch_model.bin", net


def test_vit_checkpoint_loads_strictly_and_reproduces_the_network(checkpoint):
    path, net = checkpoint
    enc = get_encoder("vit", weights=path)
    assert (enc.name, enc.dim, enc.input_size) == ("vit", SMALL.dim, 32)
    assert enc.mean == pytest.approx((0.7, 0.58, 0.7)) and enc.std == pytest.approx((0.21, 0.23,
                                                                                        0.18))
    tiles = np.random.default_rng(0).integers(0, 256, (4, 50, 50, 3), dtype=np.uint8)
    batch = enc.preprocess(tiles)  # resized to 32 px, normalised with the sidecar's statistics
    assert batch.shape == (4, 3, 32, 32)
    with torch.no_grad():
        expected = net(batch).numpy()
    np.testing.assert_allclose(enc.encode(tiles), expected, atol=1e-5)
    # the normalisation is part of the feature-cache identity
    assert "0.58" in enc.identity


def test_vit_reads_safetensors_as_the_hub_stores_them(checkpoint):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path, net = checkpoint
    state = {k: v.contiguous() for k, v in torch.load(path, weights_only=True).items()}
    safetensors_torch.save_file(state, path.with_name("model.safetensors"))
    tiles = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    from_bin = get_encoder("vit", weights=path)
    from_safetensors = get_encoder("vit", weights=path.with_name("model.safetensors"))
    np.testing.assert_array_equal(from_safetensors.encode(tiles), from_bin.encode(tiles))
    # saved from DataParallel: the module. prefix is dropped as for torch.save files
    safetensors_torch.save_file({f"module.{k}": v for k, v in state.items()},
                                path.with_name("parallel.safetensors"))
    from_parallel = get_encoder("vit", weights=path.with_name("parallel.safetensors"))
    np.testing.assert_array_equal(from_parallel.encode(tiles), from_bin.encode(tiles))
    path.with_name("broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="as a .safetensors file"):
        get_encoder("vit", weights=path.with_name("broken.safetensors"))


@pytest.mark.parametrize(("edit", "message"), [
    ("no_sidecar", "number of attention heads"),
    ("drop_key", "blocks.1.mlp.fc2.bias"),
    ("resnet", "not a timm VisionTransformer"),
    ("odd_pos", "no square grid"),
    ("heads", "do not divide"),
    ("transformers", "Hugging Face transformers ViT"),
])
def test_vit_bad_checkpoints_are_named(checkpoint, edit, message):
    path, _ = checkpoint
    state = torch.load(path, weights_only=True)
    sidecar = json.loads((path.parent / "config.json").read_text())
    if edit == "no_sidecar":
        (path.parent / "config.json").unlink()
    elif edit == "drop_key":
        del state["blocks.1.mlp.fc2.bias"]
    elif edit == "resnet":
        state = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    elif edit == "odd_pos":
        state["pos_embed"] = torch.zeros(1, 19, SMALL.dim)
    elif edit == "heads":
        sidecar["model_args"]["num_heads"] = 5
    elif edit == "transformers":  # transformers' ViTModel names
        state = {"embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
                 "embeddings.cls_token": state["cls_token"]}
    torch.save(state, path)
    if edit != "no_sidecar":
        (path.parent / "config.json").write_text(json.dumps(sidecar))
    with pytest.raises(InputError, match=message):
        get_encoder("vit", weights=path)


def test_vit_needs_weights_and_its_own_input_size(checkpoint):
    with pytest.raises(InputError, match="vit needs weights="):
        get_encoder("vit")
    with pytest.raises(InputError, match="input_size must be 32"):
        get_encoder("vit", weights=checkpoint[0], input_size=224)


def test_train_with_vit_weights_records_them_and_finds_them_after_a_move(data, checkpoint,
                                                                         tmp_path):
    from spotlens.histology import load_model, train

    path, _ = checkpoint
    out = train(pairs(data, ["S1", "S2", "S3"]), genes=GENES, model="ridge", encoder="vit",
                encoder_weights=path, tile_scales=(1.0,), out=tmp_path / "m", progress=False)
    info = json.loads((out / "config.json").read_text())["encoder"]
    assert info["name"] == "vit" and info["dim"] == SMALL.dim
    assert info["weights_path"] == str(path.resolve())
    s4, image, _ = data["S4"]
    before = load_model(out).predict_section(s4, image=image)
    assert before.shape == (s4.n_obs, len(GENES)) and np.isfinite(before).all()

    moved = tmp_path / "elsewhere" / "uni.bin"
    moved.parent.mkdir()
    shutil.move(path, moved)
    shutil.copy(path.parent / "config.json", moved.parent / "config.json")
    with pytest.raises(InputError, match="--encoder-weights"):
        load_model(out).predict_section(s4, image=image)
    after = load_model(out, encoder_weights=moved).predict_section(s4, image=image)
    np.testing.assert_allclose(after, before, atol=1e-6)

    other = _random_vit(SMALL, seed=9)  # same shapes, other weights: refused
    torch.save(other.state_dict(), moved)
    with pytest.raises(InputError, match="but that encoder now"):
        load_model(out, encoder_weights=moved).predict_section(s4, image=image)


def test_cli_train_and_evaluate_with_encoder_weights(data, checkpoint, tmp_path):
    from typer.testing import CliRunner

    from spotlens.cli import app

    path, _ = checkpoint
    folder = data["S1"][1].parent
    model = tmp_path / "model"
    runner = CliRunner()
    res = runner.invoke(app, [
        "histology", "train", "--sections", str(folder / "S1.h5ad"), str(folder / "S2.h5ad"),
        "--genes", "TUM,STR", "--model-type", "ridge", "--encoder", "vit",
        "--encoder-weights", str(path), "--tile-scales", "1", "--no-progress", "-q",
        "-o", str(model)])
    assert res.exit_code == 0, res.output
    moved = tmp_path / "moved" / "moved.bin"
    moved.parent.mkdir()
    shutil.copy(path, moved)
    path.unlink()
    res = runner.invoke(app, ["histology", "evaluate", "-m", str(model), "--sections",
                              str(folder / "S4.h5ad"), "--no-progress", "-q"])
    assert res.exit_code != 0 and "--encoder-weights" in res.output
    res = runner.invoke(app, ["histology", "evaluate", "-m", str(model), "--sections",
                              str(folder / "S4.h5ad"), "--encoder-weights", str(moved),
                              "--no-progress", "-q"])
    # the config.json stayed behind: heads (48 is no multiple of 64) cannot be read off the file
    assert res.exit_code != 0 and "config.json" in res.output
    shutil.copy(path.parent / "config.json", moved.parent / "config.json")
    res = runner.invoke(app, ["histology", "evaluate", "-m", str(model), "--sections",
                              str(folder / "S4.h5ad"), "--encoder-weights", str(moved),
                              "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    assert "S4" in res.output and "mean_pearson" in res.output


def test_colour_features_take_no_weights(data, checkpoint, tmp_path):
    from spotlens.histology import train

    with pytest.raises(InputError, match="colour features have no weights"):
        train(pairs(data, ["S1", "S2"]), genes=GENES, model="ridge", encoder="colour",
              encoder_weights=checkpoint[0], out=tmp_path / "m", progress=False)


def test_moved_vit_without_its_normalisation_is_refused(data, tmp_path):
    """Width 64: heads are readable off the file, but the sidecar's mean/std would be lost."""
    from spotlens.histology import load_model, train

    net = _random_vit(ViTConfig(dim=64, depth=1, num_heads=1, patch_size=8, grid=4,
                                mlp_hidden=64))
    hub = tmp_path / "hub"
    hub.mkdir()
    torch.save(net.state_dict(), hub / "model.bin")
    (hub / "config.json").write_text(json.dumps({
        "architecture": "custom", "pretrained_cfg": {"mean": [0.7, 0.6, 0.7],
                                                     "std": [0.2, 0.2, 0.2]}}))
    out = train(pairs(data, ["S1", "S2"]), genes=GENES, model="ridge", encoder="vit",
                encoder_weights=hub / "model.bin", tile_scales=(1.0,), out=tmp_path / "m",
                progress=False)
    alone = tmp_path / "alone.bin"
    shutil.copy(hub / "model.bin", alone)
    s4, image, _ = data["S4"]
    with pytest.raises(InputError, match="prepares tiles differently"):
        load_model(out, encoder_weights=alone).predict_section(s4, image=image)
