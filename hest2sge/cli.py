"""Command line: ``hest2sge fit|validate|test|predict`` (LightningCLI with YAML configs) and
one entry per further subcommand in :data:`COMMANDS` (``models``, ``demo``, ...).

Each further subcommand lives in its own module as ``main(argv) -> int``; this file only
holds the dispatch table (one line per subcommand).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

#: LightningCLI subcommands and their help lines.
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model (YAML config: --config examples/configs/<model>.yaml)",
    "validate": "validation metrics of a model (--ckpt_path for trained weights)",
    "test": "test metrics of a checkpoint (--ckpt_path; the model comes from the checkpoint)",
    "predict": "write one .h5ad of predictions per slide (--ckpt_path)",
}

#: Further subcommands: name -> ("module:function", help line); function(argv) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("hest2sge.models.table:main", "the registered models and their paper settings"),
    "demo": ("hest2sge.demo:main", "train ST-Net on synthetic slides and evaluate it"),
    "predict-wsi": ("hest2sge.translational.wsi_cli:main",
                    "predict on every tissue tile of a whole-slide image (no spots)"),
    "survival": ("hest2sge.translational.survival_cli:main",
                 "Cox survival analysis on pseudobulk + clinical tables (the paper's protocol)"),
    "benchmark": ("hest2sge.benchmark.cli:main", "run a benchmark config (models x datasets x "
                  "folds; --dry-run lists cells and costs)"),
}

# Messages Lightning prints on every run that say nothing about the user's configuration.
_QUIET = (
    r".*overridden `on_after_batch_transfer` in `LightningModule`.*",
    r".*`tensorboardX` has been removed as a dependency.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    r".*is smaller than the logging interval.*",
)


def usage() -> str:
    """The top-level help text."""
    width = max(len(n) for n in [*LIGHTNING_COMMANDS, *COMMANDS])
    lines = ["usage: hest2sge <command> [options]     (hest2sge <command> --help for its options)",
             "", "Lightning commands (YAML configs in examples/configs):"]
    lines += [f"  {n:<{width}}  {h}" for n, h in LIGHTNING_COMMANDS.items()]
    lines += ["", "Other commands:"]
    lines += [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
    lines += ["", "Example: hest2sge fit --config examples/configs/smoke.yaml"]
    return "\n".join(lines)


def _resolve(target: str) -> Any:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _quiet_lightning() -> None:
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)


def lightning_cli(args: Sequence[str] | None = None, run: bool = True):
    """The LightningCLI over every registered model and :class:`SpotDataModule`.

    ``validate``/``test``/``predict`` with ``--ckpt_path`` and no model take the model class
    and its hyperparameters from the (hest2sge) checkpoint, so checkpoints saved from Python
    work without a config. ``predict`` writes one ``.h5ad`` per slide
    (:class:`~hest2sge.writers.SlidePredictionWriter`, into ``<default_root_dir>/predictions``
    unless a prediction writer is configured).
    """
    from lightning.pytorch.cli import LightningCLI

    import hest2sge.models  # noqa: F401  (registers the models)
    from hest2sge.data.datamodule import SpotDataModule
    from hest2sge.models.base import SpotModel

    _quiet_lightning()
    if args is not None:
        args = _model_from_checkpoint(list(args))

    class Hest2sgeCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The model's gene panel is the data module's (computed from training slides).
            parser.link_arguments("data.genes", "model.init_args.genes", apply_on="instantiate")

        def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            if "weights_only" in self._subcommand_method_arguments.get(subcommand, ()):
                parser.set_defaults(weights_only=True)  # never unpickle arbitrary objects
            return parser

        def _parse_ckpt_path(self) -> None:
            # A hest2sge checkpoint defines its model: class and hyperparameters from the
            # checkpoint (saved from the CLI or from Python), pretrained=False (the weights
            # come from the checkpoint: no download).
            sub = self.config.get("subcommand")
            spec = _checkpoint_model_spec(self.config[sub].get("ckpt_path")) if sub else None
            if spec is None:
                super()._parse_ckpt_path()
                return
            self.config = self.parser.parse_object({sub: {"model": spec}}, self.config)

        def before_fit(self) -> None:
            # fast_dev_run is a smoke test: Lightning still lets ModelCheckpoint(save_last=True)
            # write last.ckpt (as last-v1.ckpt beside a real run's); write nothing.
            if self.trainer.fast_dev_run:
                from lightning.pytorch.callbacks import ModelCheckpoint

                cbs = self.trainer.callbacks
                cbs[:] = [c for c in cbs if not isinstance(c, ModelCheckpoint)]

        def _ensure_metrics(self) -> None:
            from hest2sge.metrics.callback import SpotMetrics

            if not any(isinstance(c, SpotMetrics) for c in self.trainer.callbacks):
                self.trainer.callbacks.append(SpotMetrics())

        def before_validate(self) -> None:
            self._ensure_metrics()

        def before_test(self) -> None:
            self._ensure_metrics()

        def before_predict(self) -> None:
            from lightning.pytorch.callbacks import BasePredictionWriter

            from hest2sge.writers import SlidePredictionWriter

            if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
                import os

                out = os.path.join(self.trainer.default_root_dir, "predictions")
                self.trainer.callbacks.append(SlidePredictionWriter(out))

    return Hest2sgeCLI(
        SpotModel,
        SpotDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def _checkpoint_model_spec(path: str | None) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of a hest2sge checkpoint (read weights-only), with
    ``pretrained=False``; None when ``path`` is not a readable hest2sge checkpoint."""
    import inspect
    import os

    if not path or not os.path.isfile(path):
        return None
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # Lightning reports an unreadable checkpoint itself
    meta = ckpt.get("hest2sge") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "model" not in meta:
        return None
    from hest2sge.registry import get_model_class

    cls = get_model_class(meta["model"])
    accepted = inspect.signature(cls.__init__).parameters
    hp = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k in accepted}
    if "pretrained" in hp:
        hp["pretrained"] = False
    return {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": hp}


def _model_from_checkpoint(argv: list[str]) -> list[str]:
    """``validate``/``test``/``predict --ckpt_path X``: add the checkpoint's model when neither
    ``--model`` nor a config names one, and its gene panel (``--data.genes``) when neither a
    config nor ``--data.genes`` is given."""
    if not argv or argv[0] not in ("validate", "test", "predict"):
        return argv
    opts = argv[1:]
    path = None
    configs = []
    for i, a in enumerate(opts):
        if a == "--ckpt_path" and i + 1 < len(opts):
            path = opts[i + 1]
        elif a.startswith("--ckpt_path="):
            path = a.split("=", 1)[1]
        elif a in ("--config", "-c") and i + 1 < len(opts):
            configs.append(opts[i + 1])
        elif a.startswith("--config="):
            configs.append(a.split("=", 1)[1])
    spec = _checkpoint_model_spec(path)
    if spec is None:
        return argv
    import json

    extra: list[str] = []
    has_model = any(a == "--model" or a.startswith(("--model=", "--model.class_path"))
                    for a in opts) or any(_config_has(c, "model") for c in configs)
    if not has_model:
        extra += ["--model", json.dumps(spec)]
    genes = spec["init_args"].get("genes")
    if genes and not configs and not any(a.startswith("--data.genes") for a in opts):
        extra += ["--data.genes", json.dumps(list(genes))]
    return [argv[0], *extra, *opts]


def _check_configs(args: Sequence[str]) -> None:
    """Read every ``--config`` file first, so a missing file or a YAML syntax error is
    reported with the file's name, line and column (LightningCLI names neither)."""
    import yaml

    from hest2sge.errors import Hest2sgeInputError

    paths = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    paths += [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--config", "-c")]
    for path in paths:
        if path.lstrip().startswith(("{", "[")) or "\n" in path:
            continue  # an inline YAML string, not a file
        if not os.path.isfile(path):
            raise Hest2sgeInputError("config file not found", path=path,
                                     hint="give the path of a YAML file, e.g. "
                                     "examples/configs/smoke.yaml")
        try:
            with open(path) as fh:
                yaml.safe_load(fh)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise Hest2sgeInputError(f"invalid YAML{where}: {problem}", path=path,
                                     hint="fix the YAML syntax") from None


def _config_has(path: str, key: str) -> bool:
    try:
        import yaml

        with open(path) as fh:
            cfg = yaml.safe_load(fh) or {}
        return isinstance(cfg, dict) and bool(cfg.get(key))
    except Exception:
        return True  # let LightningCLI read it and report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hest2sge`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in COMMANDS:
        return int(_resolve(COMMANDS[args[0]][0])(args[1:]) or 0)
    if args[0] not in LIGHTNING_COMMANDS and not args[0].startswith("-"):
        import difflib

        close = difflib.get_close_matches(args[0], [*LIGHTNING_COMMANDS, *COMMANDS], n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        print(f"hest2sge: unknown command {args[0]!r}.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        _check_configs(args)
    except ValueError as e:
        if argv is not None:
            raise
        print(f"hest2sge: {e}", file=sys.stderr)
        return 2
    if argv is None:
        # The real command: LightningCLI reads sys.argv itself (passing args as well makes
        # it warn on every call).
        sys.argv = [sys.argv[0], *_model_from_checkpoint(args)]
        lightning_cli(None)
    else:
        lightning_cli(args)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
