"""torch.nn.functional-style API: validates arguments once and dispatches to the kernels or the
PyTorch reference (see fastloss._backend)."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

from fastloss import _backend, reference
from fastloss._backend import transforms_active, use_triton
from fastloss._validation import (
    _KL_MEAN_WARNING,
    _KL_REDUCTIONS,
    _autocast_to_float32,
    _broadcast,
    _check_bce_operands,
    _check_broadcastable,
    _check_class_operands,
    _check_cross_entropy_targets,
    _check_focal,
    _check_kl_operands,
    _check_linear_xent,
    _check_linear_xent_options,
    _check_sigmoid_focal,
    _check_smooth_l1_beta,
    _check_triplet,
    _check_weight,
    _contrastive_label,
    _cross_entropy_options,
    _floating_dtype,
    _floating_operands,
    _huber_operands,
    _info_nce_temperature,
    _reduction_arg,
    _result_dtype,
    _torch_only,
)
from fastloss.ops import cpu
from fastloss.ops._common import check_targets_cpu as _check_targets_cpu
from fastloss.ops.cpu import sigmoid_focal_loss as cpu_sigmoid_focal_loss
from fastloss.ops.cpu import softmax_focal_loss
from fastloss.ops.embedding import embedding_loss
from fastloss.ops.info_nce import info_nce_loss
from fastloss.ops.linear_xent import linear_xent_loss
from fastloss.ops.pointwise import pointwise_loss
from fastloss.ops.softmax import softmax_loss

__all__ = [
    "binary_cross_entropy_with_logits",
    "contrastive_loss",
    "cross_entropy",
    "focal_loss",
    "huber_loss",
    "info_nce",
    "kl_div",
    "l1_loss",
    "linear_cross_entropy",
    "mse_loss",
    "sigmoid_focal_loss",
    "smooth_l1_loss",
    "triplet_margin_loss",
]

# The lean call path. The common case (plain arguments, plain tensors of one shape and one float32 /
# float64 dtype, the PyTorch path selected) is recognised with a few attribute reads and goes
# straight to the ATen op that torch.nn.functional's wrapper calls for those arguments (after the
# checks that wrapper makes, which these reads imply), so the call costs no more host work than
# torch.nn's own: the same numbers, errors and gradients (torch.func, forward-mode AD, double
# backward and torch.compile included: it is torch's op). Half precision keeps the reference, which
# computes in float32; every other case takes the full path below.
_LEAN_DTYPES = (torch.float32, torch.float64)
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # torch.nn._reduction.get_enum's values
_INT64 = torch.int64
#: What the lean checks return for the common case when the kernels are selected: the launcher then
#: runs at once, without the conversions, broadcast and checks of the full path.
_KERNELS = -1
_has_torch_function = torch.overrides.has_torch_function_variadic


def _lean_route(input: Tensor, target: Tensor, reduction: object, family: str) -> int | None:
    """For operands the lean checks accepted: _KERNELS when the kernels are selected for them (a
    loss of ``family``), else the reduction's enum (None for an invalid reduction: the full path
    raises torch's error). Off CUDA, while "triton" was never selected (the common case), that is
    the enum without a backend lookup (see fastloss._backend._triton_selected)."""
    enum = _REDUCTION_ENUM.get(reduction) if isinstance(reduction, str) else None
    if enum is None or (not _backend._triton_selected and not input.is_cuda):
        return enum
    return _KERNELS if use_triton(input, target, family=family) else enum


def _lean(input: Tensor, target: Tensor, reduction: str) -> int | None:
    """For a pointwise loss in the common case (both plain Tensors, no __torch_function__, of one shape
    and one float32 / float64 dtype, a valid reduction): the reduction's enum when the PyTorch path
    is selected for them, _KERNELS when the kernels are; else None (the full path)."""
    if (
        isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dtype is target.dtype
        and input.dtype in _LEAN_DTYPES
        and input.shape == target.shape
        and not _has_torch_function(input, target)
    ):
        return _lean_route(input, target, reduction, "pointwise")
    return None


def mse_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Mean squared error, as torch.nn.functional.mse_loss.

    ``weight`` (same size as input) scales each element; "mean" is then sum(w * l) / sum(w).
    Weighted calls run the PyTorch reference. Integer (and complex) operands run torch's mse_loss,
    with its results and errors (an integer error times a floating weight is a floating loss).
    """
    if (weight is None and size_average is None and reduce is None
            and (enum := _lean(input, target, reduction)) is not None):
        if enum == _KERNELS:
            return pointwise_loss("mse", input, target, reduction=reduction)
        return torch._C._nn.mse_loss(input, target, enum)
    reduction = _reduction_arg(size_average, reduce, reduction)
    if _torch_only(input, target):
        _check_weight(weight, input)
        input, target = _broadcast(input, target)
        return reference.mse_loss(input, target, reduction, weight)
    input, target = _floating_operands("mse_loss", input, target)
    _check_weight(weight, input)
    input, target = _broadcast(input, target)
    if weight is None and use_triton(input, target, family="pointwise"):
        return pointwise_loss("mse", input, target, reduction=reduction)
    return reference.mse_loss(input, target, reduction, weight)


