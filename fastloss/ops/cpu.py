"""Fused CPU paths with analytic gradients, for losses torch.nn lacks.

The plain PyTorch reference (fastloss.reference) states each loss as a composition of torch ops and
lets autograd differentiate it: a dozen small ops forward and as many backward nodes, each a pass
over memory. Here a torch.autograd.Function computes the loss and, for reduced losses, its gradient
in the forward (as the kernels do) with a few vectorised ops, and backward only hands the gradient
over (scaled when grad_output is not 1). It runs on CPU tensors in eager mode only:
fastloss.functional routes torch.compile, torch.func transforms and forward-mode AD to the
reference, and a double backward (``create_graph=True``) differentiates the reference again on the
saved operands (ops._utils._differentiable_grads), so every autograd feature keeps torch's results.
The reference stays the oracle: tests/test_lean.py and tests/test_cpu_paths.py check these paths
against it. (triplet_applies, at the end, routes plain triplet calls to torch's own op instead.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from fastloss import reference
from fastloss._backend import transforms_active, use_triton
from fastloss.ops._utils import _differentiable_grads

__all__ = ["DIFFERENCE_LOSSES", "contrastive_applies", "contrastive_loss", "difference_combination", "info_nce",
           "info_nce_applies", "sigmoid_focal_loss", "softmax_focal_loss", "triplet_applies"]

_FLOATS = (torch.float32, torch.float64)
_REDUCTIONS = ("none", "mean", "sum")


def _forward_made(ctx, recompute: Callable[..., Any]) -> Any:
    """The gradients the forward made (``ctx.grads``), handed over once: a second backward
    (``retain_graph=True``) finds them taken and recomputes them as ``recompute(*saved)``, the saved
    tensors detached."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        grads = recompute(*(t.detach() for t in ctx.saved_tensors))
    return grads


def _eager_cpu(*tensors: Tensor) -> bool:
    """Whether plain CPU tensors (no __torch_function__) of one float32 / float64 dtype may take a
    fused path here: eager mode, no torch.func transform or forward-mode AD, no CPU autocast, and
    the PyTorch path selected for them (the backend is not "triton"). (Written for speed: it runs
    on every call of the losses that use it.)"""
    dtype = tensors[0].dtype
    if dtype not in _FLOATS:
        return False
    for t in tensors:
        if t.dtype is not dtype or not t.is_cpu:
            return False
    return not (torch.overrides.has_torch_function(tensors) or torch.compiler.is_compiling()
                or transforms_active() or torch.is_autocast_enabled("cpu") or use_triton(tensors[0]))


#: Below this probability (2**-100 in float32), log(p_t) of a softmax probability has lost
#: precision to subnormal rounding or underflowed to -inf: such rows (only they) take log p_t from
#: torch.log_softmax instead, (x_t - max) - log sum exp(x - max) (x_t - logsumexp(x) would carry
#: |x| eps of error where the logits are large).
_TINY_PROB = {torch.float32: 2.0**-100, torch.float64: 2.0**-1000}


#: Rows shorter than this many classes take _focal_terms' short-row form: torch.softmax along a
#: short last dimension runs a scalar loop. Measured (_focal_terms with its gradient, one thread,
#: AVX512, 2**16 elements, exp as exp2): float32 0.22-0.28 ms against the softmax form's 1.2-1.3 ms
#: for C = 8..15, the softmax form faster from 16 (0.14 against 0.20 ms; 3-7% faster at C = 32, 64,
#: 96, 128 and 22% at 48: torch's row max is slow unless C is a multiple of 32); float64 0.13-0.30 against
#: 0.16-1.24 ms for C = 8..256 (0.84 of the softmax form's time at 256, also 0.88 at 2**20
#: elements), 0.92-1.18 at 512. Below _SHORT_ROW_MIN_ROWS rows the short-row form's extra small
#: ops (about 10 us) cost more than the slow softmax (measured: equal at 64-256 rows for
#: C = 2..40, the softmax form 30-40% faster at 32).
_SHORT_ROW = {torch.float32: 16, torch.float64: 257}
_SHORT_ROW_MIN_ROWS = 128

#: exp(y) = 2**(y log2(e)): torch.exp2 is vectorised where torch.exp may call a scalar MKL loop
#: (measured on this AMD EPYC, float32: 20 against 55 us per 2**16 elements); the product's rounding
#: adds |y| eps to the relative error of exp(y), as the reference's exp of a rounded log-softmax.
_LOG2_E = 1.0 / math.log(2.0)


