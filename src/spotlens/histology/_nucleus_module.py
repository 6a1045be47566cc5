"""The nucleus-level expression network (``nn.Module``: math only, no AnnData, no I/O).

:class:`NucleusExpression` maps each nucleus's features to a latent code and decodes it to a
non-negative expression vector; a spot's expression is the sum of its nuclei's
(multiple-instance learning: only spots are measured, nuclei are the instances). With cell
types (a reference and each spot's deconvolved proportions) a type head gives each nucleus a
distribution over types, trained so that the mean over a spot's nuclei matches the spot's
proportions.

Aggregation (:func:`aggregate_spots`), for nucleus ``i`` in spot ``s``::

    μ_ig = exp(W_g z_i + b_g)                      expected counts of gene g in nucleus i
    ρ_i  = exp(w_ρ z_i + b_ρ)                      expected counts of all other genes
    t_i  = Σ_g μ_ig + ρ_i                          the nucleus's total
    ŷ_sg = log1p(1e4 · Σ_{i∈s} μ_ig / Σ_{i∈s} t_i)  the spot's log1p(normalize_total(·, 1e4))

so the spot is normalised after the counts of its nuclei are added, as the measurement is.
The spot's capture efficiency cancels in ``ŷ``; the counts' overall scale is set after
training (``_nucleus_fit.py``).

References: Dietterich, Lathrop & Lozano-Pérez, Artif Intell 89, 31–71 (1997) (multiple-instance
learning); Ilse, Tomczak & Welling, ICML 2018 (deep multiple-instance learning, here with a sum
instead of attention pooling, so that nuclei add up as counts do).

References
----------
Ilse, Tomczak & Welling, "Attention-based deep multiple instance learning", ICML 2018,
arXiv:1802.04712 (bags of instances with bag-level labels). Lopez et al., "Deep generative
modeling for single-cell transcriptomics" (scVI), Nat. Methods 15, 1053 (2018) (an encoder to
a latent code and a decoder to non-negative expression).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as fn

#: the normalisation total of the targets (``normalize_total(counts, 1e4)``)
TARGET_SUM = 1e4


class NucleusExpression(nn.Module):
    """Nucleus features -> latent -> expression (and optional cell-type probabilities).

    The decoder gives log-rates: ``μ = exp(W z + b)`` (non-negative, and a nucleus's profile
    moves by ratios, as expression does); :meth:`init_rates` starts ``b`` at the training
    spots' mean profile.

    Parameters
    ----------
    n_features
        Features per nucleus (its own descriptor, and the spot context when used).
    n_genes
        Genes decoded (plus one "all other genes" output).
    hidden, latent
        Widths of the encoder's hidden layer and of the latent code.
    dropout
        Dropout on the inputs and the hidden layer (0: none).
    n_types
        Cell types of the type head; 0 = no type head.
    """

    def __init__(self, n_features: int, n_genes: int, *, hidden: int = 128, latent: int = 32,
                 dropout: float = 0.2, n_types: int = 0):
        super().__init__()
        # dropout 0: an identity (drawing masks for every nucleus took half of an epoch on CPU)
        self.encoder = nn.Sequential(
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(n_features, hidden),
            nn.GELU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(hidden, latent),
        )
        self.decoder = nn.Linear(latent, n_genes + 1)
        self.type_head = nn.Linear(latent, n_types) if n_types > 0 else None
        self.n_genes = int(n_genes)

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``n_nuclei × n_features`` -> ``μ`` (``n_nuclei × n_genes``), ``ρ`` (``n_nuclei``),
        type log-probabilities (``n_nuclei × n_types``, or None without a type head).

        ``offset``: ``n_nuclei × (n_genes + 1)`` log-rates added to the decoder's (a prior
        profile per nucleus, :meth:`init_offset`), or None.
        """
        z = self.encoder(x)
        logits = self.decoder(z)
        if offset is not None:
            logits = logits + offset
        out = torch.exp(logits.clamp(-30.0, 30.0))
        logp = None if self.type_head is None else torch.log_softmax(self.type_head(z), dim=1)
        return out[:, : self.n_genes], out[:, self.n_genes], logp

    def init_rates(self, shares: torch.Tensor) -> None:
        """Start every nucleus at the training spots' mean profile: ``b = log(shares)``.

        ``shares``: ``n_genes + 1`` mean share of each gene's counts in a spot's total and of
        all other genes (sums to 1); decoder weights start small, so the first predictions
        are that profile (as a GLM's intercept starts at the mean) and training moves away
        from it only as the spots ask.
        """
        with torch.no_grad():
            self.decoder.bias.copy_(torch.log(shares.clamp_min(1e-12)))
            self.decoder.weight.mul_(0.1)

    def init_offset(self) -> None:
        """Start every nucleus exactly at its ``offset`` (decoder weights and bias 0): with a
        prior profile per spot the untrained network predicts that profile, and training moves
        each nucleus away from it only as the spots ask."""
        with torch.no_grad():
            self.decoder.bias.zero_()
            self.decoder.weight.zero_()

    def loss(self, x, spot, n_spots, y, *, proportions=None, type_weight: float = 1.0,
             scale=None, offset=None) -> torch.Tensor:
        """Training loss on the spots: :func:`mil_loss`, plus the type term with proportions.

        Parameters
        ----------
        x
            ``n_nuclei × n_features`` of the nuclei that lie in a spot.
        spot
            ``n_nuclei`` int64 index of each nucleus's spot (``0 … n_spots-1``).
        n_spots
            Spots of the batch.
        y
            ``n_spots × n_genes`` measured ``log1p(normalize_total(counts, 1e4))``.
        proportions
            ``n_spots × n_types`` deconvolved proportions (rows sum to 1), or None.
        type_weight
            Weight of the type term.
        scale
            ``n_genes`` per-gene standard deviations of ``y`` (the loss is on z-scores, so
            every gene counts alike, as in the per-gene Pearson r); None = 1.
        offset
            ``n_nuclei × (n_genes + 1)`` prior log-rates (:meth:`forward`), or None.
        """
        mu, rest, logp = self(x, offset)
        pred = aggregate_spots(mu, rest, spot, n_spots)
        loss = mil_loss(pred, y, scale)
        if proportions is not None and logp is not None:
            loss = loss + type_weight * type_loss(logp, spot, n_spots, proportions)
        return loss


