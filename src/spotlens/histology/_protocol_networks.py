"""The protocol's network candidates: the package's attention and graph models.

The model types of :class:`~spotlens.histology.HistologyModel` that train a network
(``"attention"``: spot-interaction attention; ``"graph"``: graph attention autoencoder + GCN
decoder; ``_models.py``), fitted by :class:`~spotlens.histology.ExpressionModel` on the
protocol's frozen features and the spots' coordinates, with the
:class:`~spotlens.histology.TrainConfig` defaults otherwise, no projection rank and seed
``ProtocolConfig.seed``.

Their one setting that the protocol chooses is the number of epochs, as the ridge models
choose their penalty: with several values in ``ProtocolConfig.network_epochs``, a fit on the
sections ``names`` first trains one network per section ``h`` of ``names`` on the others for
the largest number of epochs, scoring ``h`` (mean per-gene Pearson r) after every epoch; the
value with the best mean score over the held-out sections (ties: the fewest epochs) is then
used to train on all of ``names``. Inside the nested selection this is the inner loop, so the
epochs of the model scored on an outer held-out section were chosen without it. With one value
(or one section) the epochs are fixed and there is one fit. No early stopping otherwise.

Listed in ``ProtocolConfig.candidates`` the networks are chosen between by the nested
leave-one-section-out selection like any other candidate; listed in
``ProtocolConfig.reported`` they are fitted on all training sections and reported, never
selected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from .._validation import InputError
from ._protocol_models import FeatureBank, Fitted

logger = logging.getLogger("spotlens")


def _train(kind: str, bank: FeatureBank, names, ys: dict, config, epochs: int,
           validation: str | None = None):
    """One :class:`ExpressionModel` of ``kind`` on ``names`` for ``epochs`` epochs (scoring
    ``validation`` after every epoch when given)."""
    from ._expression import ExpressionModel
    from ._train_data import Section, TrainConfig

    settings = TrainConfig(model=kind, epochs=int(epochs), patience=int(epochs) + 1,
                           seed=int(config.seed), expression_rank=None)
    n_genes = next(iter(ys.values())).shape[1]

    def section(n):
        return Section(n, bank.features[n], bank.coords[n], ys[n])

    return ExpressionModel([f"gene_{j}" for j in range(n_genes)], settings).fit(
        [section(n) for n in names], validation=None if validation is None else
        section(validation), progress=False)


def choose_epochs(kind: str, bank: FeatureBank, names: tuple[str, ...], ys: dict,
                  config) -> tuple[int, dict[int, float]]:
    """Epochs by leave-one-section-out over ``names``: (chosen, epochs -> mean held-out r).

    ``ProtocolConfig.network_epochs`` with one value: that value, no scores; a single section
    (nothing to hold out): the fewest epochs listed, no scores.
    """
    grid = config.network_epochs  # sorted, distinct (ProtocolConfig)
    if len(grid) == 1 or len(names) < 2:
        return grid[0], {}
    curves = []
    for held in names:
        model = _train(kind, bank, [n for n in names if n != held], ys, config, grid[-1],
                       validation=held)
        history = [h["val_pearson"] for h in model.history]
        curves.append([history[e - 1] for e in grid])
    means = np.mean(curves, axis=0)
    chosen = grid[int(np.argmax(means))]  # ties -> the fewest epochs
    return chosen, {e: float(m) for e, m in zip(grid, means, strict=True)}


def _fit_network(kind: str, bank: FeatureBank, names: tuple[str, ...], ys: dict,
                 config) -> Fitted:
    """Fit network ``kind`` on the sections ``names``, its epochs chosen inside them."""
    missing = [n for n in names if n not in bank.coords]
    if missing:
        raise InputError(f"The {kind} model needs the spot coordinates of sections {missing}.")
    epochs, scores = choose_epochs(kind, bank, names, ys, config)
    if scores:
        logger.info("protocol %s on %s: %d epochs (LOSO r %s)", kind, ",".join(names), epochs,
                    ", ".join(f"{e}: {v:.3f}" for e, v in scores.items()))
    model = _train(kind, bank, names, ys, config, epochs)

    def predict(features: np.ndarray, coords: np.ndarray | None = None) -> np.ndarray:
        from ._train_data import Section

        if coords is None:
            raise InputError(f"The {kind} model predicts from features and spot coordinates.")
        pred = model.predict(Section("predict", np.asarray(features), np.asarray(coords)))
        return np.asarray(pred, dtype=np.float64)

    return Fitted(predict, {"alpha": float("nan"), "rank": "full", "epochs": int(epochs)})


def _network(kind: str) -> Callable[..., Fitted]:
    def fit(bank, names, ys, config) -> Fitted:
        return _fit_network(kind, bank, names, ys, config)

    fit.__name__ = f"_fit_{kind}"
    return fit


#: network model name -> fit(bank, section names, expression by section, config)
NETWORK_MODELS: dict[str, Callable[..., Fitted]] = {
    kind: _network(kind) for kind in ("attention", "graph")}
