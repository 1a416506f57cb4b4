"""Tests of hest2sge.metrics against independent references and hand-computed values.

References: scipy.stats (Pearson, Spearman), sklearn.metrics.roc_auc_score, and plain
Python/numpy re-implementations of the benchmark's R definitions (SPEC.md section 4,
SydneyBioX/HEtoSGEBench benchmarkUtils.R) written here loop by loop.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from hest2sge.metrics import (
    AUC_CUTOFFS,
    SpotAUC,
    SpotJSDivergence,
    SpotMI,
    SpotNRMSE,
    SpotPCC,
    SpotRMSE,
    SpotSpearman,
    SpotSSIM,
    functional,
    spot_metrics,
)

F = functional


# ---------------------------------------------------------------------------------------------
# plain-Python references of the R definitions
# ---------------------------------------------------------------------------------------------
def ref_equalfreq(x: list[float], nbins: int) -> list[int]:
    """infotheo discretize(disc = "equalfreq"), 0-based bins, written as in its C loop."""
    s = sorted(x)
    n = len(s)
    freq, mod = n // nbins, n % nbins
    splits, j = [], freq - 1
    for _ in range(nbins - 1):
        if mod > 0:
            splits.append(s[j + 1])
            mod -= 1
        else:
            splits.append(s[j])
        j += freq
    splits.append(s[-1] + 0.01)
    out = []
    for v in x:
        for k in range(nbins):
            if v <= splits[k]:
                out.append(k)
                break
    return out


def ref_entropy(labels: list) -> float:
    n = len(labels)
    return -sum(c / n * math.log(c / n) for c in Counter(labels).values())


def ref_mi(p: np.ndarray, t: np.ndarray) -> float:
    nbins = int(max(10, len(p) ** (1 / 3)))
    a = ref_equalfreq(list(p), nbins)
    b = ref_equalfreq(list(t), nbins)
    ha, hb, hab = ref_entropy(a), ref_entropy(b), ref_entropy(list(zip(a, b, strict=True)))
    if ha == 0 or hb == 0:
        return math.nan
    return max(ha + hb - hab, 0.0) / math.sqrt(ha * hb)


def ref_cut256(v: list[float]) -> list[int]:
    """R cut(v, 256, labels = FALSE) - 1 with an explicit linear search over the intervals."""
    k = 256
    lo, hi = min(v), max(v)
    if hi == lo:
        d = abs(lo) if lo != 0 else 1.0
        start, stop = lo - d / 1000, hi + d / 1000
    else:
        start, stop = lo, hi
    step = (stop - start) / k  # seq.int(from, to, length.out = 257)
    breaks = [start + i * step for i in range(k + 1)]
    breaks[0], breaks[k] = (
        (start, stop) if hi == lo else (lo - (hi - lo) / 1000, hi + (hi - lo) / 1000)
    )
    return [next(j for j in range(k) if breaks[j] < x <= breaks[j + 1]) for x in v]


def ref_ssim(p: np.ndarray, t: np.ndarray) -> float:
    def norm(v: np.ndarray) -> list[float]:
        m = max(v)
        return [0.0] * len(v) if m == 0 else [float(e) / m for e in v]

    x = np.array(ref_cut256(norm(p)), dtype=float)
    y = np.array(ref_cut256(norm(t)), dtype=float)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = x.mean(), y.mean()
    sxy = np.cov(x, y, ddof=1)[0, 1]
    sx, sy = x.var(ddof=1), y.var(ddof=1)
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sx + sy + c2))


def ref_js(p: np.ndarray, t: np.ndarray) -> float:
    n = len(t)
    P = t / t.sum() if t.sum() != 0 else np.full(n, 1 / n)
    q = np.maximum(p, 0)
    Q = q / q.sum() if q.sum() != 0 else np.full(n, 1 / n)
    total = 0.0
    for a, b in zip(P, Q, strict=True):
        if a > 0:
            total += 0.5 * a * math.log2(2 * a / (a + b))
        if b > 0:
            total += 0.5 * b * math.log2(2 * b / (a + b))
    return total


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _data(n: int = 200, g: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated pred/truth with ties (rounded) and raw counts covering all AUC cutoffs."""
    rng = _rng(seed)
    counts = rng.poisson(rng.uniform(0.3, 12.0, size=g), size=(n, g)).astype(float)
    truth = np.log1p(counts)
    pred = np.round(truth + rng.normal(0, 0.8, size=(n, g)), 1)  # ties in pred
    return pred, truth, counts


