"""The configuration record: one declarative record per model of its paper training settings.

Each :class:`ModelRecord` holds the constructor arguments of the paper configuration (which
the model's ``__init__`` signature repeats as its defaults; a test keeps them equal), the
trainer and data-module settings (epochs, batch, checkpoint selection, early stopping,
augmentation), the target transform and, for every setting, where it comes from. The record
is the one truth read by :func:`hest2sge.load`, the shipped YAML configs
(``examples/configs/<name>.yaml``, checked against it by the tests), :func:`hest2sge.model_info`,
``hest2sge models`` and the benchmark runner.

``from_scratch`` carries model-argument overrides that train from random initialisation for
models whose paper settings assume pretrained weights; building such a model with
``pretrained=False`` warns once and names them.

Example::

    from hest2sge.models.configs import get_record
    rec = get_record("stnet")
    model = hest2sge.load("stnet", genes=dm.genes)            # == rec.model + genes
    trainer = pl.Trainer(**rec.trainer_kwargs(), callbacks=rec.callbacks())
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: Where the benchmark protocol itself is written down (checkpoint selection for all models).
_PROTOCOL = "paper Methods (evaluation): best epoch by validation PCC within each fold"


class _ReadOnlyDict(dict):
    """A dict that refuses mutation (records are shared; copy with ``dict(...)`` to change)
    and still pickles (records travel to benchmark worker processes)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("a configuration record is read-only; copy it with dict(...) first")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]
    __ior__ = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple:
        return (_ReadOnlyDict, (dict(self),))


