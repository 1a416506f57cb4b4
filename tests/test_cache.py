"""The one cache layer (hest2sge.cache): corruption cases, content fingerprints, atomic writes,
and extract_features on top of it."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from hest2sge import cache as C
from hest2sge.data import patches as P
from hest2sge.data.slide import make_slide

PS = 16


def _slide(image=None, image_path=None, slide_id="s1"):
    rng = np.random.default_rng(0)
    if image is None and image_path is None:
        image = rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    xy = np.array([[20.0, 20.0], [40.0, 20.0], [60.0, 20.0], [20.0, 40.0], [40.0, 40.0]])
    return make_slide(rng.poisson(2.0, size=(5, 3)), genes=["a", "b", "c"],
                      barcodes=[f"spot{i}" for i in range(5)], spatial=xy,
                      array_row=np.arange(5), array_col=np.arange(5), slide_id=slide_id,
                      patient_id="p", image=image, image_path=image_path, pixel_size_um=0.5)


def _overwrite_dataset_bytes(path, name, rng):
    """Write random bytes over the first stored chunk of a dataset, in place."""
    with h5py.File(path, "r") as f:
        dset = f[name]
        if dset.chunks is None:
            offset, nbytes = dset.id.get_offset(), dset.id.get_storage_size()
        else:
            info = dset.id.get_chunk_info(0)
            offset, nbytes = info.byte_offset, info.size
    with open(path, "r+b") as fh:
        fh.seek(offset + nbytes // 3)
        fh.write(rng.integers(0, 256, size=min(64, nbytes // 3), dtype=np.uint8).tobytes())


def test_random_bytes_inside_patch_cache_are_never_served(tmp_path):
    s = _slide()
    store = P.cached_patches(s, PS, cache_dir=tmp_path)
    expected = store.load()
    store.close()
    _overwrite_dataset_bytes(store.path, "img", np.random.default_rng(1))
    with h5py.File(store.path, "r") as f:  # the damage is real: the stored patch changed
        assert not np.array_equal(f["img"][0], expected[0])
    with pytest.warns(UserWarning, match="corrupted.*'img'.*checksum"):
        again = P.cached_patches(s, PS, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.load(), expected)
    again.close()
    # rebuilt file is intact: no warning, no rebuild
    with h5py.File(again.path, "r") as f:
        assert C.dataset_checksum(f["img"]) == f["img"].attrs["blake2b"]


def test_damaged_coordinates_and_missing_checksum_are_rebuilt(tmp_path):
    s = _slide()
    store = P.cached_patches(s, PS, cache_dir=tmp_path)
    expected = store.load()
    store.close()
    with h5py.File(store.path, "r+") as f:
        f["coords"][0, 0] = 999.0  # value changed in place, attributes untouched
    with pytest.warns(UserWarning, match="'coords'"):
        P.cached_patches(s, PS, cache_dir=tmp_path).close()
    with h5py.File(store.path, "r+") as f:
        del f["barcode"].attrs["blake2b"]
    with pytest.warns(UserWarning, match="'barcode'"):
        again = P.cached_patches(s, PS, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.load(), expected)


def test_image_changed_with_same_size_and_mtime_is_recut(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    img_path = tmp_path / "he.bmp"  # uncompressed: an edit keeps the file size
    arr = rng.integers(0, 255, size=(64, 80, 3), dtype=np.uint8)
    Image.fromarray(arr).save(img_path)
    s = _slide(image_path=img_path)
    cache_dir = tmp_path / "cache"
    first = P.cached_patches(s, PS, cache_dir=cache_dir).load()
    st = img_path.stat()
    arr[10:30, 10:30] = 0
    Image.fromarray(arr).save(img_path)
    os.utime(img_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert img_path.stat().st_size == st.st_size
    assert img_path.stat().st_mtime_ns == st.st_mtime_ns
    second = P.cached_patches(s, PS, cache_dir=cache_dir).load()
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, P.extract_patches(s, PS))


def test_file_fingerprint_samples_large_files(tmp_path, monkeypatch):
    path = tmp_path / "big.bin"
    data = np.random.default_rng(3).integers(0, 256, size=3 << 20, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    monkeypatch.setattr(C, "FULL_HASH_BYTES", 1 << 20)  # force sampling
    before = C.file_fingerprint(path)
    st = path.stat()
    with open(path, "r+b") as fh:  # one byte inside the first sampled block
        fh.seek(10)
        fh.write(bytes([(int(data[10]) + 1) % 256]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = C.file_fingerprint(path)
    assert before["size"] == after["size"] and before["mtime_ns"] == after["mtime_ns"]
    assert before["content"] != after["content"]


def test_load_cached_builds_once_and_rebuilds_corrupted(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}

    path = tmp_path / "x.h5"
    out = C.load_cached(path, kind="demo", fingerprint="fp1", build=build)
    again = C.load_cached(path, kind="demo", fingerprint="fp1", build=build)
    assert len(calls) == 1
    np.testing.assert_array_equal(out["x"], again["x"])
    C.load_cached(path, kind="demo", fingerprint="fp2", build=build)  # inputs changed
    assert len(calls) == 2
    C.load_cached(path, kind="other", fingerprint="fp2", build=build)  # other kind
    assert len(calls) == 3
    _overwrite_dataset_bytes(path, "x", np.random.default_rng(4))
    with pytest.warns(UserWarning, match="corrupted"):
        fixed = C.load_cached(path, kind="other", fingerprint="fp2", build=build)
    assert len(calls) == 4
    np.testing.assert_array_equal(fixed["x"], out["x"])


def test_write_cache_failure_leaves_nothing(tmp_path):
    def fill(d):
        d["x"][0] = 1
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        C.write_cache(tmp_path / "y.h5", kind="demo", fingerprint="f",
                      empty={"x": ((4,), np.int64, None)}, fill=fill)
    assert list(tmp_path.iterdir()) == []


def test_extract_features_caches_and_tracks_encoder(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    slides = [_slide(slide_id="s1"), _slide(slide_id="s2")]
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    from hest2sge.data import features as F

    feats = F.extract_features(enc, slides, tmp_path, patch_size=PS, progress=True)
    assert set(feats) == {"s1", "s2"} and feats["s1"].shape == (5, 4)
    assert "features s1" in capsys.readouterr().err  # tqdm bar on stderr
    with torch.no_grad():
        direct = enc(torch.from_numpy(P.extract_patches(slides[0], PS)).permute(0, 3, 1, 2)
                     .float() / 255.0).numpy()
    np.testing.assert_allclose(feats["s1"], direct, rtol=1e-5, atol=1e-6)
    files = sorted(tmp_path.glob("*.feat.h5"))
    assert len(files) == 2
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = F.extract_features(enc, slides, tmp_path, patch_size=PS)
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # served from the cache
    np.testing.assert_array_equal(again["s2"], feats["s2"])
    with torch.no_grad():
        enc[0].bias.add_(1.0)  # other weights: other fingerprint, recomputed
    changed = F.extract_features(enc, slides[:1], tmp_path, patch_size=PS)
    assert not np.allclose(changed["s1"], feats["s1"])
    assert len(list(tmp_path.glob("*.feat.h5"))) == 3


def test_verified_once_per_process_until_the_file_changes(tmp_path, monkeypatch):
    s = _slide()
    P.cached_patches(s, PS, cache_dir=tmp_path).close()
    calls = []
    real = C.dataset_checksum

    def counting(dset):
        calls.append(dset.name)
        return real(dset)

    monkeypatch.setattr(C, "dataset_checksum", counting)
    store = P.cached_patches(s, PS, cache_dir=tmp_path)  # first open: every dataset hashed
    assert sorted(calls) == ["/barcode", "/coords", "/img"]
    expected = store.load()
    store.close()
    calls.clear()
    P.cached_patches(s, PS, cache_dir=tmp_path).close()
    assert calls == []  # same file identity: not hashed again
    st = store.path.stat()
    _overwrite_dataset_bytes(store.path, "img", np.random.default_rng(7))
    os.utime(store.path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored, ctime moved
    with pytest.warns(UserWarning, match="checksum"):
        again = P.cached_patches(s, PS, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.load(), expected)
