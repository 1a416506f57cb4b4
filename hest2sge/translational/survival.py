"""Survival analysis on (pseudo)bulk expression: the benchmark paper's Cox protocol, with lifelines.

The paper's Methods "Survival analysis", per breast-cancer subtype (HER2+, TNBC,
luminal from the ER/PR/HER2 receptor status):

* time = days to death, or days to last follow-up when alive, in years; event = death;
* features: mean-centred pseudobulk (or log bulk RNA-seq of the panel genes);
* the top ``n_top = 5`` genes by the C-index of a univariate Cox model per gene, then a
  multivariate Cox model on them;
* (i) **resubstitution** (Xu et al. 2022): fit on all patients, C-index of their own risks and
  the log-rank p of a median split of the risk;
* (ii) **cross-validation**: 3-fold CV repeated 100 times: mean test C-index over the 300
  folds; each patient's out-of-fold risk averaged over the repeats, split at the median,
  Kaplan-Meier curves and log-rank p.

Choices the paper leaves open, made here and stated in every result's ``protocol``:

* In CV the top genes are chosen on each training fold only (choosing them on all patients
  would leak the test patients' outcomes into the model).
* The univariate C-index of a gene is the C-index of ``beta_hat * x``; only the sign of the
  univariate Cox estimate matters, and for the concave Efron partial likelihood lifelines
  maximises it is the sign of the score at ``beta = 0``, computed in closed form for all genes
  at once (checked against lifelines' ``CoxPHFitter`` in the tests).
* Risk = the Cox linear predictor (log partial hazard); "high risk" = above the median
  (a patient exactly at the median is low risk).
* Harrell's C counts the pairs lifelines counts (a death before another exit, or a death and
  a censoring at the same time) with tied risks as 1/2.
* A multivariate fit that fails to converge (separation in a small fold) is refitted with a
  small ridge penalty (``fallback_penalizer``); how often is reported as ``n_penalized``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUBTYPES = ("HER2+", "TNBC", "luminal")
DAYS_PER_YEAR = 365.25

_ID_COLUMNS = ("bcr_patient_barcode", "patient_id", "case_submitter_id", "submitter_id",
               "patient", "case_id", "sample", "sampleID")
_DEATH = ("days_to_death",)
_FOLLOW = ("days_to_last_follow_up", "days_to_last_followup", "days_to_last_known_alive")
_VITAL = ("vital_status",)
_ER = ("breast_carcinoma_estrogen_receptor_status", "er_status_by_ihc", "er_status", "er")
_PR = ("breast_carcinoma_progesterone_receptor_status", "pr_status_by_ihc", "pr_status", "pr")
_HER2_IHC = ("lab_proc_her2_neu_immunohistochemistry_receptor_status", "her2_status_by_ihc",
             "her2_status", "her2")
_HER2_FISH = ("lab_procedure_her2_neu_in_situ_hybrid_outcome_type", "her2_fish_status")
_TCGA = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}")


# ------------------------------------------------------------------------------ clinical table
def patient_key(x: Any) -> str:
    """Upper-case identifier; a TCGA barcode is cut to its patient part (``TCGA-XX-XXXX``)."""
    s = str(x).strip().upper()
    m = _TCGA.match(s)
    return m.group(0) if m else s


def _find(columns: dict[str, str], names: Sequence[str]) -> str | None:
    for n in names:
        if n in columns:
            return columns[n]
    return None


def _status(v: Any) -> float:
    """Receptor status -> 1 (positive), 0 (negative), NaN (equivocal, missing, ...)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return np.nan
    s = str(v).strip().lower()
    if s in ("positive", "pos", "+", "1", "1.0", "true", "yes"):
        return 1.0
    if s in ("negative", "neg", "-", "0", "0.0", "false", "no"):
        return 0.0
    return np.nan


def _event(v: Any) -> float:
    """Event flag: 1/0, True/False, or a vital status (Dead/Alive)."""
    s = str(v).strip().lower()
    if s in ("dead", "deceased"):
        return 1.0
    if s in ("alive", "living"):
        return 0.0
    return _status(v)


