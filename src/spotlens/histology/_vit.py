"""Vision Transformer tile encoder that reads timm-format checkpoints from disk.

Pathology foundation models (UNI, H-optimus-0, Prov-GigaPath, Virchow, ...) are published as
timm ``VisionTransformer`` state dicts. :class:`VisionTransformerFeatures` is that network
written here with timm's parameter names, so such a file loads strictly without timm;
:func:`vit_config` reads the architecture off the tensors' shapes (and a ``config.json``
beside the weights, as the Hugging Face hub stores it, for what shapes cannot tell).

Source: Dosovitskiy A. et al., "An image is worth 16x16 words: transformers for image
recognition at scale", ICLR 2021, https://arxiv.org/abs/2010.11929; register tokens: Darcet T.
et al., "Vision transformers need registers", ICLR 2024, https://arxiv.org/abs/2309.16588;
layer scale: Touvron H. et al., "Going deeper with image transformers", ICCV 2021,
https://arxiv.org/abs/2103.17239; SwiGLU: Shazeer N., "GLU variants improve transformer",
https://arxiv.org/abs/2002.05202.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .._backend import import_torch
from .._validation import InputError

torch = import_torch()
nn = torch.nn
F = torch.nn.functional

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6  # timm's VisionTransformer default
# (timm size name, width) -> heads, where width / 64 is not the head count: ViT-H/14 (1280
# wide, e.g. Virchow) and ViT-g/14 (1408). DINOv2's giant (1536 wide, 24 heads; Prov-GigaPath,
# H-optimus-0) follows width / 64.
_HEADS_BY_SIZE = {("huge", 1280): 16, ("giant", 1408): 16}


@dataclass(frozen=True)
class ViTConfig:
    """The architecture of a timm-format Vision Transformer.

    Attributes
    ----------
    dim
        Token width.
    depth
        Number of blocks.
    num_heads
        Attention heads per block.
    patch_size
        Side of a square patch, px.
    grid
        Patches per side of the input the position embedding was trained for
        (input side = ``grid · patch_size`` px).
    mlp_hidden
        Width of each block's MLP hidden layer (after the gate for SwiGLU).
    swiglu
        MLP is packed SwiGLU (``fc1`` doubles the width: SiLU of the first half gates the
        second) instead of a GELU MLP.
    class_token
        A class token is prepended.
    reg_tokens
        Register tokens prepended after the class token.
    pos_embed_prefix
        The position embedding covers the prefix (class and register) tokens too; otherwise it
        is added to the patch tokens only.
    layer_scale
        Each residual branch is scaled per channel (``ls1.gamma``, ``ls2.gamma``).
    qkv_bias, patch_bias
        The attention's qkv projection / the patch embedding have biases.
    norm_pre
        A LayerNorm before the blocks.
    pool
        ``"token"``: the class token after the final norm; ``"avg"``: the mean patch token
        through ``fc_norm``.
    """

    dim: int
    depth: int
    num_heads: int
    patch_size: int
    grid: int
    mlp_hidden: int
    swiglu: bool = False
    class_token: bool = True
    reg_tokens: int = 0
    pos_embed_prefix: bool = True
    layer_scale: bool = False
    qkv_bias: bool = True
    patch_bias: bool = True
    norm_pre: bool = False
    pool: str = "token"

    @property
    def input_size(self) -> int:
        """Input side in px the position embedding fits."""
        return self.grid * self.patch_size

    @property
    def n_prefix(self) -> int:
        """Class and register tokens before the patch tokens."""
        return int(self.class_token) + self.reg_tokens


class _LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """Scale each channel."""
        return x * self.gamma


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """Multi-head self-attention of ``n × tokens × dim``."""
        n, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each n × heads × tokens × head_dim
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, dim))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, swiglu: bool):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        """GELU MLP, or packed SwiGLU: ``silu(first half) · second half``."""
        h = self.fc1(x)
        if self.swiglu:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.fc2(h)


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.attn = _Attention(cfg.dim, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = _LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.mlp = _Mlp(cfg.dim, cfg.mlp_hidden, cfg.swiglu)
        self.ls2 = _LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x):
        """Pre-norm residual block: attention, then MLP."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size,
                              bias=cfg.patch_bias)

    def forward(self, x):
        """``n × 3 × H × W -> n × patches × dim`` (row-major patches)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformerFeatures(nn.Module):
    """Vision Transformer returning ``n × dim`` features of an ``n × 3 × S × S`` batch.

    ``S = grid · patch_size``. Patches are embedded, the class and register tokens prepended,
    the position embedding added (to all tokens or to the patches only, as the checkpoint
    was trained), then ``depth`` pre-norm blocks (LayerNorm, multi-head attention, LayerNorm,
    MLP; optional layer scale). The features are the class token after the final LayerNorm
    (``pool="token"``) or the mean patch token through ``fc_norm`` (``pool="avg"``). A
    classifier ``head`` in the checkpoint is ignored. Parameter names are timm's, so a timm
    ``VisionTransformer`` state dict loads with ``strict=True``.
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.class_token else None
        self.reg_token = (nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.dim))
                          if cfg.reg_tokens else None)
        n_pos = cfg.grid ** 2 + (cfg.n_prefix if cfg.pos_embed_prefix else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, cfg.dim))
        self.norm_pre = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS) if cfg.norm_pre else None
        self.blocks = nn.Sequential(*[_Block(cfg) for _ in range(cfg.depth)])
        if cfg.pool == "avg":
            self.norm, self.fc_norm = None, nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        else:
            self.norm, self.fc_norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS), None

    def forward(self, x):
        """Return ``n × dim`` features of a normalised ``n × 3 × S × S`` batch."""
        cfg = self.cfg
        x = self.patch_embed(x)
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(len(x), -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(len(x), -1, -1))
        if cfg.pos_embed_prefix:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        else:
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        x = self.blocks(x)
        if cfg.pool == "avg":
            return self.fc_norm(x[:, cfg.n_prefix:].mean(dim=1))
        return self.norm(x)[:, 0]


