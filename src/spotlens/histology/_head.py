"""Fine-tuning the encoder's head: EfficientNet-Lite0 split before its head convolution.

:func:`pre_head_encoder` returns the frozen trunk as an :class:`~spotlens.histology.Encoder`
(its pooled last-block maps, cached like any features) and the pretrained head with its batch
norm folded in, from which :class:`~spotlens.histology._models.TileHead` starts.
"""

from __future__ import annotations

import math

from .._validation import InputError
from ._encoders import Encoder, torch
from ._networks import EfficientNetLite0Features, EfficientNetLite0PreHead


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