def _focal_terms(x: Tensor, t2: Tensor, alpha: float, gamma: float, scale: float, grad: bool
                 ) -> tuple[Tensor, Tensor | None]:
    """Softmax focal loss of (N, C) logits ``x`` and (N, 1) class indices ``t2`` (all in range),
    ``scale * sum_i -alpha q_i**gamma log p_i`` (p_i the softmax probability of row i's target,
    q_i = 1 - p_i), and its gradient with respect to x when ``grad``.

    With l_i = log p_i and L_i = -alpha q_i**gamma l_i, dq_i/dl_i = -p_i, so
    dL_i/dl_i = -alpha q_i**(gamma-1) (q_i - gamma p_i l_i) =: -k_i, and dl_i/dx_ij =
    [j = t_i] - p_ij: dL/dx_ij = scale k_i (p_ij - [j = t_i]). The row's softmax becomes the
    gradient in place (its target entry p_i - 1 = -q_i). Raises RuntimeError (gather's) when a
    target is out of range. Everything per row stays (N, 1).

    Rows shorter than _SHORT_ROW classes, _SHORT_ROW_MIN_ROWS of them or more, skip torch.softmax:
    e = exp(x - max) (as exp2), s = sum e, and l = (x_t - max) - log s (exact where p_t underflows),
    -q = expm1(l) (the reference's form, exact as p_t -> 1); the gradient is e scaled by k / s per
    row, its target entries -q k.
    """
    if x.shape[1] < _SHORT_ROW[x.dtype] and x.shape[0] >= _SHORT_ROW_MIN_ROWS:
        m = x.amax(1, keepdim=True)
        p = torch.sub(x, m).mul_(_LOG2_E).exp2_()  # e: p times s, 2**((x - m) log2(e)): exp2 is vectorised
        s = p.sum(1, keepdim=True)
        log_p = x.gather(1, t2).sub_(m).sub_(s.log())
        nq = torch.expm1(log_p)
        p_t = log_p.exp()  # (not nq + 1: that rounds a small p_t to a multiple of eps / 2)
    else:
        s = None
        p = torch.softmax(x, 1)
        p_t = p.gather(1, t2)
        log_p = p_t.log()
        if p_t.min().item() < _TINY_PROB[x.dtype]:  # CPU only: a host read is free here
            # those rows only, from log_softmax ((x_t - max) - log sum, torch's rounding)
            tiny = p_t < _TINY_PROB[x.dtype]
            log_p = torch.where(tiny, torch.log_softmax(x, 1).gather(1, t2), log_p)
        nq = p_t - 1.0  # -q, exact where p_t >= 1/2 (Sterbenz): its error is p_t's, as the reference's
    if gamma == 0.0:
        loss = log_p.sum()
    elif gamma == 2.0:
        loss = (nq * nq).mul_(log_p).sum()
    else:
        q = nq.neg()
        if gamma < 1.0:
            # the reference's clamp: q**(gamma - 1) stays finite at q = 0 (where l = 0 anyway)
            q.clamp_min_(torch.finfo(x.dtype).tiny)
        loss = q.pow(gamma).mul_(log_p).sum()
    loss.mul_(-alpha * scale)
    if not grad:
        return loss, None
    if gamma == 0.0:
        k = alpha * scale
    elif gamma == 2.0:
        k = torch.addcmul(nq, p_t, log_p, value=gamma).mul_(nq).mul_(alpha * scale)
    elif gamma == 1.0:
        k = torch.addcmul(nq, p_t, log_p, value=gamma).mul_(-alpha * scale)
    else:
        k = q.pow_(gamma - 1.0).mul_(torch.addcmul(nq, p_t, log_p, value=gamma)).mul_(-alpha * scale)
    if s is not None:  # short rows: e k / s, the target entries -q k
        return loss, p.mul_(k / s).scatter_(1, t2, nq.mul_(k))
    return loss, p.scatter_(1, t2, nq).mul_(k)


class _FocalParams(NamedTuple):
    """The softmax focal Function's non-tensor arguments, as they cross autograd (ctx.params)."""

    alpha: float
    gamma: float
    reduction: str
    scale: float  # the reduction's: 1 / N for "mean", 1 for "sum"


class _SoftmaxFocal(torch.autograd.Function):
    """Softmax focal loss, reduced ("mean" or "sum"), of (N, C) CPU logits, N > 0."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
        scale = 1.0 / input.shape[0] if reduction == "mean" else 1.0
        t2 = target.unsqueeze(1)
        loss, grad = _focal_terms(input, t2, alpha, gamma, scale, ctx.needs_input_grad[0])
        ctx.save_for_backward(input, target)
        ctx.params = _FocalParams(alpha, gamma, reduction, scale)
        ctx.grads = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference again
            return _differentiable_grads(ctx, grad_loss, _focal_reference)
        p = ctx.params
        grad = _forward_made(ctx, lambda x, t: _focal_terms(x, t.unsqueeze(1), p.alpha, p.gamma, p.scale, True)[1])
        if grad_loss.item() != 1.0:  # CPU: the common loss.backward() skips a pass
            grad.mul_(grad_loss)
        return grad, None, None, None, None


def _focal_reference(ctx) -> tuple[Tensor, tuple]:
    input, target = ctx.saved_tensors
    p = ctx.params
    return reference.focal_loss(input, target, p.alpha, p.gamma, p.reduction), (input, target, None, None, None)


def softmax_focal_loss(input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
    """Softmax focal loss of (N, C) float32 / float64 CPU logits (N, C > 0) and (N,) int64 class
    indices, reduction "mean" or "sum", float alpha, gamma >= 0: the fused CPU path. Raises
    RuntimeError (before any work is kept) when a target is out of range or ignored: the caller
    then takes the reference path, which has torch's errors and ignore_index."""
    return _SoftmaxFocal.apply(input, target, float(alpha), float(gamma), reduction)


