"""SpotMetrics callback: per-slide metrics, patient-then-gene aggregation, test table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hest2sge.metrics import SpotMetrics, evaluate_predictions, summarise
from hest2sge.metrics.functional import pcc


def test_summarise_averages_patients_then_genes():
    table = pd.DataFrame({
        "slide_id": ["a", "a", "b", "b", "c", "c"],
        "patient_id": ["P1", "P1", "P1", "P1", "P2", "P2"],
        "gene": ["g1", "g2", "g1", "g2", "g1", "g2"],
        "pcc": [0.2, 0.4, 0.6, np.nan, 0.0, 1.0],
    })
    # P1: g1 = 0.4, g2 = 0.4 (NaN skipped); P2: g1 = 0, g2 = 1 -> g1 0.2, g2 0.7 -> 0.45
    assert summarise(table, ["pcc"])["pcc"] == pytest.approx(0.45)
    # a plain mean over rows would give 0.44: the aggregation order matters
    assert np.nanmean(table["pcc"]) == pytest.approx(0.44)


def test_evaluate_predictions_per_slide():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(30, 3))
    truth = pred + rng.normal(size=(30, 3))
    counts = rng.poisson(2.0, size=(30, 3)).astype(float)
    slide = np.repeat([0, 1], 15)
    table = evaluate_predictions(pred, truth, counts, slide, slide_ids=["s0", "s1"],
                                 patient_ids=["p", "p"], genes=["A", "B", "C"])
    assert len(table) == 6 and set(table["slide_id"]) == {"s0", "s1"}
    row = table[(table.slide_id == "s1") & (table.gene == "B")].iloc[0]
    assert row["pcc"] == pytest.approx(float(pcc(pred[15:, 1], truth[15:, 1])))
    assert row["n_spots"] == 15
    assert {"auc", "auc_10", "ssim", "mi", "js", "nrmse_range"} <= set(table.columns)
    with pytest.raises(ValueError, match="gene names"):
        evaluate_predictions(pred, truth, counts, slide, genes=["A"])


class _FakeTrainer:
    sanity_checking = False

    def __init__(self, dm):
        self.datamodule = dm
        self.log_dir = None
        self.is_global_zero = True


class _FakeModule:
    genes = ["A", "B"]

    def __init__(self):
        self.logged = {}

    def log(self, name, value, **kw):
        self.logged[name] = value


def test_callback_collects_dedupes_and_logs(tmp_path):
    class DM:
        slide_ids = ["s0", "s1"]
        patient_ids = ["p0", "p1"]

    rng = np.random.default_rng(1)
    truth = torch.tensor(rng.normal(size=(20, 2)))
    pred = truth + 0.5 * torch.tensor(rng.normal(size=(20, 2)))
    batch = {"expr": truth, "counts": truth.abs().round(), "slide": torch.repeat_interleave(
        torch.tensor([0, 1]), 10), "spot": torch.arange(20) % 10}
    cb = SpotMetrics(table_path=tmp_path / "t.csv")
    trainer, module = _FakeTrainer(DM()), _FakeModule()
    cb.on_test_epoch_start(trainer, module)
    cb.on_test_batch_end(trainer, module, {"pred": pred}, batch, 0)
    # a padded duplicate of the first spots (as a DistributedSampler would add) is ignored
    dup = {k: v[:3] for k, v in batch.items()}
    cb.on_test_batch_end(trainer, module, {"pred": pred[:3] + 100}, dup, 1)
    cb.on_test_epoch_end(trainer, module)
    expected = np.mean([float(pcc(pred[s * 10:(s + 1) * 10, g], truth[s * 10:(s + 1) * 10, g]))
                        for s in (0, 1) for g in (0, 1)])
    assert module.logged["test/pcc"] == pytest.approx(expected)
    written = pd.read_csv(tmp_path / "t.csv")
    assert len(written) == 4 and set(written["gene"]) == {"A", "B"}
    with pytest.raises(RuntimeError, match="pred"):
        cb.on_test_batch_end(trainer, module, None, batch, 0)
