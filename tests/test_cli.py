"""Command line: registry table and LightningCLI fit through the YAML config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hest2sge.cli import lightning_cli, main
from hest2sge.models.configs import get_record, list_records, to_yaml
from hest2sge.registry import get_model_class

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = json.dumps({"reader": "synthetic", "n_patients": 4, "slides_per_patient": 1,
                        "grid": [6, 6], "n_genes": 12, "spot_pitch_px": 32, "seed": 2})


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "stnet" in out and "STNet" in out
    line = next(row for row in out.splitlines() if row.startswith("stnet"))
    assert "7.76 M" in line and "8 M" in line


def test_fit_from_yaml_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main([
        "fit", "--config", str(ROOT / "examples/configs/stnet.yaml"),
        "--model.init_args.backbone", "test_resnet",
        "--model.init_args.pretrained", "false",
        "--model.init_args.patch_size", "32",
        "--data.slides", TINY_DATA,
        "--data.batch_size", "8",
        "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "2",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path),
    ])
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in ckpts)
    best = next(p for p in ckpts if p.name != "last.ckpt")
    assert "val" in best.name or "epoch=0" in best.name
    import hest2sge

    model = hest2sge.load(checkpoint=best)
    assert model.model_name == "stnet" and len(model.genes) == 12
    assert (tmp_path / "lightning_logs").exists()


def test_unknown_model_in_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--model", "hest2sge.models.NoSuchNet", "--data.slides", TINY_DATA])


@pytest.mark.parametrize("config", sorted((ROOT / "examples/configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_example_configs_parse(config, capsys):
    """Every shipped config is valid for its model class and the data module."""
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(config), "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: hest2sge.models." in out and "slides:" in out


_TRAINING_KEYS = {"optimizer", "lr", "weight_decay", "momentum", "scheduler", "scheduler_step",
                  "scheduler_gamma"}


def _tiny(name: str) -> dict:
    """The model's tiny sizes (fast to build) without its training settings, which stay the
    paper's so the test sees them."""
    return {k: v for k, v in get_model_class(name).tiny_config.items() if k not in _TRAINING_KEYS}


@pytest.mark.parametrize("name", list_records())
def test_shipped_config_is_generated_from_the_record(name):
    path = ROOT / "examples/configs" / f"{name}.yaml"
    assert path.read_text() == to_yaml(name), (
        f"{path} differs from the record: run python -m hest2sge.models.configs --write "
        "examples/configs")


@pytest.mark.parametrize("name", list_records())
def test_cli_builds_the_paper_configuration(name, tmp_path, monkeypatch):
    """`hest2sge fit --config examples/configs/<m>.yaml` builds the model hest2sge.load(m)
    builds, configures the paper's optimiser and schedule, and the trainer the record's."""
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    import hest2sge
    from hest2sge.metrics.callback import SpotMetrics

    monkeypatch.chdir(tmp_path)
    rec = get_record(name)
    tiny = _tiny(name)
    args = ["--config", str(ROOT / "examples/configs" / f"{name}.yaml"),
            "--data.slides", TINY_DATA]
    for k, v in tiny.items():
        args += [f"--model.init_args.{k}", v if isinstance(v, str) else json.dumps(v)]
    cli = lightning_cli(args, run=False)
    model, trainer, dm = cli.model, cli.trainer, cli.datamodule

    ref = hest2sge.load(name, genes=dm.genes, **tiny)
    # LightningCLI adds its own "_class_path"/"_instantiator" entries
    assert {k: v for k, v in model.hparams.items() if not k.startswith("_")} == dict(ref.hparams)
    for key, value in rec.model.items():
        if key not in tiny:
            assert model.hparams[key] == value, f"{name}.{key}"

    model.trainer = trainer
    conf = model.configure_optimizers()
    if "optimizer" not in rec.model:  # GeneCodeR: closed form, no optimiser
        assert conf is None
    else:
        opt = conf["optimizer"] if isinstance(conf, dict) else conf
        want = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                "adamw": torch.optim.AdamW}[rec.model["optimizer"]]
        assert type(opt) is want
        group = opt.param_groups[0]
        assert group["lr"] == rec.model["lr"]
        assert group["weight_decay"] == rec.model["weight_decay"]
        if want is torch.optim.SGD:
            assert group["momentum"] == rec.model["momentum"]
        sched = conf["lr_scheduler"]["scheduler"] if isinstance(conf, dict) else None
        if rec.model["scheduler"] == "step":
            assert type(sched) is torch.optim.lr_scheduler.StepLR
            assert (sched.step_size, sched.gamma) == (rec.model["scheduler_step"],
                                                      rec.model["scheduler_gamma"])
        elif rec.model["scheduler"] == "cosine":
            assert type(sched) is torch.optim.lr_scheduler.CosineAnnealingLR
            assert sched.T_max == rec.max_epochs
        else:
            assert sched is None

    assert trainer.max_epochs == rec.max_epochs
    assert sum(isinstance(c, SpotMetrics) for c in trainer.callbacks) == 1
    ckpts = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert len(ckpts) == 1 and ckpts[0].monitor == rec.monitor
    if rec.monitor is not None:
        assert ckpts[0].mode == rec.monitor_mode
    stops = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    if rec.early_stopping is None:
        assert not stops
    else:
        assert len(stops) == 1
        es = rec.early_stopping
        assert (stops[0].monitor, stops[0].mode, stops[0].patience) == \
            (es["monitor"], es["mode"], es["patience"])
    if rec.batch_size is not None:
        assert dm.batch_size == rec.batch_size
    assert dm._augment_arg == rec.augment


