"""Pure-PyTorch implementation of every fastloss loss: the CPU fallback and the test oracle.

Each function takes validated, broadcast operands of one floating dtype (``fastloss.functional``
validates) and relies on autograd for its gradients, so the kernels' hand-written gradients are
checked against an independent derivation. Where torch.nn has the loss, the reference calls it (the
same numbers and CPU speed as torch.nn by construction); losses torch lacks are written out as
formulas. Half-precision operands are computed in float32 and the result is rounded once to the
operand dtype, which is never less accurate than torch.nn in that dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "binary_cross_entropy_with_logits",
    "contrastive_loss",
    "cross_entropy",
    "focal_loss",
    "huber_loss",
    "info_nce",
    "info_nce_rows",
    "kl_div",
    "l1_loss",
    "linear_cross_entropy",
    "mse_loss",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "triplet_margin_loss",
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
    """softplus(-x) = -log(sigmoid(x)), stable for any x, with the exact gradient -sigmoid(-x)
    everywhere (max(-x, 0) + log1p(exp(-|x|)) is the same value, but autograd's subgradients of
    max and |x| at x = 0 give -1 there instead of -1/2). The threshold keeps exp finite in float32;
    past it the log1p term is under 2e-22 of the result."""
    return F.softplus(-x, beta=1.0, threshold=50.0)


def _weighted_dtype(input: Tensor, weight: Tensor) -> torch.dtype:
    """torch.nn's weighted losses multiply by the weight, so its dtype promotes the result's."""
    return torch.promote_types(input.dtype, weight.dtype)


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Mean squared error: (input - target)^2, optionally weighted (weighted mean for "mean").
    Integer and complex operands run torch.nn.functional.mse_loss itself (results and errors)."""
    if not (input.is_floating_point() and target.is_floating_point()):
        return F.mse_loss(input, target, reduction=reduction, weight=weight)
    x, y, w = _upcast(input, target, weight)
    if w is None:
        return F.mse_loss(x, y, reduction=reduction).to(input.dtype)
    loss = (x - y) ** 2
    return _reduce(loss * w, reduction, _weighted_dtype(input, weight), w)


def l1_loss(input: Tensor, target: Tensor, reduction: str = "mean", weight: Tensor | None = None) -> Tensor:
    """Mean absolute error: |input - target|, optionally weighted. Complex operands (a real loss)
    and integer ones run torch.nn.functional.l1_loss itself, with its results and errors."""
    if not (input.is_floating_point() and target.is_floating_point()):
        return F.l1_loss(input, target, reduction=reduction, weight=weight)
    x, y, w = _upcast(input, target, weight)
    if w is None:
        return F.l1_loss(x, y, reduction=reduction).to(input.dtype)
    loss = (x - y).abs()
    return _reduce(loss * w, reduction, _weighted_dtype(input, weight), w)


def huber_loss(
    input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0, weight: Tensor | None = None
) -> Tensor:
    """Huber loss: d^2/2 where |d| < delta, delta (|d| - delta/2) elsewhere; d = input - target."""
    x, y, w = _upcast(input, target, weight)
    if w is None:
        return F.huber_loss(x, y, reduction=reduction, delta=delta).to(input.dtype)
    # torch.nn's weighted form (so the gradient at an infinite d is delta w, as torch's); unlike
    # mse/l1, its "mean" is the plain mean of the weighted loss
    loss = F.huber_loss(x, y, reduction="none", delta=delta) * w
    return _reduce(loss, reduction, _weighted_dtype(input, weight))


