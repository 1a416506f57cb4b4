"""``hest2sge benchmark``: run (or dry-run) a benchmark config from the shell."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hest2sge benchmark``; returns the exit status (1 if a cell failed)."""
    p = argparse.ArgumentParser(
        prog="hest2sge benchmark",
        description="Run the benchmark grid (models x datasets x folds) of a YAML config, "
                    "resumably, and write tables, figures and report.md.")
    p.add_argument("--config", required=True, help="benchmark YAML (benchmarks/configs/...)")
    p.add_argument("--output", help="output folder (default: the config's 'output')")
    p.add_argument("--launcher", choices=("local", "pool", "submitit"),
                   help="where cells run (default: the config's launcher, else in-process)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cells with estimated costs; run nothing")
    p.add_argument("--no-resume", action="store_true",
                   help="delete finished cells of the output folder and start over")
    p.add_argument("--quiet", action="store_true", help="less logging")
    args = p.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    from hest2sge.benchmark.runner import run

    res = run(args.config, output=args.output, launcher=args.launcher,
              resume=not args.no_resume, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    print(f"report: {res.report}  ({res.seconds:.1f} s, {len(res.cells)} cells, "
          f"{len(res.failed)} failed)")
    for c in res.failed:
        print(f"FAILED {c['cell_id']}: {c['error']}")
    return 1 if res.failed else 0
