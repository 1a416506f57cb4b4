"""ST-Net specifics: head initialisation, local pretrained weights, loss, real-data training."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule, patient_kfold, synthetic_slides


def test_head_starts_at_zero_weight_and_mean_target():
    slides = synthetic_slides(n_patients=4, slides_per_patient=1, grid=(5, 5), n_genes=8,
                              spot_pitch_px=32, seed=4)
    model = hest2sge.load("stnet", genes=list(slides[0].var_names), pretrained=False,
                          backbone="test_resnet", patch_size=32)
    assert torch.count_nonzero(model.head.weight) == 0
    dm = SpotDataModule.for_model(model, slides, patient_kfold(slides, 4, 0))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu")
    trainer.fit(model, dm)
    expected = torch.as_tensor(dm.train_target_mean)
    torch.testing.assert_close(model.head.bias.detach(), expected)
    # ST-Net's own target: ln((1 + c) / (n_all + total over all genes)), all negative
    assert (expected < 0).all()


def test_local_pretrained_weights_file(tmp_path):
    from hest2sge.models.layers.backbones import create_backbone

    src = create_backbone("test_resnet", pretrained=False)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model = hest2sge.load("stnet", n_genes=3, backbone="test_resnet", pretrained=str(path))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not fit this backbone"):
        hest2sge.load("stnet", n_genes=3, backbone="test_resnet", pretrained=str(bad))
    with pytest.raises(FileNotFoundError):
        hest2sge.load("stnet", n_genes=3, backbone="test_resnet", pretrained=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="unknown timm backbone"):
        hest2sge.load("stnet", n_genes=3, backbone="densenet_nope", pretrained=False)


def test_summed_loss_matches_original_definition():
    model = hest2sge.load("stnet", n_genes=4, backbone="test_resnet", pretrained=False)
    out, y = torch.randn(6, 4), torch.randn(6, 4)
    assert model.loss(out, {"expr": y}) == pytest.approx(float(((out - y) ** 2).sum() / 4))
    mean_model = hest2sge.load("stnet", n_genes=4, backbone="test_resnet", pretrained=False,
                               loss_reduction="mean")
    assert mean_model.loss(out, {"expr": y}) == pytest.approx(float(((out - y) ** 2).mean()))


def test_tta_averages_dihedral_views():
    model = hest2sge.load("stnet", n_genes=2, backbone="test_resnet", pretrained=False, tta=True)
    model.eval()
    img = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a = model({"img": img})
        b = model({"img": torch.rot90(img.flip(3), 1, dims=(2, 3))})
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_trains_on_real_her2st_sections(her2st_slides, tmp_path):
    slides = her2st_slides[:3]
    split = {"train": [s.obs["slide_id"].iloc[0] for s in slides[:2]],
             "val": [slides[2].obs["slide_id"].iloc[0]]}
    dm = SpotDataModule(slides, split, genes="paper", n_top_hvg=300, min_spots=200,
                        allow_patient_overlap=True, batch_size=16, pixel_size_um=4.0,
                        cache_dir=tmp_path)
    assert 20 < len(dm.genes) <= 600
    model = hest2sge.load("stnet", genes=dm.genes, backbone="test_resnet", pretrained=False,
                          patch_size=32, optimizer="adam", lr=1e-3, loss_reduction="mean")
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu", num_sanity_val_steps=0,
                         callbacks=[hest2sge.SpotMetrics()])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, dm)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("backbone.") for k in changed)
    assert torch.isfinite(trainer.callback_metrics["val/pcc"])
    # one cache file per slide: 32 px patches at 4 um/px (128 um of tissue, ~185 image px)
    assert len(list(tmp_path.glob("*.h5"))) == 3
