"""``SpotModel``: the LightningModule base every hest2sge model derives from.

It owns the training policy once for all models: one shared step for train/val/test,
``configure_optimizers`` from hyperparameters, ``predict_step``, hyperparameter saving, image
normalisation and the capability flags the data module reads. A model file sets its flags,
builds its layers in ``__init__``, implements ``forward(batch)`` and, when the paper's loss is
not MSE, ``loss(out, batch)``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from hest2sge.errors import Hest2sgeInputError, check_arg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Constructor arguments that must not be replayed when restoring a checkpoint (the weights
# come from the checkpoint, so no download or local weight file is needed).
_RELOAD_OVERRIDES = {"pretrained": False}


class PretrainedWeightsWarning(UserWarning):
    """A model whose paper settings assume pretrained weights is built without them."""


_WARNED_NO_WEIGHTS: set[str] = set()
_QUIET_NO_WEIGHTS = [0]


@contextlib.contextmanager
def quiet_pretrained_warning() -> Iterator[None]:
    """Build models without the missing-weights warning (checkpoint restores, parameter
    counting), where ``pretrained=False`` does not mean a random trunk is trained."""
    _QUIET_NO_WEIGHTS[0] += 1
    try:
        yield
    finally:
        _QUIET_NO_WEIGHTS[0] -= 1


def _fmt_kwargs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items())


class SpotModel(pl.LightningModule):
    """Base class of all hest2sge models.

    Class-level capability flags (read by :class:`~hest2sge.data.SpotDataModule`):

    * ``input_mode``: ``"spot"`` (shuffled spots), ``"slide"`` (one slide per batch with its
      neighbour graph) or ``"image"`` (whole-image models).
    * ``needs_counts``: the loss uses raw counts (``batch["counts"]``).
    * ``needs_graph``: the batch must carry ``edge_index`` (slide mode).
    * ``needs_reference``: the model needs the training set as a reference (exemplars).
    * ``default_target_transform``: dict spec of the paper's target transform.
    * ``graph_k``/``graph_max_dist``: neighbour graph on array coordinates for slide mode.
    * ``loader_augment``: default of the data module's training flips/rotations.
    * ``paper`` and ``paper_parameters``: citation and Table 1 parameter count.

    Args:
        genes: Gene panel (list of symbols). Either ``genes`` or ``n_genes`` is required.
        n_genes: Number of genes when no names are known (tests, parameter counting).
        patch_size: Patch side in pixels the model expects.
        lr: Learning rate.
        weight_decay: Weight decay.
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum.
        scheduler: ``None``, ``"cosine"`` (over ``max_epochs``) or ``"step"``.
        scheduler_step: StepLR step size in epochs.
        scheduler_gamma: StepLR decay.
        normalize: Pixel normalisation: ``"imagenet"``, ``"none"`` (pixels in [0, 1]) or
            ``"half"`` (mean 0.5, std 0.5).
        target_transform: Override of the model's default target transform (dict spec).
        optimizer_impl: How the optimiser steps: ``"fused"`` (default: one fused kernel per
            step where torch has one for the device, else ``"foreach"``), ``"foreach"``
            (multi-tensor) or ``"for-loop"`` (one tensor at a time). Same optimiser type and
            settings, same updates to float tolerance; fused Adam over 222 M parameters steps
            several times faster on a CPU. Use ``"foreach"`` with gradient clipping under
            16-bit mixed precision (Lightning cannot clip for fused optimisers there).
    """

    model_name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    paper_parameters: ClassVar[float | None] = None
    input_mode: ClassVar[str] = "spot"
    needs_counts: ClassVar[bool] = False
    needs_graph: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    default_target_transform: ClassVar[dict[str, Any]] = {"kind": "log_norm"}
    graph_k: ClassVar[int] = 4
    graph_max_dist: ClassVar[float | None] = None
    #: Whether the data module's flips/90-degree rotations apply to this model's training
    #: patches by default (False for models whose original uses none or augments itself).
    loader_augment: ClassVar[bool] = True
    #: The model takes uint8 patches (0-255) and converts them itself, chunk by chunk, to save
    #: memory on whole slides; otherwise batches arrive as float in [0, 1].
    accepts_uint8_img: ClassVar[bool] = False
    #: Attributes holding the pretrained trunk (``freeze_backbone``); default ``backbone``.
    trunk_modules: ClassVar[tuple[str, ...]] = ()
    #: Keyword overrides giving a tiny configuration (tests, CPU smoke runs).
    tiny_config: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        genes: Sequence[str] | None = None,
        n_genes: int | None = None,
        patch_size: int = 224,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        momentum: float = 0.9,
        scheduler: str | None = None,
        scheduler_step: int = 50,
        scheduler_gamma: float = 0.9,
        normalize: str = "imagenet",
        target_transform: dict[str, Any] | None = None,
        optimizer_impl: str = "fused",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        genes = _check_genes(genes, owner)
        if n_genes is not None:
            n_genes = _check_int(n_genes, "n_genes", owner, minimum=1)
        if genes is not None:
            if n_genes is not None and n_genes != len(genes):
                raise Hest2sgeInputError(
                    f"{owner}: n_genes={n_genes} but {len(genes)} genes were given; pass one "
                    "of them"
                )
            n_genes = len(genes)
        if n_genes is None:
            raise Hest2sgeInputError(
                f"{owner} needs its gene panel: pass genes=dm.genes "
                "(or n_genes=... when names are unknown)"
            )
        _check_real(lr, "lr", owner, positive=True)
        _check_real(weight_decay, "weight_decay", owner)
        _check_real(momentum, "momentum", owner, upper=1.0)
        _check_int(scheduler_step, "scheduler_step", owner, minimum=1)
        _check_real(scheduler_gamma, "scheduler_gamma", owner, positive=True)
        check_arg(target_transform is None or isinstance(target_transform, dict),
                  "target_transform", target_transform, "None or a dict spec such as "
                  "{'kind': 'log_norm'}", owner)
        self.genes: list[str] | None = genes
        self.n_genes = int(n_genes)
        self.patch_size = _check_int(patch_size, "patch_size", owner, minimum=1)
        if optimizer not in ("adam", "adamw", "sgd"):
            raise Hest2sgeInputError(f"{owner}: optimizer must be 'adam', 'adamw' or 'sgd', "
                                     f"got {optimizer!r}")
        if optimizer_impl not in ("fused", "foreach", "for-loop"):
            raise Hest2sgeInputError(f"{owner}: optimizer_impl must be 'fused', 'foreach' or "
                                     f"'for-loop', got {optimizer_impl!r}")
        if scheduler not in (None, "none", "cosine", "step"):
            raise Hest2sgeInputError(f"{owner}: scheduler must be None, 'cosine' or 'step', "
                                     f"got {scheduler!r}")
        mean, std = {
            "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
            "half": ((0.5,) * 3, (0.5,) * 3),
            "none": ((0.0,) * 3, (1.0,) * 3),
        }.get(normalize, (None, None))
        if mean is None:
            raise Hest2sgeInputError(f"{owner}: normalize must be 'imagenet', 'half' or 'none', "
                                     f"got {normalize!r}")
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.fitted_target_transform: dict[str, Any] | None = None
        self.save_hyperparameters()
        self._warn_without_weights()

    def _warn_without_weights(self) -> None:
        """Warn once per model when the paper settings assume pretrained weights but
        ``pretrained=False`` is used with them, naming the record's from-scratch settings."""
        hp = self.hparams
        name = self.model_name
        if (_QUIET_NO_WEIGHTS[0] or not name or name in _WARNED_NO_WEIGHTS
                or "pretrained" not in hp or hp["pretrained"] not in (False, None)):
            return
        from hest2sge.models.configs import get_record

        rec = get_record(name)
        if not rec.model.get("pretrained"):
            return
        scratch = dict(rec.from_scratch)
        if scratch and all(hp.get(k) == v for k, v in scratch.items()):
            return  # already the from-scratch settings
        _WARNED_NO_WEIGHTS.add(name)
        paper = {k: rec.model[k] for k in ("optimizer", "lr", *scratch) if k in rec.model}
        weights = rec.model.get("backbone") or rec.model.get("extractor") or "its encoder"
        if scratch:
            advice = (f"From random initialisation use the record's from-scratch settings: "
                      f"hest2sge.load({name!r}, pretrained=False, {_fmt_kwargs(scratch)})")
        else:
            advice = "The record has no from-scratch override for it"
        note = rec.sources.get("from_scratch", "")
        warnings.warn(
            f"{type(self).__name__} is built with pretrained=False, but its paper settings "
            f"({_fmt_kwargs(paper)}) assume pretrained weights ({weights}). {advice}"
            f"{' (' + note + ')' if note else ''}.",
            PretrainedWeightsWarning, stacklevel=3)

    # ------------------------------------------------------------------ flags and helpers
    def target_transform_spec(self) -> dict[str, Any]:
        """The target transform this model trains on (hyperparameter or class default)."""
        return dict(self.hparams.get("target_transform") or self.default_target_transform)

    def count_parameters(self, trainable_only: bool = True) -> int:
        """Number of parameters (trainable only by default, as the paper's Table 1 counts)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def normalize_img(self, img: Tensor) -> Tensor:
        """Normalise a (B, 3, H, W) image batch in [0, 1] with the model's pixel statistics."""
        return (img - self.pixel_mean) / self.pixel_std

    # ------------------------------------------------------------------ the model contract
    def forward(self, batch: dict[str, Tensor]) -> Tensor | dict[str, Tensor]:  # pragma: no cover
        """Predict targets for a batch; return (B, G) or a dict with ``"pred"``."""
        raise NotImplementedError

    @staticmethod
    def prediction(out: Tensor | dict[str, Tensor]) -> Tensor:
        """The (B, G) prediction from a forward output."""
        return out["pred"] if isinstance(out, dict) else out

    def loss(self, out: Tensor | dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor | dict:
        """Training loss; MSE on the transformed targets unless a model overrides it.

        May return a tensor or a dict with ``"loss"`` and further terms to log.
        """
        return F.mse_loss(self.prediction(out), batch["expr"])

    def on_datamodule(self, datamodule: Any) -> None:
        """Hook called once before fitting with the set-up data module (e.g. to initialise a
        head from training-target means or to build an exemplar reference). Default: nothing."""

    # ------------------------------------------------------------------ Lightning plumbing
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return prepare_batch(batch, keep_uint8=self.accepts_uint8_img)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "genes"):
            return
        if self.genes is not None and list(dm.genes) != list(self.genes):
            missing = [g for g in self.genes if g not in set(dm.genes)]
            extra = [g for g in dm.genes if g not in set(self.genes)]
            raise ValueError(
                f"{type(self).__name__} was built for a different gene panel than the data "
                f"module's: {len(missing)} model gene(s) missing from the data "
                f"(e.g. {missing[:5]}), {len(extra)} data gene(s) unknown to the model "
                f"(e.g. {extra[:5]}){' and a different order' if not missing and not extra else ''}"
            )
        if self.genes is None and len(dm.genes) != self.n_genes:
            raise ValueError(
                f"model predicts {self.n_genes} genes but the data module has {len(dm.genes)}"
            )
        tt = getattr(dm, "target_transform", None)
        if tt is not None:
            self.fitted_target_transform = tt.to_dict()
        if stage == "fit":
            self.on_datamodule(dm)

    def _shared_step(self, batch: dict[str, Tensor], stage: str) -> dict[str, Tensor]:
        out = self(batch)
        losses = self.loss(out, batch)
        if isinstance(losses, dict):
            loss = losses["loss"]
            extras = {k: v for k, v in losses.items() if k != "loss"}
        else:
            loss, extras = losses, {}
        bs = int(batch["expr"].shape[0])
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", batch_size=bs,
                 on_step=stage == "train", on_epoch=True, sync_dist=stage != "train")
        for k, v in extras.items():
            self.log(f"{stage}/{k}", v, batch_size=bs, on_epoch=True, sync_dist=stage != "train")
        return {"loss": loss, "pred": self.prediction(out).detach()}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int = 0) -> dict[str, Tensor]:
        pred = self.prediction(self(batch))
        keep = {k: batch[k] for k in ("slide", "spot", "pos") if k in batch}
        return {"pred": pred.detach(), **keep}

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            # Models fitted in closed form (GeneCodeR) still go through the Trainer.
            return None
        opt = build_optimizer(params, hp.optimizer, lr=hp.lr, weight_decay=hp.weight_decay,
                              momentum=hp.momentum, impl=hp.get("optimizer_impl", "fused"))
        if hp.scheduler in (None, "none"):
            return opt
        if hp.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, hp.scheduler_step, hp.scheduler_gamma)
        else:
            trainer = self._trainer  # None outside a Trainer (e.g. benchmarks)
            t_max = max(int(getattr(trainer, "max_epochs", None) or 1), 1)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from hest2sge import __version__

        checkpoint["hest2sge"] = {
            "model": self.model_name,
            "version": __version__,
            "genes": self.genes,
            "target_transform": self.fitted_target_transform,
        }
        # Store hyperparameters as a plain dict so weights_only loading needs no allow-list.
        checkpoint["hyper_parameters"] = _plain(dict(self.hparams))
        # Global random generators (python, numpy, torch): exact resume (hest2sge.rng).
        from hest2sge.rng import capture_rng_state

        checkpoint["hest2sge_rng"] = capture_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("hest2sge") or {}
        self.fitted_target_transform = meta.get("target_transform")
        # A resumed fit continues the generators where the checkpoint left them (before the
        # loaders are built and iterated); loading weights for inference leaves them alone.
        state = checkpoint.get("hest2sge_rng")
        trainer = self._trainer
        if state is not None and trainer is not None and trainer.state.fn == "fit":
            from hest2sge.rng import restore_rng_state

            restore_rng_state(state)

    # ------------------------------------------------------------------ fine-tuning, sharing
    def trunk(self) -> list[torch.nn.Module]:
        """The pretrained feature extractor(s) (``trunk_modules``, else ``backbone``)."""
        names = self.trunk_modules or (("backbone",) if hasattr(self, "backbone") else ())
        mods = [getattr(self, n) for n in names if isinstance(getattr(self, n, None),
                                                                torch.nn.Module)]
        if not mods:
            raise AttributeError(f"{type(self).__name__} has no pretrained trunk to freeze")
        return mods

    def freeze_backbone(self) -> SpotModel:
        """Freeze the trunk: no gradients, BatchNorm statistics kept (eval mode in training).
        The optimiser built by ``configure_optimizers`` then trains the rest only."""
        for m in self.trunk():
            m.requires_grad_(False)
            m.eval()
        self._trunk_frozen = True
        if hasattr(self, "frozen"):  # DeepPT's fixed-extractor switch
            self.frozen = True
        return self

    def unfreeze_backbone(self) -> SpotModel:
        """Train the trunk again (end-to-end fine-tuning)."""
        for m in self.trunk():
            m.requires_grad_(True)
            m.train(self.training)
        self._trunk_frozen = False
        if hasattr(self, "frozen"):
            self.frozen = False
        return self

    def train(self, mode: bool = True) -> SpotModel:
        super().train(mode)
        if getattr(self, "_trunk_frozen", False):
            for m in self.trunk():
                m.eval()
        return self

    def save_pretrained(self, save_directory: str | os.PathLike) -> Any:
        """Write ``model.safetensors`` + ``config.json`` (see :mod:`hest2sge.models.transfer`)."""
        from hest2sge.models.transfer import save_pretrained

        return save_pretrained(self, save_directory)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload to a Hugging Face repository (:func:`hest2sge.models.transfer.push_to_hub`)."""
        from hest2sge.models.transfer import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, **kwargs: Any) -> SpotModel:
        """Load a :meth:`save_pretrained` folder or hub repository (any registered model)."""
        from hest2sge.models.transfer import from_pretrained

        model = from_pretrained(path_or_repo, **kwargs)
        if cls is not SpotModel and not isinstance(model, cls):
            raise TypeError(f"{path_or_repo} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def _check_genes(genes: Any, owner: str) -> list[str] | None:
    """A gene panel: a non-empty sequence of unique, non-missing names (not one string)."""
    if genes is None:
        return None
    if isinstance(genes, (str, bytes)):
        raise Hest2sgeInputError(
            f"{owner}: argument genes={genes!r} is a single string; pass a list of gene names "
            f"(e.g. genes=[{genes!r}] or genes=dm.genes)"
        )
    if isinstance(genes, dict) or not hasattr(genes, "__iter__"):
        raise Hest2sgeInputError(
            f"{owner}: argument genes must be a list of gene names, got {type(genes).__name__}"
        )
    names = list(genes)
    bad = [g for g in names if g is None or (isinstance(g, float) and math.isnan(g))
           or not str(g).strip()]
    if bad:
        raise Hest2sgeInputError(f"{owner}: argument genes holds missing/empty names {bad[:5]}")
    names = [str(g) for g in names]
    if not names:
        raise Hest2sgeInputError(
            f"{owner}: argument genes is empty; the model needs at least one gene (did the "
            "gene selection rule keep none? check dm.genes)"
        )
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = [g for g in names if g in seen or seen.add(g)]
        raise Hest2sgeInputError(
            f"{owner}: argument genes has duplicated names {sorted(set(dup))[:5]}; each gene "
            "must appear once"
        )
    return names


def _check_int(value: Any, name: str, owner: str, minimum: int | None = None) -> int:
    """An integer argument (integral floats such as 3.0 accepted; 2.5, "3", True are not)."""
    ok = (isinstance(value, numbers.Integral) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())
    expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    check_arg(ok and (minimum is None or value >= minimum), name, value, expected, owner)
    return int(value)


def _check_real(value: Any, name: str, owner: str, positive: bool = False,
                upper: float | None = None) -> float:
    """A finite real argument, > 0 (``positive``) or >= 0, and <= ``upper``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(float(value)) and (float(value) > 0 if positive
                                                 else float(value) >= 0)
    ok = ok and (upper is None or float(value) <= upper)
    expected = ("a positive" if positive else "a non-negative") + " finite number" + (
        f" <= {upper:g}" if upper is not None else "")
    check_arg(ok, name, value, expected, owner)
    return float(value)


