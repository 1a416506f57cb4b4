"""Exact resume: a fit killed after a checkpoint and resumed equals an uninterrupted one."""

from __future__ import annotations

import random
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import hest2sge
from hest2sge.data import SpotDataModule, synthetic_slides
from hest2sge.rng import capture_rng_state, restore_rng_state

SPLIT = {"train": ["P0_S0", "P1_S0"], "val": ["P2_S0"]}


@pytest.fixture(scope="module")
def slides():
    return synthetic_slides(n_patients=3, slides_per_patient=1, grid=(4, 4), n_genes=6,
                            spot_pitch_px=32, seed=1)


def _fit(name, slides, max_epochs, ckpt_dir, ckpt_path=None, seed=0):
    pl.seed_everything(seed, verbose=False)
    genes = list(slides[0].var_names)
    cls = hest2sge.registry.get_model_class(name)
    model = hest2sge.load(name, genes=genes, **cls.tiny_config)
    dm = SpotDataModule.for_model(model, slides, SPLIT, genes=genes, batch_size=8)
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, deterministic=True,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("name", ["stnet", "histogene"])  # a spot and a slide model
def test_resumed_fit_equals_uninterrupted_bit_for_bit(name, slides, tmp_path):
    full = _fit(name, slides, 4, tmp_path / "full")
    _fit(name, slides, 2, tmp_path / "killed")  # "killed" after the epoch-2 checkpoint
    # a fresh process would start from another generator state: the checkpoint must restore it
    resumed = _fit(name, slides, 4, tmp_path / "killed", ckpt_path="last", seed=123)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if a[k].is_floating_point())
    assert diff == 0.0, f"resumed {name} differs from the uninterrupted run by {diff}"
    # the checkpoint carries the generators and still loads without unpickling objects
    ckpt = torch.load(tmp_path / "killed" / "last.ckpt", weights_only=True)
    assert {"python", "numpy", "torch"} <= set(ckpt["hest2sge_rng"])
    assert "train_generator" in ckpt["SpotDataModule"]


def test_inference_load_leaves_generators_alone(slides, tmp_path):
    model = hest2sge.load("stnet", genes=list(slides[0].var_names),
                          **hest2sge.registry.get_model_class("stnet").tiny_config)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["hest2sge_rng"]["torch"]
    for load in (lambda p: hest2sge.load(checkpoint=p),
                 lambda p: type(hest2sge.load(checkpoint=p)).load_from_checkpoint(
                     p, weights_only=True)):
        torch.manual_seed(7)
        load(tmp_path / "last.ckpt")
        # restoring for inference would leave exactly the checkpoint's state behind
        assert not torch.equal(torch.get_rng_state(), saved)


def test_rng_state_round_trip():
    state = capture_rng_state()
    x = (random.random(), float(np.random.rand()), float(torch.rand(())))
    restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == x
    with pytest.raises(ValueError, match="RNG state layout"):
        restore_rng_state({"version": 99})
