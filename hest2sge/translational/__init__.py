"""Translational analysis: whole-slide prediction without spots (and, from other modules,
pseudobulk, image quality and survival). Names are imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "predict_wsi": "wsi",
    "tissue_mask": "wsi",
    "WSIError": "wsi",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"hest2sge.translational.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hest2sge.translational' has no attribute {name!r}")