def subtype_from_receptors(er: Any, pr: Any, her2: Any) -> str | float:
    """Breast-cancer subtype from receptor status (``Positive``/``Negative``/...).

    HER2+: HER2 positive (whatever ER/PR). TNBC: ER, PR and HER2 negative. Luminal: ER or PR
    positive and HER2 negative. Anything else (equivocal, indeterminate, missing): NaN.
    """
    e, p, h = _status(er), _status(pr), _status(her2)
    if h == 1.0:
        return "HER2+"
    if h == 0.0:
        if e == 0.0 and p == 0.0:
            return "TNBC"
        if e == 1.0 or p == 1.0:
            return "luminal"
    return np.nan


def clinical_table(df, id_column: str | None = None, time_unit: str = "years"):
    """Normalise a clinical table to ``time`` (years), ``event`` (0/1) and ``subtype``.

    Accepted inputs (column names case-insensitive; prefixes such as ``patient.`` (Firehose)
    or ``demographic.``/``diagnoses.`` (GDC) are ignored):

    * ``time`` and ``event`` columns (``time`` in ``time_unit``); or ``OS.time`` (days) and
      ``OS`` (TCGA Pan-Cancer Clinical Data Resource); or
    * TCGA fields ``vital_status`` (Dead/Alive), ``days_to_death`` and
      ``days_to_last_follow_up`` (also ``days_to_last_followup``).
    * ``subtype`` as given, else from ER/PR/HER2 status columns
      (``breast_carcinoma_estrogen_receptor_status`` or ``er_status_by_ihc``, the PR ones,
      ``lab_proc_her2_neu_immunohistochemistry_receptor_status`` or ``her2_status_by_ihc``,
      with the in-situ hybridisation outcome used when IHC is equivocal), see
      :func:`subtype_from_receptors`; absent -> NaN.

    Patients are indexed by :func:`patient_key` of ``id_column`` (default: the index, or
    the first of ``bcr_patient_barcode``, ``patient_id``, ``case_submitter_id``,
    ``submitter_id``, ... present). Rows without a usable time are dropped with a warning
    naming them; a negative time is an error.

    Returns:
        ``pandas.DataFrame`` indexed by patient with ``time``, ``event``, ``subtype``.
    """
    import pandas as pd

    if time_unit not in ("years", "days", "months"):
        raise ValueError(f"time_unit must be 'years', 'days' or 'months', got {time_unit!r}")
    cols = {}
    for c in df.columns:
        low = str(c).strip().lower()
        cols.setdefault(low, c)
        cols.setdefault(low.rsplit(".", 1)[-1] if not low.startswith("os.") else low, c)
    idcol = id_column or _find(cols, [n.lower() for n in _ID_COLUMNS])
    if id_column is not None and id_column not in df.columns:
        raise KeyError(f"id column {id_column!r} not in the clinical table ({list(df.columns)})")
    ids = df[idcol] if idcol is not None else pd.Series(df.index, index=df.index)
    ids = ids.map(patient_key).to_numpy()

    tcol, ecol = cols.get("time"), cols.get("event")
    if tcol is not None and ecol is not None:
        scale = {"years": 1.0, "days": 1.0 / DAYS_PER_YEAR, "months": 1.0 / 12.0}[time_unit]
        time = pd.to_numeric(df[tcol], errors="coerce").to_numpy(dtype=np.float64) * scale
        event = np.array([_event(v) for v in df[ecol]])
    elif "os.time" in cols and "os" in cols:
        time = pd.to_numeric(df[cols["os.time"]], errors="coerce").to_numpy(float) / DAYS_PER_YEAR
        event = np.array([_event(v) for v in df[cols["os"]]])
    else:
        vcol, dcol = _find(cols, _VITAL), _find(cols, _DEATH)
        fcol = _find(cols, _FOLLOW)
        if vcol is None or (dcol is None and fcol is None):
            raise ValueError(
                "clinical table needs 'time' and 'event' columns, or TCGA's 'vital_status' with "
                f"'days_to_death' / 'days_to_last_follow_up'; found columns {list(df.columns)}"
            )
        vital = df[vcol].astype(str).str.strip().str.lower()
        dead = vital.isin(["dead", "deceased", "1", "true"]).to_numpy()
        alive = vital.isin(["alive", "living", "0", "false"]).to_numpy()
        d = pd.to_numeric(df[dcol], errors="coerce").to_numpy(float) if dcol else np.nan
        f = pd.to_numeric(df[fcol], errors="coerce").to_numpy(float) if fcol else np.nan
        d = np.broadcast_to(d, dead.shape)
        f = np.broadcast_to(f, dead.shape)
        time = np.where(dead, d, np.where(alive, f, np.nan)) / DAYS_PER_YEAR
        event = np.where(dead, 1.0, np.where(alive, 0.0, np.nan))

    scol = cols.get("subtype")
    if scol is not None:
        subtype = df[scol].to_numpy(dtype=object)
    else:
        er, pr, her2 = _find(cols, _ER), _find(cols, _PR), _find(cols, _HER2_IHC)
        fish = _find(cols, _HER2_FISH)
        if er is None or pr is None or her2 is None:
            subtype = np.full(len(df), np.nan, dtype=object)
        else:
            h = df[her2].to_numpy(dtype=object).copy()
            if fish is not None:
                eq = np.array([np.isnan(_status(v)) for v in h])
                h[eq] = df[fish].to_numpy(dtype=object)[eq]
            subtype = np.array([subtype_from_receptors(a, b, c)
                                for a, b, c in zip(df[er], df[pr], h)], dtype=object)

    out = pd.DataFrame({"time": time, "event": event, "subtype": subtype},
                       index=pd.Index(ids, name="patient"))
    if not out.index.is_unique:
        dup = out.index[out.index.duplicated()].unique().tolist()
        raise ValueError(f"clinical table has several rows for patients {dup[:5]}")
    bad = out["time"].isna() | out["event"].isna()
    if bad.any():
        warnings.warn(f"clinical table: dropped {int(bad.sum())} patient(s) without a usable "
                      f"time/event, e.g. {out.index[bad][:5].tolist()}", stacklevel=2)
        out = out[~bad]
    neg = out["time"] < 0
    if neg.any():
        raise ValueError(f"negative survival times for patients {out.index[neg][:5].tolist()}")
    out["event"] = out["event"].astype(int)
    return out


