"""Spot-free whole-slide prediction: ``hest2sge.predict_wsi(model, path, mpp=...)``.

The slide is opened lazily (:func:`hest2sge.data.images.open_image`: pyramidal TIFF, SVS,
NDPI, MRXS, ... through tifffile/openslide/tiffslide; flat JPEG/PNG behind the
decompression-bomb guard) and never held whole in memory:

1. **Resolution.** The level-0 µm/px comes from the file's metadata, or from ``mpp=``; a slide
   whose resolution is unknown is refused unless ``mpp`` is given.
2. **Tissue mask** at low resolution (``mask_mpp`` µm/px or coarser, at most 4,096 px a side,
   read band by band from the coarsest suitable pyramid level): a pixel is tissue when its mean RGB is below ``white`` and its
   colour saturation (max - min channel) is at least ``min_saturation``; small specks are
   removed by a 3 x 3 opening and holes are filled. An empty mask is an error.
3. **Tiling** on a regular grid at the model's input: tiles of ``model.patch_size`` pixels of
   ``pixel_size_um`` µm each, read from the pyramid level nearest the target resolution
   without being coarser than it, and resampled (bilinear, as patch cutting) to the patch
   size. Tiles covering at least ``min_tissue`` of mask are read; tiles that overlap the
   image edge are not used.
4. **White filter** of the paper (Methods, TCGA analysis): a tile is dropped when the sum of its mean
   R, G and B exceeds that of RGB (``white``, ``white``, ``white``) = (220, 220, 220).
5. **Prediction** in batches of ``batch_size`` tiles (spot models) or on the tile graph of
   windows of at most ``graph_window x graph_window`` tiles (slide-level models: array
   coordinates are the tile grid indices within the window, the model's own neighbour graph
   rule is applied to them), so memory is bounded by one batch/window whatever the slide size.

The result is an AnnData with one observation per kept tile: predictions in ``X`` and
``layers["pred"]`` on the model's target scale, tile centres (x, y) in level-0 pixels in
``obsm["spatial"]``, the tile grid in ``obs["array_row"]``/``obs["array_col"]``, and a
scanpy/squidpy-style ``uns["spatial"][slide_id]`` (the low-resolution thumbnail as the
``hires`` image, ``tissue_hires_scalef``, ``spot_diameter_fullres`` = tile side), so
``sc.pl.spatial(out, color=gene)`` works. ``uns["hest2sge"]`` records the units, the model's
target transform, a SHA-256 of its weights, the tiling and filter counts.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

#: The paper's white rule: drop a tile whose mean RGB is whiter than (220, 220, 220).
WHITE_RGB = 220
#: Default resolution of the tissue mask (µm per mask pixel).
MASK_MPP = 8.0
#: Largest side of the tissue mask in pixels (its resolution is coarsened beyond that).
MASK_MAX_PX = 4096


class WSIError(ValueError):
    """A whole slide that cannot be tiled as asked (unknown resolution, no tissue, ...)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def weight_hash(model: Any) -> str:
    """SHA-256 of a model's parameters and buffers (names, dtypes, shapes and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def tissue_mask(
    thumb: np.ndarray, white: float = WHITE_RGB, min_saturation: float = 10.0
) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image (see the module docstring)."""
    from scipy import ndimage

    mask = np.empty(thumb.shape[:2], dtype=bool)
    for r0 in range(0, thumb.shape[0], 256):  # row bands: a few bytes per pixel at a time
        band = thumb[r0:r0 + 256]
        total = band.sum(axis=2, dtype=np.uint16)
        sat = band.max(axis=2) - band.min(axis=2)
        mask[r0:r0 + 256] = (total < 3.0 * white) & (sat >= min_saturation)
    if mask.any():
        mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
        mask = ndimage.binary_fill_holes(mask)
    return mask


def tile_means(tiles: np.ndarray) -> np.ndarray:
    """Mean R, G, B of each uint8 (N, H, W, 3) tile, as float64 (N, 3)."""
    n, h, w = tiles.shape[:3]
    if n == 0:
        return np.zeros((0, 3))
    # rows first, then columns: contiguous reductions, ~10x faster than one strided mean
    s = tiles.reshape(n, h, w * 3).sum(axis=1, dtype=np.uint32).reshape(n, w, 3)
    return s.sum(axis=1, dtype=np.uint64) / float(h * w)


