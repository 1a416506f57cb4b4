"""Make a large pyramidal tiled TIFF test slide from a HER2+ section.

Run: ``.venv/bin/python benchmarks/make_pyramid.py --out /tmp/her2st_C2_50k.tif``
(defaults: section C2 of ``../shared/data/her2st``, 50,000 x 50,000 px, JPEG tiles of 256 px).

The section's H&E image is repeated by mirroring (reflect at every edge, so tissue stays
continuous) until it fills the requested size; every pyramid level is made from the matching
2^k block-mean reduction of the source, tile by tile, so memory stays at a few copies of the
~9,300 x 9,900 px source however large the output. The level-0 resolution written in the
TIFF tags (pixels per cm) is the section's pixel size as ``read_her2st`` estimates it from the
200 µm spot pitch (``--mpp`` overrides it). The file is read by tifffile, tiffslide and
openslide (generic-tiff) alike.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st"


def _mirror_index(n_out: int, start: int, n_src: int) -> np.ndarray:
    """Source indices of output positions start..start+n_out-1 under mirrored tiling."""
    u = np.arange(start, start + n_out) % (2 * n_src)
    return np.where(u < n_src, u, 2 * n_src - 1 - u)


def make_pyramid(
    out: str | Path,
    root: str | Path = DEFAULT_ROOT,
    section: str = "C2",
    size: int = 50_000,
    mpp: float | None = None,
    quality: int = 85,
    tile: int = 256,
) -> dict:
    """Write the mirrored-tiling pyramid; returns what was written (path, size, mpp, levels)."""
    from hest2sge.data.images import _halve, open_image, write_pyramidal_tiff
    from hest2sge.data.readers import read_her2st
    from hest2sge.data.slide import spatial_entry

    slide = read_her2st(root, sections=[section])[0]
    entry = spatial_entry(slide)
    src_path = entry["image_path"]
    if mpp is None:
        mpp = float(entry["pixel_size_um"])
    with open_image(src_path, max_pixels="none") as im:  # ~92 Mpx: within any sane limit
        src = np.array(im.read_level(0))
    n_levels = 1
    while size // 2 ** (n_levels - 1) > 1024:
        n_levels += 1
    k = 2 ** (n_levels - 1)
    src = src[: src.shape[0] // k * k, : src.shape[1] // k * k]
    pyramid = {1: src}
    for j in range(1, n_levels):
        pyramid[2**j] = _halve(pyramid[2 ** (j - 1)])

    def region(x: int, y: int, w: int, h: int, d: int) -> np.ndarray:
        s = pyramid[d]
        iy = _mirror_index(h, y, s.shape[0])
        ix = _mirror_index(w, x, s.shape[1])
        return s[iy][:, ix]

    t0 = time.perf_counter()
    write_pyramidal_tiff(out, shape=(size, size), region=region, mpp=mpp, tile=tile,
                         compression="jpeg", quality=quality, min_size=1024)
    seconds = time.perf_counter() - t0
    with open_image(out) as wsi:
        info = {"path": str(out), "source": str(src_path), "size": size, "mpp": wsi.mpp,
                "levels": wsi.level_dimensions, "bytes": Path(out).stat().st_size,
                "seconds": round(seconds, 1)}
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output .tif")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="her2st data folder")
    p.add_argument("--section", default="C2")
    p.add_argument("--size", type=int, default=50_000, help="side of level 0 in pixels")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm/px of level 0 (default: the section's estimated pixel size)")
    p.add_argument("--quality", type=int, default=85, help="JPEG quality of the tiles")
    args = p.parse_args(argv)
    info = make_pyramid(args.out, args.root, args.section, args.size, args.mpp, args.quality)
    for k, v in info.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