def l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    weight: Tensor | None = None,
) -> Tensor:
    """Mean absolute error, as torch.nn.functional.l1_loss (weighted calls run the reference).

    Complex operands give torch's real loss ``|input - target|``, and integer operands torch's own
    results and errors: both run torch's l1_loss.
    """
    if (weight is None and size_average is None and reduce is None
            and (enum := _lean(input, target, reduction)) is not None):
        if enum == _KERNELS:
            return pointwise_loss("l1", input, target, reduction=reduction)
        return torch._C._nn.l1_loss(input, target, enum)
    reduction = _reduction_arg(size_average, reduce, reduction)
    if _torch_only(input, target):
        _check_weight(weight, input)
        input, target = _broadcast(input, target)
        return reference.l1_loss(input, target, reduction, weight)
    input, target = _floating_operands("l1_loss", input, target)
    _check_weight(weight, input)
    input, target = _broadcast(input, target)
    if weight is None and use_triton(input, target, family="pointwise"):
        return pointwise_loss("l1", input, target, reduction=reduction)
    return reference.l1_loss(input, target, reduction, weight)


def _kl_kernels(input: Tensor, target: Tensor, reduction: str, log_target: bool, batch: int) -> Tensor:
    """kl_div on the kernels for validated, broadcast operands of one floating dtype: "batchmean"
    (``batch`` != 1) is the ``reduction`` scaled by 1 / batch inside the kernels."""
    return pointwise_loss("kl_div", input, target, param1=1.0 if log_target else 0.0,
                          reduction="sum" if reduction == "batchmean" else reduction, coef=1.0 / batch)


def _kl_div_lean(input: Tensor, target: Tensor, reduction: str, log_target: bool) -> Tensor | None:
    """kl_div without legacy arguments in the lean case (see _lean), else None. (torch's "mean"
    warning is the caller's.)"""
    if (enum := _lean(input, target, "sum" if reduction == "batchmean" else reduction)) is None:
        return None
    batch = input.size(0) if reduction == "batchmean" and input.dim() != 0 else 1
    if enum != _KERNELS:
        loss = torch.kl_div(input, target, enum, log_target=log_target)
        return loss / batch if batch != 1 else loss
    return _kl_kernels(input, target, reduction, log_target, batch) if batch else None


def kl_div(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    log_target: bool = False,
) -> Tensor:
    """Kullback-Leibler divergence, as torch.nn.functional.kl_div: ``input`` holds log-probabilities,
    ``target`` probabilities (log-probabilities with ``log_target``).

    "batchmean" divides the sum by input.size(0) (not for a 0-dim input); "mean" divides by the
    number of elements and warns as torch does. Operands broadcast (without a warning) and promote
    like torch.kl_div's; integer and complex operands raise its RuntimeError. The legacy
    size_average/reduce arguments override ``reduction``, except that "batchmean" still divides.
    """
    legacy = size_average is not None or reduce is not None
    if not legacy and reduction == "mean":
        warnings.warn(_KL_MEAN_WARNING, stacklevel=2)
    if not legacy and (loss := _kl_div_lean(input, target, reduction, log_target)) is not None:
        return loss
    applied = _reduction_arg(size_average, reduce, reduction, _KL_REDUCTIONS)
    _check_kl_operands(input, target)
    dtype = _result_dtype(input, target)
    batch = input.size(0) if reduction == "batchmean" and input.dim() != 0 else 1
    y, x = torch.broadcast_tensors(target.to(dtype), input.to(dtype))  # torch's order: its error message
    if batch and use_triton(x, y, family="pointwise"):
        return _kl_kernels(x, y, applied, log_target, batch)
    if applied == "batchmean" or batch == 1:
        return reference.kl_div(input, target, applied, log_target)
    return reference.kl_div(input, target, applied, log_target) / batch  # legacy arguments + "batchmean"


