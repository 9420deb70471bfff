"""Every autograd feature torch.nn's losses support, on both backends: double backward
(gradgradcheck, hessian, hvp through ``torch.autograd.grad(..., create_graph=True)``), ``torch.func``
transforms (vmap, grad, jacrev, jacfwd, hessian, per-sample gradients), forward-mode AD, and the
in-place safety of ``inplace_backward``.

On the kernels, a double backward differentiates the PyTorch reference evaluated on the saved
operands, and ``torch.func`` / forward-mode AD calls run the PyTorch path (see
fastloss._backend.transforms_active); these tests compare each with torch.nn (or a naive formula
where torch has no such loss) in float64.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import assert_close, assert_launched, assert_not_launched

import fastloss
import fastloss.functional as FL
from fastloss import baselines

F64 = torch.float64


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _rand(*shape, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _targets(n, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c, (n,), generator=g)


_naive_focal = baselines.softmax_focal


_naive_sigmoid_focal = baselines.sigmoid_focal


_naive_contrastive = baselines.contrastive


_naive_info_nce = baselines.info_nce


# (id, fastloss call, torch.nn call or naive formula, differentiable inputs, kernel launched by the
# forward on the Triton backend). Inputs are tiny float64 tensors: gradgradcheck evaluates the
# loss many times, and on CPU the kernels run in Triton's interpreter.
def _cases():
    x, y = _randn(3, 4, seed=1), _randn(3, 4, seed=2)
    p = _rand(3, 4, seed=3)
    w, pw = _rand(4, seed=4) + 0.5, _rand(4, seed=5) + 0.5
    z, t = _randn(5, 6, seed=6) * 2, _targets(5, 6, seed=7)
    t_ign = t.clone()
    t_ign[1] = -100
    cw = _rand(6, seed=8) + 0.5
    z3, t3 = _randn(2, 4, 3, seed=9), _targets(6, 4, seed=10).reshape(2, 3)
    probs = torch.softmax(_randn(5, 6, seed=11), 1)
    a, b, c = _randn(4, 5, seed=12), _randn(4, 5, seed=13), _randn(4, 5, seed=14)
    lbl = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=F64)
    q, k = _randn(4, 5, seed=15), _randn(4, 5, seed=16)
    pwk, ce = "pointwise_fwd_kernel", "cross_entropy_fwd_kernel"
    cases = []
    for red in ("mean", "sum", "none"):
        cases += [
            (f"mse-{red}", lambda a_, b_, r=red: FL.mse_loss(a_, b_, reduction=r),
             lambda a_, b_, r=red: F.mse_loss(a_, b_, reduction=r), (x, y), pwk),
            (f"huber-{red}", lambda a_, b_, r=red: FL.huber_loss(a_, b_, reduction=r, delta=0.7),
             lambda a_, b_, r=red: F.huber_loss(a_, b_, reduction=r, delta=0.7), (x, y), pwk),
            (f"cross_entropy-{red}", lambda a_, r=red: FL.cross_entropy(a_, t_ign, reduction=r),
             lambda a_, r=red: F.cross_entropy(a_, t_ign, reduction=r), (z,), ce),
        ]
    cases += [
        ("l1", FL.l1_loss, F.l1_loss, (x, y), pwk),
        ("smooth_l1", lambda a_, b_: FL.smooth_l1_loss(a_, b_, beta=0.5),
         lambda a_, b_: F.smooth_l1_loss(a_, b_, beta=0.5), (x, y), pwk),
        ("bce_with_logits", lambda a_, b_: FL.binary_cross_entropy_with_logits(a_, b_, w, pos_weight=pw),
         lambda a_, b_: F.binary_cross_entropy_with_logits(a_, b_, w, pos_weight=pw), (x, p), pwk),
        ("sigmoid_focal", lambda a_, b_: FL.sigmoid_focal_loss(a_, b_, 0.25, 2.0, "mean"),
         lambda a_, b_: _naive_sigmoid_focal(a_, b_, 0.25, 2.0, "mean"), (x, p), pwk),
        ("sigmoid_focal-gamma1.5-noalpha", lambda a_, b_: FL.sigmoid_focal_loss(a_, b_, -1, 1.5, "sum"),
         lambda a_, b_: _naive_sigmoid_focal(a_, b_, -1, 1.5, "sum"), (x, p), pwk),
        ("kl_div-batchmean", lambda a_, b_: FL.kl_div(a_, b_, reduction="batchmean"),
         lambda a_, b_: F.kl_div(a_, b_, reduction="batchmean"), (x, p), pwk),
        ("combined-mse-l1", lambda a_, b_: fastloss.CombinedLoss({fastloss.MSELoss(): 0.7,
                                                                  fastloss.L1Loss(): 0.3})(a_, b_),
         lambda a_, b_: 0.7 * F.mse_loss(a_, b_) + 0.3 * F.l1_loss(a_, b_), (x, y), pwk),
        ("cross_entropy-options",
         lambda a_: FL.cross_entropy(a_, t_ign, cw, label_smoothing=0.1),
         lambda a_: F.cross_entropy(a_, t_ign, cw, label_smoothing=0.1), (z,), ce),
        ("cross_entropy-probabilities", lambda a_, b_: FL.cross_entropy(a_, b_, label_smoothing=0.2),
         lambda a_, b_: F.cross_entropy(a_, b_, label_smoothing=0.2), (z, probs), ce),
        ("cross_entropy-3d", lambda a_: FL.cross_entropy(a_, t3), lambda a_: F.cross_entropy(a_, t3),
         (z3,), ce),
        ("cross_entropy-z_loss-softcap", lambda a_: FL.cross_entropy(a_, t, z_loss=0.1, softcap=3.0),
         lambda a_: (F.cross_entropy(3.0 * torch.tanh(a_ / 3.0), t)
                     + 0.1 * (torch.logsumexp(3.0 * torch.tanh(a_ / 3.0), 1) ** 2).mean()), (z,), ce),
        ("focal", lambda a_: FL.focal_loss(a_, t, 0.5, 2.0), lambda a_: _naive_focal(a_, t, 0.5, 2.0),
         (z,), ce),
        ("focal-gamma0.5-sum", lambda a_: FL.focal_loss(a_, t, 1.0, 0.5, "sum"),
         lambda a_: _naive_focal(a_, t, 1.0, 0.5, "sum"), (z,), ce),
        ("contrastive", lambda a_, b_: FL.contrastive_loss(a_, b_, lbl, margin=3.0),
         lambda a_, b_: _naive_contrastive(a_, b_, lbl, 3.0), (a, b), "contrastive_fwd_kernel"),
        ("triplet", FL.triplet_margin_loss, F.triplet_margin_loss, (a, b, c), "triplet_fwd_kernel"),
        ("triplet-p1.5-swap", lambda a_, b_, c_: FL.triplet_margin_loss(a_, b_, c_, 2.0, 1.5, swap=True),
         lambda a_, b_, c_: F.triplet_margin_loss(a_, b_, c_, 2.0, 1.5, swap=True), (a, b, c),
         "triplet_fwd_kernel"),
        ("info_nce", lambda a_, b_: FL.info_nce(a_, b_, 0.5), lambda a_, b_: _naive_info_nce(a_, b_, 0.5),
         (q, k), "info_nce_chunk_kernel"),
        ("info_nce-symmetric-sum", lambda a_, b_: FL.info_nce(a_, b_, 0.5, "sum", symmetric=True),
         lambda a_, b_: _naive_info_nce(a_, b_, 0.5, "sum", symmetric=True), (q, k), "info_nce_chunk_kernel"),
    ]
    return cases


CASES = _cases()
IDS = [c[0] for c in CASES]


def _ran(backend, kernel):
    return assert_launched(kernel) if backend == "triton" else assert_not_launched()


def _leaves(inputs):
    return tuple(t.detach().clone().requires_grad_() for t in inputs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradgradcheck(case, backend):
    """The gradient is itself differentiable (torch.nn's losses support double backward)."""
    _, fn, _, inputs, kernel = case
    with _ran(backend, kernel):
        assert torch.autograd.gradgradcheck(fn, _leaves(inputs))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_second_derivatives_match_torch(case, backend):
    """``autograd.grad(..., create_graph=True)`` then a second ``autograd.grad`` (the way hessian,
    hvp and second-order optimisers use it), with a grad_output that is not 1."""
    _, fn, torch_fn, inputs, kernel = case
    results = []
    for f in (fn, torch_fn):
        xs = _leaves(inputs)
        with _ran(backend, kernel) if f is fn else contextlib.nullcontext():
            out = f(*xs)
        go = _rand(*out.shape, seed=20) + 0.5
        grads = torch.autograd.grad(out, xs, go, create_graph=True, allow_unused=True)
        v = [_randn(*t.shape, seed=21 + i) for i, t in enumerate(xs)]
        dot = sum((g * vi).sum() for g, vi in zip(grads, v) if g is not None)
        results.append(torch.autograd.grad(dot, xs, allow_unused=True, materialize_grads=True))
    for i, (actual, expected) in enumerate(zip(*results)):
        assert_close(actual, expected, F64, f"{case[0]}: second derivative, input {i}")


def test_hessian_of_mse_is_two_on_the_diagonal(backend):
    """The issue's example: torch.autograd.functional.hessian through the kernels."""
    x, y = _randn(5, seed=1), _randn(5, seed=2)
    with _ran(backend, "pointwise_fwd_kernel"):
        h = torch.autograd.functional.hessian(lambda a: FL.mse_loss(a, y, reduction="sum"), x)
    assert_close(h, 2 * torch.eye(5, dtype=F64), F64, "hessian")


def test_double_backward_after_inplace_backward_raises(triton_backend):
    h = _randn(4, 6).requires_grad_()
    t = _targets(4, 6)
    loss = FL.cross_entropy(h * 1.0, t, inplace_backward=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        torch.autograd.grad(loss, h, create_graph=True)


# --------------------------------------------------------------------------------------------
# torch.func transforms and forward-mode AD: routed to the PyTorch path on every backend
# --------------------------------------------------------------------------------------------

# One case per family and target kind (each transform multiplies the loss evaluations).
FUNC_CASES = [c for c in CASES if c[0] in (
    "mse-mean", "huber-none", "bce_with_logits", "sigmoid_focal", "cross_entropy-options",
    "cross_entropy-probabilities", "focal", "contrastive", "triplet-p1.5-swap", "info_nce")]
FUNC_IDS = [c[0] for c in FUNC_CASES]


def _scalar(fn):
    return lambda *xs: fn(*xs).sum()


@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd", "hessian"])
@pytest.mark.parametrize("case", FUNC_CASES, ids=FUNC_IDS)
def test_torch_func_transforms_match_torch(case, transform, backend):
    _, fn, torch_fn, inputs, _ = case
    argnums = tuple(range(len(inputs)))
    tf = getattr(torch.func, transform)
    with assert_not_launched():  # routed to the PyTorch path, also on the "triton" backend
        actual = tf(_scalar(fn), argnums=argnums)(*inputs)
    expected = tf(_scalar(torch_fn), argnums=argnums)(*inputs)
    for a, e in zip(torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)):
        assert_close(a, e, F64, f"{case[0]} {transform}")


@pytest.mark.parametrize("case", FUNC_CASES, ids=FUNC_IDS)
def test_vmap_and_per_sample_gradients_match_torch(case, backend):
    """vmap over a batch of problems, and vmap(grad) (per-sample gradients)."""
    _, fn, torch_fn, inputs, _ = case
    batch = [torch.stack([t, 0.5 * t + 0.1]) for t in inputs]  # two problems of the same shapes
    with assert_not_launched():
        actual = torch.func.vmap(fn)(*batch)
        actual_grads = torch.func.vmap(torch.func.grad(_scalar(fn)))(*batch)
    assert_close(actual, torch.func.vmap(torch_fn)(*batch), F64, f"{case[0]} vmap")
    assert_close(actual_grads, torch.func.vmap(torch.func.grad(_scalar(torch_fn)))(*batch), F64,
                 f"{case[0]} per-sample gradients")


@pytest.mark.parametrize("case", FUNC_CASES, ids=FUNC_IDS)
def test_forward_mode_ad_matches_torch(case, backend):
    _, fn, torch_fn, inputs, _ = case
    tangents = [_randn(*t.shape, seed=30 + i) for i, t in enumerate(inputs)]
    results = []
    for f in (fn, torch_fn):
        with fwAD.dual_level():
            out = f(*(fwAD.make_dual(t, v) for t, v in zip(inputs, tangents)))
            primal, tangent = fwAD.unpack_dual(out)
        results.append((primal, tangent))
    assert_close(results[0][0], results[1][0], F64, f"{case[0]} primal")
    assert_close(results[0][1], results[1][1], F64, f"{case[0]} tangent")


def test_vmap_of_mse_module(backend):
    """The issue's example, through a module."""
    a, b = _randn(3, 4, seed=1), _randn(3, 4, seed=2)
    assert_close(torch.func.vmap(fastloss.MSELoss())(a, b), torch.func.vmap(torch.nn.MSELoss())(a, b),
                 F64, "vmap(MSELoss)")


def test_kernels_run_again_after_a_transform(triton_backend):
    """The routing holds only while a transform is active."""
    a, b = _randn(3, 4, seed=1), _randn(3, 4, seed=2)
    torch.func.grad(lambda x: FL.mse_loss(x, b))(a)
    with fwAD.dual_level():
        FL.mse_loss(fwAD.make_dual(a, b), b)
    with assert_launched("pointwise_fwd_kernel"):
        FL.mse_loss(a, b)


# --------------------------------------------------------------------------------------------
# inplace_backward: the overwritten logits are marked dirty
# --------------------------------------------------------------------------------------------

def _ce_grad(x, t):
    return torch.autograd.grad(F.cross_entropy(x, t), x)[0]


def test_inplace_backward_logits_used_after_the_loss_raise(triton_backend):
    """The issue's example: ``(cross_entropy(z, t, inplace_backward=True) + (z ** 2).sum())``
    silently gave a wrong gradient; now autograd's graph knows the logits were overwritten."""
    h, t = _randn(4, 6).requires_grad_(), _targets(4, 6)
    z = h * 1.0
    with pytest.raises(RuntimeError, match="inplace_backward"):
        (FL.cross_entropy(z, t, inplace_backward=True) + (z**2).sum()).backward()


@pytest.mark.parametrize("view", [False, True], ids=["tensor", "view"])
def test_inplace_backward_logits_saved_before_the_loss_raise(view, triton_backend):
    """Something that saved the logits before the loss overwrote them: autograd's version check."""
    h, t = _randn(2, 2, 6).requires_grad_(), _targets(4, 6)
    z = h * 1.0
    saved = (z**2).sum()
    logits = z.view(-1, 6) if view else z.reshape(4, 6).clone()
    if not view:
        saved = (logits**2).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (FL.cross_entropy(logits, t, inplace_backward=True) + saved).backward()


def test_inplace_backward_never_overwrites_a_leaf(triton_backend):
    """A leaf that requires grad (a parameter, or the issue's ``z``) is never written into: torch
    forbids in-place changes of those. The gradient goes to a buffer of its own and is right."""
    z0, t = _randn(4, 6), _targets(4, 6)
    z = z0.clone().requires_grad_()
    with assert_launched("cross_entropy_fwd_kernel"):
        loss = FL.cross_entropy(z, t, inplace_backward=True)
    (loss + (z**2).sum()).backward()
    assert torch.equal(z.detach(), z0)
    assert_close(z.grad, _ce_grad(z0.clone().requires_grad_(), t) + 2 * z0, F64, "leaf gradient")
    v = z0.clone().requires_grad_()
    FL.cross_entropy(v.view(4, 6), t, inplace_backward=True).backward()
    assert torch.equal(v.detach(), z0), "a view of a leaf was overwritten"


@pytest.mark.parametrize("view", [False, True], ids=["tensor", "view"])
def test_inplace_backward_still_saves_the_buffer(view, triton_backend):
    """The model-output case: the logits' memory holds the gradient, which reaches the model."""
    h, t = _randn(2, 2, 6).requires_grad_(), _targets(4, 6)
    z = (h * 1.0).reshape(4, 6) if not view else (h * 1.0).view(-1, 6)
    if not view:
        z = z.clone()
    loss = FL.cross_entropy(z, t, inplace_backward=True)
    expected = _ce_grad(h.detach().reshape(4, 6).clone().requires_grad_(), t)
    assert_close(z.detach(), expected, F64, "the logits' memory holds the gradient")
    loss.backward()
    assert_close(h.grad.reshape(4, 6), expected, F64, "gradient")


def test_vmap_over_focal_targets(backend):
    """vmap over the targets too (per-sample problems with their own labels): no host read of the
    batched targets on the way."""
    x = torch.stack([_randn(5, 6, seed=1), _randn(5, 6, seed=2)])
    t = torch.stack([_targets(5, 6, seed=3), _targets(5, 6, seed=4)])
    with assert_not_launched():
        actual = torch.func.vmap(lambda a, b: FL.focal_loss(a, b, 0.5, 2.0))(x, t)
    expected = torch.func.vmap(lambda a, b: _naive_focal(a, b, 0.5, 2.0))(x, t)
    assert_close(actual, expected, F64, "vmap over logits and targets")
