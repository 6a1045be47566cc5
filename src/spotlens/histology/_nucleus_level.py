"""The nucleus-level model's AnnData side: a section's nuclei in, an AnnData of nuclei out.

- :func:`training_inputs`: what :func:`~spotlens.histology.train` hands the ``"nucleus"`` model
  type of each section (descriptors, spot of each nucleus, nearest spot, spot totals);
- :func:`predict_nuclei`: :meth:`HistologyModel.predict_nuclei` — every nucleus's expression,
  cell type and spot, and the spots' expression as the sums of their nuclei.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from .._keys import NUCLEUS_SPOT_KEY, SPATIAL_KEY
from .._validation import InputError
from ._nucleus_features import (
    DESCRIPTOR_NAMES,
    check_nuclei,
    nearest_spots,
    nucleus_descriptors,
    nucleus_spots,
    section_zscore_columns,
)
from ._nucleus_fit import spot_expression

logger = logging.getLogger("spotlens")

#: ``obsm`` key of the nucleus descriptors (read instead of recomputed when present)
DESCRIPTOR_KEY = "X_nucleus"
#: default key of the nuclei's predictions (``uns``) and of the type probabilities (``obsm``)
NUCLEUS_PREDICTION_KEY = "nucleus_prediction"
COUNTS_LAYER = "counts"
CELL_TYPE = "cell_type"
CELL_TYPE_CONFIDENCE = "cell_type_confidence"


def descriptors(nuclei: AnnData, image, *, mpp: float | None) -> np.ndarray:
    """Section-z-scored descriptors: ``obsm["X_nucleus"]`` when it has the right width, else
    computed (:func:`nucleus_descriptors`)."""
    given = nuclei.obsm.get(DESCRIPTOR_KEY)
    if given is not None and np.asarray(given).shape == (nuclei.n_obs, len(DESCRIPTOR_NAMES)):
        raw = np.asarray(given)
    else:
        raw = nucleus_descriptors(nuclei, image=image, mpp=mpp)
    return section_zscore_columns(raw)


def training_inputs(adata: AnnData, image, nuclei, *, mpp: float | None,
                    proportions_key: str | None = None) -> dict:
    """``desc``, ``spot``, ``nearest``, ``library`` (and ``proportions``, ``types``) of one
    training section; ``nuclei`` None = segment them (:func:`segment_nuclei`, defaults).

    Raises
    ------
    InputError
        If ``nuclei`` is not an AnnData of nuclei, lacks ``obs["spot"]``, names spots of
        another section, or none of its nuclei lies in a spot; if ``adata`` lacks
        ``obsm[proportions_key]`` or its rows do not sum to 1.
    """
    if nuclei is None:
        from ._segment import segment_nuclei

        nuclei = segment_nuclei(image, mpp=mpp, adata=adata)
    check_nuclei(nuclei)
    spot = nucleus_spots(nuclei, adata.obs_names)
    if not (spot >= 0).any():
        raise InputError("None of the nuclei lies in a spot: nothing to learn from (segment "
                         "them with segment_nuclei(image, adata=spots)).")
    xy = np.asarray(nuclei.obsm[SPATIAL_KEY], dtype=np.float64)
    out = {"desc": descriptors(nuclei, image, mpp=mpp), "spot": spot,
           "nearest": nearest_spots(xy, adata.obsm[SPATIAL_KEY]),
           "library": np.asarray(adata.X.sum(1), dtype=np.float64).ravel()}
    if proportions_key is not None:
        out["proportions"], out["types"] = spot_proportions(adata, proportions_key)
    return out


def spot_proportions(adata: AnnData, key: str) -> tuple[np.ndarray, list[str]]:
    """``n_spots × n_types`` proportions from ``obsm[key]`` (a DataFrame, rows summing to 1).

    Raises
    ------
    InputError
        If ``obsm[key]`` is missing, not ``n_spots`` rows, negative, or rows do not sum to 1.
    """
    if key not in adata.obsm:
        raise InputError(f"adata has no obsm[{key!r}]: run spotlens.deconv.deconvolve(adata, "
                         f"reference, key_added={key!r}) first, or leave proportions_key None.")
    table = adata.obsm[key]
    types = [str(c) for c in getattr(table, "columns", range(np.shape(table)[1]))]
    p = np.asarray(table, dtype=np.float64)
    if p.shape[0] != adata.n_obs or (p < -1e-9).any() or not np.allclose(p.sum(1), 1, atol=1e-3):
        raise InputError(f"obsm[{key!r}] must hold n_spots × n_types proportions, each row "
                         "non-negative and summing to 1.")
    return np.clip(p, 0, None), types


def predict_nuclei(model, adata: AnnData, *, image, nuclei=None, spatial_key=SPATIAL_KEY,
                   library_id=None, mpp=None, key_added=NUCLEUS_PREDICTION_KEY, cache_dir=None,
                   progress=False, check_image=True) -> AnnData:
    """Every nucleus's predicted expression and type; see :meth:`HistologyModel.predict_nuclei`."""
    if model.settings.model_type != "nucleus":
        raise InputError(f"predict_nuclei needs a nucleus model (train with "
                         f"model='nucleus'); this one is {model.settings.model_type!r}.")
    image, geometry = model._geometry(adata, image, mpp=mpp, spatial_key=spatial_key,
                                      library_id=library_id, check_image=check_image)
    if nuclei is None:
        from ._segment import segment_nuclei

        logger.info("segmenting the nuclei of %s", getattr(image, "path", "the image"))
        nuclei = segment_nuclei(image, mpp=geometry.mpp, adata=adata, spatial_key=spatial_key,
                                library_id=library_id, progress=progress)
    check_nuclei(nuclei)
    spot = nucleus_spots(nuclei, adata.obs_names)
    feats = model._section_features(image, geometry, cache_dir=cache_dir, progress=progress)
    if model.standardize:
        from ._normalize import standardize_section

        feats = standardize_section(feats)
    xy = np.asarray(nuclei.obsm[SPATIAL_KEY], dtype=np.float64)
    predictor = model.predictor
    out = predictor.predict(descriptors(nuclei, image, mpp=geometry.mpp), feats,
                            nearest_spots(xy, geometry.centres_px))
    return nuclei_anndata(nuclei, out, spot, adata.obs_names, genes=model.genes,
                          types=predictor.types, key_added=key_added,
                          params={"model": str(model.path) if model.path else None,
                                  "model_type": "nucleus", "context": predictor.config.context,
                                  "mpp": geometry.mpp, "image": str(getattr(image, "path", ""))})


