"""Legacy Spatial Transcriptomics readers: HER2+ (almaan/her2st layout) and cSCC (GEO GSE144240)."""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hest2sge.data.images import image_dimensions
from hest2sge.data.slide import (
    SlideError,
    make_slide,
    validate_slide,
)
from hest2sge.errors import Hest2sgeInputError, reading

if TYPE_CHECKING:
    from anndata import AnnData

from hest2sge.data.readers._common import (
    _IMAGE_SUFFIXES,
    ST_SPOT_DIAMETER_UM,
    ST_SPOT_PITCH_UM,
    _check_header_unique,
    _natural_key,
    _numeric_table,
    _require,
    estimate_st_pixel_size,
)

PathLike = str | os.PathLike


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

    _check_header_unique(counts_path, "\t", "counts table", skip_first=True)
    with reading(counts_path, "counts table (tab separated, optionally gzipped)"):
        counts = pd.read_csv(counts_path, sep="\t", index_col=0)
    counts.index = counts.index.astype(str).str.strip()
    if counts.index.has_duplicates:
        dup = counts.index[counts.index.duplicated()][:5].tolist()
        raise SlideError(f"{counts_path}: duplicated spot rows {dup}")
    if counts.shape[1] == 0:
        raise SlideError(f"{counts_path}: the counts table has no gene columns")
    if len(counts) and not counts.index.str.fullmatch(r"\d+x\d+").all():
        bad = counts.index[~counts.index.str.fullmatch(r"\d+x\d+")][:3].tolist()
        raise SlideError(
            f"{counts_path}: rows must be spot positions 'XxY' (first column), found {bad}; "
            "is the table transposed (genes as rows)?"
        )

    sep = "," if spots_path.name.lower().endswith((".csv", ".csv.gz")) else "\t"
    with reading(spots_path, "spot file"):
        spots = pd.read_csv(spots_path, sep=sep)
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in spots.columns]
    if missing:
        raise SlideError(
            f"{spots_path}: missing column(s) {missing}; found {list(spots.columns)}; "
            "expected x, y, pixel_x, pixel_y (and optionally selected)"
        )
    spots = spots.copy()
    for c in ("x", "y", "pixel_x", "pixel_y"):
        num = pd.to_numeric(spots[c], errors="coerce")
        if not np.isfinite(num.to_numpy(dtype=np.float64)).all():
            r = int(np.flatnonzero(~np.isfinite(num.to_numpy(dtype=np.float64)))[0])
            raise Hest2sgeInputError(
                f"non-numeric or missing value {spots[c].iloc[r]!r}", path=spots_path,
                row=r + 2, column=c, hint="spot positions must be finite numbers",
            )
        spots[c] = num
    for c in ("x", "y"):
        if not np.allclose(spots[c], np.round(spots[c])):
            raise SlideError(f"{spots_path}: column {c!r} must hold integer array positions")
        spots[c] = np.round(spots[c]).astype(np.int64)
    spots.index = [f"{x}x{y}" for x, y in zip(spots["x"], spots["y"])]
    if spots.index.has_duplicates:
        dup = spots.index[spots.index.duplicated()].unique()[:5].tolist()
        rows = (np.flatnonzero(spots.index.isin(dup[:1])) + 2).tolist()
        raise Hest2sgeInputError(
            f"duplicated spot(s) {dup} (spot {dup[0]!r} on lines {rows})",
            path=spots_path,
            hint="each array position x, y must appear once; remove the wrong row (which "
            "pixel position is right cannot be decided here)",
        )

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
    if image_path is not None:
        with reading(image_path, "image"):
            width, height = image_dimensions(image_path)
    else:
        width, height = None, None
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
    x = sp.csr_matrix(_numeric_table(counts, counts_path, "counts table"))
    slide = make_slide(
        x,
        genes=[str(c).strip() for c in counts.columns],
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
    validate_slide(slide, require_image=False, source=counts_path)  # image required above
    return slide


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