def _frozen(d: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return _ReadOnlyDict(d or {})


@dataclass(frozen=True)
class ModelRecord:
    """The paper configuration of one registered model.

    Attributes:
        name: Registry name.
        model: Constructor keyword arguments of the paper configuration (optimizer, lr,
            weight_decay, momentum, scheduler and its settings, patch_size, backbone / weight
            tag, normalize, ...). The class signature's defaults agree with them.
        max_epochs: Paper training epochs.
        batch_size: Spots per batch; ``None`` means one slide per batch (slide-mode models).
        monitor: ``"val/pcc"`` (keep the best epoch by validation PCC) or ``None`` (keep the
            last epoch).
        monitor_mode: ``"max"`` or ``"min"``.
        early_stopping: ``EarlyStopping`` keyword arguments, or ``None``.
        augment: Whether the data module's flips/rotations apply to training patches.
        target_transform: The paper's target transform spec.
        sources: Setting name -> its source (the paper's Methods, the original code or repository).
        from_scratch: Model-argument overrides that train from random initialisation (named
            by the warning when ``pretrained=False``); empty when the paper settings need no
            pretrained weights.
    """

    name: str
    model: Mapping[str, Any]
    max_epochs: int
    batch_size: int | None
    monitor: str | None = "val/pcc"
    monitor_mode: str = "max"
    early_stopping: Mapping[str, Any] | None = None
    augment: bool = True
    target_transform: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))
    sources: Mapping[str, str] = field(default_factory=lambda: _frozen({}))
    from_scratch: Mapping[str, Any] = field(default_factory=lambda: _frozen({}))

    def __post_init__(self) -> None:
        if self.monitor_mode not in ("max", "min"):
            raise ValueError(f"monitor_mode must be 'max' or 'min', got {self.monitor_mode!r}")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        for name in ("model", "target_transform", "sources", "from_scratch"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        if self.early_stopping is not None:
            object.__setattr__(self, "early_stopping", _frozen(self.early_stopping))

    # ------------------------------------------------------------------ derived settings
    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``lightning.pytorch.Trainer`` (``{"max_epochs": ...}``)."""
        return {"max_epochs": int(self.max_epochs)}

    def datamodule_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~hest2sge.data.SpotDataModule` (``augment`` and, for
        spot-batched models, ``batch_size``)."""
        out: dict[str, Any] = {"augment": bool(self.augment)}
        if self.batch_size is not None:
            out["batch_size"] = int(self.batch_size)
        return out

    def checkpoint_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the ``ModelCheckpoint`` that keeps the paper's epoch."""
        if self.monitor is None:
            return {"save_last": True}
        return {"monitor": self.monitor, "mode": self.monitor_mode, "save_last": True}

    def callbacks(self, metrics: bool = True) -> list:
        """``[SpotMetrics(), ModelCheckpoint(...), EarlyStopping(...)?]`` of the paper policy.

        Args:
            metrics: Include a :class:`~hest2sge.SpotMetrics` (it logs ``val/pcc``).
        """
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        from hest2sge.metrics.callback import SpotMetrics

        cbs: list = [SpotMetrics()] if metrics else []
        cbs.append(ModelCheckpoint(**self.checkpoint_kwargs()))
        if self.early_stopping is not None:
            cbs.append(EarlyStopping(**dict(self.early_stopping)))
        return cbs

    def training_summary(self) -> dict[str, Any]:
        """Flat dict of the training settings (for ``model_info`` and ``hest2sge models``)."""
        m = self.model
        return {
            "optimizer": m.get("optimizer"),
            "lr": m.get("lr"),
            "weight_decay": m.get("weight_decay"),
            "scheduler": m.get("scheduler"),
            "max_epochs": self.max_epochs,
            "batch_size": self.batch_size,
            "checkpoint": (f"best {self.monitor} ({self.monitor_mode})" if self.monitor
                           else "last epoch"),
            "early_stopping": dict(self.early_stopping) if self.early_stopping else None,
            "augment": self.augment,
            "target_transform": dict(self.target_transform),
            "pretrained": m.get("pretrained", False),
            "weights": m.get("backbone", m.get("extractor")),
        }


# ---------------------------------------------------------------------- the eleven records
_ADAM = {"optimizer": "adam", "weight_decay": 0.0, "scheduler": None}

_RECORDS: dict[str, ModelRecord] = {}


def _add(rec: ModelRecord) -> None:
    _RECORDS[rec.name] = rec


_add(ModelRecord(
    name="stnet",
    model={"backbone": "densenet121.tv_in1k", "pretrained": True, "patch_size": 224,
           "optimizer": "sgd", "lr": 1e-6, "momentum": 0.9, "weight_decay": 0.0,
           "scheduler": None, "normalize": "imagenet", "loss_reduction": "sum"},
    max_epochs=50, batch_size=32, monitor="val/pcc", augment=True,
    target_transform={"kind": "stnet"},
    sources={
        "backbone": "original ST-Net repository: torchvision DenseNet-121, ImageNet-pretrained "
                    "(README --model densenet121 --pretrain); timm tag densenet121.tv_in1k = "
                    "the torchvision weights",
        "optimizer": "original ST-Net repository: SGD, momentum 0.9, weight decay 0 (stnet/parser.py)",
        "lr": "original ST-Net repository: lr 1e-6 (README run; parser default 1e-5)",
        "max_epochs": "paper Methods (ST-Net): 50 epochs; original repository README",
        "batch_size": "paper Methods (ST-Net): batch size 32",
        "monitor": _PROTOCOL + " (the original picks the epoch by an inner 4-fold CV)",
        "augment": "paper Methods (ST-Net): rotations and flips; original code: h/v flips, rot90",
        "target_transform": "original ST-Net repository: ln((1 + c) / (n_genes_all + total)) "
                            "(stnet/datasets/spatial.py)",
        "loss_reduction": "original ST-Net repository: squared error summed over the batch / n_genes "
                          "(stnet/cmd/run_spatial.py)",
        "patch_size": "paper Methods (ST-Net): 224 x 224 px patches",
        "normalize": "hest2sge: ImageNet statistics of the pretrained trunk (the original "
                     "estimates them from the first training batches)",
        "from_scratch": "hest2sge demo (hest2sge/demo.py): ST-Net from random init on "
                        "synthetic slides trains with Adam lr 1e-3, mean-reduced loss; the "
                        "paper's SGD lr 1e-6 leaves the loss flat without ImageNet weights "
                        "(measured: benchmarks/config_checks.py)",
    },
    from_scratch={"optimizer": "adam", "lr": 1e-3, "loss_reduction": "mean"},
))

_add(ModelRecord(
    name="histogene",
    model={"patch_size": 224, "dim": 1024, "n_layers": 8, "heads": 16, "dropout": 0.1,
           **_ADAM, "lr": 1e-5, "normalize": "imagenet"},
    max_epochs=100, batch_size=None, monitor=None, augment=False,
    target_transform={"kind": "log_norm"},
    sources={
        "lr": "original HisToGene repository: Adam lr 1e-5, no weight decay, no scheduler "
              "(tutorial.ipynb)",
        "optimizer": "original HisToGene repository: Adam (tutorial.ipynb)",
        "max_epochs": "paper Methods (HisToGene): 100 epochs",
        "monitor": "paper Methods (HisToGene): 'The final model used was the model after all "
                   "epochs, as per the HisToGene pipeline' (last epoch)",
        "batch_size": "original HisToGene repository: one slide per step (DataLoader batch_size=1)",
        "augment": "original HisToGene repository: no augmentation for the ViT datasets",
        "n_layers": "paper Methods (HisToGene): 8 attention layers, 16 heads, dropout 0.1",
        "patch_size": "paper Methods (data): 224 x 224 px patches (112 in the original)",
        "target_transform": "original HisToGene repository: scprep log10(1 + 1e4 c / panel sum)",
        "normalize": "hest2sge: pixels in [0, 1], ImageNet statistics (original: raw 0-255)",
    },
))

_add(ModelRecord(
    name="hist2st",
    model={"patch_size": 224, "channel": 16, **_ADAM, "lr": 1e-5, "scheduler": "step",
           "scheduler_step": 50, "scheduler_gamma": 0.9, "zinb_weight": 0.25,
           "distill_weight": 0.5, "distill_views": 5, "normalize": "imagenet"},
    max_epochs=350, batch_size=None, monitor="val/pcc", augment=False,
    target_transform={"kind": "log_norm"},
    sources={
        "optimizer": "original Hist2ST repository: Adam lr 1e-5 (HIST2ST_train.py)",
        "lr": "paper Methods (Hist2ST): default parameters of the original paper; original code: "
              "Adam lr 1e-5",
        "scheduler": "original Hist2ST repository: StepLR(step_size 50 epochs, gamma 0.9) "
                     "(HIST2ST_train.py)",
        "max_epochs": "paper Methods (Hist2ST): 350 epochs",
        "batch_size": "paper Methods (Hist2ST): batch size of 1 (one slide)",
        "monitor": _PROTOCOL + " (the original keeps the last epoch)",
        "augment": "original Hist2ST repository: augmentations only inside the self-distillation views "
                   "(the model draws them), none on the loader",
        "patch_size": "paper Methods (Hist2ST): 224 px patches and 16 channels in the "
                      "benchmark (original 112 px, 32 channels)",
        "zinb_weight": "original Hist2ST repository: loss MSE + 0.25 ZINB + 0.5 distillation (5 views)",
        "target_transform": "original Hist2ST repository: scprep log10(1 + 1e4 c / panel sum) + raw "
                            "counts for ZINB",
        "normalize": "hest2sge: pixels in [0, 1], ImageNet statistics (original: raw 0-255)",
    },
))

_add(ModelRecord(
    name="thitogene",
    model={"patch_size": 112, "n_layers": 4, "heads": [16, 8], "caps": 20, "route_dim": 64,
           **_ADAM, "lr": 1e-5, "normalize": "imagenet"},
    max_epochs=200, batch_size=None, monitor="val/pcc", augment=False,
    target_transform={"kind": "log_norm"},
    sources={
        "optimizer": "paper Methods (THItoGene): Adam; original code: no scheduler, no weight "
                     "decay (train.py)",
        "lr": "paper Methods (THItoGene): learning rate 1e-5",
        "max_epochs": "paper Methods (THItoGene): up to 200 epochs (README; train.py 300)",
        "batch_size": "paper Methods (THItoGene): batch size of 1 (one slide)",
        "monitor": _PROTOCOL + " (the original keeps the last epoch)",
        "augment": "original THItoGene repository: no augmentation (transform defined but unused)",
        "patch_size": "paper Methods (THItoGene): 112 x 112 px patches",
        "heads": "paper Methods (THItoGene): capsules 20 x 64, heads [16, 8], 4 blocks",
        "target_transform": "original THItoGene repository: scprep log10(1 + 1e4 c / panel sum)",
        "normalize": "hest2sge: pixels in [0, 1], ImageNet statistics (original: raw 0-255)",
    },
))

_add(ModelRecord(
    name="egnv1",
    model={"extractor": "resnet50.tv_in1k", "pretrained": True, "patch_size": 224,
           "n_exemplars": 9, "optimizer": "adamw", "lr": 5e-5, "weight_decay": 1e-4,
           "scheduler": "cosine", "normalize": "imagenet", "pcc_weight": 0.5},
    max_epochs=50, batch_size=32, monitor="val/pcc", augment=False,
    target_transform={"kind": "log_minmax", "base": 10},
    sources={
        "extractor": "original EGN v1 repository: frozen torchvision ResNet-50 ImageNet for retrieval "
                     "(v1/build_exemplar.py); timm tag resnet50.tv_in1k",
        "optimizer": "original EGN v1 repository: AdamW, weight decay 1e-4 (v1/main.py)",
        "lr": "paper Methods (EGNv1): learning rate 5e-5 with a cosine annealing scheduler "
              "and weight decay 1e-4",
        "scheduler": "paper Methods (EGNv1): cosine annealing",
        "max_epochs": "paper Methods (EGNv1): 50 epochs",
        "batch_size": "paper Methods (EGNv1): batch size 32",
        "monitor": _PROTOCOL,
        "augment": "original EGN v1 repository: no augmentation",
        "n_exemplars": "paper Methods (EGNv1): 9 nearest exemplars",
        "patch_size": "paper Methods (EGNv1): input 224 x 224 (original 256)",
        "pcc_weight": "original EGN v1 repository: MSE + 0.5 (1 - batch PCC) (v1/train.py)",
        "target_transform": "original EGN v1 repository: log10(1 + c), min-max from training slides",
        "normalize": "hest2sge: ImageNet statistics (original: its slides' statistics)",
        "from_scratch": "the ViT is trained from scratch in the paper; without ImageNet "
                        "weights only the exemplar retrieval degrades (random features), so "
                        "no override",
    },
))

_add(ModelRecord(
    name="egnv2",
    model={"extractor": "resnet18.tv_in1k", "pretrained": True, "patch_size": 224,
           "hidden": 512, "num_layers": 4, "n_exemplars": 9, "optimizer": "adamw",
           "lr": 5e-4, "weight_decay": 1e-4, "scheduler": "cosine", "normalize": "imagenet",
           "pcc_weight": 0.5},
    max_epochs=50, batch_size=None, monitor="val/pcc", augment=False,
    target_transform={"kind": "log_minmax", "base": 10},
    sources={
        "extractor": "original EGGN repository: frozen torchvision ResNet-18 ImageNet (512-d) "
                     "(v2/build_exemplar.py); timm tag resnet18.tv_in1k",
        "optimizer": "original EGGN repository: AdamW, weight decay 1e-4 (v2/main.py)",
        "lr": "paper Methods (EGNv2): learning rate 5e-4 with a cosine annealing scheduler "
              "and weight decay 1e-4",
        "scheduler": "paper Methods (EGNv2): cosine annealing (the original: constant)",
        "max_epochs": "paper Methods (EGNv2): 50 epochs for HER2+ (300 for cSCC)",
        "batch_size": "paper Methods (EGNv2): batch size of 1 (one slide graph)",
        "monitor": _PROTOCOL,
        "augment": "original EGGN repository: no augmentation",
        "hidden": "paper Methods (EGNv2): GraphSAGE, 512 hidden, 4 layers",
        "patch_size": "paper Methods (EGNv2): input 224 x 224 (original 256)",
        "pcc_weight": "original EGGN repository: MSE + 0.5 (1 - PCC) (v2/train.py)",
        "target_transform": "original EGGN repository: log10(1 + c), min-max from training slides",
        "normalize": "hest2sge: ImageNet statistics (original: (x - 0.5) / 0.5)",
        "from_scratch": "only the frozen retrieval extractor is pretrained; the graph network "
                        "trains from random init in the paper, so no override",
    },
))

_add(ModelRecord(
    name="tcgn",
    model={"variant": "ti", "pretrained": True, "patch_size": 112, "img_size": 224,
           "top_k": 4, **_ADAM, "lr": 1e-5, "normalize": "imagenet"},
    max_epochs=80, batch_size=32, monitor="val/pcc", augment=True,
    target_transform={"kind": "log_norm"},
    sources={
        "variant": "paper Methods (TCGN): CMT blocks with the default parameters of CMT-Ti; "
                   "original code: cmt_tiny.pth ImageNet weights of ggjy/CMT.pytorch",
        "optimizer": "paper Methods (TCGN): Adam, betas 0.9/0.999; original code: weight decay 0",
        "lr": "original TCGN repository: Adam lr 1e-5 (train.py)",
        "max_epochs": "paper Methods (TCGN): up to 80 epochs (train.py range(1, 80))",
        "batch_size": "paper Methods (TCGN): batch size 32",
        "monitor": _PROTOCOL,
        "augment": "original TCGN repository: RandomRotation(180) + h/v flips (loader flips + the "
                   "model's own rotation)",
        "patch_size": "paper Methods (TCGN): 112 x 112 px input, resized to 224",
        "top_k": "paper Methods (TCGN): top-k of 4",
        "target_transform": "original TCGN repository: scprep log10(1 + 1e4 c / panel sum)",
        "normalize": "original TCGN repository: /255 then ImageNet mean/std",
        "from_scratch": "hest2sge (not measured): without CMT-Ti ImageNet weights, Adam 1e-4 "
                        "instead of the fine-tuning rate 1e-5",
    },
    from_scratch={"lr": 1e-4},
))

_add(ModelRecord(
    name="deepspace",
    model={"backbone": "vgg16.tv_in1k", "pretrained": True, "patch_size": 224,
           "optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "scheduler": None,
           "augment": "flip,crop,color,random", "normalize": "imagenet"},
    max_epochs=50, batch_size=128, monitor="val/pcc", augment=False,
    early_stopping={"monitor": "val/loss", "mode": "min", "patience": 5},
    target_transform={"kind": "sct", "library": "all"},
    sources={
        "backbone": "paper Methods (DeepSpaCE): VGG16 backbone; original code: ImageNet "
                    "torchvision VGG16 (DeepSpaceLib.py make_model); timm tag vgg16.tv_in1k",
        "optimizer": "original DeepSpaCE repository: Adam lr 1e-4, weight decay 1e-4",
        "lr": "paper Methods (DeepSpaCE): learning rate and weight decay of the original "
              "(original code: 1e-4 / 1e-4)",
        "max_epochs": "paper Methods (DeepSpaCE): at most 50 epochs",
        "early_stopping": "paper Methods (DeepSpaCE): stop when no improvement within 5 "
                          "epochs (validation loss, original code)",
        "monitor": "paper Methods (DeepSpaCE): the model with the highest validation "
                   "correlation",
        "batch_size": "original DeepSpaCE repository: batch 128 x number of GPUs (original code; the "
                      "benchmark does not state it)",
        "augment": "original DeepSpaCE repository: flip,crop,color,random families, applied by the "
                   "model itself (loader flips off)",
        "target_transform": "original DeepSpaCE repository: SCTransform counts -> log10(1 + x) -> "
                            "min-max",
        "normalize": "original DeepSpaCE repository: ImageNet mean/std (BasicLib.py)",
        "patch_size": "paper Methods (data): 224 x 224 px (original: 376 px resized to 224)",
        "from_scratch": "hest2sge: the paper's Adam 1e-4 also trains VGG16 from random init; "
                        "no override",
    },
))

_add(ModelRecord(
    name="deeppt",
    model={"backbone": "resnet50.tv_in1k", "pretrained": True, "freeze_backbone": True,
           "patch_size": 224, "bottleneck": 512, "hidden": 512, "dropout": 0.2,
           **_ADAM, "lr": 1e-4, "normalize": "imagenet"},
    max_epochs=500, batch_size=32, monitor="val/pcc", augment=True,
    target_transform={"kind": "raw"},
    sources={
        "backbone": "paper Methods (DeepPT): ResNet-50 pretrained on ImageNet (2048-d); "
                    "timm tag resnet50.tv_in1k = the torchvision weights",
        "optimizer": "hest2sge: not published (original DeepPT repository: optimiser unknown); Adam",
        "lr": "hest2sge: not published (original DeepPT repository: learning rate unknown); 1e-4",
        "max_epochs": "paper Methods (DeepPT): a maximum of 500 epochs",
        "batch_size": "paper Methods (DeepPT): batch size 32",
        "dropout": "paper Methods (DeepPT): dropout 0.2",
        "monitor": _PROTOCOL,
        "augment": "paper Methods (DeepPT): rotations during training",
        "freeze_backbone": "original DeepPT repository: a feature extractor (whether it is fine-tuned "
                           "is not published)",
        "target_transform": "original DeepPT repository: original (untransformed) expression "
                            "(HEtoSGEBench 00-CombineDat.Rmd)",
        "normalize": "hest2sge: ImageNet statistics of the pretrained trunk",
        "from_scratch": "hest2sge: a frozen random trunk is a fixed random projection; "
                        "fine-tune it instead",
    },
    from_scratch={"freeze_backbone": False},
))

_add(ModelRecord(
    name="istar",
    model={"pretrained": True, "pixel_size_um": 0.5, "token_px": 16, "region_px": 256,
           "shifts": 4, "n_states": 4, **_ADAM, "lr": 1e-4, "normalize": "half"},
    max_epochs=400, batch_size=128, monitor="val/pcc", augment=False,
    target_transform={"kind": "minmax"},
    sources={
        "pretrained": "original iStar repository: frozen HIPT DINO checkpoints vit256_small_dino.pth, "
                      "vit4k_xs_dino.pth (download_checkpoints.sh)",
        "optimizer": "paper Methods (iStar): Adam",
        "lr": "original iStar repository: Adam lr 1e-4 (impute.py)",
        "max_epochs": "paper Methods (iStar): 400 epochs",
        "batch_size": "original iStar repository: batch min(128, n_spots // 16) (impute.py): 128 on "
                      "multi-section training sets",
        "monitor": _PROTOCOL,
        "augment": "original iStar repository: no augmentation",
        "pixel_size_um": "paper Methods (iStar): images rescaled to 0.5 um per pixel, 16 px "
                         "superpixels, 579 features",
        "n_states": "Table 1 (2.19 M = 4 MLPs at 785 genes); the original's default is 5",
        "normalize": "original iStar repository: /255 then mean 0.5, std 0.5 (HIPT input)",
        "target_transform": "paper Methods (iStar): expression normalised to [0, 1] (raw "
                            "counts, min-max)",
        "from_scratch": "the encoder is frozen, so it cannot be trained from scratch here; "
                        "without HIPT weights the features are random",
    },
))

_add(ModelRecord(
    name="genecoder",
    model={"patch_size": 224, "i_dim": 500, "j_dim": 500, "max_iter": 20, "tol": 5.0,
           "learn_rate": 0.1, "solver": "lstsq"},
    max_epochs=1, batch_size=64, monitor=None, augment=False,
    target_transform={"kind": "raw"},
    sources={
        "i_dim": "paper Methods (GeneCodeR): i_dim = j_dim = 500, max iterations 20, "
                 "tolerance 5, learning rate 0.1, batch size 500 (one latent block)",
        "max_epochs": "hest2sge: closed-form fit, one pass over the training spots",
        "batch_size": "hest2sge: loader batch only (the fit sees all training spots at once)",
        "monitor": "hest2sge: one fit, nothing to select",
        "augment": "original GeneCodeR repository: un-augmented crops",
        "target_transform": "original GeneCodeR repository: raw counts",
        "patch_size": "paper Methods (data): 224 x 224 px (vignette: 30 px)",
        "solver": "hest2sge (deliberate difference, see the GeneCodeR docstring, 'Solvers'): "
                  "the published gcode coordinate descent (solver='gcode', matched to the R "
                  "code to 2e-5) returns a rank-one prediction of arbitrary sign; the "
                  "closed-form least-squares solution of the same model is the default",
    },
))


# ---------------------------------------------------------------------- the baselines
_add(ModelRecord(
    name="ridge",
    model={"backbone": "resnet50.tv_in1k", "pretrained": True, "patch_size": 224,
           "n_components": 256, "cv_folds": 5, "alpha_min": 1e-2, "alpha_max": 1e6,
           "n_alphas": 17, "normalize": "imagenet"},
    max_epochs=1, batch_size=128, monitor=None, augment=False,
    target_transform={"kind": "log_norm", "scale": 1e4, "base": "e", "library": "panel"},
    sources={
        "backbone": "hest2sge baseline: any timm/foundation encoder; ImageNet ResNet-50 "
                   "(torchvision weights) by default",
        "n_components": "HEST-Benchmark (Jaume et al. 2024): PCA to 256 dimensions, then ridge",
        "cv_folds": "hest2sge: alpha chosen by 5-fold CV over 1e-2..1e6 (HEST-Benchmark fixes "
                    "it by a formula)",
        "max_epochs": "hest2sge: closed-form fit, one pass over the training spots",
        "batch_size": "hest2sge: loader batch only (the fit sees all training spots at once)",
        "monitor": "hest2sge: one fit, nothing to select",
        "augment": "HEST-Benchmark: features of un-augmented patches",
        "target_transform": "HEST-Benchmark: log1p of normalised expression (here CP10k over "
                            "the panel)",
        "from_scratch": "hest2sge: a random encoder still gives colour/texture features; "
                        "nothing else changes",
    },
    from_scratch={"pretrained": False},
))

_add(ModelRecord(
    name="mlp",
    model={"backbone": "resnet50.tv_in1k", "pretrained": True, "patch_size": 224,
           "hidden": 256, "dropout": 0.1, "optimizer": "adam", "lr": 1e-3,
           "weight_decay": 1e-4, "scheduler": None, "normalize": "imagenet"},
    max_epochs=50, batch_size=128, monitor="val/pcc", augment=False,
    target_transform={"kind": "log_norm", "scale": 1e4, "base": "e", "library": "panel"},
    sources={
        "backbone": "hest2sge baseline: any timm/foundation encoder; ImageNet ResNet-50 "
                   "(torchvision weights) by default",
        "hidden": "hest2sge baseline: two-layer MLP, 256 hidden units, dropout 0.1",
        "optimizer": "hest2sge baseline: Adam, weight decay 1e-4",
        "lr": "hest2sge baseline: lr 1e-3 (the head only; the encoder is frozen)",
        "max_epochs": "hest2sge baseline: 50 epochs, best by validation PCC",
        "batch_size": "hest2sge baseline: 128 spots",
        "monitor": "paper Methods (evaluation): best epoch by validation PCC",
        "augment": "hest2sge: features memoised per spot, so no augmentation",
        "target_transform": "as the ridge baseline: log1p CP10k over the panel",
        "from_scratch": "hest2sge: a random encoder still gives colour/texture features; "
                        "nothing else changes",
    },
    from_scratch={"pretrained": False},
))


# ---------------------------------------------------------------------- look-up
def list_records() -> list[str]:
    """Names of the models with a record of their own (the built-in models), sorted."""
    return sorted(_RECORDS)


def default_record(name: str) -> ModelRecord:
    """The record of a registered model without one of its own: the class's own defaults,
    50 epochs, best epoch by validation PCC (so the benchmark runs user models too)."""
    from hest2sge.registry import get_model_class

    cls = get_model_class(name)
    slide = getattr(cls, "input_mode", "spot") == "slide"
    return ModelRecord(
        name=cls.model_name, model={}, max_epochs=50, batch_size=None if slide else 32,
        monitor="val/pcc", monitor_mode="max", early_stopping=None,
        augment=bool(getattr(cls, "loader_augment", True)),
        target_transform=dict(getattr(cls, "default_target_transform", {}) or {}),
        sources={"*": "default record of a model registered without one (hest2sge)"},
    )


def get_record(name: str) -> ModelRecord:
    """The configuration record of a registered model.

    Args:
        name: Registry name (case-insensitive).

    Returns:
        Its :class:`ModelRecord`; a registered model without one gets :func:`default_record`.

    Raises:
        KeyError: with the closest names when ``name`` is neither recorded nor registered.

    Example:
        >>> rec = get_record("stnet")
        >>> rec.model["optimizer"], rec.model["lr"], rec.max_epochs, rec.batch_size
        ('sgd', 1e-06, 50, 32)
        >>> get_record("histogene").monitor is None   # HisToGene keeps its last epoch
        True
    """
    key = str(name).lower()
    if key in _RECORDS:
        return _RECORDS[key]
    from hest2sge.registry import list_models

    if key in list_models():
        return default_record(key)
    known = sorted(set(_RECORDS) | set(list_models()))
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"no configuration record for model {name!r}{hint} Known: {', '.join(known)}")


