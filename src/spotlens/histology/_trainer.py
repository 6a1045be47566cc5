"""The one training loop of the H&E expression networks: epochs, early stopping, checkpoints.

The scvi-tools split: the ``nn.Module`` (``_models.py``) holds the maths and its ``loss``, a
*plan* (:class:`~spotlens.histology._expression.ExpressionModel` builds one per fit) says what
one full-batch step computes and how a validation section is scored, and :class:`Trainer` runs
the epochs: optimiser steps, the best validation score's weights kept (early stopping after
``patience`` epochs without improvement), and a checkpoint written atomically every 10 epochs
and at the end, from which an interrupted run resumes at the epoch it reached.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from .._backend import import_torch

logger = logging.getLogger("spotlens")

CHECKPOINT_EVERY = 10  # epochs


class TrainingPlan(Protocol):
    """What :class:`Trainer` needs from a model being trained."""

    optimizer: Any

    def train_mode(self, on: bool) -> None:
        """Switch every trained module to training (dropout on) or evaluation mode."""

    def loss(self) -> Any:
        """One full-batch training loss (a scalar tensor with a graph)."""

    def validation_score(self) -> float | None:
        """Mean per-gene Pearson r on the validation section now, or None without one."""

    def weights(self, *, clone: bool = False) -> dict:
        """The trainable state (``{"net": ..., "head": ...}``)."""

    def load_weights(self, weights: dict) -> None:
        """Set the trainable state."""


@dataclass
class TrainingState:
    """Where training stands: epochs run (``history``), the best score and its weights."""

    history: list[dict] = field(default_factory=list)
    best: float = -np.inf
    best_epoch: int = 0
    best_state: dict | None = None
    stale: int = 0


@dataclass(frozen=True)
class Trainer:
    """Full-batch training with early stopping and resumable checkpoints.

    Attributes
    ----------
    epochs
        Epochs to run in all (a resumed run counts those already run).
    patience
        With a validation section: stop after this many epochs without a better score.
    checkpoint
        File written atomically every 10 epochs and at the end (None: none).
    resume
        Continue from ``checkpoint`` when it exists.
    progress
        Show a progress bar.
    desc
        Progress bar label.
    """

    epochs: int
    patience: int
    checkpoint: Path | None = None
    resume: bool = True
    progress: bool = True
    desc: str = "spotlens"

    def fit(self, plan: TrainingPlan, state: TrainingState | None = None) -> TrainingState:
        """Train ``plan``; return the final state, with the best epoch's weights loaded.

        Per epoch: one optimiser step on :meth:`TrainingPlan.loss`; with a validation score,
        the weights of the best epoch so far are kept, and training stops ``patience`` epochs
        after the last improvement. ``history`` holds per epoch ``epoch``, ``loss`` and
        ``val_pearson`` (with validation).
        """
        torch = import_torch()
        state = state or TrainingState()
        start = 0
        if self.checkpoint is not None and self.resume and self.checkpoint.exists():
            start = self._restore(plan, state, torch)
        bar = tqdm(range(start, self.epochs), desc=self.desc, disable=not self.progress,
                   leave=False)
        try:
            for epoch in bar:
                plan.train_mode(True)
                plan.optimizer.zero_grad()
                loss = plan.loss()
                loss.backward()
                plan.optimizer.step()
                record = {"epoch": epoch + 1, "loss": float(loss.detach())}
                score = plan.validation_score()
                if score is not None:
                    record["val_pearson"] = score
                    if score > state.best:
                        state.best, state.stale, state.best_epoch = score, 0, epoch + 1
                        state.best_state = plan.weights(clone=True)
                    else:
                        state.stale += 1
                    bar.set_postfix(loss=f"{record['loss']:.3f}", val_r=f"{score:.3f}")
                state.history.append(record)
                if (epoch + 1) % CHECKPOINT_EVERY == 0:
                    self._save(plan, state, epoch + 1, torch)
                if score is not None and state.stale >= self.patience:
                    break
        finally:
            bar.close()
        if state.best_state is not None:
            plan.load_weights(state.best_state)
        self._save(plan, state, len(state.history), torch)
        return state

    def _restore(self, plan: TrainingPlan, state: TrainingState, torch) -> int:
        saved = torch.load(self.checkpoint, map_location=_device_of(plan), weights_only=False)
        # checkpoints written before the fine-tuned head held the model's weights as "net"
        plan.load_weights(saved.get("weights") or {"net": saved["net"], "head": None})
        plan.optimizer.load_state_dict(saved["optimizer"])
        state.best, state.stale = saved["best"], saved["stale"]
        state.best_state, state.history = saved["best_state"], saved["history"]
        state.best_epoch = saved.get("best_epoch", 0)
        logger.info("resumed from %s at epoch %d", self.checkpoint, saved["epoch"])
        return saved["epoch"]

    def _save(self, plan: TrainingPlan, state: TrainingState, epoch: int, torch) -> None:
        if self.checkpoint is None:
            return
        saved = {"weights": plan.weights(), "optimizer": plan.optimizer.state_dict(),
                 "epoch": epoch, "best": state.best, "stale": state.stale,
                 "best_state": state.best_state, "history": state.history,
                 "best_epoch": state.best_epoch}
        atomic_torch_save(torch, saved, self.checkpoint)


def _device_of(plan: TrainingPlan):
    group = plan.optimizer.param_groups[0]["params"]
    return group[0].device if group else "cpu"


def atomic_torch_save(torch, obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
