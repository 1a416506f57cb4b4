"""HEST-1k interoperability: write_hest output meets HEST's reader requirements, read_hest reads
samples in the layout HEST-1k is downloaded in, download_hest selects the right files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import hest2sge
from hest2sge.data import readers as R
from hest2sge.data.patches import extract_patches
from hest2sge.data.slide import make_slide, slide_id_of, validate_slide


def _slide(sid="S1", pixel_size_um=0.5):
    rng = np.random.default_rng(5)
    img = rng.integers(0, 255, size=(300, 420, 3), dtype=np.uint8)
    rows, cols = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    xy = np.c_[60 + cols.ravel() * 55.0, 60 + rows.ravel() * 55.0]
    n = len(xy)
    return make_slide(rng.poisson(2.0, (n, 6)), [f"G{i}" for i in range(6)],
                      [f"{c}x{r}" for r, c in zip(rows.ravel(), cols.ravel())], xy, rows.ravel(),
                      cols.ravel(), sid, "P1", image=img, pixel_size_um=pixel_size_um,
                      spot_diameter_fullres=40.0)


def _check_hest_requirements(root, sid):
    """What HEST's read_HESTData / HESTData need from a sample (mahmoodlab/HEST)."""
    import anndata as ad

    adata = ad.read_h5ad(root / "st" / f"{sid}.h5ad")
    assert "spatial" in adata.obsm
    st = adata.uns["spatial"]["ST"]
    down = st["images"]["downscaled_fullres"]
    assert down.dtype == np.uint8 and down.ndim == 3
    assert st["scalefactors"]["tissue_downscaled_fullres_scalef"] > 0
    meta = json.loads((root / "metadata" / f"{sid}.json").read_text())
    assert meta["pixel_size_um_estimated"] > 0
    # the WSI opens as a tiled pyramid in OpenSlide (HEST opens it with OpenSlide/cuCIM)
    openslide = pytest.importorskip("openslide")
    wsi = openslide.OpenSlide(str(root / "wsis" / f"{sid}.tif"))
    w, h = wsi.dimensions
    assert (w, h) == (meta["fullres_px_width"], meta["fullres_px_height"])
    xy = np.asarray(adata.obsm["spatial"])
    assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    # the downscaled image is the WSI at its scale factor
    sf = st["scalefactors"]["tissue_downscaled_fullres_scalef"]
    assert down.shape[1] == pytest.approx(w * sf, abs=1) and down.shape[0] == pytest.approx(
        h * sf, abs=1)
    return adata, meta, wsi


