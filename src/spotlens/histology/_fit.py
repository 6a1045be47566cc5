"""The held-out protocols that fit a predictor on training sections (used by ``_registry.py``).

``data[name]`` holds each section's ``features`` (``n_spots × n_features``, standardised),
``coords`` (``n_spots × 2`` px) and ``y`` (``n_spots × n_genes`` log-normalised expression).

- Networks (:func:`fit_network`): early stopping on the last training section (training on
  the others), then a refit on all sections for the best number of epochs (at least 10) and
  the projection rank chosen on that section. Checkpoints in the model folder let an
  interrupted run resume; ``checkpoint.json`` ties them to the run's fingerprint.
- Ridge (:func:`fit_ridge`): alpha and then the projection rank by leave-one-section-out
  cross-validation.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

from .._validation import InputError
from ._folder import FINAL_CHECKPOINT, PROBE_CHECKPOINT, SIDECAR_FILE, CheckpointSidecar
from ._rank import DEFAULT_RANKS, rank_label

logger = logging.getLogger("spotlens")

MIN_REFIT_EPOCHS = 10


def fit_network(names: list[str], data: dict, genes: list[str], config, folder: Path | None,
                *, fingerprint: str, device: str = "cpu", resume: bool = True,
                progress: bool = True, head: dict | None = None):
    """Early-stopping probe on the last section, then a refit on all sections.

    Returns
    -------
    The refitted :class:`~spotlens.histology.ExpressionModel`; the validation record
    (``section``, ``mean_pearson``, ``mse``, ``best_epoch``, ``epochs_run``, ``n_spots``,
    ``expression_rank``, ``rank_scores``, ``val_pearson_history``; None with one section);
    and the refit's :class:`~spotlens.histology.TrainConfig` as a dict.

    Raises
    ------
    InputError
        If ``folder`` holds checkpoints of another run and ``resume`` is True.
    """
    from ._expression import ExpressionModel
    from ._metrics import evaluate as score
    from ._train_data import Section

    def section(n):
        d = data[n]
        return Section(n, d["features"], d["coords"], d["y"])

    probe_ckpt, final_ckpt, sidecar = _checkpoints(folder, fingerprint, resume)
    validation, epochs = None, config.epochs
    if len(names) >= 2:
        val = names[-1]
        logger.info("training (%s) on %s, early stopping on %s", config.model,
                    ", ".join(names[:-1]), val)
        probe = ExpressionModel(list(genes), config).fit(
            [section(n) for n in names[:-1]], validation=section(val), head=head,
            device=device, checkpoint=probe_ckpt, resume=True, progress=progress)
        epochs = max(probe.best_epoch, MIN_REFIT_EPOCHS)
        res = score(probe.predict_raw(section(val)), data[val]["y"], genes)
        history = [h["val_pearson"] for h in probe.history if "val_pearson" in h]
        validation = {"section": val, "mean_pearson": res["mean_pearson"], "mse": res["mse"],
                      "best_epoch": probe.best_epoch, "epochs_run": len(probe.history),
                      "n_spots": res["n_spots"], "expression_rank": rank_label(probe.rank_),
                      "rank_scores": probe.rank_scores,
                      "val_pearson_history": [round(float(s), 5) for s in history]}
        if config.expression_rank == "auto":
            config = replace(config, expression_rank=probe.rank_)
        logger.info("validation on %s: mean Pearson r %.3f at epoch %d of %d", val,
                    res["mean_pearson"], probe.best_epoch, len(probe.history))
    if sidecar is not None:
        if sidecar.final_epochs != epochs and final_ckpt is not None:
            final_ckpt.unlink(missing_ok=True)
        CheckpointSidecar(sidecar.fingerprint, epochs).write(folder)
    logger.info("refitting on all %d sections for %d epochs", len(names), epochs)
    final_cfg = replace(config, epochs=int(epochs))
    final = ExpressionModel(list(genes), final_cfg).fit(
        [section(n) for n in names], head=head, device=device, checkpoint=final_ckpt,
        resume=True, progress=progress)
    return final, validation, asdict(final_cfg)


def _checkpoints(folder: Path | None, fingerprint: str, resume: bool):
    """The probe's and the refit's checkpoint files, and the run's sidecar (None: no folder)."""
    if folder is None:
        return None, None, None
    folder = Path(folder)
    probe, final = folder / PROBE_CHECKPOINT, folder / FINAL_CHECKPOINT
    sidecar = CheckpointSidecar.read(folder) if resume else None
    if resume and probe.exists() and (sidecar is None or sidecar.fingerprint != fingerprint):
        raise InputError(
            f"{folder} holds a checkpoint of a different training run (other sections, genes, "
            "encoder, tiles or settings). Pass another output folder, or --no-resume "
            "(resume=False) to start over there."
        )
    if not resume:
        for path in (probe, final, folder / SIDECAR_FILE):
            path.unlink(missing_ok=True)
    sidecar = CheckpointSidecar(fingerprint, None if sidecar is None else sidecar.final_epochs)
    sidecar.write(folder)
    return probe, final, sidecar


def fit_ridge(names: list[str], data: dict):
    """Leave-one-section-out ridge (penalty, then projection rank); return it and its record.

    The record: ``section`` (``"leave-one-section-out"``), ``alpha``, ``expression_rank``,
    ``mean_pearson`` and ``per_section`` at the chosen rank, ``rank_scores`` (rank label ->
    mean Pearson r).
    """
    from ._baseline import RidgeBaseline

    logger.info("fitting the ridge baseline on %s", ", ".join(names))
    ridge = RidgeBaseline(ranks=DEFAULT_RANKS).fit({n: data[n]["features"] for n in names},
                                                   {n: data[n]["y"] for n in names})
    cv = ridge.rank_scores_.loc[rank_label(ridge.rank_)]
    validation = {"section": "leave-one-section-out", "alpha": ridge.alpha_,
                  "expression_rank": rank_label(ridge.rank_),
                  "mean_pearson": float(cv.mean()),
                  "per_section": {k: float(v) for k, v in cv.items()},
                  "rank_scores": {k: float(v) for k, v in
                                  ridge.rank_scores_.mean(axis=1).items()}}
    logger.info("ridge: alpha %.3g, expression rank %s, cross-validated mean Pearson r %.3f",
                ridge.alpha_, rank_label(ridge.rank_), cv.mean())
    return ridge, validation
