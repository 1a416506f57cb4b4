"""HistoQC colour metrics, tissue mask, low-resolution reading, PCA and PC1 vs correlation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hest2sge.translational.qc import (
    METRICS,
    color_metrics,
    low_res_image,
    qc_pca,
    qc_table,
    qc_vs_correlation,
    tissue_mask,
)


def _slide(h=200, w=240):
    """White glass, a pink tissue block with a small hole, a black pen blob, a tiny speck."""
    img = np.full((h, w, 3), 245, np.uint8)
    img[40:160, 30:150] = (200, 120, 170)
    img[90:95, 80:85] = 245  # 25 px hole: filled
    img[20:60, 180:220] = (10, 10, 10)  # dark: dropped (grey < 0.15)
    img[180:184, 200:204] = (200, 120, 170)  # 16 px speck: removed
    return img


def test_tissue_mask_follows_histoqc_defaults():
    m = tissue_mask(_slide())
    assert m[40:160, 30:150].all()  # block with its hole filled
    assert not m[20:60, 180:220].any() and not m[180:184, 200:204].any()
    assert m.sum() == 120 * 120


def test_color_metrics_match_histoqc_definitions():
    img = np.zeros((4, 4, 3), np.uint8)
    img[:2] = (200, 100, 150)
    img[2:] = (100, 50, 200)
    mask = np.ones((4, 4), bool)
    mask[0, 0] = False
    px = img[mask].astype(float)
    gray = px @ np.array([0.2125, 0.7154, 0.0721]) / 255  # skimage rgb2gray weights
    yuv = px / 255 @ np.array([[0.299, 0.587, 0.114], [-0.14714119, -0.28886916, 0.43601035],
                               [0.61497538, -0.51496512, -0.10001026]]).T
    got = color_metrics(img, mask)
    assert list(got) == list(METRICS)
    assert got["grayscale_brightness"] == pytest.approx(gray.mean())
    assert got["rms_contrast"] == pytest.approx(gray.std())
    assert got["michelson_contrast"] == pytest.approx(
        (gray.max() - gray.min()) / (gray.max() + gray.min()))
    for k in range(3):
        assert got[f"chan{k + 1}_brightness"] == pytest.approx(px[:, k].mean())
        assert got[f"chan{k + 1}_brightness_YUV"] == pytest.approx(yuv[:, k].mean(), abs=1e-6)
    with pytest.raises(ValueError, match="no tissue"):
        color_metrics(np.full((50, 50, 3), 250, np.uint8), name="blank")


def test_low_res_image_from_array_jpeg_and_pyramid(tmp_path):
    img = np.kron(_slide(), np.ones((8, 8, 1), np.uint8))  # 1600 x 1920 px
    assert low_res_image(img, mpp=0.5, work_mpp=8.0).shape == (100, 120, 3)
    jpg = tmp_path / "s.jpg"
    Image.fromarray(img).save(jpg, quality=95)
    small = low_res_image(jpg, mpp=0.5, work_mpp=8.0)
    assert small.shape == (100, 120, 3)
    assert tissue_mask(small)[50:150 // 2, 20:70].all()
    tifffile = pytest.importorskip("tifffile")
    pytest.importorskip("tiffslide")
    tif = tmp_path / "s.tif"
    with tifffile.TiffWriter(tif) as w:  # tiled pyramid with its resolution in the header
        w.write(img, tile=(256, 256), subifds=1, resolution=(1e4 / 0.5, 1e4 / 0.5),
                resolutionunit="CENTIMETER", photometric="rgb")
        w.write(img[::4, ::4], tile=(256, 256), subfiletype=1, photometric="rgb")
    pyr = low_res_image(tif, work_mpp=8.0)  # mpp read from the file
    assert pyr.shape == (100, 120, 3)
    assert np.abs(pyr.astype(int) - small.astype(int)).mean() < 6
    with pytest.raises(FileNotFoundError):
        low_res_image(tmp_path / "missing.jpg")

    class Reader:  # the lazy-reader protocol: thumbnail(downsample) -> (array, downsample)
        dimensions, mpp = (1920, 1600), 0.5

        def thumbnail(self, downsample):
            k = int(downsample // 2)
            return img[::k, ::k], float(k)

    got = low_res_image(Reader(), work_mpp=8.0)
    assert got.shape == (100, 120, 3)
    np.testing.assert_allclose(got.mean((0, 1)), small.mean((0, 1)), atol=3)


def test_pca_and_pc1_vs_correlation(tmp_path):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 1))
    table = pd.DataFrame(base @ rng.normal(size=(1, 9)) + 0.3 * rng.normal(size=(8, 9)),
                         columns=list(METRICS), index=[f"s{i}" for i in range(8)])
    pca = qc_pca(table)
    ref = PCA().fit(StandardScaler().fit_transform(table))
    np.testing.assert_allclose(pca["explained"].to_numpy()[:8], ref.explained_variance_ratio_,
                               atol=1e-10)
    pc1 = pca["scores"]["PC1"]
    corr = pd.Series(0.5 - 0.05 * pc1.to_numpy() + 0.01 * rng.normal(size=8), index=table.index)
    out = qc_vs_correlation(pc1, corr.iloc[::-1], path=tmp_path / "pc1.png")
    rho, _ = __import__("scipy").stats.spearmanr(pc1, corr)
    assert out["n"] == 8 and out["spearman_rho"] == pytest.approx(rho) and rho < -0.8
    assert (tmp_path / "pc1.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="need >= 3"):
        qc_vs_correlation(pc1.iloc[:2], corr)


def test_qc_on_her2st_sections(her2st_root):
    paths = {p.parent.name: p for p in sorted((her2st_root / "ST-imgs").glob("*/*/*.jpg"))}
    assert len(paths) == 5
    table = qc_table(paths, mpp=0.69)  # ~8 µm/px working resolution, as HistoQC's 1.25x
    assert np.isfinite(table.to_numpy()).all()
    assert table["tissue_fraction"].between(0.1, 0.5).all()
    # H&E tissue: red and blue above green, grey brightness well below the glass
    assert (table["chan1_brightness"] > table["chan2_brightness"]).all()
    assert (table["chan3_brightness"] > table["chan2_brightness"]).all()
    assert table["grayscale_brightness"].between(0.3, 0.8).all()
    assert qc_pca(table)["explained"].iloc[0] > 0.5
