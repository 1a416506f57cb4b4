"""Whole-slide prediction (hest2sge.predict_wsi) on small pyramids the tests write themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hest2sge
from hest2sge.data.images import _halve, write_pyramidal_tiff
from hest2sge.models.base import SpotModel
from hest2sge.translational.wsi import WSIError, is_white, predict_wsi

P = 32  # model patch size
HOLE = (640, 1280, 600, 1000)  # x0, x1, y0, y1 of the white hole inside the tissue


class MeanColour(SpotModel):
    """A tiny spot model: linear map of the mean patch colour (fast, exactly checkable)."""

    model_name = "test_mean_colour"

    def __init__(self, genes, patch_size: int = P) -> None:
        super().__init__(genes=genes, patch_size=patch_size, normalize="none")
        self.lin = nn.Linear(3, len(genes))
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, batch):
        return self.lin(batch["img"].float().mean(dim=(2, 3)))


def _tissue_image(h: int = 1600, w: int = 2400, seed: int = 0) -> np.ndarray:
    """White glass with an H&E-coloured elliptic section holding a white hole."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((xx - 0.4 * w) / (0.29 * w)) ** 2 + ((yy - 0.5 * h) / (0.35 * h)) ** 2 < 1
    tex = rng.integers(-40, 40, size=(h // 4, w // 4, 1))
    tex = np.repeat(np.repeat(tex, 4, 0), 4, 1)
    tissue = np.clip(np.array([170, 100, 160]) + tex, 0, 255).astype(np.uint8)
    img[blob] = tissue[blob]
    x0, x1, y0, y1 = HOLE
    img[y0:y1, x0:x1] = 250
    return img


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    img = _tissue_image()
    path = tmp_path_factory.mktemp("wsi") / "section.tif"
    write_pyramidal_tiff(path, img, mpp=0.5, compression="zlib", min_size=300)
    return path, img


@pytest.fixture(scope="module")
def model():
    return MeanColour(genes=["GA", "GB", "GC"])


def _expected(model, tiles: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0
        return model(dict(img=x)).numpy()


@pytest.mark.parametrize("pixel_size_um, level, patch", [("native", 0, 64), (1.0, 1, 32)])
def test_tiles_match_the_pyramid_and_white_tiles_are_dropped(slide, pixel_size_um, level, patch):
    path, img = slide
    model = MeanColour(genes=["GA", "GB", "GC"], patch_size=patch)
    out = predict_wsi(model, path, pixel_size_um=pixel_size_um, batch_size=16)
    info = out.uns["hest2sge"]
    assert info["read_level"] == level and info["slide_mpp"] == pytest.approx(0.5)
    src = img if level == 0 else _halve(img)
    step = 64  # tile side in level-0 px in both cases
    assert info["tile_side_level0_px"] == pytest.approx(step)
    assert info["grid"] == [img.shape[0] // step, img.shape[1] // step]
    rows, cols = out.obs["array_row"].to_numpy(), out.obs["array_col"].to_numpy()
    p = patch

    def tile(r, c):
        return src[r * p:(r + 1) * p, c * p:(c + 1) * p]

    tiles = np.stack([tile(r, c) for r, c in zip(rows, cols)])
    np.testing.assert_allclose(out.layers["pred"], _expected(model, tiles), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.obsm["spatial"], np.stack([(cols + .5) * step,
                                                              (rows + .5) * step], 1))
    assert not is_white(tiles).any()
    kept = set(zip(rows.tolist(), cols.tolist()))
    # every tile entirely on tissue is kept; none entirely on glass is
    n_r, n_c = info["grid"]
    full = {(r, c) for r in range(n_r) for c in range(n_c)
            if (tile(r, c).astype(int).sum(-1) < 600).all()}
    glass = {(r, c) for r in range(n_r) for c in range(n_c)
             if (tile(r, c).astype(int).sum(-1) >= 3 * 245 - 3).all()}
    assert len(full) > 50 and full <= kept and not kept & glass
    # the tissue mask fills the hole; the paper's white rule drops the tiles inside it
    x0, x1, y0, y1 = HOLE
    inside = {(r, c) for r in range(n_r) for c in range(n_c)
              if r * step >= y0 and (r + 1) * step <= y1 and c * step >= x0
              and (c + 1) * step <= x1}
    assert len(inside) >= 4
    assert not kept & inside
    assert info["n_tiles_white_dropped"] >= len(inside)
    assert info["n_tiles"] + info["n_tiles_white_dropped"] == info["n_tiles_tissue"]
    assert len(info["weights_sha256"]) == 64 and info["target_transform"] == {"kind": "log_norm"}


def test_registered_model_end_to_end_and_scverse_plots(slide, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    path, _ = slide
    cls = hest2sge.registry.get_model_class("stnet")
    m = cls(genes=["GA", "GB"], **cls.tiny_config)
    out = hest2sge.predict_wsi(m, path, pixel_size_um=4.0)  # 128 level-0 px tiles, ~60 tiles
    assert out.n_obs > 10 and list(out.var_names) == ["GA", "GB"]
    assert np.isfinite(out.X).all()
    assert out.uns["hest2sge"]["model"] == "stnet"
    sc.pl.spatial(out, color="GA", library_id="section", show=False)
    import squidpy as sq

    sq.pl.spatial_scatter(out, color="GA", library_id="section")
    sq.gr.spatial_neighbors(out, coord_type="grid", n_neighs=4)  # the tile grid
    assert out.obsp["spatial_connectivities"].sum(1).max() <= 4
    out.write_h5ad(tmp_path / "o.h5ad")


def test_slide_level_model_on_tile_graph(slide):
    path, _ = slide
    cls = hest2sge.registry.get_model_class("histogene")
    m = cls(genes=["GA", "GB"], **cls.tiny_config)  # patch 16
    out = predict_wsi(m, path, pixel_size_um=4.0, graph_window=6)
    info = out.uns["hest2sge"]
    assert info["input_mode"] == "slide" and info["graph_window"] == 6
    assert out.n_obs > 20 and np.isfinite(out.X).all()


def test_no_tissue_and_unknown_resolution_are_clear_errors(tmp_path, model):
    blank = np.full((800, 900, 3), 243, np.uint8)
    write_pyramidal_tiff(tmp_path / "glass.tif", blank, mpp=0.5, compression="zlib")
    with pytest.raises(WSIError, match="no tissue found in .*glass.tif"):
        predict_wsi(model, tmp_path / "glass.tif", pixel_size_um=1.0)
    img = _tissue_image(400, 600)
    write_pyramidal_tiff(tmp_path / "nompp.tif", img, compression="zlib", min_size=100)
    with pytest.raises(WSIError, match="resolution of .*nompp.tif is unknown.*mpp="):
        predict_wsi(model, tmp_path / "nompp.tif", pixel_size_um=1.0)
    out = predict_wsi(model, tmp_path / "nompp.tif", mpp=0.25, pixel_size_um=1.0)
    assert out.uns["hest2sge"]["slide_mpp_source"] == "argument"
    assert out.uns["hest2sge"]["read_level"] == 2  # 4x downsample: level 2 of the pyramid
    with pytest.raises(WSIError, match="pixel_size_um"):  # the model records no pixel size
        predict_wsi(model, tmp_path / "nompp.tif", mpp=0.25)


def test_stain_normalisation_is_applied_and_recorded(slide, model):
    path, _ = slide
    plain = predict_wsi(model, path, pixel_size_um=4.0)
    normed = predict_wsi(model, path, pixel_size_um=4.0, stain_norm="macenko")
    assert normed.n_obs == plain.n_obs
    assert normed.uns["hest2sge"]["stain_norm"]["method"] == "macenko"
    assert not np.allclose(normed.X, plain.X)


def test_cli_predict_wsi(slide, tmp_path):
    import anndata as ad

    from hest2sge.cli import main

    path, _ = slide
    genes = tmp_path / "genes.txt"
    genes.write_text("GA\nGB\n")
    rc = main(["predict-wsi", str(path), "--model", "stnet", "--tiny", "--genes", str(genes),
               "--pixel-size-um", "4", "--out", str(tmp_path / "pred.h5ad")])
    assert rc == 0
    out = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert out.n_obs > 10 and list(out.var_names) == ["GA", "GB"]
    assert out.uns["hest2sge"]["tile_pixel_size_um"] == 4.0


def test_tile_tissue_fraction_and_means_against_brute_force():
    from hest2sge.translational.wsi import _block_fraction, tile_means

    rng = np.random.default_rng(3)
    mask = rng.random((37, 53)) < 0.3
    r_edges, c_edges = np.array([0, 5, 11, 11, 30, 37]), np.array([0, 7, 20, 52, 53])
    got = _block_fraction(mask, r_edges, c_edges)
    for i in range(len(r_edges) - 1):
        for j in range(len(c_edges) - 1):
            r0, c0 = r_edges[i], c_edges[j]
            r1, c1 = max(r_edges[i + 1], r0 + 1), max(c_edges[j + 1], c0 + 1)
            assert got[i, j] == pytest.approx(mask[r0:r1, c0:c1].mean())
    tiles = rng.integers(0, 256, size=(5, 12, 10, 3), dtype=np.uint8)
    np.testing.assert_allclose(tile_means(tiles), tiles.reshape(5, -1, 3).mean(1))
    tiles[2] = 221
    tiles[3] = 220
    assert is_white(tiles).tolist() == [False, False, True, False, False]
