"""Registry: load, list, info, unknown names, safe checkpoints, user models."""

from __future__ import annotations

import pytest
import torch

import hest2sge
from hest2sge.models.base import SpotModel
from hest2sge.registry import register_model


def test_list_and_unknown_name():
    names = hest2sge.list_models()
    assert "stnet" in names
    with pytest.raises(KeyError, match="did you mean 'stnet'"):
        hest2sge.load("stnett", n_genes=3)


def test_model_info_matches_table1():
    info = hest2sge.model_info("stnet")
    assert info["input_mode"] == "spot"
    assert info["patch_size"] == 224
    assert info["target_transform"]["kind"] == "stnet"
    # DenseNet-121 trunk 6,953,856 + Linear(1024 -> 785)
    assert info["parameters"] == 6_953_856 + 1024 * 785 + 785
    assert abs(info["parameters"] - info["paper_parameters"]) / info["paper_parameters"] < 0.10


def test_model_needs_genes():
    with pytest.raises(ValueError, match="gene panel"):
        hest2sge.load("stnet", pretrained=False)


def test_user_model_registers():
    @register_model("my_linear_test_model")
    class MyModel(SpotModel):
        tiny_config = {"patch_size": 8}

        def __init__(self, genes=None, n_genes=None, patch_size: int = 8, **kw):
            super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size, **kw)
            self.lin = torch.nn.Linear(3, self.n_genes)

        def forward(self, batch):
            return self.lin(batch["img"].mean((2, 3)))

    try:
        m = hest2sge.load("my_linear_test_model", n_genes=4)
        assert isinstance(m, MyModel) and m.model_name == "my_linear_test_model"
        assert hest2sge.model_info("my_linear_test_model", n_genes=4)["parameters"] == 16
    finally:
        from hest2sge import registry

        registry._REGISTRY.pop("my_linear_test_model")


def _trained_ckpt(tmp_path, genes):
    import lightning.pytorch as pl

    model = hest2sge.load("stnet", genes=genes, backbone="test_resnet", pretrained=False,
                          patch_size=16)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    return model, path


def test_checkpoint_gene_panel_mismatch(tmp_path):
    model, path = _trained_ckpt(tmp_path, ["A", "B", "C"])
    restored = hest2sge.load("stnet", checkpoint=path, genes=["A", "B", "C"])
    for (k, v), (k2, v2) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(TypeError, match="only genes="):
        hest2sge.load(checkpoint=path, lr=3.0)
    with pytest.raises(TypeError, match="only genes="):
        hest2sge.load(checkpoint=path, genes=["A", "B", "D"], backbone="resnet18")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"hest2sge": {"model": "stnet"}, "state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="never unpickles"):
        hest2sge.load(checkpoint=path)
    plain = tmp_path / "plain.pt"
    torch.save({"a": 1}, plain)
    with pytest.raises(ValueError, match="not a hest2sge checkpoint"):
        hest2sge.load(checkpoint=plain)
    with pytest.raises(FileNotFoundError):
        hest2sge.load(checkpoint=tmp_path / "missing.ckpt")


# ---------------------------------------------------------------------- pretrained weights
@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An unreachable hub endpoint and an empty Hugging Face cache, HF_HUB_OFFLINE unset."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


def test_offline_pretrained_fails_fast_naming_the_ways_out(no_network):
    import time

    from hest2sge.models.layers.backbones import WeightsUnavailableError, create_backbone

    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as exc:
        hest2sge.load("stnet", n_genes=3)
    elapsed = time.monotonic() - t0
    msg = str(exc.value)
    assert "densenet121.tv_in1k" in msg and "pretrained=False" in msg
    assert "HF_HUB_OFFLINE=1" in msg and ".safetensors" in msg
    assert elapsed < 10, f"offline failure took {elapsed:.1f} s"
    with pytest.raises(WeightsUnavailableError, match="hf-hub:MahmoodLab/UNI"):
        create_backbone("hf-hub:MahmoodLab/UNI", True, init_values=1e-5)


