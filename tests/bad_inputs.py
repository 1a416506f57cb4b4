"""Malformed inputs and faults: one case per kind, shared by the bad-input test suite
(tests/test_bad_input.py) and the campaign script (benchmarks/bad_input_campaign.py).

Every case builds its input in a temporary folder and returns a :class:`Probe`: the call to
make, the text the error (or warning) must contain (the file name or argument), and for
``kind="warn"`` cases a check of the returned result. Cases use only the public API, so the
campaign can also run against older versions of hest2sge.
"""

from __future__ import annotations

import gzip
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Probe:
    """What to call and what its error (or warning) must name."""

    call: Callable[[], Any]
    needle: str
    check: Callable[[Any], None] | None = None


@dataclass
class Case:
    id: str
    #: "error" (Hest2sgeInputError), "missing" (FileNotFoundError), "lookup" (KeyError or
    #: ValueError from a lookup outside issue 12's files, already clear) or "warn"
    kind: str
    build: Callable[[Path], Probe]
    note: str = field(default="")


CASES: list[Case] = []


def case(kind: str = "error", note: str = ""):
    def deco(fn: Callable[[Path], Probe]) -> Callable[[Path], Probe]:
        CASES.append(Case(fn.__name__.removeprefix("c_"), kind, fn, note))
        return fn

    return deco


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------
GENES = ["GA", "GB", "GC", "GD"]


def _legacy(tmp: Path, counts_text: str | None = None, spots_text: str | None = None,
            gz: bool = True):
    """A legacy ST section: 3 x 3 spots 40 px apart, a 160 x 160 JPEG."""
    from PIL import Image

    tmp.mkdir(parents=True, exist_ok=True)
    pos = [(x, y) for y in range(1, 4) for x in range(1, 4)]
    if counts_text is None:
        rows = ["\t" + "\t".join(GENES)]
        for i, (x, y) in enumerate(pos):
            rows.append(f"{x}x{y}\t" + "\t".join(str((i + j) % 5) for j in range(len(GENES))))
        counts_text = "\n".join(rows) + "\n"
    if spots_text is None:
        rows = ["x\ty\tpixel_x\tpixel_y\tselected"]
        rows += [f"{x}\t{y}\t{40.0 * x}\t{40.0 * y}\t1" for x, y in pos]
        spots_text = "\n".join(rows) + "\n"
    counts = tmp / ("counts.tsv.gz" if gz else "counts.tsv")
    if gz:
        with gzip.open(counts, "wt") as fh:
            fh.write(counts_text)
    else:
        counts.write_text(counts_text)
    spots = tmp / "spots.tsv"
    spots.write_text(spots_text)
    image = tmp / "he.jpg"
    Image.fromarray(np.full((160, 160, 3), 200, np.uint8)).save(image)
    return counts, spots, image


def _read_legacy(counts, spots, image):
    from hest2sge.data.readers import read_legacy_st

    return lambda: read_legacy_st(counts, spots, image, "S1", "P1")


def _counts_with(cell: str, row: int = 2, col: int = 1) -> str:
    pos = [(x, y) for y in range(1, 4) for x in range(1, 4)]
    rows = ["\t" + "\t".join(GENES)]
    for i, (x, y) in enumerate(pos):
        vals = [str((i + j) % 5) for j in range(len(GENES))]
        if i == row:
            vals[col] = cell
        rows.append(f"{x}x{y}\t" + "\t".join(vals))
    return "\n".join(rows) + "\n"


