"""Benchmark metrics: per-gene functions (:mod:`.functional`) and torchmetrics wrappers.

The definitions reproduce the benchmark's R code (SydneyBioX/HEtoSGEBench ``benchmarkUtils.R``);
see each function's docstring. The ``Spot*`` classes live in :mod:`.modules` and are imported on
first access, because ``import torchmetrics`` alone takes seconds (it pulls in scipy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hest2sge.metrics import functional
from hest2sge.metrics.functional import AUC_CUTOFFS, spot_metrics

if TYPE_CHECKING:
    from hest2sge.metrics.modules import (
        SpotAUC,
        SpotJSDivergence,
        SpotMI,
        SpotNRMSE,
        SpotPCC,
        SpotRMSE,
        SpotSpearman,
        SpotSSIM,
    )

_LAZY = {
    "SpotAUC": "hest2sge.metrics.modules",
    "SpotJSDivergence": "hest2sge.metrics.modules",
    "SpotMI": "hest2sge.metrics.modules",
    "SpotNRMSE": "hest2sge.metrics.modules",
    "SpotPCC": "hest2sge.metrics.modules",
    "SpotRMSE": "hest2sge.metrics.modules",
    "SpotSSIM": "hest2sge.metrics.modules",
    "SpotSpearman": "hest2sge.metrics.modules",
    "SpotMetrics": "hest2sge.metrics.callback",
    "evaluate_predictions": "hest2sge.metrics.callback",
    "summarise": "hest2sge.metrics.callback",
}

__all__ = [
    "AUC_CUTOFFS",
    "SpotAUC",
    "SpotJSDivergence",
    "SpotMI",
    "SpotMetrics",
    "SpotNRMSE",
    "SpotPCC",
    "SpotRMSE",
    "SpotSSIM",
    "SpotSpearman",
    "evaluate_predictions",
    "functional",
    "spot_metrics",
    "summarise",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hest2sge.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
