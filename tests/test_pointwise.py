"""The pointwise loss family: MSE, L1, Huber, SmoothL1, BCE-with-logits, sigmoid focal.

The reference is checked against torch.nn (and torchvision's focal-loss formula, written inline) in
float64; the kernels are checked against the reference in every dtype; fastloss.functional and the
modules are checked against torch.nn for torch's behaviour (broadcasting, dtypes, errors, ...).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

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
from torch import Tensor, nn

import fastloss
import fastloss.functional as FF
from fastloss import _backend, baselines, specs
from fastloss import reference as R
from fastloss.cli import cases as spec_cases
from fastloss.ops import pointwise as ops

REDUCTIONS = ["none", "mean", "sum"]
TARGET_SIZE_WARNING = "Using a target size"
F64 = torch.float64


torchvision_sigmoid_focal_loss = baselines.sigmoid_focal


# --------------------------------------------------------------------------------------------
# The loss table: each case calls torch (the oracle), fastloss.functional and fastloss.reference
# with the same operands. ``extra(shape, dtype, device)`` builds extra tensor operands (BCE weights).
# --------------------------------------------------------------------------------------------

Fn = Callable[..., Tensor]


@dataclass(frozen=True)
class Case:
    name: str
    torch: Fn  # (x, y, reduction, **extra)
    fast: Fn
    ref: Fn
    probability_target: bool = False  # targets in [0, 1]
    kinks: tuple[float, ...] = ()  # |x - y| where the loss is not differentiable
    extra: Callable[[tuple[int, ...], torch.dtype, str], dict[str, Tensor]] = field(
        default=lambda shape, dtype, device: {}
    )

    def __repr__(self) -> str:
        return self.name


def _regression(name, torch_fn, fast_fn, ref_fn, kinks):
    return Case(
        name,
        torch=lambda x, y, r: torch_fn(x, y, reduction=r),
        fast=lambda x, y, r: fast_fn(x, y, reduction=r),
        ref=lambda x, y, r: ref_fn(x, y, r),
        kinks=kinks,
    )


def _huber(delta):
    return Case(
        f"huber_delta{delta:g}",
        torch=lambda x, y, r: F.huber_loss(x, y, reduction=r, delta=delta),
        fast=lambda x, y, r: FF.huber_loss(x, y, reduction=r, delta=delta),
        ref=lambda x, y, r: R.huber_loss(x, y, r, delta),
        kinks=(delta,),
    )


def _smooth_l1(beta):
    return Case(
        f"smooth_l1_beta{beta:g}",
        torch=lambda x, y, r: F.smooth_l1_loss(x, y, reduction=r, beta=beta),
        fast=lambda x, y, r: FF.smooth_l1_loss(x, y, reduction=r, beta=beta),
        ref=lambda x, y, r: R.smooth_l1_loss(x, y, r, beta),
        kinks=(0.0,) if beta == 0 else (beta,),
    )


def _class_weights(shape, dtype, device):
    """BCE weight and pos_weight of shape (C,), C = the last dimension."""
    c = shape[-1]
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    pos_weight = torch.rand(c, generator=g, dtype=torch.float64) * 3 + 0.25
    return {"weight": weight.to(device, dtype), "pos_weight": pos_weight.to(device, dtype)}


def _bce(weighted):
    return Case(
        "bce_weight_pos_weight" if weighted else "bce",
        torch=lambda x, y, r, **w: F.binary_cross_entropy_with_logits(x, y, reduction=r, **w),
        fast=lambda x, y, r, **w: FF.binary_cross_entropy_with_logits(x, y, reduction=r, **w),
        ref=lambda x, y, r, weight=None, pos_weight=None: R.binary_cross_entropy_with_logits(
            x, y, weight, r, pos_weight
        ),
        probability_target=True,
        extra=_class_weights if weighted else (lambda shape, dtype, device: {}),
    )


def _focal(alpha, gamma):
    return Case(
        f"focal_alpha{alpha:g}_gamma{gamma:g}",
        torch=lambda x, y, r: torchvision_sigmoid_focal_loss(x, y, alpha, gamma, r),
        fast=lambda x, y, r: FF.sigmoid_focal_loss(x, y, alpha, gamma, r),
        ref=lambda x, y, r: R.sigmoid_focal_loss(x, y, alpha, gamma, r),
        probability_target=True,
    )


MSE = _regression("mse", F.mse_loss, FF.mse_loss, R.mse_loss, kinks=())
L1 = _regression("l1", F.l1_loss, FF.l1_loss, R.l1_loss, kinks=(0.0,))
REGRESSION_CASES = [MSE, L1, _huber(0.5), _smooth_l1(0.5), _smooth_l1(0.0)]
BCE_CASES = [_bce(False), _bce(True)]
FOCAL_CASES = [_focal(0.25, 2.0), _focal(-1.0, 0.5)]
CASES = REGRESSION_CASES + BCE_CASES + FOCAL_CASES
# float64 reference-vs-torch also covers the default parameters and a few more
REFERENCE_CASES = CASES + [_huber(1.0), _huber(2.0), _smooth_l1(1.0), _focal(0.5, 0.0), _focal(0.25, 3.3)]
UNWEIGHTED_CASES = [c for c in CASES if c.name != "bce_weight_pos_weight"]


def case_id(case: Case) -> str:
    return case.name


def shape_id(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


# Kernels use BLOCK_SIZE 1024 up to 65536 elements: 1025 is two blocks, 3x7x129 = 2709 three.
KERNEL_SHAPES = [(0,), (1,), (7,), (1025,), (3, 7, 129)]


def make_operands(case: Case, shape, dtype, device, requires_grad=True, seed=0):
    """Input, target (both requiring grad) and extra operands; values drawn in float64, then cast."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    if case.probability_target:
        y = torch.rand(shape, generator=g, dtype=torch.float64)
        hard = torch.rand(shape, generator=g) < 0.5
        y = torch.where(hard, y.round(), y)
    else:
        y = torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(device, dtype).requires_grad_(requires_grad)
    y = y.to(device, dtype).requires_grad_(requires_grad)
    return x, y, case.extra(shape, dtype, device)


def random_grad_output(loss: Tensor, seed=2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.device, loss.dtype)


def loss_and_grads(fn: Callable[[], Tensor], inputs: tuple[Tensor, ...], grad_output: Tensor | None = None):
    """Run ``fn``; grad_output None means a plain ``.backward()`` (grad_output 1 for a reduced loss,
    ``.sum().backward()`` for reduction="none"), else ``torch.autograd.grad`` with ``grad_output``."""
    for t in inputs:
        t.grad = None
    loss = fn()
    if grad_output is None:
        (loss if loss.dim() == 0 else loss.sum()).backward()
        grads = tuple(t.grad for t in inputs)
    else:
        grads = torch.autograd.grad(loss, inputs, grad_output)
    return loss.detach(), grads


def check_same(actual, expected, dtype, what: str) -> None:
    loss_a, grads_a = actual
    loss_e, grads_e = expected
    assert_close(loss_a, loss_e, dtype, f"{what}: loss")
    for name, ga, ge in zip(("input", "target", "weight"), grads_a, grads_e):
        assert ga is not None and ge is not None, f"{what}: no gradient for {name}"
        assert_close(ga, ge, dtype, f"{what}: grad {name}")


# --------------------------------------------------------------------------------------------
# Reference vs torch.nn, float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("api", ["reference", "functional"])
@pytest.mark.parametrize("case", REFERENCE_CASES, ids=case_id)
def test_reference_matches_torch_float64(case, api, reduction, device):
    x, y, extra = make_operands(case, (4, 5, 6), torch.float64, device)
    fn = case.ref if api == "reference" else case.fast
    with fastloss.use_backend("torch"):
        for go in (None, random_grad_output(case.torch(x, y, reduction, **extra))):
            expected = loss_and_grads(lambda: case.torch(x, y, reduction, **extra), (x, y), go)
            actual = loss_and_grads(lambda: fn(x, y, reduction, **extra), (x, y), go)
            check_same(actual, expected, torch.float64, f"{case.name} {api} {reduction}")


# --------------------------------------------------------------------------------------------
# Kernels vs reference, every dtype
# --------------------------------------------------------------------------------------------


