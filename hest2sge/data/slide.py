"""The slide contract: one AnnData per tissue section.

Every reader in :mod:`hest2sge.data` returns slides that satisfy :func:`validate_slide`:

* ``X``: raw counts, spots x genes (dense or sparse, non-negative).
* ``var_names``: gene symbols (or whatever identifiers the source uses), unique.
* ``obs``: ``slide_id``, ``patient_id``, ``array_row``, ``array_col``; ``obs_names`` are barcodes.
* ``obsm["spatial"]``: spot centres ``(x, y)`` in full-resolution image pixels.
* ``uns["spatial"][slide_id]``: a dict with

  - ``image_path``: path of the image (loaded lazily), or ``""`` when the image is held in
    ``images["fullres"]`` (synthetic slides);
  - ``image_scale``: image pixels per full-resolution pixel (1.0 for a full-resolution image,
    ``tissue_hires_scalef`` when only the Space Ranger hires PNG is available);
  - ``pixel_size_um``: micrometres per full-resolution pixel;
  - ``scalefactors``: the Space Ranger style scale factors: ``spot_diameter_fullres``, and
    ``tissue_hires_scalef`` / ``tissue_lowres_scalef`` for the images below;
  - ``images``: ``hires`` (longest side <= 2000 px) and ``lowres`` (<= 600 px) downscaled
    copies of the slide image, as scanpy/squidpy expect them, and optionally ``fullres``
    (uint8 H x W x 3, an in-memory full-resolution image for slides without a file).

With ``hires``/``lowres`` and their scale factors in place, ``sc.pl.spatial``,
``squidpy.pl.spatial_scatter`` and ``squidpy.gr.spatial_neighbors`` work on any slide as it is
(:func:`as_slide` adds them to AnnData objects built elsewhere). The full-resolution image is
opened only when patches are cut (:class:`SlideImage`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from hest2sge.errors import Hest2sgeInputError

REQUIRED_OBS = ("slide_id", "patient_id", "array_row", "array_col")
#: Scale factors that must be positive when present (NaN means unknown).
POSITIVE_SCALEFACTORS = (
    "spot_diameter_fullres",
    "fiducial_diameter_fullres",
    "tissue_hires_scalef",
    "tissue_lowres_scalef",
)


class SlideError(Hest2sgeInputError):
    """Raised when a slide does not satisfy the hest2sge data contract."""


def make_slide(
    counts: Any,
    genes: Sequence[str],
    barcodes: Sequence[str],
    spatial: np.ndarray,
    array_row: Sequence[int],
    array_col: Sequence[int],
    slide_id: str,
    patient_id: str,
    image_path: str | os.PathLike | None = None,
    image: np.ndarray | None = None,
    image_scale: float = 1.0,
    pixel_size_um: float | None = None,
    spot_diameter_fullres: float | None = None,
    extra_obs: dict[str, Sequence] | None = None,
    metadata: dict[str, Any] | None = None,
    scverse_images: bool = True,
):
    """Build a slide AnnData that follows the hest2sge contract.

    Args:
        counts: Raw counts, spots x genes (numpy array or scipy sparse matrix).
        genes: Gene identifiers, one per column.
        barcodes: Spot identifiers, one per row.
        spatial: Spot centres (x, y) in full-resolution pixels, shape (n_spots, 2).
        array_row: Row index of each spot on the array grid.
        array_col: Column index of each spot on the array grid.
        slide_id: Identifier of the section.
        patient_id: Identifier of the patient the section comes from.
        image_path: Path of the H&E image, opened lazily.
        image: In-memory uint8 RGB image (H x W x 3) used when there is no file.
        image_scale: Image pixels per full-resolution pixel.
        pixel_size_um: Micrometres per full-resolution pixel, if known.
        spot_diameter_fullres: Spot diameter in full-resolution pixels, if known.
        extra_obs: Additional per-spot columns.
        metadata: Free-form metadata stored in ``uns["spatial"][slide_id]["metadata"]``.
        scverse_images: Add the downscaled ``hires``/``lowres`` images and their scale factors
            (:func:`add_scverse_images`) when the slide has an image.

    Returns:
        An ``anndata.AnnData`` satisfying :func:`validate_slide`.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    n = len(barcodes)
    spatial = np.asarray(spatial, dtype=np.float64)
    if spatial.shape != (n, 2):
        raise SlideError(
            f"slide {slide_id!r}: spatial coordinates have shape {spatial.shape}, "
            f"expected ({n}, 2) for {n} barcodes"
        )
    if sp.issparse(counts):
        counts = sp.csr_matrix(counts, dtype=np.float32)
    else:
        counts = np.asarray(counts, dtype=np.float32)
    if counts.shape != (n, len(genes)):
        raise SlideError(
            f"slide {slide_id!r}: counts have shape {counts.shape}, expected "
            f"({n}, {len(genes)}) for {n} barcodes and {len(genes)} genes"
        )
    obs = pd.DataFrame(
        {
            "slide_id": pd.Categorical([str(slide_id)] * n),
            "patient_id": pd.Categorical([str(patient_id)] * n),
            "array_row": np.asarray(array_row, dtype=np.int64),
            "array_col": np.asarray(array_col, dtype=np.int64),
        },
        index=pd.Index([str(b) for b in barcodes], name=None),
    )
    for key, values in (extra_obs or {}).items():
        obs[key] = list(values)
    var = pd.DataFrame(index=pd.Index([str(g) for g in genes], name=None))
    _check_unique(var.index, f"slide {slide_id!r}: duplicated gene names",
                  "genes must be unique (make them unique, e.g. anndata's var_names_make_unique, "
                  "or sum the duplicated columns)")
    _check_unique(obs.index, f"slide {slide_id!r}: duplicated spot barcodes",
                  "each spot must appear once")
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["spatial"] = spatial
    entry: dict[str, Any] = {
        "image_path": "" if image_path is None else str(image_path),
        "image_scale": float(image_scale),
        "pixel_size_um": float("nan") if pixel_size_um is None else float(pixel_size_um),
        "scalefactors": {
            "spot_diameter_fullres": float("nan")
            if spot_diameter_fullres is None
            else float(spot_diameter_fullres)
        },
        "images": {},
        "metadata": dict(metadata or {}),
    }
    if image is not None:
        entry["images"]["fullres"] = as_rgb_uint8(np.asarray(image), slide_id)
    adata.uns["spatial"] = {str(slide_id): entry}
    if scverse_images and (image is not None or image_path is not None):
        from hest2sge.data.scverse import add_scverse_images

        add_scverse_images(adata)
    return adata


