"""Training inputs of the H&E expression models: sections, the configuration, graph tensors.

:class:`Section` (features, coordinates, expression of one section) and :class:`TrainConfig`
(the hyperparameters, checked on creation) are what :class:`~spotlens.histology._expression.
ExpressionModel` trains on; the helpers build a section's spot graph and scale targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import sparse

from .._validation import InputError, check_int
from ..pp import knn
from ._metrics import pearson_per_gene
from ._rank import check_rank
from ._registry import NETWORKS


@dataclass
class Section:
    """One tissue section as the models see it.

    Attributes
    ----------
    name
        Section name (e.g. ``"C6"``).
    features
        ``n_spots × n_features`` image features of the spots' tiles.
    coords
        ``n_spots × 2`` spot centres (any unit; used for the neighbourhood graph).
    expression
        ``n_spots × n_genes`` log-normalised expression of the target genes, or ``None`` for an
        H&E-only section.
    """

    name: str
    features: np.ndarray
    coords: np.ndarray
    expression: np.ndarray | None = None


@dataclass
class TrainConfig:
    """Settings of :class:`ExpressionModel` (the CLI uses the same fields).

    Attributes
    ----------
    model
        ``"attention"`` (spot-interaction attention, dual MSE loss) or ``"graph"`` (graph
        attention autoencoder + GCN decoder).
    hidden, latent, dropout
        Network widths and dropout.
    epochs, lr, weight_decay
        Adam (decoupled weight decay) schedule.
    patience
        Stop after this many epochs without improvement on the validation section.
    k_neighbors
        Neighbours per spot in the graph model.
    recon_weight
        Weight of the feature-reconstruction term of the graph model.
    seed
        Seed of the initialisation and dropout.
    finetune_head
        Train a copy of the image encoder's last layer with the model
        (:class:`~spotlens.histology._models.TileHead`; the features are then the encoder's
        last-block maps and :meth:`ExpressionModel.fit` needs the pretrained head). False:
        frozen features.
    head_lr
        Learning rate of the fine-tuned head (``lr`` is the model's).
    expression_rank
        Project predictions onto this many principal axes of the z-scored training expression
        (reduced-rank output, :mod:`spotlens.histology._rank`); ``None``: no projection;
        ``"auto"``: the rank of :data:`~spotlens.histology._rank.DEFAULT_RANKS` (or none) with
        the best mean Pearson r on the validation section given to :meth:`ExpressionModel.fit`
        (no projection without one).
    """

    model: Literal["attention", "graph"] = "attention"
    hidden: int = 256
    latent: int = 64
    dropout: float = 0.2
    epochs: int = 300
    lr: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 40
    k_neighbors: int = 6
    recon_weight: float = 0.1
    seed: int = 0
    finetune_head: bool = False
    head_lr: float = 1e-3
    expression_rank: int | Literal["auto"] | None = "auto"

    def __post_init__(self):
        if self.model not in NETWORKS:
            raise InputError(f"model must be {' or '.join(map(repr, NETWORKS))}, got "
                             f"{self.model!r}.")
        if not isinstance(self.finetune_head, (bool, np.bool_)):
            raise InputError(f"finetune_head must be True or False, got {self.finetune_head!r}.")
        for name in ("lr", "head_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise InputError(f"{name} must be a learning rate > 0, got {value!r}.")
        self.expression_rank = check_rank(self.expression_rank)
        for name in ("hidden", "latent", "epochs", "patience", "k_neighbors"):
            value = getattr(self, name)
            check_int(name, value, minimum=1, expected="a positive integer")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}.")


def spot_graph(coords: np.ndarray, k: int) -> sparse.csr_matrix:
    """Symmetric 0/1 ``n_spots × n_spots`` graph of each spot's ``k`` nearest spots, no self loops.

    ``coords``: ``n_spots × 2`` centres (any unit); ties broken by spot index
    (:func:`spotlens.pp.knn`).
    """
    n = coords.shape[0]
    _, idx = knn(np.asarray(coords, dtype=np.float64), k)
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols = idx.ravel()
    ok = cols >= 0
    a = sparse.csr_matrix((np.ones(ok.sum()), (rows[ok], cols[ok])), shape=(n, n))
    return ((a + a.T) > 0).astype(np.float64).tocsr()


def graph_inputs(adjacency: sparse.spmatrix, torch, device):
    """Edge list with self loops and the GCN's normalised adjacency of a spot graph.

    ``Â = D^-1/2 (A + I) D^-1/2`` with ``D`` the degrees of ``A + I``. Returns ``edges``
    (``2 × n_edges`` (target, source), the nonzeros of ``Â``) and ``Â`` as a sparse tensor on
    ``device``.
    """
    n = adjacency.shape[0]
    a = sparse.csr_matrix(adjacency, dtype=np.float64) + sparse.identity(n)
    deg = np.asarray(a.sum(axis=1)).ravel()
    d = sparse.diags(1 / np.sqrt(deg))
    a_hat = (d @ a @ d).tocoo()
    edges = np.vstack([a_hat.row, a_hat.col])
    a_hat_t = torch.sparse_coo_tensor(
        torch.as_tensor(edges), torch.as_tensor(a_hat.data, dtype=torch.float32), size=(n, n),
        check_invariants=False,
    ).coalesce().to(device)
    return torch.as_tensor(edges, device=device), a_hat_t


def _graph_tensors(coords: np.ndarray, k: int, torch, device):
    """:func:`graph_inputs` of the ``k``-nearest-neighbour :func:`spot_graph` of ``coords``."""
    return graph_inputs(spot_graph(coords, k), torch, device)


def _pearson_mean(pred: np.ndarray, obs: np.ndarray) -> float:
    """Mean over genes of the per-gene Pearson r across spots (0 for a constant column).

    ``pred``, ``obs``: ``n_spots × n_genes``. The package's one Pearson kernel
    (:func:`~spotlens.histology._metrics.pearson_per_gene`), averaged.
    """
    return float(pearson_per_gene(pred, obs)[0].mean())


@dataclass
class _Scaler:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> _Scaler:
        std = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(std > 0, std, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return z * self.std + self.mean
