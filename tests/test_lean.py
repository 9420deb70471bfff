"""The lean call path (issue 11): the common case goes straight to its implementation.

On the PyTorch path, a loss torch.nn has, called with plain arguments on tensors of one shape and one
float32 / float64 dtype, runs torch's own op with no layer in between (no reference call, no dtype
conversion, no broadcast), with torch's numbers, errors and warnings; the softmax focal loss runs a
fused CPU implementation (fastloss.ops.cpu) whose analytic gradient is checked here against the
PyTorch reference (the oracle) and the classic composition, with every autograd feature.
"""

from __future__ import annotations

import contextvars
import math
import threading
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import TOLERANCES, assert_close, dtype_id

import fastloss
import fastloss.functional as FL
from fastloss import _backend, reference

F64 = torch.float64
LEAN_DTYPES = [torch.float32, torch.float64]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _reference_forbidden(monkeypatch):
    """Make every reference function raise: the lean path must not call it."""
    for name in ("mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits",
                 "cross_entropy", "focal_loss"):
        def fail(*args, _name=name, **kwargs):
            raise AssertionError(f"reference.{_name} ran on the lean path")
        monkeypatch.setattr(reference, name, fail)


POINTWISE = {
    "mse": (FL.mse_loss, F.mse_loss, {}),
    "l1": (FL.l1_loss, F.l1_loss, {}),
    "huber": (FL.huber_loss, F.huber_loss, {"delta": 0.5}),
    "smooth_l1": (FL.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.5}),
    "smooth_l1_beta0": (FL.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.0}),
    "bce_with_logits": (FL.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, {}),
}


@pytest.mark.parametrize("dtype", LEAN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", list(POINTWISE))
def test_pointwise_common_case_is_torch_op(loss, reduction, dtype, torch_backend, monkeypatch):
    """Same shape, same dtype, plain arguments: torch's op runs directly (the reference never does),
    with torch's values and gradients, exactly."""
    ours, theirs, kwargs = POINTWISE[loss]
    x = torch.randn(33, 3, generator=_gen(0), dtype=dtype, requires_grad=True)
    y = torch.rand(33, 3, generator=_gen(1), dtype=dtype)
    expected = theirs(x, y, reduction=reduction, **kwargs)
    (g_expected,) = torch.autograd.grad(expected.sum(), x)
    _reference_forbidden(monkeypatch)
    actual = ours(x, y, reduction=reduction, **kwargs)
    (g_actual,) = torch.autograd.grad(actual.sum(), x)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected) and torch.equal(g_actual, g_expected)


@pytest.mark.parametrize("dtype", LEAN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_common_case_is_torch_op(reduction, dtype, torch_backend, monkeypatch):
    x = torch.randn(17, 6, generator=_gen(0), dtype=dtype, requires_grad=True)
    t = torch.randint(0, 6, (17,), generator=_gen(1))
    t[3] = -100
    expected = F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    (g_expected,) = torch.autograd.grad(expected.sum(), x)
    _reference_forbidden(monkeypatch)
    actual = fastloss.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)(x, t)
    (g_actual,) = torch.autograd.grad(actual.sum(), x)
    assert torch.equal(actual, expected) and torch.equal(g_actual, g_expected)


