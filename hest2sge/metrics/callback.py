"""``SpotMetrics``: the benchmark's evaluation as a Lightning callback.

It gathers every validation/test prediction per slide (across DDP ranks too), computes the
per-gene metrics of each slide on the model's own target scale (AUC on raw counts), averages
them over the slides of a patient and then over genes (NaN-aware), and logs ``val/pcc``,
``val/ssim``, ... so that ``ModelCheckpoint(monitor="val/pcc", mode="max")`` picks the best
epoch. Test runs also produce a per-(slide, gene) table.

Degenerate slides (fewer than two spots, or targets constant for every gene) have undefined
correlations and misleading errors (a one-spot slide has JS divergence 0 and an infinite
range-normalised RMSE). They are excluded from the table and from the logged means with a
warning naming them (``SpotMetrics.excluded``); when every slide is degenerate the evaluation
raises instead of logging NaN, so ``ModelCheckpoint(monitor="val/pcc")`` never selects on NaN.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

DEFAULT_LOGGED = ("pcc", "spearman", "mi", "ssim", "auc", "js", "nrmse_range", "rmse")


class SpotMetrics(pl.Callback):
    """Per-slide, per-gene benchmark metrics for validation and test.

    Args:
        logged: Metric names logged as ``<stage>/<name>`` (patient-then-gene means).
        table_path: Where to write the test table (CSV); default
            ``<trainer.log_dir>/test_metrics.csv`` when the trainer has a log dir.
        compute_on_sanity_check: Also evaluate the sanity-check batches.

    Attributes:
        table: ``pandas.DataFrame`` of the last evaluation, one row per (slide, gene).
        summary: Dict of the last logged values.
        excluded: Degenerate slides left out of the last evaluation, slide id -> reason.
    """

    def __init__(
        self,
        logged: tuple[str, ...] | list[str] = DEFAULT_LOGGED,
        table_path: str | os.PathLike | None = None,
        compute_on_sanity_check: bool = False,
    ) -> None:
        super().__init__()
        self.logged = tuple(logged)
        self.table_path = table_path
        self.compute_on_sanity_check = compute_on_sanity_check
        self._buf: list[dict[str, np.ndarray]] = []
        self.table = None
        self.summary: dict[str, float] = {}
        self.excluded: dict[str, str] = {}

    # -------------------------------------------------------------- collection
    def _reset(self, *args: Any) -> None:
        self._buf = []

    on_validation_epoch_start = _reset
    on_test_epoch_start = _reset

    def _collect(self, trainer: pl.Trainer, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        if trainer.sanity_checking and not self.compute_on_sanity_check:
            return
        if not isinstance(outputs, dict) or "pred" not in outputs:
            raise RuntimeError("SpotMetrics needs validation/test steps that return {'pred': ...}")
        self._buf.append({
            "pred": outputs["pred"].detach().float().cpu().numpy(),
            "expr": batch["expr"].detach().float().cpu().numpy(),
            "counts": batch["counts"].detach().float().cpu().numpy(),
            "slide": batch["slide"].detach().cpu().numpy().reshape(-1),
            "spot": batch["spot"].detach().cpu().numpy().reshape(-1),
        })

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                          dataloader_idx=0) -> None:
        self._collect(trainer, outputs, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking and not self.compute_on_sanity_check:
            return
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")
        path = self.table_path
        if path is None and trainer.log_dir is not None:
            path = os.path.join(trainer.log_dir, "test_metrics.csv")
        if path is not None and self.table is not None and trainer.is_global_zero:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.table.to_csv(path, index=False)

    # -------------------------------------------------------------- computation
    def _gather(self) -> dict[str, np.ndarray]:
        parts = self._buf
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                gathered: list[Any] = [None] * world
                torch.distributed.all_gather_object(gathered, parts)
                parts = [p for rank in gathered for p in rank]
        if not parts:
            return {}
        cat = {k: np.concatenate([p[k] for p in parts], 0) for k in parts[0]}
        # Distributed samplers pad with repeated samples: keep one row per (slide, spot).
        key = cat["slide"].astype(np.int64) * (1 << 32) + cat["spot"].astype(np.int64)
        _, first = np.unique(key, return_index=True)
        return {k: v[first] for k, v in cat.items()}

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        data = self._gather()
        self._buf = []
        if not data:
            return
        dm = trainer.datamodule
        slide_ids = getattr(dm, "slide_ids", None)
        data, self.excluded = drop_degenerate_slides(data, slide_ids)
        if self.excluded:
            warnings.warn(
                f"SpotMetrics ({stage}): degenerate slide(s) excluded from the {stage} metrics: "
                + "; ".join(f"{k} ({v})" for k, v in self.excluded.items()),
                stacklevel=2,
            )
        if not len(data["slide"]):
            if trainer.sanity_checking:  # a few sanity batches may hold too few spots
                return
            from hest2sge.errors import Hest2sgeInputError

            raise Hest2sgeInputError(
                f"SpotMetrics: every {stage} slide is degenerate ("
                + "; ".join(f"{k}: {v}" for k, v in self.excluded.items())
                + f"), so {stage}/pcc and the other metrics are undefined",
                hint=f"put slides with at least two spots and varying expression in the "
                f"{stage} split",
            )
        genes = list(getattr(pl_module, "genes", None) or [])
        table = evaluate_predictions(
            data["pred"], data["expr"], data["counts"], data["slide"],
            slide_ids=slide_ids, patient_ids=getattr(dm, "patient_ids", None),
            genes=genes or None,
        )
        self.table = table
        self.summary = summarise(table, self.logged)
        for name, value in self.summary.items():
            pl_module.log(f"{stage}/{name}", float(value), sync_dist=False, prog_bar=name == "pcc")


def drop_degenerate_slides(
    data: dict[str, np.ndarray], slide_ids: list[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Remove the rows of slides whose metrics are undefined.

    A slide is degenerate when it has fewer than two spots or when its targets (``expr``)
    are constant for every gene (no correlation, SSIM or AUC is defined there).

    Args:
        data: Stacked arrays with at least ``slide`` (N,) and ``expr`` (N, G).
        slide_ids: Names indexed by slide index (default: the index).

    Returns:
        The arrays without those rows, and ``{slide id: reason}`` of the removed slides.
    """
    slide = np.asarray(data["slide"]).reshape(-1)
    expr = np.asarray(data["expr"])
    keep = np.ones(len(slide), dtype=bool)
    excluded: dict[str, str] = {}
    for s in np.unique(slide):
        m = slide == s
        n = int(m.sum())
        name = slide_ids[int(s)] if slide_ids is not None and 0 <= int(s) < len(slide_ids) \
            else str(int(s))
        if n < 2:
            excluded[name] = f"{n} spot"
        elif not np.any(np.nanmax(expr[m], 0) > np.nanmin(expr[m], 0)):
            excluded[name] = f"targets constant for every gene over its {n} spots"
        else:
            continue
        keep &= ~m
    if not excluded:
        return data, excluded
    return {k: v[keep] for k, v in data.items()}, excluded


