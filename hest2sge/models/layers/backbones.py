"""CNN/ViT feature extractors from timm, with pretrained weights from the hub or a local file.

``create_backbone(name, pretrained, **kwargs)`` accepts any timm model name, with or without a
weight tag (``"densenet121.tv_in1k"``: the torchvision ImageNet weights), including
``hf-hub:`` names of foundation models (UNI, Phikon, H-optimus, Virchow style ViTs) with their
keyword arguments (``init_values``, ``dynamic_img_size``, ...). Weights come from:

* ``pretrained=True``: the Hugging Face hub through timm. Without network this fails within
  seconds with :class:`WeightsUnavailableError` naming the ways out, unless the weights are
  already in the local Hugging Face cache (then they are used without any network access).
* ``pretrained=<path>``: a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` state dict, read
  by timm's own loader (``weights_only``), passed through the architecture's own checkpoint
  filter (e.g. torchvision key names), and loaded strictly: any missing, unexpected or
  differently shaped weight is an error listing them (classifier weights are dropped first,
  the backbone has no classifier).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

#: Seconds allowed to open a connection to the weights host before giving up.
PROBE_TIMEOUT_S = 3.0


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but cannot be obtained (no network, nothing cached)."""


def ways_out(name: str) -> str:
    """The user's options when pretrained weights for ``name`` cannot be downloaded."""
    return (
        "Ways out: (1) pass pretrained=False to train from random initialisation (hest2sge "
        "warns and names the record's from-scratch settings); (2) pass pretrained="
        "'/path/to/weights.safetensors' (or .pth/.bin), a state dict of this architecture "
        f"downloaded elsewhere; (3) on a machine with network run once "
        f"timm.create_model({name!r}, pretrained=True) to fill the Hugging Face cache, copy "
        "the cache (~/.cache/huggingface) here and set HF_HUB_OFFLINE=1."
    )


def _hf_endpoint() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.ENDPOINT)
    except Exception:  # pragma: no cover - huggingface_hub is a timm dependency
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


@contextlib.contextmanager
def _forced_hf_offline() -> Iterator[None]:
    """Make huggingface_hub resolve files from the local cache only (no request at all)."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _weights_host(name: str) -> str:
    """URL of the host timm downloads ``name``'s weights from."""
    if name.startswith(("hf-hub:", "hf_hub:")):
        return _hf_endpoint()
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is not None and not getattr(cfg, "hf_hub_id", None) and getattr(cfg, "url", None):
        return str(cfg.url)
    return _hf_endpoint()


def create_backbone(name: str, pretrained: bool | str | os.PathLike = False,
                    **kwargs: Any) -> nn.Module:
    """A timm model without its classifier (``num_classes=0``: pooled features).

    Args:
        name: Any timm model name, with a weight tag (``"densenet121.tv_in1k"``,
            ``"resnet50.tv_in1k"``, ``"vgg16.tv_in1k"``) or an ``hf-hub:`` name.
        pretrained: ``False`` (random init), ``True`` (download through timm from the
            Hugging Face hub, or use the local Hugging Face cache) or the path of a local
            weights file (``.pth``/``.pt``/``.bin``/``.safetensors``).
        **kwargs: Further ``timm.create_model`` arguments (e.g. ``init_values=1e-5``,
            ``dynamic_img_size=True`` for UNI-style ViTs).

    Returns:
        The backbone; ``backbone.num_features`` is its output width.

    Raises:
        WeightsUnavailableError: ``pretrained=True`` without network and without a cached copy.
        ValueError: an unknown timm name, or a local file that does not fit the architecture.
        FileNotFoundError: a local weights file that does not exist.
    """
    import timm

    kwargs = {"num_classes": 0, **kwargs}
    if isinstance(pretrained, (str, os.PathLike)) and not isinstance(pretrained, bool):
        return _create_from_file(name, os.fspath(pretrained), kwargs)
    try:
        if not pretrained:
            return timm.create_model(name, pretrained=False, **kwargs)
        return _create_from_hub(name, kwargs)
    except RuntimeError as e:
        if isinstance(e, WeightsUnavailableError):
            raise
        if "unknown model" in str(e).lower() or "not found" in str(e).lower():
            close = timm.list_models(f"*{name.split('.')[0][:5]}*")[:5]
            raise ValueError(f"unknown timm backbone {name!r}; similar: {close}") from None
        raise


