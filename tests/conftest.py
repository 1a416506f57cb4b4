"""Shared fixtures: where the real test data lives.

The data folder is ``../shared/data`` beside the repository (``HEST2SGE_TEST_DATA`` overrides
it). Tests that need it are skipped with a message when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _data_root() -> Path:
    env = os.environ.get("HEST2SGE_TEST_DATA")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real test data folder (skips when absent)."""
    root = _data_root()
    if not root.is_dir():
        pytest.skip(f"real test data not found at {root} (set HEST2SGE_TEST_DATA to its folder)")
    return root


def _sub(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_dir():
        pytest.skip(f"real test data {name}/ not found in {root}")
    return path


@pytest.fixture(scope="session")
def her2st_root(data_root: Path) -> Path:
    """The HER2+ legacy ST sections (almaan/her2st layout)."""
    return _sub(data_root, "her2st")


@pytest.fixture(scope="session")
def visium_root(data_root: Path) -> Path:
    """The small Space Ranger 1.x Visium output."""
    return _sub(data_root, "visium_v1")


@pytest.fixture(scope="session")
def her2st_slides(her2st_root: Path) -> list:
    """The HER2+ sections read once per session (``read_her2st``; skips when absent)."""
    from hest2sge.data import read_her2st

    return read_her2st(her2st_root)


@pytest.fixture(scope="session")
def her2st_patch_cache(tmp_path_factory) -> Path:
    """A session-wide patch cache folder, so tests cutting the same HER2+ patches share them."""
    return tmp_path_factory.mktemp("her2st_patch_cache")
