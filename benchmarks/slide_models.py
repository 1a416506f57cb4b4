"""Peak memory and time of one training step of the slide-level models at PAPER configuration.

Each (model, spots) measurement runs in a fresh subprocess, so the peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``; tracemalloc does not see torch tensors) belongs
to that measurement alone. Inputs are synthetic: random uint8 patches of the model's patch
size (handed to the model's ``on_after_batch_transfer`` as Lightning does), a square grid of array
coordinates, its k-NN graph (the model's ``graph_k``/``graph_max_dist``), random targets and
counts at 785 genes. One optimiser step = forward, loss, backward and Adam update. Besides the
wall time, the CPU time of the step (user + system, all threads) is reported: on a shared,
loaded machine it is the more stable measure of the work done.

Run (low priority, in the background for the large slides)::

    nice -n 19 .venv/bin/python benchmarks/slide_models.py histogene thitogene \\
        --spots 300 1000 4000 --json slide_models.jsonl

Models default to ``histogene hist2st thitogene``; a model that is not registered is skipped.
Compare with SPEC.md section 8 (the original implementations on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

DEFAULT_MODELS = ("histogene", "hist2st", "thitogene")


def _rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _batch(model, n: int, n_genes: int, seed: int = 0):
    import numpy as np
    import torch

    from hest2sge.data import knn_graph

    g = torch.Generator().manual_seed(seed)
    p = model.patch_size
    side = math.ceil(math.sqrt(n))
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n]
    counts = torch.poisson(torch.full((n, n_genes), 2.0), generator=g)
    lib = counts.sum(1)
    batch = {
        "img": torch.randint(0, 256, (n, 3, p, p), dtype=torch.uint8, generator=g),
        "expr": torch.log10(1 + 1e4 * counts / lib[:, None].clamp_min(1)),
        "counts": counts,
        "size_factor": lib / lib.median(),
        "coord": torch.as_tensor(coords, dtype=torch.long),
        "pos": torch.as_tensor(coords * 100.0, dtype=torch.float32),
        "slide": torch.zeros(n, dtype=torch.long),
        "spot": torch.arange(n),
        "edge_index": knn_graph(coords, k=model.graph_k, max_dist=model.graph_max_dist),
    }
    return model.on_after_batch_transfer(batch, 0)  # what Lightning does after the loader


def worker(name: str, n: int, n_genes: int, warmup: int, repeat: int, overrides: dict) -> dict:
    """One measurement (runs in its own process)."""
    import inspect

    import torch

    import hest2sge
    from hest2sge.registry import get_model_class

    cls = get_model_class(name)
    kwargs = {"n_genes": n_genes, **overrides}
    if "pretrained" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("pretrained", False)
    torch.manual_seed(0)
    model = hest2sge.load(name, **kwargs)
    model.train()
    opt = model.configure_optimizers()
    if isinstance(opt, dict):
        opt = opt["optimizer"]
    batch = _batch(model, n, n_genes)
    rss_ready = _rss_gb()

    cpu: list[float] = []

    def step() -> float:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses = model.loss(model(batch), batch)
        loss = losses["loss"] if isinstance(losses, dict) else losses
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss at {n} spots")
        wall = time.perf_counter() - t
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        return wall

    warm = [step() for _ in range(warmup)]
    times = [step() for _ in range(repeat)]
    return {
        "model": name, "spots": n, "genes": n_genes, "patch_size": model.patch_size,
        "parameters": model.count_parameters(), "warmup_s": warm, "step_s": times,
        "median_step_s": statistics.median(times), "spots_per_s": n / statistics.median(times),
        "step_cpu_s": cpu[warmup:], "median_step_cpu_s": statistics.median(cpu[warmup:]),
        "rss_ready_gb": rss_ready, "peak_rss_gb": _rss_gb(),
        "plan": model.memory_plan(n) if hasattr(model, "memory_plan") else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "overrides": overrides,
    }


def run_one(name: str, n: int, args: argparse.Namespace, overrides: dict | None = None) -> dict:
    overrides = args.overrides if overrides is None else overrides
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, str(n),
           "--genes", str(args.genes), "--warmup", str(args.warmup), "--repeat",
           str(args.repeat), "--set", json.dumps(overrides)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"model": name, "spots": n, "error": err, "returncode": proc.returncode,
                "wall_s": wall}
    res = json.loads(lines[-1])
    res["wall_s"] = wall
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=list(DEFAULT_MODELS),
                   help="registry names (default: %(default)s)")
    p.add_argument("--spots", type=int, nargs="+", default=[300, 1000, 4000])
    p.add_argument("--genes", type=int, default=785)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--repeat", type=int, default=1, help="timed steps (median reported)")
    p.add_argument("--set", dest="overrides", type=json.loads, default={},
                   help='JSON dict of model overrides, e.g. \'{"checkpointing": true}\'')
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=JSON",
                   help="measure each (model, spots) once per variant (overrides merged over "
                        "--set) and print step-time ratios to the first variant, e.g. "
                        '--variant batched=\'{"distill_mode": "batched"}\' '
                        '--variant sequential=\'{"distill_mode": "sequential"}\'')
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the variants this many times (A B A B ...)")
    p.add_argument("--timeout", type=float, default=4 * 3600)
    p.add_argument("--json", help="append one JSON line per measurement to this file")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "SPOTS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), args.genes, args.warmup, args.repeat,
                     args.overrides)
        print(json.dumps(res), flush=True)
        return

    import hest2sge

    known = set(hest2sge.list_models())
    print(f"{'model':<10} {'spots':>6} {'params':>9} {'step s':>9} {'cpu s':>9} {'spots/s':>8} "
          f"{'ready GB':>9} {'peak GB':>8}", flush=True)
    for name in args.models:
        if name not in known:
            print(f"{name:<10} not registered, skipped", flush=True)
            continue
        for n in args.spots:
            variants = [v.split("=", 1) for v in args.variant] or [("", "{}")]
            steps: dict[str, list[float]] = {label: [] for label, _ in variants}
            for _ in range(max(1, args.rounds)):
                for label, spec in variants:
                    res = run_one(name, n, args, {**args.overrides, **json.loads(spec)})
                    res["variant"] = label
                    if args.json:
                        with open(args.json, "a") as fh:
                            fh.write(json.dumps(res) + "\n")
                    tag = f"{name} {label}".strip()
                    if "error" in res:
                        print(f"{tag:<10} {n:>6} failed: {res['error']}", flush=True)
                        continue
                    steps[label] += res["step_s"]
                    print(f"{tag:<10} {n:>6} {res['parameters'] / 1e6:>8.1f}M "
                          f"{res['median_step_s']:>9.2f} {res['median_step_cpu_s']:>9.2f} "
                  f"{res['spots_per_s']:>8.1f} "
                          f"{res['rss_ready_gb']:>9.2f} {res['peak_rss_gb']:>8.2f}", flush=True)
            first = variants[0][0]
            for label, _ in variants[1:]:
                if steps[first] and steps[label]:
                    ratio = statistics.median(steps[label]) / statistics.median(steps[first])
                    print(f"{name} {n} spots: step time {label} / {first} = {ratio:.2f}",
                          flush=True)


if __name__ == "__main__":
    main()
