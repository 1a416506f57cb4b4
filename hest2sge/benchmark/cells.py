"""One benchmark cell: fit a model on one fold with its paper configuration, test it, write
the results atomically.

A cell folder ``<output>/cells/<cell_id>/`` holds ``predictions.parquet`` (the long table),
``metrics.parquet`` (per model, fold, image, gene) and ``cell.json`` (provenance). It is
written in a temporary folder and renamed into place, so a cell either exists complete or not
at all: a run killed at any moment (even ``kill -9``) and started again skips the finished
cells and recomputes the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from hest2sge.benchmark.config import CellSpec

_DATASETS: dict[tuple, tuple] = {}  # per-process cache: (config source, name) -> dataset


def panel_hash(genes) -> str:
    """sha256 of a gene panel (names in order)."""
    return hashlib.sha256("\n".join(genes).encode()).hexdigest()


def build_kwargs(rec: Any, cls: type, tiny: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """Model keyword arguments of a cell: the record's paper configuration, the tiny
    configuration when asked (tests), the config's overrides, and the record's from-scratch
    settings when the paper's pretrained weights are switched off (explicit overrides win)."""
    kw = dict(rec.model)
    if tiny:
        kw.update(cls.tiny_config)
    kw.update(overrides)
    if kw.get("pretrained") in (False, None) and rec.model.get("pretrained"):
        kw.update({k: v for k, v in dict(rec.from_scratch).items() if k not in overrides})
    return kw


def load_dataset(cfg: dict[str, Any], name: str) -> tuple[list, list, str]:
    """Slides, folds and the split description of dataset ``name`` (cached per process)."""
    from hest2sge.benchmark.splits import make_folds
    from hest2sge.data.io import load_slides

    key = (cfg.get("_source"), name, json.dumps(cfg["datasets"][name], sort_keys=True,
                                                default=str))
    if key not in _DATASETS:
        ds = cfg["datasets"][name]
        slides = load_slides(ds["slides"])
        _DATASETS[key] = make_folds(slides, ds.get("split", "patient_kfold"))
    return _DATASETS[key]


