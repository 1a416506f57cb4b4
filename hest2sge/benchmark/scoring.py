"""Scoring predictions: long tables, the common depth-normalised scale, reference rows.

The long table has one row per (image, spot, gene) and the columns of the paper's pipeline:
``img_id, model_id, pred_type, train_fold, gene, exprs, pred, patch_id`` plus ``patient_id``,
``dataset`` and ``counts`` (raw count, for AUC). ``pred_type`` names the scale:

* ``own``: the model's own training target scale (the paper's convention: numbers of different
  models are on different scales and mostly not comparable);
* ``common``: ln(1 + 1e4 c / panel total) for every model. The prediction is mapped back
  through the model's inverse target transform to a non-negative expression estimate, then
  normalised over the panel exactly like the truth. It removes spot depth from the truth,
  which own-scale numbers mostly measure (see the reference rows);
* ``raw`` and ``log10``: raw counts and log10(1 + c), for the reference rows that show the
  depth confound.

Reference rows need no image: ``ref_depth`` predicts log(1 + spot total UMI) for every gene,
``ref_train_mean`` predicts the training slides' mean (a constant per gene: correlation metrics
are undefined for it, error metrics are not).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

LONG_COLUMNS = ("dataset", "img_id", "patient_id", "model_id", "pred_type", "train_fold",
                "gene", "exprs", "pred", "counts", "patch_id")
COMMON_SCALE = "ln(1 + 1e4 * count / panel total)"


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def common_truth(counts: np.ndarray) -> np.ndarray:
    """The common scale of the truth: ``ln(1 + 1e4 c / sum over the panel)`` per spot."""
    counts = np.asarray(counts, dtype=np.float64)
    lib = counts.sum(1, keepdims=True)
    return np.log1p(1e4 * counts / np.where(lib > 0, lib, 1.0))


def to_expression(pred: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Map predictions on a model's target scale back to non-negative expression estimates.

    Inverse of :class:`~hest2sge.data.transforms.TargetTransform` up to a per-spot factor
    (which the panel normalisation of :func:`to_common` removes): ``log_norm`` ->
    ``base^y - pseudocount``; ``stnet`` -> ``exp(y)``; min-max kinds undo the min-max, then
    the log; ``raw`` stays. Negative values are clipped to 0.
    """
    y = np.asarray(pred, dtype=np.float64)
    kind = spec.get("kind", "raw")
    base = spec.get("base", 10)
    b = np.e if base in ("e", None) else float(base)
    if kind in ("log_minmax", "minmax", "sct"):
        lo, hi = spec.get("min"), spec.get("max")
        if lo is None or hi is None:
            raise ValueError(f"target transform {kind!r} has no fitted min/max: evaluate a "
                             "model that was fitted (or give its fitted transform)")
        y = y * (np.asarray(hi) - np.asarray(lo) + 1e-8) + np.asarray(lo)
    if kind in ("log_norm", "log_minmax", "sct"):
        y = np.power(b, np.minimum(y, 300.0 / np.log(b))) - float(spec.get("pseudocount", 1.0))
    elif kind == "stnet":
        y = np.exp(np.minimum(y, 300.0))
    elif kind not in ("raw", "minmax"):
        raise ValueError(f"no inverse for target transform {kind!r}")
    return np.clip(y, 0.0, None)


