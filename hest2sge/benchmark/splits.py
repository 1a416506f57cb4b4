"""Benchmark folds: the paper's HER2+ split, patient-grouped k-fold, explicit lists, regions.

A fold is a :class:`~hest2sge.data.splits.Split` (train / val / test slide ids). Every fold
generator here returns ``list[Split]`` plus, for region folds, the region slides it cut.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np

from hest2sge.data.slide import slide_id_of
from hest2sge.data.splits import Split, check_split, patient_kfold, patients_of

PAPER_SPLIT_FILE = "her2st_paper_split.json"
#: sha256 of the shipped ``data/her2st_paper_split.json``; changing the split changes it.
PAPER_SPLIT_SHA256 = "5f5df29557be083e088e8547e95561b098a5f23573280803034c3ccc9d23ec55"


def _split_bytes() -> bytes:
    return resources.files("hest2sge.benchmark").joinpath("data", PAPER_SPLIT_FILE).read_bytes()


def paper_split_definition(verify: bool = True) -> dict[str, Any]:
    """The paper's HER2+ 4-fold patient split (its source data) as shipped package data.

    Args:
        verify: Check the file's sha256 against :data:`PAPER_SPLIT_SHA256`.

    Raises:
        ValueError: when the shipped file does not match its pinned hash.
    """
    raw = _split_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if verify and digest != PAPER_SPLIT_SHA256:
        raise ValueError(
            f"the shipped HER2+ split {PAPER_SPLIT_FILE} has sha256 {digest}, expected "
            f"{PAPER_SPLIT_SHA256}: the package data was modified"
        )
    return json.loads(raw)


def her2st_paper_folds(slides: Sequence | None = None) -> list[Split]:
    """The paper's four HER2+ folds (test A+H / B+E / C+G / D+F; validation F / A / E / H).

    Args:
        slides: The HER2+ slides actually loaded. Sections missing from ``slides`` are
            dropped from each role (with ``None`` all 36 section ids are returned).

    Returns:
        Four :class:`Split` of section ids.
    """
    d = paper_split_definition()
    sections: dict[str, list[str]] = d["sections"]
    have = None if slides is None else {slide_id_of(s) for s in slides}
    out = []
    for f in d["folds"]:
        roles = {
            role: [s for p in f[role] for s in sections[p] if have is None or s in have]
            for role in ("train", "val", "test")
        }
        out.append(Split(**roles))
    if slides is not None:
        missing = sorted({s for secs in sections.values() for s in secs} - have)
        if len(missing) == sum(len(v) for v in sections.values()):
            raise ValueError("none of the slides is a HER2+ section (A1..H3) of the paper split")
        for sp in out:
            if not sp.train or not sp.test:
                raise ValueError(
                    f"the loaded HER2+ sections leave a paper fold without training or test "
                    f"slides (missing: {missing})"
                )
            check_split(sp, slides)
    return out


def split_hash(folds: Sequence[Split]) -> str:
    """sha256 of the folds (role lists in order), recorded next to benchmark results."""
    blob = json.dumps([{r: list(getattr(f, r)) for r in ("train", "val", "test")} for f in folds],
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def kfold_splits(slides: Sequence, k: int = 4) -> list[Split]:
    """Patient-grouped k-fold with the paper's rotation (fold i test, i+1 validation, rest
    training), one :class:`Split` per fold."""
    return [patient_kfold(slides, k=k, fold=i) for i in range(k)]


def section_folds(slides: Sequence, k: int | None = None) -> list[Split]:
    """Section-level rotation for datasets of ONE patient (NOT patient-grouped).

    Sections are dealt round-robin into ``k`` folds (default: one section per fold); fold i
    tests on group i, validates on group i+1 and trains on the rest. Adjacent sections of one
    tumour share morphology and expression, so these numbers are optimistic compared with a
    patient split: reports label them ``section-level (not patient-grouped)``.
    """
    ids = [slide_id_of(s) for s in slides]
    k = len(ids) if k is None else int(k)
    if k < 3 or k > len(ids):
        raise ValueError(f"section folds need 3 <= k <= n_sections ({len(ids)}), got {k}")
    groups = [ids[i::k] for i in range(k)]
    out = []
    for i in range(k):
        test, val = groups[i], groups[(i + 1) % k]
        out.append(Split(train=[s for s in ids if s not in test + val], val=val, test=test))
    for sp in out:
        check_split(sp, slides, allow_patient_overlap=True)
    return out


def explicit_folds(slides: Sequence, folds: Sequence[dict[str, Sequence[str]]],
                   allow_patient_overlap: bool = False) -> list[Split]:
    """Folds given as lists of slide ids (``[{"train": [...], "val": [...], "test": [...]}]``),
    validated against the slides (unknown ids, leakage)."""
    out = [Split(**{r: list(f.get(r, [])) for r in ("train", "val", "test")}) for f in folds]
    for sp in out:
        check_split(sp, slides, allow_patient_overlap=allow_patient_overlap)
    return out


def region_folds(slide, k: int = 4) -> tuple[list, list[Split]]:
    """Cut ONE slide into ``k`` non-overlapping regions and rotate over them (Visium kidney).

    The spots are split at the median x into two halves and each half at its median y
    (``k = 4``: four quadrants; ``k = 2``: left/right). Each region becomes a slide
    ``<slide_id>_r<i>`` whose patient id is the region, so the usual leakage checks apply.

    Returns:
        (region slides, folds): fold i tests on region i, validates on region i+1.
    """
    if k not in (2, 4):
        raise ValueError(f"region folds support k = 2 or 4 regions, got {k}")
    xy = np.asarray(slide.obsm["spatial"], dtype=np.float64)
    left = xy[:, 0] <= np.median(xy[:, 0])
    masks = [left, ~left]
    if k == 4:
        masks = [m & (xy[:, 1] <= np.median(xy[m, 1])) for m in masks] + \
                [m & (xy[:, 1] > np.median(xy[m, 1])) for m in masks]
    sid = slide_id_of(slide)
    regions = []
    for i, m in enumerate(masks):
        if m.sum() < 2:
            raise ValueError(f"region {i} of slide {sid!r} has {int(m.sum())} spot(s)")
        r = slide[m].copy()
        rid = f"{sid}_r{i}"
        r.obs["slide_id"] = rid
        r.obs["patient_id"] = rid
        r.uns["spatial"] = {rid: slide.uns["spatial"][sid]}
        regions.append(r)
    ids = [slide_id_of(r) for r in regions]
    folds = [Split(train=[s for j, s in enumerate(ids) if j not in (i, (i + 1) % k)],
                   val=[ids[(i + 1) % k]], test=[ids[i]]) for i in range(k)]
    return regions, folds


def make_folds(slides: Sequence, spec: Any) -> tuple[list, list[Split], str]:
    """Resolve a config's ``split`` entry.

    Forms: ``"her2st_paper"``, ``{"kind": "patient_kfold", "k": 4}``,
    ``{"kind": "section", "k": 5}``, ``{"kind": "regions", "k": 4}`` (one slide),
    ``{"kind": "explicit", "folds": [...]}``.

    Returns:
        (slides, folds, description); region folds replace the slide by its regions.
    """
    if isinstance(spec, str):
        spec = {"kind": spec}
    spec = dict(spec or {"kind": "patient_kfold"})
    kind = spec.pop("kind", "patient_kfold")
    if kind == "her2st_paper":
        return list(slides), her2st_paper_folds(slides), \
            "paper HER2+ 4-fold patient split (the paper's source data; test A+H/B+E/C+G/D+F)"
    if kind == "patient_kfold":
        k = int(spec.get("k", 4))
        return list(slides), kfold_splits(slides, k), \
            f"patient-grouped {k}-fold (fold i test, i+1 validation, rest training)"
    if kind == "section":
        folds = section_folds(slides, spec.get("k"))
        return list(slides), folds, \
            f"section-level {len(folds)}-fold, NOT patient-grouped " \
            f"({len(set(patients_of(slides).values()))} patient(s))"
    if kind == "regions":
        if len(slides) != 1:
            raise ValueError(f"region folds need exactly one slide, got {len(slides)}")
        regions, folds = region_folds(slides[0], int(spec.get("k", 4)))
        return regions, folds, f"{len(folds)} non-overlapping regions of one slide"
    if kind == "explicit":
        folds = explicit_folds(slides, spec["folds"], bool(spec.get("allow_patient_overlap")))
        return list(slides), folds, f"explicit {len(folds)} fold(s) from the config"
    raise ValueError(
        f"unknown split kind {kind!r}; use her2st_paper, patient_kfold, section, regions "
        "or explicit"
    )