def gene_spec(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """SpotDataModule gene arguments of a dataset (``genes``: rule, list or ``{file: path}``)."""
    ds = cfg["datasets"][name]
    genes = ds.get("genes", "paper")
    if isinstance(genes, dict) and "file" in genes:
        with open(genes["file"]) as fh:
            genes = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    out = {"genes": genes}
    for k in ("n_genes", "n_top_hvg", "min_spots"):
        if k in ds:
            out[k] = ds[k]
    return out


def cell_dir(output: str | os.PathLike, cell_id: str) -> Path:
    return Path(output) / "cells" / cell_id


def is_done(output: str | os.PathLike, cell_id: str) -> bool:
    """Whether a cell's results are complete on disk."""
    return (cell_dir(output, cell_id) / "cell.json").is_file()


def _commit(tmp: Path, final: Path) -> bool:
    """Rename a finished temporary cell folder into place (atomic on one file system)."""
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if (final / "cell.json").is_file():  # another worker finished it first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise


def _tmp_dir(output: str | os.PathLike, cell_id: str) -> Path:
    tmp = Path(output) / "cells" / f".tmp-{cell_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _write_results(tmp: Path, long, metrics, meta: dict[str, Any]) -> None:
    long.to_parquet(tmp / "predictions.parquet", index=False)
    metrics.to_parquet(tmp / "metrics.parquet", index=False)
    (tmp / "cell.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))


def _seed(cfg: dict[str, Any], spec_id: str) -> int:
    return (int(cfg["seed"]) + int(hashlib.sha256(spec_id.encode()).hexdigest()[:6], 16)) % 2**31


def _train_panel(cfg, spec: CellSpec, slides, split) -> list[str]:
    from hest2sge.data.genes import select_genes
    from hest2sge.data.slide import slide_id_of

    gs = gene_spec(cfg, spec.dataset)
    by_id = {slide_id_of(s): s for s in slides}
    return select_genes([by_id[s] for s in split.train], gs["genes"],
                        n_top=gs.get("n_top_hvg", 1000), min_spots=gs.get("min_spots", 1000),
                        n_genes=gs.get("n_genes", 250))


def _test_slides(cfg, spec: CellSpec, slides, split) -> list:
    from hest2sge.data.slide import slide_id_of

    if spec.test_dataset is not None:
        return load_dataset(cfg, spec.test_dataset)[0]
    by_id = {slide_id_of(s): s for s in slides}
    return [by_id[s] for s in split.test]


def run_reference_cell(cfg: dict[str, Any], dataset: str, fold: int,
                       test_dataset: str | None = None) -> str:
    """The image-free reference rows (spot depth, training mean) of one fold."""
    from hest2sge.benchmark.scoring import metrics_from_long, reference_long
    from hest2sge.data.slide import slide_id_of

    spec = CellSpec("refs", dataset, fold, test_dataset)
    out = cfg["output"]
    if is_done(out, spec.cell_id):
        return "skipped"
    slides, folds, _ = load_dataset(cfg, dataset)
    split = folds[fold]
    genes = _train_panel(cfg, spec, slides, split)
    by_id = {slide_id_of(s): s for s in slides}
    long = reference_long([by_id[s] for s in split.train], _test_slides(cfg, spec, slides, split),
                          genes, train_fold=fold, dataset=_dataset_label(spec))
    metrics = metrics_from_long(long, cfg["aggregation"])
    tmp = _tmp_dir(out, spec.cell_id)
    _write_results(tmp, long, metrics, {"cell_id": spec.cell_id, "kind": "reference",
                                        "panel_sha256": panel_hash(genes)})
    _commit(tmp, cell_dir(out, spec.cell_id))
    return "done"


def _dataset_label(spec: CellSpec) -> str:
    return spec.dataset if spec.test_dataset is None else f"{spec.dataset}->{spec.test_dataset}"


def run_cell(cfg: dict[str, Any], spec: CellSpec) -> dict[str, Any]:
    """Fit and test one cell and write its results (skipped when already done).

    The model and its training come from the model's configuration record
    (:func:`hest2sge.models.configs.get_record`): constructor arguments, epochs, batch size,
    augmentation, checkpoint rule (best epoch by validation PCC, or the last epoch where the
    paper keeps it) and early stopping. The config may override epochs (``epochs``), use tiny
    configurations (``tiny``) or give per-model ``overrides``; each is recorded in ``cell.json``.

    Returns:
        ``{"cell_id", "status": "done" | "skipped", "seconds"}``.
    """
    import lightning.pytorch as pl
    import torch

    import hest2sge
    from hest2sge.benchmark.scoring import metrics_from_long, predict_long
    from hest2sge.benchmark.splits import split_hash
    from hest2sge.data.datamodule import SpotDataModule
    from hest2sge.registry import get_model_class

    out = cfg["output"]
    if is_done(out, spec.cell_id):
        return {"cell_id": spec.cell_id, "status": "skipped", "seconds": 0.0}
    t0 = time.perf_counter()
    slides, folds, split_desc = load_dataset(cfg, spec.dataset)
    split = folds[spec.fold]
    from hest2sge.models.configs import get_record

    rec = get_record(spec.model)
    cls = get_model_class(spec.model)
    model_kwargs = build_kwargs(rec, cls, bool(cfg["tiny"]), dict(spec.overrides))
    dm_kwargs = dict(rec.datamodule_kwargs())
    if cfg.get("batch_size") and cls.input_mode != "slide":
        dm_kwargs["batch_size"] = int(cfg["batch_size"])
    seed = _seed(cfg, spec.cell_id)
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = SpotDataModule(slides, split, cache_dir=cfg.get("cache_dir"),
                        num_workers=int(cfg.get("num_workers") or 0),
                        allow_patient_overlap="NOT patient-grouped" in split_desc
                        or "regions" in split_desc,
                        **gene_spec(cfg, spec.dataset), **dm_kwargs)
    model = hest2sge.load(spec.model, genes=dm.genes, **model_kwargs)
    dm.configure_for(model)
    tkw = dict(rec.trainer_kwargs())
    if cfg.get("epochs") and rec.max_epochs > 1:  # closed-form fits keep their one pass
        tkw["max_epochs"] = int(cfg["epochs"])
    tkw.update(cfg.get("trainer") or {})
    tmp = _tmp_dir(out, spec.cell_id)
    try:
        callbacks = rec.callbacks()
        trainer = pl.Trainer(default_root_dir=str(tmp), logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             accelerator=cfg.get("accelerator", "auto"),
                             devices=cfg.get("devices", 1), num_sanity_val_steps=0,
                             callbacks=callbacks, **tkw)
        trainer.fit(model, dm)
        if trainer.global_rank != 0:  # a multi-GPU (DDP) cell: rank 0 tests and writes
            shutil.rmtree(tmp, ignore_errors=True)
            return {"cell_id": spec.cell_id, "status": "rank", "seconds": 0.0}
        ckpt_cb = trainer.checkpoint_callback
        best_path = ""
        if ckpt_cb is not None:
            best_path = (ckpt_cb.best_model_path if rec.monitor else ckpt_cb.last_model_path) \
                or ckpt_cb.last_model_path
        best = hest2sge.load(checkpoint=best_path) if best_path else model.eval()
        if torch.cuda.is_available() and cfg.get("accelerator") != "cpu":
            best = best.cuda()
        test = _test_slides(cfg, spec, slides, split)
        long = predict_long(best, test, model_id=spec.model, train_fold=spec.fold,
                            dataset=_dataset_label(spec), cache_dir=cfg.get("cache_dir"))
        metrics = metrics_from_long(long, cfg["aggregation"])
        best_score = getattr(ckpt_cb, "best_model_score", None) if ckpt_cb else None
        meta = {
            "cell_id": spec.cell_id, "kind": "model", "model": spec.model,
            "dataset": spec.dataset, "test_dataset": spec.test_dataset, "fold": spec.fold,
            "split": {r: list(getattr(split, r)) for r in ("train", "val", "test")},
            "split_sha256": split_hash([split]), "split_protocol": split_desc,
            "panel_sha256": panel_hash(dm.genes), "n_genes": len(dm.genes),
            "seed": seed, "model_kwargs": model_kwargs, "tiny": bool(cfg["tiny"]),
            "max_epochs": tkw.get("max_epochs"), "epochs_trained": trainer.current_epoch,
            "paper_epochs": rec.max_epochs, "monitor": rec.monitor,
            "best_checkpoint": os.path.basename(best_path) if best_path else None,
            "best_score": None if best_score is None else float(best_score),
            "target_transform": best.fitted_target_transform,
            "weights": model_kwargs.get("backbone", model_kwargs.get("extractor")),
            "pretrained": model_kwargs.get("pretrained"),
            "seconds": time.perf_counter() - t0,
        }
        shutil.rmtree(tmp / "checkpoints", ignore_errors=True)
        _write_results(tmp, long, metrics, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, cell_dir(out, spec.cell_id))
    return {"cell_id": spec.cell_id, "status": "done", "seconds": time.perf_counter() - t0}


def run_cell_job(cfg: dict[str, Any], spec: CellSpec, threads: int | None = None) -> dict:
    """Entry point of a process-pool worker or a submitit/SLURM job (one cell).

    Args:
        cfg: The loaded config (a plain dict: it travels to workers by pickle).
        spec: The cell.
        threads: torch threads for this cell (restored afterwards).
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        if spec.model == "refs":
            status = run_reference_cell(cfg, spec.dataset, spec.fold, spec.test_dataset)
            return {"cell_id": spec.cell_id, "status": status, "seconds": 0.0}
        return run_cell(cfg, spec)
    finally:
        torch.set_num_threads(before)