def smooth_l1_loss(input: Tensor, target: Tensor, reduction: str = "mean", beta: float = 1.0) -> Tensor:
    """Smooth L1: d^2 / (2 beta) where |d| < beta, |d| - beta/2 elsewhere; plain L1 when beta = 0."""
    x, y = _upcast(input, target)
    return F.smooth_l1_loss(x, y, reduction=reduction, beta=beta).to(input.dtype)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy on logits: (1 - y) x + (1 + (pw - 1) y) softplus(-x), times weight."""
    x, y, w, pw = _upcast(input, target, weight, pos_weight)
    return F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw).to(input.dtype)


def sigmoid_focal_loss(
    inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none"
) -> Tensor:
    """torchvision.ops.sigmoid_focal_loss: a_t (1 - p_t)^gamma bce(x, y); alpha < 0 means a_t = 1."""
    x, y = _upcast(inputs, targets)
    p = torch.sigmoid(x)
    ce = (1.0 - y) * x + _softplus_neg(x)
    # 1 - p_t, written without the cancellation that rounds it to 0 for large |x| and hard targets
    m = p * (1.0 - y) + torch.sigmoid(-x) * y
    if gamma == 0:  # m ** 0 = 1 with gradient 0 (torch.pow's), even where ce is infinite
        loss = ce
    elif gamma == 1:
        loss = ce * m
    else:
        # m ** gamma for m > 0 as exp(gamma log m): its gradient gamma m^gamma / m stays finite for
        # tiny m, where autograd's gamma m^(gamma-1) overflows (gamma < 1). A negative m (targets
        # outside [0, 1]) is torch.pow's, NaN unless gamma is an integer; a NaN m stays NaN, so
        # that its NaN reaches the gradients. At m = 0, where dm/dx = ce = 0 for targets in
        # [0, 1], it is 0 * m: the gradient ce * 0, not torch.pow's inf * 0 = NaN for gamma < 1
        # (NaN only where ce is, as at x = -inf).
        pos, zero = m > 0, m == 0
        m_gamma = torch.where(pos, torch.exp(gamma * torch.log(torch.where(pos, m, 1.0))),
                              torch.where(pos | zero, 1.0, m) ** gamma)
        loss = ce * torch.where(zero, 0.0 * m, m_gamma)
    if alpha >= 0:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return _reduce(loss, reduction, inputs.dtype)


_KL_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2, "batchmean": 2}  # torch's enum; batchmean sums


def kl_div(input: Tensor, target: Tensor, reduction: str = "mean", log_target: bool = False) -> Tensor:
    """torch.nn.functional.kl_div (without its warning for "mean"): xlogy(y, y) - y x, or
    exp(y) (y - x) with ``log_target``; "batchmean" is the sum divided by input.size(0) (the size
    before broadcasting; no division for a 0-dim input). Operands may broadcast, as torch.kl_div's."""
    x, y = _upcast(input, target)
    loss = torch.kl_div(x, y, _KL_REDUCTIONS[reduction], log_target=log_target)
    if reduction == "batchmean" and input.dim() != 0:
        loss = loss / input.size(0)
    return loss.to(torch.promote_types(input.dtype, target.dtype))


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
    set), plus ``z_loss * w_t * lse**2`` per row (w_t = weight[target], 1 without weight; 1 for
    probability targets; ignored rows add 0), lse the log-sum-exp of the row. "mean" divides both
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
        z = z_loss * lse * lse
    else:
        target = target.reshape(lse.shape)  # a (1,) target of a (C,) input (ce keeps torch's shape)
        w_t = _target_weight(target, w, ignore_index, x.dtype)
        # ignored rows add 0 whatever their logits (w_t lse^2 would be 0 * inf = NaN for inf logits)
        z = torch.where(target != ignore_index, z_loss * w_t * lse * lse, 0.0)
    loss = ce + z
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
    if dim == 0:
        target = target.reshape(())  # torch allows a (1,) target for a (C,) input
    valid = target != ignore_index
    safe = torch.where(valid, target, 0).long()
    logp_t = torch.log_softmax(x, dim).gather(dim, safe.unsqueeze(dim)).squeeze(dim)
    # q = 1 - p_t, and its derivative -p_t, without cancellation: -expm1(log p_t) where p_t >= 1/2
    # (autograd's derivative there, -(expm1 + 1), cancels for p_t -> 0), 1 - exp(log p_t) where
    # p_t < 1/2 (exact enough there, derivative -exp(log p_t)). Clamped so that d(q**gamma)/dq stays
    # finite for 0 < gamma < 1 (its factor dq/dlogits vanishes there, so the clamp changes nothing
    # but 0 * inf)
    q = torch.where(logp_t >= -math.log(2.0), -torch.expm1(logp_t), 1.0 - torch.exp(logp_t))
    q = q.clamp_min(torch.finfo(x.dtype).tiny)
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


def _distance_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    """dtype of torch's ``pairwise_distance(x, y)`` = ``norm(x - y + eps)``: integers become the
    default floating dtype (adding the float eps), complex numbers their real dtype (the norm)."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    if dtype.is_complex:
        return dtype.to_real()
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def triplet_margin_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 1.0,
    p: float = 2.0,
    eps: float = 1e-6,
    swap: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """torch.nn.functional.triplet_margin_loss: ``clamp_min(margin + d(a, p) - d_neg, 0)`` with
    ``d = pairwise_distance(., ., p, eps)`` and ``d_neg = d(a, n)``, or ``min(d(a, n), d(p, n))``
    with ``swap``. Integer or complex operands (fastloss.functional passes them here as they are) give
    torch's floating / real result dtype."""
    out_dtype = torch.promote_types(_distance_dtype(anchor, positive), _distance_dtype(anchor, negative))
    if swap:
        out_dtype = torch.promote_types(out_dtype, _distance_dtype(positive, negative))
    a, pos, neg = _upcast(anchor, positive, negative)
    dist = torch.nn.functional.pairwise_distance
    d_pos = dist(a, pos, p, eps)
    d_neg = dist(a, neg, p, eps)
    if swap:
        d_neg = torch.minimum(d_neg, dist(pos, neg, p, eps))
    loss = torch.clamp_min(margin + d_pos - d_neg, 0)
    return _reduce(loss, reduction, out_dtype)