def build_optimizer(params: list[torch.nn.Parameter], kind: str, lr: float,
                    weight_decay: float = 0.0, momentum: float = 0.9,
                    impl: str = "fused") -> torch.optim.Optimizer:
    """The paper's optimiser type and settings, stepping fused where torch can.

    Args:
        params: Parameters to optimise.
        kind: ``"adam"``, ``"adamw"`` or ``"sgd"`` (SGD with ``momentum``).
        lr: Learning rate.
        weight_decay: Weight decay.
        momentum: SGD momentum.
        impl: ``"fused"`` (falls back to ``"foreach"`` where torch has no fused kernel for the
            parameters' device or dtype), ``"foreach"`` or ``"for-loop"``.

    Returns:
        The optimiser.
    """
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[kind]
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if kind == "sgd":
        kwargs["momentum"] = momentum
    if impl == "fused":
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            impl = "foreach"  # no fused kernel for these parameters
    return cls(params, foreach=impl == "foreach", **kwargs)


def prepare_batch(batch: dict[str, Tensor], keep_uint8: bool = False) -> dict[str, Tensor]:
    """Convert a loader batch for a model: uint8 patches become float in [0, 1] (unless
    ``keep_uint8``, for models with ``accepts_uint8_img``)."""
    img = batch.get("img") if isinstance(batch, dict) else None
    if img is not None and img.dtype == torch.uint8 and not keep_uint8:
        batch = dict(batch)
        batch["img"] = img.float().div_(255.0)
    return batch


