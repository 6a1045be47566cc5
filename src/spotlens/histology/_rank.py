"""Reduced-rank expression: predictions projected onto the training expression's leading axes.

Genes are not independent: in a tissue section most of the variation of the 250 most expressed
genes lies along a few axes (tissue compartments: tumour, stroma, immune, fat). A model
predicting each gene from image features carries noise along every other axis, which the
projection ``ŷ ← ȳ + (ŷ − ȳ) D⁻¹ V_r V_rᵀ D`` onto the top ``r`` principal axes ``V_r`` of the
z-scored training expression (``D`` = per-gene standard deviations) removes. This is
reduced-rank regression's shrinkage of the coefficient matrix to rank ``r`` (Izenman,
"Reduced-rank regression for the multivariate linear model", J. Multivariate Anal. 5, 1975,
https://doi.org/10.1016/0047-259X(75)90042-1), applied to any model's output; ``r`` is chosen
on held-out sections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .._validation import check_int

#: Ranks tried by cross-validation; ``None`` = no projection (every axis kept).
DEFAULT_RANKS: tuple[int | None, ...] = (5, 10, 20, 50, None)


def check_rank(rank, *, allow_auto: bool = True):
    """Return ``rank`` if it is ``None``, a positive integer (or ``"auto"``); else raise."""
    if rank is None or (allow_auto and rank == "auto"):
        return rank
    allowed = "a positive integer, None or 'auto'" if allow_auto else "a positive integer or None"
    check_int("expression_rank", rank, minimum=1, expected=allowed)
    return int(rank)


@dataclass(frozen=True)
class ExpressionAxes:
    """Principal axes of z-scored training expression (``n_genes``-long vectors).

    Attributes
    ----------
    mean, std
        Per-gene mean and standard deviation of the training expression (``std`` is 1 where a
        gene is constant).
    axes
        ``n_axes × n_genes`` orthonormal rows, the leading right singular vectors of the
        z-scored ``n_spots × n_genes`` training expression, strongest first.
    """

    mean: np.ndarray
    std: np.ndarray
    axes: np.ndarray

    @classmethod
    def fit(cls, expression: np.ndarray, max_rank: int | None = None) -> ExpressionAxes:
        """Axes of ``n_spots × n_genes`` expression, keeping at most ``max_rank``."""
        y = np.asarray(expression, dtype=np.float64)
        mean = y.mean(axis=0)
        std = y.std(axis=0)
        std = np.where(std > 0, std, 1.0)
        _, s, vt = np.linalg.svd((y - mean) / std, full_matrices=False)
        keep = int(np.sum(s > s[0] * 1e-10)) if s.size and s[0] > 0 else 0
        if max_rank is not None:
            keep = min(keep, int(max_rank))
        return cls(mean, std, vt[:keep])

    def project(self, pred: np.ndarray, rank: int | None) -> np.ndarray:
        """``pred`` (``n_spots × n_genes``) projected onto the top ``rank`` axes (None: as is)."""
        if rank is None or rank >= len(self.mean):
            return pred
        v = self.axes[:rank]
        z = (np.asarray(pred, dtype=np.float64) - self.mean) / self.std
        return (z @ v.T @ v) * self.std + self.mean

    def linear_map(self, rank: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(M, c)`` with ``project(pred, rank) = pred @ M + c``.

        ``M`` is ``n_genes × n_genes``, ``c`` has ``n_genes`` entries.

        Lets a linear model fold the projection into its coefficients.
        """
        g = len(self.mean)
        if rank is None or rank >= g:
            return np.eye(g), np.zeros(g)
        v = self.axes[:rank]
        m = (v.T @ v) / self.std[:, None] * self.std[None, :]
        return m, self.mean - self.mean @ m


def candidate_ranks(n_genes: int, n_spots: int,
                    ranks: Sequence[int | None] = DEFAULT_RANKS) -> list[int | None]:
    """List the ranks of ``ranks`` below ``min(n_genes, n_spots)``, then ``None`` (as is)."""
    cap = min(n_genes, n_spots)
    return [r for r in ranks if r is not None and r < cap] + [None]


def rank_label(rank: int | None) -> str:
    """``"10"`` for rank 10, ``"full"`` for no projection (table labels, config files)."""
    return "full" if rank is None else str(int(rank))