def test_write_hest_meets_hest_reader_requirements(tmp_path):
    slide = _slide()
    R.write_hest(slide, tmp_path, patch_size=32, pixel_size_um=0.5)
    adata, meta, wsi = _check_hest_requirements(tmp_path, "S1")
    assert meta["spot_diameter"] == pytest.approx(40.0 * 0.5)
    assert float(wsi.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    assert (tmp_path / "tissue_seg").is_dir()
    region = np.asarray(wsi.read_region((100, 50), 0, (30, 20)).convert("RGB"))
    img = slide.uns["spatial"]["S1"]["images"]["fullres"]
    np.testing.assert_array_equal(region, img[50:70, 100:130])  # lossless level 0
    # scanpy plots the written h5ad as it is (HEST's 'ST' library)
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    ax = sc.pl.spatial(adata, color="G0", img_key="hires", show=False)[0]
    assert ax.images
    with h5py.File(tmp_path / "patches" / "S1.h5") as f:
        np.testing.assert_array_equal(f["img"][()], extract_patches(slide, 32))
        np.testing.assert_array_equal(f["coords"][()] + 16, slide.obsm["spatial"])
        assert f["barcode"].shape == (slide.n_obs, 1)


def test_large_wsi_is_pyramidal(tmp_path):
    slide = _slide()
    big = np.random.default_rng(0).integers(0, 255, size=(2600, 2100, 3), dtype=np.uint8)
    entry = slide.uns["spatial"]["S1"]
    entry["images"] = {"fullres": big}
    R.write_hest(slide, tmp_path, patch_size=16)
    import tifffile

    with tifffile.TiffFile(tmp_path / "wsis" / "S1.tif") as tif:
        shapes = [p.shape[:2] for p in tif.pages]
        assert all(p.is_tiled for p in tif.pages)
    assert shapes == [(2600, 2100), (1300, 1050), (650, 525)]
    openslide = pytest.importorskip("openslide")
    assert openslide.OpenSlide(str(tmp_path / "wsis" / "S1.tif")).level_count == 3


def _hest1k_sample(root, sid, with_wsi=True):
    """A sample in the layout HEST-1k is downloaded in (h5ad keys, metadata keys, pyramidal
    WSI, 'patches' with top-left coords and (N, 1) barcodes), built from a synthetic slide."""
    import anndata as ad

    slide = _slide(sid, pixel_size_um=0.5)
    img = slide.uns["spatial"][sid]["images"]["fullres"]
    xy = slide.obsm["spatial"]
    for sub in ("st", "metadata", "patches", "wsis", "thumbnails", "tissue_seg"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    a = ad.AnnData(X=slide.X.copy())
    a.obs_names, a.var_names = list(slide.obs_names), list(slide.var_names)
    a.obs["in_tissue"] = 1
    a.obs["pxl_col_in_fullres"], a.obs["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
    a.obs["array_col"] = slide.obs["array_col"].to_numpy()
    a.obs["array_row"] = slide.obs["array_row"].to_numpy()
    a.obs["n_counts"] = np.asarray(slide.X.sum(1)).ravel()
    a.obsm["spatial"] = xy.copy()
    down = img[::4, ::4].copy()
    a.uns["spatial"] = {"ST": {"images": {"downscaled_fullres": down},
                               "scalefactors": {"tissue_downscaled_fullres_scalef": 0.25,
                                                "spot_diameter_fullres": 40.0}}}
    a.write_h5ad(root / "st" / f"{sid}.h5ad")
    meta = {"dataset_title": "synthetic", "id": sid, "patient": None, "organ": "Breast",
            "species": "Homo sapiens", "st_technology": "Spatial Transcriptomics",
            "pixel_size_um_embedded": 0.4, "pixel_size_um_estimated": 0.5, "magnification": "20x",
            "spot_diameter": 20.0, "inter_spot_dist": 27.5, "spots_under_tissue": slide.n_obs,
            "fullres_px_width": img.shape[1], "fullres_px_height": img.shape[0],
            "subseries": None, "treatment_comment": None}
    (root / "metadata" / f"{sid}.json").write_text(json.dumps(meta))
    if with_wsi:
        R.hest._write_pyramidal_tiff(img, root / "wsis" / f"{sid}.tif", 0.5, "zlib")
    tl = np.floor(xy - 16 / 2 + 0.5).astype(np.int64)
    with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
        f["img"] = np.stack([img[y:y + 16, x:x + 16] for x, y in tl])
        f["coords"] = tl
        f["barcode"] = np.array([b.encode() for b in slide.obs_names])[:, None]
    return slide


def test_read_hest_on_hest1k_layout(tmp_path):
    ref = _hest1k_sample(tmp_path, "NCBI1")
    _hest1k_sample(tmp_path, "NCBI2", with_wsi=False)
    with pytest.warns(UserWarning, match="no wsis/NCBI2.tif"):
        a, b = R.read_hest(tmp_path)
    validate_slide(a)
    e = a.uns["spatial"]["NCBI1"]
    assert e["pixel_size_um"] == 0.5 and a.obs["patient_id"].iloc[0] == "NCBI1"
    assert e["scalefactors"]["spot_diameter_fullres"] == 40.0
    np.testing.assert_array_equal(a.obsm["spatial"], ref.obsm["spatial"])
    # scanpy images come from HEST's downscaled image (the WSI is not decoded)
    assert e["images"]["hires"].shape == (75, 105, 3)
    assert e["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.25)
    # patches cut from the WSI match HEST's own patches (frame and corner convention)
    with h5py.File(tmp_path / "patches" / "NCBI1.h5") as f:
        np.testing.assert_array_equal(extract_patches(a, 16), f["img"][()])
    # no WSI: served from HEST's patch file
    validate_slide(b, require_image=False)
    store = hest2sge.data.cached_patches(b, 16)
    np.testing.assert_array_equal(store.load(), extract_patches(a, 16))


def test_download_hest_from_local_copy_and_hub_call(tmp_path, monkeypatch):
    src = tmp_path / "hub"
    _hest1k_sample(src, "TENX96")
    _hest1k_sample(src, "TENX9")  # an id that is a prefix of another
    (src / "cellvit_seg").mkdir()
    (src / "cellvit_seg" / "TENX96_cellvit_seg.parquet").write_bytes(b"x")
    (src / "HEST_v1_1_0.csv").write_text("id\nTENX96\nTENX9\n")
    got = R.download_hest(["TENX96"], tmp_path / "out", source=src)
    assert got == ["TENX96"]
    files = sorted(p.relative_to(tmp_path / "out").as_posix()
                   for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert files == ["cellvit_seg/TENX96_cellvit_seg.parquet", "metadata/TENX96.json",
                     "patches/TENX96.h5", "st/TENX96.h5ad", "wsis/TENX96.tif"]
    (slide,) = R.read_hest(tmp_path / "out")
    assert slide_id_of(slide) == "TENX96"
    with pytest.raises(FileNotFoundError, match="no files"):
        R.download_hest(["NOPE1"], tmp_path / "out2", source=src)
    calls = {}
    import huggingface_hub

    def fake_snapshot(**kwargs):
        calls.update(kwargs)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert R.download_hest(["TENX96", "NCBI783"], tmp_path / "hub_out") == []
    assert calls["repo_id"] == "MahmoodLab/hest" and calls["repo_type"] == "dataset"
    from huggingface_hub.utils import filter_repo_objects

    hub_files = ["st/TENX96.h5ad", "st/TENX9.h5ad", "wsis/NCBI783.tif", "HEST_v1_1_0.csv",
                 "cellvit_seg/TENX96_cellvit_seg.parquet", "st/TENX960.h5ad"]
    assert sorted(filter_repo_objects(hub_files, allow_patterns=calls["allow_patterns"])) == [
        "cellvit_seg/TENX96_cellvit_seg.parquet", "st/TENX96.h5ad", "wsis/NCBI783.tif"]
