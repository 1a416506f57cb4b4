"""Image-quality analysis of the paper (Fig. 4a) run end to end on the five HER2+ sections.

Run: ``.venv/bin/python benchmarks/translational_her2st.py [--her2st ../shared/data/her2st]
[--out translational_her2st]``.

1. HistoQC colour metrics of each section's H&E image (JPEG decoded at reduced size, resampled
   to ~8 µm/px, HistoQC's 1.25x working size, with each section's estimated pixel size), on the
   HistoQC-style tissue mask; PCA of the scaled metrics.
2. A patient-level correlation per section. There is no bulk RNA-seq for these sections and no
   trained model is run here, so both sides are stand-ins, stated in the output:

   * "bulk" = the section's summed spot counts (a pseudo bulk RNA-seq of its measured spots);
   * "prediction" = a leave-one-section-out baseline that ignores the image: the mean spot
     counts of the other four sections, through :func:`pseudobulk` (raw target transform);
   * genes: the 785-gene HER2+ panel; Pearson of log(pred + 1) vs log(bulk) over genes with
     log(bulk) > 5 (the paper's filter).
3. PC1 vs that correlation: Spearman (and Pearson), scatter plot PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from hest2sge.data import read_her2st
from hest2sge.translational.bulk import patient_correlation, pseudobulk, summarize_correlation
from hest2sge.translational.qc import qc_pca, qc_table, qc_vs_correlation

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--her2st", default=str(ROOT.parent / "shared" / "data" / "her2st"))
    p.add_argument("--panel", default=str(ROOT.parent / "shared" / "data" / "panels" /
                                          "her2st_785.txt"))
    p.add_argument("--out", default="translational_her2st")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    slides = read_her2st(args.her2st)
    names = [str(s.obs["slide_id"].iloc[0]) for s in slides]
    entries = [s.uns["spatial"][n] for s, n in zip(slides, names)]
    mpp = {n: float(e["pixel_size_um"]) for n, e in zip(names, entries)}
    paths = {n: e["image_path"] for n, e in zip(names, entries)}

    t0 = time.perf_counter()
    qc = qc_table(paths, mpp=mpp)
    t_qc = time.perf_counter() - t0
    pca = qc_pca(qc)

    panel = [g.strip() for g in Path(args.panel).read_text().split() if g.strip()]
    genes = [g for g in panel if all(g in s.var_names for s in slides)]
    counts = {n: np.asarray(s[:, genes].X.toarray() if hasattr(s.X, "toarray")
                            else s[:, genes].X, dtype=np.float64) for n, s in zip(names, slides)}
    bulk = pd.DataFrame({n: c.sum(0) for n, c in counts.items()}, index=genes).T
    preds = []
    for n in names:
        other = np.vstack([counts[m] for m in names if m != n])
        a = ad.AnnData(X=other.astype(np.float32))
        a.var_names = genes
        a.layers["pred"] = a.X.copy()
        a.uns["hest2sge"] = {"slide_id": n, "target_transform": {"kind": "raw"}}
        preds.append(a)
    pb = pseudobulk(preds, groupby=None)
    corr = patient_correlation(pb, bulk)
    stats = qc_vs_correlation(pca["scores"]["PC1"], corr["r"], path=out / "pc1_vs_corr.png",
                              title="HER2+ C2..C6 (stand-in correlation, see docstring)")

    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(f"HistoQC colour metrics (~8 um/px, HistoQC-style tissue mask), {t_qc:.1f} s for "
              f"{len(names)} sections:")
        print(qc.to_string())
        print("\nPCA of scaled metrics: explained variance ratio",
              pca["explained"].round(3).to_dict())
        print("PC1 loadings:", pca["loadings"]["PC1"].round(3).to_dict())
        print("PC1 scores:", pca["scores"]["PC1"].round(3).to_dict())
        print(f"\nStand-in patient-level correlation ({corr.attrs['protocol']}; prediction = "
              "leave-one-section-out mean spot counts, bulk = summed spot counts):")
        print(corr.to_string())
        print("summary:", {k: round(v, 4) for k, v in summarize_correlation(corr).items()})
        print("\nPC1 vs correlation:", {k: round(v, 4) for k, v in stats.items()})
    qc.to_csv(out / "qc_metrics.csv")
    corr.to_csv(out / "patient_correlation.csv")
    (out / "pc1_vs_corr.json").write_text(json.dumps(stats, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
