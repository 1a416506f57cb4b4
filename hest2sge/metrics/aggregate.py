"""The benchmark's aggregation of per-(slide, gene) metrics, in one place.

Both the :class:`~hest2sge.metrics.SpotMetrics` callback (``val/pcc`` for checkpointing) and
the benchmark runner (:mod:`hest2sge.benchmark`) call these functions, so a number logged during
training and a number in a benchmark table are produced by the same code.

The paper's rule (the benchmark paper's Methods): a metric is computed per (model, fold, image, gene), then
averaged over the images of a patient, then over the patients of each gene, then over genes.
Every level is NaN-aware (a gene that is undefined on one image, e.g. constant there, is
averaged over the images where it is defined).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["coverage", "gene_means", "summarise"]


def gene_means(table: Any, metrics: Sequence[str], by: Sequence[str] = ()) -> Any:
    """Per-gene values: mean over the slides of each patient, then over patients.

    Args:
        table: ``pandas.DataFrame`` with columns ``patient_id``, ``gene`` and one column per
            metric (one row per slide and gene), plus the grouping columns ``by``.
        metrics: Metric columns to aggregate (missing ones are ignored).
        by: Extra grouping columns kept in the result (e.g. model, fold).

    Returns:
        DataFrame indexed by ``(*by, gene)`` with one column per metric. Non-finite values
        are kept as they are at this level (an infinite NRMSE stays infinite).
    """
    cols = [m for m in metrics if m in table.columns]
    keys = [*by, "patient_id", "gene"]
    per_patient = table.groupby(keys, sort=False)[cols].mean()
    return per_patient.groupby(level=[*by, "gene"], sort=False).mean()


def summarise(
    table: Any,
    metrics: Sequence[str],
    nonfinite: str = "propagate",
) -> dict[str, float]:
    """Mean over genes of :func:`gene_means` (patient-then-gene aggregation).

    Args:
        table: One row per (slide, gene), as for :func:`gene_means`.
        metrics: Metric columns.
        nonfinite: ``"propagate"``: NaN genes are skipped, an infinite gene value makes the
            mean infinite (what ``SpotMetrics`` logs); ``"exclude"``: infinite gene values are
            skipped like NaN (the benchmark tables, which report how many were skipped with
            :func:`coverage`).

    Returns:
        Dict metric -> mean (NaN when no gene is defined).
    """
    if nonfinite not in ("propagate", "exclude"):
        raise ValueError(f"nonfinite must be 'propagate' or 'exclude', got {nonfinite!r}")
    per_gene = gene_means(table, metrics)
    out: dict[str, float] = {}
    for m in per_gene.columns:
        v = per_gene[m].to_numpy(dtype=np.float64)
        keep = np.isfinite(v) if nonfinite == "exclude" else ~np.isnan(v)
        out[m] = float(v[keep].mean()) if keep.any() else float("nan")
    return out


def coverage(table: Any, metric: str) -> dict[str, int]:
    """What a gene mean of ``metric`` covers: genes, slides, patients, undefined genes.

    Returns:
        ``n_genes`` (genes in the table), ``n_slides``, ``n_patients``, ``n_nan_genes`` (genes
        whose patient-then-gene value is NaN: constant truth or prediction on every slide,
        excluded from the mean), ``n_inf_genes`` (infinite, e.g. NRMSE of a constant gene:
        reported, excluded from the mean) and ``n_nan_cells`` (undefined (slide, gene) values,
        skipped inside the per-patient means).
    """
    v = gene_means(table, [metric])[metric].to_numpy(dtype=np.float64)
    return {
        "n_genes": int(v.size),
        "n_slides": int(table["slide_id"].nunique()) if "slide_id" in table else 0,
        "n_patients": int(table["patient_id"].nunique()),
        "n_nan_genes": int(np.isnan(v).sum()),
        "n_inf_genes": int(np.isinf(v).sum()),
        "n_nan_cells": int(table[metric].isna().sum()),
    }
