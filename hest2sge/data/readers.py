"""Readers for spatial transcriptomics slides: legacy ST (HER2+, cSCC), Visium, HEST-1k and h5ad.

Every reader returns one AnnData per tissue section following the slide contract of
:mod:`hest2sge.data.slide` (``validate_slide`` passes). Images are never decoded here: slides
hold a path (or, for h5ad files with embedded images, an in-memory array) and patches are cut
later by :mod:`hest2sge.data.patches`.
"""

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

from hest2sge.data.slide import (
    REQUIRED_OBS,
    SlideError,
    SlideImage,
    add_scverse_images,
    add_scverse_images_to_entry,
    load_image_array,
    make_slide,
    slide_id_of,
    spatial_entry,
    validate_slide,
)

if TYPE_CHECKING:
    from anndata import AnnData

PathLike = str | os.PathLike

#: Legacy Spatial Transcriptomics: spot diameter and centre-to-centre pitch in micrometres.
ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0
#: 10x Visium spot diameter in micrometres.
VISIUM_SPOT_DIAMETER_UM = 55.0
#: Version of the HEST-style folder written by :func:`write_hest`.
HEST_WRITER_VERSION = 2

_VISIUM_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg")


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _require(path: Path, what: str, hint: str = "") -> Path:
    if not path.exists():
        msg = f"{what} not found: {path}"
        raise FileNotFoundError(msg + (f" ({hint})" if hint else ""))
    return path


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none", "na")


