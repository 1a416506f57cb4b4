"""hest2sge: a PyTorch Lightning model zoo and benchmark for predicting spatial gene
expression from H&E histology.

Quick start::

    import hest2sge, lightning.pytorch as pl
    slides = hest2sge.data.synthetic_slides()
    dm = hest2sge.SpotDataModule(slides, split=hest2sge.data.patient_kfold(slides, k=4, fold=0))
    model = hest2sge.load("stnet", genes=dm.genes)
    pl.Trainer(max_epochs=5, callbacks=[hest2sge.SpotMetrics()]).fit(model, dm)
    pred = hest2sge.predict(model, slides[0])

Heavy modules (torch, Lightning, AnnData) are imported on first use, so ``import hest2sge``
stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from hest2sge.registry import list_models, load, model_info, register_model

__version__ = "0.1.0.dev0"

__all__ = [
    "Hest2sgeInputError",
    "SpotDataModule",
    "SpotMetrics",
    "SpotModel",
    "__version__",
    "data",
    "evaluate",
    "from_pretrained",
    "list_models",
    "load",
    "metrics",
    "model_info",
    "models",
    "predict",
    "predict_wsi",
    "register_model",
]

_LAZY = {
    "Hest2sgeInputError": ("hest2sge.errors", "Hest2sgeInputError"),
    "SpotDataModule": ("hest2sge.data.datamodule", "SpotDataModule"),
    "SpotMetrics": ("hest2sge.metrics.callback", "SpotMetrics"),
    "SpotModel": ("hest2sge.models.base", "SpotModel"),
    "from_pretrained": ("hest2sge.models.transfer", "from_pretrained"),
    "predict": ("hest2sge.prediction", "predict"),
    "predict_wsi": ("hest2sge.translational.wsi", "predict_wsi"),
    "evaluate": ("hest2sge.benchmark.scoring", "evaluate"),
}
_SUBMODULES = {"data", "metrics", "models", "benchmark", "translational", "plotting", "cache"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"hest2sge.{name}")
    raise AttributeError(f"module 'hest2sge' has no attribute {name!r}")
