"""Shared by the histology benchmarks: where the data is, the splits, the machine line.

A helper beside the scripts, as ``_machine.py``: ``python benchmarks/<script>.py`` puts this
folder first on ``sys.path``, so ``from _histology import ...`` needs no path patching.
Public spotlens names only.
"""

from __future__ import annotations

import os
import platform
from dataclasses import replace
from pathlib import Path

import numpy as np

from _machine import machine

HERE = Path(__file__).resolve().parent
DATA = Path(os.environ.get("SPOTLENS_DATA", HERE.parents[1] / "shared" / "data"))

#: the held-out splits of issues 4 and 15
DATASETS = {
    "her2st": {
        "dir": "her2st",
        "train": ["C2", "C3", "C4", "C5"],
        "test": ["C6", "B4"],
        "image": "{s}_HE_fullres.jpg",
        "tile_um": 100.0,  # = the spot diameter
    },
    "stutility_mob": {
        "dir": "stutility_mob",
        "train": ["MOB1", "MOB2", "MOB3"],
        "test": ["MOB4"],
        "image": "{s}_HE.jpg",
        "tile_um": None,  # one spot diameter (spot_diameter_fullres px); µm/px unknown
    },
}


def machine_line() -> str:
    """The machine, Python, torch and numpy versions, for a results file."""
    try:
        import torch

        torch_version = f"torch {torch.__version__} (CPU)"
    except ImportError:
        torch_version = "no torch"
    return (f"{machine()}; Python {platform.python_version()}, {torch_version}, "
            f"numpy {np.__version__}")


def rank_label(rank) -> str:
    """``"full"`` for no projection, else the rank."""
    return "full" if rank is None else str(rank)


def fit_network(kind, gene_list, x, coords, expr, spec, head=None, seed=0):
    """As ``train()``: early stopping on the last training section, then a refit on all."""
    from spotlens.histology import ExpressionModel, Section, TrainConfig

    cfg = TrainConfig(model=kind, dropout=0.3, seed=seed)
    if head is not None:  # the head at lr 1e-3, the model slower so the head can catch up
        cfg = replace(cfg, finetune_head=True, lr=1e-4)
    val = spec["train"][-1]
    inner = [Section(s, x[s], coords[s], expr[s]) for s in spec["train"] if s != val]
    probe = ExpressionModel(list(gene_list), cfg).fit(
        inner, validation=Section(val, x[val], coords[val], expr[val]), head=head,
        progress=False)
    return ExpressionModel(
        list(gene_list), replace(cfg, epochs=max(probe.best_epoch, 10),
                                 expression_rank=probe.rank_)
    ).fit([Section(s, x[s], coords[s], expr[s]) for s in spec["train"]], head=head,
          progress=False)
