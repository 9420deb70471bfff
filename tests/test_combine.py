"""CombinedLoss and RegularizedLoss against their explicit formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastloss
from fastloss.combine import CombinedLoss, RegularizedLoss


def test_combined_equals_weighted_sum_of_torch_losses() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(64, 5, dtype=torch.float64)
    crit = CombinedLoss({fastloss.MSELoss(): 0.7, fastloss.L1Loss(): 0.3})
    total, parts = crit(x, y, return_components=True)
    (gx,) = torch.autograd.grad(total, x)
    x2 = x.detach().requires_grad_()
    expected = 0.7 * nn.functional.mse_loss(x2, y) + 0.3 * nn.functional.l1_loss(x2, y)
    (gx2,) = torch.autograd.grad(expected, x2)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(gx, gx2)
    torch.testing.assert_close(parts[0], nn.functional.mse_loss(x, y))
    torch.testing.assert_close(parts[1], nn.functional.l1_loss(x, y))


def test_combined_accepts_pairs_and_validates() -> None:
    crit = CombinedLoss([(fastloss.MSELoss(), 1), (fastloss.HuberLoss(delta=0.5), 2.0)])
    assert crit.weights == [1.0, 2.0]
    with pytest.raises(ValueError):
        CombinedLoss({})
    with pytest.raises(TypeError):
        CombinedLoss([(fastloss.MSELoss(), "heavy")])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)).double()


@pytest.mark.parametrize("exclude", [True, False], ids=["exclude_bias_norm", "all_params"])
def test_regularized_equals_explicit_formula(exclude: bool) -> None:
    model = _model()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    crit = RegularizedLoss(nn.MSELoss(), model, l1=1e-3, l2=1e-2, exclude_bias_and_norm=exclude)
    loss = crit(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    if exclude:
        params = [model[0].weight, model[3].weight]
    else:
        params = list(model.parameters())
    expected = nn.functional.mse_loss(model(x), y)
    expected = expected + 1e-3 * sum(p.abs().sum() for p in params) + 1e-2 * sum((p * p).sum() for p in params)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_regularized_excludes_bias_and_norm() -> None:
    model = _model()
    crit = RegularizedLoss(nn.MSELoss(), model, l2=1.0)
    assert {id(p) for p in crit._params} == {id(model[0].weight), id(model[3].weight)}


def test_regularized_param_list_and_zero_weights() -> None:
    w = torch.zeros(3, 3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    crit = RegularizedLoss(lambda: torch.zeros(()), [w, b], l1=0.5, l2=0.5)
    loss = crit()
    (gw,) = torch.autograd.grad(loss, [w])
    assert loss.item() == 0.0  # the 1-d tensor is treated as a bias and skipped
    assert torch.equal(gw, torch.zeros(3, 3))  # finite at w = 0


def test_regularized_rejects_negative() -> None:
    with pytest.raises(ValueError):
        RegularizedLoss(nn.MSELoss(), _model(), l1=-1.0)