# ---------------------------------------------------------------------------------------------
# Pearson / Spearman
# ---------------------------------------------------------------------------------------------
def test_pcc_and_spearman_match_scipy() -> None:
    pred, truth, _ = _data()
    r = F.pcc(torch.from_numpy(pred), torch.from_numpy(truth))
    rho = F.spearman(torch.from_numpy(pred), torch.from_numpy(truth))
    assert r.shape == (pred.shape[1],) and r.dtype == torch.float64
    for j in range(pred.shape[1]):
        assert r[j].item() == pytest.approx(stats.pearsonr(pred[:, j], truth[:, j])[0], abs=1e-12)
        expected = stats.spearmanr(pred[:, j], truth[:, j])[0]
        assert rho[j].item() == pytest.approx(expected, abs=1e-12)


def test_average_ranks_with_ties_match_scipy() -> None:
    x = torch.tensor([[3.0, 1.0], [1.0, 1.0], [3.0, 2.0], [2.0, 1.0], [3.0, 0.0]])
    ranks = F._ranks(x.double())
    for j in range(2):
        np.testing.assert_array_equal(ranks[:, j].numpy(), stats.rankdata(x[:, j].numpy()))


def test_correlations_nan_for_constant_vectors() -> None:
    t = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1])  # mean has rounding error: must still be NaN
    p = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert torch.isnan(F.pcc(p, t)) and torch.isnan(F.spearman(p, t))
    assert torch.isnan(F.pcc(t, p)) and torch.isnan(F.spearman(t, p))
    assert F.pcc(p, 2 * p + 1).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# mutual information
# ---------------------------------------------------------------------------------------------
def test_mi_hand_computed() -> None:
    # n = 12 -> nbins = max(10, 12^(1/3)) = 10; freq = 1, mod = 2.
    # a = 1..12 (sorted s = a): splits s[1], s[2] (mod rule), then s[2], s[3], ..., s[8], and
    # s[11] + 0.01 = [2, 3, 3, 4, 5, 6, 7, 8, 9, 12.01].
    # bins of a (first k with a <= split[k]): 1,2 -> 0; 3 -> 1; 4 -> 3; 5..9 -> 4..8;
    # 10,11,12 -> 9. Counts 2,1,1,1,1,1,1,1,3: H(a) = log 12 - (2 log 2 + 3 log 3) / 12.
    # b = six 0s then six 1s: splits [0,0,0,0,0,0,1,1,1,1.01] -> 0s in bin 0, 1s in bin 6:
    # H(b) = log 2. The bins of a determine b, so H(a, b) = H(a) and MI = H(b) = log 2.
    a = torch.arange(1.0, 13.0)
    b = torch.tensor([0.0] * 6 + [1.0] * 6)
    h_a = math.log(12) - (2 * math.log(2) + 3 * math.log(3)) / 12
    expected = math.log(2) / math.sqrt(h_a * math.log(2))
    assert F.mutual_info(a, b).item() == pytest.approx(expected, abs=1e-14)
    assert F.mutual_info(b, a).item() == pytest.approx(expected, abs=1e-14)
    assert ref_mi(a.numpy(), b.numpy()) == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("n", [57, 400, 1500])
def test_mi_matches_reference(n: int) -> None:
    rng = _rng(n)
    t = np.round(rng.gamma(1.0, 2.0, size=(n, 3)), 1)  # many ties
    p = t + rng.normal(0, 1.0, size=(n, 3))
    p[:, 2] = np.round(p[:, 2])
    out = F.mutual_info(torch.from_numpy(p), torch.from_numpy(t))
    for j in range(3):
        assert out[j].item() == pytest.approx(ref_mi(p[:, j], t[:, j]), abs=1e-12)


def test_mi_nbins_uses_truncated_cube_root_like_r() -> None:
    assert F._mi_nbins(12) == 10
    assert F._mi_nbins(1331) == 10  # 1331^(1/3) = 10.999... in floating point (as in R)
    assert F._mi_nbins(4000) == 15


def test_mi_nan_for_zero_entropy() -> None:
    p = torch.arange(20.0)
    assert torch.isnan(F.mutual_info(p, torch.full((20,), 3.0)))
    assert torch.isnan(F.mutual_info(torch.zeros(20), p))
    assert F.mutual_info(p, p).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------------------------
