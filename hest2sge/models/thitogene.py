"""THItoGene (Jia et al., Brief Bioinform 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hest2sge.models.base import SpotModel
from hest2sge.models.layers.chunking import encode_in_chunks, to_unit_float
from hest2sge.models.layers.position import (
    DEFAULT_N_POS,
    XYEmbedding,
    check_datamodule_coordinates,
)
from hest2sge.models.layers.superres import SuperResolutionMixin
from hest2sge.models.layers.transformer import Transformer
from hest2sge.models.thitogene_capsules import EfficientCapsNet
from hest2sge.models.thitogene_gat import MultiHeadGAT
from hest2sge.models.thitogene_odconv import ODConv2d
from hest2sge.registry import register_model


@register_model("thitogene")
class THItoGene(SuperResolutionMixin, SpotModel):
    """THItoGene: dynamic convolution + capsules per spot, then a ViT and a GAT over the slide.

    Jia, Y., Liu, J., Chen, L., Zhao, T. & Wang, Y. THItoGene: a deep learning method for
    predicting spatial transcriptomics from histological images. Brief Bioinform 25, bbad464
    (2024). Original code: yrjia1015/THItoGene.

    Takes one whole slide per step (slide mode): the 112 px patches of all spots, their array
    coordinates ``batch["coord"]`` and the plain 4-nearest-neighbour graph on array
    coordinates ``batch["edge_index"]`` (``graph_k=4``, ``graph_max_dist=None``). Per spot:
    ODConv 4x4 stride 4 (3 -> 16 channels, 4 kernels) -> ReLU -> Efficient-CapsNet with
    self-attention routing (``caps`` capsules of ``route_dim``); learned x and y embeddings of
    width ``route_dim`` are concatenated as two extra capsules -> (caps + 2) * route_dim
    features (1408). Over the slide: embedding dropout and a pre-LN ViT (``n_layers``,
    ``heads[0]`` heads of 64, MLP ``2 * dim``), then a two-layer multi-head GAT (``heads[1]``
    heads of ``dim``, concatenated, -> ``gat_dim``, ELU; PyG ``GATConv``), then the gene head
    Linear(gat_dim -> dim) -> ReLU -> LayerNorm -> Linear(dim -> G).

    Paper configuration (benchmark Methods = the original's train.py for HER2+): 112 px
    patches, 20 capsules of 64, heads [16, 8], 4 transformer blocks, dropout 0.2, Adam lr 1e-5,
    batch of one slide, 200 epochs (README; train.py uses 300), no augmentation (the data
    module's default for this model, ``loader_augment = False``). Trainable parameters at 785 genes:
    63.6 M, all parameters counted (Table 1: 63.6 M).

    Loss: MSE on ``log10(1 + 1e4 c / panel sum)`` (``"log_norm"``, scprep, as in the original
    code; the benchmark's Methods text describes a library-size natural-log normalisation
    instead). The benchmark paper says "negative log-likelihood", but the original code
    trains with ``F.mse_loss``, which is the Gaussian negative log-likelihood with a fixed
    variance up to constants; we follow the code.

    Deliberate differences from the original code:
      * Pixels are in [0, 1] and normalised (ImageNet statistics) instead of raw 0-255 values,
        and crops are the standard (not transposed) crops around each spot centre.
      * Position tables have ``n_pos=128`` rows (not 64) so Visium coordinates fit; a
        coordinate outside the table raises an error naming it.
      * The GAT uses PyG ``GATConv`` (sparse, on ``edge_index``) instead of dense masked
        attention over an N x N adjacency: same function on the k-NN graph, O(E) memory. It
        uses PyG's Glorot initialisation (the original used Xavier with gain 1.414), and a spot
        without incoming edges gets zeros instead of a uniform average over all spots.
      * ODConv runs as one batched matrix product per slide instead of a ``groups=N``
        convolution (same result); the routing scale is a Python scalar (the original divided
        by a CPU tensor, which fails on some GPU setups).
      * The capsule chain adapts its primary-capsule kernel to the patch size (9 x 9 for
        112 px, the only size the original supports), so tiny test configurations can use
        smaller patches.
      * Attention runs through ``scaled_dot_product_attention`` (same function; as in the
        original there is no dropout on the attention weights).
      * Memory: patches stay uint8 until the encoder. Optional for very large slides:
        ``checkpoint_spots=k`` encodes the patches in checkpointed chunks of k spots (then
        BatchNorm uses per-chunk statistics, like mini-batches, instead of whole-slide ones;
        off by default, so the default is exact) and ``checkpointing=True`` recomputes the
        transformer blocks.
      * Super-resolution (``hest2sge.predict(model, slide, resolution="half")``) is available
        as for HisToGene (the original has none): sub-spots on a finer grid, one sequence, and
        a 4-NN graph on the sub-spots' fractional array coordinates that keeps the spot
        graph's scale (neighbours at least one lattice step away), since the GAT never sees a
        node's own features (no self loops).

    Args:
        genes: Gene panel.
        n_genes: Number of genes when names are unknown.
        patch_size: Patch side in pixels (112).
        n_layers: Transformer blocks (4 for HER2+, 8 for cSCC in the original).
        dim: Width of the MLP (``2 * dim``), GAT heads and gene-head hidden layer.
        heads: [transformer heads, GAT heads].
        caps: Number of routed capsules.
        route_dim: Width of each capsule (and of each position embedding).
        gat_dim: GAT output width.
        dim_head: Transformer width per head.
        dropout: Dropout (embeddings, transformer, GAT).
        n_pos: Rows of each position table.
        optimizer: Optimiser (paper: Adam, lr 1e-5, no weight decay, no schedule).
        lr: See ``optimizer``.
        weight_decay: See ``optimizer``.
        scheduler: See ``optimizer``.
        checkpoint_spots: Encode patches in checkpointed chunks of this many spots on larger
            slides (0: off, whole-slide BatchNorm statistics as in the original).
        checkpointing: Activation checkpointing of the transformer blocks.
        **kwargs: Further :class:`SpotModel` arguments.
    """

    paper = "Jia et al., Brief Bioinform 2024 (THItoGene)"
    paper_parameters = 63.6e6
    input_mode = "slide"
    loader_augment = False
    needs_graph = True
    graph_k = 4
    graph_max_dist = None
    default_target_transform = {"kind": "log_norm"}
    accepts_uint8_img = True
    tiny_config = {"patch_size": 48, "n_layers": 1, "dim": 16, "heads": [2, 2], "caps": 4,
                   "route_dim": 8, "gat_dim": 16, "dim_head": 8, "lr": 1e-3}

    def __init__(
        self,
        genes: Sequence[str] | None = None,
        n_genes: int | None = None,
        patch_size: int = 112,
        n_layers: int = 4,
        dim: int = 1024,
        heads: Sequence[int] = (16, 8),
        caps: int = 20,
        route_dim: int = 64,
        gat_dim: int = 512,
        dim_head: int = 64,
        dropout: float = 0.2,
        n_pos: int = DEFAULT_N_POS,
        optimizer: str = "adam",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        checkpoint_spots: int = 0,
        checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                         scheduler=scheduler, **kwargs)
        if checkpoint_spots < 0:
            raise ValueError(f"checkpoint_spots must be >= 0, got {checkpoint_spots}")
        heads = list(heads)
        if len(heads) != 2:
            raise ValueError(f"heads must be [transformer heads, GAT heads], got {heads}")
        if self.patch_size < 44:
            raise ValueError(f"THItoGene needs patches of at least 44 px, got {self.patch_size}")
        self.odconv = ODConv2d(3, 16, kernel_size=4, stride=4, kernel_num=4)
        self.capsnet = EfficientCapsNet(16, (self.patch_size - 4) // 4 + 1, caps, route_dim)
        self.position = XYEmbedding(n_pos, route_dim, mode="concat")
        token = (caps + 2) * route_dim
        self.emb_dropout = nn.Dropout(dropout)
        self.vit = Transformer(token, n_layers, heads[0], dim_head, 2 * dim, dropout,
                               checkpointing=checkpointing, attn_dropout=0.0)
        self.gat = MultiHeadGAT(token, dim, gat_dim, heads=heads[1], dropout=dropout,
                                negative_slope=0.01)
        self.gene_head = nn.Sequential(nn.Linear(gat_dim, dim), nn.ReLU(), nn.LayerNorm(dim),
                                       nn.Linear(dim, self.n_genes))

    def on_datamodule(self, datamodule: Any) -> None:
        """Fail before training when a slide's array coordinates do not fit the tables."""
        check_datamodule_coordinates(datamodule, self.position.n_pos)

    def _encode(self, img: Tensor) -> Tensor:
        x = self.odconv(self.normalize_img(to_unit_float(img)))
        return self.capsnet(torch.relu(x))

    def encode_patches(self, img: Tensor) -> Tensor:
        """(N, 3, P, P) patches (uint8, or float in [0, 1]) -> (N, caps, route_dim)."""
        p = self.patch_size
        if img.dim() != 4 or tuple(img.shape[1:]) != (3, p, p):
            raise ValueError(
                f"THItoGene expects patches of shape (N, 3, {p}, {p}), got {tuple(img.shape)}; "
                f"build the data module with patch_size={p}"
            )
        return encode_in_chunks(self._encode, img, int(self.hparams.checkpoint_spots), self)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        edge_index = batch.get("edge_index")
        if edge_index is None:
            raise ValueError("THItoGene needs the spot graph batch['edge_index'] (slide mode)")
        caps = self.encode_patches(batch["img"])
        h = torch.cat([caps.flatten(1), self.position(batch["coord"])], dim=1)
        h = self.vit(self.emb_dropout(h).unsqueeze(0)).squeeze(0)
        return self.gene_head(self.gat(h, edge_index))
