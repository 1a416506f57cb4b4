"""ST-Net (He et al., Nat Biomed Eng 2020)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hest2sge.models.base import SpotModel
from hest2sge.models.layers.backbones import create_backbone
from hest2sge.registry import register_model


@register_model("stnet")
class STNet(SpotModel):
    """ST-Net: an ImageNet DenseNet-121 whose classifier is a linear layer to the genes.

    He, B. et al. Integrating spatial gene expression and breast tumour morphology via deep
    learning. Nat Biomed Eng 4, 827-834 (2020). Original code: bryanhe/ST-Net.

    Takes one 224 px patch per spot (spot mode). Paper configuration (README runs and the
    benchmark): DenseNet-121 pretrained on ImageNet, Linear(1024 -> G) with weight 0 and bias =
    mean training target, target ``ln((1 + c) / (n_all + total_all))`` (``"stnet"`` transform),
    loss summed over the batch and divided by the number of genes, SGD (momentum 0.9,
    lr 1e-6), batch 32, 50 epochs, flips and 90 degree rotations. Trainable parameters at
    785 genes: 7.76 M (Table 1: 8 M).

    Deliberate differences from the original code:
      * Images are normalised with ImageNet statistics instead of statistics estimated from
        the first training batches (the backbone's pretraining statistics; deterministic).
      * Genes come from the data module's panel computed on training slides only (the
        original picks the top 250 genes by mean over the whole dataset, test included).
      * The epoch is chosen by validation PCC (the benchmark protocol) rather than by an
        inner 4-fold CV on total squared error.
      * Test-time eight-fold symmetry averaging is optional (``tta=True``), off by default.

    Args:
        genes: Gene panel.
        n_genes: Number of genes when names are unknown.
        backbone: Any timm model name (default ``"densenet121.tv_in1k"``: the torchvision
            ImageNet weights the original used).
        pretrained: ``True`` (ImageNet from the hub, or the local Hugging Face cache),
            ``False`` or a local weights file (loaded strictly; see
            :func:`~hest2sge.models.layers.backbones.create_backbone`).
        backbone_kwargs: Further ``timm.create_model`` arguments of the backbone, e.g.
            ``{"init_values": 1e-5, "dynamic_img_size": True}`` for a UNI-style ViT.
        patch_size: Patch side in pixels.
        optimizer: ``"sgd"`` (paper), ``"adam"`` or ``"adamw"``.
        lr: Learning rate (paper: 1e-6 with SGD and ImageNet weights).
        momentum: SGD momentum.
        weight_decay: Weight decay.
        scheduler: Learning-rate schedule (paper: none).
        loss_reduction: ``"sum"`` (original: summed over the batch / n_genes) or ``"mean"``.
        tta: Average predictions over the 8 dihedral symmetries at inference.
        **kwargs: Further :class:`SpotModel` arguments.
    """

    paper = "He et al., Nat Biomed Eng 2020 (ST-Net)"
    paper_parameters = 8e6
    input_mode = "spot"
    default_target_transform = {"kind": "stnet"}
    tiny_config = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32}

    def __init__(
        self,
        genes: Sequence[str] | None = None,
        n_genes: int | None = None,
        backbone: str = "densenet121.tv_in1k",
        pretrained: bool | str | os.PathLike = True,
        backbone_kwargs: dict[str, Any] | None = None,
        patch_size: int = 224,
        optimizer: str = "sgd",
        lr: float = 1e-6,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        loss_reduction: str = "sum",
        tta: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size,
                         optimizer=optimizer, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, scheduler=scheduler, **kwargs)
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self.backbone = create_backbone(backbone, pretrained, **(backbone_kwargs or {}))
        self.head = nn.Linear(self.backbone.num_features, self.n_genes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def on_datamodule(self, datamodule: Any) -> None:
        """Original initialisation: head bias = mean transformed training target."""
        mean = getattr(datamodule, "train_target_mean", None)
        if mean is not None:
            with torch.no_grad():
                self.head.bias.copy_(torch.as_tensor(mean, dtype=self.head.bias.dtype))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        x = self.normalize_img(batch["img"])
        if self.hparams.tta and not self.training:
            views = [torch.rot90(v, r, dims=(2, 3)) for v in (x, x.flip(3)) for r in range(4)]
            return torch.stack([self.head(self.backbone(v)) for v in views]).mean(0)
        return self.head(self.backbone(x))

    def loss(self, out: Tensor, batch: dict[str, Tensor]) -> Tensor:
        se = (out - batch["expr"]) ** 2
        if self.hparams.loss_reduction == "sum":
            return se.sum() / self.n_genes
        return se.mean()
