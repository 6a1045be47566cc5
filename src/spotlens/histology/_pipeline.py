"""Expression from H&E, end to end: AnnData sections and images in, a model folder out.

This is the adapter layer over the array-level pieces: :func:`prepare_sections`
(``_sections.py``) reads and checks the sections before any tile is encoded, :func:`spot_tiles`
cuts tiles, :func:`tile_features` (or :func:`colour_features`) turns them into features, the
target genes come from :func:`select_target_genes` / :func:`section_log_expression`, and the
model is an :class:`ExpressionModel` (``"attention"``, ``"graph"``) or a
:class:`RidgeBaseline` (``"ridge"``). A model folder holds

- ``config.json``: encoder, tile geometry (µm, px, µm/px), spot pitch, genes and the rule that
  chose them, training sections, seed, validation metrics, spotlens version;
- ``model.pt`` (:meth:`ExpressionModel.save`) or ``model.npz`` (ridge arrays, no pickle);
- ``checkpoint.pt``, ``checkpoint-final.pt`` and ``checkpoint.json`` while (and after) training,
  so an interrupted :func:`train` resumes where it stopped.

Every file is written atomically (a temporary file in the folder, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._validation import InputError
from ._image import SlideImage, check_mpp
from ._normalize import standardize_section
from ._rank import DEFAULT_RANKS, rank_label
from ._sections import (  # noqa: F401 (re-exported: load_section, _section_name)
    GENE_RULES,
    _choose_genes,
    _section_name,
    load_section,
    prepare_sections,
)
from ._tiles import DEFAULT_TILE_SCALES, check_tile_scales

logger = logging.getLogger("spotlens")

FORMAT = "spotlens.histology.model/1"
CONFIG_FILE = "config.json"
COLOUR_ENCODER = "colour"
MODEL_TYPES = ("attention", "graph", "ridge")
PREDICTION_KEY = "histology_prediction"
_MAX_MPP_RATIO = 2.0  # a scan this much coarser than the training scans is refused


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def _encoder_info(encoder: str, device: str, weights=None) -> tuple[Any, dict]:
    """Return ``(encoder or None for colour features, its description for config.json)``.

    ``weights``: the checkpoint a named architecture reads (``"resnet50"``, ``"vit"``); its
    absolute path is recorded, so the model finds it again.
    """
    if str(encoder).lower() == COLOUR_ENCODER:
        if weights is not None:
            raise InputError("encoder_weights is for 'resnet50' or 'vit'; colour features have "
                             "no weights.")
        from ._features import COLOUR_FEATURE_NAMES

        return None, {"name": COLOUR_ENCODER, "argument": COLOUR_ENCODER,
                      "weights_id": "colour_features/1", "dim": len(COLOUR_FEATURE_NAMES)}
    from ._encoders import get_encoder

    enc = get_encoder(encoder, device=device, weights=weights)
    info = {"name": enc.name, "argument": str(encoder), "weights_id": enc.weights_id,
            "dim": int(enc.dim), "input_size": int(enc.input_size), "identity": enc.identity}
    if weights is not None:
        info["weights_path"] = str(Path(weights).expanduser().resolve())
    return enc, info


def _head_encoder(enc, enc_info: dict, finetune_head) -> tuple[Any, dict, dict | None]:
    """Split ``enc`` before its head when the model fine-tunes it (``finetune_head``).

    Returns ``(encoder, info, head)``: the pre-head trunk, its description (with the base
    encoder's and the head's shapes) and the pretrained head; or the inputs and None.
    """
    from ._encoders import pre_head_encoder, supports_head_finetuning

    if not finetune_head:
        return enc, enc_info, None
    if enc is None or not supports_head_finetuning(enc):
        name = COLOUR_ENCODER if enc is None else enc.name
        raise InputError(f"finetune_head=True fine-tunes EfficientNet-Lite0's head; the encoder "
                         f"{name!r} has none to fine-tune. Use encoder='efficientnet-lite0' or "
                         "finetune_head=False.")
    trunk, head = pre_head_encoder(enc)
    info = {**enc_info, "name": trunk.name, "dim": int(trunk.dim), "identity": trunk.identity,
            "head": {"dim": int(head["weight"].shape[0]), "channels": int(head["weight"].shape[1]),
                     "cells": head["cells"], "base": enc_info["name"]}}
    return trunk, info, head


def _features(image: SlideImage, encoder, geometry, out_px, scales, *, cache_dir, progress):
    """``n_spots × (n_scales · dim)`` features of a section's tiles at every scale."""
    from ._features import image_identity, multiscale_features

    image_id = None if image.path is None else "spot_tiles|" + image_identity(image.path)
    return multiscale_features(
        image, geometry.centres_px, geometry.side_px, encoder, scales=scales, out_px=out_px,
        cache_dir=cache_dir, image_id=image_id, tile_um=geometry.tile_um, mpp=geometry.mpp,
        progress=progress,
    )


