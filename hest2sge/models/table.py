"""``hest2sge models``: the registered models with their size and paper training settings."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _lr(v: object) -> str:
    return "-" if v is None else f"{v:g}"


def main(argv: Sequence[str] | None = None) -> int:
    """Print one row per registered model: input, patch, parameters (and Table 1's), target
    transform, and the configuration record's optimiser, lr, schedule, epochs, batch and
    checkpoint rule."""
    import hest2sge

    p = argparse.ArgumentParser(prog="hest2sge models",
                                description="List the registered models (paper configuration).")
    p.add_argument("--n-genes", type=int, default=785,
                   help="gene panel size for the parameter count (Table 1 uses 785)")
    args = p.parse_args(list(argv or []))
    rows = []
    for name in hest2sge.list_models():
        info = hest2sge.model_info(name, n_genes=args.n_genes)
        paper = info["paper_parameters"]
        tr = info["training"]
        rows.append((name, info["class"], info["input_mode"], str(info["patch_size"]),
                     f"{info['parameters'] / 1e6:.2f} M",
                     "-" if paper is None else f"{paper / 1e6:g} M",
                     info["target_transform"].get("kind", ""),
                     tr["optimizer"] or "-", _lr(tr["lr"]), tr["scheduler"] or "-",
                     str(tr["max_epochs"]),
                     "slide" if tr["batch_size"] is None else str(tr["batch_size"]),
                     tr["checkpoint"]))
    head = ("name", "class", "input", "patch", "params", "paper (Table 1)", "target",
            "optimizer", "lr", "schedule", "epochs", "batch", "checkpoint")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*head))
    print(fmt.format(*("-" * w for w in widths)))
    for r in rows:
        print(fmt.format(*r))
    print(f"\nParameters: trainable, at {args.n_genes} genes. Training settings: the paper "
          "configuration (hest2sge.models.configs; sources in hest2sge.model_info(name)"
          "['sources']).")
    return 0
