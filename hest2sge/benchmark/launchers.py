"""Where cells run: in this process (default), a local process pool, or submitit (SLURM, or
submitit's LocalExecutor). Every launcher runs the same job function,
:func:`hest2sge.benchmark.cells.run_cell_job`, one cell per job; a cell may itself use several
GPUs through Lightning (``devices`` in the config)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hest2sge.benchmark.cells import run_cell_job
from hest2sge.benchmark.config import CellSpec

log = logging.getLogger(__name__)
LAUNCHERS = ("local", "pool", "submitit")


def _failed(spec: CellSpec, err: BaseException) -> dict[str, Any]:
    log.error("cell %s failed: %s: %s", spec.cell_id, type(err).__name__, err)
    return {"cell_id": spec.cell_id, "status": "failed", "error": f"{type(err).__name__}: {err}"}


def launch(cfg: dict[str, Any], specs: Sequence[CellSpec]) -> list[dict[str, Any]]:
    """Run the cells with the launcher of ``cfg["launcher"]``.

    Launcher settings: ``kind`` (``local``, ``pool``, ``submitit``); for ``pool``: ``workers``
    and ``threads_per_worker``; for ``submitit``: ``executor`` (``slurm`` or ``local``),
    ``folder``, ``max_parallel`` (local executor) and ``parameters`` (passed to
    ``executor.update_parameters``: ``timeout_min``, ``slurm_partition``, ``gpus_per_node``,
    ``cpus_per_task``, ``mem_gb``, ...).

    Returns:
        One status dict per cell (``done``, ``skipped`` or ``failed`` with the error).
    """
    lc = dict(cfg.get("launcher") or {"kind": "local"})
    kind = lc.get("kind", "local")
    if kind not in LAUNCHERS:
        raise ValueError(f"launcher kind must be one of {LAUNCHERS}, got {kind!r}")
    if kind == "local":
        results = []
        for s in specs:
            try:
                results.append(run_cell_job(cfg, s, cfg.get("threads")))
            except Exception as err:  # one failed cell does not stop the benchmark
                results.append(_failed(s, err))
        return results
    if kind == "pool":
        return _pool(cfg, specs, int(lc.get("workers", 2)),
                     lc.get("threads_per_worker", cfg.get("threads") or 1))
    return _submitit(cfg, specs, lc)


def _pool(cfg, specs, workers: int, threads: int | None) -> list[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = [(s, ex.submit(run_cell_job, cfg, s, threads)) for s in specs]
        for s, f in futs:
            try:
                results.append(f.result())
            except Exception as err:
                results.append(_failed(s, err))
    return results


def _submitit(cfg, specs, lc: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        import submitit
    except ImportError:
        raise ImportError("launcher kind 'submitit' needs submitit: pip install "
                          "'hest2sge[slurm]' (or use launcher: {kind: local} / {kind: pool})"
                          ) from None

    folder = Path(lc.get("folder") or Path(cfg["output"]) / "submitit")
    executor_kind = lc.get("executor", "slurm")
    if executor_kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
    elif executor_kind == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    else:
        raise ValueError(f"submitit executor must be 'slurm' or 'local', got {executor_kind!r}")
    params = dict(lc.get("parameters") or {})
    params.setdefault("timeout_min", 24 * 60)
    ex.update_parameters(**params)
    wave = int(lc.get("max_parallel", 0)) or len(specs) or 1
    threads = lc.get("threads_per_worker", cfg.get("threads"))
    results = []
    for i in range(0, len(specs), wave):
        chunk = list(specs[i:i + wave])
        jobs = [ex.submit(run_cell_job, cfg, s, threads) for s in chunk]
        for s, job in zip(chunk, jobs):
            try:
                res = dict(job.result())
                res["job_id"] = str(job.job_id)
                results.append(res)
            except Exception as err:
                results.append(_failed(s, err))
    return results
