"""Using a trained H&E model folder: load it, score it on sections with expression, predict.

:func:`load_model` reads a folder written by :func:`spotlens.histology.train` into a
:class:`HistologyModel`; :func:`evaluate` scores it on held-out sections, and :func:`predict`
writes predicted expression into a section's AnnData (on this machine or on a Dask cluster).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._validation import InputError
from ._image import SlideImage, check_mpp, read_image
from ._image_check import check_section_image
from ._normalize import standardize_section
from ._pipeline import (
    _MAX_MPP_RATIO,
    COLOUR_ENCODER,
    CONFIG_FILE,
    FORMAT,
    PREDICTION_KEY,
    _encoder_info,
    _features,
    _head_encoder,
    _model_dir,
    _read_json,
    _section_name,
    load_section,
    logger,
)
from ._tiles import _check_on_image, tile_geometry

class HistologyModel:
    """A trained model folder, ready to predict (from :func:`load_model`).

    Attributes
    ----------
    path
        The model folder.
    config
        The parsed ``config.json``.
    genes
        Target genes, in the order of the predictions' columns.
    encoder_weights
        Where the encoder's checkpoint is now when it moved since training (None: the path
        recorded in ``config.json``, if the encoder reads one).
    """

    def __init__(self, path: Path, config: dict, *, device: str = "cpu", encoder_weights=None):
        self.path = path
        self.config = config
        self.genes: list[str] = list(config["genes"])
        self.device = device
        self.encoder_weights = None if encoder_weights is None else str(encoder_weights)
        self._encoder = None
        self._net = None
        self._ridge = None
        model_path = path / config["model_file"]
        if not model_path.is_file():
            raise InputError(f"{path} has no {config['model_file']}; training did not finish.")
        if config["model_type"] == "ridge":
            with np.load(model_path, allow_pickle=False) as z:
                self._ridge = {k: z[k] for k in z.files}
        else:
            from ._train import ExpressionModel

            self._net = ExpressionModel.load(model_path, device=device)

    def __repr__(self) -> str:
        return (f"HistologyModel({self.path}, {self.config['model_type']}, "
                f"{self.config['encoder']['name']}, {len(self.genes)} genes)")

    @property
    def encoder(self):
        """The encoder the model was trained with (None for colour features).

        Raises
        ------
        InputError
            If the encoder available now has other weights than the one used in training,
            prepares tiles differently (input size, normalisation), or its checkpoint file is
            neither where training recorded it nor at ``encoder_weights``.
        """
        info = self.config["encoder"]
        if info["name"] == COLOUR_ENCODER or self._encoder is not None:
            return self._encoder
        weights = self.encoder_weights or info.get("weights_path")
        if weights is not None and not Path(weights).expanduser().is_file():
            raise InputError(
                f"The model's encoder ({info['argument']}) reads its weights from {weights}, "
                "which is not there. Pass the file: load_model(..., encoder_weights=PATH) (CLI: "
                "--encoder-weights PATH); it must be the same checkpoint (SHA-256 checked)."
            )
        enc, now = _encoder_info(info["argument"], self.device, weights)
        if "head" in info:  # the model fine-tuned the encoder's head: it reads the trunk's maps
            enc, now, _ = _head_encoder(enc, now, True)
        if now["weights_id"] != info["weights_id"] or now["dim"] != info["dim"]:
            raise InputError(
                f"The model was trained on features of {info['name']} with weights "
                f"{info['weights_id'][:24]}… ({info['dim']} features), but that encoder now "
                f"has weights {now['weights_id'][:24]}… ({now['dim']} features). Features of "
                "another encoder do not fit this model; install the original weights or retrain."
            )
        if info.get("identity") and now.get("identity") != info["identity"]:
            # same weights, other input size or normalisation (e.g. a ViT whose config.json
            # stayed behind): the features would differ silently
            raise InputError(
                f"The model's encoder now prepares tiles differently: trained with "
                f"{info['identity'].split('|', 2)[2]}, now {now['identity'].split('|', 2)[2]} "
                "(input px | mean | std). For 'vit', put the config.json the weights came with "
                "beside them."
            )
        self._encoder = enc
        return enc

    @property
    def tile_scales(self) -> tuple[float, ...]:
        """Tile sides, as multiples of the scale-1 tile, whose features the model reads."""
        return tuple(self.config["tiles"].get("scales", (1.0,)))

    @property
    def standardize(self) -> bool:
        """Whether features are z-scored within each section before the model."""
        return self.config["tiles"].get("standardize", "none") == "section"

    @property
    def n_features(self) -> int:
        """Features per spot the model reads: encoder (or fine-tuned head) width × scales."""
        info = self.config["encoder"]
        width = info["head"]["dim"] if "head" in info else info["dim"]
        return int(width) * len(self.tile_scales)

    def _through_head(self, features: np.ndarray) -> np.ndarray:
        """Pass the encoder's features through the model's fine-tuned head, when it has one."""
        if self._net is not None and self._net.finetunes_head:
            return self._net.head_features(features)
        return features

    def encode_tiles(self, image: SlideImage, centres_px: np.ndarray,
                     side_px: float) -> np.ndarray:
        """Features of tiles around ``centres_px`` at the model's scales (not standardised).

        The encoder's features (:func:`multiscale_features`, no cache), passed through the
        model's fine-tuned head when it has one: what a Dask worker computes for its region.

        Parameters
        ----------
        image
            Full-resolution image.
        centres_px
            ``n_spots × 2`` tile centres ``(x, y)``, full-resolution px.
        side_px
            Scale-1 tile side, full-resolution px.

        Returns
        -------
        ``n_spots × n_features`` float32 (:attr:`n_features`).
        """
        from ._features import multiscale_features

        return self._through_head(multiscale_features(
            image, centres_px, side_px, self.encoder, scales=self.tile_scales,
            out_px=self.config["tiles"]["out_px"], progress=False,
        ))

    def section_features(self, spots: AnnData, image: SlideImage, geometry, *,
                         cache_dir=None, progress: bool = False) -> np.ndarray:
        """Features of a section's tiles at the model's tile scales, before standardisation.

        Parameters
        ----------
        spots
            The section's spots (only for the caller's bookkeeping; tiles follow ``geometry``).
        image
            Its full-resolution image.
        geometry
            :func:`tile_geometry` of the spots on ``image`` (centres and scale-1 side, px).
        cache_dir, progress
            Feature cache folder (used when the image is a file) and progress bars.

        Returns
        -------
        ``n_spots × n_features`` float32 (:attr:`n_features`; a fine-tuned head's features
        when the model has one).
        """
        return self._through_head(_features(
            image, self.encoder, geometry, self.config["tiles"]["out_px"], self.tile_scales,
            cache_dir=cache_dir if image.path else None, progress=progress,
        ))

    def predict_features(self, features: np.ndarray, coords: np.ndarray, *,
                         moments: dict | None = None) -> np.ndarray:
        """Predict from raw ``n_spots × n_features`` features and ``n_spots × 2`` centres (px).

        Parameters
        ----------
        features
            Features of :meth:`section_features` (not yet standardised), of a whole section or
            of part of one.
        coords
            Spot centres, full-resolution px (the graph model's neighbourhoods).
        moments
            When the model standardises features within a section and ``features`` is only
            part of it: the whole section's :func:`feature_moments`. None = ``features`` are
            the whole section.

        Returns
        -------
        ``n_spots × n_genes`` float32 log-normalised expression, columns = :attr:`genes`.

        Raises
        ------
        InputError
            If the feature width differs from training (encoder width × tile scales).
        """
        dim = self.n_features
        if features.ndim != 2 or features.shape[1] != dim:
            raise InputError(
                f"Features have shape {features.shape}; the model expects n_spots × {dim} "
                f"features ({self.config['encoder']['name']} at {len(self.tile_scales)} tile "
                "scale(s))."
            )
        if self.standardize:
            features = standardize_section(features, moments)
        if self._ridge is not None:
            r = self._ridge
            z = ((features - r["mean"]) / r["scale"]) @ r["components"].T
            pred = z @ r["coef"] + r["intercept"]
        else:
            from ._train import Section

            pred = self._net.predict(Section("predict", features, coords), device=self.device)
        return np.asarray(pred, dtype=np.float32)

    def _tile_args(self, image: SlideImage, mpp: float | None) -> dict:
        tiles = self.config["tiles"]
        mpp = mpp if mpp is not None else image.mpp
        if mpp is not None and tiles["mpp"] is not None and mpp > _MAX_MPP_RATIO * tiles["mpp"]:
            side = tiles["tile_um"] / mpp
            raise InputError(
                f"The image has {mpp:.3g} µm/px, more than {_MAX_MPP_RATIO:g}× coarser than the "
                f"training scans ({tiles['mpp']:.3g} µm/px): a {tiles['tile_um']:.0f} µm tile "
                f"would be {side:.0f} px instead of {tiles['tile_px']:.0f} px. Use the "
                "full-resolution image (not a downscaled copy), or check --mpp."
            )
        return {"tile_um": tiles["tile_um"] if tiles["tile_um"] is not None else None,
                "mpp": mpp}

    def predict_section(self, adata: AnnData, image, *, mpp: float | None = None,
                        cache_dir=None, progress: bool = False,
                        check_image: bool = True) -> np.ndarray:
        """Predict expression of every spot of a section from its image.

        Parameters
        ----------
        adata
            Spots with centres ``(x, y)`` in full-resolution px in ``obsm["spatial"]`` (and
            µm/px in ``uns["spatial"]`` or on the image when the model's tiles are in µm).
        image
            The section's full-resolution image (path or :class:`SlideImage`).
        mpp
            µm per full-resolution px; None = the image's, else the AnnData's.
        cache_dir
            Feature cache folder (None = none).
        progress
            Progress bar while encoding.
        check_image
            Before encoding, compare the image with the downscaled copy stored in
            ``adata.uns["spatial"][library_id]["images"]`` (if any) and refuse another
            section's (:func:`~spotlens.histology._image_check.check_section_image`).

        Returns
        -------
        ``n_spots × n_genes`` float32 log-normalised expression, columns = :attr:`genes`.

        Raises
        ------
        InputError
            If the image does not fit the spots (another section, or a downscaled copy), does
            not match the section's stored image, cannot be decoded (truncated file), its scale
            is unknown, it is much coarser than the training scans, or the encoder changed.
        """
        image = image if isinstance(image, SlideImage) else read_image(image)
        args = self._tile_args(image, mpp)
        tile_um = args["tile_um"]
        geometry = tile_geometry(adata, image=image, tile_um=tile_um, mpp=args["mpp"])
        if tile_um is not None and geometry.mpp is not None:
            self._tile_args(image, geometry.mpp)  # the resolution check with the resolved mpp
        _check_on_image(adata, geometry, image, "spatial")
        if check_image:
            name = geometry.library_id or (image.path.stem if image.path else "section")
            check_section_image(adata, image, section=name, library_id=geometry.library_id)
        feats = self.section_features(adata, image, geometry, cache_dir=cache_dir,
                                      progress=progress)
        return self.predict_features(feats, np.asarray(adata.obsm["spatial"], dtype=float))


def load_model(path, *, device: str = "cpu", encoder_weights=None) -> HistologyModel:
    """Open a model folder written by :func:`train`.

    Parameters
    ----------
    path
        The model folder (with ``config.json``).
    device
        Device of the encoder and network.
    encoder_weights
        Where the encoder's checkpoint is now, for a model trained with ``encoder_weights``
        whose file has moved (None: the path recorded at training). Its SHA-256 must match.

    Returns
    -------
    :class:`HistologyModel`.

    Raises
    ------
    InputError
        If the folder or its ``config.json`` is missing, unreadable or not a spotlens model, or
        the model file is missing.
    """
    path = _model_dir(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise InputError(f"{path} is not a spotlens histology model: no {CONFIG_FILE} in it.")
    config = _read_json(cfg_path)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InputError(f"{cfg_path} is not a spotlens histology model config ({FORMAT}).")
    return HistologyModel(path, config, device=device, encoder_weights=encoder_weights)


def evaluate(model_dir, sections, *, cache_dir=None, device: str = "cpu",
             progress: bool = False) -> pd.DataFrame:
    """Score a model on sections with measured expression.

    Parameters
    ----------
    model_dir
        Folder written by :func:`train` (or a :class:`HistologyModel`).
    sections
        List of ``(adata, image_path)`` pairs (:func:`load_section`), raw counts in ``X``.
    cache_dir, device, progress
        As in :func:`train`.

    Returns
    -------
    DataFrame, one row per section (index = section name): ``mean_pearson`` (mean over the
    model's genes of the per-gene Pearson r across spots; constant genes count 0),
    ``median_pearson``, ``mse`` (over spots × genes, log-normalised units), ``n_spots``,
    ``n_genes``, ``n_genes_missing`` (model genes absent from the section, counted as 0
    expression, as in :func:`section_log_expression`). ``df.attrs["per_gene"]`` holds the
    per-gene Pearson r as ``{section: {gene: r}}``; ``pd.DataFrame(df.attrs["per_gene"])`` is
    the ``n_genes × n_sections`` table.

    Raises
    ------
    InputError
        If no section is given, a section shares no gene with the model, or as
        :meth:`HistologyModel.predict_section`.
    """
    from ._metrics import evaluate as score
    from ._metrics import section_log_expression

    model = model_dir if isinstance(model_dir, HistologyModel) else load_model(
        model_dir, device=device)
    if not isinstance(sections, (list, tuple)) or not sections:
        raise InputError("evaluate needs a non-empty list of (adata, image_path) sections.")
    rows, per_gene, names = [], {}, set()
    for adata, image in sections:
        image = image if isinstance(image, SlideImage) else read_image(image)
        name = _section_name(adata, image.path or Path("section"), names)
        names.add(name)
        present = adata.var_names.isin(model.genes).sum()
        if present == 0:
            raise InputError(
                f"Section {name} shares none of the model's {len(model.genes)} genes (e.g. "
                f"{model.genes[:3]}; the section has e.g. {list(adata.var_names[:3])}). Is it "
                "another organism or gene naming (symbols vs Ensembl IDs)?"
            )
        logger.info("%s: predicting %d spots", name, adata.n_obs)
        pred = model.predict_section(adata, image, cache_dir=cache_dir, progress=progress)
        res = score(pred, section_log_expression(adata, model.genes), model.genes)
        rows.append({"section": name, "mean_pearson": res["mean_pearson"],
                     "median_pearson": res["median_pearson"], "mse": res["mse"],
                     "n_spots": res["n_spots"], "n_genes": res["n_genes"],
                     "n_genes_missing": len(model.genes) - int(present)})
        per_gene[name] = res["pearson"]
    table = pd.DataFrame(rows).set_index("section")
    # a plain dict (pandas compares attrs when combining frames; a DataFrame there breaks that)
    table.attrs["per_gene"] = {s: {g: float(r) for g, r in v.items()} for s, v in per_gene.items()}
    return table


def predict(
    model_dir,
    image_path,
    *,
    mpp: float | None = None,
    spacing_um: float | None = None,
    mask=None,
    cache_dir=None,
    device: str = "cpu",
    progress: bool = False,
    client=None,
    region_um: float | None = None,
) -> AnnData:
    """Predict expression on a grid of pseudo-spots over the tissue of an H&E-only image.

    The grid (:func:`grid_spots`) has the training spots' pitch and each pseudo-spot is
    tiled like a training spot (same side in µm, same ``out_px``). With ``client`` the tiles
    are read, encoded and predicted on a Dask cluster, one task per square image region (see
    ``docs/dask.md``); the predictions equal this machine's to float32 rounding.

    Parameters
    ----------
    model_dir
        Folder written by :func:`train` (or a :class:`HistologyModel`).
    image_path
        Full-resolution H&E image.
    mpp
        µm per full-resolution px; None = from the file (TIFF/SVS), which JPEG/PNG lack.
    spacing_um
        Grid pitch in µm; None = the training spots' pitch (``config["tiles"]
        ["spot_pitch_um"]``, 200 µm for legacy ST, 100 µm for Visium).
    mask
        Tissue mask for :func:`grid_spots` (None = detected).
    cache_dir, device, progress
        As in :func:`train` (``cache_dir`` and ``progress`` are not used with ``client``;
        ``device`` is then the workers' device).
    client
        None: predict on this machine. A ``distributed.Client`` (or ``"default"``, the
        current one): split the slide into square regions and predict each as a task on the
        cluster. This machine computes only the tissue mask and the grid; each worker opens
        the image and the model folder itself (both paths must be readable on the workers)
        and reads only its region's tiles. For the ``"graph"`` model each region also
        computes the spots within 4 graph hops of it (its halo) on the graph of all spots,
        so border spots see the same neighbours as on one machine.
    region_um
        With ``client``: side of a region, µm; None = 64 grid pitches (about 4,096 spots).

    Returns
    -------
    AnnData ``n_grid × n_genes``: ``X`` = predicted log-normalised expression (float32),
    ``var_names`` = model genes; ``obsm["spatial"]`` = centres ``(x, y)`` in full-resolution
    px; ``obs["array_row"]``, ``obs["array_col"]``, ``obs["in_tissue"]``;
    ``uns["spatial"][<image stem>]`` = ``{"images": {"hires"}, "scalefactors":
    {"spot_diameter_fullres" (= the tile side), "tissue_hires_scalef", "microns_per_pixel",
    "spot_spacing_fullres"}, "metadata"}`` (for ``sc.pl.spatial`` and
    :func:`spotlens.pl.overlay`); ``uns["histology_prediction"]["params"]`` = model folder,
    model type, encoder, tile µm, spacing µm, µm/px, spotlens version.

    Raises
    ------
    InputError
        If µm per pixel is unknown (pass ``mpp``), no tissue is found, the image is much
        coarser than the training scans, the model's tiles have no size in µm, or the encoder
        changed since training; ``client`` is not a Dask client (or ``"default"`` with none
        running); ``region_um`` is not > 0 or is given without ``client``.
    """
    from .._version import __version__
    from .._backend import resolve_client
    from ._distributed import check_region_um
    from ._tissue import grid_spots

    region_um = check_region_um(region_um)
    if client is None and region_um is not None:
        raise InputError("region_um applies to prediction on a Dask cluster; pass client= too.")
    client = None if client is None else resolve_client(client)
    model = model_dir if isinstance(model_dir, HistologyModel) else load_model(
        model_dir, device=device)
    path = Path(image_path).expanduser()
    image = read_image(path)
    mpp = check_mpp(mpp)
    if mpp is not None and image.mpp is not None and abs(mpp / image.mpp - 1) > 0.1:
        logger.warning("mpp %.4g differs from the %.4g µm/px stored in %s; using %.4g",
                       mpp, image.mpp, path.name, mpp)
    mpp = mpp if mpp is not None else image.mpp
    if mpp is None:
        raise InputError(
            f"The scale of {path.name} is unknown (JPEG/PNG carry none): pass --mpp (mpp=, µm "
            "per pixel of the full-resolution image, e.g. 0.5 for a 20× scan)."
        )
    image.mpp = mpp
    tiles = model.config["tiles"]
    if tiles["tile_um"] is None:
        raise InputError(
            "The model was trained on sections of unknown µm/px, so its tile size is known only "
            "in px of those scans; predicting on a new image needs a model trained with µm/px "
            "known (metadata['microns_per_pixel'] in the training sections)."
        )
    model._tile_args(image, mpp)
    spacing = spacing_um if spacing_um is not None else tiles["spot_pitch_um"]
    if spacing is None:
        raise InputError("The model records no spot pitch; pass spacing_um= (--spacing-um).")
    library_id = path.stem
    logger.info("laying a %.0f µm grid over the tissue of %s", spacing, path.name)
    grid = grid_spots(image, spacing_um=spacing, mpp=mpp, mask=mask,
                      spot_diameter_um=tiles["tile_um"], library_id=library_id)
    logger.info("%d pseudo-spots on tissue; predicting %d genes", grid.n_obs, len(model.genes))
    cluster = None
    if client is None:
        pred = model.predict_section(grid, image, mpp=mpp, cache_dir=cache_dir,
                                     progress=progress, check_image=False)  # its own thumbnail
    else:
        from ._distributed import predict_on_cluster

        geometry = tile_geometry(grid, image=image, tile_um=tiles["tile_um"], mpp=mpp)
        _check_on_image(grid, geometry, image, "spatial")
        image.close()  # the workers read the pixels; drop any decoded here for the mask
        pred, cluster = predict_on_cluster(
            model, grid, path, client=client, mpp=mpp, side_px=geometry.side_px,
            region_um=region_um, device=device)
    result = AnnData(X=pred, obs=grid.obs.copy(),
                     var=pd.DataFrame(index=pd.Index(model.genes, name=None)))
    result.obsm["spatial"] = grid.obsm["spatial"]
    result.uns["spatial"] = grid.uns["spatial"]
    result.uns[PREDICTION_KEY] = {"params": {
        "model": str(model.path), "model_type": model.config["model_type"],
        "encoder": model.config["encoder"]["name"], "tile_um": tiles["tile_um"],
        "spacing_um": float(spacing), "mpp": float(mpp), "image": str(path),
        "values": "log1p(normalize_total(counts, 1e4)), predicted",
        "spotlens_version": __version__,
    }}
    if cluster is not None:
        result.uns[PREDICTION_KEY]["params"]["cluster"] = cluster
    return result

