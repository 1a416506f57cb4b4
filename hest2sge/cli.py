"""Command line: ``hest2sge fit|validate|test|predict`` (LightningCLI with YAML configs),
``hest2sge models`` (the registry as a table) and ``hest2sge demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXTRA_COMMANDS = ("models", "demo", "benchmark")


def _models_table(argv: Sequence[str]) -> int:
    import hest2sge

    p = argparse.ArgumentParser(prog="hest2sge models",
                                description="List the registered models (paper configuration).")
    p.add_argument("--n-genes", type=int, default=785,
                   help="gene panel size for the parameter count (Table 1 uses 785)")
    args = p.parse_args(argv)
    rows = []
    for name in hest2sge.list_models():
        info = hest2sge.model_info(name, n_genes=args.n_genes)
        paper = info["paper_parameters"]
        rows.append((name, info["class"], info["input_mode"], str(info["patch_size"]),
                     f"{info['parameters'] / 1e6:.2f} M",
                     "-" if paper is None else f"{paper / 1e6:g} M",
                     info["target_transform"].get("kind", "")))
    head = ("name", "class", "input", "patch", "params", "paper (Table 1)", "target")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*head))
    print(fmt.format(*("-" * w for w in widths)))
    for r in rows:
        print(fmt.format(*r))
    return 0


def _demo(argv: Sequence[str]) -> int:
    from hest2sge.demo import run_demo

    p = argparse.ArgumentParser(prog="hest2sge demo",
                                description="Train ST-Net on synthetic slides and evaluate it.")
    p.add_argument("--out", default="demo_output", help="output folder (PNG, metrics table)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run_demo(out=args.out, epochs=args.epochs, backbone=args.backbone, seed=args.seed)
    return 0


def lightning_cli(args: Sequence[str] | None = None, run: bool = True):
    """The LightningCLI over every registered model and :class:`SpotDataModule`."""
    from lightning.pytorch.cli import LightningCLI

    import hest2sge.models  # noqa: F401  (registers the models)
    from hest2sge.data.datamodule import SpotDataModule
    from hest2sge.models.base import SpotModel

    class Hest2sgeCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The model's gene panel is the data module's (computed from training slides).
            parser.link_arguments("data.genes", "model.init_args.genes", apply_on="instantiate")

    return Hest2sgeCLI(
        SpotModel,
        SpotDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hest2sge`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "models":
        return _models_table(argv[1:])
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    if argv and argv[0] == "benchmark":
        from hest2sge.benchmark.cli import main as benchmark_main

        return benchmark_main(argv[1:])
    lightning_cli(argv)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
