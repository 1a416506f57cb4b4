"""A frozen image encoder for the feature baselines (ridge, mlp).

The encoder (any timm model, or a local weights file) stays in eval mode without gradients.
Features of training spots are memoised per (slide, spot) within a fit, so the MLP computes
each spot's features once rather than once per epoch (valid because the baselines train on
un-augmented patches; augmentation switches the memo off).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from hest2sge.models.layers.backbones import create_backbone


class FrozenEncoder(nn.Module):
    """A timm backbone used as a fixed feature extractor.

    Args:
        name: timm model name.
        pretrained: ``True`` (hub weights), ``False`` or a local weights file.
    """

    def __init__(self, name: str, pretrained: bool | str | os.PathLike) -> None:
        super().__init__()
        self.net = create_backbone(name, pretrained)
        self.net.requires_grad_(False)
        self.net.eval()
        self.num_features = int(self.net.num_features)
        self._memo: dict[int, Tensor] = {}
        self.memo_enabled = True

    def train(self, mode: bool = True) -> FrozenEncoder:
        # The encoder is never put in training mode (batch-norm statistics stay fixed).
        super().train(False)
        return self

    def clear(self) -> None:
        """Forget memoised features (a new fit)."""
        self._memo = {}

    @torch.no_grad()
    def forward(self, img: Tensor, slide: Tensor | None = None, spot: Tensor | None = None,
                memo: bool = False) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, D) features (memoised when ``memo``)."""
        if not (memo and self.memo_enabled and slide is not None and spot is not None
                and bool((slide >= 0).all())):
            return self.net(img).float()
        keys = (slide.long() * (1 << 32) + spot.long()).tolist()
        missing = [i for i, k in enumerate(keys) if k not in self._memo]
        if missing:
            feats = self.net(img[missing]).float()
            for i, f in zip(missing, feats):
                self._memo[keys[i]] = f.detach()
        return torch.stack([self._memo[k] for k in keys]).to(img.device)