def test_ssim_hand_computed() -> None:
    # pred / max = [0, .25, .5, 1]; breaks i / 256 (ends -0.001, 1.001), right-closed, so the
    # values on a break go to the lower interval: codes x = [0, 63, 127, 255].
    # truth / max = [.5, .5, 0, 1] -> codes y = [127, 127, 0, 255].
    pred = torch.tensor([0.0, 1.0, 2.0, 4.0])
    truth = torch.tensor([3.0, 3.0, 0.0, 6.0])
    x = [0, 63, 127, 255]
    y = [127, 127, 0, 255]
    assert ref_cut256([0.0, 0.25, 0.5, 1.0]) == x
    mx, my = sum(x) / 4, sum(y) / 4  # 111.25, 127.25
    sx = sum((a - mx) ** 2 for a in x) / 3  # 11872.25
    sy = sum((b - my) ** 2 for b in y) / 3  # 10837.58...
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / 3  # 16399.75 / 3
    c1, c2 = 2.55**2, 7.65**2
    expected = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sx + sy + c2))
    assert sx == 11872.25 and sxy * 3 == 16399.75
    assert F.ssim(pred, truth).item() == pytest.approx(expected, rel=1e-14)
    assert F.ssim(pred, truth).item() == pytest.approx(0.47844, abs=1e-5)


def test_ssim_matches_reference() -> None:
    pred, truth, _ = _data(n=150, g=4, seed=3)
    pred[:, 1] = -np.abs(pred[:, 1]) - 0.5  # negative max: R's division flips the order
    pred[:, 2] = np.minimum(pred[:, 2], 0.0)  # max 0 with negatives: all zeros in R
    truth[:, 3] = 2.0  # constant
    out = F.ssim(torch.from_numpy(pred), torch.from_numpy(truth))
    for j in range(4):
        assert out[j].item() == pytest.approx(ref_ssim(pred[:, j], truth[:, j]), rel=1e-12)


def test_ssim_r_semantics_for_non_positive_max() -> None:
    t = torch.tensor([1.0, 5.0, 2.0, 4.0, 3.0])
    neg = torch.tensor([-1.0, -2.0, -4.0, -3.0, -5.0])
    assert F.ssim(neg, t).item() == pytest.approx(F.ssim(-neg, t).item(), rel=1e-15)
    zero_max = torch.tensor([0.0, -2.0, -4.0, -3.0, -5.0])
    assert F.ssim(zero_max, t).item() == pytest.approx(F.ssim(torch.zeros(5), t).item())
    assert F.ssim(t, t).item() == pytest.approx(1.0)
    assert F.ssim(t, 10 * t).item() == pytest.approx(1.0)  # scale invariant
    assert torch.isnan(F.ssim(torch.tensor([1.0]), torch.tensor([2.0])))


# ---------------------------------------------------------------------------------------------
# AUC
# ---------------------------------------------------------------------------------------------
def test_auc_hand_computed() -> None:
    # positives (count > 0) predict .4, .8; negatives .1, .35, .4:
    # pairs won: .4 > .1, .4 > .35, .4 == .4 (1/2), .8 > all three -> 5.5 / 6
    pred = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.4])
    counts = torch.tensor([0, 1, 0, 3, 0])
    assert F.auc(pred, counts).item() == pytest.approx(5.5 / 6, abs=1e-15)
    assert F.auc(pred, counts, cutoff=1).item() == pytest.approx(1.0)


def test_auc_matches_sklearn_for_all_cutoffs() -> None:
    rng = _rng(1)
    counts = rng.negative_binomial(1, 0.12, size=(300, 6)).astype(float)  # zeros and a long tail
    counts[:, 5] += 1  # no zero at all: NaN at every cutoff, as in R
    pred = np.round(np.log1p(counts) + rng.normal(0, 1.0, size=counts.shape), 1)  # ties
    p, c = torch.from_numpy(pred), torch.from_numpy(counts)
    checked = 0
    for cut in AUC_CUTOFFS:
        out = F.auc(p, c, cutoff=cut)
        for j in range(pred.shape[1]):
            labels = counts[:, j] > cut
            if labels.all() or not labels.any() or (counts[:, j] > 0).all():
                assert torch.isnan(out[j])
            else:
                expected = roc_auc_score(labels, pred[:, j])
                assert out[j].item() == pytest.approx(expected, abs=1e-12)
                checked += 1
    assert checked == 5 * len(AUC_CUTOFFS)