def _kernels_for(reduction: str, numel: int, dtype: torch.dtype) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(forward kernels, backward kernels) that must run for this call: a reduced loss's backward
    scales the forward-made gradients (pointwise_bwd_kernel in float16/bfloat16, which must not
    round them twice)."""
    if numel == 0:
        return (), ()
    if reduction == "none" or dtype in HALF_DTYPES:
        return ("pointwise_fwd_kernel",), ("pointwise_bwd_kernel",)
    return ("pointwise_fwd_kernel",), ("scale_grad_kernel",)


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=shape_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference(case, dtype, reduction, shape, device):
    x, y, extra = make_operands(case, shape, dtype, device)
    fwd_kernels, bwd_kernels = _kernels_for(reduction, x.numel(), dtype)

    def run_kernel():
        with fastloss.use_backend("triton"), assert_launched(*fwd_kernels):
            return case.fast(x, y, reduction, **extra)

    loss = case.ref(x, y, reduction, **extra)
    for go in (None, random_grad_output(loss)):
        expected = loss_and_grads(lambda: case.ref(x, y, reduction, **extra), (x, y), go)
        with assert_launched(*bwd_kernels):
            actual = loss_and_grads(run_kernel, (x, y), go)
        check_same(actual, expected, dtype, f"{case.name} {reduction} go={'1' if go is None else 'random'}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_precision_never_less_accurate_than_torch(case, dtype, reduction, backend, device):
    """fastloss in half precision vs torch.nn in the same dtype, both against float64 torch.nn."""
    x, y, extra = make_operands(case, (3, 1000), dtype, device)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    extra64 = {k: v.double() for k, v in extra.items()}
    go = random_grad_output(case.torch(x64, y64, reduction, **extra64)).to(dtype)
    exact = loss_and_grads(lambda: case.torch(x64, y64, reduction, **extra64), (x64, y64), go.double())
    in_torch = loss_and_grads(lambda: case.torch(x, y, reduction, **extra), (x, y), go)
    in_fast = loss_and_grads(lambda: case.fast(x, y, reduction, **extra), (x, y), go)
    for what, fast, torch_result, ref in zip(
        ("loss", "grad input", "grad target"),
        (in_fast[0], *in_fast[1]),
        (in_torch[0], *in_torch[1]),
        (exact[0], *exact[1]),
    ):
        assert_no_less_accurate(fast, torch_result, ref, f"{case.name} {reduction} {what}")


def _ulps(actual: Tensor, exact: Tensor) -> Tensor:
    """|actual - exact| in units in the last place of exact in actual's dtype (the subnormal
    spacing below its normal range)."""
    info = torch.finfo(actual.dtype)
    exact = exact.double()
    spacing = info.eps * torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(info.tiny))))
    return (actual.double() - exact).abs() / spacing


#: (reduction, grad_output): ``(loss * 0.3).backward()``, gradient accumulation's ``loss / 7``-like
#: factors, powers of two (the stored gradient scales exactly, except where the result leaves the
#: normal range or lifts a subnormal one) and a random per-element grad_output for "none".
ROUNDED_ONCE_GRAD_OUTPUTS = [("mean", 0.3), ("mean", 0.25), ("sum", 3 / 7), ("sum", 4.0), ("none", None)]


@pytest.mark.parametrize("reduction, grad_output", ROUNDED_ONCE_GRAD_OUTPUTS,
                         ids=lambda v: v if isinstance(v, str) else f"go{v:.3g}" if v else "random")
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_precision_gradients_are_rounded_once(case, dtype, reduction, grad_output, device):
    """With grad_output != 1 a reduced loss's gradient (made by the forward, stored in the input
    dtype) must not be rounded a second time when scaled: every element is within half a unit in
    the last place of float64 torch.nn's (one rounding; a whole unit on CPU in bfloat16, where
    Triton's interpreter truncates instead of rounding), and never less accurate than torch.nn."""
    x, y, extra = make_operands(case, (3, 1000), dtype, device)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    extra64 = {k: v.double() for k, v in extra.items()}
    loss64 = case.torch(x64, y64, reduction, **extra64)
    if grad_output is None:
        go = random_grad_output(loss64).to(dtype)
    else:
        go = torch.tensor(grad_output, dtype=dtype, device=device)
    exact = torch.autograd.grad(loss64, (x64, y64), go.double())
    in_torch = torch.autograd.grad(case.torch(x, y, reduction, **extra), (x, y), go)
    with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel", "pointwise_bwd_kernel"):
        in_fast = torch.autograd.grad(case.fast(x, y, reduction, **extra), (x, y), go)
    # one rounding: half a unit (a whole one where the interpreter truncates), plus an eighth for
    # the float32 evaluation of the formulas (terms that cancel for soft targets); a second
    # rounding adds up to another half unit
    bound = (1.0 if dtype == torch.bfloat16 and device == "cpu" else 0.5) + 0.125
    for name, fast, torch_result, ref in zip(("input", "target"), in_fast, in_torch, exact):
        what = f"{case.name} {reduction} grad_output={grad_output} grad {name}"
        assert_no_less_accurate(fast, torch_result, ref, what)
        if case.name.startswith("focal") and name == "target":
            continue  # a difference of terms, whose float32 error may reach a 16-bit unit itself
        ulps = _ulps(fast, ref)
        worst = int(ulps.argmax())
        assert ulps.max() <= bound, (
            f"{what}: {ulps.max():.3f} ulp at {worst}: {fast.flatten()[worst].item()!r} vs float64 "
            f"{ref.flatten()[worst].item()!r}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_retain_graph_second_backward_recomputes(case, reduction, device):
    """A reduced loss hands its forward-made gradient out in the first backward; a second backward
    (retain_graph=True) must recompute it, and the first result must not be disturbed."""
    x, y, extra = make_operands(case, (1025,), torch.float32, device)
    go1, go2 = torch.tensor(0.75, device=device), torch.tensor(-1.5, device=device)

    def grads_twice(fn, kernels=False):
        x.grad = y.grad = None
        loss = fn()
        with assert_launched(*(("scale_grad_kernel",) if kernels else ())):
            first = torch.autograd.grad(loss, (x, y), go1, retain_graph=True)
            first_copy = tuple(g.clone() for g in first)
        with assert_launched(*(("pointwise_bwd_kernel",) if kernels else ())):
            loss.backward(go2, retain_graph=True)
        with assert_launched(*(("pointwise_bwd_kernel",) if kernels else ())):
            loss.backward()
        for g, g_copy in zip(first, first_copy):
            assert torch.equal(g, g_copy), "a later backward wrote into an earlier gradient"
        return first, (x.grad, y.grad)

    expected = grads_twice(lambda: case.ref(x, y, reduction, **extra))
    with fastloss.use_backend("triton"):
        actual = grads_twice(lambda: case.fast(x, y, reduction, **extra), kernels=True)
    for (a_x, a_y), (e_x, e_y) in zip(actual, expected):
        assert_close(a_x, e_x, torch.float32, f"{case.name} grad input")
        assert_close(a_y, e_y, torch.float32, f"{case.name} grad target")


def test_reduced_kernel_gradient_for_loss_used_twice(device):
    """Two uses of one reduced loss give one backward call with grad_output 2 (no double scaling)."""
    x, y, _ = make_operands(MSE, (7, 3), torch.float32, device)
    with fastloss.use_backend("triton"):
        loss = FF.mse_loss(x, y)
        (loss + loss).backward()
    expected = torch.autograd.grad(2 * F.mse_loss(x, y), x)[0]
    assert_close(x.grad, expected, torch.float32, "mse loss + loss")


def test_no_grad_forward_matches_torch(device):
    x, y, _ = make_operands(MSE, (1025,), torch.float32, device)
    with fastloss.use_backend("triton"), torch.no_grad():
        loss = FF.mse_loss(x, y)
    assert not loss.requires_grad
    assert_close(loss, F.mse_loss(x.detach(), y.detach()), torch.float32, "mse under no_grad")


FLOAT64_SCALAR_CASES = [
    pytest.param(F.huber_loss, FF.huber_loss, {"delta": 0.1 + 1e-12}, id="huber_delta0.1+1e-12"),
    pytest.param(F.smooth_l1_loss, FF.smooth_l1_loss, {"beta": 0.1 + 1e-12}, id="smooth_l1_beta0.1+1e-12"),
    pytest.param(F.mse_loss, FF.mse_loss, {}, id="mse"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("torch_fn, fast_fn, kwargs", FLOAT64_SCALAR_CASES)
def test_float64_kernels_take_scalars_at_float64_precision(torch_fn, fast_fn, kwargs, reduction, device):
    """delta, beta and the 1/n of "mean" reach a float64 kernel unrounded (Triton types a plain
    Python float argument as fp32, which would cost ~1e-8 relatively): the loss and gradients equal
    torch.nn's in float64 to 1e-15 for n = 3, with |d| on both sides of the threshold."""
    x = torch.tensor([0.1 + 5e-13, -0.3, 0.0999999999], dtype=F64, device=device, requires_grad=True)
    y = torch.zeros(3, dtype=F64, device=device, requires_grad=True)
    go = None if reduction != "none" else torch.tensor([0.7, -1.3, 2.1], dtype=F64, device=device)
    expected = loss_and_grads(lambda: torch_fn(x, y, reduction=reduction, **kwargs), (x, y), go)
    with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel"):
        actual = loss_and_grads(lambda: fast_fn(x, y, reduction=reduction, **kwargs), (x, y), go)
    for what, a, e in zip(("loss", "grad input", "grad target"), (actual[0], *actual[1]), (expected[0], *expected[1])):
        torch.testing.assert_close(a, e, rtol=1e-15, atol=0.0, msg=lambda m, w=what: f"{w}: {m}")


def test_float_kernel_arguments_are_bound_as_fp64(monkeypatch):
    """What the interpreter cannot show (it passes Python floats as they are): the float arguments
    the launchers pass (coefficients, delta, alpha, gamma, ...) are typed fp64 by Triton's JIT, as
    a GPU launch would bind them, so a float64 kernel gets them unrounded (the kernels cast them to
    the accumulation dtype, so float32 kernels do not compute in float64)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernels, terms, tl_dtypes = ops._kernels()
    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

    fake = type("FakeKernels", (), {name: Recorder(getattr(kernels, name))
                                   for name in ("pointwise_fwd_kernel", "pointwise_bwd_kernel")})()
    monkeypatch.setattr(ops, "_kernels", lambda: (fake, terms, tl_dtypes))
    x, y = torch.randn(5, dtype=F64), torch.rand(5, dtype=F64)
    ops._fwd(x, y, None, None, "sigmoid_focal", [1.0, 0.25, 2.0], "mean", True, True)
    ops._bwd(x, y, None, None, torch.ones(()), "huber,mse", [0.3, 0.1 + 1e-12, 0.0, 0.7, 0.0, 0.0], 1 / 3,
             True, True)
    ops._rescale(x.half(), y.half(), None, None, torch.tensor(0.3), x.half(), None, "mse", [1.0, 0.0, 0.0], 0.2)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for kernel, args, kwargs in calls:
        jit = JITFunction(kernel.fn)
        meta = {k: v for k, v in kwargs.items() if k != "num_warps"}
        bound, specialization, _ = create_function_from_signature(jit.signature, jit.params, backend)(*args, **meta)
        floats = [name for name, value in bound.items() if isinstance(value, float)]
        assert floats, "no float arguments recorded"
        types = {name: ty for name, (ty, _) in zip(bound, specialization) if name in floats}
        assert set(types.values()) == {"fp64"}, f"{kernel.fn.__name__}: {types}"


# --------------------------------------------------------------------------------------------
# torch.nn behaviour: layouts, broadcasting, empty, NaN, scalars, dtypes (both backends)
# --------------------------------------------------------------------------------------------


def _compare_with_torch(case, x, y, reduction, extra=None, warns=False):
    """fastloss (current backend) vs torch.nn on the same operands: loss and all gradients."""
    extra = extra or {}
    inputs = tuple(t for t in (x, y) if t.requires_grad)

    def call(fn):
        if warns:
            with pytest.warns(UserWarning, match=TARGET_SIZE_WARNING):
                return fn(x, y, reduction, **extra)
        return fn(x, y, reduction, **extra)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        go = random_grad_output(case.torch(x.detach(), y.detach(), reduction, **extra))
    for grad_output in (None, go):
        expected = loss_and_grads(lambda: call(case.torch), inputs, grad_output)
        actual = loss_and_grads(lambda: call(case.fast), inputs, grad_output)
        check_same(actual, expected, expected[0].dtype, f"{case.name} {reduction}")
    return expected[0]


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_non_contiguous_operands(case, reduction, layout, backend, device):
    x, y, extra = make_operands(case, (14, 33), torch.float64, device, requires_grad=False)
    if layout == "transposed":
        x, y = x.t(), y.t()
    else:
        x, y = x[::2, 1:], y[1::2, :-1]
    if extra:
        extra = _class_weights(x.shape, torch.float64, device)
    assert not x.is_contiguous() and not y.is_contiguous()
    _compare_with_torch(case, x.requires_grad_(), y.requires_grad_(), reduction, extra)


BROADCAST_SHAPES = [((5, 1, 7), (3, 7)), ((3, 7), (5, 3, 7)), ((4, 1), (1, 6)), ((6,), ())]


@pytest.mark.parametrize("shapes", BROADCAST_SHAPES, ids=lambda s: f"{shape_id(s[0])}-vs-{shape_id(s[1])}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", REGRESSION_CASES, ids=case_id)
def test_broadcasting_warns_and_matches_torch(case, reduction, shapes, backend, device):
    x = make_operands(case, shapes[0], torch.float64, device, seed=3)[0]
    y = make_operands(case, shapes[1], torch.float64, device, seed=4)[1]
    _compare_with_torch(case, x, y, reduction, warns=True)


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4)], ids=shape_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_empty_operands(case, reduction, shape, backend, device):
    x, y, extra = make_operands(case, shape, torch.float32, device)
    loss = _compare_with_torch(case, x, y, reduction, extra)
    if reduction == "mean":
        assert math.isnan(loss.item())
    elif reduction == "sum":
        assert loss.item() == 0
    else:
        assert loss.shape == shape


@pytest.mark.parametrize("gamma", [2.0, 0.5, 0.0])
def test_sigmoid_focal_gradient_at_zero_logit(gamma, backend, device):
    """x = 0 exactly (a zero-initialised head): the true gradient, as torchvision's formula gives,
    not a subgradient of max(-x, 0) or |x| (the reference once gave 0.130 for 0.224 here)."""
    y = torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=F64, device=device)
    x = torch.zeros(4, dtype=F64, device=device, requires_grad=True)
    (expected,) = torch.autograd.grad(torchvision_sigmoid_focal_loss(x, y, 0.25, gamma, "sum"), x)
    with assert_launched("pointwise_fwd_kernel") if backend == "triton" else contextlib.nullcontext():
        (actual,) = torch.autograd.grad(FF.sigmoid_focal_loss(x, y, 0.25, gamma, "sum"), x)
    assert_close(actual, expected, F64, f"gamma={gamma}")


@pytest.mark.parametrize("alpha", [0.25, -1.0], ids=lambda a: f"alpha{a:g}")
@pytest.mark.parametrize("gamma", [2.0, 3.0, 1.0, 0.5, 2.0001, 0.0], ids=lambda g: f"gamma{g:g}")
def test_sigmoid_focal_targets_outside_unit_interval_match_torchvision(gamma, alpha, backend, device):
    """Targets outside [0, 1] can make 1 - p_t negative: torchvision's formula then gives
    (1 - p_t)**gamma as torch.pow does (NaN for a fractional gamma, the signed power for an integer
    one), in the loss and both gradients (x = -1.877, y = -0.275 gave 0 instead of 5e-4)."""
    x = torch.cat([torch.linspace(-10.0, 10.0, 41, dtype=F64), torch.tensor([-1.877, -1.536], dtype=F64)])
    for value in (-0.275, 1.3, -2.0, 2.5):
        y = torch.full_like(x, value)
        xs, ys = x.to(device).requires_grad_(), y.to(device).requires_grad_()
        expected = loss_and_grads(lambda a=xs, b=ys: torchvision_sigmoid_focal_loss(a, b, alpha, gamma, "none"),
                                  (xs, ys))
        with assert_launched("pointwise_fwd_kernel") if backend == "triton" else contextlib.nullcontext():
            actual = loss_and_grads(lambda a=xs, b=ys: FF.sigmoid_focal_loss(a, b, alpha, gamma, "none"), (xs, ys))
        check_same(actual, expected, F64, f"y={value} gamma={gamma}")
        assert (actual[0].nan_to_num() != 0).any()


@pytest.mark.parametrize("alpha", [1.5, -0.5, -2.0, 1.0 + 1e-9, float("nan")], ids=str)
def test_sigmoid_focal_alpha_outside_unit_interval_raises_value_error(alpha, backend, device):
    """torchvision (pytorch/vision#8882): alpha in [0, 1], or -1 to disable the weighting."""
    x, y = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    with pytest.raises(ValueError, match=r"Invalid alpha value: .*\. alpha must be in the range \[0,1\] or -1 "
                                         r"for ignore\."):
        FF.sigmoid_focal_loss(x, y, alpha=alpha)
    with pytest.raises(ValueError, match="Invalid alpha value"):
        fastloss.SigmoidFocalLoss(alpha=alpha)(x, y)
    for ok in (0.0, 1.0, -1.0, -1):
        FF.sigmoid_focal_loss(x, y, alpha=ok)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 0.5])
@pytest.mark.parametrize("alpha", [0.25, -1.0], ids=lambda a: f"alpha{a:g}")
def test_sigmoid_focal_infinite_logits_gradients_like_torchvision(alpha, gamma, backend, device):
    """x = +-inf: the loss is torch's (inf, or NaN where its BCE is NaN); at gamma = 0
    (1 - p_t)**0 = 1 drops out of the gradient (torch.pow's backward gives 0 for exponent 0), so
    the input gradient is finite where the loss is inf, not inf * 0 = NaN. The target gradient
    is compared at gamma = 0, where no product of autograd's own 0 * inf enters."""
    inf = float("inf")
    x = torch.tensor([inf, -inf] * 3 + [3.0], dtype=F64, device=device, requires_grad=True)
    y = torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 0.3], dtype=F64, device=device, requires_grad=True)
    expected = loss_and_grads(lambda: torchvision_sigmoid_focal_loss(x, y, alpha, gamma, "none"), (x, y))
    with assert_launched("pointwise_fwd_kernel") if backend == "triton" else contextlib.nullcontext():
        actual = loss_and_grads(lambda: FF.sigmoid_focal_loss(x, y, alpha, gamma, "none"), (x, y))
    (loss, (gx, gy)), (loss_e, (gx_e, gy_e)) = actual, expected
    assert_close(loss, loss_e, F64, "loss")
    # where the loss is not NaN, the input gradient is torchvision's
    valid = ~loss_e.isnan()
    assert_close(gx[valid], gx_e[valid], F64, "grad input")
    if gamma == 0:
        assert torch.isfinite(gx[valid]).all()
        assert_close(gx, gx_e, F64, "grad input")
        assert_close(gy, gy_e, F64, "grad target")