# ------------------------------------------------------------------------------ statistics
def concordance(time: Any, event: Any, risk: Any) -> float | np.ndarray:
    """Harrell's C-index of risk scores (higher risk = earlier event).

    Comparable pairs as in ``lifelines.utils.concordance_index``: ``i`` died and ``j`` left
    later, or ``j`` was censored at ``i``'s death time; tied risks count 1/2.

    Args:
        time: (n,) times.
        event: (n,) 0/1 (1 = the event was observed).
        risk: (n,) or (n, k) scores.

    Returns:
        A float for 1-D ``risk``, else (k,) array. NaN when no pair is comparable.

    Example:
        >>> concordance([1, 2, 3], [1, 1, 1], [3, 2, 1])   # higher risk died first
        1.0
        >>> concordance([1, 2, 3], [1, 1, 1], [1, 1, 1])   # ties count one half
        0.5
    """
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event).astype(bool).ravel()
    r = np.asarray(risk, dtype=np.float64)
    one = r.ndim == 1
    r = r.reshape(len(t), -1)
    if len(e) != len(t) or r.shape[0] != len(t):
        raise ValueError(f"time ({len(t)}), event ({len(e)}) and risk ({r.shape[0]}) differ")
    ii, jj = np.nonzero(e[:, None] & ((t[:, None] < t[None, :])
                                      | ((t[:, None] == t[None, :]) & ~e[None, :])))
    if ii.size == 0:
        res = np.full(r.shape[1], np.nan)
    else:
        score = np.zeros(r.shape[1])
        step = max(1, 2_000_000 // max(r.shape[1], 1))
        for s in range(0, ii.size, step):
            a, b = r[ii[s:s + step]], r[jj[s:s + step]]
            score += (a > b).sum(0) + 0.5 * (a == b).sum(0)
        res = score / ii.size
    return float(res[0]) if one else res


def cox_score_sign(time: Any, event: Any, x: Any) -> np.ndarray:
    """Sign of the univariate Cox estimate of each column of ``x`` (Efron ties).

    The Efron log partial likelihood is concave in a single coefficient, so its maximiser
    has the sign of the score at 0, ``sum_deaths x - sum_l (S_R - l/d S_D) / (n_R - l)``
    over each death time (risk set ``R``, ``d`` tied deaths ``D``, ``l = 0..d-1``).
    """
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event).astype(bool).ravel()
    x = np.asarray(x, dtype=np.float64).reshape(len(t), -1)
    order = np.argsort(-t, kind="stable")  # descending: risk sets are prefixes
    ts, es, xs = t[order], e[order], x[order]
    csum = np.cumsum(xs, 0)
    score = np.zeros(x.shape[1])
    for u in np.unique(t[e]):
        last = np.searchsorted(-ts, -u, side="right")  # rows with time >= u
        n_r, s_r = last, csum[last - 1]
        dmask = (ts == u) & es
        d = int(dmask.sum())
        s_d = xs[dmask].sum(0)
        score += s_d
        for ell in range(d):
            score -= (s_r - ell / d * s_d) / (n_r - ell)
    return np.sign(np.where(np.abs(score) < 1e-12, 0.0, score))


