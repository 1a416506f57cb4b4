"""Inverse target transforms, pseudobulk, the GDC STAR reader and the patient-level correlation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hest2sge.data.normalize import corrected_counts
from hest2sge.data.transforms import TargetTransform
from hest2sge.translational.bulk import (
    patient_correlation,
    pseudobulk,
    read_star_counts,
    read_star_counts_dir,
    summarize_correlation,
)

_FIXTURE = Path(__file__).parent / "fixtures" / "make_gdc_star.py"


def _star_module():
    spec = importlib.util.spec_from_file_location("make_gdc_star", _FIXTURE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    c = rng.poisson(rng.uniform(0.5, 20, 6), (40, 6)).astype(np.float64)
    return c, c.sum(1) + 50.0


def test_inverse_recovers_counts(counts):
    c, tot = counts
    n_all = 30
    cases = [("raw", None), ("minmax", None), ("log_minmax", None),
             ({"kind": "log_norm"}, c.sum(1)),
             ({"kind": "log_norm", "library": "all", "base": "e", "scale": 1e6}, tot),
             ("stnet", n_all + tot)]
    for spec, lib in cases:
        t = TargetTransform.from_spec(spec).fit([c], [tot], [n_all])
        back = t.inverse(t(c, tot, n_all), library=lib)
        np.testing.assert_allclose(back, c, atol=1e-3, err_msg=str(spec))
        assert t.inverse_units(library=lib is not None) == "counts"
    # Without a library size, log_norm comes back as counts per 1e4 of the panel library.
    t = TargetTransform(kind="log_norm")
    np.testing.assert_allclose(t.inverse(t(c)), 1e4 * c / c.sum(1, keepdims=True), rtol=1e-4)
    assert "per 10000" in t.inverse_units()
    # DeepSpaCE's 'sct': the inverse gives the corrected counts the forward pass computed.
    t = TargetTransform(kind="sct", library="all").fit([c], [tot])
    exp = corrected_counts(c, tot, t.gene_frac, t.median_depth, theta=t.theta, clip=t.clip)
    np.testing.assert_allclose(t.inverse(t(c, tot)), exp, atol=1e-3)
    with pytest.raises(RuntimeError, match="no fitted min/max"):
        TargetTransform(kind="minmax").inverse(c)


def _pred_adata(c, slides, spec):
    t = TargetTransform.from_spec(spec).fit([c])
    a = ad.AnnData(X=t(c), obs=pd.DataFrame({"slide_id": slides},
                                            index=[f"t{i}" for i in range(len(c))]))
    a.var_names = [f"G{i}" for i in range(c.shape[1])]
    a.layers["pred"] = a.X.copy()
    a.uns["hest2sge"] = {"target_transform": t.to_dict()}
    return a, t


def test_pseudobulk_means_per_slide_on_count_scale(counts):
    c, _ = counts
    slides = np.where(np.arange(len(c)) < 15, "s1", "s2")
    a, t = _pred_adata(c, slides, "log_minmax")
    pb = pseudobulk(a)
    assert list(pb.index) == ["s1", "s2"] and list(pb.columns) == list(a.var_names)
    np.testing.assert_allclose(pb.loc["s1"], c[:15].mean(0), rtol=1e-4)
    np.testing.assert_allclose(pb.loc["s2"], c[15:].mean(0), rtol=1e-4)
    assert pb.attrs["units"] == "counts" and pb.attrs["n_tiles"] == {"s1": 15, "s2": 25}
    # the paper's literal pseudobulk: mean of the model-scale outputs
    np.testing.assert_allclose(pseudobulk(a, scale="model").loc["s1"],
                               t(c)[:15].mean(0), rtol=1e-5)
    # a list of per-slide predictions gives the same table
    both = pseudobulk([a[a.obs.slide_id == "s1"].copy(), a[a.obs.slide_id == "s2"].copy()])
    np.testing.assert_allclose(both.to_numpy(), pb.to_numpy())
    # raw predictions below 0 are clipped after averaging
    r, _ = _pred_adata(c - 30.0, slides, "raw")
    assert (pseudobulk(r).to_numpy() == 0).all()
    del a.uns["hest2sge"]
    with pytest.raises(ValueError, match="no target transform"):
        pseudobulk(a)


def test_star_reader_on_gdc_layout(tmp_path):
    mod = _star_module()
    path = tmp_path / "f1" / "abc.rna_seq.augmented_star_gene_counts.tsv"
    written = mod.write_star_counts(path, seed=3)
    s = read_star_counts(path)
    assert s.name == "abc" and s.attrs["gene_model"] == "GENCODE v36"
    assert set(s.attrs["summary"]) == {"N_unmapped", "N_multimapping", "N_noFeature",
                                       "N_ambiguous"}
    by_name = {}
    for gid, row in written.items():
        if not gid.endswith("_PAR_Y"):
            by_name[row["gene_name"]] = by_name.get(row["gene_name"], 0) + row["unstranded"]
    assert s.index.is_unique and len(s) == len(by_name)
    for g, v in by_name.items():
        assert s[g] == v, g
    assert not any(i.startswith("N_") for i in s.index)
    ids = read_star_counts(path, index="gene_id")
    assert ids["ENSG00000141510"] == written["ENSG00000141510.18"]["unstranded"]
    assert not any("." in i or i.endswith("_PAR_Y") for i in ids.index)
    tpm = read_star_counts(path, value="tpm_unstranded", gene_types=["protein_coding"])
    assert "LINC00856" not in tpm.index
    np.testing.assert_allclose(tpm["TP53"], written["ENSG00000141510.18"]["tpm_unstranded"],
                               atol=1e-4)
    with pytest.raises(ValueError, match="duplicated gene_name"):
        read_star_counts(path, duplicates="error")
    # a folder as the GDC client writes it (one sub-folder per file id), gzipped files too
    mod.write_star_counts(tmp_path / "f2" / "def.rna_seq.augmented_star_gene_counts.tsv.gz",
                          seed=4, gz=True)
    sheet = tmp_path / "sheet.tsv"
    sheet.write_text("File Name\tSample ID\n"
                     "abc.rna_seq.augmented_star_gene_counts.tsv\tTCGA-AA-0001-01A\n"
                     "def.rna_seq.augmented_star_gene_counts.tsv.gz\tTCGA-AA-0002-01A\n")
    table = read_star_counts_dir(tmp_path, sample_sheet=sheet)
    assert sorted(table.index) == ["TCGA-AA-0001-01A", "TCGA-AA-0002-01A"]
    assert table.loc["TCGA-AA-0001-01A", "TP53"] == by_name["TP53"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("gene\tcount\nA\t1\n")
    with pytest.raises(ValueError, match="not a GDC STAR gene-count file"):
        read_star_counts(bad)


def test_patient_correlation_follows_the_paper():
    rng = np.random.default_rng(1)
    genes = [f"G{i}" for i in range(60)]
    bulk = pd.DataFrame(np.exp(rng.uniform(2, 9, (3, 60))), index=["p1", "p2", "p3"],
                        columns=genes)
    pred = pd.DataFrame(bulk.to_numpy() / 50 * np.exp(rng.normal(0, 0.5, (3, 60))),
                        index=["p1", "p2", "p3"], columns=genes)
    pred.iloc[0, :5] = -3.0  # negative predictions are clipped to 0
    out = patient_correlation(pred, bulk.iloc[::-1])  # rows matched by name, not order
    for s in pred.index:
        keep = np.log(bulk.loc[s]) > 5
        x = np.log(np.maximum(pred.loc[s, keep], 0) + 1)
        r, _ = stats.pearsonr(x, np.log(bulk.loc[s, keep]))
        assert out.loc[s, "r"] == pytest.approx(r)
        assert out.loc[s, "n_genes"] == keep.sum() < 60
    summ = summarize_correlation(out)
    assert summ["n"] == 3 and summ["mean"] == pytest.approx(out["r"].mean())
    with pytest.raises(ValueError, match="no sample appears"):
        patient_correlation(pred.rename(index=str.upper), bulk)
    # TCGA slide barcodes meet RNA-seq sample barcodes through the patient
    slides = pred.set_axis([f"TCGA-A1-000{i}-01Z-00-DX1" for i in range(3)])
    samples = bulk.set_axis([f"TCGA-A1-000{i}-01A" for i in range(3)])
    by_patient = patient_correlation(slides, samples, key="patient")
    assert list(by_patient.index) == [f"TCGA-A1-000{i}" for i in range(3)]
    np.testing.assert_allclose(by_patient["r"], out.loc[pred.index, "r"])


def test_pseudobulk_of_predict_output(tmp_path):
    """The AnnData ``hest2sge.predict`` returns goes straight into pseudobulk (stnet scale)."""
    import hest2sge
    from hest2sge.data import synthetic_slides

    slide = synthetic_slides(n_patients=1, slides_per_patient=1, grid=(4, 4), n_genes=6,
                             spot_pitch_px=32, seed=0)[0]
    model = hest2sge.load("stnet", genes=list(slide.var_names), pretrained=False,
                          backbone="test_resnet", patch_size=32)
    pred = hest2sge.predict(model, slide, cache_dir=tmp_path)
    pb = pseudobulk(pred)
    sid = str(slide.obs["slide_id"].iloc[0])
    assert list(pb.index) == [sid] and pb.attrs["n_tiles"] == {sid: slide.n_obs}
    np.testing.assert_allclose(pb.loc[sid], np.exp(pred.layers["pred"]).mean(0) * 1e4,
                               rtol=1e-5)
    assert "per 10000" in pb.attrs["units"]