def test_lean_path_keeps_the_errors_and_warnings(torch_backend):
    """What the lean path does not take keeps the full path's behaviour: fastloss's reduction error
    (torch would accept the deprecated "elementwise_mean"), the broadcasting warning, torch's errors."""
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    for fn in (FL.mse_loss, FL.l1_loss, FL.huber_loss, FL.smooth_l1_loss, FL.binary_cross_entropy_with_logits):
        for bad in ("elementwise_mean", "bogus"):
            with pytest.raises(ValueError, match=f"{bad} is not a valid value for reduction"):
                fn(x, y, reduction=bad)
    with pytest.warns(UserWarning, match="different to the input size"):
        FL.mse_loss(x, y[:1])
    with pytest.raises(RuntimeError, match="non-positive values for delta"):
        FL.huber_loss(x, y, delta=0.0)
    with pytest.raises(ValueError, match="must be the same as input size"):
        FL.binary_cross_entropy_with_logits(x, y[:1])
    with pytest.raises(IndexError, match="out of bounds"):
        FL.cross_entropy(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="is not a valid value for reduction"):
        FL.cross_entropy(x, torch.tensor([0, 1, 2, 1]), reduction="elementwise_mean")
    for fn in (FL.cross_entropy, FL.focal_loss):
        with pytest.raises(ValueError, match=r"Expected input batch_size \(4\) to match target batch_size \(3\)"):
            fn(x, torch.tensor([0, 1, 2]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FL.mse_loss(x, y)  # the common case warns about nothing


def _assert_compiles_fullgraph(step, x, expected):
    """torch.compile(step, fullgraph=True) gives ``expected`` and its gradient with respect to x."""
    (g_expected,) = torch.autograd.grad(expected, x)
    actual = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (g_actual,) = torch.autograd.grad(actual, x)
    assert_close(actual, expected, msg="compiled")
    assert_close(g_actual, g_expected, msg="compiled grad")
    torch._dynamo.reset()


def test_lean_cross_entropy_compiles_fullgraph(torch_backend):
    torch._dynamo.reset()
    x = torch.randn(8, 5, generator=_gen(0), requires_grad=True)
    t = torch.randint(0, 5, (8,), generator=_gen(1))
    ce, mse, focal = fastloss.CrossEntropyLoss(), fastloss.MSELoss(), fastloss.FocalLoss(0.5, 2.0)

    def step(x):
        return ce(x, t) + mse(x, x.detach() * 0.5) + focal(x, t)

    expected = F.cross_entropy(x, t) + F.mse_loss(x, x.detach() * 0.5) + reference.focal_loss(x, t, 0.5, 2.0)
    _assert_compiles_fullgraph(step, x, expected)


# --------------------------------------------------------------------------------------------
# The fused CPU softmax focal loss
# --------------------------------------------------------------------------------------------

def _logits(n, c, dtype, seed=0, scale=3.0):
    return (torch.randn(n, c, generator=_gen(seed), dtype=F64) * scale).to(dtype).requires_grad_()


def _fused_ran(loss: torch.Tensor) -> bool:
    return type(loss.grad_fn).__name__ == "_SoftmaxFocalBackward"


@pytest.mark.parametrize("dtype", LEAN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (64, 1025)], ids=lambda s: "x".join(map(str, s)))
def test_fused_focal_matches_reference(shape, gamma, reduction, dtype, torch_backend):
    x = _logits(*shape, dtype)
    t = torch.randint(0, shape[1], (shape[0],), generator=_gen(1))
    actual = FL.focal_loss(x, t, 0.25, gamma, reduction)
    assert _fused_ran(actual)
    (g_actual,) = torch.autograd.grad(actual * 1.7, x)  # grad_output != 1
    expected = reference.focal_loss(x, t, 0.25, gamma, reduction)
    (g_expected,) = torch.autograd.grad(expected * 1.7, x)
    assert_close(actual, expected, msg="loss")
    assert_close(g_actual, g_expected, msg="grad")
    if shape[1] == 1:
        return  # p_t = 1: the classic composition's gradient is 0 * inf = NaN for gamma < 1
    # and the classic composition in float64 (the oracle of the reference)
    x64 = x.detach().double().requires_grad_()
    classic = F.cross_entropy(x64, t, reduction="none")
    classic = 0.25 * (1 - torch.exp(-classic)) ** gamma * classic
    classic = classic.mean() if reduction == "mean" else classic.sum()
    (g_classic,) = torch.autograd.grad(classic * 1.7, x64)
    assert_close(actual.double(), classic, dtype, "loss vs classic")
    assert_close(g_actual.double(), g_classic, dtype, "grad vs classic")


def test_fused_focal_extreme_logits(torch_backend):
    """A target probability that underflows (log p_t from the log-sum-exp), a certain prediction
    (q = 0), and a -inf target logit give the reference's values and gradients."""
    x = torch.tensor([[0.0, -200.0, 50.0], [1.0, 2.0, 3.0], [80.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([1, 2, 0])
    for gamma in (0.0, 0.5, 2.0):
        actual = FL.focal_loss(x, t, 1.0, gamma)
        assert _fused_ran(actual)
        (g_actual,) = torch.autograd.grad(actual, x)
        expected = reference.focal_loss(x, t, 1.0, gamma)
        (g_expected,) = torch.autograd.grad(expected, x)
        assert_close(actual, expected, msg=f"gamma={gamma}")
        assert_close(g_actual, g_expected, msg=f"gamma={gamma} grad")
    x = torch.tensor([[-math.inf, 0.0], [0.0, 1.0]], requires_grad=True)
    actual, expected = FL.focal_loss(x, torch.tensor([0, 1])), reference.focal_loss(x, torch.tensor([0, 1]))
    assert_close(actual, expected)
    assert_close(torch.autograd.grad(actual, x)[0], torch.autograd.grad(expected, x)[0])


def test_fused_focal_ignored_and_bad_targets(torch_backend):
    """ignore_index rows and out-of-range targets take the full path: the reference's result and
    torch's IndexError."""
    x = _logits(6, 4, torch.float32)
    t = torch.tensor([0, 3, -100, 1, 2, -100])
    loss = FL.focal_loss(x, t, 0.5, 2.0)
    assert not _fused_ran(loss)
    assert_close(loss, reference.focal_loss(x, t, 0.5, 2.0))
    with pytest.raises(IndexError, match="Target 4 is out of bounds"):
        FL.focal_loss(x, torch.tensor([0, 4, 1, 1, 2, 0]))
    t_in = torch.tensor([0, 3, 1, 1, 2, 0])
    assert not _fused_ran(FL.focal_loss(x, t_in, 0.5, 2.0, ignore_index=1))  # may be ignored: full path
    with pytest.raises(ValueError, match="gamma must be non-negative"):
        FL.focal_loss(x, t_in, 0.5, -1.0)
    with pytest.raises(ValueError, match="bogus is not a valid value"):
        FL.focal_loss(x, t_in, reduction="bogus")


def test_fused_focal_second_backward_and_no_grad(torch_backend):
    x = _logits(5, 7, F64)
    t = torch.randint(0, 7, (5,), generator=_gen(2))
    loss = FL.focal_loss(x, t)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(3.0, dtype=F64))
    (g_ref,) = torch.autograd.grad(reference.focal_loss(x, t), x)
    assert_close(g1, g_ref)
    assert_close(g2, 3 * g_ref)
    with torch.no_grad():
        assert_close(FL.focal_loss(x, t), reference.focal_loss(x, t).detach())


def test_fused_focal_autograd_features(torch_backend):
    """Double backward (gradgradcheck), torch.func and forward-mode AD give the reference's results."""
    x = _logits(4, 5, F64, scale=1.0)
    t = torch.randint(0, 5, (4,), generator=_gen(3))
    assert _fused_ran(FL.focal_loss(x, t, 0.25, 2.5))
    assert torch.autograd.gradcheck(lambda x: FL.focal_loss(x, t, 0.25, 2.5), (x,))
    assert torch.autograd.gradgradcheck(lambda x: FL.focal_loss(x, t, 0.25, 2.5), (x,))
    expected_h = torch.func.hessian(lambda x: reference.focal_loss(x, t, 0.25, 2.5))(x.detach())
    assert_close(torch.func.hessian(lambda x: FL.focal_loss(x, t, 0.25, 2.5))(x.detach()), expected_h)
    per_sample = torch.func.vmap(torch.func.grad(lambda x: FL.focal_loss(x[None], t[:1])))(x.detach())
    expected = torch.func.vmap(torch.func.grad(lambda x: reference.focal_loss(x[None], t[:1])))(x.detach())
    assert_close(per_sample, expected)
    tangent = torch.randn(4, 5, generator=_gen(4), dtype=F64)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(FL.focal_loss(fwAD.make_dual(x.detach(), tangent), t)).tangent
    (g,) = torch.autograd.grad(reference.focal_loss(x, t), x)
    assert_close(out, (g * tangent).sum())


def test_fused_focal_tolerances_cover_float32_big_rows(torch_backend):
    """Long rows (the 4096 x 1000 benchmark's width) in float32 stay within the float32 tolerance."""
    x = _logits(16, 1000, torch.float32)
    t = torch.randint(0, 1000, (16,), generator=_gen(5))
    actual = FL.focal_loss(x, t)
    expected = reference.focal_loss(x, t)
    torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(torch.autograd.grad(actual, x)[0], torch.autograd.grad(expected, x)[0],
                               **TOLERANCES[torch.float32])


# --------------------------------------------------------------------------------------------
# CombinedLoss: the fused CPU sum of difference losses
# --------------------------------------------------------------------------------------------

COMBINATIONS = {
    "mse+l1": [(fastloss.MSELoss, {}, F.mse_loss, 0.7), (fastloss.L1Loss, {}, F.l1_loss, 0.3)],
    "huber+smooth_l1+l1+mse": [
        (fastloss.HuberLoss, {"delta": 0.5}, F.huber_loss, 1.3),
        (fastloss.SmoothL1Loss, {"beta": 2.0}, F.smooth_l1_loss, 0.2),
        (fastloss.SmoothL1Loss, {"beta": 0.0}, F.smooth_l1_loss, 0.4),
        (fastloss.MSELoss, {}, F.mse_loss, 2.0),
    ],
}


def _combined(name, reduction):
    members = COMBINATIONS[name]
    criterion = fastloss.CombinedLoss([(cls(reduction=reduction, **kw), w) for cls, kw, _, w in members])

    def expected(x, y):
        return sum(w * fn(x, y, reduction=reduction, **kw) for _, kw, fn, w in members)

    return criterion, expected


@pytest.mark.parametrize("dtype", LEAN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_combined_fused_cpu_matches_torch(name, reduction, dtype, torch_backend):
    criterion, expected_fn = _combined(name, reduction)
    x = (torch.randn(37, 3, generator=_gen(0), dtype=dtype) * 2).requires_grad_()
    y = torch.randn(37, 3, generator=_gen(1), dtype=dtype).requires_grad_()
    x.data[0, 0], y.data[0, 0] = 1.0, 1.0  # d = 0: every member's gradient is torch's there too
    actual = criterion(x, y)
    assert type(actual.grad_fn).__name__ == "_CombinationBackward"
    g_actual = torch.autograd.grad(actual * 1.3, (x, y))
    expected = expected_fn(x, y)
    g_expected = torch.autograd.grad(expected * 1.3, (x, y))
    assert_close(actual, expected, msg="loss")
    assert_close(g_actual[0], g_expected[0], msg="input grad")
    assert_close(g_actual[1], g_expected[1], msg="target grad")


def test_combined_fused_cpu_autograd_features(torch_backend):
    criterion, expected_fn = _combined("huber+smooth_l1+l1+mse", "mean")
    x = torch.randn(5, 4, generator=_gen(0), dtype=F64, requires_grad=True)
    y = torch.randn(5, 4, generator=_gen(1), dtype=F64)
    loss = criterion(x, y)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(-2.0, dtype=F64))  # retain_graph: recomputed
    (g_expected,) = torch.autograd.grad(expected_fn(x, y), x)
    assert_close(g1, g_expected)
    assert_close(g2, -2 * g_expected)
    assert torch.autograd.gradgradcheck(lambda x: criterion(x, y), (x,))
    grad = torch.func.grad(lambda x: criterion(x, y))(x.detach())  # a transform: the members run
    assert_close(grad, g_expected)
    for bad in (math.inf, math.nan):
        xb = x.detach().clone()
        xb[1, 1] = bad
        xb.requires_grad_()
        actual, expected = criterion(xb, y), expected_fn(xb, y)
        assert_close(actual, expected, msg=f"{bad}")
        assert_close(torch.autograd.grad(actual, xb)[0], torch.autograd.grad(expected, xb)[0], msg=f"{bad} grad")


def test_combined_other_members_run_one_by_one(torch_backend):
    x = torch.randn(6, 2, generator=_gen(0), requires_grad=True)
    y = torch.rand(6, 2, generator=_gen(1))
    criterion = fastloss.CombinedLoss({fastloss.MSELoss(): 0.5, fastloss.BCEWithLogitsLoss(): 2.0})
    loss = criterion(x, y)
    assert type(loss.grad_fn).__name__ != "_CombinationBackward"
    assert_close(loss, 0.5 * F.mse_loss(x, y) + 2.0 * F.binary_cross_entropy_with_logits(x, y))
    none = fastloss.CombinedLoss({fastloss.MSELoss(reduction="none"): 0.5, fastloss.L1Loss(reduction="none"): 2.0})
    assert_close(none(x, y), 0.5 * F.mse_loss(x, y, reduction="none") + 2.0 * F.l1_loss(x, y, reduction="none"))


# --------------------------------------------------------------------------------------------
# The fused CPU sigmoid focal loss
# --------------------------------------------------------------------------------------------

def _torchvision_sigmoid_focal(x, y, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss's formula."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    loss = ce * (1 - (p * y + (1 - p) * (1 - y))) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


@pytest.mark.parametrize("dtype", LEAN_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 1.0), (0.5, 3.5)])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", [(1,), (7, 3), (0, 2), (1025,)], ids=lambda s: "x".join(map(str, s)))
def test_fused_sigmoid_focal_matches_reference(shape, soft, alpha, gamma, reduction, dtype, torch_backend):
    x = (torch.randn(shape, generator=_gen(0), dtype=F64) * 5).to(dtype).requires_grad_()
    y = torch.rand(shape, generator=_gen(1), dtype=F64) if soft else torch.randint(0, 2, shape, generator=_gen(1))
    y = y.to(dtype)
    actual = FL.sigmoid_focal_loss(x, y, alpha, gamma, reduction)
    assert type(actual.grad_fn).__name__ == "_SigmoidFocalBackward"
    w = torch.randn(actual.shape, generator=_gen(2), dtype=dtype)  # a grad_output per element
    (g_actual,) = torch.autograd.grad((actual * w).sum(), x)
    expected = reference.sigmoid_focal_loss(x, y, alpha, gamma, reduction)
    (g_expected,) = torch.autograd.grad((expected * w).sum(), x)
    assert_close(actual, expected, msg="loss")
    assert_close(g_actual, g_expected, msg="grad")
    x64 = x.detach().double().requires_grad_()
    classic = _torchvision_sigmoid_focal(x64, y.double(), alpha, gamma, reduction)
    (g_classic,) = torch.autograd.grad((classic * w.double()).sum(), x64)
    assert_close(actual.double(), classic, dtype, "loss vs torchvision")
    assert_close(g_actual.double(), g_classic, dtype, "grad vs torchvision")


def test_fused_sigmoid_focal_autograd_features(torch_backend):
    x = torch.randn(6, generator=_gen(0), dtype=F64, requires_grad=True)
    y = torch.randint(0, 2, (6,), generator=_gen(1)).to(F64)
    loss = FL.sigmoid_focal_loss(x, y, reduction="mean")
    assert type(loss.grad_fn).__name__ == "_SigmoidFocalBackward"
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x, torch.tensor(0.5, dtype=F64))
    (g_expected,) = torch.autograd.grad(reference.sigmoid_focal_loss(x, y, 0.25, 2.0, "mean"), x)
    assert_close(g1, g_expected)
    assert_close(g2, 0.5 * g_expected)
    assert torch.autograd.gradcheck(lambda x: FL.sigmoid_focal_loss(x, y), (x,))
    assert torch.autograd.gradgradcheck(lambda x: FL.sigmoid_focal_loss(x, y, reduction="sum"), (x,))
    grad = torch.func.grad(lambda x: FL.sigmoid_focal_loss(x, y, reduction="mean"))(x.detach())
    assert_close(grad, g_expected)
    # a target that requires grad, and gamma < 1, take the reference
    yg = y.clone().requires_grad_()
    assert type(FL.sigmoid_focal_loss(x, yg).grad_fn).__name__ != "_SigmoidFocalBackward"
    assert type(FL.sigmoid_focal_loss(x, y, gamma=0.5).grad_fn).__name__ != "_SigmoidFocalBackward"


# --------------------------------------------------------------------------------------------
# The lean kernel path: the common case goes straight to the launcher
# --------------------------------------------------------------------------------------------

def test_kernel_path_common_case_skips_the_full_path(triton_backend, monkeypatch, device):
    """With the kernels selected, the common case calls the launcher at once: none of the full
    path's conversions, broadcasts or checks run (and the kernels do, with torch's numbers)."""
    from helpers import assert_launched

    def fail(*args, **kwargs):
        raise AssertionError("the full path ran")

    for name in ("_reduction_arg", "_floating_operands", "_broadcast", "_check_class_operands"):
        monkeypatch.setattr(FL, name, fail)
    x = torch.randn(9, 4, generator=_gen(0), requires_grad=True).to(device)
    y = torch.rand(9, 4, generator=_gen(1)).to(device)
    t = torch.randint(0, 4, (9,), generator=_gen(2)).to(device)
    cases = [
        (FL.mse_loss, F.mse_loss, {}),
        (FL.l1_loss, F.l1_loss, {"reduction": "sum"}),
        (FL.huber_loss, F.huber_loss, {"delta": 0.5}),
        (FL.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.0}),
        (FL.smooth_l1_loss, F.smooth_l1_loss, {"beta": 0.5, "reduction": "none"}),
        (FL.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, {}),
    ]
    for ours, theirs, kwargs in cases:
        with assert_launched("pointwise_fwd_kernel"):
            actual = ours(x, y, **kwargs)
        assert_close(actual, theirs(x, y, **kwargs), msg=ours.__name__)
    with assert_launched("cross_entropy_fwd_kernel"):
        assert_close(FL.cross_entropy(x, t, label_smoothing=0.1), F.cross_entropy(x, t, label_smoothing=0.1))


