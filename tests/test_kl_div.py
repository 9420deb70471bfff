"""kl_div / KLDivLoss: torch.nn's Kullback-Leibler divergence on the pointwise kernels.

Values and both gradients are checked against torch.nn in float64 on both backends (the kernels
proven to run), then the kernels against the reference in every dtype; torch's behaviour for
"batchmean", log_target, zero and negative targets, broadcasting, dtypes, empty and 0-dim operands,
its 'mean' warning and its errors are checked against torch.nn itself.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    HALF_DTYPES,
    TOLERANCES,
    assert_close,
    assert_launched,
    assert_no_less_accurate,
    assert_not_launched,
    dtype_id,
)
from torch import nn

import fastloss
import fastloss.functional as FF
from fastloss import _backend
from fastloss import reference as R

F64 = torch.float64
REDUCTIONS = ["none", "mean", "sum", "batchmean"]
SHAPES = [(1,), (7,), (3, 1030), (2, 3, 5)]
MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)

# torch's own 'mean' warning is checked in test_mean_warns_like_torch; elsewhere it is noise
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")


def shape_id(shape) -> str:
    return "x".join(map(str, shape)) or "scalar"


def operands(shape, log_target, dtype=F64, device="cpu", seed=0):
    """Input log-probabilities (log_softmax over the last dimension) and target probabilities
    (log-probabilities with log_target), both leaves requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.log_softmax(torch.randn(shape, generator=g, dtype=F64), -1) if shape else torch.randn(
        shape, generator=g, dtype=F64)
    t = torch.randn(shape, generator=g, dtype=F64)
    y = (torch.log_softmax(t, -1) if shape else t) if log_target else (torch.softmax(t, -1) if shape else t.sigmoid())
    return (x.to(device, dtype).requires_grad_(), y.to(device, dtype).requires_grad_())


def loss_and_grads(fn, leaves, go=None):
    """fn()'s loss and its gradients to every leaf, for grad_output go (1 for a scalar loss)."""
    loss = fn()
    if go is None:
        go = torch.ones_like(loss)
    grads = torch.autograd.grad(loss, leaves, go)
    return loss.detach(), grads


def random_grad_output(loss, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(loss.shape, generator=g, dtype=F64) + 0.5).to(loss.device, loss.dtype)


def check_same(actual, expected, dtype, msg):
    assert_close(actual[0], expected[0], dtype, f"{msg} loss")
    for name, a, e in zip(("input", "target"), actual[1], expected[1]):
        assert_close(a, e, dtype, f"{msg} grad {name}")


def ran(backend, *kernels):
    return assert_launched(*kernels) if backend == "triton" else assert_not_launched()


# --------------------------------------------------------------------------------------------
# Values and both gradients vs torch.nn in float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_torch_float64(reduction, log_target, shape, backend, device):
    x, y = operands(shape, log_target, device=device)
    expected_loss = F.kl_div(x, y, reduction=reduction, log_target=log_target)
    for go in (None, random_grad_output(expected_loss)):
        expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y), go)
        with ran(backend, "pointwise_fwd_kernel"):
            actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction, log_target=log_target),
                                    (x, y), go)
        check_same(actual, expected, F64, f"{reduction} log_target={log_target} go={'1' if go is None else 'rand'}")


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_torch_float64(reduction, log_target, device):
    x, y = operands((4, 6), log_target, device=device)
    expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y))
    actual = loss_and_grads(lambda: R.kl_div(x, y, reduction, log_target), (x, y))
    check_same(actual, expected, F64, f"reference {reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_and_negative_targets_give_torchs_values(reduction, backend, device):
    """xlogy(0, 0) = 0 in the loss (but d/dtarget = NaN there, as torch's autograd gives); a negative
    target gives NaN (log of a negative); a NaN operand propagates."""
    x = torch.tensor([-0.5, -1.2, -2.0, -0.1, float("nan"), -3.0], dtype=F64, device=device, requires_grad=True)
    y = torch.tensor([0.0, -0.5, 0.3, 0.0, 0.2, float("nan")], dtype=F64, device=device, requires_grad=True)
    go = None if reduction != "none" else torch.linspace(0.5, 1.5, 6, dtype=F64, device=device)
    expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction), (x, y), go)
    with ran(backend, "pointwise_fwd_kernel"):
        actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction), (x, y), go)
    check_same(actual, expected, F64, reduction)
    # the finite cases alone: the loss at target 0 is exactly 0 (xlogy), d/dinput = -target
    loss = FF.kl_div(x[:4].detach(), y[:4].detach(), reduction="none")
    assert loss[0] == 0 and loss[3] == 0 and loss[1].isnan() and loss[2].isfinite()


