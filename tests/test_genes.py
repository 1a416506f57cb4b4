"""Gene panels: the shipped published panel, the scanpy HVG step, the rule, and expression-only
legacy-ST reads."""

from __future__ import annotations

import numpy as np
import pytest

from hest2sge.data import read_her2st
from hest2sge.data.genes import (
    PUBLISHED_PANELS,
    highly_variable_genes,
    paper_gene_panel,
    published_panel,
    select_genes,
)
from hest2sge.data.slide import validate_slide


def test_published_panel_is_the_published_list(data_root):
    panel = published_panel("her2st_785")
    ref = [ln.strip() for ln in (data_root / "panels" / "her2st_785.txt").read_text().splitlines()
           if ln.strip()]
    assert panel == ref and len(panel) == 785 and len(set(panel)) == 785
    assert "her2st_785" in PUBLISHED_PANELS and "HisToGene" in PUBLISHED_PANELS["her2st_785"][1]
    with pytest.raises(ValueError, match="her2st_785"):
        published_panel("her2st_786")
    with pytest.raises(ValueError, match="published panel"):
        select_genes([], "her2st_786")


def test_named_panel_through_select_genes(her2st_slides):
    assert select_genes(her2st_slides[:2], "her2st_785") == published_panel("her2st_785")
    cut = her2st_slides[0][:, [g for g in her2st_slides[0].var_names if g != "TNC"]].copy()
    with pytest.raises(ValueError, match="lacks 1 gene.*TNC"):
        select_genes([cut], "her2st_785")


def _reference_hvg(slide, n_top):
    """scanpy's 'seurat' flavour called directly on the expressed genes."""
    import anndata as ad
    import scanpy as sc

    x = slide.X.toarray() if hasattr(slide.X, "toarray") else np.asarray(slide.X)
    keep = (x > 0).any(0)
    a = ad.AnnData(X=x[:, keep].astype(np.float32))
    a.var_names = list(slide.var_names[keep])
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=n_top)
    return set(a.var_names[a.var["highly_variable"]])


def test_expression_only_sections_and_rule_against_reference(data_root):
    counts = data_root / "her2st_counts"
    if not counts.is_dir():
        pytest.skip("her2st_counts/ not found")
    slides = read_her2st(counts, sections=["A1"], images=False)
    for s in slides:
        validate_slide(s, require_image=False)
        entry = s.uns["spatial"][s.obs["slide_id"].iloc[0]]
        assert entry["image_path"] == "" and entry["images"] == {}
    with pytest.raises(FileNotFoundError, match="image folder"):
        read_her2st(counts, sections="A1")  # images wanted but not in this release
    hv = highly_variable_genes(slides[0], 500)
    assert set(hv) == _reference_hvg(slides[0], 500) and len(hv) == 500
    assert hv == [g for g in slides[0].var_names if g in set(hv)]  # slide gene order
    panel = paper_gene_panel(slides, n_top=500, min_spots=150)
    n_expr = np.asarray((slides[0].X > 0).sum(0)).ravel()
    expected = [g for g, n in zip(slides[0].var_names, n_expr) if g in set(hv) and n >= 150]
    assert panel == expected and 0 < len(panel) < len(hv)  # the expression filter bites
