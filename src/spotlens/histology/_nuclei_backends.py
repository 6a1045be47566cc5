"""Optional nucleus segmentation back-ends: Cellpose and StarDist, with weights from disk.

Neither package nor any weights are downloaded by spotlens. A back-end is used when the
package is importable and ``model`` is a path to weights on disk, or when ``model`` is an
already-built model object with the package's API (``eval`` for Cellpose,
``predict_instances`` for StarDist) — which is also how tests stand in for the real models.

- Cellpose (Stringer C. et al., Nat. Methods 18, 100-106 (2021)):
  ``model.eval(rgb, diameter=d_px, channels=[0, 0])`` returns ``(masks, flows, styles, ...)``;
  the typical nucleus diameter ``d_px`` is ``config.diameter_um / mpp``.
- StarDist (Schmidt U. et al., MICCAI 2018, doi:10.1007/978-3-030-00934-2_30):
  ``model.predict_instances(rgb / 255)`` returns ``(labels, details)``. The fixed scaling
  stands in for ``csbdeep.utils.normalize(img, 1, 99.8)`` of a whole H&E scan (dark nuclei to
  white glass ≈ 0 to 1) and, unlike per-tile percentiles, is the same in every tile.

Both label images then go through the same size filter as the classical pipeline
(``min_area_um2`` to ``max_area_um2``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .._validation import InputError
from ._nuclei import NucleusConfig

BACKENDS = ("classical", "cellpose", "stardist")
_METHOD = {"cellpose": "eval", "stardist": "predict_instances"}
_INSTALL = {"cellpose": "pip install cellpose", "stardist": "pip install stardist tensorflow"}


def check_backend(backend) -> str:
    """Return ``backend`` if it is one of :data:`BACKENDS`; raise otherwise."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise InputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}.")
    return backend


def load_backend_model(backend: str, model):
    """The model object of a Cellpose or StarDist back-end from a path or an object.

    Raises
    ------
    InputError
        ``model`` is None (weights cannot be downloaded: pass a path), the path does not
        exist, the package is not installed, or an object lacks the back-end's method.
    """
    method = _METHOD[backend]
    if model is None:
        raise InputError(
            f"backend={backend!r} needs model=: the path of {backend} weights on disk (spotlens "
            "never downloads weights), or a loaded model object. Without them use "
            "backend='classical', which needs no weights."
        )
    if not isinstance(model, (str, Path)):
        if not callable(getattr(model, method, None)):
            raise InputError(
                f"model for backend={backend!r} must be a path to weights or an object with a "
                f"{method}() method (the {backend} API), got {type(model).__name__}."
            )
        return model
    path = Path(model).expanduser()
    if not path.exists():
        raise InputError(f"The {backend} weights {path} do not exist. Pass the path of weights "
                         "on disk as model=.")
    try:
        if backend == "cellpose":
            from cellpose import models as cellpose_models
        else:
            from stardist.models import StarDist2D
    except ImportError:
        raise InputError(
            f"backend={backend!r} needs the {backend} package: {_INSTALL[backend]}, or use "
            "backend='classical'."
        ) from None
    if backend == "cellpose":
        return cellpose_models.CellposeModel(pretrained_model=str(path), gpu=False)
    if not path.is_dir():
        raise InputError(f"A StarDist model is a folder (config.json and weights), got the file "
                         f"{path}. Pass the model's folder as model=.")
    return StarDist2D(None, name=path.name, basedir=str(path.parent))


def backend_segmenter(backend: str, model, *, mpp: float, config: NucleusConfig):
    """``rgb -> labels`` for a loaded Cellpose or StarDist model (see the module)."""
    run = _cellpose if backend == "cellpose" else _stardist
    return functools.partial(run, model=model, mpp=mpp, config=config)


def _size_filter(labels, *, mpp: float, config: NucleusConfig, shape) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise InputError(f"The segmentation model returned labels of shape {labels.shape} for a "
                         f"tile of {tuple(shape)}; it must return one label per pixel.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"The segmentation model returned {labels.dtype} labels; expected "
                         "integers (0 = background).")
    from skimage.segmentation import relabel_sequential

    labels = relabel_sequential(labels.astype(np.int64))[0]
    areas = np.bincount(labels.ravel())
    keep = (areas >= config.min_area_um2 / mpp**2) & (areas <= config.max_area_um2 / mpp**2)
    keep[0] = False
    return relabel_sequential(np.where(keep[labels], labels, 0))[0].astype(np.int32)


def _cellpose(rgb: np.ndarray, *, model, mpp: float, config: NucleusConfig) -> np.ndarray:
    out = model.eval(rgb, diameter=config.diameter_um / mpp, channels=[0, 0])
    masks = out[0] if isinstance(out, (tuple, list)) else out
    return _size_filter(masks, mpp=mpp, config=config, shape=rgb.shape[:2])


def _stardist(rgb: np.ndarray, *, model, mpp: float, config: NucleusConfig) -> np.ndarray:
    out = model.predict_instances(rgb.astype(np.float32) / 255.0)
    labels = out[0] if isinstance(out, (tuple, list)) else out
    return _size_filter(labels, mpp=mpp, config=config, shape=rgb.shape[:2])