@pytest.mark.parametrize("case", BCE_CASES + FOCAL_CASES, ids=case_id)
def test_infinite_logits_give_torchs_loss(case, backend, device):
    """x = +-inf with targets 0, 1/2, 1: the loss torch gives, NaN where its formula makes NaN
    (x = -inf) and inf where it makes inf, although the kernels evaluate another form."""
    x = torch.tensor([float("-inf")] * 3 + [float("inf")] * 3 + [2.0, -3.0], device=device)
    y = torch.tensor([0.0, 0.5, 1.0] * 2 + [0.0, 1.0], device=device)
    extra = case.extra((8,), torch.float32, device)
    expected = case.torch(x, y, "none", **extra)
    with assert_launched("pointwise_fwd_kernel") if backend == "triton" else contextlib.nullcontext():
        actual = case.fast(x, y, "none", **extra)
    assert torch.equal(actual.isnan(), expected.isnan()), f"{case.name}: {actual} vs torch {expected}"
    assert_close(actual, expected, torch.float32, case.name)


@pytest.mark.parametrize("pos_weight", [None, 2.0, 1.0, 0.5, 0.0], ids=lambda p: f"pos_weight{p}")
def test_bce_infinite_operands_give_torchs_values(pos_weight, backend, device):
    """Targets (and logits) of +-inf: torch's loss and both gradients, +-inf where its formula
    gives them and NaN where it gives NaN (with a pos_weight, every infinite target's input
    gradient is NaN in torch, also for pos_weight 1), though the kernels evaluate another form."""
    inf = float("inf")
    values = [(a, b) for a in (2.0, -3.0, 0.0, inf, -inf, 50.0, -50.0) for b in (inf, -inf, 0.0, 1.0, 0.5, 1.5)]
    x = torch.tensor([a for a, _ in values], dtype=F64, device=device, requires_grad=True)
    y = torch.tensor([b for _, b in values], dtype=F64, device=device, requires_grad=True)
    extra = {} if pos_weight is None else {"pos_weight": torch.full_like(y.detach(), pos_weight)}
    expected = loss_and_grads(lambda: F.binary_cross_entropy_with_logits(x, y, reduction="none", **extra), (x, y))
    with assert_launched("pointwise_fwd_kernel") if backend == "triton" else contextlib.nullcontext():
        actual = loss_and_grads(lambda: FF.binary_cross_entropy_with_logits(x, y, reduction="none", **extra),
                                (x, y))
    check_same(actual, expected, F64, f"pos_weight={pos_weight}")


