"""10x Visium readers (Space Ranger 1.x and 2.x outputs)."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hest2sge.data.scverse import add_scverse_images
from hest2sge.data.slide import (
    POSITIVE_SCALEFACTORS,
    SlideError,
    load_image_array,
    make_slide,
    spatial_entry,
    validate_slide,
)
from hest2sge.errors import Hest2sgeInputError, reading

if TYPE_CHECKING:
    from anndata import AnnData

from hest2sge.data.readers._common import (
    _VISIUM_COLUMNS,
    VISIUM_SPOT_DIAMETER_UM,
    _float_or_nan,
    _require,
    _unique_names,
)

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# 10x Visium
# --------------------------------------------------------------------------------------------
def read_10x_h5(path: PathLike) -> dict[str, Any]:
    """Read a 10x Genomics feature-barcode matrix (HDF5, Cell Ranger v2 or v3+ layout).

    Only "Gene Expression" features are kept when feature types are recorded.

    Args:
        path: The ``.h5`` file.

    Returns:
        A dict with ``X`` (barcodes x genes, CSR float32), ``barcodes``, ``gene_ids``,
        ``gene_names`` and ``feature_types`` (lists of str).
    """
    import h5py
    import scipy.sparse as sp

    path = _require(Path(path), "10x matrix file")

    def _strs(ds) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]]

    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                feat = g["features"]
                ids, names = _strs(feat["id"]), _strs(feat["name"])
                types = _strs(feat["feature_type"]) if "feature_type" in feat else None
            else:  # Cell Ranger 2: one group per genome
                groups = [k for k in f.keys() if isinstance(f[k], h5py.Group)]
                if len(groups) != 1:
                    raise SlideError(f"{path}: no 'matrix' group and {len(groups)} genome groups")
                g = f[groups[0]]
                ids, names, types = _strs(g["genes"]), _strs(g["gene_names"]), None
            shape = tuple(int(v) for v in g["shape"][()])
            mat = sp.csc_matrix(
                (g["data"][()], g["indices"][()], g["indptr"][()]), shape=shape
            )
            barcodes = _strs(g["barcodes"])
    except Hest2sgeInputError:
        raise
    except KeyError as err:
        raise SlideError(f"{path}: not a 10x feature-barcode matrix (missing {err})") from None
    except (OSError, ValueError) as err:  # truncated / not HDF5 / inconsistent arrays
        raise Hest2sgeInputError(
            f"cannot read this 10x feature-barcode matrix ({type(err).__name__}: "
            f"{str(err).strip()[:200]})", path=path,
            hint="the file is truncated, corrupt or not a Cell Ranger / Space Ranger .h5; "
            "check it or download it again",
        ) from err
    if len(barcodes) != mat.shape[1] or len(ids) != mat.shape[0]:
        raise SlideError(
            f"{path}: matrix shape {shape} does not match {len(ids)} features and "
            f"{len(barcodes)} barcodes"
        )
    x = sp.csr_matrix(mat.T, dtype=np.float32)
    if types is None:
        types = ["Gene Expression"] * len(ids)
    keep = np.array([t == "Gene Expression" for t in types])
    if not keep.all():
        x = x[:, np.where(keep)[0]]
        ids = [v for v, k in zip(ids, keep) if k]
        names = [v for v, k in zip(names, keep) if k]
        types = [v for v, k in zip(types, keep) if k]
    return {"X": x, "barcodes": barcodes, "gene_ids": ids, "gene_names": names,
            "feature_types": types}


def _read_positions(spatial_dir: Path):
    import pandas as pd

    v2 = spatial_dir / "tissue_positions.csv"
    v1 = spatial_dir / "tissue_positions_list.csv"
    if v2.exists():
        path = v2
    elif v1.exists():
        path = v1
    else:
        raise FileNotFoundError(
            f"spot positions not found: {v2} (Space Ranger 2.x) or {v1} (Space Ranger 1.x)"
        )
    with reading(path, "spot positions CSV"):
        df = pd.read_csv(path, header=None, dtype=str)
    if len(df) and str(df.iloc[0, 0]).strip().lower() == "barcode":
        df.columns = [str(c).strip() for c in df.iloc[0]]
        df = df.iloc[1:].reset_index(drop=True)
        missing = [c for c in _VISIUM_COLUMNS if c not in df.columns]
        if missing:
            raise SlideError(
                f"{path}: missing column(s) {missing}; found {list(df.columns)}; expected "
                f"{list(_VISIUM_COLUMNS)}"
            )
    else:
        if df.shape[1] != len(_VISIUM_COLUMNS):
            raise SlideError(
                f"{path}: expected {len(_VISIUM_COLUMNS)} columns without header "
                f"({', '.join(_VISIUM_COLUMNS)}), found {df.shape[1]}"
            )
        df.columns = list(_VISIUM_COLUMNS)
    df = df[list(_VISIUM_COLUMNS)].copy()
    df["barcode"] = df["barcode"].str.strip()
    try:
        for c in _VISIUM_COLUMNS[1:4]:
            df[c] = df[c].astype(float).round().astype(np.int64)
        for c in _VISIUM_COLUMNS[4:]:
            df[c] = df[c].astype(float)
    except ValueError as err:
        raise SlideError(f"{path}: non-numeric position values ({err})") from None
    if df["barcode"].duplicated().any():
        dup = df["barcode"][df["barcode"].duplicated()].unique()[:5].tolist()
        raise Hest2sgeInputError(
            f"duplicated barcode(s) {dup}", path=path,
            hint="each barcode must have one position row",
        )
    return df.set_index("barcode"), path


def read_visium(
    path: PathLike,
    image: PathLike | None = None,
    slide_id: str | None = None,
    patient_id: str | None = None,
) -> AnnData:
    """Read a Space Ranger (1.x or 2.x) Visium output folder.

    Uses ``filtered_feature_bc_matrix.h5``, ``spatial/tissue_positions.csv`` (2.x, with header)
    or ``spatial/tissue_positions_list.csv`` (1.x, no header) and
    ``spatial/scalefactors_json.json``. In-tissue spots present in the matrix are kept.

    Args:
        path: The Space Ranger ``outs`` folder.
        image: The full-resolution H&E image. Without it the ``tissue_hires_image.png`` (or
            the lowres image) is used at its scale factor; patches are still addressed in
            full-resolution pixels but carry only the detail of the smaller image.
        slide_id: Identifier of the section (default: the folder name).
        patient_id: Identifier of the patient (default: the slide id).

    Returns:
        A slide; ``var_names`` are gene symbols made unique, ``var["gene_ids"]`` the Ensembl
        ids, pixel size = 55 µm / ``spot_diameter_fullres``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Space Ranger output folder not found: {path}")
    matrix = path / "filtered_feature_bc_matrix.h5"
    if not matrix.exists():
        prefixed = sorted(path.glob("*filtered_feature_bc_matrix.h5"))
        if len(prefixed) == 1:
            matrix = prefixed[0]
    _require(matrix, "Visium count matrix")
    spatial_dir = _require(path / "spatial", "Visium spatial folder")
    scalef_path = _require(spatial_dir / "scalefactors_json.json", "Visium scale factors")
    with reading(scalef_path, "scale factors JSON"), open(scalef_path) as fh:
        scalefactors = json.load(fh)
    if not isinstance(scalefactors, dict):
        raise Hest2sgeInputError("the scale factors must be a JSON object", path=scalef_path)
    if "spot_diameter_fullres" not in scalefactors:
        raise SlideError(f"{scalef_path}: no 'spot_diameter_fullres' entry")
    for key in POSITIVE_SCALEFACTORS:
        if key in scalefactors:
            value = _float_or_nan(scalefactors[key])
            if not value > 0:
                raise Hest2sgeInputError(
                    f"{key} = {scalefactors[key]!r} must be a positive number",
                    path=scalef_path, hint="fix or regenerate the Space Ranger scale factors",
                )

    mtx = read_10x_h5(matrix)
    pos, pos_path = _read_positions(spatial_dir)
    in_tissue = pos.index[pos["in_tissue"] == 1]
    barcodes = np.asarray(mtx["barcodes"])
    keep = np.isin(barcodes, in_tissue)
    not_in_positions = int((~np.isin(barcodes, pos.index)).sum())
    if not_in_positions:
        warnings.warn(
            f"{matrix}: {not_in_positions} barcodes have no row in {pos_path}; dropped",
            stacklevel=2,
        )
    if not keep.any():
        raise SlideError(
            f"no in-tissue spot of {pos_path} is in {matrix}: do the files belong together?"
        )
    bc = barcodes[keep]
    p = pos.loc[bc]

    sid = str(slide_id) if slide_id is not None else path.resolve().name
    if image is not None:
        image_path = _require(Path(image), f"full-resolution image of slide {sid!r}")
        scale = 1.0
    else:
        hires = spatial_dir / "tissue_hires_image.png"
        lowres = spatial_dir / "tissue_lowres_image.png"
        if hires.exists() and "tissue_hires_scalef" in scalefactors:
            image_path, scale = hires, float(scalefactors["tissue_hires_scalef"])
        elif lowres.exists() and "tissue_lowres_scalef" in scalefactors:
            image_path, scale = lowres, float(scalefactors["tissue_lowres_scalef"])
        else:
            raise FileNotFoundError(
                f"no image for slide {sid!r}: pass image=<full-resolution image> or provide "
                f"{hires} (with tissue_hires_scalef) or {lowres} (with tissue_lowres_scalef)"
            )
    diameter = _float_or_nan(scalefactors["spot_diameter_fullres"])
    px = VISIUM_SPOT_DIAMETER_UM / diameter if diameter > 0 else float("nan")
    metadata = {
        "source": "visium",
        "matrix_file": str(matrix),
        "positions_file": str(pos_path),
        "n_spots": int(len(bc)),
        "n_spots_matrix": int(len(barcodes)),
        "n_spots_dropped": int(len(barcodes) - len(bc)),
        "n_spots_in_tissue": int(len(in_tissue)),
        "st_technology": "Visium",
    }
    adata = make_slide(
        mtx["X"][np.where(keep)[0]],
        genes=_unique_names(mtx["gene_names"]),
        barcodes=list(bc),
        spatial=p[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64),
        array_row=p["array_row"].to_numpy(),
        array_col=p["array_col"].to_numpy(),
        slide_id=sid,
        patient_id=str(patient_id) if patient_id is not None else sid,
        image_path=image_path,
        image_scale=scale,
        pixel_size_um=px if math.isfinite(px) else None,
        spot_diameter_fullres=diameter if math.isfinite(diameter) else None,
        extra_obs={"in_tissue": p["in_tissue"].to_numpy()},
        metadata=metadata,
        scverse_images=False,
    )
    adata.var["gene_ids"] = mtx["gene_ids"]
    adata.var["feature_types"] = mtx["feature_types"]
    entry = spatial_entry(adata)
    entry["scalefactors"].update({k: _float_or_nan(v) for k, v in scalefactors.items()})
    # scanpy/squidpy images: Space Ranger's own PNGs with their scale factors
    for res in ("hires", "lowres"):
        png = spatial_dir / f"tissue_{res}_image.png"
        if png.exists() and f"tissue_{res}_scalef" in scalefactors:
            entry["images"][res] = load_image_array(png)
    if not all(r in entry["images"] for r in ("hires", "lowres")):
        add_scverse_images(adata)
    validate_slide(adata, source=matrix)
    return adata
