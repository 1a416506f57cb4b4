"""Translational analysis (the benchmark paper's TCGA half): whole-slide prediction
without spots, pseudobulk vs bulk RNA-seq, image quality (HistoQC colour metrics) and survival
(lifelines Cox models). Names are imported on first use."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # wsi.py: spot-free whole-slide prediction
    "predict_wsi": "wsi",
    "tissue_mask": "wsi",
    "WSIError": "wsi",
    # bulk.py: pseudobulk, GDC STAR reader, patient-level correlation
    "pseudobulk": "bulk",
    "read_star_counts": "bulk",
    "read_star_counts_dir": "bulk",
    "patient_correlation": "bulk",
    "summarize_correlation": "bulk",
    # qc.py: HistoQC colour metrics (its tissue mask stays qc.tissue_mask)
    "color_metrics": "qc",
    "low_res_image": "qc",
    "qc_table": "qc",
    "qc_pca": "qc",
    "qc_vs_correlation": "qc",
    # survival.py: Cox models, C-index, log-rank, Kaplan-Meier
    "clinical_table": "survival",
    "survival_analysis": "survival",
    "analyze_cohort": "survival",
    "summary_table": "survival",
    "plot_km": "survival",
    "synthetic_cohort": "survival",
    "concordance": "survival",
    "logrank": "survival",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"hest2sge.translational.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hest2sge.translational' has no attribute {name!r}")
