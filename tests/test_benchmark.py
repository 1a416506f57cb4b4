"""The benchmark: split hash, aggregation vs numpy, rankings in noise order, region folds,
configs, evaluate() on external slides, and real-sized tables from the 36 HER2+ sections."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hest2sge.benchmark.scoring import long_frame, metrics_from_long
from hest2sge.benchmark.splits import (
    PAPER_SPLIT_SHA256,
    her2st_paper_folds,
    paper_split_definition,
    region_folds,
)
from hest2sge.benchmark.tables import rank_models, summary_table

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the paper split
def test_paper_split_file_hash_and_content(monkeypatch):
    import hest2sge.benchmark.splits as sp

    raw = sp._split_bytes()
    assert hashlib.sha256(raw).hexdigest() == PAPER_SPLIT_SHA256
    assert PAPER_SPLIT_SHA256 == "5f5df29557be083e088e8547e95561b098a5f23573280803034c3ccc9d23ec55"
    # SPEC.md 7b: fold -> (test patients, validation patient)
    spec = {0: ("AH", "F"), 1: ("BE", "A"), 2: ("CG", "E"), 3: ("DF", "H")}
    folds = her2st_paper_folds()
    for i, f in enumerate(folds):
        test_p, val_p = spec[i]
        assert {s[0] for s in f.test} == set(test_p)
        assert {s[0] for s in f.val} == set(val_p)
        assert {s[0] for s in f.train} == set("ABCDEFGH") - set(test_p) - set(val_p)
        assert len(f.train) + len(f.val) + len(f.test) == 36
    assert sorted(s for f in folds for s in f.test) == sorted(
        s for secs in paper_split_definition()["sections"].values() for s in secs)
    # a modified file is refused
    monkeypatch.setattr(sp, "_split_bytes", lambda: raw.replace(b'"F"', b'"G"', 1))
    with pytest.raises(ValueError, match="sha256"):
        sp.paper_split_definition()


# ----------------------------------------------------------------------------- long tables
def _long(rng, noise: dict[str, float], n_pat=4, imgs=2, spots=40, genes=12, folds=2):
    """Hand-made predictions: truth + noise of a known level per model."""
    frames = []
    gnames = [f"g{i}" for i in range(genes)]
    for p in range(n_pat):
        for i in range(imgs):
            truth = rng.gamma(2.0, 1.0, (spots, genes))
            counts = rng.poisson(truth * 3)
            for model, sd in noise.items():
                pred = truth + rng.normal(0, sd, truth.shape)
                frames.append(long_frame(pred, truth, counts, img_id=f"P{p}_{i}",
                                         patient_id=f"P{p}", model_id=model, pred_type="own",
                                         train_fold=p % folds, genes=gnames,
                                         patch_ids=[f"s{j}" for j in range(spots)],
                                         dataset="d"))
    return pd.concat(frames, ignore_index=True)


def _pcc(a, b):
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def test_aggregation_equals_numpy_on_the_long_table():
    rng = np.random.default_rng(0)
    long = _long(rng, {"m": 0.7})
    # a gene constant on one image of patient P0: undefined there, averaged elsewhere
    sel = (long["img_id"] == "P0_0") & (long["gene"] == "g3")
    long.loc[sel, "exprs"] = 1.0
    metrics = metrics_from_long(long)
    summ = summary_table(metrics).set_index("model_id").loc["m"]

    def direct(df):
        per_img = {}
        for img, g in df.groupby("img_id"):
            pred = g["pred"].to_numpy().reshape(-1, 12)
            tru = g["exprs"].to_numpy().reshape(-1, 12)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_img[img] = (g["patient_id"].iloc[0], _pcc(pred, tru))
        pats = {}
        for _, (p, v) in per_img.items():
            pats.setdefault(p, []).append(v)
        per_pat = np.array([np.nanmean(np.stack(v), 0) for v in pats.values()])
        return np.nanmean(np.nanmean(per_pat, 0))

    assert summ["pcc"] == pytest.approx(direct(long), abs=1e-12)
    fold_means = [direct(long[long["train_fold"] == f]) for f in ("0", "1")]
    assert summ["pcc_fold_sd"] == pytest.approx(np.std(fold_means, ddof=1), abs=1e-12)
    assert summ["n_genes"] == 12 and summ["n_slides"] == 8 and summ["n_patients"] == 4
    assert summ["n_undefined_genes"] == 0  # defined on the other image of P0

    # pooled aggregation: PCC over the concatenated test spots of each fold
    pooled = summary_table(metrics_from_long(long, "pooled")).iloc[0]
    exp = []
    for f in ("0", "1"):
        g = long[long["train_fold"] == f]
        exp.append(_pcc(g["pred"].to_numpy().reshape(-1, 12), g["exprs"].to_numpy()
                        .reshape(-1, 12)))
    assert pooled["pcc"] == pytest.approx(np.mean(np.mean(exp, 0)), abs=1e-12)


def test_undefined_and_infinite_values_are_counted_not_averaged():
    rng = np.random.default_rng(1)
    long = _long(rng, {"m": 0.5}, n_pat=2, imgs=1, folds=1)
    long.loc[long["gene"] == "g0", "exprs"] = 2.0  # constant truth everywhere
    row = summary_table(metrics_from_long(long)).iloc[0]
    assert row["n_undefined_genes"] == 1 and row["n_inf_nrmse_genes"] == 1
    assert np.isfinite(row["nrmse_range"]) and np.isfinite(row["pcc"])
    # the callback's summary keeps its behaviour: the infinite gene makes NRMSE infinite
    from hest2sge.metrics.callback import summarise

    m = metrics_from_long(long)
    assert np.isinf(summarise(m, ["nrmse_range"])["nrmse_range"])


def test_rankings_follow_noise_order():
    rng = np.random.default_rng(2)
    noise = {"m_a": 0.2, "m_b": 0.6, "m_c": 1.5, "m_d": 4.0}
    summ = summary_table(metrics_from_long(_long(rng, noise)))
    rk = rank_models(summ)
    assert list(rk.index) == list(noise)
    assert list(rk["rank_pcc"]) == [1.0, 2.0, 3.0, 4.0]
    assert list(rk["rank_rmse"]) == [1.0, 2.0, 3.0, 4.0]  # lower is better
    # ties share the average rank
    tied = summ[summ["model_id"].isin(["m_a", "m_b"])].copy()
    tied["pcc"] = 0.5
    assert list(rank_models(tied, ["pcc"])["rank_pcc"]) == [1.5, 1.5]


# ----------------------------------------------------------------------------- folds, configs
def test_region_folds_cover_one_slide_without_overlap():
    from hest2sge.data import synthetic_slides

    slide = synthetic_slides(n_patients=1, slides_per_patient=1, grid=(8, 8), n_genes=6,
                             spot_pitch_px=16)[0]
    regions, folds = region_folds(slide, 4)
    names = [set(r.obs_names) for r in regions]
    assert sum(len(n) for n in names) == slide.n_obs
    assert set().union(*names) == set(slide.obs_names)
    assert [f.test for f in folds] == [[r.obs["slide_id"].iloc[0]] for r in regions]
    for f in folds:
        assert not set(f.test) & set(f.val) and not set(f.train) & set(f.test)


def test_config_errors_name_the_problem(tmp_path):
    from hest2sge.benchmark import load_config

    base = {"datasets": {"d": {"slides": {"reader": "synthetic"}}}, "models": ["stnet"]}
    with pytest.raises(ValueError, match="unknown benchmark config key"):
        load_config({**base, "modles": []})
    with pytest.raises(KeyError, match="stnet"):
        load_config({**base, "models": ["stnett"]})
    cfg = load_config(base)
    assert [m["name"] for m in cfg["models"]] == ["stnet", "ridge", "mlp"]  # baselines


def test_dry_run_of_the_paper_config(capsys, tmp_path, monkeypatch):
    from hest2sge.benchmark import dry_run, load_config

    monkeypatch.delenv("HER2ST_ROOT", raising=False)
    cfg = load_config(ROOT / "benchmarks" / "configs" / "her2st_paper.yaml")
    cfg["output"] = str(tmp_path)
    res = dry_run(cfg)
    table = res.summary
    assert len(table) == 13 * 4
    assert set(table["model"]) >= {"stnet", "hist2st", "istar", "ridge", "mlp"}
    # fold 0 trains on patients B, C, D, E, G (24 sections)
    row = table[(table["model"] == "stnet") & (table["fold"] == 0)].iloc[0]
    assert row["train_spots"] == 24 * 378 and row["epochs"] >= 1
    # the shipped CPU efficiency profile covers every model: every cell has an estimate
    assert table["est_hours"].notna().all() and (table["est_hours"] > 0).all()
    slow = table.groupby("model")["est_hours"].sum()
    assert slow["deepspace"] > slow["ridge"]
    assert "dry run of her2st_paper: 52 cells" in capsys.readouterr().out
    assert (tmp_path / "dry_run.csv").is_file()


# ----------------------------------------------------------------------------- real-sized tables
def _read_counts(path: Path, genes: list[str]) -> pd.DataFrame:
    """Only the wanted gene columns of a 15k-column counts table (pyarrow, fast)."""
    import gzip

    import pyarrow.csv as pc

    with gzip.open(path, "rt") as fh:
        head = fh.readline().rstrip("\n").split("\t")
    have = set(head)
    tab = pc.read_csv(path, parse_options=pc.ParseOptions(delimiter="\t"),
                      convert_options=pc.ConvertOptions(
                          include_columns=[head[0]] + [g for g in genes if g in have]))
    df = tab.to_pandas().set_index(head[0])
    return df.reindex(columns=genes, fill_value=0)


@pytest.fixture(scope="module")
def her2st_counts_long(data_root):
    """Truth from all 36 HER2+ sections (40 panel genes), hand-made predictions by noise level,
    the paper's test folds."""
    root = data_root / "her2st_counts"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    panel = [g.strip() for g in (data_root / "panels" / "her2st_785.txt").read_text().split()]
    genes = panel[:40]
    rng = np.random.default_rng(3)
    noise = {"good": 0.3, "fair": 1.0, "poor": 3.0}
    fold_of = {s: i for i, f in enumerate(her2st_paper_folds()) for s in f.test}
    frames, slides = [], {}
    for sec in sorted(fold_of):
        cnt = _read_counts(root / "ST-cnts" / f"{sec}.tsv.gz", genes)
        counts = cnt.to_numpy(dtype=np.float64)
        truth = np.log1p(counts)
        slides[sec] = counts
        for model, sd in noise.items():
            pred = truth + rng.normal(0, sd, truth.shape)
            frames.append(long_frame(pred, truth, counts, img_id=sec, patient_id=sec[0],
                                     model_id=model, pred_type="own", train_fold=fold_of[sec],
                                     genes=genes, patch_ids=list(cnt.index), dataset="her2st"))
    return pd.concat(frames, ignore_index=True), slides, genes


