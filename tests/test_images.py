"""Lazy region reading (hest2sge.data.images) and its use by SlideImage and patch cutting."""

from __future__ import annotations

import io

import numpy as np
import pytest

from hest2sge.data import images as I
from hest2sge.data import patches as P
from hest2sge.data.slide import SlideImage, make_slide


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish RGB image (compresses well, every pixel distinct enough to compare)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(img, 8, 0), 8, 1)[:h, :w]
    return np.ascontiguousarray(img)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A 2,100 x 3,000 px lossless pyramidal TIFF at 0.5 µm/px and its level-0 pixels."""
    img = _texture(2100, 3000)
    path = tmp_path_factory.mktemp("pyr") / "slide.tif"
    I.write_pyramidal_tiff(path, img, mpp=0.5, compression="zlib", min_size=400)
    return path, img


def _slide(xy, image=None, image_path=None, pixel_size_um=0.5):
    n = len(xy)
    return make_slide(
        np.ones((n, 2)), genes=["a", "b"], barcodes=[f"s{i}" for i in range(n)],
        spatial=np.asarray(xy, float), array_row=np.arange(n), array_col=np.arange(n),
        slide_id="s1", patient_id="p1", image=image, image_path=image_path,
        pixel_size_um=pixel_size_um,
    )


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "tiffslide"])
def test_pyramid_levels_mpp_and_regions(pyramid, backend):
    path, img = pyramid
    with I.open_image(path, backend=backend) as wsi:
        assert wsi.dimensions == (3000, 2100)
        assert wsi.level_count >= 3
        assert wsi.mpp == pytest.approx(0.5)
        np.testing.assert_array_equal(wsi.read_region(1000, 500, 300, 200), img[500:700, 1000:1300])
        # outside the image: white
        r = wsi.read_region(-20, 2050, 100, 100)
        assert (r[:, :20] == 255).all() and (r[50:] == 255).all()
        np.testing.assert_array_equal(r[:50, 20:], img[2050:2100, 0:80])
        # level 1 is the 2x2 block mean
        lv1 = I._halve(img)
        np.testing.assert_array_equal(wsi.read_region(200, 100, 64, 48, level=1),
                                      lv1[100:148, 200:264])
        assert wsi.best_level_for_downsample(3.0) == 1
        assert wsi.best_level_for_downsample(0.5) == 0


def test_thumbnail_is_block_mean(pyramid):
    path, img = pyramid
    with I.open_image(path) as wsi:
        thumb, d = wsi.thumbnail(4.0, band_bytes=1 << 16)
    assert d == pytest.approx(4.0)
    ref = I._halve(I._halve(img))
    assert thumb.shape == ref.shape
    assert np.abs(thumb.astype(int) - ref.astype(int)).max() <= 1


def test_patches_from_pyramid_equal_in_memory_and_read_lazily(pyramid, monkeypatch):
    path, img = pyramid
    xy = [[100.0, 100.0], [1500.5, 1000.0], [2990.0, 2090.0], [10.0, 1200.0]]
    ref = P.extract_patches(_slide(xy, image=img), 48)
    areas = []
    real = I.TiffImage._read

    def spy(self, level, x, y, w, h):
        areas.append(w * h)
        return real(self, level, x, y, w, h)

    monkeypatch.setattr(I.TiffImage, "_read", spy)
    monkeypatch.setattr(I.WholeSlideImage, "read_level",
                        lambda *a, **k: pytest.fail("patch cutting decoded a whole level"))
    s = _slide(xy, image_path=path)
    got = P.extract_patches(s, 48)
    np.testing.assert_array_equal(got, ref)
    assert areas and max(areas) <= 48 * 48
    # the image size comes from the header: bounds are checked without decoding
    img_obj = SlideImage(s)
    assert img_obj.fullres_shape == (2100.0, 3000.0)
    assert img_obj.mpp == pytest.approx(0.5)
    got2 = P.extract_patches(s, 32, pixel_size_um=1.0)  # 64 full-res px rescaled to 32
    np.testing.assert_array_equal(got2, P.extract_patches(_slide(xy, image=img), 32, 1.0))


def _forged_jpeg(width: int, height: int) -> bytes:
    """A tiny valid JPEG whose SOF header is rewritten to claim width x height pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    i = data.index(b"\xff\xc0")  # baseline SOF0: FF C0, length(2), precision(1), H(2), W(2)
    data[i + 5 : i + 7] = height.to_bytes(2, "big")
    data[i + 7 : i + 9] = width.to_bytes(2, "big")
    return bytes(data)