# --------------------------------------------------------------------------------------------
# Sigmoid focal loss (torchvision's)
# --------------------------------------------------------------------------------------------

def _sigmoid_focal_terms(x: Tensor, y: Tensor, alpha: float, gamma: float, reduction: str, grad: bool
                         ) -> tuple[Tensor, Tensor | None]:
    """torchvision's sigmoid focal loss ``a_t m**gamma ce`` (reduced with ``reduction``; "mean" and
    "sum" scale the gradient too) and its gradient with respect to the logits x when ``grad``.

    p = sigmoid(x), m = 1 - p_t = p (1 - y) + sigmoid(-x) y (no cancellation for hard targets),
    ce = bce_with_logits(x, y), a_t = alpha y + (1 - alpha)(1 - y) (1 when alpha < 0). With
    dce/dx = p - y and dm/dx = p (1 - p)(1 - 2y):
    dL/dx = a_t (m**gamma (p - y) + gamma m**(gamma-1) p (1 - p)(1 - 2y) ce). gamma >= 1 here, so
    m**(gamma-1) is finite at m = 0. The mean's 1/n rides on a_t when there is one (a pass fewer).
    (ce from the two sigmoids, as max(-x, 0) + (1 - y) x - log1p(-min(p, sigmoid(-x))), keeps the
    tails torch's bce_with_logits rounds to 0, but its six passes cost more than bce's one from
    2**18 elements on: measured 0.59 against 0.47 of torchvision's time at 2**20.)
    """
    n = x.numel()
    scale = 1.0 / n if reduction == "mean" and n else 1.0
    p = torch.sigmoid(x)
    p_neg = torch.sigmoid(-x)
    m = torch.lerp(p, p_neg, y)  # exact at y = 0 and y = 1
    ce = torch.binary_cross_entropy_with_logits(x, y, None, None, 0)
    m_gamma = m * m if gamma == 2.0 else m if gamma == 1.0 else m.pow(gamma)
    # a_t times the mean's 1/n: (1 - alpha) s - (1 - 2 alpha) s y
    a_t = torch.rsub(y, (1.0 - alpha) * scale, alpha=(1.0 - 2.0 * alpha) * scale) if alpha >= 0 else None
    loss = m_gamma * ce
    if a_t is not None:
        loss.mul_(a_t)
    if reduction != "none":
        scaled = a_t is not None and n > 0
        loss = loss.sum() if scaled or reduction == "sum" else loss.mean()
    if not grad:
        return loss, None
    # gamma m**(gamma-1) p (1 - p)(1 - 2y) ce
    focus = torch.rsub(y, 1.0, alpha=2.0).mul_(p_neg).mul_(ce)
    if gamma != 1.0:
        focus.mul_(m if gamma == 2.0 else m.pow(gamma - 1.0))
    g = torch.sub(p, y).mul_(m_gamma).add_(focus.mul_(p), alpha=gamma)
    if a_t is not None:
        g.mul_(a_t)
    elif scale != 1.0:
        g.mul_(scale)
    return loss, g


class _SigmoidFocalParams(NamedTuple):
    """The sigmoid focal Function's non-tensor arguments, as they cross autograd (ctx.params)."""

    alpha: float
    gamma: float
    reduction: str


