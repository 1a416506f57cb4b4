"""SpotDataModule, splits, gene panels, target transforms and graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hest2sge
from hest2sge.data import (
    LeakageError,
    Split,
    SpotDataModule,
    TargetTransform,
    knn_graph,
    patient_kfold,
    select_genes,
    synthetic_slides,
)


@pytest.fixture(scope="module")
def slides():
    return synthetic_slides(n_patients=4, slides_per_patient=2, grid=(6, 6), n_genes=20,
                            spot_pitch_px=32, seed=3)


def test_patient_kfold_rotation(slides):
    seen_test = []
    for fold in range(4):
        sp = patient_kfold(slides, k=4, fold=fold)
        pid = {s.obs["slide_id"].iloc[0]: s.obs["patient_id"].iloc[0] for s in slides}
        tr, va, te = ({pid[s] for s in getattr(sp, r)} for r in ("train", "val", "test"))
        assert len(tr) == 2 and len(va) == 1 and len(te) == 1
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert len(sp.train) == 4 and len(sp.test) == 2  # both sections of a patient together
        seen_test.append(te.pop())
    assert sorted(seen_test) == ["P0", "P1", "P2", "P3"]


def test_leakage_guard(slides):
    bad = Split(train=["P0_S0", "P1_S0"], val=["P2_S0"], test=["P0_S1"])
    with pytest.raises(LeakageError, match="P0"):
        SpotDataModule(slides, bad, genes="all")
    SpotDataModule(slides, bad, genes="all", allow_patient_overlap=True)
    with pytest.raises(KeyError, match="unknown slide"):
        SpotDataModule(slides, Split(train=["nope"]), genes="all")
    with pytest.raises(ValueError, match="both split.train and split.test"):
        SpotDataModule(slides, Split(train=["P0_S0"], test=["P0_S0"]), genes="all")


def test_gene_panel_from_training_slides_only(slides):
    sp = patient_kfold(slides, k=4, fold=0)
    train = [s for s in slides if s.obs["slide_id"].iloc[0] in sp.train]
    ref = select_genes(train, "paper", n_top=8, min_spots=10)
    # Make the held-out slides wildly different: the panel must not change.
    altered = [s.copy() for s in slides]
    for s in altered:
        if s.obs["slide_id"].iloc[0] not in sp.train:
            s.X = s.X * 0 + 1000 * (np.arange(s.n_vars) == 0)
    dm = SpotDataModule(altered, sp, genes="paper", n_top_hvg=8, min_spots=10)
    assert dm.genes == ref
    with pytest.raises(ValueError, match="lacks 1 gene"):
        SpotDataModule(slides, sp, genes=["G000", "NOT_A_GENE"])
    assert select_genes(train, "mean", n_genes=5) == sorted(
        select_genes(train, "mean", n_genes=5))  # slide order kept
    with pytest.raises(ValueError, match="unknown gene panel rule"):
        select_genes(train, "hvg")


def test_target_transforms_match_formulas():
    c = np.array([[0, 1, 3], [2, 2, 0]], dtype=np.float64)
    total_all = np.array([10.0, 5.0])
    t = TargetTransform(kind="log_norm")  # scprep: log10(1 + 1e4 c / sum over panel)
    np.testing.assert_allclose(t(c), np.log10(1 + 1e4 * c / c.sum(1, keepdims=True)), rtol=1e-6)
    t = TargetTransform(kind="log_norm", library="all", base="e", scale=1e6)
    np.testing.assert_allclose(t(c, total_all), np.log(1 + 1e6 * c / total_all[:, None]),
                               rtol=1e-6)
    t = TargetTransform(kind="stnet")
    np.testing.assert_allclose(t(c, total_all, n_all=100),
                               np.log((1 + c) / (100 + total_all[:, None])), rtol=1e-6)
    t = TargetTransform(kind="log_minmax").fit([c])
    y = np.log10(1 + c)
    exp = (y - y.min(0)) / (y.max(0) - y.min(0) + 1e-8)
    np.testing.assert_allclose(t(c), exp, rtol=1e-5, atol=1e-6)
    # statistics come from the fitted (training) data, not from the data transformed later
    np.testing.assert_allclose(t(c * 10)[0, 2], (np.log10(31) - 0) / (np.log10(4) + 1e-8),
                               rtol=1e-5)
    with pytest.raises(RuntimeError, match="before fit"):
        TargetTransform(kind="minmax")(c)
    with pytest.raises(ValueError, match="unknown target transform"):
        TargetTransform(kind="log2")
    assert TargetTransform.from_spec(t.to_dict()).min == t.min


def test_spot_mode_batches_and_augmentation(slides):
    model = hest2sge.load("stnet", genes=list(slides[0].var_names), pretrained=False,
                          backbone="test_resnet", patch_size=32)
    dm = SpotDataModule.for_model(model, slides, split={"k": 4, "fold": 1}, batch_size=16)
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b["img"].shape == (16, 3, 32, 32) and b["img"].dtype == torch.uint8
    assert b["expr"].shape == (16, 20) and b["counts"].shape == (16, 20)
    assert set(b) >= {"coord", "pos", "slide", "spot", "size_factor"}
    # targets use the model's transform (ST-Net: ln((1 + c) / (n_all + total)))
    assert (b["expr"] < 0).all()
    # validation patches are not augmented and are deterministic
    v1 = next(iter(dm.val_dataloader()))
    v2 = next(iter(dm.val_dataloader()))
    assert torch.equal(v1["img"], v2["img"])
    # training patches are augmented (flips/rotations of the stored patch)
    t = dm.tables[dm.split.train[0]]
    ds = dm.train_dataloader().dataset
    raw = torch.from_numpy(t.patches[0]).permute(2, 0, 1)
    views = {tuple(ds[0]["img"].flatten()[:50].tolist()) for _ in range(30)}
    assert len(views) > 1
    assert any(torch.equal(ds[0]["img"], raw) for _ in range(60))
    assert dm.train_target_mean.shape == (20,)


def test_slide_mode_graph_and_workers(slides):
    dm = SpotDataModule(slides, {"k": 4, "fold": 0}, genes="all", input_mode="slide",
                        patch_size=32, num_workers=2, graph_k=4, graph_max_dist=1.0)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    b = batches[0]
    n = b["img"].shape[0]
    assert n == 36 and b["expr"].shape == (36, 20)
    ei = b["edge_index"]
    assert ei.shape[0] == 2 and (ei[0] != ei[1]).all()
    # on a square 6x6 grid with max distance 1: 4 neighbours inside, 2 at corners
    deg = torch.bincount(ei[1], minlength=n)
    assert deg.max() == 4 and deg.min() == 2 and int(deg.sum()) == 2 * (2 * 6 * 5)


def test_knn_graph_known_grid():
    xy = np.array([[x, y] for y in range(3) for x in range(3)], dtype=float)
    ei = knn_graph(xy, k=4, max_dist=1.0)
    centre = 4
    assert sorted(ei[0][ei[1] == centre].tolist()) == [1, 3, 5, 7]
    assert sorted(ei[0][ei[1] == 0].tolist()) == [1, 3]
    ei_all = knn_graph(xy, k=4)  # no pruning: corners get 4 neighbours too
    assert (torch.bincount(ei_all[1]) == 4).all()


def test_no_common_genes_error(slides):
    a, b = slides[0].copy(), slides[2].copy()
    b.var_names = [f"X{i}" for i in range(b.n_vars)]
    with pytest.raises(ValueError, match="no genes in common"):
        select_genes([a, b], "all")


def test_resolve_split_forms(slides):
    dm = SpotDataModule(slides, None, genes="all")
    assert dm.split == patient_kfold(slides, k=4, fold=0)
    dm = SpotDataModule(slides, {"train": ["P0_S0"], "val": ["P1_S0"]}, genes="all")
    assert dm.split.test == [] and dm.split.train == ["P0_S0"]
    with pytest.raises(TypeError, match="split must be"):
        SpotDataModule(slides, ["P0_S0"], genes="all")
    with pytest.raises(ValueError, match="k >= 3"):
        patient_kfold(slides, k=2)


def test_augmentation_default_comes_from_the_model(slides):
    genes = list(slides[0].var_names)
    stnet = hest2sge.load("stnet", genes=genes, pretrained=False, backbone="test_resnet",
                          patch_size=32)
    histogene = hest2sge.load("histogene", genes=genes, **hest2sge.registry.get_model_class(
        "histogene").tiny_config)
    assert SpotDataModule.for_model(stnet, slides).augment is True
    assert SpotDataModule.for_model(histogene, slides).augment is False
    assert SpotDataModule.for_model(histogene, slides, augment=True).augment is True
    dm = SpotDataModule(slides, None, genes="all", augment=None)
    dm.configure_for(None)
    assert dm.augment is True
