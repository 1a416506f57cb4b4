"""HisToGene (Pang, Su & Li, bioRxiv 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
from hest2sge.registry import register_model


@register_model("histogene")
class HisToGene(SuperResolutionMixin, SpotModel):
    """HisToGene: a ViT over all spots of a slide, each spot a linearly embedded patch.

    Pang, M., Su, K. & Li, M. Leveraging information in spatial transcriptomics to predict
    super-resolution gene expression from histology images in tumors. bioRxiv
    2021.11.28.470212 (2021). Original code: maxpmx/HisToGene.

    Takes one whole slide per step (slide mode): the patches of all its spots and their array
    coordinates ``batch["coord"] = (array_col, array_row)``. Each patch is normalised,
    flattened (3 x P x P values) and linearly embedded to ``dim``; learned x and y embeddings
    of the array coordinates are added; embedding dropout; a pre-LN transformer over the spots
    (no CLS token, no final norm); gene head LayerNorm -> Linear. Loss: MSE on
    ``log10(1 + 1e4 c / panel sum)`` (``"log_norm"``, scprep, as in the original code; the
    benchmark's Methods text describes a per-million natural-log normalisation instead).

    Paper configuration (benchmark Methods, tutorial of the original code): 224 px patches,
    dim 1024, 8 layers, 16 heads of 64, MLP 2048, dropout 0.1, Adam lr 1e-5, 100 epochs, last
    epoch, batch of one slide, no augmentation (the data module's default for this model,
    ``loader_augment = False``). Trainable parameters at 785 genes: 222.4 M, all parameters counted (Table 1:
    222 M; the 224 px patch embedding alone is 154.1 M).

    Super-resolution: ``hest2sge.predict(model, slide, resolution="half")`` (or a step in
    pixels) predicts a grid of patch centres denser than the spots
    (:mod:`hest2sge.models.layers.superres`), all sub-spots in one sequence as in the original.

    Deliberate differences from the original code:
      * Pixels are in [0, 1] and normalised (ImageNet statistics) instead of raw 0-255 values,
        and crops are the standard (not transposed) crops around each spot centre.
      * The position tables have ``n_pos=128`` rows (not 64): Visium array columns reach 127.
        A coordinate outside the table raises an error naming it (checked for every slide of
        the data module before training and in ``forward``).
      * Attention runs through ``scaled_dot_product_attention`` (same function; as in the
        original there is no dropout on the attention weights).
      * Memory: patches stay uint8 until the patch embedding, and on slides with more than
        ``checkpoint_spots`` spots the embedding runs in chunks of that many spots with
        activation checkpointing (the float, normalised, flattened patches of the whole slide
        are never held); ``checkpointing=True`` also recomputes the transformer blocks.
        Results are unchanged.
      * Super-resolution positions are the sub-spots' fractional array coordinates (affine fit
        of the spot grid) rounded to the table, so they are consistent with the spot grid; the
        original used ``pixel // ((max - min) // 30)``, a different index space. The sub-spot
        grid step defaults to half the spot pitch (the original used a fixed 56 px).
      * Targets are computed on the data module's panel (training slides only); evaluation
        follows the benchmark's patient-grouped folds instead of leave-one-section-out.

    Args:
        genes: Gene panel.
        n_genes: Number of genes when names are unknown.
        patch_size: Patch side in pixels (224 in the benchmark; 112 in the original code).
        dim: Token width.
        n_layers: Transformer blocks.
        heads: Attention heads.
        dim_head: Width per head.
        mlp_dim: Feed-forward hidden width (default ``2 * dim``).
        dropout: Dropout (embeddings, attention output, feed-forward).
        n_pos: Rows of each position table (array coordinates must be < n_pos).
        optimizer, lr, weight_decay, scheduler: Optimiser (paper: Adam, lr 1e-5, no weight
            decay, no schedule).
        checkpoint_spots: Chunk size (spots) of the checkpointed patch embedding on larger
            slides; 0 disables chunking.
        checkpointing: Activation checkpointing of the transformer blocks.
        **kwargs: Further :class:`SpotModel` arguments.
    """

    paper = "Pang, Su & Li, bioRxiv 2021 (HisToGene)"
    paper_parameters = 222e6
    input_mode = "slide"
    loader_augment = False
    needs_graph = False
    default_target_transform = {"kind": "log_norm"}
    accepts_uint8_img = True
    tiny_config = {"patch_size": 16, "dim": 32, "n_layers": 1, "heads": 2, "dim_head": 16,
                   "lr": 1e-3}

    def __init__(
        self,
        genes: Sequence[str] | None = None,
        n_genes: int | None = None,
        patch_size: int = 224,
        dim: int = 1024,
        n_layers: int = 8,
        heads: int = 16,
        dim_head: int = 64,
        mlp_dim: int | None = None,
        dropout: float = 0.1,
        n_pos: int = DEFAULT_N_POS,
        optimizer: str = "adam",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        checkpoint_spots: int = 1024,
        checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                         scheduler=scheduler, **kwargs)
        if checkpoint_spots < 0:
            raise ValueError(f"checkpoint_spots must be >= 0, got {checkpoint_spots}")
        patch_dim = 3 * self.patch_size * self.patch_size
        self.patch_embedding = nn.Linear(patch_dim, dim)
        self.position = XYEmbedding(n_pos, dim, mode="add")
        self.emb_dropout = nn.Dropout(dropout)
        self.vit = Transformer(dim, n_layers, heads, dim_head, mlp_dim or 2 * dim, dropout,
                               checkpointing=checkpointing, attn_dropout=0.0)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, self.n_genes))

    def on_datamodule(self, datamodule: Any) -> None:
        """Fail before training when a slide's array coordinates do not fit the tables."""
        check_datamodule_coordinates(datamodule, self.position.n_pos)

    def _embed(self, img: Tensor) -> Tensor:
        """Normalise, flatten and embed patches (uint8 0-255 or float in [0, 1])."""
        return self.patch_embedding(self.normalize_img(to_unit_float(img)).flatten(1))

    def embed_patches(self, img: Tensor) -> Tensor:
        """(N, 3, P, P) patches -> (N, dim) tokens, chunked on large slides."""
        p = self.patch_size
        if img.dim() != 4 or tuple(img.shape[1:]) != (3, p, p):
            raise ValueError(
                f"{type(self).__name__} expects patches of shape (N, 3, {p}, {p}), got "
                f"{tuple(img.shape)}; build the data module with patch_size={p}"
            )
        return encode_in_chunks(self._embed, img, int(self.hparams.checkpoint_spots))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        h = self.embed_patches(batch["img"]) + self.position(batch["coord"])
        h = self.vit(self.emb_dropout(h).unsqueeze(0)).squeeze(0)
        return self.gene_head(h)
