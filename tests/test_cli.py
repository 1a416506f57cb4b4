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
