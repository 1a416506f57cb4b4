"""TCGN: graph construction, CensNet layers, CMT weight loading, sizes, CPU-only, real data."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule
from hest2sge.models.tcgn import TCGN, random_rotate
from hest2sge.models.tcgn_censnet import (
    CensNetConv,
    GraphEncodingBlock,
    edge_features,
    graph_operators,
    spatial_prior,
    topk_edges,
)
from hest2sge.models.tcgn_cmt import CMT, resize_relative_pos

TINY = TCGN.tiny_config


# ---------------------------------------------------------------------- graph construction
def _ref_topk(m: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """Reference: the k * N largest entries of a matrix, by sorting every entry."""
    n = m.shape[0]
    entries = sorted(((float(m[i, j]), i, j) for i in range(n) for j in range(n)), reverse=True)
    return sorted((i, j) for _, i, j in entries[: k * n])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_edges_matches_reference_batched(k):
    torch.manual_seed(k)
    attn = torch.rand(4, 6, 6)
    rows, cols = topk_edges(attn, k)
    assert rows.shape == cols.shape == (4, k * 6)
    for b in range(4):
        got = list(zip(rows[b].tolist(), cols[b].tolist()))
        assert got == _ref_topk(attn[b], k)  # same set, row-major order


def test_topk_edges_paper_size():
    """196 nodes, k = 4: the 784 largest of the 38,416 entries of each matrix."""
    torch.manual_seed(0)
    attn = torch.rand(2, 196, 196)
    rows, cols = topk_edges(attn, 4)
    assert rows.shape == (2, 784)
    for b in range(2):
        kept = torch.zeros(196, 196, dtype=torch.bool)
        kept[rows[b], cols[b]] = True
        assert int(kept.sum()) == 784
        assert attn[b][kept].min() > attn[b][~kept].max()
        assert kept.sum(1).max() != kept.sum(1).min()  # global, not 4 per node


def test_topk_is_global_over_the_matrix_and_exact_on_ties():
    # row 0 holds the largest values: a global top-k gives node 0 all its edges, a per-node
    # top-k would give every node k edges
    attn = torch.full((1, 4, 4), 0.1)
    attn[0, 0] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    attn[0, 1, :] = torch.tensor([0.5, 0.45, 0.2, 0.2])
    rows, cols = topk_edges(attn, 2)
    assert list(zip(rows[0].tolist(), cols[0].tolist())) == [
        (0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    # all entries tied: still exactly k * N edges, no duplicates
    rows, cols = topk_edges(torch.ones(2, 5, 5), 2)
    assert rows.shape == (2, 10)
    assert len(set(zip(rows[1].tolist(), cols[1].tolist()))) == 10


def test_graph_operators_known_case():
    # N = 3, edges (0,0), (0,1), (2,1); node 1 has no out-edge
    rows, cols = torch.tensor([[0, 0, 2]]), torch.tensor([[0, 1, 1]])
    g = graph_operators(rows, cols, 3)
    t, adj_v, adj_e = g.t, g.adj_v, g.adj_e
    torch.testing.assert_close(t[0], torch.tensor([[2.0, 1, 0], [0, 1, 1], [0, 0, 1]]))
    # A row sums (2, 0, 1): D^-1/2 A D^-1/2 with a zero-degree node -> zeros (not inf/NaN)
    torch.testing.assert_close(adj_v[0], torch.tensor([[0.5, 0, 0], [0, 0, 0], [0, 0, 0]]))
    # line graph: e0-e1 share node 0, e1-e2 share node 1; degrees + 1 = (3, 4, 3)
    r12 = 1 / math.sqrt(12)
    torch.testing.assert_close(adj_e[0], torch.tensor(
        [[1 / 3, r12, 0], [r12, 1 / 4, r12], [0, r12, 1 / 3]]))


def test_graph_operators_match_loop_reference_batched():
    torch.manual_seed(0)
    n, k = 5, 2
    rows, cols = topk_edges(torch.rand(3, n, n), k)
    g = graph_operators(rows, cols, n)
    t, adj_v, adj_e = g.t, g.adj_v, g.adj_e
    for b in range(3):
        edges = list(zip(rows[b].tolist(), cols[b].tolist()))
        e = len(edges)
        t_ref = torch.zeros(n, e)
        for j, (u, v) in enumerate(edges):
            t_ref[u, j] += 1
            t_ref[v, j] += 1
        line = torch.tensor([[float(bool({u, v} & {p, q})) for (p, q) in edges]
                             for (u, v) in edges])
        s = line.sum(1) + 1
        a = torch.zeros(n, n)
        for u, v in edges:
            a[u, v] = 1
        deg = a.sum(1)
        dv = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros(n))
        torch.testing.assert_close(t[b], t_ref)
        torch.testing.assert_close(adj_e[b], line / torch.sqrt(s[:, None] * s[None, :]))
        torch.testing.assert_close(adj_v[b], dv[:, None] * a * dv[None, :])


def test_edge_features_known_case():
    # 2 x 2 node grid, C = 2 (scale 1), 2 heads
    x = torch.tensor([[[1.0, 0], [0, 1], [1, 1], [2, 0]]])
    attn = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4) / 100
    rows, cols = torch.tensor([[0, 0, 2]]), torch.tensor([[0, 1, 3]])
    f = edge_features(x, attn, rows, cols, spatial_prior(2))
    assert f.shape == (1, 3, 2 + 4)
    flat = [0 * 4 + 0, 0 * 4 + 1, 2 * 4 + 3]
    torch.testing.assert_close(f[0, :, 0], torch.tensor(flat, dtype=torch.float32) / 100)
    torch.testing.assert_close(f[0, :, 1], (torch.tensor(flat) + 16).float() / 100)
    torch.testing.assert_close(f[0, :, 2], (torch.tensor(flat) + 8).float() / 100)  # mean
    torch.testing.assert_close(f[0, :, 3], torch.tensor([1.0, 0.75, 0.75]))  # 1 / (d/3 + 1)
    s3 = 1 / math.sqrt(3)
    torch.testing.assert_close(f[0, :, 4], torch.tensor([1.0, s3, s3]))  # sqrt(1 / (d2 + 1))
    torch.testing.assert_close(f[0, :, 5], torch.tensor([1.0, 0.5, (1 + 2 / (2 * 2 ** 0.5)) / 2]))


def test_censnet_layers_match_loop_reference():
    torch.manual_seed(0)
    n, ce, cv = 4, 3, 5
    rows, cols = topk_edges(torch.rand(1, n, n), 2)
    g = graph_operators(rows, cols, n)
    t, adj_v, adj_e = g.t, g.adj_v, g.adj_e
    edges = list(zip(rows[0].tolist(), cols[0].tolist()))
    hv, he = torch.randn(1, n, cv), torch.rand(1, len(edges), ce)

    node = CensNetConv(cv, 6, ce, ce, node_layer=True)
    s = (he[0] @ node.p[0]).tolist()
    m = torch.eye(n)
    for i in range(n):
        for j in range(n):
            if i != j:
                m[i, j] = sum(t[0, i, e] * s[e] * t[0, j, e] for e in range(len(edges)))
    out, same = node(hv, he, g)
    torch.testing.assert_close(out[0], (m * adj_v[0]) @ (hv[0] @ node.weight) + node.bias)
    assert same is he

    edge = CensNetConv(cv, cv, ce, 2 * ce, node_layer=False)
    s = (hv[0] @ edge.p[0]).tolist()
    e_n = len(edges)
    m = torch.eye(e_n)
    for a in range(e_n):
        for b in range(e_n):
            if a != b:
                m[a, b] = sum(t[0, i, a] * s[i] * t[0, i, b] for i in range(n))
    adj = m * adj_e[0]
    adj = adj / adj.max(0, keepdim=True).values
    _, out = edge(hv, he, g)
    torch.testing.assert_close(out[0], adj @ (he[0] @ edge.weight) + edge.bias)


def test_graph_block_samples_are_independent():
    """Each sample uses its own graph (the original pairs sample i with graph B-1-i)."""
    torch.manual_seed(0)
    blk = GraphEncodingBlock(8, 16, 16, 8, heads=2, patch=4, grid=4, top_k=4).eval()
    x = torch.randn(3, 8, 16, 16)
    with torch.no_grad():
        together = blk(x)
        alone = torch.cat([blk(x[i: i + 1]) for i in range(3)])
    assert together.shape == (3, 16, 8)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- model
def test_default_configuration_sizes_and_parameters():
    info = hest2sge.model_info("tcgn")
    assert info["patch_size"] == 112 and info["target_transform"] == {"kind": "log_norm"}
    assert info["defaults"]["lr"] == 1e-5 and info["defaults"]["top_k"] == 4
    # identical to the original TCGN class with CMT-Ti at 785 genes
    assert info["parameters"] == 22_547_073
    # Table 1's 29 M is the CMT-XS configuration of the original model.py __main__
    xs = hest2sge.model_info("tcgn", variant="xs")["parameters"]
    assert xs == 28_660_769
    assert abs(xs - info["paper_parameters"]) / info["paper_parameters"] < 0.10
    with torch.device("meta"):
        m = TCGN(n_genes=785, pretrained=False)
    assert [tuple(p.shape) for p in m.cmt.rel_pos] == [
        (1, 3136, 49), (2, 784, 49), (4, 196, 49), (8, 49, 49)]
    assert tuple(m.graph0.relative_pos.shape) == (2, 196, 196)
    assert tuple(m.graph1.prior.shape) == (196, 196)
    assert m.channel_attention0.transformer.heads == 4
    assert m.head[0].out_features == 5120


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="variant"):
        TCGN(n_genes=3, variant="tiny", pretrained=False)
    with pytest.raises(ValueError, match="divisible by 32"):
        TCGN(n_genes=3, **{**TINY, "img_size": 48})
    model = TCGN(n_genes=3, **TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model({"img": torch.rand(2, 1, 32, 32)})


def test_cpu_forward_backward_makes_no_cuda_call(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("CUDA was called")

    monkeypatch.setattr(torch.Tensor, "cuda", boom)
    monkeypatch.setattr(torch.nn.Module, "cuda", boom)
    monkeypatch.setattr(torch.cuda, "_lazy_init", boom)
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    torch.manual_seed(0)
    model = TCGN(n_genes=5, **TINY)
    out = model({"img": torch.rand(3, 3, 32, 32)})
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert model.graph0.attention.q.weight.grad.abs().sum() > 0  # through the edge features


def test_preprocess_resizes_and_rotates_only_in_training():
    torch.manual_seed(0)
    model = TCGN(n_genes=3, **TINY)
    img = torch.rand(2, 3, 32, 32)
    model.eval()
    a, b = model.preprocess(img), model.preprocess(img)
    assert a.shape == (2, 3, 64, 64)
    torch.testing.assert_close(a, b)
    model.train()
    assert not torch.allclose(model.preprocess(img), a)
    torch.testing.assert_close(random_rotate(a, 0.0), a)
    # a rotation keeps the centre pixel and fills the corners with 0 (ImageNet mean)
    r = random_rotate(torch.ones(64, 1, 9, 9), 180.0)
    assert torch.all(r[:, 0, 4, 4] == 1)
    assert (r[:, 0, 0, 0] == 0).any()


def _original_names(cmt: CMT) -> dict[str, torch.Tensor]:
    """Our CMT weights under the original ggjy/CMT.pytorch key names."""
    stem = {0: "stem_conv1", 2: "stem_norm1", 3: "stem_conv2", 5: "stem_norm2",
            6: "stem_conv3", 8: "stem_norm3"}
    out = {}
    for k, v in cmt.state_dict().items():
        parts = k.split(".")
        if parts[0] == "stem":
            name = ".".join([stem[int(parts[1])], *parts[2:]])
        elif parts[0] == "embeds":
            name = ".".join([f"patch_embed_{'abcd'[int(parts[1])]}", *parts[2:]])
        elif parts[0] == "rel_pos":
            name = f"relative_pos_{'abcd'[int(parts[1])]}"
        elif parts[0] == "stages":
            tail = parts[3:]
            if tail[0] == "lpu":
                tail[0] = "proj"
            name = ".".join([f"blocks_{'abcd'[int(parts[1])]}", parts[2], *tail])
        else:
            name = {"fc": "_fc", "fc_bn": "_bn"}[parts[0]] + "." + ".".join(parts[1:])
        out[name] = v.clone()
    return out


def test_pretrained_from_local_original_state_dict(tmp_path):
    torch.manual_seed(1)
    donor = TCGN(n_genes=3, **TINY)
    sd = _original_names(donor.cmt)
    sd["head.weight"], sd["head.bias"] = torch.randn(1000, 32), torch.randn(1000)  # classifier
    path = tmp_path / "cmt_tiny.pth"
    torch.save({"model": sd}, path)  # CMT.pytorch checkpoints wrap the state dict

    torch.manual_seed(2)
    model = TCGN(n_genes=3, **{**TINY, "pretrained": str(path)})
    for k, v in donor.cmt.state_dict().items():
        assert torch.equal(model.cmt.state_dict()[k], v), k
    # graph blocks and the gene head keep their own random initialisation
    assert not torch.equal(model.graph0.attention.q.weight, donor.graph0.attention.q.weight)

    # relative positions of a checkpoint trained at another input size are interpolated
    small = dict(sd)
    small["relative_pos_a"] = torch.randn(1, 8 * 8, 1)  # as trained at 32 px
    torch.save(small, path)
    model = TCGN(n_genes=3, **{**TINY, "pretrained": str(path)})
    assert tuple(model.cmt.rel_pos[0].shape) == (1, 256, 4)

    # a missing backbone weight is an error naming it
    del sd["blocks_c.0.attn.q.weight"]
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"stages\.2\.0\.attn\.q\.weight"):
        TCGN(n_genes=3, **{**TINY, "pretrained": str(path)})
    with pytest.raises(FileNotFoundError):
        TCGN(n_genes=3, **{**TINY, "pretrained": str(tmp_path / "absent.pth")})


def test_resize_relative_pos_keeps_constant_fields():
    t = torch.full((2, 16, 4), 3.0)
    torch.testing.assert_close(resize_relative_pos(t, (2, 64, 16)), torch.full((2, 64, 16), 3.0))
    with pytest.raises(ValueError, match="cannot resize"):
        resize_relative_pos(t, (3, 64, 16))


def test_trains_on_real_her2st_sections(her2st_slides, tmp_path):
    slides = her2st_slides[:3]
    split = {"train": [s.obs["slide_id"].iloc[0] for s in slides[:2]],
             "val": [slides[2].obs["slide_id"].iloc[0]]}
    dm = SpotDataModule(slides, split, genes="paper", n_top_hvg=300, min_spots=200,
                        allow_patient_overlap=True, batch_size=16, pixel_size_um=4.0,
                        cache_dir=tmp_path)
    model = hest2sge.load("tcgn", genes=dm.genes, **{**TINY, "lr": 1e-3})
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         accelerator="cpu", num_sanity_val_steps=0,
                         callbacks=[hest2sge.SpotMetrics()])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, dm)
    changed = {k.split(".")[0] for k, v in model.state_dict().items()
               if not torch.equal(v, before[k])}
    assert {"cmt", "graph0", "graph1", "channel_attention0", "head"} <= changed
    assert torch.isfinite(trainer.callback_metrics["val/pcc"])
    assert torch.isfinite(trainer.callback_metrics["train/loss_epoch"])
