"""``SpotDataModule``: slides + a split -> Lightning data loaders.

Batches are dicts of tensors:

* ``img`` (B, 3, H, W): uint8 from the loader; :class:`~hest2sge.models.base.SpotModel`
  turns it into float in [0, 1] on the device, so models always see float pixels.
* ``expr`` (B, G) transformed targets, ``counts`` (B, G) raw panel counts,
  ``size_factor`` (B,) panel total / median panel total of the slide,
* ``coord`` (B, 2) array grid position as (x, y) = (array_col, array_row),
* ``pos`` (B, 2) spot centre in full-resolution pixels (x, y),
* ``slide`` (B,) index into ``dm.slide_ids``, ``spot`` (B,) row of the spot in its slide,
* ``edge_index`` (2, E) in slide mode: neighbour graph on array coordinates.

Spot mode yields shuffled spots of the training slides; slide mode yields one slide (all its
spots) per batch. Image mode (whole-image models such as iStar) batches shuffled spots like
spot mode, each also carrying the per-spot inputs the model computed once from the whole
slide (``model.slide_inputs``, e.g. iStar's ``feat``/``feat_mask``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hest2sge.data.genes import check_genes, select_genes
from hest2sge.data.graphs import knn_graph
from hest2sge.data.slide import patient_id_of, slide_id_of, validate_slide
from hest2sge.data.splits import Split, check_split, patient_kfold
from hest2sge.data.transforms import TargetTransform

INPUT_MODES = ("spot", "slide", "image")


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float32)


def augment_patches(img: torch.Tensor) -> torch.Tensor:
    """Random horizontal/vertical flips and 90 degree rotations of (..., H, W) patches.

    One draw for the whole tensor: call per patch for independent augmentation.
    """
    if torch.rand(()) < 0.5:
        img = img.flip(-1)
    if torch.rand(()) < 0.5:
        img = img.flip(-2)
    k = int(torch.randint(0, 4, ()))
    return torch.rot90(img, k, dims=(-2, -1)) if k else img


class SlideTable:
    """Per-slide arrays the datasets need (targets, counts, coordinates, patches)."""

    def __init__(self, slide, index: int, genes: list[str], transform: TargetTransform,
                 patches: Any, inputs: dict[str, np.ndarray] | None = None) -> None:
        self.index = index
        self.slide_id = slide_id_of(slide)
        self.patient_id = patient_id_of(slide)
        x_all = slide.X
        total_all = np.asarray(x_all.sum(1)).ravel().astype(np.float64)
        counts = _dense(slide[:, genes].X)
        self.counts = counts
        self.expr = transform(counts, total_all=total_all, n_all=slide.n_vars)
        lib = counts.sum(1)
        med = float(np.median(lib[lib > 0])) if (lib > 0).any() else 1.0
        self.size_factor = (lib / med).astype(np.float32)
        self.coord = np.stack(
            [slide.obs["array_col"].to_numpy(), slide.obs["array_row"].to_numpy()], 1
        ).astype(np.int64)
        self.pos = np.asarray(slide.obsm["spatial"], dtype=np.float32)
        self.barcodes = list(slide.obs_names)
        self.patches = patches
        self.n = slide.n_obs
        # per-spot model inputs computed from the whole slide (``model.slide_inputs``)
        self.inputs = dict(inputs or {})

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "expr": torch.from_numpy(self.expr[i]),
            "counts": torch.from_numpy(self.counts[i]),
            "size_factor": torch.tensor(self.size_factor[i]),
            "coord": torch.from_numpy(self.coord[i]),
            "pos": torch.from_numpy(self.pos[i]),
            "slide": torch.tensor(self.index),
            "spot": torch.tensor(i),
            **{k: torch.from_numpy(np.asarray(v[i])) for k, v in self.inputs.items()},
        }


class SpotDataset(Dataset):
    """All spots of some slides, one sample per spot."""

    def __init__(self, tables: list[SlideTable], augment: bool = False) -> None:
        self.tables = tables
        self.augment = augment
        self.offsets = np.cumsum([0] + [t.n for t in tables])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        k = int(np.searchsorted(self.offsets, idx, side="right") - 1)
        t, i = self.tables[k], int(idx - self.offsets[k])
        sample = t.sample(i)
        img = torch.from_numpy(np.ascontiguousarray(t.patches[i])).permute(2, 0, 1)
        sample["img"] = augment_patches(img) if self.augment else img.contiguous()
        return sample


class SlideDataset(Dataset):
    """One item per slide: all its spots and its neighbour graph."""

    def __init__(self, tables: list[SlideTable], augment: bool = False, graph_k: int = 4,
                 graph_max_dist: float | None = None) -> None:
        self.tables = tables
        self.augment = augment
        self.graphs = [knn_graph(t.coord, k=graph_k, max_dist=graph_max_dist) for t in tables]

    def __len__(self) -> int:
        return len(self.tables)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        t = self.tables[k]
        idx = np.arange(t.n)
        img = torch.from_numpy(np.ascontiguousarray(t.patches.get_many(idx))).permute(0, 3, 1, 2)
        if self.augment:
            img = torch.stack([augment_patches(p) for p in img])
        return {
            "img": img.contiguous(),
            "expr": torch.from_numpy(t.expr),
            "counts": torch.from_numpy(t.counts),
            "size_factor": torch.from_numpy(t.size_factor),
            "coord": torch.from_numpy(t.coord),
            "pos": torch.from_numpy(t.pos),
            "slide": torch.full((t.n,), t.index, dtype=torch.long),
            "spot": torch.from_numpy(idx),
            "edge_index": self.graphs[k],
            **{k: torch.from_numpy(np.asarray(v)) for k, v in t.inputs.items()},
        }


def collate_slide(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Slide mode has batch size 1: the batch is the slide's dict itself."""
    if len(items) != 1:
        raise ValueError("slide mode loads exactly one slide per batch (batch_size=1)")
    return items[0]


