"""Efficiency profile (the paper's efficiency category).

Per model: train on ONE image for N epochs through the same ``Trainer`` path as a benchmark
cell (the model's configuration record, no validation) and measure the time per epoch and the
peak memory: Python ``tracemalloc`` (as the paper; it sees Python allocations only, not
tensors), the process resident set size sampled every 20 ms (includes tensors on the CPU) and,
on a GPU, ``torch.cuda.max_memory_allocated``. The first epoch (warm-up, patch cutting) is
reported separately from the mean of the others.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class _RSSSampler(threading.Thread):
    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = self.proc.memory_info().rss
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, self.proc.memory_info().rss)


def profile_model(name: str, slide, *, epochs: int = 2, genes: Any = "mean",
                  n_genes: int = 785, tiny: bool = False, overrides: dict | None = None,
                  accelerator: str = "cpu", use_tracemalloc: bool = True) -> dict[str, Any]:
    """Train ``name`` on one slide for ``epochs`` epochs and measure time and memory.

    Args:
        name: Registry name.
        slide: The training image (the paper uses HER2+ A1).
        epochs: Epochs to train (>= 2 gives a warm-up-free per-epoch time).
        genes, n_genes: Gene panel rule (default: the ``n_genes`` top-mean genes; 785 as the
            HER2+ panel).
        tiny: Use the model's tiny configuration (tests).
        overrides: Model keyword overrides (e.g. ``{"pretrained": False}``); keys the
            model does not accept are ignored, so one dict serves every model.
        accelerator: ``"cpu"`` or ``"gpu"``.
        use_tracemalloc: Trace Python allocations (slows Python-heavy code somewhat).

    Returns:
        Dict with ``model, spots, genes, epochs, first_epoch_s, sec_per_epoch (mean after
        the first epoch; the first epoch for one-pass closed-form models),
        peak_tracemalloc_mb, peak_rss_mb (the process's peak: run one model per process for
        a clean figure), rss_increase_mb (peak minus RSS before the fit), gpu_max_alloc_mb,
        parameters``.
    """
    import lightning.pytorch as pl
    import torch

    import hest2sge
    from hest2sge.benchmark.cells import build_kwargs
    from hest2sge.data.datamodule import SpotDataModule
    from hest2sge.data.slide import slide_id_of
    from hest2sge.data.splits import Split
    from hest2sge.models.configs import get_record
    from hest2sge.registry import get_model_class

    rec = get_record(name)
    cls = get_model_class(name)
    accepted = {n for k in cls.__mro__ if "__init__" in k.__dict__
                for n in inspect.signature(k.__dict__["__init__"]).parameters}
    kw = build_kwargs(rec, cls, tiny, {k: v for k, v in dict(overrides or {}).items()
                                       if k in accepted})
    n_genes = min(int(n_genes), slide.n_vars)
    dm = SpotDataModule([slide], Split(train=[slide_id_of(slide)]), genes=genes,
                        n_genes=n_genes, **rec.datamodule_kwargs())
    model = hest2sge.load(name, genes=dm.genes, **kw)
    dm.configure_for(model)
    dm.setup("fit")  # cut patches before timing (cached, as in a benchmark)
    starts: list[float] = []
    ends: list[float] = []

    class _Timer(pl.Callback):
        # An epoch runs from its start to the next epoch's start (or the end of training),
        # so work a model does in its own epoch-end hooks (closed-form fits) is counted.
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            starts.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            ends.append(time.perf_counter())

    gpu = accelerator == "gpu" and torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[_Timer()])
    sampler = _RSSSampler()
    rss0 = sampler.peak
    sampler.start()
    if use_tracemalloc:
        tracemalloc.start()
    try:
        trainer.fit(model, dm)
    finally:
        peak_py = tracemalloc.get_traced_memory()[1] if use_tracemalloc else 0
        if use_tracemalloc:
            tracemalloc.stop()
        rss = sampler.stop()
    bounds = starts + ends[:1]
    times = [b - a for a, b in zip(bounds, bounds[1:])]
    # closed-form models (one-pass records) fit in their first epoch: that epoch is the cost
    rest = times[:1] if rec.max_epochs == 1 else (times[1:] or times)
    return {
        "model": name, "spots": int(slide.n_obs), "genes": len(dm.genes), "epochs": epochs,
        "first_epoch_s": round(times[0], 3) if times else None,
        "sec_per_epoch": round(sum(rest) / len(rest), 3) if rest else None,
        "peak_tracemalloc_mb": round(peak_py / 2**20, 1) if use_tracemalloc else None,
        "peak_rss_mb": round(rss / 2**20, 1),
        "rss_increase_mb": round((rss - rss0) / 2**20, 1),
        "gpu_max_alloc_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if gpu else None,
        "parameters": model.count_parameters(trainable_only=True),
        "tiny": tiny, "overrides": dict(overrides or {}),
    }


def profile(models: Sequence[str], slide, *, output: str | Path | None = None,
            protocol: str = "", **kwargs: Any) -> dict[str, Any]:
    """Profile several models on one slide; optionally write the JSON a dry run reads.

    Returns:
        ``{"protocol", "hardware", "models": {name: profile_model(...)}}``; a model that fails
        (e.g. out of memory) is recorded with its error.
    """
    from hest2sge.benchmark.runner import hardware

    out: dict[str, Any] = {"protocol": protocol or (
        f"train on one slide ({slide.n_obs} spots) for {kwargs.get('epochs', 2)} epochs; "
        "seconds per epoch after the first; peak tracemalloc and sampled RSS"),
        "hardware": hardware(), "models": {}}
    for m in models:
        try:
            out["models"][m] = profile_model(m, slide, **kwargs)
        except Exception as err:  # report, continue with the others
            out["models"][m] = {"model": m, "error": f"{type(err).__name__}: {err}"}
        if output is not None:  # after each model: a long profile can be read while it runs
            Path(output).write_text(json.dumps(out, indent=1))
    return out
