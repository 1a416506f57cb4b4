"""Helpers shared by the readers: constants, name handling, numeric tables, spot lattices."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hest2sge.data.slide import (
    SlideError,
)
from hest2sge.errors import Hest2sgeInputError, reading

if TYPE_CHECKING:
    pass

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


def _check_header_unique(path: Path, sep: str, what: str, skip_first: bool) -> None:
    """Duplicated column names in a table's header (pandas would silently rename the second
    ``X`` to ``X.1``, which then looks like a gene of its own)."""
    import pandas as pd

    with reading(path, what):
        head = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str,
                           keep_default_na=False)
    names = [str(v).strip() for v in head.iloc[0].tolist()] if len(head) else []
    names = names[1:] if skip_first else names
    seen: dict[str, int] = {}
    dup = []
    for i, n in enumerate(names):
        if n in seen and n not in dup:
            dup.append(n)
        seen.setdefault(n, i)
    if dup:
        raise Hest2sgeInputError(
            f"duplicated column name(s) {dup[:5]} in the header of this {what}",
            path=path,
            hint="each gene (column) must appear once; sum or drop the duplicated columns",
        )


def _numeric_table(df, path: Path, what: str) -> np.ndarray:
    """The values of a counts table as float32, naming the first non-numeric, missing,
    infinite or negative cell (file row = header line + 1-based data row)."""
    import pandas as pd

    text = [c for c, t in zip(df.columns, df.dtypes) if not pd.api.types.is_numeric_dtype(t)]
    values = df
    if text:  # only columns pandas could not parse as numbers need a closer look
        values = df.copy()
        values[text] = values[text].apply(pd.to_numeric, errors="coerce")
    arr = values.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(arr) | (arr < 0)
    if bad.any():
        r, c = (int(v[0]) for v in np.nonzero(bad))
        raw = df.iat[r, c]
        kind = ("a negative count" if np.isfinite(arr[r, c]) else
                "an infinite value" if np.isinf(arr[r, c]) else
                "an empty cell" if _is_missing(raw) else "a non-numeric cell")
        raise Hest2sgeInputError(
            f"{kind} {raw!r} in this {what} (spot {df.index[r]!r}, {int(bad.sum())} bad "
            "cell(s) in all)",
            path=path, row=r + 2, column=str(df.columns[c]),
            hint="counts must be finite, non-negative numbers",
        )
    return arr.astype(np.float32)


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

