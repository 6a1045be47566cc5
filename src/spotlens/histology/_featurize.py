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


def open_trained_encoder(info: EncoderSpec, device: str, encoder_weights=None):
    """The encoder a model was trained with, checked against what :class:`EncoderSpec` recorded.

    ``encoder_weights`` is where the checkpoint is now when it moved since training (None: the
    path recorded at training). A fine-tuned head is split off (the model reads the trunk).

    Raises
    ------
    InputError
        If the encoder available now has other weights than the one used in training,
        prepares tiles differently (input size, normalisation), or its checkpoint file is
        neither where training recorded it nor at ``encoder_weights``.
    """
    weights = encoder_weights or info.weights_path
    if weights is not None and not Path(weights).expanduser().is_file():
        raise InputError(
            f"The model's encoder ({info.argument}) reads its weights from {weights}, "
            "which is not there. Pass the file: load_model(..., encoder_weights=PATH) (CLI: "
            "--encoder-weights PATH); it must be the same checkpoint (SHA-256 checked)."
        )
    enc, now = encoder_spec(info.argument, device, weights)
    if info.head is not None:  # the model fine-tuned the encoder's head: it reads the trunk
        enc, now, _ = split_head(enc, now, True)
    if now.weights_id != info.weights_id or now.dim != info.dim:
        raise InputError(
            f"The model was trained on features of {info.name} with weights "
            f"{info.weights_id[:24]}… ({info.dim} features), but that encoder now "
            f"has weights {now.weights_id[:24]}… ({now.dim} features). Features of "
            "another encoder do not fit this model; install the original weights or retrain."
        )
    if info.identity and now.identity != info.identity:
        # same weights, other input size or normalisation (e.g. a ViT whose config.json
        # stayed behind): the features would differ silently
        raise InputError(
            f"The model's encoder now prepares tiles differently: trained with "
            f"{info.identity.split('|', 2)[2]}, now {now.identity.split('|', 2)[2]} "
            "(input px | mean | std). For 'vit', put the config.json the weights came with "
            "beside them."
        )
    return enc


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