# ---------------------------------------------------------------------- shipped YAML configs
def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        s = repr(v)
        mant, _, exp = s.partition("e")
        if exp and "." not in mant:
            s = f"{mant}.0e{exp}"  # YAML 1.1 reads 1e-06 as a string, 1.0e-06 as a float
        return s
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def to_yaml(name: str) -> str:
    """The LightningCLI config of a model's paper configuration, as shipped in
    ``examples/configs/<name>.yaml`` (a test checks the shipped files equal this)."""
    from hest2sge.registry import get_model_class

    rec = get_record(name)
    cls = get_model_class(name)
    out = [
        f"# hest2sge fit --config examples/configs/{rec.name}.yaml",
        f"# {cls.__name__} in its paper configuration ({getattr(cls, 'paper', '')}).",
        "# Generated from the configuration record (hest2sge/models/configs.py, where every",
        "# setting has its source) by `python -m hest2sge.models.configs --write examples/configs`:",
        "# edit the record, not this file. data.slides is the built-in synthetic set; for real",
        "# data use e.g. {reader: her2st, root: path/to/her2st} and genes: paper.",
        "seed_everything: 0",
        "trainer:",
        *(f"  {k}: {_yaml_value(v)}" for k, v in rec.trainer_kwargs().items()),
        "  accelerator: auto",
        "  devices: auto",
        "  callbacks:",
        "    - class_path: hest2sge.SpotMetrics",
    ]
    if rec.early_stopping is not None:
        out += ["    - class_path: lightning.pytorch.callbacks.EarlyStopping", "      init_args:"]
        out += [f"        {k}: {_yaml_value(v)}" for k, v in rec.early_stopping.items()]
    out += ["    - class_path: lightning.pytorch.callbacks.ModelCheckpoint", "      init_args:"]
    out += [f"        {k}: {_yaml_value(v)}" for k, v in rec.checkpoint_kwargs().items()]
    if rec.monitor is None:
        out[-1] += "        # the last epoch (paper)"
    out += ["model:", f"  class_path: {cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"]
    if rec.model:
        out.append("  init_args:")
        out += [f"    {k}: {_yaml_value(v)}" for k, v in rec.model.items()]
    out += ["data:", "  slides: synthetic", "  split:", "    k: 4", "    fold: 0",
            "  genes: all          # real data: paper (the benchmark's 785-gene rule)"]
    if rec.batch_size is None:
        out.append("  # one slide per batch (slide mode)")
    out += [f"  {k}: {_yaml_value(v)}" for k, v in rec.datamodule_kwargs().items()]
    out += ["  cache_dir: hest2sge_cache", "  num_workers: 0"]
    return "\n".join(out) + "\n"


def _main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m hest2sge.models.configs",
                                description="Print or write the YAML configs of the records.")
    p.add_argument("--write", metavar="DIR", help="write <DIR>/<model>.yaml for every record")
    p.add_argument("names", nargs="*", help="models (default: all with a record)")
    args = p.parse_args(argv)
    for name in args.names or list_records():
        text = to_yaml(name)
        if args.write:
            path = Path(args.write) / f"{name}.yaml"
            path.write_text(text)
            print(f"wrote {path}")
        else:
            print(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