def _spot_pitch_px(coords: np.ndarray) -> float | None:
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


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _write_json(obj: dict, path: Path) -> None:
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train(
    sections,
    *,
    genes="hvg",
    model: str = "attention",
    encoder: str = "efficientnet-lite0",
    encoder_weights=None,
    tile_um: float | None = None,
    mpp=None,
    tile_scales=DEFAULT_TILE_SCALES,
    standardize: bool = True,
    out_px: int = 224,
    config=None,
    cache_dir=None,
    device: str = "cpu",
    seed: int = 0,
    out,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train a model of spot expression from H&E tiles and write it to a folder.

    Before any tile is encoded, every section is checked (:func:`prepare_sections`): its scale
    in µm per pixel must be known (``mpp``, the image file, or the AnnData), its spots must lie
    on the image, the image must decode and match the downscaled copy the section stores in
    ``uns["spatial"][library_id]["images"]`` if any (grey-level Pearson r >= 0.8,
    :func:`~spotlens.histology._image_check.check_section_image`), and the target genes are
    chosen (named genes must be in at least one section).

    Steps: cut tiles of several sizes around every spot, encode them and put the features side
    by side (:func:`multiscale_features`; cached in ``cache_dir``), z-score them within each
    section (:func:`standardize_section`), choose the target genes on the training sections,
    compute their log-normalised expression ``log1p(normalize_total(counts, 1e4))`` (genes a
    section lacks are 0), then fit. For ``"attention"``/``"graph"``: early stopping on the last
    training section (training on the others), then a refit on all sections for the best number
    of epochs (at least 10) and the projection rank chosen on that section. For ``"ridge"``:
    standardise → PCA(256) → ridge, alpha and then the projection rank by
    leave-one-section-out cross-validation. The projection (reduced-rank output,
    :mod:`spotlens.histology._rank`) keeps the predictions on the leading principal axes of the
    training expression: on held-out her2st and mouse olfactory bulb sections it raised the
    mean Pearson r by 0.005–0.02 (``benchmarks/histology_her2st.py``).

    With ``config.finetune_head`` (EfficientNet-Lite0 only) the network also trains a copy of
    the encoder's last layer: tiles are encoded up to the encoder's last block
    (:func:`~spotlens.histology._encoders.pre_head_encoder`, cached), a per-scale copy of the
    pretrained head convolution turns those maps into features, which are z-scored within each
    section inside the model, and head and model learn together. The fine-tuned head is saved
    with the model and used at prediction (:meth:`HistologyModel.encode_tiles`).

    Parameters
    ----------
    sections
        List of ``(adata, image)`` pairs, e.g. from :func:`load_section`: ``adata`` with raw
        counts (``n_spots × n_genes``) and spot centres in full-resolution px in
        ``obsm["spatial"]``; ``image`` the full-resolution H&E file path (or a
        :class:`SlideImage` opened from a file).
    genes
        ``"hvg"`` (50 highly variable genes, seurat_v3 with batch = section), ``"top_expressed"``
        (250 most expressed genes) or a list of gene names.
    model
        ``"attention"``, ``"graph"`` or ``"ridge"``.
    encoder
        Encoder name or TorchScript file for :func:`get_encoder`, or ``"colour"`` for the 25
        colour statistics of :func:`colour_features` (no torch needed with ``"ridge"``).
    encoder_weights
        Checkpoint of a named architecture: a torchvision-format ResNet-50 for ``"resnet50"``,
        a timm-format Vision Transformer (e.g. a pathology foundation model) for ``"vit"``.
        Its absolute path and SHA-256 are recorded in ``config.json``; prediction reads the
        file from there (or from ``load_model(..., encoder_weights=)``).
    tile_um
        Side of the scale-1 tile in µm; None = each section's spot diameter.
    mpp
        µm per full-resolution px of the images (µm/px): one number for all sections, or a
        list with one number (or None) per section. None = what each section records: the
        image file (TIFF/SVS), ``uns["spatial"][library_id]["scalefactors"]
        ["microns_per_pixel"]`` or ``["metadata"]["microns_per_pixel"|"microns_per_pixel_est"]``.
        Overrides those (a value > 10 % off is logged). Required where a section records
        none (JPEG/PNG without it in the AnnData): the model tiles new images in µm.
    tile_scales
        Tile sides as multiples of the scale-1 tile; features of all are concatenated.
        Default ``(1, 2, 4)``: the spot and two wider fields of view around it.
    standardize
        Z-score every feature within each section (:func:`standardize_section`; sections are
        standardised the same way at prediction). True by default: it removes section-wide
        stain and scanner shifts.
    out_px
        Tile side in px after resizing.
    config
        :class:`TrainConfig` for ``"attention"``/``"graph"`` (its ``model`` and ``seed`` are
        overridden by ``model`` and ``seed``); None = defaults.
    cache_dir
        Folder of cached encoder features; None = no cache.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (encoder and model).
    seed
        Seed of the model's initialisation and dropout.
    out
        Model folder (created if missing).
    resume
        Continue from ``out/checkpoint*.pt`` of an interrupted run with the same data and
        settings (a larger ``config.epochs`` continues training).
    progress
        Progress bars for encoding and training.

    Returns
    -------
    The model folder ``out`` with ``config.json`` and ``model.pt`` (or ``model.npz``).
    ``config.json["validation"]`` holds the held-out score the settings were chosen on:
    ``section`` (the early-stopping section, or ``"leave-one-section-out"`` for ridge),
    ``mean_pearson``, ``expression_rank`` (``"10"``, ``"full"``) and ``rank_scores`` (rank
    label -> mean Pearson r), plus ``best_epoch``, ``epochs_run``, ``mse``, ``n_spots`` and
    ``val_pearson_history`` (networks) or ``alpha`` and ``per_section`` (ridge).
    ``config.json["sections"]`` lists each section's ``name``, ``image``, ``n_spots``, ``mpp``
    (µm/px), ``mpp_source`` (``"argument"``, ``"image"``, ``"scalefactors"``, ``"metadata"``),
    ``tile_px`` and ``image_check_r`` (agreement with its stored image, or None).
    With a fine-tuned head, ``config.json["encoder"]`` describes the encoder's trunk and holds
    ``head`` (``dim``, ``channels``, ``cells``, ``base`` encoder name).

    Raises
    ------
    InputError
        Before any tile is encoded: no section, a section whose µm/px is unknown (pass
        ``mpp``; ``--mpp`` on the command line), ``mpp`` of the wrong length or not positive, a
        section without coordinates or spot diameter, an image that does not fit its spots
        (another section or resolution) or does not match the section's stored image (another
        section's, e.g. padded to the right size), an image file that cannot be decoded
        (truncated), gene names in none of the sections (named, with close matches) or an
        unknown gene rule, a bad model type,
        ``finetune_head=True`` with an encoder other than EfficientNet-Lite0,
        ``encoder_weights`` for colour features or a checkpoint that does not fit the encoder
        (:func:`get_encoder`), ``"ridge"`` with fewer than 2 sections, or a checkpoint in
        ``out`` from a different run (pass ``resume=False`` or another ``out``).

    Examples
    --------
    >>> pairs = [load_section(f"her2st/{s}.h5ad") for s in ("C2", "C3", "C4", "C5")]
    >>> train(pairs, tile_um=100, out="her2st_model")  # doctest: +SKIP
    >>> mob = [load_section(f"stutility_mob/MOB{i}.h5ad") for i in (1, 2, 3)]
    >>> train(mob, mpp=100 / 24.05, out="mob_model")  # 100 µm spots, 24.05 px  # doctest: +SKIP
    """
    from .._version import __version__

    if model not in MODEL_TYPES:
        raise InputError(f"model must be one of {MODEL_TYPES}, got {model!r}.")
    if not isinstance(sections, (list, tuple)) or not sections:
        raise InputError("train needs a non-empty list of (adata, image_path) sections.")
    if model == "ridge" and len(sections) < 2:
        raise InputError("The ridge model chooses its penalty by leave-one-section-out "
                         "cross-validation and needs at least 2 training sections.")
    if tile_um is not None:
        tile_um = check_mpp(tile_um, what="tile_um", unit="µm")
    tile_scales = check_tile_scales(tile_scales)
    _model_dir(out)
    # everything that can be wrong with the data is refused before a tile is encoded
    names, data = prepare_sections(sections, mpp=mpp, tile_um=tile_um)
    logger.info("choosing target genes (%s)", genes if isinstance(genes, str) else "list")
    gene_list, rule = _choose_genes(genes, {n: data[n]["adata"] for n in names})
    out = _model_dir(out, create=True)
    enc, enc_info = _encoder_info(encoder, device, encoder_weights)
    if config is None:
        from ._train import TrainConfig

        config = TrainConfig()
    head = None
    if model != "ridge":
        enc, enc_info, head = _head_encoder(enc, enc_info, config.finetune_head)

    from ._metrics import section_log_expression

    for name in names:
        d = data[name]
        adata, image, geometry = d["adata"], d["image"], d["geometry"]
        logger.info("%s: cutting %d tiles from %s", name, adata.n_obs, image.path.name)
        feats = _features(image, enc, geometry, out_px, tile_scales, cache_dir=cache_dir,
                          progress=progress)
        if standardize and head is None:  # a fine-tuned head's features: inside the model
            feats = standardize_section(feats)
        coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        d.update(image=str(image.path), features=feats, coords=coords,
                 side_px=geometry.side_px, mpp=geometry.mpp, tile_um=geometry.tile_um,
                 pitch_px=_spot_pitch_px(coords),
                 y=section_log_expression(adata, gene_list))

    mpps = [data[n]["mpp"] for n in names]
    pitch_um = [data[n]["pitch_px"] * data[n]["mpp"] for n in names
                if data[n]["pitch_px"] is not None]
    tiles_cfg = {
        "tile_um": float(np.mean([data[n]["tile_um"] for n in names])),
        "tile_um_argument": tile_um,
        "tile_px": float(np.mean([data[n]["side_px"] for n in names])),
        "scales": list(tile_scales),
        "standardize": "section" if standardize or head is not None else "none",
        "out_px": int(out_px),
        "mpp": float(np.mean(mpps)),
        "spot_pitch_um": float(np.median(pitch_um)) if pitch_um else None,
        "spot_pitch_px": float(np.median([data[n]["pitch_px"] for n in names
                                          if data[n]["pitch_px"] is not None] or [np.nan])),
    }
    if model != "ridge":
        config = replace(config, model=model, seed=int(seed))
    fingerprint = _fingerprint(names, data, gene_list, enc_info, tiles_cfg, model, config)

    if model == "ridge":
        validation, model_file = _train_ridge(names, data, gene_list, out)
        train_cfg = None
    else:
        validation, model_file, train_cfg = _train_network(
            names, data, gene_list, config, out, fingerprint=fingerprint, device=device,
            resume=resume, progress=progress, head=head)

    cfg = {
        "format": FORMAT,
        "spotlens_version": __version__,
        "model_type": model,
        "model_file": model_file,
        "train_config": train_cfg,
        "seed": int(seed),
        "encoder": enc_info,
        "tiles": tiles_cfg,
        "genes": gene_list,
        "gene_rule": rule,
        "sections": [{"name": n, "image": data[n]["image"], "n_spots": len(data[n]["coords"]),
                      "mpp": data[n]["mpp"], "mpp_source": data[n]["geometry"].mpp_source,
                      "tile_px": data[n]["side_px"],
                      "image_check_r": data[n]["image_r"]} for n in names],
        "validation": validation,
    }
    _write_json(cfg, out / CONFIG_FILE)
    logger.info("wrote %s", out)
    return out


def _fingerprint(names, data, genes, enc_info, tiles_cfg, model, config) -> str:
    cfg = asdict(config) if model != "ridge" else {}
    cfg.pop("epochs", None)
    blob = json.dumps({
        "sections": [(n, data[n]["image"], len(data[n]["coords"])) for n in names],
        "genes": genes, "encoder": enc_info.get("identity", enc_info["weights_id"]),
        "tiles": {k: v for k, v in tiles_cfg.items() if not k.startswith("spot_pitch")},
        "model": model, "config": cfg,
    }, sort_keys=True, default=_json_default)
    return hashlib.sha256(blob.encode()).hexdigest()


def _train_network(names, data, genes, config, out: Path, *, fingerprint, device, resume,
                   progress, head=None):
    from ._train import ExpressionModel, Section

    def section(n, with_y=True):
        d = data[n]
        return Section(n, d["features"], d["coords"], d["y"] if with_y else None)

    sidecar_path = out / "checkpoint.json"
    probe_ckpt, final_ckpt = out / "checkpoint.pt", out / "checkpoint-final.pt"
    sidecar = _read_json(sidecar_path) if resume else None
    if resume and probe_ckpt.exists():
        if sidecar is None or sidecar.get("fingerprint") != fingerprint:
            raise InputError(
                f"{out} holds a checkpoint of a different training run (other sections, genes, "
                "encoder, tiles or settings). Pass another output folder, or --no-resume "
                "(resume=False) to start over there."
            )
    if not resume:
        for path in (probe_ckpt, final_ckpt, sidecar_path):
            path.unlink(missing_ok=True)
        sidecar = None
    sidecar = {"fingerprint": fingerprint, "final_epochs": (sidecar or {}).get("final_epochs")}
    _write_json(sidecar, sidecar_path)

    validation = None
    epochs = config.epochs
    if len(names) >= 2:
        val = names[-1]
        logger.info("training (%s) on %s, early stopping on %s", config.model,
                    ", ".join(names[:-1]), val)
        probe = ExpressionModel(list(genes), config).fit(
            [section(n) for n in names[:-1]], validation=section(val), head=head,
            device=device, checkpoint=probe_ckpt, resume=True, progress=progress,
        )
        scores = [h["val_pearson"] for h in probe.history if "val_pearson" in h]
        epochs = max(probe.best_epoch, 10)
        best_pred = _predict_raw(probe, data[val]["features"], data[val]["coords"])
        from ._metrics import evaluate as _score

        res = _score(best_pred, data[val]["y"], genes)
        validation = {"section": val, "mean_pearson": res["mean_pearson"], "mse": res["mse"],
                      "best_epoch": probe.best_epoch, "epochs_run": len(probe.history),
                      "n_spots": res["n_spots"], "expression_rank": rank_label(probe.rank_),
                      "rank_scores": probe.rank_scores,
                      "val_pearson_history": [round(float(s), 5) for s in scores]}
        if config.expression_rank == "auto":
            config = replace(config, expression_rank=probe.rank_)
        logger.info("validation on %s: mean Pearson r %.3f at epoch %d of %d", val,
                    res["mean_pearson"], probe.best_epoch, len(probe.history))
    if sidecar["final_epochs"] != epochs:
        final_ckpt.unlink(missing_ok=True)
    sidecar["final_epochs"] = epochs
    _write_json(sidecar, sidecar_path)
    logger.info("refitting on all %d sections for %d epochs", len(names), epochs)
    final_cfg = replace(config, epochs=int(epochs))
    final = ExpressionModel(list(genes), final_cfg).fit(
        [section(n) for n in names], head=head, device=device, checkpoint=final_ckpt,
        resume=True, progress=progress,
    )
    final.save(out / "model.pt")
    return validation, "model.pt", asdict(final_cfg)


def _predict_raw(net, features: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Predict a whole section from training-style features (a fine-tuned head's maps)."""
    from ._train import Section

    if net.finetunes_head:
        features = standardize_section(net.head_features(features))
    return net.predict(Section("validation", features, coords))


def _train_ridge(names, data, genes, out: Path):
    from ..io import atomic_path
    from ._baseline import RidgeBaseline

    logger.info("fitting the ridge baseline on %s", ", ".join(names))
    ridge = RidgeBaseline(ranks=DEFAULT_RANKS).fit({n: data[n]["features"] for n in names},
                                                   {n: data[n]["y"] for n in names})
    proj = ridge._projection
    with atomic_path(out / "model.npz") as tmp, open(tmp, "wb") as handle:
        np.savez(handle, mean=proj.mean, scale=proj.scale, components=proj.components,
                 coef=ridge.coef_, intercept=ridge.intercept_, alpha=np.array(ridge.alpha_))
    cv = ridge.rank_scores_.loc[rank_label(ridge.rank_)]
    validation = {"section": "leave-one-section-out", "alpha": ridge.alpha_,
                  "expression_rank": rank_label(ridge.rank_),
                  "mean_pearson": float(cv.mean()),
                  "per_section": {k: float(v) for k, v in cv.items()},
                  "rank_scores": {k: float(v) for k, v in
                                  ridge.rank_scores_.mean(axis=1).items()}}
    logger.info("ridge: alpha %.3g, expression rank %s, cross-validated mean Pearson r %.3f",
                ridge.alpha_, rank_label(ridge.rank_), cv.mean())
    return validation, "model.npz"


# --------------------------------------------------------------------------------------------
# Loading and predicting
# --------------------------------------------------------------------------------------------


def _model_dir(path, *, create: bool = False) -> Path:
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"The model path {path} is a file; a model is a folder.")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"Cannot create the model folder {path} ({err.strerror}).") from err
    return path
