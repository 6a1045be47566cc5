"""Training loop, checkpoints and the user-facing :class:`ExpressionModel` (arrays in and out)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import sparse
from tqdm.auto import tqdm

from .._backend import import_torch, resolve_device
from .._validation import InputError
from ._rank import ExpressionAxes, candidate_ranks, check_rank, rank_label

logger = logging.getLogger("spotlens")


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
    expression_rank: int | Literal["auto"] | None = "auto"

    def __post_init__(self):
        if self.model not in ("attention", "graph"):
            raise InputError(f"model must be 'attention' or 'graph', got {self.model!r}.")
        self.expression_rank = check_rank(self.expression_rank)
        for name in ("hidden", "latent", "epochs", "patience", "k_neighbors"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}.")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}.")


def _graph_tensors(coords: np.ndarray, k: int, torch, device):
    """Edge list with self loops and the GCN's normalised adjacency for one section."""
    from ..deconv._graph import knn

    n = coords.shape[0]
    _, idx = knn(np.asarray(coords, dtype=np.float64), k)
    rows = np.repeat(np.arange(n), idx.shape[1])
    cols = idx.ravel()
    ok = cols >= 0
    a = sparse.csr_matrix((np.ones(ok.sum()), (rows[ok], cols[ok])), shape=(n, n))
    a = ((a + a.T) > 0).astype(np.float64) + sparse.identity(n)
    deg = np.asarray(a.sum(axis=1)).ravel()
    d = sparse.diags(1 / np.sqrt(deg))
    a_hat = (d @ a @ d).tocoo()
    edges = np.vstack([a_hat.row, a_hat.col])
    a_hat_t = torch.sparse_coo_tensor(
        torch.as_tensor(edges), torch.as_tensor(a_hat.data, dtype=torch.float32), size=(n, n),
        check_invariants=False,
    ).coalesce().to(device)
    return torch.as_tensor(edges, device=device), a_hat_t


def _pearson_mean(pred: np.ndarray, obs: np.ndarray) -> float:
    p = pred - pred.mean(0)
    o = obs - obs.mean(0)
    denom = np.sqrt((p**2).sum(0) * (o**2).sum(0))
    r = np.divide((p * o).sum(0), denom, out=np.zeros(p.shape[1]), where=denom > 0)
    return float(r.mean())


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


