"""Figures of issue 8 (configuration record, weights, fine-tuning), on synthetic slides, CPU.

    python benchmarks/config_checks.py offline      # time for an offline load("stnet") to fail
    python benchmarks/config_checks.py scratch      # ST-Net from random init: paper vs record
    python benchmarks/config_checks.py finetune     # fine-tuning on a new panel

``offline`` points huggingface_hub at an unreachable endpoint (http://127.0.0.1:9, HF_HUB_OFFLINE
unset) with an empty cache. ``scratch`` trains ST-Net (timm ``resnet18``, random init, 64 px
patches) on synthetic slides (4 patients x 2 sections, patient 4-fold split, fold 0) with the
paper's SGD lr 1e-6 and with the record's from-scratch settings (Adam 1e-3, mean loss), and
prints the training loss of the first and last epoch and the validation PCC (all genes,
per-slide PCC averaged per patient then over genes). ``finetune`` trains tiny ST-Net on genes
0-9 of 16, then adapts it to genes 6-15 (4 shared) and compares validation losses on the new
panel: the fresh head, the fine-tuned head (frozen trunk) and a model trained from scratch on
the new panel for as many epochs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def offline() -> None:
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
    os.environ["HF_HOME"] = tempfile.mkdtemp()
    import hest2sge
    import hest2sge.models  # noqa: F401  (imports are not part of the figure)

    t0 = time.monotonic()
    try:
        hest2sge.load("stnet", n_genes=3)
    except Exception as e:
        print(f"{type(e).__name__} after {time.monotonic() - t0:.2f} s:\n{e}")


def _trainer(epochs: int, **kw):
    import lightning.pytorch as pl

    return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kw)


class _EpochLoss:
    def __init__(self):
        import lightning.pytorch as pl

        class CB(pl.Callback):
            def __init__(self):
                self.losses = []

            def on_train_epoch_end(self, trainer, pl_module):
                self.losses.append(float(trainer.callback_metrics["train/loss_epoch"]))

        self.cb = CB()


def scratch(epochs: int) -> None:
    import lightning.pytorch as pl

    import hest2sge
    from hest2sge.data import SpotDataModule, patient_kfold, synthetic_slides
    from hest2sge.models.configs import get_record

    slides = synthetic_slides(n_patients=4, slides_per_patient=2, seed=0)
    split = patient_kfold(slides, k=4, fold=0)
    for label, kw in (("paper (SGD lr 1e-6, summed loss)", {}),
                      ("record from_scratch", dict(get_record("stnet").from_scratch))):
        pl.seed_everything(0)
        dm = SpotDataModule(slides, split, genes="all", batch_size=32, patch_size=64)
        model = hest2sge.load("stnet", genes=dm.genes, backbone="resnet18", pretrained=False,
                              patch_size=64, **kw)
        loss = _EpochLoss().cb
        metrics = hest2sge.SpotMetrics()
        t0 = time.monotonic()
        _trainer(epochs, callbacks=[metrics, loss]).fit(model, dm)
        print(f"{label}: train loss epoch 1 {loss.losses[0]:.4f} -> epoch {epochs} "
              f"{loss.losses[-1]:.4f}; val PCC {metrics.summary.get('pcc', float('nan')):.3f} "
              f"({time.monotonic() - t0:.0f} s)")


def finetune(epochs: int) -> None:
    import lightning.pytorch as pl

    import hest2sge
    from hest2sge.data import SpotDataModule, patient_kfold, synthetic_slides

    pl.seed_everything(0)
    slides = synthetic_slides(n_patients=4, slides_per_patient=1, grid=(8, 8), n_genes=16,
                              spot_pitch_px=32, seed=3)
    split = patient_kfold(slides, k=4, fold=0)
    genes = list(slides[0].var_names)
    a, b = genes[:10], genes[6:]
    tiny = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32,
            "optimizer": "adam", "lr": 1e-3, "loss_reduction": "mean"}

    def dm(panel):
        return SpotDataModule(slides, split, genes=panel, batch_size=16, patch_size=32)

    with tempfile.TemporaryDirectory() as tmp:
        model = hest2sge.load("stnet", genes=a, **tiny)
        t = _trainer(epochs)
        t.fit(model, dm(a))
        t.save_checkpoint(os.path.join(tmp, "a.ckpt"))
        ft = hest2sge.load(checkpoint=os.path.join(tmp, "a.ckpt"), genes=b, lr=3e-3)
    ft.freeze_backbone()
    data_b = dm(b)
    fresh = _trainer(1).validate(ft, data_b, verbose=False)[0]["val/loss"]
    _trainer(epochs).fit(ft, data_b)
    tuned = _trainer(1).validate(ft, data_b, verbose=False)[0]["val/loss"]
    pl.seed_everything(0)
    new = hest2sge.load("stnet", genes=b, **tiny)
    _trainer(epochs).fit(new, data_b)
    scratch_loss = _trainer(1).validate(new, data_b, verbose=False)[0]["val/loss"]
    print(f"new panel ({len(b)} genes, 4 shared), validation MSE after {epochs} epochs: fresh "
          f"head {fresh:.4f}, fine-tuned (frozen trunk) {tuned:.4f}, trained from scratch "
          f"{scratch_loss:.4f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["offline", "scratch", "finetune"])
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    {"offline": offline, "scratch": lambda: scratch(args.epochs),
     "finetune": lambda: finetune(args.epochs)}[args.what]()
    sys.exit(0)
