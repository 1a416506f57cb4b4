"""Optional stain / colour normalisation of H&E patches (Macenko or Reinhard, via torchstain).

One :class:`StainNormalizer` is applied identically in training (``SpotDataModule(...,
stain_norm=...)``) and in whole-slide prediction (``predict_wsi(..., stain_norm=...)``); its
fitted reference serialises to a plain dict (:meth:`StainNormalizer.to_dict`), so the same
normalisation can be stored with a model and replayed. Off by default everywhere.

* ``"macenko"`` (Macenko et al., ISBI 2009): stain vectors and 99th-percentile concentrations
  of each patch are mapped to the reference's. Without a fitted target the reference is the
  original implementation's H&E matrix and maximal concentrations (torchstain's defaults).
* ``"reinhard"`` (Reinhard et al., 2001): per-channel mean and standard deviation in LAB are
  matched to those of a target image; a target is required.

A patch with too little stained tissue for the Macenko estimate (e.g. blank glass) is left
unchanged; :attr:`StainNormalizer.n_unchanged` counts them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

METHODS = ("macenko", "reinhard")


class StainNormalizer:
    """Macenko or Reinhard normalisation of uint8 RGB patches.

    Args:
        method: ``"macenko"`` or ``"reinhard"``.
        target: A reference uint8 (H, W, 3) image to fit on (required for Reinhard).
        io: Transmitted light intensity (Macenko).
        alpha: Angle percentile (Macenko).
        beta: Optical-density threshold of transparent pixels (Macenko).
    """

    def __init__(self, method: str = "macenko", target: np.ndarray | None = None,
                 io: float = 240.0, alpha: float = 1.0, beta: float = 0.15) -> None:
        if method not in METHODS:
            raise ValueError(f"stain normalisation method must be one of {METHODS}, got {method!r}")
        self.method = method
        self.io, self.alpha, self.beta = float(io), float(alpha), float(beta)
        self.n_unchanged = 0
        self._norm = _make(method)
        self.fitted = False
        if target is not None:
            self.fit(target)
        elif method == "reinhard":
            raise ValueError("Reinhard normalisation needs a target image: "
                             "StainNormalizer('reinhard', target=<uint8 H x W x 3>)")

    def fit(self, target: np.ndarray) -> StainNormalizer:
        """Fit the reference on a uint8 (H, W, 3) image."""
        t = _chw(np.asarray(target))
        if self.method == "macenko":
            self._norm.fit(t, Io=self.io, alpha=self.alpha, beta=self.beta)
        else:
            self._norm.fit(t)
        self.fitted = True
        return self

    def normalize(self, img: np.ndarray) -> np.ndarray:
        """Normalise one uint8 (H, W, 3) patch."""
        import torch

        t = _chw(img)
        if self.method == "macenko":
            try:
                out, _, _ = self._norm.normalize(t, Io=self.io, alpha=self.alpha,
                                                 beta=self.beta, stains=False)
            except (RuntimeError, IndexError, ValueError):  # too few stained pixels
                self.n_unchanged += 1
                return np.asarray(img, dtype=np.uint8)
            arr = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        else:
            out = self._norm.normalize(t)
            arr = out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
            if arr.shape[0] == 3 and arr.shape[-1] != 3:
                arr = np.moveaxis(arr, 0, -1)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            self.n_unchanged += 1
            return np.asarray(img, dtype=np.uint8)
        return np.clip(arr, 0, 255).astype(np.uint8).reshape(np.shape(img))

    def __call__(self, imgs: np.ndarray) -> np.ndarray:
        """Normalise a uint8 (H, W, 3) patch or a (N, H, W, 3) batch of patches."""
        imgs = np.asarray(imgs)
        if imgs.ndim == 3:
            return self.normalize(imgs)
        if imgs.ndim != 4 or imgs.shape[-1] != 3:
            raise ValueError(f"expected (H, W, 3) or (N, H, W, 3) uint8 patches, got {imgs.shape}")
        return np.stack([self.normalize(p) for p in imgs]) if len(imgs) else imgs.copy()

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The method, its parameters and the fitted reference, as builtin types."""
        d: dict[str, Any] = {"method": self.method, "io": self.io, "alpha": self.alpha,
                             "beta": self.beta, "fitted": self.fitted}
        if self.method == "macenko":
            d["he_ref"] = np.asarray(self._norm.HERef, dtype=np.float64).tolist()
            d["max_c_ref"] = np.asarray(self._norm.maxCRef, dtype=np.float64).tolist()
        else:
            d["target_means"] = np.asarray(self._norm.target_means, dtype=np.float64).tolist()
            d["target_stds"] = np.asarray(self._norm.target_stds, dtype=np.float64).tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainNormalizer:
        """Rebuild a normaliser from :meth:`to_dict` output."""
        import torch

        self = cls.__new__(cls)
        self.method = d["method"]
        if self.method not in METHODS:
            raise ValueError(f"unknown stain normalisation method {self.method!r}")
        self.io, self.alpha, self.beta = float(d["io"]), float(d["alpha"]), float(d["beta"])
        self.n_unchanged = 0
        self._norm = _make(self.method)
        self.fitted = bool(d.get("fitted", True))
        if self.method == "macenko":
            self._norm.HERef = torch.tensor(d["he_ref"], dtype=torch.float32)
            self._norm.maxCRef = torch.tensor(d["max_c_ref"], dtype=torch.float32)
        else:
            self._norm.target_means = torch.tensor(d["target_means"], dtype=torch.float32)
            self._norm.target_stds = torch.tensor(d["target_stds"], dtype=torch.float32)
        return self

    def __repr__(self) -> str:
        return f"StainNormalizer({self.method!r}, fitted={self.fitted})"


def as_stain_normalizer(spec: Any) -> StainNormalizer | None:
    """None, a :class:`StainNormalizer`, a method name or a :meth:`StainNormalizer.to_dict`."""
    if spec is None or spec is False or spec == "none":
        return None
    if isinstance(spec, StainNormalizer):
        return spec
    if isinstance(spec, str):
        return StainNormalizer(spec)
    if isinstance(spec, dict):
        return StainNormalizer.from_dict(spec)
    raise TypeError(f"stain_norm must be None, a method name, a dict or a StainNormalizer, "
                    f"got {type(spec).__name__}")


def _make(method: str) -> Any:
    try:
        import torchstain
    except ImportError as err:  # pragma: no cover - torchstain is an optional dependency
        raise ImportError("stain normalisation needs torchstain: pip install torchstain") from err
    if method == "macenko":
        return torchstain.normalizers.MacenkoNormalizer(backend="torch")
    return torchstain.normalizers.ReinhardNormalizer(backend="torch")


def _chw(img: np.ndarray):
    import torch

    img = np.asarray(img)
    if img.ndim != 3 or img.shape[-1] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


class StainedPatches:
    """A patch store whose patches are stain-normalised on access (same indexing API)."""

    def __init__(self, store: Any, normalizer: StainNormalizer) -> None:
        self.store = store
        self.normalizer = normalizer

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: Any) -> np.ndarray:
        return self.normalizer(self.store[i])

    def get_many(self, indices: Any) -> np.ndarray:
        return self.normalizer(self.store.get_many(indices))

    def __getattr__(self, name: str) -> Any:
        if name in ("store", "normalizer"):
            raise AttributeError(name)
        return getattr(self.store, name)
