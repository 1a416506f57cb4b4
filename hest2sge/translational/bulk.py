"""Pseudobulk of predicted expression, GDC STAR gene-count files, patient-level correlation.

The benchmark paper predicts every 224 px tile of a TCGA-BRCA diagnostic
slide, averages the predictions per image (the *pseudobulk*) and compares it with the slide's
bulk RNA-seq: the **patient-level correlation** is Pearson's r between ``log(pred + 1)``
(negative predictions clipped to 0) and ``log(bulk)`` over the genes with ``log(bulk) > 5``
(natural logarithm, i.e. more than ~148 reads).

* :func:`pseudobulk`: one row per slide from an AnnData of tile or spot predictions
  (``predict_wsi`` or ``predict`` output), by default back on the count scale through the
  model's target transform (:meth:`hest2sge.data.TargetTransform.inverse`).
* :func:`read_star_counts` / :func:`read_star_counts_dir`: the GDC ``STAR - Counts`` files
  (``*.rna_seq.augmented_star_gene_counts.tsv``), genes named by the file's own ``gene_name``
  column.
* :func:`patient_correlation` and :func:`summarize_correlation`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STAR_COLUMNS = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first",
                "stranded_second", "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")
STAR_VALUE_COLUMNS = STAR_COLUMNS[3:]
STAR_SUFFIX = ".rna_seq.augmented_star_gene_counts.tsv"
_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+")


# ------------------------------------------------------------------------------ pseudobulk
def _transform_of(adata, target_transform):
    from hest2sge.data.transforms import TargetTransform

    if target_transform is not None:
        return TargetTransform.from_spec(target_transform)
    uns = adata.uns
    for spec in ((uns.get("hest2sge") or {}).get("target_transform"), uns.get("target_transform")):
        if spec:
            return TargetTransform.from_spec(dict(spec))
    raise ValueError(
        "the predictions carry no target transform (uns['hest2sge']['target_transform'] or "
        "uns['target_transform']); pass target_transform=... or scale='model'"
    )


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def pseudobulk(
    adata,
    layer: str | None = "pred",
    scale: str = "counts",
    groupby: str | None = "slide_id",
    target_transform: Any = None,
    clip_negative: bool = True,
):
    """Average predictions over the tiles (or spots) of each slide.

    Args:
        adata: Predictions, one row per tile/spot (``hest2sge.predict_wsi`` or
            ``hest2sge.predict`` output), or a list of such AnnDatas (one per slide).
        layer: Layer holding the predictions (``None``: ``X``).
        scale: ``"counts"`` (default): each tile is mapped back through the inverse of the
            model's target transform, then averaged, so the pseudobulk is a mean count per tile
            where the transform allows it (``raw``, ``minmax``, ``log_minmax``; ``sct`` gives
            corrected counts; ``log_norm``/``stnet`` stay per-library normalised because a tile
            has no library size; the units are in ``attrs["units"]``). ``"model"``: the plain
            mean of the model-scale outputs, the paper's literal pseudobulk.
        groupby: ``obs`` column naming the slide of each row; ``None`` or a missing column
            makes the whole AnnData one slide (named by ``uns['hest2sge']['slide_id']``, the
            ``obs['slide_id']`` value or ``"slide"``).
        target_transform: Override of the transform spec stored in ``uns``.
        clip_negative: Clip negative values to 0 after averaging (predictions of ``raw`` or
            ``minmax`` models can be negative; the paper clips them).

    Returns:
        ``pandas.DataFrame``, slides x genes, with ``attrs`` ``units``, ``scale`` and
        ``n_tiles`` (dict slide -> number of rows averaged).
    """
    import pandas as pd

    if isinstance(adata, (list, tuple)):
        if not adata:
            raise ValueError("pseudobulk() got an empty list of predictions")
        parts = [pseudobulk(a, layer, scale, groupby, target_transform, clip_negative)
                 for a in adata]
        genes = list(parts[0].columns)
        for p in parts[1:]:
            if list(p.columns) != genes:
                raise ValueError("pseudobulk() got predictions with different gene panels")
        out = pd.concat(parts)
        if not out.index.is_unique:
            dup = out.index[out.index.duplicated()].unique().tolist()
            raise ValueError(f"several predictions share slide ids {dup[:5]}; set obs['slide_id']")
        out.attrs = {"units": parts[0].attrs["units"], "scale": scale,
                     "n_tiles": {k: v for p in parts for k, v in p.attrs["n_tiles"].items()}}
        return out
    if scale not in ("counts", "model"):
        raise ValueError(f"scale must be 'counts' or 'model', got {scale!r}")
    if adata.n_obs == 0:
        raise ValueError("pseudobulk() got predictions with no tiles")
    if layer is not None and layer not in adata.layers:
        raise KeyError(f"predictions have no layer {layer!r} (layers: {list(adata.layers)})")
    y = _dense(adata.X if layer is None else adata.layers[layer])
    if not np.isfinite(y).all():
        raise ValueError("predictions contain NaN or infinite values")
    units = "model scale"
    if scale == "counts":
        tt = _transform_of(adata, target_transform)
        y = tt.inverse(y)
        units = tt.inverse_units()
    if groupby and groupby in adata.obs:
        keys = adata.obs[groupby].astype(str).to_numpy()
    else:
        name = (adata.uns.get("hest2sge") or {}).get("slide_id")
        if name is None and "slide_id" in adata.obs and adata.obs["slide_id"].nunique() == 1:
            name = str(adata.obs["slide_id"].iloc[0])
        keys = np.full(adata.n_obs, str(name or "slide"), dtype=object)
    order = list(dict.fromkeys(keys))
    rows, n_tiles = [], {}
    for k in order:
        m = keys == k
        rows.append(y[m].mean(0))
        n_tiles[k] = int(m.sum())
    mat = np.vstack(rows)
    if clip_negative:
        mat = np.maximum(mat, 0.0)
    out = pd.DataFrame(mat, index=pd.Index(order, name="slide"), columns=list(adata.var_names))
    out.attrs = {"units": units, "scale": scale, "n_tiles": n_tiles}
    return out


# ------------------------------------------------------------------------------ GDC STAR
def strip_version(gene_id: str) -> str:
    """``ENSG00000141510.18`` -> ``ENSG00000141510`` (``_PAR_Y`` suffixes are kept)."""
    return _VERSION.sub(r"\1", str(gene_id))


def read_star_counts(
    path: str | os.PathLike,
    value: str = "unstranded",
    index: str = "gene_name",
    gene_types: Sequence[str] | None = None,
    duplicates: str = "sum",
):
    """Read one GDC ``STAR - Counts`` file (``*.rna_seq.augmented_star_gene_counts.tsv``).

    The GDC layout: a ``# gene-model: GENCODE v36`` comment line, a header ``gene_id,
    gene_name, gene_type, unstranded, stranded_first, stranded_second, tpm_unstranded,
    fpkm_unstranded, fpkm_uq_unstranded`` (tab-separated), four STAR summary rows
    (``N_unmapped``, ``N_multimapping``, ``N_noFeature``, ``N_ambiguous``; empty name and type),
    then one row per Ensembl gene (versioned ids; ``_PAR_Y`` copies of the pseudo-autosomal
    genes). Gzipped files are read too.

    Args:
        path: The file.
        value: Column to return (``unstranded`` read counts by default; ``tpm_unstranded``,
            ``fpkm_unstranded``, ``fpkm_uq_unstranded``, ``stranded_first``, ...).
        index: ``"gene_name"`` (symbols from the file's own gene_name column) or ``"gene_id"``
            (Ensembl ids without version suffix).
        gene_types: Keep only these ``gene_type`` values (e.g. ``["protein_coding"]``).
        duplicates: With ``index="gene_name"``, several Ensembl genes may share a symbol:
            ``"sum"`` them (counts and TPM are additive), keep the ``"first"``, or ``"error"``.

    Returns:
        ``pandas.Series`` (float64) named by the file, indexed by gene, with ``attrs["summary"]``
        holding the ``N_*`` rows and ``attrs["gene_model"]`` the comment line's model.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"STAR gene-count file not found: {path}")
    if value not in STAR_VALUE_COLUMNS:
        raise ValueError(f"value must be one of {STAR_VALUE_COLUMNS}, got {value!r}")
    if index not in ("gene_name", "gene_id"):
        raise ValueError(f"index must be 'gene_name' or 'gene_id', got {index!r}")
    if duplicates not in ("sum", "first", "error"):
        raise ValueError(f"duplicates must be 'sum', 'first' or 'error', got {duplicates!r}")
    gene_model = ""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        first = fh.readline()
    if first.startswith("#"):
        gene_model = first[1:].split(":", 1)[-1].strip()
    df = pd.read_csv(path, sep="\t", comment="#", dtype={"gene_id": str, "gene_name": str,
                                                         "gene_type": str})
    missing = [c for c in ("gene_id", "gene_name", value) if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path.name}: not a GDC STAR gene-count file: columns {missing} missing "
            f"(found {list(df.columns)}; expected {list(STAR_COLUMNS)})"
        )
    is_summary = df["gene_id"].astype(str).str.startswith("N_")
    summary = {str(g): float(v) for g, v in zip(df.loc[is_summary, "gene_id"],
                                                 df.loc[is_summary, "unstranded"])} \
        if "unstranded" in df.columns else {}
    genes = df.loc[~is_summary]
    if gene_types is not None:
        if "gene_type" not in genes.columns:
            raise ValueError(f"{path.name} has no gene_type column to filter on")
        genes = genes[genes["gene_type"].isin(list(gene_types))]
    vals = pd.to_numeric(genes[value], errors="coerce")
    if vals.isna().any():
        bad = genes.loc[vals.isna(), "gene_id"].head(3).tolist()
        raise ValueError(f"{path.name}: non-numeric {value!r} values for genes {bad}")
    if index == "gene_id":
        keys = genes["gene_id"].map(strip_version)
        par = keys.str.endswith("_PAR_Y")
        keys, vals = keys[~par], vals[~par]  # all-zero copies of the X-linked PAR genes
    else:
        if genes["gene_name"].isna().any():
            bad = genes.loc[genes["gene_name"].isna(), "gene_id"].head(3).tolist()
            raise ValueError(f"{path.name}: genes without a gene_name: {bad}")
        par = genes["gene_id"].astype(str).str.endswith("_PAR_Y")
        keys, vals = genes.loc[~par, "gene_name"], vals[~par]
    s = pd.Series(vals.to_numpy(dtype=np.float64), index=pd.Index(keys.to_numpy(), name=index))
    if not s.index.is_unique:
        if duplicates == "error":
            dup = s.index[s.index.duplicated()].unique().tolist()
            raise ValueError(f"{path.name}: {len(dup)} duplicated {index} values, e.g. {dup[:5]}")
        s = s.groupby(level=0, sort=False).sum() if duplicates == "sum" \
            else s[~s.index.duplicated()]
    s.name = path.name[: -len(STAR_SUFFIX)] if path.name.endswith(STAR_SUFFIX) else path.stem
    s.attrs = {"summary": summary, "gene_model": gene_model, "value": value}
    return s


