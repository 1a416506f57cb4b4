"""The model contract, for every registered model (tiny configurations), through the public
:func:`hest2sge.testing.check_model` that users run on their own architectures."""

from __future__ import annotations

import pytest
from torch import nn

import hest2sge
from hest2sge.registry import _REGISTRY, get_model_class
from hest2sge.testing import ContractError, check_model, contract_slides


@pytest.fixture(scope="module")
def tiny_slides():
    return contract_slides(seed=1)


@pytest.mark.parametrize("name", hest2sge.list_models())
def test_model_contract(name, tiny_slides, tmp_path):
    report = check_model(name, slides=tiny_slides, workdir=tmp_path)
    assert report["predicted_spots"] == tiny_slides[0].n_obs
    assert report["checkpoint_bytes"] > 0
    assert (tmp_path / f"{name}.ckpt").is_file()


def test_contract_covers_registry():
    """Every registered model has a tiny configuration for the contract test."""
    for name in hest2sge.list_models():
        assert isinstance(get_model_class(name).tiny_config, dict)
        assert get_model_class(name).tiny_config, f"{name} has no tiny_config"


class _WrongShape(hest2sge.SpotModel):
    """Predicts one gene too few: the contract must catch it."""

    tiny_config = {"patch_size": 32}

    def __init__(self, genes=None, n_genes=None, patch_size: int = 32, **kwargs) -> None:
        super().__init__(genes=genes, n_genes=n_genes, patch_size=patch_size, **kwargs)
        self.head = nn.Linear(3, self.n_genes - 1)

    def forward(self, batch):
        return self.head(batch["img"].float().mean((2, 3)))


def test_contract_catches_a_broken_model(tiny_slides):
    hest2sge.register_model("contract_wrong_shape")(_WrongShape)
    try:
        with pytest.raises(ContractError, match="forward: prediction shape"):
            check_model("contract_wrong_shape", slides=tiny_slides)
    finally:
        _REGISTRY.pop("contract_wrong_shape", None)