def huber_loss(
    input: Tensor,
    target: Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Huber loss, as torch.nn.functional.huber_loss; ``delta`` must be positive.

    Unlike the other losses, torch.nn's huber_loss returns the input's dtype (computing in the
    promoted one and rounding into it), times the weight's when one is given; fastloss does too.
    """
    if weight is None and delta > 0 and (enum := _lean(input, target, reduction)) is not None:
        if enum == _KERNELS:
            return pointwise_loss("huber", input, target, param1=delta, reduction=reduction)
        return torch._C._nn.huber_loss(input, target, enum, delta)
    reduction = _reduction_arg(None, None, reduction)
    input, target, input_dtype = _huber_operands(input, target, delta)
    _check_weight(weight, input)
    input, target = _broadcast(input, target)
    if weight is None and use_triton(input, target, family="pointwise"):
        loss = pointwise_loss("huber", input, target, param1=delta, reduction=reduction)
    else:
        loss = reference.huber_loss(input, target, reduction, delta, weight)
    return loss.to(input_dtype if weight is None else torch.promote_types(input_dtype, weight.dtype))


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    beta: float = 1.0,
) -> Tensor:
    """Smooth L1 loss, as torch.nn.functional.smooth_l1_loss; ``beta`` = 0 is plain L1."""
    if (size_average is None and reduce is None and beta >= 0
            and (enum := _lean(input, target, reduction)) is not None):
        if enum == _KERNELS:
            if beta == 0:
                return pointwise_loss("l1", input, target, reduction=reduction)
            return pointwise_loss("smooth_l1", input, target, param1=beta, reduction=reduction)
        if beta == 0.0:  # as torch's smooth_l1_loss
            return torch._C._nn.l1_loss(input, target, enum)
        return torch._C._nn.smooth_l1_loss(input, target, enum, beta)
    reduction = _reduction_arg(size_average, reduce, reduction)
    _check_smooth_l1_beta(beta)
    input, target = _floating_operands("smooth_l1_loss", input, target)
    input, target = _broadcast(input, target)
    if use_triton(input, target, family="pointwise"):
        if beta == 0:
            return pointwise_loss("l1", input, target, reduction=reduction)
        return pointwise_loss("smooth_l1", input, target, param1=beta, reduction=reduction)
    return reference.smooth_l1_loss(input, target, reduction, beta)


def _bce_with_logits_lean(input: Tensor, target: Tensor, reduction: str) -> Tensor | None:
    """binary_cross_entropy_with_logits without weights in the lean case (see _lean), else None."""
    if (enum := _lean(input, target, reduction)) is None:
        return None
    if enum == _KERNELS:
        return pointwise_loss("bce_with_logits", input, target, reduction=reduction)
    return torch.binary_cross_entropy_with_logits(input, target, None, None, enum)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Binary cross-entropy on logits, as torch.nn.functional.binary_cross_entropy_with_logits.

    ``weight`` broadcasts to the input and scales each element; ``pos_weight`` (broadcast along the
    last dimension, one value per class) weights the positive term.
    """
    if (weight is None and pos_weight is None and size_average is None and reduce is None
            and (loss := _bce_with_logits_lean(input, target, reduction)) is not None):
        return loss
    reduction = _reduction_arg(size_average, reduce, reduction)
    _check_bce_operands(input, target)
    # torch.nn's result has the target's dtype, also when the input's is wider; fastloss computes
    # in the promoted dtype and rounds once to it
    out_dtype = target.dtype
    input, target = _floating_operands("binary_cross_entropy_with_logits", input, target)
    _check_broadcastable("weight", weight, input)
    _check_broadcastable("pos_weight", pos_weight, input)
    if use_triton(input, target, weight, pos_weight, family="pointwise"):
        loss = pointwise_loss("bce_with_logits", input, target, weight, pos_weight, reduction=reduction)
    else:
        loss = reference.binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)
    return loss.to(out_dtype)


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Sigmoid focal loss (Lin et al., 2017), exactly torchvision.ops.sigmoid_focal_loss.

    ``alpha_t (1 - p_t)^gamma * bce_with_logits(inputs, targets)``, where ``p_t`` is the probability
    of the target and ``alpha_t = alpha`` for positives, ``1 - alpha`` for negatives; ``alpha = -1``
    disables the weighting; any other alpha outside [0, 1] raises ValueError, as torchvision's.
    Note torchvision's default ``reduction="none"``.
    """
    _check_sigmoid_focal(inputs, targets, alpha, gamma, reduction)
    inputs, targets = _floating_operands("sigmoid_focal_loss", inputs, targets)
    if use_triton(inputs, targets):
        return pointwise_loss("sigmoid_focal", inputs, targets, param1=alpha, param2=gamma,
                              reduction=reduction)
    if (gamma >= 1.0 and inputs.dtype in _LEAN_DTYPES and inputs.is_cpu and targets.is_cpu
            and not _grad_wanted(targets) and not torch.compiler.is_compiling() and not transforms_active()
            and not torch.is_autocast_enabled("cpu") and not _has_torch_function(inputs, targets)):
        # the fused CPU path (analytic gradient made in the forward; fastloss.ops.cpu)
        return cpu_sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)
    return reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)


def _lean_class_indices(input: Tensor, target: Tensor, reduction: str) -> int | None:
    """For a loss over classes in the common case ((N, C) float32 / float64 logits and (N,) int64
    class indices, plain Tensors without __torch_function__, a valid reduction): the reduction's
    enum when the PyTorch path is selected for them, _KERNELS when the kernels are (the caller
    still checks N and C for those); else None (the full path)."""
    if (
        isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dtype in _LEAN_DTYPES
        and target.dtype is _INT64
        and isinstance(reduction, str)
        and input.dim() == 2
        and target.dim() == 1  # (a batch mismatch raises torch's ValueError, the full path's)
        and not _has_torch_function(input, target)
    ):
        return _lean_route(input, target, reduction, "softmax")
    return None


def _grad_wanted(t: Tensor | None) -> bool:
    return isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled()


def _cross_entropy_lean(input: Tensor, target: Tensor, ignore_index: int, reduction: str,
                        label_smoothing: float, inplace_backward: bool) -> Tensor | None:
    """cross_entropy without weight, legacy arguments, z_loss or softcap in the lean case (see
    _lean_class_indices; label_smoothing in [0, 1]), else None."""
    if not 0.0 <= label_smoothing <= 1.0 or (enum := _lean_class_indices(input, target, reduction)) is None:
        return None
    if enum != _KERNELS:
        return torch._C._nn.cross_entropy_loss(input, target, None, enum, ignore_index, label_smoothing)
    if input.shape[1] > 0 and input.shape[0] == target.shape[0]:
        return softmax_loss("cross_entropy", input, target, None, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction=reduction,
                            inplace_backward=inplace_backward)
    return None


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    inplace_backward: bool = False,
) -> Tensor:
    """Cross-entropy between logits and class indices or class probabilities, as
    torch.nn.functional.cross_entropy (input (C,), (N, C) or (N, C, d1, ...), class dimension 1),
    with keyword-only extensions:

    - ``z_loss``: adds ``z_loss * lse**2`` per row (PaLM), lse the row's log-sum-exp; weighted by
      ``weight[target]`` like the cross-entropy term and 0 on ignored rows (whatever their logits),
      so "mean" divides both terms by the same sum of target weights. Liger-Kernel leaves its z
      term unweighted and divides it by the number of non-ignored rows while dividing the
      cross-entropy term by the sum of target weights; fastloss weights both, so that "mean" has
      one denominator and stays torch's weighted average of per-row losses.
    - ``softcap``: logits become ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).
    - ``inplace_backward``: on the Triton path the gradient is written into the logits' own memory
      (saving one logits-sized buffer): the logits tensor is overwritten after the call, so only
      use it when nothing reads the logits afterwards; a second backward through the same graph
      then raises. Ignored under torch.compile and on the PyTorch path.

    On the Triton path the gradient is computed in the forward pass and the "mean" is taken on
    device (no host sync). Out-of-range targets raise IndexError on CPU; on CUDA such rows get a
    NaN loss and gradient instead of an out-of-bounds access.
    """
    if (weight is None and size_average is None and reduce is None and not z_loss and softcap is None
            and (loss := _cross_entropy_lean(input, target, ignore_index, reduction, label_smoothing,
                                             inplace_backward)) is not None):
        return loss
    reduction = _reduction_arg(size_average, reduce, reduction)
    label_smoothing = _cross_entropy_options(label_smoothing, z_loss, softcap)
    prob = _check_class_operands("cross_entropy", input, target, weight, allow_probabilities=True,
                                 reduction=reduction)
    _check_cross_entropy_targets(input, target, prob, label_smoothing, ignore_index)
    if prob and target.dtype != input.dtype:  # torch computes in the promoted dtype
        dtype = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(dtype), target.to(dtype)
    to_float32 = _autocast_to_float32(input)
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if n_classes > 0 and not _grad_wanted(weight) and use_triton(input, target, weight, family="softmax"):
        return softmax_loss(
            "cross_entropy", input, target, weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
            out_float32=to_float32, inplace_backward=inplace_backward,
        )
    if to_float32:
        input = input.float()
    return reference.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                   z_loss, softcap)


def focal_loss(
    input: Tensor,
    target: Tensor,
    alpha: float | Tensor = 1.0,
    gamma: float = 2.0,
    reduction: str = "mean",
    weight: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Multi-class softmax focal loss (Lin et al., 2017): ``-alpha_t (1 - p_t)**gamma log(p_t)``
    per sample, ``p_t`` the softmax probability of the target class.

    Same input shapes and class-index targets as :func:`cross_entropy`. ``alpha`` is a float or a
    per-class tensor (``alpha_t = alpha[target]``); ``gamma >= 0`` (0 is cross-entropy). ``weight``
    is a per-class weight multiplying each sample's loss, as cross-entropy's; "mean" divides by the
    sum of ``weight[target]`` over non-ignored samples (their number without weight), so
    ``alpha=1, gamma=0`` gives exactly :func:`cross_entropy` with the same weight and
    ignore_index. Without weight or ignored targets this equals the classic composition
    ``ce = cross_entropy(x, t, reduction="none"); (alpha * (1 - exp(-ce))**gamma * ce).mean()``.
    The gradient is analytic and finite as ``p_t -> 1`` for every ``gamma >= 0``.
    """
    if (weight is None and isinstance(alpha, float) and gamma >= 0 and reduction != "none"
            and _lean_class_indices(input, target, reduction) not in (None, _KERNELS)
            and 0 < input.shape[0] == target.shape[0] and input.shape[1] > 0
            and not 0 <= ignore_index < input.shape[1]
            and input.is_cpu and not transforms_active() and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu")):
        # the fused CPU path (analytic gradient made in the forward); a target out of range, or
        # equal to ignore_index (which is then out of range too), makes its gather raise before
        # anything is kept, and the full path below gives torch's error or the ignored rows
        with contextlib.suppress(RuntimeError):
            return softmax_focal_loss(input, target, alpha, gamma, reduction)
    reduction = _reduction_arg(None, None, reduction)
    n_classes = _check_focal(input, target, weight, alpha, gamma, reduction)
    to_float32 = _autocast_to_float32(input)
    alpha_t = alpha if isinstance(alpha, Tensor) else None
    if (n_classes > 0 and not _grad_wanted(weight) and not _grad_wanted(alpha_t)
            and use_triton(input, target, weight, alpha_t, family="softmax")):
        return softmax_loss("focal", input, target, weight, alpha=alpha, gamma=gamma,
                            ignore_index=ignore_index, reduction=reduction, out_float32=to_float32)
    if target.device.type == "cpu" and not torch.compiler.is_compiling() and not transforms_active():
        # torch's IndexError, as the kernel path (under vmap the values cannot be read: gather raises)
        _check_targets_cpu(target, n_classes, ignore_index)
    if to_float32:
        input = input.float()
    return reference.focal_loss(input, target, alpha, gamma, reduction, weight, ignore_index)


# --------------------------------------------------------------------------------------------
# Embedding losses: contrastive, triplet margin, InfoNCE
# --------------------------------------------------------------------------------------------

def contrastive_loss(
    output1: Tensor,
    output2: Tensor,
    label: Tensor,
    margin: float = 2.0,
    reduction: str = "mean",
) -> Tensor:
    """Contrastive loss of embedding pairs (Hadsell et al., 2006):
    ``(1 - label) * d**2 + label * clamp(margin - d, min=0)**2`` per pair, with
    ``d = torch.nn.functional.pairwise_distance(output1, output2)`` (``||x1 - x2 + 1e-6||``).

    ``label`` is 1 for a dissimilar pair and 0 for a similar one (any real value interpolates).
    Shapes: ``output1`` and ``output2`` ``(B, D)`` (or one unbatched pair ``(D,)``), ``label``
    ``(B,)``; a ``(B, 1)`` label is accepted and read as one label per pair, with a UserWarning the
    first time (the classic snippet, the guide's, broadcasts a ``(B, 1)`` label against the ``(B,)``
    distances into a B x B matrix and averages that: a different value, which fastloss does not
    reproduce). Any other label shape raises ValueError. Integer / bool labels are converted to the
    embeddings' dtype; a floating label that requires grad receives its gradient
    ``clamp(margin - d, min=0)**2 - d**2``. ``reduction``: "mean" (over pairs, the default),
    "sum" or "none" (shape ``(B,)``).
    """
    if cpu.contrastive_applies(output1, output2, label, margin, reduction):  # fused CPU path (ops.cpu)
        return cpu.contrastive_loss(output1, output2, label, margin, reduction)
    reduction = _reduction_arg(None, None, reduction)
    label = _contrastive_label(output1, output2, label)
    batch = output1.shape[:-1]
    dtype = _floating_dtype("contrastive_loss", output1, output2)
    if dtype in (torch.float16, torch.bfloat16) and output1.device.type != "cpu" and \
            torch.is_autocast_enabled(output1.device.type):
        # the seed guide's composition is float32 there: GPU autocast runs pow (CUDA also norm, so
        # pairwise_distance) in float32; CPU autocast runs neither, and the loss keeps the dtype
        dtype = torch.float32
    x1, x2, y = output1.to(dtype), output2.to(dtype), label.to(dtype)
    if x1.numel() > 0 and use_triton(x1, x2, y, family="embedding"):
        n_cols = x1.shape[-1]
        out = embedding_loss("contrastive", x1.reshape(-1, n_cols), x2.reshape(-1, n_cols), y.reshape(-1),
                             margin, reduction=reduction)
        return out.reshape(batch) if reduction == "none" else out
    return reference.contrastive_loss(x1, x2, y, margin, reduction)


def _triplet_lean(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float, p: float, eps: float,
                  swap: bool, reduction: str) -> Tensor | None:
    """triplet_margin_loss without legacy arguments, straight to torch's op where
    fastloss.ops.cpu.triplet_applies says it may go, else None."""
    if cpu.triplet_applies(anchor, positive, negative, margin, p, eps, swap, None, None, reduction):
        return torch.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, _REDUCTION_ENUM[reduction])
    return None


