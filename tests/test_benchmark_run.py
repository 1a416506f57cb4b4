"""The benchmark end to end on the smoke config (CI size): report, tables, figures,
provenance; numbers equal a direct numpy computation on the written long table; a run killed
with ``kill -9`` and resumed equals an uninterrupted run; the process-pool and submitit
(LocalExecutor) launchers produce the same cells."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from hest2sge.benchmark import load_config, run
from hest2sge.benchmark.config import CellSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_cfg(tmp_path_factory) -> dict:
    """benchmarks/configs/smoke.yaml at CI size: 4 patients x 1 section, 6 x 6 spots,
    12 genes, 1 epoch."""
    cfg = yaml.safe_load((ROOT / "benchmarks" / "configs" / "smoke.yaml").read_text())
    cfg["datasets"]["synthetic"]["slides"].update(n_patients=4, slides_per_patient=1,
                                                   grid=[6, 6], n_genes=12)
    cfg["epochs"] = 1
    cfg["output"] = str(tmp_path_factory.mktemp("bench") / "uninterrupted")
    return cfg


@pytest.fixture(scope="module")
def smoke_run(smoke_cfg):
    return run(smoke_cfg)


def test_smoke_benchmark_end_to_end(smoke_run):
    res = smoke_run
    assert not res.failed, res.failed
    out = res.output
    models = {"stnet", "ridge", "mlp"}
    summ = res.summary
    assert set(summ["model_id"]) == models | {"ref_depth", "ref_train_mean"}
    assert set(summ.loc[summ["model_id"].isin(models), "pred_type"]) == {"own", "common"}
    assert (summ["n_folds"] == 4).all() and (summ["n_patients"] == 4).all()
    text = (out / "report.md").read_text()
    for needle in ("## Protocol", "patient-grouped 4-fold", "aggregation: per image",
                   "TINY model configurations", "epochs (run / paper)", "## Rankings",
                   "depth confound", "## Gene subsets", "Moran's I"):
        assert needle in text, needle
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert any(p.startswith("summary_heatmap_") for p in pngs)
    assert any(p.startswith("boxplot_pcc_") for p in pngs)
    assert set(res.rankings) == {("synthetic", "own"), ("synthetic", "common")}
    prov = json.loads((out / "provenance.json").read_text())
    assert {"hest2sge", "git_commit", "config", "seed", "split_sha256", "hardware"} <= set(prov)
    cell = json.loads((out / "cells" / "synthetic__mlp__fold0" / "cell.json").read_text())
    assert cell["max_epochs"] == 1 and cell["paper_epochs"] == 50 and cell["tiny"]
    assert len(cell["panel_sha256"]) == 64 and cell["split"]["test"]
    ridge = json.loads((out / "cells" / "synthetic__ridge__fold0" / "cell.json").read_text())
    assert ridge["max_epochs"] == 1  # closed-form fit keeps its one pass


def _pcc(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def test_fold_numbers_equal_numpy_on_the_written_long_table(smoke_run):
    out = smoke_run.output
    long = pd.read_parquet(out / "cells" / "synthetic__stnet__fold2" / "predictions.parquet")
    assert list(long.columns[:11]) == ["dataset", "img_id", "patient_id", "model_id",
                                       "pred_type", "train_fold", "gene", "exprs", "pred",
                                       "counts", "patch_id"]
    own = long[long["pred_type"] == "own"]
    genes = list(dict.fromkeys(own["gene"]))
    per_patient: dict[str, list] = {}
    for _img, g in own.groupby("img_id"):
        per_patient.setdefault(g["patient_id"].iloc[0], []).append(
            _pcc(g["pred"].to_numpy().reshape(-1, len(genes)),
                 g["exprs"].to_numpy().reshape(-1, len(genes))))
    with np.errstate(invalid="ignore"):
        expected = np.nanmean(np.nanmean([np.nanmean(v, 0) for v in per_patient.values()], 0))
    folds = pd.read_csv(out / "folds.csv")
    row = folds[(folds["model_id"] == "stnet") & (folds["pred_type"] == "own")
                & (folds["train_fold"] == 2)].iloc[0]
    assert row["pcc"] == pytest.approx(expected, abs=1e-9)


def _done(out: Path) -> list[Path]:
    return sorted(p for p in (out / "cells").glob("*/cell.json") if "__refs__" not in str(p))


def test_resume_after_kill_equals_uninterrupted(smoke_cfg, smoke_run, tmp_path):
    cfg = dict(smoke_cfg, output=str(tmp_path / "killed"))
    path = tmp_path / "smoke_ci.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "hest2sge.cli", "benchmark", "--config",
                             str(path), "--quiet"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    out = Path(cfg["output"])
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "cells").is_dir() and len(_done(out)) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the benchmark finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in _done(out)}
    assert 2 <= len(finished) < 12
    resumed = run(load_config(str(path)))
    assert not resumed.failed
    # finished cells were skipped, not recomputed; no temporary folder is left
    assert all(p.stat().st_mtime_ns == m for p, m in finished.items())
    assert not list((out / "cells").glob(".tmp-*"))
    assert sum(c["status"] == "skipped" for c in resumed.cells) >= len(finished)
    a = pd.read_csv(Path(smoke_cfg["output"]) / "summary.csv")
    b = pd.read_csv(out / "summary.csv")
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-6)


def test_pool_and_submitit_local_executor_run_the_same_cells(smoke_cfg, smoke_run, tmp_path):
    from hest2sge.benchmark.launchers import launch

    ref = Path(smoke_cfg["output"]) / "cells"
    for kind, spec, extra in [
        ("submitit", CellSpec("ridge", "synthetic", 0), {"executor": "local", "max_parallel": 1}),
        ("pool", CellSpec("mlp", "synthetic", 1), {"workers": 1}),
    ]:
        cfg = load_config(dict(smoke_cfg, output=str(tmp_path / kind),
                               launcher={"kind": kind, **extra}))
        res = launch(cfg, [spec])
        assert [r["status"] for r in res] == ["done"], res
        if kind == "submitit":
            assert res[0]["job_id"]
        got = pd.read_parquet(tmp_path / kind / "cells" / spec.cell_id / "metrics.parquet")
        exp = pd.read_parquet(ref / spec.cell_id / "metrics.parquet")
        pd.testing.assert_frame_equal(got, exp, check_exact=False, rtol=1e-6)


def test_cross_study_cell_tests_on_the_other_dataset(smoke_cfg, tmp_path):
    from hest2sge.benchmark.cells import run_cell
    from hest2sge.benchmark.runner import plan

    cfg = dict(smoke_cfg, output=str(tmp_path / "cross"), models=["ridge"], baselines=False)
    cfg["datasets"] = dict(cfg["datasets"])
    cfg["datasets"]["other"] = {
        "slides": {"reader": "synthetic", "n_patients": 2, "slides_per_patient": 1,
                   "grid": [6, 6], "n_genes": 12, "spot_pitch_px": 32, "seed": 7},
        "split": {"kind": "explicit", "folds": [{"train": ["P0_S0"], "test": ["P1_S0"]}]}}
    cfg["cross_study"] = [{"train": "synthetic", "fold": 0, "test": "other"}]
    cfg = load_config(cfg)
    specs, refs, _ = plan(cfg)
    cross = [s for s in specs if s.test_dataset == "other"]
    assert [s.cell_id for s in cross] == ["synthetic__ridge__fold0__to__other"]
    assert any(r.test_dataset == "other" for r in refs)
    assert run_cell(cfg, cross[0])["status"] == "done"
    long = pd.read_parquet(Path(cfg["output"]) / "cells" / cross[0].cell_id
                           / "predictions.parquet")
    assert set(long["img_id"]) == {"P0_S0", "P1_S0"}  # every slide of the other dataset
    assert set(long["dataset"]) == {"synthetic->other"}
    meta = json.loads((Path(cfg["output"]) / "cells" / cross[0].cell_id / "cell.json")
                      .read_text())
    assert meta["split"]["train"] and meta["test_dataset"] == "other"


def test_region_folds_run_end_to_end_on_one_slide(tmp_path):
    """A single-slide dataset (Visium kidney style): 4 non-overlapping regions as folds; every
    spot is tested exactly once, by the fold whose test region holds it."""
    cfg = load_config({
        "name": "regions", "output": str(tmp_path / "regions"), "seed": 0,
        "models": ["ridge"], "baselines": False, "tiny": True, "subsets": False,
        "threads": 1,
        "datasets": {"kidney": {
            "slides": {"reader": "synthetic", "n_patients": 1, "slides_per_patient": 1,
                       "grid": [12, 12], "n_genes": 10, "spot_pitch_px": 32},
            "split": {"kind": "regions", "k": 4}, "genes": "all"}},
        "launcher": {"kind": "local"},
    })
    result = run(cfg)
    ridge = [c for c in result.cells if "__ridge__" in c["cell_id"]]
    assert not result.failed and len(ridge) == 4
    long = pd.concat(pd.read_parquet(p) for p in
                     sorted((tmp_path / "regions" / "cells").glob("*__ridge__*/predictions.parquet")))
    long = long[long["pred_type"] == "own"]
    per_spot = long.groupby("patch_id")["train_fold"].nunique()
    assert per_spot.max() == 1 and len(per_spot) == 144      # each spot tested once
    assert long["img_id"].nunique() == 4                      # one region per fold
