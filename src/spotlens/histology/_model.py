"""The user-facing model of expression from H&E: :class:`HistologyModel` (fit, predict, save, load).

One class for every model type (``"attention"``, ``"graph"``, ``"ridge"``; see
``_registry.py``): it holds the model folder's :class:`~spotlens.histology._folder.ModelConfig`
(encoder, tile geometry, genes) and the fitted predictor, opens the encoder, turns a section's
image into features and the features into predictions. AnnData in, documented keys out:

- :meth:`HistologyModel.features` writes ``obsm["X_<encoder>"]``;
- :meth:`HistologyModel.predict` writes ``obsm[key_added]`` (predicted expression),
  ``obsm[key_added + "_std"]`` (its per-spot, per-gene uncertainty, when the model folder has
  an ensemble: ``_uncertainty.py``) and ``uns[key_added]`` (genes and parameters), and the
  features;
- with ``inplace=False`` both return the result (:class:`HistologyPrediction` for
  :meth:`~HistologyModel.predict`) and change nothing.

The folder on disk is read and written in ``_model_io.py``; the AnnData side (placing the tiles
on a section's spots, :class:`HistologyPrediction`, the keys written) is ``_model_anndata.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import HISTOLOGY_PREDICTION_KEY, SPATIAL_KEY
from .._keys import features_key as obsm_features_key
from .._validation import InputError
from ..io import SlideImage
from ._featurize import open_trained_encoder, section_features
from ._folder import COLOUR_ENCODER, ModelConfig
from ._model_anndata import (  # HistologyPrediction: re-exported (spotlens.histology)
    NO_UNCERTAINTY,
    STD_VALUES,
    HistologyPrediction,
    check_scale,
    place_tiles,
    prediction_params,
    write_prediction,
)
from ._model_io import read_model_folder, write_model_folder
from ._normalize import standardize_section
from ._registry import MODEL_TYPES, ModelType
from ._tiles import TileGeometry
from ._uncertainty import RidgeEnsemble

__all__ = ["HistologyModel", "HistologyPrediction"]

logger = logging.getLogger("spotlens")


class HistologyModel:
    """A trained model of spot expression from H&E tiles.

    Create one with :meth:`fit` (or :func:`~spotlens.histology.train`, which also writes it
    to a folder) or read one with :meth:`load`.

    Attributes
    ----------
    path
        The model folder (None until saved).
    settings
        The :class:`~spotlens.histology._folder.ModelConfig` (``config.json``).
    genes
        Target genes, in the order of the predictions' columns.
    device
        Device of the encoder and network.
    encoder_weights
        Where the encoder's checkpoint is now when it moved since training (None: the path
        recorded in ``config.json``, if the encoder reads one).
    ensemble
        The uncertainty ensemble (:class:`~spotlens.histology._uncertainty.RidgeEnsemble`),
        or None when the model has none (:attr:`has_uncertainty`).
    """

    def __init__(self, settings: ModelConfig, predictor, *, path: Path | None = None,
                 device: str = "cpu", encoder_weights=None, ensemble=None):
        self.settings = settings
        self.path = path
        self.genes: list[str] = list(settings.genes)
        self.device = device
        self.encoder_weights = None if encoder_weights is None else str(encoder_weights)
        self._predictor = predictor
        self._encoder = None
        self.ensemble: RidgeEnsemble | None = ensemble

    def __repr__(self) -> str:
        return (f"HistologyModel({self.path}, {self.settings.model_type}, "
                f"{self.settings.encoder.name}, {len(self.genes)} genes)")

    # -- fit, save, load -----------------------------------------------------------------------
    @classmethod
    def fit(cls, sections, **kwargs) -> HistologyModel:
        """Fit a model on sections with expression and H&E (in memory; see :meth:`save`).

        Takes the arguments of :func:`~spotlens.histology.train` except ``out``; with
        ``checkpoint_dir`` a network writes its checkpoints there and resumes from them.
        """
        from ._train import fit_model

        return fit_model(sections, **kwargs)

    def save(self, path) -> Path:
        """Write the model folder: the predictor's file, ``uncertainty.npz`` when the model has
        an ensemble, then ``config.json`` (each atomically).

        Raises
        ------
        InputError
            If ``path`` is a file or cannot be created.
        """
        self.path = write_model_folder(path, self.settings, self.model_type, self._predictor,
                                       self.ensemble)
        return self.path

    @classmethod
    def load(cls, path, *, device: str = "cpu", encoder_weights=None) -> HistologyModel:
        """Open a model folder written by :meth:`save` (or :func:`~spotlens.histology.train`).

        A folder without an uncertainty ensemble (written before spotlens stored one) opens
        and predicts; its predictions carry no uncertainty (:attr:`has_uncertainty` False).

        Parameters
        ----------
        path
            The model folder (with ``config.json``).
        device
            Device of the encoder and network.
        encoder_weights
            Where the encoder's checkpoint is now, for a model trained with
            ``encoder_weights`` whose file has moved (None: the path recorded at training).
            Its SHA-256 must match.

        Raises
        ------
        InputError
            If the folder or its ``config.json`` is missing, unreadable or not a spotlens
            model, its model type is unknown, or the model file is missing.
        """
        path, settings, predictor, ensemble = read_model_folder(path, device=device)
        return cls(settings, predictor, path=path, device=device,
                   encoder_weights=encoder_weights, ensemble=ensemble)

    # -- what the model reads ------------------------------------------------------------------
    @property
    def config(self) -> dict:
        """The ``config.json`` dict (a copy; :attr:`settings` is the parsed form)."""
        return self.settings.to_dict()

    @property
    def model_type(self) -> ModelType:
        """The model type (``_registry.MODEL_TYPES``)."""
        return MODEL_TYPES[self.settings.model_type]

    @property
    def predictor(self):
        """The fitted predictor: an :class:`ExpressionModel` or a :class:`RidgeBaseline`."""
        return self._predictor

    @property
    def has_uncertainty(self) -> bool:
        """Whether predictions carry an uncertainty (the folder has an ensemble)."""
        return self.ensemble is not None

    @property
    def tile_scales(self) -> tuple[float, ...]:
        """Tile sides, as multiples of the scale-1 tile, whose features the model reads."""
        return tuple(self.settings.tiles.scales)

    @property
    def standardize(self) -> bool:
        """Whether features are z-scored within each section before the model."""
        return self.settings.tiles.standardize == "section"

    @property
    def n_features(self) -> int:
        """Features per spot the model reads: encoder (or fine-tuned head) width × scales."""
        return self.settings.encoder.width * len(self.tile_scales)

    @property
    def features_key(self) -> str:
        """The default ``obsm`` key of the features: ``"X_<encoder name>"`` (e.g. ``X_colour``)."""
        return obsm_features_key(self.settings.encoder.name.replace("/", "_"))

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
        info = self.settings.encoder
        if info.name == COLOUR_ENCODER or self._encoder is not None:
            return self._encoder
        self._encoder = open_trained_encoder(info, self.device, self.encoder_weights)
        return self._encoder

    # -- arrays --------------------------------------------------------------------------------
    def _through_head(self, features: np.ndarray) -> np.ndarray:
        """Pass the encoder's features through the model's fine-tuned head, when it has one."""
        if getattr(self._predictor, "finetunes_head", False):
            return self._predictor.head_features(features)
        return features

    def encode_tiles(self, image: SlideImage, centres_px: np.ndarray,
                     side_px: float) -> np.ndarray:
        """Features of tiles around ``centres_px`` at the model's scales (not standardised).

        The encoder's features (no cache), passed through the model's fine-tuned head when it
        has one: what a Dask worker computes for its region.

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
            out_px=self.settings.tiles.out_px, progress=False,
        ))

    def _section_features(self, image: SlideImage, geometry: TileGeometry, *,
                          cache_dir=None, progress: bool = False) -> np.ndarray:
        """Features of a section's tiles at the model's tile scales, before standardisation.

        ``geometry`` (:func:`tile_geometry` of the spots on ``image``) places the tiles;
        ``cache_dir`` caches the encoder's features when the image is a file. Returns
        ``n_spots × n_features`` float32 (a fine-tuned head's features when the model has
        one).
        """
        return self._through_head(section_features(
            image, self.encoder, geometry, self.settings.tiles.out_px, self.tile_scales,
            cache_dir=cache_dir, progress=progress,
        ))

    def predict_features(self, features: np.ndarray, coords: np.ndarray, *,
                         moments: dict | None = None, adjacency=None) -> np.ndarray:
        """Predict from raw ``n_spots × n_features`` features and ``n_spots × 2`` centres (px).

        Parameters
        ----------
        features
            Features of :meth:`features` (not yet standardised), of a whole section or
            of part of one.
        coords
            Spot centres, full-resolution px (the graph model's neighbourhoods).
        moments
            When the model standardises features within a section and ``features`` is only
            part of it: the whole section's :func:`feature_moments`. None = ``features`` are
            the whole section.
        adjacency
            For the graph model: the spot graph to decode over instead of the one built from
            ``coords`` (``n_spots × n_spots``, symmetric 0/1, no self loops).

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
                f"features ({self.settings.encoder.name} at {len(self.tile_scales)} tile "
                "scale(s))."
            )
        if self.standardize:
            features = standardize_section(features, moments)
        pred = self.model_type.predict(self._predictor, features, coords, adjacency=adjacency)
        return np.asarray(pred, dtype=np.float32)

    def uncertainty_features(self, features: np.ndarray, *,
                             moments: dict | None = None) -> np.ndarray:
        """The uncertainty of :meth:`predict_features`'s predictions of the same features.

        Parameters
        ----------
        features, moments
            As in :meth:`predict_features`.

        Returns
        -------
        ``n_spots × n_genes`` float32 ≥ 0: the standard deviation of the spot's prediction
        over the model's block-bootstrap ensemble, log-normalised expression units
        (``_uncertainty.py``).

        Raises
        ------
        InputError
            If the model has no ensemble (a folder written before spotlens stored one, or
            trained with ``n_bootstrap=0``), or the feature width differs from training.
        """
        if self.ensemble is None:
            raise InputError(f"This model has no uncertainty ensemble ({self.path or 'in memory'}"
                             f"): {NO_UNCERTAINTY}.")
        dim = self.n_features
        if features.ndim != 2 or features.shape[1] != dim:
            raise InputError(f"Features have shape {features.shape}; the model expects "
                             f"n_spots × {dim} features.")
        if self.standardize:
            features = standardize_section(features, moments)
        return self.ensemble.std(features)

    # -- AnnData -------------------------------------------------------------------------------
    def check_scale(self, image: SlideImage, mpp: float | None) -> None:
        """Refuse an image much coarser (µm/px) than the training scans.

        Raises
        ------
        InputError
            If ``mpp`` (or the image's) is over twice the training scans' µm/px.
        """
        check_scale(self.settings.tiles, image, mpp)

    def _geometry(self, adata: AnnData, image, *, mpp, spatial_key, library_id,
                  check_image) -> tuple[SlideImage, TileGeometry]:
        """Open ``image`` and place the model's tiles on ``adata``'s spots (``place_tiles``)."""
        return place_tiles(adata, image, self.settings.tiles, mpp=mpp, spatial_key=spatial_key,
                           library_id=library_id, check_image=check_image)

    def features(self, adata: AnnData, *, image, spatial_key: str = SPATIAL_KEY,
                 library_id: str | None = None, mpp: float | None = None,
                 key_added: str | None = None, inplace: bool = True, cache_dir=None,
                 progress: bool = False, check_image: bool = True) -> np.ndarray | None:
        """Image features of every spot's tiles, as the model reads them (before scaling).

        Parameters
        ----------
        adata
            Spots with centres ``(x, y)`` in full-resolution px in ``obsm[spatial_key]``;
            µm/px from ``mpp``, the image or ``uns["spatial"][library_id]`` when the model's
            tiles are sized in µm.
        image
            The section's full-resolution H&E (path or :class:`~spotlens.io.SlideImage`).
        spatial_key
            ``obsm`` key of the spot centres.
        library_id
            Key of ``uns["spatial"]`` (scale factors, stored image); None = its only library.
        mpp
            µm per full-resolution px; None = the image's, else the AnnData's.
        key_added
            ``obsm`` key written; None = :attr:`features_key` (``"X_<encoder>"``).
        inplace
            Write ``obsm[key_added]`` and return None; False: return the features and change
            nothing.
        cache_dir, progress
            Feature cache folder (used when the image is a file) and progress bars.
        check_image
            Refuse an image that does not match the copy stored in
            ``uns["spatial"][library_id]["images"]`` (another section's).

        Returns
        -------
        With ``inplace=False``: ``n_spots × n_features`` float32 (:attr:`n_features`: the
        encoder's features of each tile scale side by side, or a fine-tuned head's).

        Raises
        ------
        InputError
            If the image does not fit the spots or is another section's, cannot be decoded,
            its scale is unknown or much coarser than the training scans, or the encoder
            changed since training.
        """
        image, geometry = self._geometry(adata, image, mpp=mpp, spatial_key=spatial_key,
                                         library_id=library_id, check_image=check_image)
        feats = self._section_features(image, geometry, cache_dir=cache_dir,
                                       progress=progress)
        if not inplace:
            return feats
        adata.obsm[key_added or self.features_key] = feats
        return None

    def predict(self, adata: AnnData, *, image, spatial_key: str = SPATIAL_KEY,
                library_id: str | None = None, mpp: float | None = None,
                key_added: str = HISTOLOGY_PREDICTION_KEY, features_key: str | None = None,
                inplace: bool = True, cache_dir=None, progress: bool = False,
                check_image: bool = True) -> HistologyPrediction | None:
        """Predict every spot's expression of the model's genes from its tiles, with uncertainty.

        Parameters
        ----------
        adata, image, spatial_key, library_id, mpp, cache_dir, progress, check_image
            As in :meth:`features`.
        key_added
            Key of ``obsm`` and ``uns`` written (the uncertainty: ``obsm[key_added + "_std"]``,
            :func:`spotlens._keys.prediction_std_key`).
        features_key
            ``obsm`` key of the features; None = :attr:`features_key` (``"X_<encoder>"``).
        inplace
            Write the keys below and return None; False: return the predictions and change
            nothing.

        Returns
        -------
        With ``inplace=False``: :class:`HistologyPrediction` with ``expression``, a DataFrame
        ``n_spots × n_genes`` of predicted log-normalised expression
        (``log1p(normalize_total(counts, 1e4))``), index = ``obs_names``, columns =
        :attr:`genes`, and ``std``, the same shape: each spot's and gene's uncertainty, the
        standard deviation of the prediction over the model's block-bootstrap ensemble
        (log-normalised units, ≥ 0; None when the model folder has no ensemble). With
        ``inplace=True`` they are written to ``obsm[key_added]`` and
        ``obsm[key_added + "_std"]`` (the latter only with an ensemble), and
        ``uns[key_added]`` = ``{"genes": [...], "params": {model, model_type, encoder,
        tile_um (µm), mpp (µm/px), spatial_key, library_id, image, values, uncertainty
        (the ensemble's method and members, or why there is none), spotlens_version}}``; the
        features (``n_spots × n_features``) to ``obsm[features_key]``.

        Raises
        ------
        InputError
            As :meth:`features`.

        Examples
        --------
        >>> model = HistologyModel.load("her2st_model")  # doctest: +SKIP
        >>> model.predict(adata, image="C6_HE_fullres.jpg")  # doctest: +SKIP
        >>> adata.obsm["histology_prediction"]["ERBB2"]  # doctest: +SKIP
        >>> adata.obsm["histology_prediction_std"]["ERBB2"]  # doctest: +SKIP
        """
        image, geometry = self._geometry(adata, image, mpp=mpp, spatial_key=spatial_key,
                                         library_id=library_id, check_image=check_image)
        feats = self._section_features(image, geometry, cache_dir=cache_dir,
                                       progress=progress)
        pred = self.predict_features(feats, geometry.centres_px)
        index, genes = adata.obs_names.copy(), list(self.genes)
        table = pd.DataFrame(pred, index=index, columns=genes)
        std = None
        if self.has_uncertainty:
            std = pd.DataFrame(self.uncertainty_features(feats), index=index.copy(),
                               columns=list(genes))
        if not inplace:
            return HistologyPrediction(table, std)
        params = prediction_params(self, geometry, image, spatial_key)
        if std is None:
            logger.warning("%s: predictions carry no uncertainty (%s)", self.path or "model",
                           NO_UNCERTAINTY)
        write_prediction(adata, HistologyPrediction(table, std), feats, genes=self.genes,
                         params=params, key_added=key_added,
                         features_key=features_key or self.features_key)
        return None

    def predict_nuclei(self, adata: AnnData, *, image, cells: AnnData | None = None,
                       **kwargs) -> AnnData:
        """A nucleus model's prediction for every nucleus: a new AnnData of nuclei.

        ``adata``, ``image`` and the keywords (``spatial_key``, ``library_id``, ``mpp``,
        ``cache_dir``, ``progress``, ``check_image``, ``key_added``) are as in :meth:`predict`;
        ``cells`` is :func:`segment_nuclei`'s AnnData of the section's nuclei (None = segment).
        Returns nuclei × genes: ``X`` each nucleus's ``log1p(1e4 · counts / total)``,
        ``layers["counts"]`` its expected counts, ``obsm["spatial"]`` its centroid (px),
        ``obs["spot"]`` its spot (NA outside), ``obs["cell_type"]``,
        ``obs["cell_type_confidence"]`` and ``obsm[key_added + "_types"]`` with types, and
        ``uns[key_added]["spot_expression"]``: spots × genes, the sums of their nuclei
        (``_nucleus_level.py``). Raises InputError for a model of another type, nuclei that
        are not an AnnData of nuclei, have none, or belong to another section.
        """
        from ._nucleus_level import predict_nuclei

        return predict_nuclei(self, adata, image=image, nuclei=cells, **kwargs)

    def uncertainty_description(self) -> str:
        """One line on the uncertainty this model stores (``uns[key]["params"]["uncertainty"]``)."""
        if self.ensemble is None:
            return NO_UNCERTAINTY
        return f"{STD_VALUES}: {self.ensemble.method}, {self.ensemble.n_boot} members"

    def predict_section(self, adata: AnnData, *, image, mpp: float | None = None,
                        cache_dir=None, progress: bool = False, check_image: bool = True,
                        spatial_key: str = SPATIAL_KEY,
                        library_id: str | None = None) -> np.ndarray:
        """:meth:`predict` with ``inplace=False`` as an ``n_spots × n_genes`` float32 array."""
        image, geometry = self._geometry(adata, image, mpp=mpp, spatial_key=spatial_key,
                                         library_id=library_id, check_image=check_image)
        feats = self._section_features(image, geometry, cache_dir=cache_dir,
                                       progress=progress)
        return self.predict_features(feats, geometry.centres_px)
