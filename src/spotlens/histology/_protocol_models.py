"""The protocol's model types: the ridge family, sharing each training subset's feature SVDs.

The nested protocol fits the same ridge on many subsets of the training sections (every
outer fold, every inner fold, every gene set). Everything expensive in
:class:`~spotlens.histology.RidgeBaseline` — the standardisation + PCA of the features and the
SVD of the PCA scores — depends on the features of the sections fitted on, not on the genes
or the penalty. :class:`FeatureBank` computes it once per subset of sections and
:func:`fit_ridge_cv` reproduces ``RidgeBaseline(ranks=...).fit`` on top of it (same penalty,
same rank, same predictions; ``tests/test_histology_protocol.py`` holds them equal).

Model types (:data:`MODELS`), each ``fit(bank, names, ys, config) -> Fitted``:

- ``"ridge"``: the HEST-Benchmark frozen-feature ridge, alpha by leave-one-section-out CV;
- ``"rank1"``: that ridge's predictions projected onto the first principal axis of the
  z-scored training expression (one tissue axis: what a score can reward without any gene-
  specific signal);
- ``"ridge_rank"``: spotlens' ridge, the projection rank chosen by the same CV
  (:mod:`~spotlens.histology._rank`).

The package's networks (``"attention"``, ``"graph"``) are candidates too
(``_protocol_networks.py``, on the same :class:`FeatureBank`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ._baseline import DEFAULT_ALPHAS, _fit_projection, _Projection
from ._metrics import pearson_per_gene
from ._rank import DEFAULT_RANKS, ExpressionAxes, candidate_ranks, rank_label


@dataclass(frozen=True)
class _Path:
    projection: _Projection
    z_mean: np.ndarray  # n_components
    u: np.ndarray  # n_spots × rank
    s: np.ndarray  # rank
    vt: np.ndarray  # rank × n_components

    def coef(self, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Ridge ``W`` (``n_components × n_genes``) and intercept for targets ``y``."""
        y_mean = y.mean(axis=0)
        w = self.vt.T @ ((self.s / (self.s**2 + alpha))[:, None] * (self.u.T @ (y - y_mean)))
        return w, y_mean - self.z_mean @ w

    def coefs(self, y: np.ndarray, alphas: np.ndarray):
        """``(W, b)`` for every alpha, sharing ``uᵀ(y − ȳ)``."""
        y_mean = y.mean(axis=0)
        uty = self.u.T @ (y - y_mean)
        for alpha in alphas:
            w = self.vt.T @ ((self.s / (self.s**2 + alpha))[:, None] * uty)
            yield w, y_mean - self.z_mean @ w


class FeatureBank:
    """Features of sections and, per subset of them, the PCA and SVD a ridge fit needs.

    Parameters
    ----------
    features
        Section name -> ``n_spots × n_features``.
    n_components
        PCA components (capped by spots and features), as :class:`RidgeBaseline`.
    coords
        Section name -> ``n_spots × 2`` spot centres (for the network models, which look at
        neighbouring spots); None: no coordinates.
    """

    def __init__(self, features: Mapping[str, np.ndarray], n_components: int,
                 coords: Mapping[str, np.ndarray] | None = None):
        self.features = {k: np.asarray(v, dtype=np.float64) for k, v in features.items()}
        self.n_components = int(n_components)
        self.coords = {k: np.asarray(v, dtype=np.float64) for k, v in (coords or {}).items()}
        self._paths: dict[tuple[str, ...], _Path] = {}

    def path(self, names: tuple[str, ...]) -> _Path:
        """Standardisation + PCA fitted on ``names`` (stacked in that order) and the SVD of
        the centred scores; computed once per subset."""
        if names not in self._paths:
            x = np.vstack([self.features[n] for n in names])
            projection = _fit_projection(x, self.n_components)
            z = projection(x)
            z_mean = z.mean(axis=0)
            u, s, vt = np.linalg.svd(z - z_mean, full_matrices=False)
            self._paths[names] = _Path(projection, z_mean, u, s, vt)
        return self._paths[names]


@dataclass
class Fitted:
    """A fitted protocol model and its choices.

    ``predict(features, coords) -> n_spots × n_genes``: ``features`` ``n_spots × n_features``,
    ``coords`` ``n_spots × 2`` spot centres (read by the network models only).
    """

    predict: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    params: dict = field(default_factory=dict)


