"""Using a trained model: AnnData in, documented keys out, as squidpy's image features.

- :func:`image_features` writes the tiles' features to ``obsm["X_<encoder>"]``;
- :func:`predict` writes predicted expression to ``obsm[key_added]``, its per-spot, per-gene
  uncertainty to ``obsm[key_added + "_std"]`` (when the model folder has an ensemble), its
  genes and parameters in ``uns[key_added]`` (and the features);
- :func:`predict_image` lays a grid of pseudo-spots over an H&E image alone and returns a new
  AnnData of predictions (on this machine or on a Dask cluster);
- :func:`evaluate` scores a model on sections with measured expression.

Each takes a model folder or a :class:`~spotlens.histology.HistologyModel` (:func:`load_model`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import HISTOLOGY_PREDICTION_KEY, SPATIAL_KEY, SPATIAL_UNS_KEY, prediction_std_key
from .._validation import InputError
from ..io import SlideImage, check_mpp, read_image
from ._model import HistologyModel, HistologyPrediction
from ._model_anndata import VALUES
from ._sections import _section_name
from ._tiles import _check_on_image, tile_geometry

logger = logging.getLogger("spotlens")


def load_model(path, *, device: str = "cpu", encoder_weights=None) -> HistologyModel:
    """Open a model folder written by :func:`train` (:meth:`HistologyModel.load`).

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
    return HistologyModel.load(path, device=device, encoder_weights=encoder_weights)


def _model(model, device: str) -> HistologyModel:
    return model if isinstance(model, HistologyModel) else load_model(model, device=device)


def _check_adata(adata, what: str) -> None:
    if not isinstance(adata, AnnData):
        hint = (" To predict on a grid over an image alone, use predict_image(model, image)."
                if isinstance(adata, (str, Path, HistologyModel)) else "")
        raise InputError(f"{what} takes an AnnData first, got {type(adata).__name__}.{hint}")


def image_features(
    adata: AnnData,
    *,
    model,
    image,
    spatial_key: str = SPATIAL_KEY,
    library_id: str | None = None,
    mpp: float | None = None,
    key_added: str | None = None,
    inplace: bool = True,
    cache_dir=None,
    device: str = "cpu",
    progress: bool = False,
    check_image: bool = True,
) -> np.ndarray | None:
    """Compute the image features a model reads for every spot, as ``obsm["X_<encoder>"]``.

    Tiles of the model's sizes (µm) around each spot centre are cut from the full-resolution
    image, resized and encoded at every tile scale, and put side by side
    (:meth:`HistologyModel.features`; through the fine-tuned head when the model has one).

    Parameters
    ----------
    adata
        ``n_spots`` spots with centres ``(x, y)`` in full-resolution px in
        ``obsm[spatial_key]``; µm/px in ``uns["spatial"][library_id]`` (or on the image, or
        ``mpp``). Other libraries' spots should be subset out first.
    model
        Model folder or :class:`HistologyModel`.
    image
        The section's full-resolution H&E: a file path or :class:`~spotlens.io.SlideImage`.
    spatial_key
        ``obsm`` key of the centres.
    library_id
        Key of ``uns["spatial"]`` (scale factors, stored image); None = its only library.
    mpp
        µm per full-resolution px; None = the image's, else the AnnData's.
    key_added
        ``obsm`` key written; None = ``"X_<encoder name>"`` (e.g. ``X_colour``,
        ``X_efficientnet-lite0``).
    inplace
        True: write ``obsm[key_added]`` and return None. False: return the features and
        change nothing.
    cache_dir, device, progress
        Feature cache folder, device of the encoder, progress bars.
    check_image
        Refuse an image that does not match the copy stored in ``uns["spatial"]``.

    Returns
    -------
    With ``inplace=False``: ``n_spots × n_features`` float32 (``n_features`` = encoder
    features per tile × tile scales). Else None; ``obsm[key_added]`` holds them.

    Raises
    ------
    InputError
        ``adata`` is not an AnnData; the coordinates are missing; the image does not fit the
        spots or is another section's, cannot be decoded, its µm/px is unknown or much coarser
        than the training scans; the encoder changed since training.

    Examples
    --------
    >>> image_features(adata, model="her2st_model", image="C6_HE.jpg")  # doctest: +SKIP
    >>> adata.obsm["X_efficientnet-lite0"].shape  # n_spots × (1280 · 3)  # doctest: +SKIP
    """
    _check_adata(adata, "image_features")
    return _model(model, device).features(
        adata, image=image, spatial_key=spatial_key, library_id=library_id, mpp=mpp,
        key_added=key_added, inplace=inplace, cache_dir=cache_dir, progress=progress,
        check_image=check_image)


