"""The examples in the public docstrings run (pytest's doctest runner on the listed modules)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "hest2sge.metrics.functional",
    "hest2sge.models.configs",
    "hest2sge.registry",
    "hest2sge.data.genes",
    "hest2sge.translational.survival",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