@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")  # the interpreter's NaN sum
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_log_target_infinite_targets_give_torchs_values(reduction, backend, device):
    """log_target: exp(y) (y - x), NaN at y = -inf (0 * -inf) as torch's; x = +-inf too."""
    x = torch.tensor([-0.5, -1.0, float("inf"), float("-inf"), -2.0], dtype=F64, device=device, requires_grad=True)
    y = torch.tensor([float("-inf"), -0.3, -1.0, -1.0, 0.5], dtype=F64, device=device, requires_grad=True)
    expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction, log_target=True), (x, y))
    with ran(backend, "pointwise_fwd_kernel"):
        actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction, log_target=True), (x, y))
    check_same(actual, expected, F64, reduction)


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_dim_operands(reduction, log_target, backend, device):
    """A 0-dim input: "batchmean" does not divide (torch skips it when input.dim() == 0)."""
    x, y = operands((), log_target, device=device)
    expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y))
    with ran(backend, "pointwise_fwd_kernel"):
        actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y))
    check_same(actual, expected, F64, reduction)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0)], ids=shape_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_operands(reduction, shape, backend, device):
    """torch's values: NaN for "mean", 0 for "sum", 0 / input.size(0) for "batchmean" (NaN when
    the batch is empty); empty gradients."""
    x = torch.empty(shape, dtype=F64, device=device, requires_grad=True)
    y = torch.empty(shape, dtype=F64, device=device, requires_grad=True)
    expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction), (x, y))
    actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction), (x, y))
    check_same(actual, expected, F64, reduction)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_operands(reduction, layout, backend, device):
    x0, y0 = operands((6, 10), False, device=device)
    if layout == "transposed":
        x, y = x0.t(), y0.t()
    else:
        x, y = x0[:, ::3], y0[::2].repeat(2, 1)[:, ::3]
    assert not x.is_contiguous()
    expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction), (x0, y0))
    with ran(backend, "pointwise_fwd_kernel"):
        actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction), (x0, y0))
    check_same(actual, expected, F64, f"{layout} {reduction}")


@pytest.mark.parametrize("shapes", [((1, 5), (3, 5)), ((3, 5), (1, 5)), ((3, 5), (5,)), ((5,), (3, 5)),
                                    ((4, 1, 5), (3, 1))], ids=lambda s: f"{shape_id(s[0])}-{shape_id(s[1])}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_broadcasting_matches_torch_without_warning(reduction, shapes, backend, device):
    """torch.kl_div broadcasts silently; "batchmean" divides by the input's size(0), not the
    broadcast shape's."""
    x, _ = operands(shapes[0], False, device=device, seed=1)
    _, y = operands(shapes[1], False, device=device, seed=2)
    go = None if reduction != "none" else random_grad_output(F.kl_div(x, y, reduction="none"))
    expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction), (x, y), go)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ran(backend, "pointwise_fwd_kernel"):
            actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction), (x, y), go)
    # (the interpreter's numpy RuntimeWarnings from masked-off lanes are not torch.nn's business)
    assert not [w for w in caught if issubclass(w.category, UserWarning) and "mean" not in str(w.message)]
    check_same(actual, expected, F64, f"{shapes} {reduction}")