def slide_id_of(adata) -> str:
    """Return the slide identifier of a single-section AnnData."""
    if "slide_id" not in adata.obs:
        raise SlideError("AnnData has no obs['slide_id'] column; is it a hest2sge slide?")
    ids = adata.obs["slide_id"].astype(str).unique()
    if len(ids) == 0:
        raise SlideError(
            "the slide has no spots (0 rows): check the counts/positions files it was read "
            "from and any spot filter (in_tissue, selected)"
        )
    if len(ids) != 1:
        raise SlideError(f"expected one slide per AnnData, found slide_ids {sorted(ids)[:5]}")
    return str(ids[0])


def patient_id_of(adata) -> str:
    """Return the patient identifier of a single-section AnnData."""
    ids = adata.obs["patient_id"].astype(str).unique()
    if len(ids) != 1:
        raise SlideError(
            f"slide {slide_id_of(adata)!r} has several patient_ids {sorted(ids)[:5]}"
        )
    return str(ids[0])


def spatial_entry(adata) -> dict[str, Any]:
    """Return ``uns["spatial"][slide_id]`` of a slide, with a clear error when absent."""
    sid = slide_id_of(adata)
    try:
        return adata.uns["spatial"][sid]
    except KeyError:
        raise SlideError(
            f"slide {sid!r} has no uns['spatial'][{sid!r}] entry with its image reference"
        ) from None


def validate_slide(adata, require_image: bool = True,
                   source: str | os.PathLike | None = None) -> None:
    """Check that an AnnData satisfies the slide contract.

    Checks the obs columns, finite spot coordinates, unique genes and barcodes, finite and
    non-negative counts, a positive image scale, pixel size and scale factors (NaN means
    unknown) and, with ``require_image``, an image reference.

    Args:
        adata: The slide.
        require_image: Also require an image reference (path or in-memory array).
        source: File the slide was read from, named in the error.

    Raises:
        SlideError: naming the first thing that is wrong (and ``source``).
    """
    try:
        _validate(adata, require_image)
    except SlideError as err:
        if source is None:
            raise
        raise SlideError(str(err), path=source) from None