def test_pretrained_from_a_warm_cache_without_network(no_network):
    """With the weights in the Hugging Face cache, pretrained=True needs no network."""
    import timm
    from safetensors.torch import save_file

    from hest2sge.models.layers.backbones import create_backbone

    src = timm.create_model("test_resnet", pretrained=False)  # with its classifier
    snap = no_network / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              str(snap / "model.safetensors"))
    (no_network / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (no_network / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("0" * 40)
    model = create_backbone("test_resnet.r160_in1k", True)
    assert len(model.state_dict()) > 10
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


def test_local_weights_load_strictly(tmp_path):
    """A UNI-style ViT (LayerScale) file into a plain ViT is an error listing the keys; with
    the matching keyword arguments it loads exactly (classifier weights dropped)."""
    import timm
    from safetensors.torch import save_file

    from hest2sge.models.layers.backbones import create_backbone

    src = timm.create_model("test_vit", pretrained=False, num_classes=7, init_values=1e-5)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    st = tmp_path / "vit_ls.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(st))
    pth = tmp_path / "vit_ls.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, pth)

    with pytest.raises(ValueError, match=r"unexpected key\(s\) \[.*ls1\.gamma"):
        create_backbone("test_vit", st)
    for path in (st, pth):
        model = create_backbone("test_vit", path, init_values=1e-5)
        for k, v in model.state_dict().items():
            assert torch.equal(v, src.state_dict()[k]), k
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in
               timm.create_model("test_vit", num_classes=0).state_dict().items()}, str(plain))
    with pytest.raises(ValueError, match=r"missing key\(s\) \[.*ls1\.gamma"):
        create_backbone("test_vit", plain, init_values=1e-5)
    # through a model: any timm backbone with its kwargs and a local file
    m = hest2sge.load("stnet", n_genes=3, backbone="test_vit", pretrained=str(st),
                      backbone_kwargs={"init_values": 1e-5}, patch_size=160)
    assert torch.equal(m.backbone.blocks[0].ls1.gamma, src.blocks[0].ls1.gamma)
    with pytest.raises(FileNotFoundError):
        create_backbone("test_vit", tmp_path / "missing.pth")


# ---------------------------------------------------------------------- fine-tuning, sharing
def test_new_panel_keeps_the_trunk_and_shared_head_rows(tmp_path, caplog):
    model, path = _trained_ckpt(tmp_path, ["A", "B", "C"])
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.normal_()
    import lightning.pytorch as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    with caplog.at_level("WARNING", logger="hest2sge"):
        ft = hest2sge.load(checkpoint=path, genes=["C", "D", "A", "E"], lr=1e-3)
    assert "2 gene(s) shared" in caplog.text and "2 new gene(s)" in caplog.text
    assert ft.genes == ["C", "D", "A", "E"] and ft.hparams.lr == 1e-3
    assert ft.finetune_report["reinitialised"] == ["head.weight", "head.bias"]
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(ft.backbone.state_dict()[k], v), k
    assert torch.equal(ft.head.weight[0], model.head.weight[2])  # C
    assert torch.equal(ft.head.weight[2], model.head.weight[0])  # A
    assert torch.equal(ft.head.bias[[0, 2]], model.head.bias[[2, 0]])
    assert torch.equal(ft.head.weight[[1, 3]], torch.zeros(2, ft.head.weight.shape[1]))  # fresh
    assert ft.fitted_target_transform is None
    # the same panel in another order is a new panel too
    again = hest2sge.load(checkpoint=path, genes=["C", "B", "A"])
    assert torch.equal(again.head.weight, model.head.weight[[2, 1, 0]])


def test_freeze_and_unfreeze_backbone():
    model = hest2sge.load("stnet", n_genes=3, backbone="test_resnet", pretrained=False,
                          patch_size=32)
    model.freeze_backbone().train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    assert not model.backbone.training and model.head.training
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.head.parameters())
    model.unfreeze_backbone()
    assert all(p.requires_grad for p in model.backbone.parameters()) and model.backbone.training
    hg = hest2sge.load("histogene", n_genes=3, **hest2sge.registry.get_model_class(
        "histogene").tiny_config)
    with pytest.raises(AttributeError, match="no pretrained trunk"):
        hg.freeze_backbone()