def _float_or_nan(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return out if math.isfinite(out) else float("nan")


def _jsonable(value: Any) -> Any:
    """Turn numpy scalars/arrays and NaN into plain JSON values (NaN -> None)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.decode()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _h5ad_safe(value: Any) -> Any:
    """Drop values h5ad cannot store (None) from nested metadata."""
    if isinstance(value, dict):
        return {str(k): _h5ad_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        vals = [v for v in value if v is not None]
        if vals and all(isinstance(v, str) for v in vals):
            return list(vals)
        return np.asarray(vals) if vals else np.zeros(0)
    return value


def _unique_names(names: Sequence[str]) -> list[str]:
    """Make names unique the anndata way (second 'X' becomes 'X-1', ...)."""
    import anndata as ad
    import pandas as pd

    return list(ad.utils.make_index_unique(pd.Index([str(n) for n in names])))


# --------------------------------------------------------------------------------------------
# grid helpers
# --------------------------------------------------------------------------------------------
def estimate_st_pixel_size(
    array_row: Sequence[int],
    array_col: Sequence[int],
    spatial: np.ndarray,
    pitch_um: float = ST_SPOT_PITCH_UM,
) -> float:
    """Micrometres per pixel of a legacy ST slide from its spot grid.

    Spots that are neighbours on the array (same row and adjacent columns, or same column and
    adjacent rows) are ``pitch_um`` apart on the tissue; the median of their pixel distances
    gives the scale.

    Args:
        array_row: Row of each spot on the array grid.
        array_col: Column of each spot on the array grid.
        spatial: (n, 2) spot centres in pixels.
        pitch_um: Centre-to-centre distance of adjacent spots (200 µm for legacy ST).

    Returns:
        µm per pixel, or NaN when no two spots are adjacent on the grid.
    """
    rows = np.asarray(array_row, dtype=np.int64)
    cols = np.asarray(array_col, dtype=np.int64)
    xy = np.asarray(spatial, dtype=np.float64)
    where = {(int(r), int(c)): i for i, (r, c) in enumerate(zip(rows, cols))}
    dists = []
    for i, (r, c) in enumerate(zip(rows, cols)):
        for key in ((int(r), int(c) + 1), (int(r) + 1, int(c))):
            j = where.get(key)
            if j is not None:
                dists.append(float(np.hypot(*(xy[i] - xy[j]))))
    if not dists:
        return float("nan")
    return pitch_um / float(np.median(dists))


def grid_from_coords(spatial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Derive integer array rows/columns from spot centres.

    The spot lattice (square as in legacy ST, or hexagonal as in Visium) is detected from the
    directions of nearest-neighbour vectors, the coordinates are rotated onto it and divided by
    the spot pitch. Hexagonal lattices get Visium-style doubled column indices.

    Args:
        spatial: (n, 2) spot centres (x, y).

    Returns:
        ``(array_row, array_col)`` int64 arrays starting at 0.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(spatial, dtype=np.float64)
    n = len(xy)
    if n < 2:
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    dist, idx = cKDTree(xy).query(xy, k=min(n, 7))
    pitch = float(np.median(dist[:, 1]))
    if not pitch > 0:
        raise SlideError("cannot derive the spot grid: several spots share the same coordinates")
    nbr = idx[:, 1:]
    near = dist[:, 1:] < 1.2 * pitch
    src = np.repeat(np.arange(n)[:, None], nbr.shape[1], axis=1)
    vec = xy[nbr[near]] - xy[src[near]]
    ang = np.arctan2(vec[:, 1], vec[:, 0])
    coh = {k: abs(np.mean(np.exp(1j * k * ang))) for k in (4, 6)}
    k = 6 if coh[6] > coh[4] else 4
    theta = float(np.angle(np.mean(np.exp(1j * k * ang)))) / k
    c, s = math.cos(theta), math.sin(theta)
    xr = xy[:, 0] * c + xy[:, 1] * s
    yr = -xy[:, 0] * s + xy[:, 1] * c
    # lattice steps along the rotated axes, from the neighbour vectors themselves (the median
    # nearest-neighbour distance underestimates the pitch of jittered legacy ST grids)
    vx = np.abs(vec[:, 0] * c + vec[:, 1] * s)
    vy = np.abs(-vec[:, 0] * s + vec[:, 1] * c)
    along_x, along_y = vx >= vy, vy > vx
    step_x = float(np.median(vx[along_x])) if along_x.any() else pitch
    step_y = float(np.median(vy[along_y])) if along_y.any() else pitch
    if k == 6:  # Visium-style doubled columns: neighbours in a row are two columns apart
        step_x /= 2.0

    def _index(v: np.ndarray, step: float) -> np.ndarray:
        u = (v - v.min()) / step
        off = float(np.median(u - np.round(u)))
        out = np.round(u - off).astype(np.int64)
        return out - out.min()

    return _index(yr, step_y), _index(xr, step_x)


# --------------------------------------------------------------------------------------------
# legacy ST / HER2+
# --------------------------------------------------------------------------------------------
def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file without decoding it."""
    if path.suffix.lower() in (".tif", ".tiff", ".btf"):
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            shape = tif.pages[0].shape
        return int(shape[1]), int(shape[0])
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return int(im.size[0]), int(im.size[1])
    finally:
        Image.MAX_IMAGE_PIXELS = old


def read_legacy_st(
    counts_path: PathLike,
    spots_path: PathLike,
    image_path: PathLike | None,
    slide_id: str,
    patient_id: str,
    source: str = "legacy_st",
) -> AnnData:
    """Read one legacy Spatial Transcriptomics section (HER2+ / cSCC style files).

    Args:
        counts_path: Counts table (tab separated, optionally gzipped): rows ``"XxY"`` array
            positions (first column unnamed), columns gene symbols.
        spots_path: Spot file with columns ``x, y, pixel_x, pixel_y`` and optionally
            ``selected`` (tab or comma separated).
        image_path: The H&E image of the section (None: an expression-only slide, e.g. for
            gene panels; it has no image and cannot be cut into patches).
        slide_id: Identifier of the section.
        patient_id: Identifier of the patient.
        source: Name recorded in the slide metadata.

    Returns:
        A slide. Spots present in both files (and ``selected == 1``) are kept, in the order of
        the counts file; how many were dropped is recorded in
        ``uns["spatial"][slide_id]["metadata"]``.
    """
    import pandas as pd
    import scipy.sparse as sp

    counts_path, spots_path = Path(counts_path), Path(spots_path)
    _require(counts_path, f"counts file of section {slide_id!r}")
    _require(spots_path, f"spot file of section {slide_id!r}")
    if image_path is not None:
        image_path = _require(Path(image_path), f"image of section {slide_id!r}")

    counts = pd.read_csv(counts_path, sep="\t", index_col=0)
    counts.index = counts.index.astype(str).str.strip()
    if counts.index.has_duplicates:
        dup = counts.index[counts.index.duplicated()][:5].tolist()
        raise SlideError(f"{counts_path}: duplicated spot rows {dup}")
    if len(counts) and not counts.index.str.fullmatch(r"\d+x\d+").all():
        bad = counts.index[~counts.index.str.fullmatch(r"\d+x\d+")][:3].tolist()
        raise SlideError(
            f"{counts_path}: rows must be spot positions 'XxY' (first column), found {bad}; "
            "is the table transposed (genes as rows)?"
        )

    sep = "," if spots_path.name.lower().endswith((".csv", ".csv.gz")) else "\t"
    spots = pd.read_csv(spots_path, sep=sep)
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in spots.columns]
    if missing:
        raise SlideError(
            f"{spots_path}: missing column(s) {missing}; found {list(spots.columns)}; "
            "expected x, y, pixel_x, pixel_y (and optionally selected)"
        )
    spots = spots.copy()
    for c in ("x", "y"):
        if not np.allclose(spots[c], np.round(spots[c])):
            raise SlideError(f"{spots_path}: column {c!r} must hold integer array positions")
        spots[c] = np.round(spots[c]).astype(np.int64)
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    if spots.index.has_duplicates:
        dup = spots.index[spots.index.duplicated()][:5].tolist()
        warnings.warn(f"{spots_path}: duplicated spots {dup}; keeping the first", stacklevel=2)
        spots = spots[~spots.index.duplicated()]

    n_unselected = 0
    if "selected" in spots.columns:
        sel = spots["selected"].fillna(0).astype(float) == 1
        n_unselected = int((~sel & spots.index.isin(counts.index)).sum())
        spots = spots[sel]
    in_both = counts.index.isin(spots.index)
    counts_only = counts.index[~counts.index.isin(spots.index)]
    spots_only = spots.index[~spots.index.isin(counts.index)]
    kept = counts.index[in_both]
    counts = counts.loc[kept]
    spots = spots.loc[kept]
    n_dropped = len(counts_only) + len(spots_only)

    xy = spots[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    rows = spots["y"].to_numpy()
    cols = spots["x"].to_numpy()
    px = estimate_st_pixel_size(rows, cols, xy, ST_SPOT_PITCH_UM)
    if not math.isfinite(px):
        warnings.warn(
            f"section {slide_id!r}: no two spots are adjacent on the array; pixel size unknown",
            stacklevel=2,
        )
    width, height = _image_size(image_path) if image_path is not None else (None, None)
    metadata = {
        "source": source,
        "counts_file": str(counts_path),
        "spot_file": str(spots_path),
        "n_spots": int(len(kept)),
        "n_spots_dropped": int(n_dropped),
        "n_spots_counts_only": int(len(counts_only)),
        "n_spots_spotfile_only": int(len(spots_only)),
        "n_spots_unselected": int(n_unselected),
        "dropped_spots": [str(b) for b in list(counts_only) + list(spots_only)],
        "pixel_size_method": f"median pixel distance of array-adjacent spots = "
        f"{ST_SPOT_PITCH_UM:g} um",
        "st_technology": "Spatial Transcriptomics",
    }
    if image_path is not None:
        metadata.update(image_file=str(image_path), image_width=width, image_height=height)
    x = sp.csr_matrix(counts.to_numpy(dtype=np.float32))
    return make_slide(
        x,
        genes=_unique_names(counts.columns),
        barcodes=list(kept),
        spatial=xy,
        array_row=rows,
        array_col=cols,
        slide_id=slide_id,
        patient_id=patient_id,
        image_path=image_path,
        image_scale=1.0,
        pixel_size_um=px if math.isfinite(px) else None,
        spot_diameter_fullres=ST_SPOT_DIAMETER_UM / px if math.isfinite(px) else None,
        metadata=metadata,
    )


def _single_image(folder: Path, section: str) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder of section {section!r} not found: {folder} "
            "(expected ST-imgs/<patient letter>/<section>/*.jpg)"
        )
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"no .jpg image of section {section!r} in {folder}")
    if len(found) > 1:
        raise SlideError(
            f"several images for section {section!r} in {folder}: {[p.name for p in found]}; "
            "keep exactly one .jpg there"
        )
    return found[0]


