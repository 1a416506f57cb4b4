"""Model registry: ``@register_model``, :func:`load`, :func:`list_models`, :func:`model_info`.

Adding a model is one file with a decorated :class:`~hest2sge.models.base.SpotModel` subclass
plus one import line in :mod:`hest2sge.models`. A user's own class registers the same way.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

_REGISTRY: dict[str, type] = {}
_BUILTINS_LOADED = False


def register_model(name: str) -> Callable[[type], type]:
    """Class decorator registering a :class:`SpotModel` subclass under ``name``.

    Args:
        name: Lower-case registry name, e.g. ``"hist2st"``.

    Returns:
        The decorator; it sets ``cls.model_name`` and returns the class unchanged.
    """
    key = name.lower()

    def deco(cls: type) -> type:
        existing = _REGISTRY.get(key)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"a model named {key!r} is already registered ({existing.__name__})")
        cls.model_name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import hest2sge.models  # noqa: F401  (registers the built-in models)


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def get_model_class(name: str) -> type:
    """Return the registered class for ``name``.

    Raises:
        KeyError: with the closest registered names when ``name`` is unknown.
    """
    _ensure_builtins()
    key = str(name).lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(
            f"unknown model {name!r}{hint} Registered models: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[key]


def load(name: str | None = None, checkpoint: str | os.PathLike | None = None, **overrides: Any):
    """Build a registered model, in its paper configuration unless overridden.

    The paper configuration is the model's configuration record
    (:func:`hest2sge.models.configs.get_record`), which the class signature's defaults repeat.

    Args:
        name: Registry name (``"stnet"``, ``"hist2st"``, ...). Optional when ``checkpoint`` is
            given (the checkpoint records the model name).
        checkpoint: Path of a Lightning checkpoint written by hest2sge. It is read with
            ``torch.load(weights_only=True)``, so no arbitrary object is ever unpickled.
        **overrides: Keyword arguments of the model's ``__init__`` (e.g. ``genes=[...]``,
            tiny configurations for tests). With a checkpoint, only ``genes`` may be given,
            and it must equal the checkpoint's gene panel.

    Returns:
        The model (a ``SpotModel``), untrained unless a checkpoint is given.
    """
    if checkpoint is not None:
        from hest2sge.models.base import load_checkpoint

        return load_checkpoint(checkpoint, name=name, **overrides)
    if name is None:
        raise ValueError("hest2sge.load needs a model name or a checkpoint path")
    from hest2sge.models.configs import get_record

    cls = get_model_class(name)
    return cls(**{**dict(get_record(name).model), **overrides})


def model_info(name: str, **overrides: Any) -> dict[str, Any]:
    """Describe a registered model in its paper configuration.

    Args:
        name: Registry name.
        **overrides: Configuration overrides (e.g. ``n_genes=785``; default 785 genes, the
            HER2+ panel the paper's Table 1 counts at).

    Returns:
        A dict with ``name``, ``class``, ``paper``, ``input_mode``, ``patch_size``,
        ``target_transform``, ``parameters`` (trainable, as counted by the paper),
        ``parameters_total``, ``paper_parameters`` (Table 1), ``defaults`` (the signature),
        ``training`` (the record's optimiser, lr, epochs, batch, checkpoint rule, ...) and
        ``sources`` (where each recorded setting comes from).
    """
    import inspect

    import torch

    from hest2sge.models.configs import get_record

    cls = get_model_class(name)
    record = get_record(name)
    kwargs = {"n_genes": 785, "pretrained": False}
    sig = inspect.signature(cls.__init__)
    kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    kwargs.update(overrides)
    from hest2sge.models.base import quiet_pretrained_warning

    with torch.device("meta"), quiet_pretrained_warning():
        model = cls(**kwargs)
    defaults = {
        k: p.default
        for k, p in sig.parameters.items()
        if k != "self" and p.default is not inspect.Parameter.empty
    }
    return {
        "name": cls.model_name,
        "class": cls.__name__,
        "paper": getattr(cls, "paper", ""),
        "input_mode": model.input_mode,
        "patch_size": model.patch_size,
        "target_transform": model.target_transform_spec(),
        "parameters": model.count_parameters(trainable_only=True),
        "parameters_total": model.count_parameters(trainable_only=False),
        "paper_parameters": getattr(cls, "paper_parameters", None),
        "defaults": defaults,
        "training": record.training_summary(),
        "sources": dict(record.sources),
    }
