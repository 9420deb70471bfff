"""Pure-PyTorch implementation of every fastloss loss: the CPU fallback and the test oracle.

Each function takes validated, broadcast operands of one floating dtype (``fastloss.functional``
validates) and relies on autograd for its gradients, so the kernels' hand-written gradients are
checked against an independent derivation. Half-precision operands are computed in float32 and the
result is rounded once to the operand dtype, which is never less accurate than torch.nn.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "mse_loss",
    "l1_loss",
    "huber_loss",
    "smooth_l1_loss",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
]

_HALF = (torch.float16, torch.bfloat16)


def _upcast(*tensors: Tensor | None) -> list[Tensor | None]:
    return [t.float() if t is not None and t.dtype in _HALF else t for t in tensors]


def _reduce(loss: Tensor, reduction: str, dtype: torch.dtype, weight: Tensor | None = None) -> Tensor:
    """Apply the reduction; ``weight`` (when given) makes "mean" the weighted mean sum(w l) / sum(w)."""
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    elif weight is not None:
        out = loss.sum() / weight.expand_as(loss).sum()
    else:
        out = loss.mean()
    return out.to(dtype)


def _softplus_neg(x: Tensor) -> Tensor:
    """softplus(-x) = -log(sigmoid(x)), stable for any x."""
    return (-x).clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Mean squared error: (input - target)^2, optionally weighted (weighted mean for "mean")."""
    x, y, w = _upcast(input, target, weight)
    loss = (x - y) ** 2
    return _reduce(loss if w is None else loss * w, reduction, input.dtype, w)


def l1_loss(input: Tensor, target: Tensor, reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Mean absolute error: |input - target|, optionally weighted."""
    x, y, w = _upcast(input, target, weight)
    loss = (x - y).abs()
    return _reduce(loss if w is None else loss * w, reduction, input.dtype, w)


def huber_loss(
    input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0, weight: Tensor | None = None
) -> Tensor:
    """Huber loss: d^2/2 where |d| < delta, delta (|d| - delta/2) elsewhere; d = input - target."""
    x, y, w = _upcast(input, target, weight)
    d = x - y
    a = d.abs()
    loss = torch.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))
    return _reduce(loss if w is None else loss * w, reduction, input.dtype, w)


def smooth_l1_loss(input: Tensor, target: Tensor, reduction: str = "mean", beta: float = 1.0) -> Tensor:
    """Smooth L1: d^2 / (2 beta) where |d| < beta, |d| - beta/2 elsewhere; plain L1 when beta = 0."""
    if beta == 0.0:
        return l1_loss(input, target, reduction)
    x, y = _upcast(input, target)
    d = x - y
    a = d.abs()
    loss = torch.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)
    return _reduce(loss, reduction, input.dtype)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy on logits: (1 - y) x + (1 + (pw - 1) y) softplus(-x), times weight."""
    x, y, w, pw = _upcast(input, target, weight, pos_weight)
    log_weight = 1.0 if pw is None else 1.0 + (pw - 1.0) * y
    loss = (1.0 - y) * x + log_weight * _softplus_neg(x)
    if w is not None:
        loss = loss * w
    return _reduce(loss, reduction, input.dtype)


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """torchvision.ops.sigmoid_focal_loss: a_t (1 - p_t)^gamma bce(x, y); alpha < 0 means a_t = 1."""
    x, y = _upcast(inputs, targets)
    p = torch.sigmoid(x)
    ce = (1.0 - y) * x + _softplus_neg(x)
    p_t = p * y + (1.0 - p) * (1.0 - y)
    loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return _reduce(loss, reduction, inputs.dtype)