def _visium(tmp: Path, scalefactors: Any = None, positions: str | None = None):
    """A Space Ranger 1.x folder: 6 spots x 4 genes, hires PNG at scale 0.5."""
    import h5py
    import scipy.sparse as sp
    from PIL import Image

    out = tmp / "outs"
    (out / "spatial").mkdir(parents=True, exist_ok=True)
    bcs = [f"AAAC{i}-1" for i in range(6)]
    x = sp.csc_matrix(np.arange(24, dtype=np.int32).reshape(4, 6) % 7)  # genes x barcodes
    with h5py.File(out / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = x.data, x.indices, x.indptr
        g["shape"] = np.array(x.shape)
        g["barcodes"] = np.array([b.encode() for b in bcs])
        feat = g.create_group("features")
        feat["id"] = np.array([f"ENSG{i}".encode() for i in range(4)])
        feat["name"] = np.array([n.encode() for n in GENES])
        feat["feature_type"] = np.array([b"Gene Expression"] * 4)
    if positions is None:
        positions = "".join(f"{b},1,{i // 3},{2 * (i % 3)},{50 + 40 * (i // 3)},{50 + 40 * (i % 3)}\n"
                            for i, b in enumerate(bcs))
    (out / "spatial" / "tissue_positions_list.csv").write_text(positions)
    if scalefactors is None:
        scalefactors = {"spot_diameter_fullres": 30.0, "tissue_hires_scalef": 0.5,
                        "fiducial_diameter_fullres": 45.0, "tissue_lowres_scalef": 0.1}
    sf = out / "spatial" / "scalefactors_json.json"
    sf.write_text(scalefactors if isinstance(scalefactors, str) else json.dumps(scalefactors))
    Image.fromarray(np.full((150, 150, 3), 180, np.uint8)).save(
        out / "spatial" / "tissue_hires_image.png")
    return out


def _read_visium(out):
    from hest2sge.data.readers import read_visium

    return lambda: read_visium(out)


@lru_cache(maxsize=1)
def _syn_slide():
    from hest2sge.data import synthetic_slides

    return synthetic_slides(n_patients=1, slides_per_patient=1, grid=(4, 4), n_genes=5,
                            spot_pitch_px=16, seed=3)[0]


def _syn():
    return _syn_slide().copy()


def _entry(slide) -> dict:
    return slide.uns["spatial"][str(slide.obs["slide_id"].iloc[0])]


def _h5ad(tmp: Path, slide) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "slides.h5ad"
    img = _entry(slide)["images"].get("fullres")
    _entry(slide)["images"] = {}
    if img is not None:  # keep the image as a file next to the h5ad
        from PIL import Image

        Image.fromarray(img).save(tmp / "he.png")
        _entry(slide)["image_path"] = str(tmp / "he.png")
    slide.write_h5ad(path)
    return path


def _read_h5ad(path):
    from hest2sge.data.readers import read_h5ad

    return lambda: read_h5ad(path)


@lru_cache(maxsize=1)
def _hest_template() -> Path:
    import tempfile
    import warnings

    from hest2sge.data.readers import write_hest

    root = Path(tempfile.mkdtemp(prefix="hest2sge_badinput_hest_"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_hest(_syn(), root, patch_size=16)
    return root


def _hest(tmp: Path) -> tuple[Path, str]:
    import shutil

    root = tmp / "hest"
    shutil.copytree(_hest_template(), root)
    sid = next((root / "st").glob("*.h5ad")).stem
    return root, sid


def _read_hest(root):
    from hest2sge.data.readers import read_hest

    return lambda: read_hest(root)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --------------------------------------------------------------------------------------------
# legacy ST (HER2+/cSCC) files
# --------------------------------------------------------------------------------------------
@case()
def c_legacy_counts_empty_cell(tmp):
    c, s, i = _legacy(tmp, counts_text=_counts_with(""))
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_counts_nan_cell(tmp):
    c, s, i = _legacy(tmp, counts_text=_counts_with("nan"))
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_counts_inf_cell(tmp):
    c, s, i = _legacy(tmp, counts_text=_counts_with("inf"))
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_counts_text_cell(tmp):
    c, s, i = _legacy(tmp, counts_text=_counts_with("abc"))
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_counts_negative(tmp):
    c, s, i = _legacy(tmp, counts_text=_counts_with("-3"))
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_duplicated_gene_column(tmp):
    text = _counts_with("1").replace("\tGC\t", "\tGA\t", 1)
    c, s, i = _legacy(tmp, counts_text=text)
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_duplicated_spot_in_spotfile(tmp):
    pos = [(x, y) for y in range(1, 4) for x in range(1, 4)]
    rows = ["x\ty\tpixel_x\tpixel_y\tselected"]
    rows += [f"{x}\t{y}\t{40.0 * x}\t{40.0 * y}\t1" for x, y in pos]
    rows.append("1\t1\t150.0\t150.0\t1")  # the same spot again, at another position
    c, s, i = _legacy(tmp, spots_text="\n".join(rows) + "\n")
    return Probe(_read_legacy(c, s, i), s.name)


@case()
def c_legacy_duplicated_spot_row_in_counts(tmp):
    text = _counts_with("1")
    lines = text.splitlines()
    text = "\n".join(lines + [lines[1]]) + "\n"
    c, s, i = _legacy(tmp, counts_text=text)
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_truncated_gzip(tmp):
    c, s, i = _legacy(tmp, counts_text=_counts_with("1") * 40)
    _truncate(c, 0.6)
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_zero_byte_counts(tmp):
    c, s, i = _legacy(tmp)
    c.write_bytes(b"")
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_corrupt_gzip(tmp):
    c, s, i = _legacy(tmp)
    c.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_zero_byte_spotfile(tmp):
    c, s, i = _legacy(tmp)
    s.write_bytes(b"")
    return Probe(_read_legacy(c, s, i), s.name)


@case()
def c_legacy_spotfile_text_pixel(tmp):
    pos = [(x, y) for y in range(1, 4) for x in range(1, 4)]
    rows = ["x\ty\tpixel_x\tpixel_y\tselected"]
    rows += [f"{x}\t{y}\t{'abc' if k == 4 else 40.0 * x}\t{40.0 * y}\t1"
             for k, (x, y) in enumerate(pos)]
    c, s, i = _legacy(tmp, spots_text="\n".join(rows) + "\n")
    return Probe(_read_legacy(c, s, i), s.name)


@case()
def c_legacy_spotfile_missing_column(tmp):
    c, s, i = _legacy(tmp, spots_text="x\ty\tpixel_x\n1\t1\t40\n")
    return Probe(_read_legacy(c, s, i), s.name)


@case()
def c_legacy_transposed_counts(tmp):
    text = "\t" + "\t".join(f"{x}x1" for x in range(1, 4)) + "\n"
    text += "".join(f"{g}\t1\t2\t3\n" for g in GENES)
    c, s, i = _legacy(tmp, counts_text=text)
    return Probe(_read_legacy(c, s, i), c.name)


@case()
def c_legacy_no_common_spot(tmp):
    """Counts and spot file share no spot: an empty slide."""
    rows = ["x\ty\tpixel_x\tpixel_y\tselected", "9\t9\t40\t40\t1"]
    c, s, i = _legacy(tmp, spots_text="\n".join(rows) + "\n")
    return Probe(_read_legacy(c, s, i), "no spots")


@case(kind="missing")
def c_legacy_missing_image(tmp):
    c, s, i = _legacy(tmp)
    i.unlink()
    return Probe(_read_legacy(c, s, i), i.name)


# --------------------------------------------------------------------------------------------
# Visium (Space Ranger) folders
# --------------------------------------------------------------------------------------------
@case()
def c_visium_scalefactors_invalid_json(tmp):
    out = _visium(tmp, scalefactors='{"spot_diameter_fullres": 30.0,')
    return Probe(_read_visium(out), "scalefactors_json.json")


@case()
def c_visium_scalefactors_zero_byte(tmp):
    out = _visium(tmp, scalefactors="")
    return Probe(_read_visium(out), "scalefactors_json.json")


@case()
def c_visium_scalefactors_not_object(tmp):
    out = _visium(tmp, scalefactors="[1, 2]")
    return Probe(_read_visium(out), "scalefactors_json.json")


@case()
def c_visium_spot_diameter_zero(tmp):
    out = _visium(tmp, scalefactors={"spot_diameter_fullres": 0.0, "tissue_hires_scalef": 0.5})
    return Probe(_read_visium(out), "spot_diameter_fullres")


@case()
def c_visium_spot_diameter_negative(tmp):
    out = _visium(tmp, scalefactors={"spot_diameter_fullres": -30.0, "tissue_hires_scalef": 0.5})
    return Probe(_read_visium(out), "spot_diameter_fullres")


@case()
def c_visium_hires_scalef_zero(tmp):
    out = _visium(tmp, scalefactors={"spot_diameter_fullres": 30.0, "tissue_hires_scalef": 0.0})
    return Probe(_read_visium(out), "tissue_hires_scalef")


@case()
def c_visium_hires_scalef_negative(tmp):
    out = _visium(tmp, scalefactors={"spot_diameter_fullres": 30.0, "tissue_hires_scalef": -0.5})
    return Probe(_read_visium(out), "tissue_hires_scalef")


@case()
def c_visium_truncated_matrix(tmp):
    out = _visium(tmp)
    _truncate(out / "filtered_feature_bc_matrix.h5", 0.5)
    return Probe(_read_visium(out), "filtered_feature_bc_matrix.h5")


@case()
def c_visium_zero_byte_matrix(tmp):
    out = _visium(tmp)
    (out / "filtered_feature_bc_matrix.h5").write_bytes(b"")
    return Probe(_read_visium(out), "filtered_feature_bc_matrix.h5")


@case()
def c_visium_positions_text_value(tmp):
    bcs = [f"AAAC{i}-1" for i in range(6)]
    text = "".join(f"{b},1,{i // 3},{2 * (i % 3)},{'x' if i == 2 else 50},{50 + 40 * (i % 3)}\n"
                   for i, b in enumerate(bcs))
    out = _visium(tmp, positions=text)
    return Probe(_read_visium(out), "tissue_positions_list.csv")


@case()
def c_visium_positions_duplicated_barcode(tmp):
    bcs = [f"AAAC{i}-1" for i in range(6)]
    text = "".join(f"{b},1,{i // 3},{2 * (i % 3)},{50 + 40 * (i // 3)},{50 + 40 * (i % 3)}\n"
                   for i, b in enumerate(bcs))
    text += f"{bcs[0]},1,5,5,140,140\n"
    out = _visium(tmp, positions=text)
    return Probe(_read_visium(out), "tissue_positions_list.csv")


@case()
def c_visium_positions_zero_byte(tmp):
    out = _visium(tmp, positions="")
    return Probe(_read_visium(out), "tissue_positions_list.csv")


@case()
def c_visium_positions_wrong_columns(tmp):
    out = _visium(tmp, positions="AAAC0-1,1,0\n")
    return Probe(_read_visium(out), "tissue_positions_list.csv")


# --------------------------------------------------------------------------------------------
# h5ad files
# --------------------------------------------------------------------------------------------
@case()
def c_h5ad_truncated(tmp):
    path = _h5ad(tmp, _syn())
    _truncate(path, 0.5)
    return Probe(_read_h5ad(path), path.name)


@case()
def c_h5ad_zero_byte(tmp):
    path = _h5ad(tmp, _syn())
    path.write_bytes(b"")
    return Probe(_read_h5ad(path), path.name)


@case()
def c_h5ad_nan_counts(tmp):
    s = _syn()
    s.X = np.asarray(s.X.toarray() if hasattr(s.X, "toarray") else s.X, dtype=np.float32)
    s.X[3, 1] = np.nan
    path = _h5ad(tmp, s)
    return Probe(_read_h5ad(path), path.name)


@case()
def c_h5ad_inf_counts(tmp):
    s = _syn()
    s.X = np.asarray(s.X.toarray() if hasattr(s.X, "toarray") else s.X, dtype=np.float32)
    s.X[0, 0] = np.inf
    path = _h5ad(tmp, s)
    return Probe(_read_h5ad(path), path.name)


@case()
def c_h5ad_negative_counts(tmp):
    s = _syn()
    s.X = np.asarray(s.X.toarray() if hasattr(s.X, "toarray") else s.X, dtype=np.float32)
    s.X[2, 2] = -1.0
    path = _h5ad(tmp, s)
    return Probe(_read_h5ad(path), path.name)


@case()
def c_h5ad_spot_diameter_negative(tmp):
    s = _syn()
    _entry(s)["scalefactors"]["spot_diameter_fullres"] = -12.0
    path = _h5ad(tmp, s)
    return Probe(_read_h5ad(path), "spot_diameter_fullres")


@case()
def c_h5ad_duplicated_barcodes(tmp):
    s = _syn()
    names = list(s.obs_names)
    names[1] = names[0]
    s.obs_names = names
    path = _h5ad(tmp, s)
    return Probe(_read_h5ad(path), path.name)


@case()
def c_h5ad_no_coordinates(tmp):
    s = _syn()
    del s.obsm["spatial"]
    path = _h5ad(tmp, s)
    return Probe(_read_h5ad(path), path.name)


# --------------------------------------------------------------------------------------------
# HEST-1k folders
# --------------------------------------------------------------------------------------------
@case()
def c_hest_metadata_invalid_json(tmp):
    root, sid = _hest(tmp)
    (root / "metadata" / f"{sid}.json").write_text('{"pixel_size_um": 1.0,,}')
    return Probe(_read_hest(root), f"{sid}.json")


@case()
def c_hest_metadata_zero_byte(tmp):
    root, sid = _hest(tmp)
    (root / "metadata" / f"{sid}.json").write_text("")
    return Probe(_read_hest(root), f"{sid}.json")


@case()
def c_hest_pixel_size_zero(tmp):
    root, sid = _hest(tmp)
    path = root / "metadata" / f"{sid}.json"
    meta = json.loads(path.read_text())
    meta.update(pixel_size_um=0.0, pixel_size_um_estimated=0.0)
    path.write_text(json.dumps(meta))
    return Probe(_read_hest(root), "pixel_size_um")


@case()
def c_hest_spot_diameter_negative(tmp):
    root, sid = _hest(tmp)
    path = root / "metadata" / f"{sid}.json"
    meta = json.loads(path.read_text())
    meta.update(spot_diameter_fullres=-5.0)
    path.write_text(json.dumps(meta))
    return Probe(_read_hest(root), "spot_diameter_fullres")


@case()
def c_hest_truncated_h5ad(tmp):
    root, sid = _hest(tmp)
    _truncate(root / "st" / f"{sid}.h5ad", 0.4)
    return Probe(_read_hest(root), f"{sid}.h5ad")


def _hest_patches_only(tmp, edit):
    """A HEST folder without WSI, its patch file edited by ``edit(h5py.File)``."""
    import h5py

    root, sid = _hest(tmp)
    for p in (root / "wsis").glob("*"):
        p.unlink()
    with h5py.File(root / "patches" / f"{sid}.h5", "a") as f:
        edit(f)

    def call():
        import warnings

        from hest2sge.data.patches import cached_patches
        from hest2sge.data.readers import read_hest

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slide = read_hest(root)[0]
        store = cached_patches(slide, patch_size=16)
        return store.get_many(np.arange(slide.n_obs))

    return Probe(call, f"{sid}.h5")


@case()
def c_hest_patch_barcodes_shorter_than_img(tmp):
    def edit(f):
        bc = f["barcode"][()]
        del f["barcode"]
        f["barcode"] = bc[:-3]
    return _hest_patches_only(tmp, edit)


@case()
def c_hest_patch_img_shorter_than_barcodes(tmp):
    def edit(f):
        img = f["img"][()]
        del f["img"]
        f["img"] = img[:-3]
    return _hest_patches_only(tmp, edit)


@case()
def c_hest_patch_no_barcode_dataset(tmp):
    def edit(f):
        del f["barcode"]
    return _hest_patches_only(tmp, edit)


# --------------------------------------------------------------------------------------------
# slides built in memory
# --------------------------------------------------------------------------------------------
def _make(**over):
    from hest2sge.data.slide import make_slide

    kw = dict(counts=np.ones((3, 3)), genes=["A", "B", "C"], barcodes=["s0", "s1", "s2"],
              spatial=np.array([[5.0, 5.0], [10.0, 5.0], [15.0, 5.0]]), array_row=[0, 0, 0],
              array_col=[0, 1, 2], slide_id="mem", patient_id="p",
              image=np.full((20, 20, 3), 200, np.uint8))
    kw.update(over)
    return lambda: make_slide(**kw)


@case()
def c_make_slide_duplicated_genes(tmp):
    return Probe(_make(genes=["A", "B", "A"]), "'A'")


@case()
def c_make_slide_duplicated_barcodes(tmp):
    return Probe(_make(barcodes=["s0", "s1", "s0"]), "'s0'")


def _validate(slide):
    from hest2sge.data.slide import validate_slide

    return lambda: validate_slide(slide)


@case()
def c_validate_nan_counts(tmp):
    s = _syn()
    s.X = np.asarray(s.X.toarray() if hasattr(s.X, "toarray") else s.X, dtype=np.float32)
    s.X[1, 1] = np.nan
    return Probe(_validate(s), str(s.var_names[1]))


@case()
def c_validate_inf_counts_sparse(tmp):
    import scipy.sparse as sp

    s = _syn()
    x = np.asarray(s.X.toarray() if hasattr(s.X, "toarray") else s.X, dtype=np.float32)
    x[2, 3] = np.inf
    s.X = sp.csr_matrix(x)
    return Probe(_validate(s), str(s.var_names[3]))


@case()
def c_validate_empty_slide(tmp):
    return Probe(_validate(_syn()[:0].copy()), "no spots")


@case()
def c_validate_spot_diameter_zero(tmp):
    s = _syn()
    _entry(s)["scalefactors"]["spot_diameter_fullres"] = 0.0
    return Probe(_validate(s), "spot_diameter_fullres")


@case()
def c_validate_image_scale_zero(tmp):
    s = _syn()
    _entry(s)["image_scale"] = 0.0
    return Probe(_validate(s), "image_scale")


@case()
def c_validate_pixel_size_negative(tmp):
    s = _syn()
    _entry(s)["pixel_size_um"] = -1.0
    return Probe(_validate(s), "pixel_size_um")


@case()
def c_patch_larger_than_image(tmp):
    from hest2sge.data.patches import extract_patches

    s = _syn()
    h, w = _entry(s)["images"]["fullres"].shape[:2]
    return Probe(lambda: extract_patches(s, patch_size=2 * max(h, w)), "patch")


# --------------------------------------------------------------------------------------------
# model construction and checkpoints
# --------------------------------------------------------------------------------------------
def _load(**kw):
    import hest2sge

    return lambda: hest2sge.load("stnet", backbone="test_resnet", pretrained=False, **kw)


@case()
def c_model_genes_string(tmp):
    return Probe(_load(genes="ABC"), "genes")


@case()
def c_model_genes_empty(tmp):
    return Probe(_load(genes=[]), "genes is empty")


@case()
def c_model_genes_duplicated(tmp):
    return Probe(_load(genes=["A", "B", "A"]), "genes")


@case()
def c_model_genes_none_entry(tmp):
    return Probe(_load(genes=["A", None]), "genes")


@case()
def c_model_n_genes_fraction(tmp):
    return Probe(_load(n_genes=2.5), "n_genes")


@case()
def c_model_n_genes_zero(tmp):
    return Probe(_load(n_genes=0), "n_genes=0")


@case()
def c_model_patch_size_fraction(tmp):
    return Probe(_load(n_genes=3, patch_size=32.7), "patch_size")


@case()
def c_model_patch_size_negative(tmp):
    return Probe(_load(n_genes=3, patch_size=-32), "patch_size")


@case()
def c_model_lr_string(tmp):
    return Probe(_load(n_genes=3, lr="fast"), "lr")


@case()
def c_model_lr_negative(tmp):
    return Probe(_load(n_genes=3, lr=-1e-3), "lr")


@case()
def c_model_lr_nan(tmp):
    return Probe(_load(n_genes=3, lr=float("nan")), "lr")


@case()
def c_model_weight_decay_negative(tmp):
    return Probe(_load(n_genes=3, weight_decay=-0.1), "weight_decay")


@case()
def c_model_target_transform_string(tmp):
    return Probe(_load(n_genes=3, target_transform="log"), "target_transform")


def _checkpoint(tmp: Path, genes=("A", "B", "C")) -> Path:
    import lightning.pytorch as pl
    import torch

    import hest2sge

    tmp.mkdir(parents=True, exist_ok=True)
    model = hest2sge.load("stnet", genes=list(genes), backbone="test_resnet", pretrained=False,
                          patch_size=32)
    with torch.no_grad():  # a "trained" head: distinct rows per gene (ST-Net starts at zero)
        model.head.weight.normal_()
        model.head.bias.normal_()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    path = tmp / "model.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["hest2sge"]["model"] == "stnet"
    return path


@case()
def c_checkpoint_zero_byte(tmp):
    import hest2sge

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "empty.ckpt"
    path.write_bytes(b"")
    return Probe(lambda: hest2sge.load(checkpoint=path), path.name)


@case()
def c_checkpoint_truncated(tmp):
    import hest2sge

    path = _checkpoint(tmp)
    _truncate(path, 0.5)
    return Probe(lambda: hest2sge.load(checkpoint=path), path.name)


@case()
def c_checkpoint_malicious_pickle(tmp):
    import os

    import hest2sge

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp / "pwned"),))

    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "evil.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"hest2sge": {"model": "stnet"}, "x": Evil()}, fh)

    def call():
        try:
            return hest2sge.load(checkpoint=path)
        finally:
            assert not (tmp / "pwned").exists(), "the checkpoint ran code"

    return Probe(call, path.name)


