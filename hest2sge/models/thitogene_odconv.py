"""Omni-dimensional dynamic convolution (ODConv; Li, Zhou & Yao, ICLR 2022), as used by
THItoGene's first layer.

``kernel_num`` candidate kernels are mixed per sample by four attentions computed from the
globally pooled input: over input channels, output filters, kernel positions and the
candidate kernels. The per-sample convolution runs as one batched matrix product over
unfolded input windows (no per-sample Python loop, no ``groups=batch`` convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ODAttention(nn.Module):
    """The four ODConv attentions from the pooled input.

    Args:
        in_planes: Input channels.
        out_planes: Output channels.
        kernel_size: Kernel side.
        kernel_num: Number of candidate kernels.
        reduction: Hidden width as a fraction of ``in_planes``.
        min_channel: Minimum hidden width.
        temperature: Softmax/sigmoid temperature.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, kernel_num: int = 4,
                 reduction: float = 0.0625, min_channel: int = 16,
                 temperature: float = 1.0) -> None:
        super().__init__()
        hidden = max(int(in_planes * reduction), min_channel)
        self.kernel_size, self.kernel_num, self.temperature = kernel_size, kernel_num, temperature
        self.fc = nn.Conv2d(in_planes, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.channel_fc = nn.Conv2d(hidden, in_planes, 1)
        self.filter_fc = nn.Conv2d(hidden, out_planes, 1)
        self.spatial_fc = nn.Conv2d(hidden, kernel_size * kernel_size, 1) if kernel_size > 1 else None
        self.kernel_fc = nn.Conv2d(hidden, kernel_num, 1) if kernel_num > 1 else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, C, H, W) -> channel (B, C, 1, 1), filter (B, O, 1, 1), spatial (B, k, k),
        kernel (B, K) attentions."""
        b = x.shape[0]
        t = self.temperature
        h = F.relu(self.bn(self.fc(F.adaptive_avg_pool2d(x, 1))))
        channel = torch.sigmoid(self.channel_fc(h) / t)
        filt = torch.sigmoid(self.filter_fc(h) / t)
        k = self.kernel_size
        spatial = (torch.sigmoid(self.spatial_fc(h).view(b, k, k) / t) if self.spatial_fc is not None
                   else h.new_ones(b, k, k))
        kernel = (torch.softmax(self.kernel_fc(h).view(b, -1) / t, dim=1)
                  if self.kernel_fc is not None else h.new_ones(b, 1))
        return channel, filt, spatial, kernel


class ODConv2d(nn.Module):
    """Omni-dimensional dynamic 2-D convolution without bias (``groups=1``).

    Args:
        in_planes: Input channels.
        out_planes: Output channels.
        kernel_size: Kernel side.
        stride: Stride.
        padding: Zero padding.
        dilation: Dilation.
        kernel_num: Number of candidate kernels (4 in THItoGene).
        reduction: Attention hidden width as a fraction of ``in_planes`` (at least 16).
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, kernel_num: int = 4,
                 reduction: float = 0.0625) -> None:
        super().__init__()
        self.in_planes, self.out_planes, self.kernel_size = in_planes, out_planes, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.attention = ODAttention(in_planes, out_planes, kernel_size, kernel_num, reduction)
        self.weight = nn.Parameter(
            torch.empty(kernel_num, out_planes, in_planes, kernel_size, kernel_size)
        )
        for i in range(kernel_num):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        channel, filt, spatial, kernel = self.attention(x)
        k = self.kernel_size
        # per-sample kernel: sum_n kernel[b, n] * spatial[b] * W[n]  -> (B, O, C * k * k)
        weight = torch.einsum("bn,nocij->bocij", kernel, self.weight)
        weight = (weight * spatial[:, None, None]).reshape(b, self.out_planes, c * k * k)
        cols = F.unfold(x * channel, k, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)  # (B, C * k * k, L)
        ho = (h + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
        wo = (w + 2 * self.padding - self.dilation * (k - 1) - 1) // self.stride + 1
        out = torch.bmm(weight, cols).view(b, self.out_planes, ho, wo)
        return out * filt

    def extra_repr(self) -> str:
        return (f"{self.in_planes}, {self.out_planes}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, kernel_num={self.weight.shape[0]}")
