"""Hist2ST: parameter count, ZINB likelihood, Grid graph, distillation modes, real-data fit."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule
from hest2sge.data.graphs import knn_graph
from hest2sge.models.hist2st import Hist2ST, augment_views
from hest2sge.models.hist2st_zinb import ZINBHead, zinb_nll

TINY = dict(Hist2ST.tiny_config)


def _grid_batch(n_genes: int = 5, isolated: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    coord = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(5), indexing="ij"), -1)
    coord = coord.reshape(-1, 2)
    if isolated:
        coord = torch.cat([coord, torch.tensor([[20, 20]])])
    n = coord.shape[0]
    return {
        "img": torch.rand(n, 3, 16, 16, generator=g),
        "coord": coord,
        "expr": torch.randn(n, n_genes, generator=g),
        "counts": torch.poisson(torch.rand(n, n_genes, generator=g) * 3, generator=g),
        "size_factor": torch.rand(n, generator=g) + 0.5,
        "edge_index": knn_graph(coord.numpy(), k=4, max_dist=2.0),
    }


def test_paper_configuration_parameters():
    info = hest2sge.model_info("hist2st")
    assert info["input_mode"] == "slide" and info["patch_size"] == 224
    assert abs(info["parameters"] / 230e6 - 1) < 0.10
    with torch.device("meta"):
        model = Hist2ST(n_genes=785)
    assert model.dim == 2048  # (224 / 7)^2 * 16 / 8
    assert model.graph_k == 4 and model.graph_max_dist == 2.0 and model.needs_counts


def test_zinb_nll_matches_scipy():
    from scipy.stats import nbinom

    rng = np.random.default_rng(0)
    n, g = 40, 7
    mu = rng.uniform(0.05, 30.0, (n, g))
    theta = rng.uniform(0.2, 20.0, (n, g))
    pi = rng.uniform(0.0, 0.9, (n, g))
    sf = rng.uniform(0.5, 2.0, n)
    x = rng.negative_binomial(2, 0.3, (n, g)).astype(float)
    x[rng.random((n, g)) < 0.3] = 0.0
    m = mu * sf[:, None]
    nb = nbinom.logpmf(x, theta, theta / (theta + m))
    ll = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(nb)), np.log(1 - pi) + nb)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    ours = zinb_nll(t(x), t(mu), t(theta), t(pi), t(sf), reduction="none")
    np.testing.assert_allclose(ours.numpy(), -ll, rtol=1e-6, atol=1e-6)
    mean = zinb_nll(t(x), t(mu), t(theta), t(pi), t(sf))
    assert mean.item() == pytest.approx(-ll.mean(), rel=1e-6)
    with pytest.raises(ValueError, match="size_factor"):
        zinb_nll(t(x), t(mu), t(theta), t(pi), t(sf[:3]))
    head = ZINBHead(4, 3)
    mean, disp, p = head(torch.randn(5, 4) * 100)
    assert mean.min() >= 1e-5 and disp.min() >= 1e-4 and ((p >= 0) & (p <= 1)).all()


def test_grid_graph_on_known_grid():
    # a 5 x 5 grid, a spot 2.83 from the grid and one far away
    coord = np.array([(x, y) for y in range(5) for x in range(5)] + [(6, 6), (20, 20)])
    ei = knn_graph(coord, k=4, max_dist=2.0)
    incoming = {i: sorted(ei[0, ei[1] == i].tolist()) for i in range(len(coord))}
    idx = {tuple(c): i for i, c in enumerate(coord.tolist())}
    # an interior spot receives from its 4 axis neighbours (distance 1)
    assert incoming[idx[(2, 2)]] == sorted(idx[c] for c in [(1, 2), (3, 2), (2, 1), (2, 3)])
    # a corner: 2 at distance 1, the diagonal (sqrt 2) and one distance-2 spot (kept: <= 2)
    corner = incoming[idx[(0, 0)]]
    assert len(corner) == 4 and {idx[(1, 0)], idx[(0, 1)], idx[(1, 1)]} <= set(corner)
    # (6, 6): nearest is (4, 4) at 2.83 > 2: every edge pruned; (20, 20) is isolated too
    assert incoming[idx[(6, 6)]] == [] and incoming[idx[(20, 20)]] == []
    # no self loops, at most k incoming edges, directed (no symmetrisation needed)
    assert (ei[0] != ei[1]).all() and max(len(v) for v in incoming.values()) == 4
    # Grid keeps distance 2 and prunes sqrt(5): (0, 0) receives from (0, 2) only
    ei = knn_graph(np.array([(0, 0), (2, 1), (0, 2)]), k=4, max_dist=2.0)
    assert ei[0, ei[1] == 0].tolist() == [2]
    plain = knn_graph(coord, k=4)  # "NA" pruning keeps 4 edges for everyone
    assert (torch.bincount(plain[1], minlength=len(coord)) == 4).all()


def test_isolated_spot_gives_no_nan():
    torch.manual_seed(0)
    model = Hist2ST(n_genes=5, **TINY)
    batch = _grid_batch(isolated=True)
    iso = batch["coord"].shape[0] - 1
    assert not (batch["edge_index"][1] == iso).any()
    out = model(batch)
    loss = model.loss(out, batch)["loss"]
    loss.backward()
    assert torch.isfinite(out["pred"]).all() and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the GraphSAGE mean over an empty neighbourhood is zero (the original divides 0 by 0)
    conv = model.gnn[0]
    h = conv(torch.randn(len(batch["coord"]), model.dim), batch["edge_index"])
    assert torch.equal(h[iso], torch.zeros(model.dim))


def _step(model, batch, mode, ckpt, seed=3):
    model.hparams.distill_mode, model.hparams.checkpointing = mode, ckpt
    model.train()
    model.zero_grad()
    aug = model.draw_augmentations(batch["img"].shape[0], torch.Generator().manual_seed(seed))
    losses = model.loss(model(batch, aug=aug), batch)
    losses["loss"].backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    bn = model.encoder.blocks[0].bn1
    return losses, grads, (bn.running_mean.clone(), int(bn.num_batches_tracked))


@pytest.mark.parametrize("per_spot,chunk", [(False, 7), (True, 64), (False, 128)])
def test_batched_equals_sequential_distillation(per_spot, chunk):
    torch.manual_seed(0)
    base = Hist2ST(n_genes=5, **{**TINY, "dropout": 0.0, "encoder_chunk": chunk,
                                 "distill_views": 3, "aug_per_spot": per_spot})
    n_chunks = -(-30 // chunk)
    batch = _grid_batch()
    ref_loss, ref_grad, ref_bn = _step(copy.deepcopy(base), batch, "batched", "none")
    assert ref_loss["distill"] > 0
    for mode, ckpt in [("sequential", "none"), ("sequential", "views"), ("sequential", "full"),
                       ("batched", "encoder"), ("batched", "full")]:
        loss, grad, bn = _step(copy.deepcopy(base), batch, mode, ckpt)
        for k in ("loss", "mse", "zinb", "distill"):
            torch.testing.assert_close(loss[k], ref_loss[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
        # BatchNorm running statistics: one update per view and chunk, none on recomputation
        # (with several chunks the order of the updates differs between the modes)
        assert bn[1] == ref_bn[1] == 4 * n_chunks  # anchor + 3 views
        if n_chunks == 1:
            torch.testing.assert_close(bn[0], ref_bn[0])
    # a different augmentation draw changes the distillation term
    other, _, _ = _step(copy.deepcopy(base), batch, "batched", "none", seed=4)
    assert not torch.isclose(other["distill"], ref_loss["distill"])


def test_memory_plan_and_eval():
    model = Hist2ST(n_genes=5, **TINY)  # 2 views, max_live_spots 4096
    assert model.memory_plan(300) == {"views": 2, "mode": "batched", "checkpointing": "encoder"}
    assert model.memory_plan(4000) == {"views": 2, "mode": "sequential", "checkpointing": "views"}
    assert model.memory_plan(5000)["checkpointing"] == "full"
    assert model.memory_plan(4000, distill=False) == {"views": 0, "mode": "batched",
                                                      "checkpointing": "encoder"}
    with pytest.raises(ValueError, match="checkpointing"):
        Hist2ST(n_genes=5, **{**TINY, "checkpointing": True})
    batch = _grid_batch()
    out = model(batch)
    assert out["view_pred"].shape == (2, 30, 5) and out["view_coef"].shape == (2, 30, 1)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert "view_pred" not in out and out["pred"].shape == (30, 5)
    assert set(model.loss(out, batch)) == {"loss", "mse", "zinb"}


def test_augmentations():
    x = torch.rand(4, 3, 8, 8)
    none = {"gray": torch.zeros(1, 1, dtype=torch.bool), "angle": torch.zeros(1, 1),
            "flip": torch.zeros(1, 1, dtype=torch.bool)}
    assert torch.equal(augment_views(x, none), x)
    views = {"gray": torch.tensor([[True], [False], [False]]),
             "angle": torch.tensor([[0.0], [90.0], [0.0]]),
             "flip": torch.tensor([[False], [False], [True]])}
    y = augment_views(x, views).view(3, 4, 3, 8, 8)
    assert torch.allclose(y[0, :, 0], y[0, :, 1]) and torch.allclose(y[0, :, 1], y[0, :, 2])
    assert torch.equal(y[1], torch.rot90(x, 1, (2, 3))) or torch.equal(y[1],
                                                                         torch.rot90(x, -1, (2, 3)))
    assert torch.equal(y[2], x.flip(-1))
    per_spot = {k: v[:, :1].expand(2, 4).clone() for k, v in none.items()}
    per_spot["flip"][1, 2] = True
    z = augment_views(x, per_spot).view(2, 4, 3, 8, 8)
    assert torch.equal(z[1, 2], x[2].flip(-1)) and torch.equal(z[1, 1], x[1])


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 8"):
        Hist2ST(n_genes=3, channel=12)
    with pytest.raises(ValueError, match="distill_mode"):
        Hist2ST(n_genes=3, **{**TINY, "distill_mode": "fast"})
    model = Hist2ST(n_genes=5, **TINY)
    batch = _grid_batch()
    with pytest.raises(ValueError, match="img"):
        model({**batch, "img": torch.rand(30, 3, 32, 32)})
    with pytest.raises(ValueError, match="one slide"):
        model({**batch, "slide": torch.arange(30)})
    with pytest.raises(ValueError, match="n_pos"):
        model({**batch, "coord": batch["coord"] + 200})
    out = model(batch)
    with pytest.raises(ValueError, match="counts"):
        model.loss(out, {"expr": batch["expr"]})
    # without edge_index the Grid graph is built from the coordinates
    model.eval()
    with torch.no_grad():
        a = model(batch)["pred"]
        b = model({k: v for k, v in batch.items() if k != "edge_index"})["pred"]
    torch.testing.assert_close(a, b)


def test_trains_on_real_her2st_sections(her2st_slides, tmp_path):
    slides = her2st_slides[:3]
    split = {"train": [s.obs["slide_id"].iloc[0] for s in slides[:2]],
             "val": [slides[2].obs["slide_id"].iloc[0]]}
    dm = SpotDataModule(slides, split, genes="mean", n_genes=30, allow_patient_overlap=True,
                        pixel_size_um=6.0, cache_dir=tmp_path)
    model = hest2sge.load("hist2st", genes=dm.genes, **{**TINY, "lr": 1e-3})
    dm.configure_for(model)
    assert dm.input_mode == "slide" and dm.graph_max_dist == 2.0
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu", num_sanity_val_steps=0,
                         callbacks=[hest2sge.SpotMetrics()])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, dm)
    changed = {k.split(".")[0] for k, v in model.state_dict().items()
               if not torch.equal(v, before[k])}
    assert {"encoder", "transformer", "gnn", "jknet", "zinb", "coef"} <= changed
    m = trainer.callback_metrics
    for k in ("train/loss", "train/distill", "train/zinb", "val/loss", "val/pcc"):
        assert torch.isfinite(m[k]), k
    batch = next(iter(dm.train_dataloader()))
    assert batch["edge_index"].shape[1] > 3 * batch["img"].shape[0]  # ~4 edges per spot