#: Score-matrix elements the InfoNCE reference holds at once (16 MiB of float32): rows of the query
#: are processed in chunks of ``INFO_NCE_CHUNK_ELEMENTS // n_keys`` rows.
INFO_NCE_CHUNK_ELEMENTS = 1 << 22


def info_nce_rows(query: Tensor, key: Tensor, scale: float = 1.0, offset: int = 0) -> Tensor:
    """Per-row InfoNCE losses ``logsumexp_j(s_ij) - s_{i, i + offset}``, ``s = scale * query @ key.T``.

    Row i of ``query`` (M, D) is scored against every row of ``key`` (N, D); its positive is key row
    ``i + offset``. The (M, N) scores are never held at once: chunks of query rows are scored one
    after the other and, when gradients are needed, each chunk runs under activation checkpointing
    (its scores recomputed in backward), so peak memory is O(N * chunk + (M + N) * D). Returns
    float32 (float64 for float64 operands); gradients come from autograd.
    """
    q, k = _upcast(query, key)
    n_rows, n_cols = q.shape[0], k.shape[0]
    chunk = max(1, INFO_NCE_CHUNK_ELEMENTS // max(n_cols, 1))

    def rows(qc: Tensor, k: Tensor, start: int) -> Tensor:
        s = (qc @ k.T) * scale
        return torch.logsumexp(s, dim=1) - s.narrow(1, start + offset, qc.shape[0]).diagonal()

    if n_rows <= chunk:
        return rows(q, k, 0)
    from torch.utils.checkpoint import checkpoint

    recompute = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    parts = []
    for start in range(0, n_rows, chunk):
        qc = q[start:start + chunk]
        if recompute:
            parts.append(checkpoint(rows, qc, k, start, use_reentrant=False))
        else:
            parts.append(rows(qc, k, start))
    return torch.cat(parts)


def info_nce(
    query: Tensor,
    key: Tensor,
    temperature: float | Tensor = 0.07,
    reduction: str = "mean",
    symmetric: bool = False,
    normalize: bool = True,
) -> Tensor:
    """InfoNCE: row i of ``key`` is the positive of row i of ``query``, every other row a negative;
    per row ``cross_entropy(q @ k.T / temperature, arange(B))`` (rows L2-normalised first when
    ``normalize``). ``symmetric`` averages it with the key -> query direction, per row, before the
    reduction (CLIP). Chunked: see info_nce_rows."""
    q, k = _upcast(query, key)
    if normalize:
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    scale = 1.0
    if isinstance(temperature, Tensor):
        q = q / temperature
    else:
        scale = 1.0 / temperature
    loss = info_nce_rows(q, k, scale)
    if symmetric:
        loss = 0.5 * (loss + info_nce_rows(k, q, scale))
    return _reduce(loss, reduction, query.dtype)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: Tensor | None = None,
) -> Tensor:
    """``cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` (this module's
    cross_entropy: z_loss and softcap as there), materialising the logits: the oracle of the
    chunked fastloss.ops.linear_xent. Input ``(..., H)``; ``linear_weight`` (V, H), or
    (V, d1, ..., dK, H) for a K-dimensional loss as torch's; target class indices of the input's
    batch shape (times d1, ..., dK), or probabilities of the logits' shape. ``token_weight`` (the
    shape of the per-token loss) multiplies each token's loss; "mean" then divides by the sum of
    token weight x class weight of the non-ignored tokens (of the token weights, for
    probabilities)."""
    n_features = input.shape[-1]
    n_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    batch = tuple(input.shape[:-1])
    n = math.prod(batch)
    logits = F.linear(input.reshape(n, n_features), linear_weight.reshape(-1, n_features),
                      linear_bias.reshape(-1) if linear_bias is not None else None)
    logits = logits.reshape(n, n_classes, *out_features)
    prob = target.is_floating_point()
    t = target.reshape(n, n_classes, *out_features) if prob else target.reshape(n, *out_features)
    loss_shape = (*batch, *out_features)
    if token_weight is None:
        loss = cross_entropy(logits, t, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
        return loss.reshape(loss_shape) if reduction == "none" else loss
    x = logits.float() if logits.dtype in _HALF else logits
    tw = token_weight.reshape(n, *out_features).to(x.dtype)
    loss = cross_entropy(x, t, weight, ignore_index, "none", label_smoothing, z_loss, softcap) * tw
    if reduction == "none":
        return loss.reshape(loss_shape).to(input.dtype)
    if reduction == "sum":
        return loss.sum().to(input.dtype)
    w_t = tw if prob else tw * _target_weight(t, weight, ignore_index, x.dtype)
    return (loss.sum() / w_t.sum()).to(input.dtype)

