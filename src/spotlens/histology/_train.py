"""Training loop, checkpoints and the user-facing :class:`ExpressionModel` (arrays in and out)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._backend import import_torch, resolve_device
from .._validation import InputError
from ._rank import ExpressionAxes, candidate_ranks, rank_label
from ._train_data import (  # noqa: F401  (Section, TrainConfig importable from here)
    Section,
    TrainConfig,
    _graph_tensors,
    _pearson_mean,
    _Scaler,
)

logger = logging.getLogger("spotlens")


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
        self._head = None
        self._x_scaler: _Scaler | None = None
        self._y_scaler: _Scaler | None = None
        self._bank: tuple[np.ndarray, np.ndarray] | None = None
        self._axes: ExpressionAxes | None = None
        self.rank_: int | None = None
        self.rank_scores: dict[str, float] = {}
        self.best_epoch = 0

    @property
    def finetunes_head(self) -> bool:
        """Whether the model carries a fine-tuned encoder head (:meth:`head_features`)."""
        return self._head is not None

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

    def _build_head(self, head: dict, n_in: int):
        """Build the trainable head from the pretrained one; check the input width."""
        from ._models import TileHead

        weight = np.asarray(head["weight"], dtype=np.float32)
        cells = int(head["cells"])
        per_scale = weight.shape[1] * cells
        if weight.ndim != 2 or n_in % per_scale:
            raise InputError(
                f"Features have {n_in} columns per spot, not a multiple of the head's "
                f"{weight.shape[1]} channels × {cells} cells: pass the encoder's last-block maps "
                "(pre_head_encoder), not its pooled features, when fine-tuning its head."
            )
        return TileHead(weight, np.asarray(head["bias"], dtype=np.float32),
                        n_scales=n_in // per_scale, cells=cells)

    # -- training ------------------------------------------------------------------------------
    def fit(
        self,
        train: list[Section],
        *,
        validation: Section | None = None,
        head: dict | None = None,
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

        With ``config.finetune_head`` the sections' ``features`` are the encoder's pooled
        last-block maps (``n_spots × (n_scales · channels · cells)``, from
        :func:`~spotlens.histology._encoders.pre_head_encoder`); a copy of the pretrained head
        per tile scale turns them into features, which are z-scored within each section
        (:func:`~spotlens.histology._models.section_zscore`) and fed to the model, and the head
        is trained with it (learning rate ``config.head_lr``). Predict then from
        :meth:`head_features`.

        Parameters
        ----------
        train
            Sections with ``expression``.
        validation
            A held-out section for early stopping (``None``: train all ``epochs``).
        head
            With ``config.finetune_head``: the encoder's pretrained head (``weight``
            ``dim × channels``, ``bias``, ``cells``), as returned by
            :func:`~spotlens.histology._encoders.pre_head_encoder`.
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
            No training section, missing expression, inconsistent shapes,
            ``finetune_head`` without ``head`` (or ``head`` without it), or maps that do not
            fit the head.
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
        use_head = bool(self.config.finetune_head)
        if use_head and head is None:
            raise InputError("finetune_head=True needs the encoder's pretrained head (head=).")
        if head is not None and not use_head:
            raise InputError("head= is for fine-tuning it: set TrainConfig(finetune_head=True).")
        backend = resolve_device(device)
        dev = torch.device(backend.device if backend.is_torch else "cpu")
        x_all = np.vstack([s.features for s in train])
        y_all = np.vstack([s.expression for s in train])
        self._y_scaler = _Scaler.fit(y_all)
        if use_head:
            self._head = self._build_head(head, x_all.shape[1]).to(dev)
            width = self._head.n_scales * self._head.dim
            # the head's outputs are z-scored per section inside the model
            self._x_scaler = _Scaler(np.zeros(width), np.ones(width))
        else:
            self._head = None
            self._x_scaler = _Scaler.fit(x_all)
            width = x_all.shape[1]
        self._net = self._build(width).to(dev)
        groups = [{"params": list(self._net.parameters()), "lr": self.config.lr}]
        if use_head:
            groups.append({"params": list(self._head.parameters()), "lr": self.config.head_lr})
        opt = torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)
        start, best, best_state, stale = 0, -np.inf, None, 0
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is not None and resume and ckpt.exists():
            state = torch.load(ckpt, map_location=dev, weights_only=False)
            # checkpoints written before the fine-tuned head held the model's weights as "net"
            self._load_weights(state.get("weights") or {"net": state["net"], "head": None})
            opt.load_state_dict(state["optimizer"])
            start, best, stale = state["epoch"], state["best"], state["stale"]
            best_state, self.history = state["best_state"], state["history"]
            self.best_epoch = state.get("best_epoch", 0)
            logger.info("resumed from %s at epoch %d", ckpt, start)

        sections = [self._tensors(s, dev) for s in train]
        self._bank = None  # the attention model's training spots, set below or after training
        if self.config.model == "attention":
            bank_y = torch.cat([t["y"] for t in sections])
            owner = torch.cat([torch.full((len(t["x"]),), i, device=dev)
                               for i, t in enumerate(sections)])
            # a spot never attends to its own section: at prediction time the bank holds only
            # other sections, so training should not learn to copy spatial neighbours
            exclude = owner[:, None] == owner[None, :]
            # without a head the attention model reads the training spots' (fixed) features
            self._bank = None if use_head else (x_all, y_all)
        val = None if validation is None else self._tensors(validation, dev)
        bar = tqdm(range(start, self.config.epochs), desc=f"spotlens {self.config.model}",
                   disable=not progress, leave=False)
        try:
            for epoch in bar:
                self._train_mode(True)
                opt.zero_grad()
                if self.config.model == "attention":
                    from ._models import spot_attention_loss

                    bank_x = torch.cat([self._section_x(t) for t in sections])
                    direct, attended = self._net(bank_x, bank_x, bank_y, exclude=exclude)
                    loss = spot_attention_loss(bank_y, direct, attended)
                else:
                    from ._models import graph_loss

                    loss = 0.0
                    for t in sections:
                        expr, recon, target = self._net(self._section_x(t), t["edges"],
                                                        t["a_hat"])
                        loss = loss + graph_loss(t["y"], expr, target, recon,
                                                 recon_weight=self.config.recon_weight)
                    loss = loss / len(sections)
                loss.backward()
                opt.step()
                record = {"epoch": epoch + 1, "loss": float(loss.detach())}
                if val is not None:
                    pred = self._predict_tensors(val, sections, dev)
                    score = _pearson_mean(pred, validation.expression)
                    record["val_pearson"] = score
                    if score > best:
                        best, stale, self.best_epoch = score, 0, epoch + 1
                        best_state = self._weights(clone=True)
                    else:
                        stale += 1
                    bar.set_postfix(loss=f"{record['loss']:.3f}", val_r=f"{score:.3f}")
                self.history.append(record)
                if ckpt is not None and ((epoch + 1) % 10 == 0):
                    self._save_training_state(ckpt, opt, epoch + 1, best, stale, best_state)
                if val is not None and stale >= self.config.patience:
                    break
        finally:
            bar.close()
        if best_state is not None:
            self._load_weights(best_state)
        if ckpt is not None:
            self._save_training_state(ckpt, opt, len(self.history), best, stale, best_state)
        if self.config.model == "attention" and use_head:
            # the bank as prediction reads it: the trained head's features, z-scored per section
            self._train_mode(False)
            with torch.inference_mode():
                bank_x = torch.cat([self._section_x(t) for t in sections]).cpu().numpy()
            self._bank = (bank_x, y_all)
        self._fit_rank(y_all, val, validation, sections, dev)
        return self

    def _train_mode(self, on: bool) -> None:
        self._net.train(on)
        if self._head is not None:
            self._head.train(on)

    def _weights(self, *, clone: bool = False) -> dict:
        """Return the trainable state: the model and (when fine-tuned) the head."""
        def copy(module):
            return {k: (v.detach().clone() if clone else v) for k, v in
                    module.state_dict().items()}

        return {"net": copy(self._net), "head": None if self._head is None else copy(self._head)}

    def _load_weights(self, weights: dict) -> None:
        self._net.load_state_dict(weights["net"])
        if self._head is not None:
            self._head.load_state_dict(weights["head"])

    def _section_x(self, t: dict):
        """Return the model's input for one section: its features, or the head's, z-scored."""
        if self._head is None:
            return t["x"]
        from ._models import section_zscore

        return section_zscore(self._head(t["x"]))

    def _predict_tensors(self, t: dict, sections: list[dict], dev) -> np.ndarray:
        """Predict a section while training (the attention bank from the current weights)."""
        torch = import_torch()
        self._train_mode(False)
        with torch.inference_mode():
            if self.config.model == "attention":
                context = (torch.cat([self._section_x(s) for s in sections]),
                           torch.cat([s["y"] for s in sections]))
            else:
                context = (t["edges"], t["a_hat"])
            return self._decode(self._section_x(t), context)

    def _decode(self, x, context) -> np.ndarray:
        """Run the model (eval mode, no grad) on ``x``: log-normalised expression.

        ``context`` is the attention bank ``(features, z-scored expression)`` or the graph
        ``(edges, normalised adjacency)``.
        """
        if self.config.model == "attention":
            direct, attended = self._net(x, *context)
            z = 0.5 * (direct + attended)
        else:
            z, _, _ = self._net(x, *context)
        return self._y_scaler.inverse(z.cpu().numpy())

    def _fit_rank(self, y_all, val: dict | None, validation: Section | None, sections,
                  dev) -> None:
        """Training expression axes, and the projection rank (chosen on ``validation``)."""
        rank = self.config.expression_rank
        self.rank_scores = {}
        axes = ExpressionAxes.fit(y_all)
        if rank == "auto":
            if validation is None:
                rank = None
            else:
                pred = self._predict_tensors(val, sections, dev)
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
        x = (np.asarray(s.features, dtype=np.float32) if self._head is not None
             else self._x_scaler(s.features))
        out = {"x": torch.as_tensor(x, device=dev)}
        if s.expression is not None:
            out["y"] = torch.as_tensor(self._y_scaler(s.expression), device=dev)
        if self.config.model == "graph":
            out["edges"], out["a_hat"] = _graph_tensors(s.coords, self.config.k_neighbors,
                                                        torch, dev)
        return out

    def _save_training_state(self, path: Path, opt, epoch, best, stale, best_state) -> None:
        torch = import_torch()
        state = {"weights": self._weights(), "optimizer": opt.state_dict(), "epoch": epoch,
                 "best": best, "stale": stale, "best_state": best_state,
                 "history": self.history, "best_epoch": self.best_epoch}
        _atomic_torch_save(torch, state, path)

    # -- prediction ----------------------------------------------------------------------------
    def head_features(self, maps: np.ndarray, *, chunk_size: int = 4096) -> np.ndarray:
        """Return the fine-tuned head's features of a section's maps (not yet standardised).

        Parameters
        ----------
        maps
            ``n_spots × (n_scales · channels · cells)`` last-block maps, as in training.
        chunk_size
            Spots per forward pass (memory stays bounded on large grids).

        Returns
        -------
        ``n_spots × (n_scales · dim)`` float32, to be z-scored within the section
        (:func:`~spotlens.histology._normalize.standardize_section`) before :meth:`predict`.

        Raises
        ------
        InputError
            The model has no fine-tuned head, or ``maps`` has another width than in training.
        """
        torch = import_torch()
        if self._head is None:
            raise InputError("This model reads frozen features; it has no fine-tuned head.")
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim != 2 or maps.shape[1] != self._head.n_in:
            raise InputError(
                f"Last-block maps have shape {maps.shape}; the head expects n_spots × "
                f"{self._head.n_in} (the same encoder and tile scales as in training)."
            )
        dev = next(self._head.parameters()).device
        self._head.eval()
        out = []
        with torch.inference_mode():
            for lo in range(0, len(maps), chunk_size):
                chunk = torch.as_tensor(maps[lo:lo + chunk_size], device=dev)
                out.append(self._head(chunk).cpu().numpy())
        width = self._head.n_scales * self._head.dim
        return np.vstack(out) if out else np.empty((0, width), np.float32)

    def _predict_one(self, s: Section, dev) -> np.ndarray:
        torch = import_torch()
        self._train_mode(False)
        x = torch.as_tensor(self._x_scaler(s.features), device=dev)
        with torch.inference_mode():
            if self.config.model == "attention":
                context = (torch.as_tensor(self._x_scaler(self._bank[0]), device=dev),
                           torch.as_tensor(self._y_scaler(self._bank[1]), device=dev))
            else:
                context = _graph_tensors(s.coords, self.config.k_neighbors, torch, dev)
            return self._decode(x, context)

    def predict(self, section: Section, *, device: str = "cpu") -> np.ndarray:
        """Predicted log-normalised expression, ``n_spots × n_genes`` (genes as in ``genes``).

        The attention model predicts the mean of its direct and attention heads, reading from
        the training spots; the graph model decodes over the section's own spot graph. With
        ``rank_`` set, the predictions are projected onto that many principal axes of the
        training expression.

        Parameters
        ----------
        section
            The spots to predict. Its ``features`` are as in training, or for a model with a
            fine-tuned head (:attr:`finetunes_head`) the head's features of the whole section
            (:meth:`head_features`), z-scored within it
            (:func:`~spotlens.histology._normalize.standardize_section`).
        device
            Unused (the model stays on the device it was loaded to); kept for the API.

        Raises
        ------
        InputError
            The model is not trained, or the features have another width than expected.
        """
        if self._net is None:
            raise InputError("The model is not trained: call fit() or ExpressionModel.load().")
        if section.features.shape[1] != len(self._x_scaler.mean):
            what = ("head features" if self._head is not None else "features")
            raise InputError(
                f"Section {section.name!r} has {section.features.shape[1]} features per spot; "
                f"the model reads {len(self._x_scaler.mean)} {what}. Use the same encoder"
                + (" and head_features()." if self._head is not None else ".")
            )
        dev = next(self._net.parameters()).device
        pred = self._predict_one(section, dev)
        return pred if self._axes is None else self._axes.project(pred, self.rank_)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the model (config, genes, scalers, weights, head, attention bank) atomically."""
        torch = import_torch()
        if self._net is None:
            raise InputError("Nothing to save: the model is not trained.")
        head = None
        if self._head is not None:
            h = self._head
            head = {"n_scales": h.n_scales, "cells": h.cells, "channels": h.channels,
                    "dim": h.dim, "state": {k: v.cpu() for k, v in h.state_dict().items()}}
        state = {
            "format": "spotlens.ExpressionModel/1",
            "config": asdict(self.config),
            "genes": list(self.genes),
            "n_features": int(len(self._x_scaler.mean)),
            "x_scaler": (self._x_scaler.mean, self._x_scaler.std),
            "y_scaler": (self._y_scaler.mean, self._y_scaler.std),
            "bank": self._bank,
            "net": {k: v.cpu() for k, v in self._net.state_dict().items()},
            "head": head,
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
        dev = torch.device(backend.device if backend.is_torch else "cpu")
        model._net = model._build(state["n_features"])
        model._net.load_state_dict(state["net"])
        model._net.to(dev)
        head = state.get("head")
        if head is not None:
            from ._models import TileHead

            model._head = TileHead(np.zeros((head["dim"], head["channels"]), np.float32),
                                   np.zeros(head["dim"], np.float32),
                                   n_scales=head["n_scales"], cells=head["cells"])
            model._head.load_state_dict(head["state"])
            model._head.to(dev)
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
