"""Efficiency profile of the registered models (the paper's efficiency category) -> JSON.

Trains each model on ONE slide for ``--epochs`` epochs through the benchmark's training path
(configuration record, from-scratch settings without pretrained weights) and records seconds
per epoch (after the first) and peak memory (tracemalloc, sampled RSS, GPU max allocated).
The JSON is what ``hest2sge benchmark --dry-run`` reads for its cost estimates
(``efficiency: {profile: ...}`` in a config; the package ships one CPU profile)::

    python benchmarks/efficiency_profile.py --out efficiency.json            # paper configs
    python benchmarks/efficiency_profile.py --tiny --out efficiency_tiny.json
    python benchmarks/efficiency_profile.py --her2st ../shared/data/her2st --section C2

By default the slide is synthetic (``--spots`` spots, 224 px patches, 785 genes); the paper
profiles HER2+ A1 (346 spots) for 10 epochs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", help="registry names (default: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--spots", type=int, default=24, help="spots of the synthetic slide")
    p.add_argument("--genes", type=int, default=785)
    p.add_argument("--her2st", help="read a real HER2+ section from this root instead")
    p.add_argument("--section", default="C2")
    p.add_argument("--tiny", action="store_true", help="tiny configurations (tests)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="efficiency.json")
    p.add_argument("--same-process", action="store_true",
                   help="profile every model in this process (default: one fresh process per "
                        "model, so each peak RSS belongs to that model alone)")
    args = p.parse_args(argv)
    models_arg = args.models
    if not args.same_process and (models_arg is None or len(models_arg) > 1):
        return _isolated(args, argv or sys.argv[1:])

    import torch

    import hest2sge
    from hest2sge.benchmark.efficiency import profile

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.her2st:
        slide = hest2sge.data.read_her2st(args.her2st, sections=[args.section])[0]
        where = f"HER2+ section {args.section} ({slide.n_obs} spots)"
    else:
        cols = max(1, math.ceil(math.sqrt(args.spots)))
        rows = math.ceil(args.spots / cols)
        slide = hest2sge.data.synthetic_slides(n_patients=1, slides_per_patient=1,
                                               grid=(rows, cols), n_genes=args.genes)[0]
        where = f"one synthetic slide ({slide.n_obs} spots, 224 px patches)"
    models = args.models or hest2sge.list_models()
    protocol = (f"train on {where}, {args.genes} genes, for {args.epochs} epochs on "
                f"{args.accelerator} ({'TINY configurations' if args.tiny else 'paper configurations'}"
                ", random init with the record's from-scratch settings); sec_per_epoch = mean "
                "after the first epoch; peak tracemalloc (Python allocations) and sampled RSS "
                "(process, includes tensors)")
    res = profile(models, slide, output=args.out, protocol=protocol, epochs=args.epochs,
                  n_genes=args.genes, tiny=args.tiny, accelerator=args.accelerator,
                  overrides={"pretrained": False})
    for r in res["models"].values():
        print(json.dumps(r))
    return 0


def _isolated(args, argv: list[str]) -> int:
    """Run each model in its own subprocess and merge the JSON files."""
    import subprocess
    import tempfile
    from pathlib import Path

    import hest2sge

    models = args.models or hest2sge.list_models()
    rest, skip = [], False
    for a in argv:  # drop --models ... and --out ... from the forwarded arguments
        if a in ("--models", "--out"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        rest.append(a)
    merged: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in models:
            out = Path(tmp) / f"{m}.json"
            subprocess.run([sys.executable, __file__, *rest, "--models", m, "--out", str(out)],
                           check=False)
            if out.is_file():
                one = json.loads(out.read_text())
                merged.setdefault("protocol", one["protocol"] + "; one process per model")
                merged.setdefault("hardware", one["hardware"])
                merged.setdefault("models", {}).update(one["models"])
            else:
                merged.setdefault("models", {})[m] = {"model": m, "error": "process failed"}
            Path(args.out).write_text(json.dumps(merged, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
