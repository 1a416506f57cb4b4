"""Plots: spatial maps of true vs predicted expression.

No matplotlib backend is chosen here: scripts and notebooks keep theirs (headless runs fall
back to Agg on their own). Slides and :func:`hest2sge.predict` output also carry scanpy/squidpy
``hires``/``lowres`` images, so ``sc.pl.spatial(pred, color=gene, layer="pred")`` works too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def truth_on_target_scale(pred_adata, truth_layer: str = "truth") -> np.ndarray:
    """The ground truth of a prediction AnnData on the model's target scale.

    ``layers[truth_layer]`` when present; otherwise the raw counts of ``hest2sge.predict``
    output (``layers["counts"]``) put through the model's target transform recorded in
    ``uns["hest2sge"]["target_transform"]`` (library sizes over all genes from
    ``obs["total_counts_all"]`` where the transform needs them).

    Raises:
        ValueError: when neither the truth layer nor counts with a recorded transform exist.
    """
    from hest2sge.data.transforms import TargetTransform

    if truth_layer in pred_adata.layers:
        return np.asarray(pred_adata.layers[truth_layer], dtype=np.float64)
    info = pred_adata.uns.get("hest2sge", {}) if hasattr(pred_adata, "uns") else {}
    if "counts" not in pred_adata.layers or "target_transform" not in info:
        raise ValueError(
            f"prediction AnnData has no layers[{truth_layer!r}] with the truth, and no "
            "layers['counts'] with uns['hest2sge']['target_transform'] to derive it from "
            "(hest2sge.predict output of a slide with counts has both)"
        )
    tt = TargetTransform.from_spec(info["target_transform"])
    counts = np.asarray(pred_adata.layers["counts"], dtype=np.float64)
    total = pred_adata.obs["total_counts_all"].to_numpy() if "total_counts_all" in \
        pred_adata.obs else None
    if tt.needs_fit and tt.min is None:
        raise ValueError(
            f"the model's target transform {tt.kind!r} was never fitted (no min/max): train "
            "the model, or put the truth in layers[truth_layer]"
        )
    if total is None and (tt.library == "all" or tt.kind == "stnet"):
        raise ValueError(
            f"target transform {tt.kind!r} (library={tt.library!r}) needs each spot's total "
            "over all genes: obs['total_counts_all'] is missing"
        )
    n_all = info.get("n_genes_all")
    return np.asarray(tt(counts, total_all=total, n_all=n_all), dtype=np.float64)


def plot_spatial_comparison(
    pred_adata,
    genes: Sequence[str],
    path: str | os.PathLike | None = None,
    truth_layer: str = "truth",
    spot_size: float = 40.0,
    title: str | None = None,
):
    """Side-by-side spatial maps of truth and prediction for some genes of one slide.

    Args:
        pred_adata: Output of :func:`hest2sge.predict` (``layers["pred"]``), with the ground
            truth on the same scale in ``layers[truth_layer]``, or derived from its
            ``layers["counts"]`` (see :func:`truth_on_target_scale`).
        genes: Genes to show (one row each).
        path: Write the figure as PNG here (also returned).
        truth_layer: Layer holding the ground truth.
        spot_size: Marker size.
        title: Figure title.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    missing = [g for g in genes if g not in pred_adata.var_names]
    if missing:
        raise ValueError(f"genes not in the prediction: {missing}")
    if "pred" not in pred_adata.layers:
        raise ValueError("prediction AnnData has no layers['pred'] (hest2sge.predict output)")
    truth = truth_on_target_scale(pred_adata, truth_layer)
    xy = np.asarray(pred_adata.obsm["spatial"])
    fig, axes = plt.subplots(len(genes), 2, figsize=(7, 3.3 * len(genes)), squeeze=False)
    names = list(pred_adata.var_names)
    for r, g in enumerate(genes):
        j = names.index(g)
        pred = np.asarray(pred_adata.layers["pred"][:, j]).ravel()
        for c, (name, v) in enumerate((("truth", truth[:, j]), ("prediction", pred))):
            ax = axes[r, c]
            sc = ax.scatter(xy[:, 0], xy[:, 1], c=v, s=spot_size, cmap="viridis", marker="s")
            ax.set_title(f"{g}: {name}")
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(sc, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
