"""The protocol's network candidates: the package's attention and graph models, fixed budget.

The model types of :class:`~spotlens.histology.HistologyModel` that train a network
(``"attention"``: spot-interaction attention; ``"graph"``: graph attention autoencoder + GCN
decoder; ``_models.py``), fitted by :class:`~spotlens.histology.ExpressionModel` on the
protocol's frozen features and the spots' coordinates. So that they fit in the protocol on a
CPU their settings are fixed before any section is read: ``ProtocolConfig.network_epochs``
epochs (no early stopping, which would need a section of its own), the
:class:`~spotlens.histology.TrainConfig` defaults otherwise, no projection rank, seed
``ProtocolConfig.seed``. Listed in ``ProtocolConfig.candidates`` they are chosen between by
the nested leave-one-section-out selection like any other candidate (one fit per outer fold);
listed in ``ProtocolConfig.reported`` they are fitted once on all training sections and
reported, never selected.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._validation import InputError
from ._protocol_models import FeatureBank, Fitted


def _fit_network(kind: str, bank: FeatureBank, names: tuple[str, ...], ys: dict,
                 config) -> Fitted:
    """Fit network ``kind`` on the sections ``names`` for ``config.network_epochs`` epochs."""
    from ._expression import ExpressionModel
    from ._train_data import Section, TrainConfig

    missing = [n for n in names if n not in bank.coords]
    if missing:
        raise InputError(f"The {kind} model needs the spot coordinates of sections {missing}.")
    settings = TrainConfig(model=kind, epochs=int(config.network_epochs), seed=int(config.seed),
                           expression_rank=None)
    n_genes = next(iter(ys.values())).shape[1]
    model = ExpressionModel([f"gene_{j}" for j in range(n_genes)], settings).fit(
        [Section(n, bank.features[n], bank.coords[n], ys[n]) for n in names], progress=False)

    def predict(features: np.ndarray, coords: np.ndarray | None = None) -> np.ndarray:
        if coords is None:
            raise InputError(f"The {kind} model predicts from features and spot coordinates.")
        pred = model.predict(Section("predict", np.asarray(features), np.asarray(coords)))
        return np.asarray(pred, dtype=np.float64)

    return Fitted(predict, {"alpha": float("nan"), "rank": "full",
                            "epochs": int(config.network_epochs)})


def _network(kind: str) -> Callable[..., Fitted]:
    def fit(bank, names, ys, config) -> Fitted:
        return _fit_network(kind, bank, names, ys, config)

    fit.__name__ = f"_fit_{kind}"
    return fit


#: network model name -> fit(bank, section names, expression by section, config)
NETWORK_MODELS: dict[str, Callable[..., Fitted]] = {
    kind: _network(kind) for kind in ("attention", "graph")}