@pytest.mark.parametrize("dtypes", [(torch.float32, F64), (F64, torch.float32), (torch.float16, torch.float32),
                                    (torch.bfloat16, torch.float16)], ids=lambda d: f"{dtype_id(d[0])}-{dtype_id(d[1])}")
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_mixed_dtypes_give_torchs_dtype(dtypes, reduction, backend, device):
    """torch's result dtype (promotion) and gradient dtypes; the values against float64 torch.nn
    within the coarser dtype's tolerance (torch evaluates xlogy(target, target) in the target's
    dtype, so its own values are no closer than that)."""
    x, y = operands((3, 8), False, device=device)
    x, y = (t.detach().to(d).requires_grad_() for t, d in zip((x, y), dtypes))
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    in_torch = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction), (x, y))
    exact = loss_and_grads(lambda: F.kl_div(x64, y64, reduction=reduction), (x64, y64))
    actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction), (x, y))
    assert actual[0].dtype == in_torch[0].dtype == torch.promote_types(*dtypes)
    assert [g.dtype for g in actual[1]] == [g.dtype for g in in_torch[1]] == list(dtypes)
    expected = (exact[0].to(actual[0].dtype), tuple(g.to(d) for g, d in zip(exact[1], dtypes)))
    coarser = max(dtypes, key=lambda d: torch.finfo(d).eps)
    for a, e, what in zip((actual[0], *actual[1]), (expected[0], *expected[1]), ("loss", "grad input", "grad target")):
        torch.testing.assert_close(a.double(), e.double(), equal_nan=True, msg=f"{dtypes} {reduction} {what}",
                                   **TOLERANCES[coarser])


# --------------------------------------------------------------------------------------------
# Half precision and the other dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_kernel_matches_reference(dtype, reduction, log_target, device):
    x, y = operands((3, 1030), log_target, dtype, device)
    ref = R.kl_div(x, y, reduction, log_target)
    for go in (None, random_grad_output(ref)):
        expected = loss_and_grads(lambda: R.kl_div(x, y, reduction, log_target), (x, y), go)
        with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel"):
            actual = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y), go)
        what = f"{reduction} {log_target} go={'1' if go is None else 'rand'}"
        assert_close(actual[0], expected[0], dtype, f"{what} loss")
        assert_close(actual[1][0], expected[1][0], dtype, f"{what} grad input")
        if log_target or dtype == F64:
            assert_close(actual[1][1], expected[1][1], dtype, f"{what} grad target")
        else:
            # log(y) + 1 - x cancels (both terms near log(1/n)): in float32 either evaluation errs
            # by about an ulp of the terms, so judge both against float64 instead
            x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
            loss64 = F.kl_div(x64, y64, reduction=reduction)
            exact = (loss64, torch.autograd.grad(loss64, (x64, y64), torch.ones_like(loss64) if go is None
                                                 else go.double()))
            assert_no_less_accurate(actual[1][1], expected[1][1], exact[1][1], f"{what} grad target")


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_precision_never_less_accurate_than_torch(dtype, reduction, log_target, backend, device):
    x, y = operands((3, 1000), log_target, dtype, device)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    go = random_grad_output(F.kl_div(x64, y64, reduction=reduction, log_target=log_target)).to(dtype)
    exact = loss_and_grads(lambda: F.kl_div(x64, y64, reduction=reduction, log_target=log_target), (x64, y64),
                           go.double())
    in_torch = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y), go)
    with ran(backend, "pointwise_fwd_kernel"):
        in_fast = loss_and_grads(lambda: FF.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y), go)
    for what, fast, torch_result, ref in zip(("loss", "grad input", "grad target"), (in_fast[0], *in_fast[1]),
                                             (in_torch[0], *in_torch[1]), (exact[0], *exact[1])):
        assert_no_less_accurate(fast, torch_result, ref, f"{reduction} log_target={log_target} {what}")


