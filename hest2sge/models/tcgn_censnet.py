"""TCGN's graph blocks: a top-k attention graph over patch tokens with edge features, a
CensNet-style GCN (Jiang et al., "CensNet: Convolution with Edge-Node Switching in Graph
Neural Networks", IJCAI 2019) on nodes and edges, and the edge/node transformer fusion.

Everything is batched tensor code (no Python loop over samples or edges, no fixed device):

* :func:`topk_edges` keeps exactly the ``k * N`` largest entries of each (N, N) head-averaged
  attention matrix (global over the matrix, as in the original ``build_graph_tensor.py``), in
  row-major order, so every sample has ``E = k * N`` directed edges (self-loops included).
* :func:`edge_features` gives per edge: the attention of each head, their mean, the spatial
  prior ``1 / (d / 3 + 1)`` on the node grid, ``1 / sqrt((|x_i - x_j|^2 + C/2) / (C/2))`` and
  ``(cos(x_i, x_j) + 1) / 2``.
* :func:`graph_operators` gives the node-edge incidence ``T`` (N, E) (2 for a self-loop, like
  the original's scipy matrix), the normalised vertex adjacency ``D^-1/2 A D^-1/2`` and the
  normalised line-graph adjacency (edges sharing an endpoint).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hest2sge.models.tcgn_cmt import CMTBlock, PatchEmbed


# ---------------------------------------------------------------------- graph construction
def topk_edges(attn: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k * N`` largest entries of each (N, N) matrix of ``attn`` (B, N, N).

    Returns:
        ``(rows, cols)``, each (B, E) with ``E = min(k * N, N * N)``, in row-major order.
    """
    b, n, n2 = attn.shape
    if n != n2:
        raise ValueError(f"attention matrices must be square, got {tuple(attn.shape)}")
    e = min(int(k) * n, n * n)
    idx = attn.reshape(b, n * n).topk(e, dim=1, sorted=False).indices.sort(dim=1).values
    return idx // n, idx % n


def spatial_prior(grid: int, device: torch.device | None = None) -> Tensor:
    """(N, N) prior ``1 / (d / 3 + 1)`` with ``d`` the Euclidean distance on a grid x grid
    lattice (node ``i`` at row ``i // grid``, column ``i % grid``)."""
    r = torch.arange(grid, device=device, dtype=torch.float32)
    yx = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
    return 1.0 / (torch.cdist(yx, yx) / 3.0 + 1.0)


