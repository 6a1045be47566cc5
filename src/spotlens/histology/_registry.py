"""The model types: one entry each, so adding a model type touches this file only.

A model type says how its predictor (arrays in, arrays out) is fitted on the training sections
with a held-out protocol, in which file of the model folder it lives, how it is read back and
how it predicts a section's spots. :data:`MODEL_TYPES` maps the names users pass
(``model="attention"``, ``--model-type graph``) to them:

- ``"attention"`` and ``"graph"``: an ``nn.Module`` of ``_models.py`` (named in
  :data:`NETWORKS`) in an :class:`~spotlens.histology.ExpressionModel`, fitted with early
  stopping on the last training section, then refitted on all (``_fit.py``);
- ``"ridge"``: :class:`~spotlens.histology.RidgeBaseline`, penalty and rank chosen by
  leave-one-section-out cross-validation;
- ``"nucleus"``: :class:`~spotlens.histology.NucleusPredictor`, expression of every nucleus
  whose sums over a spot's nuclei are fitted to the spot (multiple-instance); it also reads
  the section's nuclei (:meth:`ModelType.section_inputs`) and predicts with
  :meth:`~spotlens.histology.HistologyModel.predict_nuclei`.

A new network needs its ``nn.Module`` (with ``from_config``, ``section_inputs``, ``loss``,
``decode``, ``uses_bank``, ``halo_hops``) and one line in :data:`NETWORKS`. Nothing here
imports torch until a network is fitted or read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: network model type -> its ``nn.Module`` class in ``_models.py``
NETWORKS: dict[str, str] = {"attention": "SpotAttention", "graph": "GraphExpression"}


def network_class(name: str):
    """The ``nn.Module`` class of network model type ``name`` (imports torch)."""
    from . import _models

    return getattr(_models, NETWORKS[name])


class ModelType:
    """A kind of predictor: how it is fitted, stored, read and run.

    Attributes
    ----------
    name
        The type's name (``config.json["model_type"]``).
    file
        The predictor's file in the model folder.
    min_sections
        Training sections its held-out protocol needs.
    trains_network
        Whether it is a network set up by a :class:`~spotlens.histology.TrainConfig`.
    """

    name: str
    file: str
    min_sections: int = 1
    trains_network: bool = False

    def fit(self, names: list[str], data: dict, genes: list[str], *, config, folder,
            fingerprint: str, device: str, resume: bool, progress: bool, head=None):
        """Fit on the sections' ``features``, ``coords`` and ``y``; return ``(predictor,
        validation dict, network settings dict or None)``."""
        raise NotImplementedError

    def save(self, predictor, path: Path) -> None:
        """Write the predictor to ``path`` atomically."""
        predictor.save(path)

    def load(self, path: Path, *, device: str = "cpu"):
        """Read the predictor written by :meth:`save`."""
        raise NotImplementedError

    def predict(self, predictor, features: np.ndarray, coords: np.ndarray, *,
                adjacency=None) -> np.ndarray:
        """``n_spots × n_genes`` log-normalised expression from standardised features."""
        raise NotImplementedError

    def halo_hops(self) -> int:
        """Graph hops a spot's prediction depends on (0: its own tile only)."""
        return 0

    #: whether it reads each section's nuclei (:meth:`section_inputs`)
    reads_nuclei: bool = False

    def section_inputs(self, adata, image, nuclei, *, mpp: float, config=None) -> dict:
        """Arrays it needs of a section besides its spot features (none by default)."""
        return {}


class RidgeType(ModelType):
    """``"ridge"``: PCA + ridge regression (:class:`~spotlens.histology.RidgeBaseline`)."""

    name, file, min_sections = "ridge", "model.npz", 2

    def fit(self, names, data, genes, *, config=None, folder=None, fingerprint="",
            device="cpu", resume=True, progress=True, head=None):
        from ._fit import fit_ridge

        ridge, validation = fit_ridge(names, data)
        return ridge, validation, None

    def load(self, path, *, device="cpu"):
        from ._baseline import RidgeBaseline

        return RidgeBaseline.load(path)

    def predict(self, predictor, features, coords, *, adjacency=None):
        return predictor.predict(features)


class NetworkType(ModelType):
    """A network of ``_models.py`` in an :class:`~spotlens.histology.ExpressionModel`."""

    file = "model.pt"
    trains_network = True

    def __init__(self, name: str):
        self.name = name

    def fit(self, names, data, genes, *, config, folder, fingerprint, device, resume, progress,
            head=None):
        from ._fit import fit_network

        return fit_network(names, data, genes, config, folder, fingerprint=fingerprint,
                           device=device, resume=resume, progress=progress, head=head)

    def load(self, path, *, device="cpu"):
        from ._expression import ExpressionModel

        return ExpressionModel.load(path, device=device)

    def predict(self, predictor, features, coords, *, adjacency=None):
        from ._train_data import Section

        return predictor.predict(Section("predict", features, coords), adjacency=adjacency)

    def halo_hops(self) -> int:
        return int(network_class(self.name).halo_hops)


class NucleusType(ModelType):
    """``"nucleus"``: per-nucleus expression summed to spots (:class:`NucleusPredictor`)."""

    name, file, min_sections = "nucleus", "model.pt", 2
    reads_nuclei = True

    def section_inputs(self, adata, image, nuclei, *, mpp, config=None):
        from ._nucleus_level import training_inputs

        key = getattr(config, "proportions_key", None)
        return training_inputs(adata, image, nuclei, mpp=mpp, proportions_key=key)

    def fit(self, names, data, genes, *, config=None, folder=None, fingerprint="",
            device="cpu", resume=True, progress=True, head=None):
        from ._nucleus_fit import NucleusModelConfig, NucleusPredictor

        cfg = config if isinstance(config, NucleusModelConfig) else NucleusModelConfig()
        types = list(data[names[0]].get("types", ()))
        if any(list(data[n].get("types", ())) != types for n in names):
            from .._validation import InputError

            raise InputError("The training sections' proportions name different cell types; "
                             "deconvolve them with the same reference.")
        predictor = NucleusPredictor(genes, cfg, types=types).fit(
            {n: data[n] for n in names}, progress=progress)
        return predictor, predictor.validation, None

    def load(self, path, *, device="cpu"):
        from ._nucleus_fit import NucleusPredictor

        return NucleusPredictor.load(path, device=device)

    def predict(self, predictor, features, coords, *, adjacency=None):
        from .._validation import InputError

        raise InputError("A nucleus model predicts from the section's nuclei: use "
                         "HistologyModel.predict_nuclei (CLI: --level nucleus).")


#: every model type, by name
MODEL_TYPES: dict[str, ModelType] = {
    **{name: NetworkType(name) for name in NETWORKS},
    "ridge": RidgeType(),
    "nucleus": NucleusType(),
}
