"""Gene panels on all 36 HER2+ sections: the rule ``genes="paper"`` vs the published 785.

Run: ``.venv/bin/python benchmarks/gene_panels.py [--counts ../shared/data/her2st_counts]``.

Reads every section of the counts-only release (``read_her2st(images=False)``), builds the
rule's panel with its defaults (top 1000 HVGs per section by scanpy's ``"seurat"`` flavour,
union, genes expressed in >= 1000 spots) and reports its size, its overlap with and Jaccard
index against the published ``her2st_785`` panel shipped with the package, and the same for
the expression filter alone. Also compares the HVG step with a direct scanpy call on section
C2 (the step must be scanpy's).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default=str(Path(__file__).resolve().parents[2] / "shared" /
                                            "data" / "her2st_counts"))
    args = ap.parse_args()
    import numpy as np

    from hest2sge.data import read_her2st
    from hest2sge.data.genes import (
        _dense,
        common_genes,
        highly_variable_genes,
        paper_gene_panel,
        published_panel,
    )

    warnings.filterwarnings("ignore")
    t0 = time.time()
    slides = read_her2st(args.counts, images=False)
    n_spots = sum(s.n_obs for s in slides)
    print(f"{len(slides)} sections, {n_spots} spots, read in {time.time() - t0:.0f} s")
    pub = set(published_panel("her2st_785"))
    common = common_genes(slides)
    print(f"{len(common)} genes common to all sections; published genes among them: "
          f"{len(pub & set(common))}/785")

    def report(name: str, panel: list[str]) -> None:
        s = set(panel)
        print(f"{name}: {len(s)} genes, {len(s & pub)} of the 785 published, "
              f"Jaccard {len(s & pub) / len(s | pub):.3f}")

    t0 = time.time()
    panel = paper_gene_panel(slides)
    report(f"rule genes='paper' (n_top=1000, min_spots=1000; {time.time() - t0:.0f} s)", panel)
    n_expr = np.zeros(len(common))
    for s in slides:
        n_expr += (_dense(s[:, common].X) > 0).sum(0)
    report("expressed in >= 1000 spots only", [g for g, n in zip(common, n_expr) if n >= 1000])

    import anndata as ad
    import scanpy as sc

    c2 = next(s for s in slides if s.obs["slide_id"].iloc[0] == "C2")
    ours = highly_variable_genes(c2, 1000)
    x = _dense(c2.X)
    keep = (x > 0).any(0)
    a = ad.AnnData(X=x[:, keep].astype(np.float32))
    a.var_names = list(c2.var_names[keep])
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, flavor="seurat", n_top_genes=1000)
    ref = set(a.var_names[a.var["highly_variable"]])
    print(f"HVG step on C2: {len(set(ours) & ref)} of 1000 genes shared with a direct "
          "scanpy 'seurat' call")


if __name__ == "__main__":
    main()