def test_rankings_and_aggregation_on_her2st_sized_tables(her2st_counts_long):
    long, slides, genes = her2st_counts_long
    metrics = metrics_from_long(long)
    summ = summary_table(metrics)
    assert set(summ["n_slides"]) == {36} and set(summ["n_patients"]) == {8}
    assert set(summ["n_folds"]) == {4}
    assert list(rank_models(summ).index) == ["good", "fair", "poor"]
    # direct numpy: per section PCC, mean per patient, per gene, then over genes
    g = long[long["model_id"] == "fair"]
    per_pat: dict[str, list] = {}
    for sec, sub in g.groupby("img_id"):
        with np.errstate(invalid="ignore", divide="ignore"):
            per_pat.setdefault(sec[0], []).append(
                _pcc(sub["pred"].to_numpy().reshape(-1, len(genes)),
                     sub["exprs"].to_numpy().reshape(-1, len(genes))))
    with np.errstate(invalid="ignore"):
        pats = np.array([np.nanmean(np.stack(v), 0) for v in per_pat.values()])
        gene_vals = np.nanmean(pats, 0)
    exp = np.nanmean(gene_vals)
    row = summ.set_index("model_id").loc["fair"]
    assert row["pcc"] == pytest.approx(exp, abs=1e-12)
    assert row["n_undefined_genes"] == int(np.isnan(gene_vals).sum())


