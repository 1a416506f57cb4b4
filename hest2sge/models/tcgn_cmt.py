"""CMT backbone (Guo et al., "CMT: Convolutional Neural Networks Meet Vision Transformers",
CVPR 2022; code ggjy/CMT.pytorch), as used by TCGN.

A CMT block is ``LPU`` (depthwise 3x3 conv with a residual) -> ``x + LMHSA(LN(x))`` (keys and
values from a map reduced by a strided depthwise conv + BN, a learned relative-position bias
added to the attention logits) -> ``x + IRFFN(LN(x))`` (1x1 expand + GELU + BN, depthwise 3x3
with a residual, GELU + BN, 1x1 + BN). The backbone is a 3-conv stem (stride 2) and four stages
of ``PatchEmbed`` (2x2 stride-2 conv + LN) + blocks, then a 1x1 conv to ``fc_dim`` + BN + Swish
+ global average pooling.

Sizes derive from ``img_size`` (the relative-position tensors have shape
``(heads, n, n // sr**2)`` with ``n`` the stage's token count), so small inputs work for tests.
Weights of the original CMT/TCGN code load through :func:`load_cmt_weights`, which maps the
original key names (``stem_conv1``, ``patch_embed_a``, ``blocks_a.0.proj``, ``relative_pos_a``,
``_fc``, ``_bn``) to this module's.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Published CMT configurations (ggjy/CMT.pytorch cmt.py). TCGN's train.py uses "ti".
CMT_VARIANTS: dict[str, dict[str, Any]] = {
    "ti": {"embed_dims": (46, 92, 184, 368), "depths": (2, 2, 10, 2), "mlp_ratio": 3.6,
           "stem_channels": 16},
    "xs": {"embed_dims": (52, 104, 208, 416), "depths": (3, 3, 12, 3), "mlp_ratio": 3.77,
           "stem_channels": 16},
    "s": {"embed_dims": (64, 128, 256, 512), "depths": (3, 3, 16, 3), "mlp_ratio": 4.0,
          "stem_channels": 32},
    "b": {"embed_dims": (76, 152, 304, 608), "depths": (4, 4, 20, 4), "mlp_ratio": 4.0,
          "stem_channels": 38},
}
#: ImageNet weights released with ggjy/CMT.pytorch (trained at 160 / 192 / 224 / 256 px).
CMT_WEIGHT_URLS = {
    v: f"https://github.com/ggjy/CMT.pytorch/releases/download/release-v1/cmt_{f}.pth"
    for v, f in {"ti": "tiny", "xs": "xs", "s": "small", "b": "base"}.items()
}
CMT_HEADS = (1, 2, 4, 8)
CMT_SR_RATIOS = (8, 4, 2, 1)


def tokens_to_map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """(B, N, C) tokens -> (B, C, H, W) map."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, hw[0], hw[1])


class PatchEmbed(nn.Module):
    """``patch`` x ``patch`` stride-``patch`` conv + LayerNorm: map -> tokens."""

    def __init__(self, in_chans: int, embed_dim: int, patch: int = 2) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class LightMHSA(nn.Module):
    """CMT's lightweight multi-head self-attention with a relative-position bias.

    Keys and values come from the token map reduced by a depthwise conv (kernel = stride =
    ``sr_ratio``) + BN; logits are ``q k^T / sqrt(head_dim) + relative_pos``.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, sr_ratio: int = 1,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"CMT attention width {dim} is not divisible by {heads} heads")
        self.heads, self.attn_drop, self.sr_ratio = heads, attn_drop, sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, groups=dim),
                nn.BatchNorm2d(dim, eps=1e-5),
            )

    def forward(self, x: Tensor, hw: tuple[int, int], relative_pos: Tensor) -> Tensor:
        b, n, c = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, c // h).transpose(1, 2)
        kv = x
        if self.sr_ratio > 1:
            kv = self.sr(tokens_to_map(x, hw)).flatten(2).transpose(1, 2)
        m = kv.shape[1]
        k = self.k(kv).view(b, m, h, c // h).transpose(1, 2)
        v = self.v(kv).view(b, m, h, c // h).transpose(1, 2)
        # explicit softmax attention: SDPA with a learned (grad-requiring) bias is several
        # times slower on CPU in the backward pass at these sizes
        attn = (q @ k.transpose(-2, -1)) * (c // h) ** -0.5 + relative_pos
        attn = F.dropout(attn.softmax(-1), self.attn_drop, self.training)
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


class IRFFN(nn.Module):
    """CMT's inverted residual feed-forward network (on tokens, via the token map)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(),
                                   nn.BatchNorm2d(hidden, eps=1e-5))
        self.proj = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.proj_act = nn.GELU()
        self.proj_bn = nn.BatchNorm2d(hidden, eps=1e-5)
        self.conv2 = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.BatchNorm2d(dim, eps=1e-5))
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = self.drop(self.conv1(tokens_to_map(x, hw)))
        x = self.proj_bn(self.proj_act(self.proj(x) + x))
        return self.drop(self.conv2(x).flatten(2).transpose(1, 2))