def read_her2st(
    root: PathLike,
    sections: Sequence[str] | str | None = None,
    patient_from_section: bool = True,
    images: bool = True,
) -> list[AnnData]:
    """Read HER2+ breast cancer sections in the layout of the almaan/her2st repository.

    Files per section ``sec`` (e.g. ``"A1"``): ``ST-cnts/<sec>.tsv.gz``,
    ``ST-spotfiles/<sec>_selection.tsv`` and the single ``.jpg`` in
    ``ST-imgs/<sec[0]>/<sec>/`` (its file name differs from the section name).

    Spot centres come from ``pixel_x, pixel_y``; the array grid is ``array_row = y`` and
    ``array_col = x``. The pixel size is estimated from the 200 µm spot pitch and the spot
    diameter is 100 µm.

    Args:
        root: The folder holding ``ST-cnts/``, ``ST-spotfiles/`` and ``ST-imgs/`` (the
            repository's ``data/`` folder; the repository root works too).
        sections: Section names to read (default: every ``ST-cnts/*.tsv.gz``, sorted).
        patient_from_section: Patient = first letter of the section name (A..H). When False,
            each section is its own patient.
        images: Read the H&E images. ``False`` reads expression only (no ``ST-imgs/`` needed,
            e.g. all 36 sections of the counts-only release, for gene panels); such slides
            have no image.

    Returns:
        One slide per section.

    Raises:
        FileNotFoundError: naming the file looked for when a section's file is missing.
    """
    root = Path(root)
    if not (root / "ST-cnts").is_dir() and (root / "data" / "ST-cnts").is_dir():
        root = root / "data"
    cnt_dir = _require(
        root / "ST-cnts",
        "her2st counts folder",
        "expected the almaan/her2st layout: ST-cnts/, ST-spotfiles/, ST-imgs/",
    )
    if sections is None:
        names = {p.name.split(".")[0] for p in cnt_dir.glob("*.tsv*")}
        sections = sorted(names, key=_natural_key)
        if not sections:
            raise FileNotFoundError(f"no <section>.tsv.gz counts files in {cnt_dir}")
    elif isinstance(sections, str):
        sections = [sections]
    slides = []
    for sec in sections:
        counts = cnt_dir / f"{sec}.tsv.gz"
        if not counts.exists() and (cnt_dir / f"{sec}.tsv").exists():
            counts = cnt_dir / f"{sec}.tsv"
        _require(counts, f"counts file of section {sec!r}")
        spots = _require(
            root / "ST-spotfiles" / f"{sec}_selection.tsv", f"spot file of section {sec!r}"
        )
        image = _single_image(root / "ST-imgs" / sec[:1] / sec, sec) if images else None
        patient = sec[:1] if patient_from_section else sec
        slides.append(read_legacy_st(counts, spots, image, sec, patient, source="her2st"))
    return slides