@case(kind="warn")
def c_checkpoint_gene_subset(tmp):
    import torch

    import hest2sge

    path = _checkpoint(tmp, genes=("A", "B", "C"))
    full = hest2sge.load(checkpoint=path)

    def check(sub):
        # A subset of the panel keeps the trained head rows of those genes (issue 8's
        # fine-tuning path), and says so.
        assert sub.genes == ["A", "B"] and sub.finetune_report["new_genes"] == 0
        assert full.head.weight.abs().sum() > 0
        torch.testing.assert_close(sub.head.weight, full.head.weight[:2])
        torch.testing.assert_close(sub.head.bias, full.head.bias[:2])

    return Probe(lambda: hest2sge.load(checkpoint=path, genes=["A", "B"]),
                 "adapted to a new gene panel", check)


# --------------------------------------------------------------------------------------------
# prediction and metrics
# --------------------------------------------------------------------------------------------
@case(kind="warn")
def c_predict_partial_panel(tmp):
    import hest2sge

    s = _syn()
    genes = [*list(s.var_names[:3]), "NOT_IN_SLIDE"]
    model = hest2sge.load("stnet", genes=genes, backbone="test_resnet", pretrained=False,
                          patch_size=16)

    def check(out):
        assert "counts" in out.layers, "the ground-truth layer was dropped"
        counts = np.asarray(out.layers["counts"])
        assert np.isnan(counts[:, 3]).all() and np.isfinite(counts[:, :3]).all()

    return Probe(lambda: hest2sge.predict(model, s), "NOT_IN_SLIDE", check)


