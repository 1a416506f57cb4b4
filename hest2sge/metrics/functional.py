"""Per-gene evaluation metrics of the benchmark, as pure torch functions.

Every function reproduces the definition in the benchmark's R code (Wang, Chan et al., Nat Commun
2025; SydneyBioX/HEtoSGEBench, ``benchmarkUtils.R``) and the paper's Methods, including its corner
cases, so that numbers computed here can be compared with the paper's.

Conventions shared by all functions:

* ``pred`` and ``truth`` (or ``counts``) are tensors or numpy arrays of shape ``(n_spots,)`` or
  ``(n_spots, n_genes)``: rows are the spots of ONE image, columns are genes. Both must have the
  same shape, otherwise a :class:`ValueError` naming the shapes is raised.
* Computation is done in float64 on the input's device and the result is **always float64**:
  a tensor of shape ``(n_genes,)`` for 2-D input, a 0-d tensor for 1-D input.
* A metric that is undefined for a gene (constant vector, a single class, zero entropy, ...) is
  ``NaN`` for that gene. A gene whose inputs contain NaN or infinite values is ``NaN`` too.
* Inputs are detached: these are evaluation metrics, not losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "AUC_CUTOFFS",
    "auc",
    "js_divergence",
    "mutual_info",
    "nrmse",
    "pcc",
    "rmse",
    "spearman",
    "spot_metrics",
    "ssim",
]

AUC_CUTOFFS: tuple[int, ...] = (0, 1, 2, 5, 7, 10, 20)
"""Count cut-offs used by the benchmark for the AUC metric (``auc_<c>`` in its result tables)."""

_SSIM_LEVELS = 256
_SSIM_C1 = (0.01 * (_SSIM_LEVELS - 1)) ** 2
_SSIM_C2 = (0.03 * (_SSIM_LEVELS - 1)) ** 2
_LOG2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from err


def _prepare(
    pred: Any, other: Any, names: tuple[str, str] = ("pred", "truth")
) -> tuple[Tensor, Tensor, bool]:
    """Validate two inputs and return them as float64 ``(n, g)`` tensors plus a 1-D flag."""
    a = _as_tensor(pred, names[0])
    b = _as_tensor(other, names[1])
    if a.ndim not in (1, 2) or b.ndim not in (1, 2):
        raise ValueError(
            f"{names[0]} and {names[1]} must be 1-D (n_spots,) or 2-D (n_spots, n_genes); got "
            f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if a.shape[0] == 0:
        raise ValueError(f"need at least one spot; got shape {tuple(a.shape)}")
    b = b.to(device=a.device)
    squeeze = a.ndim == 1
    if squeeze:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    return a.to(torch.float64), b.to(torch.float64), squeeze


def _finish(out: Tensor, squeeze: bool, *inputs: Tensor) -> Tensor:
    """Set genes with non-finite inputs to NaN and drop the gene axis for 1-D input."""
    bad = torch.zeros_like(out, dtype=torch.bool)
    for x in inputs:
        bad |= ~torch.isfinite(x).all(dim=0)
    out = out.masked_fill(bad, math.nan)
    return out[0] if squeeze else out


def _constant(x: Tensor) -> Tensor:
    """Per-column flag: all values equal (exact comparison, robust to rounding of the mean)."""
    return x.amax(dim=0) == x.amin(dim=0)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def _pearson(x: Tensor, y: Tensor) -> Tensor:
    xc = x - x.mean(dim=0)
    yc = y - y.mean(dim=0)
    r = (xc * yc).sum(dim=0) / torch.sqrt((xc * xc).sum(dim=0) * (yc * yc).sum(dim=0))
    r = r.clamp(-1.0, 1.0)  # R's cor() clamps rounding excursions too
    return r.masked_fill(_constant(x) | _constant(y), math.nan)


def _ranks_from_sorted(values: Tensor, order: Tensor) -> Tensor:
    """Average (1-based) ranks per column, given ``torch.sort(x, dim=0)`` of ``x``.

    Ties share the mean of the ranks they span (R ``rank(ties.method = "average")``).
    Vectorised over columns: group boundaries come from comparing neighbours in sorted order,
    the first/last position of each tie group from a cumulative max/min.
    """
    n = values.shape[0]
    pos = torch.arange(n, device=values.device, dtype=torch.float64).unsqueeze(1)
    pos = pos.expand_as(values)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]
    ends = torch.ones_like(starts)
    ends[:-1] = starts[1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=0).values
    last = torch.where(ends, pos, torch.full_like(pos, n)).flip(0).cummin(dim=0).values.flip(0)
    avg = (first + last) / 2.0 + 1.0
    return torch.empty_like(avg).scatter_(0, order, avg)


def _ranks(x: Tensor) -> Tensor:
    values, order = torch.sort(x, dim=0)
    return _ranks_from_sorted(values, order)


def _mi_nbins(n: int) -> int:
    # R: bins = max(10, length(x)^(1/3)); infotheo truncates with as.integer(). Python's float
    # power calls the same C pow() as R, so e.g. n = 1331 gives 10 (10.999...), as in R.
    return int(max(10.0, n ** (1.0 / 3.0)))


def _equalfreq_bins(x: Tensor, sorted_x: Tensor, nbins: int) -> Tensor:
    """infotheo ``discretize(disc = "equalfreq")`` bin index (0-based), returned as ``(g, n)``."""
    n = x.shape[0]
    freq, mod = divmod(n, nbins)
    i = torch.arange(nbins - 1, device=x.device)
    s = freq - 1 + i * freq  # running split index of infotheo's discEF
    idx = torch.where(i < mod, s + 1, s)  # the first `mod` splits take the next order statistic
    # n < nbins makes infotheo read col[-1] (undefined behaviour in C); we clamp to col[0].
    idx = idx.clamp(0, n - 1)
    splits = torch.cat([sorted_x[idx], sorted_x[-1:] + 0.01], dim=0)  # (nbins, g)
    # first bin k with value <= split[k]: left-sided search in the non-decreasing split points.
    bins = torch.searchsorted(splits.T.contiguous(), x.T.contiguous(), side="left")
    return bins.clamp_(max=nbins - 1)  # only NaN could fall past the end; those genes are masked


def _entropy(codes: Tensor, nbins: int) -> tuple[Tensor, Tensor]:
    """Empirical entropy (nats) of each row of integer codes, and the number of occupied bins."""
    g, n = codes.shape
    counts = torch.zeros(g, nbins, dtype=torch.float64, device=codes.device)
    counts.scatter_add_(1, codes, torch.ones_like(codes, dtype=torch.float64))
    # infotheo entropy_empirical: log(N) + (-sum c log c) / N
    h = math.log(n) - torch.special.xlogy(counts, counts).sum(dim=1) / n
    return h, (counts > 0).sum(dim=1)


def _mutual_info(pred: Tensor, truth: Tensor, sp: Tensor, st: Tensor) -> Tensor:
    nbins = _mi_nbins(pred.shape[0])
    a = _equalfreq_bins(pred, sp, nbins)
    b = _equalfreq_bins(truth, st, nbins)
    ha, ka = _entropy(a, nbins)
    hb, kb = _entropy(b, nbins)
    hab, _ = _entropy(a * nbins + b, nbins * nbins)
    mi = (ha + hb - hab).clamp(min=0.0)  # infotheo::mutinformation sets negative MI to 0
    out = mi / torch.sqrt(ha * hb)
    return out.masked_fill((ka <= 1) | (kb <= 1), math.nan)


def _r_cut_codes(v: Tensor, levels: int = _SSIM_LEVELS) -> Tensor:
    """R ``cut(v, levels, labels = FALSE) - 1`` per column, returned as float64 ``(n, g)``."""
    lo = v.amin(dim=0)
    hi = v.amax(dim=0)
    dx = hi - lo
    i = torch.arange(levels + 1, device=v.device, dtype=torch.float64).unsqueeze(1)
    # non-constant column: seq.int(lo, hi, length.out = levels + 1), ends widened by dx / 1000
    br = lo + i * (dx / levels)
    br[0] = lo - dx / 1000.0
    br[levels] = hi + dx / 1000.0
    # constant column: seq.int(lo - d/1000, hi + d/1000, length.out), d = |lo| (1 when lo == 0)
    d = torch.where(lo != 0, lo.abs(), torch.ones_like(lo))
    c_from = lo - d / 1000.0
    c_to = hi + d / 1000.0
    brc = c_from + i * ((c_to - c_from) / levels)
    brc[0] = c_from
    brc[levels] = c_to
    breaks = torch.where(dx == 0, brc, br)  # (levels + 1, g)
    # right-closed intervals (b[k], b[k+1]]: interval k holds v iff k + 1 is the first index
    # with b >= v, i.e. a left-sided search.
    codes = torch.searchsorted(breaks.T.contiguous(), v.T.contiguous(), side="left") - 1
    return codes.clamp_(0, levels - 1).T.to(torch.float64)


def _max_normalise(v: Tensor) -> Tensor:
    mx = v.amax(dim=0)
    return torch.where(mx == 0, torch.zeros_like(v), v / mx)


def _ssim(pred: Tensor, truth: Tensor) -> Tensor:
    x = _r_cut_codes(_max_normalise(pred))
    y = _r_cut_codes(_max_normalise(truth))
    n = x.shape[0]
    mux = x.mean(dim=0)
    muy = y.mean(dim=0)
    xc = x - mux
    yc = y - muy
    sigxy = (xc * yc).sum(dim=0) / (n - 1) if n > 1 else torch.full_like(mux, math.nan)
    sigx = (xc * xc).sum(dim=0) / (n - 1) if n > 1 else torch.full_like(mux, math.nan)
    sigy = (yc * yc).sum(dim=0) / (n - 1) if n > 1 else torch.full_like(mux, math.nan)
    num = (2 * mux * muy + _SSIM_C1) * (2 * sigxy + _SSIM_C2)
    den = (mux**2 + muy**2 + _SSIM_C1) * (sigx + sigy + _SSIM_C2)
    return num / den


def _auc_from_ranks(
    pred_ranks: Tensor, counts: Tensor, cutoff: float, nan_if_no_zero: bool
) -> Tensor:
    n = counts.shape[0]
    pos = counts > cutoff
    n1 = pos.sum(dim=0).to(torch.float64)
    n0 = n - n1
    u = torch.where(pos, pred_ranks, torch.zeros_like(pred_ranks)).sum(dim=0)
    u = u - n1 * (n1 + 1) / 2.0
    out = u / (n1 * n0)
    undefined = (n1 == 0) | (n0 == 0)
    if nan_if_no_zero:
        nonzero = (counts > 0).sum(dim=0)
        undefined |= (nonzero == 0) | (nonzero == n)
    return out.masked_fill(undefined, math.nan)


def _js(pred: Tensor, truth: Tensor) -> Tensor:
    n = truth.shape[0]

    def normalise(v: Tensor) -> Tensor:
        s = v.sum(dim=0)
        return torch.where(s == 0, torch.full_like(v, 1.0 / n), v / s)

    p = normalise(truth)
    q = normalise(pred.clamp(min=0.0))
    m = p + q

    def half(a: Tensor) -> Tensor:
        # philentropy: 0 when a == 0 or a + b == 0, else a * log2(2a / (a + b))
        skip = (a == 0) | (m == 0)
        safe_m = torch.where(skip, torch.ones_like(m), m)
        safe_a = torch.where(skip, torch.ones_like(a), a)
        term = safe_a * (torch.log(2.0 * safe_a / safe_m) / _LOG2)
        return torch.where(skip, torch.zeros_like(a), term).sum(dim=0)

    return 0.5 * (half(p) + half(q))


def _rmse(pred: Tensor, truth: Tensor) -> Tensor:
    return torch.sqrt(((truth - pred) ** 2).mean(dim=0))


def _sd(x: Tensor) -> Tensor:
    if x.shape[0] < 2:
        return torch.full((x.shape[1],), math.nan, dtype=x.dtype, device=x.device)
    return x.std(dim=0, correction=1)


def _var(x: Tensor) -> Tensor:
    if x.shape[0] < 2:
        return torch.full((x.shape[1],), math.nan, dtype=x.dtype, device=x.device)
    return x.var(dim=0, correction=1)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def pcc(pred: Tensor, truth: Tensor) -> Tensor:
    """Pearson correlation per gene over the spots of one image.

    Definition (benchmark ``cor_pearson``, R ``cor(pred, truth)``):
    ``sum((p - mean p)(t - mean t)) / sqrt(sum (p - mean p)^2 * sum (t - mean t)^2)``,
    clamped to [-1, 1]. NaN when either vector is constant.

    Args:
        pred: Predictions, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        truth: Ground truth on the same scale, same shape.

    Returns:
        float64 tensor of shape ``(n_genes,)`` (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D.

    Example:
        >>> import torch
        >>> truth = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 5.0]])
        >>> pred = torch.tensor([[0.0, 3.0], [1.0, 2.0], [2.0, 1.0]])
        >>> pcc(pred, truth).round(decimals=3).tolist()
        [1.0, -0.866]
    """
    p, t, squeeze = _prepare(pred, truth)
    return _finish(_pearson(p, t), squeeze, p, t)


def spearman(pred: Tensor, truth: Tensor) -> Tensor:
    """Spearman correlation per gene: Pearson correlation of average ranks.

    Definition (benchmark ``cor_spearman``, R ``cor(method = "spearman")``): values are ranked
    within each gene, ties sharing the mean of the ranks they span, then :func:`pcc` is applied
    to the ranks. NaN when either vector is constant.

    Args:
        pred: Predictions, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        truth: Ground truth, same shape.

    Returns:
        float64 tensor of shape ``(n_genes,)`` (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D.
    """
    p, t, squeeze = _prepare(pred, truth)
    return _finish(_pearson(_ranks(p), _ranks(t)), squeeze, p, t)


def mutual_info(pred: Tensor, truth: Tensor) -> Tensor:
    """Normalised mutual information per gene with infotheo's equal-frequency discretisation.

    Definition (benchmark ``calculate_MI`` in ``benchmarkUtils.R``, R package infotheo):

    * ``nbins = int(max(10, n ** (1/3)))`` for ``n`` spots.
    * Each vector is discretised by ``discretize(disc = "equalfreq")``: with ``s`` the sorted
      values, ``freq = n // nbins`` and ``mod = n % nbins``, split point ``i`` (``i = 0 ..
      nbins-2``) is ``s[j + 1]`` for the first ``mod`` splits and ``s[j]`` afterwards, where
      ``j = freq - 1 + i * freq``; the last split is ``max + 0.01``. A value goes to the first bin
      ``k`` with ``value <= split[k]``. (For ``n < nbins`` infotheo reads out of bounds; the index
      is clamped to 0 here.)
    * ``MI = max(H(a) + H(b) - H(a, b), 0)`` with empirical entropies in nats
      (``H = log n - sum c log c / n`` over bin counts ``c``), normalised by
      ``sqrt(H(a) * H(b))``.

    NaN when either discretised vector occupies a single bin (zero entropy), which for
    ``n >= nbins`` happens exactly when the vector is constant.

    Args:
        pred: Predictions, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        truth: Ground truth, same shape.

    Returns:
        float64 tensor of shape ``(n_genes,)`` in [0, 1] (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D.
    """
    p, t, squeeze = _prepare(pred, truth)
    sp = torch.sort(p, dim=0).values
    st = torch.sort(t, dim=0).values
    return _finish(_mutual_info(p, t, sp, st), squeeze, p, t)


def ssim(pred: Tensor, truth: Tensor) -> Tensor:
    """Global (non-windowed) 256-level structural similarity per gene.

    Definition (benchmark ``calculate_SSIM`` in ``benchmarkUtils.R``):

    1. ``x = pred / max(pred)``, ``y = truth / max(truth)``; a vector whose maximum is 0 becomes
       all zeros.
    2. Each is digitised as R ``cut(v, 256, labels = FALSE) - 1``: 257 breaks
       ``lo + i * (hi - lo) / 256`` with the first and last moved out by ``(hi - lo) / 1000``;
       intervals are right-closed ``(b[k], b[k+1]]``. When ``hi == lo`` the breaks span
       ``lo -/+ d / 1000`` with ``d = |lo|`` (1 when ``lo == 0``), so all values share one code.
    3. ``SSIM = (2 mx my + C1)(2 sxy + C2) / ((mx^2 + my^2 + C1)(sx + sy + C2))`` with
       ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2`` and sample (n-1) (co)variances of the
       codes.

    R semantics are kept for negative values: the division by the maximum flips the order of a
    vector whose maximum is negative (e.g. ``[-1, -2, -4] -> [1, 2, 4]``) and a vector whose
    maximum is exactly 0 becomes constant even if it has negative entries. Apart from these two
    cases the normalisation does not change the codes (``cut`` is scale invariant). Constant
    vectors are defined (one shared code), so SSIM is NaN only for a single spot.

    Args:
        pred: Predictions, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        truth: Ground truth, same shape.

    Returns:
        float64 tensor of shape ``(n_genes,)`` (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D.
    """
    p, t, squeeze = _prepare(pred, truth)
    return _finish(_ssim(p, t), squeeze, p, t)


def auc(pred: Tensor, counts: Tensor, cutoff: float = 0, *, nan_if_no_zero: bool = True) -> Tensor:
    """ROC AUC per gene of the prediction for the raw counts binarised at ``cutoff``.

    Definition (benchmark ``calculate_AUC`` in ``benchmarkUtils.R``, ``pROC::auc(direction =
    "<")``): label = ``counts > cutoff``; AUC = P(pred of a positive spot > pred of a negative
    spot) + 0.5 P(tie), i.e. the Mann-Whitney statistic ``(R1 - n1 (n1 + 1) / 2) / (n1 n0)``
    with average ranks ``R1`` of the positives.

    NaN when the labels have a single class. Like the R code (``if (length(unique(actual > 0))
    == 1) return(NA)``), it is also NaN whenever ``counts > 0`` has a single value, i.e. when all
    counts are zero **or all are positive** -- even if the binarisation at a higher cutoff has
    two classes. Pass ``nan_if_no_zero=False`` to drop that second condition.

    Args:
        pred: Predictions, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        counts: RAW observed counts (not the model's target scale), same shape.
        cutoff: Count threshold; the benchmark uses :data:`AUC_CUTOFFS`.
        nan_if_no_zero: Reproduce R's NA when ``counts > 0`` is constant (default True).

    Returns:
        float64 tensor of shape ``(n_genes,)`` (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D.
    """
    p, c, squeeze = _prepare(pred, counts, ("pred", "counts"))
    out = _auc_from_ranks(_ranks(p), c, float(cutoff), nan_if_no_zero)
    return _finish(out, squeeze, p, c)


def js_divergence(pred: Tensor, truth: Tensor) -> Tensor:
    """Jensen-Shannon divergence (base 2) per gene between truth and prediction profiles.

    Definition (benchmark ``calculate_JS_divergence``, ``philentropy::distance(method =
    "jensen-shannon", unit = "log2")``): ``P = truth / sum(truth)`` and
    ``Q = max(pred, 0) / sum(max(pred, 0))``, each replaced by the uniform vector ``1 / n`` when
    its sum is 0; ``JS = 0.5 sum P log2(2P / (P + Q)) + 0.5 sum Q log2(2Q / (P + Q))`` where a
    term is 0 when its own probability or ``P + Q`` is 0. Truth is not clipped (as in R), so the
    value is only meaningful for non-negative truth. Lower is better; range [0, 1].

    Args:
        pred: Predictions, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        truth: Ground truth, same shape.

    Returns:
        float64 tensor of shape ``(n_genes,)`` (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D.
    """
    p, t, squeeze = _prepare(pred, truth)
    return _finish(_js(p, t), squeeze, p, t)


def rmse(pred: Tensor, truth: Tensor) -> Tensor:
    """Root mean squared error per gene: ``sqrt(mean((pred - truth)^2))`` (benchmark ``rmse``).

    Args:
        pred: Predictions, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        truth: Ground truth, same shape.

    Returns:
        float64 tensor of shape ``(n_genes,)`` (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D.
    """
    p, t, squeeze = _prepare(pred, truth)
    return _finish(_rmse(p, t), squeeze, p, t)


def nrmse(pred: Tensor, truth: Tensor, norm: str = "range") -> Tensor:
    """Normalised RMSE per gene (benchmark ``calculate_nrmse``, ``nrmse_range`` / ``nrmse_sd``).

    ``norm="range"``: ``rmse / (max(truth) - min(truth))``; ``norm="sd"``: ``rmse / sd(truth)``
    with the sample (n-1) standard deviation. As in R, a zero denominator gives ``inf`` (or
    ``NaN`` when the RMSE is also 0).

    Args:
        pred: Predictions, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        truth: Ground truth, same shape.
        norm: ``"range"`` or ``"sd"``.

    Returns:
        float64 tensor of shape ``(n_genes,)`` (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D, or ``norm`` is unknown.
    """
    if norm not in ("range", "sd"):
        raise ValueError(f"norm must be 'range' or 'sd', got {norm!r}")
    p, t, squeeze = _prepare(pred, truth)
    denom = t.amax(dim=0) - t.amin(dim=0) if norm == "range" else _sd(t)
    return _finish(_rmse(p, t) / denom, squeeze, p, t)


def _auc_key(cutoff: float) -> str:
    return f"auc_{cutoff:g}"


def spot_metrics(
    pred: Tensor,
    truth: Tensor,
    counts: Tensor | None = None,
    cutoffs: Sequence[float] = AUC_CUTOFFS,
) -> dict[str, Tensor]:
    """All benchmark metrics per gene for the spots of ONE image.

    Shares the sorting/ranking work between metrics, so it is cheaper than calling each
    function. Keys: ``"pcc"``, ``"spearman"``, ``"mi"``, ``"ssim"``, ``"js"``, ``"nrmse_range"``,
    ``"nrmse_sd"``, ``"rmse"``, ``"truth_mean"``, ``"pred_mean"``, ``"truth_var"``,
    ``"pred_var"`` (sample variances) and, when ``counts`` is given, ``"auc_<c>"`` for each cutoff
    (formatted with ``:g``, e.g. ``"auc_10"``) plus ``"auc"`` = AUC at cutoff 0 (computed even if
    0 is not in ``cutoffs``). Each value equals the corresponding function of this module.

    Args:
        pred: Predictions on the model's target scale, ``(n_spots,)`` or ``(n_spots, n_genes)``.
        truth: Ground truth on the same scale, same shape.
        counts: Optional raw counts for the AUC metrics, same shape.
        cutoffs: Count cut-offs for the AUC metrics.

    Returns:
        Dict of float64 tensors of shape ``(n_genes,)`` (0-d for 1-D input).

    Raises:
        ValueError: If the shapes differ or are not 1-D/2-D.
    """
    p, t, squeeze = _prepare(pred, truth)
    c = None
    if counts is not None:
        _, c, _ = _prepare(pred, counts, ("pred", "counts"))
    sp, op = torch.sort(p, dim=0)
    st, ot = torch.sort(t, dim=0)
    rp = _ranks_from_sorted(sp, op)
    rt = _ranks_from_sorted(st, ot)
    err = _rmse(p, t)
    both = (p, t)
    parts: dict[str, tuple[Tensor, tuple[Tensor, ...]]] = {
        "pcc": (_pearson(p, t), both),
        "spearman": (_pearson(rp, rt), both),
        "mi": (_mutual_info(p, t, sp, st), both),
        "ssim": (_ssim(p, t), both),
        "js": (_js(p, t), both),
        "nrmse_range": (err / (t.amax(dim=0) - t.amin(dim=0)), both),
        "nrmse_sd": (err / _sd(t), both),
        "rmse": (err, both),
        "truth_mean": (t.mean(dim=0), (t,)),
        "pred_mean": (p.mean(dim=0), (p,)),
        "truth_var": (_var(t), (t,)),
        "pred_var": (_var(p), (p,)),
    }
    result = {k: _finish(v, squeeze, *inp) for k, (v, inp) in parts.items()}
    if c is not None:

        def _auc_at(cut: float) -> Tensor:
            return _finish(_auc_from_ranks(rp, c, float(cut), True), squeeze, p, c)

        for cut in cutoffs:
            result[_auc_key(cut)] = _auc_at(cut)
        result["auc"] = result[_auc_key(0)] if 0 in cutoffs else _auc_at(0)
    return result