class _SigmoidFocal(torch.autograd.Function):
    """torchvision's sigmoid focal loss of CPU logits and targets of one shape and one float32 /
    float64 dtype, gamma >= 1, targets without a gradient."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
        loss, grad = _sigmoid_focal_terms(input, target, alpha, gamma, reduction, ctx.needs_input_grad[0])
        ctx.save_for_backward(input, target)
        ctx.params = _SigmoidFocalParams(alpha, gamma, reduction)
        ctx.grads = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference again
            return _differentiable_grads(ctx, grad_loss, _sigmoid_focal_reference)
        p = ctx.params
        grad = _forward_made(ctx, lambda x, y: _sigmoid_focal_terms(x, y, p.alpha, p.gamma, p.reduction, True)[1])
        # (reduced: a host read is free on CPU, and the common loss.backward() skips a pass)
        if p.reduction == "none" or grad_loss.item() != 1.0:
            grad.mul_(grad_loss)
        return grad, None, None, None, None


def _sigmoid_focal_reference(ctx) -> tuple[Tensor, tuple]:
    input, target = ctx.saved_tensors
    p = ctx.params
    return (reference.sigmoid_focal_loss(input, target, p.alpha, p.gamma, p.reduction),
            (input, target, None, None, None))


def sigmoid_focal_loss(input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
    """torchvision's sigmoid focal loss, fused CPU path: validated CPU operands of one shape and one
    float32 / float64 dtype, gamma >= 1, a target that needs no gradient."""
    return _SigmoidFocal.apply(input, target, float(alpha), float(gamma), reduction)


# --------------------------------------------------------------------------------------------
# Weighted sums of difference losses (CombinedLoss)
# --------------------------------------------------------------------------------------------

#: Members the fused CPU combination evaluates: losses of d = input - target alone.
DIFFERENCE_LOSSES = ("mse", "l1", "huber", "smooth_l1")

#: Elements per chunk of _products_sum's scratch buffer: 256 KiB of float32 stay in cache, and a
#: buffer this small costs no page faults (a second buffer of the operands' size made mse 10x
#: slower at 2**20 elements, its page faults taking 4 ms).
_SUM_CHUNK = 1 << 16


def _products_sum(products: list[tuple[Tensor, Tensor, float]], scale: float = 1.0) -> Tensor:
    """``scale * sum_i sum_k c_k a_k[i] b_k[i]`` for products (a_k, b_k, c_k) of 1-D tensors of one length:
    the weighted products of each element in one buffer, then torch.sum's pairwise sum, per chunk of
    _SUM_CHUNK elements in one reused scratch buffer (the chunks' sums pairwise). A BLAS dot per
    product makes its sum in one pass without a buffer, but its running sums are off by 2-3 eps at
    2**16 elements (65 eps at 2**20 in float32), torch.sum's by 0.3 eps (measured on normals): the
    combination's loss was 2-5x torch.nn's error in float32, 2-10x in float64. One buffer for every
    member keeps the op count of the dots (the price is the buffer's passes)."""
    # relative to the first coefficient (when it is a nonzero number), which then scales the sum:
    # one pass (and one op) fewer
    c0 = products[0][2]
    if c0 != 0.0 and math.isfinite(c0):
        products = [(a, b, c / c0) for a, b, c in products]
    else:
        c0 = 1.0
    c0 *= scale

    def weighted_sum(chunk: list[tuple[Tensor, Tensor, float]], out: Tensor | None = None) -> Tensor:
        (a, b, c), rest = chunk[0], chunk[1:]
        values = a * b if out is None else torch.mul(a, b, out=out)
        if c != 1.0:
            values.mul_(c)
        for a, b, c in rest:
            values.addcmul_(a, b, value=c)
        return values.sum()

    n = products[0][0].shape[0]
    if n <= _SUM_CHUNK:
        total = weighted_sum(products)
    else:
        buf = products[0][0].new_empty(_SUM_CHUNK)
        parts = [weighted_sum([(a[i:i + _SUM_CHUNK], b[i:i + _SUM_CHUNK], c) for a, b, c in products],
                              buf[:min(_SUM_CHUNK, n - i)])
                 for i in range(0, n, _SUM_CHUNK)]
        total = torch.stack(parts).sum()
    return total if c0 == 1.0 else total.mul_(c0)


def _combination_terms(input: Tensor, target: Tensor, members: tuple, scale: float, grad: bool
                       ) -> tuple[Tensor, Tensor | None]:
    """``scale * sum_k coef_k sum_i loss_k(d_i)``, d = input - target, and its gradient with respect
    to input when ``grad``, for members (name, coef, param1, param2) of DIFFERENCE_LOSSES.

    mse: d**2, gradient 2d. l1: |d| = d sign(d), gradient sign(d). huber (delta): with
    c = clamp(d, -delta, delta), c d - c**2 / 2 (d**2 / 2 inside, delta (|d| - delta/2) outside),
    gradient c. smooth_l1 (beta > 0): huber(beta) / beta. The members' values are summed as one
    weighted sum of products (_products_sum: pairwise, as torch.nn's sums). The gradient is summed
    in place into the members' own buffers (sign(d), c) and d itself, once the loss has read them:
    a fresh buffer costs its page faults.
    """
    d = torch.sub(input, target).reshape(-1)
    products = []  # the loss's (a, b, coefficient) terms: scale * sum coef a b
    parts = []  # the gradient's (buffer, coefficient) terms
    for name, coef, param, _ in members:
        if name == "mse":
            products.append((d, d, coef))
            parts.append((d, 2.0 * coef * scale))
        elif name == "l1":
            sign = torch.sign(d)
            products.append((d, sign, coef))
            parts.append((sign, coef * scale))
        else:
            if name == "smooth_l1":
                coef = coef / param
            clamped = d.clamp(-param, param)
            products += [(clamped, d, coef), (clamped, clamped, -0.5 * coef)]
            parts.append((clamped, coef * scale))
    loss = _products_sum(products, scale)
    if not grad:
        return loss, None
    own = [(t, c) for t, c in parts if t is not d]
    d_coef = [c for t, c in parts if t is d]
    if own:
        g = own[0][0].mul_(own[0][1])
        for t, c in own[1:]:
            g.add_(t, alpha=c)
        if d_coef:
            g.add_(d, alpha=sum(d_coef))
    else:
        g = d.mul_(sum(d_coef))
    return loss, g.reshape(input.shape)


class _CombinationParams(NamedTuple):
    """The combination Function's non-tensor arguments, as they cross autograd (ctx.params)."""

    members: tuple  # (name, coef, param1, param2) per member of DIFFERENCE_LOSSES
    reduction: str
    scale: float    # the reduction's: 1 / n for "mean", 1 for "sum"


class _Combination(torch.autograd.Function):
    """A reduced ("mean" or "sum") weighted sum of difference losses of CPU operands of one shape
    and one float32 / float64 dtype."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, members: tuple, reduction: str) -> Tensor:
        n = input.numel()
        scale = 1.0 / n if reduction == "mean" else 1.0
        loss, grad = _combination_terms(input, target, members, scale, any(ctx.needs_input_grad[:2]))
        if n == 0:
            loss = input.new_full((), math.nan if reduction == "mean" else 0.0)
        ctx.save_for_backward(input, target)
        ctx.params = _CombinationParams(members, reduction, scale)
        ctx.grads = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference again
            return _differentiable_grads(ctx, grad_loss, _combination_reference)
        p = ctx.params
        grad = _forward_made(ctx, lambda x, y: _combination_terms(x, y, p.members, p.scale, True)[1])
        if grad_loss.item() != 1.0:  # CPU: the common loss.backward() skips a pass
            grad.mul_(grad_loss)
        need_input, need_target = ctx.needs_input_grad[:2]
        grad_target = grad.neg() if need_target else None
        return (grad if need_input else None), grad_target, None, None


def _combination_reference(ctx) -> tuple[Tensor, tuple]:
    input, target = ctx.saved_tensors
    members, reduction = ctx.params.members, ctx.params.reduction
    calls = {
        "mse": lambda p: reference.mse_loss(input, target, reduction),
        "l1": lambda p: reference.l1_loss(input, target, reduction),
        "huber": lambda p: reference.huber_loss(input, target, reduction, p),
        "smooth_l1": lambda p: reference.smooth_l1_loss(input, target, reduction, p),
    }
    loss = sum(coef * calls[name](param) for name, coef, param, _ in members)
    return loss, (input, target, None, None)


def difference_combination(members: list[tuple[str, float, float, float]], input: Tensor, target: Tensor,
                           reduction: str) -> Tensor:
    """``sum_k coef_k * loss_k(input, target)`` for members (loss, coef, param1, param2) of
    DIFFERENCE_LOSSES, reduction "mean" or "sum", CPU operands of one shape and one float32 / float64
    dtype: the fused CPU path of CombinedLoss (one Function, the gradient made in the forward)."""
    return _Combination.apply(input, target, tuple(members), reduction)


# --------------------------------------------------------------------------------------------
# Contrastive loss
# --------------------------------------------------------------------------------------------

def _contrastive_terms(x1: Tensor, x2: Tensor, y: Tensor, margin: float, reduction: str, grad: bool,
                       grad_label: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """The contrastive loss of (B, D) pairs, B > 0, reduced with ``reduction``, and what its
    gradients are made of: ``diff`` = x1 - x2 + 1e-6, the per-pair factor ``k`` with
    dL/dx1_i = k_i diff_i = -dL/dx2_i (when ``grad``) and the label's gradient ``h**2 - d**2`` (when
    ``grad_label``); for "mean" / "sum" both carry the reduction's scale.

    d = ||diff|| (torch's pairwise_distance), h = clamp(margin - d, min=0), L_i = (1 - y) d**2 +
    y h**2, evaluated as lerp(d**2, h**2, y) (exact at y = 0 and 1, as the reference's form).
    dL_i/dd = 2 (1 - y) d - 2 y h and dd/dx1 = diff / d, so with d + h = max(d, margin),
    k = 2 (1 - y max(d, margin) / d); where d = 0, diff = 0 and its gradient is 0 (torch's norm has
    gradient 0 there), so k is set to 0 there.
    """
    diff = torch.sub(x1, x2).add_(1e-6)
    d = torch.linalg.vector_norm(diff, dim=1)
    h = torch.rsub(d, margin).clamp_min_(0.0)
    d2, h2 = d * d, h.mul_(h)
    loss = torch.lerp(d2, h2, y)
    scale = 1.0
    if reduction == "mean":
        loss, scale = loss.mean(), 1.0 / d.shape[0]
    elif reduction == "sum":
        loss = loss.sum()
    k = dy = None
    if grad:
        k = torch.clamp_min(d, margin).div_(d).mul_(y).sub_(1.0).mul_(-2.0 * scale)
        if d.min().item() == 0.0:  # CPU: a host read is free here
            k.masked_fill_(d == 0.0, 0.0)
    if grad_label:
        dy = h2.sub_(d2)
        if scale != 1.0:
            dy.mul_(scale)
    return loss, diff, k, dy


class _ContrastiveParams(NamedTuple):
    """The contrastive Function's non-tensor arguments, as they cross autograd (ctx.params)."""

    margin: float
    reduction: str


class _Contrastive(torch.autograd.Function):
    """The contrastive loss of (B, D) CPU pairs, B > 0, of one float32 / float64 dtype, and their
    (B,) labels of that dtype; every reduction."""

    @staticmethod
    def forward(ctx, x1: Tensor, x2: Tensor, label: Tensor, margin: float, reduction: str) -> Tensor:
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, diff, k, dy = _contrastive_terms(x1, x2, label, margin, reduction, grad, ctx.needs_input_grad[2])
        ctx.save_for_backward(x1, x2, label)
        ctx.params = _ContrastiveParams(margin, reduction)
        ctx.grads = (diff, k, dy)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference again
            return _differentiable_grads(ctx, grad_loss, _contrastive_reference)
        p = ctx.params
        need1, need2, need_label = ctx.needs_input_grad[:3]
        diff, k, dy = _forward_made(ctx, lambda x1, x2, y: _contrastive_terms(
            x1, x2, y, p.margin, p.reduction, need1 or need2, need_label)[1:])
        if p.reduction == "none":
            k = k * grad_loss if k is not None else None
            dy = dy.mul_(grad_loss) if dy is not None else None
        elif grad_loss.item() != 1.0:  # CPU: the common loss.backward() skips a pass
            k = k.mul_(grad_loss) if k is not None else None
            dy = dy.mul_(grad_loss) if dy is not None else None
        g1 = diff.mul_(k.unsqueeze(1)) if k is not None else None
        return (g1 if need1 else None), (g1.neg() if need2 else None), dy, None, None


def _contrastive_reference(ctx) -> tuple[Tensor, tuple]:
    x1, x2, label = ctx.saved_tensors
    p = ctx.params
    return reference.contrastive_loss(x1, x2, label, p.margin, p.reduction), (x1, x2, label, None, None)


def contrastive_applies(x1: object, x2: object, label: object, margin: object, reduction: object) -> bool:
    """Whether fastloss.functional.contrastive_loss's arguments take the fused path below as they
    are: (B, D) pairs of one shape, B > 0, a (B,) label, all CPU tensors of one float32 / float64
    dtype (see _eager_cpu), a real margin and a valid reduction; anything else (and every error)
    takes the full path."""
    return (isinstance(x1, Tensor) and isinstance(x2, Tensor) and isinstance(label, Tensor)
            and x1.dim() == 2 and x1.shape == x2.shape and x1.shape[0] > 0 and label.shape == x1.shape[:1]
            and isinstance(margin, (int, float)) and reduction in ("none", "mean", "sum")
            and _eager_cpu(x1, x2, label))


def contrastive_loss(x1: Tensor, x2: Tensor, label: Tensor, margin: float, reduction: str) -> Tensor:
    """The contrastive loss (fastloss.functional.contrastive_loss's), fused CPU path: (B, D) CPU
    pairs, B > 0, of one float32 / float64 dtype, (B,) labels of that dtype, any reduction."""
    return _Contrastive.apply(x1, x2, label, float(margin), reduction)


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------

#: F.normalize's default eps: rows are divided by max(||row||, eps).
_NORMALIZE_EPS = 1e-12


#: Scores per chunk of the one-way fused InfoNCE (see _info_nce_terms): 1 MiB of float32 scores
#: stay in cache from the matmul through the softmax to the two gradient matmuls. Measured (one
#: thread, float32, forward + gradients, 2**16 .. 2**17 elements): 2**18 against 2**22 (the
#: reference's bound) 40 against 66 ms at B = 4096, D = 16; 24 against 39 ms at 2048 x 64; 153
#: against 272 ms at 8192 x 16; within noise at B <= 1024; 2**16 and 2**20 slower.
_NCE_CHUNK_ELEMENTS = 1 << 18


def _normalized(x: Tensor) -> tuple[Tensor, Tensor]:
    """F.normalize(x, dim=1) and the (B, 1) divisors max(||x_i||, eps)."""
    r = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_NORMALIZE_EPS)
    return x / r, r


def _normalize_backward(xn: Tensor, r: Tensor, g: Tensor) -> Tensor:
    """The gradient with respect to x of F.normalize(x) = x / max(||x||, eps), given ``xn`` (the
    normalised rows), ``r`` (their divisors) and ``g``, the gradient with respect to xn already
    divided by r (consumed): g - xn <xn, g> on rows of norm > eps, g on the others (a constant
    divisor). Two passes over (B, D), in place: vecdot and addcmul."""
    dot = torch.linalg.vecdot(xn, g).unsqueeze(1)
    if r.min().item() <= _NORMALIZE_EPS:  # CPU: a host read is free here
        dot.masked_fill_(r <= _NORMALIZE_EPS, 0.0)
    return g.addcmul_(xn, dot, value=-1.0)


def _info_nce_terms(query: Tensor, key: Tensor, scale: float, reduction: str, symmetric: bool, normalize: bool,
                    grad: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """InfoNCE (reduction "mean" or "sum") of (B, D) CPU queries and keys, B, D > 0, and its
    gradients with respect to both when ``grad``.

    s = scale q_n k_n^T (q_n, k_n the normalised rows when ``normalize``), P = softmax(s, 1): the
    row losses are -log P_ii and ds = w (P - I) (w the reduction's scale); with ``symmetric`` also
    the columns' Q = softmax(s, 0), the loss (-log P_ii - log Q_ii) / 2 and ds = w ((P - I) + (Q - I)) / 2.
    Then dq_n = scale ds k_n, dk_n = scale ds^T q_n. Without symmetric the rows are scored in chunks
    (_NCE_CHUNK_ELEMENTS scores at a time, at most the reference's bound on memory), each
    chunk's gradient made at once, so the scores are computed once (the reference recomputes them
    under checkpointing); symmetric needs every column at once: the caller keeps it to one chunk.
    A row (column) whose diagonal probability is below _TINY_PROB takes its log from log_softmax.

    torch.softmax's own sum of the exponentials is off by a factor per row (column) that grows with
    B: in float32 it drops the terms below half an ulp of its running sum, so every probability of
    the row comes out too large (measured at B = 2048: by 1.2 eps on average along rows, 19 eps
    along columns, the summed log P_ii 30x and 600x further from float64 than once corrected); in
    float64 the factor is random (largest relative errors 28 and 71 eps at B = 4096, 12 once
    corrected). The probabilities' own sum c (torch.sum's pairwise sum: one read of the scores)
    gives that factor: the corrected probabilities are P / c, log P_ii - log c_i the row's
    log-probability, and the gradient carries 1 / c on the rows of P - diag(c) (one-way: on dq_n's
    rows and, as q_n's rows, inside dk_n's product; symmetric: in the pass that adds the two
    directions, each with its own factor).
    """
    if normalize:
        qn, rq = _normalized(query)
        kn, rk = _normalized(key)
    else:
        qn, kn = query, key
    n_rows = query.shape[0]
    qs = qn * scale
    chunk = n_rows if symmetric else max(1, min(reference.INFO_NCE_CHUNK_ELEMENTS, _NCE_CHUNK_ELEMENTS) // n_rows)
    tiny = _TINY_PROB[query.dtype]
    log_parts = []  # each row's (column's) log-probability, summed at once at the end
    gq_parts = []
    gk = None
    for start in range(0, n_rows, chunk):
        q_c = qs[start:start + chunk]
        s = torch.mm(q_c, kn.T)
        p = torch.softmax(s, 1)
        dirs = [(p, 1)]
        if symmetric:
            dirs.append((torch.softmax(s, 0), 0))
        sums = []
        for probs, dim in dirs:
            total = probs.sum(dim)  # softmax's error factor per row (column): see above
            p_t = probs.diagonal(start)
            log_p = p_t.log().sub_(total.log())
            if p_t.min().item() < tiny:  # CPU: a host read is free here; those rows only
                log_p = torch.where(p_t < tiny, torch.log_softmax(s, dim).diagonal(start), log_p)
            log_parts.append(log_p)
            sums.append(total)
        if not grad:
            continue
        # P - diag(c): exact where p_ii >= c_i / 2 (Sterbenz), as autograd's P - I
        p.diagonal(start).sub_(sums[0])
        qn_c = qn[start:start + chunk]
        if symmetric:  # (P - diag(c)) / c + (Q - diag(c')) / c' (the 1/2 rides on the final scale)
            q_cols = dirs[1][0]
            q_cols.diagonal().sub_(sums[1])
            p.mul_(sums[0].reciprocal().unsqueeze(1)).addcmul_(q_cols, sums[1].reciprocal())  # (div: 1.5x slower)
            gq_parts.append(torch.mm(p, kn))
        else:
            gq_parts.append(torch.mm(p, kn).div_(sums[0].unsqueeze(1)))
            qn_c = qn_c / sums[0].unsqueeze(1)
        # dk_n^T = q_n^T ds: (D, B), faster than ds^T q_n on MKL's CPU gemm
        gk = torch.mm(qn_c.T, p) if gk is None else gk.addmm_(qn_c.T, p)
    w = 1.0 / n_rows if reduction == "mean" else 1.0
    # (one pairwise sum, as the reference's: adding the chunks' sums one by one made the float32
    # loss's error 6x the reference's at B = 4096)
    logs = log_parts[0] if len(log_parts) == 1 else torch.cat(log_parts)
    loss = logs.sum().mul_(-0.5 * w if symmetric else -w)
    if not grad:
        return loss, None, None
    gq = gq_parts[0] if len(gq_parts) == 1 else torch.cat(gq_parts)
    # gk transposed to (B, D) rows (torch's transpose copy: autograd then keeps the buffer, and
    # vecdot and addcmul run 5x faster on it than on the (D, B) view), then one pass each for the
    # scale and the normalisation's divisor
    c = scale * w * (0.5 if symmetric else 1.0)
    gq.mul_(torch.div(c, rq) if normalize else c)
    gk = gk.T.contiguous().mul_(torch.div(c, rk) if normalize else c)
    if normalize:
        gq = _normalize_backward(qn, rq, gq)
        gk = _normalize_backward(kn, rk, gk)
    return loss, gq, gk


class _InfoNCEParams(NamedTuple):
    """The InfoNCE Function's non-tensor arguments, as they cross autograd (ctx.params)."""

    temperature: float
    reduction: str
    symmetric: bool
    normalize: bool


class _InfoNCE(torch.autograd.Function):
    """InfoNCE, reduced ("mean" or "sum"), of (B, D) CPU queries and keys of one float32 / float64
    dtype, B, D > 0, a float temperature."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, temperature: float, reduction: str, symmetric: bool,
                normalize: bool) -> Tensor:
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, gq, gk = _info_nce_terms(query, key, 1.0 / temperature, reduction, symmetric, normalize, grad)
        ctx.save_for_backward(query, key)
        ctx.params = _InfoNCEParams(temperature, reduction, symmetric, normalize)
        ctx.grads = (gq, gk)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference again
            return _differentiable_grads(ctx, grad_loss, _info_nce_reference)
        p = ctx.params
        gq, gk = _forward_made(ctx, lambda q, k: _info_nce_terms(
            q, k, 1.0 / p.temperature, p.reduction, p.symmetric, p.normalize, True)[1:])
        if grad_loss.item() != 1.0:  # CPU: the common loss.backward() skips a pass
            gq.mul_(grad_loss)
            gk.mul_(grad_loss)
        need_q, need_k = ctx.needs_input_grad[:2]
        return (gq if need_q else None), (gk if need_k else None), None, None, None, None


def _info_nce_reference(ctx) -> tuple[Tensor, tuple]:
    query, key = ctx.saved_tensors
    p = ctx.params
    return (reference.info_nce(query, key, p.temperature, p.reduction, p.symmetric, p.normalize),
            (query, key, None, None, None, None))


def info_nce_applies(query: object, key: object, temperature: object, reduction: object, symmetric: object,
                     gather: object) -> bool:
    """Whether fastloss.functional.info_nce's arguments take the fused path below as they are: (B, D)
    queries and keys of one shape, B, D > 0, CPU tensors of one float32 / float64 dtype (see
    _eager_cpu), a positive finite float temperature, reduction "mean" or "sum", no gather, and for
    ``symmetric`` a B small enough for one chunk; anything else (and every error) takes the full path."""
    return (isinstance(query, Tensor) and isinstance(key, Tensor) and query.dim() == 2
            and query.shape == key.shape and query.shape[0] > 0 and query.shape[1] > 0
            and isinstance(temperature, (int, float)) and 0 < temperature < math.inf
            and reduction in ("mean", "sum") and not gather
            and (not symmetric or query.shape[0] ** 2 <= reference.INFO_NCE_CHUNK_ELEMENTS)
            and _eager_cpu(query, key))


def info_nce(query: Tensor, key: Tensor, temperature: float, reduction: str, symmetric: bool,
             normalize: bool) -> Tensor:
    """InfoNCE (fastloss.functional.info_nce's), fused CPU path: (B, D) CPU queries and keys of one
    float32 / float64 dtype, B, D > 0, a positive finite float temperature, reduction "mean" or
    "sum"; symmetric only while the B x B scores fit in one chunk (see info_nce_applies)."""
    return _InfoNCE.apply(query, key, float(temperature), reduction, bool(symmetric), bool(normalize))



# --------------------------------------------------------------------------------------------
# Triplet margin loss: torch's own op
# --------------------------------------------------------------------------------------------

def triplet_applies(anchor: object, positive: object, negative: object, margin: object, p: object, eps: object,
                    swap: object, size_average: object, reduce: object, reduction: object) -> bool:
    """Whether fastloss.functional.triplet_margin_loss's arguments may go straight to
    ``torch.triplet_margin_loss`` (the ATen op torch.nn.functional's wrapper calls, which computes
    the reference's formula: pairwise distances, clamp_min, the reduction): plain CPU tensors of one
    shape, at least 1-D, one float32 / float64 dtype, real margin > 0, p and eps, a bool swap, a
    valid reduction, no legacy arguments, no __torch_function__ mode, outside torch.func transforms and forward-mode AD (where
    torch's op has no batching rule and warns), and the PyTorch path selected. Anything else (and
    every error) takes the full path. The lean call costs torch.nn's host work plus these reads,
    not the reference's ten Python-level ops and their checks (1.2-1.3x torch.nn's time below 2**14
    elements). torch.compile and autocast need no exclusion: it is torch's op, as torch.nn calls it.
    """
    if not (type(anchor) is Tensor and type(positive) is Tensor and type(negative) is Tensor):
        return False  # (a subclass, nn.Parameter included, takes the full path)
    dtype = anchor.dtype
    return (positive.dtype is dtype and negative.dtype is dtype and dtype in _FLOATS
            and anchor.is_cpu and positive.is_cpu and negative.is_cpu
            and anchor.dim() > 0 and anchor.shape == positive.shape == negative.shape
            and type(margin) in (int, float) and margin > 0 and type(p) in (int, float)
            and type(eps) in (int, float) and type(swap) is bool and size_average is None and reduce is None
            and reduction in _REDUCTIONS and not torch.overrides.has_torch_function((anchor, positive, negative))
            and not transforms_active() and not use_triton(anchor))
