"""scverse images: the ``hires``/``lowres`` images and scale factors scanpy and squidpy read.

Readers, :func:`hest2sge.predict` and :func:`as_slide` put downscaled images into
``uns["spatial"][slide_id]`` so that ``sc.pl.spatial`` and ``squidpy.pl.spatial_scatter`` draw
the spots on the tissue; the full-resolution image stays a path read lazily
(:class:`~hest2sge.data.slide.SlideImage`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from hest2sge.data.slide import (
    REQUIRED_OBS,
    SlideError,
    as_rgb_uint8,
    load_image_array,
    slide_id_of,
    spatial_entry,
    validate_slide,
)

#: Longest side of the scverse ``hires`` image (Space Ranger's hires PNG is 2000 px).
HIRES_MAX_SIDE = 2000
#: Longest side of the scverse ``lowres`` image (Space Ranger's lowres PNG is 600 px).
LOWRES_MAX_SIDE = 600


def resize_to_max_side(arr: np.ndarray, max_side: int) -> np.ndarray:
    """An image downscaled so that its longer side is at most ``max_side`` (smaller images are
    returned as they are)."""
    h, w = arr.shape[:2]
    f = max_side / max(h, w)
    if f >= 1.0:
        return arr
    from PIL import Image

    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BILINEAR,
                                                   reducing_gap=3.0))


def read_thumbnail(path: str | os.PathLike, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A downscaled copy of an image file, without decoding it whole where the format allows.

    Pyramidal TIFFs are read from the smallest level still at least ``max_side`` px; JPEGs are
    decoded at reduced scale (libjpeg DCT scaling, at most 1/8: a JPEG is at most 65,535 px a
    side, so this never decodes more than 8,192 x 8,192 px); other files are decoded whole
    (:func:`load_image_array`) and resized.

    Args:
        path: The image file.
        max_side: Longest side of the result (images already smaller are returned as they are).

    Returns:
        ``(thumbnail uint8 (h, w, 3), (full width, full height))``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.suffix.lower() in (".tif", ".tiff", ".btf"):
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            levels = list(getattr(series, "levels", [series]))

            def _hw(shape: tuple) -> tuple[int, int]:
                if len(shape) == 3 and shape[0] in (3, 4) and shape[2] not in (3, 4):
                    return int(shape[1]), int(shape[2])
                return int(shape[0]), int(shape[1])

            full_h, full_w = _hw(levels[0].shape)
            best = levels[0]
            for lv in levels[1:]:
                if max(_hw(lv.shape)) >= max_side:
                    best = lv
            arr = best.asarray()
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
        arr = as_rgb_uint8(arr, str(path))
        return resize_to_max_side(arr, max_side), (full_w, full_h)
    from PIL import Image

    from hest2sge.data.images import ImageTooLargeError, max_image_pixels, pil_limit_lifted
    from hest2sge.errors import reading

    with reading(path, "image"), pil_limit_lifted(), Image.open(path) as im:
        full_w, full_h = im.size
        if im.format != "JPEG":
            arr = load_image_array(path)  # behind the pixel limit of flat images
        else:
            # JPEGs decode at a reduced scale (1/2 .. 1/8); the limit applies to what is decoded.
            f = max_side / max(full_w, full_h)
            if f < 1.0:
                im.draft("RGB", (max(1, int(full_w * f)), max(1, int(full_h * f))))
            limit = max_image_pixels()
            if limit is not None and im.size[0] * im.size[1] > limit:
                raise ImageTooLargeError(
                    f"{path}: decoding this JPEG at its smallest scale still takes "
                    f"{im.size[0]} x {im.size[1]} pixels, over the limit of {limit:,}; raise it "
                    "with the environment variable HEST2SGE_MAX_IMAGE_PIXELS if the file is "
                    "genuine")
            arr = np.asarray(im.convert("RGB"))
    return resize_to_max_side(arr, max_side), (int(full_w), int(full_h))


def add_scverse_images(
    adata,
    hires_max_side: int = HIRES_MAX_SIDE,
    lowres_max_side: int = LOWRES_MAX_SIDE,
    overwrite: bool = False,
):
    """Put scanpy/squidpy-style ``hires``/``lowres`` images into ``uns["spatial"][slide_id]``.

    Adds ``images["hires"]`` and ``images["lowres"]`` (uint8, longest side at most
    ``hires_max_side`` / ``lowres_max_side``) made from the slide image, and
    ``scalefactors["tissue_hires_scalef"]`` / ``["tissue_lowres_scalef"]`` (image pixels per
    full-resolution pixel), so that ``sc.pl.spatial(adata, color=gene)`` and
    ``squidpy.pl.spatial_scatter(adata, color=gene)`` draw the spots on the tissue. Slides
    without an image are left as they are (plot them with ``img_key=None`` /
    ``img=False``).

    Args:
        adata: A slide (modified in place).
        hires_max_side: Longest side of ``hires``.
        lowres_max_side: Longest side of ``lowres``.
        overwrite: Replace existing ``hires``/``lowres`` entries.

    Returns:
        ``adata``.
    """
    add_scverse_images_to_entry(spatial_entry(adata), hires_max_side, lowres_max_side, overwrite)
    return adata


def add_scverse_images_to_entry(
    entry: dict[str, Any],
    hires_max_side: int = HIRES_MAX_SIDE,
    lowres_max_side: int = LOWRES_MAX_SIDE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """:func:`add_scverse_images` on one ``uns["spatial"][slide_id]`` dict (modified in place
    and returned)."""
    images = entry.setdefault("images", {})
    scalef = entry.setdefault("scalefactors", {})
    have = all(k in images and f"tissue_{k}_scalef" in scalef for k in ("hires", "lowres"))
    if have and not overwrite:
        return entry
    scale = float(entry.get("image_scale", 1.0))
    full = images.get("fullres")
    if full is not None:
        full = np.asarray(full)
        src_w = full.shape[1]
        hires = resize_to_max_side(full, hires_max_side)
    elif entry.get("image_path"):
        hires, (src_w, _) = read_thumbnail(entry["image_path"], hires_max_side)
    else:
        return entry
    hires = np.ascontiguousarray(hires)
    lowres = np.ascontiguousarray(resize_to_max_side(hires, lowres_max_side))
    # scanpy: image pixels per full-resolution pixel; the source image has ``scale`` of those
    images["hires"] = hires
    images["lowres"] = lowres
    scalef["tissue_hires_scalef"] = scale * hires.shape[1] / src_w
    scalef["tissue_lowres_scalef"] = scale * lowres.shape[1] / src_w
    scalef.setdefault("spot_diameter_fullres", float("nan"))
    return entry


def as_slide(
    adata,
    slide_id: str | None = None,
    patient_id: str | None = None,
    *,
    image: str | os.PathLike | None = None,
    require_image: bool = True,
):
    """Turn an in-memory AnnData into a hest2sge slide that scanpy and squidpy also accept.

    Accepts a hest2sge slide (returned as a copy, with ``hires``/``lowres`` images added when
    missing), or a scanpy/squidpy-style object such as ``sc.read_visium`` output or a
    ``squidpy.datasets`` slide: spot centres from ``obsm["spatial"]``, the image from
    ``uns["spatial"][library]`` (``hires`` with ``tissue_hires_scalef``) or ``image``, counts
    from ``layers["counts"]`` when present; missing array rows/columns are derived from the
    spot coordinates.

    Args:
        adata: The AnnData (one section).
        slide_id: Slide identifier (default: its ``slide_id``/library id).
        patient_id: Patient identifier (default: obs ``patient_id``/``patient``, else the slide
            id, with a warning).
        image: Full-resolution image file for the section.
        require_image: Raise when no image is found (False for expression-only use).

    Returns:
        A new slide satisfying :func:`validate_slide`, with scverse images when it has an
        image.
    """
    if image is None and all(c in adata.obs for c in REQUIRED_OBS):
        try:
            validate_slide(adata, require_image=require_image)
            sid = slide_id_of(adata)
            ok = slide_id is None or str(slide_id) == sid
        except SlideError:
            ok = False
        if ok:
            out = adata.copy()
            entry = dict(spatial_entry(out))
            entry["images"] = dict(entry.get("images", {}))
            entry["scalefactors"] = dict(entry.get("scalefactors", {}))
            out.uns["spatial"] = {sid: entry}
            return add_scverse_images(out)
    from hest2sge.data.readers import slides_from_anndata

    slides = slides_from_anndata(adata, slide_id=slide_id, patient_id=patient_id, image=image,
                                 require_image=require_image, name="AnnData")
    if len(slides) != 1:
        raise SlideError(
            f"the AnnData holds {len(slides)} sections "
            f"({[slide_id_of(s) for s in slides][:5]}); pass slide_id= to pick one, or use "
            "hest2sge.data.read_h5ad for all"
        )
    return slides[0]