def test_auc_nan_cases_follow_r() -> None:
    pred = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.7])
    assert torch.isnan(F.auc(pred, torch.zeros(5)))  # all zero
    assert torch.isnan(F.auc(pred, torch.tensor([0, 1, 0, 2, 1]), cutoff=5))  # one class
    # R returns NA when every count is positive, even at a cutoff with two classes ...
    all_pos = torch.tensor([1, 2, 8, 3, 9])
    assert torch.isnan(F.auc(pred, all_pos, cutoff=5))
    # ... unless that R quirk is switched off
    expected = roc_auc_score(all_pos.numpy() > 5, pred.numpy())
    assert F.auc(pred, all_pos, cutoff=5, nan_if_no_zero=False).item() == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------
# JS divergence, RMSE, NRMSE
# ---------------------------------------------------------------------------------------------
def test_js_hand_computed() -> None:
    # P = truth / 4 = [1/4, 0, 1/4, 1/2]; Q = max(pred, 0) / 4 = [1/2, 1/4, 0, 1/4].
    # Each half-sum equals 1/4 log2(2/3) + 1/4 + 1/2 log2(4/3); JS = that value.
    truth = torch.tensor([1.0, 0.0, 1.0, 2.0])
    pred = torch.tensor([2.0, 1.0, -3.0, 1.0])
    expected = 0.25 * math.log2(2 / 3) + 0.25 + 0.5 * math.log2(4 / 3)
    assert F.js_divergence(pred, truth).item() == pytest.approx(expected, abs=1e-15)
    assert F.js_divergence(truth, truth).item() == pytest.approx(0.0, abs=1e-15)
    # disjoint supports -> 1 bit
    assert F.js_divergence(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])).item() == 1.0


def test_js_uniform_when_sum_is_zero_and_matches_reference() -> None:
    ones = torch.ones(4, dtype=torch.float64)
    assert F.js_divergence(-ones, torch.zeros(4)).item() == pytest.approx(0.0, abs=1e-15)
    t = torch.tensor([0.0, 0.0, 0.0, 4.0], dtype=torch.float64)  # vs uniform Q
    expected = ref_js(-np.ones(4), t.numpy())
    assert F.js_divergence(-ones, t).item() == pytest.approx(expected, abs=1e-15)
    pred, truth, _ = _data(n=100, g=4, seed=5)
    pred -= 1.0  # some negative predictions
    out = F.js_divergence(torch.from_numpy(pred), torch.from_numpy(truth))
    for j in range(4):
        assert out[j].item() == pytest.approx(ref_js(pred[:, j], truth[:, j]), abs=1e-13)


def test_rmse_and_nrmse() -> None:
    pred = torch.tensor([1.0, 2.0, 4.0, 0.0])
    truth = torch.tensor([1.0, 3.0, 2.0, 2.0])
    rmse = math.sqrt((0 + 1 + 4 + 4) / 4)  # 1.5
    assert F.rmse(pred, truth).item() == pytest.approx(rmse)
    assert F.nrmse(pred, truth).item() == pytest.approx(rmse / 2.0)
    assert F.nrmse(pred, truth, norm="sd").item() == pytest.approx(
        rmse / np.std([1, 3, 2, 2], ddof=1)
    )
    assert math.isinf(F.nrmse(pred, torch.ones(4)).item())  # R gives Inf
    with pytest.raises(ValueError, match="norm"):
        F.nrmse(pred, truth, norm="mean")


# ---------------------------------------------------------------------------------------------
# shapes, input validation, spot_metrics
# ---------------------------------------------------------------------------------------------
ALL_FUNCS = [F.pcc, F.spearman, F.mutual_info, F.ssim, F.js_divergence, F.rmse, F.nrmse, F.auc]


@pytest.mark.parametrize("fn", ALL_FUNCS, ids=lambda f: f.__name__)
def test_1d_matches_2d_columns_and_numpy_input(fn) -> None:
    pred, truth, counts = _data(n=80, g=3, seed=7)
    second = counts if fn is F.auc else truth
    out2d = fn(pred, second)  # numpy input accepted
    assert isinstance(out2d, torch.Tensor) and out2d.shape == (3,) and out2d.dtype == torch.float64
    for j in range(3):
        out1d = fn(torch.from_numpy(pred[:, j]), torch.from_numpy(second[:, j]))
        assert out1d.ndim == 0
        torch.testing.assert_close(out1d, out2d[j], rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("fn", ALL_FUNCS, ids=lambda f: f.__name__)
def test_shape_validation(fn) -> None:
    with pytest.raises(ValueError, match=r"\(10, 3\).*\(10, 4\)"):
        fn(torch.zeros(10, 3), torch.zeros(10, 4))
    with pytest.raises(ValueError, match=r"\(2, 5, 3\)"):
        fn(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3))


