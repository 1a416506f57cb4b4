"""Stain normalisation (hest2sge.data.stain): Macenko and Reinhard, and the data module option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hest2sge.data.stain import StainNormalizer, as_stain_normalizer

H_VEC = np.array([0.65, 0.70, 0.29])
E_VEC = np.array([0.07, 0.99, 0.11])


def _he(h_vec, e_vec, seed=0, size=96, io=240.0) -> np.ndarray:
    """A Beer-Lambert H&E image: random smooth H and E concentrations mixed by the stain vectors."""
    rng = np.random.default_rng(seed)
    c = rng.gamma(2.0, 0.35, size=(size // 8, size // 8, 2))
    c = np.repeat(np.repeat(c, 8, 0), 8, 1)
    od = c[..., :1] * (h_vec / np.linalg.norm(h_vec)) + c[..., 1:] * (e_vec / np.linalg.norm(e_vec))
    return np.clip(io * np.exp(-od), 0, 255).astype(np.uint8)


def _stain_angle(img: np.ndarray, ref: np.ndarray) -> float:
    """Angle between the mean optical-density colours of two images (degrees)."""
    def od(a):
        v = -np.log((a.reshape(-1, 3).astype(float) + 1) / 240.0).mean(0)
        return v / np.linalg.norm(v)
    return float(np.degrees(np.arccos(np.clip(od(img) @ od(ref), -1, 1))))


def test_macenko_maps_stains_to_the_target():
    target = _he(H_VEC, E_VEC, seed=1)
    source = _he(np.array([0.45, 0.80, 0.40]), np.array([0.20, 0.95, 0.25]), seed=2)
    norm = StainNormalizer("macenko", target=target)
    out = norm(source)
    assert out.dtype == np.uint8 and out.shape == source.shape
    assert _stain_angle(out, target) < 0.5 * _stain_angle(source, target)
    # the target normalised onto itself is (nearly) unchanged
    assert np.abs(norm(target).astype(int) - target).mean() < 3.0
    # serialisation round trip reproduces the output exactly; batches equal per-patch calls
    again = StainNormalizer.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again(source), out)
    np.testing.assert_array_equal(norm(np.stack([source, target]))[0], out)
    # a blank patch cannot be estimated: returned unchanged and counted
    blank = np.full((32, 32, 3), 250, np.uint8)
    n0 = norm.n_unchanged
    np.testing.assert_array_equal(norm(blank), blank)
    assert norm.n_unchanged == n0 + 1


def test_reinhard_matches_lab_statistics():
    from skimage.color import rgb2lab

    target = _he(H_VEC, E_VEC, seed=3)
    source = np.clip(_he(H_VEC, E_VEC, seed=4).astype(int) * 0.8 + 30, 0, 255).astype(np.uint8)
    norm = StainNormalizer("reinhard", target=target)
    out = norm(source)
    t_lab, o_lab, s_lab = (rgb2lab(a).reshape(-1, 3) for a in (target, out, source))
    assert np.abs(o_lab.mean(0) - t_lab.mean(0)).max() < 0.25 * np.abs(
        s_lab.mean(0) - t_lab.mean(0)).max()
    np.testing.assert_array_equal(StainNormalizer.from_dict(norm.to_dict())(source), out)
    with pytest.raises(ValueError, match="target"):
        StainNormalizer("reinhard")
    with pytest.raises(ValueError, match="method"):
        StainNormalizer("vahadane")
    assert as_stain_normalizer(None) is None


def _slide(sid: str, patient: str, seed: int):
    from hest2sge.data.slide import make_slide

    xy = np.array([[24.0, 24.0], [72.0, 24.0], [24.0, 72.0], [72.0, 72.0]])
    rng = np.random.default_rng(seed)
    return make_slide(rng.poisson(3.0, size=(4, 5)), [f"G{i}" for i in range(5)],
                      [f"{sid}_{i}" for i in range(4)], xy, [0, 0, 1, 1], [0, 1, 0, 1],
                      sid, patient, image=_he(H_VEC, E_VEC, seed=seed), pixel_size_um=1.0)


def test_data_module_applies_the_same_normalisation():
    from hest2sge.data import SpotDataModule

    slides = [_slide("A1", "A", 5), _slide("B1", "B", 6)]
    split = {"train": ["A1"], "val": ["B1"], "test": []}
    norm = StainNormalizer("macenko", target=_he(np.array([0.5, 0.8, 0.35]), E_VEC, seed=7))
    kw = dict(genes="all", patch_size=32, augment=False, batch_size=4)
    dm = SpotDataModule(slides, split, stain_norm=norm.to_dict(), **kw)
    dm.configure_for(None)
    dm.setup("fit")
    plain = SpotDataModule(slides, split, **kw)
    plain.configure_for(None)
    plain.setup("fit")
    raw = plain.tables["A1"].patches.load()
    got = next(iter(dm.train_dataloader()))
    order = got["spot"].numpy()
    expected = norm(raw[order])
    assert isinstance(got["img"], torch.Tensor)
    np.testing.assert_array_equal(got["img"].permute(0, 2, 3, 1).numpy(), expected)
    assert np.abs(expected.astype(int) - raw[order]).mean() > 2.0
