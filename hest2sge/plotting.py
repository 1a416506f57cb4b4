"""Plots: spatial maps of true vs predicted expression."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


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
        pred_adata: Output of :func:`hest2sge.predict`, with ``layers["pred"]`` and the
            ground truth on the same scale in ``layers[truth_layer]``.
        genes: Genes to show (one row each).
        path: Write the figure as PNG here (also returned).
        truth_layer: Layer holding the ground truth.
        spot_size: Marker size.
        title: Figure title.

    Returns:
        The matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    missing = [g for g in genes if g not in pred_adata.var_names]
    if missing:
        raise ValueError(f"genes not in the prediction: {missing}")
    if truth_layer not in pred_adata.layers:
        raise ValueError(f"prediction AnnData has no layers[{truth_layer!r}] with the truth")
    xy = np.asarray(pred_adata.obsm["spatial"])
    fig, axes = plt.subplots(len(genes), 2, figsize=(7, 3.3 * len(genes)), squeeze=False)
    for r, g in enumerate(genes):
        j = list(pred_adata.var_names).index(g)
        for c, (name, layer) in enumerate((("truth", truth_layer), ("prediction", "pred"))):
            v = np.asarray(pred_adata.layers[layer][:, j]).ravel()
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
