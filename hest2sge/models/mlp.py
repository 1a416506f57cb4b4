"""MLP baseline: a two-layer perceptron on frozen encoder features."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hest2sge.models.base import SpotModel
from hest2sge.models.layers.frozen import FrozenEncoder
from hest2sge.registry import register_model


@register_model("mlp")
class MLPBaseline(SpotModel):
    """Two-layer MLP (features -> hidden -> genes) on a frozen encoder.

    A strong, cheap baseline beside the published models: any timm encoder (ImageNet or a
    foundation model's local weights) stays frozen, only the head trains (Adam, MSE). Spot
    features are computed once per fit and memoised (patches are not augmented). Targets:
    ln(1 + 1e4 c / panel total) (log1p CP10k). The output bias starts at the mean training
    target.

    Args:
        genes: Gene panel. n_genes: Number of genes when names are unknown.
        backbone: timm model name of the frozen encoder (default ``"resnet50.tv_in1k"``: torchvision ImageNet weights).
        pretrained: ``True`` (hub weights), ``False`` or a local weights file.
        patch_size: Patch side in pixels.
        hidden: Hidden units.
        dropout: Dropout after the hidden layer.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        **kwargs: Further :class:`SpotModel` arguments.
    """

    paper = "MLP on frozen encoder features (hest2sge baseline)"
    input_mode = "spot"
    loader_augment = False
    default_target_transform = {"kind": "log_norm", "scale": 1e4, "base": "e",
                                "library": "panel"}
    tiny_config = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32,
                   "hidden": 16}

    def __init__(
        self,
        genes: Sequence[str] | None = None,
        n_genes: int | None = None,
        backbone: str = "resnet50.tv_in1k",
        pretrained: bool | str | os.PathLike = True,
        patch_size: int = 224,
        hidden: int = 256,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size, lr=lr,
                         weight_decay=weight_decay, **kwargs)
        if hidden < 1 or not 0 <= dropout < 1:
            raise ValueError(f"need hidden >= 1 and 0 <= dropout < 1; got {hidden}, {dropout}")
        self.encoder = FrozenEncoder(backbone, pretrained)
        self.head = nn.Sequential(nn.Linear(self.encoder.num_features, hidden), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, self.n_genes))

    def on_fit_start(self) -> None:
        self.encoder.clear()

    def on_datamodule(self, datamodule: Any) -> None:
        self.encoder.memo_enabled = not bool(getattr(datamodule, "augment", False))
        mean = getattr(datamodule, "train_target_mean", None)
        if mean is not None:
            with torch.no_grad():
                self.head[-1].bias.copy_(torch.as_tensor(mean, dtype=self.head[-1].bias.dtype))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        f = self.encoder(self.normalize_img(batch["img"]), batch.get("slide"),
                         batch.get("spot"), memo=self.training)
        return self.head(f)