class _Trainer:
    sanity_checking = False
    log_dir = None
    is_global_zero = True

    def __init__(self, slide_ids):
        from types import SimpleNamespace

        self.datamodule = SimpleNamespace(slide_ids=slide_ids, patient_ids=slide_ids)


class _Module:
    genes = ["A", "B"]

    def __init__(self):
        self.logged: dict[str, float] = {}

    def log(self, name, value, **kw):
        self.logged[name] = float(value)


def _validation(n_spots: list[int]):
    """Run SpotMetrics over validation slides with the given spot counts."""
    import torch

    from hest2sge.metrics import SpotMetrics

    rng = np.random.default_rng(0)
    cb = SpotMetrics()
    module = _Module()
    ids = [f"val{k}" for k in range(len(n_spots))]
    trainer = _Trainer(ids)
    for k, n in enumerate(n_spots):
        expr = torch.as_tensor(rng.random((n, 2)), dtype=torch.float32)
        batch = {"expr": expr, "counts": torch.as_tensor(rng.integers(0, 4, (n, 2)), dtype=torch.float32),
                 "slide": torch.full((n,), k), "spot": torch.arange(n)}
        cb.on_validation_batch_end(trainer, module, {"pred": expr + 0.1 * torch.rand_like(expr)},
                                   batch, 0)
    cb.on_validation_epoch_end(trainer, module)
    return module.logged