class CMTBlock(nn.Module):
    """LPU -> ``x + LMHSA(LN(x))`` -> ``x + IRFFN(LN(x))`` on (B, N, C) tokens.

    Args:
        dim: Token width.
        heads: Attention heads.
        mlp_ratio: IRFFN expansion (hidden = ``int(dim * mlp_ratio)``).
        qkv_bias: Bias on q, k, v.
        sr_ratio: Spatial reduction of keys/values.
        norm_eps: LayerNorm epsilon (1e-6 in the CMT stages, 1e-5 in TCGN's graph blocks).
        drop: Dropout after the attention projection and in the IRFFN.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 sr_ratio: int = 1, norm_eps: float = 1e-6, drop: float = 0.0) -> None:
        super().__init__()
        self.lpu = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = LightMHSA(dim, heads, qkv_bias, sr_ratio, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = IRFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor, hw: tuple[int, int], relative_pos: Tensor) -> Tensor:
        m = tokens_to_map(x, hw)
        x = (self.lpu(m) + m).flatten(2).transpose(1, 2)
        x = x + self.attn(self.norm1(x), hw, relative_pos)
        return x + self.mlp(self.norm2(x), hw)


class MemoryEfficientSwish(nn.Module):
    """``x * sigmoid(x)`` (SiLU)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)


