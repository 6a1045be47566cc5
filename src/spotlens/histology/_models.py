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
Each network also carries what training and prediction need from it, so the training loop
(``_trainer.py``) and :class:`~spotlens.histology._expression.ExpressionModel` never ask which
one it is: ``from_config`` (build from a :class:`~spotlens.histology.TrainConfig`),
``section_inputs`` (per-section tensors besides the features: the spot graph), ``loss`` (the
training loss over the training sections) and ``decode`` (the prediction). ``uses_bank`` says
whether predictions read the training spots; ``halo_hops`` how many graph hops a spot's
prediction depends on (for prediction by image region on a cluster).

- :class:`TileHead` — a trainable copy of the encoder's last layer (EfficientNet-Lite0's head
  convolution) per tile scale, so either model can fine-tune the image encoder end to end on
  cached last-block maps; :func:`section_zscore` standardises its output within a section.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as fn

from ._train_data import TrainConfig, graph_inputs, spot_graph


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

    #: predictions read the training spots' (features, expression): the bank
    uses_bank = True
    #: a spot's prediction depends on its own tile only
    halo_hops = 0

    @classmethod
    def from_config(cls, n_features: int, n_genes: int, config: TrainConfig) -> SpotAttention:
        """Build from the ``hidden`` and ``dropout`` of a :class:`TrainConfig`."""
        return cls(n_features, n_genes, hidden=config.hidden, dropout=config.dropout)

    def section_inputs(self, coords, device) -> dict:
        """Per-section inputs besides the features: none (spots are predicted one by one)."""
        return {}

    def loss(self, batch: list[dict]) -> torch.Tensor:
        """Training loss over sections: :func:`spot_attention_loss` of every training spot.

        ``batch`` holds per section ``x`` (``n_spots × n_features``) and ``y`` (z-scored
        expression, ``n_spots × n_genes``). All spots form the bank, and a spot never attends
        to its own section's spots: at prediction the bank holds only other sections, so
        training must not learn to copy spatial neighbours.
        """
        x = torch.cat([t["x"] for t in batch])
        y = torch.cat([t["y"] for t in batch])
        owner = torch.cat([torch.full((len(t["x"]),), i, device=x.device)
                           for i, t in enumerate(batch)])
        direct, attended = self(x, x, y, exclude=owner[:, None] == owner[None, :])
        return spot_attention_loss(y, direct, attended)

    def decode(self, x: torch.Tensor, inputs: dict, bank) -> torch.Tensor:
        """Prediction: the mean of the direct and attention heads, reading ``bank``.

        ``bank`` = ``(n_bank × n_features, n_bank × n_genes)`` training spots (z-scored).
        """
        direct, attended = self(x, *bank)
        return 0.5 * (direct + attended)

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
        # index_select, not wh[src]: the backward of advanced indexing accumulates over threads
        # in a varying order on the CPU, so two runs with one seed would differ by rounding
        # (and, through early stopping, by more); index_select's backward is index_add
        wh_dst, wh_src = torch.index_select(wh, 0, dst), torch.index_select(wh, 0, src)
        e = fn.leaky_relu((wh_dst * self.a_dst).sum(1) + (wh_src * self.a_src).sum(1), 0.2)
        top = torch.full((h.shape[0],), float("-inf"), device=h.device, dtype=e.dtype)
        top = top.scatter_reduce(0, dst, e, reduce="amax")
        weight = torch.exp(e - torch.index_select(top, 0, dst))
        total = torch.zeros(h.shape[0], device=h.device, dtype=e.dtype).index_add(0, dst, weight)
        alpha = weight / torch.index_select(total, 0, dst)
        out = torch.zeros_like(wh).index_add(0, dst, alpha[:, None] * wh_src)
        return out


