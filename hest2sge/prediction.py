"""``hest2sge.predict`` (module ``hest2sge.prediction``, so that importing it never shadows the
function on the package): run a model on a slide and get an AnnData of predictions."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from hest2sge.data.slide import slide_id_of, validate_slide


def slide_batches(model: Any, slide, batch_size: int = 64, pixel_size_um: float | None = None,
                  cache_dir: str | os.PathLike | None = None):
    """Yield model-ready batches (without targets) covering every spot of ``slide``.

    Slide-level models get one batch with all spots and the neighbour graph; spot-level
    and image-level models get consecutive chunks of ``batch_size`` spots (image-level models
    also get the per-spot inputs they compute from the whole slide, ``model.slide_inputs``).
    """
    from hest2sge.data.graphs import knn_graph
    from hest2sge.data.patches import cached_patches
    from hest2sge.models.base import prepare_batch

    store = cached_patches(slide, patch_size=model.patch_size, pixel_size_um=pixel_size_um,
                           cache_dir=cache_dir)
    coord = np.stack([slide.obs["array_col"].to_numpy(), slide.obs["array_row"].to_numpy()], 1)
    coord = torch.as_tensor(coord.astype(np.int64))
    pos = torch.as_tensor(np.asarray(slide.obsm["spatial"], dtype=np.float32))
    n = slide.n_obs
    slide_mode = model.input_mode == "slide"
    hook = getattr(model, "slide_inputs", None)
    inputs = hook(slide, cache_dir=cache_dir) if callable(hook) else {}
    chunks = [np.arange(n)] if slide_mode else np.array_split(np.arange(n), max(1, -(-n // batch_size)))
    for idx in chunks:
        img = torch.from_numpy(np.ascontiguousarray(store.get_many(idx))).permute(0, 3, 1, 2)
        batch = {"img": img, "coord": coord[idx], "pos": pos[idx],
                 # slide index -1: this slide is not one of a data module's slides
                 "slide": torch.full((len(idx),), -1, dtype=torch.long),
                 "spot": torch.as_tensor(idx)}
        batch.update({k: torch.as_tensor(np.asarray(v[idx])) for k, v in inputs.items()})
        if slide_mode:
            batch["edge_index"] = knn_graph(coord.numpy(), k=model.graph_k,
                                            max_dist=model.graph_max_dist)
        yield prepare_batch(batch, keep_uint8=getattr(model, "accepts_uint8_img", False))


def _scverse_entry(slide) -> dict[str, Any]:
    """A copy of the slide's ``uns["spatial"]`` entry with scanpy/squidpy ``hires``/``lowres``
    images (added when the slide lacks them), so ``sc.pl.spatial`` works on predictions."""
    from hest2sge.data.scverse import add_scverse_images_to_entry

    entry = dict(slide.uns["spatial"][slide_id_of(slide)])
    entry["images"] = dict(entry.get("images", {}))
    entry["scalefactors"] = dict(entry.get("scalefactors", {}))
    return add_scverse_images_to_entry(entry)


@torch.no_grad()
def predict(
    model: Any,
    slide,
    resolution: str | float = "spot",
    batch_size: int = 64,
    pixel_size_um: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
):
    """Predict gene expression for every spot of a slide.

    Args:
        model: A hest2sge model (trained or not).
        slide: A slide AnnData (its counts are not needed).
        resolution: ``"spot"`` for the measured spots; other values (a sub-spot grid step in
            full-resolution pixels, ``"superpixel"``) are handled by models that implement
            ``predict_slide`` (super-resolution models).
        batch_size: Spots per forward pass for spot-level models.
        pixel_size_um: Patch pixel size used in training (None: native resolution).
        cache_dir: Patch cache directory.
        device: Device to run on (default: the model's).

    Returns:
        AnnData with the slide's spots, ``var_names`` = the model's genes, predictions in
        ``X`` and ``layers["pred"]`` (on the model's target scale), the slide's raw counts of
        those genes in ``layers["counts"]`` (NaN for genes the slide lacks, with a warning
        and their list in ``uns["hest2sge"]["genes_missing_from_slide"]``; and their library sizes
        over all genes in ``obs["total_counts_all"]``), and the slide's ``obsm["spatial"]`` and
        ``uns["spatial"]`` with scanpy/squidpy ``hires``/``lowres`` images: ``sc.pl.spatial``
        and ``squidpy.pl.spatial_scatter`` work on it as it is.
    """
    import anndata as ad

    validate_slide(slide)
    if resolution != "spot":
        if not hasattr(model, "predict_slide"):
            raise ValueError(
                f"{type(model).__name__} predicts at spot resolution only; "
                f"resolution={resolution!r} needs a super-resolution model"
            )
        return model.predict_slide(slide, resolution=resolution, pixel_size_um=pixel_size_um,
                                   cache_dir=cache_dir)
    was_training = model.training
    model.eval()
    if device is not None:
        model.to(device)
    dev = next(model.parameters(), torch.empty(0)).device
    preds = []
    for batch in slide_batches(model, slide, batch_size, pixel_size_um, cache_dir):
        batch = {k: v.to(dev) for k, v in batch.items()}
        preds.append(model.prediction(model(batch)).float().cpu())
    model.train(was_training)
    pred = torch.cat(preds).numpy()
    genes = model.genes or [f"g{i}" for i in range(pred.shape[1])]
    out = ad.AnnData(X=pred.copy(), obs=slide.obs.copy())
    out.var_names = list(genes)
    out.layers["pred"] = pred
    missing = _add_counts(out, slide, list(genes), named=model.genes is not None)
    out.obsm["spatial"] = np.asarray(slide.obsm["spatial"]).copy()
    if slide.n_vars:  # library sizes over all genes, for transforms with library="all"
        out.obs["total_counts_all"] = np.asarray(slide.X.sum(1), dtype=np.float64).ravel()
    out.uns["spatial"] = {slide_id_of(slide): _scverse_entry(slide)}
    out.uns["hest2sge"] = {"model": model.model_name, "resolution": "spot",
                           "n_genes_all": int(slide.n_vars),
                           "target_transform": model.fitted_target_transform
                           or model.target_transform_spec()}
    if missing:
        out.uns["hest2sge"]["genes_missing_from_slide"] = missing
    return out


def _add_counts(out, slide, genes: list[str], named: bool) -> list[str]:
    """Put the slide's raw counts of ``genes`` in ``out.layers["counts"]``.

    Genes of the model's panel that the slide lacks get NaN counts (a warning names them);
    the returned list names them too.
    """
    import warnings

    from hest2sge.data.datamodule import _dense

    have = set(slide.var_names)
    present = [g for g in genes if g in have]
    missing = [g for g in genes if g not in have]
    if not present:
        if named:
            warnings.warn(
                f"slide {slide_id_of(slide)!r} holds none of the model's {len(genes)} genes: "
                "the prediction has no layers['counts'] (ground truth)",
                stacklevel=3,
            )
        return missing if named else []
    counts = np.full((slide.n_obs, len(genes)), np.nan, dtype=np.float32)
    cols = [i for i, g in enumerate(genes) if g in have]
    counts[:, cols] = _dense(slide[:, present].X)
    out.layers["counts"] = counts
    if missing:
        warnings.warn(
            f"slide {slide_id_of(slide)!r} lacks {len(missing)} of the model's {len(genes)} "
            f"genes (e.g. {missing[:5]}): their layers['counts'] are NaN (listed in "
            "uns['hest2sge']['genes_missing_from_slide'])",
            stacklevel=3,
        )
    return missing
