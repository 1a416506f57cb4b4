"""DeepPT (Hoang et al., Nature Cancer 2024), adapted to spots as in the benchmark."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hest2sge.models.base import SpotModel, prepare_batch
from hest2sge.models.layers.backbones import create_backbone
from hest2sge.registry import register_model

log = logging.getLogger(__name__)

#: Bump when the way cached features are computed changes: older files are rebuilt.
FEATURE_CACHE_VERSION = 1


class _Member(nn.Module):
    """Autoencoder (D -> bottleneck -> D) and MLP regressor (bottleneck -> hidden -> G)."""

    def __init__(self, dim: int, bottleneck: int, hidden: int, n_genes: int,
                 dropout: float) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, bottleneck), nn.ReLU())
        self.decoder = nn.Linear(bottleneck, dim)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(bottleneck, hidden), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, n_genes))

    def forward(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encoder(feat)
        return self.mlp(z), self.decoder(z)


def dihedral(img: Tensor, view: int) -> Tensor:
    """View ``0..7`` of the dihedral group on the last two dims (``view >= 4``: flipped)."""
    if view >= 4:
        img = img.flip(-1)
    return torch.rot90(img, view % 4, dims=(-2, -1)) if view % 4 else img


@register_model("deeppt")
class DeepPT(SpotModel):
    """DeepPT: ImageNet ResNet-50 features -> autoencoder -> MLP, one patch per spot.

    Hoang, D.-T. et al. A deep-learning framework to predict cancer treatment response from
    histopathology images through imputed transcriptomics. Nature Cancer 5, 1305-1317 (2024).
    No public code; architecture from the paper (Extended Data Fig. 1) and the benchmark.

    Takes one 224 px patch per spot (spot mode). Paper configuration: ResNet-50 pretrained on
    ImageNet as a frozen feature extractor (2048-d pooled features); autoencoder
    2048 -> 512 (ReLU) -> 2048; MLP 512 -> 512 (ReLU) -> G with dropout 0.2 before each
    linear layer; loss MSE(prediction, target) + ``recon_weight`` x MSE(reconstruction,
    features), trained jointly; targets are untransformed counts (``"raw"``: the benchmark
    fitted DeepPT to the original expression); batch 32, at most 500 epochs, rotations.
    ``ensemble=5`` averages 5 members (the original's bagging ensemble).

    Parameter count (:meth:`count_parameters`): like Table 1 (26 M) it includes the frozen
    ResNet-50 trunk: 23.51 M trunk + 2.10 M autoencoder + 0.67 M MLP (785 genes) = 26.27 M.
    Only the autoencoder and MLP (2.77 M per member) are trained with the default frozen
    trunk; ``freeze_backbone=False`` fine-tunes the trunk end to end (same count).

    Feature cache: with a frozen trunk the features of every patch are computed once per
    slide, patch size, backbone and weights, before the first epoch, and stored beside the
    patch cache in ``dm.cache_dir`` (HDF5 ``<patch cache>.deeppt-<backbone>-<hash>-x<V>.h5``,
    written atomically with a fingerprint of the patches, the backbone weights, the pixel
    normalisation and V). Cached features are of UN-augmented patches: to keep the rotation
    augmentation honest, training slides are cached in all ``cache_views`` dihedral views
    (8 = the data module's flips and 90 degree rotations) and each training step draws one
    view per spot at random (the loader's own augmentation of the image is then not used);
    validation slides use the identity view. With ``cache_dir=None`` features stay in memory.
    Slides outside the cache (test, ``hest2sge.predict``) run the backbone.

    Deliberate differences from the original (unknowns resolved here):
      * Optimiser, learning rate, whether the autoencoder is trained first, the activations
        and the dropout placement are not published: Adam lr 1e-4, joint training with the
        reconstruction term, ReLU, dropout before each MLP linear layer.
      * Ensemble members share the trunk and are trained together on the same batches (each
        with its own initialisation, dropout and loss) instead of on 5 internal
        train/validation splits; the prediction is their mean.
      * One patch per spot (the benchmark's adaptation) instead of whole-slide tiles and
        bulk tumour expression.

    Args:
        genes: Gene panel.
        n_genes: Number of genes when names are unknown.
        backbone: timm model name of the feature extractor.
        pretrained: ``True`` (ImageNet from the hub, or the local Hugging Face cache),
            ``False`` or a local weights file (loaded strictly; see
            :func:`~hest2sge.models.layers.backbones.create_backbone`).
        backbone_kwargs: Further ``timm.create_model`` arguments of the backbone, e.g.
            ``{"init_values": 1e-5, "dynamic_img_size": True}`` for a UNI-style ViT.
        freeze_backbone: Use the trunk as a fixed feature extractor (paper) or fine-tune it.
        patch_size: Patch side in pixels.
        bottleneck: Autoencoder bottleneck width.
        hidden: MLP hidden width.
        dropout: MLP dropout.
        recon_weight: Weight of the autoencoder reconstruction loss.
        ensemble: Number of averaged members.
        cache_features: Train from cached trunk features when the trunk is frozen.
        cache_views: Dihedral views cached for training slides (1, 2, 4 or 8).
        optimizer, lr, weight_decay, scheduler: Optimiser (not published: Adam, lr 1e-4).
        **kwargs: Further :class:`SpotModel` arguments.
    """

    paper = "Hoang et al., Nature Cancer 2024 (DeepPT)"
    paper_parameters = 26e6
    input_mode = "spot"
    default_target_transform = {"kind": "raw"}
    tiny_config = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32,
                   "bottleneck": 16, "hidden": 16, "cache_views": 2}

    def __init__(
        self,
        genes: Sequence[str] | None = None,
        n_genes: int | None = None,
        backbone: str = "resnet50.tv_in1k",
        pretrained: bool | str | os.PathLike = True,
        backbone_kwargs: dict[str, Any] | None = None,
        freeze_backbone: bool = True,
        patch_size: int = 224,
        bottleneck: int = 512,
        hidden: int = 512,
        dropout: float = 0.2,
        recon_weight: float = 1.0,
        ensemble: int = 1,
        cache_features: bool = True,
        cache_views: int = 8,
        optimizer: str = "adam",
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size,
                         optimizer=optimizer, lr=lr, weight_decay=weight_decay,
                         scheduler=scheduler, **kwargs)
        if int(ensemble) < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        if int(cache_views) not in (1, 2, 4, 8):
            raise ValueError(f"cache_views must be 1, 2, 4 or 8, got {cache_views}")
        self.backbone = create_backbone(backbone, pretrained, **(backbone_kwargs or {}))
        self.frozen = bool(freeze_backbone)
        if self.frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        dim = int(self.backbone.num_features)
        self.members = nn.ModuleList(
            _Member(dim, bottleneck, hidden, self.n_genes, dropout) for _ in range(int(ensemble))
        )
        self._features: dict[int, Tensor] = {}  # slide index -> (views, spots, dim), CPU
        self._feature_ids: list[str] = []  # slide ids of the data module the indices refer to
        self._pending_dm: Any = None

    # ------------------------------------------------------------------ model
    def count_parameters(self, trainable_only: bool = True) -> int:
        """Trunk + autoencoder + MLP, as Table 1 counts (also when the trunk is frozen)."""
        return sum(p.numel() for p in self.parameters())

    def train(self, mode: bool = True) -> DeepPT:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a fixed extractor: BatchNorm statistics stay ImageNet's
        return self

    def extract_features(self, img: Tensor) -> Tensor:
        """Trunk features (B, D) of a float image batch in [0, 1]."""
        x = self.normalize_img(img)
        if self.frozen:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        feat = self._cached_features(batch)
        if feat is None:
            feat = self.extract_features(batch["img"])
        outs = [m(feat) for m in self.members]
        member_pred = torch.stack([o[0] for o in outs])
        return {"pred": member_pred.mean(0), "member_pred": member_pred,
                "recon": torch.stack([o[1] for o in outs]), "feat": feat}

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """MSE of every member's prediction + weighted autoencoder reconstruction MSE."""
        target = batch["expr"].unsqueeze(0).expand_as(out["member_pred"])
        mse = F.mse_loss(out["member_pred"], target)
        recon = F.mse_loss(out["recon"], out["feat"].detach().unsqueeze(0).expand_as(out["recon"]))
        return {"loss": mse + self.hparams.recon_weight * recon, "mse": mse, "recon": recon}

    # ------------------------------------------------------------------ feature cache
    def on_datamodule(self, datamodule: Any) -> None:
        """Remember the data module: features are extracted in ``on_fit_start`` (on device)."""
        self._features, self._feature_ids = {}, []
        if self.frozen and self.hparams.cache_features and hasattr(datamodule, "table"):
            self._pending_dm = datamodule

    def on_fit_start(self) -> None:
        dm, self._pending_dm = self._pending_dm, None
        if dm is None:
            return
        views = int(self.hparams.cache_views) if getattr(dm, "augment", False) else 1
        self._feature_ids = list(dm.slide_ids)
        for role, v in (("train", views), ("val", 1)):
            for sid in dm._ids(role):
                self._features[dm.slide_ids.index(sid)] = self.slide_features(dm, sid, v)

    def _cached_features(self, batch: dict[str, Tensor]) -> Tensor | None:
        if not self._features or "slide" not in batch or "spot" not in batch:
            return None
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is not None and list(getattr(dm, "slide_ids", [])) != self._feature_ids:
            return None  # another data module: its slide indices mean other slides
        slide, spot = batch["slide"].cpu(), batch["spot"].cpu()
        uniq = [int(s) for s in torch.unique(slide)]
        if any(s not in self._features for s in uniq):
            return None
        feat = torch.empty(len(slide), self._features[uniq[0]].shape[-1])
        for s in uniq:
            table, rows = self._features[s], (slide == s).nonzero().ravel()
            view = (torch.randint(0, table.shape[0], (len(rows),)) if self.training
                    else torch.zeros(len(rows), dtype=torch.long))
            feat[rows] = table[view, spot[rows]]
        return feat.to(self.pixel_mean.device)

    def _fingerprint(self, patch_fp: str, views: int) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(repr(("deeppt-features", FEATURE_CACHE_VERSION, self.hparams.backbone, views,
                       self.pixel_mean.flatten().tolist(), self.pixel_std.flatten().tolist(),
                       patch_fp)).encode())
        for k, v in self.backbone.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def slide_features(self, dm: Any, slide_id: str, views: int = 1) -> Tensor:
        """Trunk features (views, spots, D) of a data-module slide, from the cache file when
        it is valid, else computed (and written when ``dm.cache_dir`` is set)."""
        from hest2sge.data.patches import cache_file_name, patch_fingerprint

        store = dm.table(slide_id).patches
        slide = dm._by_id[slide_id]
        fp = self._fingerprint(patch_fingerprint(slide, self.patch_size, dm.pixel_size_um), views)
        path = None
        if dm.cache_dir is not None:
            stem = cache_file_name(slide_id, self.patch_size, dm.pixel_size_um)[: -len(".h5")]
            path = Path(dm.cache_dir) / f"{stem}.deeppt-{self.hparams.backbone}-{fp[:12]}-x{views}.h5"
            feats = _read_features(path, fp, len(store), views)
            if feats is not None:
                log.debug("DeepPT feature cache hit: %s", path)
                return feats
        feats = self._compute_features(store, views)
        if path is not None:
            _write_features(path, feats, fp)
        return feats

    @torch.no_grad()
    def _compute_features(self, store: Any, views: int, batch_size: int = 64) -> Tensor:
        was = self.backbone.training
        self.backbone.eval()
        dev = self.pixel_mean.device
        out = []
        try:
            for v in range(views):
                chunks = []
                for start in range(0, len(store), batch_size):
                    idx = np.arange(start, min(start + batch_size, len(store)))
                    img = torch.from_numpy(np.ascontiguousarray(store.get_many(idx)))
                    img = prepare_batch({"img": img.permute(0, 3, 1, 2).to(dev)})["img"]
                    chunks.append(self.extract_features(dihedral(img, v)).float().cpu())
                out.append(torch.cat(chunks) if chunks else torch.zeros(
                    0, self.backbone.num_features))
        finally:
            self.backbone.train(was)
        return torch.stack(out)


def _read_features(path: Path, fingerprint: str, n: int, views: int) -> Tensor | None:
    import h5py

    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            ok = (f.attrs.get("fingerprint") == fingerprint and bool(f.attrs.get("complete"))
                  and f["features"].shape[:2] == (views, n))
            return torch.from_numpy(f["features"][()]) if ok else None
    except Exception as err:  # unreadable: recompute and overwrite
        log.warning("DeepPT feature cache %s is unreadable (%s); recomputing", path, err)
        return None


def _write_features(path: Path, feats: Tensor, fingerprint: str) -> None:
    """Write atomically: temporary file in the same folder, then rename into place."""
    import h5py

    from hest2sge.data.patches import _temp_path

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = "hest2sge.deeppt_features"
            f.attrs["fingerprint"] = fingerprint
            f.attrs["complete"] = False
            f.create_dataset("features", data=feats.numpy())
            f.attrs["complete"] = True
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
