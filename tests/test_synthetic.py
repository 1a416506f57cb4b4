"""Tests of the synthetic slides: the data contract, the count model and learnability."""

from __future__ import annotations

import numpy as np
import pytest

from hest2sge.data.slide import validate_slide
from hest2sge.data.synthetic import FEATURES, synthetic_slide, synthetic_slides

N_PATIENTS, PER_PATIENT, GRID, N_GENES = 4, 2, (12, 12), 50


@pytest.fixture(scope="module")
def slides():
    return synthetic_slides(
        n_patients=N_PATIENTS, slides_per_patient=PER_PATIENT, grid=GRID, n_genes=N_GENES, seed=0
    )


def _dense(x) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)


def _log_norm(adata) -> np.ndarray:
    counts = _dense(adata.X)
    total = counts.sum(1, keepdims=True)
    return np.log1p(1e4 * counts / np.maximum(total, 1.0))


def _image(adata) -> np.ndarray:
    sid = adata.obs["slide_id"].iloc[0]
    return adata.uns["spatial"][sid]["images"]["fullres"]


def _pcc_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson per column; NaN where a column is constant."""
    p = pred - pred.mean(0)
    t = truth - truth.mean(0)
    den = np.sqrt((p**2).sum(0) * (t**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (p * t).sum(0) / den, np.nan)


def _morans_i(values: np.ndarray, xy: np.ndarray, radius: float) -> float:
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    w = ((d > 0) & (d <= radius)).astype(float)
    z = values - values.mean()
    return float(len(z) / w.sum() * (z @ w @ z) / (z @ z))


# ------------------------------------------------------------------------------------------------
# contract


def test_contract_shapes_and_ids(slides):
    assert len(slides) == N_PATIENTS * PER_PATIENT
    expected = [f"P{p}_S{s}" for p in range(N_PATIENTS) for s in range(PER_PATIENT)]
    assert [a.obs["slide_id"].iloc[0] for a in slides] == expected
    for a in slides:
        validate_slide(a)
        sid = a.obs["slide_id"].iloc[0]
        assert a.obs["patient_id"].iloc[0] == sid.split("_")[0]
        assert a.shape == (GRID[0] * GRID[1], N_GENES)
        assert a.obs_names.is_unique
        img = _image(a)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.shape[0] * img.shape[1] <= 1000 * 1000  # kept small for speed
        xy = np.asarray(a.obsm["spatial"])
        # a 224 px patch around every spot stays inside the image (white margin)
        assert (xy - 112 >= 0).all() and (xy[:, 0] + 112 <= img.shape[1]).all()
        assert (xy[:, 1] + 112 <= img.shape[0]).all()
        entry = a.uns["spatial"][sid]
        assert entry["pixel_size_um"] == 1.0
        assert entry["scalefactors"]["spot_diameter_fullres"] > 0
        assert set(FEATURES) <= set(a.obs.columns)
        assert a.obsm["true_log_mu"].shape == a.shape
        assert a.var["image_dependent"].dtype == bool
        assert a.var["image_dependent"].sum() == N_GENES // 2
        # the image is mostly tissue with white margin: not blank, not saturated
        gray = img.mean(2)
        assert 0.1 < (gray > 220).mean() < 0.6
        assert (gray < 150).mean() > 0.01
    # the same genes and the same image genes on every slide
    ref = slides[0].var
    for a in slides[1:]:
        assert list(a.var_names) == list(ref.index)
        assert (a.var["image_dependent"].to_numpy() == ref["image_dependent"].to_numpy()).all()


def test_square_grid_and_hex_layout():
    sq = synthetic_slide(grid=(3, 4), n_genes=6, seed=1)
    assert sorted(set(sq.obs["array_col"])) == [0, 1, 2, 3]
    hx = synthetic_slide(grid=(4, 5), n_genes=6, layout="hex", seed=1)
    validate_slide(hx)
    row, col = hx.obs["array_row"].to_numpy(), hx.obs["array_col"].to_numpy()
    assert ((col - row) % 2 == 0).all() and col.max() == 2 * 5 - 1
    xy = np.asarray(hx.obsm["spatial"])
    d = np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1))
    nearest = np.where(d > 0, d, np.inf).min(1)
    np.testing.assert_allclose(nearest, 64.0, rtol=1e-6)  # equilateral hexagonal packing


def test_deterministic_and_seed_dependent(slides):
    again = synthetic_slide(patient=1, section=1, seed=0)  # same as slides[3]
    ref = slides[3]
    np.testing.assert_array_equal(_dense(again.X), _dense(ref.X))
    np.testing.assert_array_equal(_image(again), _image(ref))
    np.testing.assert_array_equal(again.obsm["spatial"], ref.obsm["spatial"])
    other = synthetic_slide(patient=1, section=1, seed=1)
    assert not np.array_equal(_dense(other.X), _dense(ref.X))
    assert not np.array_equal(_image(other), _image(ref))
    # sections of one patient differ from each other
    assert not np.array_equal(_image(slides[0]), _image(slides[1]))


def test_counts_overdispersed_and_zero_inflated(slides):
    for a in slides:
        x = _dense(a.X)
        assert (x >= 0).all() and np.array_equal(x, np.round(x))
        mean, var = x.mean(0), x.var(0)
        expressed = mean > 0.5
        assert (var[expressed] > mean[expressed]).mean() > 0.9
        # zeros beyond what a Poisson, and even the negative binomial, with the true means give
        mu = np.exp(a.obsm["true_log_mu"].astype(np.float64))
        theta = a.var["dispersion"].to_numpy()
        poisson_zeros = np.exp(-mu).mean(0)
        nb_zeros = ((theta / (theta + mu)) ** theta).mean(0)
        observed_zeros = (x == 0).mean(0)
        assert (observed_zeros > poisson_zeros + 0.02).mean() > 0.5
        inflated = a.var["zero_inflation"].to_numpy() > 0.1
        excess = observed_zeros[inflated] - nb_zeros[inflated]
        assert inflated.sum() >= 5 and excess.mean() > 0.05
    # some genes are sparse, some dense
    allx = np.concatenate([_dense(a.X) for a in slides])
    zero_frac = (allx == 0).mean(0)
    assert zero_frac.max() > 0.6 and zero_frac.min() < 0.1


def test_spatial_autocorrelation(slides):
    var = slides[0].var
    mask = (~var["image_dependent"]) & (var["base_mean"] > 3.0)
    gene = var.loc[mask, "spatial_sd"].idxmax()
    j = list(var.index).index(gene)
    rng = np.random.default_rng(0)
    values, null = [], []
    for a in slides:
        y, xy = _log_norm(a)[:, j], np.asarray(a.obsm["spatial"])
        values.append(_morans_i(y, xy, 1.5 * 64))
        null.append(_morans_i(rng.permutation(y), xy, 1.5 * 64))
    assert np.mean(values) > 0.15, values  # observed ~0.2-0.3; null ~0 +- 0.02 over 8 slides
    assert abs(np.mean(null)) < 0.05


def test_patient_effect(slides):
    offsets = np.stack([a.var["patient_offset"].to_numpy() for a in slides[::PER_PATIENT]])
    j = int(np.argmax(offsets.max(0) - offsets.min(0)))
    slide_means = np.array([_log_norm(a)[:, j].mean() for a in slides]).reshape(
        N_PATIENTS, PER_PATIENT
    )
    within = slide_means.var(1, ddof=1).mean()
    between = slide_means.mean(1).var(ddof=1) * PER_PATIENT
    assert between / within > 10.0, slide_means


# ------------------------------------------------------------------------------------------------
# learnability


def _patch_features(adata, patch: int = 64) -> np.ndarray:
    img = _image(adata).astype(np.float64)
    half = patch // 2
    feats = []
    for x, y in np.round(np.asarray(adata.obsm["spatial"])).astype(int):
        p = img[y - half : y + half, x - half : x + half]
        gray = p.mean(2)
        od = -np.log((p + 1.0) / 256.0)
        feats.append(
            np.concatenate(
                [
                    p.reshape(-1, 3).mean(0),
                    p.reshape(-1, 3).std(0),
                    od.reshape(-1, 3).mean(0),
                    [(gray < 140).mean(), (gray < 100).mean(), (gray > 220).mean()],
                ]
            )
        )
    return np.asarray(feats)


def _held_out_pcc(slides, shuffle: bool = False) -> np.ndarray:
    """Leave-one-patient-out Ridge; mean over held-out slides of the per-gene PCC."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = [_patch_features(a) for a in slides]
    targets = [_log_norm(a) for a in slides]
    patients = [a.obs["patient_id"].iloc[0] for a in slides]
    rng = np.random.default_rng(0)
    if shuffle:
        feats = [f[rng.permutation(len(f))] for f in feats]
    pccs = []
    for held in sorted(set(patients)):
        train = [i for i, p in enumerate(patients) if p != held]
        model = make_pipeline(StandardScaler(), Ridge(alpha=1.0))
        model.fit(
            np.concatenate([feats[i] for i in train]), np.concatenate([targets[i] for i in train])
        )
        for i, p in enumerate(patients):
            if p == held:
                pccs.append(_pcc_per_gene(model.predict(feats[i]), targets[i]))
    return np.nanmean(np.stack(pccs), axis=0)


def test_image_genes_learnable_from_patches(slides):
    img = slides[0].var["image_dependent"].to_numpy()
    pcc = _held_out_pcc(slides)
    on_image, off_image = float(np.nanmean(pcc[img])), float(np.nanmean(pcc[~img]))
    print(f"held-out PCC: image genes {on_image:.3f}, image-independent genes {off_image:.3f}")
    assert on_image > 0.3
    assert abs(off_image) < 0.1
    shuffled = _held_out_pcc(slides, shuffle=True)
    on_shuffled = float(np.nanmean(shuffled[img]))
    print(f"held-out PCC with shuffled images: image genes {on_shuffled:.3f}")
    assert on_shuffled < 0.1