def test_efficiency_profile_of_a_tiny_model():
    from hest2sge.benchmark.efficiency import profile
    from hest2sge.data import synthetic_slides

    slide = synthetic_slides(n_patients=1, slides_per_patient=1, grid=(4, 4), n_genes=10,
                             spot_pitch_px=32)[0]
    res = profile(["mlp", "histogene"], slide, epochs=2, n_genes=10, tiny=True,
                  overrides={"pretrained": False})  # histogene has no `pretrained`: ignored
    for name in ("mlp", "histogene"):
        r = res["models"][name]
        assert "error" not in r, r
        assert r["sec_per_epoch"] > 0 and r["first_epoch_s"] > 0 and r["spots"] == 16
        assert r["peak_rss_mb"] > 10 and r["peak_tracemalloc_mb"] >= 0
    assert res["hardware"]["cpu_count"] >= 1


def test_evaluate_scores_external_slides_like_the_benchmark():
    import lightning.pytorch as pl

    import hest2sge
    from hest2sge.data import SpotDataModule, synthetic_slides

    train = synthetic_slides(n_patients=3, slides_per_patient=1, grid=(5, 5), n_genes=8,
                             spot_pitch_px=32, seed=4)
    external = synthetic_slides(n_patients=2, slides_per_patient=1, grid=(5, 5), n_genes=8,
                                spot_pitch_px=32, seed=9)
    model = hest2sge.load("ridge", genes=list(train[0].var_names),
                          **hest2sge.registry.get_model_class("ridge").tiny_config)
    dm = SpotDataModule.for_model(model, train, split={"train": ["P0_S0", "P1_S0"],
                                                       "val": ["P2_S0"]}, batch_size=16)
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False,
               num_sanity_val_steps=0).fit(model, dm)
    ev = hest2sge.evaluate(model, external, reference_slides=train)
    assert set(ev.long["img_id"]) == {"P0_S0", "P1_S0"}
    assert {"ridge", "ref_depth", "ref_train_mean"} == set(ev.summary["model_id"])
    # the own-scale PCC equals numpy on hest2sge.predict + the model's transform of the truth
    vals = []
    for s in external:
        pred = hest2sge.predict(model, s).layers["pred"]
        c = np.asarray(s.X.toarray() if hasattr(s.X, "toarray") else s.X, dtype=np.float64)
        truth = np.log1p(1e4 * c / c.sum(1, keepdims=True))
        vals.append(_pcc(np.asarray(pred, dtype=np.float64), truth))
    with np.errstate(invalid="ignore"):
        expected = np.nanmean(np.nanmean(vals, 0))
    row = ev.summary[(ev.summary["model_id"] == "ridge") & (ev.summary["pred_type"] == "own")]
    assert row["pcc"].iloc[0] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="lacks .* gene"):
        hest2sge.evaluate(model, [external[0][:, :5].copy()])