def is_white(tiles: np.ndarray, white: float = WHITE_RGB,
             means: np.ndarray | None = None) -> np.ndarray:
    """Per tile: whether the sum of its mean R, G, B exceeds ``3 * white`` (the paper's rule).

    Args:
        tiles: uint8 (N, P, P, 3).
        white: Threshold per channel (paper: 220).
        means: Precomputed :func:`tile_means`.
    """
    means = tile_means(tiles) if means is None else means
    return means.sum(axis=1) > 3.0 * float(white)


def _model_pixel_size(model: Any) -> float | None:
    for src in (getattr(model, "hparams", {}) or {}, model.__dict__):
        for key in ("train_pixel_size_um", "patch_pixel_size_um"):
            v = src.get(key) if hasattr(src, "get") else None
            if v is not None:
                return float(v)
    return None


def _n_pos(model: Any) -> int | None:
    sizes = [int(m.n_pos) for m in model.modules() if isinstance(getattr(m, "n_pos", None), int)]
    return min(sizes) if sizes else None


def _block_fraction(mask: np.ndarray, r_edges: np.ndarray, c_edges: np.ndarray) -> np.ndarray:
    """Fraction of True pixels of ``mask`` in each block between consecutive edges (a block of
    zero extent counts the single mask pixel at its edge)."""
    r0, c0 = r_edges[:-1], c_edges[:-1]
    r1 = np.minimum(np.maximum(r_edges[1:], r0 + 1), mask.shape[0])
    c1 = np.minimum(np.maximum(c_edges[1:], c0 + 1), mask.shape[1])
    frac = np.zeros((len(r0), len(c0)), dtype=np.float64)
    for i in range(len(r0)):  # one band of tile rows at a time: memory ~ one mask row band
        if r1[i] <= r0[i]:
            continue
        col = mask[r0[i]:r1[i]].sum(axis=0, dtype=np.int32)
        cs = np.concatenate([[0], np.cumsum(col, dtype=np.int64)])
        ok = c1 > c0
        frac[i, ok] = (cs[c1[ok]] - cs[c0[ok]]) / ((r1[i] - r0[i]) * (c1[ok] - c0[ok]))
    return frac


def _scverse_images(thumb: np.ndarray) -> tuple[dict[str, np.ndarray], float, float]:
    """``hires`` (at most 2000 px) and ``lowres`` (at most 600 px) copies of the thumbnail,
    with their scale relative to it."""
    from hest2sge.data.images import _halve

    hires = thumb
    while max(hires.shape[:2]) > 2000 and min(hires.shape[:2]) >= 2:
        hires = _halve(hires)
    low = hires
    while max(low.shape[:2]) > 600 and min(low.shape[:2]) >= 2:
        low = _halve(low)
    return ({"hires": hires, "lowres": low}, hires.shape[1] / thumb.shape[1],
            low.shape[1] / thumb.shape[1])


