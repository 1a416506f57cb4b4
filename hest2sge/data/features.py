"""Frozen-encoder features of spot patches, computed once and cached.

:func:`extract_features` is the feature-extraction stage: for every slide it cuts (or reads
from the cache) the spot patches, runs a frozen encoder over them and stores the (N, D)
features in the one cache layer (:mod:`hest2sge.cache`), with tqdm progress bars for patch
cutting and feature extraction. It is the place for frozen foundation-model encoders: any
``torch.nn.Module`` (or callable) mapping a float (B, 3, H, W) batch to (B, D) features, e.g.
a timm model created with ``num_classes=0``. EGN's exemplar embeddings use the same code
(:func:`embed_patches`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: ``kind`` of feature cache files.
FEATURE_KIND = "features"
#: Bump when the way features are computed changes: older files are rebuilt.
FEATURE_VERSION = 1


def encoder_digest(encoder: Any) -> str:
    """Digest of an encoder: its class and, for a module, every parameter and buffer
    (names, shapes, dtypes, values)."""
    from hest2sge.cache import digest

    state = getattr(encoder, "state_dict", None)
    if not callable(state):
        return digest(type(encoder).__qualname__, getattr(encoder, "__name__", repr(encoder)))
    parts: list[Any] = [type(encoder).__module__, type(encoder).__qualname__]
    for name, t in sorted(state().items()):
        t = t.detach().cpu().contiguous()
        parts += [name, str(t.dtype), tuple(t.shape),
                  t.reshape(-1).view(__import__("torch").uint8).numpy()]
    return digest(*parts)


def embed_patches(
    embed: Callable[[Any], Any],
    store: Any,
    batch_size: int = 64,
    *,
    desc: str = "features",
    progress: bool | None = None,
) -> np.ndarray:
    """Run ``embed`` over every patch of a store.

    Args:
        embed: Maps a float (B, 3, H, W) tensor in [0, 1] to (B, D) features.
        store: A :class:`~hest2sge.data.patches.PatchStore` (anything with ``len`` and
            ``get_many``).
        batch_size: Patches per call.
        desc: Label of the progress bar.
        progress: Show a tqdm bar (None: only on a terminal).

    Returns:
        (N, D) float32 features in store order.
    """
    import torch
    from tqdm.auto import tqdm

    n = len(store)
    parts = []
    with torch.no_grad(), tqdm(total=n, desc=desc, unit="patch", leave=False,
                               disable=None if progress is None else not progress) as bar:
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(n, s + batch_size))
            img = torch.from_numpy(np.ascontiguousarray(store.get_many(idx)))
            out = embed(img.permute(0, 3, 1, 2).float().div_(255.0))
            parts.append(torch.as_tensor(out).float().reshape(len(idx), -1).cpu().numpy())
            bar.update(len(idx))
    return np.concatenate(parts, 0) if parts else np.zeros((0, 0), np.float32)


def patch_source_fingerprint(slide: Any, store: Any, patch_size: int,
                             pixel_size_um: float | None) -> str:
    """What a slide's patches depend on: :func:`~hest2sge.data.patches.patch_fingerprint`,
    or for slides served from HEST patch files, that file's content fingerprint."""
    from hest2sge.cache import digest, file_fingerprint
    from hest2sge.data.patches import patch_fingerprint

    try:
        return patch_fingerprint(slide, patch_size, pixel_size_um)
    except Exception:  # a slide served from HEST patch files has no image to fingerprint
        path = getattr(store, "path", None)
        fp = file_fingerprint(path) if path is not None else None
        return digest(fp, list(map(str, getattr(store, "barcodes", []))))


def extract_features(
    encoder: Any,
    slides: Sequence[Any] | Any,
    cache_dir: str | os.PathLike | None = None,
    *,
    patch_size: int = 224,
    pixel_size_um: float | None = None,
    batch_size: int = 64,
    name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: str | None = None,
    progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """Features of every spot patch of every slide from a frozen encoder, cached on disk.

    Patches come from :func:`~hest2sge.data.patches.cached_patches` (same ``cache_dir``); the
    features of each slide are stored as ``<patch cache>.<name>-<fingerprint>.feat.h5``, keyed
    on the patches' fingerprint and the encoder's weights, so changing either recomputes them.

    Args:
        encoder: A frozen ``torch.nn.Module`` or callable, float (B, 3, H, W) -> (B, D).
            Modules are put in eval mode for the extraction.
        slides: One slide or several.
        cache_dir: Cache folder (None: patches and features are computed in memory).
        patch_size: Patch side in pixels.
        pixel_size_um: µm per patch pixel (None: native resolution).
        batch_size: Patches per forward pass.
        name: Encoder name used in file names (default: its class name).
        mean: Per-channel mean subtracted from [0, 1] pixels (default: none).
        std: Per-channel standard deviation divided out (default: none).
        device: Device to run the encoder on (default: where its parameters are).
        progress: Show tqdm bars (None: only on a terminal).

    Returns:
        ``{slide_id: (n_spots, D) float32}`` in slide spot order.
    """
    import torch

    from hest2sge.cache import digest, load_cached
    from hest2sge.data.patches import cache_file_name, cached_patches
    from hest2sge.data.slide import slide_id_of

    if not isinstance(slides, (list, tuple)):
        slides = [slides]
    name = name or type(encoder).__name__
    enc_fp = encoder_digest(encoder)
    is_module = isinstance(encoder, torch.nn.Module)
    if device is None and is_module:
        dev = next(encoder.parameters(), torch.empty(0)).device
    else:
        dev = torch.device(device or "cpu")
    m = None if mean is None else torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = None if std is None else torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def embed(x: Any) -> Any:
        if m is not None:
            x = x - m
        if s is not None:
            x = x / s
        return encoder(x.to(dev))

    was = encoder.training if is_module else None
    if is_module:
        encoder.eval()
    out: dict[str, np.ndarray] = {}
    try:
        for slide in slides:
            sid = slide_id_of(slide)
            store = cached_patches(slide, patch_size, pixel_size_um, cache_dir=cache_dir)
            fp = digest(FEATURE_KIND, FEATURE_VERSION, name, enc_fp, mean, std,
                        patch_source_fingerprint(slide, store, patch_size, pixel_size_um))
            path = None
            if cache_dir is not None:
                from hest2sge.cache import safe_name

                stem = cache_file_name(sid, patch_size, pixel_size_um)[: -len(".h5")]
                path = Path(cache_dir) / f"{stem}.{safe_name(name)}-{fp[:12]}.feat.h5"
            arrays = load_cached(
                path, kind=FEATURE_KIND, fingerprint=fp,
                build=lambda st=store, sid=sid: {"features": embed_patches(
                    embed, st, batch_size, desc=f"features {sid}", progress=progress)},
                shapes={"features": (len(store), None)},
                attrs={"slide_id": sid, "encoder": name},
            )
            out[sid] = arrays["features"]
    finally:
        if is_module:
            encoder.train(was)
    return out
