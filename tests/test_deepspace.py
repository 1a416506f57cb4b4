"""DeepSpaCE: SCTransform stand-in, augmentation, callbacks, super-resolution, self-training,
training on real sections."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule, TargetTransform, synthetic_slides
from hest2sge.data.slide import slide_id_of
from hest2sge.models.deepspace import pseudo_label, self_train
from hest2sge.models.deepspace_augment import build_augmenter, parse_families

TINY = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32}


@pytest.fixture(scope="module")
def slides():
    return synthetic_slides(n_patients=4, slides_per_patient=1, grid=(6, 6), n_genes=12,
                            spot_pitch_px=32, seed=3)


def _reference_sct(train_counts, train_depth, counts, depth, theta=100.0):
    """Analytic Pearson residuals and corrected counts, written out spot by spot."""
    n_train = len(train_counts)
    frac = [sum(row[g] for row in train_counts) / sum(train_depth)
            for g in range(len(train_counts[0]))]
    med = float(np.median(train_depth))
    clip = math.sqrt(n_train / 30.0)
    out = np.zeros((len(counts), len(frac)))
    for c, row in enumerate(counts):
        for g, x in enumerate(row):
            mu = depth[c] * frac[g]
            r = (x - mu) / math.sqrt(mu + mu * mu / theta) if mu > 0 else 0.0
            r = min(max(r, -clip), clip)
            mu2 = med * frac[g]
            out[c, g] = max(0.0, round(mu2 + r * math.sqrt(mu2 + mu2 * mu2 / theta)))
    return np.log10(1.0 + out)


def test_sct_transform_matches_reference_and_uses_training_statistics():
    rng = np.random.default_rng(0)
    train = [rng.negative_binomial(2, 0.3, size=(40, 6)).astype(float) for _ in range(2)]
    totals = [t.sum(1) + rng.integers(50, 500, size=40) for t in train]  # other genes too
    test = rng.negative_binomial(2, 0.5, size=(15, 6)).astype(float)
    test_tot = test.sum(1) + rng.integers(50, 500, size=15)
    tt = TargetTransform.from_spec({"kind": "sct", "library": "all"})
    tt.fit(train, totals)
    ref_train = _reference_sct(np.concatenate(train).tolist(), np.concatenate(totals).tolist(),
                               np.concatenate(train).tolist(), np.concatenate(totals).tolist())
    lo, hi = ref_train.min(0), ref_train.max(0)
    ref_test = _reference_sct(np.concatenate(train).tolist(), np.concatenate(totals).tolist(),
                              test.tolist(), test_tot.tolist())
    np.testing.assert_allclose(tt(test, total_all=test_tot), (ref_test - lo) / (hi - lo + 1e-8),
                               rtol=1e-5, atol=1e-6)
    got_train = np.concatenate([tt(c, total_all=t) for c, t in zip(train, totals)])
    assert got_train.min() == pytest.approx(0.0) and got_train.max() == pytest.approx(1.0, 1e-6)
    # statistics come from the training slides only and survive the checkpoint dict
    again = TargetTransform.from_spec(tt.to_dict())
    np.testing.assert_array_equal(again(test, total_all=test_tot), tt(test, total_all=test_tot))
    assert again.clip == pytest.approx(math.sqrt(80 / 30))
    with pytest.raises(RuntimeError, match="before fit"):
        TargetTransform(kind="sct")(test, total_all=test_tot)


def test_default_configuration_and_callbacks():
    info = hest2sge.model_info("deepspace")
    assert info["parameters"] == 134_260_544 + 4097 * 785
    assert abs(info["parameters"] - 137e6) / 137e6 < 0.1
    assert info["target_transform"]["kind"] == "sct"
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    cbs = hest2sge.models.DeepSpaCE.default_callbacks()
    es = [c for c in cbs if isinstance(c, EarlyStopping)][0]
    ck = [c for c in cbs if isinstance(c, ModelCheckpoint)][0]
    assert (es.monitor, es.patience) == ("val/loss", 5)
    assert (ck.monitor, ck.mode) == ("val/pcc", "max")
    with torch.device("meta"):
        vgg = hest2sge.load("deepspace", n_genes=3, pretrained=False)
    assert vgg.backbone.pre_logits.drop.p == 0.5 and vgg.head.in_features == 4096


def test_augmentation_families():
    torch.manual_seed(0)
    assert parse_families("flip, crop,color,random") == ("flip", "crop", "color", "random")
    assert parse_families("none") == ()
    with pytest.raises(ValueError, match="augmentation"):
        parse_families("flip,warp")
    model = hest2sge.load("deepspace", n_genes=3, **TINY)
    img = torch.rand(6, 3, 32, 32)
    out = model.augment_images(img)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, img)
    # per-sample draws: identical inputs get different outputs
    same = model.augment_images(img[:1].expand(8, -1, -1, -1).contiguous())
    assert any(not torch.equal(same[0], same[i]) for i in range(1, 8))
    flip_only = build_augmenter(("flip",), 32)
    x = torch.arange(2 * 2 * 2, dtype=torch.float32).view(2, 2, 2)
    views = {tuple(flip_only(x).flatten().tolist()) for _ in range(200)}
    assert len(views) == 8  # the dihedral group


def test_training_augments_only_training_batches(slides):
    model = hest2sge.load("deepspace", genes=list(slides[0].var_names), **TINY)
    seen: dict[str, list] = {"train": [], "val": []}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["train"].append({k: v.clone() for k, v in batch.items()})

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                      dataloader_idx=0):
            seen["val"].append(batch["img"].clone())

    dm = SpotDataModule.for_model(model, slides, split={"k": 4, "fold": 0}, batch_size=8,
                                  augment=False)
    pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
               enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
               callbacks=[hest2sge.SpotMetrics(), Spy()]).fit(model, dm)
    raw_val = next(iter(dm.val_dataloader()))["img"].float() / 255
    torch.testing.assert_close(seen["val"][0], raw_val)  # validation untouched
    batch = seen["train"][0]
    raw = torch.stack([
        torch.from_numpy(dm.tables[dm.slide_ids[int(s)]].patches[int(i)]).permute(2, 0, 1)
        for s, i in zip(batch["slide"], batch["spot"])]).float() / 255
    assert batch["img"].shape == raw.shape and not torch.allclose(batch["img"], raw)


def test_super_resolution_predicts_a_denser_grid(slides):
    torch.manual_seed(1)
    model = hest2sge.load("deepspace", genes=list(slides[0].var_names), predict_batch_size=16,
                          **TINY)
    slide = slides[0]
    sr = hest2sge.predict(model, slide, resolution="half")
    assert sr.n_obs > slide.n_obs
    assert sr.shape[1] == 12 and np.isfinite(sr.layers["pred"]).all()
    # sub-spots on a measured spot centre get the same prediction as the spot itself
    spot_pred = hest2sge.predict(model, slide).layers["pred"]
    centres = np.asarray(slide.obsm["spatial"])
    d = np.linalg.norm(sr.obsm["spatial"][:, None] - centres[None], axis=-1)
    on_spot = np.where(d.min(1) < 1e-6)[0]
    assert len(on_spot) > 0
    np.testing.assert_allclose(sr.layers["pred"][on_spot], spot_pred[d[on_spot].argmin(1)],
                               rtol=1e-4, atol=1e-5)


def test_pseudo_labels_and_self_training(slides, tmp_path):
    torch.manual_seed(2)
    genes = list(slides[0].var_names)
    teacher = hest2sge.load("deepspace", genes=genes, **TINY)
    labelled = slides[:2]
    unlabelled = synthetic_slides(n_patients=2, slides_per_patient=1, grid=(4, 4), n_genes=12,
                                  spot_pitch_px=32, seed=9)
    pl_sets = pseudo_label(teacher, unlabelled)
    allv = np.concatenate([t for _, t in pl_sets])
    assert allv.shape == (sum(s.n_obs for s in unlabelled), 12)
    np.testing.assert_allclose(allv.min(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(allv.max(0), 1.0, atol=1e-6)
    ids = [slide_id_of(s) for s in labelled]
    dm = SpotDataModule.for_model(teacher, labelled, split={"train": ids[:1], "val": ids[1:]},
                                  batch_size=8, genes=genes, allow_patient_overlap=False)
    dm.setup("fit")
    final, students = self_train(
        teacher, dm, unlabelled, rounds=2,
        trainer_kwargs={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1,
                        "logger": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "accelerator": "cpu",
                        "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path)})
    assert len(students) == 2 and final is students[-1]
    assert type(final) is type(teacher) and final is not teacher
    with pytest.raises(ValueError, match="at least 3 slides"):
        self_train(teacher, dm, unlabelled, rounds=3)


def test_train_on_real_her2st(her2st_slides, her2st_patch_cache):
    torch.manual_seed(3)
    secs = her2st_slides[:3]
    ids = [slide_id_of(s) for s in secs]
    dm = SpotDataModule(secs, split={"train": ids[:2], "val": ids[2:], "test": []},
                        genes="mean", n_genes=16, batch_size=8, cache_dir=her2st_patch_cache,
                        allow_patient_overlap=True)
    model = hest2sge.load("deepspace", genes=dm.genes, **TINY)
    before = model.head.weight.detach().clone()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", num_sanity_val_steps=0,
                         default_root_dir=str(her2st_patch_cache),
                         callbacks=hest2sge.models.DeepSpaCE.default_callbacks())
    trainer.fit(model, dm)
    assert np.isfinite(float(trainer.callback_metrics["val/loss"]))
    assert "val/pcc" in trainer.callback_metrics
    assert trainer.checkpoint_callback.best_model_path
    assert not torch.equal(before, model.head.weight)
    expr = dm.tables[ids[0]].expr
    assert expr.min() >= 0 and expr.max() <= 1 and np.isfinite(expr).all()
