"""AnnData readers: h5ad files and in-memory AnnData objects turned into slides."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hest2sge.data.scverse import add_scverse_images
from hest2sge.data.slide import (
    REQUIRED_OBS,
    SlideError,
    make_slide,
    spatial_entry,
    validate_slide,
)
from hest2sge.errors import reading

if TYPE_CHECKING:
    from anndata import AnnData

from hest2sge.data.readers._common import (
    _float_or_nan,
    _is_missing,
    _natural_key,
    _require,
    _unique_names,
    grid_from_coords,
)

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# h5ad (single or several sections) and the HEST-1k layout
# --------------------------------------------------------------------------------------------
def _single_value(adata, columns: Sequence[str]) -> str | None:
    for col in columns:
        if col in adata.obs:
            vals = adata.obs[col].dropna().astype(str).unique()
            vals = [v for v in vals if not _is_missing(v)]
            if len(vals) == 1:
                return str(vals[0])
            if len(vals) > 1:
                raise SlideError(
                    f"obs[{col!r}] holds several values {sorted(vals)[:5]} within one section"
                )
    return None


def _spot_xy(adata, name: str) -> np.ndarray:
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise SlideError(f"{name}: obsm['spatial'] must be (n_spots, 2), got {xy.shape}")
        return xy[:, :2]
    if {"pxl_col_in_fullres", "pxl_row_in_fullres"} <= set(adata.obs.columns):
        return adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    raise SlideError(
        f"{name}: no spot coordinates: set obsm['spatial'] to the (x, y) spot centres in "
        "full-resolution pixels (or obs 'pxl_col_in_fullres'/'pxl_row_in_fullres')"
    )


def _conform(
    adata,
    slide_id: str,
    patient_id: str,
    image_path: PathLike | None,
    image: np.ndarray | None,
    image_scale: float,
    pixel_size_um: float,
    spot_diameter_fullres: float,
    scalefactors: dict[str, Any] | None,
    metadata: dict[str, Any],
    name: str,
    scverse_images: bool = True,
) -> AnnData:
    """Rebuild ``adata`` as a contract slide, carrying its extra obs/var/obsm/layers."""
    import scipy.sparse as sp

    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if x is None:
        raise SlideError(f"{name}: no expression matrix (X is empty and no layers['counts'])")
    if not sp.issparse(x):
        x = np.asarray(x)
    xy = _spot_xy(adata, name)
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        rows = adata.obs["array_row"].to_numpy()
        cols = adata.obs["array_col"].to_numpy()
        if not (np.isfinite(rows.astype(float)).all() and np.isfinite(cols.astype(float)).all()):
            raise SlideError(f"{name}: obs array_row/array_col contain missing values")
    else:
        rows, cols = grid_from_coords(xy)
        metadata = {**metadata, "array_grid": "derived from spot coordinates"}
    genes = _unique_names(adata.var_names)
    if not adata.var_names.is_unique:
        dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
        warnings.warn(
            f"{name}: duplicated gene names {dup} were made unique the anndata way "
            "('X', 'X-1', ...); sum them beforehand if they are the same gene",
            stacklevel=3,
        )
    slide = make_slide(
        x,
        genes=genes,
        barcodes=list(adata.obs_names),
        spatial=xy,
        array_row=np.asarray(rows).astype(np.int64),
        array_col=np.asarray(cols).astype(np.int64),
        slide_id=slide_id,
        patient_id=patient_id,
        image_path=image_path,
        image=image,
        image_scale=image_scale,
        pixel_size_um=pixel_size_um if math.isfinite(pixel_size_um) else None,
        spot_diameter_fullres=(
            spot_diameter_fullres if math.isfinite(spot_diameter_fullres) else None
        ),
        metadata=metadata,
        scverse_images=scverse_images,
    )
    for col in adata.obs.columns:
        if col not in REQUIRED_OBS:
            slide.obs[col] = adata.obs[col].to_numpy()
    for col in adata.var.columns:
        slide.var[col] = adata.var[col].to_numpy()
    for key in adata.obsm.keys():
        if key != "spatial":
            slide.obsm[key] = adata.obsm[key]
    for key in adata.layers.keys():
        slide.layers[key] = adata.layers[key]
    for key, val in adata.uns.items():
        if key != "spatial":
            slide.uns[key] = val
    if scalefactors:
        entry = spatial_entry(slide)
        for k, v in scalefactors.items():
            if k not in entry["scalefactors"] or not math.isfinite(entry["scalefactors"][k]):
                entry["scalefactors"][k] = _float_or_nan(v)
    return slide


def read_h5ad(
    path: PathLike,
    slide_id: str | None = None,
    patient_id: str | None = None,
    *,
    image: PathLike | None = None,
    require_image: bool = True,
) -> list[AnnData]:
    """Read an h5ad file holding one or several sections.

    Sections are split on the first of the obs columns ``slide_id``, ``sample`` and
    ``library_id`` that exists. The image of a section is taken from ``uns["spatial"]`` in the
    hest2sge layout (``image_path``), from a scanpy-style entry (``images["hires"]`` with
    ``scalefactors["tissue_hires_scalef"]``, kept in memory) or from ``image``.
    ``layers["counts"]`` is used as the raw counts when present. Array rows/columns missing
    from obs are derived from the spot coordinates.

    Args:
        path: The ``.h5ad`` file.
        slide_id: Read only this section (several sections), or the name of the single section
            (default: the section column's value, the only ``uns["spatial"]`` key, or the file
            stem).
        patient_id: Patient of every section read (default: obs ``patient_id``/``patient``;
            otherwise each section is its own patient, with a warning).
        image: Full-resolution image file, for files that hold a single section.
        require_image: Raise when a section has no image (set False for expression-only use).

    Returns:
        One slide per section.

    Raises:
        SlideError: when a contract field cannot be inferred (e.g. no ``obsm["spatial"]``).
    """
    import anndata as ad

    path = _require(Path(path), "h5ad file")
    with warnings.catch_warnings():
        # barcodes often repeat across the sections of one file; checked per section below
        warnings.filterwarnings("ignore", message="Observation names are not unique")
        with reading(path, "h5ad file"):
            adata = ad.read_h5ad(path)
    return slides_from_anndata(adata, slide_id, patient_id, image=image,
                               require_image=require_image, name=str(path), source_file=path)


def slides_from_anndata(
    adata: AnnData,
    slide_id: str | None = None,
    patient_id: str | None = None,
    *,
    image: PathLike | None = None,
    require_image: bool = True,
    name: str = "AnnData",
    source_file: PathLike | None = None,
) -> list[AnnData]:
    """Contract slides from an in-memory AnnData (see :func:`read_h5ad` for the rules).

    Args:
        adata: One or several sections.
        slide_id: Section to keep, or the name of the single section.
        patient_id: Patient of every section.
        image: Full-resolution image file (single section only).
        require_image: Raise when a section has no image.
        name: How the object is named in error messages.
        source_file: The file it was read from (relative image paths are resolved there).

    Returns:
        One slide per section, with scverse ``hires``/``lowres`` images when it has an image.
    """
    src = Path(source_file) if source_file is not None else None
    key = next((c for c in ("slide_id", "sample", "library_id") if c in adata.obs), None)
    uns_spatial = adata.uns.get("spatial", {}) if isinstance(adata.uns.get("spatial"), dict) else {}
    if key is None:
        if slide_id is not None:
            sid = str(slide_id)
        elif len(uns_spatial) == 1:
            sid = str(next(iter(uns_spatial)))
        else:
            sid = src.stem if src is not None else "slide"
        groups = [(sid, np.ones(adata.n_obs, dtype=bool))]
    else:
        labels = adata.obs[key].astype(str).to_numpy()
        ids = sorted(set(labels), key=_natural_key)
        if slide_id is not None:
            if str(slide_id) not in ids:
                raise SlideError(
                    f"{name}: no section {slide_id!r} in obs[{key!r}]; sections: {ids[:20]}"
                )
            ids = [str(slide_id)]
        groups = [(sid, labels == sid) for sid in ids]
    if image is not None and len(groups) > 1:
        raise SlideError(f"{name}: image= applies to a single section, found {len(groups)}")

    slides = []
    for sid, mask in groups:
        where = f"{name} section {sid!r}"
        sub = adata[mask].copy() if not mask.all() else adata
        if not sub.obs_names.is_unique:
            dup = sub.obs_names[sub.obs_names.duplicated()][:5].tolist()
            raise SlideError(f"{where}: duplicated barcodes {dup} within one section")
        patient = str(patient_id) if patient_id is not None else _single_value(
            sub, ("patient_id", "patient")
        )
        if patient is None:
            warnings.warn(
                f"{where}: no obs 'patient_id'/'patient' and no patient_id given; using the "
                "slide id as patient id (patient-grouped splits then treat each section as "
                "its own patient)",
                stacklevel=3,
            )
            patient = sid
        entry = uns_spatial.get(sid)
        if entry is None and len(uns_spatial) == 1 and len(groups) == 1:
            entry = next(iter(uns_spatial.values()))
        entry = dict(entry or {})
        scalefactors = dict(entry.get("scalefactors", {}) or {})
        images = dict(entry.get("images", {}) or {})
        img_path: PathLike | None = None
        img_arr = None
        scale = 1.0
        if image is not None:
            img_path = _require(Path(image), f"image of {where}")
        elif entry.get("image_path"):
            img_path = Path(str(entry["image_path"]))
            if not img_path.is_absolute() and not img_path.exists() and src is not None:
                img_path = src.parent / img_path
            scale = _float_or_nan(entry.get("image_scale", 1.0))
        elif "fullres" in images:
            img_arr, scale = np.asarray(images["fullres"]), _float_or_nan(
                entry.get("image_scale", 1.0)
            )
        elif "hires" in images and "tissue_hires_scalef" in scalefactors:
            img_arr = np.asarray(images["hires"])
            scale = _float_or_nan(scalefactors["tissue_hires_scalef"])
        elif "lowres" in images and "tissue_lowres_scalef" in scalefactors:
            img_arr = np.asarray(images["lowres"])
            scale = _float_or_nan(scalefactors["tissue_lowres_scalef"])
        if img_path is None and img_arr is None and require_image:
            raise SlideError(
                f"{where}: no image found in uns['spatial'] (image_path, or images 'hires' "
                "with scalefactors 'tissue_hires_scalef'); pass image=<path> or "
                "require_image=False"
            )
        if not scale > 0:
            raise SlideError(f"{where}: invalid image scale {scale}")
        if image is not None:  # scale factors of the scanpy images do not apply to this image
            scalefactors = {k: v for k, v in scalefactors.items()
                            if not (k.startswith("tissue_") and k.endswith("_scalef"))}
        meta = dict(entry.get("metadata", {}) or {})
        if src is not None:
            meta["source_file"] = str(src)
        slide = _conform(
            sub,
            slide_id=sid,
            patient_id=patient,
            image_path=img_path,
            image=img_arr,
            image_scale=scale,
            pixel_size_um=_float_or_nan(entry.get("pixel_size_um")),
            spot_diameter_fullres=_float_or_nan(scalefactors.get("spot_diameter_fullres")),
            scalefactors=scalefactors,
            metadata=meta,
            name=where,
            scverse_images=False,
        )
        new_entry = spatial_entry(slide)
        if image is None and all(k in images and f"tissue_{k}_scalef" in scalefactors
                                 for k in ("hires", "lowres")):
            for k in ("hires", "lowres"):  # the file's own scanpy images: not decoded again
                new_entry["images"][k] = np.asarray(images[k])
                new_entry["scalefactors"][f"tissue_{k}_scalef"] = _float_or_nan(
                    scalefactors[f"tissue_{k}_scalef"])
        else:
            add_scverse_images(slide)
        validate_slide(slide, require_image=require_image, source=src)
        slides.append(slide)
    return slides
