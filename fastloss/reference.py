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
    "cross_entropy",
    "focal_loss",
]

_HALF = (torch.float16, torch.bfloat16)


def _upcast(*tensors: Tensor | None) -> list[Tensor | None]:
    return [t.float() if t is not None and t.dtype in _HALF else t for t in tensors]


def _reduce(loss: Tensor, reduction: str, dtype: torch.dtype, weight: Tensor | None = None) -> Tensor:
    """Apply the reduction; ``weight`` (when given) makes "mean" sum(w l) / sum(w), as torch.nn's
    weighted mse/l1 (the sum of the weight itself, not of its broadcast)."""
    if reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    elif weight is not None:
        out = loss.sum() / weight.sum()
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
    # unlike mse/l1, torch.nn's weighted huber "mean" is the plain mean of the weighted loss
    return _reduce(loss if w is None else loss * w, reduction, input.dtype)


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
    # 1 - p_t, written without the cancellation that rounds it to 0 for large |x| and hard targets
    m = p * (1.0 - y) + torch.sigmoid(-x) * y
    # m ** gamma as exp(gamma log m): its gradient gamma m^gamma / m stays finite for tiny m, where
    # autograd's gamma m^(gamma-1) overflows (gamma < 1); masked at m = 0, where dm/dx = ce = 0.
    pos = m > 0
    m_gamma = torch.exp(gamma * torch.log(torch.where(pos, m, 1.0)))
    loss = ce * torch.where(pos, m_gamma, 0.0 if gamma > 0 else 1.0)
    if alpha >= 0:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return _reduce(loss, reduction, inputs.dtype)


def _class_dim(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def _softcapped(x: Tensor, softcap: float | None) -> Tensor:
    """Gemma 2's logit soft-capping: softcap * tanh(x / softcap)."""
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def _target_weight(target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """weight[target] (1 without weight) for each row, 0 where target == ignore_index."""
    valid = target != ignore_index
    if weight is None:
        return valid.to(dtype)
    w = weight.to(dtype)[torch.where(valid, target, 0).long()]
    return torch.where(valid, w, 0.0)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> Tensor:
    """torch.nn.functional.cross_entropy on ``softcap * tanh(input / softcap)`` (when softcap is
    set), plus ``z_loss * w_t * lse**2`` per row (w_t = weight[target], 1 without weight, 0 on
    ignored rows; 1 for probability targets), lse the log-sum-exp of the row. "mean" divides both
    terms by torch's denominator: the sum of w_t (class indices) or the number of rows
    (probabilities). Input (C,), (N, C) or (N, C, d1, ...), class dimension 1."""
    x, w = _upcast(input, weight)
    x = _softcapped(x, softcap)
    if w is not None:
        w = w.to(x.dtype)
    if target.is_floating_point():
        target = target.to(x.dtype)
    if z_loss == 0.0:
        out = torch.nn.functional.cross_entropy(
            x, target, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
        return out.to(input.dtype)
    ce = torch.nn.functional.cross_entropy(
        x, target, w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    lse = torch.logsumexp(x, dim=_class_dim(x))
    if target.is_floating_point():
        w_t = torch.ones_like(lse)
    else:
        w_t = _target_weight(target, w, ignore_index, x.dtype)
    loss = ce + z_loss * w_t * lse * lse
    if reduction == "mean":
        return (loss.sum() / w_t.sum()).to(input.dtype)
    return _reduce(loss, reduction, input.dtype)


def focal_loss(
    input: Tensor,
    target: Tensor,
    alpha: float | Tensor = 1.0,
    gamma: float = 2.0,
    reduction: str = "mean",
    weight: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Softmax focal loss (Lin et al., 2017) on class-index targets:
    ``-alpha_t * w_t * (1 - p_t)**gamma * log(p_t)``, alpha_t = alpha (or alpha[target] for a
    per-class tensor), w_t = weight[target] (1 without weight), 0 on rows whose target is
    ignore_index. "mean" divides by the sum of w_t (the number of non-ignored rows without
    weight), as cross_entropy does, so alpha=1, gamma=0 is exactly cross_entropy."""
    x, w, a = _upcast(input, weight, alpha if isinstance(alpha, Tensor) else None)
    dim = _class_dim(x)
    valid = target != ignore_index
    safe = torch.where(valid, target, 0).long()
    logp_t = torch.log_softmax(x, dim).gather(dim, safe.unsqueeze(dim)).squeeze(dim)
    # 1 - p_t without cancellation; clamped so that d(q**gamma)/dq stays finite for 0 < gamma < 1
    # (its factor dq/dlogits vanishes there, so the clamp changes nothing but 0 * inf)
    q = (-torch.expm1(logp_t)).clamp_min(torch.finfo(x.dtype).tiny)
    a_t = alpha if a is None else a.to(x.dtype)[safe]
    loss = -a_t * q**gamma * logp_t
    w_t = _target_weight(target, w, ignore_index, x.dtype)
    loss = torch.where(valid, loss * w_t, 0.0)
    if reduction == "mean":
        return (loss.sum() / w_t.sum()).to(input.dtype)
    return _reduce(loss, reduction, input.dtype)


# --------------------------------------------------------------------------------------------
# Embedding losses: contrastive, triplet margin, InfoNCE
# --------------------------------------------------------------------------------------------

def contrastive_loss(
    output1: Tensor, output2: Tensor, label: Tensor, margin: float = 2.0, reduction: str = "mean"
) -> Tensor:
    """Contrastive loss of pairs of rows: ``(1 - y) d^2 + y clamp(margin - d, min=0)^2`` with
    ``d = pairwise_distance(output1, output2)`` (``||x1 - x2 + 1e-6||``) and label y (1 =
    dissimilar). ``label`` has one value per row (shape ``output1.shape[:-1]``)."""
    x1, x2, y = _upcast(output1, output2, label)
    d = torch.nn.functional.pairwise_distance(x1, x2)
    loss = (1 - y) * d.pow(2) + y * torch.clamp(margin - d, min=0.0).pow(2)
    return _reduce(loss, reduction, output1.dtype)