def _validate(adata, require_image: bool) -> None:
    missing = [c for c in REQUIRED_OBS if c not in adata.obs]
    if missing:
        raise SlideError(f"slide is missing obs column(s) {missing}; required: {list(REQUIRED_OBS)}")
    sid = slide_id_of(adata)
    if "spatial" not in adata.obsm:
        raise SlideError(f"slide {sid!r} has no obsm['spatial'] spot coordinates")
    xy = np.asarray(adata.obsm["spatial"])
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise SlideError(f"slide {sid!r}: obsm['spatial'] must be (n_spots, 2), got {xy.shape}")
    if not np.isfinite(xy).all():
        bad = np.where(~np.isfinite(xy).all(1))[0][0]
        raise SlideError(
            f"slide {sid!r}: spot {adata.obs_names[bad]!r} has non-finite coordinates {xy[bad]}"
        )
    _check_unique(adata.var_names, f"slide {sid!r}: duplicated gene names",
                  "genes must be unique")
    _check_unique(adata.obs_names, f"slide {sid!r}: duplicated spot barcodes",
                  "each spot must appear once")
    if adata.n_obs:
        _check_counts(adata.X, adata.obs_names, adata.var_names, sid)
    uns_spatial = adata.uns.get("spatial")
    entry = uns_spatial.get(sid) if isinstance(uns_spatial, dict) else None
    if isinstance(entry, dict):
        _check_scales(entry, sid)
    if require_image:
        entry = spatial_entry(adata)
        if not entry.get("image_path") and "fullres" not in entry.get("images", {}):
            raise SlideError(f"slide {sid!r} has neither an image_path nor an in-memory image")


def _check_unique(names, what: str, hint: str) -> None:
    import pandas as pd

    names = pd.Index(names)
    if not names.is_unique:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise SlideError(f"{what} {dup}", hint=hint)


def _check_counts(x, barcodes, genes, sid: str) -> None:
    """Counts must be finite and non-negative; name the first offending spot and gene."""
    import scipy.sparse as sp

    data = x.data if sp.issparse(x) else np.asarray(x)
    if data.size == 0 or not np.issubdtype(data.dtype, np.number):
        return
    for bad, what, hint in (
        (~np.isfinite(data), "non-finite count", "X must hold raw counts: no NaN or inf "
         "(a missing or non-numeric cell in the counts file?)"),
        (data < 0, "negative count", "X must hold raw (non-negative) counts, not log or "
         "scaled values (put raw counts in X or layers['counts'])"),
    ):
        if bad.any():  # locate the first offender only now (the common case stays cheap)
            n = int(bad.sum())
            if sp.issparse(x):
                coo = sp.coo_matrix(x)
                mask = ~np.isfinite(coo.data) if what.startswith("non") else coo.data < 0
                k = int(np.flatnonzero(mask)[0])
                r, c, value = int(coo.row[k]), int(coo.col[k]), float(coo.data[k])
            else:
                r, c = (int(v[0]) for v in np.nonzero(bad))
                value = float(data[r, c])
            raise SlideError(
                f"slide {sid!r}: {what} {value} at spot {barcodes[r]!r}, gene {genes[c]!r}"
                f"{f' (and {n - 1} more)' if n > 1 else ''}",
                hint=hint,
            )


def _check_scales(entry: dict[str, Any], sid: str) -> None:
    """Image scale, pixel size and scale factors must be positive (NaN: unknown)."""
    values = [("image_scale", entry.get("image_scale", 1.0), False),
              ("pixel_size_um", entry.get("pixel_size_um"), True)]
    sf = entry.get("scalefactors") or {}
    values += [(f"scalefactors[{k!r}]", sf.get(k), True) for k in POSITIVE_SCALEFACTORS if k in sf]
    for name, value, nan_ok in values:
        if value is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise SlideError(f"slide {sid!r}: {name} = {value!r} is not a number") from None
        if np.isnan(v) and nan_ok:
            continue
        if not (np.isfinite(v) and v > 0):
            raise SlideError(
                f"slide {sid!r}: {name} = {value!r} must be a positive number",
                hint="fix the scale factors / metadata of the slide (a zero, negative or "
                "infinite value makes pixel sizes and patch extents meaningless)",
            )


def as_rgb_uint8(img: np.ndarray, name: str) -> np.ndarray:
    """An image as (h, w, 3) uint8 RGB (grey repeated, alpha dropped); ``name`` goes into the
    error for any other shape or dtype."""
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise SlideError(f"image of {name!r} must be H x W x 3 (or 4), got shape {img.shape}")
    img = img[..., :3]
    if img.dtype != np.uint8:
        if np.issubdtype(img.dtype, np.floating) and img.max() <= 1.0:
            img = img * 255.0
        img = np.clip(img, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)


