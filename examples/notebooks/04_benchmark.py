# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Run a benchmark and read its report
#
# `hest2sge.benchmark.run(config)` (or `hest2sge benchmark --config file.yaml`) trains and
# tests every cell of models x datasets x folds with each model's paper configuration, writes
# the test predictions as a long table, scores them with the benchmark's metrics, aggregates per
# image, then patient, then gene, ranks the models and writes a Markdown report with a summary
# heatmap. A run that is killed and started again skips the finished cells.
#
# `MODE = "paper"` runs the models in their paper configurations and paper epochs on the HER2+
# sections (one patient, five sections: section-level folds, NOT patient-grouped); `MODE =
# "tiny"` runs tiny configurations for 2 epochs on synthetic slides of 8 patients (tests).

# %% tags=["parameters"]
import os
from pathlib import Path

MODE = os.environ.get("HEST2SGE_NOTEBOOK_MODE", "paper")   # "paper" or "tiny"
HER2ST = Path(os.environ.get("HEST2SGE_HER2ST", "her2st"))  # the almaan/her2st layout
OUT = Path(os.environ.get("HEST2SGE_NOTEBOOK_OUT", "benchmark_output"))

# %%
import pandas as pd
from IPython.display import Image, Markdown, display

import hest2sge

if MODE == "paper":
    dataset = {"her2st": {"slides": {"reader": "her2st", "root": str(HER2ST)},
                          "split": {"kind": "section", "k": 5}, "genes": "her2st_785"}}
    config = {"models": ["stnet", "deeppt", "histogene", "egnv2"], "tiny": False}
else:
    dataset = {"synthetic": {
        "slides": {"reader": "synthetic", "n_patients": 8, "slides_per_patient": 1,
                   "grid": [8, 8], "n_genes": 30, "spot_pitch_px": 32},
        "split": {"kind": "patient_kfold", "k": 4}, "genes": "all"}}
    config = {"models": ["stnet"], "tiny": True, "epochs": 2}
config.update({"name": "notebook", "output": str(OUT), "seed": 0, "baselines": True,
               "aggregation": "paper", "datasets": dataset, "launcher": {"kind": "local"}})

# %% [markdown]
# `dry_run` lists the cells with an estimated cost before anything is trained.

# %%
plan = hest2sge.benchmark.run(config, dry_run=True)
plan

# %%
result = hest2sge.benchmark.run(config)
assert not result.failed, result.failed
print(f"{len(result.cells)} cells in {result.seconds:.0f} s; report: {result.report}")

# %% [markdown]
# ## Summary: means per model with their fold-level spread
# `pred_type` `own` is each model's own target scale (the paper's convention); `common`
# scores every model against one depth-normalised truth, and the reference rows (`ref_depth`,
# `ref_train_mean`) show what an image-free predictor reaches.

# %%
cols = [c for c in ["model_id", "pred_type", "pcc", "pcc_fold_sd", "ssim", "auc", "n_genes"]
        if c in result.summary.columns]
result.summary[cols]

# %% [markdown]
# ## Rankings (per metric, then per category, then overall) and the summary heatmap

# %%
for key, table in result.rankings.items():
    print(key)
    display(table)
for png in sorted(Path(result.output).glob("summary_heatmap_*.png")):
    display(Image(filename=str(png)))

# %% [markdown]
# ## Gene subsets (HVGs, SVGs, sparse genes) against all genes

# %%
subsets = pd.read_csv(Path(result.output) / "subsets.csv")
subsets.head(12)

# %% [markdown]
# ## The report, with its protocol stated

# %%
display(Markdown(Path(result.report).read_text()[:3000]))
