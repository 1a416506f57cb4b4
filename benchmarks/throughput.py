"""Patch extraction vs HDF5 cache throughput, and ST-Net training-step throughput.

Run: ``.venv/bin/python benchmarks/throughput.py [--her2st ../shared/data/her2st]``.
Reports ratios measured side by side in one run (absolute numbers depend on the machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def patch_throughput(her2st: Path | None) -> None:
    from hest2sge.data import cached_patches, extract_patches, read_her2st, synthetic_slides

    if her2st is not None and her2st.exists():
        slide = read_her2st(her2st, sections=["C2"])[0]
        label = "HER2+ C2"
    else:
        slide = synthetic_slides(n_patients=1, slides_per_patient=1, grid=(20, 20))[0]
        label = "synthetic 20x20"
    n = slide.n_obs
    t_extract = _time(lambda: extract_patches(slide, patch_size=224), repeat=1)
    with tempfile.TemporaryDirectory() as d:
        t_write = _time(lambda: cached_patches(slide, 224, cache_dir=d), repeat=1)

        def read_all():
            store = cached_patches(slide, 224, cache_dir=d)
            for i in range(len(store)):
                store[i]

        t_read = _time(read_all)
    print(f"[patches] {label}: {n} spots, 224 px")
    print(f"  extract (image decode + crop): {t_extract:.2f} s  = {n / t_extract:.0f} patches/s")
    print(f"  first call with cache (extract + write): {t_write:.2f} s")
    print(f"  cached read, one patch at a time: {t_read:.3f} s = {n / t_read:.0f} patches/s")
    print(f"  cache speed-up over extraction: {t_extract / t_read:.1f}x")


def stnet_step(batch_size: int = 8, steps: int = 3) -> None:
    import hest2sge

    torch.manual_seed(0)
    model = hest2sge.load("stnet", n_genes=785, pretrained=False)
    opt = model.configure_optimizers()
    batch = {"img": torch.rand(batch_size, 3, 224, 224), "expr": torch.randn(batch_size, 785)}

    def step():
        opt.zero_grad()
        loss = model.loss(model(batch), batch)
        loss.backward()
        opt.step()

    step()  # warm-up
    t = _time(step, repeat=steps)
    print(f"[stnet] DenseNet-121, 785 genes, batch {batch_size}, 224 px: "
          f"{t:.2f} s/step = {batch_size / t:.2f} spots/s (median of {steps})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--her2st", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    patch_throughput(args.her2st)
    stnet_step(args.batch_size)


if __name__ == "__main__":
    main()
