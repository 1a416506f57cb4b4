"""HIPT-style two-scale ViT features of a whole image (iStar's histology features).

Two frozen DINO vision transformers (Chen et al., CVPR 2022, "HIPT"; as used by iStar):

* **ViT-256** (ViT-S/16: width 384, depth 12, 6 heads): every 256 x 256 px region is cut into
  16 x 16 px tokens; each output patch token describes one 16 px "superpixel" (``sub``, 384)
  and the CLS token describes the region.
* **ViT-4K** (ViT-4K-XS: Linear(384 -> 192) + GELU, width 192, depth 6, 6 heads) reads the grid
  of the regions' CLS tokens of the whole image; each output token (``cls``, 192) is broadcast
  to the 16 x 16 superpixels of its region.

:func:`hipt_feature_map` turns an image (already at the model's pixel size, padded to whole
regions) into a (H/16, W/16, 192 + 384 + 3) map: ``cls``, ``sub`` and the superpixel's mean
RGB in [0, 1]. Shift averaging recomputes the map with the region grid offset by multiples of
``region / shifts`` px in each axis and averages; ``cls`` is then smoothed by a uniform filter
over one region (16 x 16 superpixels) and ``sub`` over 4 x 4 superpixels (mirror borders).

State-dict keys follow the original DINO/HIPT layout (``cls_token``, ``pos_embed``,
``patch_embed.proj``, ``phi.0``, ``blocks.N.attn.qkv``, ``norm``), so
``vit256_small_dino.pth`` and ``vit4k_xs_dino.pth`` load as they are (:meth:`HIPT.load_weights`).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Side of the (square) positional-embedding grid of both DINO checkpoints (224 px / 16).
POS_GRID = 14
#: Original checkpoint files and where iStar's download_checkpoints.sh fetches them.
HIPT_FILES = {
    "vit256": ("vit256_small_dino.pth",
               "https://upenn.box.com/shared/static/p0hc12l1bpu5c7fzieotv1d6592btv1l.pth"),
    "vit4k": ("vit4k_xs_dino.pth",
              "https://upenn.box.com/shared/static/8qayhxzmdjpcr5loi88xtkfbqomag8a9.pth"),
}
#: Feature-map cache files: bump the version when maps are computed or stored differently.
FEATURE_FORMAT = "hest2sge.istar_features"
FEATURE_CACHE_VERSION = 1


def _blocks(dim: int, depth: int, heads: int) -> nn.ModuleList:
    from timm.models.vision_transformer import Block

    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True, norm_layer=norm)
                         for _ in range(depth))


def _init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ViT(nn.Module):
    """Shared DINO ViT trunk: CLS token, interpolated position embedding, blocks, final norm."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, POS_GRID * POS_GRID + 1, dim))
        self.blocks = _blocks(dim, depth, heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def _reset(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        _init(self)

    def _pos(self, rows: int, cols: int) -> Tensor:
        """Position embedding for a rows x cols token grid (DINO's bicubic interpolation,
        with the same +0.1 scale-factor convention, so pretrained features match)."""
        if rows * cols == POS_GRID * POS_GRID and rows == cols:
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, POS_GRID, POS_GRID, self.dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / POS_GRID,
                                                 (cols + 0.1) / POS_GRID), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, self.dim)
        return torch.cat([self.pos_embed[:, :1], grid], 1)

    def _run(self, tokens: Tensor, rows: int, cols: int) -> Tensor:
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1)
        x = x + self._pos(rows, cols)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class ViT256(_ViT):
    """ViT-256: ``token_px`` patch embedding + ViT; (B, 3, R, R) -> (B, 1 + (R/t)^2, dim)."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6,
                 token_px: int = 16) -> None:
        super().__init__(dim, depth, heads)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, token_px, token_px)
        self._reset()

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed.proj(x)
        rows, cols = x.shape[-2:]
        return self._run(x.flatten(2).transpose(1, 2), rows, cols)


class ViT4K(_ViT):
    """ViT-4K: a (B, in_dim, rows, cols) grid of region CLS tokens -> (B, 1 + rows*cols, dim)."""

    def __init__(self, in_dim: int = 384, dim: int = 192, depth: int = 6, heads: int = 6) -> None:
        super().__init__(dim, depth, heads)
        self.phi = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Dropout(0.0))
        self._reset()

    def forward(self, grid: Tensor) -> Tensor:
        rows, cols = grid.shape[-2:]
        return self._run(self.phi(grid.flatten(2).transpose(1, 2)), rows, cols)


class HIPT(nn.Module):
    """The frozen two-level encoder: :class:`ViT256` and :class:`ViT4K` (always in eval mode).

    Args:
        vit256_dim, vit256_depth, vit256_heads: ViT-256 width, depth and heads.
        vit4k_dim, vit4k_depth, vit4k_heads: ViT-4K width, depth and heads.
        token_px: Token (superpixel) side in pixels.
        region_px: Region side in pixels (a multiple of ``token_px``).
    """

    def __init__(self, vit256_dim: int = 384, vit256_depth: int = 12, vit256_heads: int = 6,
                 vit4k_dim: int = 192, vit4k_depth: int = 6, vit4k_heads: int = 6,
                 token_px: int = 16, region_px: int = 256) -> None:
        super().__init__()
        if region_px % token_px:
            raise ValueError(f"region_px={region_px} must be a multiple of token_px={token_px}")
        self.token_px, self.region_px = int(token_px), int(region_px)
        self.vit256 = ViT256(vit256_dim, vit256_depth, vit256_heads, token_px)
        self.vit4k = ViT4K(vit256_dim, vit4k_dim, vit4k_depth, vit4k_heads)
        self.out_dim = vit4k_dim + vit256_dim + 3
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> HIPT:  # frozen: never in training mode
        return super().train(False)

    def load_weights(self, vit256: str | os.PathLike, vit4k: str | os.PathLike) -> None:
        """Load the HIPT DINO checkpoints (``vit256_small_dino.pth``, ``vit4k_xs_dino.pth``).

        Accepts the original files (a ``teacher`` entry, ``module.``/``backbone.`` prefixes,
        the DINO projection ``head.*`` which is dropped) or plain state dicts. Files are read
        with ``weights_only=True`` (``argparse.Namespace``, which DINO stores as ``args``, is
        the only extra type allowed). Every encoder weight must be present (strict).
        """
        for name, path in (("vit256", vit256), ("vit4k", vit4k)):
            getattr(self, name).load_state_dict(_read_dino(path, getattr(self, name)),
                                                strict=True)


def _read_dino(path: str | os.PathLike, model: nn.Module) -> dict[str, Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HIPT weights file not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            sd: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read as a weights-only checkpoint "
                         f"({type(e).__name__}); hest2sge never unpickles arbitrary objects"
                         ) from None
    for key in ("teacher", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    clean = {}
    for k, v in sd.items():
        k = k.replace("module.", "").replace("backbone.", "")
        if not k.startswith("head."):
            clean[k] = v
    own = model.state_dict()
    missing = [k for k in own if k not in clean]
    unexpected = [k for k in clean if k not in own]
    wrong = [k for k in own if k in clean and tuple(clean[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit this {type(model).__name__} "
            f"(width {model.dim}): missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"different shape {[(k, tuple(clean[k].shape)) for k in wrong[:3]]}"
        )
    return clean


def _region(img: np.ndarray, y: int, x: int, r: int) -> np.ndarray:
    """The r x r crop of ``img`` at (y, x), white outside the image."""
    h, w = img.shape[:2]
    if y >= 0 and x >= 0 and y + r <= h and x + r <= w:
        return img[y:y + r, x:x + r]
    out = np.full((r, r, 3), 255, dtype=np.uint8)
    y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + r, h), min(x + r, w)
    if y1 > y0 and x1 > x0:
        out[y0 - y:y1 - y, x0 - x:x1 - x] = img[y0:y1, x0:x1]
    return out


def _add(acc: np.ndarray, value: np.ndarray, r0: int, c0: int, k: int) -> None:
    """acc[r0:r0+k, c0:c0+k] += value (a (k, k, d) block or a (d,) vector), clipped."""
    a0, b0 = max(r0, 0), max(c0, 0)
    a1, b1 = min(r0 + k, acc.shape[0]), min(c0 + k, acc.shape[1])
    if a1 <= a0 or b1 <= b0:
        return
    acc[a0:a1, b0:b1] += value if value.ndim == 1 else value[a0 - r0:a1 - r0, b0 - c0:b1 - c0]


@torch.no_grad()
def accumulate_grid(encoder: HIPT, img: np.ndarray, py: int, px: int,
                    normalize: Callable[[Tensor], Tensor], batch_size: int,
                    cls_acc: np.ndarray, sub_acc: np.ndarray) -> None:
    """Add the ``cls`` and ``sub`` features of one region grid to the accumulators.

    The grid's regions start ``py``/``px`` px above/left of the image (white outside it); the
    accumulators are (H/t, W/t, d) maps of the image.
    """
    r, t = encoder.region_px, encoder.token_px
    k = r // t
    h, w = img.shape[:2]
    rows, cols = -(-(h + py) // r), -(-(w + px) // r)
    dev = encoder.vit4k.cls_token.device
    d256 = encoder.vit256.dim
    cls256 = torch.empty(rows * cols, d256)
    coords = [(i, j) for i in range(rows) for j in range(cols)]
    for start in range(0, len(coords), batch_size):
        part = coords[start:start + batch_size]
        x = np.stack([_region(img, i * r - py, j * r - px, r) for i, j in part])
        x = torch.from_numpy(x).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
        out = encoder.vit256(normalize(x)).float().cpu()
        cls256[start:start + len(part)] = out[:, 0]
        tok = out[:, 1:].reshape(len(part), k, k, d256).numpy()
        for (i, j), tk in zip(part, tok):
            _add(sub_acc, tk, i * k - py // t, j * k - px // t, k)
    grid = cls256.reshape(1, rows, cols, d256).permute(0, 3, 1, 2).to(dev)
    cls = encoder.vit4k(grid)[0, 1:].float().cpu().reshape(rows, cols, -1).numpy()
    for i, j in coords:
        _add(cls_acc, cls[i, j], i * k - py // t, j * k - px // t, k)


def hipt_feature_map(encoder: HIPT, img: np.ndarray, normalize: Callable[[Tensor], Tensor],
                     shifts: int = 4, smooth: bool = True, batch_size: int = 16) -> np.ndarray:
    """Superpixel features of a whole image.

    Args:
        encoder: The frozen :class:`HIPT`.
        img: uint8 (H, W, 3) image at the encoder's pixel size, H and W multiples of the
            region size (pad with white first).
        normalize: Maps a (B, 3, R, R) batch in [0, 1] to the encoder's input scale.
        shifts: Grid offsets per axis (``region / shifts`` px apart; 4 = iStar's 16 shifts,
            1 = a single pass). Each offset's grid starts that far into the image, with white
            regions where it extends past the image, so every superpixel is averaged over all
            ``shifts**2`` grids.
        smooth: Uniform smoothing of ``cls`` (one region) and ``sub`` (4 superpixels).
        batch_size: Regions per ViT-256 forward pass.

    Returns:
        float16 (H/t, W/t, d4k + d256 + 3): ``cls``, ``sub``, mean RGB in [0, 1].
    """
    r, t = encoder.region_px, encoder.token_px
    h, w = img.shape[:2]
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or h % r or w % r:
        raise ValueError(f"image must be uint8 (H, W, 3) with H, W multiples of {r}; "
                         f"got {img.shape} {img.dtype}")
    step = r // int(shifts)
    if shifts < 1 or r % shifts or step % t:
        raise ValueError(f"shifts={shifts} must divide region_px={r} into multiples of {t} px")
    hs, ws = h // t, w // t
    cls_acc = np.zeros((hs, ws, encoder.vit4k.dim), dtype=np.float32)
    sub_acc = np.zeros((hs, ws, encoder.vit256.dim), dtype=np.float32)
    for oy in range(0, r, step):
        for ox in range(0, r, step):
            # region borders at oy + n * r (n >= -1): the grid starts (r - oy) % r px above
            accumulate_grid(encoder, img, (r - oy) % r, (r - ox) % r, normalize, batch_size,
                            cls_acc, sub_acc)
    n = float(shifts * shifts)
    cls_acc /= n
    sub_acc /= n
    if smooth:
        box_filter(cls_acc, r // t)
        box_filter(sub_acc, 4)
    rgb = img.reshape(hs, t, ws, t, 3).mean((1, 3), dtype=np.float32) / 255.0
    out = np.empty((hs, ws, cls_acc.shape[2] + sub_acc.shape[2] + 3), dtype=np.float16)
    out[..., :cls_acc.shape[2]] = cls_acc
    del cls_acc
    out[..., -sub_acc.shape[2] - 3:-3] = sub_acc
    del sub_acc
    out[..., -3:] = rgb
    return out


def box_filter(x: np.ndarray, size: int, chunk: int = 64) -> np.ndarray:
    """In-place uniform filter of a (H, W, C) float32 map over ``size`` x ``size`` pixels.

    Mirror borders (edge pixel repeated: OpenCV ``BORDER_REFLECT``); for an even size the
    window covers offsets ``-size // 2 .. size // 2 - 1`` (OpenCV's default anchor).
    """
    from scipy.ndimage import uniform_filter1d

    if size <= 1:
        return x
    for c0 in range(0, x.shape[2], chunk):
        part = x[:, :, c0:c0 + chunk]
        for axis in (0, 1):
            uniform_filter1d(part, size, axis=axis, mode="reflect", output=part)
    return x


def disk_offsets(radius: float) -> np.ndarray:
    """Integer (dy, dx) offsets with dy^2 + dx^2 <= radius^2, sorted by distance then row."""
    rc = max(int(math.ceil(radius)), 0)
    g = np.arange(-rc, rc + 1)
    dy, dx = np.meshgrid(g, g, indexing="ij")
    keep = dy**2 + dx**2 <= radius**2 + 1e-9
    off = np.stack([dy[keep], dx[keep]], 1)
    order = np.lexsort((off[:, 1], off[:, 0], (off**2).sum(1)))
    return off[order].astype(np.int64)


def gather_disks(fmap: Any, centre: np.ndarray, offsets: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Features of the superpixels ``centre[i] + offsets`` of a (H, W, C) map (a numpy array
    or an h5py dataset, read one window per centre).

    Returns:
        float16 (n, D, C) features and a (n, D) mask of the offsets inside the map (outside
        ones hold the nearest border superpixel's features).
    """
    hs, ws, c = fmap.shape
    rr = centre[:, None, 0] + offsets[None, :, 0]
    cc = centre[:, None, 1] + offsets[None, :, 1]
    inside = (rr >= 0) & (rr < hs) & (cc >= 0) & (cc < ws)
    rr, cc = rr.clip(0, hs - 1), cc.clip(0, ws - 1)
    if isinstance(fmap, np.ndarray):
        return fmap[rr, cc].astype(np.float16, copy=False), inside
    feat = np.empty((len(centre), len(offsets), c), dtype=np.float16)
    for i in range(len(centre)):
        r0, r1, c0, c1 = rr[i].min(), rr[i].max() + 1, cc[i].min(), cc[i].max() + 1
        feat[i] = fmap[r0:r1, c0:c1][rr[i] - r0, cc[i] - c0]
    return feat, inside