def test_weighted_huber_infinite_difference_gradient_like_torch(backend, device):
    """torch's weighted huber multiplies its own huber_loss by the weight: at d = +-inf the
    gradient is +-delta w, not the NaN of a where() whose other branch is inf * 0."""
    inf = float("inf")
    x = torch.tensor([inf, -inf, 1.0, 0.1, -3.0], dtype=F64, device=device, requires_grad=True)
    y = torch.zeros(5, dtype=F64, device=device)
    weight = torch.tensor([0.5, 2.0, 1.5, 0.25, 3.0], dtype=F64, device=device)
    for reduction in REDUCTIONS:
        expected = loss_and_grads(lambda r=reduction: F.huber_loss(x, y, reduction=r, delta=0.7, weight=weight), (x,))
        actual = loss_and_grads(lambda r=reduction: FF.huber_loss(x, y, reduction=r, delta=0.7, weight=weight), (x,))
        check_same(actual, expected, F64, f"weighted huber {reduction}")
        assert torch.isfinite(actual[1][0]).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nan_propagates_like_torch(case, reduction, backend, device):
    x, y, extra = make_operands(case, (3, 1030), torch.float32, device, requires_grad=False)
    nan_at = torch.zeros(x.shape, dtype=torch.bool)
    nan_at[0, 5] = nan_at[2, 1029] = True
    x[nan_at] = float("nan")
    y[1, 7] = float("nan")
    nan_at[1, 7] = True
    x.requires_grad_(), y.requires_grad_()
    expected = case.torch(x, y, reduction, **extra)
    actual = case.fast(x, y, reduction, **extra)
    assert_close(actual.detach(), expected.detach(), torch.float32, f"{case.name} {reduction}")
    if reduction == "none":
        assert torch.equal(actual.isnan(), nan_at), "NaN must show exactly where an operand is NaN"
    else:
        assert actual.isnan().item()
    # gradients: NaN exactly where torch's are (huber/smooth L1 too), the rest unaffected
    go = random_grad_output(actual)
    g_actual = torch.autograd.grad(actual, (x, y), go)
    g_expected = torch.autograd.grad(expected, (x, y), go)
    for name, a, e in zip(("input", "target"), g_actual, g_expected):
        assert_close(a, e, torch.float32, f"{case.name} {reduction} grad {name}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", UNWEIGHTED_CASES, ids=case_id)
def test_scalar_operands(case, reduction, backend, device):
    x = torch.tensor(0.7, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.tensor(0.3 if case.probability_target else -0.4, dtype=torch.float64, device=device,
                     requires_grad=True)
    loss = _compare_with_torch(case, x, y, reduction)
    assert loss.shape == ()


def _mixed_dtype_oracle(case: Case) -> Case:
    """torch.nn on explicitly promoted operands, differentiable (huber_loss's backward fails on mixed
    dtypes); huber_loss's result rounded into the input's dtype, as its forward does."""

    def oracle(a, b, r):
        dtype = torch.promote_types(a.dtype, b.dtype)
        out = case.torch(a.to(dtype), b.to(dtype), r)
        return out.to(a.dtype) if case.name.startswith("huber") else out

    return Case(case.name, torch=oracle, fast=case.fast, ref=case.ref)


@pytest.mark.parametrize("case", REGRESSION_CASES + BCE_CASES[:1], ids=case_id)
def test_float32_input_float64_target_promotes_like_torch(case, backend, device):
    """float64 results, but huber_loss's, which torch.nn gives in the input's dtype."""
    x, y, _ = make_operands(case, (4, 9), torch.float32, device, requires_grad=False)
    x, y = x.requires_grad_(), y.double().requires_grad_()
    for reduction in REDUCTIONS:  # gradient dtypes (float32, float64) are checked against torch's
        dtype = case.torch(x, y, reduction).dtype
        assert dtype == (torch.float32 if case.name.startswith("huber") else torch.float64)
        assert _compare_with_torch(_mixed_dtype_oracle(case), x, y, reduction).dtype == dtype


@pytest.mark.parametrize("case", REGRESSION_CASES, ids=case_id)
def test_zero_dim_float64_target_promotes_like_torch(case, backend, device):
    """torch.nn broadcasts before computing, so a 0-dim float64 target promotes a float32 input
    (huber_loss: computes in float64, returns float32)."""
    x = torch.randn(6, device=device, requires_grad=True)
    y = torch.tensor(0.25, dtype=torch.float64, device=device, requires_grad=True)
    with pytest.warns(UserWarning, match=TARGET_SIZE_WARNING):
        dtype = case.torch(x, y, "mean").dtype
    assert dtype == (torch.float32 if case.name.startswith("huber") else torch.float64)
    loss = _compare_with_torch(_mixed_dtype_oracle(case), x, y, "mean", warns=True)
    assert loss.dtype == dtype


MIXED_FLOAT_DTYPES = [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float16, torch.bfloat16),
                      (torch.bfloat16, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.float64)]


@pytest.mark.parametrize("dtypes", MIXED_FLOAT_DTYPES, ids=lambda d: f"{dtype_id(d[0])}-{dtype_id(d[1])}")
@pytest.mark.parametrize("case", REGRESSION_CASES, ids=case_id)
def test_mixed_float_dtypes_give_torchs_dtype_and_values(case, dtypes, backend, device):
    """torch.nn's result dtype (the promoted one; huber_loss: the input's, e.g. float32 for a
    float64 target, float16 for bfloat16) and its values, rounded once into that dtype."""
    x, y, _ = make_operands(case, (4, 9), dtypes[0], device, requires_grad=False)
    y = y.to(dtypes[1])
    for reduction in REDUCTIONS:
        expected = case.torch(x, y, reduction)
        actual = case.fast(x, y, reduction)
        assert actual.dtype == expected.dtype, f"{reduction}: {actual.dtype} != torch's {expected.dtype}"
        exact = case.torch(x.double(), y.double(), reduction)
        assert_no_less_accurate(actual, expected, exact, f"{case.name} {dtypes} {reduction}")
    x, y = x.requires_grad_(), y.requires_grad_()
    grads = torch.autograd.grad(case.fast(x, y, "sum"), (x, y))
    expected = torch.autograd.grad(_mixed_dtype_oracle(case).torch(x, y, "sum"), (x, y))
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    exact = torch.autograd.grad(case.torch(x64, y64, "sum"), (x64, y64))
    for name, g, e, ex in zip(("input", "target"), grads, expected, exact):
        assert g.dtype == e.dtype, f"grad {name}: {g.dtype} != torch's {e.dtype}"
        assert_no_less_accurate(g, e, ex, f"{case.name} {dtypes} grad {name}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", [MSE, L1, _smooth_l1(0.5)], ids=case_id)
def test_integer_target_with_float_input(case, reduction, backend, device):
    """(torch.nn's huber_loss backward fails on an integer target, so it is left out.)"""
    x = torch.randn(5, 8, device=device, requires_grad=True)
    y = torch.randint(-2, 3, (5, 8), device=device)
    loss = _compare_with_torch(case, x, y, reduction)
    assert loss.dtype == torch.float32


WEIGHTED_REGRESSION = [
    pytest.param(F.mse_loss, FF.mse_loss, id="mse"),
    pytest.param(F.l1_loss, FF.l1_loss, id="l1"),
    pytest.param(F.huber_loss, FF.huber_loss, id="huber"),
]


