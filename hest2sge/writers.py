"""``SlidePredictionWriter``: Lightning prediction writer saving one ``.h5ad`` per slide."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter


class SlidePredictionWriter(BasePredictionWriter):
    """Write the predictions of ``trainer.predict`` as one AnnData per slide.

    Each file ``<output_dir>/<slide_id>.h5ad`` holds the slide's spots (its ``obs``, in the
    slide's order), ``var_names`` = the model's genes, the predictions (on the model's target
    scale) in ``X`` and ``layers["pred"]``, the slide's raw counts of those genes in
    ``layers["counts"]`` when it has them, ``obsm["spatial"]`` and ``uns["hest2sge"]`` (model,
    target transform, checkpoint). Used by ``hest2sge predict``.

    Args:
        output_dir: Folder of the ``.h5ad`` files (created).
    """

    def __init__(self, output_dir: str | os.PathLike = "predictions") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = Path(output_dir)
        self.written: list[Path] = []

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Any,
                           batch_indices: Any) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "slide_ids"):
            raise ValueError("SlidePredictionWriter needs a SpotDataModule (slide ids, spots)")
        batches = predictions
        if batches and isinstance(batches[0], list):  # several predict dataloaders
            batches = [b for group in batches for b in group]
        per_slide: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        for out in batches:
            pred = out["pred"].float().cpu()
            slide = out["slide"].cpu().reshape(-1)
            spot = out["spot"].cpu().reshape(-1)
            if slide.numel() == 1 and pred.shape[0] > 1:
                slide = slide.expand(pred.shape[0])
            for s in torch.unique(slide).tolist():
                m = slide == s
                per_slide.setdefault(int(s), []).append((spot[m].numpy(), pred[m].numpy()))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for s, parts in sorted(per_slide.items()):
            sid = dm.slide_ids[s]
            path = self.output_dir / f"{sid}.h5ad"
            self._write(pl_module, dm._by_id[sid], parts, path, trainer)
            self.written.append(path)
        print(f"hest2sge predict: wrote {len(per_slide)} file(s) to {self.output_dir}")

    @staticmethod
    def _write(model: Any, slide: Any, parts: list, path: Path, trainer: Any) -> None:
        import anndata as ad

        spots = np.concatenate([p[0] for p in parts])
        pred = np.concatenate([p[1] for p in parts]).astype(np.float32)
        order = np.argsort(spots, kind="stable")
        spots, pred = spots[order], pred[order]
        if len(np.unique(spots)) != len(spots):
            raise ValueError(f"slide {path.stem}: a spot was predicted twice")
        sub = slide[spots]
        genes = list(model.genes or [f"g{i}" for i in range(pred.shape[1])])
        out = ad.AnnData(X=pred.copy(), obs=sub.obs.copy())
        out.var_names = genes
        out.layers["pred"] = pred
        if all(g in slide.var_names for g in genes):
            x = sub[:, genes].X
            out.layers["counts"] = np.asarray(x.todense() if hasattr(x, "todense") else x,
                                              dtype=np.float32)
        out.obsm["spatial"] = np.asarray(sub.obsm["spatial"]).copy()
        out.uns["hest2sge"] = {
            "model": model.model_name,
            "target_transform": str(model.fitted_target_transform
                                    or model.target_transform_spec()),
            "ckpt_path": str(getattr(trainer, "ckpt_path", None) or ""),
        }
        tmp = path.with_suffix(".h5ad.tmp")
        out.write_h5ad(tmp)
        os.replace(tmp, path)
