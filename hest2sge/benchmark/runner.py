"""``hest2sge.benchmark.run``: plan the cells, run the missing ones, aggregate, report."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hest2sge.benchmark.cells import is_done, load_dataset
from hest2sge.benchmark.config import CellSpec, cell_specs, load_config

log = logging.getLogger(__name__)


@dataclass
class BenchmarkResult:
    """What :func:`run` returns: the output folder, the tables and the cell statuses."""

    output: Path
    summary: Any = None
    folds: Any = None
    rankings: dict = field(default_factory=dict)
    subsets: Any = None
    cells: list = field(default_factory=list)
    report: Path | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict]:
        return [c for c in self.cells if c.get("status") == "failed"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict[str, Any]:
    """CPU, memory and accelerators of this machine (recorded next to results)."""
    import psutil
    import torch

    hw = {"platform": platform.platform(), "python": platform.python_version(),
          "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
          "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "cuda": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    try:
        import lightning

        hw["lightning"] = lightning.__version__
    except ImportError:  # pragma: no cover
        pass
    return hw


def provenance(cfg: dict[str, Any], split_hashes: dict[str, str]) -> dict[str, Any]:
    """Version, commit, config, seeds, split hashes, weight tags and hardware of a run."""
    import hest2sge
    from hest2sge.benchmark.splits import PAPER_SPLIT_SHA256

    return {
        "hest2sge": hest2sge.__version__, "git_commit": _git_commit(),
        "config_file": cfg.get("_source"),
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
        "seed": cfg["seed"], "split_sha256": split_hashes,
        "paper_split_file_sha256": PAPER_SPLIT_SHA256,
        "weights": {m["name"]: {k: m["overrides"].get(k) for k in ("backbone", "extractor",
                                                                    "pretrained")
                                if k in m["overrides"]} for m in cfg["models"]},
        "hardware": hardware(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def plan(cfg: dict[str, Any]) -> tuple[list[CellSpec], list[CellSpec], dict[str, Any]]:
    """Load the datasets and list the model cells and the reference cells."""
    from hest2sge.benchmark.splits import split_hash

    info = {}
    for name in cfg["datasets"]:
        slides, folds, desc = load_dataset(cfg, name)
        info[name] = {"slides": slides, "folds": folds, "protocol": desc,
                      "split_sha256": split_hash(folds)}
    specs = cell_specs(cfg, {n: len(v["folds"]) for n, v in info.items()})
    refs = list(dict.fromkeys(CellSpec("refs", s.dataset, s.fold, s.test_dataset)
                              for s in specs))
    return specs, refs, info


def run(config: Any, *, output: str | os.PathLike | None = None, launcher: str | None = None,
        resume: bool = True, dry_run: bool = False) -> BenchmarkResult:
    """Run a benchmark described by a YAML file or dict (see :mod:`hest2sge.benchmark.config`).

    Args:
        config: Path of a YAML config or a dict.
        output: Output folder (overrides the config's ``output``).
        launcher: ``local``, ``pool`` or ``submitit`` (overrides the config's launcher kind).
        resume: Skip cells whose results are on disk (default). With ``False`` the previous
            cells of this output folder are deleted first.
        dry_run: Only list the cells with estimated costs (see :func:`dry_run`).

    Returns:
        :class:`BenchmarkResult`; the report is ``<output>/report.md``.
    """
    import shutil

    from hest2sge.benchmark.launchers import launch
    from hest2sge.benchmark.report import collect

    cfg = load_config(config)
    if output is not None:
        cfg["output"] = str(Path(output).resolve())
    if launcher is not None:
        cfg["launcher"] = {**dict(cfg.get("launcher") or {}), "kind": launcher}
    if dry_run:
        return globals()["dry_run"](cfg)
    t0 = time.perf_counter()
    out = Path(cfg["output"])
    if not resume and (out / "cells").exists():
        shutil.rmtree(out / "cells")
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for stale in (out / "cells").glob(".tmp-*"):  # left by a killed run: never trusted
        shutil.rmtree(stale, ignore_errors=True)
    specs, refs, info = plan(cfg)
    prov = provenance(cfg, {k: v["split_sha256"] for k, v in info.items()})
    _atomic_write(out / "provenance.json", json.dumps(prov, indent=1, default=str))
    local = dict(cfg, launcher={"kind": "local"})
    statuses = launch(local, [r for r in refs if not is_done(out, r.cell_id)])
    pending = [s for s in specs if not is_done(out, s.cell_id)]
    skipped = [{"cell_id": s.cell_id, "status": "skipped"} for s in specs if s not in pending]
    log.info("%d cells, %d to run", len(specs), len(pending))
    statuses += skipped + launch(cfg, pending)
    result = collect(cfg, info, specs)
    result.cells = statuses
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------- dry run
def _profile(cfg: dict[str, Any]) -> dict[str, Any]:
    from importlib import resources

    path = (cfg.get("efficiency") or {}).get("profile")
    if path:
        with open(path) as fh:
            return json.load(fh)
    raw = resources.files("hest2sge.benchmark").joinpath("data/efficiency_cpu.json")
    return json.loads(raw.read_text()) if raw.is_file() else {}


def _dataset_sizes(cfg: dict[str, Any], name: str) -> tuple[list, dict[str, int], str]:
    """Folds and spots per slide; without the data, the paper split with the HER2+ average
    (13,620 selected spots over 36 sections)."""
    from hest2sge.benchmark.splits import her2st_paper_folds
    from hest2sge.data.slide import slide_id_of

    ds = cfg["datasets"][name]
    try:
        slides, folds, desc = load_dataset(cfg, name)
        return folds, {slide_id_of(s): s.n_obs for s in slides}, desc
    except (FileNotFoundError, OSError) as err:
        if ds.get("split") in ("her2st_paper", {"kind": "her2st_paper"}):
            folds = her2st_paper_folds()
            ids = {s for f in folds for r in ("train", "val", "test") for s in getattr(f, r)}
            return folds, {s: 378 for s in ids}, (
                f"paper HER2+ 4-fold patient split (data not found: {err}; assuming 378 spots "
                "per section = 13,620 / 36)")
        raise


def dry_run(config: Any) -> BenchmarkResult:
    """List the cells with an estimated cost from the efficiency profile, run nothing.

    The estimate of a cell is ``train spots x (f + (epochs - 1) x s) + 0.35 x s x (val spots
    x epochs + test spots)``, with ``f`` and ``s`` the model's seconds per spot in its first
    and later epochs from the profile
    (``efficiency.profile`` in the config, else the shipped CPU profile); 0.35 is the cost of
    a forward pass relative to a training step. Printed as a table and written to
    ``<output>/dry_run.csv``.
    """
    import pandas as pd

    from hest2sge.registry import get_model_class

    cfg = config if isinstance(config, dict) and "_source" in config else load_config(config)
    prof = _profile(cfg)
    entries = prof.get("models", {})
    sizes = {n: _dataset_sizes(cfg, n) for n in cfg["datasets"]}
    specs = cell_specs(cfg, {n: len(v[0]) for n, v in sizes.items()})
    rows = []
    from hest2sge.models.configs import get_record

    for s in specs:
        folds, spots, desc = sizes[s.dataset]
        f = folds[s.fold]
        n = {r: sum(spots.get(i, 0) for i in getattr(f, r)) for r in ("train", "val", "test")}
        if s.test_dataset is not None:
            n["test"] = sum(sizes[s.test_dataset][1].values())
        rec = get_record(s.model)
        epochs = int(cfg["epochs"] or rec.max_epochs)
        e = entries.get(s.model)
        est = None
        if e and e.get("sec_per_epoch") is not None:
            sps = e["sec_per_epoch"] / e["spots"]
            first = (e.get("first_epoch_s") or e["sec_per_epoch"]) / e["spots"]
            est = n["train"] * (first + (epochs - 1) * sps) \
                + 0.35 * sps * (n["val"] * epochs + n["test"])
        rows.append({"cell_id": s.cell_id, "model": s.model, "input": get_model_class(s.model)
                     .input_mode, "dataset": s.dataset, "fold": s.fold, "epochs": epochs,
                     "train_spots": n["train"], "val_spots": n["val"], "test_spots": n["test"],
                     "est_hours": None if est is None else round(est / 3600, 2)})
    table = pd.DataFrame(rows)
    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "dry_run.csv", index=False)
    total = table["est_hours"].dropna().sum()
    lines = [f"# dry run of {cfg['name']}: {len(table)} cells "
             f"({len(cfg['models'])} models; datasets: "
             + "; ".join(f"{k}: {v[2]}" for k, v in sizes.items()) + ")",
             f"# cost profile: {prof.get('protocol', 'none found: no estimates')}",
             table.to_string(index=False),
             f"# estimated total: {total:.1f} h on the profiled hardware "
             f"({prof.get('hardware', 'unknown')}); cells without a profile entry: "
             f"{int(table['est_hours'].isna().sum())}"]
    text = "\n".join(lines)
    print(text)
    res = BenchmarkResult(output=out, cells=rows)
    res.summary = table
    return res
