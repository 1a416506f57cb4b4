"""Spot chunking with activation checkpointing for per-spot encoders of slide-level models.

A slide-level model encodes every spot's patch before mixing spots (HisToGene's 150,528 ->
1024 patch embedding, THItoGene's dynamic convolution and capsules). On a Visium-size slide
(~4,000 spots) the activations of that encoder dominate memory. :func:`encode_in_chunks` runs
the encoder over chunks of spots and, when gradients are needed, checkpoints each chunk: only
the chunk outputs are kept and each chunk is recomputed during the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def encode_in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int,
                     module: nn.Module | None = None) -> Tensor:
    """``fn(x)`` computed over chunks of ``chunk`` rows of ``x`` (checkpointed when training).

    Args:
        fn: Row-wise encoder (rows are spots).
        x: Input, spots first.
        chunk: Rows per chunk; 0 (or ``len(x) <= chunk``) runs ``fn(x)`` in one piece.
        module: The module holding ``fn``'s layers. Its BatchNorm layers then normalise each
            chunk with the chunk's statistics (as with mini-batches), and their running
            statistics are updated once per chunk, not again when the chunk is recomputed.

    Returns:
        ``fn(x)`` with the chunks concatenated.
    """
    if not chunk or x.shape[0] <= chunk:
        return fn(x)
    parts = x.split(int(chunk))
    if not torch.is_grad_enabled():
        return torch.cat([fn(p) for p in parts])
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] \
        if module is not None else []
    seen: set[int] = set()

    def run(part: Tensor, index: int) -> Tensor:
        if index not in seen or not norms:
            seen.add(index)
            return fn(part)
        saved = [m.momentum for m in norms]  # recomputation: leave running stats alone
        for m in norms:
            m.momentum = 0.0
        try:
            return fn(part)
        finally:
            for m, mom in zip(norms, saved):
                m.momentum = mom

    return torch.cat([checkpoint(run, p, i, use_reentrant=False) for i, p in enumerate(parts)])


def to_unit_float(img: Tensor) -> Tensor:
    """uint8 patches (0-255) -> float in [0, 1]; float input is returned unchanged."""
    return img.float().div_(255.0) if img.dtype == torch.uint8 else img
