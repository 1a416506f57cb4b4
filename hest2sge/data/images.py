"""Lazy region reading of slide images: pyramidal whole-slide files and flat JPEG/PNG.

:func:`open_image` returns a :class:`WholeSlideImage` whatever the format:

* pyramidal or tiled TIFF (``.tif``/``.tiff``/``.btf``, OME-TIFF, generic tiled TIFF written by
  tifffile or libvips): tifffile + zarr; a region read decodes only the tiles (or strips) it
  touches, so the full level 0 is never held in memory;
* vendor formats (``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ``.vms``, ``.vmu``, ``.bif``,
  ``.svslide``): openslide (openslide-python + the openslide-bin wheel), else tiffslide;
* flat ``.jpg``/``.png``/... images: decoded whole with PIL on first read, as before, but with
  the decompression-bomb guard ON: a header claiming more than :func:`max_image_pixels`
  pixels raises :class:`ImageTooLargeError` before any pixel is decoded.

Coordinates of :meth:`WholeSlideImage.read_region` are pixels of the requested level; parts of
a region outside the image are white. ``mpp`` is the level-0 resolution (µm per pixel) read
from the file's metadata (openslide/tiffslide ``mpp-x``, an Aperio ``MPP =`` description, OME
``PhysicalSizeX``, TIFF resolution tags in cm or inch, a JPEG/PNG dpi) when it is present and
plausible, else None.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

#: Environment variable that sets the pixel limit of flat images (an integer, or ``none``).
MAX_PIXELS_ENV = "HEST2SGE_MAX_IMAGE_PIXELS"
#: Default pixel limit of flat (non-pyramidal) images: 250 Mpx, ~750 MB decoded as RGB.
DEFAULT_MAX_PIXELS = 250_000_000

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
#: Resolutions outside this range (µm/px) are treated as unknown (e.g. a 72 dpi default tag).
PLAUSIBLE_MPP = (0.02, 20.0)


class ImageTooLargeError(ValueError):
    """A flat image whose header claims more pixels than the decompression-bomb limit."""


def max_image_pixels(value: int | str | None = None) -> int | None:
    """The pixel limit of flat images.

    Args:
        value: An explicit limit (int; ``"none"``/``0``/negative disables it), or None to use
            the environment variable ``HEST2SGE_MAX_IMAGE_PIXELS``, else
            :data:`DEFAULT_MAX_PIXELS`.

    Returns:
        The limit in pixels, or None when the guard is disabled.
    """
    if value is None:
        value = os.environ.get(MAX_PIXELS_ENV, "").strip() or DEFAULT_MAX_PIXELS
    if isinstance(value, str):
        if value.strip().lower() in ("none", "off", "inf", "0"):
            return None
        try:
            value = int(float(value))
        except ValueError:
            raise ValueError(
                f"{MAX_PIXELS_ENV} must be an integer number of pixels or 'none', got {value!r}"
            ) from None
    value = int(value)
    return value if value > 0 else None


def _plausible(mpp: float | None) -> float | None:
    if mpp is None:
        return None
    try:
        mpp = float(mpp)
    except (TypeError, ValueError):
        return None
    lo, hi = PLAUSIBLE_MPP
    return mpp if math.isfinite(mpp) and lo <= mpp <= hi else None


def _to_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """uint8 (H, W, 3) from (H, W), (H, W, 1|3|4) arrays of any integer/float dtype."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 2-D image with samples last, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    elif arr.shape[2] != 3:
        raise ValueError(f"{name}: expected 1, 3 or 4 samples per pixel, got {arr.shape[2]}")
    if arr.dtype != np.uint8:
        if arr.dtype == np.uint16:
            arr = (arr >> 8).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating) and arr.size and float(arr.max()) <= 1.0:
            arr = np.clip(arr * 255.0, 0, 255).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


