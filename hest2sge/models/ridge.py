"""Ridge baseline: frozen encoder features -> PCA -> ridge regression with a tuned alpha."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hest2sge.models.base import SpotModel
from hest2sge.models.layers.closed_form import CollectThenFit
from hest2sge.models.layers.frozen import FrozenEncoder
from hest2sge.registry import register_model


@register_model("ridge")
class RidgeBaseline(CollectThenFit, SpotModel):
    """Linear probe: frozen encoder features -> PCA (256) -> ridge, alpha by cross-validation.

    The HEST-Benchmark baseline (Jaume et al., NeurIPS 2024 Datasets & Benchmarks: PCA-256 of
    frozen patch features, then ridge regression), except that alpha is chosen by K-fold
    cross-validation on the training spots (mean squared error over all genes, grid
    ``alpha_min``..``alpha_max``) instead of a fixed formula. Not trained by gradient descent: the training
    steps collect features and targets, and the closed-form fit runs once before the first
    validation (like GeneCodeR), so it fits through the same ``Trainer.fit`` call.

    Any timm model (or a foundation model available through timm with local weights) is the
    encoder; training patches are not augmented (``loader_augment = False``), as in
    HEST-Benchmark. Targets: ln(1 + 1e4 c / panel total) (log1p CP10k).

    Args:
        genes: Gene panel. n_genes: Number of genes when names are unknown.
        backbone: timm model name of the frozen encoder (default ``"resnet50.tv_in1k"``: torchvision ImageNet weights).
        pretrained: ``True`` (hub weights), ``False`` or a local weights file.
        patch_size: Patch side in pixels.
        n_components: PCA components (at most spots - 1 and the feature width are used).
        alpha_min: Smallest ridge penalty tried.
        alpha_max: Largest ridge penalty tried.
        n_alphas: Number of penalties tried, log-spaced from ``alpha_min`` to ``alpha_max``.
        cv_folds: Folds of the alpha cross-validation.
        seed: Seed of the cross-validation folds.
        **kwargs: Further :class:`SpotModel` arguments.
    """

    paper = "HEST-Benchmark ridge baseline (Jaume et al. 2024), alpha tuned by CV"
    input_mode = "spot"
    loader_augment = False
    default_target_transform = {"kind": "log_norm", "scale": 1e4, "base": "e",
                                "library": "panel"}
    tiny_config = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32,
                   "n_components": 8, "cv_folds": 3}

    def __init__(
        self,
        genes: Sequence[str] | None = None,
        n_genes: int | None = None,
        backbone: str = "resnet50.tv_in1k",
        pretrained: bool | str | os.PathLike = True,
        patch_size: int = 224,
        n_components: int = 256,
        alpha_min: float = 1e-2,
        alpha_max: float = 1e6,
        n_alphas: int = 17,
        cv_folds: int = 5,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size, **kwargs)
        if n_components < 1 or cv_folds < 2 or n_alphas < 1 or not 0 < alpha_min <= alpha_max:
            raise ValueError("need n_components >= 1, cv_folds >= 2, n_alphas >= 1 and "
                             "0 < alpha_min <= alpha_max")
        self.encoder = FrozenEncoder(backbone, pretrained)
        d = self.encoder.num_features
        self.register_buffer("feat_mean", torch.zeros(d))
        self.register_buffer("components", torch.zeros(d, n_components))
        self.register_buffer("coef", torch.zeros(n_components, self.n_genes))
        self.register_buffer("intercept", torch.zeros(self.n_genes))
        self.register_buffer("alpha", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.automatic_optimization = False
        self.cv_mse: dict[float, float] = {}

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        f = self.encoder(self.normalize_img(batch["img"]), batch.get("slide"),
                         batch.get("spot"), memo=self.training)
        return ((f - self.feat_mean) @ self.components) @ self.coef + self.intercept

    # ------------------------------------------------------------------ Lightning plumbing
    def on_fit_start(self) -> None:
        self.encoder.clear()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if bool(self.fitted):
            return None
        self.collect(self.encoder(self.normalize_img(batch["img"])), batch["expr"])
        return None

    # ------------------------------------------------------------------ the closed-form fit
    def fit_arrays(self, feats: Tensor | np.ndarray, targets: Tensor | np.ndarray) -> RidgeBaseline:
        """Fit PCA and ridge on (spots, D) features and (spots, G) targets."""
        x = torch.as_tensor(np.asarray(feats), dtype=torch.float64)
        y = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
        if x.shape[0] != y.shape[0] or y.shape[1] != self.n_genes or x.shape[0] < 2:
            raise ValueError(f"need (n >= 2, D) features and (n, {self.n_genes}) targets; got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        mean = x.mean(0)
        xc = x - mean
        k = min(self.hparams.n_components, x.shape[0] - 1, x.shape[1])
        _, _, vh = torch.linalg.svd(xc, full_matrices=False)
        comps = vh[:k].T  # (D, k)
        z = xc @ comps
        hp = self.hparams
        alphas = [float(a) for a in np.logspace(np.log10(hp.alpha_min), np.log10(hp.alpha_max),
                                                 int(hp.n_alphas))]
        alpha = self._cv_alpha(z, y, alphas) if len(alphas) > 1 else alphas[0]
        w, b = _ridge(z, y, [alpha])[0]
        dev = self.coef.device
        self.feat_mean.copy_(mean.float().to(dev))
        self.components.zero_()
        self.components[:, :k] = comps.float().to(dev)
        self.coef.zero_()
        self.coef[:k] = w.float().to(dev)
        self.intercept.copy_(b.float().to(dev))
        self.alpha.fill_(alpha)
        self.fitted.fill_(True)
        return self

    def _cv_alpha(self, z: Tensor, y: Tensor, alphas: list[float]) -> float:
        n = z.shape[0]
        folds = min(int(self.hparams.cv_folds), n)
        g = torch.Generator().manual_seed(int(self.hparams.seed))
        parts = torch.randperm(n, generator=g).chunk(folds)
        err = torch.zeros(len(alphas), dtype=torch.float64)
        for held in parts:
            mask = torch.ones(n, dtype=torch.bool)
            mask[held] = False
            for i, (w, b) in enumerate(_ridge(z[mask], y[mask], alphas)):
                err[i] += ((z[held] @ w + b - y[held]) ** 2).sum()
        self.cv_mse = {a: float(e) / (n * y.shape[1]) for a, e in zip(alphas, err)}
        return alphas[int(torch.argmin(err))]


def _ridge(z: Tensor, y: Tensor, alphas: list[float]) -> list[tuple[Tensor, Tensor]]:
    """Ridge solutions (with intercept) for several alphas from one SVD."""
    zm, ym = z.mean(0), y.mean(0)
    u, s, vh = torch.linalg.svd(z - zm, full_matrices=False)
    uty = u.T @ (y - ym)
    out = []
    for a in alphas:
        w = vh.T @ ((s / (s * s + a))[:, None] * uty)
        out.append((w, ym - zm @ w))
    return out