@case(kind="warn")
def c_metrics_one_spot_validation_slide(tmp):
    def check(logged):
        assert logged, "nothing logged"
        bad = {k: v for k, v in logged.items()
               if k in ("val/pcc", "val/spearman", "val/js", "val/nrmse_range", "val/rmse")
               and not np.isfinite(v)}
        assert not bad, f"non-finite logged metrics {bad}"
        assert logged["val/js"] > 0  # the one-spot slide's JS of 0 is not averaged in

    return Probe(lambda: _validation([12, 1]), "val1", check)


@case()
def c_metrics_only_degenerate_validation_slides(tmp):
    return Probe(lambda: _validation([1, 1]), "val0")


# --------------------------------------------------------------------------------------------
# further kinds, not specific to issue 12 (checked so the campaign is not only what was fixed)
# --------------------------------------------------------------------------------------------
@case()
def c_legacy_corrupt_image(tmp):
    c, s, i = _legacy(tmp)
    i.write_bytes(b"\xff\xd8\xff" + bytes(range(200)))
    return Probe(_read_legacy(c, s, i), i.name)


@case()
def c_legacy_truncated_image_at_patch_time(tmp):
    from hest2sge.data.patches import extract_patches

    c, s, i = _legacy(tmp)
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 160, 3), np.uint8)).save(i)
    _truncate(i, 0.3)
    read = _read_legacy(c, s, i)
    return Probe(lambda: extract_patches(read(), patch_size=16), i.name)