def fit_ridge_cv(bank: FeatureBank, names: tuple[str, ...], ys: Mapping[str, np.ndarray], *,
                 alphas: np.ndarray = DEFAULT_ALPHAS, ranks=None):
    """``RidgeBaseline(alphas=alphas, ranks=ranks).fit`` on the sections ``names``.

    Alpha maximises the mean over held-out sections of the mean per-gene Pearson r (ties go to
    the larger penalty); with ``ranks``, the projection rank is then chosen the same way at
    that alpha (ties to the higher rank).

    Returns
    -------
    ``(predict, alpha, rank)``: ``predict(features) -> n_spots × n_genes``; ``rank`` None for
    no projection.
    """
    alphas = np.sort(np.asarray(alphas, dtype=np.float64))
    names = tuple(names)
    scores = np.zeros((len(alphas), len(names)))
    held_preds = {}
    for j, held in enumerate(names):
        rest = tuple(n for n in names if n != held)
        path = bank.path(rest)
        z_held = path.projection(bank.features[held])
        y_tr = np.vstack([ys[n] for n in rest])
        held_preds[held] = [z_held @ w + b for w, b in path.coefs(y_tr, alphas)]
        for i, pred in enumerate(held_preds[held]):
            scores[i, j] = pearson_per_gene(pred, ys[held])[0].mean()
    mean = scores.mean(axis=1)
    best = int(len(mean) - 1 - np.argmax(mean[::-1]))
    alpha = float(alphas[best])
    rank = None
    if ranks is not None:
        n_genes = next(iter(ys.values())).shape[1]
        n_train = min(sum(len(ys[n]) for n in names if n != held) for held in names)
        candidates = candidate_ranks(n_genes, n_train, ranks)
        rank_scores = np.zeros((len(candidates), len(names)))
        for j, held in enumerate(names):
            axes = ExpressionAxes.fit(np.vstack([ys[n] for n in names if n != held]))
            for i, r in enumerate(candidates):
                rank_scores[i, j] = pearson_per_gene(
                    axes.project(held_preds[held][best], r), ys[held])[0].mean()
        rmean = rank_scores.mean(axis=1)
        rank = candidates[int(len(rmean) - 1 - np.argmax(rmean[::-1]))]
    path = bank.path(names)
    y = np.vstack([ys[n] for n in names])
    w, b = path.coef(y, alpha)
    axes = ExpressionAxes.fit(y) if rank is not None else None

    def predict(features: np.ndarray) -> np.ndarray:
        pred = path.projection(np.asarray(features, dtype=np.float64)) @ w + b
        return pred if axes is None else axes.project(pred, rank)

    return predict, alpha, rank


def _alphas(config) -> np.ndarray:
    return DEFAULT_ALPHAS if config.alphas is None else np.asarray(config.alphas)


def _fit_ridge(bank, names, ys, config) -> Fitted:
    predict, alpha, _ = fit_ridge_cv(bank, names, ys, alphas=_alphas(config))
    return Fitted(lambda x, coords=None: predict(x), {"alpha": alpha, "rank": "full"})


def _fit_rank1(bank, names, ys, config) -> Fitted:
    predict, alpha, _ = fit_ridge_cv(bank, names, ys, alphas=_alphas(config))
    axes = ExpressionAxes.fit(np.vstack([ys[n] for n in names]), max_rank=1)
    return Fitted(lambda x, coords=None: axes.project(predict(x), 1),
                  {"alpha": alpha, "rank": "1"})


def _fit_ridge_rank(bank, names, ys, config) -> Fitted:
    predict, alpha, rank = fit_ridge_cv(bank, names, ys, alphas=_alphas(config),
                                        ranks=DEFAULT_RANKS)
    return Fitted(lambda x, coords=None: predict(x), {"alpha": alpha, "rank": rank_label(rank)})


#: model name -> fit(bank, section names, expression by section, config) -> :class:`Fitted`
#: (the ridge family; the networks are in ``_protocol_networks.py``)
MODELS: dict[str, Callable[..., Fitted]] = {
    "ridge": _fit_ridge, "rank1": _fit_rank1, "ridge_rank": _fit_ridge_rank}
