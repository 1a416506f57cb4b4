"""Fine-tuning and sharing trained models.

* :func:`adapt_to_panel`: a trained model moved to a new gene panel. Every weight that does not
  depend on the panel (the trunk) is kept; weights with a gene dimension (the output head, and
  e.g. EGN's exemplar-expression projections) are freshly initialised, with the rows of genes
  shared with the old panel copied over. Reached through
  ``hest2sge.load(checkpoint=path, genes=new_panel)``.
* :func:`save_pretrained` / :func:`from_pretrained`: a folder with ``model.safetensors`` and
  ``config.json`` (no pickle anywhere), local or on the Hugging Face hub
  (:func:`push_to_hub`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("hest2sge")

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: Constructor arguments that may change when a trained model is fine-tuned.
FINETUNE_OVERRIDES = frozenset({"optimizer", "lr", "weight_decay", "momentum", "scheduler",
                                "scheduler_step", "scheduler_gamma"})


def _build(cls: type, hparams: dict[str, Any], device: Any = None):
    import inspect

    from hest2sge.models.base import _RELOAD_OVERRIDES, quiet_pretrained_warning

    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    for k, v in _RELOAD_OVERRIDES.items():
        if k in accepted:
            kwargs[k] = v
    with quiet_pretrained_warning():
        if device is None:
            return cls(**kwargs)
        with torch.device(device):
            return cls(**kwargs)


def _copy_rows(fresh: Tensor, old: Tensor, dims: list[int], new_idx: Tensor,
               old_idx: Tensor) -> Tensor:
    """``fresh`` with the entries of shared genes (along every gene dim) taken from ``old``."""
    if not dims:
        return old.to(fresh.dtype)
    d, rest = dims[0], dims[1:]
    out = fresh.clone()
    sub_fresh = fresh.index_select(d, new_idx)
    sub_old = old.index_select(d, old_idx)
    out.index_copy_(d, new_idx, _copy_rows(sub_fresh, sub_old, rest, new_idx, old_idx))
    return out


def adapt_to_panel(cls: type, hparams: dict[str, Any], state_dict: dict[str, Tensor],
                   genes: Sequence[str], source: str = "checkpoint", **overrides: Any):
    """A model of ``cls`` for the panel ``genes``, initialised from a trained state dict.

    Args:
        cls: The model class.
        hparams: The trained model's hyperparameters (with its ``genes``).
        state_dict: The trained weights.
        genes: The new gene panel.
        source: Where the weights come from (for the message).
        **overrides: Training settings to change for fine-tuning (``lr``, ``optimizer``, ...).

    Returns:
        The model; ``model.finetune_report`` says what was kept and what is new.
    """
    bad = set(overrides) - FINETUNE_OVERRIDES
    if bad:
        raise TypeError(f"fine-tuning accepts only {sorted(FINETUNE_OVERRIDES)} besides "
                        f"genes=; got {sorted(bad)}")
    old_genes = hparams.get("genes")
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        raise ValueError("the new gene panel has duplicate genes")
    new_hp = {**hparams, **overrides, "genes": genes, "n_genes": None}
    model = _build(cls, new_hp)
    probe = _build(cls, {**new_hp, "genes": None, "n_genes": len(genes) + 1}, device="meta")
    probe_shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    old_pos = {g: i for i, g in enumerate(old_genes or [])}
    shared = [(i, old_pos[g]) for i, g in enumerate(genes) if g in old_pos]
    new_idx = torch.tensor([i for i, _ in shared], dtype=torch.long)
    old_idx = torch.tensor([j for _, j in shared], dtype=torch.long)
    target = model.state_dict()
    out: dict[str, Tensor] = {}
    headed, dropped = [], []
    for k, fresh in target.items():
        old = state_dict.get(k)
        gene_dims = [d for d, (a, b) in enumerate(zip(fresh.shape, probe_shapes.get(k, ())))
                     if a != b]
        if old is None:
            dropped.append(k)
            out[k] = fresh
        elif not gene_dims:
            if tuple(old.shape) == tuple(fresh.shape):
                out[k] = old.to(fresh.dtype)
            else:
                dropped.append(k)
                out[k] = fresh
        else:
            headed.append(k)
            same_other = all(old.shape[d] == fresh.shape[d] for d in range(fresh.dim())
                             if d not in gene_dims) and old.dim() == fresh.dim()
            if same_other and len(shared) and old_genes is not None:
                out[k] = _copy_rows(fresh, old.to(fresh.device), gene_dims, new_idx, old_idx)
            else:
                if not same_other:
                    dropped.append(k)
                out[k] = fresh
    model.load_state_dict(out, strict=True)
    model.fitted_target_transform = None  # the new panel's transform is fitted on new data
    report = {"kept_genes": len(shared), "new_genes": len(genes) - len(shared),
              "old_panel": len(old_genes or []), "reinitialised": headed,
              "not_restored": dropped}
    model.finetune_report = report
    log.warning(
        "%s from %s adapted to a new gene panel: %d gene(s) shared with the old panel of %d "
        "keep their trained head weights, %d new gene(s) start from a fresh initialisation "
        "(weights with a gene dimension: %s); everything else is the trained model%s.",
        cls.__name__, source, len(shared), len(old_genes or []), len(genes) - len(shared),
        ", ".join(headed) or "none",
        f" (not restored: {', '.join(dropped)})" if dropped else "")
    return model


# ---------------------------------------------------------------------- export / import
def _config_of(model: Any) -> dict[str, Any]:
    from hest2sge import __version__
    from hest2sge.models.base import _plain

    hp = {k: v for k, v in _plain(dict(model.hparams)).items() if not k.startswith("_")}
    return {"hest2sge_version": __version__, "model": model.model_name,
            "class": type(model).__name__, "hparams": hp, "genes": model.genes,
            "target_transform": model.fitted_target_transform, "format": 1}


def save_pretrained(model: Any, save_directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``save_directory``.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    if not model.model_name:
        raise ValueError(f"{type(model).__name__} is not registered (@register_model): "
                         "from_pretrained could not rebuild it")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[tuple, str] = {}
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        tensors[k] = v.clone() if key in seen and v.numel() else v
        seen[key] = k
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(_config_of(model), indent=2) + "\n")
    return folder


def from_pretrained(path_or_repo: str | os.PathLike, revision: str | None = None,
                    genes: Sequence[str] | None = None, map_location: str = "cpu",
                    **overrides: Any):
    """Load a model written by :func:`save_pretrained` (a folder or a hub repository).

    Args:
        path_or_repo: Local folder, or a Hugging Face repository id (``"user/name"``).
        revision: Hub revision (branch, tag or commit).
        genes: A new gene panel: the head is re-initialised for it (see
            :func:`adapt_to_panel`); the saved panel when omitted.
        map_location: Device for the weights.
        **overrides: Fine-tuning settings (``lr``, ``optimizer``, ...) with ``genes``.

    Returns:
        The model (eval mode unless adapted to a new panel).
    """
    from safetensors.torch import load_file

    from hest2sge.registry import get_model_class

    folder = Path(path_or_repo)
    if not folder.is_dir():
        folder = _download(str(path_or_repo), revision)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: not a save_pretrained folder")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if not isinstance(config, dict) or "model" not in config or "hparams" not in config:
        raise ValueError(f"{folder / CONFIG_NAME} is not a hest2sge model config")
    cls = get_model_class(config["model"])
    state = load_file(str(folder / WEIGHTS_NAME), device=map_location)
    hparams = dict(config["hparams"])
    if genes is not None and list(genes) != list(hparams.get("genes") or []):
        return adapt_to_panel(cls, hparams, state, genes, source=str(path_or_repo),
                              **overrides)
    if overrides:
        raise TypeError(f"only genes= (with fine-tuning settings) may accompany "
                        f"from_pretrained; got {sorted(overrides)}")
    model = _build(cls, hparams)
    model.load_state_dict(state, strict=True)
    model.fitted_target_transform = config.get("target_transform")
    return model.eval()


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"]))
    except Exception as e:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a reachable Hugging Face repository "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None


def model_card(model: Any) -> str:
    """A short README.md for a pushed model (what it is and how to load it)."""
    cfg = _config_of(model)
    tt = cfg["target_transform"] or model.target_transform_spec()
    return (
        f"---\nlibrary_name: hest2sge\ntags: [spatial-transcriptomics, histology]\n---\n"
        f"# {cfg['class']} ({getattr(model, 'paper', '')})\n\n"
        f"A hest2sge `{cfg['model']}` model predicting {model.n_genes} genes from H&E "
        f"patches; targets: `{tt}`.\n\n"
        "```python\nimport hest2sge\nmodel = hest2sge.from_pretrained(\"<this repo>\")\n"
        "pred = hest2sge.predict(model, slide)\n```\n"
    )


def push_to_hub(model: Any, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload hest2sge model", api: Any = None) -> Any:
    """Upload ``model`` (safetensors + config + model card) to a Hugging Face repository.

    Args:
        model: A trained hest2sge model.
        repo_id: ``"user/name"``; created when missing.
        token: Hub token (default: the logged-in user's).
        private: Create the repository as private.
        commit_message: Commit message.
        api: A ``huggingface_hub.HfApi`` (default: a new one with ``token``).

    Returns:
        What ``HfApi.upload_folder`` returns (the commit information).
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        (Path(tmp) / "README.md").write_text(model_card(model))
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                 commit_message=commit_message)
