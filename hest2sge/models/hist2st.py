"""Hist2ST (Zeng et al., Brief Bioinform 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hest2sge.models.base import SpotModel
from hest2sge.models.hist2st_zinb import ZINBHead, zinb_nll
from hest2sge.models.layers.position import XYEmbedding, check_datamodule_coordinates
from hest2sge.models.layers.transformer import Transformer
from hest2sge.registry import register_model

DISTILL_MODES = ("auto", "batched", "sequential")
CHECKPOINTING = ("auto", "none", "encoder", "views", "full")


def _batch_norm(bn: nn.BatchNorm2d, x: Tensor, groups: int, update: bool) -> Tensor:
    """BatchNorm with separate batch statistics for each of ``groups`` stacked views (the
    original runs every view alone); running statistics are updated view after view, and not
    at all when ``update`` is False (recomputation under activation checkpointing)."""
    if not bn.training:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0,
                            bn.eps)
    outs = []
    for part in x.chunk(groups) if groups > 1 else (x,):
        # throw-away copies when not updating (same saved tensors as the first forward)
        rm, rv = (bn.running_mean, bn.running_var) if update else (
            bn.running_mean.clone(), bn.running_var.clone())
        outs.append(F.batch_norm(part, rm, rv, bn.weight, bn.bias, True, bn.momentum, bn.eps))
        if update:
            bn.num_batches_tracked.add_(1)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


class MixerBlock(nn.Module):
    """ConvMixer block of Hist2ST: ``x + GELU(BN(dw(GELU(BN(dw(x))))))`` then
    ``BN(GELU(pointwise(.)))`` (depthwise kernels ``kernel_size``, padding "same")."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.dw1 = nn.Conv2d(channels, channels, kernel_size, groups=channels, padding="same")
        self.bn1 = nn.BatchNorm2d(channels)
        self.dw2 = nn.Conv2d(channels, channels, kernel_size, groups=channels, padding="same")
        self.bn2 = nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, channels, 1)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor, groups: int = 1, update: bool = True) -> Tensor:
        y = F.gelu(_batch_norm(self.bn1, self.dw1(x), groups, update))
        y = F.gelu(_batch_norm(self.bn2, self.dw2(y), groups, update))
        return _batch_norm(self.bn3, F.gelu(self.pw(x + y)), groups, update)


class ConvMixerEncoder(nn.Module):
    """Patch encoder: Conv(3 -> C, k = s = ``patch_kernel``) -> dropout -> ``depth``
    ConvMixer blocks -> Conv1x1(C -> C/8) -> flatten: ``(P // patch_kernel)^2 * C / 8``."""

    def __init__(self, channels: int, kernel_size: int, patch_kernel: int, depth: int,
                 dropout: float) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, channels, patch_kernel, stride=patch_kernel)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(MixerBlock(channels, kernel_size) for _ in range(depth))
        self.down = nn.Conv2d(channels, channels // 8, 1)

    def forward(self, x: Tensor, groups: int = 1, update: bool = True) -> Tensor:
        # channels-last: CPU depthwise-conv backward is ~30x faster than in NCHW (oneDNN)
        x = self.drop(self.embed(x.contiguous(memory_format=torch.channels_last)))
        for block in self.blocks:
            x = block(x, groups, update)
        return self.down(x).flatten(1)


def augment_views(x: Tensor, aug: dict[str, Tensor] | None = None) -> Tensor:
    """Hist2ST's distillation augmentations of (n, 3, P, P) patches in [0, 1].

    ``aug`` holds (V, S) tensors ``gray`` (bool), ``angle`` (degrees) and ``flip`` (bool), with
    S = 1 (one draw per view for all spots, as the original) or S = n (per spot). Applied in the
    original order: grayscale, rotation (nearest, black fill), horizontal flip. Returns a new
    channels-last (V * n, 3, P, P) tensor, view-major (``aug=None``: a copy of ``x``), built
    with one full-size allocation (the rest works in place on the affected patches).
    """
    v, n = (1, x.shape[0]) if aug is None else (aug["angle"].shape[0], x.shape[0])
    with torch.no_grad():
        y = torch.empty((v * n, *x.shape[1:]), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)
        y.unflatten(0, (v, n)).copy_(x.unsqueeze(0).expand(v, *x.shape))
        if aug is None:
            return y
        gray, angle, flip = (aug[k].to(x.device).expand(v, n).reshape(-1)
                             for k in ("gray", "angle", "flip"))
        idx = gray.nonzero().flatten()
        if idx.numel():
            g = y[idx]
            y[idx] = (0.2989 * g[:, :1] + 0.587 * g[:, 1:2] + 0.114 * g[:, 2:]).expand_as(g)
        idx = (angle != 0).nonzero().flatten()
        if idx.numel():
            rad = angle[idx].to(y.dtype) * (math.pi / 180)
            cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                                 torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, [idx.numel(), *y.shape[1:]], align_corners=False)
            y[idx] = F.grid_sample(y[idx], grid, mode="nearest", padding_mode="zeros",
                                   align_corners=False)
        idx = flip.nonzero().flatten()
        if idx.numel():
            y[idx] = y[idx].flip(-1)
        return y