def test_gene_subsets_find_planted_genes():
    from hest2sge.benchmark.subsets import hsg_genes, hvg_genes, morans_i, subset_table

    rng = np.random.default_rng(5)
    n, g = 400, 40
    genes = [f"g{i}" for i in range(g)]
    counts = rng.poisson(5.0, (n, g)).astype(float)
    counts[:, :4] = rng.poisson(rng.gamma(0.3, 20.0, (n, 4)))  # over-dispersed: HVGs
    assert set(hvg_genes(counts, genes)) == {"g0", "g1", "g2", "g3"}
    # Moran's I: a smooth spatial gradient vs noise on a 20 x 20 grid
    yy, xx = np.mgrid[0:20, 0:20]
    xy = np.stack([xx.ravel(), yy.ravel()], 1).astype(float)
    vals = np.stack([xx.ravel() + rng.normal(0, 1, n), rng.normal(0, 1, n)], 1)
    moran, p = morans_i(vals, xy)
    assert moran[0] > 0.7 and p[0] < 1e-6
    assert abs(moran[1]) < 0.15 and p[1] > 1e-3
    sparse = counts.copy()
    sparse[: int(0.7 * n), 5] = 0  # 70 % zeros in both halves
    sparse[: n // 2, 6] = 0        # sparse only in the training half
    tr, te = sparse[::2], sparse[1::2]
    assert hsg_genes(tr, te, genes) == ["g5"]
    # subset > all genes: one-sided Wilcoxon
    per_gene = pd.DataFrame({"dataset": "d", "model_id": "m", "pred_type": "own",
                             "gene": genes, "pcc": np.r_[np.full(4, 0.8), np.zeros(g - 4)]})
    t = subset_table(per_gene, {"hvg": genes[:4], "rest": genes[4:]}).set_index("subset")
    assert t.loc["hvg", "pcc"] == pytest.approx(0.8) and t.loc["hvg", "wilcoxon_p_greater"] < 0.01
    assert t.loc["rest", "wilcoxon_p_greater"] > 0.5