@pytest.mark.parametrize("shapes", [((4, 6), (4, 6)), ((4, 1), (1, 6))], ids=["same", "broadcast_target"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("torch_fn, fast_fn", WEIGHTED_REGRESSION)
def test_weighted_regression_matches_torch(torch_fn, fast_fn, reduction, shapes, backend, device):
    """torch.nn's ``weight=``: "mean" is sum(w l) / sum(w) for mse and l1 (the weight's own sum, not
    its broadcast), but the plain mean of w l for huber."""
    x = make_operands(MSE, shapes[0], torch.float64, device, seed=8)[0]
    y = make_operands(MSE, shapes[1], torch.float64, device, seed=9)[1]
    weight = (torch.rand(shapes[0], dtype=torch.float64) + 0.5).to(device)
    case = Case(
        "weighted",
        torch=lambda a, b, r: torch_fn(a, b, reduction=r, weight=weight),
        fast=lambda a, b, r: fast_fn(a, b, reduction=r, weight=weight),
        ref=None,
    )
    _compare_with_torch(case, x, y, reduction, warns=shapes[0] != shapes[1])
    with pytest.raises(ValueError, match="Weights and input must have the same size"):
        fast_fn(x, y, weight=weight[:1])


WEIGHT_DTYPES = [(torch.float32, torch.float32, torch.float64), (torch.float16, torch.float16, torch.float32),
                 (torch.bfloat16, torch.float16, torch.float64), (torch.float32, torch.float64, torch.float16),
                 (torch.float64, torch.float64, torch.float32)]


@pytest.mark.parametrize("dtypes", WEIGHT_DTYPES, ids=lambda d: "-".join(map(dtype_id, d)))
@pytest.mark.parametrize("torch_fn, fast_fn", WEIGHTED_REGRESSION)
def test_weighted_regression_dtype_follows_the_weight_like_torch(torch_fn, fast_fn, dtypes, backend, device):
    """torch.nn multiplies by the weight, so its dtype promotes the result's (huber: the input's
    dtype with the weight's; mse, l1: input's, target's and weight's)."""
    g = torch.Generator().manual_seed(11)
    x, y, w = (torch.randn(4, 6, generator=g, dtype=F64).to(device, dt) for dt in dtypes)
    w = w.abs() + 0.5
    for reduction in REDUCTIONS:
        expected = torch_fn(x, y, reduction=reduction, weight=w)
        actual = fast_fn(x, y, reduction=reduction, weight=w)
        assert actual.dtype == expected.dtype, f"{reduction}: {actual.dtype} != torch's {expected.dtype}"
        assert_close(actual, expected, max(dtypes, key=lambda d: torch.finfo(d).eps), reduction)


# --------------------------------------------------------------------------------------------
# BCE with logits: weights
# --------------------------------------------------------------------------------------------

N, C, L = 6, 5, 4
WEIGHT_SHAPES = {
    "per_class": ((N, C), (C,)),
    "per_sample": ((N, C), (N, 1)),
    "full": ((N, C), (N, C)),
    "scalar_like": ((N, C), (1,)),
    "per_channel_3d": ((N, C, L), (C, 1)),
    "per_sample_position_3d": ((N, C, L), (N, 1, L)),
    "none": ((N, C), None),
}
BCE = BCE_CASES[0]


@pytest.mark.parametrize("with_pos_weight", [False, True], ids=["no_pos_weight", "pos_weight"])
@pytest.mark.parametrize("weight_shape", list(WEIGHT_SHAPES), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_weight_shapes_match_torch(weight_shape, with_pos_weight, reduction, backend, device):
    shape, w_shape = WEIGHT_SHAPES[weight_shape]
    x, y, _ = make_operands(BCE, shape, torch.float64, device)
    g = torch.Generator().manual_seed(5)
    extra = {}
    if w_shape is not None:
        extra["weight"] = (torch.rand(w_shape, generator=g, dtype=torch.float64) + 0.5).to(device)
    if with_pos_weight:
        pw_shape = (C, 1) if len(shape) == 3 else (C,)
        extra["pos_weight"] = (torch.rand(pw_shape, generator=g, dtype=torch.float64) * 3).to(device)
    if backend == "triton":
        with assert_launched("pointwise_fwd_kernel"):
            _compare_with_torch(BCE, x, y, reduction, extra)
    else:
        _compare_with_torch(BCE, x, y, reduction, extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weight_shape", ["per_class", "per_sample", "per_channel_3d"])
def test_bce_weighted_kernel_matches_reference(weight_shape, dtype, device):
    shape, w_shape = WEIGHT_SHAPES[weight_shape]
    x, y, _ = make_operands(BCE, shape, dtype, device)
    weight = (torch.rand(w_shape, dtype=torch.float64) + 0.5).to(device, dtype)
    for reduction in REDUCTIONS:
        expected = loss_and_grads(
            lambda r=reduction: R.binary_cross_entropy_with_logits(x, y, weight, r), (x, y)
        )
        with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel"):
            actual = loss_and_grads(
                lambda r=reduction: FF.binary_cross_entropy_with_logits(x, y, weight, reduction=r), (x, y)
            )
        check_same(actual, expected, dtype, f"bce weight {weight_shape} {reduction}")


@pytest.mark.parametrize("arg", ["weight", "pos_weight"])
def test_bce_weights_requiring_grad_raise_like_torch(arg, backend, device):
    x, y, _ = make_operands(BCE, (N, C), torch.float32, device)
    w = torch.rand(C, device=device, requires_grad=True)
    message = f"not differentiable with respect to argument '{arg}'"
    with pytest.raises(RuntimeError, match=message):
        F.binary_cross_entropy_with_logits(x, y, **{arg: w})
    with pytest.raises(RuntimeError, match=message):
        FF.binary_cross_entropy_with_logits(x, y, **{arg: w})


@pytest.mark.parametrize("fn", [FF.binary_cross_entropy_with_logits, FF.sigmoid_focal_loss],
                         ids=["bce", "focal"])
def test_bce_and_focal_target_size_mismatch_raises_value_error(fn, backend, device):
    x = torch.randn(4, 3, device=device)
    with pytest.raises(ValueError, match="Target size"):
        F.binary_cross_entropy_with_logits(x, torch.rand(4, 1, device=device))
    with pytest.raises(ValueError, match="Target size"):
        fn(x, torch.rand(4, 1, device=device))
    with pytest.raises(ValueError, match="Target size"):
        fn(x, torch.rand(3, 4, device=device))


def test_bce_weighted_loss_dtype_follows_input(backend, device):
    x, y, _ = make_operands(BCE, (N, C), torch.float32, device, requires_grad=False)
    weight = torch.rand(C, dtype=torch.float64, device=device)
    for reduction in REDUCTIONS:
        expected = F.binary_cross_entropy_with_logits(x, y, weight, reduction=reduction)
        actual = FF.binary_cross_entropy_with_logits(x, y, weight, reduction=reduction)
        assert_close(actual, expected, torch.float32, f"bce float64 weight {reduction}")


@pytest.mark.parametrize("case", [BCE_CASES[0], FOCAL_CASES[0]], ids=case_id)
def test_confident_logits_keep_relative_accuracy(case, backend, device):
    """Tiny losses of confident logits (softplus(-x) ~ exp(-x)) are as accurate, relative to their
    size, as torch's in float32: no log(1 + exp(-x)) that rounds them to 0."""
    x = torch.tensor([5.0, 10.0, 15.0, 20.0, 30.0, 50.0, -5.0, -10.0, -15.0, -30.0], device=device)
    for y in ((x > 0).float(), (x < 0).float()):
        exact = case.torch(x.double(), y.double(), "none")
        rel_fast = (case.fast(x, y, "none").double() - exact).abs() / exact.abs().clamp_min(1e-300)
        rel_torch = (case.torch(x, y, "none").double() - exact).abs() / exact.abs().clamp_min(1e-300)
        assert (rel_fast <= rel_torch + 1e-5).all(), f"{rel_fast} vs torch {rel_torch}"


# --------------------------------------------------------------------------------------------
# Sigmoid focal loss (torchvision's semantics)
# --------------------------------------------------------------------------------------------

GAMMAS = [0.0, 0.5, 1.0, 2.0, 3.3]
ALPHAS = [0.25, -1.0, 0.5, 0.9]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", ALPHAS, ids=lambda a: f"alpha{a:g}")
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma{g:g}")
def test_sigmoid_focal_matches_torchvision(gamma, alpha, reduction, backend, device):
    x, y, _ = make_operands(FOCAL_CASES[0], (3, 7, 11), torch.float64, device)
    _compare_with_torch(_focal(alpha, gamma), x, y, reduction)


def test_sigmoid_focal_defaults(backend, device):
    x, y, _ = make_operands(FOCAL_CASES[0], (5, 9), torch.float64, device, requires_grad=False)
    out = FF.sigmoid_focal_loss(x, y)
    assert out.shape == x.shape, "functional default reduction is 'none'"
    assert_close(out, torchvision_sigmoid_focal_loss(x, y, 0.25, 2.0, "none"), torch.float64, "defaults")
    module = fastloss.SigmoidFocalLoss()
    assert (module.alpha, module.gamma, module.reduction) == (0.25, 2.0, "mean")
    assert_close(module(x, y), torchvision_sigmoid_focal_loss(x, y, 0.25, 2.0, "mean"), torch.float64,
                 "module default reduction is 'mean'")
    module = fastloss.SigmoidFocalLoss(alpha=-1, gamma=0.5, reduction="sum")
    assert_close(module(x, y), torchvision_sigmoid_focal_loss(x, y, -1, 0.5, "sum"), torch.float64,
                 "module arguments")


@pytest.mark.parametrize("alpha", [-1.0, 0.25, 0.5], ids=lambda a: f"alpha{a:g}")
@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.3], ids=lambda g: f"gamma{g:g}")
def test_sigmoid_focal_properties(gamma, alpha, backend, device):
    """torchvision's own checks: focal <= BCE (class weights <= 1), and focal / BCE is exactly
    alpha_t (1 - p_t)^gamma."""
    x, y, _ = make_operands(FOCAL_CASES[0], (4, 50), torch.float64, device, requires_grad=False)
    focal = FF.sigmoid_focal_loss(x, y, alpha, gamma, "none")
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    assert (focal <= bce).all()
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    alpha_t = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else torch.ones_like(y)
    assert_close(focal / bce, alpha_t * (1 - p_t) ** gamma, torch.float64, "focal / bce")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_without_alpha_and_gamma_is_bce(reduction, backend, device):
    x, y, _ = make_operands(FOCAL_CASES[0], (3, 7, 11), torch.float64, device)
    for go in (None, random_grad_output(F.binary_cross_entropy_with_logits(x, y, reduction=reduction))):
        expected = loss_and_grads(lambda: F.binary_cross_entropy_with_logits(x, y, reduction=reduction),
                                  (x, y), go)
        actual = loss_and_grads(lambda: FF.sigmoid_focal_loss(x, y, -1.0, 0.0, reduction), (x, y), go)
        check_same(actual, expected, torch.float64, f"focal(alpha=-1, gamma=0) vs bce {reduction}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("alpha", [0.25, -1.0], ids=lambda a: f"alpha{a:g}")
@pytest.mark.parametrize("gamma", GAMMAS, ids=lambda g: f"gamma{g:g}")
def test_sigmoid_focal_gradient_finite_when_p_t_is_one(gamma, alpha, dtype, backend, device):
    """Very large |logits| with matching hard targets: p_t -> 1 and the loss and its gradient -> 0."""
    x = torch.tensor([12.0, -12.0, 30.0, -30.0, 100.0, -100.0, 1000.0, -1000.0], dtype=dtype, device=device)
    y = (x > 0).to(dtype)
    x.requires_grad_(), y.requires_grad_()
    for reduction in REDUCTIONS:
        loss = FF.sigmoid_focal_loss(x, y, alpha, gamma, reduction)
        gx, gy = torch.autograd.grad(loss, (x, y), torch.ones_like(loss))
        assert torch.isfinite(loss).all(), f"loss {loss}"
        assert torch.isfinite(gx).all() and torch.isfinite(gy).all(), f"grads {gx} {gy}"
        # d loss / d x -> 0 (the logit is already right); d/dy is bounded by |x| (dce/dy = -x)
        assert gx.abs().max() < 1e-4, f"grad input {gx}"
        assert (gy.abs() <= x.detach().abs() + 1).all(), f"grad target {gy}"


# --------------------------------------------------------------------------------------------
# gradcheck, float64, both backends
# --------------------------------------------------------------------------------------------


def _kink_free_operands(case: Case, device):
    """Operands with |x - y| at least 0.1 away from every kink; BCE/focal targets in (0.1, 0.9)."""
    g = torch.Generator().manual_seed(7)
    shape = (3, 4)
    if case.probability_target:
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        y = torch.rand(shape, generator=g, dtype=torch.float64) * 0.8 + 0.1
    else:
        y = torch.randn(shape, generator=g, dtype=torch.float64)
        # |d| alternates between (0.1, 0.4) and (0.6, 1.5): around a kink at 0.5 and off 0
        size = torch.rand(shape, generator=g, dtype=torch.float64)
        size = torch.where(torch.arange(12).reshape(shape) % 2 == 0, 0.1 + 0.3 * size, 0.6 + 0.9 * size)
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
        x = y + sign * size
        for kink in case.kinks:
            assert ((x - y).abs() - kink).abs().min() >= 0.1
    return x.to(device).requires_grad_(), y.to(device).requires_grad_()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck(case, reduction, backend, device):
    x, y = _kink_free_operands(case, device)
    extra = case.extra(x.shape, torch.float64, device)
    assert torch.autograd.gradcheck(lambda a, b: case.fast(a, b, reduction, **extra), (x, y))


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

MODULE_PAIRS = [
    (fastloss.MSELoss, nn.MSELoss, {}),
    (fastloss.L1Loss, nn.L1Loss, {}),
    (fastloss.HuberLoss, nn.HuberLoss, {"delta": 0.5}),
    (fastloss.SmoothL1Loss, nn.SmoothL1Loss, {"beta": 0.5}),
    (fastloss.SmoothL1Loss, nn.SmoothL1Loss, {"beta": 0.0}),
    (fastloss.BCEWithLogitsLoss, nn.BCEWithLogitsLoss, {}),
    (fastloss.BCEWithLogitsLoss, nn.BCEWithLogitsLoss,
     {"weight": torch.linspace(0.5, 1.5, C, dtype=torch.float64),
      "pos_weight": torch.linspace(0.25, 3.0, C, dtype=torch.float64)}),
]
LEGACY_ARGS = [
    {"size_average": False},
    {"reduce": False},
    {"size_average": True, "reduce": True},
    {"size_average": False, "reduce": True},
]


def _module_id(pair):
    fast_cls, _, kwargs = pair
    return fast_cls.__name__ + "".join(f"_{k}" for k in kwargs)


def _on_device(kwargs, device):
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}


def _module_targets(torch_cls, shape, device):
    x, y, _ = make_operands(BCE if torch_cls is nn.BCEWithLogitsLoss else MSE, shape, torch.float64, device)
    return x, y


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pair", MODULE_PAIRS, ids=_module_id)
def test_module_matches_torch_nn(pair, reduction, backend, device):
    fast_cls, torch_cls, kwargs = pair
    kwargs = _on_device(kwargs, device)
    fast, ref = fast_cls(reduction=reduction, **kwargs), torch_cls(reduction=reduction, **kwargs)
    assert isinstance(fast, torch_cls)
    x, y = _module_targets(torch_cls, (N, C), device)
    for go in (None, random_grad_output(ref(x, y))):
        check_same(loss_and_grads(lambda: fast(x, y), (x, y), go),
                   loss_and_grads(lambda: ref(x, y), (x, y), go), torch.float64, _module_id(pair))


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize("legacy", LEGACY_ARGS, ids=lambda d: "_".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("pair", [p for p in MODULE_PAIRS if p[1] is not nn.HuberLoss], ids=_module_id)
def test_module_legacy_reduction_args(pair, legacy, device):
    fast_cls, torch_cls, kwargs = pair
    kwargs = _on_device(kwargs, device)
    fast, ref = fast_cls(**legacy, **kwargs), torch_cls(**legacy, **kwargs)
    assert fast.reduction == ref.reduction
    x, y = _module_targets(torch_cls, (N, C), device)
    assert_close(fast(x, y), ref(x, y), torch.float64, f"{_module_id(pair)} {legacy}")


def test_module_constructor_attributes_are_torchs():
    assert fastloss.HuberLoss(delta=0.3).delta == 0.3
    assert fastloss.SmoothL1Loss(beta=0.2).beta == 0.2
    assert fastloss.MSELoss().reduction == nn.MSELoss().reduction == "mean"
    with pytest.raises(TypeError):
        fastloss.HuberLoss(size_average=False)  # torch.nn.HuberLoss has no legacy arguments
    with pytest.raises(TypeError):
        nn.HuberLoss(size_average=False)


def test_bce_module_state_dict_has_torchs_buffers():
    weight, pos_weight = torch.rand(C), torch.rand(C)
    fast = fastloss.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight)
    ref = nn.BCEWithLogitsLoss(weight=weight, pos_weight=pos_weight)
    assert list(fast.state_dict()) == list(ref.state_dict()) == ["weight", "pos_weight"]
    assert list(fastloss.BCEWithLogitsLoss().state_dict()) == list(nn.BCEWithLogitsLoss().state_dict())
    other = fastloss.BCEWithLogitsLoss(weight=torch.zeros(C), pos_weight=torch.zeros(C))
    other.load_state_dict(ref.state_dict())
    assert torch.equal(other.weight, weight) and torch.equal(other.pos_weight, pos_weight)
    assert list(dict(fast.named_buffers())) == list(dict(ref.named_buffers()))


def test_bce_module_moves_its_weights_with_to():
    fast = fastloss.BCEWithLogitsLoss(weight=torch.rand(C), pos_weight=torch.rand(C)).double()
    assert fast.weight.dtype == fast.pos_weight.dtype == torch.float64


# --------------------------------------------------------------------------------------------
# Bad input: torch's exceptions
# --------------------------------------------------------------------------------------------

REGRESSION_FUNCTIONS = [
    pytest.param(F.mse_loss, FF.mse_loss, id="mse"),
    pytest.param(F.l1_loss, FF.l1_loss, id="l1"),
    pytest.param(F.huber_loss, FF.huber_loss, id="huber"),
    pytest.param(F.smooth_l1_loss, FF.smooth_l1_loss, id="smooth_l1"),
]
ALL_FUNCTIONS = REGRESSION_FUNCTIONS + [
    pytest.param(F.binary_cross_entropy_with_logits, FF.binary_cross_entropy_with_logits, id="bce"),
    pytest.param(torchvision_sigmoid_focal_loss, FF.sigmoid_focal_loss, id="focal"),
]


@pytest.mark.filterwarnings(f"ignore:{TARGET_SIZE_WARNING}")
@pytest.mark.parametrize("torch_fn, fast_fn", REGRESSION_FUNCTIONS)
def test_non_broadcastable_shapes_raise_runtime_error(torch_fn, fast_fn, backend, device):
    x, y = torch.randn(3, 4, device=device), torch.randn(3, 5, device=device)
    with pytest.raises(RuntimeError):
        torch_fn(x, y)
    with pytest.raises(RuntimeError):
        fast_fn(x, y)


@pytest.mark.parametrize("torch_fn, fast_fn", ALL_FUNCTIONS)
def test_integer_input_raises_runtime_error(torch_fn, fast_fn, backend, device):
    x, y = torch.randint(0, 2, (3, 4), device=device), torch.randint(0, 2, (3, 4), device=device)
    with pytest.raises(RuntimeError):  # NotImplementedError is a RuntimeError
        torch_fn(x, y)
    with pytest.raises(RuntimeError):
        fast_fn(x, y)


@pytest.mark.parametrize("torch_fn, fast_fn", ALL_FUNCTIONS[4:])
def test_integer_logits_with_float_target_raise_runtime_error(torch_fn, fast_fn, backend, device):
    x, y = torch.randint(0, 2, (3, 4), device=device), torch.rand(3, 4, device=device)
    with pytest.raises(RuntimeError):
        torch_fn(x, y)
    with pytest.raises(RuntimeError):
        fast_fn(x, y)


@pytest.mark.parametrize("case", [MSE, L1, _smooth_l1(0.5)], ids=case_id)
def test_integer_input_with_float_target_promotes_like_torch(case, backend, device):
    """torch.nn computes in the promoted dtype (its huber_loss fails on an internal cast instead)."""
    x = torch.randint(-2, 3, (5, 8), device=device)
    y = torch.randn(5, 8, device=device, requires_grad=True)
    for reduction in REDUCTIONS:
        assert _compare_with_torch(case, x, y, reduction).dtype == torch.float32


@pytest.mark.parametrize("torch_fn, fast_fn", ALL_FUNCTIONS[4:])
def test_bce_and_focal_integer_target_raise_runtime_error(torch_fn, fast_fn, backend, device):
    """(torchvision's focal loss fails in binary_cross_entropy_with_logits.)"""
    x, y = torch.randn(3, 4, device=device), torch.randint(0, 2, (3, 4), device=device)
    with pytest.raises(RuntimeError):
        torch_fn(x, y)
    with pytest.raises(RuntimeError):
        fast_fn(x, y)


def _stable_bce64(x, y):
    """float64 BCE with logits as (1 - y) softplus(x) + y softplus(-x): no cancellation, unlike
    torch's formula, which gives 0 for x = -33, y = 0 even in float64 (true value 4.7e-15)."""
    return (1 - y) * F.softplus(x, threshold=50) + y * F.softplus(-x, threshold=50)


def _stable_focal64(x, y, alpha, gamma):
    """float64 sigmoid focal loss with the stable BCE and 1 - p_t = s (1 - y) + sigmoid(-x) y."""
    m = torch.sigmoid(x) * (1 - y) + torch.sigmoid(-x) * y
    return (alpha * y + (1 - alpha) * (1 - y)) * _stable_bce64(x, y) * m**gamma


@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize("loss", ["bce_with_logits", "sigmoid_focal"])
def test_sigmoid_losses_elementwise_float32_accuracy(loss, gamma, device, triton_backend):
    """Element by element, the float32 kernels are never less accurate than torch in float32,
    against a cancellation-free float64 formula, over logits in [-40, 40] with soft and hard
    targets: within 8 ulp more for the loss and the input gradient (the softplus's log1p is a short
    series, which must not cost accuracy), within the float32 tolerance for the target gradient,
    a difference of terms in both."""
    x = torch.linspace(-40.0, 40.0, 4001, device=device)
    g = torch.Generator().manual_seed(3)
    targets = [torch.zeros_like(x), torch.ones_like(x), torch.rand(x.shape, generator=g).to(device)]
    if loss == "bce_with_logits":
        fast_fn = functools.partial(FF.binary_cross_entropy_with_logits, reduction="none")
        torch_fn = functools.partial(F.binary_cross_entropy_with_logits, reduction="none")
        exact_fn = _stable_bce64
    else:
        fast_fn = functools.partial(FF.sigmoid_focal_loss, alpha=0.25, gamma=gamma, reduction="none")
        torch_fn = functools.partial(torchvision_sigmoid_focal_loss, alpha=0.25, gamma=gamma, reduction="none")
        exact_fn = functools.partial(_stable_focal64, alpha=0.25, gamma=gamma)
    eps = torch.finfo(torch.float32).eps
    for y in targets:
        results = []
        for fn, dtype in ((fast_fn, torch.float32), (torch_fn, torch.float32), (exact_fn, torch.float64)):
            xs, ys = x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()
            with assert_launched("pointwise_fwd_kernel", "pointwise_bwd_kernel") if fn is fast_fn \
                    else contextlib.nullcontext():
                out = fn(xs, ys)
                results.append((out.detach(), *torch.autograd.grad(out, (xs, ys), torch.ones_like(out))))
        f32 = TOLERANCES[torch.float32]
        table = (f32["rtol"], f32["atol"])
        strict = (8 * eps, 1e-35)
        slack = (strict, strict if loss == "bce_with_logits" else table, table)
        for what, (rtol, atol), fast, in_torch, exact in zip(("loss", "grad input", "grad target"), slack,
                                                              *results):
            err_fast = (fast.double() - exact).abs()
            err_torch = (in_torch.double() - exact).abs().nan_to_num(0.0)  # torch's NaN: no excuse
            bound = err_torch + rtol * exact.abs() + atol
            worst = int((err_fast / bound).argmax())
            assert (err_fast <= bound).all(), (
                f"{loss} {what}: x={x[worst].item()} y={y[worst].item()} got {fast[worst].item()!r}, "
                f"torch {in_torch[worst].item()!r}, float64 {exact[worst].item()!r}")


MIXED_DTYPES = [(a, b) for a in DTYPES for b in DTYPES if a != b]


@pytest.mark.parametrize("dtypes", MIXED_DTYPES, ids=lambda d: f"{dtype_id(d[0])}-{dtype_id(d[1])}")
def test_bce_mixed_dtypes_give_torchs_dtypes(dtypes, backend, device):
    """torch.nn's BCE-with-logits returns the target's dtype, even below the input's."""
    x, y, _ = make_operands(BCE, (4, 9), dtypes[0], device, requires_grad=False)
    x, y = x.requires_grad_(), y.to(dtypes[1]).requires_grad_()
    for reduction in REDUCTIONS:
        expected = F.binary_cross_entropy_with_logits(x, y, reduction=reduction)
        actual = FF.binary_cross_entropy_with_logits(x, y, reduction=reduction)
        assert actual.dtype == expected.dtype == dtypes[1]
        grads = torch.autograd.grad(actual, (x, y), torch.ones_like(actual))
        assert [g.dtype for g in grads] == list(dtypes)
        exact = F.binary_cross_entropy_with_logits(x.detach().double(), y.detach().double(), reduction=reduction)
        assert_no_less_accurate(actual.detach(), expected.detach(), exact, f"bce {dtypes} {reduction}")


@pytest.mark.parametrize("torch_fn, fast_fn", ALL_FUNCTIONS)
def test_bad_reduction_raises_value_error(torch_fn, fast_fn, backend, device):
    x, y = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    if torch_fn is not torchvision_sigmoid_focal_loss:  # the inline oracle does not validate
        with pytest.raises(ValueError):
            torch_fn(x, y, reduction="bogus")
    with pytest.raises(ValueError):
        fast_fn(x, y, reduction="bogus")


def test_bad_reduction_in_module_constructor():
    with pytest.raises(ValueError):
        fastloss.SigmoidFocalLoss(reduction="average")
    with pytest.raises(ValueError):
        fastloss.MSELoss(reduction="average")(torch.randn(3), torch.randn(3))


@pytest.mark.parametrize("delta", [0.0, -1.0])
def test_non_positive_delta_raises_runtime_error(delta, backend, device):
    x, y = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    with pytest.raises(RuntimeError, match="delta"):
        F.huber_loss(x, y, delta=delta)
    with pytest.raises(RuntimeError, match="delta"):
        FF.huber_loss(x, y, delta=delta)
    with pytest.raises(RuntimeError, match="delta"):
        fastloss.HuberLoss(delta=delta)(x, y)


@pytest.mark.parametrize("beta", [-0.5, float("nan")])
def test_negative_or_nan_beta_raises_runtime_error(beta, backend, device):
    x, y = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    message = "smooth_l1_loss does not support negative values for beta"
    with pytest.raises(RuntimeError, match=message):
        F.smooth_l1_loss(x, y, beta=beta)
    with pytest.raises(RuntimeError, match=message):
        FF.smooth_l1_loss(x, y, beta=beta)
    with pytest.raises(RuntimeError, match=message):
        fastloss.SmoothL1Loss(beta=beta)(x, y)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=dtype_id)
def test_huber_integer_input_with_float_target_raises_like_torch(dtype, backend, device):
    """torch.nn's huber_loss returns the input's dtype, into which the float result cannot be cast."""
    x, y = torch.ones(3, 4, dtype=dtype, device=device), torch.randn(3, 4, device=device, requires_grad=True)
    with pytest.raises(RuntimeError) as expected:
        F.huber_loss(x, y)
    with pytest.raises(RuntimeError) as actual:
        FF.huber_loss(x, y)
    assert type(actual.value) is type(expected.value)
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtypes", [(torch.complex64, torch.complex64), (torch.complex128, torch.float32),
                                    (torch.float64, torch.complex64)], ids=lambda d: "-".join(map(dtype_id, d)))