# --------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------
def predict_wsi(
    model: Any,
    path: str | os.PathLike,
    mpp: float | None = None,
    *,
    pixel_size_um: float | str | None = None,
    batch_size: int = 64,
    white: float = WHITE_RGB,
    min_tissue: float = 0.05,
    min_saturation: float = 10.0,
    mask_mpp: float = MASK_MPP,
    graph_window: int = 32,
    stain_norm: Any = None,
    slide_id: str | None = None,
    device: Any = None,
    backend: str = "auto",
    max_pixels: int | str | None = None,
    progress: bool = False,
):
    """Predict gene expression on every tissue tile of a whole-slide image (no spots needed).

    Args:
        model: A hest2sge spot-level (``input_mode="spot"``) or slide-level
            (``input_mode="slide"``) model.
        path: The slide (pyramidal TIFF, SVS, NDPI, MRXS, ... or a flat JPEG/PNG).
        mpp: µm per pixel of level 0. Default: read from the file's metadata; a slide whose
            resolution is unknown is refused unless it is given here. When both exist and
            differ by more than 5 %, ``mpp`` wins with a warning.
        pixel_size_um: µm per pixel of the model's input patches (the resolution it was trained
            at). Default: the model's recorded training pixel size
            (``train_pixel_size_um``); ``"native"`` tiles level 0 at its own resolution (the
            benchmark paper's TCGA protocol: 224 px tiles of the scanned image).
        batch_size: Tiles per forward pass (spot models) and per read batch.
        white: The white rule's threshold per channel (paper: 220).
        min_tissue: Minimal fraction of a tile covered by the tissue mask for it to be read.
        min_saturation: Colour saturation (0-255) a mask pixel needs to count as tissue.
        mask_mpp: Resolution of the tissue mask (µm per mask pixel).
        graph_window: Side, in tiles, of the windows slide-level models predict on (capped by
            the model's position tables).
        stain_norm: Optional stain normalisation applied to every tile before the model: a
            :class:`~hest2sge.data.stain.StainNormalizer`, its ``to_dict()``, or
            ``"macenko"``; use the one the model was trained with.
        slide_id: Identifier of the slide (default: the file name without suffix).
        device: Device to run the model on (default: the model's).
        backend: Image reader backend (see :func:`hest2sge.data.images.open_image`).
        max_pixels: Pixel limit of flat images (decompression-bomb guard).
        progress: Show a tqdm progress bar.

    Returns:
        AnnData of the kept tiles (see the module docstring).

    Raises:
        WSIError: unknown resolution, unsupported model, no tissue, or no tile left.
        ImageTooLargeError: a flat image whose header is over the pixel limit.
    """
    import anndata as ad
    import pandas as pd
    import torch

    from hest2sge.data.images import open_image
    from hest2sge.data.stain import as_stain_normalizer

    path = Path(path)
    mode = getattr(model, "input_mode", "spot")
    if mode not in ("spot", "slide"):
        raise WSIError(
            f"{type(model).__name__} is an input_mode={mode!r} model (it needs whole-image "
            "inputs per slide); predict_wsi supports spot- and slide-level models"
        )
    if callable(getattr(model, "slide_inputs", None)):
        raise WSIError(f"{type(model).__name__} needs per-slide inputs; not supported by "
                       "predict_wsi")
    patch = int(model.patch_size)
    normalizer = as_stain_normalizer(stain_norm)
    t_start = time.perf_counter()

    wsi = open_image(path, backend=backend, max_pixels=max_pixels)
    try:
        # ---------------------------------------------------------------- resolution
        file_mpp = wsi.mpp
        if mpp is None:
            if file_mpp is None:
                raise WSIError(
                    f"the resolution of {path} is unknown (no µm/px in its metadata); give it "
                    "with mpp=<µm per pixel of level 0> (CLI: --mpp)"
                )
            m0 = float(file_mpp)
        else:
            m0 = float(mpp)
            if not (math.isfinite(m0) and m0 > 0):
                raise WSIError(f"mpp must be a positive number, got {mpp!r}")
            if file_mpp is not None and abs(m0 / file_mpp - 1.0) > 0.05:
                warnings.warn(f"{path}: mpp={m0:g} given, the file says {file_mpp:g} µm/px; "
                              f"using {m0:g}", stacklevel=2)
        if pixel_size_um is None:
            pixel_size_um = _model_pixel_size(model)
            if pixel_size_um is None:
                raise WSIError(
                    f"{type(model).__name__} does not record the pixel size it was trained at; "
                    "pass pixel_size_um=<µm per pixel of its training patches> (e.g. the "
                    "training slides' pixel_size_um when patches were cut at native "
                    "resolution) or pixel_size_um='native' to tile the slide at its own "
                    "resolution (the paper's TCGA protocol)"
                )
        if pixel_size_um == "native":
            target = m0
        else:
            target = float(pixel_size_um)
            if not (math.isfinite(target) and target > 0):
                raise WSIError(f"pixel_size_um must be positive or 'native', got "
                               f"{pixel_size_um!r}")
        down = target / m0  # level-0 pixels per model pixel
        level = wsi.best_level_for_downsample(down)
        d_level = wsi.level_downsamples[level]
        step0 = patch * down  # tile side in level-0 pixels
        read_px = max(int(round(step0 / d_level)), 1)
        w0, h0 = wsi.dimensions
        n_cols, n_rows = int(w0 // step0), int(h0 // step0)
        if n_cols < 1 or n_rows < 1:
            raise WSIError(f"{path} ({w0} x {h0} px) is smaller than one {patch} px tile at "
                           f"{target:g} µm/px")

        # ---------------------------------------------------------------- tissue mask
        # mask resolution: mask_mpp, coarser for huge slides (at most MASK_MAX_PX a side)
        thumb, dm = wsi.thumbnail(max(mask_mpp / m0, max(w0, h0) / MASK_MAX_PX, 1.0))
        mask = tissue_mask(thumb, white=white, min_saturation=min_saturation)
        if not mask.any():
            raise WSIError(
                f"no tissue found in {path}: the tissue mask at {m0 * dm:.1f} µm/px is empty "
                f"(every pixel is whiter than RGB ({white:g}, {white:g}, {white:g}) or "
                f"unsaturated, saturation < {min_saturation:g})"
            )
        # tissue fraction per tile: sums of mask pixels over each tile's footprint
        r_edges = np.clip(np.round(np.arange(n_rows + 1) * step0 / dm).astype(int), 0,
                          mask.shape[0])
        c_edges = np.clip(np.round(np.arange(n_cols + 1) * step0 / dm).astype(int), 0,
                          mask.shape[1])
        frac = _block_fraction(mask, r_edges, c_edges)
        rows, cols = np.nonzero(frac >= min_tissue)
        if len(rows) == 0:
            raise WSIError(f"no tile of {path} covers {min_tissue:.0%} of tissue "
                           f"({int(mask.sum())} mask pixels); lower min_tissue")

        # ---------------------------------------------------------------- model
        was_training = model.training
        model.eval()
        if device is not None:
            model.to(device)
        dev = next(model.parameters(), torch.empty(0)).device
        keep_uint8 = bool(getattr(model, "accepts_uint8_img", False))

        if mode == "slide":
            cap = _n_pos(model)
            win = max(1, min(int(graph_window), cap) if cap else int(graph_window))
            key = (rows // win) * (n_cols // win + 1) + cols // win
            order = np.lexsort((cols, rows, key))
            groups = np.split(order, np.flatnonzero(np.diff(key[order])) + 1)
        else:
            win = None
            order = np.arange(len(rows))  # already row-major
            groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

        from PIL import Image

        def read_tiles(idx: np.ndarray) -> np.ndarray:
            out = np.empty((len(idx), patch, patch, 3), dtype=np.uint8)
            for j, i in enumerate(idx):
                x = int(round(cols[i] * step0 / d_level))
                y = int(round(rows[i] * step0 / d_level))
                t = wsi.read_region(x, y, read_px, read_px, level)
                if read_px != patch:
                    t = np.asarray(Image.fromarray(t).resize((patch, patch),
                                                             Image.Resampling.BILINEAR))
                out[j] = t
            return out

        kept_idx: list[np.ndarray] = []
        preds: list[np.ndarray] = []
        mean_rgb: list[np.ndarray] = []
        n_white = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows), desc=f"predict_wsi {path.name}", unit="tile")
        try:
            with torch.no_grad():
                for grp in groups:
                    sub = [grp[i:i + batch_size] for i in range(0, len(grp), batch_size)] \
                        if mode == "slide" else [grp]
                    tiles_parts, idx_parts, rgb_parts = [], [], []
                    for part in sub:
                        tiles = read_tiles(part)
                        means = tile_means(tiles)
                        white_mask = is_white(tiles, white, means)
                        n_white += int(white_mask.sum())
                        tiles, part = tiles[~white_mask], part[~white_mask]
                        rgb_parts.append(means[~white_mask])
                        if normalizer is not None and len(tiles):
                            tiles = normalizer(tiles)
                        tiles_parts.append(tiles)
                        idx_parts.append(part)
                        if bar is not None:
                            bar.update(len(white_mask))
                    tiles = np.concatenate(tiles_parts) if tiles_parts else np.empty(
                        (0, patch, patch, 3), np.uint8)
                    idx = np.concatenate(idx_parts) if idx_parts else np.empty(0, np.int64)
                    if len(idx) == 0:
                        continue
                    pred = _forward(model, tiles, idx, rows, cols, step0, win, keep_uint8, dev)
                    preds.append(pred)
                    kept_idx.append(idx)
                    mean_rgb.append(np.concatenate(rgb_parts))
        finally:
            if bar is not None:
                bar.close()
            model.train(was_training)
        if not preds:
            raise WSIError(
                f"no tissue tile left in {path}: all {len(rows)} tiles under the tissue mask "
                f"are whiter than RGB ({white:g}, {white:g}, {white:g})"
            )
    finally:
        wsi.close()

    idx = np.concatenate(kept_idx)
    pred = np.concatenate(preds).astype(np.float32, copy=False)
    preds.clear()  # the output holds two copies of the (tiles x genes) matrix, no more
    rgb = np.concatenate(mean_rgb)
    srt = np.lexsort((cols[idx], rows[idx]))
    if not (np.diff(srt) == 1).all():  # slide-level windows: back to row-major order
        idx, pred, rgb = idx[srt], pred[srt], rgb[srt]
    genes = list(model.genes or [f"g{i}" for i in range(pred.shape[1])])
    sid = str(slide_id or path.stem)
    centres = np.stack([(cols[idx] + 0.5) * step0, (rows[idx] + 0.5) * step0], 1)
    obs = pd.DataFrame(
        {
            "slide_id": pd.Categorical([sid] * len(idx)),
            "array_row": rows[idx].astype(np.int64),
            "array_col": cols[idx].astype(np.int64),
            "tissue_fraction": frac[rows[idx], cols[idx]].astype(np.float32),
            "mean_r": rgb[:, 0].astype(np.float32),
            "mean_g": rgb[:, 1].astype(np.float32),
            "mean_b": rgb[:, 2].astype(np.float32),
        },
        index=pd.Index([f"{sid}_r{r}_c{c}" for r, c in zip(rows[idx], cols[idx])]),
    )
    out = ad.AnnData(X=pred, obs=obs)
    out.var_names = genes
    out.layers["pred"] = pred.copy()
    out.obsm["spatial"] = centres
    imgs, hi_scale, lo_scale = _scverse_images(thumb)
    del thumb, mask
    out.uns["spatial"] = {
        sid: {
            "images": imgs,
            "scalefactors": {
                "tissue_hires_scalef": hi_scale / dm,
                "tissue_lowres_scalef": lo_scale / dm,
                "spot_diameter_fullres": float(step0),
            },
            "metadata": {"source_image_path": str(path)},
            "image_path": str(path),
            "image_scale": 1.0,
            "pixel_size_um": m0,
        }
    }
    seconds = time.perf_counter() - t_start
    tt = getattr(model, "fitted_target_transform", None) or model.target_transform_spec()
    out.uns["hest2sge"] = _drop_none({
        "model": getattr(model, "model_name", type(model).__name__),
        "resolution": "wsi_tile",
        "target_transform": tt,
        "weights_sha256": weight_hash(model),
        "units": {
            "X": "predicted expression on the model's target scale (see target_transform)",
            "obsm_spatial": "tile centre (x, y) in level-0 pixels of the slide",
            "slide_mpp": "µm per level-0 pixel",
            "tile_pixel_size_um": "µm per pixel of the model input",
        },
        "slide_path": str(path),
        "slide_mpp": m0,
        "slide_mpp_source": "argument" if mpp is not None else "file metadata",
        "tile_px": patch,
        "tile_pixel_size_um": float(target),
        "tile_side_level0_px": float(step0),
        "read_level": int(level),
        "read_level_downsample": float(d_level),
        "grid": [int(n_rows), int(n_cols)],
        "mask_mpp": float(m0 * dm),
        "n_tiles_grid": int(n_rows * n_cols),
        "n_tiles_tissue": int(len(rows)),
        "n_tiles_white_dropped": int(n_white),
        "n_tiles": int(len(idx)),
        "white_rule": f"dropped when mean R + G + B > 3 x {white:g} (paper: RGB (220, 220, 220))",
        "min_tissue": float(min_tissue),
        "input_mode": mode,
        "graph_window": None if win is None else int(win),
        "stain_norm": None if normalizer is None else normalizer.to_dict(),
        "n_stain_unchanged": 0 if normalizer is None else int(normalizer.n_unchanged),
        "seconds": float(seconds),
        "tiles_per_second": float(len(rows) / seconds) if seconds > 0 else float("nan"),
    })
    return out