class _LocalHub:
    """Stands in for huggingface_hub.HfApi: repositories are folders under ``root``."""

    def __init__(self, root):
        self.root = root
        self.created = []

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.created.append((repo_id, private, exist_ok, repo_type))
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)

    def upload_folder(self, repo_id, folder_path, repo_type=None, commit_message=None):
        import shutil

        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"commit: {commit_message}"


def test_save_pretrained_push_to_hub_and_back(tmp_path):
    import json

    model, _ = _trained_ckpt(tmp_path, ["A", "B", "C"])
    model.fitted_target_transform = {"kind": "stnet"}
    folder = model.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model"] == "stnet" and cfg["genes"] == ["A", "B", "C"]
    back = hest2sge.from_pretrained(folder)
    assert back.fitted_target_transform == {"kind": "stnet"} and not back.training
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k

    hub = _LocalHub(tmp_path / "hub")
    out = model.push_to_hub("me/stnet-tiny", api=hub, private=True, commit_message="tiny")
    assert out == "commit: tiny" and hub.created == [("me/stnet-tiny", True, True, "model")]
    repo = tmp_path / "hub" / "me" / "stnet-tiny"
    assert "hest2sge.from_pretrained" in (repo / "README.md").read_text()
    pulled = SpotModel.from_pretrained(repo)
    for k, v in model.state_dict().items():
        assert torch.equal(pulled.state_dict()[k], v), k
    adapted = hest2sge.from_pretrained(repo, genes=["B", "Z"])
    assert adapted.finetune_report["kept_genes"] == 1
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        hest2sge.from_pretrained(str(tmp_path / "nowhere" / "x"))


def test_finetuning_on_a_new_panel_beats_the_fresh_head(tmp_path):
    """A trunk trained on panel A, fine-tuned (frozen trunk) on panel B: the validation loss on
    B falls below the freshly initialised head's."""
    import lightning.pytorch as pl

    from hest2sge.data import SpotDataModule, patient_kfold, synthetic_slides

    pl.seed_everything(0)
    slides = synthetic_slides(n_patients=4, slides_per_patient=1, grid=(6, 6), n_genes=16,
                              spot_pitch_px=32, seed=3)
    split = patient_kfold(slides, k=4, fold=0)
    genes = list(slides[0].var_names)
    panel_a, panel_b = genes[:10], genes[6:]  # 4 genes shared, 6 new
    tiny = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32,
            "optimizer": "adam", "lr": 1e-3, "loss_reduction": "mean"}

    def dm(panel):
        return SpotDataModule(slides, split, genes=panel, batch_size=16, patch_size=32)

    def trainer(epochs):
        return pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                          enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0)

    model = hest2sge.load("stnet", genes=panel_a, **tiny)
    t = trainer(3)
    t.fit(model, dm(panel_a))
    t.save_checkpoint(tmp_path / "a.ckpt")

    ft = hest2sge.load(checkpoint=tmp_path / "a.ckpt", genes=panel_b, lr=3e-3)
    ft.freeze_backbone()
    data_b = dm(panel_b)
    fresh = trainer(1).validate(ft, data_b, verbose=False)[0]["val/loss"]
    trainer(3).fit(ft, data_b)
    tuned = trainer(1).validate(ft, data_b, verbose=False)[0]["val/loss"]
    print(f"panel B validation loss: fresh head {fresh:.4f}, fine-tuned {tuned:.4f}")
    assert tuned < fresh


def test_predict_is_the_function_whatever_was_imported_first():
    """Importing the prediction module never rebinds ``hest2sge.predict`` to a module."""
    import subprocess
    import sys

    code = ("import hest2sge.prediction, hest2sge, hest2sge.data.datamodule\n"
            "assert callable(hest2sge.predict), type(hest2sge.predict)\n"
            "from hest2sge import predict\n"
            "assert predict.__module__ == 'hest2sge.prediction'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