def resolve_split(split: Any, slides: Sequence, allow_patient_overlap: bool = False) -> Split:
    """Accept a :class:`Split`, a dict of slide-id lists, a ``{"k": 4, "fold": 0}`` dict, or
    ``None`` (patient 4-fold, fold 0)."""
    if split is None:
        split = {"k": 4, "fold": 0}
    if isinstance(split, dict) and ("fold" in split or "k" in split):
        return patient_kfold(slides, k=int(split.get("k", 4)), fold=int(split.get("fold", 0)))
    if isinstance(split, dict):
        split = Split(**{k: list(v) for k, v in split.items()})
    if not isinstance(split, Split):
        raise TypeError(f"split must be a Split, a dict or None, got {type(split).__name__}")
    check_split(split, slides, allow_patient_overlap=allow_patient_overlap)
    return split


class SpotDataModule(pl.LightningDataModule):
    """Slides and a split turned into data loaders for any hest2sge model.

    The gene panel is computed from the training slides in ``__init__`` (so ``dm.genes`` is
    available to build the model); the target transform, input mode, patch size and graph
    come from the model being fitted (``trainer.lightning_module``) unless given here.

    Args:
        slides: List of slide AnnDatas (or a spec understood by :func:`hest2sge.data.load_slides`,
            e.g. ``"synthetic"`` or a path).
        split: A :class:`Split`, a dict of slide-id lists, ``{"k": 4, "fold": 0}`` or
            ``None`` (patient-grouped 4-fold, fold 0).
        genes: Explicit gene list or a rule (``"paper"``, ``"mean"``, ``"all"``).
        n_top_hvg: HVGs per section for the ``"paper"`` rule.
        min_spots: Minimum expressing spots for the ``"paper"`` rule.
        n_genes: Panel size for the ``"mean"`` rule.
        target_transform: Override of the model's target transform (dict spec).
        input_mode: ``"spot"``, ``"slide"`` or ``"image"``; default from the model.
        patch_size: Patch side in pixels; default from the model.
        pixel_size_um: Rescale patches to this many µm per pixel (None: native resolution).
        batch_size: Spots per batch in spot mode (slide mode always uses one slide).
        num_workers: DataLoader workers.
        augment: Flips and 90 degree rotations on training patches; default from the model
            (``loader_augment``: on for ST-Net, DeepPT, TCGN; off for models whose original
            uses no augmentation or augments inside the model), else on.
        cache_dir: Directory of the HDF5 patch cache (None: patches kept in memory).
        graph_k: Neighbours of the slide-mode graph; default from the model.
        graph_max_dist: Maximum edge length (array units); default from the model.
        allow_patient_overlap: Accept a split with a patient in training and held-out roles.
        predict_slides: Slide ids for ``predict_dataloader`` (default: test, else val).
        stain_norm: Optional stain normalisation of every patch (all roles), off by default:
            ``"macenko"``, a :class:`~hest2sge.data.stain.StainNormalizer` or its ``to_dict()``;
            give the same to ``predict_wsi`` (``dm.stain_norm.to_dict()``).
    """

    def __init__(
        self,
        slides: Any,
        split: Any = None,
        genes: Sequence[str] | str = "paper",
        n_top_hvg: int = 1000,
        min_spots: int = 1000,
        n_genes: int = 250,
        target_transform: dict[str, Any] | None = None,
        input_mode: str | None = None,
        patch_size: int | None = None,
        pixel_size_um: float | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        augment: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        graph_k: int | None = None,
        graph_max_dist: float | None = None,
        allow_patient_overlap: bool = False,
        predict_slides: Sequence[str] | None = None,
        stain_norm: Any = None,
    ) -> None:
        super().__init__()
        from hest2sge.data.io import load_slides

        self.slides = load_slides(slides)
        for s in self.slides:
            validate_slide(s)
        self.slide_ids = [slide_id_of(s) for s in self.slides]
        if len(set(self.slide_ids)) != len(self.slide_ids):
            raise ValueError(f"slide ids are not unique: {self.slide_ids}")
        self.patient_ids = [patient_id_of(s) for s in self.slides]
        self.split = resolve_split(split, self.slides, allow_patient_overlap)
        self._by_id = dict(zip(self.slide_ids, self.slides))
        train = [self._by_id[s] for s in self.split.train]
        self.genes: list[str] = select_genes(
            train, genes, n_top=n_top_hvg, min_spots=min_spots, n_genes=n_genes
        )
        used = [self._by_id[s] for s in self.split.train + self.split.val + self.split.test]
        check_genes(used, self.genes)
        if input_mode is not None and input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        self.input_mode = input_mode
        self.patch_size = patch_size
        self.pixel_size_um = pixel_size_um
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.augment = augment
        self._augment_arg = augment
        self.cache_dir = cache_dir
        self.graph_k = graph_k
        self.graph_max_dist = graph_max_dist
        self.target_transform_spec = target_transform
        self.predict_slides = list(predict_slides) if predict_slides is not None else None
        from hest2sge.data.stain import as_stain_normalizer

        self.stain_norm = as_stain_normalizer(stain_norm)
        self.target_transform: TargetTransform | None = None
        self.train_target_mean: np.ndarray | None = None
        self.tables: dict[str, SlideTable] = {}
        self.slide_inputs: Any = None
        self._configured = False
        self._train_generator: torch.Generator | None = None
        self._resume_generator_state: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model: Any, slides: Any, split: Any = None, **kwargs: Any) -> SpotDataModule:
        """A data module wired for ``model``: its genes, input mode, patch size, target
        transform and graph (keyword arguments still override)."""
        kwargs.setdefault("genes", model.genes if model.genes is not None else "paper")
        dm = cls(slides, split, **kwargs)
        dm.configure_for(model)
        return dm

    # ------------------------------------------------------------------ configuration
    def configure_for(self, model: Any | None) -> None:
        """Take unset options from a model's capability flags."""
        if model is not None:
            self.input_mode = self.input_mode or model.input_mode
            self.patch_size = self.patch_size or model.patch_size
            if self.graph_k is None:
                self.graph_k = model.graph_k
            if self.graph_max_dist is None:
                self.graph_max_dist = model.graph_max_dist
            if self.target_transform_spec is None:
                self.target_transform_spec = model.target_transform_spec()
            if self._augment_arg is None:
                self.augment = bool(getattr(model, "loader_augment", True))
        self.input_mode = self.input_mode or "spot"
        self.patch_size = int(self.patch_size or 224)
        self.graph_k = 4 if self.graph_k is None else int(self.graph_k)
        self.augment = True if self.augment is None else bool(self.augment)
        # "image" models compute per-spot inputs from the whole slide image once per slide
        # (``model.slide_inputs(slide, cache_dir=..., slides=...)``); their batches are
        # shuffled spots carrying those inputs, as in spot mode.
        if model is not None:
            hook = getattr(model, "slide_inputs", None)
            hook = hook if callable(hook) else None
            if hook != self.slide_inputs:
                self.tables.clear()  # tables hold another model's inputs (or none): rebuild
                self.slide_inputs = hook
        self._configured = True

    def setup(self, stage: str | None = None) -> None:
        model = None
        if self.trainer is not None:
            model = getattr(self.trainer, "lightning_module", None)
        if not self._configured or model is not None:
            self.configure_for(model)
        if self.target_transform is None:
            self.target_transform = TargetTransform.from_spec(self.target_transform_spec)
            train = [self._by_id[s] for s in self.split.train]
            counts = [_dense(s[:, self.genes].X) for s in train]
            totals = [np.asarray(s.X.sum(1)).ravel() for s in train]
            self.target_transform.fit(counts, totals, [s.n_vars for s in train])
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                 "predict": ("predict",)}.get(stage or "fit", ("train", "val", "test"))
        for role in roles:
            for sid in self._ids(role):
                self.table(sid)
        if self.train_target_mean is None and "train" in roles:
            ex = np.concatenate([self.tables[s].expr for s in self.split.train], 0)
            self.train_target_mean = ex.mean(0)

    def table(self, slide_id: str) -> SlideTable:
        """The (cached) per-slide arrays and patch store of a slide."""
        if slide_id not in self.tables:
            from hest2sge.data.patches import cached_patches

            if self.target_transform is None or not self._configured:
                raise RuntimeError("call setup() before accessing slide tables")
            slide = self._by_id[slide_id]
            store = cached_patches(slide, patch_size=self.patch_size,
                                   pixel_size_um=self.pixel_size_um, cache_dir=self.cache_dir)
            if self.stain_norm is not None:
                from hest2sge.data.stain import StainedPatches

                store = StainedPatches(store, self.stain_norm)
            inputs = None
            if self.slide_inputs is not None:
                inputs = self.slide_inputs(slide, cache_dir=self.cache_dir, slides=self.slides)
            self.tables[slide_id] = SlideTable(slide, self.slide_ids.index(slide_id), self.genes,
                                               self.target_transform, store, inputs=inputs)
        return self.tables[slide_id]

    def _ids(self, role: str) -> list[str]:
        if role == "predict":
            if self.predict_slides is not None:
                unknown = [s for s in self.predict_slides if s not in self._by_id]
                if unknown:
                    raise KeyError(f"predict_slides names unknown slides {unknown}")
                return self.predict_slides
            return self.split.test or self.split.val
        return list(getattr(self.split, role))

    # ------------------------------------------------------------------ loaders
    def _dataset(self, role: str, augment: bool) -> Dataset:
        tables = [self.table(s) for s in self._ids(role)]
        if not tables:
            raise ValueError(f"the split has no {role} slides")
        if self.input_mode == "slide":
            return SlideDataset(tables, augment=augment, graph_k=self.graph_k,
                                graph_max_dist=self.graph_max_dist)
        return SpotDataset(tables, augment=augment)

    def _loader(self, role: str, shuffle: bool, augment: bool) -> DataLoader:
        ds = self._dataset(role, augment)
        slide_mode = self.input_mode == "slide"
        generator = None
        if shuffle:
            # The loader's own generator, seeded from torch's global one (so seed_everything
            # fixes it) or continued from a checkpoint (state_dict): exact resume.
            generator = torch.Generator()
            if self._resume_generator_state is not None:
                generator.set_state(self._resume_generator_state)
                self._resume_generator_state = None
            else:
                generator.manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
            self._train_generator = generator
        return DataLoader(
            ds,
            batch_size=1 if slide_mode else self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=collate_slide if slide_mode else None,
            persistent_workers=self.num_workers > 0,
            pin_memory=False,
        )

    def state_dict(self) -> dict[str, Any]:
        """Checkpointed state: the training loader's generator (shuffling, worker seeds)."""
        if self._train_generator is None:
            return {}
        return {"train_generator": self._train_generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training loader's generator from a checkpoint (exact resume)."""
        state = state_dict.get("train_generator")
        self._resume_generator_state = state if isinstance(state, torch.Tensor) else None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, augment=self.augment)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, augment=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, augment=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False, augment=False)

    def patient_of(self, slide_index: int) -> str:
        """Patient id of the slide with batch index ``slide_index``."""
        return self.patient_ids[slide_index]
