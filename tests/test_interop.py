"""scverse interoperability: slides and predict output work in scanpy and squidpy unchanged
(Agg backend), and as_slide converts AnnData objects built elsewhere."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # tests only: the package itself never picks a backend

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import hest2sge  # noqa: E402
from hest2sge.data.scverse import as_slide  # noqa: E402
from hest2sge.data.slide import slide_id_of, validate_slide  # noqa: E402

sc = pytest.importorskip("scanpy")
sq = pytest.importorskip("squidpy")


def _variable_gene(adata, layer=None):
    x = adata.layers[layer] if layer else adata.X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x)
    return str(adata.var_names[int(np.argmax(x.var(0)))])


def _check_scverse(slide, gene, grid_neighbours, layer=None):
    """Run the scverse calls a user would, and check what they produce."""
    import matplotlib.pyplot as plt

    sid = slide_id_of(slide)
    entry = slide.uns["spatial"][sid]
    hires = entry["images"]["hires"]
    assert hires.dtype == np.uint8 and max(hires.shape[:2]) <= 2000
    assert max(entry["images"]["lowres"].shape[:2]) <= 600
    sf = entry["scalefactors"]
    assert np.isfinite(sf["spot_diameter_fullres"]) and sf["spot_diameter_fullres"] > 0
    # every spot, mapped with tissue_hires_scalef, lands on the hires image
    xy = np.asarray(slide.obsm["spatial"]) * sf["tissue_hires_scalef"]
    assert (xy >= 0).all() and (xy[:, 0] < hires.shape[1]).all() and (xy[:, 1] < hires.shape[0]).all()

    ax = sc.pl.spatial(slide, color=gene, show=False)[0]
    assert ax.images and ax.images[0].get_array().shape[:2] == hires.shape[:2]
    plt.close("all")
    sq.pl.spatial_scatter(slide, color=gene)
    plt.close("all")
    ad = slide.copy()
    sq.gr.spatial_neighbors(ad, coord_type="grid", n_neighs=grid_neighbours)
    deg = np.asarray(ad.obsp["spatial_connectivities"].sum(1)).ravel()
    assert deg.max() <= grid_neighbours and np.median(deg) >= grid_neighbours - 1
    if layer is None:
        sc.pp.normalize_total(ad)
        sc.pp.log1p(ad)
    sq.gr.spatial_autocorr(ad, mode="moran", genes=[gene], n_perms=None, layer=layer)
    assert np.isfinite(ad.uns["moranI"].loc[gene, "I"])


def test_her2st_slide_in_scanpy_and_squidpy(her2st_slides):
    slide = her2st_slides[0]
    gene = "ERBB2" if "ERBB2" in slide.var_names else str(slide.var_names[0])
    _check_scverse(slide, gene, grid_neighbours=4)
    sf = slide.uns["spatial"][slide_id_of(slide)]["scalefactors"]
    # 100 µm spots at the estimated pixel size
    px = slide.uns["spatial"][slide_id_of(slide)]["pixel_size_um"]
    assert sf["spot_diameter_fullres"] * px == pytest.approx(100.0)


def test_visium_slide_in_scanpy_and_squidpy(visium_root):
    slide = hest2sge.data.read_visium(visium_root)
    entry = slide.uns["spatial"][slide_id_of(slide)]
    import json

    sr = json.loads((visium_root / "spatial" / "scalefactors_json.json").read_text())
    # Space Ranger's own images and scale factors are what scanpy sees
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(sr["tissue_hires_scalef"])
    assert entry["images"]["lowres"].shape[:2] == (600, 600)
    _check_scverse(slide, _variable_gene(slide), grid_neighbours=6)


def test_predict_output_in_scanpy_squidpy_and_comparison_plot(tmp_path):
    slides = hest2sge.data.synthetic_slides(n_patients=1, slides_per_patient=1, grid=(6, 6),
                                            n_genes=8)
    slide = slides[0]
    model = hest2sge.load("stnet", genes=list(slide.var_names), backbone="test_resnet",
                          pretrained=False, patch_size=32)
    pred = hest2sge.predict(model, slide)
    assert "hires" in pred.uns["spatial"][slide_id_of(slide)]["images"]
    # predict must not alter the slide's own entry
    assert "hires" in slide.uns["spatial"][slide_id_of(slide)]["images"]
    # an untrained model's predictions may be constant; Moran's I on the carried counts
    _check_scverse(pred, _variable_gene(pred, "counts"), grid_neighbours=4, layer="counts")
    ax = sc.pl.spatial(pred, color=str(pred.var_names[1]), layer="pred", show=False)[0]
    assert ax.images
    from hest2sge.plotting import plot_spatial_comparison, truth_on_target_scale

    truth = truth_on_target_scale(pred)  # derived from counts with the model's transform
    tt = hest2sge.data.TargetTransform.from_spec(model.target_transform_spec())
    counts = np.asarray(slide[:, list(pred.var_names)].X.toarray()
                        if hasattr(slide.X, "toarray") else slide[:, list(pred.var_names)].X)
    total = np.asarray(slide.X.sum(1)).ravel()
    np.testing.assert_allclose(truth, tt(counts, total_all=total, n_all=slide.n_vars),
                               rtol=1e-5)
    fig = plot_spatial_comparison(pred, list(pred.var_names[:2]), path=tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 0 and len(fig.axes) >= 4
    del pred.layers["counts"]
    with pytest.raises(ValueError, match="no layers\\['truth'\\]"):
        plot_spatial_comparison(pred, list(pred.var_names[:1]))


def test_as_slide_from_scanpy_style_anndata(visium_root):
    import anndata as ad

    ref = hest2sge.data.read_visium(visium_root)
    entry = ref.uns["spatial"][slide_id_of(ref)]
    # what sc.read_visium produces: no hest2sge obs columns, a library entry with images
    raw = ad.AnnData(X=ref.X.copy(), var=ref.var[[]].copy())
    raw.obs_names = ref.obs_names
    raw.obsm["spatial"] = np.asarray(ref.obsm["spatial"])
    raw.obs["array_row"] = ref.obs["array_row"].to_numpy()
    raw.obs["array_col"] = ref.obs["array_col"].to_numpy()
    raw.uns["spatial"] = {"lib1": {
        "images": {"hires": entry["images"]["hires"], "lowres": entry["images"]["lowres"]},
        "scalefactors": {k: entry["scalefactors"][k] for k in
                         ("tissue_hires_scalef", "tissue_lowres_scalef",
                          "spot_diameter_fullres")}}}
    with pytest.warns(UserWarning, match="patient"):
        slide = as_slide(raw)
    validate_slide(slide)
    assert slide_id_of(slide) == "lib1"
    got = slide.uns["spatial"]["lib1"]
    assert got["image_scale"] == pytest.approx(entry["scalefactors"]["tissue_hires_scalef"])
    np.testing.assert_array_equal(got["images"]["hires"], entry["images"]["hires"])
    # an existing slide comes back as a copy, untouched
    again = as_slide(slide)
    assert again is not slide and again.uns["spatial"]["lib1"]["images"]["hires"] is not \
        got["images"]["hires"] or again.uns["spatial"]["lib1"] is not got
    # expression only
    bare = raw.copy()
    bare.uns = {}
    with pytest.warns(UserWarning, match="patient"):
        expr_only = as_slide(bare, slide_id="s9", require_image=False)
    assert "hires" not in expr_only.uns["spatial"]["s9"]["images"]
    with pytest.raises(hest2sge.data.SlideError, match="no image"):
        as_slide(bare, slide_id="s9", patient_id="p")


def test_h5ad_round_trip_keeps_scverse_images_without_decoding(tmp_path, visium, monkeypatch):
    path = tmp_path / "v.h5ad"
    visium.write_h5ad(path)
    import hest2sge.data.scverse as S

    def no_decode(*args, **kwargs):
        raise AssertionError("the image was decoded again")

    monkeypatch.setattr(S, "read_thumbnail", no_decode)
    (back,) = hest2sge.data.read_h5ad(path)
    a, b = (s.uns["spatial"][slide_id_of(s)] for s in (visium, back))
    for k in ("hires", "lowres"):
        np.testing.assert_array_equal(a["images"][k], b["images"][k])
        assert a["scalefactors"][f"tissue_{k}_scalef"] == b["scalefactors"][f"tissue_{k}_scalef"]
    _check_scverse(back, _variable_gene(back), grid_neighbours=6)


@pytest.fixture
def visium(visium_root):
    return hest2sge.data.read_visium(visium_root)