def evaluate_predictions(
    pred: np.ndarray,
    truth: np.ndarray,
    counts: np.ndarray | None,
    slide: np.ndarray,
    slide_ids: list[str] | None = None,
    patient_ids: list[str] | None = None,
    genes: list[str] | None = None,
):
    """Per-(slide, gene) metric table from stacked predictions.

    Args:
        pred: (N, G) predictions. truth: (N, G) targets on the same scale.
        counts: (N, G) raw counts for AUC (optional).
        slide: (N,) slide index of each row.
        slide_ids, patient_ids: Names indexed by slide index (default: the index itself;
            each slide its own patient).
        genes: Gene names (default ``g0``, ``g1``...).

    Returns:
        A ``pandas.DataFrame`` with columns slide_id, patient_id, gene and one per metric.
    """
    import pandas as pd

    from hest2sge.metrics.functional import spot_metrics

    pred, truth = np.asarray(pred), np.asarray(truth)
    genes = genes or [f"g{i}" for i in range(pred.shape[1])]
    if len(genes) != pred.shape[1]:
        raise ValueError(f"{len(genes)} gene names for {pred.shape[1]} predicted genes")
    rows = []
    for s in np.unique(slide):
        m = slide == s
        res = spot_metrics(
            torch.from_numpy(pred[m]).double(), torch.from_numpy(truth[m]).double(),
            None if counts is None else torch.from_numpy(np.asarray(counts)[m]).double(),
        )
        sid = slide_ids[int(s)] if slide_ids is not None else str(int(s))
        pid = patient_ids[int(s)] if patient_ids is not None else sid
        frame = pd.DataFrame({k: v.detach().cpu().numpy().astype(np.float64)
                              for k, v in res.items()})
        frame.insert(0, "gene", genes)
        frame.insert(0, "n_spots", int(m.sum()))
        frame.insert(0, "patient_id", pid)
        frame.insert(0, "slide_id", sid)
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def summarise(table, metrics: tuple[str, ...] | list[str] = DEFAULT_LOGGED) -> dict[str, float]:
    """The benchmark's aggregation: mean over the slides of each patient, then over patients
    for each gene, then over genes (NaN-aware at every level). One implementation, shared with
    the benchmark: :func:`hest2sge.metrics.aggregate.summarise`."""
    from hest2sge.metrics.aggregate import summarise as _summarise

    return _summarise(table, metrics, nonfinite="propagate")
