"""The benchmark: the paper's protocol (its Methods) in one call.

``hest2sge.benchmark.run(config)`` (or ``hest2sge benchmark --config <yaml>``) trains and tests
every cell of the grid models x datasets x folds, writes each cell's test predictions as a long
Parquet table, scores them with the benchmark metrics on the model's own scale and on a common
depth-normalised scale, aggregates per image -> patient -> gene (the same code as
``SpotMetrics``), ranks the models and writes a Markdown report with tables and figures.

Modules: :mod:`.config` (YAML -> cells), :mod:`.splits` (paper HER2+ split, k-fold, regions),
:mod:`.scoring` (long tables, common scale, reference rows), :mod:`.cells` (one fit + test),
:mod:`.launchers` (in-process, process pool, submitit), :mod:`.tables` (aggregation,
rankings), :mod:`.subsets` (HVG/SVG/HSG), :mod:`.efficiency`, :mod:`.report`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["dry_run", "evaluate", "load_config", "run"]

_LAZY = {
    "run": ("hest2sge.benchmark.runner", "run"),
    "dry_run": ("hest2sge.benchmark.runner", "dry_run"),
    "load_config": ("hest2sge.benchmark.config", "load_config"),
    "evaluate": ("hest2sge.benchmark.scoring", "evaluate"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hest2sge.benchmark' has no attribute {name!r}")
