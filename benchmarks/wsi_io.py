"""Lazy whole-slide I/O: patch cutting and ``predict_wsi`` on large pyramidal TIFFs.

Make the slides first (``benchmarks/make_pyramid.py``), e.g.::

    .venv/bin/python benchmarks/make_pyramid.py --out /tmp/her2st_C2_50k.tif --size 50000
    .venv/bin/python benchmarks/make_pyramid.py --out /tmp/her2st_C2_20k.tif --size 20000
    .venv/bin/python benchmarks/wsi_io.py patches /tmp/her2st_C2_50k.tif
    .venv/bin/python benchmarks/wsi_io.py wsi /tmp/her2st_C2_20k.tif /tmp/her2st_C2_50k.tif

``patches``: 4,000 spots at seeded random positions on the slide, 224 px patches at native
resolution cut through ``cached_patches`` into an HDF5 cache (the data module's path); reports
the wall time and the process's peak resident memory (``ru_maxrss``), which must stay under
2 GB (level 0 decoded whole would be 7.5 GB).

``wsi``: ``predict_wsi`` at the slide's native resolution with 224 px tiles and a model that
costs almost nothing (a linear map of the mean tile colour), so the figures are those of the
I/O pipeline (mask, tiling, reading, white filter, batching); ``--stnet`` uses the tiny ST-Net
instead. Each measurement runs in a fresh process so peak RSS is its own.

Measured (2 shared CPU cores, load average ~10, so times are pessimistic; torch + Lightning
imports alone take ~900 MB RSS, counted in every predict_wsi figure):

* 50,000 x 50,000 px (HER2+ C2 mirrored, 0.69 µm/px, JPEG tiles, 7 levels, 269 MB file):
  4,000 patches of 224 px in 6.3-12.4 s (320-630 patches/s), peak RSS 242-254 MB.
* predict_wsi, native 0.69 µm/px, 224 px tiles, linear mean-colour model:
  20,000 px slide: 89 x 89 grid, 1,384 tissue tiles (44 white dropped), 6.3 s, 219 tiles/s,
  peak RSS 1,136 MB; 50,000 px slide: 223 x 223 grid, 9,645 tissue tiles (340 white
  dropped), 27.0 s, 358 tiles/s, peak RSS 1,230 MB.
* the same with the tiny ST-Net (test ResNet, batch 64): 33.5 tiles/s and 1,613 MB (20k),
  35.6 tiles/s and 1,829 MB (50k).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_patches(path: str, n: int = 4000, patch: int = 224, seed: int = 0) -> dict:
    import numpy as np

    from hest2sge.data.images import open_image
    from hest2sge.data.patches import cached_patches
    from hest2sge.data.slide import make_slide

    rss0 = _rss_mb()
    with open_image(path) as wsi:
        w, h = wsi.dimensions
        mpp = wsi.mpp
    rng = np.random.default_rng(seed)
    xy = np.stack([rng.uniform(patch, w - patch, n), rng.uniform(patch, h - patch, n)], 1)
    slide = make_slide(np.ones((n, 1)), ["g"], [f"s{i}" for i in range(n)], xy,
                       np.arange(n), np.arange(n), "bench", "p", image_path=path,
                       pixel_size_um=mpp)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = cached_patches(slide, patch, cache_dir=tmp)
        seconds = time.perf_counter() - t0
        first = store[0]
        store.close()
    return {"what": "cut patches", "slide": path, "size": [w, h], "n_patches": n,
            "patch_px": patch, "seconds": round(seconds, 1),
            "patches_per_s": round(n / seconds, 1), "peak_rss_mb": round(_rss_mb(), 0),
            "rss_before_mb": round(rss0, 0), "first_patch_mean": float(first.mean())}


def run_wsi(path: str, stnet: bool = False, patch: int = 224) -> dict:
    import torch
    from torch import nn

    from hest2sge.models.base import SpotModel
    from hest2sge.translational.wsi import predict_wsi

    torch.set_num_threads(1)

    class MeanColour(SpotModel):
        model_name = "bench_mean_colour"

        def __init__(self) -> None:
            super().__init__(n_genes=785, patch_size=patch, normalize="none")
            self.lin = nn.Linear(3, 785)

        def forward(self, batch):
            return self.lin(batch["img"].float().mean(dim=(2, 3)))

    if stnet:
        from hest2sge.registry import get_model_class

        cls = get_model_class("stnet")
        model = cls(n_genes=785, **{**cls.tiny_config, "patch_size": patch})
    else:
        model = MeanColour()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    out = predict_wsi(model, path, pixel_size_um="native", batch_size=64)
    seconds = time.perf_counter() - t0
    info = out.uns["hest2sge"]
    return {"what": "predict_wsi", "model": "stnet-tiny" if stnet else "mean-colour linear",
            "slide": path, "grid": info["grid"], "n_tiles_tissue": info["n_tiles_tissue"],
            "n_tiles": info["n_tiles"], "n_white": info["n_tiles_white_dropped"],
            "seconds": round(seconds, 1),
            "tissue_tiles_per_s": round(info["n_tiles_tissue"] / seconds, 1),
            "peak_rss_mb": round(_rss_mb(), 0), "rss_before_mb": round(rss0, 0)}


def _fresh(args: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["patches", "wsi"])
    p.add_argument("slides", nargs="+")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--stnet", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if args.mode == "patches":
            res = run_patches(args.slides[0], n=args.n)
        else:
            res = run_wsi(args.slides[0], stnet=args.stnet)
        print(json.dumps(res))
        return 0
    for s in args.slides:
        extra = ["--n", str(args.n)] + (["--stnet"] if args.stnet else [])
        res = _fresh([args.mode, str(Path(s)), *extra])
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