# --------------------------------------------------------------------------------------------
# Module forwards: the lean path straight from the module's attributes
# --------------------------------------------------------------------------------------------

def _module_cases():
    """(name, fastloss module, torch.nn module, operands, the functional the full path calls)."""
    x = torch.randn(9, 4, generator=_gen(0), dtype=F64, requires_grad=True)
    y = torch.rand(9, 4, generator=_gen(1), dtype=F64)
    t = torch.randint(0, 4, (9,), generator=_gen(2))
    t[2] = 3
    logp = torch.randn(9, 4, generator=_gen(3), dtype=F64).log_softmax(1).requires_grad_()
    a, p, n = (torch.randn(5, 6, generator=_gen(4 + i), dtype=F64, requires_grad=True) for i in range(3))
    return [
        ("ce", fastloss.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1),
         torch.nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1), (x, t), "cross_entropy"),
        ("bce", fastloss.BCEWithLogitsLoss(reduction="sum"), torch.nn.BCEWithLogitsLoss(reduction="sum"), (x, y),
         "binary_cross_entropy_with_logits"),
        ("kl", fastloss.KLDivLoss(reduction="batchmean", log_target=False),
         torch.nn.KLDivLoss(reduction="batchmean"), (logp, y), "kl_div"),
        ("triplet", fastloss.TripletMarginLoss(margin=0.5, p=1.5, swap=True),
         torch.nn.TripletMarginLoss(margin=0.5, p=1.5, swap=True), (a, p, n), "triplet_margin_loss"),
    ]


