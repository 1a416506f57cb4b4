"""Command line: registry table and LightningCLI fit through the YAML config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hest2sge.cli import main

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