def _create_from_hub(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    t0 = time.monotonic()
    offline = _hf_offline()
    host = _weights_host(name)
    if not offline and not reachable(host):
        # No network: the local cache may still hold the weights (no request is made).
        try:
            with _forced_hf_offline():
                return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # LocalEntryNotFoundError, OSError, ...
            raise WeightsUnavailableError(
                f"pretrained weights for {name!r} are not in the local cache and {host} is "
                f"unreachable (checked in {time.monotonic() - t0:.1f} s: "
                f"{type(e).__name__}). {ways_out(name)}"
            ) from None
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        if _is_download_error(e):
            why = "HF_HUB_OFFLINE is set and they are not cached" if offline else (
                f"the download failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            raise WeightsUnavailableError(
                f"pretrained weights for {name!r} could not be obtained: {why}. "
                f"{ways_out(name)}") from None
        raise


def _is_download_error(e: Exception) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError",
                         "EntryNotFoundError", "RepositoryNotFoundError", "ConnectionError",
                         "TimeoutError", "HTTPError", "URLError", "ConnectError",
                         "TimeoutException", "OSError"})


def _create_from_file(name: str, path: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build ``name`` and load a local file strictly through timm's loader and filter."""
    import timm
    from timm.models import _builder

    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    # timm's builder gives its loader the architecture's checkpoint filter (torchvision key
    # names, position-embedding resizing, ...); capture it instead of timm's own non-strict
    # load (timm turns strict off whenever the classifier is dropped).
    captured: dict[str, Any] = {}
    real = _builder.load_pretrained

    def capture(model: nn.Module, pretrained_cfg: Any = None, num_classes: int = 1000,
                in_chans: int = 3, filter_fn: Any = None, strict: bool = True,
                **_: Any) -> None:
        captured["filter_fn"] = filter_fn

    hub_name = name.startswith(("hf-hub:", "hf_hub:"))
    ctx: Any = contextlib.nullcontext()
    if hub_name and not _hf_offline() and not reachable(_hf_endpoint()):
        ctx = _forced_hf_offline()  # the model's config.json may still be cached
    _builder.load_pretrained = capture
    try:
        with ctx:
            model = timm.create_model(name, pretrained=True,
                                      pretrained_cfg_overlay={"file": path}, **kwargs)
    except Exception as e:
        if hub_name and _is_download_error(e):
            raise WeightsUnavailableError(
                f"the configuration of {name!r} is not in the local Hugging Face cache and the "
                "hub is unreachable; with a local weights file pass the timm architecture "
                "name instead (e.g. 'vit_large_patch16_224' for UNI) with its keyword "
                "arguments (init_values=1e-5, dynamic_img_size=True, ...)") from None
        raise
    finally:
        _builder.load_pretrained = real
    load_weights(model, path, filter_fn=captured.get("filter_fn"))
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, filter_fn: Any = None) -> None:
    """Load a local state dict into a timm model strictly (classifier weights excepted).

    Args:
        model: The timm model (``num_classes=0`` drops the checkpoint's classifier).
        path: ``.pth``/``.pt``/``.bin`` (read ``weights_only``) or ``.safetensors``; a
            ``state_dict``/``model`` wrapper and a ``module.`` prefix are accepted.
        filter_fn: The architecture's timm checkpoint filter (maps foreign key names).

    Raises:
        ValueError: listing the missing, unexpected and differently shaped weights.
    """
    from timm.models import load_state_dict

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        sd = load_state_dict(path, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} could not be read as a weights-only state dict "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if filter_fn is not None:
        n_args = len(inspect.signature(filter_fn).parameters)
        sd = filter_fn(sd, model) if n_args >= 2 else filter_fn(sd)
    if getattr(model, "num_classes", None) == 0:
        heads = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
        for head in (heads,) if isinstance(heads, str) else heads:
            sd = {k: v for k, v in sd.items() if not k.startswith(f"{head}.")}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sd
              if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit this backbone ({type(model).__name__}): {len(missing)} missing key(s) "
            f"{missing[:8]}, {len(unexpected)} unexpected key(s) {unexpected[:8]}, "
            f"{len(shapes)} shape mismatch(es) {shapes[:5]}. Check the architecture name and "
            "its keyword arguments (e.g. init_values=1e-5 for a ViT with LayerScale)."
        )
    model.load_state_dict({k: v.to(own[k].dtype) if torch.is_floating_point(v) else v
                           for k, v in sd.items()}, strict=True)