def read_star_counts_dir(
    folder: str | os.PathLike,
    sample_sheet: str | os.PathLike | Mapping[str, str] | None = None,
    **kwargs: Any,
):
    """Read every ``*augmented_star_gene_counts.tsv[.gz]`` under a GDC download folder.

    Args:
        folder: The download folder (files may sit in per-file-id sub-folders, as the GDC
            client writes them).
        sample_sheet: Optional GDC sample sheet (TSV with ``File Name`` and ``Case ID`` or
            ``Sample ID`` columns) or a dict file name -> sample name, to name the rows.
        **kwargs: Passed to :func:`read_star_counts`.

    Returns:
        ``pandas.DataFrame``, samples x genes (genes present in every file).
    """
    import pandas as pd

    files = sorted(Path(folder).rglob("*augmented_star_gene_counts.tsv*"))
    if not files:
        raise FileNotFoundError(f"no *augmented_star_gene_counts.tsv files under {folder}")
    names: dict[str, str] = {}
    if isinstance(sample_sheet, Mapping):
        names = {str(k): str(v) for k, v in sample_sheet.items()}
    elif sample_sheet is not None:
        sheet = pd.read_csv(sample_sheet, sep="\t")
        col = next((c for c in ("Sample ID", "Case ID") if c in sheet.columns), None)
        if "File Name" not in sheet.columns or col is None:
            raise ValueError(f"{sample_sheet}: sample sheet needs 'File Name' and 'Sample ID' "
                             f"or 'Case ID' columns, found {list(sheet.columns)}")
        names = dict(zip(sheet["File Name"].astype(str), sheet[col].astype(str)))
    series = []
    for f in files:
        s = read_star_counts(f, **kwargs)
        s.name = names.get(f.name, s.name)
        series.append(s)
    out = pd.concat(series, axis=1, join="inner").T
    if not out.index.is_unique:
        dup = out.index[out.index.duplicated()].unique().tolist()
        raise ValueError(f"several STAR files map to the same sample: {dup[:5]}")
    return out