def univariate_cindex(features, time: Any, event: Any):
    """Univariate Cox C-index of every gene (``pandas.Series``, sorted descending)."""
    import pandas as pd

    x = features.to_numpy(dtype=np.float64)
    sign = cox_score_sign(time, event, x)
    c = concordance(time, event, x * sign[None, :])
    return pd.Series(c, index=features.columns, name="cindex").sort_values(ascending=False,
                                                                          kind="stable")


def logrank(time: Any, event: Any, high: Any) -> tuple[float, float]:
    """Two-sided log-rank test between ``high`` (True) and the rest: (statistic, p value)."""
    from lifelines.statistics import logrank_test

    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event).astype(bool)
    h = np.asarray(high).astype(bool)
    if h.all() or not h.any():
        return float("nan"), float("nan")
    res = logrank_test(t[h], t[~h], event_observed_A=e[h], event_observed_B=e[~h])
    return float(res.test_statistic), float(res.p_value)


def median_split(risk: Any) -> np.ndarray:
    """High-risk mask: risk above its median (a patient at the median is low risk)."""
    r = np.asarray(risk, dtype=np.float64)
    return r > np.median(r)


# ------------------------------------------------------------------------------ Cox models
def _fit_cox(x, time, event, penalizer: float, fallback: float) -> tuple[Any, bool]:
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError, ConvergenceWarning

    df = pd.DataFrame(x.copy())
    df["__T"], df["__E"] = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        try:
            return CoxPHFitter(penalizer=penalizer).fit(df, "__T", "__E"), False
        except (ConvergenceError, ConvergenceWarning, np.linalg.LinAlgError):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter(penalizer=max(fallback, penalizer)).fit(df, "__T", "__E"), True


def _risk(model, x) -> np.ndarray:
    import pandas as pd

    return np.asarray(model.predict_log_partial_hazard(pd.DataFrame(x)), dtype=np.float64)


@dataclass
class SurvivalResult:
    """One cohort's survival analysis (see the module docstring for the protocol)."""

    cohort: str
    n_patients: int
    n_events: int
    top_genes: list[str]
    univariate: Any  # pandas Series gene -> univariate C-index (all patients)
    coefficients: dict[str, float]
    resub_cindex: float
    resub_logrank_p: float
    resub_risk: Any  # pandas Series patient -> risk
    cv_cindex_mean: float
    cv_cindex_std: float
    cv_cindices: np.ndarray
    cv_logrank_p: float
    cv_risk: Any  # pandas Series patient -> mean out-of-fold risk
    selection_frequency: Any  # pandas Series gene -> share of CV folds that picked it
    n_penalized: int
    time: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    event: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    protocol: str = ""

    def summary(self) -> dict[str, Any]:
        """Flat dict of the headline figures (one row of :func:`summary_table`)."""
        return {"cohort": self.cohort, "n_patients": self.n_patients, "n_events": self.n_events,
                "top_genes": ",".join(self.top_genes),
                "resub_cindex": self.resub_cindex, "resub_logrank_p": self.resub_logrank_p,
                "cv_cindex_mean": self.cv_cindex_mean, "cv_cindex_std": self.cv_cindex_std,
                "cv_folds": int(np.isfinite(self.cv_cindices).sum()),
                "cv_logrank_p": self.cv_logrank_p, "n_penalized": self.n_penalized,
                "protocol": self.protocol}