def spot_sums(values: torch.Tensor, spot: torch.Tensor, n_spots: int) -> torch.Tensor:
    """Sum ``n_nuclei × k`` (or ``n_nuclei``) values per spot: ``n_spots × k`` (``n_spots``)."""
    out = values.new_zeros((n_spots, *values.shape[1:]))
    return out.index_add(0, spot, values)


def aggregate_spots(mu: torch.Tensor, rest: torch.Tensor, spot: torch.Tensor,
                    n_spots: int) -> torch.Tensor:
    """Spot prediction ``ŷ_sg = log1p(1e4 · Σ_{i∈s} μ_ig / Σ_{i∈s} t_i)`` (module docstring).

    A spot without nuclei gets 0 (no expression predicted).
    """
    counts = spot_sums(mu, spot, n_spots)
    total = counts.sum(1) + spot_sums(rest, spot, n_spots)
    return torch.log1p(TARGET_SUM * counts / total.clamp_min(1e-12)[:, None])


def mil_loss(pred: torch.Tensor, y: torch.Tensor, scale=None) -> torch.Tensor:
    """Mean squared error of the spots' log-normalised expression, per gene on z-score units."""
    diff = pred - y
    if scale is not None:
        diff = diff / scale
    return (diff**2).mean()


def type_loss(logp: torch.Tensor, spot: torch.Tensor, n_spots: int,
              proportions: torch.Tensor) -> torch.Tensor:
    """``KL(π_s ‖ p̄_s)`` averaged over spots: ``p̄_s`` = mean type probability of its nuclei.

    ``π_s`` are the spot's deconvolved proportions (``n_spots × n_types``); spots without
    nuclei are left out.
    """
    p = logp.exp()
    counts = spot_sums(torch.ones_like(p[:, 0]), spot, n_spots)
    keep = counts > 0
    mean = spot_sums(p, spot, n_spots)[keep] / counts[keep, None]
    target = proportions[keep]
    return (target * (torch.log(target.clamp_min(1e-8)) - torch.log(mean.clamp_min(1e-8)))
            ).sum(1).mean()
