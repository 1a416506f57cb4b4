"""Benchmark tables: summaries with fold spread and coverage, rankings, gene-subset means.

Every mean here is the paper's aggregation (image -> patient -> gene, via
:mod:`hest2sge.metrics.aggregate`, the code ``SpotMetrics`` logs with) unless the metrics were
computed with ``aggregation="pooled"``; infinite gene values (NRMSE of a constant gene) are
counted and excluded, never averaged into inf.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from hest2sge.metrics.aggregate import coverage, gene_means, summarise

TABLE_METRICS = ("pcc", "spearman", "mi", "ssim", "auc", "js", "nrmse_range", "rmse")
LOWER_IS_BETTER = frozenset({"js", "nrmse_range", "nrmse_sd", "rmse", "sec_per_epoch",
                             "peak_rss_mb", "peak_tracemalloc_mb", "gpu_max_alloc_mb"})
#: Rank categories (a metric missing from the table is skipped). The paper ranks per metric,
#: averages ranks within its categories, then over categories; these are the categories of
#: what this package computes.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "correlation": ("pcc", "spearman"),
    "similarity": ("mi", "ssim", "auc"),
    "error": ("rmse", "nrmse_range", "js"),
    "gene subsets": ("pcc_hvg", "pcc_svg", "pcc_hsg"),
    "efficiency": ("sec_per_epoch", "peak_rss_mb"),
}
SUMMARY_KEYS = ("dataset", "model_id", "pred_type")


def summary_table(metrics, names: Sequence[str] = TABLE_METRICS,
                  keys: Sequence[str] = SUMMARY_KEYS):
    """One row per (dataset, model, scale): patient-then-gene means over all test folds,
    the spread (sd) of the per-fold means beside each, and what the mean covers.

    Columns: the keys, ``n_folds``, ``<metric>``, ``<metric>_fold_sd`` (NaN with one fold),
    ``n_genes``, ``n_slides``, ``n_patients``, ``n_undefined_genes`` (PCC NaN: constant
    truth or prediction on every image; excluded), ``n_inf_nrmse_genes`` (infinite NRMSE:
    constant truth; excluded).
    """
    import pandas as pd

    names = [m for m in names if m in metrics.columns]
    keys = [k for k in keys if k in metrics.columns]
    rows = []
    for key, sub in metrics.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        folds = sorted(sub["train_fold"].unique()) if "train_fold" in sub else []
        row["n_folds"] = len(folds)
        overall = summarise(sub, names, nonfinite="exclude")
        per_fold = [summarise(f, names, nonfinite="exclude")
                    for _, f in sub.groupby("train_fold", sort=True)] if folds else []
        for m in names:
            row[m] = overall[m]
            vals = np.array([p[m] for p in per_fold], dtype=np.float64)
            vals = vals[np.isfinite(vals)]
            row[f"{m}_fold_sd"] = float(vals.std(ddof=1)) if vals.size > 1 else float("nan")
        cov = coverage(sub, "pcc" if "pcc" in names else names[0])
        row.update(n_genes=cov["n_genes"], n_slides=cov["n_slides"],
                   n_patients=cov["n_patients"], n_undefined_genes=cov["n_nan_genes"])
        if "nrmse_range" in sub:
            row["n_inf_nrmse_genes"] = coverage(sub, "nrmse_range")["n_inf_genes"]
        rows.append(row)
    return pd.DataFrame(rows)


def fold_table(metrics, names: Sequence[str] = TABLE_METRICS):
    """Per-fold patient-then-gene means (one row per dataset, model, scale and fold)."""
    import pandas as pd

    names = [m for m in names if m in metrics.columns]
    rows = []
    for key, sub in metrics.groupby([*SUMMARY_KEYS, "train_fold"], sort=True):
        rows.append({**dict(zip([*SUMMARY_KEYS, "train_fold"], key)),
                     **summarise(sub, names, nonfinite="exclude")})
    return pd.DataFrame(rows)


def per_gene_table(metrics, names: Sequence[str] = ("pcc",)):
    """Per-gene patient-then-gene values for each (dataset, model, scale)."""
    return gene_means(metrics, names, by=SUMMARY_KEYS).reset_index()


def rank_models(table, metrics: Sequence[str] | None = None,
                categories: Mapping[str, Sequence[str]] = CATEGORIES,
                model_col: str = "model_id"):
    """Rank models per metric (1 = best, ties get the average rank, undefined values last),
    average the ranks within each category, then over categories.

    Args:
        table: One row per model with one column per metric (e.g. a :func:`summary_table`
            restricted to one dataset and scale, or with efficiency/subset columns joined).
        metrics: Metrics to rank (default: every metric of ``categories`` present).
        categories: Category -> metrics.

    Returns:
        DataFrame indexed by model with ``rank_<metric>``, ``cat_<category>`` and
        ``overall`` (lower is better), sorted by ``overall``.
    """
    import pandas as pd

    t = table.set_index(model_col)
    present = [m for c in categories.values() for m in c if m in t.columns]
    metrics = [m for m in (metrics or present) if m in t.columns]
    out = pd.DataFrame(index=t.index)
    for m in metrics:
        v = pd.to_numeric(t[m], errors="coerce").replace([np.inf, -np.inf], np.nan)
        out[f"rank_{m}"] = v.rank(method="average", ascending=m in LOWER_IS_BETTER,
                                  na_option="bottom")
    cats = []
    for c, ms in categories.items():
        cols = [f"rank_{m}" for m in ms if m in metrics]
        if cols:
            out[f"cat_{c}"] = out[cols].mean(axis=1)
            cats.append(f"cat_{c}")
    out["overall"] = out[cats].mean(axis=1) if cats else np.nan
    return out.sort_values("overall", kind="stable")