@case(kind="lookup")
def c_model_unknown_name(tmp):
    import hest2sge

    return Probe(lambda: hest2sge.load("stnett", n_genes=3), "stnet")


@case()
def c_model_unknown_optimizer(tmp):
    return Probe(_load(n_genes=3, optimizer="adamm"), "optimizer")


def _dm(**kw):
    from hest2sge.data import SpotDataModule, synthetic_slides

    slides = synthetic_slides(n_patients=2, slides_per_patient=1, grid=(3, 3), n_genes=4,
                              spot_pitch_px=16, seed=0)
    kw.setdefault("split", {"train": ["P0_S0"], "val": ["P1_S0"]})
    return lambda: SpotDataModule(slides, genes="all", **kw)


@case(kind="lookup")
def c_datamodule_split_unknown_slide(tmp):
    return Probe(_dm(split={"train": ["P0_S0"], "val": ["P9_S9"]}), "P9_S9")


@case(kind="lookup")
def c_datamodule_explicit_gene_missing(tmp):
    from hest2sge.data import SpotDataModule, synthetic_slides

    slides = synthetic_slides(n_patients=2, slides_per_patient=1, grid=(3, 3), n_genes=4,
                              spot_pitch_px=16, seed=0)
    return Probe(lambda: SpotDataModule(slides, {"train": ["P0_S0"], "val": ["P1_S0"]},
                                        genes=["G000", "NOPE"]), "NOPE")


