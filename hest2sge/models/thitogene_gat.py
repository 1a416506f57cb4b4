"""Two-layer multi-head graph attention network (GAT; Velickovic et al. 2018) on the spot graph,
built from PyTorch Geometric's ``GATConv`` (THItoGene's GAT module).

Messages flow along ``edge_index`` (row 0 source, row 1 target: each spot attends over the
spots that point to it, i.e. its k nearest neighbours in hest2sge's ``knn_graph``); no self
loops are added, as in THItoGene's masked dense attention.
"""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadGAT(nn.Module):
    """dropout -> GAT (``heads`` x ``hidden``, concatenated) -> ELU -> dropout -> GAT
    (``out``, one head) -> ELU.

    Args:
        in_dim: Input node width.
        hidden: Width per head of the first layer.
        out: Output width.
        heads: Heads of the first layer.
        dropout: Dropout on the node features and on the attention coefficients.
        negative_slope: LeakyReLU slope of the attention logits.
        add_self_loops: Let a node attend to itself (False in THItoGene).
    """

    def __init__(self, in_dim: int, hidden: int = 1024, out: int = 512, heads: int = 8,
                 dropout: float = 0.2, negative_slope: float = 0.01,
                 add_self_loops: bool = False) -> None:
        super().__init__()
        with warnings.catch_warnings():  # PyG's import emits torch.jit deprecation warnings
            warnings.simplefilter("ignore", FutureWarning)
            from torch_geometric.nn import GATConv

        self.dropout = dropout
        common = {"negative_slope": negative_slope, "dropout": dropout,
                  "add_self_loops": add_self_loops, "bias": False}
        self.conv1 = GATConv(in_dim, hidden, heads=heads, concat=True, **common)
        self.conv2 = GATConv(hidden * heads, out, heads=1, concat=False, **common)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        """x (N, in_dim), edge_index (2, E) -> (N, out)."""
        x = F.dropout(x, self.dropout, training=self.training)
        x = F.elu(self.conv1(x, edge_index))
        x = F.dropout(x, self.dropout, training=self.training)
        return F.elu(self.conv2(x, edge_index))
