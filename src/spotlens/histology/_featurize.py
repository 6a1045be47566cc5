"""Features of a section's tiles for a model: the encoder, its description, the fine-tuned head.

Shared by training (``_train.py``) and prediction (:class:`~spotlens.histology.HistologyModel`)
so both describe and run the encoder the same way: :func:`encoder_spec` opens an encoder (or
the colour statistics) and describes it for ``config.json``, :func:`split_head` cuts it before
its head when the model fine-tunes that, :func:`section_features` encodes a section's tiles at
every scale, and :func:`spot_pitch_px` measures the spot pitch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._validation import InputError
from ..io import SlideImage
from ._folder import COLOUR_ENCODER, EncoderSpec


def encoder_spec(encoder: str, device: str, weights=None) -> tuple[Any, EncoderSpec]:
    """Return ``(encoder or None for colour features, its description for config.json)``.

    Parameters
    ----------
    encoder
        An encoder name or TorchScript file (:func:`~spotlens.histology.get_encoder`), or
        ``"colour"``.
    device
        Device of the encoder.
    weights
        The checkpoint a named architecture reads (``"resnet50"``, ``"vit"``); its absolute
        path is recorded, so the model finds it again.

    Raises
    ------
    InputError
        ``weights`` with colour features, or as :func:`~spotlens.histology.get_encoder`.
    """
    if str(encoder).lower() == COLOUR_ENCODER:
        if weights is not None:
            raise InputError("encoder_weights is for 'resnet50' or 'vit'; colour features have "
                             "no weights.")
        from ._features import COLOUR_FEATURE_NAMES

        return None, EncoderSpec(COLOUR_ENCODER, COLOUR_ENCODER, "colour_features/1",
                                 len(COLOUR_FEATURE_NAMES))
    from ._encoders import get_encoder

    enc = get_encoder(encoder, device=device, weights=weights)
    path = None if weights is None else str(Path(weights).expanduser().resolve())
    return enc, EncoderSpec(enc.name, str(encoder), enc.weights_id, int(enc.dim),
                            input_size=int(enc.input_size), identity=enc.identity,
                            weights_path=path)


def split_head(enc, spec: EncoderSpec, finetune_head: bool) -> tuple[Any, EncoderSpec, dict | None]:
    """Split ``enc`` before its head when the model fine-tunes it (``finetune_head``).

    Returns ``(encoder, spec, head)``: the pre-head trunk, its description (with the head's
    shapes and the base encoder's name) and the pretrained head; or the inputs and None.

    Raises
    ------
    InputError
        ``finetune_head`` with an encoder that has no head to fine-tune (all but
        EfficientNet-Lite0).
    """
    from ._head import pre_head_encoder, supports_head_finetuning

    if not finetune_head:
        return enc, spec, None
    if enc is None or not supports_head_finetuning(enc):
        name = COLOUR_ENCODER if enc is None else enc.name
        raise InputError(f"finetune_head=True fine-tunes EfficientNet-Lite0's head; the encoder "
                         f"{name!r} has none to fine-tune. Use encoder='efficientnet-lite0' or "
                         "finetune_head=False.")
    trunk, head = pre_head_encoder(enc)
    spec = EncoderSpec(
        trunk.name, spec.argument, spec.weights_id, int(trunk.dim), input_size=spec.input_size,
        identity=trunk.identity, weights_path=spec.weights_path,
        head={"dim": int(head["weight"].shape[0]), "channels": int(head["weight"].shape[1]),
              "cells": head["cells"], "base": spec.name})
    return trunk, spec, head


def section_features(image: SlideImage, encoder, geometry, out_px: int, scales, *,
                     cache_dir=None, progress: bool = False) -> np.ndarray:
    """``n_spots × (n_scales · dim)`` float32 features of a section's tiles at every scale.

    ``geometry`` is the section's :class:`~spotlens.histology.TileGeometry` (centres and
    scale-1 side in px); ``encoder`` None means colour statistics. Cached in ``cache_dir``
    when the image is a file (:func:`~spotlens.histology._features.multiscale_features`).
    """
    from ._features import image_identity, multiscale_features

    image_id = None if image.path is None else "spot_tiles|" + image_identity(image.path)
    return multiscale_features(
        image, geometry.centres_px, geometry.side_px, encoder, scales=scales, out_px=out_px,
        cache_dir=cache_dir if image_id else None, image_id=image_id, tile_um=geometry.tile_um,
        mpp=geometry.mpp, progress=progress,
    )


def spot_pitch_px(coords: np.ndarray) -> float | None:
    """Spot pitch: the median distance from each spot to its 4 nearest spots, px.

    A square (legacy ST) or hexagonal (Visium) array has at least 4 neighbours at one pitch;
    the nearest one alone is biased low when the centres jitter (her2st: 274 px nearest vs
    292 px = 200 µm). None for fewer than 2 spots.
    """
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return None
    k = min(5, len(coords))
    dist, _ = cKDTree(coords).query(coords, k=k)
    return float(np.median(dist[:, 1:]))
