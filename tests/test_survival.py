"""Survival protocol: C-index, log-rank, univariate Cox ranking, CV on a cohort with a known effect."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

pytest.importorskip("lifelines")

from lifelines import CoxPHFitter  # noqa: E402
from lifelines.utils import concordance_index  # noqa: E402

from hest2sge.translational import survival as sv  # noqa: E402


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 15, n).astype(float)  # many tied times
    event = rng.random(n) < 0.6
    risk = np.round(rng.normal(size=(n, 3)), 1)  # tied risks
    return time, event, risk


def test_concordance_matches_direct_pair_count_and_lifelines():
    time, event, risk = _data()
    got = sv.concordance(time, event, risk)
    for k in range(risk.shape[1]):
        num = den = 0.0
        for i, j in itertools.permutations(range(len(time)), 2):
            if event[i] and (time[i] < time[j] or (time[i] == time[j] and not event[j])):
                den += 1
                num += 1.0 if risk[i, k] > risk[j, k] else 0.5 if risk[i, k] == risk[j, k] else 0
        assert got[k] == pytest.approx(num / den)
        assert got[k] == pytest.approx(concordance_index(time, -risk[:, k], event))
    assert isinstance(sv.concordance(time, event, risk[:, 0]), float)
    assert np.isnan(sv.concordance(time, np.zeros_like(event), risk[:, 0]))


def test_logrank_matches_direct_computation():
    time, event, risk = _data(seed=2)
    high = sv.median_split(risk[:, 0])
    assert high.sum() < len(high) and high.sum() == (risk[:, 0] > np.median(risk[:, 0])).sum()
    o_minus_e = var = 0.0
    for t in np.unique(time[event]):
        at_risk = time >= t
        n, n1 = at_risk.sum(), (at_risk & high).sum()
        d = (event & (time == t)).sum()
        d1 = (event & (time == t) & high).sum()
        o_minus_e += d1 - d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (1 - n1 / n) * (n - d) / (n - 1)
    chi2 = o_minus_e**2 / var
    stat, p = sv.logrank(time, event, high)
    assert stat == pytest.approx(chi2)
    assert p == pytest.approx(stats.chi2.sf(chi2, 1))
    assert np.isnan(sv.logrank(time, event, np.ones(len(time), bool))[1])


def test_univariate_cox_cindex_matches_lifelines():
    time, event, _ = _data(n=80, seed=3)
    rng = np.random.default_rng(3)
    x = pd.DataFrame(rng.normal(size=(80, 4)), columns=list("abcd"))
    x["a"] += -0.3 * time  # a clear effect: higher value, earlier death
    uni = sv.univariate_cindex(x, time, event)
    for g in x.columns:
        df = pd.DataFrame({"x": x[g], "T": time, "E": event.astype(int)})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph = CoxPHFitter().fit(df, "T", "E")
        assert uni[g] == pytest.approx(cph.concordance_index_), g
    assert uni.index[0] == "a" and uni["a"] > 0.7


def test_known_hazard_effect_is_found_and_cross_validated(tmp_path):
    feats, clin = sv.synthetic_cohort(n_patients=200, n_genes=20, subtypes=None, seed=5)
    res = sv.survival_analysis(feats, clin, subtypes=None, repeats=3, seed=1)["all"]
    assert set(res.top_genes[:2]) == {"GENE0", "GENE1"}
    assert res.coefficients["GENE0"] > 0.5 and res.coefficients["GENE1"] < -0.5
    assert res.selection_frequency["GENE0"] == res.selection_frequency["GENE1"] == 1.0
    assert len(res.cv_cindices) == 9 and np.isfinite(res.cv_cindices).all()
    assert res.cv_cindex_mean > 0.7 and res.resub_cindex > 0.7
    assert res.cv_logrank_p < 1e-6 and res.resub_logrank_p < 1e-6
    # resubstitution figures are what the direct computations give on the fitted risks
    risk = res.resub_risk.to_numpy()
    assert res.resub_cindex == pytest.approx(concordance_index(res.time, -risk, res.event))
    assert res.resub_logrank_p == pytest.approx(
        sv.logrank(res.time, res.event, sv.median_split(risk))[1])
    sv.plot_km(res, tmp_path / "km.png")
    assert (tmp_path / "km.png").stat().st_size > 10_000

    feats0, clin0 = sv.synthetic_cohort(n_patients=200, n_genes=20, effects={}, subtypes=None,
                                        seed=5)
    null = sv.survival_analysis(feats0, clin0, subtypes=None, repeats=3, seed=1)["all"]
    assert abs(null.cv_cindex_mean - 0.5) < 0.07
    assert null.cv_cindex_mean < res.cv_cindex_mean - 0.15


def test_clinical_table_accepts_tcga_fields():
    feats, raw = sv.synthetic_cohort(n_patients=40, n_genes=5, tcga_fields=True, seed=0)
    _, ref = sv.synthetic_cohort(n_patients=40, n_genes=5, seed=0)
    raw = raw.rename(columns=lambda c: f"patient.{c}")  # Firehose prefixes
    clin = sv.clinical_table(raw)
    assert list(clin.index) == list(feats.index)  # lower-case barcodes -> patient keys
    np.testing.assert_allclose(clin["time"], ref["time"], atol=1 / sv.DAYS_PER_YEAR)
    assert (clin["event"].to_numpy() == ref["event"].to_numpy()).all()
    assert (clin["subtype"].to_numpy() == ref["subtype"].to_numpy()).all()
    raw.loc[0, "patient.vital_status"] = "[Not Available]"
    with pytest.warns(UserWarning, match="dropped 1 patient"):
        assert len(sv.clinical_table(raw)) == 39
    cdr = pd.DataFrame({"bcr_patient_barcode": ["TCGA-A1-A0SB-01A", "TCGA-A1-A0SD"],
                        "OS": [1, 0], "OS.time": [365.25, 730.5]})
    out = sv.clinical_table(cdr)
    assert list(out.index) == ["TCGA-A1-A0SB", "TCGA-A1-A0SD"]
    assert out["time"].tolist() == [1.0, 2.0] and out["event"].tolist() == [1, 0]
    words = sv.clinical_table(pd.DataFrame({"time": [1.0, 2.0], "event": ["Dead", "Alive"]}))
    assert words["event"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="negative survival times"):
        sv.clinical_table(pd.DataFrame({"time": [-1.0, 2.0], "event": [1, 0]}))
    with pytest.raises(ValueError, match="needs 'time' and 'event'"):
        sv.clinical_table(pd.DataFrame({"age": [50]}))
    assert sv.subtype_from_receptors("Positive", "Negative", "Negative") == "luminal"
    assert sv.subtype_from_receptors("Negative", "Negative", "Negative") == "TNBC"
    assert sv.subtype_from_receptors("Negative", "Negative", "Positive") == "HER2+"
    assert np.isnan(sv.subtype_from_receptors("Positive", "Positive", "Equivocal"))


def test_cli_survival_on_synthetic_cohort(tmp_path, capsys):
    from hest2sge.cli import main

    out = tmp_path / "surv"
    assert main(["survival", "--synthetic", "--n-patients", "150", "--repeats", "2",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out / "summary.csv", index_col=0)
    assert sorted(table.index) == ["HER2+", "TNBC", "luminal"]
    assert (table["cv_folds"] == 6).all() and (table["cv_cindex_mean"] > 0.6).all()
    assert all((out / f"km_{s}.png").is_file() for s in ("HER2_", "TNBC", "luminal"))
    printed = capsys.readouterr().out
    assert "cv_cindex_mean" in printed and "3-fold CV x 2 repeats" in printed
    # the written tables go back in through --features/--clinical, whole cohort
    assert main(["survival", "--features", str(out / "synthetic_features.csv"),
                 "--clinical", str(out / "synthetic_clinical.tsv"), "--subtypes", "all",
                 "--repeats", "1", "--out", str(tmp_path / "again")]) == 0
    again = pd.read_csv(tmp_path / "again" / "summary.csv", index_col=0)
    assert list(again.index) == ["all"] and again.loc["all", "n_patients"] == 150
    with pytest.raises(SystemExit, match="--features and --clinical"):
        main(["survival", "--out", str(tmp_path / "x")])
