"""torchmetrics wrappers of :mod:`hest2sge.metrics.functional` for ONE image at a time.

Each metric accumulates the predictions and targets of the spots of one image over ``update()``
calls (list states reduced with ``"cat"``, so DDP ranks are gathered) and ``compute()`` applies
the functional metric to the concatenation. Call ``reset()`` between images: the benchmark's
metrics are per image, never pooled over images.

Example::

    metric = SpotPCC()
    for batch in loader_of_one_slide:
        metric.update(model(batch), batch["target"])
    per_gene = metric.compute()  # (n_genes,) float64
    metric.reset()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from hest2sge.metrics import functional as F

__all__ = [
    "SpotAUC",
    "SpotJSDivergence",
    "SpotMI",
    "SpotNRMSE",
    "SpotPCC",
    "SpotRMSE",
    "SpotSSIM",
    "SpotSpearman",
]


class _SpotMetric(Metric):
    """Base class: accumulate ``(spots[, genes])`` predictions and targets, compute per gene.

    Args:
        reduce: ``"none"`` returns the per-gene float64 vector; ``"mean"`` its NaN-ignoring mean
            over genes (NaN when every gene is NaN).
        **kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``compute_on_cpu``).
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better: bool | None = None
    preds: list[Tensor]
    target: list[Tensor]

    def __init__(self, reduce: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if reduce not in ("none", "mean"):
            raise ValueError(f"reduce must be 'none' or 'mean', got {reduce!r}")
        self.reduce = reduce
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add the spots of one batch: ``preds`` and ``target`` of equal 1-D or 2-D shape."""
        preds = torch.as_tensor(preds).detach()
        target = torch.as_tensor(target).detach().to(preds.device)
        if preds.ndim not in (1, 2) or preds.shape != target.shape:
            raise ValueError(
                "preds and target must have the same 1-D (n_spots,) or 2-D (n_spots, n_genes) "
                f"shape; got {tuple(preds.shape)} and {tuple(target.shape)}"
            )
        if self.preds and preds.shape[1:] != self.preds[0].shape[1:]:
            raise ValueError(
                f"batch shape {tuple(preds.shape)} does not match earlier batches "
                f"{tuple(self.preds[0].shape)} (the gene axis must not change)"
            )
        self.preds.append(preds)
        self.target.append(target)

    def compute(self) -> Tensor:
        """Per-gene metric of all spots seen since the last ``reset()``."""
        out = self._fn(dim_zero_cat(self.preds), dim_zero_cat(self.target))
        return out.nanmean() if self.reduce == "mean" else out

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


class SpotPCC(_SpotMetric):
    """Per-gene Pearson correlation of one image (:func:`functional.pcc`)."""

    higher_is_better = True

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        return F.pcc(preds, target)


class SpotSpearman(_SpotMetric):
    """Per-gene Spearman correlation of one image (:func:`functional.spearman`)."""

    higher_is_better = True

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        return F.spearman(preds, target)


class SpotMI(_SpotMetric):
    """Per-gene normalised mutual information of one image (:func:`functional.mutual_info`)."""

    higher_is_better = True

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        return F.mutual_info(preds, target)


class SpotSSIM(_SpotMetric):
    """Per-gene global 256-level SSIM of one image (:func:`functional.ssim`)."""

    higher_is_better = True

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        return F.ssim(preds, target)


class SpotAUC(_SpotMetric):
    """Per-gene ROC AUC of one image for RAW counts binarised at ``cutoff`` (:func:`functional.auc`).

    ``update(preds, target)`` takes the raw counts as ``target``.

    Args:
        cutoff: Count threshold (label = count > cutoff).
        reduce: ``"none"`` or ``"mean"``.
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = True

    def __init__(self, cutoff: float = 0, reduce: str = "none", **kwargs: Any) -> None:
        super().__init__(reduce=reduce, **kwargs)
        self.cutoff = cutoff

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        return F.auc(preds, target, cutoff=self.cutoff)


class SpotJSDivergence(_SpotMetric):
    """Per-gene Jensen-Shannon divergence of one image (:func:`functional.js_divergence`)."""

    higher_is_better = False

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        return F.js_divergence(preds, target)


class SpotNRMSE(_SpotMetric):
    """Per-gene normalised RMSE of one image (:func:`functional.nrmse`).

    Args:
        norm: ``"range"`` or ``"sd"``.
        reduce: ``"none"`` or ``"mean"``.
        **kwargs: Passed to :class:`torchmetrics.Metric`.
    """

    higher_is_better = False

    def __init__(self, norm: str = "range", reduce: str = "none", **kwargs: Any) -> None:
        if norm not in ("range", "sd"):
            raise ValueError(f"norm must be 'range' or 'sd', got {norm!r}")
        super().__init__(reduce=reduce, **kwargs)
        self.norm = norm

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        return F.nrmse(preds, target, norm=self.norm)


class SpotRMSE(_SpotMetric):
    """Per-gene RMSE of one image (:func:`functional.rmse`)."""

    higher_is_better = False

    def _fn(self, preds: Tensor, target: Tensor) -> Tensor:
        return F.rmse(preds, target)