def nuclei_anndata(nuclei: AnnData, out: dict, spot: np.ndarray, spot_names, *, genes,
                   types, key_added: str, params: dict) -> AnnData:
    """The AnnData of predicted nuclei (keys in :meth:`HistologyModel.predict_nuclei`)."""
    counts, rest = out["counts"], out["rest"]
    total = counts.sum(1) + rest
    obs = nuclei.obs.copy()
    obs[NUCLEUS_SPOT_KEY] = pd.Categorical.from_codes(spot, categories=pd.Index(spot_names)
                                                      .astype(str))
    result = AnnData(
        X=np.log1p(1e4 * counts / np.where(total > 0, total, 1.0)[:, None]).astype(np.float32),
        obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), dtype=str)),
        layers={COUNTS_LAYER: counts.astype(np.float32)},
        obsm={SPATIAL_KEY: np.asarray(nuclei.obsm[SPATIAL_KEY], dtype=np.float64)})
    result.obs["total_counts_predicted"] = total.astype(np.float32)
    if out.get("types") is not None and len(types):
        p = out["types"]
        result.obsm[key_added + "_types"] = pd.DataFrame(p, index=result.obs_names.copy(),
                                                         columns=list(types))
        result.obs[CELL_TYPE] = pd.Categorical(np.asarray(types)[p.argmax(1)],
                                               categories=list(types))
        result.obs[CELL_TYPE_CONFIDENCE] = p.max(1).astype(np.float32)
    spots = spot_expression(counts, rest, spot, len(spot_names))
    from .._version import __version__

    result.uns[key_added] = {
        "genes": list(genes),
        "spot_expression": pd.DataFrame(spots.astype(np.float32),
                                        index=pd.Index(spot_names).astype(str),
                                        columns=list(genes)),
        "params": {**{k: v for k, v in params.items() if v is not None},
                   "values": "log1p(1e4 * counts / total) per nucleus (X); expected counts "
                             "per nucleus (layers['counts'])",
                   "spotlens_version": __version__},
    }
    return result