class WholeSlideImage:
    """An image read region by region, at one of its pyramid levels.

    Subclasses implement :meth:`_read` (an in-bounds region of one level) and set
    ``level_dimensions`` (width, height per level, level 0 first) and ``mpp``.
    """

    backend: str = ""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = "" if path is None else str(path)
        self.level_dimensions: list[tuple[int, int]] = []
        self.mpp: float | None = None

    # ------------------------------------------------------------------ geometry
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels (1 for flat images)."""
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        """Downsample factor of each level relative to level 0 (mean of x and y)."""
        w0, h0 = self.dimensions
        return [((w0 / w) + (h0 / h)) / 2.0 for w, h in self.level_dimensions]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level that is not coarser than ``downsample`` (level 0 if none)."""
        best = 0
        for k, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-3) and d >= self.level_downsamples[best]:
                best = k
        return best

    # ------------------------------------------------------------------ pixels
    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        raise NotImplementedError

    def read_region(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """A (h, w, 3) uint8 region whose top-left corner is (x, y) pixels of ``level``.

        Parts outside the image are white.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range 0..{self.level_count - 1}")
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w} x {h}")
        lw, lh = self.level_dimensions[level]
        sx0, sy0, sx1, sy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if sx0 == x and sy0 == y and sx1 == x + w and sy1 == y + h:
            return self._read(level, x, y, w, h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if sx1 > sx0 and sy1 > sy0:
            out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = self._read(
                level, sx0, sy0, sx1 - sx0, sy1 - sy0
            )
        return out

    def read_level(self, level: int = 0) -> np.ndarray:
        """A whole level as one array (beware: level 0 of a whole slide is many GB)."""
        w, h = self.level_dimensions[level]
        return self.read_region(0, 0, w, h, level)

    def thumbnail(self, downsample: float, band_bytes: int = 32 << 20) -> tuple[np.ndarray, float]:
        """The image reduced by at least ``downsample``, read band by band (bounded memory).

        Reads the level :meth:`best_level_for_downsample` and averages blocks of ``f x f``
        pixels of it (``f`` the smallest integer factor reaching ``downsample``),
        ``band_bytes`` of pixels at a time.

        Returns:
            (uint8 array (H', W', 3), the exact level-0 downsample of one thumbnail pixel).
        """
        level = self.best_level_for_downsample(max(float(downsample), 1.0))
        d = self.level_downsamples[level]
        f = max(int(math.ceil(downsample / d - 1e-3)), 1)  # never finer than asked
        lw, lh = self.level_dimensions[level]
        tw, th = max(lw // f, 1), max(lh // f, 1)
        out = np.empty((th, tw, 3), dtype=np.uint8)
        rows = max(int(band_bytes // (3 * tw * f * f * 4)), 1)  # thumbnail rows per band
        for r0 in range(0, th, rows):
            r1 = min(r0 + rows, th)
            band = self.read_region(0, r0 * f, tw * f, (r1 - r0) * f, level)
            if f == 1:
                out[r0:r1] = band
                continue
            acc = band.reshape(r1 - r0, f, tw, f, 3).sum(axis=(1, 3), dtype=np.uint32)
            out[r0:r1] = ((acc + (f * f) // 2) // (f * f)).astype(np.uint8)
        return out, d * f

    def close(self) -> None:
        """Release file handles and decoded pixels."""

    def __enter__(self) -> WholeSlideImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions if self.level_dimensions else (0, 0)
        return (f"{type(self).__name__}({self.path or 'in-memory'!r}, {w} x {h} px, "
                f"{self.level_count} level(s), mpp={self.mpp})")


class ArrayImage(WholeSlideImage):
    """An in-memory uint8 (H, W, 3) image (one level)."""

    backend = "array"

    def __init__(self, array: np.ndarray | None, path: str | os.PathLike | None = None,
                 mpp: float | None = None) -> None:
        super().__init__(path)
        self._array = array
        if array is not None:
            self.level_dimensions = [(int(array.shape[1]), int(array.shape[0]))]
        self.mpp = _plausible(mpp)

    @property
    def array(self) -> np.ndarray:
        """The pixels (H, W, 3) uint8."""
        assert self._array is not None
        return self._array

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.array[y : y + h, x : x + w].copy()  # never a view callers could modify

    def read_level(self, level: int = 0) -> np.ndarray:
        return self.array


class FlatImage(ArrayImage):
    """A flat JPEG/PNG/BMP/... file decoded whole on first read, behind the pixel limit.

    The header is read (and checked against the limit) when the image is opened.

    Raises:
        ImageTooLargeError: when the header claims more pixels than the limit.
    """

    backend = "pil"

    def __init__(self, path: str | os.PathLike, max_pixels: int | str | None = None) -> None:
        super().__init__(None, path)
        from PIL import Image

        limit = max_image_pixels(max_pixels)
        with pil_limit_lifted():
            with Image.open(self.path) as im:
                w, h = (int(v) for v in im.size)
                dpi = im.info.get("dpi")
        self.level_dimensions = [(w, h)]
        self.max_pixels = limit
        if limit is not None and w * h > limit:
            raise ImageTooLargeError(
                f"{self.path}: the image header says {w} x {h} = {w * h:,} pixels, over the "
                f"limit of {limit:,} pixels for flat (non-pyramidal) images, which are decoded "
                f"whole (this one would take ~{w * h * 3 / 2**30:.1f} GiB). If the file is "
                f"genuine, raise the limit with max_pixels=... or the environment variable "
                f"{MAX_PIXELS_ENV}=<pixels> (or 'none'), or convert it to a pyramidal tiled "
                "TIFF, which is read lazily"
            )
        if dpi:
            try:
                self.mpp = _plausible(25400.0 / float(dpi[0]))
            except (TypeError, ValueError, ZeroDivisionError):
                self.mpp = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            from PIL import Image

            with pil_limit_lifted():  # the size was checked against our own limit on open
                with Image.open(self.path) as im:
                    arr = np.asarray(im.convert("RGB"))
            if (arr.shape[1], arr.shape[0]) != self.dimensions:
                raise ValueError(f"{self.path}: decoded size {arr.shape[:2]} differs from header")
            self._array = arr
        return self._array

    def close(self) -> None:
        self._array = None


class pil_limit_lifted:
    """Lift PIL's own decompression-bomb check (``Image.MAX_IMAGE_PIXELS``) for a block.

    The one place hest2sge does this, and only where its own limit applies instead: reading a
    header, decoding a flat image whose header passed :func:`max_image_pixels`, or a JPEG
    decoded at a reduced scale that passed it.
    """

    def __enter__(self) -> None:
        from PIL import Image

        self._old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None

    def __exit__(self, *exc: object) -> None:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = self._old


class TiffImage(WholeSlideImage):
    """A (pyramidal, tiled or stripped) TIFF read through tifffile's zarr store."""

    backend = "tifffile"

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        import tifffile

        self._tif = tifffile.TiffFile(self.path)
        try:
            series = self._tif.series[0]
            axes = series.axes.upper()
            levels = series.levels
            self._axes = axes
            if not (axes.endswith("YXS") or axes.endswith("YX")):
                raise ValueError(f"{self.path}: unsupported TIFF axes {series.axes!r}")
            self._series = series
            self._zarr: list[Any] | None = None
            self.level_dimensions = []
            for lev in levels:
                shape = dict(zip(axes, lev.shape))
                self.level_dimensions.append((int(shape["X"]), int(shape["Y"])))
            self._lead = len(axes) - (3 if axes.endswith("YXS") else 2)
            self._planar = (not axes.endswith("YXS")) and axes[-3:-2] in ("C", "S")
            if self._planar:
                self._lead -= 1
            self.mpp = _tiff_mpp(self._tif)
            # Tiled, interleaved single-page levels are decoded tile by tile directly (faster
            # than the zarr store, with a small cache of decoded tiles); others use zarr.
            self._pages: list[Any] = []
            for lev in levels:
                page = lev.pages[0] if len(lev.pages) == 1 else None
                ok = (page is not None and self._lead == 0 and not self._planar
                      and getattr(page, "is_tiled", False) and page.planarconfig == 1
                      and page.tiledepth == 1 and page.dtype == np.uint8)
                self._pages.append(page if ok else None)
            self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
            self._lock = threading.Lock()
        except BaseException:
            self._tif.close()
            raise

    #: Decoded tiles kept (LRU); 64 tiles of 256 x 256 RGB are 12 MB.
    cache_tiles = 64

    def _tile(self, level: int, page: Any, index: int) -> np.ndarray:
        key = (level, index)
        tile = self._cache.get(key)
        if tile is not None:
            self._cache.move_to_end(key)
            return tile
        with self._lock:
            fh = self._tif.filehandle
            fh.seek(page.dataoffsets[index])
            data = fh.read(page.databytecounts[index])
        if not data:  # sparse tile: nothing stored
            tile = np.zeros((page.tilelength, page.tilewidth, page.samplesperpixel), np.uint8)
        else:
            seg = page.decode(data, index, jpegtables=page.jpegtables)[0]
            tile = np.asarray(seg).reshape(page.tilelength, page.tilewidth, -1)
        self._cache[key] = tile
        if len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return tile

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        if page is not None:
            tw, th = page.tilewidth, page.tilelength
            per_row = -(-page.imagewidth // tw)
            out = np.empty((h, w, page.samplesperpixel), dtype=np.uint8)
            for ty in range(y // th, (y + h - 1) // th + 1):
                for tx in range(x // tw, (x + w - 1) // tw + 1):
                    tile = self._tile(level, page, ty * per_row + tx)
                    y0, x0 = max(y, ty * th), max(x, tx * tw)
                    y1, x1 = min(y + h, (ty + 1) * th), min(x + w, (tx + 1) * tw)
                    out[y0 - y : y1 - y, x0 - x : x1 - x] = tile[
                        y0 - ty * th : y1 - ty * th, x0 - tx * tw : x1 - tx * tw
                    ]
            return _to_rgb(out, self.path)
        a = self._zarr_levels()[level]
        idx = (0,) * self._lead
        if self._planar:
            arr = np.asarray(a[(*idx, slice(None), slice(y, y + h), slice(x, x + w))])
            arr = np.moveaxis(arr, 0, -1)
        else:
            arr = np.asarray(a[(*idx, slice(y, y + h), slice(x, x + w))])
        return _to_rgb(arr, self.path)

    def _zarr_levels(self) -> list[Any]:
        """The levels as zarr arrays (stripped, planar or multi-page TIFFs)."""
        if self._zarr is None:
            import zarr

            z = zarr.open(self._series.aszarr(), mode="r")
            n = len(self._series.levels)
            self._zarr = [z[str(k)] for k in range(n)] if n > 1 or not hasattr(z, "shape") \
                else [z]
        return self._zarr

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()


def _tiff_mpp(tif: Any) -> float | None:
    """µm/px of level 0 from OME, Aperio or TIFF resolution metadata."""
    page = tif.pages[0]
    desc = str(getattr(page, "description", "") or "")
    if tif.is_ome and tif.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if m:
            scale = {"nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm", 1.0)
            got = _plausible(float(m.group(1)) * scale)
            if got:
                return got
    m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
    if m:
        got = _plausible(m.group(1))
        if got:
            return got
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if num and den:
            per_unit = num / den  # pixels per unit
            um = {2: 25400.0, 3: 10000.0}.get(unit)
            if um is not None and per_unit > 0:
                return _plausible(um / per_unit)
    return None


class OpenSlideImage(WholeSlideImage):
    """A whole-slide file read by openslide (or tiffslide, with the same API)."""

    def __init__(self, path: str | os.PathLike, backend: str = "openslide") -> None:
        super().__init__(path)
        if backend == "openslide":
            import openslide

            self._slide = openslide.OpenSlide(self.path)
        else:
            import tiffslide

            self._slide = tiffslide.TiffSlide(self.path)
        self.backend = backend
        self.level_dimensions = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
        self._ds = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        self.mpp = _plausible(props.get(f"{backend}.mpp-x"))

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self._ds[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        region = self._slide.read_region(loc, level, (w, h))
        arr = np.asarray(region)
        if arr.ndim == 3 and arr.shape[2] == 4:  # premultiplied RGBA: transparent -> white
            alpha = arr[..., 3:4].astype(np.float32) / 255.0
            rgb = arr[..., :3].astype(np.float32) + 255.0 * (1.0 - alpha)
            return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
        return _to_rgb(arr, self.path)

    def close(self) -> None:
        self._slide.close()


def open_image(
    path: str | os.PathLike,
    *,
    backend: str = "auto",
    max_pixels: int | str | None = None,
) -> WholeSlideImage:
    """Open an image for lazy region reading.

    Args:
        path: Image file.
        backend: ``"auto"`` (by file type), ``"tifffile"``, ``"openslide"``, ``"tiffslide"`` or
            ``"pil"`` (flat images, decoded whole).
        max_pixels: Pixel limit of flat images (see :func:`max_image_pixels`).

    Returns:
        A :class:`WholeSlideImage`.

    Raises:
        FileNotFoundError: when the file does not exist.
        ImageTooLargeError: a flat image over the pixel limit.
        ImportError: a vendor format without openslide or tiffslide installed.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {p}")
    suffix = p.suffix.lower()
    if backend == "auto":
        if suffix in TIFF_SUFFIXES:
            backend = "tifffile"
        elif suffix in OPENSLIDE_SUFFIXES or p.is_dir():
            backend = "openslide"
        else:
            backend = "pil"
    if backend == "tifffile":
        return TiffImage(p)
    if backend == "pil":
        return FlatImage(p, max_pixels=max_pixels)
    if backend in ("openslide", "tiffslide"):
        errors = []
        for name in (backend, "tiffslide") if backend == "openslide" else (backend,):
            try:
                return OpenSlideImage(p, backend=name)
            except ImportError as err:
                errors.append(f"{name}: {err}")
        raise ImportError(
            f"cannot open {p}: {'; '.join(errors)}. Install openslide-python and openslide-bin "
            "(pip install openslide-python openslide-bin) or tiffslide"
        )
    raise ValueError(
        f"backend must be 'auto', 'tifffile', 'openslide', 'tiffslide' or 'pil', got {backend!r}"
    )


def image_dimensions(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of level 0 of an image file, from its header only (no limit applies)."""
    with open_image(path, max_pixels="none") as img:
        return img.dimensions


def _halve(arr: np.ndarray) -> np.ndarray:
    """2 x 2 block mean of a (H, W, 3) uint8 array (odd edges dropped)."""
    h, w = arr.shape[0] // 2 * 2, arr.shape[1] // 2 * 2
    a = arr[0:h:2, 0:w:2].astype(np.uint16)  # four quarter-size views: no full-size temporary
    a += arr[1:h:2, 0:w:2]
    a += arr[0:h:2, 1:w:2]
    a += arr[1:h:2, 1:w:2]
    a += 2
    a //= 4
    return a.astype(np.uint8)


def write_pyramidal_tiff(
    path: str | os.PathLike,
    image: np.ndarray | None = None,
    *,
    shape: tuple[int, int] | None = None,
    region: Any = None,
    mpp: float | None = None,
    tile: int = 256,
    min_size: int = 1024,
    compression: str | None = "jpeg",
    quality: int = 90,
) -> Path:
    """Write a tiled pyramidal TIFF (levels 1/2, 1/4, ... in the main IFD chain).

    The layout (tiled, ``NewSubfileType`` = reduced image for levels > 0, resolution tags in
    pixels per centimetre) is read by tifffile, tiffslide and openslide ("generic-tiff").

    Args:
        path: Destination ``.tif`` file (written to a temporary name and renamed into place).
        image: Level 0 as an in-memory uint8 (H, W, 3) array, or None with ``shape`` and
            ``region`` to write images too large for memory tile by tile.
        shape: (height, width) of level 0 when ``image`` is None.
        region: ``region(x, y, w, h, downsample) -> (h, w, 3) uint8``: the pixels of a level
            whose downsample is ``downsample``, top-left (x, y) in that level's pixels.
        mpp: µm per pixel of level 0, written in the resolution tags (None: no unit).
        tile: Tile side in pixels (multiple of 16).
        min_size: Stop adding levels once both sides are at most this.
        compression: ``"jpeg"``, ``"zlib"``, ``None``, ... (tifffile names).
        quality: JPEG quality.

    Returns:
        ``path``.
    """
    import tifffile

    path = Path(path)
    if image is not None:
        image = _to_rgb(np.asarray(image), str(path))
        h0, w0 = image.shape[:2]
    else:
        if shape is None or region is None:
            raise ValueError("give image=, or shape= and region= to write tile by tile")
        h0, w0 = (int(v) for v in shape)
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    levels = [1]
    while max(h0, w0) // levels[-1] > min_size and min(h0, w0) // (levels[-1] * 2) >= 1:
        levels.append(levels[-1] * 2)

    def tiles(level_img: np.ndarray | None, d: int, h: int, w: int):
        for y in range(0, h, tile):
            for x in range(0, w, tile):
                th, tw = min(tile, h - y), min(tile, w - x)
                if level_img is not None:
                    t = level_img[y : y + th, x : x + tw]
                else:
                    t = region(x, y, tw, th, d)
                if (th, tw) != (tile, tile):
                    full = np.full((tile, tile, 3), 255, dtype=np.uint8)
                    full[:th, :tw] = t
                    t = full
                yield np.ascontiguousarray(t, dtype=np.uint8)

    kw: dict[str, Any] = {"photometric": "rgb", "tile": (tile, tile), "metadata": None}
    if compression == "jpeg":
        kw["compression"] = "jpeg"
        kw["compressionargs"] = {"level": int(quality)}
    elif compression is not None:
        kw["compression"] = compression
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            cur = image
            for k, d in enumerate(levels):
                h, w = h0 // d, w0 // d
                if cur is not None and k > 0:
                    cur = _halve(cur)[:h, :w]
                res = {}
                if mpp:
                    res = {"resolution": (1e4 / (mpp * d), 1e4 / (mpp * d)),
                           "resolutionunit": "CENTIMETER"}
                tif.write(tiles(cur, d, h, w), shape=(h, w, 3), dtype=np.uint8,
                          subfiletype=1 if k else 0, **res, **kw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
