"""Readers on the real files in ../shared/data (HER2+ legacy ST, Visium 1.x) and round trips."""

from __future__ import annotations

import gzip
import json
import os
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest

from hest2sge.data import readers as R
from hest2sge.data.patches import cached_patches, extract_patches
from hest2sge.data.slide import SlideError, make_slide, validate_slide

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]


def _sid(slide) -> str:
    return str(slide.obs["slide_id"].iloc[0])


def _entry(slide) -> dict:
    return slide.uns["spatial"][_sid(slide)]


@pytest.fixture(scope="module")
def her2st(her2st_slides):
    return {_sid(s): s for s in her2st_slides}


@pytest.fixture(scope="module")
def visium(visium_root):
    return R.read_visium(visium_root)


def _spotfile(root, sec):
    return pd.read_csv(root / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t")


def _counts(root, sec):
    return pd.read_csv(root / "ST-cnts" / f"{sec}.tsv.gz", sep="\t", index_col=0)


def _mini_her2st(tmp_path, her2st_root, sec="C2", n_images=1):
    """A her2st layout of one section made of links to the real files."""
    for sub in ("ST-cnts", "ST-spotfiles", f"ST-imgs/{sec[0]}/{sec}"):
        (tmp_path / sub).mkdir(parents=True)
    os.symlink(her2st_root / "ST-cnts" / f"{sec}.tsv.gz", tmp_path / "ST-cnts" / f"{sec}.tsv.gz")
    spot = tmp_path / "ST-spotfiles" / f"{sec}_selection.tsv"
    os.symlink(her2st_root / "ST-spotfiles" / f"{sec}_selection.tsv", spot)
    (jpg,) = (her2st_root / "ST-imgs" / sec[0] / sec).glob("*.jpg")
    for i in range(n_images):
        os.symlink(jpg, tmp_path / "ST-imgs" / sec[0] / sec / f"img{i}.jpg")
    return spot


# ------------------------------------------------------------------------------ HER2+ ST
def test_her2st_sections_and_join(her2st, her2st_root):
    assert list(her2st) == SECTIONS
    for sec, slide in her2st.items():
        validate_slide(slide)
        spots = _spotfile(her2st_root, sec)
        keys = {f"{x}x{y}" for x, y, sel in zip(spots.x, spots.y, spots.selected) if sel == 1}
        with gzip.open(her2st_root / "ST-cnts" / f"{sec}.tsv.gz", "rt") as fh:
            rows = {line.split("\t", 1)[0] for line in list(fh)[1:]}
        assert slide.n_obs == len(keys & rows)
        assert set(slide.obs_names) == keys & rows
        meta = _entry(slide)["metadata"]
        assert meta["n_spots_dropped"] == len(keys ^ rows)
        assert 15_000 < slide.n_vars < 16_500
        assert set(slide.obs["patient_id"]) == {"C"}
        assert _entry(slide)["image_path"].endswith(".jpg")
    assert _entry(her2st["C4"])["metadata"]["n_spots_dropped"] == 3


def test_her2st_patient_per_section(her2st_root):
    (c6,) = R.read_her2st(her2st_root, sections="C6", patient_from_section=False)
    assert set(c6.obs["patient_id"]) == {"C6"}


def test_her2st_values_and_coordinates_match_files(her2st, her2st_root):
    slide = her2st["C3"]
    spots = _spotfile(her2st_root, "C3").set_index(["x", "y"])
    counts = _counts(her2st_root, "C3")
    bc = "20x13"
    i = list(slide.obs_names).index(bc)
    row = spots.loc[(20, 13)]
    np.testing.assert_allclose(slide.obsm["spatial"][i], [row.pixel_x, row.pixel_y])
    assert slide.obs["array_row"].iloc[i] == 13 and slide.obs["array_col"].iloc[i] == 20
    x = slide.X.toarray() if hasattr(slide.X, "toarray") else slide.X
    for gene in ("ERBB2", "GNAS", counts.columns[5]):
        j = list(slide.var_names).index(gene)
        assert x[i, j] == counts.loc[bc, gene]
    assert x.sum() == counts.loc[slide.obs_names].to_numpy().sum()


def test_her2st_pixel_size_plausible(her2st):
    for slide in her2st.values():
        e = _entry(slide)
        assert 0.6 < e["pixel_size_um"] < 1.2
        assert e["scalefactors"]["spot_diameter_fullres"] == pytest.approx(
            100.0 / e["pixel_size_um"]
        )


def test_her2st_patch_equals_jpeg_crop(her2st):
    from PIL import Image

    slide = her2st["C2"]
    sub = slide[[10, 100]].copy()
    got = extract_patches(sub, 224)
    old_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(_entry(slide)["image_path"]) as im:
            for k, (x, y) in enumerate(sub.obsm["spatial"]):
                x0, y0 = int(np.floor(x - 112 + 0.5)), int(np.floor(y - 112 + 0.5))
                ref = np.asarray(im.convert("RGB").crop((x0, y0, x0 + 224, y0 + 224)))
                np.testing.assert_array_equal(got[k], ref)
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit
    assert got.std() > 10  # tissue, not padding


def test_her2st_missing_files(tmp_path, her2st_root):
    with pytest.raises(FileNotFoundError, match="C9.tsv.gz"):
        R.read_her2st(her2st_root, sections=["C2", "C9"])
    with pytest.raises(FileNotFoundError, match="ST-cnts"):
        R.read_her2st(tmp_path)
    _mini_her2st(tmp_path / "none", her2st_root, n_images=0)
    with pytest.raises(FileNotFoundError, match="no .jpg image"):
        R.read_her2st(tmp_path / "none")
    _mini_her2st(tmp_path / "two", her2st_root, n_images=2)
    with pytest.raises(SlideError, match="several images"):
        R.read_her2st(tmp_path / "two")


def test_her2st_spotfile_columns_and_selection(tmp_path, her2st_root):
    spot = _mini_her2st(tmp_path, her2st_root)
    df = pd.read_csv(spot, sep="\t")
    spot.unlink()
    df.loc[0, "selected"] = 0
    df.to_csv(spot, sep="\t", index=False)
    (c2,) = R.read_her2st(tmp_path)
    meta = _entry(c2)["metadata"]
    assert meta["n_spots_unselected"] == 1 and c2.n_obs == len(df) - 1
    assert f"{df.x[0]}x{df.y[0]}" not in c2.obs_names
    df.drop(columns=["pixel_x"]).to_csv(spot, sep="\t", index=False)
    with pytest.raises(SlideError, match="pixel_x"):
        R.read_her2st(tmp_path)


# ------------------------------------------------------------------------------ Visium
def test_visium_v1(visium, visium_root):
    validate_slide(visium)
    assert visium.shape == (100, 100)
    assert _sid(visium) == "visium_v1" and set(visium.obs["patient_id"]) == {"visium_v1"}
    pos = pd.read_csv(visium_root / "spatial" / "tissue_positions_list.csv", header=None,
                      index_col=0)
    bc = visium.obs_names[7]
    np.testing.assert_allclose(visium.obsm["spatial"][7], [pos.loc[bc, 5], pos.loc[bc, 4]])
    assert visium.obs["array_row"].iloc[7] == pos.loc[bc, 2]
    assert visium.obs["array_col"].iloc[7] == pos.loc[bc, 3]
    assert (visium.var["gene_ids"].str.startswith("ENSG")).all()
    e = _entry(visium)
    sf = json.loads((visium_root / "spatial" / "scalefactors_json.json").read_text())
    assert e["image_scale"] == pytest.approx(sf["tissue_hires_scalef"])
    assert e["image_path"].endswith("tissue_hires_image.png")
    assert e["pixel_size_um"] == pytest.approx(55.0 / sf["spot_diameter_fullres"])
    with h5py.File(visium_root / "filtered_feature_bc_matrix.h5") as f:
        assert visium.X.sum() == pytest.approx(f["matrix/data"][()].sum())


def _visium_copy(tmp_path, visium_root, positions="v2", hires=True):
    out = tmp_path / "sr"
    (out / "spatial").mkdir(parents=True)
    os.symlink(visium_root / "filtered_feature_bc_matrix.h5", out / "filtered_feature_bc_matrix.h5")
    names = ["scalefactors_json.json", "tissue_lowres_image.png"]
    names += ["tissue_hires_image.png"] if hires else []
    for name in names:
        os.symlink(visium_root / "spatial" / name, out / "spatial" / name)
    src = visium_root / "spatial" / "tissue_positions_list.csv"
    if positions == "v2":
        df = pd.read_csv(src, header=None)
        df.columns = list(R._common._VISIUM_COLUMNS)
        df.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    else:
        os.symlink(src, out / "spatial" / "tissue_positions_list.csv")
    return out


def test_visium_v2_layout_gives_identical_slide(tmp_path, visium, visium_root):
    v2 = R.read_visium(_visium_copy(tmp_path, visium_root), slide_id="visium_v1")
    validate_slide(v2)
    assert (v2.X != visium.X).nnz == 0
    pd.testing.assert_frame_equal(v2.obs, visium.obs)
    pd.testing.assert_frame_equal(v2.var, visium.var)
    np.testing.assert_array_equal(v2.obsm["spatial"], visium.obsm["spatial"])
    a, b = _entry(v2), _entry(visium)
    for key in ("image_scale", "pixel_size_um", "scalefactors"):
        assert a[key] == b[key]


def test_visium_errors(tmp_path, visium_root):
    out = _visium_copy(tmp_path, visium_root)
    df = pd.read_csv(out / "spatial" / "tissue_positions.csv")
    df.drop(columns=["pxl_row_in_fullres"]).to_csv(out / "spatial" / "tissue_positions.csv",
                                                  index=False)
    with pytest.raises(SlideError, match="pxl_row_in_fullres"):
        R.read_visium(out)
    (out / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(FileNotFoundError, match="tissue_positions_list.csv"):
        R.read_visium(out)
    df.to_csv(out / "spatial" / "tissue_positions.csv", index=False)
    (out / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(FileNotFoundError, match="scalefactors_json.json"):
        R.read_visium(out)
    with pytest.raises(FileNotFoundError, match="filtered_feature_bc_matrix.h5"):
        R.read_visium(visium_root / "spatial")
    with pytest.raises(FileNotFoundError, match="nothere.tif"):
        R.read_visium(visium_root, image=tmp_path / "nothere.tif")


def test_visium_hires_scale_handling(tmp_path, visium_root):
    """Patches are addressed in full-res pixels and cut from the hires (or lowres) image."""
    from PIL import Image

    sf = json.loads((visium_root / "spatial" / "scalefactors_json.json").read_text())
    s_hi, s_lo = sf["tissue_hires_scalef"], sf["tissue_lowres_scalef"]
    # the bundled tissue_hires_image.png is blank (all black RGBA): build a hires image from
    # the lowres one at the hires scale factor instead
    low = Image.open(visium_root / "spatial" / "tissue_lowres_image.png").convert("RGB")
    size = round(low.size[0] * s_hi / s_lo)
    out = _visium_copy(tmp_path, visium_root, positions="v1", hires=False)
    hires_png = out / "spatial" / "tissue_hires_image.png"
    low.resize((size, size), Image.Resampling.BICUBIC).convert("RGBA").save(hires_png)
    hi_slide = R.read_visium(out)
    assert _entry(hi_slide)["image_scale"] == pytest.approx(s_hi)
    hires = np.asarray(Image.open(hires_png).convert("RGB"))
    got = extract_patches(hi_slide[:20].copy(), 224)
    assert got.std() > 5
    for k, (x, y) in enumerate(hi_slide.obsm["spatial"][:20]):
        half = 112 * s_hi
        ref = hires[int(round(y * s_hi - half)) : int(round(y * s_hi + half)),
                    int(round(x * s_hi - half)) : int(round(x * s_hi + half))]
        assert np.abs(got[k].mean((0, 1)) - ref.mean((0, 1))).max() < 3
    # without the hires image the lowres one is used at its own scale: same picture
    hires_png.unlink()
    lo_slide = R.read_visium(out)
    assert _entry(lo_slide)["image_scale"] == pytest.approx(s_lo)
    got_low = extract_patches(lo_slide[:20].copy(), 224)
    diff = np.abs(got_low.astype(float).mean((1, 2)) - got.astype(float).mean((1, 2)))
    assert diff.max() < 3


def test_spot_outside_image_error(visium):
    bad = visium[:3].copy()
    xy = bad.obsm["spatial"].copy()
    xy[1] = [20000.0, 100.0]
    bad.obsm["spatial"] = xy
    with pytest.raises(SlideError, match=rf"{bad.obs_names[1]}.*20000\.0"):
        extract_patches(bad, 224)


# ------------------------------------------------------------------------------ HEST layout
def test_hest_round_trip(tmp_path, her2st, visium):
    slides = [her2st["C3"], visium]
    written = R.write_hest(slides, tmp_path, compression=None)
    assert [p.name for p in written] == ["C3.h5ad", "visium_v1.h5ad"]
    for sub, suffix in (("patches", ".h5"), ("metadata", ".json"), ("wsis", ".tif")):
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == [
            f"C3{suffix}", f"visium_v1{suffix}"
        ]
    back = {_sid(s): s for s in R.read_hest(tmp_path)}
    assert list(back) == ["C3", "visium_v1"]
    for a in slides:
        b = back[_sid(a)]
        validate_slide(b)
        assert (a.X != b.X).nnz == 0
        assert list(a.var_names) == list(b.var_names) and list(a.obs_names) == list(b.obs_names)
        ea, eb = _entry(a), _entry(b)
        # one frame: a slide whose image is not full resolution (Visium hires only) is
        # written in the frame of that image
        frame = ea["image_scale"]
        np.testing.assert_allclose(b.obsm["spatial"], a.obsm["spatial"] * frame, rtol=1e-12)
        pd.testing.assert_frame_equal(a.obs[["patient_id", "array_row", "array_col"]],
                                      b.obs[["patient_id", "array_row", "array_col"]])
        assert eb["image_path"].endswith(f"wsis/{_sid(a)}.tif")
        assert eb["image_scale"] == 1.0
        assert eb["pixel_size_um"] == pytest.approx(ea["pixel_size_um"] / frame)
        idx = [0, a.n_obs // 2, a.n_obs - 1]
        um = 2.0 * ea["pixel_size_um"]  # same tissue area whatever the frame
        pa = extract_patches(a[idx].copy(), 64, pixel_size_um=um)
        np.testing.assert_array_equal(pa, extract_patches(b[idx].copy(), 64, pixel_size_um=um))
        pn = extract_patches(a[idx].copy(), 224)
        with h5py.File(tmp_path / "patches" / f"{_sid(a)}.h5") as f:
            assert f["img"].shape == (a.n_obs, 224, 224, 3)
            np.testing.assert_array_equal(f["img"][idx], pn)
            assert [v.decode() for v in f["barcode"][idx, 0]] == list(a.obs_names[idx])
            # HEST convention: top-left corner of each patch in level-0 pixels
            extent = 224 * frame
            np.testing.assert_allclose(f["coords"][idx] + extent / 2, b.obsm["spatial"][idx],
                                       atol=0.5 + 1e-9)
    assert list(back["visium_v1"].var["gene_ids"]) == list(visium.var["gene_ids"])


def _hex_slide():
    """A synthetic Visium-like slide (hexagonal grid) with an in-memory image."""
    rows, cols = np.meshgrid(np.arange(6), np.arange(0, 16, 2), indexing="ij")
    cols = cols + (rows % 2)
    rows, cols = rows.ravel(), cols.ravel()
    xy = np.c_[40 + cols * 20.0, 40 + rows * 20.0 * np.sqrt(3)]
    img = np.random.default_rng(3).integers(0, 255, size=(260, 400, 3), dtype=np.uint8)
    n = len(xy)
    return make_slide(np.random.default_rng(0).poisson(1.0, (n, 5)), [f"g{i}" for i in range(5)],
                      [f"AAAC{i:03d}-1" for i in range(n)], xy, rows, cols, "hx", "P7",
                      image=img, pixel_size_um=0.5, spot_diameter_fullres=110.0)


def test_hest_reads_files_without_contract_columns(tmp_path):
    """A HEST-1k style sample: bare h5ad, HEST metadata keys, patches file, no WSI."""
    slide = _hex_slide()
    R.write_hest([slide], tmp_path / "ours")
    st = slide.copy()
    st.obs = st.obs.drop(columns=["slide_id", "patient_id", "array_row", "array_col"])
    del st.uns["spatial"]
    (tmp_path / "hest" / "st").mkdir(parents=True)
    (tmp_path / "hest" / "metadata").mkdir()
    (tmp_path / "hest" / "patches").mkdir()
    st.write_h5ad(tmp_path / "hest" / "st" / "TENX1.h5ad")
    meta = {"patient": "P7", "pixel_size_um_estimated": 0.5, "spot_diameter": 55.0,
            "st_technology": "Visium"}
    (tmp_path / "hest" / "metadata" / "TENX1.json").write_text(json.dumps(meta))
    # HEST stores barcodes as (N, 1) bytes; shuffle rows to check the mapping by barcode
    order = np.random.default_rng(0).permutation(slide.n_obs)
    with h5py.File(tmp_path / "ours" / "patches" / "hx.h5") as f:
        img, bc = f["img"][()], f["barcode"][()]
    with h5py.File(tmp_path / "hest" / "patches" / "TENX1.h5", "w") as f:
        f["img"] = img[order]
        f["barcode"] = bc[order][:, None]
        f["coords"] = np.zeros((slide.n_obs, 2), dtype=np.int64)
    with pytest.warns(UserWarning, match="no wsis"):
        (back,) = R.read_hest(tmp_path / "hest")
    validate_slide(back, require_image=False)
    assert _sid(back) == "TENX1" and set(back.obs["patient_id"]) == {"P7"}
    np.testing.assert_array_equal(back.obs["array_row"], slide.obs["array_row"])
    np.testing.assert_array_equal(back.obs["array_col"], slide.obs["array_col"])
    e = _entry(back)
    assert e["pixel_size_um"] == 0.5 and e["scalefactors"]["spot_diameter_fullres"] == 110.0
    store = cached_patches(back, 224)
    np.testing.assert_array_equal(store.get_many([5, 0]), img[[5, 0]])
    with pytest.raises(SlideError, match="224 px"):
        cached_patches(back, 112)


def test_grid_from_coords_recovers_visium_and_st_grids(visium_root, her2st_root):
    pos = pd.read_csv(visium_root / "spatial" / "tissue_positions_list.csv", header=None)
    rows, cols = R.grid_from_coords(pos[[5, 4]].to_numpy(float))
    np.testing.assert_array_equal(rows, pos[2] - pos[2].min())
    np.testing.assert_array_equal(cols, pos[3] - pos[3].min())
    spots = _spotfile(her2st_root, "C2")
    rows, cols = R.grid_from_coords(spots[["pixel_x", "pixel_y"]].to_numpy())
    np.testing.assert_array_equal(rows, spots.y - spots.y.min())
    np.testing.assert_array_equal(cols, spots.x - spots.x.min())


# ------------------------------------------------------------------------------ h5ad
def test_h5ad_with_several_sections(tmp_path, her2st):
    import anndata as ad

    a, b = her2st["C2"], her2st["C3"]
    with warnings.catch_warnings():  # "XxY" barcodes repeat across sections
        warnings.simplefilter("ignore")
        both = ad.concat([a, b], join="inner", label="sample", keys=["C2", "C3"])
        both.obs = both.obs.drop(columns=["slide_id"])
        both.uns["spatial"] = {"C2": _entry(a), "C3": _entry(b)}
        both.write_h5ad(tmp_path / "two.h5ad")
    slides = R.read_h5ad(tmp_path / "two.h5ad")
    assert [_sid(s) for s in slides] == ["C2", "C3"]
    for orig, got in zip((a, b), slides):
        validate_slide(got)
        assert list(got.obs_names) == list(orig.obs_names)
        assert set(got.obs["patient_id"]) == {"C"}
        genes = list(got.var_names)
        assert (orig[:, genes].X != got.X).nnz == 0
        np.testing.assert_array_equal(orig.obsm["spatial"], got.obsm["spatial"])
        assert _entry(got)["image_path"] == _entry(orig)["image_path"]
        assert _entry(got)["pixel_size_um"] == _entry(orig)["pixel_size_um"]
    (only,) = R.read_h5ad(tmp_path / "two.h5ad", slide_id="C3", patient_id="X")
    assert _sid(only) == "C3" and set(only.obs["patient_id"]) == {"X"}
    with pytest.raises(SlideError, match="C9"):
        R.read_h5ad(tmp_path / "two.h5ad", slide_id="C9")


def test_h5ad_scanpy_style_and_errors(tmp_path, visium, visium_root):
    from PIL import Image

    sc_like = visium.copy()
    hires = np.asarray(Image.open(visium_root / "spatial" / "tissue_hires_image.png")
                       .convert("RGB"))
    sf = dict(_entry(visium)["scalefactors"])
    sc_like.obs = sc_like.obs.drop(columns=["slide_id", "patient_id", "array_row", "array_col"])
    sc_like.uns["spatial"] = {"lib1": {"images": {"hires": hires}, "scalefactors": sf}}
    sc_like.write_h5ad(tmp_path / "sc.h5ad")
    with pytest.warns(UserWarning, match="patient"):
        (got,) = R.read_h5ad(tmp_path / "sc.h5ad")
    validate_slide(got)
    assert _sid(got) == "lib1" and _entry(got)["image_scale"] == pytest.approx(0.150015)
    np.testing.assert_array_equal(extract_patches(got[:4].copy(), 224),
                                  extract_patches(visium[:4].copy(), 224))
    del sc_like.obsm["spatial"]
    sc_like.write_h5ad(tmp_path / "nospatial.h5ad")
    with pytest.raises(SlideError, match=r"obsm\['spatial'\]"):
        R.read_h5ad(tmp_path / "nospatial.h5ad", patient_id="p")
    bare = visium.copy()
    del bare.uns["spatial"]
    bare.write_h5ad(tmp_path / "noimage.h5ad")
    with pytest.raises(SlideError, match="no image"):
        R.read_h5ad(tmp_path / "noimage.h5ad")
    (ok,) = R.read_h5ad(tmp_path / "noimage.h5ad", require_image=False)
    validate_slide(ok, require_image=False)


def test_readers_do_not_load_images(her2st):
    for slide in her2st.values():  # only the scverse thumbnails are held in memory
        images = _entry(slide)["images"]
        assert set(images) == {"hires", "lowres"}
        assert max(images["hires"].shape[:2]) == 2000 and max(images["lowres"].shape[:2]) == 600
