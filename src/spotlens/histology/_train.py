"""Training from H&E: AnnData sections and images in, a fitted :class:`HistologyModel` out.

:func:`train` is the public entry point (it writes the model folder); :func:`fit_model` does
the work in memory: check every section before a tile is encoded (``_sections.py``), choose the
genes, encode the tiles (``_featurize.py``), and fit the model type's predictor with its
held-out protocol (``_registry.py``, ``_fit.py``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .._validation import InputError
from ..io import check_mpp
from . import _featurize
from ._folder import ModelConfig, SectionRecord, TileSettings, fingerprint, model_dir
from ._model import HistologyModel
from ._normalize import standardize_section
from ._registry import MODEL_TYPES
from ._sections import _choose_genes, prepare_sections
from ._defaults import DEFAULT_GENES, DEFAULT_MODEL, DEFAULT_STANDARDIZE, DEFAULT_TRAIN_SCALES
from ._tiles import check_tile_scales
from ._train_data import TrainConfig
from ._uncertainty import DEFAULT_N_BOOTSTRAP, ENSEMBLE_FILE, check_n_bootstrap, fit_ensemble

logger = logging.getLogger("spotlens")


def train(
    sections,
    *,
    genes=DEFAULT_GENES,
    model: str | None = None,
    encoder: str = "efficientnet-lite0",
    encoder_weights=None,
    tile_um: float | None = None,
    mpp=None,
    tile_scales=DEFAULT_TRAIN_SCALES,
    standardize: bool = DEFAULT_STANDARDIZE,
    out_px: int = 224,
    config=None,
    cache_dir=None,
    device: str = "cpu",
    seed: int = 0,
    out,
    resume: bool = True,
    progress: bool = True,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    nuclei=None,
) -> Path:
    """Train a model of spot expression from H&E tiles and write it to a folder.

    Before any tile is encoded, every section is checked (:func:`prepare_sections`): its scale
    in µm per pixel must be known (``mpp``, the image file, or the AnnData), its spots must lie
    on the image, the image must decode and match the downscaled copy the section stores in
    ``uns["spatial"][library_id]["images"]`` if any (grey-level Pearson r >= 0.8,
    :func:`~spotlens.histology._image_check.check_section_image`), and the target genes are
    chosen (named genes must be in at least one section). Nothing is written before that.

    The defaults are the route the frozen evaluation protocol selects on her2st's training
    sections (:func:`run_protocol`, nested leave-one-section-out; ``_defaults.py``,
    ``benchmarks/results/histology_her2st_protocol.md``): ridge with alpha and projection rank
    by leave-one-section-out CV, on 50 HVGs, tiles of 1, 2 and 4 spot diameters, features
    z-scored within each section.

    Steps: cut tiles around every spot (of several sizes with ``tile_scales``), encode them and
    put the features side by side (:func:`multiscale_features`; cached in ``cache_dir``),
    z-score them within each section (:func:`standardize_section`), choose the target genes on the training sections,
    compute their log-normalised expression ``log1p(normalize_total(counts, 1e4))`` (genes a
    section lacks are 0), then fit. For ``"attention"``/``"graph"``: early stopping on the last
    training section (training on the others), then a refit on all sections for the best number
    of epochs (at least 10) and the projection rank chosen on that section. For ``"ridge"``:
    standardise → PCA(256) → ridge, alpha and then the projection rank by
    leave-one-section-out cross-validation (``_fit.py``). The projection (reduced-rank output,
    :mod:`spotlens.histology._rank`) keeps the predictions on the leading principal axes of the
    training expression (its effect on held-out sections: ``benchmarks/histology_her2st.py``).

    With ``config.finetune_head`` (EfficientNet-Lite0 only) the network also trains a copy of
    the encoder's last layer: tiles are encoded up to the encoder's last block
    (:func:`~spotlens.histology._head.pre_head_encoder`, cached), a per-scale copy of the
    pretrained head convolution turns those maps into features, which are z-scored within each
    section inside the model, and head and model learn together. The fine-tuned head is saved
    with the model and used at prediction (:meth:`HistologyModel.encode_tiles`).

    Parameters
    ----------
    sections
        List of ``(adata, image)`` pairs, e.g. from :func:`spotlens.io.read_section`: ``adata``
        with raw counts (``n_spots × n_genes``) and spot centres in full-resolution px in
        ``obsm["spatial"]``; ``image`` the full-resolution H&E file path (or a
        :class:`SlideImage` opened from a file).
    genes
        ``"hvg"`` (50 highly variable genes, seurat_v3 with batch = section; the default),
        ``"top_expressed"`` (250 most expressed genes), ``"svg"`` (50 spatially variable
        genes, Moran's I) — chosen as the protocol does (:func:`select_gene_sets`:
        mitochondrial, ribosomal and housekeeping genes excluded) — or a list of gene names.
    model
        ``"ridge"``, ``"attention"``, ``"graph"`` or ``"nucleus"`` (each segmented nucleus's
        expression, summed to its spot; reads ``nuclei``; ``_registry.MODEL_TYPES``). None (the
        default): ``config.model`` when a :class:`TrainConfig` is given, else ``"ridge"``.
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
        Default ``(1, 2, 4)``: the spot and two wider fields of view around it (what the
        protocol selects over the spot's tile alone).
    standardize
        Z-score every feature within each section (:func:`standardize_section`; sections are
        standardised the same way at prediction). True by default: it removes section-wide
        stain and scanner shifts. Transductive: a section's features depend on all its spots'
        images (never on its expression).
    out_px
        Tile side in px after resizing.
    config
        :class:`TrainConfig` for ``"attention"``/``"graph"`` (its ``model`` and ``seed`` are
        overridden by ``model`` when given, and ``seed``); None = defaults.
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
    n_bootstrap
        Members of the uncertainty ensemble: ridge heads refitted on block-bootstrap
        replicates of the training spots (``_uncertainty.py``; closed form, seconds), whose
        spread :func:`predict` stores as the per-spot, per-gene uncertainty. For ``"ridge"``
        it is the model's own bootstrap; for a network, that of a ridge readout of the same
        features. 0 = no ensemble (predictions then carry no uncertainty).
    nuclei
        For ``model="nucleus"``: one AnnData of nuclei per section
        (:func:`~spotlens.histology.segment_nuclei` with ``adata=`` the section, so each
        nucleus knows its spot), in the order of ``sections``; None = segment them here with
        the default settings (minutes per section). ``config`` may be a
        :class:`~spotlens.histology.NucleusModelConfig` (its ``proportions_key`` names the
        sections' deconvolved proportions, for cell types).

    Returns
    -------
    The model folder ``out`` (:meth:`HistologyModel.save`) with ``config.json``
    (:class:`~spotlens.histology._folder.ModelConfig`), ``model.pt`` (or ``model.npz``) and,
    unless ``n_bootstrap=0``, ``uncertainty.npz`` (recorded in ``config.json["uncertainty"]``).
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
        (:func:`get_encoder`), ``"ridge"`` with fewer than 2 sections, ``n_bootstrap`` not 0
        or an integer ≥ 2, or a checkpoint in ``out`` from a different run (pass
        ``resume=False`` or another ``out``).

    Examples
    --------
    >>> from spotlens.io import read_section
    >>> pairs = [read_section(f"her2st/C{i}.h5ad") for i in range(2, 6)]  # doctest: +SKIP
    >>> train(pairs, tile_um=100, out="her2st_model")  # doctest: +SKIP
    >>> mob = [read_section(f"stutility_mob/MOB{i}.h5ad") for i in (1, 2, 3)]  # doctest: +SKIP
    >>> train(mob, mpp=100 / 24.05, out="mob_model")  # 100 µm spots, 24.05 px  # doctest: +SKIP
    """
    model_dir(out)  # a file in the way is refused first
    fitted = fit_model(sections, genes=genes, model=model, encoder=encoder,
                       encoder_weights=encoder_weights, tile_um=tile_um, mpp=mpp,
                       tile_scales=tile_scales, standardize=standardize, out_px=out_px,
                       config=config, cache_dir=cache_dir, device=device, seed=seed,
                       checkpoint_dir=out, resume=resume, progress=progress,
                       n_bootstrap=n_bootstrap, nuclei=nuclei)
    out = fitted.save(out)
    logger.info("wrote %s", out)
    return out


def fit_model(sections, *, genes=DEFAULT_GENES, model: str | None = None,
              encoder: str = "efficientnet-lite0", encoder_weights=None,
              tile_um: float | None = None, mpp=None, tile_scales=DEFAULT_TRAIN_SCALES,
              standardize: bool = DEFAULT_STANDARDIZE, out_px: int = 224, config=None, cache_dir=None,
              device: str = "cpu", seed: int = 0, checkpoint_dir=None, resume: bool = True,
              progress: bool = True,
              n_bootstrap: int = DEFAULT_N_BOOTSTRAP, nuclei=None) -> HistologyModel:
    """Fit a :class:`HistologyModel` in memory; the arguments are those of :func:`train`.

    ``checkpoint_dir`` (``train``'s ``out``): where a network writes its checkpoints and
    resumes from (created once the sections pass their checks); None = no checkpoints.

    Raises
    ------
    InputError
        As :func:`train`.
    """
    from .._version import __version__
    from ._metrics import section_log_expression

    if model is None:
        model = config.model if isinstance(config, TrainConfig) else DEFAULT_MODEL
    kind = _check_arguments(sections, model)
    n_bootstrap = check_n_bootstrap(n_bootstrap)
    if tile_um is not None:
        tile_um = check_mpp(tile_um, what="tile_um", unit="µm")
    tile_scales = check_tile_scales(tile_scales)
    if checkpoint_dir is not None:
        model_dir(checkpoint_dir)
    nuclei = _check_nuclei_list(nuclei, sections, kind)
    # everything that can be wrong with the data is refused before a tile is encoded
    names, data = prepare_sections(sections, mpp=mpp, tile_um=tile_um)
    logger.info("choosing target genes (%s)", genes if isinstance(genes, str) else "list")
    gene_list, rule = _choose_genes(genes, {n: data[n]["adata"] for n in names})
    folder = None if checkpoint_dir is None else model_dir(checkpoint_dir, create=True)
    enc, spec = _featurize.encoder_spec(encoder, device, encoder_weights)
    net_config = None
    if kind.trains_network:
        net_config = replace(config if config is not None else TrainConfig(), model=model,
                             seed=int(seed))
    enc, spec, head = _featurize.split_head(enc, spec, bool(net_config and
                                                            net_config.finetune_head))
    for name in names:
        d = data[name]
        adata, image, geometry = d["adata"], d["image"], d["geometry"]
        logger.info("%s: cutting %d tiles from %s", name, adata.n_obs, image.path.name)
        feats = _featurize.section_features(image, enc, geometry, out_px, tile_scales,
                                            cache_dir=cache_dir, progress=progress)
        if standardize and head is None:  # a fine-tuned head's features: inside the model
            feats = standardize_section(feats)
        coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        d.update(image=str(image.path), features=feats, coords=coords,
                 pitch_px=_featurize.spot_pitch_px(coords),
                 y=section_log_expression(adata, gene_list))
        if kind.reads_nuclei:
            d.update(kind.section_inputs(adata, image, nuclei[names.index(name)],
                                         mpp=geometry.mpp, config=config))
    tiles = _tile_settings(names, data, tile_um, tile_scales, standardize or head is not None,
                           out_px)
    run_id = _run_id(names, data, gene_list, spec, tiles, model, net_config)
    predictor, validation, train_cfg = kind.fit(
        names, data, gene_list, config=net_config if kind.trains_network else config, folder=folder, fingerprint=run_id,
        device=device, resume=resume, progress=progress, head=head)
    ensemble, record = _uncertainty(names, data, predictor, kind, head, n_bootstrap, seed)
    settings = ModelConfig(
        model_type=model, model_file=kind.file, encoder=spec, tiles=tiles,
        genes=tuple(gene_list), gene_rule=rule, validation=validation, train_config=train_cfg,
        sections=tuple(_section_record(n, data[n]) for n in names), seed=int(seed),
        spotlens_version=__version__, uncertainty=record)
    fitted = HistologyModel(settings, predictor, device=device, ensemble=ensemble)
    fitted._encoder = enc
    return fitted


def _uncertainty(names, data, predictor, kind, head, n_boot: int, seed: int):
    """The uncertainty ensemble and its ``config.json`` record (None, None with 0 members)."""
    from ._intervals import DEFAULT_BLOCK_SPACINGS

    if n_boot == 0:
        return None, None
    if head is not None:  # the ensemble reads what the network reads: the head's features
        data = {n: {**data[n], "features": standardize_section(
            predictor.head_features(data[n]["features"]))} for n in names}
    ensemble = fit_ensemble(names, data, ridge=predictor if kind.name == "ridge" else None,
                            n_boot=n_boot, seed=seed)
    record = {"file": ENSEMBLE_FILE, "method": ensemble.method, "n_boot": int(n_boot),
              "block_spacings": float(DEFAULT_BLOCK_SPACINGS), "alpha": ensemble.alpha,
              "seed": int(seed)}
    return ensemble, record


def _check_nuclei_list(nuclei, sections, kind) -> list:
    """One AnnData of nuclei (or None) per section for a model that reads nuclei."""
    if not kind.reads_nuclei:
        if nuclei is not None:
            raise InputError(f"nuclei= is read by model='nucleus' only, not {kind.name!r}.")
        return []
    if nuclei is None:
        return [None] * len(sections)
    if not isinstance(nuclei, (list, tuple)) or len(nuclei) != len(sections):
        raise InputError("nuclei must be a list with one AnnData of nuclei (or None) per "
                         f"section: {len(sections)} sections.")
    return list(nuclei)


def _check_arguments(sections, model: str):
    if model not in MODEL_TYPES:
        raise InputError(f"model must be one of {tuple(MODEL_TYPES)}, got {model!r}.")
    if not isinstance(sections, (list, tuple)) or not sections:
        raise InputError("train needs a non-empty list of (adata, image_path) sections.")
    kind = MODEL_TYPES[model]
    if len(sections) < kind.min_sections:
        raise InputError(f"The {model} model is fitted by leave-one-section-out "
                         f"cross-validation and needs at least {kind.min_sections} training "
                         "sections.")
    return kind


def _run_id(names, data, genes, spec, tiles: TileSettings, model: str, net_config) -> str:
    """The fingerprint tying checkpoints to a run: data, genes, encoder, tiles, settings.

    ``epochs`` is left out, so a run continued with more epochs resumes.
    """
    config = {} if net_config is None else asdict(net_config)
    config.pop("epochs", None)
    return fingerprint(
        sections=[(n, data[n]["image"], len(data[n]["coords"])) for n in names], genes=genes,
        encoder=spec.identity if spec.identity is not None else spec.weights_id,
        tiles={k: v for k, v in tiles.to_dict().items() if not k.startswith("spot_pitch")},
        model=model, config=config)


def _tile_settings(names, data, tile_um, scales, standardize: bool, out_px) -> TileSettings:
    """The tile geometry the model records: means over the sections (µm, px, µm/px)."""
    pitch_px = [data[n]["pitch_px"] for n in names if data[n]["pitch_px"] is not None]
    pitch_um = [data[n]["pitch_px"] * data[n]["geometry"].mpp for n in names
                if data[n]["pitch_px"] is not None]
    return TileSettings(
        tile_um=float(np.mean([data[n]["geometry"].tile_um for n in names])),
        tile_um_argument=tile_um,
        tile_px=float(np.mean([data[n]["geometry"].side_px for n in names])),
        scales=tuple(scales), standardize="section" if standardize else "none",
        out_px=int(out_px), mpp=float(np.mean([data[n]["geometry"].mpp for n in names])),
        spot_pitch_um=float(np.median(pitch_um)) if pitch_um else None,
        spot_pitch_px=float(np.median(pitch_px or [np.nan])),
    )


def _section_record(name: str, d: dict) -> SectionRecord:
    g = d["geometry"]
    return SectionRecord(name=name, image=d["image"], n_spots=len(d["coords"]), mpp=g.mpp,
                         mpp_source=g.mpp_source, tile_px=g.side_px, image_check_r=d["image_r"])