def _drop_none(obj: Any) -> Any:
    """Remove None values from nested dicts (h5ad cannot store None)."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


def _forward(model, tiles, idx, rows, cols, step0, win, keep_uint8, dev) -> np.ndarray:
    import torch

    from hest2sge.models.base import prepare_batch

    n = len(idx)
    img = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
    r, c = rows[idx].astype(np.int64), cols[idx].astype(np.int64)
    if win is not None:  # grid coordinates within the window (the position tables' range)
        r, c = r - r.min(), c - c.min()
    coord = np.stack([c, r], 1)
    pos = np.stack([(cols[idx] + 0.5) * step0, (rows[idx] + 0.5) * step0], 1).astype(np.float32)
    batch = {
        "img": img,
        "coord": torch.from_numpy(coord),
        "pos": torch.from_numpy(pos),
        "slide": torch.full((n,), -1, dtype=torch.long),
        "spot": torch.arange(n),
    }
    if win is not None:
        from hest2sge.data.graphs import knn_graph

        batch["edge_index"] = knn_graph(coord, k=model.graph_k, max_dist=model.graph_max_dist)
    batch = prepare_batch(batch, keep_uint8=keep_uint8)
    batch = {k: v.to(dev) for k, v in batch.items()}
    return model.prediction(model(batch)).float().cpu().numpy()
