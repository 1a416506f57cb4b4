"""Train/validation/test splits of slides, grouped by patient."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hest2sge.data.slide import patient_id_of, slide_id_of


class LeakageError(ValueError):
    """Raised when a patient appears in both training and held-out slides."""


@dataclass
class Split:
    """Slide ids of each role. ``val`` and ``test`` may be empty."""

    train: list[str]
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def role_of(self, slide_id: str) -> str | None:
        """Return ``"train"``, ``"val"``, ``"test"`` or ``None`` for a slide id."""
        for role in ("train", "val", "test"):
            if slide_id in getattr(self, role):
                return role
        return None


def patients_of(slides: Sequence) -> dict[str, str]:
    """Map slide id -> patient id."""
    return {slide_id_of(s): patient_id_of(s) for s in slides}


def patient_folds(slides: Sequence, k: int = 4) -> list[list[str]]:
    """Group patients into ``k`` folds (sorted patients dealt round-robin).

    Returns:
        A list of ``k`` lists of patient ids.
    """
    patients = sorted(set(patients_of(slides).values()))
    if len(patients) < k:
        raise ValueError(f"{k}-fold patient split needs at least {k} patients, got {patients}")
    return [patients[i::k] for i in range(k)]


def patient_kfold(slides: Sequence, k: int = 4, fold: int = 0) -> Split:
    """The benchmark's rotation: fold ``fold`` is the test set, fold ``fold + 1`` validation,
    the other ``k - 2`` folds train (the paper's 4-fold CV: 2 train, 1 validation, 1 test).

    Args:
        slides: Slide AnnDatas.
        k: Number of patient folds (at least 3).
        fold: Which fold is held out for testing (0 <= fold < k).

    Returns:
        A :class:`Split` of slide ids; no patient is in two roles.
    """
    if k < 3:
        raise ValueError("patient_kfold needs k >= 3 (train, validation and test folds)")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in [0, {k}), got {fold}")
    folds = patient_folds(slides, k)
    test_p, val_p = set(folds[fold]), set(folds[(fold + 1) % k])
    pmap = patients_of(slides)
    split = Split(
        train=[s for s, p in pmap.items() if p not in test_p | val_p],
        val=[s for s, p in pmap.items() if p in val_p],
        test=[s for s, p in pmap.items() if p in test_p],
    )
    check_split(split, slides)
    return split


def check_split(split: Split, slides: Sequence, allow_patient_overlap: bool = False) -> None:
    """Validate a split against the slides.

    Raises:
        KeyError: a slide id of the split is not among the slides.
        ValueError: a slide has two roles, or there are no training slides.
        LeakageError: a patient is in training and in validation or test (unless allowed).
    """
    pmap = patients_of(slides)
    for role in ("train", "val", "test"):
        unknown = [s for s in getattr(split, role) if s not in pmap]
        if unknown:
            raise KeyError(
                f"split.{role} names unknown slide(s) {unknown}; available: {sorted(pmap)}"
            )
    seen: dict[str, str] = {}
    for role in ("train", "val", "test"):
        for s in getattr(split, role):
            if s in seen:
                raise ValueError(f"slide {s!r} is in both split.{seen[s]} and split.{role}")
            seen[s] = role
    if not split.train:
        raise ValueError("the split has no training slides")
    if allow_patient_overlap:
        return
    train_p = {pmap[s] for s in split.train}
    for role in ("val", "test"):
        shared = sorted(train_p & {pmap[s] for s in getattr(split, role)})
        if shared:
            raise LeakageError(
                f"patient(s) {shared} have slides in both training and {role}; use "
                "patient_kfold() or pass allow_patient_overlap=True to accept the leakage"
            )