class CMT(nn.Module):
    """The CMT backbone without its ImageNet classifier.

    Args:
        img_size: Input side in pixels (divisible by 32; 224 in the CMT/TCGN papers).
        embed_dims: Widths of the four stages.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        mlp_ratio: IRFFN expansion.
        stem_channels: Stem width.
        sr_ratios: Key/value spatial reduction per stage.
        fc_dim: Width of the final 1x1 conv (1280).
        qkv_bias: Bias on q, k, v (True for all published variants).
        drop: Dropout inside the blocks (0 in TCGN).

    ``forward`` returns pooled (B, fc_dim) features; TCGN drives the stages one by one through
    :meth:`stem_forward`, :meth:`embed`, :meth:`blocks` and :meth:`head_forward`.
    """

    def __init__(self, img_size: int = 224, embed_dims: Sequence[int] = (46, 92, 184, 368),
                 depths: Sequence[int] = (2, 2, 10, 2), num_heads: Sequence[int] = CMT_HEADS,
                 mlp_ratio: float = 3.6, stem_channels: int = 16,
                 sr_ratios: Sequence[int] = CMT_SR_RATIOS, fc_dim: int = 1280,
                 qkv_bias: bool = True, drop: float = 0.0) -> None:
        super().__init__()
        if img_size % 32:
            raise ValueError(f"CMT needs an input side divisible by 32, got img_size={img_size}")
        for i, s in enumerate(sr_ratios):
            if (img_size // 2 ** (i + 2)) % s:
                raise ValueError(
                    f"img_size={img_size}: stage {i} map ({img_size // 2 ** (i + 2)} px) is not "
                    f"divisible by its spatial reduction {s}; use a multiple of 32 * {s}")
        s = stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(3, s, 3, 2, 1), nn.GELU(), nn.BatchNorm2d(s, eps=1e-5),
            nn.Conv2d(s, s, 3, 1, 1), nn.GELU(), nn.BatchNorm2d(s, eps=1e-5),
            nn.Conv2d(s, s, 3, 1, 1), nn.GELU(), nn.BatchNorm2d(s, eps=1e-5),
        )
        chans = [stem_channels, *embed_dims]
        self.embeds = nn.ModuleList(PatchEmbed(chans[i], chans[i + 1]) for i in range(4))
        self.grids = [img_size // 2 ** (i + 2) for i in range(4)]
        self.rel_pos = nn.ParameterList(
            nn.Parameter(torch.randn(num_heads[i], self.grids[i] ** 2,
                                     self.grids[i] ** 2 // sr_ratios[i] ** 2))
            for i in range(4))
        self.stages = nn.ModuleList(
            nn.ModuleList(CMTBlock(embed_dims[i], num_heads[i], mlp_ratio, qkv_bias,
                                   sr_ratios[i], norm_eps=1e-6, drop=drop)
                          for _ in range(depths[i]))
            for i in range(4))
        self.fc = nn.Conv2d(embed_dims[-1], fc_dim, 1)
        self.fc_bn = nn.BatchNorm2d(fc_dim, eps=1e-5)
        self.swish = MemoryEfficientSwish()
        self.embed_dims, self.fc_dim = tuple(embed_dims), fc_dim

    def stem_forward(self, img: Tensor) -> Tensor:
        return self.stem(img)

    def embed(self, i: int, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Stage ``i`` patch embedding of a (B, C, H, W) map."""
        return self.embeds[i](x)

    def blocks(self, i: int, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """Stage ``i`` CMT blocks on (B, N, C) tokens."""
        for blk in self.stages[i]:
            x = blk(x, hw, self.rel_pos[i])
        return x

    def head_forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """1x1 conv + BN + Swish + global average pool: (B, N, C) -> (B, fc_dim)."""
        x = self.swish(self.fc_bn(self.fc(tokens_to_map(x, hw))))
        return x.mean((2, 3))

    def forward(self, img: Tensor) -> Tensor:
        x = self.stem_forward(img)
        for i in range(4):
            x, hw = self.embed(i, x)
            x = self.blocks(i, x, hw)
            if i < 3:
                x = tokens_to_map(x, hw)
        return self.head_forward(x, hw)


# ---------------------------------------------------------------------- original weights
_STAGE = {"a": 0, "b": 1, "c": 2, "d": 3}
_STEM = {"stem_conv1": 0, "stem_norm1": 2, "stem_conv2": 3, "stem_norm2": 5, "stem_conv3": 6,
         "stem_norm3": 8}


def map_cmt_key(key: str) -> str | None:
    """Map an original CMT/TCGN backbone key to this module's name (``None``: not backbone).

    ``stem_conv1.weight -> stem.0.weight``, ``patch_embed_b.norm.bias -> embeds.1.norm.bias``,
    ``relative_pos_c -> rel_pos.2``, ``blocks_a.0.proj.weight -> stages.0.0.lpu.weight``,
    ``blocks_d.1.attn.q.weight -> stages.3.1.attn.q.weight``, ``_fc.weight -> fc.weight``,
    ``_bn.running_mean -> fc_bn.running_mean``.
    """
    head, _, rest = key.partition(".")
    if head in _STEM:
        return f"stem.{_STEM[head]}.{rest}"
    m = re.fullmatch(r"patch_embed_([a-d])", head)
    if m:
        return f"embeds.{_STAGE[m.group(1)]}.{rest}"
    m = re.fullmatch(r"relative_pos_([a-d])", key)
    if m:
        return f"rel_pos.{_STAGE[m.group(1)]}"
    m = re.fullmatch(r"blocks_([a-d])\.(\d+)\.(.+)", key)
    if m:
        tail = m.group(3)
        if tail.startswith("proj."):
            tail = "lpu." + tail[len("proj."):]
        return f"stages.{_STAGE[m.group(1)]}.{m.group(2)}.{tail}"
    if head == "_fc":
        return f"fc.{rest}"
    if head == "_bn":
        return f"fc_bn.{rest}"
    return None


def resize_relative_pos(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Resize a (heads, Nq, Nk) relative-position tensor (square query and key grids) to
    ``shape`` by bicubic interpolation over both grids (a checkpoint trained at another
    input size, e.g. CMT-Ti at 160 px)."""
    h, nq, nk = t.shape
    h2, nq2, nk2 = shape
    gq, gk, gq2, gk2 = (math.isqrt(v) for v in (nq, nk, nq2, nk2))
    if h != h2 or gq * gq != nq or gk * gk != nk or gq2 * gq2 != nq2 or gk2 * gk2 != nk2:
        raise ValueError(f"cannot resize a relative-position tensor {tuple(t.shape)} to "
                         f"{tuple(shape)} (different heads or non-square grids)")
    t = t.float().reshape(h, gq, gq, nk).permute(0, 3, 1, 2)  # (h, Nk, gq, gq)
    t = F.interpolate(t, size=(gq2, gq2), mode="bicubic", align_corners=False)
    t = t.permute(0, 2, 3, 1).reshape(h * nq2, 1, gk, gk)
    t = F.interpolate(t, size=(gk2, gk2), mode="bicubic", align_corners=False)
    return t.reshape(h, nq2, nk2)


def read_state_dict(source: str | os.PathLike | bool, variant: str = "ti") -> dict[str, Tensor]:
    """Read CMT weights: a local file, or ``True`` to download the variant's ImageNet weights
    (ggjy/CMT.pytorch release). Accepts a flat state dict or one wrapped in ``"model"`` /
    ``"state_dict"``; strips a DDP ``module.`` prefix. Never unpickles objects."""
    if source is True:
        url = CMT_WEIGHT_URLS.get(variant)
        if url is None:
            raise ValueError(f"no published ImageNet weights for CMT variant {variant!r}")
        try:
            sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
        except Exception as e:  # network errors of every kind
            raise RuntimeError(
                f"could not download the CMT-{variant} ImageNet weights from {url} "
                f"({type(e).__name__}: {e}); pass pretrained=False or the path of a local "
                "copy of the file") from None
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"CMT weights file not found: {path}")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "model_ema"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict):
        raise ValueError(f"{source} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def load_cmt_weights(model: CMT, source: str | os.PathLike | bool,
                     variant: str = "ti") -> dict[str, list[str]]:
    """Load original CMT (or TCGN) backbone weights into ``model``.

    Backbone keys are mapped with :func:`map_cmt_key`; relative-position tensors of a different
    input size are interpolated; keys that are not backbone weights (the ImageNet classifier
    ``head.*``, TCGN's graph blocks and gene head) are ignored. Every backbone weight must be in
    the file with the right shape, otherwise a ``ValueError`` names the missing ones.

    Returns:
        ``{"loaded": [...], "resized": [...], "ignored": [...]}`` (this module's / the file's
        key names).
    """
    sd = read_state_dict(source, variant)
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    ignored, resized, bad_shape = [], [], []
    for k, v in sd.items():
        name = map_cmt_key(k)
        if name is None or name not in own:
            ignored.append(k)
            continue
        if v.shape != own[name].shape:
            if name.startswith("rel_pos."):
                v = resize_relative_pos(v, own[name].shape)
                resized.append(name)
            else:
                bad_shape.append(f"{name} {tuple(v.shape)} vs {tuple(own[name].shape)}")
                continue
        mapped[name] = v.to(own[name].dtype)
    missing = [k for k in own if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing or bad_shape:
        raise ValueError(
            f"{source if source is not True else CMT_WEIGHT_URLS[variant]} does not fit the "
            f"CMT-{variant} backbone: {len(missing)} backbone weight(s) missing "
            f"(e.g. {missing[:6]}), {len(bad_shape)} of a different shape "
            f"(e.g. {bad_shape[:3]}). Is it a CMT-{variant} checkpoint?")
    model.load_state_dict(mapped, strict=False)
    unexpected = [k for k in ignored if not k.startswith("head.")]
    if unexpected:
        warnings.warn(f"{len(unexpected)} non-backbone key(s) in the CMT weights file were "
                      f"ignored (e.g. {unexpected[:4]})", stacklevel=2)
    return {"loaded": sorted(mapped), "resized": resized, "ignored": ignored}
