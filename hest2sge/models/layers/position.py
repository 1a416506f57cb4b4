"""Learned x/y position embeddings of spots on the array grid (HisToGene, Hist2ST, THItoGene).

The originals index two ``nn.Embedding(64, dim)`` tables with the integer array coordinates of
each spot. 64 rows suffice for legacy ST arrays (coordinates < 35) but not for 10x Visium,
whose array columns reach 127, so the table size ``n_pos`` is a constructor argument (saved
with the model's hyperparameters, so checkpoints restore) and an out-of-range coordinate raises
an error naming it instead of an index error deep inside ``nn.Embedding``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

#: Table size used by hest2sge's slide-level models: Visium array columns reach 127.
DEFAULT_N_POS = 128

_AXES = ("x (array_col)", "y (array_row)")


class XYEmbedding(nn.Module):
    """Learned embeddings of the array coordinates ``coord = (x, y) = (array_col, array_row)``.

    Args:
        n_pos: Rows of each table: coordinates must lie in ``[0, n_pos)``.
        dim: Width of each embedding.
        mode: ``"add"`` returns ``x_embed[x] + y_embed[y]`` (N, dim) (HisToGene, Hist2ST);
            ``"concat"`` returns ``[x_embed[x], y_embed[y]]`` concatenated, (N, 2 * dim)
            (THItoGene, which appends them as two extra capsules).

    Input: ``coord`` (..., 2) integer tensor (``batch["coord"]``). Output: (..., dim) or
    (..., 2 * dim).
    """

    def __init__(self, n_pos: int = DEFAULT_N_POS, dim: int = 1024, mode: str = "add") -> None:
        super().__init__()
        if mode not in ("add", "concat"):
            raise ValueError(f"XYEmbedding mode must be 'add' or 'concat', got {mode!r}")
        if int(n_pos) < 1:
            raise ValueError(f"n_pos must be a positive integer, got {n_pos!r}")
        self.n_pos, self.dim, self.mode = int(n_pos), int(dim), mode
        self.x_embed = nn.Embedding(self.n_pos, self.dim)
        self.y_embed = nn.Embedding(self.n_pos, self.dim)

    @property
    def out_dim(self) -> int:
        """Width of the output (``dim`` when adding, ``2 * dim`` when concatenating)."""
        return self.dim if self.mode == "add" else 2 * self.dim

    def check(self, coord: Tensor | Iterable) -> None:
        """Raise ``ValueError`` naming the coordinate when ``coord`` does not fit the tables."""
        check_coordinates(coord, self.n_pos)

    def forward(self, coord: Tensor) -> Tensor:
        if coord.shape[-1] != 2:
            raise ValueError(f"coord must have shape (..., 2) = (x, y), got {tuple(coord.shape)}")
        if coord.is_floating_point():
            raise TypeError("coord must hold integer array coordinates, got a float tensor")
        self.check(coord)
        ex, ey = self.x_embed(coord[..., 0]), self.y_embed(coord[..., 1])
        return ex + ey if self.mode == "add" else torch.cat([ex, ey], dim=-1)

    def extra_repr(self) -> str:
        return f"n_pos={self.n_pos}, dim={self.dim}, mode={self.mode!r}"


def check_coordinates(coord: Tensor | Iterable, n_pos: int, where: str = "") -> None:
    """Check that array coordinates (x, y) fit position tables of ``n_pos`` rows.

    Args:
        coord: (..., 2) coordinates (tensor or array-like).
        n_pos: Table size.
        where: Optional context for the message (e.g. a slide id).

    Raises:
        ValueError: naming the axis, the offending value and the table size.
    """
    c = torch.as_tensor(coord)
    if c.numel() == 0 or c.device.type == "meta":
        return
    c = c.reshape(-1, 2)
    for axis in range(2):
        lo, hi = int(c[:, axis].min()), int(c[:, axis].max())
        if lo < 0 or hi >= n_pos:
            bad = lo if lo < 0 else hi
            ctx = f" in {where}" if where else ""
            raise ValueError(
                f"array coordinate {_AXES[axis]} = {bad}{ctx} does not fit the position "
                f"embedding table of n_pos={n_pos} rows (valid 0..{n_pos - 1}); "
                + (f"build the model with n_pos >= {hi + 1}" if bad >= n_pos
                   else "array coordinates must be non-negative")
            )


def check_datamodule_coordinates(datamodule, n_pos: int) -> None:
    """Check every slide of a :class:`~hest2sge.data.SpotDataModule` against tables of
    ``n_pos`` rows before training starts (a clear error instead of one mid-epoch)."""
    import numpy as np

    for slide in getattr(datamodule, "slides", []):
        coord = np.stack([slide.obs["array_col"].to_numpy(), slide.obs["array_row"].to_numpy()], 1)
        check_coordinates(coord.astype(np.int64), n_pos,
                          where=f"slide {str(slide.obs['slide_id'].iloc[0])!r}")
