"""Training throughput of the spot-level models at PAPER configuration on real HER2+ sections,
DeepPT's cached-feature epoch against end-to-end, and GeneCodeR's fit time and peak memory.

Every ``bench_<name>()`` function below is a benchmark selectable by ``<name>`` on the command
line (add one by defining a function; no other wiring)::

    nice -n 19 .venv/bin/python benchmarks/spot_models.py deeppt deepspace genecoder \\
        [--her2st ../shared/data/her2st] [--batch-size 8] [--steps 3] \\
        [--genecoder-spots 2000 10000] [--json spot_models.jsonl]

Training steps use real 224 px HER2+ patches (section C2, cut once into a temporary patch
cache) and real targets of a 785-gene panel (the top genes by mean when the section has
fewer than 785 expressed genes); weights are random (``pretrained=False``: same compute). One
step = forward, loss, backward and optimiser update; figures are the median of ``--steps``
steps after one warm-up step. Ratios are measured side by side in one run. GeneCodeR's fit is
measured in a fresh subprocess per size so that its peak resident set size (``ru_maxrss``;
tracemalloc does not see torch tensors) belongs to that fit alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

N_GENES = 785
RESULTS: list[dict[str, Any]] = []


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _report(**row: Any) -> None:
    RESULTS.append(row)
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)


def _median_step(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _Data:
    """Real HER2+ patches (224 px) and a 785-gene data module, built once."""

    def __init__(self, her2st: Path, cache: Path) -> None:
        from hest2sge.data import SpotDataModule, read_her2st

        self.slides = read_her2st(her2st, sections=["C2", "C3"])
        ids = [s.obs["slide_id"].iloc[0] for s in self.slides]
        n_expr = int((self.slides[0].X.sum(0) > 0).sum())
        self.dm_kwargs = dict(split={"train": ids[:1], "val": ids[1:], "test": []},
                              genes="mean", n_genes=min(N_GENES, n_expr), batch_size=32,
                              cache_dir=cache, allow_patient_overlap=True)
        self.dm = SpotDataModule(self.slides, **self.dm_kwargs)
        self.cache = cache

    def module(self, model, **kw: Any):
        from hest2sge.data import SpotDataModule

        dm = SpotDataModule(self.slides, **{**self.dm_kwargs, **kw})
        dm.configure_for(model)
        dm.setup("fit")
        return dm

    def batch(self, model, batch_size: int) -> dict:
        from hest2sge.models.base import prepare_batch

        dm = self.module(model, batch_size=batch_size)
        return prepare_batch(next(iter(dm.train_dataloader())))


def _train_step(model, batch: dict, hook=None):
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    model.train()

    def step() -> None:
        b = hook(batch) if hook is not None else batch
        opt.zero_grad()
        out = model(b)
        loss = model.loss(out, b)
        (loss["loss"] if isinstance(loss, dict) else loss).backward()
        opt.step()

    return step


# ---------------------------------------------------------------------------------- models
def bench_deepspace(data: _Data, args: argparse.Namespace) -> None:
    """VGG16 at 224 px, SmoothL1, training augmentation included in the step."""
    import hest2sge

    print(f"[deepspace] VGG16, {len(data.dm.genes)} genes, batch {args.batch_size}, 224 px")
    model = hest2sge.load("deepspace", genes=data.dm.genes, pretrained=False)
    batch = data.batch(model, args.batch_size)
    t = _median_step(_train_step(model, batch), args.steps)
    t_aug = _median_step(_train_step(model, batch, hook=lambda b: {
        **b, "img": model.augment_images(b["img"])}), args.steps)
    _report(model="deepspace", params_m=model.count_parameters() / 1e6, step_s=t,
            spots_per_s=args.batch_size / t, step_with_aug_s=t_aug,
            spots_per_s_with_aug=args.batch_size / t_aug, peak_rss_gb=_rss_gb())


def bench_deeppt(data: _Data, args: argparse.Namespace) -> None:
    """Step throughput (frozen trunk / fine-tuned) and epoch time cached vs end-to-end."""
    import lightning.pytorch as pl
    import torch

    import hest2sge

    genes = data.dm.genes
    print(f"[deeppt] ResNet-50 + AE + MLP, {len(genes)} genes, batch {args.batch_size}, 224 px")
    for frozen in (True, False):
        torch.manual_seed(0)
        model = hest2sge.load("deeppt", genes=genes, pretrained=False, freeze_backbone=frozen)
        batch = data.batch(model, args.batch_size)
        t = _median_step(_train_step(model, batch), args.steps)
        _report(model="deeppt", mode="frozen trunk, end-to-end" if frozen else "fine-tuned",
                params_m=model.count_parameters() / 1e6, step_s=t,
                spots_per_s=args.batch_size / t)

    times: dict[str, list[float]] = {}

    class Clock(pl.Callback):
        def __init__(self, key: str) -> None:
            self.key, self.t0 = key, 0.0

        def on_fit_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_start(self, trainer, pl_module) -> None:  # after feature extraction
            times[self.key + " setup"] = [time.perf_counter() - self.t0]

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            times.setdefault(self.key, []).append(time.perf_counter() - self.t0)

    n = 0
    for key, kw, epochs in (("end-to-end", {"cache_features": False}, 1),
                            ("cached x8", {"cache_views": 8}, 3),
                            ("cached x1", {"cache_views": 1}, 3)):
        torch.manual_seed(0)
        model = hest2sge.load("deeppt", genes=genes, pretrained=False, **kw)
        dm = data.module(model, batch_size=32)
        n = dm.tables[dm.split.train[0]].n
        pl.Trainer(max_epochs=epochs, limit_val_batches=0, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
                   callbacks=[Clock(key)]).fit(model, dm)
    e2e = statistics.median(times["end-to-end"])
    for key in ("cached x8", "cached x1"):
        ep = statistics.median(times[key])
        _report(model="deeppt", epoch_spots=n, epoch_end_to_end_s=e2e, mode=key,
                epoch_cached_s=ep, speedup=e2e / ep,
                one_off_extraction_s=times[key + " setup"][0])


def bench_genecoder(data: _Data, args: argparse.Namespace) -> None:
    """Fit on the real sections (224 px) and at HER2+-like sizes (random pixels)."""
    import numpy as np
    import torch

    import hest2sge
    from hest2sge.data import SpotDataModule, read_her2st

    print("[genecoder] i_dim = j_dim = 500, 20 iterations, 224 px (150,528 features)")
    slides = read_her2st(args.her2st)

    ids = [s.obs["slide_id"].iloc[0] for s in slides]
    n_expr = int(min((s.X.sum(0) > 0).sum() for s in slides))
    model = hest2sge.load("genecoder", n_genes=min(N_GENES, n_expr))
    dm = SpotDataModule(slides, split={"train": ids, "val": [], "test": []}, genes="mean",
                        n_genes=min(N_GENES, n_expr), batch_size=64, augment=False,
                        cache_dir=data.cache, allow_patient_overlap=True)
    dm.configure_for(model)
    dm.setup("fit")
    px = np.concatenate([dm.tables[s].patches.load() for s in ids])  # (n, 224, 224, 3)
    px = np.ascontiguousarray(torch.from_numpy(px).permute(0, 3, 1, 2).flatten(1).numpy())
    y = np.concatenate([dm.tables[s].expr for s in ids])
    t = time.perf_counter()
    model.fit_arrays(px, y)
    _report(model="genecoder", data=f"HER2+ C2-C6 real, {len(y)} spots",
            fit_s=time.perf_counter() - t, iterations=len(model.history), params_m=model.count_parameters() / 1e6)
    for n in args.genecoder_spots:
        out = subprocess.run([sys.executable, __file__, "_genecoder_fit", str(n)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr[-2000:])
            continue
        _report(**json.loads(out.stdout.strip().splitlines()[-1]))


def _genecoder_fit(n: int) -> None:
    """Child process: fit GeneCodeR at paper configuration on n random 224 px spots."""
    import numpy as np

    import hest2sge
    from hest2sge.models import genecoder as gc

    rng = np.random.default_rng(0)
    p = 3 * 224 * 224
    x = np.empty((n, p), dtype=np.uint8)
    for i in range(0, n, 1000):
        x[i:i + 1000] = rng.integers(0, 256, size=(min(1000, n - i), p), dtype=np.uint8)
    y = rng.poisson(1.0, size=(n, N_GENES)).astype(np.float32)
    base = _rss_gb()
    model = hest2sge.load("genecoder", n_genes=N_GENES)
    marks: dict[str, float] = {}
    gram, fit = gc.gram, gc.gcode_fit

    def timed_gram(*a, **k):
        t = time.perf_counter()
        out = gram(*a, **k)
        marks["gram_s"] = time.perf_counter() - t
        return out

    def timed_fit(*a, **k):
        t = time.perf_counter()
        out = fit(*a, **k)
        marks["iterations_s"] = time.perf_counter() - t
        return out

    gc.gram, gc.gcode_fit = timed_gram, timed_fit
    t, cpu = time.perf_counter(), time.process_time()
    model.fit_arrays(x, y)
    total, cpu = time.perf_counter() - t, time.process_time() - cpu
    print(json.dumps({"model": "genecoder", "data": f"random {n} x {p} uint8", "fit_s": total,
                      "fit_cpu_s": cpu,
                      **marks, "iterations": len(model.history),
                      "pixels_gb": x.nbytes / 1024**3, "rss_before_fit_gb": base,
                      "peak_rss_gb": _rss_gb()}))


def bench_tcgn(data: _Data, args: argparse.Namespace) -> None:
    """TCGN (CMT-Ti + 2 graph blocks, 112 px crops resized to 224, in-model rotation) against
    ST-Net (DenseNet-121, 224 px), steps interleaved so that both see the same machine load."""
    import torch

    import hest2sge

    genes = data.dm.genes
    print(f"[tcgn] CMT-Ti + graph blocks vs ST-Net, {len(genes)} genes, "
          f"batch {args.batch_size}")
    steps, models = {}, {}
    for name in ("tcgn", "stnet"):
        torch.manual_seed(0)
        models[name] = hest2sge.load(name, genes=genes, pretrained=False)
        steps[name] = _train_step(models[name], data.batch(models[name], args.batch_size))
        steps[name]()  # warm-up
    # wall-clock and process CPU time (the latter is steadier on a shared machine)
    wall: dict[str, list[float]] = {"tcgn": [], "stnet": []}
    cpu: dict[str, list[float]] = {"tcgn": [], "stnet": []}
    for _ in range(args.steps):
        for name in ("tcgn", "stnet"):
            t, c = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    for name in ("tcgn", "stnet"):
        _report(model=name, params_m=models[name].count_parameters() / 1e6,
                patch_px=models[name].patch_size, step_s=med[name], step_cpu_s=med_cpu[name],
                spots_per_s=args.batch_size / med[name])
    _report(model="tcgn", vs="stnet", throughput_ratio=med["stnet"] / med["tcgn"],
            cpu_time_ratio=med_cpu["stnet"] / med_cpu["tcgn"], peak_rss_gb=_rss_gb())


# ---------------------------------------------------------------------------------- main
def _benches() -> dict[str, Any]:
    return {k[len("bench_"):]: f for k, f in globals().items()
            if k.startswith("bench_") and callable(f)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_genecoder_fit"]:
        _genecoder_fit(int(argv[1]))
        return 0
    benches = _benches()
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", default=sorted(benches),
                   help=f"benchmarks to run (default: all): {', '.join(sorted(benches))}")
    p.add_argument("--her2st", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--genecoder-spots", type=int, nargs="*", default=[2000, 10000])
    p.add_argument("--json", type=Path, help="append the result rows to this JSON-lines file")
    args = p.parse_args(argv)
    unknown = [m for m in args.models if m not in benches]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; available: {sorted(benches)}")
    import torch

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        data = _Data(args.her2st, Path(tmp))
        for name in args.models:
            benches[name](data, args)
    if args.json:
        with open(args.json, "a") as f:
            for row in RESULTS:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
