"""The model contract as a public check, for anyone adding an architecture.

:func:`check_model` runs what the test suite runs for every registered model: forward and
backward on a real training batch, one fit through a real Lightning ``Trainer`` with the
:class:`~hest2sge.SpotMetrics` callback, a weights-only checkpoint round trip with identical
outputs and :func:`hest2sge.predict` on a whole slide. A model that passes it works with the
data module, the CLI, the benchmark and checkpoint loading.

Example::

    import hest2sge
    from hest2sge.testing import check_model

    @hest2sge.register_model("mine")
    class Mine(hest2sge.SpotModel): ...

    report = check_model("mine", width=8, patch_size=32)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from typing import Any

__all__ = ["ContractError", "check_model", "contract_slides"]


class ContractError(AssertionError):
    """A model broke the hest2sge model contract; the message says which step and why."""


def contract_slides(seed: int = 1) -> list:
    """Four tiny synthetic slides (one per patient, 6 x 6 spots, 12 genes, 32 px pitch)."""
    from hest2sge.data import synthetic_slides

    return synthetic_slides(n_patients=4, slides_per_patient=1, grid=(6, 6), n_genes=12,
                            spot_pitch_px=32, seed=seed)


def _require(ok: bool, step: str, why: str) -> None:
    if not ok:
        raise ContractError(f"{step}: {why}")


def check_model(
    name: str,
    slides: Sequence | None = None,
    workdir: str | os.PathLike | None = None,
    seed: int = 0,
    **config: Any,
) -> dict[str, Any]:
    """Check that a registered model honours the hest2sge model contract.

    Args:
        name: Registry name of the model.
        slides: Slides to use (default: :func:`contract_slides`, four tiny synthetic slides
            of four patients).
        workdir: Folder for the checkpoint (default: a temporary folder, removed afterwards).
        seed: Torch seed for the model's initialisation.
        **config: Constructor arguments, typically a tiny configuration (default: the class's
            ``tiny_config``).

    Returns:
        A report: ``parameters`` (trainable), ``loss`` (first training batch), ``val_pcc``
        after one short fit, ``checkpoint_bytes`` and ``predicted_spots``.

    Raises:
        ContractError: naming the step that failed (forward, backward, fit, checkpoint,
            predict) and what was wrong.
    """
    import lightning.pytorch as pl
    import torch

    import hest2sge
    from hest2sge.data import SpotDataModule
    from hest2sge.models.base import prepare_batch
    from hest2sge.registry import get_model_class

    cls = get_model_class(name)
    slides = list(slides) if slides is not None else contract_slides()
    genes = list(slides[0].var_names)
    torch.manual_seed(seed)
    model = hest2sge.load(name, genes=genes, **(config or dict(cls.tiny_config)))
    dm = SpotDataModule.for_model(model, slides, split={"k": 4, "fold": 0}, batch_size=8)
    dm.setup("fit")
    _require(list(dm.genes) == genes, "data module", "the panel differs from the slides' genes")

    batch = prepare_batch(next(iter(dm.train_dataloader())),
                          keep_uint8=getattr(model, "accepts_uint8_img", False))
    out = model(batch)
    pred = model.prediction(out)
    _require(tuple(pred.shape) == (batch["expr"].shape[0], len(genes)), "forward",
             f"prediction shape {tuple(pred.shape)}, expected "
             f"{(batch['expr'].shape[0], len(genes))}")
    _require(bool(torch.isfinite(pred).all()), "forward", "non-finite predictions")
    loss = model.loss(out, batch)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    _require(bool(torch.isfinite(loss)), "loss", f"non-finite loss {loss}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        loss.backward()
        grads = [p.grad for p in trainable if p.grad is not None]
        _require(bool(grads), "backward", "no parameter received a gradient")
        _require(all(bool(torch.isfinite(g).all()) for g in grads), "backward",
                 "non-finite gradients")
        _require(any(float(g.abs().sum()) > 0 for g in grads), "backward", "all gradients zero")
        model.zero_grad()

    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0, callbacks=[hest2sge.SpotMetrics()])
    trainer.fit(model, dm)
    for key in ("val/pcc", "val/loss"):
        _require(key in trainer.callback_metrics, "fit", f"{key} was not logged")

    with tempfile.TemporaryDirectory() as tmp:
        folder = os.fspath(workdir) if workdir is not None else tmp
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.ckpt")
        trainer.save_checkpoint(path)
        size = os.path.getsize(path)
        restored = hest2sge.load(checkpoint=path)
    _require(type(restored) is type(model), "checkpoint",
             f"restored a {type(restored).__name__}, not a {type(model).__name__}")
    _require(restored.genes == genes, "checkpoint", "the gene panel was not restored")
    model.eval()
    vbatch = prepare_batch(next(iter(dm.val_dataloader())),
                           keep_uint8=getattr(model, "accepts_uint8_img", False))
    with torch.no_grad():
        a = model.prediction(model(vbatch))
        b = restored.prediction(restored(vbatch))
    try:
        torch.testing.assert_close(a, b)
    except AssertionError as e:
        raise ContractError(f"checkpoint: restored outputs differ ({e})") from None

    pred_ad = hest2sge.predict(restored, slides[0])
    _require(pred_ad.shape == (slides[0].n_obs, len(genes)), "predict",
             f"AnnData shape {pred_ad.shape}, expected {(slides[0].n_obs, len(genes))}")
    _require(list(pred_ad.var_names) == genes, "predict", "genes out of order")
    _require(bool(torch.isfinite(torch.as_tensor(pred_ad.layers["pred"])).all()), "predict",
             "non-finite predictions")
    return {
        "model": name,
        "parameters": int(sum(p.numel() for p in trainable)),
        "loss": float(loss),
        "val_pcc": float(trainer.callback_metrics["val/pcc"]),
        "checkpoint_bytes": int(size),
        "predicted_spots": int(pred_ad.n_obs),
    }