def to_common(pred: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Predictions on the common scale (see the module docstring)."""
    return common_truth(to_expression(pred, spec))


def long_frame(pred: np.ndarray, truth: np.ndarray, counts: np.ndarray, *, img_id: str,
               patient_id: str, model_id: str, pred_type: str, train_fold: Any,
               genes: Sequence[str], patch_ids: Sequence[str], dataset: str = ""):
    """One image's predictions as long-table rows (spot-major, genes in panel order)."""
    import pandas as pd

    n, g = pred.shape
    return pd.DataFrame({
        "dataset": dataset,
        "img_id": img_id,
        "patient_id": patient_id,
        "model_id": model_id,
        "pred_type": pred_type,
        "train_fold": str(train_fold),
        "gene": np.tile(np.asarray(genes, dtype=object), n),
        "exprs": np.asarray(truth, dtype=np.float64).ravel(),
        "pred": np.asarray(pred, dtype=np.float64).ravel(),
        "counts": np.asarray(counts, dtype=np.float64).ravel(),
        "patch_id": np.repeat(np.asarray(patch_ids, dtype=object), g),
    })


GROUP_KEYS = ("dataset", "model_id", "pred_type", "train_fold")


def metrics_from_long(long, aggregation: str = "paper"):
    """Per-(model, fold, image, gene) metrics from a long table.

    Args:
        long: Long table (:data:`LONG_COLUMNS`).
        aggregation: ``"paper"``: metrics over the spots of each image (then aggregated per
            patient and gene); ``"pooled"``: over the concatenated test spots of each
            (model, fold), as HEST-Benchmark computes PCC (one pseudo-image ``pooled``).

    Returns:
        DataFrame with ``dataset, model_id, pred_type, train_fold, slide_id, patient_id,
        gene, n_spots`` and one column per metric (:func:`~hest2sge.metrics.spot_metrics`).
    """
    import pandas as pd

    from hest2sge.metrics.callback import evaluate_predictions

    if aggregation not in ("paper", "pooled"):
        raise ValueError(f"aggregation must be 'paper' or 'pooled', got {aggregation!r}")
    img_keys = ["img_id"] if aggregation == "paper" else []
    out = []
    for key, grp in long.groupby([*GROUP_KEYS, *img_keys], sort=False):
        genes = list(dict.fromkeys(grp["gene"]))
        g = len(genes)
        if len(grp) % g:
            raise ValueError(f"incomplete long table for {key}: {len(grp)} rows, {g} genes")
        gcol = grp["gene"].to_numpy()
        if np.array_equal(gcol.reshape(-1, g), np.tile(np.asarray(genes, dtype=object),
                                                      (len(grp) // g, 1))):
            mats = [grp[c].to_numpy(dtype=np.float64).reshape(-1, g)
                    for c in ("pred", "exprs", "counts")]
        else:  # rows in another order: pivot to spots x genes
            wide = grp.pivot_table(index=["img_id", "patch_id"], columns="gene",
                                   values=["pred", "exprs", "counts"], sort=False)
            mats = [wide[c][genes].to_numpy(dtype=np.float64) for c in ("pred", "exprs", "counts")]
        sid = str(grp["img_id"].iloc[0]) if img_keys else "pooled"
        pid = str(grp["patient_id"].iloc[0]) if img_keys else "pooled"
        t = evaluate_predictions(mats[0], mats[1], mats[2], np.zeros(len(mats[0]), int),
                                 slide_ids=[sid], patient_ids=[pid], genes=genes)
        for k, v in zip(GROUP_KEYS, key[:len(GROUP_KEYS)]):
            t.insert(0, k, v)
        out.append(t)
    return pd.concat(out, ignore_index=True)


@dataclass
class Evaluation:
    """Result of :func:`evaluate`: the long table, per-(image, gene) metrics, the summary."""

    long: Any
    metrics: Any
    summary: Any


def _truth_transform(model) -> Any:
    from hest2sge.data.transforms import TargetTransform

    spec = model.fitted_target_transform or model.target_transform_spec()
    tt = TargetTransform.from_spec(spec)
    if tt.needs_fit and tt.min is None:
        raise ValueError(
            f"{type(model).__name__} has no fitted target transform ({tt.kind!r} needs "
            "training-set statistics): evaluate a model after fitting, or one restored from "
            "a hest2sge checkpoint"
        )
    return tt


def predict_long(model, slides: Sequence, *, model_id: str | None = None,
                 train_fold: Any = "external", dataset: str = "", batch_size: int = 64,
                 cache_dir: Any = None, pixel_size_um: float | None = None):
    """Predict every slide and return long-table rows on the ``own`` and ``common`` scales."""
    import pandas as pd

    import hest2sge
    from hest2sge.data.slide import patient_id_of, slide_id_of

    predict = hest2sge.predict
    genes = list(model.genes or [])
    if not genes:
        raise ValueError("evaluate needs a model with gene names (model.genes)")
    tt = _truth_transform(model)
    spec = tt.to_dict()
    model_id = model_id or model.model_name
    frames = []
    for s in slides:
        missing = [g for g in genes if g not in set(s.var_names)]
        if missing:
            raise ValueError(f"slide {slide_id_of(s)!r} lacks {len(missing)} gene(s) of the "
                             f"model's panel, e.g. {missing[:5]}")
        ad = predict(model, s, batch_size=batch_size, cache_dir=cache_dir,
                     pixel_size_um=pixel_size_um)
        pred = np.asarray(ad.layers["pred"], dtype=np.float64)
        counts = _dense(s[:, genes].X)
        total_all = _dense(s.X).sum(1)
        truth = tt(counts, total_all=total_all, n_all=s.n_vars).astype(np.float64)
        kw = dict(img_id=slide_id_of(s), patient_id=patient_id_of(s), model_id=model_id,
                  train_fold=train_fold, genes=genes, patch_ids=list(s.obs_names),
                  dataset=dataset)
        frames.append(long_frame(pred, truth, counts, pred_type="own", **kw))
        frames.append(long_frame(to_common(pred, spec), common_truth(counts), counts,
                                 pred_type="common", **kw))
    return pd.concat(frames, ignore_index=True)


def reference_long(train_slides: Sequence, test_slides: Sequence, genes: Sequence[str], *,
                   train_fold: Any = "external", dataset: str = ""):
    """Image-free reference rows: ``ref_depth`` and ``ref_train_mean`` on the ``common``,
    ``raw`` and ``log10`` scales (see the module docstring)."""
    import pandas as pd

    from hest2sge.data.slide import patient_id_of, slide_id_of

    genes = list(genes)
    scales = {"common": common_truth, "raw": lambda c: c, "log10": lambda c: np.log10(1 + c)}
    train = [_dense(s[:, genes].X) for s in train_slides]
    means = {k: np.concatenate([f(c) for c in train], 0).mean(0) for k, f in scales.items()}
    frames = []
    for s in test_slides:
        counts = _dense(s[:, genes].X)
        depth = np.log1p(_dense(s.X).sum(1))
        kw = dict(img_id=slide_id_of(s), patient_id=patient_id_of(s), train_fold=train_fold,
                  genes=genes, patch_ids=list(s.obs_names), dataset=dataset)
        for scale, f in scales.items():
            truth = f(counts)
            frames.append(long_frame(np.repeat(depth[:, None], len(genes), 1), truth, counts,
                                     model_id="ref_depth", pred_type=scale, **kw))
            frames.append(long_frame(np.broadcast_to(means[scale], truth.shape), truth, counts,
                                     model_id="ref_train_mean", pred_type=scale, **kw))
    return pd.concat(frames, ignore_index=True)


def evaluate(model, slides: Sequence, *, reference_slides: Sequence | None = None,
             aggregation: str = "paper", model_id: str | None = None,
             batch_size: int = 64, cache_dir: Any = None,
             pixel_size_um: float | None = None) -> Evaluation:
    """Score a trained model on slides that were never in its data module.

    Same metrics, aggregation and tables as the benchmark: the long table on the model's own
    scale and on the common depth-normalised scale, per-(image, gene) metrics and the summary
    (patient-then-gene means with what they cover).

    Args:
        model: A fitted hest2sge model (its fitted target transform scores the truth).
        slides: Slides with raw counts for every gene of the model's panel.
        reference_slides: Training slides, to add the image-free reference rows.
        aggregation: ``"paper"`` (per image -> patient -> gene) or ``"pooled"``.
        model_id: Name in the tables (default: the registry name).
        batch_size, cache_dir, pixel_size_um: Passed to :func:`hest2sge.predict`.

    Returns:
        :class:`Evaluation` with ``long``, ``metrics`` and ``summary`` DataFrames.
    """
    import pandas as pd

    from hest2sge.benchmark.tables import summary_table
    from hest2sge.data.io import load_slides

    slides = load_slides(slides)
    long = predict_long(model, slides, model_id=model_id, batch_size=batch_size,
                        cache_dir=cache_dir, pixel_size_um=pixel_size_um)
    if reference_slides is not None:
        long = pd.concat([long, reference_long(load_slides(reference_slides), slides,
                                               list(model.genes))], ignore_index=True)
    metrics = metrics_from_long(long, aggregation)
    return Evaluation(long=long, metrics=metrics, summary=summary_table(metrics))
