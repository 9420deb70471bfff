"""Fused CPU paths with analytic gradients, for losses torch.nn lacks.

The plain PyTorch reference (fastloss.reference) states each loss as a composition of torch ops and
lets autograd differentiate it: a dozen small ops forward and as many backward nodes, each a pass
over memory. Here a torch.autograd.Function computes the loss and, for reduced losses, its gradient
in the forward (as the kernels do) with a few vectorised ops, and backward only hands the gradient
over (scaled when grad_output is not 1). It runs on CPU tensors in eager mode only:
fastloss.functional routes torch.compile, torch.func transforms and forward-mode AD to the
reference, and a double backward (``create_graph=True``) differentiates the reference again on the
saved operands (ops._utils._differentiable_grads), so every autograd feature keeps torch's results.
The reference stays the oracle: tests/test_lean.py checks these paths against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastloss import reference
from fastloss.ops._utils import _differentiable_grads

__all__ = ["DIFFERENCE_LOSSES", "difference_combination", "sigmoid_focal_loss", "softmax_focal_loss"]

#: Below this probability (2**-100 in float32), log(p_t) of a softmax probability has lost
#: precision to subnormal rounding or underflowed to -inf: such calls take log p_t exactly as
#: x_t - logsumexp(x) instead.
_TINY_PROB = {torch.float32: 2.0**-100, torch.float64: 2.0**-1000}


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
    """
    p = torch.softmax(x, 1)
    p_t = p.gather(1, t2)
    log_p = p_t.log()
    if p_t.min().item() < _TINY_PROB[x.dtype]:  # CPU only: a host read is free here
        log_p = x.gather(1, t2) - torch.logsumexp(x, 1, keepdim=True)
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
    return loss, p.scatter_(1, t2, nq).mul_(k)


class _SoftmaxFocal(torch.autograd.Function):
    """Softmax focal loss, reduced ("mean" or "sum"), of (N, C) CPU logits, N > 0."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
        scale = 1.0 / input.shape[0] if reduction == "mean" else 1.0
        t2 = target.unsqueeze(1)
        loss, grad = _focal_terms(input, t2, alpha, gamma, scale, ctx.needs_input_grad[0])
        ctx.save_for_backward(input, target)
        ctx.args = (alpha, gamma, reduction, scale)
        ctx.grads = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference again
            return _differentiable_grads(ctx, grad_loss, _focal_reference)
        grad, ctx.grads = ctx.grads, None
        if grad is None:  # a second backward (retain_graph=True): the first one took the buffer
            input, target = ctx.saved_tensors
            alpha, gamma, _, scale = ctx.args
            _, grad = _focal_terms(input.detach(), target.unsqueeze(1), alpha, gamma, scale, True)
        if grad_loss.item() != 1.0:  # CPU: the common loss.backward() skips a pass
            grad.mul_(grad_loss)
        return grad, None, None, None, None


def _focal_reference(ctx) -> tuple[Tensor, tuple]:
    input, target = ctx.saved_tensors
    alpha, gamma, reduction, _ = ctx.args
    return reference.focal_loss(input, target, alpha, gamma, reduction), (input, target, None, None, None)


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
    m**(gamma-1) is finite at m = 0.
    """
    p = torch.sigmoid(x)
    p_neg = torch.sigmoid(-x)
    m = torch.lerp(p, p_neg, y)  # exact at y = 0 and y = 1
    ce = torch.binary_cross_entropy_with_logits(x, y, None, None, 0)
    m_gamma = m * m if gamma == 2.0 else m if gamma == 1.0 else m.pow(gamma)
    a_t = torch.rsub(y, 1.0 - alpha, alpha=1.0 - 2.0 * alpha) if alpha >= 0 else None
    loss = m_gamma * ce
    if a_t is not None:
        loss.mul_(a_t)
    if reduction != "none":
        loss = loss.mean() if reduction == "mean" else loss.sum()
    if not grad:
        return loss, None
    # gamma m**(gamma-1) p (1 - p)(1 - 2y) ce
    focus = torch.rsub(y, 1.0, alpha=2.0).mul_(p_neg).mul_(ce)
    if gamma != 1.0:
        focus.mul_(m if gamma == 2.0 else m.pow(gamma - 1.0))
    g = torch.sub(p, y).mul_(m_gamma).add_(focus.mul_(p), alpha=gamma)
    if a_t is not None:
        g.mul_(a_t)
    if reduction == "mean" and x.numel():
        g.mul_(1.0 / x.numel())
    return loss, g


