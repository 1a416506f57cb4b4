"""The cSCC data (GEO GSE144240) read by the legacy-ST reader, on a fixture in that series'
own file naming written by tests/fixtures/make_cscc_fixture.py."""

from __future__ import annotations

import numpy as np
import pytest

from hest2sge.data import read_cscc
from hest2sge.data.patches import extract_patches
from hest2sge.data.slide import SlideError, slide_id_of, validate_slide


def _fixture_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "make_cscc_fixture.py"
    spec = importlib.util.spec_from_file_location("make_cscc_fixture", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_FIX = _fixture_module()
GENES, SECTIONS, make_cscc_fixture = _FIX.GENES, _FIX.SECTIONS, _FIX.make_cscc_fixture


@pytest.fixture(scope="module")
def cscc_root(tmp_path_factory):
    return make_cscc_fixture(tmp_path_factory.mktemp("GSE144240_RAW"))


def test_reads_every_section_in_geo_naming(cscc_root):
    slides = read_cscc(cscc_root)
    assert [slide_id_of(s) for s in slides] == list(SECTIONS)  # natural order, GSM prefix off
    assert [s.obs["patient_id"].iloc[0] for s in slides] == ["P2", "P5"]
    for s in slides:
        validate_slide(s)
        assert list(s.var_names) == GENES
        meta = s.uns["spatial"][slide_id_of(s)]["metadata"]
        # 30 grid spots: one unselected, one only in the counts file, one only in the spots
        assert s.n_obs == 29 and meta["n_spots_unselected"] == 1
        # (the reader counts the unselected spot among the counts-only ones)
        assert meta["n_spots_counts_only"] == 2 and meta["n_spots_spotfile_only"] == 1
        assert meta["source"] == "cscc"
        # 200 µm pitch over 100 px: 2 µm/px, 100 µm spots = 50 px
        e = s.uns["spatial"][slide_id_of(s)]
        assert e["pixel_size_um"] == pytest.approx(2.0, rel=0.02)
        assert e["scalefactors"]["spot_diameter_fullres"] == pytest.approx(50.0, rel=0.02)
        assert "hires" in e["images"]
        assert extract_patches(s[:2].copy(), 32).shape == (2, 32, 32, 3)


def test_counts_and_coordinates_match_files(cscc_root):
    import pandas as pd

    (s,) = read_cscc(cscc_root, sections="P5_ST_rep1")
    counts = pd.read_csv(cscc_root / "GSM4284322_P5_ST_rep1_stdata.tsv.gz", sep="\t", index_col=0)
    spots = pd.read_csv(cscc_root / "GSM4284322_spot_data-all-P5_ST_rep1.tsv.gz", sep="\t")
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    bc = list(s.obs_names)
    np.testing.assert_array_equal(s.X.toarray(), counts.loc[bc, GENES].to_numpy())
    np.testing.assert_allclose(s.obsm["spatial"], spots.loc[bc, ["pixel_x", "pixel_y"]])
    np.testing.assert_array_equal(s.obs["array_col"], spots.loc[bc, "x"])
    np.testing.assert_array_equal(s.obs["array_row"], spots.loc[bc, "y"])


def test_missing_files_and_expression_only(cscc_root, tmp_path):
    (s,) = read_cscc(cscc_root, sections=["P2_ST_rep1"], images=False)
    validate_slide(s, require_image=False)
    assert s.uns["spatial"]["P2_ST_rep1"]["images"] == {}
    with pytest.raises(FileNotFoundError, match="P9_ST_rep1_stdata"):
        read_cscc(cscc_root, sections="P9_ST_rep1")
    import shutil

    for p in cscc_root.iterdir():
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "GSM4284316_P2_ST_rep1.jpg").rename(tmp_path / "GSM4284316_P2_ST_rep1.jpg.gz")
    with pytest.raises(FileNotFoundError, match="gunzip"):
        read_cscc(tmp_path, sections="P2_ST_rep1")
    (tmp_path / "GSM4284322_spot_data-all-P5_ST_rep1.tsv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="spot_data-all-P5_ST_rep1"):
        read_cscc(tmp_path, sections="P5_ST_rep1")
    shutil.copy(cscc_root / "GSM4284316_P2_ST_rep1_stdata.tsv.gz",
                tmp_path / "P2_ST_rep1_stdata.tsv.gz")
    with pytest.raises(SlideError, match="several counts files"):
        read_cscc(tmp_path, sections="P2_ST_rep1", images=False)
