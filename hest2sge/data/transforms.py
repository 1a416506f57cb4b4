"""Target transforms: how raw counts become the values a model is trained on.

Each model declares its default (``SpotModel.target_transform``) as a dict; the data module
builds a :class:`TargetTransform` from it and fits any statistics on the training slides only.

Kinds:

* ``"log_norm"``: ``log_base(pseudocount + scale * c / L)`` with library size ``L`` summed over
  the gene panel (``library="panel"``, the scprep convention of HisToGene, Hist2ST, THItoGene
  and TCGN: scale 1e4, base 10) or over all genes of the slide (``library="all"``).
* ``"stnet"``: ``ln((1 + c) / (n_all + L_all))``, ST-Net's normalisation with ``n_all`` the
  number of genes in the full table and ``L_all`` the spot's total over all genes.
* ``"log_minmax"``: ``log_base(1 + c)`` then per-gene min-max with min and max from the
  training slides (EGN v1/v2; DeepSpaCE after its variance-stabilising step).
* ``"minmax"``: per-gene min-max of raw counts from the training slides (iStar).
* ``"raw"``: untransformed counts (DeepPT in the benchmark, GeneCodeR).
* ``"sct"``: DeepSpaCE's targets: SCTransform-style corrected counts (closed-form stand-in,
  analytic Pearson residuals, :mod:`hest2sge.data.normalize`), then ``log_base(1 + x)`` and
  per-gene min-max. Fitted on the training slides: gene shares ``gene_frac``, median depth
  ``median_depth``, residual ``clip`` and the min-max range; ``theta`` is fixed. The depth is
  the spot total over all genes (``library="all"``) or over the panel (``"panel"``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

KINDS = ("log_norm", "stnet", "log_minmax", "minmax", "raw", "sct")


@dataclass
class TargetTransform:
    """A fitted-or-not target transform (see the module docstring for the kinds).

    Attributes:
        kind: One of ``KINDS``.
        scale: Library-size scale for ``log_norm`` (``1e4`` = CP10k).
        base: Logarithm base (``10``, ``2`` or ``"e"``).
        pseudocount: Added before the log.
        library: ``"panel"`` or ``"all"``: which genes define the library size.
        min: Per-gene minimum from the training slides (min-max kinds, set by :meth:`fit`).
        max: Per-gene maximum from the training slides.
    """

    kind: str = "log_norm"
    scale: float = 1e4
    base: float | str = 10
    pseudocount: float = 1.0
    library: str = "panel"
    min: list[float] | None = field(default=None, repr=False)
    max: list[float] | None = field(default=None, repr=False)
    theta: float = 100.0
    gene_frac: list[float] | None = field(default=None, repr=False)
    median_depth: float | None = None
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown target transform {self.kind!r}; choose from {KINDS}")
        if self.library not in ("panel", "all"):
            raise ValueError(f"library must be 'panel' or 'all', got {self.library!r}")

    @classmethod
    def from_spec(cls, spec: str | dict[str, Any] | TargetTransform | None) -> TargetTransform:
        """Build from a kind name, a dict of fields, or an existing transform."""
        if spec is None:
            return cls(kind="raw")
        if isinstance(spec, TargetTransform):
            return cls(**asdict(spec))
        if isinstance(spec, str):
            return cls(kind=spec)
        return cls(**dict(spec))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (safe to store in checkpoints)."""
        return asdict(self)

    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`fit` must see training data first."""
        return self.kind in ("log_minmax", "minmax", "sct")

    def _log(self, x: np.ndarray) -> np.ndarray:
        if self.base in ("e", None) or self.base == float(np.e):
            return np.log(x)
        return np.log(x) / np.log(float(self.base))

    def _pre(self, counts: np.ndarray, total_all: np.ndarray | None, n_all: int | None):
        counts = np.asarray(counts, dtype=np.float64)
        if self.kind == "raw" or self.kind == "minmax":
            return counts
        if self.kind == "log_minmax":
            return self._log(counts + self.pseudocount)
        if self.kind == "sct":
            return self._sct(counts, total_all)
        if self.kind == "stnet":
            if total_all is None or n_all is None:
                raise ValueError("the 'stnet' transform needs per-spot totals over all genes")
            return np.log((1.0 + counts) / (n_all + np.asarray(total_all)[:, None]))
        # log_norm
        if self.library == "all":
            if total_all is None:
                raise ValueError("library='all' needs per-spot totals over all genes")
            lib = np.asarray(total_all, dtype=np.float64)
        else:
            lib = counts.sum(1)
        lib = np.where(lib > 0, lib, 1.0)[:, None]
        return self._log(self.pseudocount + self.scale * counts / lib)

    def _depth(self, counts: np.ndarray, total_all: np.ndarray | None) -> np.ndarray:
        if self.library == "all":
            if total_all is None:
                raise ValueError("library='all' needs per-spot totals over all genes")
            return np.asarray(total_all, dtype=np.float64).ravel()
        return np.asarray(counts, dtype=np.float64).sum(1)

    def _sct(self, counts: np.ndarray, total_all: np.ndarray | None) -> np.ndarray:
        from hest2sge.data.normalize import corrected_counts

        if self.gene_frac is None or self.median_depth is None:
            raise RuntimeError("target transform 'sct' used before fit()")
        y = corrected_counts(counts, self._depth(counts, total_all), self.gene_frac,
                             self.median_depth, theta=self.theta, clip=self.clip)
        return self._log(y + self.pseudocount)

    def fit(
        self,
        counts_list: list[np.ndarray],
        totals_list: list[np.ndarray] | None = None,
        n_all_list: list[int] | None = None,
    ) -> TargetTransform:
        """Fit min-max statistics on the training slides' panel counts (no-op otherwise)."""
        if not self.needs_fit:
            return self
        if not counts_list:
            raise ValueError("cannot fit a min-max target transform without training slides")
        if self.kind == "sct":
            from hest2sge.data.normalize import fit_pearson

            depths = [self._depth(c, None if totals_list is None else totals_list[i])
                      for i, c in enumerate(counts_list)]
            stats = fit_pearson(counts_list, depths)
            self.gene_frac, self.median_depth = stats["gene_frac"], stats["median_depth"]
            self.clip = stats["clip"]
        pre = [
            self._pre(c, None if totals_list is None else totals_list[i],
                      None if n_all_list is None else n_all_list[i])
            for i, c in enumerate(counts_list)
        ]
        allv = np.concatenate(pre, 0)
        self.min = allv.min(0).tolist()
        self.max = allv.max(0).tolist()
        return self

    def __call__(
        self, counts: np.ndarray, total_all: np.ndarray | None = None, n_all: int | None = None
    ) -> np.ndarray:
        """Transform a spots x genes count matrix (float32 result)."""
        y = self._pre(counts, total_all, n_all)
        if self.needs_fit:
            if self.min is None or self.max is None:
                raise RuntimeError(f"target transform {self.kind!r} used before fit()")
            lo, hi = np.asarray(self.min), np.asarray(self.max)
            if lo.shape[0] != y.shape[1]:
                raise ValueError(
                    f"transform was fitted on {lo.shape[0]} genes, got {y.shape[1]}"
                )
            y = (y - lo) / (hi - lo + 1e-8)
        return y.astype(np.float32)

    def inverse(self, y: np.ndarray, library: np.ndarray | float | None = None) -> np.ndarray:
        """Map model-scale values back towards counts (the inverse of :meth:`__call__`).

        Exact where the transform is invertible from its fitted statistics alone; where it
        divided by a per-spot library size that a prediction does not know, the result stays
        normalised unless ``library`` is given (see :meth:`inverse_units`):

        * ``raw``: the values themselves (counts).
        * ``minmax``: ``y (max - min) + min`` (counts).
        * ``log_minmax``: ``base ** (y (max - min) + min) - pseudocount`` (counts).
        * ``sct``: the same, giving SCTransform-style corrected counts at the training median
          depth (the residual clipping and rounding of the forward pass are not undone).
        * ``log_norm``: ``base ** y - pseudocount`` = ``scale * c / L``: counts per ``scale``
          library units; times ``library / scale`` when ``library`` (``L`` per row) is given.
        * ``stnet``: ``exp(y) = (1 + c) / (n_all + L_all)``: times ``scale`` (counts per
          ``scale`` units, plus the smoothing count); ``exp(y) library - 1`` when ``library``
          (``n_all + L_all`` per row) is given.

        Args:
            y: Model-scale values, (rows, genes) or (genes,).
            library: Optional per-row library size (see above) for ``log_norm``/``stnet``.

        Returns:
            float64 array of the same shape; not clipped (predictions may fall outside the
            training range, so callers clip negatives where counts are meant).
        """
        y = np.asarray(y, dtype=np.float64)
        if self.kind == "raw":
            return y.copy()
        if self.needs_fit:
            if self.min is None or self.max is None:
                raise RuntimeError(
                    f"target transform {self.kind!r} has no fitted min/max: cannot invert it "
                    "(use the model's fitted_target_transform)"
                )
            lo, hi = np.asarray(self.min), np.asarray(self.max)
            if lo.shape[0] != y.shape[-1]:
                raise ValueError(f"transform was fitted on {lo.shape[0]} genes, got {y.shape[-1]}")
            y = y * (hi - lo + 1e-8) + lo
            if self.kind == "minmax":
                return y
            return self._exp(y) - self.pseudocount
        lib = None if library is None else np.asarray(library, dtype=np.float64)
        if lib is not None and lib.ndim == 1 and y.ndim == 2:
            lib = lib[:, None]
        if self.kind == "stnet":
            frac = np.exp(y)
            return frac * self.scale if lib is None else frac * lib - 1.0
        x = self._exp(y) - self.pseudocount  # log_norm: scale * c / L
        return x if lib is None else x * lib / self.scale

    def inverse_units(self, library: bool = False) -> str:
        """What :meth:`inverse` returns for this kind (``library``: whether one is given)."""
        if self.kind in ("raw", "minmax", "log_minmax"):
            return "counts"
        if self.kind == "sct":
            return "SCTransform-style corrected counts at the training median depth"
        if library:
            return "counts"
        if self.kind == "stnet":
            return f"(1 + count) per {self.scale:g} of (n_genes + spot total)"
        return f"counts per {self.scale:g} ({self.library} library)"

    def _exp(self, y: np.ndarray) -> np.ndarray:
        if self.base in ("e", None) or self.base == float(np.e):
            return np.exp(y)
        return np.power(float(self.base), y)
