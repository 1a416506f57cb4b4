"""Patch extraction, the HDF5 patch cache and PatchStore (small in-memory slides)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hest2sge.data import patches as P
from hest2sge.data.slide import SlideError, SlideImage, make_slide

PS = 16  # patch size used throughout


def _slide(xy=None, slide_id="s1", image=None, pixel_size_um=0.5, image_path=None):
    rng = np.random.default_rng(0)
    if image is None and image_path is None:
        image = rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    if xy is None:
        xy = np.array([[20.0, 20.0], [40.0, 20.0], [60.0, 20.0], [20.0, 40.0], [40.0, 40.0]])
    n = len(xy)
    return make_slide(
        rng.poisson(2.0, size=(n, 4)),
        genes=["g1", "g2", "g3", "g4"],
        barcodes=[f"spot{i}" for i in range(n)],
        spatial=xy,
        array_row=np.arange(n),
        array_col=np.arange(n),
        slide_id=slide_id,
        patient_id="p1",
        image=image,
        image_path=image_path,
        pixel_size_um=pixel_size_um,
    )


def _crop(img, x, y, size=PS):
    x0, y0 = int(np.floor(x - size / 2 + 0.5)), int(np.floor(y - size / 2 + 0.5))
    return img[y0 : y0 + size, x0 : x0 + size]


def _image(slide):
    return slide.uns["spatial"][str(slide.obs["slide_id"].iloc[0])]["images"]["fullres"]


def test_patch_extent():
    s = _slide(pixel_size_um=0.5)
    assert P.patch_extent(s, 224) == 224.0
    assert P.patch_extent(s, 224, pixel_size_um=1.0) == pytest.approx(448.0)
    with pytest.raises(SlideError, match="pixel size"):
        P.patch_extent(_slide(pixel_size_um=None), 224, pixel_size_um=1.0)


def test_extract_matches_crop_and_rescales():
    s = _slide()
    img = _image(s)
    out = P.extract_patches(s, PS)
    assert out.shape == (5, PS, PS, 3) and out.dtype == np.uint8
    for i, (x, y) in enumerate(s.obsm["spatial"]):
        np.testing.assert_array_equal(out[i], _crop(img, x, y))
    # 0.25 um/px on a 0.5 um/px slide: half the extent, upsampled to PS
    half = P.extract_patches(s, PS, pixel_size_um=0.25)
    assert half.shape == (5, PS, PS, 3)
    assert not np.array_equal(half[0], out[0])


def test_white_padding_at_borders():
    s = _slide(xy=np.array([[2.0, 3.0], [79.0, 63.0]]))
    img = _image(s)
    out = P.extract_patches(s, PS)
    # spot at (2, 3): crop starts at (-6, -5): 6 white columns, 5 white rows
    assert (out[0][:5] == 255).all() and (out[0][:, :6] == 255).all()
    np.testing.assert_array_equal(out[0][5:, 6:], img[: PS - 5, : PS - 6])
    # spot at the bottom-right corner: right/bottom parts white
    assert (out[1][-7:] == 255).all() and (out[1][:, -7:] == 255).all()


def test_spot_outside_image_names_barcode():
    s = _slide(xy=np.array([[20.0, 20.0], [-5.0, 30.0]]))
    with pytest.raises(SlideError, match=r"spot1.*-5\.0.*80 x 64"):
        P.extract_patches(s, PS)
    out = P.extract_patches(s, PS, check_bounds=False)
    assert (out[1][:, :3] == 255).all()


def test_in_memory_store_indexing():
    s = _slide()
    store = P.cached_patches(s, PS)
    full = P.extract_patches(s, PS)
    assert store.in_memory and len(store) == 5 and store.patch_size == PS
    assert list(store.barcodes) == list(s.obs_names)
    np.testing.assert_array_equal(store.coords, s.obsm["spatial"])
    np.testing.assert_array_equal(store[2], full[2])
    np.testing.assert_array_equal(store[-1], full[4])
    np.testing.assert_array_equal(store.get_many([3, 0, 3]), full[[3, 0, 3]])
    with pytest.raises(IndexError):
        store[5]


def test_cache_hit_does_not_reextract(tmp_path, monkeypatch):
    s = _slide()
    first = P.cached_patches(s, PS, cache_dir=tmp_path)
    assert not first.in_memory and first.path.name == "s1_p16_native.h5"
    data = first.load()

    def boom(*args, **kwargs):
        raise AssertionError("patches re-extracted despite a valid cache")

    monkeypatch.setattr(P, "extract_patches", boom)
    second = P.cached_patches(s, PS, cache_dir=tmp_path)
    np.testing.assert_array_equal(second.load(), data)
    np.testing.assert_array_equal(second.get_many([4, 1, 1]), data[[4, 1, 1]])
    np.testing.assert_array_equal(data, P.PatchStore(s.obs_names, s.obsm["spatial"], PS,
                                                     images=data).load())
    with h5py.File(first.path) as f:
        assert f.attrs["complete"] and f.attrs["patch_size"] == PS and f.attrs["slide_id"] == "s1"
        assert f["barcode"][0] == b"spot0" and f["coords"].shape == (5, 2)


def test_cache_invalidated_when_inputs_change(tmp_path, monkeypatch):
    s = _slide()
    P.cached_patches(s, PS, cache_dir=tmp_path)
    calls = []
    real = P.extract_patches

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(P, "extract_patches", counting)
    moved = s.copy()
    moved.obsm["spatial"] = moved.obsm["spatial"] + np.array([[3.0, 0.0]])
    store = P.cached_patches(moved, PS, cache_dir=tmp_path)
    assert len(calls) == 1
    np.testing.assert_array_equal(store[0], _crop(_image(s), 23.0, 20.0))
    P.cached_patches(moved, PS, cache_dir=tmp_path)
    assert len(calls) == 1  # now cached
    # another image under the same slide id
    other = _slide(image=np.zeros((64, 80, 3), dtype=np.uint8))
    assert P.cached_patches(other, PS, cache_dir=tmp_path)[0].max() == 0
    assert len(calls) == 2
    # pixel size is part of the file name
    st = P.cached_patches(s, PS, pixel_size_um=1.0, cache_dir=tmp_path)
    assert st.path.name == "s1_p16_1um.h5" and len(calls) == 3


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    s = _slide()
    real = P.extract_patches

    def fail_midway(slide, patch_size, pixel_size_um=None, check_bounds=True, *, out=None,
                    image=None):
        out[0] = np.zeros((PS, PS, 3), dtype=np.uint8)  # some data already written
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(P, "extract_patches", fail_midway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        P.cached_patches(s, PS, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(P, "extract_patches", real)
    store = P.cached_patches(s, PS, cache_dir=tmp_path)
    np.testing.assert_array_equal(store.load(), real(s, PS))


def test_stale_temp_file_is_never_trusted(tmp_path):
    s = _slide()
    good = P.cached_patches(s, PS, cache_dir=tmp_path)
    expected = good.load()
    good.close()
    final = good.path
    # a dead writer's temp file holding wrong patches, and no final file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale = P._temp_path(final)
    stale = stale.with_name(stale.name.replace(f".{os.getpid()}.", f".{pid}."))
    final.rename(stale)
    with h5py.File(stale, "r+") as f:
        f["img"][...] = 0
    store = P.cached_patches(s, PS, cache_dir=tmp_path)
    np.testing.assert_array_equal(store.load(), expected)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]


def test_incomplete_file_is_rebuilt(tmp_path):
    s = _slide()
    store = P.cached_patches(s, PS, cache_dir=tmp_path)
    expected = store.load()
    store.close()
    with h5py.File(store.path, "r+") as f:
        f.attrs["complete"] = False
        f["img"][...] = 0
    again = P.cached_patches(s, PS, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.load(), expected)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_rebuilt_with_warning(tmp_path, damage):
    s = _slide()
    store = P.cached_patches(s, PS, cache_dir=tmp_path)
    expected = store.load()
    store.close()
    raw = store.path.read_bytes()
    store.path.write_bytes(b"not an hdf5 file" * 10 if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        again = P.cached_patches(s, PS, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.load(), expected)


def test_store_pickles_without_handle(tmp_path):
    s = _slide()
    store = P.cached_patches(s, PS, cache_dir=tmp_path)
    first = store[1]  # opens the file in this process
    assert store._h5 is not None
    clone = pickle.loads(pickle.dumps(store))
    assert clone._h5 is None
    np.testing.assert_array_equal(clone[1], first)
    np.testing.assert_array_equal(clone.get_many([0, 4]), store.get_many([0, 4]))
    clone.close()
    store.close()


def test_store_in_forked_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    s = _slide()
    store = P.cached_patches(s, PS, cache_dir=tmp_path)
    expected = store.load()  # handle open in the parent before the fork

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(store)

        def __getitem__(self, i):
            return torch.from_numpy(np.ascontiguousarray(store[i])), os.getpid()

    loader = torch.utils.data.DataLoader(
        DS(), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )
    imgs, pids = [], set()
    for img, pid in loader:
        imgs.append(img.numpy())
        pids.update(int(p) for p in pid)
    np.testing.assert_array_equal(np.concatenate(imgs), expected)
    assert os.getpid() not in pids
    store.close()


def test_file_backed_image_is_released(tmp_path, monkeypatch):
    from PIL import Image

    img = np.random.default_rng(1).integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "he.png")
    s = _slide(image_path=tmp_path / "he.png")
    released = []
    real = SlideImage.release

    def spy(self):
        released.append(self._array is not None)
        real(self)

    monkeypatch.setattr(SlideImage, "release", spy)
    store = P.cached_patches(s, PS, cache_dir=tmp_path / "cache")
    assert released == [True]
    assert "fullres" not in s.uns["spatial"]["s1"]["images"]  # only scverse thumbnails
    np.testing.assert_array_equal(store[0], _crop(img, 20.0, 20.0))
    # touching the image file invalidates the cache
    Image.fromarray(255 - img).save(tmp_path / "he.png")
    st = os.stat(tmp_path / "he.png")
    os.utime(tmp_path / "he.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(
        P.cached_patches(s, PS, cache_dir=tmp_path / "cache")[0], _crop(255 - img, 20.0, 20.0)
    )
