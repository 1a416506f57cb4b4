"""Image quality: HistoQC's colour metrics per slide, their PCA, and PC1 vs prediction quality.

The benchmark paper (Methods, Fig. 4a) ran HistoQC on the TCGA diagnostic slides,
took its colour metrics, ran a PCA on the scaled metrics and correlated the first component
with each slide's patient-level correlation. This module computes the same nine metrics with
HistoQC's definitions (``BrightContrastModule``, read from choosehappy/HistoQC), on a tissue mask
built like HistoQC's default pipeline, without running HistoQC itself:

* ``grayscale_brightness``: mean of ``skimage.color.rgb2gray`` (0..1) over the mask;
* ``rms_contrast``: standard deviation (population) of that grey image over the mask;
* ``michelson_contrast``: ``(max - min) / (max + min)`` of the grey values over the mask;
* ``chan1..3_brightness``: mean of the R, G, B values (0..255) over the mask;
* ``chan1..3_brightness_YUV``: mean of Y, U, V (``skimage.color.rgb2yuv``, from RGB in 0..1)
  over the mask (the paper's text calls them red, green and blue; HistoQC computes Y, U, V).

All on a low-resolution image: HistoQC works at 1.25x magnification (about 8 µm per pixel),
the default ``work_mpp`` here.

Tissue mask (:func:`tissue_mask`), after HistoQC's default ``config.ini``: keep pixels with
grey < 0.9 and an RGB standard deviation > 10 (``LightDarkModule`` "tissue"), drop grey < 0.15
("darktissue"), fill holes under 1000 px, remove objects under 64 px (``MorphologyModule``).
HistoQC's pen-marking, coverslip-edge, bubble and blur detectors are not reproduced.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("rms_contrast", "michelson_contrast", "grayscale_brightness", "chan1_brightness",
           "chan2_brightness", "chan3_brightness", "chan1_brightness_YUV",
           "chan2_brightness_YUV", "chan3_brightness_YUV")
PYRAMID_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".tif", ".tiff",
                    ".btf", ".svslide")


# ------------------------------------------------------------------------------ low-res image
def _as_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, 2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"{name}: expected an RGB image (H, W, 3), got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _resize(arr: np.ndarray, factor: float) -> np.ndarray:
    if factor <= 1.0:
        return arr
    from PIL import Image

    h, w = arr.shape[:2]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BOX))


def low_res_image(
    source: Any,
    mpp: float | None = None,
    work_mpp: float = 8.0,
    max_side: int = 2048,
) -> np.ndarray:
    """A low-resolution RGB uint8 image of a slide, for QC and tissue masks.

    Args:
        source: An RGB array (used at its own resolution when ``mpp`` is None), an image path
            (pyramidal TIFF/SVS/NDPI/MRXS through tiffslide or openslide; JPEG/PNG through PIL,
            JPEG decoded at reduced size), a reader with ``get_thumbnail((w, h))``
            (OpenSlide / TiffSlide objects), or one with ``thumbnail(downsample)``,
            ``dimensions`` and ``mpp`` (hest2sge's lazy whole-slide readers).
        mpp: Micrometres per pixel of ``source``'s full resolution, if known (read from the
            slide's metadata for pyramidal files when not given).
        work_mpp: Target resolution (HistoQC's 1.25x is about 8 µm/px).
        max_side: Without any resolution, the longest side is reduced to at most this.

    Returns:
        uint8 (H, W, 3).
    """
    if isinstance(source, np.ndarray):
        arr = _as_rgb(source, "image")
        factor = work_mpp / mpp if mpp else 1.0
        return _resize(arr, factor)
    if hasattr(source, "get_thumbnail") and hasattr(source, "dimensions"):
        return _thumbnail_from_reader(source, mpp, work_mpp, max_side, "reader")
    if hasattr(source, "thumbnail") and hasattr(source, "dimensions"):
        # hest2sge's lazy readers: ``thumbnail(downsample) -> (array, downsample used)``
        w, h = (int(v) for v in source.dimensions)
        mpp = mpp or getattr(source, "mpp", None)
        factor = max(work_mpp / mpp if mpp else max(w, h) / max_side, 1.0)
        thumb = source.thumbnail(factor)
        arr = _as_rgb(thumb[0] if isinstance(thumb, tuple) else thumb, "reader")
        return _resize(arr, arr.shape[1] / max(1, round(w / factor)))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected an RGB array, an image path or an OpenSlide-like reader, got "
                        f"{type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.suffix.lower() in PYRAMID_SUFFIXES:
        reader = _open_slide(path)
        try:
            return _thumbnail_from_reader(reader, mpp, work_mpp, max_side, str(path))
        finally:
            close = getattr(reader, "close", None)
            if callable(close):
                close()
    return _flat_thumbnail(path, mpp, work_mpp, max_side)


def _open_slide(path: Path):
    errors = []
    try:
        import tiffslide

        return tiffslide.TiffSlide(str(path))
    except Exception as exc:  # noqa: BLE001 - try the next backend, report both below
        errors.append(f"tiffslide: {exc}")
    try:
        import openslide

        return openslide.OpenSlide(str(path))
    except Exception as exc:  # noqa: BLE001
        errors.append(f"openslide: {exc}")
    raise ValueError(f"cannot open {path} as a whole-slide image ({'; '.join(errors)})")


def _thumbnail_from_reader(reader, mpp, work_mpp, max_side, name) -> np.ndarray:
    w, h = (int(v) for v in reader.dimensions)
    if mpp is None:
        props = getattr(reader, "properties", {}) or {}
        for key in ("tiffslide.mpp-x", "openslide.mpp-x"):
            if props.get(key) not in (None, ""):
                mpp = float(props[key])
                break
    factor = work_mpp / mpp if mpp else max(w, h) / max_side
    factor = max(factor, 1.0)
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    thumb = reader.get_thumbnail(size)
    return _as_rgb(np.asarray(thumb.convert("RGB") if hasattr(thumb, "convert") else thumb), name)


def _flat_thumbnail(path: Path, mpp, work_mpp, max_side) -> np.ndarray:
    import contextlib

    from PIL import Image

    from hest2sge.data.images import pil_limit_lifted

    # A JPEG is decoded at 1/2..1/8 size (draft mode), so a large file costs little memory;
    # other flat formats keep PIL's decompression-bomb guard.
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    with pil_limit_lifted() if jpeg else contextlib.nullcontext():
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise ValueError(
                f"{path}: {exc}; convert it to a pyramidal TIFF, or raise "
                "PIL.Image.MAX_IMAGE_PIXELS if the machine has the memory to decode it"
            ) from exc
        with im:
            w, h = im.size
            factor = work_mpp / mpp if mpp else max(w, h) / max_side
            factor = max(factor, 1.0)
            if im.format == "JPEG":
                im.draft("RGB", (max(1, int(w / factor)), max(1, int(h / factor))))
            arr = np.asarray(im.convert("RGB"))
    target = (max(1, round(w / factor)), max(1, round(h / factor)))
    if arr.shape[1] > target[0]:
        arr = np.asarray(Image.fromarray(arr).resize(target, Image.Resampling.BOX))
    return arr


# ------------------------------------------------------------------------------ mask + metrics
def tissue_mask(
    rgb: np.ndarray,
    upper: float = 0.9,
    lower_std: float = 10.0,
    dark: float = 0.15,
    min_hole: int = 1000,
    min_object: int = 64,
) -> np.ndarray:
    """HistoQC-style tissue mask of a low-resolution RGB image (see the module docstring)."""
    import inspect

    from skimage.color import rgb2gray
    from skimage.morphology import remove_small_holes, remove_small_objects

    rgb = _as_rgb(rgb, "image")
    gray = rgb2gray(rgb)
    std = rgb.astype(np.float64).std(axis=2)
    mask = (gray < upper) & (std > lower_std) & ~(gray < dark)
    # HistoQC removes holes/objects strictly smaller than the size (scikit-image < 0.26
    # ``area_threshold``/``min_size``; ``max_size`` from 0.26 removes sizes <= it).
    new = "max_size" in inspect.signature(remove_small_objects).parameters
    if min_hole > 0:
        mask = remove_small_holes(mask, max_size=min_hole - 1) if new else \
            remove_small_holes(mask, area_threshold=min_hole)
    if min_object > 0:
        mask = remove_small_objects(mask, max_size=min_object - 1) if new else \
            remove_small_objects(mask, min_size=min_object)
    return mask


def color_metrics(rgb: np.ndarray, mask: np.ndarray | None = None,
                  name: str = "image") -> dict[str, float]:
    """HistoQC's nine colour metrics of an RGB image over a mask (default: :func:`tissue_mask`).

    Raises:
        ValueError: when the mask holds no pixel (HistoQC reports -100; a number that looks
            like a measurement would corrupt a PCA, so this is an error here).
    """
    from skimage.color import rgb2gray, rgb2yuv

    rgb = _as_rgb(rgb, name)
    mask = tissue_mask(rgb) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"{name}: mask of shape {mask.shape} does not match the image "
                         f"{rgb.shape[:2]}")
    if not mask.any():
        raise ValueError(f"{name}: no tissue in the mask; colour metrics are undefined "
                         "(check the image, or pass a mask)")
    gray = rgb2gray(rgb)[mask]
    gmax, gmin = float(gray.max()), float(gray.min())
    out = {
        "rms_contrast": float(np.sqrt(np.mean((gray - gray.mean()) ** 2))),
        "michelson_contrast": (gmax - gmin) / (gmax + gmin) if gmax + gmin > 0 else 0.0,
        "grayscale_brightness": float(gray.mean()),
    }
    for k in range(3):
        out[f"chan{k + 1}_brightness"] = float(rgb[..., k][mask].astype(np.float64).mean())
    yuv = rgb2yuv(rgb)
    for k in range(3):
        out[f"chan{k + 1}_brightness_YUV"] = float(yuv[..., k][mask].mean())
    return out


def qc_table(
    sources: Mapping[str, Any] | Sequence[Any],
    mpp: float | Mapping[str, float] | None = None,
    work_mpp: float = 8.0,
):
    """Colour metrics (and the tissue fraction) of several slides.

    Args:
        sources: name -> image source (see :func:`low_res_image`), or a list of paths (named
            by file stem).
        mpp: Resolution of the sources (one number, or per name), if known.
        work_mpp: Working resolution.

    Returns:
        ``pandas.DataFrame``: slides x (:data:`METRICS` + ``tissue_fraction``).
    """
    import pandas as pd

    if not isinstance(sources, Mapping):
        sources = {Path(s).stem if isinstance(s, (str, os.PathLike)) else str(i): s
                   for i, s in enumerate(sources)}
    rows = {}
    for name, src in sources.items():
        m = mpp.get(name) if isinstance(mpp, Mapping) else mpp
        img = low_res_image(src, mpp=m, work_mpp=work_mpp)
        mask = tissue_mask(img)
        rows[name] = {**color_metrics(img, mask, name=str(name)),
                      "tissue_fraction": float(mask.mean())}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "slide"
    return out


# ------------------------------------------------------------------------------ PCA + comparison
def qc_pca(table, metrics: Sequence[str] = METRICS):
    """PCA of the scaled metrics (centred, unit variance with ``ddof=1``, as R's ``prcomp``).

    The sign of each component is fixed so that its largest loading is positive.

    Returns:
        dict with ``scores`` (DataFrame slides x PCs), ``loadings`` (metrics x PCs) and
        ``explained`` (variance ratio per PC).
    """
    import pandas as pd

    missing = [m for m in metrics if m not in table.columns]
    if missing:
        raise KeyError(f"QC table lacks metrics {missing}")
    x = table[list(metrics)].to_numpy(dtype=np.float64)
    if len(x) < 2:
        raise ValueError("a PCA needs at least two slides")
    if not np.isfinite(x).all():
        raise ValueError("QC table has NaN or infinite values")
    sd = x.std(0, ddof=1)
    keep = sd > 0
    z = (x[:, keep] - x[:, keep].mean(0)) / sd[keep]
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    for k in range(vt.shape[0]):
        if vt[k, np.argmax(np.abs(vt[k]))] < 0:
            vt[k], u[:, k] = -vt[k], -u[:, k]
    names = [f"PC{i + 1}" for i in range(len(s))]
    var = s**2
    return {"scores": pd.DataFrame(u * s, index=table.index, columns=names),
            "loadings": pd.DataFrame(vt.T, index=[m for m, k in zip(metrics, keep) if k],
                                     columns=names),
            "explained": pd.Series(var / var.sum(), index=names)}


def qc_vs_correlation(pc1, correlation, path: str | os.PathLike | None = None,
                      title: str | None = None) -> dict[str, float]:
    """PC1 of the QC metrics against the patient-level correlation: Spearman (and Pearson).

    Args:
        pc1: Series slide -> PC1 score. correlation: Series slide -> patient-level r.
        path: Optional PNG path for the scatter plot with its least-squares line.

    Returns:
        dict with ``n``, ``spearman_rho``, ``spearman_p``, ``pearson_r``, ``pearson_p``.
    """
    from scipy import stats

    common = [s for s in pc1.index if s in set(correlation.index)]
    x = np.asarray([pc1[s] for s in common], dtype=np.float64)
    y = np.asarray([correlation[s] for s in common], dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        raise ValueError(f"{len(x)} slides with both a PC1 score and a correlation; need >= 3")
    rho, rp = stats.spearmanr(x, y)
    r, pp = stats.pearsonr(x, y)
    out = {"n": int(len(x)), "spearman_rho": float(rho), "spearman_p": float(rp),
           "pearson_r": float(r), "pearson_p": float(pp)}
    if path is not None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.scatter(x, y, s=18)
        slope, icpt = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 50)
        ax.plot(xs, slope * xs + icpt, color="k", lw=1)
        ax.set_xlabel("PC1 of HistoQC colour metrics")
        ax.set_ylabel("patient-level correlation")
        ax.set_title(title or f"Spearman rho={rho:.2f} (p={rp:.2g}), n={len(x)}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return out