class GraphExpression(nn.Module):
    """Graph attention autoencoder with a GCN decoder to expression.

    The encoder (two graph attention layers) embeds each spot from its image features and its
    neighbours'; a linear decoder reconstructs the features (autoencoder term); a two-layer
    GCN (``Â = D^-1/2 (A + I) D^-1/2``) decodes the embedding to expression, beside a linear
    skip path from the spot's own features (as GraphSAGE keeps a node's own representation
    apart from its neighbours'): expression = ``GCN(z) + W x``. Without the skip path every
    prediction is an average over 4 hops of neighbours; with it the held-out mean Pearson r
    of ``benchmarks/histology_her2st.py`` rose on most sections and gene sets (figures:
    ``benchmarks/results/docstring_figures.md``).

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
    Hamilton, Ying & Leskovec, "Inductive representation learning on large graphs" (GraphSAGE),
    NeurIPS 2017, arXiv:1706.02216.
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
        self.skip = nn.Linear(n_features, n_genes)
        self.k_neighbors = 6
        self.recon_weight = 0.1

    #: predictions read only the section's own spots
    uses_bank = False
    #: 2 graph attention + 2 GCN layers: a prediction depends on every spot within 4 hops
    halo_hops = 4

    @classmethod
    def from_config(cls, n_features: int, n_genes: int, config: TrainConfig
                    ) -> GraphExpression:
        """Build from a :class:`TrainConfig`: widths, dropout, ``k_neighbors``, ``recon_weight``."""
        net = cls(n_features, n_genes, hidden=config.hidden, latent=config.latent,
                  dropout=config.dropout)
        net.k_neighbors, net.recon_weight = int(config.k_neighbors), float(config.recon_weight)
        return net

    def section_inputs(self, coords, device, adjacency=None) -> dict:
        """The section's spot graph: ``edges`` (``2 × n_edges``) and ``a_hat`` (sparse ``Â``).

        Built on the ``k_neighbors``-nearest-neighbour graph of ``coords`` (``n_spots × 2``),
        or on a given ``n_spots × n_spots`` symmetric 0/1 ``adjacency`` without self loops.
        """
        if adjacency is None:
            adjacency = spot_graph(coords, self.k_neighbors)
        edges, a_hat = graph_inputs(adjacency, torch, device)
        return {"edges": edges, "a_hat": a_hat}

    def loss(self, batch: list[dict]) -> torch.Tensor:
        """Training loss: the mean over sections of :func:`graph_loss` on each one's graph."""
        loss = 0.0
        for t in batch:
            expression, recon, target = self(t["x"], t["edges"], t["a_hat"])
            loss = loss + graph_loss(t["y"], expression, target, recon,
                                     recon_weight=self.recon_weight)
        return loss / len(batch)

    def decode(self, x: torch.Tensor, inputs: dict, bank=None) -> torch.Tensor:
        """Prediction: the expression decoded over the section's graph (``inputs``)."""
        expression, _, _ = self(x, inputs["edges"], inputs["a_hat"])
        return expression

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
        expression = torch.sparse.mm(a_hat, self.gcn2(g)) + self.skip(self.drop(h0))
        return expression, recon, h0.detach()


def graph_loss(y, expression, features_norm, recon, *, recon_weight: float = 0.1) -> torch.Tensor:
    """Expression MSE plus ``recon_weight`` × feature-reconstruction MSE."""
    return fn.mse_loss(expression, y) + recon_weight * fn.mse_loss(recon, features_norm)


class TileHead(nn.Module):
    """Per-scale 1 × 1 head convolution, ReLU6 and spatial mean over pooled last-block maps.

    Initialised from the pretrained head (batch norm folded in), one copy per tile scale, so
    before training it reproduces the encoder's own features (up to the pooling of the
    last-block map) and training moves it only as far as the expression asks.

    Parameters
    ----------
    weight, bias
        Pretrained ``dim × channels`` weight and ``dim`` bias
        (:func:`~spotlens.histology._head.pre_head_encoder`).
    n_scales
        Tile scales side by side in the input.
    cells
        Spatial cells per tile map.

    References
    ----------
    Yosinski et al., "How transferable are features in deep neural networks?", NeurIPS 2014,
    arXiv:1411.1792 (ImageNet features' last layers are the least transferable, the ones to
    fine-tune). Tan & Le, "EfficientNet", ICML 2019, arXiv:1905.11946.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, *, n_scales: int, cells: int):
        super().__init__()
        weight = torch.as_tensor(weight, dtype=torch.float32)
        bias = torch.as_tensor(bias, dtype=torch.float32)
        self.n_scales, self.cells = int(n_scales), int(cells)
        self.channels, self.dim = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.repeat(self.n_scales, 1, 1).clone())
        self.bias = nn.Parameter(bias.repeat(self.n_scales, 1).clone())

    @property
    def n_in(self) -> int:
        """Input features per spot: ``n_scales · channels · cells``."""
        return self.n_scales * self.channels * self.cells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``n_spots × (n_scales · channels · cells)`` maps -> ``n_spots × (n_scales · dim)``."""
        maps = x.reshape(len(x), self.n_scales, self.channels, self.cells)
        h = torch.einsum("nscp,sdc->nsdp", maps, self.weight) + self.bias[None, :, :, None]
        return torch.clamp(h, 0.0, 6.0).mean(3).reshape(len(x), -1)


def section_zscore(h: torch.Tensor) -> torch.Tensor:
    """Z-score every column over the rows (the spots of one section), differentiably.

    The torch twin of :func:`~spotlens.histology._normalize.standardize_section` (population
    standard deviation; a column constant in the section becomes 0), used inside a model whose
    features are trained, so training and prediction scale features the same way.
    """
    mean = h.mean(0)
    sd = h.std(0, unbiased=False)
    ok = sd > 1e-6 * (mean.abs() + 1e-12)
    return (h - mean) / torch.where(ok, sd, torch.ones_like(sd)) * ok
