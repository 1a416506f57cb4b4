"""iStar specifics: parameter count, disk aggregation, feature cache, HIPT weights, superpixel
prediction, shift averaging and training on the real HER2+ sections."""

from __future__ import annotations

import argparse
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule, synthetic_slides
from hest2sge.data.slide import SlideError
from hest2sge.models.base import prepare_batch
from hest2sge.models.istar import IStar
from hest2sge.models.layers.hipt import HIPT, box_filter, disk_offsets, hipt_feature_map

TINY = dict(IStar.tiny_config)


def _slides(seed: int = 1, n: int = 4):
    return synthetic_slides(n_patients=n, slides_per_patient=1, grid=(6, 6), n_genes=12,
                            spot_pitch_px=32, seed=seed)


def _sid(slide) -> str:
    return str(slide.obs["slide_id"].iloc[0])


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      num_sanity_val_steps=0, **kw)


def test_parameters_at_785_genes_match_table1():
    info = hest2sge.model_info("istar")
    mlp = (579 * 256 + 256) + 3 * (256 * 256 + 256) + (256 * 785 + 785)
    assert mlp == 547_601
    assert info["parameters"] == 4 * mlp  # trainable: the 4 ensemble MLPs, HIPT is frozen
    assert abs(info["parameters"] / info["paper_parameters"] - 1) < 0.10
    # frozen ViT-256 (ViT-S/16, 21.67 M) + ViT-4K-XS (2.78 M) are in the total only
    assert info["parameters_total"] - info["parameters"] == 21_665_664 + 2_781_504
    assert info["target_transform"]["kind"] == "minmax"