def read_sidecar(weights: Path) -> dict:
    """Return the timm ``config.json`` beside ``weights`` (as the Hugging Face hub stores it).

    An empty dict when there is none or it is not a timm model config.

    Raises
    ------
    InputError
        If a ``config.json`` is there but is not readable JSON.
    """
    path = Path(weights).with_name("config.json")
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path} beside the weights is not readable JSON ({err}); fix or remove "
                         "it.") from err
    if not isinstance(config, dict) or not ({"architecture", "model_args"} & set(config)):
        return {}
    return config


def _heads(dim: int, sidecar: dict) -> int:
    args = sidecar.get("model_args") or {}
    if "num_heads" in args:
        return int(args["num_heads"])
    match = re.search(r"vit_(\w+?)_patch", str(sidecar.get("architecture", "")))
    if match and (match.group(1), dim) in _HEADS_BY_SIZE:
        return _HEADS_BY_SIZE[match.group(1), dim]
    if dim % 64:
        raise InputError(
            f"Cannot tell the number of attention heads of a ViT of width {dim} (not a multiple "
            "of 64): put the model's timm config.json (with model_args.num_heads) beside the "
            "weights."
        )
    return dim // 64


def vit_config(state: dict, sidecar: dict | None = None) -> ViTConfig:
    """Read a timm Vision Transformer's architecture off its state dict.

    Parameters
    ----------
    state
        Parameter name -> tensor, timm's names (``patch_embed.proj.weight``, ``pos_embed``,
        ``blocks.0.attn.qkv.weight``, ...).
    sidecar
        The model's timm ``config.json`` (:func:`read_sidecar`), for the head count
        (``model_args.num_heads``, else the architecture name, else width / 64) and the pooling
        (``global_pool``).

    Returns
    -------
    The :class:`ViTConfig`.

    Raises
    ------
    InputError
        If ``state`` is a Hugging Face transformers ViT or otherwise not a timm ViT (no
        ``patch_embed.proj.weight``, ``pos_embed`` or blocks), has non-square patches, a
        position embedding that fits no square patch grid or an MLP that is neither plain nor
        packed SwiGLU, or the head count cannot be told (no ``config.json``, width not a
        multiple of 64) or does not divide the width.
    """
    sidecar = sidecar or {}
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.attn.qkv.weight")
    absent = [k for k in needed if k not in state]
    if any("embeddings.patch_embeddings." in k for k in state):
        raise InputError(
            "The checkpoint is a Hugging Face transformers ViT (e.g. Phikon), not timm's format. "
            "Wrap the model so forward(pixel_values) returns the n × width class token, save it "
            "with torch.jit.save(torch.jit.trace(wrapper, example)) and pass that file as the "
            "encoder."
        )
    if absent:
        raise InputError(
            f"The checkpoint is not a timm VisionTransformer: it has no {absent}. For another "
            "architecture save the model with torch.jit.save and pass that file as the encoder."
        )
    proj = state["patch_embed.proj.weight"]
    dim, _, patch, patch_w = proj.shape
    if patch != patch_w:
        raise InputError(f"Non-square patches ({patch} × {patch_w}) are not supported.")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    class_token = "cls_token" in state
    reg_tokens = int(state["reg_token"].shape[1]) if "reg_token" in state else 0
    n_prefix = int(class_token) + reg_tokens
    n_pos = int(state["pos_embed"].shape[1])
    grid, prefix_in_pos = None, True
    for with_prefix in (True, False):
        side = math.isqrt(n_pos - (n_prefix if with_prefix else 0))
        if side > 0 and side * side == n_pos - (n_prefix if with_prefix else 0):
            grid, prefix_in_pos = side, with_prefix
            break
    if grid is None:
        raise InputError(
            f"The position embedding has {n_pos} entries, which is no square grid of patches "
            f"with or without the {n_prefix} class/register tokens."
        )
    fc1 = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    hidden = int(state["blocks.0.mlp.fc2.weight"].shape[1])
    if fc1 not in (hidden, 2 * hidden):
        raise InputError(f"The MLP maps {dim} -> {fc1} -> {hidden} -> {dim}: neither a plain "
                         "MLP nor a packed SwiGLU.")
    heads = _heads(int(dim), sidecar)
    if dim % heads:
        raise InputError(f"{heads} attention heads do not divide the ViT width {dim}.")
    pool = sidecar.get("global_pool") or (sidecar.get("model_args") or {}).get("global_pool")
    if pool not in ("token", "avg"):
        pool = "avg" if "fc_norm.weight" in state and "norm.weight" not in state else "token"
    return ViTConfig(
        dim=int(dim), depth=depth, num_heads=heads, patch_size=int(patch), grid=grid,
        mlp_hidden=hidden, swiglu=fc1 == 2 * hidden, class_token=class_token,
        reg_tokens=reg_tokens, pos_embed_prefix=prefix_in_pos,
        layer_scale="blocks.0.ls1.gamma" in state,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        patch_bias="patch_embed.proj.bias" in state, norm_pre="norm_pre.weight" in state,
        pool=pool,
    )
