"""CNN/ViT feature extractors from timm, with ImageNet weights from the hub or a local file."""

from __future__ import annotations

import os

import torch
from torch import nn


def create_backbone(name: str, pretrained: bool | str | os.PathLike = False) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``: pooled features).

    Args:
        name: Any timm model name (``"densenet121"``, ``"resnet50"``, ``"vgg16"`` ...).
        pretrained: ``False`` (random init), ``True`` (download ImageNet weights from the
            timm/Hugging Face hub; needs the network) or the path of a local weights file
            (a state dict in timm or torchvision naming, read with ``weights_only=True``).

    Returns:
        The backbone; ``backbone.num_features`` is its output width.
    """
    import timm

    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        model = timm.create_model(name, pretrained=False, num_classes=0)
        load_weights(model, pretrained)
        return model
    try:
        return timm.create_model(name, pretrained=bool(pretrained), num_classes=0)
    except RuntimeError as e:
        if "not found" in str(e).lower() or "unknown model" in str(e).lower():
            close = timm.list_models(f"*{name[:5]}*")[:5]
            raise ValueError(f"unknown timm backbone {name!r}; similar: {close}") from None
        raise


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state dict into a timm backbone, ignoring classifier weights.

    Keys of torchvision checkpoints (``features.``/``fc.``/``classifier.`` prefixes, a
    ``module.`` DDP prefix, a ``state_dict`` wrapper) are accepted where timm uses the same
    names; any missing trunk weight is an error naming the keys.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in sd]
    if missing:
        raise ValueError(
            f"{path} does not fit this backbone: {len(missing)} weight(s) missing or of a "
            f"different shape, e.g. {missing[:5]}"
        )
    model.load_state_dict(sd, strict=True)