def test_l1_complex_operands_match_torch(dtypes, reduction, backend, device):
    """torch.nn's l1_loss takes complex operands: a real loss |input - target| and complex gradients."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 5, generator=g, dtype=torch.complex128).to(device)
    y = torch.randn(4, 5, generator=g, dtype=torch.complex128).to(device)
    x = (x if dtypes[0].is_complex else x.real).to(dtypes[0]).requires_grad_()
    y = (y if dtypes[1].is_complex else y.real).to(dtypes[1]).requires_grad_()
    for go in (None, torch.tensor(0.75, device=device) if reduction != "none" else None):
        expected = loss_and_grads(lambda: F.l1_loss(x, y, reduction=reduction), (x, y), go)
        actual = loss_and_grads(lambda: FF.l1_loss(x, y, reduction=reduction), (x, y), go)
        assert not actual[0].is_complex()
        check_same(actual, expected, torch.float32, f"l1 {dtypes} {reduction}")


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("fns", [(F.l1_loss, FF.l1_loss), (F.mse_loss, FF.mse_loss)], ids=["l1", "mse"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_integer_operands_give_torchs_results_and_errors(reduction, fns, weighted, backend, device):
    """Integer l1_loss: torch computes "none" and "sum" (integer results) and raises RuntimeError
    for "mean"; integer mse_loss raises NotImplementedError, unless a floating weight makes the
    loss floating. fastloss gives the same results, exception types and messages."""
    torch_fn, fast_fn = fns
    x = torch.randint(-5, 6, (3, 4), device=device)
    y = torch.randint(-5, 6, (3, 4), device=device)
    kwargs = {"weight": torch.rand(3, 4, device=device) + 0.5} if weighted else {}
    try:
        expected = torch_fn(x, y, reduction=reduction, **kwargs)
    except RuntimeError as error:
        with pytest.raises(RuntimeError) as actual:
            fast_fn(x, y, reduction=reduction, **kwargs)
        assert type(actual.value) is type(error)
        assert str(actual.value) == str(error)
    else:
        actual = fast_fn(x, y, reduction=reduction, **kwargs)
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)


def test_negative_gamma_raises_value_error(backend, device):
    x, y = torch.randn(3, 4, device=device), torch.rand(3, 4, device=device)
    with pytest.raises(ValueError, match="gamma"):
        FF.sigmoid_focal_loss(x, y, gamma=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        fastloss.SigmoidFocalLoss(gamma=-0.5)


def test_never_writes_into_callers_tensors(backend, device):
    cases = {c.name: c for c in CASES}
    for case in cases.values():
        x, y, extra = make_operands(case, (3, 1030), torch.float32, device)
        before = [t.detach().clone() for t in (x, y, *extra.values())]
        for reduction in REDUCTIONS:
            loss = case.fast(x, y, reduction, **extra)
            loss.sum().backward()
        for t, b in zip((x, y, *extra.values()), before):
            assert torch.equal(t.detach(), b), f"{case.name} wrote into an operand"


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): a small model + every loss of the family
# --------------------------------------------------------------------------------------------


def _all_losses(mod, out, target, prob, weight, pos_weight):
    """Sum of the six losses with assorted arguments; ``mod`` is torch.nn.functional or fastloss's."""
    focal = (FF.sigmoid_focal_loss if mod is FF else torchvision_sigmoid_focal_loss)(out, prob, 0.25, 2.0, "mean")
    return (
        mod.mse_loss(out, target)
        + mod.l1_loss(out, target, reduction="sum") * 0.01
        + mod.huber_loss(out, target, delta=0.5)
        + mod.smooth_l1_loss(out, target, reduction="none", beta=0.5).mean()
        + mod.binary_cross_entropy_with_logits(out, prob, weight, pos_weight=pos_weight)
        + focal
    )