def hipt_weight_paths(pretrained: Any) -> tuple[str, str]:
    """(vit256, vit4k) checkpoint paths from a ``pretrained`` argument: ``True`` (download
    both into the torch hub cache), a folder holding both files, a pair of paths, or a dict
    with ``vit256``/``vit4k`` paths."""
    from pathlib import Path

    if pretrained is True:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        hub.mkdir(parents=True, exist_ok=True)
        for name, url in HIPT_FILES.values():
            if not (hub / name).exists():
                try:
                    torch.hub.download_url_to_file(url, str(hub / name))
                except Exception as e:  # network errors of every kind
                    from hest2sge.models.layers.backbones import WeightsUnavailableError

                    raise WeightsUnavailableError(
                        f"could not download the HIPT checkpoint {name} from {url} "
                        f"({type(e).__name__}: {e}). Ways out: pass pretrained=False (random "
                        "frozen encoder, tests only), or pretrained='<folder>' holding "
                        f"{HIPT_FILES['vit256'][0]} and {HIPT_FILES['vit4k'][0]}, or copy them "
                        f"into {hub}") from None
        return str(hub / HIPT_FILES["vit256"][0]), str(hub / HIPT_FILES["vit4k"][0])
    if isinstance(pretrained, dict):
        try:
            return os.fspath(pretrained["vit256"]), os.fspath(pretrained["vit4k"])
        except KeyError:
            raise ValueError("pretrained dict needs 'vit256' and 'vit4k' paths") from None
    if isinstance(pretrained, (str, os.PathLike)):
        folder = Path(pretrained)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"pretrained={os.fspath(pretrained)!r} is not a folder; give the folder holding "
                f"{HIPT_FILES['vit256'][0]} and {HIPT_FILES['vit4k'][0]}, or a pair of paths")
        return str(folder / HIPT_FILES["vit256"][0]), str(folder / HIPT_FILES["vit4k"][0])
    if isinstance(pretrained, (list, tuple)) and len(pretrained) == 2:
        return os.fspath(pretrained[0]), os.fspath(pretrained[1])
    raise ValueError(f"pretrained must be False, True, a folder, a (vit256, vit4k) pair of "
                     f"paths or a dict; got {pretrained!r}")


