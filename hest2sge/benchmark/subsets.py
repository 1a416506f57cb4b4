"""Gene subsets of the paper's analysis (the benchmark paper's Methods) and tests against all genes.

* HVGs: a scran ``modelGeneVar`` + ``getTopHVGs(prop = 0.1)``-like selection on the ground
  truth: log2(1 + c / size factor) per spot, per-gene mean and variance, a trend of variance
  on mean (running median over genes sorted by mean, interpolated), biological component =
  variance - trend; the top 10 % of genes with a positive biological component.
* SVGs: the paper uses SPARK-X (an R package). Here: Moran's I on each image (6 nearest
  spots, row-standardised weights, normal-approximation p-value, Benjamini-Hochberg per image),
  genes with adjusted p < 0.05, the top 20 by I per image, united over images. Moran's I is the
  spatial-autocorrelation test squidpy offers (``sq.gr.spatial_autocorr``); it is computed here
  with numpy so the benchmark does not import squidpy.
* HSGs: sparsity (fraction of spots with zero counts) > 0.6 in training and in test spots.
* One-sided Wilcoxon rank-sum tests (``alternative="greater"``) of each subset's per-gene
  values against all genes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def hvg_genes(counts: np.ndarray, genes: Sequence[str], prop: float = 0.1) -> list[str]:
    """Top ``prop`` of genes by biological variance (scran-like, see the module docstring)."""
    c = np.asarray(counts, dtype=np.float64)
    lib = c.sum(1)
    sf = lib / lib[lib > 0].mean() if (lib > 0).any() else np.ones_like(lib)
    logc = np.log2(1.0 + c / np.where(sf > 0, sf, 1.0)[:, None])
    mean, var = logc.mean(0), logc.var(0, ddof=1)
    order = np.argsort(mean, kind="stable")
    nb = max(5, min(50, len(genes) // 10))
    bins = np.array_split(order, nb)
    bx = np.array([np.median(mean[b]) for b in bins])
    by = np.array([np.median(var[b]) for b in bins])
    trend = np.interp(mean, bx, by)
    bio = var - trend
    n_top = max(1, int(round(prop * len(genes))))
    top = [i for i in np.argsort(-bio, kind="stable")[:n_top] if bio[i] > 0]
    return [genes[i] for i in top]


def morans_i(values: np.ndarray, xy: np.ndarray, k: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Moran's I per gene and its one-sided normal-approximation p-value.

    Args:
        values: (spots, genes). xy: (spots, 2) coordinates.
        k: Nearest neighbours (row-standardised binary weights).
    """
    from scipy.spatial import cKDTree
    from scipy.stats import norm

    v = np.asarray(values, dtype=np.float64)
    n = v.shape[0]
    k = min(k, n - 1)
    _, idx = cKDTree(xy).query(xy, k=k + 1)
    w = np.zeros((n, n))
    rows = np.repeat(np.arange(n), k)
    w[rows, idx[:, 1:].ravel()] = 1.0 / k
    z = v - v.mean(0)
    denom = (z ** 2).sum(0)
    s0 = w.sum()
    num = np.einsum("ij,ig,jg->g", w, z, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        moran = (n / s0) * num / denom
    s1 = 0.5 * ((w + w.T) ** 2).sum()
    s2 = ((w.sum(0) + w.sum(1)) ** 2).sum()
    e = -1.0 / (n - 1)
    var = (n * n * s1 - n * s2 + 3 * s0 * s0) / ((n * n - 1) * s0 * s0) - e * e
    p = norm.sf((moran - e) / np.sqrt(var))
    return moran, p


def _bh(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    if q.size:
        order = np.argsort(q)
        ranked = q[order] * q.size / np.arange(1, q.size + 1)
        adj = np.minimum.accumulate(ranked[::-1])[::-1]
        res = np.empty_like(q)
        res[order] = np.minimum(adj, 1.0)
        out[ok] = res
    return out


def svg_genes(slides: Sequence, genes: Sequence[str], top: int = 20,
              alpha: float = 0.05) -> list[str]:
    """Spatially variable genes: Moran's I per image, BH-adjusted p < alpha, top ``top`` by I
    per image, united over images (in panel order)."""
    from hest2sge.benchmark.scoring import common_truth

    chosen: set[str] = set()
    for s in slides:
        vals = common_truth(_dense(s[:, list(genes)].X))
        moran, p = morans_i(vals, np.asarray(s.obsm["spatial"], dtype=np.float64))
        q = _bh(p)
        ok = np.where(np.isfinite(q) & (q < alpha))[0]
        best = ok[np.argsort(-moran[ok], kind="stable")][:top]
        chosen |= {genes[i] for i in best}
    return [g for g in genes if g in chosen]


def sparsity(counts: np.ndarray) -> np.ndarray:
    """Fraction of spots with a zero count, per gene."""
    return (np.asarray(counts) == 0).mean(0)


def hsg_genes(train_counts: np.ndarray, test_counts: np.ndarray, genes: Sequence[str],
              threshold: float = 0.6) -> list[str]:
    """Highly sparse genes: sparsity > ``threshold`` in training AND test spots."""
    keep = (sparsity(train_counts) > threshold) & (sparsity(test_counts) > threshold)
    return [g for g, k in zip(genes, keep) if k]


def dataset_subsets(slides: Sequence, folds: Sequence, genes: Sequence[str]) -> dict[str, list]:
    """HVG, SVG and HSG subsets of one dataset.

    HVGs and SVGs come from the ground truth of the test images (the union of the test folds);
    a gene is an HSG when it is sparse in training and test spots of every fold.
    """
    from hest2sge.data.slide import slide_id_of

    by_id = {slide_id_of(s): s for s in slides}
    genes = list(genes)
    test_ids = list(dict.fromkeys(t for f in folds for t in f.test))
    test = [by_id[t] for t in test_ids]
    counts = np.concatenate([_dense(s[:, genes].X) for s in test], 0)
    hsg = set(genes)
    for f in folds:
        tr = np.concatenate([_dense(by_id[t][:, genes].X) for t in f.train], 0)
        te = np.concatenate([_dense(by_id[t][:, genes].X) for t in f.test], 0)
        hsg &= set(hsg_genes(tr, te, genes))
    return {"hvg": hvg_genes(counts, genes), "svg": svg_genes(test, genes),
            "hsg": [g for g in genes if g in hsg]}


def subset_table(per_gene, subsets: dict[str, list], metric: str = "pcc"):
    """Mean of ``metric`` over each subset per (dataset, model, scale), with the subset size
    and the one-sided Wilcoxon rank-sum p-value of subset > all genes.

    Args:
        per_gene: :func:`~hest2sge.benchmark.tables.per_gene_table` output.
        subsets: Name -> genes (for one dataset, or keyed ``{dataset: {name: genes}}``).
    """
    import pandas as pd
    from scipy.stats import mannwhitneyu

    rows = []
    for key, sub in per_gene.groupby(["dataset", "model_id", "pred_type"], sort=False):
        ds = key[0]
        sets = subsets.get(ds, subsets) if isinstance(subsets.get(ds), dict) else subsets
        allv = sub[metric].to_numpy(dtype=np.float64)
        allv = allv[np.isfinite(allv)]
        for name, gs in sets.items():
            v = sub.loc[sub["gene"].isin(set(gs)), metric].to_numpy(dtype=np.float64)
            v = v[np.isfinite(v)]
            p = float(mannwhitneyu(v, allv, alternative="greater").pvalue) \
                if v.size and allv.size else float("nan")
            rows.append({"dataset": ds, "model_id": key[1], "pred_type": key[2],
                         "subset": name, "n_genes": len(gs), "n_defined": int(v.size),
                         metric: float(v.mean()) if v.size else float("nan"),
                         "wilcoxon_p_greater": p})
    return pd.DataFrame(rows)