class _SigmoidFocal(torch.autograd.Function):
    """torchvision's sigmoid focal loss of CPU logits and targets of one shape and one float32 /
    float64 dtype, gamma >= 1, targets without a gradient."""

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
        loss, grad = _sigmoid_focal_terms(input, target, alpha, gamma, reduction, ctx.needs_input_grad[0])
        ctx.save_for_backward(input, target)
        ctx.args = (alpha, gamma, reduction)
        ctx.grads = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference again
            return _differentiable_grads(ctx, grad_loss, _sigmoid_focal_reference)
        grad, ctx.grads = ctx.grads, None
        alpha, gamma, reduction = ctx.args
        if grad is None:  # a second backward (retain_graph=True): the first one took the buffer
            input, target = ctx.saved_tensors
            _, grad = _sigmoid_focal_terms(input.detach(), target, alpha, gamma, reduction, True)
        # (reduced: a host read is free on CPU, and the common loss.backward() skips a pass)
        if reduction == "none" or grad_loss.item() != 1.0:
            grad.mul_(grad_loss)
        return grad, None, None, None, None


def _sigmoid_focal_reference(ctx) -> tuple[Tensor, tuple]:
    input, target = ctx.saved_tensors
    alpha, gamma, reduction = ctx.args
    return (reference.sigmoid_focal_loss(input, target, alpha, gamma, reduction),
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


def _combination_terms(input: Tensor, target: Tensor, members: tuple, scale: float, grad: bool
                       ) -> tuple[Tensor, Tensor | None]:
    """``scale * sum_k coef_k sum_i loss_k(d_i)``, d = input - target, and its gradient with respect
    to input when ``grad``, for members (name, coef, param1, param2) of DIFFERENCE_LOSSES.

    mse: d**2, gradient 2d. l1: |d|, gradient sign(d). huber (delta): with c = clamp(d, -delta,
    delta), c (d - c/2) (d**2 / 2 inside, delta (|d| - delta/2) outside), gradient c. smooth_l1
    (beta > 0): huber(beta) / beta.
    """
    d = torch.sub(input, target).reshape(-1)
    loss = g = None
    for name, coef, param, _ in members:
        c = coef * scale
        if name == "mse":
            term, dterm, dcoef = torch.dot(d, d), d, 2.0 * c
        elif name == "l1":
            term, dterm, dcoef = torch.linalg.vector_norm(d, 1), (torch.sign(d) if grad else None), c
        else:
            if name == "smooth_l1":
                c = c / param
            clamped = d.clamp(-param, param)
            term = torch.dot(clamped, d).sub_(torch.dot(clamped, clamped), alpha=0.5)
            dterm, dcoef = clamped, c
        loss = term * c if loss is None else loss.add_(term, alpha=c)
        if grad:
            g = dterm * dcoef if g is None else g.add_(dterm, alpha=dcoef)
    return loss, (g.reshape(input.shape) if grad else None)


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
        ctx.args = (members, reduction, scale)
        ctx.grads = grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference again
            return _differentiable_grads(ctx, grad_loss, _combination_reference)
        grad, ctx.grads = ctx.grads, None
        members, _, scale = ctx.args
        if grad is None:  # a second backward (retain_graph=True): the first one took the buffer
            input, target = ctx.saved_tensors
            _, grad = _combination_terms(input.detach(), target.detach(), members, scale, True)
        if grad_loss.item() != 1.0:  # CPU: the common loss.backward() skips a pass
            grad.mul_(grad_loss)
        need_input, need_target = ctx.needs_input_grad[:2]
        grad_target = grad.neg() if need_target else None
        return (grad if need_input else None), grad_target, None, None


def _combination_reference(ctx) -> tuple[Tensor, tuple]:
    input, target = ctx.saved_tensors
    members, reduction, _ = ctx.args
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