def _grads(loss, args):
    leaves = [v for v in args if v.requires_grad]
    return torch.autograd.grad(loss.sum(), leaves)


@pytest.mark.parametrize("backend_name", ["auto", "torch"])
@pytest.mark.parametrize("case", range(4), ids=["ce", "bce", "kl", "triplet"])
def test_module_common_case_skips_the_functional(case, backend_name, monkeypatch):
    """A module with its default configuration runs torch's op from its forward: torch.nn's values
    and gradients exactly, without the functional form (whose full path would give the same)."""
    name, ours, theirs, args, functional = _module_cases()[case]
    expected = theirs(*args)
    g_expected = _grads(expected, args)
    full = getattr(FL, functional)(*args, **({"reduction": "batchmean"} if name == "kl" else {}),
                                   **({"reduction": "sum"} if name == "bce" else {}))
    if name not in ("ce", "triplet"):  # (their module options are not the functional's defaults)
        assert torch.equal(full, expected)
    _reference_forbidden(monkeypatch)

    def fail(*a, **k):
        raise AssertionError(f"FL.{functional} ran")

    monkeypatch.setattr(FL, functional, fail)
    # while "triton" was never selected, CPU tensors answer without a backend lookup
    monkeypatch.setattr(_backend, "_triton_selected", False)
    with fastloss.use_backend(backend_name):
        monkeypatch.setattr(_backend, "_triton_selected", False)
        actual = ours(*args)
    assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    for g, ge in zip(_grads(actual, args), g_expected):
        assert torch.equal(g, ge)