def _plain(obj: Any) -> Any:
    """Convert hyperparameters to builtin containers (tuples become lists)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def load_checkpoint(path: str | os.PathLike, name: str | None = None, **overrides: Any):
    """Restore a hest2sge model from a Lightning checkpoint without unpickling objects.

    Args:
        path: Checkpoint file.
        name: Expected registry name (checked against the checkpoint's).
        **overrides: ``map_location``, and ``genes``: the checkpoint's panel restores the
            model as trained; a different panel fine-tunes it (the trunk is kept, the output
            head re-initialised with the rows of shared genes kept, see
            :func:`hest2sge.models.transfer.adapt_to_panel`), optionally with new training
            settings (``lr``, ``optimizer``, ``weight_decay``, ``scheduler``, ...).

    Returns:
        The model with the checkpoint's weights, in eval mode (train mode when adapted).
    """
    from hest2sge.registry import get_model_class

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    map_location = overrides.pop("map_location", "cpu")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError, EOFError (empty file) and friends
        from hest2sge.errors import _first_line

        raise Hest2sgeInputError(
            f"could not be read as a weights-only checkpoint ({_first_line(e)[:250]}); "
            "hest2sge never unpickles arbitrary objects",
            path=path,
            hint="is it a complete checkpoint written by hest2sge / Lightning (an empty or "
            "truncated file is what an interrupted save leaves)?",
        ) from None
    meta = ckpt.get("hest2sge") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"{path} is not a hest2sge checkpoint (no 'hest2sge' section)")
    ck_name = meta["model"]
    if name is not None and get_model_class(name) is not get_model_class(ck_name):
        raise ValueError(f"{path} holds a {ck_name!r} model, not {name!r}")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    genes = overrides.pop("genes", None)
    from hest2sge.models.transfer import FINETUNE_OVERRIDES, adapt_to_panel

    bad = set(overrides) - FINETUNE_OVERRIDES
    if bad or (overrides and genes is None):
        raise TypeError(
            f"only genes= (and, to fine-tune on a new panel, {sorted(FINETUNE_OVERRIDES)}) "
            f"may accompany checkpoint=; got {sorted(overrides)}. "
            "Build the model from the name to change its configuration."
        )
    cls = get_model_class(ck_name)
    ck_genes = hparams.get("genes")
    if genes is not None and (overrides or ck_genes is None or list(genes) != list(ck_genes)):
        # Fine-tuning: keep the trained trunk, re-initialise the head for the new panel.
        return adapt_to_panel(cls, hparams, ckpt["state_dict"], genes, source=path,
                              **overrides)
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    for k, v in _RELOAD_OVERRIDES.items():
        if k in accepted:
            hparams[k] = v
    with quiet_pretrained_warning():
        model = cls(**{k: v for k, v in hparams.items() if k in accepted})
    model.load_state_dict(ckpt["state_dict"], strict=True)
    model.fitted_target_transform = meta.get("target_transform")
    model.eval()
    return model