def triplet_margin_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 1.0,
    p: float = 2,
    eps: float = 1e-6,
    swap: bool = False,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Triplet margin loss, as torch.nn.functional.triplet_margin_loss:
    ``max(margin + d(a, p) - d(a, n), 0)`` with ``d = pairwise_distance(., ., p, eps)``; ``swap``
    uses ``min(d(a, n), d(p, n))`` as the negative distance. Operands ``(..., D)`` with the same
    number of dimensions (broadcast as torch does). The kernels run for floating operands and
    ``0 < p < inf``; other cases run the PyTorch reference (integer operands give a floating loss,
    complex ones a real loss, as torch's). Under autocast, half-precision operands are cast to
    float32 first and the loss is float32, as autocast runs torch's triplet_margin_loss.
    """
    if size_average is None and reduce is None and (
            loss := _triplet_lean(anchor, positive, negative, margin, p, eps, swap, reduction)) is not None:
        return loss
    reduction = _reduction_arg(size_average, reduce, reduction)
    _check_triplet(anchor, positive, negative, margin)
    if torch.is_autocast_enabled(anchor.device.type):  # autocast's float32 list has triplet_margin_loss
        anchor, positive, negative = (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                                      for t in (anchor, positive, negative))
    if not all(t.is_floating_point() for t in (anchor, positive, negative)):
        return reference.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, reduction)
    dtype = _floating_dtype("triplet_margin_loss", anchor, positive, negative)
    a, pos, neg = anchor.to(dtype), positive.to(dtype), negative.to(dtype)
    if a.shape != pos.shape or a.shape != neg.shape:
        a, pos, neg = torch.broadcast_tensors(a, pos, neg)
    kernel_p = 0 < p < float("inf")
    if kernel_p and a.dim() > 0 and a.numel() > 0 and use_triton(a, pos, neg, family="embedding"):
        n_cols = a.shape[-1]
        out = embedding_loss("triplet", a.reshape(-1, n_cols), pos.reshape(-1, n_cols),
                             neg.reshape(-1, n_cols), margin, p, eps, swap, reduction)
        return out.reshape(a.shape[:-1]) if reduction == "none" else out
    return reference.triplet_margin_loss(a, pos, neg, margin, p, eps, swap, reduction)


def info_nce(
    query: Tensor,
    key: Tensor,
    temperature: float | Tensor = 0.07,
    reduction: str = "mean",
    symmetric: bool = False,
    normalize: bool = True,
    *,
    gather: bool = False,
) -> Tensor:
    """InfoNCE / NT-Xent over a batch of pairs: row i of ``key`` is the positive of row i of
    ``query`` and every other row a negative. Per row, ``cross_entropy(q @ k.T / temperature,
    arange(B))``; the rows are L2-normalised first when ``normalize``.

    Args:
        query, key: ``(B, D)``, any B >= 1 and D, float32 / float64 / bfloat16 / float16.
        temperature: a positive number, or a 0-dim tensor (e.g. a learnable one; it then receives a
            gradient, and its sign is not checked, to avoid a host sync).
        reduction: "mean" (mean over rows), "sum" or "none" (``(B,)`` per-row losses).
        symmetric: also score key -> query and average the two directions row by row (CLIP); for
            "none" the result is ``(loss_q2k_i + loss_k2q_i) / 2``.
        gather: under torch.distributed, all-gather the keys (and, for the symmetric loss, the
            queries) of every rank, gradients flowing back to their rank; each rank scores its own
            rows against the global batch (open_clip's local-loss mode) and returns the reduction
            over its own rows. With "mean" the average of the ranks' losses is the single-process
            loss, and DDP's gradient averaging yields exactly the single-process gradients (each
            rank's local embedding gradient is world_size times its share); with "sum" the ranks'
            losses and gradients add up to the single-process ones. All ranks must pass the same B
            and all must call backward.

    On CUDA the B x B score matrix is never formed: a tiled Triton forward with an online
    log-sum-exp, and the gradients over chunks of rows (a capped C x B block of scores at a time,
    tensor-core GEMMs, a Triton kernel for the softmax - delta tile), made in the forward for the
    reduced losses; extra memory O(B * D) plus the chunk (fastloss.ops.info_nce.CHUNK_ELEMENTS).
    The PyTorch path also works in chunks of rows (peak O(B * chunk)).
    """
    if cpu.info_nce_applies(query, key, temperature, reduction, symmetric, gather):  # fused CPU path (ops.cpu)
        return cpu.info_nce(query, key, temperature, reduction, symmetric, normalize)
    reduction = _reduction_arg(None, None, reduction)
    temperature = _info_nce_temperature(query, key, temperature)
    dtype = _floating_dtype("info_nce", query, key)
    query, key = query.to(dtype), key.to(dtype)
    triton = query.shape[0] > 0 and use_triton(query, key, family="info_nce")
    if not triton and not gather:
        return reference.info_nce(query, key, temperature, reduction, symmetric, normalize)
    if not triton and dtype in (torch.float16, torch.bfloat16):
        query, key = query.float(), key.float()  # as reference.info_nce: half in float32
    if normalize:
        query = torch.nn.functional.normalize(query, dim=-1)
        key = torch.nn.functional.normalize(key, dim=-1)
    scale = 1.0
    if isinstance(temperature, Tensor):
        query = query / temperature
    else:
        scale = 1.0 / temperature
    keys, queries, offset = key, query, 0
    if gather:
        from fastloss.distributed import all_gather_with_grad, rank_and_world_size

        offset = rank_and_world_size()[0] * query.shape[0]
        keys = all_gather_with_grad(key)
        queries = all_gather_with_grad(query) if symmetric else query
    if triton and not gather:
        return info_nce_loss(query, key, scale, 0, symmetric, reduction).to(dtype)
    if triton:
        loss = info_nce_loss(query, keys, scale, offset, False, reduction)
        if symmetric:
            loss = 0.5 * (loss + info_nce_loss(key, queries, scale, offset, False, reduction))
        return loss.to(dtype)
    loss = reference.info_nce_rows(query, keys, scale, offset)
    if symmetric:
        loss = 0.5 * (loss + reference.info_nce_rows(key, queries, scale, offset))
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(dtype)


# --------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------------

def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    token_weight: Tensor | None = None,
    options: object | None = None,
) -> Tensor:
    """Cross-entropy of ``F.linear(input, linear_weight, linear_bias)`` against ``target``, as torch
    2.13's ``F.linear_cross_entropy`` (same arguments), without ever forming the (N, V) logits or
    their gradient: the rows go through in chunks (logits of a chunk, its loss and gradient in place,
    then its share of every gradient), on the Triton row kernel for CUDA tensors and in PyTorch
    elsewhere, so CPU gets the memory saving too.

    - ``input`` ``(..., H)`` (any batch shape: ``(H,)``, ``(N, H)``, ``(B, T, H)``), ``linear_weight``
      ``(V, H)``, ``linear_bias`` ``(V,)``, target class indices of the batch shape.
    - ``ignore_index``: torch's default ``None`` means -100 for class indices; both are accepted.
    - ``z_loss``, ``softcap``: as :func:`cross_entropy` (``z_loss * lse**2`` per token, weighted as
      the cross-entropy term; logits become ``softcap * tanh(logits / softcap)``).
    - ``token_weight`` (target's shape): multiplies each token's loss; "mean" divides by the sum of
      token weight x class weight over the non-ignored tokens. It receives a gradient when it
      requires one.
    - ``options`` (``torch.nn.LinearCrossEntropyOptions``): its ``batch_chunk_size``, when set, gives
      the rows per chunk; the rest is torch's own chunking policy and is ignored (fastloss always
      chunks, from a byte budget: fastloss.ops.linear_xent.CHUNK_BYTES).

    Reduced losses make their gradients in the forward, the "mean" denominator on device (no host
    sync); ``reduction="none"`` sweeps again in backward. Under autocast the projection runs in the
    autocast dtype and the loss is float32, as torch's. Probability targets, a K-dimensional
    ``linear_weight``, a class ``weight`` that requires grad and ``torch.func`` transforms run
    ``fastloss.reference.linear_cross_entropy`` instead, which forms the logits.
    """
    reduction = _reduction_arg(None, None, reduction)
    _check_linear_xent_options(label_smoothing, z_loss, softcap)
    prob = _check_linear_xent(input, linear_weight, target, linear_bias, weight, token_weight, ignore_index)
    ignore_index = -100 if ignore_index is None else int(ignore_index)
    out_float32 = False
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type) and input.dtype != torch.float64:
        # torch: F.linear in the autocast dtype, cross_entropy in float32
        dtype = torch.get_autocast_dtype(device_type)
        input, linear_weight = input.to(dtype), linear_weight.to(dtype)
        linear_bias = linear_bias.to(dtype) if linear_bias is not None else None
        out_float32 = True
    n_classes, in_features = linear_weight.shape[0], linear_weight.shape[-1]
    if prob or linear_weight.dim() > 2 or n_classes == 0 or _grad_wanted(weight) or transforms_active():
        if out_float32:
            input, linear_weight = input.float(), linear_weight.float()
            linear_bias = linear_bias.float() if linear_bias is not None else None
        return reference.linear_cross_entropy(input, linear_weight, target, linear_bias, weight, ignore_index,
                                              reduction, label_smoothing, z_loss, softcap, token_weight)
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        _check_targets_cpu(target, n_classes, ignore_index)  # torch's IndexError
    chunk = getattr(options, "batch_chunk_size", None) or 0
    target = target.long()  # uint8 class indices would index as masks
    kernel = use_triton(input, linear_weight, target, linear_bias, weight, token_weight, family="linear_xent")
    loss = linear_xent_loss(
        input.reshape(-1, in_features), linear_weight, linear_bias, target.reshape(-1), weight,
        token_weight.reshape(-1) if token_weight is not None else None, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
        out_float32=out_float32, kernel=kernel, chunk_rows=chunk,
    )
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss

