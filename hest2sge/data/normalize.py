"""Variance-stabilising count normalisation: a closed-form stand-in for Seurat's SCTransform.

DeepSpaCE trains on SCTransform's *corrected counts* (the ``counts`` slot of the SCT assay:
Pearson residuals of a regularised negative binomial (NB) fit, mapped back to counts at the
median sequencing depth), then ``log10(1 + x)`` and min-max. Running the regularised per-gene
GLM of ``sctransform::vst`` needs R; this module uses the **analytic Pearson residuals** of
Lause, Berens & Kobak (Genome Biology 2021), which showed that the regularised fit reduces to
the offset model ``log mu_cg = log p_g + log n_c`` (slope 1 on log depth, intercept the gene's
share of all counts) with a fixed overdispersion ``theta``; sctransform v2 uses the same
offset/fixed-slope parametrisation. Closed form, deterministic, two statistics per panel.

With ``n_c`` the spot's total count over *all* genes (Seurat's ``nCount``), ``p_g`` the gene's
share of all training counts, ``theta = 100`` and ``clip = sqrt(N_train / 30)`` (Seurat
``SCTransform``'s residual clip range):

* ``mu_cg = n_c p_g``, residual ``r_cg = clip((x_cg - mu_cg) / sqrt(mu_cg + mu_cg^2 / theta))``;
* corrected count (``sctransform::correct``): depth set to the training median ``n~``,
  ``mu'_g = n~ p_g``, ``x'_cg = max(0, round(mu'_g + r_cg sqrt(mu'_g + mu'_g^2 / theta)))``.

Fitted on training slides only: ``p_g`` (gene shares), ``n~`` (median depth) and ``clip``
(from the number of training spots); ``theta`` is a fixed hyperparameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fit_pearson(
    counts_list: Sequence[np.ndarray], totals_list: Sequence[np.ndarray],
) -> dict[str, object]:
    """Fit the offset-model statistics on training spots.

    Args:
        counts_list: Per training slide, (spots, genes) panel counts.
        totals_list: Per training slide, (spots,) totals over all genes (sequencing depth).

    Returns:
        Dict with ``gene_frac`` (list, per gene ``sum_c x_cg / sum_c n_c``), ``median_depth``
        (median of the positive depths) and ``clip`` (``sqrt(N / 30)``, N = training spots).
    """
    if not counts_list:
        raise ValueError("fitting the SCTransform stand-in needs at least one training slide")
    counts = np.concatenate([np.asarray(c, dtype=np.float64) for c in counts_list], 0)
    depth = np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in totals_list], 0)
    if len(depth) != len(counts):
        raise ValueError(f"{len(counts)} spots of counts but {len(depth)} depths")
    if (counts < 0).any():
        raise ValueError("counts must be non-negative")
    total = depth.sum()
    if not total > 0:
        raise ValueError("training spots have no counts: cannot fit gene shares")
    positive = depth[depth > 0]
    return {
        "gene_frac": (counts.sum(0) / total).tolist(),
        "median_depth": float(np.median(positive)),
        "clip": float(np.sqrt(len(depth) / 30.0)),
    }


def pearson_residuals(
    counts: np.ndarray, depth: np.ndarray, gene_frac: Sequence[float], theta: float = 100.0,
    clip: float | None = None,
) -> np.ndarray:
    """Analytic Pearson residuals ``(x - mu) / sqrt(mu + mu^2 / theta)`` with ``mu = n p``.

    Genes with ``p_g = 0`` (never seen in training) get residual 0. Residuals are clipped to
    ``[-clip, clip]`` when ``clip`` is given.
    """
    x = np.asarray(counts, dtype=np.float64)
    p = np.asarray(gene_frac, dtype=np.float64)
    n = np.asarray(depth, dtype=np.float64).reshape(-1, 1)
    if x.ndim != 2 or x.shape[1] != len(p):
        raise ValueError(f"counts of shape {x.shape} do not match {len(p)} fitted genes")
    if len(n) != len(x):
        raise ValueError(f"{len(x)} spots of counts but {len(n)} depths")
    mu = n * p
    sd = np.sqrt(mu + mu * mu / float(theta))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(sd > 0, (x - mu) / np.where(sd > 0, sd, 1.0), 0.0)
    if clip is not None:
        r = np.clip(r, -clip, clip)
    return r


def corrected_counts(
    counts: np.ndarray, depth: np.ndarray, gene_frac: Sequence[float], median_depth: float,
    theta: float = 100.0, clip: float | None = None, round_counts: bool = True,
) -> np.ndarray:
    """SCTransform-style corrected counts at the median depth (see the module docstring)."""
    r = pearson_residuals(counts, depth, gene_frac, theta=theta, clip=clip)
    mu = float(median_depth) * np.asarray(gene_frac, dtype=np.float64)[None, :]
    y = mu + r * np.sqrt(mu + mu * mu / float(theta))
    if round_counts:
        y = np.round(y)
    return np.maximum(y, 0.0)
