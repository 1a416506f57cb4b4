"""``hest2sge demo``: ST-Net on synthetic slides, end to end, in a few minutes on a laptop CPU."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


def run_demo(out: str | os.PathLike = "demo_output", epochs: int = 5,
             backbone: str = "resnet18", seed: int = 0, quiet: bool = False) -> dict:
    """Train ST-Net (small backbone, random init) on synthetic slides and evaluate held-out
    patients.

    Synthetic slides (4 patients x 2 sections) are split by patient (2 train, 1 validation,
    1 test); the best epoch by validation PCC is tested. Writes ``test_metrics.csv`` (one row
    per slide and gene) and ``demo.png`` (truth vs prediction maps of two image-dependent genes
    of a test slide) into ``out``.

    Args:
        out: Output folder.
        epochs: Training epochs.
        backbone: timm backbone (ImageNet weights are not needed: trained from scratch).
        seed: Seed of the data and of training.
        quiet: Do not print the summary.

    Returns:
        Summary dict: test metrics over all genes, PCC over image-dependent and
        image-independent genes, elapsed seconds, and the output paths.
    """
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    import hest2sge
    from hest2sge.data import SpotDataModule, patient_kfold, synthetic_slides
    from hest2sge.plotting import plot_spatial_comparison

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, workers=True)
    slides = synthetic_slides(n_patients=4, slides_per_patient=2, seed=seed)
    split = patient_kfold(slides, k=4, fold=0)
    dm = SpotDataModule(slides, split, genes="all", batch_size=32, patch_size=64)
    model = hest2sge.load("stnet", genes=dm.genes, backbone=backbone, pretrained=False,
                          patch_size=64, optimizer="adam", lr=1e-3, loss_reduction="mean",
                          target_transform={"kind": "log_norm", "base": "e"})
    metrics = hest2sge.SpotMetrics(table_path=out / "test_metrics.csv")
    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", monitor="val/pcc", mode="max")
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False,
                         callbacks=[metrics, ckpt], enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    trainer.test(model, dm, ckpt_path="best", verbose=False)
    table = metrics.table
    image_genes = set(slides[0].var_names[slides[0].var["image_dependent"].to_numpy()])
    summary = dict(metrics.summary)
    per_gene = table.groupby("gene")["pcc"].mean()
    summary["pcc_image_genes"] = float(per_gene[per_gene.index.isin(image_genes)].mean())
    summary["pcc_other_genes"] = float(per_gene[~per_gene.index.isin(image_genes)].mean())

    best = hest2sge.load(checkpoint=ckpt.best_model_path)
    test_slide = next(s for s in slides if s.obs["slide_id"].iloc[0] == split.test[0])
    pred = hest2sge.predict(best, test_slide)
    pred.layers["truth"] = dm.table(split.test[0]).expr
    top = per_gene[per_gene.index.isin(image_genes)].sort_values(ascending=False).index[:2]
    png = out / "demo.png"
    plot_spatial_comparison(pred, list(top), path=png,
                            title=f"ST-Net on held-out slide {split.test[0]}")
    summary["seconds"] = time.time() - t0
    summary["png"] = str(png)
    summary["table"] = str(out / "test_metrics.csv")
    if not quiet:
        print(f"\nhest2sge demo: ST-Net ({backbone}) trained {epochs} epochs on "
              f"{len(split.train)} slides, tested on patient(s) of {split.test}")
        for k in ("pcc", "spearman", "mi", "ssim", "auc", "js", "nrmse_range", "rmse"):
            if k in summary:
                print(f"  test {k:12s} {summary[k]: .3f}")
        print(f"  PCC on {len(image_genes)} image-dependent genes: "
              f"{summary['pcc_image_genes']:.3f}; on the other genes: "
              f"{summary['pcc_other_genes']:.3f}")
        print(f"  spatial maps: {png}\n  metrics table: {summary['table']}\n"
              f"  elapsed: {summary['seconds']:.0f} s")
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v)
            for k, v in summary.items()}


def main(argv: list[str] | None = None) -> int:
    """``hest2sge demo``: parse the options and run :func:`run_demo`."""
    import argparse

    p = argparse.ArgumentParser(prog="hest2sge demo",
                                description="Train ST-Net on synthetic slides and evaluate it.")
    p.add_argument("--out", default="demo_output", help="output folder (PNG, metrics table)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run_demo(out=args.out, epochs=args.epochs, backbone=args.backbone, seed=args.seed)
    return 0
