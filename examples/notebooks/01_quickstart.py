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
# # Quick start: HER2+ sections, one model, truth vs prediction
#
# Read the five HER2+ breast cancer sections of patient C (legacy Spatial Transcriptomics,
# Andersson et al. 2021), look at them with scanpy, train ST-Net, evaluate it on a held-out
# section with the benchmark's metrics and plot truth against prediction.
#
# The parameter cell switches between `MODE = "paper"` (ST-Net's paper configuration:
# ImageNet DenseNet-121, 50 epochs; hours on a CPU) and `MODE = "tiny"` (a small random-init
# backbone for a few epochs on 32 px patches; what the test suite runs).

# %% tags=["parameters"]
import os
from pathlib import Path

MODE = os.environ.get("HEST2SGE_NOTEBOOK_MODE", "paper")   # "paper" or "tiny"
HER2ST = Path(os.environ.get("HEST2SGE_HER2ST", "her2st"))  # the almaan/her2st layout
OUT = Path(os.environ.get("HEST2SGE_NOTEBOOK_OUT", "quickstart_output"))

# %%
import lightning.pytorch as pl
import scanpy as sc

import hest2sge
from hest2sge.data import Split, read_her2st
from hest2sge.models.configs import get_record

OUT.mkdir(parents=True, exist_ok=True)
pl.seed_everything(0, workers=True)
slides = read_her2st(HER2ST)
[(s.obs["slide_id"].iloc[0], s.n_obs, s.n_vars) for s in slides]

# %% [markdown]
# Every slide is an AnnData in the scanpy/squidpy convention: raw counts in `X`, spot centres
# in `obsm["spatial"]`, the H&E in `uns["spatial"]`. scanpy plots it as it is.

# %%
s0 = slides[0]
sc.pp.calculate_qc_metrics(s0, inplace=True)
sc.pl.spatial(s0, color=["total_counts", "ERBB2"], show=False)

# %% [markdown]
# ## Train
# The five sections come from one patient, so this split is by section (C2-C4 train, C5
# validation, C6 test) and is **not** patient-grouped: numbers from it are optimistic compared
# with the paper's patient-grouped folds.

# %%
ids = [s.obs["slide_id"].iloc[0] for s in slides]
split = Split(train=ids[:3], val=[ids[3]], test=[ids[4]])
rec = get_record("stnet")
if MODE == "paper":
    genes, model_kw, epochs = "paper", {}, rec.max_epochs
    dm_kw = rec.datamodule_kwargs()
else:
    genes, epochs = "mean", 3
    model_kw = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32,
                **rec.from_scratch}
    dm_kw = {"batch_size": 32, "augment": False}
dm = hest2sge.SpotDataModule(slides, split=split, genes=genes, n_genes=50,
                             allow_patient_overlap=True, cache_dir=OUT / "cache", **dm_kw,
                             **({"patch_size": 32} if MODE == "tiny" else {}))
model = hest2sge.load("stnet", genes=dm.genes, **model_kw)
metrics = hest2sge.SpotMetrics(table_path=OUT / "test_metrics.csv")
ckpt = pl.callbacks.ModelCheckpoint(dirpath=OUT / "checkpoints", monitor="val/pcc",
                                    mode="max")
trainer = pl.Trainer(max_epochs=epochs, accelerator="auto", logger=False,
                     callbacks=[metrics, ckpt], enable_progress_bar=False,
                     enable_model_summary=False,
                     num_sanity_val_steps=0)
trainer.fit(model, dm)

# %% [markdown]
# ## Evaluate on the held-out section
# Per gene over the spots of the section, then averaged over genes (one section, one patient),
# on ST-Net's own target scale.

# %%
trainer.test(model, dm, ckpt_path="best", verbose=False)
summary = {k: round(float(v), 3) for k, v in metrics.summary.items()}
print(f"test section {split.test[0]}, {len(dm.genes)} genes, best epoch by val PCC:", summary)
assert metrics.table["gene"].nunique() == len(dm.genes)

# %% [markdown]
# ## Truth vs prediction maps

# %%
best = hest2sge.load(checkpoint=ckpt.best_model_path)
test_slide = slides[4]
pred = hest2sge.predict(best, test_slide)
pred.layers["truth"] = dm.table(split.test[0]).expr
top = metrics.table.sort_values("pcc", ascending=False)["gene"].iloc[:2].tolist()
fig = hest2sge.plotting.plot_spatial_comparison(pred, top, path=OUT / "truth_vs_pred.png")
