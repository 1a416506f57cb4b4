"""Gene panels, always computed from the training slides only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hest2sge.data.slide import slide_id_of


def _dense(x) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(x.toarray() if sp.issparse(x) else x, dtype=np.float64)


def common_genes(slides: Sequence) -> list[str]:
    """Genes present in every slide, in the order of the first slide."""
    if not slides:
        raise ValueError("no slides given")
    common = set(slides[0].var_names)
    for s in slides[1:]:
        common &= set(s.var_names)
    if not common:
        raise ValueError(
            "the slides have no genes in common: "
            + ", ".join(f"{slide_id_of(s)} ({s.n_vars} genes, e.g. {list(s.var_names[:3])})"
                        for s in slides[:4])
        )
    return [g for g in slides[0].var_names if g in common]


def highly_variable_genes(slide, n_top: int = 1000, genes: Sequence[str] | None = None) -> list[str]:
    """Top ``n_top`` highly variable genes of one section.

    The variance of log1p(CP10k) expression is modelled against the mean with a running-median
    trend (in the spirit of scran's ``modelGeneVar``); genes are ranked by the residual
    ("biological") variance. Genes expressed in no spot are never selected.

    Args:
        slide: A slide AnnData.
        n_top: Number of genes to return (fewer if fewer are expressed).
        genes: Restrict to these genes (e.g. genes common to all training slides).
    """
    ad = slide if genes is None else slide[:, list(genes)]
    x = _dense(ad.X)
    lib = x.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    y = np.log1p(1e4 * x / lib)
    mean, var = y.mean(0), y.var(0, ddof=1) if y.shape[0] > 1 else np.zeros(y.shape[1])
    expressed = (x > 0).any(0)
    order = np.argsort(mean)
    trend = np.zeros_like(var)
    w = max(25, len(order) // 50)
    sorted_var = var[order]
    pad = np.pad(sorted_var, (w // 2, w - 1 - w // 2), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(pad, w)
    trend[order] = np.median(windows, axis=1)
    bio = np.where(expressed, var - trend, -np.inf)
    top = np.argsort(-bio, kind="stable")[: min(n_top, int(expressed.sum()))]
    names = np.asarray(ad.var_names)
    return [str(names[i]) for i in sorted(top)]


def paper_gene_panel(train_slides: Sequence, n_top: int = 1000, min_spots: int = 1000) -> list[str]:
    """The benchmark's rule: the union of the top ``n_top`` HVGs of each training section,
    keeping genes expressed (count > 0) in at least ``min_spots`` spots across those sections.

    HER2+ ST with all sections gives the paper's 785 genes with the defaults. On small data
    lower ``min_spots`` (the threshold is absolute, not a fraction).
    """
    common = common_genes(train_slides)
    hvg: set[str] = set()
    for s in train_slides:
        hvg.update(highly_variable_genes(s, n_top=n_top, genes=common))
    cand = [g for g in common if g in hvg]
    if not cand:
        raise ValueError("no highly variable genes found in the training slides")
    n_expr = np.zeros(len(cand))
    for s in train_slides:
        n_expr += (_dense(s[:, cand].X) > 0).sum(0)
    panel = [g for g, n in zip(cand, n_expr) if n >= min_spots]
    if not panel:
        raise ValueError(
            f"no gene is expressed in >= {min_spots} spots of the training slides "
            f"(max {int(n_expr.max())}); lower min_spots for small data"
        )
    return panel


def top_mean_genes(train_slides: Sequence, n: int = 250) -> list[str]:
    """The ``n`` genes with the largest mean raw count over the training spots (ST-Net, EGN)."""
    common = common_genes(train_slides)
    tot = np.zeros(len(common))
    count = 0
    for s in train_slides:
        tot += _dense(s[:, common].X).sum(0)
        count += s.n_obs
    order = np.argsort(-tot / max(count, 1), kind="stable")[:n]
    return [common[i] for i in sorted(order)]


def select_genes(
    train_slides: Sequence,
    genes: Sequence[str] | str = "paper",
    n_top: int = 1000,
    min_spots: int = 1000,
    n_genes: int = 250,
) -> list[str]:
    """Resolve a gene panel specification on the training slides.

    Args:
        train_slides: Training slides only (never pass held-out slides here).
        genes: An explicit list of genes, ``"paper"`` (HVG + expression rule), ``"mean"``
            (top ``n_genes`` by mean) or ``"all"`` (all genes common to the slides).
        n_top: HVGs per section for ``"paper"``.
        min_spots: Minimum number of expressing spots for ``"paper"``.
        n_genes: Panel size for ``"mean"``.

    Returns:
        The gene list.

    Raises:
        ValueError: an explicit list names genes absent from some training slide (they are
            listed), or the rule selects nothing.
    """
    if isinstance(genes, str):
        if genes == "paper":
            return paper_gene_panel(train_slides, n_top=n_top, min_spots=min_spots)
        if genes == "mean":
            return top_mean_genes(train_slides, n=n_genes)
        if genes == "all":
            return common_genes(train_slides)
        raise ValueError(f"unknown gene panel rule {genes!r}; use 'paper', 'mean', 'all' or a list")
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        raise ValueError("the gene list has duplicates")
    check_genes(train_slides, genes)
    return genes


def check_genes(slides: Sequence, genes: Sequence[str]) -> None:
    """Raise a ValueError listing genes of ``genes`` missing from any slide."""
    for s in slides:
        missing = [g for g in genes if g not in s.var_names]
        if missing:
            more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
            raise ValueError(
                f"slide {slide_id_of(s)!r} lacks {len(missing)} gene(s) of the panel: "
                f"{missing[:10]}{more}"
            )