@case(kind="missing")
def c_her2st_root_without_counts(tmp):
    from hest2sge.data.readers import read_her2st

    tmp.mkdir(parents=True, exist_ok=True)
    return Probe(lambda: read_her2st(tmp), "ST-cnts")


@case(kind="missing")
def c_hest_root_without_st(tmp):
    from hest2sge.data.readers import read_hest

    tmp.mkdir(parents=True, exist_ok=True)
    return Probe(lambda: read_hest(tmp), "st")


@case()
def c_predict_slide_without_image(tmp):
    import hest2sge

    s = _syn()
    _entry(s)["images"] = {}
    model = hest2sge.load("stnet", genes=list(s.var_names), backbone="test_resnet",
                          pretrained=False, patch_size=16)
    return Probe(lambda: hest2sge.predict(model, s), "image")


@case()
def c_patch_size_zero(tmp):
    from hest2sge.data.patches import extract_patches

    s = _syn()
    return Probe(lambda: extract_patches(s, patch_size=0), "patch_size")


@case()
def c_spot_outside_image(tmp):
    from hest2sge.data.patches import extract_patches

    s = _syn()
    s.obsm["spatial"] = np.asarray(s.obsm["spatial"]).copy()
    s.obsm["spatial"][0] = [-500.0, 10.0]
    return Probe(lambda: extract_patches(s, patch_size=16), str(s.obs_names[0]))


@case()
def c_cli_yaml_syntax_error(tmp):
    import contextlib
    import io

    tmp.mkdir(parents=True, exist_ok=True)
    cfg = tmp / "bad.yaml"
    cfg.write_text("model:\n  class_path: stnet\n  init_args: {n_genes: 3\ntrainer: [\n")

    def call():
        from hest2sge.cli import main

        buf = io.StringIO()
        try:
            with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
                main(["fit", "--config", str(cfg)])
        except SystemExit as err:
            raise ValueError(buf.getvalue().strip()[-400:]) from err

    return Probe(call, cfg.name)
