"""Closed-form models fitted through ``Trainer.fit``: training steps collect, one fit follows.

GeneCodeR and the ridge baseline are not trained by gradient descent. Their training steps
only collect (inputs, targets) of the training spots; the fit runs once, the first time one
of these comes: the start of validation (so the monitored ``val/pcc`` scores the fitted model),
the end of a training epoch, or the end of ``fit``. A model that is already fitted collects
nothing more.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class CollectThenFit:
    """Mixin for a :class:`~hest2sge.models.base.SpotModel` fitted in closed form.

    The model registers a boolean buffer ``fitted``, implements ``fit_arrays(inputs, targets)``
    (which sets ``fitted``) and calls :meth:`collect` from ``training_step``.
    """

    fitted: Tensor

    def collect(self, inputs: Tensor, targets: Tensor) -> None:
        """Keep one training batch (moved to the CPU) for the fit."""
        if not hasattr(self, "_collected"):
            self._collected: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._collected[0].append(inputs.detach().cpu())
        self._collected[1].append(targets.detach().float().cpu())

    def fit_arrays(self, inputs: Any, targets: Any) -> Any:  # pragma: no cover (abstract)
        raise NotImplementedError

    def _fit_pending(self) -> None:
        xs, ys = getattr(self, "_collected", ([], []))
        if xs and not bool(self.fitted):
            x, y = torch.cat(xs), torch.cat(ys)
            self._collected = ([], [])
            self.fit_arrays(x, y)

    def on_validation_start(self) -> None:
        self._fit_pending()

    def on_train_epoch_end(self) -> None:
        self._fit_pending()

    def on_fit_end(self) -> None:
        self._fit_pending()