def load_image_array(path: str | os.PathLike, max_pixels: int | str | None = None) -> np.ndarray:
    """Read an RGB image file fully into memory as uint8 (H, W, 3).

    TIFF files are read with tifffile; flat images (JPEG, PNG, ...) with PIL behind the
    decompression-bomb guard of :mod:`hest2sge.data.images` (a header over ``max_pixels``, by
    default :func:`~hest2sge.data.images.max_image_pixels`, raises
    :class:`~hest2sge.data.images.ImageTooLargeError`). Patch cutting does not call this: it
    reads regions lazily through :class:`SlideImage`.
    """
    from hest2sge.data.images import open_image
    from hest2sge.errors import reading

    with reading(path, "image"), open_image(path, max_pixels=max_pixels) as img:
        return as_rgb_uint8(img.read_level(0), str(path))


class SlideImage:
    """Lazy access to a slide's image in full-resolution pixel coordinates.

    File-backed images are opened with :func:`hest2sge.data.images.open_image`: pyramidal and
    tiled TIFF / whole-slide files are read region by region (the full level 0 is never
    decoded by :meth:`read_region`), flat JPEG/PNG files are decoded whole on first read behind
    the decompression-bomb guard.

    Args:
        adata: A slide following the contract.
        max_pixels: Pixel limit of flat image files (see
            :func:`hest2sge.data.images.max_image_pixels`; default from the environment).
    """

    def __init__(self, adata, max_pixels: int | str | None = None) -> None:
        self.slide_id = slide_id_of(adata)
        entry = spatial_entry(adata)
        self.path = entry.get("image_path") or ""
        self.scale = float(entry.get("image_scale", 1.0))
        self.max_pixels = max_pixels
        self._array: np.ndarray | None = entry.get("images", {}).get("fullres")
        self._reader: Any = None
        if self._array is None and not self.path:
            raise SlideError(f"slide {self.slide_id!r} has no image to cut patches from")

    @property
    def reader(self):
        """The :class:`~hest2sge.data.images.WholeSlideImage` of the file (opened lazily)."""
        if self._reader is None:
            from hest2sge.data.images import ArrayImage, open_image

            if self._array is not None:
                self._reader = ArrayImage(self._array, self.path or None)
            else:
                self._reader = open_image(self.path, max_pixels=self.max_pixels)
        return self._reader

    @property
    def array(self) -> np.ndarray:
        """The whole image as uint8 (H, W, 3), loaded on first access.

        Decodes the full level 0 of a pyramidal file: prefer :meth:`read_region`.
        """
        if self._array is None:
            self._array = as_rgb_uint8(self.reader.read_level(0), self.path)
        return self._array

    @property
    def mpp(self) -> float | None:
        """µm per full-resolution pixel from the image file's metadata (None when absent)."""
        if not self.path:
            return None
        file_mpp = self.reader.mpp
        return None if file_mpp is None else file_mpp * self.scale

    @property
    def fullres_shape(self) -> tuple[float, float]:
        """Height and width of the image in full-resolution pixels (read from the header)."""
        if self._array is not None:
            h, w = self._array.shape[:2]
        else:
            w, h = self.reader.dimensions
        return h / self.scale, w / self.scale

    def read_region(self, x: float, y: float, size: float, out_size: int) -> np.ndarray:
        """Cut a square centred on (x, y), ``size`` full-resolution pixels wide.

        Parts outside the image are white. The crop is resampled to ``out_size`` pixels.

        Returns:
            uint8 array (out_size, out_size, 3).
        """
        s = self.scale
        side = size * s
        x0 = x * s - side / 2.0
        y0 = y * s - side / 2.0
        ix0, iy0 = int(np.floor(x0 + 0.5)), int(np.floor(y0 + 0.5))
        n = max(int(round(side)), 1)
        if self._array is None and self.reader.backend in ("pil", "array"):
            self._array = self.reader.read_level(0)  # flat files are decoded whole anyway
        if self._array is None:
            crop = self.reader.read_region(ix0, iy0, n, n, level=0)
        else:
            img = self._array
            crop = np.full((n, n, 3), 255, dtype=np.uint8)
            h, w = img.shape[:2]
            sx0, sy0 = max(ix0, 0), max(iy0, 0)
            sx1, sy1 = min(ix0 + n, w), min(iy0 + n, h)
            if sx1 > sx0 and sy1 > sy0:
                crop[sy0 - iy0 : sy1 - iy0, sx0 - ix0 : sx1 - ix0] = img[sy0:sy1, sx0:sx1]
        if n != out_size:
            from PIL import Image

            crop = np.asarray(
                Image.fromarray(np.ascontiguousarray(crop)).resize(
                    (out_size, out_size), Image.Resampling.BILINEAR
                )
            )
        return crop

    def release(self) -> None:
        """Drop the in-memory copy and the open file of a file-backed image."""
        if self.path:
            self._array = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None
