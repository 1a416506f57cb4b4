"""Pre-LayerNorm transformer encoder (the ViT block shared by HisToGene, Hist2ST, THItoGene
and EGN), using ``scaled_dot_product_attention`` so long spot sequences do not materialise
the full attention matrix when a fused kernel is available."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    """Multi-head self-attention: ``heads`` x ``dim_head`` inner width, qkv without bias.

    Args:
        dim: Token width.
        heads: Number of heads.
        dim_head: Width per head.
        dropout: Dropout on the attention weights and on the output projection.
        qkv_bias: Bias on the qkv projection.
        attn_dropout: Dropout on the attention weights only (default: ``dropout``). The
            HisToGene/THItoGene ViTs have none (0.0), which also lets SDPA use its fused
            kernel instead of materialising the N x N attention matrix.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0,
                 qkv_bias: bool = False, attn_dropout: float | None = None) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.dropout = dropout if attn_dropout is None else attn_dropout
        self.to_qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        project = not (heads == 1 and dim_head == dim)
        self.to_out = (nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
                       if project else nn.Identity())

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, N, dim) -> (B, N, dim). ``mask``: optional boolean (B or 1, 1, N, N),
        True where attention is allowed."""
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    """Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """``x + Attn(LN(x))`` then ``x + FFN(LN(x))``."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int,
                 dropout: float = 0.0, attn_dropout: float | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, dropout, attn_dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.ff(self.norm2(x))


class Transformer(nn.Module):
    """A stack of pre-LN blocks (no final LayerNorm, as in the HisToGene/Hist2ST code).

    Args:
        dim: Token width.
        depth: Number of blocks.
        heads: Attention heads.
        dim_head: Width per head.
        mlp_dim: Hidden width of the feed-forward layer.
        dropout: Dropout rate.
        checkpointing: Recompute each block in the backward pass (activation checkpointing),
            trading compute for memory on long spot sequences.
        attn_dropout: Dropout on the attention weights (default: ``dropout``).
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 dropout: float = 0.0, checkpointing: bool = False,
                 attn_dropout: float | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, dim_head, mlp_dim, dropout, attn_dropout=attn_dropout)
            for _ in range(depth)
        )
        self.checkpointing = checkpointing

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x