class _Marked(torch.Tensor):
    """A Tensor subclass (it has __torch_function__): the lean path must decline it."""


@pytest.mark.parametrize("case", range(4), ids=["ce", "bce", "kl", "triplet"])
def test_module_declines_what_the_lean_path_declines(case, torch_backend, monkeypatch):
    """Changed options, weights set after construction (a buffer, or a Parameter in its place), a
    Tensor subclass or a half dtype take the functional form, with torch.nn's numbers."""
    name, ours, theirs, args, functional = _module_cases()[case]
    calls = []
    original = getattr(FL, functional)

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)

    monkeypatch.setattr(FL, functional, spy)

    def check(msg, operands=args):
        calls.clear()
        actual, expected = ours(*operands), theirs(*operands)
        assert calls, f"{name} {msg}: the lean path took it"
        assert_close(actual, expected, msg=f"{name} {msg}")

    check("subclass", tuple(v.as_subclass(_Marked) if i == 0 else v for i, v in enumerate(args)))
    check("float16", tuple(v.detach().half() if v.is_floating_point() else v for v in args))
    if name == "ce":
        ours.z_loss = 0.5
        assert not torch.equal(ours(*args), theirs(*args)) and calls
        ours.z_loss = 0.0
        w = torch.rand(4, generator=_gen(9), dtype=F64) + 0.5
        ours.weight = theirs.weight = w
        check("weight buffer")
        ours.weight = torch.nn.Parameter(w * 2, requires_grad=False)
        theirs.weight = w * 2
        check("weight parameter")
    elif name == "bce":
        for attr in ("weight", "pos_weight"):
            value = torch.rand(4, generator=_gen(10), dtype=F64) + 0.5
            setattr(ours, attr, value)
            setattr(theirs, attr, value)
            check(attr)
            setattr(ours, attr, None)
            setattr(theirs, attr, None)
        ours.pos_weight = torch.nn.Parameter(torch.full((4,), 2.0, dtype=F64), requires_grad=False)
        theirs.pos_weight = torch.full((4,), 2.0, dtype=F64)
        check("pos_weight parameter")
    elif name == "kl":
        ours.reduction = theirs.reduction = "mean"
        with pytest.warns(UserWarning, match="batchmean"):
            check("mean")
    else:
        ours.reduction = theirs.reduction = "bogus"
        with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
            ours(*args)