def test_non_finite_inputs_give_nan_for_that_gene_only() -> None:
    pred, truth, _ = _data(n=50, g=3)
    pred[4, 1] = np.nan
    res = spot_metrics(pred, truth)
    for key in ("pcc", "spearman", "mi", "ssim", "js", "rmse", "pred_mean"):
        assert torch.isnan(res[key][1]) and not torch.isnan(res[key][[0, 2]]).any()
    assert not torch.isnan(res["truth_mean"]).any()


def test_spot_metrics_keys_and_consistency() -> None:
    pred, truth, counts = _data(n=120, g=5, seed=2)
    res = spot_metrics(torch.from_numpy(pred).float(), truth, counts)
    expected_keys = {
        "pcc", "spearman", "mi", "ssim", "js", "nrmse_range", "nrmse_sd", "rmse", "auc",
        "truth_mean", "pred_mean", "truth_var", "pred_var",
    } | {f"auc_{c}" for c in AUC_CUTOFFS}  # fmt: skip
    assert set(res) == expected_keys
    p = torch.from_numpy(pred).float()
    singles = {
        "pcc": F.pcc(p, truth),
        "spearman": F.spearman(p, truth),
        "mi": F.mutual_info(p, truth),
        "ssim": F.ssim(p, truth),
        "js": F.js_divergence(p, truth),
        "nrmse_range": F.nrmse(p, truth),
        "nrmse_sd": F.nrmse(p, truth, norm="sd"),
        "rmse": F.rmse(p, truth),
        "auc": F.auc(p, counts),
        **{f"auc_{c}": F.auc(p, counts, cutoff=c) for c in AUC_CUTOFFS},
    }
    for key, value in singles.items():
        torch.testing.assert_close(res[key], value, equal_nan=True, rtol=0, atol=0)
    np.testing.assert_allclose(res["truth_var"].numpy(), truth.var(axis=0, ddof=1))
    np.testing.assert_allclose(res["pred_mean"].numpy(), p.double().mean(0).numpy())
    assert all(v.dtype == torch.float64 and v.shape == (5,) for v in res.values())
    assert "auc_0" not in spot_metrics(pred, truth, counts, cutoffs=(5,))
    assert "auc" not in spot_metrics(pred, truth)


# ---------------------------------------------------------------------------------------------
# torchmetrics wrappers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metric", "fn"),
    [
        (SpotPCC(), F.pcc),
        (SpotSpearman(), F.spearman),
        (SpotMI(), F.mutual_info),
        (SpotSSIM(), F.ssim),
        (SpotJSDivergence(), F.js_divergence),
        (SpotRMSE(), F.rmse),
        (SpotNRMSE(norm="sd"), lambda p, t: F.nrmse(p, t, norm="sd")),
        (SpotAUC(cutoff=2), lambda p, c: F.auc(p, c, cutoff=2)),
    ],
    ids=lambda x: type(x).__name__ if not callable(x) or hasattr(x, "update") else "",
)
def test_metric_accumulates_like_functional(metric, fn) -> None:
    pred, truth, counts = _data(n=90, g=4, seed=11)
    target = counts if isinstance(metric, SpotAUC) else truth
    p, t = torch.from_numpy(pred).float(), torch.from_numpy(target).float()
    for sl in (slice(0, 30), slice(30, 31), slice(31, 90)):
        metric.update(p[sl], t[sl])
    out = metric.compute()
    torch.testing.assert_close(out, fn(p, t), equal_nan=True)
    assert out.shape == (4,)
    metric.reset()
    metric.update(p[:40], t[:40])
    torch.testing.assert_close(metric.compute(), fn(p[:40], t[:40]), equal_nan=True)


def test_metric_reduce_mean_and_validation() -> None:
    pred, truth, _ = _data(n=60, g=4, seed=4)
    truth[:, 0] = 1.0  # NaN PCC for gene 0 is ignored by the mean
    metric = SpotPCC(reduce="mean")
    metric.update(torch.from_numpy(pred), torch.from_numpy(truth))
    expected = F.pcc(pred, truth)[1:].mean()
    assert metric.compute().ndim == 0
    torch.testing.assert_close(metric.compute(), expected)
    with pytest.raises(ValueError, match="reduce"):
        SpotPCC(reduce="sum")
    with pytest.raises(ValueError, match=r"\(5, 2\).*\(5, 3\)"):
        SpotPCC().update(torch.zeros(5, 2), torch.zeros(5, 3))
    m = SpotRMSE()
    m.update(torch.zeros(5, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="gene axis"):
        m.update(torch.zeros(5, 3), torch.zeros(5, 3))