def _gather_nodes(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def edge_features(x: Tensor, attn: Tensor, rows: Tensor, cols: Tensor, prior: Tensor) -> Tensor:
    """Edge features (B, E, heads + 4): per-head attention, mean attention, spatial prior,
    L2 similarity and rescaled cosine similarity of the node features ``x`` (B, N, C)."""
    b, h, n, _ = attn.shape
    c = x.shape[-1]
    if c < 2:
        raise ValueError("edge features need node features of width >= 2")
    idx = rows * n + cols
    per_head = attn.reshape(b, h, n * n).gather(2, idx.unsqueeze(1).expand(-1, h, -1))
    mean = attn.mean(1).reshape(b, n * n).gather(1, idx)
    xi, xj = _gather_nodes(x, rows), _gather_nodes(x, cols)
    scale = float(c // 2)
    l2 = torch.rsqrt(((xi - xj).pow(2).sum(-1) + scale) / scale)
    cos = (F.cosine_similarity(xi, xj, dim=-1, eps=1e-12) + 1.0) / 2.0
    feats = [per_head.transpose(1, 2), mean.unsqueeze(-1), prior.reshape(-1)[idx].unsqueeze(-1),
             l2.unsqueeze(-1), cos.unsqueeze(-1)]
    return torch.cat([f.to(x.dtype) for f in feats], -1)


def _sym_norm(a: Tensor, degree: Tensor) -> Tensor:
    d = degree.pow(-0.5)
    d = torch.where(degree > 0, d, torch.zeros_like(d))
    return d.unsqueeze(-1) * a * d.unsqueeze(-2)


class Graph(NamedTuple):
    """Operators of a batch of directed top-k graphs (see :func:`graph_operators`)."""

    t: Tensor  #: (B, N, E) incidence, 2 for a self-loop
    adj_v: Tensor  #: (B, N, N) normalised vertex adjacency
    adj_e: Tensor  #: (B, E, E) normalised line-graph adjacency


@torch.no_grad()
def graph_operators(rows: Tensor, cols: Tensor, n: int,
                    dtype: torch.dtype = torch.float32) -> Graph:
    """Incidence and normalised adjacencies of the directed edge lists (B, E).

    Returns:
        A :class:`Graph` with ``T[i, e]`` = number of endpoints of edge ``e`` at node ``i``;
        ``adj_v = D^-1/2 A D^-1/2`` with ``A`` the 0/1 edge matrix and ``D`` its row sums (a
        node without out-edges gets 0); ``adj_e = S^-1/2 L S^-1/2`` with ``L[e, f] = 1`` when
        edges ``e`` and ``f`` share an endpoint (``L[e, e] = 1``) and ``S`` the row sums of
        ``L + I``.
    """
    b, e = rows.shape
    ones = torch.ones(b, 1, e, dtype=dtype, device=rows.device)
    t = torch.zeros(b, n, e, dtype=dtype, device=rows.device)
    t.scatter_add_(1, rows.unsqueeze(1), ones).scatter_add_(1, cols.unsqueeze(1), ones)
    a = torch.zeros(b, n * n, dtype=dtype, device=rows.device)
    a.scatter_(1, rows * n + cols, 1.0)
    a = a.view(b, n, n)
    adj_v = _sym_norm(a, a.sum(-1))
    line = (t.transpose(1, 2) @ t > 0).to(dtype)
    adj_e = _sym_norm(line, line.sum(-1) + 1.0)
    return Graph(t, adj_v, adj_e)


def _offdiag_plus_eye(m: Tensor) -> Tensor:
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    return m * (1.0 - eye) + eye


# ---------------------------------------------------------------------- CensNet GCN
class CensNetConv(nn.Module):
    """One CensNet layer: a node layer (node features updated over the vertex adjacency,
    re-weighted by projected edge features ``T diag(Z p) T^T``) or an edge layer (edge features
    updated over the line graph, re-weighted by projected node features ``T^T diag(X p) T``,
    column-max normalised). The re-weighting keeps 1 on the diagonal.

    Parameter names and initialisation follow the original ``GraphConvolution``: ``weight``
    and ``bias`` uniform in ``+-1/sqrt(out)``, projection ``p`` standard normal. The layer has
    no activation (the original computes a GELU and discards it).
    """

    def __init__(self, in_v: int, out_v: int, in_e: int, out_e: int, node_layer: bool) -> None:
        super().__init__()
        self.node_layer = node_layer
        fan_in, fan_out, p_dim = (in_v, out_v, in_e) if node_layer else (in_e, out_e, in_v)
        self.weight = nn.Parameter(torch.empty(fan_in, fan_out))
        self.p = nn.Parameter(torch.randn(1, p_dim))
        self.bias = nn.Parameter(torch.empty(fan_out))
        bound = 1.0 / math.sqrt(fan_out)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hv: Tensor, he: Tensor, g: Graph) -> tuple[Tensor, Tensor]:
        if self.node_layer:
            s = (he @ self.p.t()).squeeze(-1)  # (B, E)
            m = _offdiag_plus_eye((g.t * s.unsqueeze(1)) @ g.t.transpose(1, 2))
            return (m * g.adj_v) @ (hv @ self.weight) + self.bias, he
        s = (hv @ self.p.t()).squeeze(-1)  # (B, N)
        # (an O(E^2) form via endpoint matches was slower on CPU than this batched matmul)
        a = _offdiag_plus_eye(g.t.transpose(1, 2) @ (g.t * s.unsqueeze(-1))) * g.adj_e
        a = a / a.amax(dim=1, keepdim=True)
        return hv, a @ (he @ self.weight) + self.bias


class CensNetGCN(nn.Module):
    """Node layer -> edge layer (edge width doubles) -> node layer, ReLU + dropout between."""

    def __init__(self, in_v: int, in_e: int, hidden: int, out_v: int,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.gc1 = CensNetConv(in_v, hidden, in_e, in_e, node_layer=True)
        self.gc2 = CensNetConv(hidden, hidden, in_e, 2 * in_e, node_layer=False)
        self.gc3 = CensNetConv(hidden, out_v, 2 * in_e, 2 * in_e, node_layer=True)
        self.dropout = dropout

    def forward(self, hv: Tensor, he: Tensor, g: Graph) -> tuple[Tensor, Tensor]:
        for gc in (self.gc1, self.gc2):
            hv, he = gc(hv, he, g)
            hv = F.dropout(F.relu(hv), self.dropout, self.training)
            he = F.dropout(F.relu(he), self.dropout, self.training)
        return self.gc3(hv, he, g)


# ---------------------------------------------------------------------- transformer parts
class EncoderBlock(nn.Module):
    """TCGN's pre-LN transformer block: attention without an output projection, logits scaled
    by ``1/sqrt(dim)`` (not the head width), optionally ``+1`` on the diagonal before scaling;
    dropout 0.1 on the attention weights and after each residual branch; FFN ``dim*4``."""

    def __init__(self, dim: int, heads: int, drop: float = 0.1, add_diag: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer width {dim} is not divisible by {heads} heads")
        self.heads, self.drop_p, self.add_diag = heads, drop, add_diag
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(drop),
                                 nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(
            2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1)
        if self.add_diag:
            logits = logits + torch.eye(n, dtype=x.dtype, device=x.device)
        attn = F.dropout((logits / math.sqrt(c)).softmax(-1), self.drop_p, self.training)
        x = x + self.drop((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.drop(self.ffn(self.norm2(x)))


def _node_heads(num_nodes: int) -> int:
    # The original uses 4 heads over 196 positions and 1 over 49.
    return 4 if num_nodes % 4 == 0 else 1


class ChannelAttention(nn.Module):
    """Concatenate (B, N, C1) and (B, N, C2), attend over the C1 + C2 CHANNELS as tokens (the
    N positions are the embedding, +1 on the attention diagonal) and keep the first C1."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__()
        self.transformer = EncoderBlock(num_nodes, _node_heads(num_nodes), add_diag=True)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        x = torch.cat((x1, x2), -1).transpose(1, 2)
        return self.transformer(x).transpose(1, 2)[:, :, : x1.shape[-1]]


class EdgeNodeFusion(nn.Module):
    """Pool edge features to nodes (``T @ Z / k``), a transformer over them and a CMT block over
    the node features, concatenate, channel attention over the positions, Linear -> node_dim."""

    def __init__(self, node_dim: int, edge_dim: int, heads: int, num_nodes: int) -> None:
        super().__init__()
        self.edge_transformer = EncoderBlock(edge_dim, heads)
        self.node_transformer = CMTBlock(node_dim, heads, 4.0, qkv_bias=False, sr_ratio=1,
                                         norm_eps=1e-5)
        self.channel_attention = EncoderBlock(num_nodes, _node_heads(num_nodes))
        self.linear_fusion = nn.Linear(edge_dim + node_dim, node_dim)

    def forward(self, node: Tensor, edge: Tensor, t: Tensor, k: float, hw: tuple[int, int],
                relative_pos: Tensor) -> Tensor:
        edge = self.edge_transformer(t @ edge / k)
        node = self.node_transformer(node, hw, relative_pos)
        x = torch.cat((node, edge), -1)
        x = self.channel_attention(x.transpose(1, 2)).transpose(1, 2)
        return self.linear_fusion(x)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 -> GroupNorm(1) -> 1x1 (x4) -> GELU -> 1x1, layer scale 1e-6, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, bias=False, groups=dim), nn.GroupNorm(1, dim),
            nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.gamma.view(1, -1, 1, 1) * self.block(x)


def convnext_stage(cin: int, cout: int, depth: int) -> nn.Sequential:
    """GroupNorm(1) + 2x2 stride-2 conv downsampling, then ``depth`` ConvNeXt blocks."""
    down = nn.Sequential(nn.GroupNorm(1, cin), nn.Conv2d(cin, cout, 2, stride=2))
    return nn.Sequential(down, *(ConvNeXtBlock(cout) for _ in range(depth)))


# ---------------------------------------------------------------------- the graph block
class GraphAttention(nn.Module):
    """Cross-attention graph: queries from the token branch, keys from the conv branch,
    ``softmax(q k^T / sqrt(dim) + I)`` per head; node features = Linear(conv features)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"graph width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.value_transform = nn.Linear(dim, dim)

    def forward(self, key: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        b, n, c = query.shape
        h = self.heads
        q = self.q(query).view(b, n, h, c // h).transpose(1, 2)
        k = self.k(key).view(b, key.shape[1], h, c // h).transpose(1, 2)
        logits = q @ k.transpose(-2, -1) / math.sqrt(c)
        logits = logits + torch.eye(n, dtype=logits.dtype, device=logits.device)
        return self.value_transform(key), logits.softmax(-1)


class GraphEncodingBlock(nn.Module):
    """TCGN's graph block on a (B, C, H, W) stage map -> (B, N, out_dim) node features with
    ``N = (H / patch)^2``.

    A ConvNeXt branch (``patch`` = 4: stages C->C depth 2 and C->embed depth 1; ``patch`` = 2:
    one stage C->embed depth 2) and a token branch (PatchEmbed + one CMT block with its own
    relative-position bias) meet in a cross-attention graph; the top-k graph with edge features
    feeds a 3-layer CensNet GCN; :class:`EdgeNodeFusion` merges nodes and edges.

    Args:
        in_dim: Channels of the stage map.
        embed_dim: Width of both branches and of the GCN input.
        hidden_dim: GCN hidden node width.
        out_dim: Output node width (48).
        heads: Attention heads (2).
        patch: Token patch size (4 on stage a, 2 on stage b).
        grid: Node grid side (14 at 224 px input).
        top_k: Edges per node on average; ``top_k * N`` edges are kept.
        dropout: GCN dropout.
    """

    def __init__(self, in_dim: int, embed_dim: int, hidden_dim: int, out_dim: int, heads: int,
                 patch: int, grid: int, top_k: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if patch == 4:
            self.conv = nn.Sequential(convnext_stage(in_dim, in_dim, 2),
                                      convnext_stage(in_dim, embed_dim, 1))
        elif patch == 2:
            self.conv = convnext_stage(in_dim, embed_dim, 2)
        else:
            raise ValueError(f"graph block patch size must be 2 or 4, got {patch}")
        n = grid * grid
        self.top_k, self.grid = int(top_k), grid
        self.patch_embedding = PatchEmbed(in_dim, embed_dim, patch)
        self.relative_pos = nn.Parameter(torch.randn(heads, n, n))
        self.encoder = CMTBlock(embed_dim, heads, 4.0, qkv_bias=False, sr_ratio=1, norm_eps=1e-5)
        self.attention = GraphAttention(embed_dim, heads)
        edge_dim = heads + 4
        self.gcn = CensNetGCN(embed_dim, edge_dim, hidden_dim, out_dim, dropout)
        self.fusion = EdgeNodeFusion(out_dim, 2 * edge_dim, heads, n)
        self.register_buffer("prior", spatial_prior(grid), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        conv = self.conv(x).flatten(2).transpose(1, 2)
        tokens, hw = self.patch_embedding(x)
        if hw != (self.grid, self.grid):
            raise ValueError(f"graph block built for a {self.grid}x{self.grid} node grid got a "
                             f"{hw[0]}x{hw[1]} one (input size differs from img_size)")
        tokens = self.encoder(tokens, hw, self.relative_pos)
        nodes, attn = self.attention(conv, tokens)
        with torch.no_grad():
            rows, cols = topk_edges(attn.mean(1), self.top_k)
            g = graph_operators(rows, cols, nodes.shape[1], nodes.dtype)
        edges = edge_features(nodes, attn, rows, cols, self.prior)
        hv, he = self.gcn(nodes, edges, g)
        # divide pooled edge features by the mean out-degree E / N (= top_k unless clipped)
        return self.fusion(hv, he, g.t, rows.shape[1] / nodes.shape[1], hw, self.relative_pos)