def analyze_cohort(
    features,
    clinical,
    cohort: str = "all",
    n_top: int = 5,
    folds: int = 3,
    repeats: int = 100,
    seed: int = 0,
    center: bool = True,
    log: bool = False,
    penalizer: float = 0.0,
    fallback_penalizer: float = 0.1,
) -> SurvivalResult:
    """The paper's survival protocol on one cohort (see the module docstring).

    Args:
        features: patients x genes ``DataFrame`` (pseudobulk or bulk), index = patient keys.
        clinical: :func:`clinical_table` output for the same patients (extra rows ignored).
        cohort: Name reported in the result.
        n_top: Genes kept by the univariate C-index (paper: 5).
        folds: CV folds (paper: 3). repeats: CV repeats (paper: 100).
        seed: Seed of the CV splits.
        center: Mean-centre every gene over the cohort (the paper's pseudobulk normalisation).
        log: ``log(x + 1)`` first (for bulk counts).
        penalizer: lifelines ridge penalizer of the multivariate model (paper: none).
        fallback_penalizer: Penalizer of the refit when a fit does not converge.
    """
    import pandas as pd

    common = [p for p in features.index if p in set(clinical.index)]
    if len(common) < 2 * folds:
        raise ValueError(f"cohort {cohort!r}: {len(common)} patients with both features and "
                         f"clinical data; need at least {2 * folds} for {folds}-fold CV")
    x = features.loc[common].astype(np.float64)
    if not np.isfinite(x.to_numpy()).all():
        bad = x.columns[~np.isfinite(x.to_numpy()).all(0)][:5].tolist()
        raise ValueError(f"cohort {cohort!r}: features have NaN or infinite values (genes {bad})")
    if log:
        if (x.to_numpy() < 0).any():
            raise ValueError("log=True needs non-negative features (bulk counts)")
        x = np.log1p(x)
    if center:
        x = x - x.mean(0)
    x = x.loc[:, x.std(0) > 0]
    if x.shape[1] < n_top:
        raise ValueError(f"cohort {cohort!r}: {x.shape[1]} non-constant genes, fewer than "
                         f"n_top={n_top}")
    time = clinical.loc[common, "time"].to_numpy(dtype=np.float64)
    event = clinical.loc[common, "event"].to_numpy(dtype=int)
    if event.sum() < 2:
        raise ValueError(f"cohort {cohort!r}: {int(event.sum())} events; a Cox model needs more")
    genes = np.asarray(x.columns)
    xv = x.to_numpy()

    uni = univariate_cindex(x, time, event)
    top = list(uni.index[:n_top])
    model, pen = _fit_cox(x[top], time, event, penalizer, fallback_penalizer)
    n_pen = int(pen)
    resub_risk = _risk(model, x[top])
    resub_c = concordance(time, event, resub_risk)
    _, resub_p = logrank(time, event, median_split(resub_risk))

    rng = np.random.default_rng(seed)
    n = len(common)
    oof = np.full((repeats, n), np.nan)
    cvals, picked = [], np.zeros(len(genes))
    for rep in range(repeats):
        for test in np.array_split(rng.permutation(n), folds):
            train = np.setdiff1d(np.arange(n), test)
            if event[train].sum() < 2:
                cvals.append(np.nan)
                continue
            sign = cox_score_sign(time[train], event[train], xv[train])
            uc = concordance(time[train], event[train], xv[train] * sign[None, :])
            idx = np.argsort(-np.nan_to_num(uc, nan=-1.0), kind="stable")[:n_top]
            picked[idx] += 1
            m, pen = _fit_cox(x.iloc[train, idx], time[train], event[train], penalizer,
                              fallback_penalizer)
            n_pen += int(pen)
            r = _risk(m, x.iloc[test, idx])
            oof[rep, test] = r
            cvals.append(concordance(time[test], event[test], r))
    cv = np.asarray(cvals, dtype=np.float64)
    mean_risk = np.nanmean(oof, 0) if repeats else np.full(n, np.nan)
    _, cv_p = logrank(time, event, median_split(mean_risk)) if repeats else (np.nan, np.nan)
    n_fits = max(repeats * folds, 1)
    protocol = (f"Cox PH (lifelines, Efron ties, penalizer {penalizer:g}); top {n_top} genes by "
                f"univariate Cox C-index; {'log1p, ' if log else ''}"
                f"{'mean-centred ' if center else ''}features; resubstitution on all "
                f"patients; {folds}-fold CV x {repeats} repeats (seed {seed}), genes chosen "
                "on each training fold; median split of the (mean out-of-fold) risk; "
                "two-sided log-rank")
    return SurvivalResult(
        cohort=cohort, n_patients=n, n_events=int(event.sum()), top_genes=top,
        univariate=uni, coefficients={str(k): float(v) for k, v in model.params_.items()},
        resub_cindex=float(resub_c), resub_logrank_p=float(resub_p),
        resub_risk=pd.Series(resub_risk, index=common, name="risk"),
        cv_cindex_mean=float(np.nanmean(cv)) if np.isfinite(cv).any() else float("nan"),
        cv_cindex_std=float(np.nanstd(cv)) if np.isfinite(cv).any() else float("nan"),
        cv_cindices=cv, cv_logrank_p=float(cv_p),
        cv_risk=pd.Series(mean_risk, index=common, name="risk"),
        selection_frequency=pd.Series(picked / n_fits, index=genes,
                                      name="selected").sort_values(ascending=False),
        n_penalized=n_pen, time=time, event=event, protocol=protocol,
    )


