"""THItoGene: paper configuration, real-data training, GAT graph, capsules, ODConv."""

from __future__ import annotations

import copy as copy_module
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hest2sge
from hest2sge.data import SpotDataModule, knn_graph, synthetic_slides
from hest2sge.models.base import prepare_batch
from hest2sge.models.layers.superres import aggregate_subspots, subspot_graph, subspot_grid
from hest2sge.models.thitogene_capsules import EfficientCapsNet, SelfAttentionRouting, squash
from hest2sge.models.thitogene_gat import MultiHeadGAT
from hest2sge.models.thitogene_odconv import ODConv2d

TINY = hest2sge.registry.get_model_class("thitogene").tiny_config


@pytest.fixture(scope="module")
def square_slide():
    return synthetic_slides(n_patients=1, slides_per_patient=1, grid=(6, 6), n_genes=8,
                            spot_pitch_px=32, seed=3)[0]


def _tiny(genes, **kw):
    torch.manual_seed(0)
    return hest2sge.load("thitogene", genes=list(genes), **{**TINY, **kw})


def test_paper_configuration_parameters():
    info = hest2sge.model_info("thitogene")
    assert info["input_mode"] == "slide" and info["patch_size"] == 112
    assert abs(info["parameters"] - 63.6e6) / 63.6e6 < 0.10
    d = info["defaults"]
    assert (d["caps"], d["route_dim"], tuple(d["heads"]), d["n_layers"]) == (20, 64, (16, 8), 4)
    cls = hest2sge.registry.get_model_class("thitogene")
    assert cls.needs_graph and cls.graph_k == 4 and cls.graph_max_dist is None


def test_trains_on_real_her2st_slides(her2st_slides, tmp_path):
    slides = her2st_slides[:2]
    ids = [s.obs["slide_id"].iloc[0] for s in slides]
    dm = SpotDataModule(slides, split={"train": ids}, genes="mean",
                        n_genes=30, pixel_size_um=3.0, cache_dir=tmp_path, augment=False)
    model = _tiny(dm.genes, dropout=0.0)
    dm.configure_for(model)
    dm.setup("fit")
    batches = [prepare_batch(b) for b in dm.train_dataloader()]
    batch = batches[0]
    assert len(batches) == 2
    n = batch["img"].shape[0]
    assert batch["img"].shape[1:] == (3, 48, 48) and n > 150
    # plain 4-NN: every spot receives exactly 4 edges, no self loops
    ei = batch["edge_index"]
    assert torch.equal(torch.bincount(ei[1], minlength=n), torch.full((n,), 4))
    assert not (ei[0] == ei[1]).any()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
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


def test_gat_on_known_grid_matches_dense_masked_attention():
    torch.manual_seed(0)
    gy, gx = np.meshgrid(np.arange(4), np.arange(5), indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], 1)  # 5 x 4 square grid
    ei = knn_graph(coords, k=4)
    n = len(coords)
    # interior spots receive from exactly their 4 lattice neighbours
    for i in np.where((coords[:, 0] % 4 != 0) & (coords[:, 1] % 3 != 0))[0]:
        src = coords[ei[0, ei[1] == i].numpy()]
        assert sorted(map(tuple, np.abs(src - coords[i]))) == [(0, 1), (0, 1), (1, 0), (1, 0)]
    gat = MultiHeadGAT(6, hidden=5, out=3, heads=2, dropout=0.0).eval()
    x = torch.randn(n, 6)
    # dense reference of the first layer: softmax over adj > 0 of LeakyReLU(a_dst.Wh_i + a_src.Wh_j)
    conv = gat.conv1
    wh = (x @ conv.lin.weight.T).view(n, 2, 5)
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj[ei[1], ei[0]] = True
    ref = []
    for h in range(2):
        e = F.leaky_relu((wh[:, h] @ conv.att_dst[0, h])[:, None]
                         + (wh[:, h] @ conv.att_src[0, h])[None, :], 0.01)
        att = torch.softmax(e.masked_fill(~adj, -9e15), dim=1)
        ref.append(att @ wh[:, h])
    torch.testing.assert_close(conv(x, ei), torch.cat(ref, 1), rtol=1e-5, atol=1e-5)
    # locality: perturbing spot j changes only spots within 2 hops downstream of j
    j = 7
    x2 = x.clone()
    x2[j] += 1.0
    changed = set(np.where((gat(x2, ei) - gat(x, ei)).abs().amax(1).detach().numpy() > 1e-6)[0])
    hop1 = set(ei[1, ei[0] == j].tolist())
    hop2 = {int(t) for s in hop1 for t in ei[1, ei[0] == s].tolist()}
    assert changed == hop1 | hop2


