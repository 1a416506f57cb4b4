"""The model contract, for every registered model (tiny configurations)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule, synthetic_slides
from hest2sge.models.base import prepare_batch
from hest2sge.registry import get_model_class


@pytest.fixture(scope="module")
def tiny_slides():
    return synthetic_slides(n_patients=4, slides_per_patient=1, grid=(6, 6), n_genes=12,
                            spot_pitch_px=32, seed=1)


def _dm(model, slides):
    dm = SpotDataModule.for_model(model, slides, split={"k": 4, "fold": 0}, batch_size=8)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", hest2sge.list_models())
def test_model_contract(name, tiny_slides, tmp_path):
    torch.manual_seed(0)
    cls = get_model_class(name)
    genes = list(tiny_slides[0].var_names)
    model = hest2sge.load(name, genes=genes, **cls.tiny_config)
    dm = _dm(model, tiny_slides)
    assert dm.genes == genes

    # forward + backward on one training batch
    batch = prepare_batch(next(iter(dm.train_dataloader())))
    assert batch["img"].dtype == torch.float32 and batch["img"].max() <= 1.0
    out = model(batch)
    pred = model.prediction(out)
    assert pred.shape == (batch["expr"].shape[0], len(genes))
    assert torch.isfinite(pred).all()
    loss = model.loss(out, batch)
    loss = loss["loss"] if isinstance(loss, dict) else loss
    assert torch.isfinite(loss)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        loss.backward()
        grads = [p.grad for p in trainable if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        model.zero_grad()

    # one real Trainer fit (2 training steps, then validation) with the metrics callback
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0, callbacks=[hest2sge.SpotMetrics()])
    trainer.fit(model, dm)
    assert "val/pcc" in trainer.callback_metrics
    assert "val/loss" in trainer.callback_metrics

    # checkpoint round trip: identical outputs
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    restored = hest2sge.load(checkpoint=path)
    assert type(restored) is type(model)
    assert restored.genes == genes
    model.eval()
    vbatch = prepare_batch(next(iter(dm.val_dataloader())))
    with torch.no_grad():
        a = model.prediction(model(vbatch))
        b = restored.prediction(restored(vbatch))
    torch.testing.assert_close(a, b)

    # prediction on a whole slide
    pred_ad = hest2sge.predict(restored, tiny_slides[0])
    assert pred_ad.shape == (tiny_slides[0].n_obs, len(genes))
    assert list(pred_ad.var_names) == genes
    assert torch.isfinite(torch.as_tensor(pred_ad.layers["pred"])).all()


def test_contract_covers_registry():
    """Every registered model has a tiny configuration for the contract test."""
    for name in hest2sge.list_models():
        assert isinstance(get_model_class(name).tiny_config, dict)
        assert get_model_class(name).tiny_config, f"{name} has no tiny_config"