def predict(
    adata: AnnData,
    *,
    model,
    image,
    spatial_key: str = SPATIAL_KEY,
    library_id: str | None = None,
    mpp: float | None = None,
    key_added: str = HISTOLOGY_PREDICTION_KEY,
    features_key: str | None = None,
    inplace: bool = True,
    cache_dir=None,
    device: str = "cpu",
    progress: bool = False,
    check_image: bool = True,
) -> HistologyPrediction | None:
    """Predict every spot's expression of the model's genes from its H&E tiles, with uncertainty.

    The uncertainty is the standard deviation of each spot's and gene's prediction over the
    model folder's ensemble of ridge heads refitted on block-bootstrap replicates of the
    training spots (``uncertainty.npz``; ``train(..., n_bootstrap=)``, see
    ``spotlens/histology/_uncertainty.py``): large where the spot's image features are unlike
    the training spots' or the gene is poorly explained by them. For a ``"ridge"`` model it is
    the model's own bootstrap spread; for a network, that of a ridge readout of the same
    features. It is not a prediction interval for the measured value. Model folders written
    before spotlens stored an ensemble predict without it (a warning says so).

    Parameters
    ----------
    adata, model, image, spatial_key, library_id, mpp, cache_dir, device, progress, check_image
        As in :func:`image_features`.
    key_added
        ``obsm`` and ``uns`` key of the predictions (default ``"histology_prediction"``); the
        uncertainty goes to ``obsm[key_added + "_std"]`` (``"histology_prediction_std"``).
    features_key
        ``obsm`` key of the features; None = ``"X_<encoder name>"`` (e.g. ``X_colour``).
    inplace
        True: write the keys below and return None. False: return the predictions and change
        nothing.

    Returns
    -------
    With ``inplace=False``: :class:`~spotlens.histology.HistologyPrediction` with
    ``expression``, a DataFrame ``n_spots × n_genes`` of predicted log-normalised expression
    ``log1p(normalize_total(counts, 1e4))`` (index = ``obs_names``, columns = the model's
    genes), and ``std``, a DataFrame of the same shape of uncertainties (log-normalised
    units, ≥ 0), None when the model folder has no ensemble. With ``inplace=True`` (None
    returned) they are written to ``obsm[key_added]`` and ``obsm[key_added + "_std"]`` (only
    with an ensemble); ``uns[key_added]`` = ``{"genes": [...], "params": {"model",
    "model_type", "encoder", "tile_um" (µm), "mpp" (µm/px), "spatial_key", "library_id",
    "image", "values", "uncertainty" (the ensemble's method and members, or why there is
    none), "spotlens_version"}}``; ``obsm[features_key]`` = the ``n_spots × n_features``
    features.

    Raises
    ------
    InputError
        As :func:`image_features`; a model folder that is not one.

    Examples
    --------
    >>> predict(adata, model="her2st_model", image="C6_HE_fullres.jpg")  # doctest: +SKIP
    >>> adata.obsm["histology_prediction"]["ERBB2"]  # doctest: +SKIP
    >>> adata.obsm["histology_prediction_std"]["ERBB2"]  # its uncertainty  # doctest: +SKIP
    >>> result = predict(adata, model=m, image=img, inplace=False)  # doctest: +SKIP
    >>> result.expression["ERBB2"], result.std["ERBB2"]  # doctest: +SKIP
    """
    _check_adata(adata, "predict")
    return _model(model, device).predict(
        adata, image=image, spatial_key=spatial_key, library_id=library_id, mpp=mpp,
        key_added=key_added, features_key=features_key, inplace=inplace, cache_dir=cache_dir,
        progress=progress, check_image=check_image)


def evaluate(model_dir, sections, *, cache_dir=None, device: str = "cpu",
             progress: bool = False) -> pd.DataFrame:
    """Score a model on sections with measured expression.

    Parameters
    ----------
    model_dir
        Folder written by :func:`train` (or a :class:`HistologyModel`).
    sections
        List of ``(adata, image_path)`` pairs (:func:`spotlens.io.read_section`), raw counts
        in ``X``.
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
        :meth:`HistologyModel.predict`.
    """
    from ._metrics import evaluate as score
    from ._metrics import section_log_expression

    model = _model(model_dir, device)
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
        pred = model.predict_section(adata, image=image, cache_dir=cache_dir, progress=progress)
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


