"""HisToGene: paper configuration, real-data training, position tables, super-resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule, synthetic_slides
from hest2sge.models.base import prepare_batch
from hest2sge.models.layers.position import XYEmbedding, check_coordinates
from hest2sge.models.layers.superres import (
    aggregate_subspots,
    fit_array_to_pixel,
    pixel_to_array,
    subspot_grid,
)

TINY = hest2sge.registry.get_model_class("histogene").tiny_config


@pytest.fixture(scope="module")
def square_slide():
    return synthetic_slides(n_patients=1, slides_per_patient=1, grid=(6, 6), n_genes=8,
                            spot_pitch_px=32, seed=3)[0]


def _tiny(slide, **kw):
    torch.manual_seed(0)
    return hest2sge.load("histogene", genes=list(slide.var_names), **{**TINY, **kw})


def test_paper_configuration_parameters():
    info = hest2sge.model_info("histogene")
    assert info["input_mode"] == "slide" and info["patch_size"] == 224
    assert info["target_transform"]["kind"] == "log_norm"
    assert abs(info["parameters"] - 222e6) / 222e6 < 0.10
    d = info["defaults"]
    assert (d["n_layers"], d["heads"], d["dropout"], d["n_pos"]) == (8, 16, 0.1, 128)


def test_trains_on_real_her2st_slides(her2st_slides, tmp_path):
    slides = her2st_slides[:2]
    ids = [s.obs["slide_id"].iloc[0] for s in slides]
    dm = SpotDataModule(slides, split={"train": ids}, genes="mean",
                        n_genes=30, pixel_size_um=8.0, cache_dir=tmp_path, augment=False)
    torch.manual_seed(0)
    model = hest2sge.load("histogene", genes=dm.genes, **{**TINY, "dropout": 0.0})
    dm.configure_for(model)
    dm.setup("fit")
    assert dm.input_mode == "slide"
    batches = [prepare_batch(b) for b in dm.train_dataloader()]
    batch = batches[0]
    assert len(batches) == 2
    assert batch["img"].shape[1:] == (3, 16, 16) and batch["img"].shape[0] > 150
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def mean_loss() -> float:
        with torch.no_grad():
            return float(np.mean([model.loss(model(b), b).item() for b in batches]))

    before = mean_loss()
    for step in range(6):
        b = batches[step % 2]
        loss = model.loss(model(b), b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert mean_loss() < 0.7 * before


def test_position_tables_fit_visium_coordinates(tmp_path):
    slide = synthetic_slides(n_patients=1, slides_per_patient=1, grid=(4, 4), n_genes=8,
                             spot_pitch_px=32, layout="hex", seed=2)[0]
    assert (slide.obs["array_col"] % 2 == slide.obs["array_row"] % 2).all()
    slide.obs["array_col"] += 127 - int(slide.obs["array_col"].max())  # Visium: col up to 127
    model = _tiny(slide).eval()
    pred = hest2sge.predict(model, slide)  # default n_pos=128 fits
    assert np.isfinite(pred.X).all()

    small = _tiny(slide, n_pos=64).eval()
    with pytest.raises(ValueError, match=r"x \(array_col\) = 127.*n_pos=64.*n_pos >= 128"):
        hest2sge.predict(small, slide)
    with pytest.raises(ValueError, match=r"slide 'P0_S0'.*n_pos >= 128"):
        small.on_datamodule(type("DM", (), {"slides": [slide]})())
    with pytest.raises(ValueError, match=r"y \(array_row\) = -1.*non-negative"):
        check_coordinates(torch.tensor([[3, -1]]), 64)

    # the table size is a hyperparameter: a checkpoint restores it
    big = _tiny(slide, n_pos=200)
    ckpt = {"state_dict": big.state_dict()}
    big.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "h.ckpt")
    restored = hest2sge.load(checkpoint=tmp_path / "h.ckpt")
    assert restored.position.n_pos == 200


def test_xy_embedding_modes():
    add, cat = XYEmbedding(10, 4, "add"), XYEmbedding(10, 4, "concat")
    c = torch.tensor([[1, 2], [9, 0]])
    assert add(c).shape == (2, 4) and cat(c).shape == (2, 8)
    torch.testing.assert_close(add(c)[0], add.x_embed.weight[1] + add.y_embed.weight[2])
    torch.testing.assert_close(cat(c)[1], torch.cat([cat.x_embed.weight[9], cat.y_embed.weight[0]]))
    with pytest.raises(ValueError, match="mode"):
        XYEmbedding(10, 4, "sum")


def test_chunked_patch_embedding_is_exact(square_slide):
    slide = square_slide
    dm = SpotDataModule.for_model(_tiny(slide), [slide], split={"train": ["P0_S0"]},
                                  genes=list(slide.var_names), augment=False)
    dm.setup("fit")
    batch = prepare_batch(next(iter(dm.train_dataloader())))
    grads = []
    outs = []
    for chunk in (0, 7):
        model = _tiny(slide, dropout=0.0, checkpoint_spots=chunk, checkpointing=bool(chunk))
        model.train()
        out = model(batch)
        model.loss(out, batch).backward()
        outs.append(out.detach())
        grads.append(model.patch_embedding.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    # patches may stay uint8 (the model's on_after_batch_transfer keeps them so)
    raw = model.on_after_batch_transfer({**batch, "img": (batch["img"] * 255).round().byte()}, 0)
    assert raw["img"].dtype == torch.uint8
    model.eval()
    torch.testing.assert_close(model(raw), model(batch), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="patch_size=16"):
        _tiny(slide)({"img": torch.zeros(2, 3, 8, 8), "coord": torch.zeros(2, 2, dtype=torch.long)})


def test_subspots_coinciding_with_spots_reproduce_spot_predictions(square_slide):
    slide = square_slide
    model = _tiny(slide).eval()
    spot = hest2sge.predict(model, slide)
    sr = hest2sge.predict(model, slide, resolution=32.0)  # step = pitch: sub-spots = spots
    assert sr.n_obs == slide.n_obs
    assert sr.obs["in_spot"].all() and np.allclose(sr.obs["dist_to_spot"], 0.0)
    order = sr.obs["spot_index"].to_numpy()
    assert sorted(order) == list(range(slide.n_obs))
    np.testing.assert_array_equal(sr.obs[["array_col", "array_row"]].to_numpy(),
                                  slide.obs[["array_col", "array_row"]].to_numpy()[order])
    agg = aggregate_subspots(sr, n_spots=slide.n_obs)
    np.testing.assert_allclose(agg, spot.layers["pred"], rtol=1e-5, atol=1e-5)


def test_half_resolution_grid_and_agreement(square_slide):
    slide = square_slide
    model = _tiny(slide).eval()
    sr = hest2sge.predict(model, slide, resolution="half")
    meta = sr.uns["hest2sge"]
    assert meta["step_px"] == pytest.approx(16.0) and meta["pitch_px"] == pytest.approx(32.0)
    # 6 x 6 spots, bounding box widened by half a pitch: 13 x 13 sub-spots at half the pitch
    assert sr.n_obs == 13 * 13
    frac = sr.obs[["array_col_frac", "array_row_frac"]].to_numpy()
    np.testing.assert_allclose(frac * 2, np.round(frac * 2), atol=1e-6)  # on the half grid
    np.testing.assert_allclose(frac, np.asarray(sr.obsm["spatial"]) / 32.0
                               - np.asarray(slide.obsm["spatial"])[0] / 32.0
                               + slide.obs[["array_col", "array_row"]].to_numpy()[0], atol=1e-6)
    inside = sr.obs["in_spot"].to_numpy()
    assert inside.sum() == slide.n_obs  # one sub-spot per spot disc (radius 12 px < step)
    agg = aggregate_subspots(sr, n_spots=slide.n_obs)
    spot = hest2sge.predict(model, slide).layers["pred"]
    r = [np.corrcoef(agg[:, g], spot[:, g])[0, 1] for g in range(spot.shape[1])]
    assert np.nanmean(r) > 0.9
    # a quarter-pitch grid averages 9 shifted patches per spot disc
    sr4 = hest2sge.predict(model, slide, resolution="quarter")
    agg4 = aggregate_subspots(sr4, n_spots=slide.n_obs)
    assert (sr4.obs.groupby("spot_index")["in_spot"].sum() == 9).all()
    r4 = [np.corrcoef(agg4[:, g], spot[:, g])[0, 1] for g in range(spot.shape[1])]
    assert np.nanmean(r4) > 0.8
    with pytest.raises(ValueError, match="resolution 'double'"):
        hest2sge.predict(model, slide, resolution="double")


def test_affine_grid_on_real_her2st_spots(her2st_slides):
    for slide in her2st_slides[:2]:
        pos = np.asarray(slide.obsm["spatial"])
        coord = slide.obs[["array_col", "array_row"]].to_numpy()
        frac = pixel_to_array(fit_array_to_pixel(coord, pos), pos)
        assert np.abs(frac - coord).max() < 0.25
    grid = subspot_grid(her2st_slides[0], "half")
    assert 3.0 < len(grid) / her2st_slides[0].n_obs < 5.0
    assert grid.pitch == pytest.approx(200 / 0.69, rel=0.05)
