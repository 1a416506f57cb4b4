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
    with pytest.raises(ValueError, match="different gene panel.*'D'"):
        hest2sge.load("stnet", checkpoint=path, genes=["A", "B", "D"])
    with pytest.raises(TypeError, match="only genes="):
        hest2sge.load(checkpoint=path, lr=3.0)


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