def test_disk_aggregation_matches_known_spot_means():
    """A feature map whose values are known: the gathered disks, the disk means of the
    forward pass (with the ensemble median) and a zero loss against spot targets set to the
    independently computed disk means."""
    slide = _slides()[0]
    model = IStar(n_genes=2, **TINY)
    scale, radius = model._geometry(slide)
    # 24 px spot diameter at 1 um/px, rescaled to 2 um/px, 4 px superpixels
    assert math.isclose(radius, 12.0 / 2.0 / 4.0)
    hs, ws = 48, 48
    rows, cols = np.meshgrid(np.arange(hs), np.arange(ws), indexing="ij")
    fmap = np.zeros((hs, ws, model.encoder.out_dim), dtype=np.float16)
    fmap[..., 0] = rows
    fmap[..., 1] = cols * 0.5
    model.compute_feature_map = lambda s: fmap  # the answer is known
    inputs = model.slide_inputs(slide)
    # independent disk: every superpixel whose grid distance to the spot's superpixel is <= r
    xy = np.asarray(slide.obsm["spatial"])
    expected = []
    for x, y in xy:
        r0, c0 = int(y * scale // 4), int(x * scale // 4)
        inside = (rows - r0) ** 2 + (cols - c0) ** 2 <= radius**2
        expected.append([rows[inside].mean(), (cols[inside] * 0.5).mean()])
        assert inputs["feat_mask"][len(expected) - 1].sum() == inside.sum()
    expected = torch.tensor(np.array(expected), dtype=torch.float32)

    class Scaled(torch.nn.Module):
        def __init__(self, k: float) -> None:
            super().__init__()
            self.k = k

        def forward(self, x):
            return self.k * x[:, :2]

    model.members = torch.nn.ModuleList(Scaled(k) for k in (3.0, 1.0, 2.0))
    batch = {k: torch.as_tensor(v) for k, v in inputs.items()}
    out = model(batch)
    torch.testing.assert_close(out["pred"], 2.0 * expected)  # median member, then disk mean
    torch.testing.assert_close(out["members"][1], expected)
    batch["expr"] = expected
    model.members = torch.nn.ModuleList([Scaled(1.0)])
    assert float(model.loss(model(batch), batch)["loss"]) < 1e-10


def test_disk_offsets_follow_the_original_mask():
    # get_disk_mask(radius): integer offsets with dy^2 + dx^2 <= radius^2
    assert len(disk_offsets(6.25)) == 121  # legacy ST: 50 um radius / 8 um superpixels
    assert len(disk_offsets(27.5 / 8)) == 37  # Visium: 27.5 um radius
    assert len(disk_offsets(0.5)) == 1
    off = disk_offsets(3.0)
    assert (off**2).sum(1).max() <= 9 and tuple(off[0]) == (0, 0)


def test_box_filter_matches_a_mirrored_window_sum():
    x = np.random.default_rng(0).normal(size=(11, 13, 3)).astype(np.float32)
    for k in (4, 16):
        pad = np.pad(x, ((k // 2, k - 1 - k // 2),) * 2 + ((0, 0),), mode="symmetric")
        ref = sum(pad[dy:dy + 11, dx:dx + 13] for dy in range(k) for dx in range(k)) / k**2
        np.testing.assert_allclose(box_filter(x.copy(), k), ref, atol=1e-5)


def test_shift_averaging_is_translation_equivariant():
    """With shifts=2 (offsets 0 and 16 px), moving the image content by 16 px moves the
    averaged token features by 4 superpixels; a single pass is not equivariant."""
    torch.manual_seed(0)
    enc = HIPT(16, 1, 2, 8, 1, 2, token_px=4, region_px=32)
    rng = np.random.default_rng(0)
    img = np.full((128, 128, 3), 255, dtype=np.uint8)
    img[32:96, 32:96] = rng.integers(0, 255, (64, 64, 3))
    moved = np.full_like(img, 255)
    moved[16:, 16:] = img[:-16, :-16]
    sub = slice(8, 8 + 16)

    def norm(x):
        return (x - 0.5) / 0.5

    def feats(im, shifts):
        return hipt_feature_map(enc, im, norm, shifts=shifts, smooth=False).astype(np.float32)

    a, b = feats(img, 2), feats(moved, 2)
    np.testing.assert_allclose(b[4 + 4:28, 4 + 4:28, sub], a[4:24, 4:24, sub], atol=2e-3)
    a1, b1 = feats(img, 1), feats(moved, 1)
    assert np.abs(b1[8:28, 8:28, sub] - a1[4:24, 4:24, sub]).max() > 0.05
    # RGB means and the superpixel grid
    assert a.shape == (32, 32, 8 + 16 + 3)
    np.testing.assert_allclose(a[10, 12, -3:], img[40:44, 48:52].reshape(-1, 3).mean(0) / 255,
                               atol=2e-3)


def test_feature_cache_is_reused(tmp_path):
    slides = _slides(seed=2)
    genes = list(slides[0].var_names)
    torch.manual_seed(0)
    model = hest2sge.load("istar", genes=genes, **TINY)
    calls = []
    model.encoder.vit256.register_forward_hook(lambda *a: calls.append(1))
    dm = SpotDataModule(slides, {"k": 4, "fold": 0}, genes=genes, cache_dir=tmp_path,
                        batch_size=8)
    _trainer(limit_train_batches=1, limit_val_batches=1).fit(model, dm)
    files = sorted(tmp_path.glob("*_istar_*.h5"))
    assert len(files) == len(dm.split.train) + len(dm.split.val) and calls  # once per slide
    n_first = len(calls)
    # a second model with the same (frozen) encoder weights and a fresh data module
    again = hest2sge.load("istar", genes=genes, **TINY)
    again.load_state_dict(model.state_dict())
    again.encoder.vit256.register_forward_hook(lambda *a: calls.append(1))
    dm2 = SpotDataModule(slides, {"k": 4, "fold": 0}, genes=genes, cache_dir=tmp_path,
                         batch_size=8)
    _trainer(limit_train_batches=1, limit_val_batches=1).fit(again, dm2)
    assert len(calls) == n_first  # the encoder was not called on the second fit
    assert sorted(tmp_path.glob("*_istar_*.h5")) == files
    # batch features equal whether computed or read from the cache
    b1 = next(iter(dm.val_dataloader()))
    b2 = next(iter(dm2.val_dataloader()))
    torch.testing.assert_close(b1["feat"], b2["feat"])
    # another encoder: a different fingerprint, and its batches are refused by the first
    other = hest2sge.load("istar", genes=genes, **TINY)
    assert other.encoder_key() != model.encoder_key()
    with pytest.raises(ValueError, match="different encoder"):
        other(prepare_batch(b1))
    other.slide_inputs(slides[0], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*_istar_*.h5"))) == len(files) + 1
    # image mode: batches of shuffled spots; a data module handed another model rebuilds
    # the per-spot inputs with that model's encoder
    assert dm.input_mode == "image" and b1["feat"].shape[0] == 8
    dm3 = SpotDataModule.for_model(model, slides, {"k": 4, "fold": 0}, cache_dir=tmp_path)
    dm3.setup("validate")
    dm3.configure_for(other)
    dm3.setup("validate")
    b3 = prepare_batch(next(iter(dm3.val_dataloader())))
    assert torch.isfinite(other(b3)["pred"]).all()


def _dino_file(path, module, with_head: bool = True):
    sd = {f"module.backbone.{k}": v.clone() + 0.5 for k, v in module.state_dict().items()}
    if with_head:
        sd["module.head.mlp.0.weight"] = torch.randn(4, module.dim)
        sd["module.head.last_layer.weight_g"] = torch.ones(3, 1)
    torch.save({"teacher": sd, "student": sd, "epoch": 3,
                "args": argparse.Namespace(arch="vit_small", patch_size=16)}, path)
    return {k: v.clone() + 0.5 for k, v in module.state_dict().items()}


def test_local_hipt_weights_with_original_key_names(tmp_path):
    ref = HIPT(16, 1, 2, 8, 1, 2, token_px=4, region_px=32)
    want256 = _dino_file(tmp_path / "vit256_small_dino.pth", ref.vit256)
    want4k = _dino_file(tmp_path / "vit4k_xs_dino.pth", ref.vit4k)
    assert "phi.0.weight" in want4k and "patch_embed.proj.weight" in want256
    for pretrained in (str(tmp_path), [tmp_path / "vit256_small_dino.pth",
                                       tmp_path / "vit4k_xs_dino.pth"]):
        model = IStar(n_genes=3, **{**TINY, "pretrained": pretrained})
        for k, v in want256.items():
            torch.testing.assert_close(model.encoder.vit256.state_dict()[k], v)
        for k, v in want4k.items():
            torch.testing.assert_close(model.encoder.vit4k.state_dict()[k], v)
        assert not any(p.requires_grad for p in model.encoder.parameters())
    # a checkpoint of another width is refused, naming the file
    big = HIPT(32, 1, 2, 8, 1, 2, token_px=4, region_px=32)
    _dino_file(tmp_path / "wide.pth", big.vit256)
    with pytest.raises(ValueError, match="wide.pth"):
        IStar(n_genes=3, **{**TINY, "pretrained": [tmp_path / "wide.pth",
                                                   tmp_path / "vit4k_xs_dino.pth"]})
    with pytest.raises(FileNotFoundError):
        IStar(n_genes=3, **{**TINY, "pretrained": str(tmp_path / "missing")})


def test_superpixel_prediction_anndata():
    slide = _slides()[1]
    torch.manual_seed(0)
    model = hest2sge.load("istar", genes=list(slide.var_names), **TINY)
    full = model.predict_slide(slide, tissue_only=False)
    # 384 px at 1 um/px -> 192 px at 2 um/px -> 48 x 48 superpixels of 4 px (8 full-res px)
    assert full.shape == (48 * 48, 12) and list(full.var_names) == list(slide.var_names)
    xy = full.obsm["spatial"]
    np.testing.assert_allclose(xy[:, 0], (full.obs["col"].to_numpy() + 0.5) * 8.0)
    np.testing.assert_allclose(xy[:, 1], (full.obs["row"].to_numpy() + 0.5) * 8.0)
    assert full.uns["hest2sge"]["superpixel_fullres_px"] == 8.0
    tissue = hest2sge.predict(model, slide, resolution="superpixel")
    assert 0 < tissue.n_obs <= full.n_obs
    # each prediction is the ensemble median of the MLPs on that superpixel's features
    fmap = model.compute_feature_map(slide)
    r, c = int(tissue.obs["row"].iloc[5]), int(tissue.obs["col"].iloc[5])
    with torch.no_grad():
        _, med = model.superpixel_predict(torch.from_numpy(fmap[r, c][None]).float())
    np.testing.assert_allclose(tissue.X[5], med[0].numpy(), rtol=1e-5, atol=1e-6)
    # the spot-level prediction is the mean of the superpixels of each spot's disk
    spots = hest2sge.predict(model, slide)
    sp = model.spot_superpixels(slide)[0]
    _, radius = model._geometry(slide)
    grid = full.obs[["row", "col"]].to_numpy()
    inside = ((grid - sp) ** 2).sum(1) <= radius**2
    np.testing.assert_allclose(spots.X[0], full.X[inside].mean(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="superpixel"):
        hest2sge.predict(model, slide, resolution="half")


def test_clear_errors():
    slide = _slides()[0]
    sid = _sid(slide)
    model = IStar(n_genes=2, **TINY)
    with pytest.raises(ValueError, match="feat"):
        model({"img": torch.zeros(2, 3, 16, 16)})
    slide.uns["spatial"][sid]["pixel_size_um"] = float("nan")
    with pytest.raises(SlideError, match="pixel_size_um"):
        model.slide_inputs(slide)
    slide.uns["spatial"][sid]["pixel_size_um"] = 1.0
    slide.uns["spatial"][sid]["scalefactors"]["spot_diameter_fullres"] = float("nan")
    with pytest.raises(SlideError, match="spot_diameter_fullres"):
        model.slide_inputs(slide)
    with pytest.raises(ValueError, match="shifts"):
        IStar(n_genes=2, **{**TINY, "shifts": 3})
    with pytest.raises(ValueError, match="pretrained"):
        IStar(n_genes=2, **{**TINY, "pretrained": 3})


def test_trains_on_real_her2st_sections(her2st_slides, tmp_path):
    """Tiny encoder, coarse 8 um pixels (a ~800 px image per section) on two sections."""
    slides = her2st_slides[:2]
    ids = [_sid(s) for s in slides]
    dm = SpotDataModule(slides, {"train": ids[:1], "val": ids[1:]}, genes="paper",
                        n_top_hvg=300, min_spots=100, allow_patient_overlap=True,
                        batch_size=32, cache_dir=tmp_path)
    torch.manual_seed(0)
    model = hest2sge.load("istar", genes=dm.genes, **{**TINY, "pixel_size_um": 8.0})
    # legacy ST: 100 um spots -> radius 50 um = 6.25 superpixels of 8 um at the paper's scale
    paper = IStar(n_genes=2, pretrained=False)
    assert math.isclose(paper._geometry(slides[0])[1], 6.25, rel_tol=1e-6)
    before = [p.detach().clone() for p in model.members.parameters()]
    trainer = _trainer(limit_train_batches=4, limit_val_batches=3,
                       callbacks=[hest2sge.SpotMetrics()])
    trainer.fit(model, dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/pcc"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.members.parameters()))
    assert len(list(tmp_path.glob("*_istar_*.h5"))) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["feat"].shape[1:] == (9, model.encoder.out_dim)  # radius 1.56 superpixels
    sp = hest2sge.predict(model, slides[1], resolution="superpixel", cache_dir=tmp_path)
    assert sp.n_obs > slides[1].n_obs and np.isfinite(sp.X).all()
    # the spots sit on tissue: (almost) all their superpixels pass the tissue rule
    kept = set(zip(sp.obs["row"], sp.obs["col"]))
    spots = model.spot_superpixels(slides[1])
    assert np.mean([tuple(rc) in kept for rc in spots]) > 0.9
    # and superpixel centres map back onto the spots: the nearest one is within 1/sqrt(2) of
    # a superpixel (32 um here) of each spot centre
    centre = {(r, c): i for i, (r, c) in enumerate(zip(sp.obs["row"], sp.obs["col"]))}
    xy = np.asarray(slides[1].obsm["spatial"])
    px = sp.uns["hest2sge"]["superpixel_fullres_px"]
    d = [np.hypot(*(sp.obsm["spatial"][centre[tuple(rc)]] - xy[i]))
         for i, rc in enumerate(spots) if tuple(rc) in centre]
    assert max(d) <= px / math.sqrt(2) + 1e-6
