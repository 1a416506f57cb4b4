"""Fused optimisers by default: the paper's optimiser type and settings, the same updates."""

from __future__ import annotations

import pytest
import torch

import hest2sge
from hest2sge.models.base import build_optimizer


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_fused_foreach_and_for_loop_give_the_same_parameters(kind):
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    finals = {}
    for impl in ("fused", "foreach", "for-loop"):
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        net.load_state_dict(ref.state_dict())
        opt = build_optimizer(list(net.parameters()), kind, lr=1e-2, weight_decay=1e-3,
                              impl=impl)
        assert bool(opt.defaults.get("fused")) == (impl == "fused")
        assert bool(opt.defaults.get("foreach")) == (impl == "foreach")
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        finals[impl] = torch.cat([p.detach().flatten() for p in net.parameters()])
    moved = (finals["for-loop"] - torch.cat([p.flatten() for p in ref.parameters()])).abs()
    assert moved.max() > 1e-3  # the steps did something
    torch.testing.assert_close(finals["fused"], finals["for-loop"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(finals["foreach"], finals["for-loop"], rtol=1e-5, atol=1e-6)


def test_models_configure_the_paper_optimiser_fused_by_default():
    model = hest2sge.load("stnet", n_genes=4, backbone="test_resnet", pretrained=False,
                          patch_size=32)
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert isinstance(opt, torch.optim.SGD)                     # the paper's type
    assert opt.defaults["lr"] == 1e-6 and opt.defaults["momentum"] == 0.9
    assert opt.defaults["fused"] is True
    plain = hest2sge.load("stnet", n_genes=4, backbone="test_resnet", pretrained=False,
                          patch_size=32, optimizer_impl="for-loop").configure_optimizers()
    assert not plain.defaults.get("fused")
    with pytest.raises(ValueError, match="optimizer_impl"):
        hest2sge.load("stnet", n_genes=4, backbone="test_resnet", pretrained=False,
                      patch_size=32, optimizer_impl="turbo")
