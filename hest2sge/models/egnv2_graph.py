"""Graph exemplar bridging (EGN v2 / EGGN) for torch_geometric >= 2.5.

Imported lazily by :mod:`hest2sge.models.egnv2` (torch_geometric is slow to import).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing


def _linear(i: int, o: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(i, o, bias=bias)
    nn.init.trunc_normal_(lin.weight, std=0.02)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class GraphExemplarBridge(MessagePassing):
    """Exemplar bridging block on the bipartite exemplar -> spot relation (both sides updated).

    Exemplar features ``e`` and spot features ``w`` are projected and activated,
    ``x = LeakyReLU(Linear(e or w))``, the exemplars' expression embedding ``y`` only projected
    (``lin_src``, ``lin_dst``, ``lin_y``; no bias). Each node gets a score ``a = Linear(x)``
    (``score_dim``); each edge j -> i a gate
    ``g = sigmoid(Linear(LeakyReLU(a_j - a_i)))`` of width ``2 score_dim``, split into a gate for
    the message to the spot and one for the message back to the exemplar. A message is the
    concatenation ``[e_j, y_j, w_i]`` (or ``[w_i, e_j, y_j]`` towards the exemplar), gated with
    each gate element repeated ``3 dim / score_dim`` times, folded into 3 chunks of ``dim`` and
    averaged; messages are mean-aggregated, a bias is added and an output Linear applied.

    Args:
        dim: Feature width of spots and exemplars.
        score_dim: Width of the node scores (128 in EGN v2); ``3 * dim`` must be a multiple.
        negative_slope: LeakyReLU slope (0.2).
    """

    def __init__(self, dim: int, score_dim: int = 128, negative_slope: float = 0.2) -> None:
        super().__init__(aggr="mean", node_dim=0)
        if (3 * dim) % score_dim:
            raise ValueError(f"3 * dim ({3 * dim}) must be a multiple of score_dim ({score_dim})")
        self.dim, self.score_dim = int(dim), int(score_dim)
        self.lin_src = _linear(dim, dim, bias=False)
        self.lin_dst = _linear(dim, dim, bias=False)
        self.lin_y = _linear(dim, dim, bias=False)
        self.negative_slope = float(negative_slope)
        self.att = _linear(dim, score_dim, bias=False)
        self.score = nn.Sequential(nn.LeakyReLU(negative_slope), _linear(score_dim, 2 * score_dim))
        self.bias_src = nn.Parameter(torch.zeros(dim))
        self.bias_dst = nn.Parameter(torch.zeros(dim))
        self.out_src = _linear(dim, dim)
        self.out_dst = _linear(dim, dim)

    def forward(self, example: Tensor, window: Tensor, example_y: Tensor,
                edge_index: Tensor) -> tuple[Tensor, Tensor]:
        """Update both sides of the exemplar -> spot edges.

        Args:
            example: (M, dim) exemplar features.
            window: (N, dim) spot features.
            example_y: (M, dim) exemplar expression features.
            edge_index: (2, E) exemplar (row 0) -> spot (row 1).

        Returns:
            ``(new_example (M, dim), new_window (N, dim))``.
        """
        # the original's score MLP starts with an in-place LeakyReLU, so its messages carry the
        # activated projections too: reproduced explicitly
        xs = F.leaky_relu(self.lin_src(example), self.negative_slope)
        xd = F.leaky_relu(self.lin_dst(window), self.negative_slope)
        ys = self.lin_y(example_y)
        a_s, a_d = self.att(xs), self.att(xd)
        src, dst = edge_index[0], edge_index[1]
        gate = torch.sigmoid(self.score(a_s[src] - a_d[dst]))
        g_dst, g_src = gate.split(self.score_dim, dim=-1)
        ex = torch.cat([xs, ys], -1)
        m, n = example.shape[0], window.shape[0]
        to_win = self.propagate(edge_index, x=(ex, xd), gate=g_dst, size=(m, n))
        to_ex = self.propagate(edge_index.flip(0), x=(xd, ex), gate=g_src, size=(n, m))
        return self.out_src(to_ex + self.bias_src), self.out_dst(to_win + self.bias_dst)

    def message(self, x_j: Tensor, x_i: Tensor, gate: Tensor) -> Tensor:
        cat = torch.cat([x_j, x_i], -1)
        cat = gate.repeat_interleave(cat.shape[-1] // self.score_dim, dim=-1) * cat
        return cat.view(-1, 3, self.dim).mean(1)