# ------------------------------------------------------------------------------ correlation
def patient_correlation(
    pred,
    bulk,
    min_log_bulk: float = 5.0,
    min_genes: int = 3,
    key: str = "sample",
):
    """Patient-level correlation for every sample in both tables.

    Pearson's r between ``log(pred + 1)`` (``pred`` clipped at 0) and ``log(bulk)`` over the
    genes both tables share with ``log(bulk) > min_log_bulk`` (natural log).

    Args:
        pred: Pseudobulk predictions, samples x genes (DataFrame, e.g. :func:`pseudobulk`).
        bulk: Bulk expression, samples x genes (e.g. :func:`read_star_counts_dir`), rows
            matched to ``pred`` by index.
        min_log_bulk: The gene filter (the paper's 5).
        min_genes: Samples with fewer passing genes get NaN (with a warning).
        key: ``"sample"``: rows matched by their exact index; ``"patient"``: both indices
            reduced to the TCGA patient (``TCGA-XX-XXXX``, so a slide barcode meets its RNA-seq
            sample barcode) and rows of one patient averaged first.

    Returns:
        ``pandas.DataFrame`` indexed by sample: ``r``, ``p_value`` (two-sided), ``n_genes``.
    """
    import pandas as pd
    from scipy import stats

    if key not in ("sample", "patient"):
        raise ValueError(f"key must be 'sample' or 'patient', got {key!r}")
    if key == "patient":
        from hest2sge.translational.survival import patient_key

        pred = pred.groupby([patient_key(i) for i in pred.index], sort=False).mean()
        bulk = bulk.groupby([patient_key(i) for i in bulk.index], sort=False).mean()
    samples = [s for s in pred.index if s in set(bulk.index)]
    if not samples:
        raise ValueError(
            "no sample appears in both the predictions and the bulk table "
            f"(e.g. predictions {list(pred.index[:3])}, bulk {list(bulk.index[:3])})"
        )
    genes = [g for g in pred.columns if g in set(bulk.columns)]
    if not genes:
        raise ValueError(
            "predictions and bulk share no gene (e.g. predictions "
            f"{list(pred.columns[:3])}, bulk {list(bulk.columns[:3])}): are both gene symbols?"
        )
    p = np.log(np.maximum(pred.loc[samples, genes].to_numpy(dtype=np.float64), 0.0) + 1.0)
    b = bulk.loc[samples, genes].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore"):
        lb = np.log(b)
    rows = []
    for i, s in enumerate(samples):
        keep = lb[i] > min_log_bulk
        n = int(keep.sum())
        if n < min_genes or np.ptp(p[i, keep]) == 0 or np.ptp(lb[i, keep]) == 0:
            warnings.warn(f"sample {s!r}: {n} genes with log(bulk) > {min_log_bulk} "
                          "(or constant predictions); correlation undefined", stacklevel=2)
            rows.append((np.nan, np.nan, n))
            continue
        r, pv = stats.pearsonr(p[i, keep], lb[i, keep])
        rows.append((float(r), float(pv), n))
    out = pd.DataFrame(rows, index=pd.Index(samples, name="sample"),
                       columns=["r", "p_value", "n_genes"])
    out.attrs = {"protocol": f"Pearson r of log(pred+1) vs log(bulk), genes with log(bulk) > "
                             f"{min_log_bulk:g}, {len(genes)} shared genes"}
    return out


def summarize_correlation(table) -> dict[str, float]:
    """Mean, median, standard deviation, quartiles and count of :func:`patient_correlation`."""
    r = table["r"].dropna().to_numpy(dtype=np.float64)
    if r.size == 0:
        return {"n": 0, "mean": float("nan"), "median": float("nan"), "std": float("nan"),
                "q25": float("nan"), "q75": float("nan")}
    return {"n": int(r.size), "mean": float(r.mean()), "median": float(np.median(r)),
            "std": float(r.std(ddof=1)) if r.size > 1 else 0.0,
            "q25": float(np.quantile(r, 0.25)), "q75": float(np.quantile(r, 0.75))}
