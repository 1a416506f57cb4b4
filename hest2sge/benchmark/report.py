"""Aggregate the finished cells into tables, figures and a Markdown report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from hest2sge.benchmark.tables import (
    TABLE_METRICS,
    fold_table,
    per_gene_table,
    rank_models,
    summary_table,
)

#: The paper's source data (Fig. 3a sheet): mean PCC on the test folds of the paper's HER2+ split (785 genes, 30 HVGs,
#: 40 SVGs), own scale, image -> patient -> gene aggregation, from the paper's source data.
PAPER_HER2ST_PCC = {
    "egnv2": (0.168, 0.236, 0.284), "stnet": (0.136, 0.137, 0.220),
    "deeppt": (0.110, 0.182, 0.261), "hist2st": (0.102, 0.099, 0.104),
    "tcgn": (0.096, 0.085, 0.121), "histogene": (0.092, 0.084, 0.117),
    "genecoder": (0.084, 0.109, 0.185), "thitogene": (0.073, 0.086, 0.087),
    "deepspace": (0.061, 0.080, 0.094), "istar": (0.050, 0.089, 0.123),
    "egnv1": (0.043, 0.081, 0.108),
}
SCALE_TITLES = {
    "common": "common depth-normalised truth, ln(1 + 1e4 c / panel total) (comparable "
              "across models)",
    "own": "each model's own target scale (the paper's convention; not comparable across "
           "models, mostly measures spot depth)",
    "raw": "raw counts", "log10": "log10(1 + counts)",
}


def _read_cells(output: Path, specs) -> tuple[Any, list[dict]]:
    import pandas as pd

    frames, metas = [], []
    ids = [s.cell_id for s in specs]
    ids += sorted(p.name for p in (output / "cells").glob("*__refs__*")
                  if (p / "cell.json").is_file())
    for cid in ids:
        d = output / "cells" / cid
        if not (d / "cell.json").is_file():
            continue
        frames.append(pd.read_parquet(d / "metrics.parquet"))
        metas.append(json.loads((d / "cell.json").read_text()))
    if not frames:
        raise RuntimeError(f"no finished cells in {output / 'cells'}")
    metrics = pd.concat(frames, ignore_index=True)
    keys = ["dataset", "model_id", "pred_type", "train_fold", "slide_id", "gene"]
    return metrics.sort_values(keys, kind="stable").reset_index(drop=True), metas


def _fmt(v: Any, sd: Any = None) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a"
    s = f"{v:.3f}" if np.isfinite(v) else str(v)
    if sd is not None and not (isinstance(sd, float) and np.isnan(sd)):
        s += f" ± {sd:.3f}"
    return s


def _md_table(df, cols: list[str], heads: list[str] | None = None) -> str:
    heads = heads or cols
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _paper_protocol(cfg: dict[str, Any], ds: str, n_genes: int) -> bool:
    d = cfg["datasets"].get(ds.split("->")[0], {})
    split = d.get("split")
    return (split in ("her2st_paper", {"kind": "her2st_paper"}) and n_genes == 785
            and cfg["aggregation"] == "paper")


def _plots(output: Path, summary, per_gene, rankings: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for (ds, scale), rk in rankings.items():
        cols = [c for c in rk.columns if c.startswith("cat_")] + ["overall"]
        data = rk[cols].to_numpy(dtype=float)
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 0.9 + 0.45 * len(rk)))
        im = ax.imshow(data, cmap="RdYlBu", aspect="auto")  # low rank = red = best
        ax.set_xticks(range(len(cols)), [c.removeprefix("cat_") for c in cols], rotation=30,
                      ha="right")
        ax.set_yticks(range(len(rk)), list(rk.index))
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{ds}: average rank ({scale} scale; 1 = best)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        name = f"summary_heatmap_{_safe(ds)}_{scale}.png"
        fig.savefig(output / name, dpi=110)
        plt.close(fig)
        files.append(name)
    models = per_gene[~per_gene["model_id"].str.startswith("ref_")]
    for metric in [m for m in ("pcc", "ssim", "mi", "auc") if m in per_gene.columns]:
        for (ds, scale), sub in models.groupby(["dataset", "pred_type"], sort=True):
            names = sorted(sub["model_id"].unique())
            vals = [sub.loc[sub["model_id"] == n, metric].replace([np.inf, -np.inf], np.nan)
                    .dropna().to_numpy() for n in names]
            fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(names), 3.2))
            ax.boxplot(vals, showfliers=False)
            ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_ylabel(f"per-gene {metric}")
            ax.set_title(f"{ds} ({scale} scale)", fontsize=9)
            fig.tight_layout()
            name = f"boxplot_{metric}_{_safe(ds)}_{scale}.png"
            fig.savefig(output / name, dpi=110)
            plt.close(fig)
            files.append(name)
    return files


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)


def collect(cfg: dict[str, Any], info: dict[str, Any], specs) -> Any:
    """Read every finished cell, write the tables, figures and ``report.md``."""

    from hest2sge.benchmark.runner import BenchmarkResult
    from hest2sge.benchmark.subsets import dataset_subsets, subset_table

    output = Path(cfg["output"])
    metrics, metas = _read_cells(output, specs)
    summary = summary_table(metrics)
    folds = fold_table(metrics)
    per_gene = per_gene_table(metrics, [m for m in TABLE_METRICS if m in metrics.columns])
    summary.to_csv(output / "summary.csv", index=False)
    folds.to_csv(output / "folds.csv", index=False)
    per_gene.to_parquet(output / "per_gene.parquet", index=False)

    subsets_df, subset_genes = None, {}
    if cfg.get("subsets", True):
        for ds, d in info.items():
            genes = list(dict.fromkeys(metrics.loc[metrics["dataset"] == ds, "gene"]))
            if genes:
                subset_genes[ds] = dataset_subsets(d["slides"], d["folds"], genes)
        if subset_genes:
            subsets_df = subset_table(per_gene[per_gene["dataset"].isin(subset_genes)],
                                      subset_genes)
            subsets_df.to_csv(output / "subsets.csv", index=False)
            (output / "subsets.json").write_text(json.dumps(subset_genes, indent=1))

    rankings = {}
    models_only = summary[~summary["model_id"].str.startswith("ref_")]
    for (ds, scale), sub in models_only.groupby(["dataset", "pred_type"], sort=True):
        t = sub.copy()
        if subsets_df is not None:
            s = subsets_df[(subsets_df["dataset"] == ds) & (subsets_df["pred_type"] == scale)]
            for name in ("hvg", "svg", "hsg"):
                m = s[s["subset"] == name].set_index("model_id")["pcc"]
                t[f"pcc_{name}"] = t["model_id"].map(m)
        eff = _efficiency(cfg)
        if eff is not None:
            for col in ("sec_per_epoch", "peak_rss_mb"):
                t[col] = t["model_id"].map(eff.get(col, {}))
        if len(t) > 1:
            rk = rank_models(t)
            rankings[(ds, scale)] = rk
            rk.to_csv(output / f"rankings_{_safe(ds)}_{scale}.csv")
    figures = _plots(output, summary, per_gene, rankings)
    report = _write_report(cfg, info, summary, folds, rankings, subsets_df, subset_genes,
                           metas, figures)
    return BenchmarkResult(output=output, summary=summary, folds=folds, rankings=rankings,
                           subsets=subsets_df, report=report)


def _efficiency(cfg: dict[str, Any]) -> dict[str, dict] | None:
    path = (cfg.get("efficiency") or {}).get("profile")
    if not path or not Path(path).is_file():
        return None
    prof = json.loads(Path(path).read_text())
    ent = prof.get("models", {})
    return {c: {m: v.get(c) for m, v in ent.items()} for c in ("sec_per_epoch", "peak_rss_mb")}


def _write_report(cfg, info, summary, folds, rankings, subsets_df, subset_genes, metas,
                  figures) -> Path:
    output = Path(cfg["output"])
    model_metas = [m for m in metas if m.get("kind") == "model"]
    epochs = {}
    for m in model_metas:
        epochs.setdefault(m["model"], set()).add((m["max_epochs"], m["paper_epochs"],
                                                  m.get("epochs_trained")))
    lines = [f"# Benchmark report: {cfg['name']}", ""]
    lines += ["## Protocol", ""]
    for ds, d in info.items():
        panels = {m["panel_sha256"][:12] for m in metas if m.get("dataset") == ds}
        ngenes = {m.get("n_genes") for m in model_metas if m.get("dataset") == ds}
        gspec = cfg["datasets"][ds].get("genes", "paper")
        gdesc = f"file {Path(gspec['file']).name}" if isinstance(gspec, dict) else str(gspec)
        lines.append(f"- **{ds}**: {len(d['slides'])} slides, "
                     f"{len({s.obs['patient_id'].iloc[0] for s in d['slides']})} patient(s); "
                     f"split: {d['protocol']} (sha256 {d['split_sha256'][:12]}); gene panel: "
                     f"{gdesc}, {sorted(ngenes)} genes (panel sha256 {sorted(panels)})")
    agg = ("per image, then mean over the images of a patient, then over patients, then over "
           "genes (the paper's rule, as SpotMetrics)" if cfg["aggregation"] == "paper" else
           "pooled: over the concatenated test spots of each fold (HEST-Benchmark), then over "
           "genes")
    lines += [f"- aggregation: {agg}; undefined gene values (constant truth or prediction) are "
              "excluded and counted; infinite NRMSE (constant truth) is counted, not averaged",
              "- training: " + ("TINY model configurations (a smoke test, not the paper "
                                "configurations); " if cfg["tiny"] else "paper configurations "
                                "(configuration records); ")
              + "epochs (run / paper): " + ", ".join(
                  f"{k} {sorted(a for a, _, _ in v)[0]}/{sorted(b for _, b, _ in v)[0]}"
                  for k, v in sorted(epochs.items()))
              + "; best epoch by validation PCC unless the record keeps the last epoch"
              + "".join(f"; {m['name']} overrides {m['overrides']}" for m in cfg["models"]
                        if m["overrides"]),
              f"- seed {cfg['seed']}; provenance (version, commit, hardware, hashes): "
              "provenance.json", ""]
    for scale in ("common", "own"):
        sub = summary[summary["pred_type"] == scale]
        if sub.empty:
            continue
        lines += [f"## Results: {SCALE_TITLES[scale]}", "",
                  "Mean over genes ± sd of the per-fold means; `genes (undef.)`: genes "
                  "averaged and genes undefined for PCC.", ""]
        for ds, t in sub.groupby("dataset", sort=True):
            rk = rankings.get((ds, scale))
            order = list(rk.index) if rk is not None else []
            t = t.assign(_o=t["model_id"].map({m: i for i, m in enumerate(order)})
                         .fillna(len(order))).sort_values(["_o", "model_id"])
            rows = t.copy()
            for m in ("pcc", "spearman", "mi", "ssim", "auc", "rmse"):
                if m in rows:
                    rows[m] = [_fmt(a, b) for a, b in zip(t[m], t[f"{m}_fold_sd"])]
            rows["genes"] = [f"{a} ({b})" for a, b in zip(t["n_genes"], t["n_undefined_genes"])]
            cols = ["model_id", "pcc", "spearman", "mi", "ssim", "auc", "rmse", "genes",
                    "n_slides", "n_folds"]
            heads = ["model", "PCC", "Spearman", "MI", "SSIM", "AUC", "RMSE",
                     "genes (undef.)", "slides", "folds"]
            if scale == "own" and _paper_protocol(cfg, ds, int(t["n_genes"].max())):
                rows["paper"] = rows["model_id"].map(
                    lambda m: PAPER_HER2ST_PCC.get(m, ("-",))[0])
                cols.append("paper")
                heads.append("paper PCC (source data)")
            lines += [f"### {ds}", "", _md_table(rows, cols, heads), ""]
    refs = summary[summary["model_id"].str.startswith("ref_")]
    if not refs.empty:
        lines += ["## Reference rows without an image (the depth confound)", "",
                  "`ref_depth` predicts log(1 + spot total UMI) for every gene; "
                  "`ref_train_mean` the training mean (constant: correlations undefined). "
                  "A high own-scale score for `ref_depth` means that scale rewards knowing "
                  "spot depth, not morphology.", ""]
        r = refs.copy()
        r["pcc"] = [_fmt(a, b) for a, b in zip(r["pcc"], r["pcc_fold_sd"])]
        r["rmse"] = [_fmt(a, b) for a, b in zip(r["rmse"], r["rmse_fold_sd"])]
        lines += [_md_table(r.sort_values(["dataset", "model_id", "pred_type"]),
                            ["dataset", "model_id", "pred_type", "pcc", "rmse",
                             "n_undefined_genes"],
                            ["dataset", "reference", "truth scale", "PCC", "RMSE",
                             "undefined genes"]), ""]
    if rankings:
        lines += ["## Rankings", "", "Rank per metric (1 = best, ties averaged), averaged "
                  "within categories, then over categories.", ""]
        for (ds, scale), rk in rankings.items():
            t = rk.reset_index()
            cols = [c for c in t.columns if c.startswith("cat_")] + ["overall"]
            for c in cols:
                t[c] = t[c].map(lambda v: f"{v:.2f}")
            lines += [f"### {ds}, {scale} scale", "",
                      _md_table(t, ["model_id", *cols],
                                ["model", *[c.removeprefix("cat_") for c in cols]]), ""]
    if subsets_df is not None and not subsets_df.empty:
        lines += ["## Gene subsets", "", "HVG: scran-modelGeneVar-like, top 10 %; SVG: "
                  "Moran's I (BH p < 0.05, top 20 per image; the paper uses SPARK-X, R only); "
                  "HSG: sparsity > 0.6 in training and test. p: one-sided Wilcoxon rank-sum, "
                  "subset > all genes.", ""]
        s = subsets_df[~subsets_df["model_id"].str.startswith("ref_")].copy()
        s["pcc"] = s["pcc"].map(_fmt)
        s["wilcoxon_p_greater"] = s["wilcoxon_p_greater"].map(lambda v: f"{v:.2g}")
        lines += [_md_table(s, ["dataset", "pred_type", "model_id", "subset", "n_genes",
                                "n_defined", "pcc", "wilcoxon_p_greater"],
                            ["dataset", "scale", "model", "subset", "genes", "defined",
                             "PCC", "p"]), ""]
    lines += ["## Per-fold means (PCC)", ""]
    f = folds[~folds["model_id"].str.startswith("ref_")].copy()
    f["pcc"] = f["pcc"].map(_fmt)
    lines += [_md_table(f, ["dataset", "pred_type", "model_id", "train_fold", "pcc"]), ""]
    lines += ["## Figures", ""] + [f"![{n}]({n})" for n in figures] + [""]
    lines += ["## Cells", "", _md_table(
        _cells_frame(model_metas), ["cell_id", "epochs_trained", "best_checkpoint", "seconds"]),
        ""]
    path = output / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cells_frame(metas):
    import pandas as pd

    df = pd.DataFrame(metas or [{"cell_id": "", "epochs_trained": "", "best_checkpoint": "",
                                  "seconds": 0.0}])
    df["seconds"] = df["seconds"].map(lambda v: f"{float(v):.1f}")
    return df.sort_values("cell_id")
