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