def survival_analysis(
    features,
    clinical,
    subtypes: Sequence[str] | str | None = "auto",
    min_patients: int = 12,
    **kwargs: Any,
) -> dict[str, SurvivalResult]:
    """Run :func:`analyze_cohort` per subtype.

    Args:
        features: patients x genes ``DataFrame``; its index is matched to the clinical table
            through :func:`patient_key` (TCGA slide/sample barcodes -> patient), rows of one
            patient averaged.
        clinical: A clinical ``DataFrame`` (raw TCGA fields or time/event/subtype), passed
            through :func:`clinical_table`.
        subtypes: ``"auto"``: every subtype present with at least ``min_patients`` patients
            (the paper's HER2+, TNBC, luminal), or the whole cohort (``"all"``) when no
            subtype is known; a list of names; ``None``: the whole cohort only.
        min_patients: Smallest cohort analysed with ``"auto"``.
        **kwargs: Passed to :func:`analyze_cohort`.

    Returns:
        dict cohort name -> :class:`SurvivalResult`.
    """
    clinical = clinical_table(clinical)
    feats = features.copy()
    feats.index = [patient_key(i) for i in feats.index]
    if not feats.index.is_unique:
        feats = feats.groupby(level=0, sort=False).mean()
    common = [p for p in feats.index if p in set(clinical.index)]
    if not common:
        raise ValueError("no patient appears in both the features and the clinical table "
                         f"(e.g. features {list(feats.index[:3])}, clinical "
                         f"{list(clinical.index[:3])})")
    clinical = clinical.loc[common]
    if subtypes is None:
        cohorts = {"all": common}
    else:
        st = clinical["subtype"].astype(object)
        if subtypes == "auto":
            names = [s for s in [*SUBTYPES, *sorted(set(st.dropna()) - set(SUBTYPES))]
                     if (st == s).sum() >= min_patients]
            cohorts = {s: list(st.index[st == s]) for s in names} or {"all": common}
        else:
            names = [subtypes] if isinstance(subtypes, str) else list(subtypes)
            cohorts = {}
            for s in names:
                members = common if s == "all" else list(st.index[st == s])
                if not members:
                    raise ValueError(f"no patient of subtype {s!r} (present: "
                                     f"{sorted(map(str, set(st.dropna())))})")
                cohorts[s] = members
    return {name: analyze_cohort(feats.loc[ids], clinical.loc[ids], cohort=name, **kwargs)
            for name, ids in cohorts.items()}


def summary_table(results: dict[str, SurvivalResult]):
    """One row per cohort of :meth:`SurvivalResult.summary`."""
    import pandas as pd

    return pd.DataFrame([r.summary() for r in results.values()]).set_index("cohort")


