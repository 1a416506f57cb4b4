"""DeepPT: Table 1 counting, the frozen-feature cache, ensembles, training on real sections."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule, synthetic_slides
from hest2sge.data.slide import slide_id_of
from hest2sge.models.base import prepare_batch
from hest2sge.models.deeppt import dihedral

TINY = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32, "bottleneck": 16,
        "hidden": 16}


@pytest.fixture(scope="module")
def slides():
    return synthetic_slides(n_patients=4, slides_per_patient=1, grid=(6, 6), n_genes=12,
                            spot_pitch_px=32, seed=2)


def _trainer(epochs: int = 1, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", num_sanity_val_steps=0,
                      callbacks=[hest2sge.SpotMetrics(), *callbacks])


def _count_calls(model) -> list[int]:
    calls = [0]
    original = model.extract_features

    def counted(img):
        calls[0] += 1
        return original(img)

    model.extract_features = counted
    return calls


def test_parameter_count_matches_table1_with_frozen_trunk():
    info = hest2sge.model_info("deeppt")
    trunk, ae, mlp = 23_508_032, 2_099_712, 262_656 + 513 * 785
    assert info["parameters"] == trunk + ae + mlp
    assert abs(info["parameters"] - 26e6) / 26e6 < 0.1
    with torch.device("meta"):
        model = hest2sge.load("deeppt", n_genes=785, pretrained=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ae + mlp
    assert info["target_transform"] == {"kind": "raw"}


def test_feature_cache_is_reused_across_epochs_and_fits(slides, tmp_path):
    torch.manual_seed(0)
    genes = list(slides[0].var_names)
    model = hest2sge.load("deeppt", genes=genes, cache_views=2, **TINY)
    calls = _count_calls(model)
    per_epoch: list[int] = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            per_epoch.append(calls[0])

    dm = SpotDataModule.for_model(model, slides, split={"k": 4, "fold": 0}, batch_size=8,
                                  cache_dir=tmp_path)
    _trainer(2, [Record()]).fit(model, dm)
    assert calls[0] > 0 and per_epoch == [calls[0], calls[0]]  # nothing after extraction
    files = sorted(p.name for p in tmp_path.glob("*.deeppt-*.h5"))
    assert any(f.endswith("-x2.h5") for f in files) and any(f.endswith("-x1.h5") for f in files)
    n_train = sum(s.n_obs for s in slides if slide_id_of(s) in dm.split.train)
    train_feats = [model._features[dm.slide_ids.index(s)] for s in dm.split.train]
    assert sum(f.shape[1] for f in train_feats) == n_train
    assert all(f.shape[0] == 2 for f in train_feats)
    # another data module (other slide order): its indices mean other slides, no cache use
    before = calls[0]
    other_dm = SpotDataModule.for_model(model, slides[::-1], split={"k": 4, "fold": 0},
                                        batch_size=8, cache_dir=tmp_path)
    _trainer(1).validate(model, other_dm)
    assert calls[0] > before

    # a second model with the same trunk weights finds every file: no extraction at all
    again = hest2sge.load("deeppt", genes=genes, cache_views=2, **TINY)
    again.load_state_dict(model.state_dict())
    calls2 = _count_calls(again)
    dm2 = SpotDataModule.for_model(again, slides, split={"k": 4, "fold": 0}, batch_size=8,
                                   cache_dir=tmp_path)
    _trainer(1).fit(again, dm2)
    assert calls2[0] == 0
    # different trunk weights: the fingerprint differs and features are recomputed
    other = hest2sge.load("deeppt", genes=genes, cache_views=2, **TINY)
    calls3 = _count_calls(other)
    dm3 = SpotDataModule.for_model(other, slides, split={"k": 4, "fold": 0}, batch_size=8,
                                   cache_dir=tmp_path)
    _trainer(1).fit(other, dm3)
    assert calls3[0] > 0


def test_cached_features_equal_end_to_end(slides):
    torch.manual_seed(1)
    model = hest2sge.load("deeppt", genes=list(slides[0].var_names), cache_views=8, **TINY)
    dm = SpotDataModule.for_model(model, slides, split={"k": 4, "fold": 0}, batch_size=8)
    dm.setup("fit")
    sid = dm.split.train[0]
    feats = model.slide_features(dm, sid, views=8)
    store = dm.table(sid).patches
    img = prepare_batch({"img": torch.from_numpy(store.get_many([0, 1, 2])).permute(0, 3, 1, 2)})
    for v in (0, 3, 5):
        ref = model.extract_features(dihedral(img["img"], v))
        torch.testing.assert_close(feats[v, :3], ref, rtol=1e-4, atol=1e-5)
    # the model's forward reads the cache: same prediction as running the trunk
    model.eval()
    model._features = {dm.slide_ids.index(sid): feats}
    model._feature_ids = list(dm.slide_ids)
    batch = dict(img, slide=torch.full((3,), dm.slide_ids.index(sid)), spot=torch.arange(3))
    with torch.no_grad():
        cached = model(batch)["pred"]
        model._features = {}
        direct = model(batch)["pred"]
    torch.testing.assert_close(cached, direct, rtol=1e-4, atol=1e-5)


def test_ensemble_averages_members_and_fine_tuning_trains_the_trunk(slides):
    torch.manual_seed(2)
    model = hest2sge.load("deeppt", genes=list(slides[0].var_names), ensemble=3,
                          freeze_backbone=False, **TINY)
    batch = {"img": torch.rand(4, 3, 32, 32), "expr": torch.rand(4, 12)}
    out = model(batch)
    assert out["member_pred"].shape == (3, 4, 12)
    torch.testing.assert_close(out["pred"], out["member_pred"].mean(0))
    losses = model.loss(out, batch)
    assert set(losses) == {"loss", "mse", "recon"}
    losses["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="ensemble"):
        hest2sge.load("deeppt", n_genes=3, ensemble=0, **TINY)


def test_train_on_real_her2st(her2st_slides, her2st_patch_cache):
    torch.manual_seed(3)
    secs = her2st_slides[:3]
    ids = [slide_id_of(s) for s in secs]
    dm = SpotDataModule(secs, split={"train": ids[:2], "val": ids[2:], "test": []},
                        genes="mean", n_genes=16, batch_size=16, cache_dir=her2st_patch_cache,
                        allow_patient_overlap=True)
    model = hest2sge.load("deeppt", genes=dm.genes, cache_views=2, **TINY)
    before = [p.detach().clone() for p in model.members.parameters()]
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu",
                         num_sanity_val_steps=0, callbacks=[hest2sge.SpotMetrics()])
    trainer.fit(model, dm)
    assert np.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert "val/pcc" in trainer.callback_metrics
    changed = [not torch.equal(a, b) for a, b in zip(before, model.members.parameters())]
    assert any(changed)
    # raw targets: the batch targets are the panel counts themselves
    t = dm.tables[ids[0]]
    np.testing.assert_array_equal(t.expr, t.counts)
