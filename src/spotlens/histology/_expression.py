"""Networks from image features to spot expression, arrays in and out: :class:`ExpressionModel`.

It scales the inputs and targets, builds the network of ``config.model`` (an ``nn.Module`` of
``_models.py``, looked up in ``_registry.NETWORKS``) and the optional fine-tuned encoder head,
hands a training plan to the one training loop (:class:`~spotlens.histology._trainer.Trainer`),
chooses the projection rank, predicts, and saves and reads itself. It never asks which network
it holds: each network carries its own ``loss``, ``section_inputs`` and ``decode``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .._backend import import_torch, resolve_device
from .._validation import InputError
from ._normalize import standardize_section
from ._rank import ExpressionAxes, candidate_ranks, rank_label
from ._registry import network_class
from ._train_data import Section, TrainConfig, _pearson_mean, _Scaler
from ._trainer import Trainer, TrainingState, atomic_torch_save

logger = logging.getLogger("spotlens")

FORMAT = "spotlens.ExpressionModel/1"


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
    best_epoch
        The epoch whose weights were kept (best validation score; 0 without validation).
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

    def _build(self, n_features: int):
        import_torch().manual_seed(self.config.seed)
        return network_class(self.config.model).from_config(n_features, len(self.genes),
                                                           self.config)

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
    def fit(self, train: list[Section], *, validation: Section | None = None,
            head: dict | None = None, device: str = "cpu",
            checkpoint: str | os.PathLike | None = None, resume: bool = True,
            progress: bool = True) -> ExpressionModel:
        """Train on sections with image features and expression.

        Features are standardised and each gene's expression is z-scored on the training
        spots, so every gene weighs the same in the loss. With ``validation``, the weights of
        the epoch with the best mean per-gene Pearson r on it are kept (early stopping), and
        with ``expression_rank="auto"`` the projection rank is chosen on it afterwards.

        With ``config.finetune_head`` the sections' ``features`` are the encoder's pooled
        last-block maps (``n_spots × (n_scales · channels · cells)``, from
        :func:`~spotlens.histology._head.pre_head_encoder`); a copy of the pretrained head
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
            :func:`~spotlens.histology._head.pre_head_encoder`.
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
        self._check_sections(train, validation, head)
        backend = resolve_device(device)
        dev = torch.device(backend.device if backend.is_torch else "cpu")
        x_all = np.vstack([s.features for s in train])
        y_all = np.vstack([s.expression for s in train])
        self._y_scaler = _Scaler.fit(y_all)
        if head is not None:
            self._head = self._build_head(head, x_all.shape[1]).to(dev)
            width = self._head.n_scales * self._head.dim
            # the head's outputs are z-scored per section inside the model
            self._x_scaler = _Scaler(np.zeros(width), np.ones(width))
        else:
            self._head, self._x_scaler, width = None, _Scaler.fit(x_all), x_all.shape[1]
        self._net = self._build(width).to(dev)
        plan = _Plan(self, [self._tensors(s, dev) for s in train],
                     None if validation is None else self._tensors(validation, dev),
                     None if validation is None else validation.expression)
        trainer = Trainer(self.config.epochs, self.config.patience,
                          checkpoint=Path(checkpoint) if checkpoint else None, resume=resume,
                          progress=progress, desc=f"spotlens {self.config.model}")
        state = trainer.fit(plan, TrainingState(history=self.history))
        self.history, self.best_epoch = state.history, state.best_epoch
        # the attention bank as prediction reads it: the training spots' model inputs
        self._bank = None
        if self._net.uses_bank:
            self._bank = (x_all, y_all) if head is None else (plan.bank_x(), y_all)
        self._fit_rank(y_all, plan, validation)
        return self

    def _check_sections(self, train, validation, head) -> None:
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
        if self.config.finetune_head and head is None:
            raise InputError("finetune_head=True needs the encoder's pretrained head (head=).")
        if head is not None and not self.config.finetune_head:
            raise InputError("head= is for fine-tuning it: set TrainConfig(finetune_head=True).")

    def _fit_rank(self, y_all, plan: _Plan, validation: Section | None) -> None:
        """Training expression axes, and the projection rank (chosen on ``validation``)."""
        rank = self.config.expression_rank
        self.rank_scores = {}
        axes = ExpressionAxes.fit(y_all)
        if rank == "auto":
            if validation is None:
                rank = None
            else:
                pred = plan.predict_validation()
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

    def _tensors(self, s: Section, dev, adjacency=None) -> dict:
        """A section's model inputs on ``dev``: ``x``, ``y`` (if known) and the network's own."""
        torch = import_torch()
        x = (np.asarray(s.features, dtype=np.float32) if self._head is not None
             else self._x_scaler(s.features))
        out = {"x": torch.as_tensor(x, device=dev)}
        if s.expression is not None:
            out["y"] = torch.as_tensor(self._y_scaler(s.expression), device=dev)
        if adjacency is None:
            out.update(self._net.section_inputs(s.coords, dev))
        else:
            out.update(self._net.section_inputs(s.coords, dev, adjacency=adjacency))
        return out

    def _section_x(self, t: dict):
        """The network's input for one section: its features, or the head's, z-scored."""
        if self._head is None:
            return t["x"]
        from ._models import section_zscore

        return section_zscore(self._head(t["x"]))

    def _train_mode(self, on: bool) -> None:
        self._net.train(on)
        if self._head is not None:
            self._head.train(on)

    def _decode(self, x, inputs: dict, bank) -> np.ndarray:
        """Run the network (eval mode, no grad): log-normalised expression."""
        torch = import_torch()
        self._train_mode(False)
        with torch.inference_mode():
            z = self._net.decode(x, inputs, bank)
        return self._y_scaler.inverse(z.cpu().numpy())

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

    def predict(self, section: Section, *, device: str = "cpu", adjacency=None) -> np.ndarray:
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
        adjacency
            For the graph model: a given ``n_spots × n_spots`` spot graph (symmetric 0/1, no
            self loops) instead of the one built from ``section.coords``.

        Raises
        ------
        InputError
            The model is not trained, or the features have another width than expected.
        """
        torch = import_torch()
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
        inputs = self._net.section_inputs(section.coords, dev, **(
            {} if adjacency is None else {"adjacency": adjacency}))
        x = torch.as_tensor(self._x_scaler(section.features), device=dev)
        bank = None
        if self._bank is not None:
            bank = (torch.as_tensor(self._x_scaler(self._bank[0]), device=dev),
                    torch.as_tensor(self._y_scaler(self._bank[1]), device=dev))
        pred = self._decode(x, inputs, bank)
        return pred if self._axes is None else self._axes.project(pred, self.rank_)

    def predict_raw(self, section: Section) -> np.ndarray:
        """Predict a whole section from training-style features (a fine-tuned head's maps)."""
        if self.finetunes_head:
            section = Section(section.name, standardize_section(
                self.head_features(section.features)), section.coords)
        return self.predict(section)

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
            "format": FORMAT,
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
        atomic_torch_save(torch, state, Path(path))

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
        if not isinstance(state, dict) or state.get("format") != FORMAT:
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


class _Plan:
    """One fit's training plan for :class:`~spotlens.histology._trainer.Trainer`."""

    def __init__(self, model: ExpressionModel, sections: list[dict], val: dict | None,
                 val_expression: np.ndarray | None):
        torch = import_torch()
        self.model, self.sections, self.val, self.val_expression = (model, sections, val,
                                                                    val_expression)
        groups = [{"params": list(model._net.parameters()), "lr": model.config.lr}]
        if model._head is not None:
            groups.append({"params": list(model._head.parameters()),
                           "lr": model.config.head_lr})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=model.config.weight_decay)

    def train_mode(self, on: bool) -> None:
        self.model._train_mode(on)

    def loss(self):
        m = self.model
        return m._net.loss([{**t, "x": m._section_x(t)} for t in self.sections])

    def bank_x(self) -> np.ndarray:
        """The training spots' network inputs (through the head when it is fine-tuned)."""
        torch = import_torch()
        self.model._train_mode(False)
        with torch.inference_mode():
            return torch.cat([self.model._section_x(t) for t in self.sections]).cpu().numpy()

    def predict_validation(self) -> np.ndarray:
        """The validation section's predictions with the current weights (no projection)."""
        torch = import_torch()
        m = self.model
        m._train_mode(False)
        bank = None
        if m._net.uses_bank:
            with torch.inference_mode():
                bank = (torch.cat([m._section_x(s) for s in self.sections]),
                        torch.cat([s["y"] for s in self.sections]))
        with torch.inference_mode():
            x = m._section_x(self.val)
        return m._decode(x, self.val, bank)

    def validation_score(self) -> float | None:
        if self.val is None:
            return None
        return _pearson_mean(self.predict_validation(), self.val_expression)

    def weights(self, *, clone: bool = False) -> dict:
        def copy(module):
            return {k: (v.detach().clone() if clone else v) for k, v in
                    module.state_dict().items()}

        m = self.model
        return {"net": copy(m._net), "head": None if m._head is None else copy(m._head)}

    def load_weights(self, weights: dict) -> None:
        self.model._net.load_state_dict(weights["net"])
        if self.model._head is not None:
            self.model._head.load_state_dict(weights["head"])