def open_feature_cache(path: str | os.PathLike, fingerprint: str, dim: int) -> Any:
    """The ``features`` dataset of a complete cache file with this fingerprint (left open;
    close it with ``dataset.file.close()``), else None."""
    import h5py

    if not os.path.exists(path):
        return None
    try:
        f = h5py.File(path, "r")
    except OSError:  # unreadable: rebuilt by the caller
        return None
    a = f.attrs
    if (a.get("format") == FEATURE_FORMAT
            and int(a.get("format_version", -1)) == FEATURE_CACHE_VERSION
            and a.get("fingerprint") == fingerprint and bool(a.get("complete", False))
            and "features" in f and f["features"].ndim == 3 and f["features"].shape[2] == dim):
        return f["features"]
    f.close()
    return None


def write_feature_cache(path: str | os.PathLike, fmap: np.ndarray, **attrs: Any) -> None:
    """Write a (H, W, C) feature map to an HDF5 cache file atomically (temporary file in the
    same folder, ``complete`` marker, fsync, rename); ``attrs`` must hold ``fingerprint``."""
    from pathlib import Path

    import h5py

    from hest2sge.data.patches import _remove_stale_temps, _temp_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    tmp = _temp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({"format": FEATURE_FORMAT, "format_version": FEATURE_CACHE_VERSION,
                            "complete": False, **attrs})
            hs, ws, c = fmap.shape
            f.create_dataset("features", data=fmap, chunks=(min(32, hs), min(32, ws), c))
            f.attrs["complete"] = True
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