def test_lean_route_follows_a_triton_choice_made_anywhere(monkeypatch):
    """The lean checks' shortcut for CPU tensors (no backend lookup while "triton" was never
    selected) holds in a context copied inside a "triton" block after the block ended, and in a
    thread after another thread's set_backend("triton") under its own "torch" block."""
    monkeypatch.setattr(_backend, "_triton_selected", False)
    x = torch.randn(6, 3, generator=_gen(0))
    t = torch.randint(0, 3, (6,), generator=_gen(1))
    assert FL._lean_class_indices(x, t, "mean") == 1
    with fastloss.use_backend("triton"):
        context = contextvars.copy_context()
    assert context.run(FL._lean_class_indices, x, t, "sum") == FL._KERNELS
    monkeypatch.setattr(_backend, "_triton_selected", False)
    previous = _backend._default
    try:
        seen = []
        with fastloss.use_backend("torch"):
            fastloss.set_backend("triton")
            thread = threading.Thread(target=lambda: seen.append(FL._lean(x, x, "mean")))
            thread.start()
            thread.join(30)
        assert seen == [FL._KERNELS]
    finally:
        fastloss.set_backend(previous)


def test_lean_modules_compile_fullgraph_without_a_triton_choice(monkeypatch):
    """The shortcut reads a module global, which torch.compile guards: under "auto" with "triton"
    never selected the modules compile to torch's ops in one graph."""
    monkeypatch.setattr(_backend, "_triton_selected", False)
    torch._dynamo.reset()
    x = torch.randn(8, 5, generator=_gen(0), requires_grad=True)
    t = torch.randint(0, 5, (8,), generator=_gen(1))
    ce, bce, kl = fastloss.CrossEntropyLoss(), fastloss.BCEWithLogitsLoss(), fastloss.KLDivLoss(reduction="batchmean")
    tri = fastloss.TripletMarginLoss()

    def step(x):
        return ce(x, t) + bce(x, x.detach().sigmoid()) + kl(x.log_softmax(1), x.detach().softmax(1)) + tri(x, x * 0.5, -x)

    expected = (F.cross_entropy(x, t) + F.binary_cross_entropy_with_logits(x, x.detach().sigmoid())
                + F.kl_div(x.log_softmax(1), x.detach().softmax(1), reduction="batchmean")
                + F.triplet_margin_loss(x, x * 0.5, -x))
    _assert_compiles_fullgraph(step, x, expected)
