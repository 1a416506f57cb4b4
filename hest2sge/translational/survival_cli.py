"""``hest2sge survival``: the paper's Cox survival protocol on a table of pseudobulks + clinical data.

Examples::

    hest2sge survival --synthetic --out survival_demo            # a cohort with a known effect
    hest2sge survival --features pseudobulk.csv --clinical brca_clinical.tsv --out out/
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def _read_table(path: str, index_col: int | None = 0):
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"hest2sge survival: file not found: {p}")
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    sep = "," if p.suffix.lower() == ".csv" else "\t"
    return pd.read_csv(p, sep=sep, index_col=index_col)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hest2sge survival",
        description="Univariate Cox C-index per gene, top genes, multivariate Cox; "
                    "resubstitution and repeated k-fold CV C-index and log-rank p of the median "
                    "risk split, per breast-cancer subtype (benchmark paper protocol).")
    p.add_argument("--features", help="patients (or TCGA slide barcodes) x genes table: CSV, "
                                      "TSV or parquet, first column = identifier")
    p.add_argument("--clinical", help="clinical table (CSV/TSV): time/event/subtype columns or "
                                      "TCGA fields (vital_status, days_to_death, "
                                      "days_to_last_follow_up, ER/PR/HER2 status)")
    p.add_argument("--id-column", default=None,
                   help="patient column of the clinical table (default: auto-detect)")
    p.add_argument("--time-unit", default="years", choices=("years", "days", "months"),
                   help="unit of a 'time' column (TCGA day fields are converted anyway)")
    p.add_argument("--subtypes", default="auto",
                   help="'auto' (HER2+, TNBC, luminal when known, else all), 'all', or a "
                        "comma-separated list")
    p.add_argument("--genes", default=None, help="file with one gene per line to keep")
    p.add_argument("--top", type=int, default=5, help="genes kept by univariate C-index (paper: 5)")
    p.add_argument("--folds", type=int, default=3, help="CV folds (paper: 3)")
    p.add_argument("--repeats", type=int, default=100, help="CV repeats (paper: 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", action="store_true", help="log(x + 1) the features (bulk counts)")
    p.add_argument("--no-center", action="store_true", help="do not mean-centre the features")
    p.add_argument("--penalizer", type=float, default=0.0, help="Cox ridge penalizer (paper: 0)")
    p.add_argument("--min-patients", type=int, default=12,
                   help="smallest subtype analysed with --subtypes auto")
    p.add_argument("--synthetic", action="store_true",
                   help="analyse a synthetic cohort with a known hazard effect on GENE0 (+1) and "
                        "GENE1 (-1); its tables are written to --out")
    p.add_argument("--n-patients", type=int, default=300, help="synthetic cohort size")
    p.add_argument("--out", default="survival_output", help="output folder")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hest2sge survival``."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    from hest2sge.translational import survival as sv

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        features, clinical = sv.synthetic_cohort(n_patients=args.n_patients, tcga_fields=True,
                                                 seed=args.seed)
        features.to_csv(out / "synthetic_features.csv")
        clinical.to_csv(out / "synthetic_clinical.tsv", sep="\t", index=False)
        print(f"synthetic cohort: {len(features)} patients, {features.shape[1]} genes, true "
              f"log hazard ratios GENE0 +1, GENE1 -1; tables in {out}")
    else:
        if not args.features or not args.clinical:
            raise SystemExit("hest2sge survival: give --features and --clinical (or --synthetic)")
        features = _read_table(args.features)
        clinical = _read_table(args.clinical, index_col=None)
        if args.id_column is None and clinical.columns[0].lower() in ("", "unnamed: 0", "patient"):
            clinical = clinical.set_index(clinical.columns[0])
    if args.genes:
        wanted = [g.strip() for g in Path(args.genes).read_text().split() if g.strip()]
        missing = [g for g in wanted if g not in features.columns]
        if len(missing) == len(wanted):
            raise SystemExit(f"hest2sge survival: none of the {len(wanted)} genes of "
                             f"{args.genes} is a feature column")
        features = features[[g for g in wanted if g in features.columns]]
    clin = sv.clinical_table(clinical, id_column=args.id_column, time_unit=args.time_unit)
    if args.subtypes == "auto":
        subtypes = "auto"
    elif args.subtypes == "all":
        subtypes = None
    else:
        subtypes = [s.strip() for s in args.subtypes.split(",") if s.strip()]
    try:
        results = sv.survival_analysis(
            features, clin, subtypes=subtypes, min_patients=args.min_patients, n_top=args.top,
            folds=args.folds, repeats=args.repeats, seed=args.seed, center=not args.no_center,
            log=args.log, penalizer=args.penalizer)
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"hest2sge survival: {exc}") from exc
    table = sv.summary_table(results)
    table.to_csv(out / "summary.csv")
    (out / "summary.json").write_text(json.dumps(
        {k: r.summary() for k, r in results.items()}, indent=2, default=float))
    for name, r in results.items():
        safe = "".join(c if c.isalnum() else "_" for c in name)
        r.univariate.to_frame().to_csv(out / f"univariate_{safe}.csv")
        r.cv_risk.to_frame("cv_mean_risk").join(r.resub_risk.rename("resub_risk")).to_csv(
            out / f"risk_{safe}.csv")
        sv.plot_km(r, out / f"km_{safe}.png")
    cols = ["n_patients", "n_events", "top_genes", "resub_cindex", "resub_logrank_p",
            "cv_cindex_mean", "cv_cindex_std", "cv_folds", "cv_logrank_p"]
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(table[cols].to_string())
    print(f"protocol: {next(iter(results.values())).protocol}")
    print(f"written to {out}: summary.csv, summary.json, univariate_*.csv, risk_*.csv, km_*.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