def plot_km(result: SurvivalResult, path: str | None = None, title: str | None = None):
    """Kaplan-Meier curves of the high/low risk groups: resubstitution and CV panels (PNG)."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (("resubstitution", result.resub_risk, result.resub_logrank_p),
              ("CV mean out-of-fold risk", result.cv_risk, result.cv_logrank_p))
    for ax, (name, risk, p) in zip(axes, panels):
        high = median_split(risk.to_numpy())
        for mask, label, colour in ((~high, "low risk", "tab:blue"), (high, "high risk",
                                                                       "tab:red")):
            if mask.any():
                KaplanMeierFitter(label=f"{label} (n={int(mask.sum())})").fit(
                    result.time[mask], result.event[mask]).plot_survival_function(
                    ax=ax, color=colour, ci_show=False)
        ax.set_title(f"{name}\nlog-rank p = {p:.3g}")
        ax.set_xlabel("years")
    axes[0].set_ylabel("survival probability")
    fig.suptitle(title or f"{result.cohort}: n={result.n_patients}, {result.n_events} deaths; "
                 f"resub C={result.resub_cindex:.3f}, CV C={result.cv_cindex_mean:.3f}")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


# ------------------------------------------------------------------------------ synthetic data
def synthetic_cohort(
    n_patients: int = 300,
    n_genes: int = 30,
    effects: dict[str, float] | None = None,
    baseline_hazard: float = 0.15,
    censoring_hazard: float = 0.1,
    max_followup: float = 15.0,
    subtypes: Sequence[str] | None = SUBTYPES,
    tcga_fields: bool = False,
    seed: int = 0,
):
    """A cohort with a known hazard effect, for tests and the ``hest2sge survival`` demo.

    Gene values are standard normal (mean-centred pseudobulk-like), the event time is
    exponential with hazard ``baseline_hazard * exp(sum_g effects[g] * x_g)``, censoring is
    exponential (``censoring_hazard``) and administrative at ``max_followup`` years.

    Args:
        effects: gene -> log hazard ratio per unit (default ``{"GENE0": 1.0, "GENE1": -1.0}``;
            ``{}`` gives a null cohort).
        subtypes: Names assigned uniformly at random (``None``: no subtype column).
        tcga_fields: Clinical table in TCGA field names (``bcr_patient_barcode``,
            ``vital_status``, ``days_to_death``, ``days_to_last_follow_up`` and receptor status
            columns matching the subtype) instead of ``time``/``event``/``subtype``.

    Returns:
        (features ``DataFrame`` patients x genes, clinical ``DataFrame``).
    """
    import pandas as pd

    effects = {"GENE0": 1.0, "GENE1": -1.0} if effects is None else dict(effects)
    rng = np.random.default_rng(seed)
    genes = [f"GENE{i}" for i in range(n_genes)]
    unknown = [g for g in effects if g not in genes]
    if unknown:
        raise ValueError(f"effects name genes outside GENE0..GENE{n_genes - 1}: {unknown}")
    ids = [f"TCGA-SY-{i:04d}" for i in range(n_patients)]
    x = rng.standard_normal((n_patients, n_genes))
    beta = np.array([effects.get(g, 0.0) for g in genes])
    t_event = rng.exponential(1.0 / (baseline_hazard * np.exp(x @ beta)))
    t_cens = np.minimum(rng.exponential(1.0 / censoring_hazard, n_patients), max_followup)
    time = np.minimum(t_event, t_cens)
    event = (t_event <= t_cens).astype(int)
    features = pd.DataFrame(x, index=pd.Index(ids, name="patient"), columns=genes)
    sub = None if subtypes is None else rng.choice(list(subtypes), n_patients)
    if not tcga_fields:
        clin = pd.DataFrame({"time": time, "event": event}, index=features.index)
        if sub is not None:
            clin["subtype"] = sub
        return features, clin
    days = np.round(time * DAYS_PER_YEAR).astype(int)
    clin = pd.DataFrame({
        "bcr_patient_barcode": [i.lower() for i in ids],  # Firehose spells them lower-case
        "vital_status": np.where(event == 1, "Dead", "Alive"),
        "days_to_death": np.where(event == 1, days.astype(object), "[Not Applicable]"),
        "days_to_last_follow_up": np.where(event == 1, "[Not Applicable]", days.astype(object)),
    })
    if sub is not None:
        receptor = {"HER2+": ("Positive", "Negative", "Positive"),
                    "TNBC": ("Negative", "Negative", "Negative"),
                    "luminal": ("Positive", "Positive", "Negative")}
        status = [receptor.get(s, ("[Not Evaluated]",) * 3) for s in sub]
        clin["breast_carcinoma_estrogen_receptor_status"] = [s[0] for s in status]
        clin["breast_carcinoma_progesterone_receptor_status"] = [s[1] for s in status]
        clin["lab_proc_her2_neu_immunohistochemistry_receptor_status"] = [s[2] for s in status]
    return features, clin