def test_capsule_shapes_and_routing():
    torch.manual_seed(0)
    caps = EfficientCapsNet(16, 28, n_caps=20, caps_dim=64).eval()
    out = caps(torch.randn(3, 16, 28, 28))
    assert out.shape == (3, 20, 64)
    assert caps.primary.kernel_size == (9, 9)  # 112 px patches -> 28 -> 9 x 9 map
    assert (out.norm(dim=-1) < 1).all()
    with pytest.raises(ValueError, match="28 px"):
        caps(torch.randn(1, 16, 24, 24))
    # routing equals the original einsum formulation
    r = SelfAttentionRouting(16, 8, 5, 6)
    with torch.no_grad():
        r.b.normal_()
    x = torch.randn(2, 16, 8)
    u = torch.einsum("...ji,kjiz->...kjz", x, r.W)
    c = torch.einsum("...ij,...kj->...i", u, u)[..., None] / math.sqrt(6)
    c = torch.softmax(c, dim=1) + r.b
    torch.testing.assert_close(r(x), squash((u * c).sum(-2)))


def test_odconv_matches_grouped_convolution():
    torch.manual_seed(0)
    od = ODConv2d(3, 16, kernel_size=4, stride=4).eval()
    x = torch.randn(5, 3, 112, 112)
    ch, fi, sp, ke = od.attention(x)
    w = (sp[:, None, None, None] * ke[:, :, None, None, None, None] * od.weight[None]).sum(1)
    ref = F.conv2d((x * ch).reshape(1, -1, 112, 112), w.reshape(-1, 3, 4, 4), stride=4,
                   groups=5).view(5, 16, 28, 28) * fi
    out = od(x)
    assert out.shape == (5, 16, 28, 28)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_chunked_encoder(square_slide):
    slide = square_slide
    dm = SpotDataModule.for_model(_tiny(slide.var_names), [slide], split={"train": ["P0_S0"]},
                                  genes=list(slide.var_names), augment=False)
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    model = _tiny(slide.var_names, dropout=0.0, checkpoint_spots=10)
    batch = model.on_after_batch_transfer(raw, 0)
    assert batch["img"].dtype == torch.uint8
    ref = _tiny(slide.var_names, dropout=0.0)
    ref.load_state_dict(model.state_dict())
    model.eval(), ref.eval()
    torch.testing.assert_close(model(batch), ref(batch))  # eval: exact
    # training: per-chunk BatchNorm statistics; running stats updated once per chunk even
    # though each chunk is recomputed in the backward pass
    copy = copy_module.deepcopy(model).train()
    with torch.no_grad():
        for part in batch["img"].split(10):  # one update per chunk, no recomputation
            copy._encode(part)
    model.train()
    model.loss(model(batch), batch).backward()
    for name, buf in model.named_buffers():
        if "running_" in name:
            torch.testing.assert_close(buf, dict(copy.named_buffers())[name])
    bn, bn_ref = model.capsnet.features[1], ref.capsnet.features[1]
    assert not torch.equal(bn.running_mean, bn_ref.running_mean)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.odconv.weight.grad.abs().sum() > 0


def test_input_errors(square_slide):
    model = _tiny(square_slide.var_names).eval()
    batch = {"img": torch.zeros(4, 3, 48, 48), "coord": torch.zeros(4, 2, dtype=torch.long)}
    with pytest.raises(ValueError, match="edge_index"):
        model(batch)
    batch["edge_index"] = knn_graph(np.zeros((4, 2)) + np.arange(4)[:, None], k=2)
    batch["img"] = torch.zeros(4, 3, 64, 64)
    with pytest.raises(ValueError, match="patch_size=48"):
        model(batch)
    with pytest.raises(ValueError, match="at least 44 px"):
        _tiny(square_slide.var_names, patch_size=32)


def test_super_resolution(square_slide):
    slide = square_slide
    model = _tiny(slide.var_names).eval()
    spot = hest2sge.predict(model, slide).layers["pred"]
    same = hest2sge.predict(model, slide, resolution=32.0)  # sub-spots coincide with spots
    np.testing.assert_allclose(aggregate_subspots(same, slide.n_obs), spot, rtol=1e-5,
                               atol=1e-5)
    sr = hest2sge.predict(model, slide, resolution="half")
    assert sr.n_obs == 13 * 13 and np.isfinite(sr.X).all()
    agg = aggregate_subspots(sr, slide.n_obs)
    r = [np.corrcoef(agg[:, g], spot[:, g])[0, 1] for g in range(spot.shape[1])]
    assert np.nanmean(r) > 0.7
    # the sub-spot graph keeps the spot graph's scale: edges at least one lattice step long,
    # and a sub-spot on a spot gets that spot's 4 lattice neighbours
    grid = subspot_grid(slide, "half")
    ei = subspot_graph(grid, k=4, min_dist=grid.array_nn)
    length = np.linalg.norm(grid.array_frac[ei[0]] - grid.array_frac[ei[1]], axis=1)
    assert length.min() == pytest.approx(1.0)
    centre = np.where(np.abs(grid.array_frac - [2, 2]).sum(1) < 1e-6)[0]
    src = grid.array_frac[ei[0, ei[1] == int(centre[0])]] - [2, 2]
    np.testing.assert_allclose(sorted(map(tuple, np.abs(src))), [(0, 1), (0, 1), (1, 0), (1, 0)],
                               atol=1e-6)
