"""Class-specific residual attention (CSRA) pooling, as used by the EGN prediction heads.

Zhu & Wu, "Residual Attention: A Simple but Effective Method for Multi-Label Recognition",
ICCV 2021. EGN v1 pools its ViT tokens with it; EGN v2 pools each spot's exemplars with a
per-channel softmax over the graph edges.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CSRA(nn.Module):
    """Token pooling: ``mean_t(s) + lam * sum_t s * softmax_t(T * s)`` with ``s = Linear(x)``.

    Args:
        dim: Token width (also the output width).
        temperature: ``T`` of the softmax over tokens (EGN: 0.1).
        lam: Weight of the attention term (EGN: 0.5).
    """

    def __init__(self, dim: int, temperature: float = 0.1, lam: float = 0.5) -> None:
        super().__init__()
        self.temperature, self.lam = float(temperature), float(lam)
        self.head = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, dim) -> (B, dim)."""
        score = self.head(x)
        attn = torch.softmax(score * self.temperature, dim=1)
        return score.mean(1) + self.lam * (score * attn).sum(1)


class GraphCSRA(nn.Module):
    """Exemplar pooling of EGN v2: each spot attends, channel by channel, to its exemplars.

    ``w' = Linear(w)``; for an edge exemplar j -> spot i the per-channel logit is
    ``T * (e_j - w'_i)``, normalised by a softmax over the edges entering ``i``; the output is
    ``w'_i + lam * sum_j alpha_ij * e_j`` with ``lam`` learnable (initial value 0.1). A spot
    without exemplars keeps ``w'_i``.

    Args:
        dim: Feature width of spots and exemplars.
        temperature: Softmax temperature ``T`` (0.1).
        lam: Initial value of the learnable weight.
    """

    def __init__(self, dim: int, temperature: float = 0.1, lam: float = 0.1) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.head = nn.Linear(dim, dim)
        self.lam = nn.Parameter(torch.full((1,), float(lam)))

    def forward(self, window: Tensor, example: Tensor, edge_index: Tensor) -> Tensor:
        """window (N, dim), example (M, dim), edge_index (2, E) exemplar -> spot: (N, dim)."""
        from torch_geometric.utils import scatter, softmax

        w = self.head(window)
        src, dst = edge_index[0], edge_index[1]
        if src.numel() == 0:
            return w
        ex = example[src]
        alpha = softmax((ex - w[dst]) * self.temperature, dst, num_nodes=w.shape[0])
        pooled = scatter(ex * alpha, dst, dim=0, dim_size=w.shape[0], reduce="sum")
        return w + self.lam * pooled