# ---------------------------------------------------------------------- the CLI as a user meets it
def test_help_lists_the_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "models", "demo"):
        assert f"\n  {cmd} " in out, cmd
    assert main([]) == 0 and "models" in capsys.readouterr().out
    assert main(["modles"]) == 2
    assert "Did you mean models" in capsys.readouterr().err


def test_real_command_is_quiet_and_fast_dev_run_writes_no_checkpoint(tmp_path):
    """The installed command as a user runs it: no LightningCLI warning, no checkpoint from a
    fast_dev_run."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    res = subprocess.run(
        [sys.executable, "-c", "import sys; from hest2sge.cli import main; sys.exit(main())",
         "fit", "--config", "examples/configs/smoke.yaml", "--trainer.fast_dev_run", "true"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for noise in ("LightningCLI's args parameter", "on_after_batch_transfer", "tensorboardX"):
        assert noise not in res.stderr, noise
    assert not list(tmp_path.rglob("*.ckpt"))


def _python_checkpoint(path, genes):
    import lightning.pytorch as pl

    import hest2sge

    model = hest2sge.load("stnet", genes=genes, backbone="test_resnet", pretrained=False,
                          patch_size=32, optimizer="adam", lr=1e-3, loss_reduction="mean")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return model


def test_test_and_predict_from_a_python_checkpoint(tmp_path, monkeypatch, capsys):
    """`hest2sge test/predict --ckpt_path X` without a config, for a checkpoint saved from
    Python; predict writes one .h5ad per slide, equal to hest2sge.predict."""
    import anndata as ad
    import numpy as np

    import hest2sge
    from hest2sge.data import load_slides

    monkeypatch.chdir(tmp_path)
    slides = load_slides(json.loads(TINY_DATA))
    genes = list(slides[0].var_names)
    model = _python_checkpoint(tmp_path / "py.ckpt", genes)
    common = ["--ckpt_path", str(tmp_path / "py.ckpt"), "--data.slides", TINY_DATA,
              "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    assert main(["test", *common]) == 0
    assert "test/pcc" in capsys.readouterr().out
    ids = ["P0_S0", "P2_S0"]
    assert main(["predict", *common, "--data.predict_slides", json.dumps(ids),
                 "--trainer.default_root_dir", str(tmp_path / "run")]) == 0
    files = sorted((tmp_path / "run" / "predictions").glob("*.h5ad"))
    assert [f.stem for f in files] == ids
    for f in files:
        got = ad.read_h5ad(f)
        slide = next(s for s in slides if s.obs["slide_id"].iloc[0] == f.stem)
        want = hest2sge.predict(model, slide)
        assert list(got.obs_names) == list(slide.obs_names)
        assert list(got.var_names) == genes
        np.testing.assert_allclose(got.layers["pred"], want.layers["pred"], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(got.layers["counts"], want.layers["counts"])


#: The CLI commands of the README (the lead copies them there); each runs offline as written.
README_COMMANDS = [
    "hest2sge --help",
    "hest2sge models",
    "hest2sge fit --config examples/configs/stnet.yaml --print_config",
    "hest2sge fit --config examples/configs/smoke.yaml",
    "hest2sge test --config examples/configs/smoke.yaml "
    "--ckpt_path smoke_output/checkpoints/last.ckpt",
    "hest2sge predict --config examples/configs/smoke.yaml "
    "--ckpt_path smoke_output/checkpoints/last.ckpt",
    "hest2sge benchmark --config benchmarks/configs/smoke.yaml",
    "hest2sge benchmark --config benchmarks/configs/her2st_paper.yaml --dry-run",
]


def test_readme_commands_run_offline(tmp_path, monkeypatch, capsys):
    import shlex

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # no network
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    for cmd in README_COMMANDS:
        argv = shlex.split(cmd)
        assert argv[0] == "hest2sge"
        try:
            rc = main(argv[1:])
        except SystemExit as e:  # --print_config exits
            rc = e.code or 0
        assert rc == 0, cmd
    assert (tmp_path / "smoke_output" / "checkpoints" / "last.ckpt").is_file()
    assert len(list((tmp_path / "smoke_output" / "predictions").glob("*.h5ad"))) == 1
    assert (tmp_path / "benchmark_output" / "smoke" / "report.md").is_file()


def test_readme_lists_only_tested_commands():
    # Walk the fences line by line (a regex over the whole text pairs a closing fence with
    # the next opening one).
    cmds, lang = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            lang = None if lang is not None else (line[3:].strip() or "text")
        elif lang in ("bash", "sh", "shell", "text") and line.strip().startswith("hest2sge "):
            cmds.append(line.split("  #")[0].strip())
    untested = [c for c in cmds if c not in README_COMMANDS]
    assert cmds and not untested, f"README commands not run by a test: {untested}"