@dataclass
class ExpressionModel:
    """Predict spot expression from image features: fit, predict, save, load.

    Attributes
    ----------
    genes
        The target genes, in the order of the predictions.
    config
        :class:`TrainConfig`.
    history
        Per epoch: training loss and validation mean Pearson r (when a validation section is
        given).
    rank_
        After :meth:`fit`: the expression rank predictions are projected to (``None``: none).
    rank_scores
        With ``expression_rank="auto"`` and a validation section: rank label (``"10"``,
        ``"full"``) -> mean Pearson r on it.
    """

    genes: list[str]
    config: TrainConfig = field(default_factory=TrainConfig)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self._net = None
        self._x_scaler: _Scaler | None = None
        self._y_scaler: _Scaler | None = None
        self._bank: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._axes: ExpressionAxes | None = None
        self.rank_: int | None = None
        self.rank_scores: dict[str, float] = {}
        self.best_epoch = 0

    # -- construction --------------------------------------------------------------------------
    def _build(self, n_features: int):
        torch = import_torch()
        from ._models import GraphExpression, SpotAttention

        torch.manual_seed(self.config.seed)
        c = self.config
        if c.model == "attention":
            return SpotAttention(n_features, len(self.genes), hidden=c.hidden, dropout=c.dropout)
        return GraphExpression(
            n_features, len(self.genes), hidden=c.hidden, latent=c.latent, dropout=c.dropout
        )

    # -- training ------------------------------------------------------------------------------
    def fit(
        self,
        train: list[Section],
        *,
        validation: Section | None = None,
        device: str = "cpu",
        checkpoint: str | os.PathLike | None = None,
        resume: bool = True,
        progress: bool = True,
    ) -> ExpressionModel:
        """Train on sections with image features and expression.

        Features are standardised and each gene's expression is z-scored on the training
        spots, so every gene weighs the same in the loss. With ``validation``, the weights of
        the epoch with the best mean per-gene Pearson r on it are kept (early stopping), and
        with ``expression_rank="auto"`` the projection rank is chosen on it afterwards.

        Parameters
        ----------
        train
            Sections with ``expression``.
        validation
            A held-out section for early stopping (``None``: train all ``epochs``).
        device
            ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        checkpoint
            File written atomically every 10 epochs and at the end; with ``resume`` an existing
            one is loaded and training continues from its epoch.
        resume
            Continue from ``checkpoint`` when it exists.
        progress
            Show a progress bar.

        Returns
        -------
        ``self``.

        Raises
        ------
        InputError
            No training section, missing expression, inconsistent shapes.
        """
        torch = import_torch()
        if not train:
            raise InputError("fit needs at least one training section.")
        for s in [*train, *([validation] if validation else [])]:
            if s.expression is None:
                raise InputError(f"Section {s.name!r} has no expression to train or validate on.")
            if s.expression.shape != (len(s.features), len(self.genes)):
                raise InputError(
                    f"Section {s.name!r}: expression is {s.expression.shape}, expected "
                    f"({len(s.features)}, {len(self.genes)}) spots × genes."
                )
        backend = resolve_device(device)
        dev = torch.device(backend.device if backend.is_torch else "cpu")
        x_all = np.vstack([s.features for s in train])
        y_all = np.vstack([s.expression for s in train])
        self._x_scaler, self._y_scaler = _Scaler.fit(x_all), _Scaler.fit(y_all)
        self._net = self._build(x_all.shape[1]).to(dev)
        # the attention model reads from the training spots, when validating and predicting
        self._bank = (x_all, y_all) if self.config.model == "attention" else None
        opt = torch.optim.AdamW(
            self._net.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        start, best, best_state, stale = 0, -np.inf, None, 0
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is not None and resume and ckpt.exists():
            state = torch.load(ckpt, map_location=dev, weights_only=False)
            self._net.load_state_dict(state["net"])
            opt.load_state_dict(state["optimizer"])
            start, best, stale = state["epoch"], state["best"], state["stale"]
            best_state, self.history = state["best_state"], state["history"]
            self.best_epoch = state.get("best_epoch", 0)
            logger.info("resumed from %s at epoch %d", ckpt, start)

        sections = [self._tensors(s, dev) for s in train]
        if self.config.model == "attention":
            bank_x = torch.cat([t["x"] for t in sections])
            bank_y = torch.cat([t["y"] for t in sections])
            owner = torch.cat([torch.full((len(t["x"]),), i, device=dev)
                               for i, t in enumerate(sections)])
            # a spot never attends to its own section: at prediction time the bank holds only
            # other sections, so training should not learn to copy spatial neighbours
            exclude = owner[:, None] == owner[None, :]
        bar = tqdm(range(start, self.config.epochs), desc=f"spotlens {self.config.model}",
                   disable=not progress, leave=False)
        try:
            for epoch in bar:
                self._net.train()
                opt.zero_grad()
                if self.config.model == "attention":
                    from ._models import spot_attention_loss

                    direct, attended = self._net(bank_x, bank_x, bank_y, exclude=exclude)
                    loss = spot_attention_loss(bank_y, direct, attended)
                else:
                    from ._models import graph_loss

                    loss = 0.0
                    for t in sections:
                        expr, recon, target = self._net(t["x"], t["edges"], t["a_hat"])
                        loss = loss + graph_loss(t["y"], expr, target, recon,
                                                 recon_weight=self.config.recon_weight)
                    loss = loss / len(sections)
                loss.backward()
                opt.step()
                record = {"epoch": epoch + 1, "loss": float(loss.detach())}
                if validation is not None:
                    score = _pearson_mean(self._predict_one(validation, dev), validation.expression)
                    record["val_pearson"] = score
                    if score > best:
                        best, stale, self.best_epoch = score, 0, epoch + 1
                        best_state = {k: v.detach().clone() for k, v in
                                      self._net.state_dict().items()}
                    else:
                        stale += 1
                    bar.set_postfix(loss=f"{record['loss']:.3f}", val_r=f"{score:.3f}")
                self.history.append(record)
                if ckpt is not None and ((epoch + 1) % 10 == 0):
                    self._save_training_state(ckpt, opt, epoch + 1, best, stale, best_state)
                if validation is not None and stale >= self.config.patience:
                    break
        finally:
            bar.close()
        if best_state is not None:
            self._net.load_state_dict(best_state)
        if ckpt is not None:
            self._save_training_state(ckpt, opt, len(self.history), best, stale, best_state)
        self._fit_rank(y_all, validation, dev)
        return self

    def _fit_rank(self, y_all: np.ndarray, validation: Section | None, dev) -> None:
        """Training expression axes, and the projection rank (chosen on ``validation``)."""
        rank = self.config.expression_rank
        self.rank_scores = {}
        axes = ExpressionAxes.fit(y_all)
        if rank == "auto":
            if validation is None:
                rank = None
            else:
                pred = self._predict_one(validation, dev)
                ranks = candidate_ranks(len(self.genes), len(y_all))
                scores = [_pearson_mean(axes.project(pred, r), validation.expression)
                          for r in ranks]
                self.rank_scores = {rank_label(r): float(v)
                                    for r, v in zip(ranks, scores, strict=True)}
                rank = ranks[int(len(scores) - 1 - np.argmax(scores[::-1]))]  # ties -> higher
                logger.info("expression rank %s (validation mean Pearson r %s)",
                            rank_label(rank), ", ".join(f"{k}: {v:.3f}" for k, v in
                                                        self.rank_scores.items()))
        self.rank_ = rank
        self._axes = None if rank is None else ExpressionAxes(axes.mean, axes.std,
                                                              axes.axes[:rank])

    def _tensors(self, s: Section, dev):
        torch = import_torch()
        out = {"x": torch.as_tensor(self._x_scaler(s.features), device=dev)}
        if s.expression is not None:
            out["y"] = torch.as_tensor(self._y_scaler(s.expression), device=dev)
        if self.config.model == "graph":
            out["edges"], out["a_hat"] = _graph_tensors(s.coords, self.config.k_neighbors,
                                                        torch, dev)
        return out

    def _save_training_state(self, path: Path, opt, epoch, best, stale, best_state) -> None:
        torch = import_torch()
        state = {"net": self._net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                 "best": best, "stale": stale, "best_state": best_state,
                 "history": self.history, "best_epoch": self.best_epoch}
        _atomic_torch_save(torch, state, path)

    # -- prediction ----------------------------------------------------------------------------
    def _predict_one(self, s: Section, dev) -> np.ndarray:
        torch = import_torch()
        self._net.eval()
        t = self._tensors(Section(s.name, s.features, s.coords, None), dev)
        with torch.inference_mode():
            if self.config.model == "attention":
                bank_x = torch.as_tensor(self._x_scaler(self._bank[0]), device=dev)
                bank_y = torch.as_tensor(self._y_scaler(self._bank[1]), device=dev)
                direct, attended = self._net(t["x"], bank_x, bank_y)
                z = 0.5 * (direct + attended)
            else:
                z, _, _ = self._net(t["x"], t["edges"], t["a_hat"])
        return self._y_scaler.inverse(z.cpu().numpy())

    def predict(self, section: Section, *, device: str = "cpu") -> np.ndarray:
        """Predicted log-normalised expression, ``n_spots × n_genes`` (genes as in ``genes``).

        The attention model predicts the mean of its direct and attention heads, reading from
        the training spots; the graph model decodes over the section's own spot graph. With
        ``rank_`` set, the predictions are projected onto that many principal axes of the
        training expression.

        Raises
        ------
        InputError
            The model is not trained, or the features have another width than in training.
        """
        if self._net is None:
            raise InputError("The model is not trained: call fit() or ExpressionModel.load().")
        if section.features.shape[1] != len(self._x_scaler.mean):
            raise InputError(
                f"Section {section.name!r} has {section.features.shape[1]} features per spot; "
                f"the model was trained on {len(self._x_scaler.mean)}. Use the same encoder."
            )
        dev = next(self._net.parameters()).device
        pred = self._predict_one(section, dev)
        return pred if self._axes is None else self._axes.project(pred, self.rank_)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the model (config, genes, scalers, weights, attention bank) atomically."""
        torch = import_torch()
        if self._net is None:
            raise InputError("Nothing to save: the model is not trained.")
        state = {
            "format": "spotlens.ExpressionModel/1",
            "config": asdict(self.config),
            "genes": list(self.genes),
            "n_features": int(len(self._x_scaler.mean)),
            "x_scaler": (self._x_scaler.mean, self._x_scaler.std),
            "y_scaler": (self._y_scaler.mean, self._y_scaler.std),
            "bank": self._bank,
            "net": {k: v.cpu() for k, v in self._net.state_dict().items()},
            "history": self.history,
            "best_epoch": self.best_epoch,
            "rank": self.rank_,
            "rank_scores": self.rank_scores,
            "axes": None if self._axes is None else (self._axes.mean, self._axes.std,
                                                     self._axes.axes),
        }
        _atomic_torch_save(torch, state, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str = "cpu") -> ExpressionModel:
        """Read a model written by :meth:`save`.

        Raises
        ------
        InputError
            The file is missing or is not a spotlens expression model.
        """
        torch = import_torch()
        path = Path(path)
        if not path.exists():
            raise InputError(f"No model file at {path}.")
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or state.get("format") != "spotlens.ExpressionModel/1":
            raise InputError(f"{path} is not a spotlens expression model.")
        model = cls(genes=state["genes"], config=TrainConfig(**state["config"]),
                    history=state["history"])
        model._x_scaler = _Scaler(*state["x_scaler"])
        model._y_scaler = _Scaler(*state["y_scaler"])
        model._bank = state["bank"]
        model.best_epoch = state["best_epoch"]
        model.rank_ = state.get("rank")  # absent in models saved before reduced-rank output
        model.rank_scores = state.get("rank_scores", {})
        axes = state.get("axes")
        model._axes = None if axes is None else ExpressionAxes(*axes)
        backend = resolve_device(device)
        model._net = model._build(state["n_features"])
        model._net.load_state_dict(state["net"])
        model._net.to(torch.device(backend.device if backend.is_torch else "cpu"))
        return model


def _atomic_torch_save(torch, obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
