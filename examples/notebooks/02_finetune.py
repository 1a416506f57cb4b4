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
# # Fine-tune a trained model on a new gene panel
#
# A model trained on one gene panel keeps its trunk (the image encoder) when it is loaded for
# another panel: `hest2sge.load(checkpoint=..., genes=new_panel)` re-initialises the output
# head, keeping the rows of genes both panels share, and says so. We first train the head
# alone with the trunk frozen (`freeze_backbone()`), then everything (`unfreeze_backbone()`),
# and compare with a head trained from scratch on the same frozen trunk budget. Finally the
# model is shared as safetensors + JSON (`save_pretrained` / `from_pretrained`).
#
# `MODE = "paper"` uses ST-Net's paper configuration (ImageNet DenseNet-121, 50 epochs);
# `MODE = "tiny"` a small random-init backbone on 32 px patches (what the tests run).

# %% tags=["parameters"]
import os
from pathlib import Path

MODE = os.environ.get("HEST2SGE_NOTEBOOK_MODE", "paper")   # "paper" or "tiny"
HER2ST = Path(os.environ.get("HEST2SGE_HER2ST", "her2st"))  # the almaan/her2st layout
OUT = Path(os.environ.get("HEST2SGE_NOTEBOOK_OUT", "finetune_output"))

# %%
import lightning.pytorch as pl

import hest2sge
from hest2sge.data import Split, read_her2st, top_mean_genes
from hest2sge.models.configs import get_record

OUT.mkdir(parents=True, exist_ok=True)
slides = read_her2st(HER2ST)
ids = [s.obs["slide_id"].iloc[0] for s in slides]
# One patient (C): a section-level split, not patient-grouped.
split = Split(train=ids[:3], val=[ids[3]], test=[ids[4]])
rec = get_record("stnet")
if MODE == "paper":
    model_kw, epochs, dm_kw = {}, rec.max_epochs, dict(rec.datamodule_kwargs())
else:
    model_kw = {"backbone": "test_resnet", "pretrained": False, "patch_size": 32,
                **rec.from_scratch}
    epochs, dm_kw = 3, {"batch_size": 32, "augment": False, "patch_size": 32}

ranked = top_mean_genes([s for s in slides if s.obs["slide_id"].iloc[0] in split.train], n=80)
panel_a, panel_b = ranked[:40], ranked[20:80]        # 20 genes shared, 40 new
print(f"panel A: {len(panel_a)} genes; panel B: {len(panel_b)} genes, "
      f"{len(set(panel_a) & set(panel_b))} shared")


def trainer(max_epochs: int, tag: str) -> pl.Trainer:
    return pl.Trainer(max_epochs=max_epochs, accelerator="auto", logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0,
                      callbacks=[hest2sge.SpotMetrics()],
                      default_root_dir=OUT / tag, enable_checkpointing=False)


# %% [markdown]
# ## 1. Train on panel A and save a checkpoint

# %%
pl.seed_everything(0, workers=True)
dm_a = hest2sge.SpotDataModule(slides, split=split, genes=panel_a, allow_patient_overlap=True,
                               cache_dir=OUT / "cache", **dm_kw)
model_a = hest2sge.load("stnet", genes=dm_a.genes, **model_kw)
t = trainer(epochs, "panel_a")
t.fit(model_a, dm_a)
ckpt = OUT / "panel_a.ckpt"
t.save_checkpoint(ckpt)

# %% [markdown]
# ## 2. Load it for panel B: the trunk is kept, the head re-initialised
# Then train the head only (trunk frozen) and fine-tune end to end.

# %%
dm_b = hest2sge.SpotDataModule(slides, split=split, genes=panel_b, allow_patient_overlap=True,
                               cache_dir=OUT / "cache", **dm_kw)
pl.seed_everything(1, workers=True)
tuned = hest2sge.load(checkpoint=ckpt, genes=dm_b.genes)
tuned.freeze_backbone()
trainer(max(1, epochs // 2), "head").fit(tuned, dm_b)
tuned.unfreeze_backbone()
t_ft = trainer(max(1, epochs // 2), "finetune")
t_ft.fit(tuned, dm_b)
tuned_val = t_ft.validate(tuned, dm_b, verbose=False)[0]

# %% [markdown]
# The same budget from a freshly initialised model (no transfer) for comparison. In the tiny
# setting (a random-init trunk trained for a few epochs) the comparison says little either way:
# what transfers is what the trunk learned on panel A. With the paper setting (an ImageNet
# trunk, 50 epochs on panel A) the fine-tuned model starts from a trained encoder.

# %%
pl.seed_everything(1, workers=True)
fresh = hest2sge.load("stnet", genes=dm_b.genes, **model_kw)
t_fresh = trainer(2 * max(1, epochs // 2), "fresh")
t_fresh.fit(fresh, dm_b)
fresh_val = t_fresh.validate(fresh, dm_b, verbose=False)[0]
print(f"validation loss on panel B after {2 * max(1, epochs // 2)} epochs "
      f"(section {split.val[0]}): fine-tuned {tuned_val['val/loss']:.4f}, "
      f"fresh {fresh_val['val/loss']:.4f}")
print(f"validation PCC: fine-tuned {tuned_val['val/pcc']:.3f}, fresh {fresh_val['val/pcc']:.3f}")

# %% [markdown]
# ## 3. Share it: safetensors + JSON, loadable with `from_pretrained`

# %%
folder = OUT / "stnet_panel_b"
tuned.save_pretrained(folder)
again = hest2sge.SpotModel.from_pretrained(folder)
assert again.genes == tuned.genes
sorted(p.name for p in folder.iterdir())
