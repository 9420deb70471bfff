"""CombinedLoss and RegularizedLoss against their explicit formulas."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from torch import nn

import fastloss
from fastloss.combine import CombinedLoss, RegularizedLoss
from fastloss.ops import _utils


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


class GuideRegularizedLoss(nn.Module):
    """The loss-function guide's RegularizedLoss, verbatim (unsquared L2 norm, every parameter)."""

    def __init__(self, base_criterion, model, l1_lambda=0.01, l2_lambda=0.01):
        super().__init__()
        self.base_criterion = base_criterion
        self.model = model
        self.l1_lambda = l1_lambda
        self.l2_lambda = l2_lambda

    def forward(self, predictions, targets):
        base_loss = self.base_criterion(predictions, targets)
        l1_reg = torch.tensor(0.0, dtype=predictions.dtype)
        for param in self.model.parameters():
            l1_reg += torch.norm(param, 1)
        l2_reg = torch.tensor(0.0, dtype=predictions.dtype)
        for param in self.model.parameters():
            l2_reg += torch.norm(param, 2)
        return base_loss + self.l1_lambda * l1_reg + self.l2_lambda * l2_reg


def _guide_model() -> nn.Module:
    """The guide's SimpleNet(10, 20, 1) shape: Linear(10, 20), ReLU, Linear(20, 1)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1)).double()


@pytest.mark.parametrize("how", ["keywords", "from_guide"])
def test_regularized_reproduces_the_guide(how) -> None:
    """l2_squared=False with biases included is the guide's formula, value and gradients."""
    model = _guide_model()
    x, y = torch.randn(32, 10, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    if how == "keywords":
        crit = RegularizedLoss(nn.MSELoss(), model, l1=0.01, l2=0.01, l2_squared=False,
                               exclude_bias_and_norm=False)
    else:
        crit = RegularizedLoss.from_guide(nn.MSELoss(), model, l1_lambda=0.01, l2_lambda=0.01)
    loss = crit(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = GuideRegularizedLoss(nn.MSELoss(), model, l1_lambda=0.01, l2_lambda=0.01)(model(x), y)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    assert_close(loss, expected)
    for g, e in zip(grads, expected_grads):
        assert_close(g, e)
    # the default (squared norm, biases excluded) is a different, documented value
    default = RegularizedLoss(nn.MSELoss(), model, l1=0.01, l2=0.01)(model(x), y)
    assert abs(default.item() - expected.item()) > 1e-3


def test_regularized_unsquared_norm_is_finite_at_zero() -> None:
    w = torch.zeros(3, 3, requires_grad=True)
    crit = RegularizedLoss(lambda: torch.zeros(()), [w], l2=0.5, l2_squared=False)
    (gw,) = torch.autograd.grad(crit(), [w])
    assert torch.equal(gw, torch.zeros(3, 3))


def test_regularized_guide_keywords_name_fastloss_keywords() -> None:
    model = _guide_model()
    with pytest.raises(TypeError, match=r"l1_lambda= is l1=.*l2_lambda= is l2=.*l2_squared=False"):
        RegularizedLoss(nn.MSELoss(), model, l1_lambda=0.01, l2_lambda=0.01)
    with pytest.raises(TypeError, match=r"base_criterion= is criterion=.*model= is model_or_params="):
        RegularizedLoss(base_criterion=nn.MSELoss(), model=model)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'l3'"):
        RegularizedLoss(nn.MSELoss(), model, l3=1.0)


FUSABLE = [
    (fastloss.MSELoss(), 0.7),
    (fastloss.HuberLoss(delta=0.5), 0.2),
    (fastloss.SigmoidFocalLoss(alpha=0.25, gamma=2.0), 0.1),
    (fastloss.SmoothL1Loss(beta=0.0), 0.3),
    (fastloss.BCEWithLogitsLoss(), 1.5),
    (fastloss.L1Loss(), 2.0),
    (fastloss.SmoothL1Loss(beta=0.8), 0.05),
]


@pytest.mark.parametrize("n_members", [1, 2, 3, 7], ids=lambda k: f"{k}members")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_combined_equals_member_sum(n_members, reduction, dtype, device) -> None:
    """The fused pass equals the member-by-member sum (torch.nn / reference) in value and in both
    gradients, and runs one forward kernel per three members."""
    torch.manual_seed(n_members)
    pairs = []
    for module, weight in FUSABLE[:n_members]:
        module = type(module)(**{k: getattr(module, k) for k in ("delta", "beta", "alpha", "gamma")
                                 if hasattr(module, k)})
        module.reduction = reduction
        pairs.append((module, weight))
    x = torch.randn(3, 1031, dtype=dtype, device=device, requires_grad=True)
    y = torch.rand(3, 1031, dtype=dtype, device=device, requires_grad=True)
    crit = CombinedLoss(pairs)

    before = _utils.launch_counts["pointwise_fwd_kernel"]
    with fastloss.use_backend("triton"):
        total = crit(x, y)
    assert _utils.launch_counts["pointwise_fwd_kernel"] - before == -(-n_members // 3)
    grad_out = torch.rand_like(total)
    gx, gy = torch.autograd.grad(total, (x, y), grad_out)

    with fastloss.use_backend("torch"):
        x2, y2 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
        expected = sum(w * m(x2, y2) for m, w in pairs)
        ex, ey = torch.autograd.grad(expected, (x2, y2), grad_out.double())
    assert_close(total, expected.to(dtype), dtype)
    assert_close(gx, ex.to(dtype), dtype)
    assert_close(gy, ey.to(dtype), dtype)


def test_combined_falls_back_when_not_fusable(device) -> None:
    """Weighted BCE, mixed reductions and return_components run member by member (and agree)."""
    x = torch.randn(4, 6, device=device, requires_grad=True)
    y = torch.rand(4, 6, device=device)
    pw = torch.rand(6, device=device)
    cases = [
        CombinedLoss([(fastloss.BCEWithLogitsLoss(pos_weight=pw), 1.0), (fastloss.MSELoss(), 1.0)]),
        CombinedLoss([(fastloss.MSELoss(reduction="sum"), 1.0), (fastloss.L1Loss(), 1.0)]),
    ]
    with fastloss.use_backend("triton"):
        for crit in cases:
            total = crit(x, y)
            total_c, parts = crit(x, y, return_components=True)
            assert_close(total, total_c)
            assert_close(total, sum(w * p for w, p in zip(crit.weights, parts)))


def _focal_with_negative_gamma() -> nn.Module:
    module = fastloss.SigmoidFocalLoss()
    module.gamma = -1.0  # set after construction: the module's own forward raises
    return module


def _mse_with_bad_reduction() -> nn.Module:
    module = fastloss.MSELoss()
    module.reduction = "bogus"
    return module


@pytest.mark.parametrize("make", [_focal_with_negative_gamma, _mse_with_bad_reduction],
                         ids=["negative_gamma", "bad_reduction"])
def test_combined_never_fuses_what_a_member_rejects(make, device) -> None:
    """A member whose own forward raises must make the combination raise, not fuse silently."""
    x, y = torch.randn(4, 6, device=device), torch.rand(4, 6, device=device)
    crit = CombinedLoss([(make(), 1.0), (make(), 0.5)])
    with fastloss.use_backend("triton"), pytest.raises(ValueError):
        crit(x, y)


def test_combined_runs_member_hooks(device) -> None:
    """Forward hooks of a member run (the fused pass, which would skip them, is not taken)."""
    x, y = torch.randn(4, 6, device=device), torch.rand(4, 6, device=device)
    mse, calls = fastloss.MSELoss(), []
    mse.register_forward_hook(lambda module, args, out: calls.append(out.detach()))
    crit = CombinedLoss([(mse, 0.5), (fastloss.L1Loss(), 1.0)])
    with fastloss.use_backend("triton"):
        total = crit(x, y)
        expected = 0.5 * fastloss.functional.mse_loss(x, y) + fastloss.functional.l1_loss(x, y)
    assert len(calls) == 1
    assert_close(total, expected)


@pytest.mark.parametrize("alpha", [1.5, -0.5])
def test_sigmoid_focal_member_with_invalid_alpha_raises_like_the_function(alpha, backend):
    """A fused pass must not run what the function itself rejects (torchvision's ValueError)."""
    criterion = fastloss.CombinedLoss({fastloss.SigmoidFocalLoss(alpha=alpha): 1.0, fastloss.MSELoss(): 0.5})
    x, y = torch.randn(4, 3), torch.rand(4, 3)
    with pytest.raises(ValueError, match="alpha"):
        criterion(x, y)
