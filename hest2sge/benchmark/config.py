"""Benchmark configuration: a YAML file (or dict) -> validated settings and the cell grid.

Keys (``benchmarks/configs/*.yaml`` are complete examples)::

    name: smoke                    # used for the default output folder
    output: benchmark_output/smoke # relative to the working directory (input paths such as
                                   # root/file are relative to the config file)
    seed: 0
    models: [stnet, histogene]     # or {name: stnet, overrides: {...}} entries
    baselines: true                # add the ridge and mlp baselines (default true)
    tiny: false                    # tiny model configurations (tests, smoke runs only)
    epochs: null                   # override of the paper epochs (null: each model's record)
    aggregation: paper             # paper (image -> patient -> gene) | pooled (HEST-Benchmark)
    subsets: true                  # HVG / SVG / HSG analysis
    accelerator: auto
    cache_dir: null                # patch cache
    threads: null                  # torch threads per cell (null: torch's default)
    datasets:
      her2st: {slides: {reader: her2st, root: ...}, split: her2st_paper,
               genes: {file: panels/her2st_785.txt}}
    cross_study: [{train: her2st, fold: 0, test: visium_her2}]
    launcher: {kind: local}        # local | pool (workers: 2) | submitit (executor: slurm|local)
    efficiency: {profile: path/to/efficiency.json}   # for --dry-run cost estimates

Relative paths are resolved against the config file's folder; ``$VARS`` and ``~`` expand.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASELINES = ("ridge", "mlp")
_KEYS = {"name", "output", "seed", "models", "baselines", "tiny", "epochs", "aggregation",
         "subsets", "accelerator", "devices", "cache_dir", "datasets", "cross_study",
         "launcher", "efficiency", "batch_size", "num_workers", "description", "trainer",
         "threads"}
_PATH_KEYS = {"root", "path", "file", "profile", "cache_dir", "output", "folder"}


@dataclass(frozen=True)
class CellSpec:
    """One cell of the grid: a model trained on one fold of a dataset and tested on its test
    slides (or, for cross-study cells, on all slides of another dataset)."""

    model: str
    dataset: str
    fold: int
    test_dataset: str | None = None
    overrides: tuple = field(default_factory=tuple)

    @property
    def cell_id(self) -> str:
        cid = f"{self.dataset}__{self.model}__fold{self.fold}"
        return cid if self.test_dataset is None else f"{cid}__to__{self.test_dataset}"


def _resolve(value: Any, base: Path, key: str | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, base, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, base, key) for v in value]
    if isinstance(value, str) and key in _PATH_KEYS:
        p = Path(os.path.expanduser(os.path.expandvars(value)))
        # Outputs go where the command runs; inputs are found beside the config file.
        anchor = Path.cwd() if key in ("output", "cache_dir") else base
        return str(p if p.is_absolute() else (anchor / p).resolve())
    return value


def load_config(config: Any) -> dict[str, Any]:
    """Read and validate a benchmark configuration.

    Args:
        config: Path of a YAML file, or a dict with the keys of the module docstring.

    Returns:
        A new dict with defaults filled in, paths resolved and ``models`` normalised to
        ``[{"name": ..., "overrides": {...}}]``.

    Raises:
        FileNotFoundError, ValueError, KeyError: naming the key or model that is wrong.
    """
    base = Path.cwd()
    source = None
    if isinstance(config, (str, os.PathLike)):
        import yaml

        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"benchmark config not found: {path}")
        with open(path) as fh:
            cfg = yaml.safe_load(fh)
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} must hold a mapping of benchmark settings")
        base, source = path.resolve().parent, str(path.resolve())
    elif isinstance(config, dict):
        cfg = copy.deepcopy(config)
        if "_source" in cfg:
            source = cfg.pop("_source")
    else:
        raise TypeError(f"config must be a path or a dict, got {type(config).__name__}")
    cfg.pop("_source", None)
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise ValueError(f"unknown benchmark config key(s) {unknown}; known: {sorted(_KEYS)}")
    cfg = _resolve(cfg, base)
    cfg.setdefault("name", Path(source).stem if source else "benchmark")
    cfg.setdefault("output", str((Path.cwd() / "benchmark_output" / cfg["name"]).resolve()))
    cfg.setdefault("seed", 0)
    cfg.setdefault("baselines", True)
    cfg.setdefault("tiny", False)
    cfg.setdefault("epochs", None)
    cfg.setdefault("aggregation", "paper")
    cfg.setdefault("subsets", True)
    cfg.setdefault("accelerator", "auto")
    cfg.setdefault("devices", 1)
    cfg.setdefault("cache_dir", None)
    cfg.setdefault("cross_study", [])
    cfg.setdefault("launcher", {"kind": "local"})
    cfg.setdefault("efficiency", {})
    cfg.setdefault("trainer", {})
    cfg.setdefault("threads", None)
    if cfg["aggregation"] not in ("paper", "pooled"):
        raise ValueError(f"aggregation must be 'paper' or 'pooled', got {cfg['aggregation']!r}")
    if not cfg.get("datasets"):
        raise ValueError("the benchmark config needs 'datasets' (name -> slides and split)")
    for name, ds in cfg["datasets"].items():
        if not isinstance(ds, dict) or "slides" not in ds:
            raise ValueError(f"dataset {name!r} needs a 'slides' entry (a load_slides spec)")
    models = []
    for m in cfg.get("models") or []:
        m = {"name": m} if isinstance(m, str) else dict(m)
        if "name" not in m:
            raise ValueError(f"model entry {m} needs a 'name'")
        m["name"] = str(m["name"]).lower()
        m.setdefault("overrides", {})
        models.append(m)
    if cfg["baselines"]:
        have = {m["name"] for m in models}
        models += [{"name": b, "overrides": {}} for b in BASELINES if b not in have]
    if not models:
        raise ValueError("the benchmark config lists no models")
    from hest2sge.registry import get_model_class

    for m in models:
        get_model_class(m["name"])  # KeyError with close names when unknown
    cfg["models"] = models
    for cs in cfg["cross_study"]:
        for k in ("train", "test"):
            if cs.get(k) not in cfg["datasets"]:
                raise ValueError(f"cross_study entry {cs} names unknown dataset {cs.get(k)!r}")
    cfg["_source"] = source
    return cfg


def cell_specs(cfg: dict[str, Any], n_folds: dict[str, int]) -> list[CellSpec]:
    """The grid: models x datasets x folds, then the cross-study cells."""
    cells = []
    for ds in cfg["datasets"]:
        for m in cfg["models"]:
            ov = tuple(sorted(m["overrides"].items()))
            cells += [CellSpec(m["name"], ds, f, overrides=ov) for f in range(n_folds[ds])]
    for cs in cfg["cross_study"]:
        fold = int(cs.get("fold", 0))
        for m in cfg["models"]:
            cells.append(CellSpec(m["name"], cs["train"], fold, test_dataset=cs["test"],
                                  overrides=tuple(sorted(m["overrides"].items()))))
    return cells