@pytest.mark.parametrize("compile_backend", ["auto", "triton"])
def test_torch_compile_fullgraph(compile_backend, device, monkeypatch):
    torch._dynamo.reset()
    # as in a fresh process: the backend's one-time probes (which import triton) run while tracing
    monkeypatch.setattr(_backend, "_triton_ok", None)
    monkeypatch.setattr(_backend, "_interpret", None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, C)).to(device)
    data = torch.randn(N, 8, device=device)
    target = torch.randn(N, C, device=device)
    prob = torch.rand(N, C, device=device)
    weight = torch.rand(C, device=device) + 0.5
    pos_weight = torch.rand(C, device=device) * 2

    def step(mod):
        return _all_losses(mod, model(data), target, prob, weight, pos_weight)

    expected = step(F)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]

    compiled = torch.compile(lambda: step(FF), fullgraph=True)
    kernels = compile_backend == "triton" or device == "cuda"
    with fastloss.use_backend(compile_backend):
        launches = ("pointwise_fwd_kernel", "scale_grad_kernel", "pointwise_bwd_kernel")
        with assert_launched(*launches) if kernels else assert_not_launched():
            for _ in range(2):  # the second call reuses the compiled graph
                model.zero_grad()
                loss = compiled()
                loss.backward()
                assert_close(loss.detach(), expected.detach(), torch.float32, f"compiled {compile_backend}")
                for p, g in zip(model.parameters(), expected_grads):
                    assert_close(p.grad, g, torch.float32, f"compiled {compile_backend} parameter grad")
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck(device):
    """The torch.library ops that torch.compile traces: schema, fake (meta) kernels, autograd."""
    x = torch.randn(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    y = torch.rand(5, 7, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, device=device)
    for reduction in REDUCTIONS:
        # a reduced forward's gradient outputs are internal (dropped by pointwise_loss, scaled in
        # place in backward), so the AOT test, which returns them to the caller, is left out for it
        tests = ("test_schema", "test_faketensor", "test_autograd_registration")
        if reduction == "none":
            tests += ("test_aot_dispatch_dynamic",)
        torch.library.opcheck(ops.pointwise_fwd, (x, y, w, w, "bce_with_logits", [1.0, 0.0, 0.0], reduction,
                                                   True, True), test_utils=tests)
    # a weighted sum of members, as fastloss.CombinedLoss runs it
    torch.library.opcheck(ops.pointwise_fwd, (x, y, None, None, "mse,huber", [0.7, 0.0, 0.0, 0.3, 0.5, 0.0],
                                               "none", True, True))
    go = torch.randn(5, 7, dtype=torch.float64, device=device)
    torch.library.opcheck(ops.pointwise_bwd, (x.detach(), y.detach(), None, w, go, "sigmoid_focal",
                                               [1.0, 0.25, 2.0], 1.0, True, True))
    torch.library.opcheck(ops.scale_grad_, (torch.randn(5, 7, device=device), torch.tensor(2.0, device=device)))
    # a reduced 16-bit loss's backward (scaled or recomputed in place; either gradient may be None)
    xh, yh = x.detach().half(), y.detach().half()
    for go in (0.3, 2.0):
        torch.library.opcheck(ops.pointwise_rescale_, (xh, yh, None, w.half(), torch.tensor(go, device=device),
                                                       torch.randn(5, 7, device=device).half(), None,
                                                       "bce_with_logits", [1.0, 1.0, 0.0], 1 / 35))


def test_torch_compile_half_precision_backward(device):
    """Under torch.compile a reduced 16-bit loss's backward runs the rescaling custom op: the
    gradients of ``loss * 0.3`` are the eager kernels' (which round once). (AOT autograd without
    inductor: inductor's on-disk cache keeps a compiled backward across changes to an op's
    registered autograd formula, which would hide one here.)"""
    torch._dynamo.reset()
    x, y, _ = make_operands(MSE, (7, 33), torch.float16, device)

    def step(a, b):
        return FF.huber_loss(a, b, delta=0.5) * 0.3 + FF.mse_loss(a, b, reduction="sum") * 0.25

    with fastloss.use_backend("triton"):
        expected = loss_and_grads(lambda: step(x, y), (x, y))
        with assert_launched("pointwise_fwd_kernel", "pointwise_bwd_kernel"):
            actual = loss_and_grads(lambda: torch.compile(step, fullgraph=True, backend="aot_eager")(x, y), (x, y))
    for a, e in zip((actual[0], *actual[1]), (expected[0], *expected[1])):
        assert torch.equal(a, e)
    torch._dynamo.reset()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_double_backward_gives_torch_second_derivative(reduction, device):
    """create_graph=True gives a gradient that is itself differentiable (tests/test_autograd.py has
    every loss): never one that silently drops its dependence on the input."""
    x, y, _ = make_operands(MSE, (7,), torch.float32, device)
    with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel"):
        loss = FF.mse_loss(x, y, reduction=reduction)
    (gx,) = torch.autograd.grad(loss, x, torch.ones_like(loss), create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), x)
    x2 = x.detach().requires_grad_()
    torch_loss = F.mse_loss(x2, y, reduction=reduction)
    (tgx,) = torch.autograd.grad(torch_loss, x2, torch.ones_like(torch_loss), create_graph=True)
    (tggx,) = torch.autograd.grad(tgx.square().sum(), x2)
    assert_close(ggx, tggx)


