"""The configuration record (hest2sge.models.configs): one paper configuration per model."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest

import hest2sge
from hest2sge.models.configs import ModelRecord, get_record, list_records
from hest2sge.registry import get_model_class

BUILTINS = ["deeppt", "deepspace", "egnv1", "egnv2", "genecoder", "hist2st", "histogene",
            "istar", "stnet", "tcgn", "thitogene"]


def _accepted(cls) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= set(inspect.signature(init).parameters)
    return names - {"self", "kwargs", "args"}


def test_every_builtin_model_has_a_record():
    assert set(BUILTINS) <= set(list_records())
    assert set(list_records()) <= set(hest2sge.list_models())


@pytest.mark.parametrize("name", BUILTINS)
def test_record_agrees_with_the_class(name):
    rec = get_record(name)
    cls = get_model_class(name)
    assert rec.name == name
    unknown = set(rec.model) - _accepted(cls)
    assert not unknown, f"{name}: record keys the class does not accept: {unknown}"
    assert dict(rec.target_transform) == dict(cls.default_target_transform)
    assert rec.augment == cls.loader_augment
    assert (rec.batch_size is None) == (cls.input_mode == "slide")
    needed = {"max_epochs", "batch_size", "monitor", "augment", "target_transform"}
    if cls.__name__ != "GeneCodeR":
        needed |= {"lr", "optimizer"}
        assert rec.model["optimizer"] in ("adam", "adamw", "sgd")
        assert rec.model["lr"] > 0
    assert needed <= set(rec.sources), f"{name}: settings without a source: {needed - set(rec.sources)}"
    if rec.model.get("pretrained"):
        assert "from_scratch" in rec.sources, f"{name}: pretrained but no from-scratch note"
    assert set(rec.from_scratch) <= _accepted(cls)


def test_paper_values_of_the_issue():
    """The settings issue 8 found the CLI dropping are in the record."""
    st = get_record("stnet")
    assert (st.model["optimizer"], st.model["lr"], st.model["momentum"]) == ("sgd", 1e-6, 0.9)
    assert st.model["backbone"] == "densenet121.tv_in1k"
    h2 = get_record("hist2st")
    assert (h2.model["scheduler"], h2.model["scheduler_step"], h2.model["scheduler_gamma"]) \
        == ("step", 50, 0.9)
    for name, lr in (("egnv1", 5e-5), ("egnv2", 5e-4)):
        rec = get_record(name)
        assert (rec.model["optimizer"], rec.model["scheduler"], rec.model["lr"]) \
            == ("adamw", "cosine", lr)
    assert get_record("histogene").monitor is None  # paper: the model after all epochs
    assert get_record("deeppt").model["backbone"] == "resnet50.tv_in1k"
    assert get_record("deepspace").model["backbone"] == "vgg16.tv_in1k"


def test_trainer_datamodule_and_callbacks():
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from hest2sge.metrics.callback import SpotMetrics

    ds = get_record("deepspace")
    assert ds.trainer_kwargs() == {"max_epochs": 50}
    assert ds.datamodule_kwargs() == {"augment": False, "batch_size": 128}
    cbs = ds.callbacks()
    assert [type(c) for c in cbs] == [SpotMetrics, ModelCheckpoint, EarlyStopping]
    assert cbs[1].monitor == "val/pcc" and cbs[1].mode == "max"
    assert cbs[2].monitor == "val/loss" and cbs[2].patience == 5
    hg = get_record("histogene")
    assert hg.datamodule_kwargs() == {"augment": False}
    ck = hg.callbacks(metrics=False)
    assert len(ck) == 1 and ck[0].monitor is None and ck[0].save_last


def test_record_is_read_only_and_pickles():
    rec = get_record("stnet")
    with pytest.raises(TypeError, match="read-only"):
        rec.model["lr"] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.max_epochs = 3
    again = pickle.loads(pickle.dumps(rec))
    assert isinstance(again, ModelRecord) and again == rec
    with pytest.raises(TypeError):
        again.model["lr"] = 1.0


def test_unknown_and_user_models():
    with pytest.raises(KeyError, match="did you mean 'stnet'"):
        get_record("stnett")
    from hest2sge import registry
    from hest2sge.models.base import SpotModel

    @registry.register_model("my_record_test_model")
    class Mine(SpotModel):
        input_mode = "slide"

    try:
        rec = get_record("my_record_test_model")
        assert rec.model == {} and rec.max_epochs == 50 and rec.batch_size is None
        assert rec.monitor == "val/pcc" and rec.monitor_mode == "max"
    finally:
        registry._REGISTRY.pop("my_record_test_model")


def test_warns_once_without_pretrained_weights(monkeypatch, tmp_path):
    import warnings

    import lightning.pytorch as pl

    from hest2sge.models import base
    from hest2sge.models.base import PretrainedWeightsWarning

    monkeypatch.setattr(base, "_WARNED_NO_WEIGHTS", set())
    tiny = {"n_genes": 3, "backbone": "test_resnet", "pretrained": False, "patch_size": 32}
    with pytest.warns(PretrainedWeightsWarning) as rec:
        model = hest2sge.load("stnet", **tiny)
    msg = str(rec[0].message)
    assert "optimizer='sgd', lr=1e-06" in msg and "densenet121.tv_in1k" in msg
    assert "optimizer='adam', lr=0.001, loss_reduction='mean'" in msg  # the from-scratch set
    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedWeightsWarning)
        hest2sge.load("stnet", **tiny)  # once per model
        monkeypatch.setattr(base, "_WARNED_NO_WEIGHTS", set())
        hest2sge.load("stnet", **tiny, **get_record("stnet").from_scratch)  # no warning
        hest2sge.model_info("stnet")  # parameter counting: no warning
        trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
        trainer.strategy.connect(model)
        trainer.save_checkpoint(tmp_path / "m.ckpt")
        hest2sge.load(checkpoint=tmp_path / "m.ckpt")  # restore: weights from the checkpoint
        hest2sge.load("histogene", n_genes=3, **get_model_class("histogene").tiny_config)
