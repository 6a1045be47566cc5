"""Expression-from-image models (``nn.Module``: math only, no AnnData, no I/O).

Both take per-spot image features (``n_spots × n_features``, e.g. from a frozen encoder) and
predict standardised log expression (``n_spots × n_genes``).

- :class:`SpotAttention` — spot-interaction attention after ResSAT: features go through a
  transformation ``F``; a linear head predicts expression directly, and a non-parametric
  scaled dot-product attention ``A(Q, K, V) = softmax(Q Kᵀ / √d) V`` with ``Q = G(F(x))``,
  ``K = G(F(x_bank))`` and ``V = y_bank`` predicts it from the expression of the training spots
  that look most alike. Trained with both terms, ``MSE(y, ŷ) + MSE(y, A(G(F(x))))``.
- :class:`GraphExpression` — after HESpotEx: a graph attention autoencoder over the spot
  neighbourhood graph (image features as node features) and a GCN decoder to expression.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as fn


class SpotAttention(nn.Module):
    """Spot-interaction attention with a direct head and an attention head.

    Parameters
    ----------
    n_features
        Input features per spot.
    n_genes
        Genes predicted.
    hidden
        Width of ``F`` and of the attention space ``G``.
    dropout
        Dropout in ``F``.

    References
    ----------
    ResSAT (spot-interaction attention with a dual MSE loss; Wonderangela/ResSAT on GitHub).
    Vaswani et al., NeurIPS 2017, arXiv:1706.03762 (scaled dot-product attention).
    """

    def __init__(self, n_features: int, n_genes: int, *, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.f = nn.Sequential(
            nn.LayerNorm(n_features),
            nn.Dropout(dropout),
            nn.Linear(n_features, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.GELU(),
        )
        self.g = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_genes)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(
        self,
        x: torch.Tensor,
        bank_x: torch.Tensor,
        bank_y: torch.Tensor,
        *,
        exclude: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Direct and attention predictions.

        Parameters
        ----------
        x
            ``n_spots × n_features`` query spots.
        bank_x, bank_y
            ``n_bank × n_features`` and ``n_bank × n_genes``: the training spots the attention
            reads from.
        exclude
            ``n_spots × n_bank`` boolean mask of pairs not to attend to (a spot itself while
            training, so it cannot copy its own answer).

        Returns
        -------
        direct, attended
            ``n_spots × n_genes`` each.
        """
        h = self.f(x)
        direct = self.head(h)
        q = self.g(h)
        k = self.g(self.f(bank_x))
        scores = (q @ k.T) * self.scale
        if exclude is not None:
            scores = scores.masked_fill(exclude, float("-inf"))
        attended = torch.softmax(scores, dim=1) @ bank_y
        return direct, attended


def spot_attention_loss(y, direct, attended) -> torch.Tensor:
    """``MSE(y, ŷ) + MSE(y, A(G(F(x))))``: both terms, equally weighted."""
    return fn.mse_loss(direct, y) + fn.mse_loss(attended, y)


class GraphAttentionLayer(nn.Module):
    """One graph attention layer (single head) on an edge list.

    ``α_ij = softmax_j(LeakyReLU(aᵀ [W h_i ‖ W h_j]))`` over the neighbours ``j`` of ``i``
    (itself included), ``h_i' = Σ_j α_ij W h_j``.

    References
    ----------
    Veličković et al., "Graph attention networks", ICLR 2018, arXiv:1710.10903.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.w = nn.Linear(n_in, n_out, bias=False)
        self.a_src = nn.Parameter(torch.empty(n_out))
        self.a_dst = nn.Parameter(torch.empty(n_out))
        nn.init.normal_(self.a_src, std=0.1)
        nn.init.normal_(self.a_dst, std=0.1)

    def forward(self, h: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """``h``: ``n × n_in``; ``edges``: ``2 × n_edges`` (target, source), self loops included."""
        wh = self.w(h)
        dst, src = edges
        e = fn.leaky_relu((wh[dst] * self.a_dst).sum(1) + (wh[src] * self.a_src).sum(1), 0.2)
        top = torch.full((h.shape[0],), float("-inf"), device=h.device, dtype=e.dtype)
        top = top.scatter_reduce(0, dst, e, reduce="amax")
        weight = torch.exp(e - top[dst])
        total = torch.zeros(h.shape[0], device=h.device, dtype=e.dtype).index_add(0, dst, weight)
        alpha = weight / total[dst]
        out = torch.zeros_like(wh).index_add(0, dst, alpha[:, None] * wh[src])
        return out


class GraphExpression(nn.Module):
    """Graph attention autoencoder with a GCN decoder to expression.

    The encoder (two graph attention layers) embeds each spot from its image features and its
    neighbours'; a linear decoder reconstructs the features (autoencoder term); a two-layer
    GCN (``Â = D^-1/2 (A + I) D^-1/2``) decodes the embedding to expression.

    Parameters
    ----------
    n_features, n_genes
        Input features and genes.
    hidden, latent
        Widths of the encoder.
    dropout
        Dropout on the input features.

    References
    ----------
    HESpotEx (graph attention autoencoder + GCN decoder for expression from WSIs).
    Kipf & Welling, "Semi-supervised classification with graph convolutional networks",
    ICLR 2017, arXiv:1609.02907.
    """

    def __init__(
        self, n_features: int, n_genes: int, *, hidden: int = 256, latent: int = 64,
        dropout: float = 0.2,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(n_features)
        self.drop = nn.Dropout(dropout)
        self.gat1 = GraphAttentionLayer(n_features, hidden)
        self.gat2 = GraphAttentionLayer(hidden, latent)
        self.reconstruct = nn.Linear(latent, n_features)
        self.gcn1 = nn.Linear(latent, hidden)
        self.gcn2 = nn.Linear(hidden, n_genes)

    def forward(
        self, x: torch.Tensor, edges: torch.Tensor, a_hat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expression, reconstructed features and the (normalised) features they target.

        Parameters
        ----------
        x
            ``n_spots × n_features``.
        edges
            ``2 × n_edges`` (target, source) with self loops, for the attention layers.
        a_hat
            ``n_spots × n_spots`` sparse normalised adjacency for the GCN.

        Returns
        -------
        expression ``n_spots × n_genes``; reconstruction and target, ``n_spots × n_features``.
        """
        h0 = self.norm(x)
        z = fn.elu(self.gat1(self.drop(h0), edges))
        z = self.gat2(z, edges)
        recon = self.reconstruct(z)
        g = fn.gelu(torch.sparse.mm(a_hat, self.gcn1(z)))
        expression = torch.sparse.mm(a_hat, self.gcn2(g))
        return expression, recon, h0.detach()


def graph_loss(y, expression, features_norm, recon, *, recon_weight: float = 0.1) -> torch.Tensor:
    """Expression MSE plus ``recon_weight`` × feature-reconstruction MSE."""
    return fn.mse_loss(expression, y) + recon_weight * fn.mse_loss(recon, features_norm)