def _ulps(actual, exact):
    info = torch.finfo(actual.dtype)
    exact = exact.double()
    spacing = info.eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(info.tiny))))
    return (actual.double() - exact).abs() / spacing


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
def test_half_precision_gradients_with_grad_output_are_rounded_once(dtype, reduction, log_target, device):
    """(loss * 0.3).backward() in half precision: the forward-made gradients are recomputed with
    grad_output applied before the one rounding, so each element is within half a unit in the last
    place of float64 torch.nn's (a whole one on CPU in bfloat16: the interpreter truncates), plus
    an eighth for the float32 evaluation; and never less accurate than torch."""
    x, y = operands((3, 1000), log_target, dtype, device)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    go = torch.tensor(0.3, dtype=dtype, device=device)
    exact = torch.autograd.grad(F.kl_div(x64, y64, reduction=reduction, log_target=log_target), (x64, y64),
                                go.double())
    in_torch = torch.autograd.grad(F.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y), go)
    with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel", "pointwise_bwd_kernel"):
        in_fast = torch.autograd.grad(FF.kl_div(x, y, reduction=reduction, log_target=log_target), (x, y), go)
    bound = (1.0 if dtype == torch.bfloat16 and device == "cpu" else 0.5) + 0.125
    for name, fast, torch_result, ref in zip(("input", "target"), in_fast, in_torch, exact):
        what = f"{reduction} log_target={log_target} grad {name}"
        assert_no_less_accurate(fast, torch_result, ref, what)
        if name == "target" and not log_target:
            continue  # log(y) + 1 - x cancels: its float32 error may reach a 16-bit unit itself
        ulps = _ulps(fast, ref)
        assert ulps.max() <= bound, f"{what}: {ulps.max():.3f} ulp"


# --------------------------------------------------------------------------------------------
# torch's warning, legacy arguments and errors
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("default")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mean_warns_like_torch(reduction, backend, device):
    x, y = operands((2, 3), False, device=device)
    for fn in (F.kl_div, FF.kl_div, lambda a, b, reduction: fastloss.KLDivLoss(reduction=reduction)(a, b)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(x, y, reduction=reduction)
        # (the interpreter's numpy RuntimeWarnings from masked-off lanes are not torch.nn's business)
        messages = [(w.category, str(w.message)) for w in caught if issubclass(w.category, UserWarning)]
        assert messages == ([(UserWarning, MEAN_WARNING)] if reduction == "mean" else []), fn


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated:UserWarning")
@pytest.mark.parametrize("legacy", [{"size_average": False}, {"reduce": False}, {"size_average": True},
                                    {"size_average": False, "reduce": True}], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "bogus"])
def test_legacy_arguments_like_torch(legacy, reduction, backend, device):
    """size_average/reduce override the reduction (unchecked then), but "batchmean" still divides by
    input.size(0); torch's deprecation warning."""
    x, y = operands((3, 4), False, device=device)
    expected = loss_and_grads(lambda: F.kl_div(x, y, reduction=reduction, **legacy), (x, y),
                              random_grad_output(F.kl_div(x, y, reduction=reduction, **legacy)))
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        loss = FF.kl_div(x, y, reduction=reduction, **legacy)
    actual = (loss.detach(), torch.autograd.grad(loss, (x, y), random_grad_output(loss)))
    check_same(actual, expected, F64, f"{legacy} {reduction}")


def _raises_like_torch(call):
    with pytest.raises(Exception) as expected:
        call(F.kl_div)
    with pytest.raises(type(expected.value)) as actual:
        call(FF.kl_div)
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("bad", [
    "reduction", "integer-input", "integer-target", "bool", "complex", "shapes", "not-a-tensor",
])
def test_bad_inputs_raise_like_torch(bad, backend, device):
    x, y = operands((3, 4), False, device=device)
    calls = {
        "reduction": lambda f: f(x, y, reduction="average"),
        "integer-input": lambda f: f(torch.ones(3, 4, dtype=torch.long, device=device), y),
        "integer-target": lambda f: f(x, torch.ones(3, 4, dtype=torch.int32, device=device)),
        "bool": lambda f: f(x, torch.ones(3, 4, dtype=torch.bool, device=device), reduction="sum"),
        "complex": lambda f: f(x.detach().to(torch.complex128), y.detach(), reduction="sum"),
        "shapes": lambda f: f(x, torch.rand(4, 4, dtype=F64, device=device), reduction="sum"),
        "not-a-tensor": lambda f: f(0.5, y, reduction="sum"),
    }
    _raises_like_torch(calls[bad])


