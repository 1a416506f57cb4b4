"""Patch extraction around spot centres and the HDF5 patch cache.

Patches are cut once per (slide, patch size, pixel size) and stored in the HEST-1k patch layout:
``img`` (N x P x P x 3 uint8), ``coords`` (N x 2, spot centres (x, y) in full-resolution
pixels) and ``barcode`` (N, bytes), through the one cache layer :mod:`hest2sge.cache`
(fingerprinted, written atomically, a checksum per dataset verified on open: a damaged file is
rebuilt with a warning, never served).

:class:`PatchStore` gives indexed access to the patches of one slide, from memory or from the
cache file; it opens the file lazily in each process, so it can be handed to DataLoader
workers.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hest2sge.data.slide import SlideError, SlideImage, slide_id_of, spatial_entry

log = logging.getLogger(__name__)

#: ``patch_format`` attribute of patch cache files written by hest2sge.
PATCH_FORMAT = CACHE_FORMAT = "hest2sge.patches"
#: Bump when the way patches are cut changes: older caches are rebuilt.
CACHE_VERSION = 1
_BLOCK = 64


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
def slide_pixel_size(slide) -> float:
    """Micrometres per full-resolution pixel of a slide (NaN when unknown)."""
    try:
        value = float(spatial_entry(slide).get("pixel_size_um", float("nan")))
    except (TypeError, ValueError):
        return float("nan")
    return value if math.isfinite(value) and value > 0 else float("nan")


def patch_extent(slide, patch_size: int, pixel_size_um: float | None = None) -> float:
    """Side of a patch in full-resolution pixels of ``slide``.

    Args:
        slide: A slide.
        patch_size: Side of the output patch in pixels.
        pixel_size_um: µm per output pixel; None cuts at the native resolution (the patch
            covers ``patch_size`` full-resolution pixels, as in the benchmark paper).

    Returns:
        ``patch_size`` when ``pixel_size_um`` is None, else
        ``patch_size * pixel_size_um / slide pixel size``.

    Raises:
        SlideError: when a pixel size is requested and the slide's pixel size is unknown.
    """
    if int(patch_size) <= 0:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    if pixel_size_um is None:
        return float(patch_size)
    if not (math.isfinite(float(pixel_size_um)) and float(pixel_size_um) > 0):
        raise ValueError(f"pixel_size_um must be positive, got {pixel_size_um!r}")
    native = slide_pixel_size(slide)
    if not math.isfinite(native):
        raise SlideError(
            f"slide {slide_id_of(slide)!r} has no known pixel size "
            "(uns['spatial'][slide_id]['pixel_size_um']); set it, or cut patches at native "
            "resolution with pixel_size_um=None"
        )
    return float(patch_size) * float(pixel_size_um) / native


def check_spots_in_image(slide, image: SlideImage | None = None) -> None:
    """Raise when a spot centre lies outside the slide image.

    Args:
        slide: A slide.
        image: Its already opened image (default: opened here).

    Raises:
        SlideError: naming the first offending spot, its coordinates and the image size.
    """
    img = image if image is not None else SlideImage(slide)
    h, w = img.fullres_shape
    xy = np.asarray(slide.obsm["spatial"], dtype=np.float64)
    bad = np.where(
        ~((xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h))
    )[0]
    if len(bad):
        i = int(bad[0])
        src = img.path or "in-memory image"
        more = f" (and {len(bad) - 1} more spots)" if len(bad) > 1 else ""
        raise SlideError(
            f"slide {img.slide_id!r}: spot {slide.obs_names[i]!r} at (x={xy[i, 0]:.1f}, "
            f"y={xy[i, 1]:.1f}) full-res px lies outside the image ({w:.0f} x {h:.0f} "
            f"full-res px, image_scale {img.scale:g}, {src}){more}; obsm['spatial'] must be "
            "(x, y) in full-resolution pixels of this image"
        )


def extract_patches(
    slide,
    patch_size: int = 224,
    pixel_size_um: float | None = None,
    check_bounds: bool = True,
    *,
    out: Any = None,
    image: SlideImage | None = None,
) -> Any:
    """Cut a square patch around every spot of a slide.

    Parts of a patch outside the image are white. The slide image is released afterwards
    (unless ``image`` was passed in).

    Args:
        slide: A slide with an image.
        patch_size: Side of the output patches in pixels.
        pixel_size_um: µm per output pixel (None: native resolution, see :func:`patch_extent`).
        check_bounds: Raise when a spot centre lies outside the image.
        out: Optional array-like (numpy array or h5py dataset) of shape (N, P, P, 3) to fill.
        image: An already opened :class:`SlideImage` of the slide.

    Returns:
        uint8 array (N, P, P, 3) (or ``out``).

    Raises:
        SlideError: when a spot centre lies outside the image (with ``check_bounds``).
    """
    p = int(patch_size)
    extent = patch_extent(slide, p, pixel_size_um)
    xy = np.asarray(slide.obsm["spatial"], dtype=np.float64)
    n = len(xy)
    own = image is None
    img = SlideImage(slide) if own else image
    try:
        if check_bounds:
            check_spots_in_image(slide, img)
        if out is None:
            out = np.empty((n, p, p, 3), dtype=np.uint8)
        elif tuple(out.shape) != (n, p, p, 3):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {(n, p, p, 3)}")
        if isinstance(out, np.ndarray):
            for i in range(n):
                out[i] = img.read_region(xy[i, 0], xy[i, 1], extent, p)
            return out
        buf = np.empty((min(_BLOCK, max(n, 1)), p, p, 3), dtype=np.uint8)
        for start in range(0, n, _BLOCK):
            stop = min(start + _BLOCK, n)
            for j, i in enumerate(range(start, stop)):
                buf[j] = img.read_region(xy[i, 0], xy[i, 1], extent, p)
            out[start:stop] = buf[: stop - start]
        return out
    finally:
        if own:
            img.release()


# --------------------------------------------------------------------------------------------
# the patch store
# --------------------------------------------------------------------------------------------
class PatchStore:
    """Indexed access to the patches of one slide, in memory or in an HDF5 file.

    File-backed stores open the file on first access in each process (the process id is
    remembered; after a fork the file is reopened), and drop the handle when pickled, so they
    are safe in DataLoader workers.

    Args:
        barcodes: Spot barcodes, in slide order.
        coords: (N, 2) spot centres (x, y) in full-resolution pixels.
        patch_size: Side of the patches in pixels.
        images: In-memory patches (N, P, P, 3) uint8.
        path: HDF5 file with an ``img`` dataset (exclusive with ``images``).
        rows: Row of the file holding each spot's patch (default: row i for spot i).
        pixel_size_um: µm per patch pixel (None: native resolution).
        slide_id: Identifier of the slide.
    """

    def __init__(
        self,
        barcodes: Sequence[str],
        coords: np.ndarray,
        patch_size: int,
        *,
        images: np.ndarray | None = None,
        path: str | os.PathLike | None = None,
        rows: np.ndarray | None = None,
        pixel_size_um: float | None = None,
        slide_id: str = "",
    ) -> None:
        if (images is None) == (path is None):
            raise ValueError("give exactly one of images= (in memory) or path= (HDF5 file)")
        self._barcodes = np.asarray([str(b) for b in barcodes], dtype=str)
        self._coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        self._patch_size = int(patch_size)
        self.pixel_size_um = pixel_size_um
        self.slide_id = str(slide_id)
        self._images = images
        self.path = None if path is None else Path(path)
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._h5: Any = None
        self._dset: Any = None
        self._pid: int | None = None
        n = len(self._barcodes)
        if len(self._coords) != n:
            raise ValueError(f"{n} barcodes but {len(self._coords)} coordinates")
        if images is not None and images.shape[:1] != (n,):
            raise ValueError(f"{n} barcodes but {images.shape[0]} patches")
        if self._rows is not None and len(self._rows) != n:
            raise ValueError(f"{n} barcodes but {len(self._rows)} file rows")

    @property
    def barcodes(self) -> np.ndarray:
        """Spot barcodes (str array)."""
        return self._barcodes

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) spot centres (x, y) in full-resolution pixels."""
        return self._coords

    @property
    def patch_size(self) -> int:
        """Side of the patches in pixels."""
        return self._patch_size

    @property
    def in_memory(self) -> bool:
        """Whether the patches are held in memory."""
        return self._images is not None

    def __len__(self) -> int:
        return len(self._barcodes)

    def __repr__(self) -> str:
        where = "memory" if self.in_memory else str(self.path)
        return (
            f"PatchStore(slide={self.slide_id!r}, n={len(self)}, patch_size={self.patch_size}, "
            f"pixel_size_um={self.pixel_size_um}, in {where})"
        )

    def _dataset(self):
        pid = os.getpid()
        if self._h5 is None or self._pid != pid:
            import h5py

            # A handle inherited through fork is not reused; the child opens its own.
            self._h5 = h5py.File(self.path, "r")
            self._dset = self._h5["img"]
            self._pid = pid
        return self._dset

    def _index(self, indices: Any) -> np.ndarray:
        n = len(self)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            idx = np.where(idx)[0]
        idx = idx.astype(np.int64).ravel()
        if len(idx) and (idx.max() >= n or idx.min() < -n):
            raise IndexError(f"patch index out of range for {n} patches: {idx.min()}..{idx.max()}")
        return np.where(idx < 0, idx + n, idx)

    def __getitem__(self, i: Any) -> np.ndarray:
        """One patch (P, P, 3) uint8 for an int; several (k, P, P, 3) for a slice or array."""
        if isinstance(i, (int, np.integer)):
            j = int(self._index([i])[0])
            if self._images is not None:
                return self._images[j]
            row = j if self._rows is None else int(self._rows[j])
            return self._dataset()[row]
        if isinstance(i, slice):
            return self.get_many(np.arange(len(self))[i])
        return self.get_many(i)

    def get_many(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Patches of several spots, in the order given: (k, P, P, 3) uint8."""
        idx = self._index(indices)
        p = self.patch_size
        if self._images is not None:
            return self._images[idx]
        if len(idx) == 0:
            return np.empty((0, p, p, 3), dtype=np.uint8)
        rows = idx if self._rows is None else self._rows[idx]
        uniq, inverse = np.unique(rows, return_inverse=True)
        dset = self._dataset()
        if uniq[-1] - uniq[0] + 1 == len(uniq):
            data = dset[int(uniq[0]) : int(uniq[-1]) + 1]
        else:  # one read per chunk: much faster than h5py's point/hyperslab fancy indexing
            data = np.empty((len(uniq), p, p, 3), dtype=np.uint8)
            for k, r in enumerate(uniq):
                data[k] = dset[int(r)]
        return data[inverse.ravel()]

    def load(self) -> np.ndarray:
        """All patches as one in-memory array (N, P, P, 3)."""
        return self.get_many(np.arange(len(self)))

    def close(self) -> None:
        """Close the HDF5 handle opened by this process (it reopens on next access)."""
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
        self._h5 = None
        self._dset = None
        self._pid = None

    def __enter__(self) -> PatchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_dset"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------
def _image_fingerprint(slide) -> dict[str, Any]:
    """Identity of a slide's image: a digest of an in-memory array, or the file's
    :func:`hest2sge.cache.file_fingerprint` (path, size, mtime and sampled content)."""
    from hest2sge.cache import array_digest, file_fingerprint

    entry = spatial_entry(slide)
    arr = entry.get("images", {}).get("fullres")
    info: dict[str, Any] = {"image_scale": float(entry.get("image_scale", 1.0))}
    if arr is not None:
        arr = np.asarray(arr)
        info.update(array=array_digest(arr), shape=list(arr.shape), dtype=str(arr.dtype))
    else:
        if not str(entry.get("image_path", "")):
            raise SlideError(f"slide {slide_id_of(slide)!r} has no image to cut patches from")
        try:
            info.update(file_fingerprint(str(entry["image_path"])))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image of slide {slide_id_of(slide)!r} not found: {entry['image_path']}"
            ) from None
    return info


def patch_fingerprint(slide, patch_size: int = 224, pixel_size_um: float | None = None) -> str:
    """Hash of everything the patches of a slide depend on.

    The image (its content: a hash of an in-memory array, or of the file's bytes, sampled for
    files over 64 MiB, with its path, size and modification time), its scale, the barcodes
    and spot coordinates, the patch parameters and the cache version.
    """
    from hest2sge.cache import digest

    return digest(CACHE_FORMAT, CACHE_VERSION, slide_id_of(slide), _image_fingerprint(slide),
                  int(patch_size), pixel_size_um, patch_extent(slide, patch_size, pixel_size_um),
                  "\0".join(map(str, slide.obs_names)),
                  np.asarray(slide.obsm["spatial"], dtype=np.float64))


def cache_file_name(slide_id: str, patch_size: int, pixel_size_um: float | None) -> str:
    """File name of a slide's patch cache: ``<slide>_p<size>_<native|Xum>.h5``."""
    from hest2sge.cache import safe_name

    res = "native" if pixel_size_um is None else f"{float(pixel_size_um):g}um"
    return f"{safe_name(slide_id)}_p{int(patch_size)}_{res}.h5"


def _temp_path(path: Path) -> Path:
    from hest2sge.cache import temp_path

    return temp_path(path)


def _remove_stale_temps(path: Path) -> None:
    from hest2sge.cache import remove_stale_temps

    remove_stale_temps(path)


class _Progress:
    """Write-through view of a dataset that advances a tqdm bar as rows are written."""

    def __init__(self, dset: Any, bar: Any) -> None:
        self._dset, self._bar = dset, bar
        self.shape = dset.shape

    def __setitem__(self, key: Any, value: Any) -> None:
        self._dset[key] = value
        if isinstance(key, slice):
            self._bar.update(len(range(*key.indices(self.shape[0]))))
        else:
            self._bar.update(1)


def write_patch_file(
    slide,
    path: str | os.PathLike,
    patch_size: int = 224,
    pixel_size_um: float | None = None,
    *,
    image: SlideImage | None = None,
    fingerprint: str | None = None,
    progress: bool | None = None,
) -> Path:
    """Cut the patches of a slide into a cache file (:mod:`hest2sge.cache`), atomically.

    Datasets ``img`` (N x P x P x 3 uint8), ``coords`` (spot centres (x, y) in full-resolution
    pixels, ``coords_origin = "center"``) and ``barcode``, each with its checksum; on any error
    nothing appears at ``path``.

    Args:
        slide: A slide with an image.
        path: Destination file.
        patch_size: Side of the patches in pixels.
        pixel_size_um: µm per patch pixel (None: native resolution).
        image: An already opened :class:`SlideImage` of the slide.
        fingerprint: Precomputed :func:`patch_fingerprint`.
        progress: Show a tqdm bar (None: only on a terminal).

    Returns:
        ``path``.
    """
    from tqdm.auto import tqdm

    from hest2sge.cache import write_cache

    p = int(patch_size)
    n = slide.n_obs
    fp = fingerprint or patch_fingerprint(slide, p, pixel_size_um)
    sid = slide_id_of(slide)
    bc = np.array([str(b).encode() for b in slide.obs_names], dtype="S")

    def fill(dsets: dict[str, Any]) -> None:
        with tqdm(total=n, desc=f"cutting patches {sid}", unit="patch",
                  disable=None if progress is None else not progress, leave=False) as bar:
            extract_patches(slide, p, pixel_size_um, out=_Progress(dsets["img"], bar),
                            image=image)

    return write_cache(
        path, kind="patches", fingerprint=fp,
        arrays={"coords": np.asarray(slide.obsm["spatial"], np.float64),
                "barcode": bc if n else np.zeros(0, dtype="S1")},
        empty={"img": ((n, p, p, 3), np.uint8, (1, p, p, 3) if n else None)},
        fill=fill,
        attrs={"slide_id": sid, "patch_size": p,
               "pixel_size_um": float("nan") if pixel_size_um is None else pixel_size_um,
               "patch_extent_fullres": patch_extent(slide, p, pixel_size_um),
               "coords_origin": "center", "patch_format": PATCH_FORMAT},
    )


def _has_image(slide) -> bool:
    entry = spatial_entry(slide)
    return bool(entry.get("image_path")) or "fullres" in entry.get("images", {})


def _hest_store(slide, patch_size: int, pixel_size_um: float | None) -> PatchStore:
    """A store over the HEST-1k ``patches/<id>.h5`` file of a slide without a WSI."""
    import h5py

    sid = slide_id_of(slide)
    path = Path(str(spatial_entry(slide).get("metadata", {}).get("hest_patches", "")))
    with h5py.File(path, "r") as f:
        shape = f["img"].shape
        raw = np.asarray(f["barcode"][()]).ravel()
        attr_px = float(f.attrs.get("pixel_size_um", float("nan")))
    if shape[1] != int(patch_size) or shape[2] != int(patch_size):
        raise SlideError(
            f"slide {sid!r} has no image and its HEST patches {path} are {shape[1]} px, not "
            f"{patch_size} px; use patch_size={shape[1]} or provide wsis/{sid}.tif"
        )
    if pixel_size_um is not None and not math.isclose(attr_px, pixel_size_um, rel_tol=1e-3):
        warnings.warn(
            f"slide {sid!r}: using HEST patches {path} whose pixel size is not recorded as "
            f"{pixel_size_um} um/px (HEST-1k patches are 0.5 um/px)",
            stacklevel=3,
        )
    names = [b.decode() if isinstance(b, bytes) else str(b) for b in raw]
    where = {b: i for i, b in enumerate(names)}
    missing = [b for b in slide.obs_names if b not in where]
    if missing:
        raise SlideError(
            f"slide {sid!r}: {len(missing)} spots have no patch in {path} (e.g. {missing[:3]}); "
            "HEST drops spots outside the tissue: subset the slide to the patched spots"
        )
    rows = np.array([where[b] for b in slide.obs_names], dtype=np.int64)
    return PatchStore(
        slide.obs_names, slide.obsm["spatial"], patch_size, path=path, rows=rows,
        pixel_size_um=pixel_size_um, slide_id=sid,
    )


def cached_patches(
    slide,
    patch_size: int = 224,
    pixel_size_um: float | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PatchStore:
    """The patches of a slide, cut once and cached on disk.

    Args:
        slide: A slide with an image.
        patch_size: Side of the patches in pixels.
        pixel_size_um: µm per patch pixel (None: native resolution).
        cache_dir: Folder of the HDF5 cache; None extracts into memory.

    Returns:
        A :class:`PatchStore` in slide order.

    The cache file (``<slide>_p<size>_<res>.h5``) is trusted only if its fingerprint
    (:func:`patch_fingerprint`) matches, it carries the ``complete`` marker and every dataset
    matches its checksum; a stale file is rebuilt, an unreadable or corrupted one is rebuilt
    with a warning. Slides read from a HEST folder without
    a WSI are served from their ``patches/<id>.h5``.
    """
    sid = slide_id_of(slide)
    p = int(patch_size)
    coords = np.asarray(slide.obsm["spatial"], dtype=np.float64)
    if not _has_image(slide) and spatial_entry(slide).get("metadata", {}).get("hest_patches"):
        return _hest_store(slide, p, pixel_size_um)
    if cache_dir is None:
        images = extract_patches(slide, p, pixel_size_um)
        return PatchStore(slide.obs_names, coords, p, images=images,
                          pixel_size_um=pixel_size_um, slide_id=sid)
    from hest2sge.cache import open_cached

    path = Path(cache_dir) / cache_file_name(sid, p, pixel_size_um)
    fp = patch_fingerprint(slide, p, pixel_size_um)
    f = open_cached(path, kind="patches", fingerprint=fp,
                    shapes={"img": (slide.n_obs, p, p, 3), "barcode": (slide.n_obs,)})
    if f is not None:
        f.close()
        log.debug("patch cache hit: %s", path)
        return PatchStore(slide.obs_names, coords, p, path=path,
                          pixel_size_um=pixel_size_um, slide_id=sid)
    write_patch_file(slide, path, p, pixel_size_um, fingerprint=fp)
    return PatchStore(slide.obs_names, coords, p, path=path,
                      pixel_size_um=pixel_size_um, slide_id=sid)