@register_model("hist2st")
class Hist2ST(SpotModel):
    """Hist2ST: ConvMixer patch encoder, transformer over the slide, GraphSAGE and LSTM
    jumping knowledge, with ZINB and self-distillation auxiliary losses.

    Zeng, Y. et al. Spatial transcriptomics prediction from histology jointly through
    Transformer and graph neural networks. Brief Bioinform 23, bbac297 (2022). Original code:
    biomed-AI/Hist2ST.

    Takes one whole slide per batch (slide mode): patches, array coordinates
    ``coord`` = (x, y), the 4-NN graph ``edge_index`` (built from ``coord`` when absent), raw
    panel ``counts`` and ``size_factor`` (ZINB). Per spot: Conv(3 -> C, 7, stride 7) ->
    dropout -> 2 ConvMixer blocks -> Conv1x1(C -> C/8) -> flatten (dim) + x/y embeddings ->
    8 pre-LN transformer blocks over all spots (16 heads x 64, MLP width dim) -> 4 GraphSAGE
    mean layers (``h' = L2norm(ReLU(W mean_{j in N(i)} h_j))``, no self term) -> LSTM(dim,
    dim, 2 layers) over the 4 layer outputs, averaged -> LayerNorm + Linear gene head; ZINB
    heads (mean, dispersion, dropout) and a distillation weight MLP on the same embedding.
    Loss: ``MSE + 0.25 ZINB(counts; mean * size_factor) + 0.5 MSE(distilled, pred)`` where
    ``distilled`` is the per-spot softmax(coef)-weighted average of the predictions for
    ``distill_views`` augmented copies of the slide (random grayscale p 0.1, rotation
    +-90 degrees, horizontal flip p 0.2), computed in training only. Graph: each spot receives
    from its 4 nearest spots on the array grid, edges longer than 2.0 dropped ("Grid").

    Paper configuration (benchmark Methods): 224 px patches, 16 channels, so dim =
    (224 / 7)^2 * 16 / 8 = 2048 (MLP 2048); kernel 5, depths 2/8/4, 16 heads, dropout 0.2,
    5 distillation views, Adam lr 1e-5, StepLR(50 epochs, 0.9), 350 epochs, target scprep
    ``log10(1 + 1e4 c / panel total)`` (the original code; the paper's Methods text says a
    natural log with a blank scale factor). Parameters counted: all (all trainable), with the
    ZINB heads and the distillation MLP as in the original: 229.4 M at 785 genes (Table 1:
    230 M).

    Memory (``checkpointing`` levels): ``"encoder"`` recomputes the patch encoder per chunk
    of ``encoder_chunk`` spots in the backward pass (most activations at 224 px, for a few %
    of step time), ``"views"`` also recomputes each distillation view (sequential mode: only
    the views' outputs are kept), ``"full"`` also every transformer block; ``"none"`` keeps
    everything. Views run batched (one pass with a view dimension: attention, the graph and
    BatchNorm statistics never mix views) or sequentially. ``"auto"`` batches at level
    "encoder" while ``(views + 1) * spots <= max_live_spots``, else runs the views
    sequentially at level "views" ("full" above ``max_live_spots`` spots). Attention is SDPA
    without attention-weight dropout (as the original), so no N x N matrix is stored; the
    encoder runs channels-last (CPU depthwise-conv backward is ~30x faster). Measured peak
    of one training step (CPU, paper configuration, with Adam state): 8.0 GB at 300 spots,
    7.2 GB at 1,000, 17.9 GB at 4,000 (``benchmarks/slide_models.py``).

    Deliberate differences from the original code:
      * Pixels in [0, 1] normalised with ImageNet statistics (original: raw 0-255), standard
        (non-transposed) crops.
      * A spot without a neighbour within 2.0 aggregates zeros (PyG ``SAGEConv`` mean)
        instead of dividing by zero (NaN); 4-NN ties are broken by spot index (the
        original's argsort has no stable tie rule, e.g. on hexagonal Visium grids).
      * ``n_pos`` = 128 rows per position table (original 64) so Visium array columns fit;
        out-of-range coordinates raise a clear error before training.
      * Augmentations are torch ops (rotation by ``grid_sample``, nearest, black fill;
        original: torchvision on raw pixels), one draw per view for all spots as the original
        (``aug_per_spot=True``: per spot). No stop-gradient on either side of the distillation
        term, as the original (the anchor prediction receives its gradient too).
      * BatchNorm statistics per view (as running views one by one) and per encoder chunk: a
        slide above ``encoder_chunk`` spots uses per-chunk statistics (original: the whole
        slide). Recomputation never updates running statistics twice.
      * Validation/test loss is MSE + 0.25 ZINB (no distillation; the original logs MSE). The
        benchmark picks the epoch by validation PCC; the original kept the last epoch.
      * Size factors divide by the median over spots with non-zero panel counts.

    Args:
        genes: Gene panel (or its size when names are unknown).
        n_genes: See ``genes``.
        patch_size: Patch side (224), ConvMixer channels (16, a multiple of 8), depthwise kernel
            (5), patch-embedding kernel/stride (7).
        channel: See ``patch_size``.
        kernel_size: See ``patch_size``.
        patch_kernel: See ``patch_size``.
        depth1: ConvMixer blocks, transformer blocks, GraphSAGE layers.
        depth2: See ``depth1``.
        depth3: See ``depth1``.
        heads: Attention heads, width per head, dropout rate.
        dim_head: See ``heads``.
        dropout: See ``heads``.
        n_pos: Rows of the x/y position tables (array coordinates must be below it).
        zinb_weight: Loss weights (``zinb_weight=0`` drops the ZINB heads).
        distill_weight: See ``zinb_weight``.
        distill_views: Augmented views per step (0 drops distillation and its MLP).
        distill_mode: ``"auto"``, ``"batched"`` or ``"sequential"``.
        aug_per_spot: Draw augmentations per spot instead of per view.
        max_live_spots: Spot-views whose activations may be kept at once (auto choices).
        encoder_chunk: Spots per encoder chunk, and patches per encoder call.
        checkpointing: ``"auto"``, ``"none"``, ``"encoder"``, ``"views"`` or ``"full"``.
        graph_k: Neighbour graph (4, 2.0 = "Grid"; None = no pruning).
        graph_max_dist: See ``graph_k``.
        optimizer: Optimiser (paper: Adam, lr 1e-5, no weight decay).
        lr: See ``optimizer``.
        weight_decay: See ``optimizer``.
        scheduler: Paper: StepLR every 50 epochs, gamma 0.9.
        scheduler_step: See ``scheduler``.
        scheduler_gamma: See ``scheduler``.
        **kwargs: Further :class:`SpotModel` arguments.
    """

    paper = "Zeng et al., Brief Bioinform 2022 (Hist2ST)"
    paper_parameters = 230e6
    input_mode = "slide"
    loader_augment = False
    needs_counts = True
    needs_graph = True
    graph_k = 4
    graph_max_dist = 2.0
    tiny_config = {"patch_size": 16, "channel": 8, "patch_kernel": 4, "kernel_size": 3,
                   "depth1": 1, "depth2": 1, "depth3": 2, "heads": 2, "dim_head": 8,
                   "distill_views": 2}

    def __init__(
        self,
        genes: Sequence[str] | None = None,
        n_genes: int | None = None,
        patch_size: int = 224,
        channel: int = 16,
        kernel_size: int = 5,
        patch_kernel: int = 7,
        depth1: int = 2,
        depth2: int = 8,
        depth3: int = 4,
        heads: int = 16,
        dim_head: int = 64,
        dropout: float = 0.2,
        n_pos: int = 128,
        zinb_weight: float = 0.25,
        distill_weight: float = 0.5,
        distill_views: int = 5,
        distill_mode: str = "auto",
        aug_per_spot: bool = False,
        max_live_spots: int = 4096,
        encoder_chunk: int = 1024,
        checkpointing: str = "auto",
        graph_k: int = 4,
        graph_max_dist: float | None = 2.0,
        optimizer: str = "adam",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        scheduler: str | None = "step",
        scheduler_step: int = 50,
        scheduler_gamma: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                         scheduler=scheduler, scheduler_step=scheduler_step,
                         scheduler_gamma=scheduler_gamma, **kwargs)
        if channel < 8 or channel % 8:
            raise ValueError(f"channel must be a positive multiple of 8, got {channel}")
        if patch_size < patch_kernel:
            raise ValueError(f"patch_size {patch_size} is smaller than patch_kernel {patch_kernel}")
        if distill_mode not in DISTILL_MODES:
            raise ValueError(f"distill_mode must be one of {DISTILL_MODES}, got {distill_mode!r}")
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
        if distill_views < 0 or encoder_chunk < 1 or max_live_spots < 1:
            raise ValueError("distill_views must be >= 0, encoder_chunk and max_live_spots >= 1")
        self.graph_k, self.graph_max_dist = int(graph_k), graph_max_dist
        self.dim = dim = (patch_size // patch_kernel) ** 2 * (channel // 8)
        self.encoder = ConvMixerEncoder(channel, kernel_size, patch_kernel, depth1, dropout)
        self.pos = XYEmbedding(n_pos, dim, mode="add")
        self.transformer = Transformer(dim, depth2, heads, dim_head, mlp_dim=dim, dropout=dropout,
                                       attn_dropout=0.0)
        from torch_geometric.nn import SAGEConv

        self.gnn = nn.ModuleList(
            SAGEConv(dim, dim, aggr="mean", root_weight=False, bias=False) for _ in range(depth3)
        )
        for conv in self.gnn:
            nn.init.xavier_uniform_(conv.lin_l.weight)
        self.jknet = nn.LSTM(dim, dim, 2)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, self.n_genes))
        self.zinb = ZINBHead(dim, self.n_genes) if zinb_weight > 0 else None
        self.coef = (nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))
                     if distill_views > 0 else None)

    def on_datamodule(self, datamodule: Any) -> None:
        """Check every slide's array coordinates against the position tables."""
        check_datamodule_coordinates(datamodule, self.pos.n_pos)

    def draw_augmentations(self, n_spots: int,
                           generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Random distillation augmentations: (views, 1 or n_spots) tensors ``gray``,
        ``angle`` (uniform in +-90 degrees) and ``flip`` (pass ``generator`` to fix them)."""
        shape = (self.hparams.distill_views, n_spots if self.hparams.aug_per_spot else 1)
        return {"gray": torch.rand(shape, generator=generator) < 0.1,
                "angle": (torch.rand(shape, generator=generator) * 2 - 1) * 90.0,
                "flip": torch.rand(shape, generator=generator) < 0.2}

    def memory_plan(self, n_spots: int, distill: bool = True) -> dict[str, Any]:
        """How a training step on ``n_spots`` spots runs: ``views`` (augmented views),
        ``mode`` (``"batched"``/``"sequential"``) and the ``checkpointing`` level."""
        hp = self.hparams
        views = hp.distill_views if distill and self.coef is not None else 0
        live = (views + 1) * n_spots
        mode = hp.distill_mode
        if mode == "auto":
            mode = "batched" if live <= hp.max_live_spots else "sequential"
        level = hp.checkpointing
        if level == "auto":
            level = ("encoder" if live <= hp.max_live_spots
                     else "views" if n_spots <= hp.max_live_spots else "full")
        return {"views": views, "mode": mode if views else "batched", "checkpointing": level}

    def _encode(self, img: Tensor, aug: dict[str, Tensor] | None, ckpt: str,
                update: bool) -> Tensor:
        """(N, 3, P, P) patches -> (V, N, dim) tokens. Spots go in chunks of ``encoder_chunk``
        (BatchNorm statistics per chunk and view); the views of a chunk go together as far
        as ``encoder_chunk`` patches allow (same statistics in batched and sequential mode)."""
        v_all = 1 if aug is None else aug["angle"].shape[0]
        chunk, n = self.hparams.encoder_chunk, img.shape[0]
        outs = []
        for s in range(0, n, chunk):
            x, group = img[s:s + chunk], max(1, chunk // min(chunk, n - s))
            views = []
            for v0 in range(0, v_all, group):
                part = None if aug is None else {
                    k: t[v0:v0 + group, s:s + chunk] if t.shape[1] > 1 else t[v0:v0 + group]
                    for k, t in aug.items()}
                v, calls = min(group, v_all - v0), [0]

                def run(x: Tensor, part: dict | None = part, v: int = v, calls: list = calls
                        ) -> Tensor:
                    calls[0] += 1
                    x = augment_views(x, part)  # one channels-last copy, normalised in place
                    x.sub_(self.pixel_mean).div_(self.pixel_std)
                    return self.encoder(x, v, update and calls[0] == 1).view(v, -1, self.dim)

                views.append(checkpoint(run, x, use_reentrant=False) if ckpt != "none"
                             else run(x))
            outs.append(views[0] if len(views) == 1 else torch.cat(views))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 1)

    def _trunk(self, img: Tensor, coord: Tensor, edge_index: Tensor,
               aug: dict[str, Tensor] | None, ckpt: str, update: bool = True) -> Tensor:
        """Patches of one slide (under V views) -> (V, N, dim) spot embeddings."""
        x = self._encode(img, aug, ckpt, update) + self.pos(coord)
        self.transformer.checkpointing = ckpt == "full"
        v, n, _ = x.shape
        g = self.transformer(x).reshape(v * n, self.dim)
        if v > 1:  # block-diagonal graph: one copy per view
            offsets = torch.arange(v, device=g.device).repeat_interleave(edge_index.shape[1]) * n
            edge_index = edge_index.repeat(1, v) + offsets
        jk = []
        for conv in self.gnn:
            g = F.normalize(F.relu(conv(g, edge_index)), dim=-1)
            jk.append(g)
        return self.jknet(torch.stack(jk))[0].mean(0).view(v, n, self.dim)

    def _view(self, img: Tensor, coord: Tensor, edge_index: Tensor,
              aug: dict[str, Tensor] | None, ckpt: str) -> Tensor:
        """One view (sequential mode); from level "views" on only its output is kept."""
        if ckpt not in ("views", "full"):
            return self._trunk(img, coord, edge_index, aug, ckpt)[0]
        calls = [0]

        def run(img: Tensor) -> Tensor:
            calls[0] += 1
            return self._trunk(img, coord, edge_index, aug, ckpt, update=calls[0] == 1)[0]

        return checkpoint(run, img, use_reentrant=False)

    def _heads(self, h: Tensor) -> dict[str, Tensor]:
        out = {"pred": self.gene_head(h), "embedding": h}
        if self.zinb is not None:
            out["mean"], out["disp"], out["pi"] = self.zinb(h)
        return out

    def forward(self, batch: dict[str, Tensor],
                aug: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Predict all spots of one slide.

        Returns ``pred`` (N, G), ``embedding``, the ZINB ``mean``/``disp``/``pi`` and, in
        training with distillation, ``view_pred`` (V, N, G) and ``view_coef`` (V, N, 1).
        ``aug`` fixes the augmentations (see :meth:`draw_augmentations`).
        """
        img, coord, n = batch["img"], batch["coord"], batch["img"].shape[0]
        if img.dim() != 4 or img.shape[1:] != (3, self.patch_size, self.patch_size):
            raise ValueError(f"Hist2ST expects img (N, 3, {self.patch_size}, {self.patch_size}),"
                             f" got {tuple(img.shape)}")
        slide = batch.get("slide")
        if slide is not None and slide.numel() and bool((slide != slide[0]).any()):
            raise ValueError("Hist2ST is a slide-level model: a batch must hold one slide "
                             "(use input_mode='slide', one slide per batch)")
        edge_index = batch.get("edge_index")
        if edge_index is None:
            from hest2sge.data.graphs import knn_graph

            edge_index = knn_graph(coord.cpu().numpy(), k=self.graph_k,
                                   max_dist=self.graph_max_dist).to(img.device)
        elif edge_index.numel() and int(edge_index.max()) >= n:
            raise ValueError(f"edge_index refers to spot {int(edge_index.max())} of {n}")
        distill = self.training and torch.is_grad_enabled()
        plan = self.memory_plan(n, distill)
        ckpt = plan["checkpointing"] if torch.is_grad_enabled() else "none"
        if not plan["views"]:
            return self._heads(self._trunk(img, coord, edge_index, None, ckpt)[0])
        if aug is None:
            aug = self.draw_augmentations(n)
        if plan["mode"] == "batched":  # view 0 is the anchor (no augmentation)
            full = {k: torch.cat([torch.zeros_like(t[:1]), t]) for k, t in aug.items()}
            h = self._trunk(img, coord, edge_index, full, ckpt)
            out, hv = self._heads(h[0]), h[1:]
        else:
            out = self._heads(self._view(img, coord, edge_index, None, ckpt))
            hv = torch.stack([self._view(img, coord, edge_index,
                                         {k: t[i:i + 1] for k, t in aug.items()}, ckpt)
                              for i in range(plan["views"])])
        out["view_pred"], out["view_coef"] = self.gene_head(hv), self.coef(hv)
        return out

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``MSE + zinb_weight * ZINB + distill_weight * distillation`` (the last in training)."""
        hp, pred = self.hparams, out["pred"]
        terms = {"mse": F.mse_loss(pred, batch["expr"])}
        total = terms["mse"]
        if "mean" in out:
            if batch.get("counts") is None:
                raise ValueError("Hist2ST's ZINB loss needs batch['counts'] (raw panel counts) "
                                 "and batch['size_factor']; or build it with zinb_weight=0")
            terms["zinb"] = zinb_nll(batch["counts"], out["mean"], out["disp"], out["pi"],
                                     batch.get("size_factor"))
            total = total + hp.zinb_weight * terms["zinb"]
        if "view_pred" in out:
            w = torch.softmax(out["view_coef"], dim=0)
            terms["distill"] = F.mse_loss((w * out["view_pred"]).sum(0), pred)
            total = total + hp.distill_weight * terms["distill"]
        return {"loss": total, **terms}