# --------------------------------------------------------------------------------------------
# Autograd: gradcheck and gradgradcheck
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction, log_target, backend, device):
    x, y = operands((3, 5), log_target, device=device)
    with ran(backend, "pointwise_fwd_kernel"):
        assert torch.autograd.gradcheck(lambda a, b: FF.kl_div(a, b, reduction=reduction, log_target=log_target),
                                        (x, y))


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_gradgradcheck(reduction, log_target, backend, device):
    x, y = operands((2, 3), log_target, device=device)
    with ran(backend, "pointwise_fwd_kernel"):
        assert torch.autograd.gradgradcheck(
            lambda a, b: FF.kl_div(a, b, reduction=reduction, log_target=log_target), (x, y))


def test_batchmean_scale_reaches_the_kernel_gradient(triton_backend, device):
    """"batchmean" gradients are -target / input.size(0) (not / numel, not unscaled)."""
    x, y = operands((4, 5), False, device=device)
    with assert_launched("pointwise_fwd_kernel", "scale_grad_kernel"):
        gx, = torch.autograd.grad(FF.kl_div(x, y, reduction="batchmean"), (x,))
    assert_close(gx, -y.detach() / 4, F64, "batchmean grad input")


# --------------------------------------------------------------------------------------------
# Module and torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_target", [False, True], ids=["prob", "log_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_matches_torch_nn(reduction, log_target, backend, device):
    module = fastloss.KLDivLoss(reduction=reduction, log_target=log_target)
    assert isinstance(module, nn.KLDivLoss)
    assert (module.reduction, module.log_target) == (reduction, log_target)
    x, y = operands((3, 6), log_target, device=device)
    expected = loss_and_grads(lambda: nn.KLDivLoss(reduction=reduction, log_target=log_target)(x, y), (x, y))
    with ran(backend, "pointwise_fwd_kernel"):
        actual = loss_and_grads(lambda: module(x, y), (x, y))
    check_same(actual, expected, F64, f"module {reduction}")


def test_module_defaults_are_torchs():
    module, expected = fastloss.KLDivLoss(), nn.KLDivLoss()
    assert (module.reduction, module.log_target) == (expected.reduction, expected.log_target)


@pytest.mark.parametrize("compile_backend", ["auto", "triton"])
def test_torch_compile_fullgraph(compile_backend, device, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(_backend, "_triton_ok", None)
    monkeypatch.setattr(_backend, "_interpret", None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5)).to(device)
    data = torch.randn(6, 8, device=device)
    prob = torch.softmax(torch.randn(6, 5, device=device), -1)
    log_prob = prob.log()

    def step(mod):
        logp = torch.log_softmax(model(data), -1)
        return (mod.kl_div(logp, prob, reduction="batchmean")
                + 0.5 * mod.kl_div(logp, log_prob, reduction="sum", log_target=True)
                + mod.kl_div(logp, prob, reduction="none").mean())

    expected = step(F)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    compiled = torch.compile(lambda: step(FF), fullgraph=True)
    kernels = compile_backend == "triton" or device == "cuda"
    with fastloss.use_backend(compile_backend):
        launches = ("pointwise_fwd_kernel", "scale_grad_kernel", "pointwise_bwd_kernel")
        with assert_launched(*launches) if kernels else assert_not_launched():
            for _ in range(2):
                model.zero_grad()
                loss = compiled()
                loss.backward()
                assert_close(loss.detach(), expected.detach(), torch.float32, f"compiled {compile_backend}")
                for p, g in zip(model.parameters(), expected_grads):
                    assert_close(p.grad, g, torch.float32, f"compiled {compile_backend} parameter grad")
    torch._dynamo.reset()


def test_never_writes_into_callers_tensors(backend, device):
    x, y = operands((3, 7), False, device=device)
    x0, y0 = x.detach().clone(), y.detach().clone()
    for reduction in REDUCTIONS:
        loss = FF.kl_div(x, y, reduction=reduction)
        torch.autograd.grad(loss, (x, y), torch.ones_like(loss) * 0.3)
    assert torch.equal(x.detach(), x0) and torch.equal(y.detach(), y0)
    assert not math.isnan(float(FF.kl_div(x.detach(), y.detach(), reduction="sum")))

