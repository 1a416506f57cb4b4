"""Efficient-CapsNet (Mazzia et al., Sci Rep 2021) with self-attention routing, as used by
THItoGene: four convolutions, depthwise primary capsules and one routing layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def squash(x: Tensor, eps: float = 1e-20) -> Tensor:
    """Efficient-CapsNet squash: ``(1 - 1 / (exp(|x|) + eps)) * x / (|x| + eps)`` over the last
    axis (lengths in [0, 1))."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return (1.0 - 1.0 / (torch.exp(n) + eps)) * (x / (n + eps))


def capsnet_map_size(in_size: int) -> int:
    """Side of the feature map entering the primary capsules for an ``in_size`` input."""
    m = in_size - 4  # conv 5x5
    m = m - 2 - 2  # two conv 3x3
    return (m - 3) // 2 + 1  # conv 3x3 stride 2


class SelfAttentionRouting(nn.Module):
    """Self-attention routing from ``n_in`` primary capsules of ``d_in`` to ``n_out`` of
    ``d_out``.

    Predictions ``u[k, j] = W[k, j] x[j]``; agreement ``c[k, j] = u[k, j] . sum_i u[k, i] /
    sqrt(d_out)``, softmax over the output capsules ``k``, plus a learned bias (added after the
    softmax, as in THItoGene's code); output ``squash(sum_j c[k, j] u[k, j])``.
    """

    def __init__(self, n_in: int = 16, d_in: int = 8, n_out: int = 20, d_out: int = 64) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(n_out, n_in, d_in, d_out))
        self.b = nn.Parameter(torch.zeros(n_out, n_in, 1))
        self.scale = 1.0 / math.sqrt(d_out)
        nn.init.kaiming_normal_(self.W)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, n_in, d_in) -> (B, n_out, d_out)."""
        u = torch.einsum("bji,kjiz->bkjz", x, self.W)  # (B, n_out, n_in, d_out)
        c = (u * u.sum(dim=2, keepdim=True)).sum(-1, keepdim=True) * self.scale
        c = torch.softmax(c, dim=1) + self.b
        return squash((u * c).sum(dim=2))


class EfficientCapsNet(nn.Module):
    """THItoGene's capsule encoder.

    Conv5x5 (in -> 32) -> Conv3x3 (64) -> Conv3x3 (64) -> Conv3x3 stride 2 (128), each with
    BatchNorm and ReLU; primary capsules = a depthwise convolution covering the whole map
    (9 x 9 for 112 px patches, whose ODConv map is 28 x 28) -> 16 capsules of 8, squashed;
    self-attention routing -> ``n_caps`` capsules of ``caps_dim``.

    Args:
        in_channels: Channels of the input map (16 after THItoGene's ODConv).
        in_size: Side of the input map (28 for 112 px patches).
        n_caps: Output capsules (20).
        caps_dim: Output capsule width (64).

    Input (B, in_channels, in_size, in_size); output (B, n_caps, caps_dim).
    """

    def __init__(self, in_channels: int = 16, in_size: int = 28, n_caps: int = 20,
                 caps_dim: int = 64) -> None:
        super().__init__()
        side = capsnet_map_size(in_size)
        if side < 1:
            raise ValueError(f"the capsule encoder needs an input map of at least 11 px, "
                             f"got {in_size}")
        layers: list[nn.Module] = []
        for cin, cout, k, s in ((in_channels, 32, 5, 1), (32, 64, 3, 1), (64, 64, 3, 1),
                                (64, 128, 3, 2)):
            conv = nn.Conv2d(cin, cout, k, stride=s)
            nn.init.kaiming_normal_(conv.weight)
            layers += [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.primary = nn.Conv2d(128, 128, side, groups=128)  # depthwise, valid: -> 1 x 1
        self.routing = SelfAttentionRouting(16, 8, n_caps, caps_dim)
        self.in_size = in_size

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_size or x.shape[-2] != self.in_size:
            raise ValueError(f"capsule encoder built for {self.in_size} px maps, got "
                             f"{tuple(x.shape[-2:])}")
        x = self.primary(self.features(x))
        return self.routing(squash(x.reshape(x.shape[0], 16, 8)))