def predict_image(
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
    tiled like a training spot (same side in µm, same ``out_px``), then predicted as
    :func:`predict` does. With ``client`` the tiles are read, encoded and predicted on a Dask
    cluster, one task per square image region (see ``docs/dask.md``); the predictions equal
    this machine's to float32 rounding.

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
    ``var_names`` = model genes; ``layers["histology_prediction_std"]`` = its uncertainty
    (float32 ≥ 0, log-normalised units, as in :func:`predict`; absent when the model folder
    has no ensemble); ``obsm["spatial"]`` = centres ``(x, y)`` in full-resolution
    px; ``obs["array_row"]``, ``obs["array_col"]``, ``obs["in_tissue"]``;
    ``uns["spatial"][<image stem>]`` = ``{"images": {"hires"}, "scalefactors":
    {"spot_diameter_fullres" (= the tile side), "tissue_hires_scalef", "microns_per_pixel",
    "spot_spacing_fullres"}, "metadata"}`` (for ``sc.pl.spatial`` and
    :func:`spotlens.pl.overlay`); ``uns["histology_prediction"]["params"]`` = model folder,
    model type, encoder, tile µm, spacing µm, µm/px, uncertainty (method or why there is
    none), spotlens version.

    Raises
    ------
    InputError
        If µm per pixel is unknown (pass ``mpp``), no tissue is found, the image is much
        coarser than the training scans, the model's tiles have no size in µm, or the encoder
        changed since training; ``client`` is not a Dask client (or ``"default"`` with none
        running); ``region_um`` is not > 0 or is given without ``client``.
    """
    from .._backend import resolve_client
    from .._version import __version__
    from ._distributed import check_region_um

    region_um = check_region_um(region_um)
    if client is None and region_um is not None:
        raise InputError("region_um applies to prediction on a Dask cluster; pass client= too.")
    client = None if client is None else resolve_client(client)
    model = _model(model_dir, device)
    path = Path(image_path).expanduser()
    image, mpp, spacing, grid = image_grid(model, path, mpp=mpp, spacing_um=spacing_um,
                                           mask=mask)
    tiles = model.settings.tiles
    logger.info("%d pseudo-spots on tissue; predicting %d genes", grid.n_obs, len(model.genes))
    cluster = std = None
    if client is None:
        result = model.predict(grid, image=image, mpp=mpp, cache_dir=cache_dir, inplace=False,
                               progress=progress, check_image=False)  # its own thumbnail
        pred = result.expression.to_numpy()
        std = None if result.std is None else result.std.to_numpy()
    else:
        from ._distributed import predict_on_cluster

        geometry = tile_geometry(grid, image=image, tile_um=tiles.tile_um, mpp=mpp)
        _check_on_image(grid, geometry, image, SPATIAL_KEY)
        image.close()  # the workers read the pixels; drop any decoded here for the mask
        pred, std, cluster = predict_on_cluster(
            model, grid, path, client=client, mpp=mpp, side_px=geometry.side_px,
            region_um=region_um, device=device)
    result = AnnData(X=pred, obs=grid.obs.copy(),
                     var=pd.DataFrame(index=pd.Index(model.genes, name=None)))
    if std is None:
        logger.warning("%s: predictions carry no uncertainty (%s)", model.path or "model",
                       model.uncertainty_description())
    else:
        result.layers[prediction_std_key(HISTOLOGY_PREDICTION_KEY)] = std
    result.obsm[SPATIAL_KEY] = grid.obsm[SPATIAL_KEY]
    result.uns[SPATIAL_UNS_KEY] = grid.uns[SPATIAL_UNS_KEY]
    result.uns[HISTOLOGY_PREDICTION_KEY] = {"params": {
        "model": str(model.path), "model_type": model.settings.model_type,
        "encoder": model.settings.encoder.name, "tile_um": tiles.tile_um,
        "spacing_um": float(spacing), "mpp": float(mpp), "image": str(path),
        "values": VALUES, "uncertainty": model.uncertainty_description(),
        "spotlens_version": __version__,
    }}
    if cluster is not None:
        result.uns[HISTOLOGY_PREDICTION_KEY]["params"]["cluster"] = cluster
    return result


def image_grid(model: HistologyModel, path: Path | SlideImage, *, mpp: float | None,
               spacing_um: float | None, mask=None) -> tuple[SlideImage, float, float, AnnData]:
    """Open an H&E-only image and lay the model's grid of pseudo-spots over its tissue.

    ``path`` may be an opened :class:`SlideImage` of a file (not read again). Returns the
    image, its µm/px, the grid pitch in µm and the grid (:func:`grid_spots`, spots the side of
    the model's tiles). Raises InputError as :func:`predict_image` does.
    """
    from ._tissue import grid_spots

    if isinstance(path, SlideImage) and path.path is not None:
        image, path = path, path.path
    else:
        image = read_image(path)
    mpp = _image_mpp(check_mpp(mpp), image, path)
    tiles = model.settings.tiles
    if tiles.tile_um is None:
        raise InputError(
            "The model was trained on sections of unknown µm/px, so its tile size is known only "
            "in px of those scans; predicting on a new image needs a model trained with µm/px "
            "known (metadata['microns_per_pixel'] in the training sections)."
        )
    model.check_scale(image, mpp)
    spacing = spacing_um if spacing_um is not None else tiles.spot_pitch_um
    if spacing is None:
        raise InputError("The model records no spot pitch; pass spacing_um= (--spacing-um).")
    logger.info("laying a %.0f µm grid over the tissue of %s", spacing, path.name)
    grid = grid_spots(image, spacing_um=spacing, mpp=mpp, mask=mask,
                      spot_diameter_um=tiles.tile_um, library_id=path.stem)
    return image, mpp, float(spacing), grid


def _image_mpp(mpp: float | None, image: SlideImage, path: Path) -> float:
    """The image's µm/px: ``mpp`` (set on ``image``), else the file's; raise if neither."""
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
    return mpp
