"""HEST-1k layout: read, write (pyramidal WSIs, patches, metadata) and download."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hest2sge.data.scverse import add_scverse_images, add_scverse_images_to_entry
from hest2sge.data.slide import (
    SlideError,
    SlideImage,
    slide_id_of,
    spatial_entry,
    validate_slide,
)
from hest2sge.errors import Hest2sgeInputError, reading

if TYPE_CHECKING:
    from anndata import AnnData

from hest2sge.data.readers._common import (
    HEST_WRITER_VERSION,
    _float_or_nan,
    _h5ad_safe,
    _is_missing,
    _jsonable,
    _natural_key,
    _require,
)
from hest2sge.data.readers.h5ad import (
    _conform,
    _single_value,
)

PathLike = str | os.PathLike


def _check_positive_meta(meta: dict[str, Any], path: Path) -> None:
    """Pixel sizes, spot diameters and the image scale of HEST metadata must be positive."""
    for key in ("pixel_size_um", "pixel_size_um_estimated", "pixel_size_um_embedded",
                "spot_diameter", "spot_diameter_fullres", "image_scale"):
        value = meta.get(key)
        if _is_missing(value):
            continue
        if not _float_or_nan(value) > 0:
            raise Hest2sgeInputError(
                f"{key} = {value!r} must be a positive number (or absent/null when unknown)",
                path=path,
            )


def _hest_wsi(root: Path, sid: str) -> Path | None:
    for suffix in (".tif", ".tiff", ".btf"):
        p = root / "wsis" / f"{sid}{suffix}"
        if p.exists():
            return p
    return None


def read_hest(root: PathLike, ids: Sequence[str] | str | None = None) -> list[AnnData]:
    """Read slides stored in the HEST-1k folder layout.

    ``st/<id>.h5ad`` (counts, ``obsm["spatial"]``), ``metadata/<id>.json``, ``wsis/<id>.tif``
    and ``patches/<id>.h5``. Contract fields missing from the h5ad are filled in:
    ``slide_id = id``, ``patient_id`` from metadata ``"patient"`` (else the id), array
    rows/columns from obs or derived from the spot coordinates, the pixel size from
    ``pixel_size_um`` / ``pixel_size_um_estimated`` / ``pixel_size_um_embedded`` and the spot
    diameter from ``spot_diameter_fullres`` or ``spot_diameter`` (µm).

    A slide without a WSI is returned with a warning and without image (it then fails
    ``validate_slide(require_image=True)``); its ``patches/<id>.h5`` is recorded in the metadata
    as ``hest_patches`` and :func:`hest2sge.data.patches.cached_patches` serves those patches
    when their size matches.

    Args:
        root: The HEST folder.
        ids: Sample ids to read (default: every ``st/*.h5ad``, sorted).

    Returns:
        One slide per id.
    """
    import anndata as ad

    root = Path(root)
    st_dir = _require(root / "st", "HEST st/ folder", "expected st/<id>.h5ad files")
    if ids is None:
        ids = sorted((p.stem for p in st_dir.glob("*.h5ad")), key=_natural_key)
        if not ids:
            raise FileNotFoundError(f"no <id>.h5ad files in {st_dir}")
    elif isinstance(ids, str):
        ids = [ids]
    slides = []
    for sid in ids:
        h5ad_path = _require(st_dir / f"{sid}.h5ad", f"HEST expression file of {sid!r}")
        meta_path = root / "metadata" / f"{sid}.json"
        meta: dict[str, Any] = {}
        if meta_path.exists():
            with reading(meta_path, "HEST metadata JSON"), open(meta_path) as fh:
                meta = json.load(fh)
            if not isinstance(meta, dict):
                raise Hest2sgeInputError("the metadata must be a JSON object", path=meta_path)
            _check_positive_meta(meta, meta_path)
        else:
            warnings.warn(f"{meta_path} not found: pixel size and patient unknown", stacklevel=2)
        with reading(h5ad_path, "HEST expression file (h5ad)"):
            adata = ad.read_h5ad(h5ad_path)
        name = str(h5ad_path)
        patient = meta.get("patient")
        if _is_missing(patient):
            patient = _single_value(adata, ("patient_id", "patient"))
        patient = sid if _is_missing(patient) else str(patient)
        px = float("nan")
        for k in ("pixel_size_um", "pixel_size_um_estimated", "pixel_size_um_embedded"):
            px = _float_or_nan(meta.get(k))
            if math.isfinite(px):
                break
        old_entry: dict[str, Any] = {}
        uns_spatial = adata.uns.get("spatial")
        if isinstance(uns_spatial, dict) and uns_spatial:
            old_entry = dict(uns_spatial.get(sid, next(iter(uns_spatial.values()))) or {})
        scalefactors = dict(old_entry.get("scalefactors", {}) or {})
        diameter = _float_or_nan(meta.get("spot_diameter_fullres"))
        if not math.isfinite(diameter):
            diameter = _float_or_nan(meta.get("spot_diameter")) / px
        if not math.isfinite(diameter):
            diameter = _float_or_nan(scalefactors.get("spot_diameter_fullres"))
        wsi = _hest_wsi(root, sid)
        patches_path = root / "patches" / f"{sid}.h5"
        extra = {}
        if patches_path.exists():
            extra["hest_patches"] = str(patches_path)
        if wsi is None:
            warnings.warn(
                f"HEST sample {sid!r}: no wsis/{sid}.tif; the slide has no image "
                + ("(patches/<id>.h5 will be used)" if patches_path.exists() else ""),
                stacklevel=2,
            )
        scale = _float_or_nan(meta.get("image_scale", 1.0))
        keep_meta = {k: v for k, v in meta.items() if not _is_missing(v)}
        adata.uns.pop("spatial", None)
        old_images = dict(old_entry.get("images", {}) or {})
        slide = _conform(
            adata,
            slide_id=sid,
            patient_id=patient,
            image_path=wsi,
            image=None,
            image_scale=scale if scale > 0 else 1.0,
            pixel_size_um=px,
            spot_diameter_fullres=diameter,
            scalefactors=scalefactors,
            metadata=_h5ad_safe({**keep_meta, **extra, "source": "hest", "hest_root": str(root)}),
            name=name,
            scverse_images=False,
        )
        _hest_scverse_images(slide, old_images, scalefactors)
        validate_slide(slide, require_image=wsi is not None, source=h5ad_path)
        slides.append(slide)
    return slides


def _hest_scverse_images(slide, images: dict[str, Any], scalefactors: dict[str, Any]) -> None:
    """scanpy ``hires``/``lowres`` images of a HEST sample: from the h5ad's own images
    (``hires``/``lowres``, or HEST-1k's ``downscaled_fullres``), else from the WSI's pyramid."""
    from hest2sge.data.scverse import HIRES_MAX_SIDE, resize_to_max_side

    entry = spatial_entry(slide)
    src, sf = None, None
    if "hires" in images and "tissue_hires_scalef" in scalefactors:
        src, sf = images["hires"], scalefactors["tissue_hires_scalef"]
    elif "downscaled_fullres" in images and "tissue_downscaled_fullres_scalef" in scalefactors:
        src, sf = images["downscaled_fullres"], scalefactors["tissue_downscaled_fullres_scalef"]
    sf = _float_or_nan(sf)
    if src is not None and np.asarray(src).ndim == 3 and sf > 0:
        from hest2sge.data.slide import as_rgb_uint8

        src = as_rgb_uint8(np.asarray(src), slide_id_of(slide))
        hires = np.ascontiguousarray(resize_to_max_side(src, HIRES_MAX_SIDE))
        entry["images"]["hires"] = hires
        entry["scalefactors"]["tissue_hires_scalef"] = sf * hires.shape[1] / src.shape[1]
        entry["scalefactors"].pop("tissue_lowres_scalef", None)
        fake = {"images": {"fullres": hires}, "image_scale": sf * hires.shape[1] / src.shape[1]}
        add_scverse_images_to_entry(fake)
        entry["images"]["lowres"] = fake["images"]["lowres"]
        entry["scalefactors"]["tissue_lowres_scalef"] = fake["scalefactors"]["tissue_lowres_scalef"]
    elif entry.get("image_path"):
        add_scverse_images(slide)


def _safe_id(sid: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", sid) or sid in (".", ".."):
        raise SlideError(
            f"slide id {sid!r} cannot be used as a HEST file name; use letters, digits, '.', "
            "'_' and '-' only"
        )
    return sid


def _write_pyramidal_tiff(
    arr: np.ndarray,
    path: Path,
    pixel_size_um: float | None,
    compression: str | None = "zlib",
    tile: int = 256,
    min_side: int = 1024,
) -> int:
    """Write an RGB image as a tiled pyramidal generic TIFF (the WSI layout HEST-1k uses and
    OpenSlide/tiffslide read): level 0 first, then each level downsampled by 2 as a
    reduced-resolution page, down to ``min_side`` px. Returns the number of levels."""
    import tifffile
    from PIL import Image

    w = arr.shape[1]
    big = arr.nbytes > (2**32 - 2**25)
    opts: dict[str, Any] = {"photometric": "rgb", "tile": (tile, tile),
                            "compression": compression, "metadata": None}
    if pixel_size_um is not None and math.isfinite(pixel_size_um) and pixel_size_um > 0:
        opts["resolution"] = (1e4 / pixel_size_um, 1e4 / pixel_size_um)
        opts["resolutionunit"] = "CENTIMETER"
    levels = 1
    with tifffile.TiffWriter(path, bigtiff=big) as tw:
        tw.write(arr, **opts)
        cur = arr
        while max(cur.shape[:2]) > min_side and min(cur.shape[:2]) >= 2:
            cur = np.ascontiguousarray(np.asarray(Image.fromarray(cur).reduce(2)))
            if "resolution" in opts:
                r = 1e4 / pixel_size_um * cur.shape[1] / w
                opts["resolution"] = (r, r)
            tw.write(cur, subfiletype=1, **opts)
            levels += 1
    return levels


def _write_hest_patches(slide, path: Path, patch_size: int, pixel_size_um: float | None,
                        image: SlideImage, frame: float) -> float:
    """HEST-1k patch file: ``img`` (N x P x P x 3), ``coords`` (N x 2 int, top-left corner of
    each patch in level-0 pixels of the written WSI, HEST's convention), ``barcode`` (N x 1
    bytes). Returns the patch extent in WSI pixels."""
    import h5py

    from hest2sge.cache import atomic_write
    from hest2sge.data.patches import extract_patches, patch_extent

    extent = patch_extent(slide, patch_size, pixel_size_um) * frame
    xy = np.asarray(slide.obsm["spatial"], dtype=np.float64) * frame
    top_left = np.floor(xy - extent / 2.0 + 0.5).astype(np.int64)
    n, p = slide.n_obs, int(patch_size)

    def _write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            dset = f.create_dataset("img", shape=(n, p, p, 3), dtype=np.uint8,
                                    chunks=(1, p, p, 3) if n else None)
            extract_patches(slide, p, pixel_size_um, out=dset, image=image)
            f.create_dataset("coords", data=top_left)
            bc = np.array([str(b).encode() for b in slide.obs_names], dtype="S")[:, None]
            f.create_dataset("barcode", data=bc if n else np.zeros((0, 1), dtype="S1"))
            f["coords"].attrs["patch_size"] = p
            f["coords"].attrs["patch_size_level0"] = extent
            f["coords"].attrs["level0_magnification"] = float("nan")
            f.attrs["coords_origin"] = "top_left"
            f.attrs["patch_size"] = p
            f.attrs["pixel_size_um"] = float("nan") if pixel_size_um is None else pixel_size_um

    atomic_write(path, _write)
    return extent


def write_hest(
    slides: Sequence[AnnData] | AnnData,
    root: PathLike,
    patch_size: int = 224,
    pixel_size_um: float | None = None,
    *,
    compression: str | None = "zlib",
) -> list[Path]:
    """Write slides in the HEST-1k folder layout, readable by HEST's own reader and by
    :func:`read_hest`.

    Per slide ``id``:

    * ``wsis/<id>.tif``: the slide image as a tiled pyramidal TIFF (levels halved down to
      ~1,000 px, pixel size in the resolution tags), in the frame of ``obsm["spatial"]``;
    * ``st/<id>.h5ad``: counts, obs (with ``pxl_col_in_fullres``/``pxl_row_in_fullres``),
      ``obsm["spatial"]`` in level-0 pixels of that TIFF, and HEST's required
      ``uns["spatial"]["ST"]`` entry: ``images["downscaled_fullres"]`` (plus scanpy's
      ``hires``/``lowres``) with ``scalefactors["tissue_downscaled_fullres_scalef"]``,
      ``tissue_hires_scalef``, ``tissue_lowres_scalef`` and ``spot_diameter_fullres``;
    * ``patches/<id>.h5``: ``img`` (N x P x P x 3), ``coords`` (top-left corner of each patch
      in level-0 pixels, HEST's convention) and ``barcode`` (N x 1);
    * ``metadata/<id>.json``: HEST's keys (``pixel_size_um_estimated``,
      ``pixel_size_um_embedded``, ``spot_diameter`` in µm, ``patient``, ``st_technology``,
      ``fullres_px_width``/``height``, ...) and the slide's own metadata;
    * an empty ``tissue_seg/`` folder (HEST's ``iter_hest`` looks there).

    A slide whose only image is not at full resolution (Visium without the full-resolution
    image: the Space Ranger hires PNG at ``tissue_hires_scalef``) is written in the frame of
    that image: the TIFF is the hires image, and spot coordinates and the spot diameter are
    multiplied by ``image_scale`` (the pixel size divided by it), so every spot lies on the
    image; ``metadata["hest2sge_frame_scale"]`` records the factor. Every file is written
    atomically.

    Args:
        slides: Slides to write.
        root: Output folder (created).
        patch_size: Side of the patches in pixels (HEST-1k: 224).
        pixel_size_um: µm per patch pixel (None: native resolution; HEST-1k: 0.5).
        compression: TIFF compression of the written WSIs (``None``: uncompressed).

    Returns:
        The paths of the written ``st/<id>.h5ad`` files.
    """
    from hest2sge.cache import atomic_write

    if not isinstance(slides, (list, tuple)):
        slides = [slides]
    root = Path(root)
    for sub in ("st", "patches", "metadata", "wsis", "tissue_seg"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    written = []
    for slide in slides:
        validate_slide(slide, require_image=False)
        sid = _safe_id(slide_id_of(slide))
        entry = spatial_entry(slide)
        has_image = bool(entry.get("image_path")) or "fullres" in entry.get("images", {})
        meta_in = {k: v for k, v in dict(entry.get("metadata", {})).items()
                   if k not in ("hest_patches", "hest_root")}
        frame = float(entry.get("image_scale", 1.0)) if has_image else 1.0
        px = _float_or_nan(entry.get("pixel_size_um")) / frame
        diameter = _float_or_nan(entry.get("scalefactors", {}).get("spot_diameter_fullres")) * frame
        st_tech = meta_in.get("st_technology") or meta_in.get("source")
        meta: dict[str, Any] = {
            **meta_in,
            "id": sid,
            "patient": str(slide.obs["patient_id"].iloc[0]) if slide.n_obs else sid,
            "st_technology": st_tech,
            "pixel_size_um_estimated": px,
            "pixel_size_um_embedded": px,
            "pixel_size_um": px,
            "spot_diameter_fullres": diameter,
            "spot_diameter": diameter * px,
            "spots_under_tissue": int(slide.n_obs),
            "nb_genes": int(slide.n_vars),
            "image_scale": 1.0,
            "hest2sge_frame_scale": frame,
            "patch_size": int(patch_size),
            "patch_pixel_size_um": pixel_size_um,
            "hest2sge_writer_version": HEST_WRITER_VERSION,
        }
        # the ST entry HEST's reader requires, in the frame of the written WSI
        st_entry: dict[str, Any] = {"images": {}, "scalefactors": {}}
        if has_image:
            tmp_entry = {"images": dict(entry.get("images", {})),
                         "scalefactors": dict(entry.get("scalefactors", {})),
                         "image_path": entry.get("image_path", ""),
                         "image_scale": entry.get("image_scale", 1.0)}
            add_scverse_images_to_entry(tmp_entry)
            hires, lowres = tmp_entry["images"]["hires"], tmp_entry["images"]["lowres"]
            sf_h = tmp_entry["scalefactors"]["tissue_hires_scalef"] / frame
            sf_l = tmp_entry["scalefactors"]["tissue_lowres_scalef"] / frame
            st_entry["images"] = {"downscaled_fullres": hires, "hires": hires, "lowres": lowres}
            st_entry["scalefactors"] = {"tissue_downscaled_fullres_scalef": sf_h,
                                        "tissue_hires_scalef": sf_h, "tissue_lowres_scalef": sf_l}

            img = SlideImage(slide)
            try:
                arr = img.array
                h, w = arr.shape[:2]
                atomic_write(root / "wsis" / f"{sid}.tif",
                             lambda tmp, a=arr, q=px: _write_pyramidal_tiff(a, tmp, q, compression))
                meta["fullres_px_width"], meta["fullres_px_height"] = int(w), int(h)
                extent = _write_hest_patches(slide, root / "patches" / f"{sid}.h5", patch_size,
                                             pixel_size_um, img, frame)
                meta["patch_extent_fullres"] = extent
            finally:
                img.release()
        else:
            warnings.warn(f"slide {sid!r} has no image: no wsis/ or patches/ file", stacklevel=2)
        if math.isfinite(diameter):
            st_entry["scalefactors"]["spot_diameter_fullres"] = diameter
        out = slide.copy()
        xy = np.asarray(slide.obsm["spatial"], dtype=np.float64) * frame
        out.obsm["spatial"] = xy
        out.obs["pxl_col_in_fullres"] = xy[:, 0]
        out.obs["pxl_row_in_fullres"] = xy[:, 1]
        out.uns["spatial"] = {"ST": st_entry}
        st_path = root / "st" / f"{sid}.h5ad"
        atomic_write(st_path, lambda tmp, o=out: o.write_h5ad(tmp))

        def _dump(tmp: Path, m: dict[str, Any] = meta) -> None:
            with open(tmp, "w") as fh:
                json.dump(_jsonable(m), fh, indent=1)

        atomic_write(root / "metadata" / f"{sid}.json", _dump)
        written.append(st_path)
    return written


def download_hest(
    ids: Sequence[str] | str,
    root: PathLike,
    *,
    repo_id: str = "MahmoodLab/hest",
    source: PathLike | None = None,
    token: str | None = None,
) -> list[str]:
    """Download HEST-1k samples (every file of each id) into ``root``, in HEST's layout.

    Uses ``huggingface_hub.snapshot_download`` on the dataset repository with
    ``allow_patterns`` selecting the files of the requested ids (``<folder>/<id>.<ext>`` and
    ``<folder>/<id>_<suffix>``). The dataset is gated: accept its terms on the Hugging Face
    page and log in (``huggingface-cli login``) or pass ``token``. With ``source`` (a local
    copy of the repository, e.g. on a cluster file system), the same files are copied from
    there instead, with the same pattern rules.

    Args:
        ids: Sample ids (e.g. ``["TENX96", "NCBI783"]``).
        root: Destination folder (then read with :func:`read_hest`).
        repo_id: The Hugging Face dataset.
        source: A local folder to copy from instead of downloading.
        token: Hugging Face token (default: the logged-in user's).

    Returns:
        The requested ids whose ``st/<id>.h5ad`` is now in ``root``.

    Raises:
        FileNotFoundError: when none of the ids has files (in ``source``).
    """
    if isinstance(ids, str):
        ids = [ids]
    ids = [_safe_id(str(i)) for i in ids]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    patterns = [p for i in ids for p in (f"*/{i}.*", f"*/{i}_*", f"{i}.*", f"{i}_*")]
    if source is None:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id=repo_id, repo_type="dataset", local_dir=str(root),
                          allow_patterns=patterns, token=token)
    else:
        from huggingface_hub.utils import filter_repo_objects

        src = _require(Path(source), "local HEST copy")
        files = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
        chosen = list(filter_repo_objects(files, allow_patterns=patterns))
        if not chosen:
            raise FileNotFoundError(f"no files of {ids} in {src}")
        for rel in chosen:
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dst)
    return [i for i in ids if (root / "st" / f"{i}.h5ad").exists()]
