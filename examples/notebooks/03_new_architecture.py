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
# # Add your own architecture
#
# A model is a `SpotModel` subclass registered with `@hest2sge.register_model`: set its
# capability flags, build the layers in `__init__`, write `forward(batch)` (and `loss` when it
# is not MSE). Once registered, it runs through the model contract
# (`hest2sge.testing.check_model`: forward, backward, a real Trainer fit, a weights-only
# checkpoint round trip and `predict`), the CLI, `hest2sge models` and the benchmark, beside
# the published models.
#
# `MODE = "paper"` benchmarks the new model against ST-Net in ST-Net's paper configuration
# with paper epochs; `MODE = "tiny"` uses tiny configurations and a few epochs (tests).

# %% tags=["parameters"]
import os
from pathlib import Path

MODE = os.environ.get("HEST2SGE_NOTEBOOK_MODE", "paper")   # "paper" or "tiny"
OUT = Path(os.environ.get("HEST2SGE_NOTEBOOK_OUT", "new_architecture_output"))

# %%
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

import hest2sge
from hest2sge.testing import check_model


@hest2sge.register_model("tinyconv")
class TinyConv(hest2sge.SpotModel):
    """A small convolutional spot model: three conv blocks, global pooling, a linear head.

    Not a published method: an example of the model contract.
    """

    paper = "hest2sge example (not published)"
    input_mode = "spot"                          # one patch per spot, shuffled spots
    default_target_transform = {"kind": "log_norm"}   # log10(1 + 1e4 c / panel total)
    tiny_config = {"width": 8, "patch_size": 32}

    def __init__(self, genes: Sequence[str] | None = None, n_genes: int | None = None,
                 width: int = 32, patch_size: int = 224, lr: float = 1e-3,
                 **kwargs: Any) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size, lr=lr, **kwargs)
        layers, c = [], 3
        for i in range(3):
            layers += [nn.Conv2d(c, width * 2**i, 3, stride=2, padding=1),
                       nn.BatchNorm2d(width * 2**i), nn.ReLU()]
            c = width * 2**i
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, self.n_genes)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.head(self.backbone(self.normalize_img(batch["img"])))


report = check_model("tinyconv", width=8, patch_size=32)
report

# %% [markdown]
# The registry now knows the model: `hest2sge.load("tinyconv", ...)`, `hest2sge models`,
# `hest2sge fit --model TinyConv ...` (when its module is importable) and the benchmark.

# %%
assert "tinyconv" in hest2sge.list_models()
info = hest2sge.model_info("tinyconv")
print(info["class"], info["input_mode"], f"{info['parameters'] / 1e3:.1f} k parameters at 785 genes")
model = hest2sge.load("tinyconv", n_genes=5, width=4, patch_size=32)
with torch.no_grad():
    out = model({"img": torch.rand(2, 3, 32, 32)})
out.shape

# %% [markdown]
# ## Benchmark it beside ST-Net
# Synthetic slides of 8 patients, patient-grouped 4-fold cross-validation (2 folds train, 1
# validates, 1 tests, rotating), metrics per image then patient then gene, on each model's own
# scale and on one common depth-normalised scale. The ridge and mlp baselines are added.

# %%
config = {
    "name": "new_architecture",
    "output": str(OUT / "benchmark"),
    "seed": 0,
    "models": ["stnet", "tinyconv"],
    "baselines": True,
    "tiny": MODE == "tiny",
    "datasets": {"synthetic": {
        "slides": {"reader": "synthetic", "n_patients": 8, "slides_per_patient": 1,
                   "grid": [8, 8], "n_genes": 20, "spot_pitch_px": 32},
        "split": {"kind": "patient_kfold", "k": 4},
        "genes": "all",
    }},
    "launcher": {"kind": "local"},
}
if MODE == "tiny":
    config["epochs"] = 2
result = hest2sge.benchmark.run(config)
assert not result.failed, result.failed
result.summary[["model_id", "pred_type", "pcc", "pcc_fold_sd", "n_genes"]]