_CSCC_COUNTS = re.compile(r"^(?:GSM\d+_)?(?P<name>.+?)_stdata\.tsv(?:\.gz)?$")


def _one_match(folder: Path, patterns: Sequence[str], what: str, name: str) -> Path | None:
    found = sorted({p for pat in patterns for p in folder.glob(pat)})
    if len(found) > 1:
        raise SlideError(
            f"several {what} files for section {name!r} in {folder}: {[p.name for p in found]}"
        )
    return found[0] if found else None


def read_cscc(
    root: PathLike,
    sections: Sequence[str] | str | None = None,
    images: bool = True,
) -> list[AnnData]:
    """Read cutaneous squamous cell carcinoma sections as published on GEO (GSE144240).

    Ji et al., Cell 2020: legacy Spatial Transcriptomics of patients P2, P5, P9 and P10, three
    replicate sections each (``P2_ST_rep1`` ...). The series' supplementary files, unpacked in
    one folder (``GSE144240_RAW/``), are per section ``<GSM>_<section>_stdata.tsv[.gz]``
    (counts: spots ``"XxY"`` x genes), ``<GSM>_spot_data-all-<section>.tsv[.gz]`` (spot
    detector table) and ``<GSM>_<section>.jpg`` (H&E); the GSM prefix may be absent. Each
    section is read by the legacy-ST reader :func:`read_legacy_st` (same rules as HER2+).

    Args:
        root: The folder holding the files.
        sections: Section names (default: every ``*_stdata.tsv[.gz]`` found, natural order).
        images: Read the H&E images (``False``: expression only).

    Returns:
        One slide per section; ``patient_id`` is the part before ``_ST`` (``"P2"``).

    Raises:
        FileNotFoundError: naming the file pattern looked for when a section's file is missing
            (a gzipped image must be unpacked first).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cSCC folder not found: {root} (expected the unpacked "
                                "GSE144240_RAW files)")
    found = {}
    for p in root.iterdir():
        m = _CSCC_COUNTS.match(p.name)
        if m:
            found.setdefault(m["name"], []).append(p)
    if sections is None:
        sections = sorted(found, key=_natural_key)
        if not sections:
            raise FileNotFoundError(f"no <section>_stdata.tsv[.gz] counts files in {root}")
    elif isinstance(sections, str):
        sections = [sections]
    slides = []
    for name in sections:
        counts = _one_match(root, (f"{name}_stdata.tsv*", f"GSM*_{name}_stdata.tsv*"),
                            "counts", name)
        if counts is None:
            raise FileNotFoundError(f"counts file of section {name!r} not found in {root} "
                                    f"(looked for [GSM*_]{name}_stdata.tsv[.gz])")
        spots = _one_match(root, (f"*spot_data-all-{name}.tsv*",), "spot", name)
        if spots is None:
            raise FileNotFoundError(f"spot file of section {name!r} not found in {root} "
                                    f"(looked for [GSM*_]spot_data-all-{name}.tsv[.gz])")
        image = None
        if images:
            image = _one_match(root, (f"{name}.jpg", f"GSM*_{name}.jpg", f"{name}.jpeg",
                                      f"GSM*_{name}.jpeg"), "image", name)
            if image is None:
                gz = sorted(root.glob(f"*{name}.jp*g.gz"))
                hint = f"; unpack {gz[0].name} first (gunzip)" if gz else ""
                raise FileNotFoundError(f"image of section {name!r} not found in {root} "
                                        f"(looked for [GSM*_]{name}.jpg){hint}")
        patient = name.split("_ST")[0] if "_ST" in name else name.split("_")[0]
        slides.append(read_legacy_st(counts, spots, image, name, patient, source="cscc"))
    return slides


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
    except KeyError as err:
        raise SlideError(f"{path}: not a 10x feature-barcode matrix (missing {err})") from None
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
    with open(scalef_path) as fh:
        scalefactors = json.load(fh)
    if "spot_diameter_fullres" not in scalefactors:
        raise SlideError(f"{scalef_path}: no 'spot_diameter_fullres' entry")

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
    entry["scalefactors"].update({k: float(v) for k, v in scalefactors.items()})
    # scanpy/squidpy images: Space Ranger's own PNGs with their scale factors
    for res in ("hires", "lowres"):
        png = spatial_dir / f"tissue_{res}_image.png"
        if png.exists() and f"tissue_{res}_scalef" in scalefactors:
            entry["images"][res] = load_image_array(png)
    if not all(r in entry["images"] for r in ("hires", "lowres")):
        add_scverse_images(adata)
    return adata


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
        validate_slide(slide, require_image=require_image)
        slides.append(slide)
    return slides


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
            with open(meta_path) as fh:
                meta = json.load(fh)
        else:
            warnings.warn(f"{meta_path} not found: pixel size and patient unknown", stacklevel=2)
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
        validate_slide(slide, require_image=wsi is not None)
        slides.append(slide)
    return slides


def _hest_scverse_images(slide, images: dict[str, Any], scalefactors: dict[str, Any]) -> None:
    """scanpy ``hires``/``lowres`` images of a HEST sample: from the h5ad's own images
    (``hires``/``lowres``, or HEST-1k's ``downscaled_fullres``), else from the WSI's pyramid."""
    from hest2sge.data.slide import HIRES_MAX_SIDE, _resize_to

    entry = spatial_entry(slide)
    src, sf = None, None
    if "hires" in images and "tissue_hires_scalef" in scalefactors:
        src, sf = images["hires"], scalefactors["tissue_hires_scalef"]
    elif "downscaled_fullres" in images and "tissue_downscaled_fullres_scalef" in scalefactors:
        src, sf = images["downscaled_fullres"], scalefactors["tissue_downscaled_fullres_scalef"]
    sf = _float_or_nan(sf)
    if src is not None and np.asarray(src).ndim == 3 and sf > 0:
        from hest2sge.data.slide import _as_rgb_uint8

        src = _as_rgb_uint8(np.asarray(src), slide_id_of(slide))
        hires = np.ascontiguousarray(_resize_to(src, HIRES_MAX_SIDE))
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