def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(I.MAX_PIXELS_ENV, raising=False)
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(_forged_jpeg(60000, 60000))
    assert bomb.stat().st_size < 1000
    with pytest.raises(I.ImageTooLargeError) as err:
        I.open_image(bomb)
    msg = str(err.value)
    assert "bomb.jpg" in msg and "60000 x 60000" in msg and I.MAX_PIXELS_ENV in msg
    assert "max_pixels" in msg
    # patch cutting hits the same error before allocating anything
    s = _slide([[10.0, 10.0]], image_path=bomb)
    with pytest.raises(I.ImageTooLargeError):
        P.extract_patches(s, 16)


def test_pixel_limit_parameter_and_environment(tmp_path, monkeypatch):
    from PIL import Image

    img = _texture(64, 80)
    Image.fromarray(img).save(tmp_path / "he.png")
    monkeypatch.setenv(I.MAX_PIXELS_ENV, "1000")
    with pytest.raises(I.ImageTooLargeError, match="5,120 pixels"):
        I.open_image(tmp_path / "he.png")
    with I.open_image(tmp_path / "he.png", max_pixels="none") as flat:
        np.testing.assert_array_equal(flat.read_region(0, 0, 80, 64), img)
    monkeypatch.setenv(I.MAX_PIXELS_ENV, "none")
    assert I.max_image_pixels() is None
    s = _slide([[40.0, 32.0]], image_path=tmp_path / "he.png")
    np.testing.assert_array_equal(P.extract_patches(s, 16)[0], img[24:40, 32:48])
    monkeypatch.setenv(I.MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=I.MAX_PIXELS_ENV):
        I.max_image_pixels()
    assert I.max_image_pixels(123) == 123


def test_resolution_from_metadata(tmp_path):
    import tifffile
    from PIL import Image

    img = _texture(32, 32)
    # 72 dpi default: implausible for a slide -> unknown
    Image.fromarray(img).save(tmp_path / "a.jpg", dpi=(72, 72))
    assert I.open_image(tmp_path / "a.jpg").mpp is None
    Image.fromarray(img).save(tmp_path / "b.png", dpi=(50800, 50800))
    assert I.open_image(tmp_path / "b.png").mpp == pytest.approx(0.5, rel=1e-3)
    tifffile.imwrite(tmp_path / "c.tif", img, photometric="rgb",
                     description="Aperio Image Library |MPP = 0.2520|AppMag = 40")
    assert I.open_image(tmp_path / "c.tif").mpp == pytest.approx(0.252)
    tifffile.imwrite(tmp_path / "d.tif", img, photometric="rgb", metadata=None)
    assert I.open_image(tmp_path / "d.tif").mpp is None


def test_stripped_and_grayscale_tiffs_read_through_zarr(tmp_path):
    import tifffile

    img = _texture(300, 200)
    tifffile.imwrite(tmp_path / "strips.tif", img, photometric="rgb", rowsperstrip=16,
                     compression="zlib")
    with I.open_image(tmp_path / "strips.tif") as wsi:
        assert wsi._pages == [None]  # not tiled: the zarr path
        np.testing.assert_array_equal(wsi.read_region(50, 100, 120, 90), img[100:190, 50:170])
    gray = img[..., 0]
    tifffile.imwrite(tmp_path / "gray.tif", gray, tile=(32, 32))
    with I.open_image(tmp_path / "gray.tif") as wsi:
        r = wsi.read_region(10, 20, 40, 30)
        np.testing.assert_array_equal(r, np.repeat(gray[20:50, 10:50, None], 3, axis=2))