def test_broadcast_grad_output_is_not_copied(device, monkeypatch):
    """``loss.sum().backward()`` on reduction="none" gives a stride-0 grad_output: the backward
    kernel reads its one element instead of a loss-sized contiguous copy."""
    x, y, _ = make_operands(L1, (3, 1030), torch.float32, device)
    copied = []
    original = Tensor.contiguous

    def contiguous(self, *args, **kwargs):
        if not self.is_contiguous():
            copied.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    expected = loss_and_grads(lambda: R.huber_loss(x, y, "none", 0.5), (x, y))
    with fastloss.use_backend("triton"):
        loss = FF.huber_loss(x, y, reduction="none", delta=0.5)
        monkeypatch.setattr(Tensor, "contiguous", contiguous)
        with assert_launched("pointwise_bwd_kernel"):
            loss.sum().backward()
        monkeypatch.undo()
    assert copied == []
    check_same((loss.detach(), (x.grad, y.grad)), expected, torch.float32, "huber none .sum()")


@pytest.mark.parametrize("grad_output", [0.25, 0.3])
def test_half_precision_gradient_that_overflowed_in_the_forward_is_recomputed(grad_output, device):
    """The forward's float16 gradient 2 * 80000 overflows to inf; times grad_output it is finite,
    so backward must not scale the stored inf."""
    x = torch.tensor([40000.0], dtype=torch.float16, device=device, requires_grad=True)
    y = torch.tensor([-40000.0], dtype=torch.float16, device=device)
    with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel"):
        loss = FF.mse_loss(x, y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x, torch.tensor(grad_output, dtype=loss.dtype, device=device))
    expected = (2 * 80000.0 * torch.tensor(grad_output, dtype=torch.float16).double()).to(torch.float16)
    assert torch.equal(g, expected.reshape(1).to(device)), (g, expected)


# --------------------------------------------------------------------------------------------
# Every pointwise loss of fastloss.specs, with no hand-written table: a new spec is tested here as
# soon as it is registered. The oracle is the spec's torch baseline in float64 (torch.nn, or the
# eager formula of fastloss.baselines); operands are the benchmarks' (fastloss.cli.cases).
# --------------------------------------------------------------------------------------------

POINTWISE_SPECS = specs.by_family("pointwise")
SPEC_SHAPES = {"regression": (1025,), "binary": (1025,), "log_probs": (9, 131)}
SPEC_REDUCTIONS = ["spec", "none", "sum"]  # the spec's own params (its default reduction), then two more


def _spec_params(spec, reduction: str) -> dict:
    return dict(spec.params) if reduction == "spec" else {**spec.params, "reduction": reduction}


def _baseline(spec):
    """The spec's torch baseline, unbound (its fallback where torchvision does not import)."""
    try:
        return specs.resolve(spec.baseline)
    except ImportError:
        return specs.resolve(spec.fallback)


def _spec_operands(spec, dtype, device):
    x, y = spec_cases.make_inputs(spec, SPEC_SHAPES[spec.operands], torch.float64, device, seed=3)
    return x.detach().to(dtype).requires_grad_(), y.to(dtype).requires_grad_()


@pytest.mark.parametrize("reduction", SPEC_REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("spec", POINTWISE_SPECS, ids=lambda s: s.name)
def test_every_pointwise_spec_runs_its_kernel_like_its_baseline(spec, dtype, reduction, device):
    """fastloss.functional on the kernels against the spec's baseline in float64: value and both
    gradients, within the tolerance of the dtype."""
    params = _spec_params(spec, reduction)
    x, y = _spec_operands(spec, dtype, device)
    with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel"):
        loss = getattr(FF, spec.functional)(x, y, **params)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    expected = _baseline(spec)(x64, y64, **params)
    grad_output = random_grad_output(expected)
    got = torch.autograd.grad(loss, (x, y), grad_output.to(loss.dtype))
    want = torch.autograd.grad(expected, (x64, y64), grad_output)
    assert_close(loss, expected.to(dtype), dtype, spec.name)
    for actual, exact, what in zip(got, want, ("grad_input", "grad_target")):
        assert_close(actual, exact.to(dtype), dtype, f"{spec.name} {what}")


@pytest.mark.parametrize("reduction", SPEC_REDUCTIONS)
@pytest.mark.parametrize("spec", POINTWISE_SPECS, ids=lambda s: s.name)
def test_every_pointwise_spec_second_derivative_like_its_baseline(spec, reduction, device):
    """A double backward differentiates the ops module's PyTorch evaluation of the loss (its table
    built from the specs): d/dx of <dL/dx, v> against the baseline's, in float64."""
    params = _spec_params(spec, reduction)
    results = []
    for fn, backend in ((getattr(FF, spec.functional), "triton"), (_baseline(spec), "torch")):
        x, y = _spec_operands(spec, F64, device)
        with fastloss.use_backend(backend):
            loss = fn(x, y, **params)
        v = torch.linspace(-1, 1, x.numel(), dtype=F64, device=x.device).reshape(x.shape)
        (gx,) = torch.autograd.grad(loss.sum(), x, create_graph=True)
        results.append(torch.autograd.grad((gx * v).sum(), (x, y), materialize_grads=True))
    for actual, exact in zip(*results):
        assert_close(actual, exact, F64, spec.name)
