"""torch.nn.functional-style API: validates arguments once and dispatches to the kernels or the
PyTorch reference (see fastloss._backend)."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor
from torch.nn import _reduction

from fastloss import reference
from fastloss._backend import transforms_active, use_triton
from fastloss.ops import cpu
from fastloss.ops.cpu import sigmoid_focal_loss as cpu_sigmoid_focal_loss
from fastloss.ops.cpu import softmax_focal_loss
from fastloss.ops.embedding import embedding_loss
from fastloss.ops.info_nce import info_nce_loss
from fastloss.ops.linear_xent import linear_xent_loss
from fastloss.ops.pointwise import pointwise_loss
from fastloss.ops.softmax import _check_targets_cpu, softmax_loss

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

_REDUCTIONS = ("none", "mean", "sum")

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


def _lean_route(input: Tensor, target: Tensor, reduction: str) -> int | None:
    """For operands the lean checks accepted: _KERNELS when the kernels are selected for them, else
    the reduction's enum (None for an invalid reduction: the full path raises torch's error)."""
    enum = _REDUCTION_ENUM.get(reduction)
    if enum is not None and use_triton(input, target):
        return _KERNELS
    return enum


def _lean(input: Tensor, target: Tensor, reduction: str) -> int | None:
    """For a pointwise loss in the common case (both plain Tensors, no __torch_function__, of one shape
    and one float32 / float64 dtype, a valid reduction): the reduction's enum when the PyTorch path
    is selected for them, _KERNELS when the kernels are; else None (the full path)."""
    if (
        isinstance(input, Tensor)
        and isinstance(target, Tensor)
        and input.dtype is target.dtype
        and input.dtype in _LEAN_DTYPES
        and isinstance(reduction, str)
        and input.shape == target.shape
        and not _has_torch_function(input, target)
    ):
        return _lean_route(input, target, reduction)
    return None


def _reduction_arg(size_average: bool | None, reduce: bool | None, reduction: str,
                   allowed: tuple[str, ...] = _REDUCTIONS) -> str:
    """The reduction to apply: torch's legacy size_average/reduce mapping (with its warning) when
    either is given, else ``reduction`` checked against ``allowed`` with torch's error."""
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in allowed:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _result_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype torch.nn computes in: torch.nn broadcasts input and target to one shape first (or
    requires equal shapes), so a 0-dim operand promotes like any other: plain type promotion."""
    return torch.promote_types(a.dtype, b.dtype)


def _floating_operands(name: str, input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Both operands in their common floating dtype, as torch.nn promotes them."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name}(): input and target must be Tensors, got "
                        f"{type(input).__name__} and {type(target).__name__}")
    dtype = _result_dtype(input, target)
    if not dtype.is_floating_point:
        raise NotImplementedError(
            f"{name}(): expected floating-point input and target, got {input.dtype} and {target.dtype}"
        )
    return input.to(dtype), target.to(dtype)


def _torch_only(input: Tensor, target: Tensor) -> bool:
    """Whether mse/l1 operands are integer or complex tensors, for which torch's own function runs
    (torch computes some of these: |complex|, integer losses with reduction="none"/"sum")."""
    return (isinstance(input, Tensor) and isinstance(target, Tensor)
            and not _result_dtype(input, target).is_floating_point)


def _broadcast(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """torch.nn's regression-loss broadcasting, with its warning."""
    if target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}). This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
        input, target = torch.broadcast_tensors(input, target)
    return input, target


def _check_weight(weight: Tensor | None, input: Tensor) -> None:
    if weight is not None and weight.size() != input.size():
        raise ValueError("Weights and input must have the same size.")


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
    if weight is None and use_triton(input, target):
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
    if weight is None and use_triton(input, target):
        return pointwise_loss("l1", input, target, reduction=reduction)
    return reference.l1_loss(input, target, reduction, weight)


_KL_REDUCTIONS = (*_REDUCTIONS, "batchmean")
_KL_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def _kl_kernels(input: Tensor, target: Tensor, reduction: str, log_target: bool, batch: int) -> Tensor:
    """kl_div on the kernels for validated, broadcast operands of one floating dtype: "batchmean"
    (``batch`` != 1) is the ``reduction`` scaled by 1 / batch inside the kernels."""
    return pointwise_loss("kl_div", input, target, param1=1.0 if log_target else 0.0,
                          reduction="sum" if reduction == "batchmean" else reduction, coef=1.0 / batch)


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
    if not legacy and (enum := _lean(input, target, "sum" if reduction == "batchmean" else reduction)) is not None:
        batch = input.size(0) if reduction == "batchmean" and input.dim() != 0 else 1
        if enum == _KERNELS and batch:
            return _kl_kernels(input, target, reduction, log_target, batch)
        if enum != _KERNELS:
            loss = torch.kl_div(input, target, enum, log_target=log_target)
            return loss / batch if batch != 1 else loss
    applied = _reduction_arg(size_average, reduce, reduction, _KL_REDUCTIONS)
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        bad, pos, arg = ("input", 1, input) if not isinstance(input, Tensor) else ("target", 2, target)
        raise TypeError(f"kl_div(): argument '{bad}' (position {pos}) must be Tensor, not {type(arg).__name__}")
    if input.is_complex() or target.is_complex():
        raise RuntimeError("kl_div: Complex inputs not supported.")
    if not (input.is_floating_point() and target.is_floating_point()):
        raise RuntimeError("kl_div: Integral inputs not supported.")
    dtype = _result_dtype(input, target)
    batch = input.size(0) if reduction == "batchmean" and input.dim() != 0 else 1
    y, x = torch.broadcast_tensors(target.to(dtype), input.to(dtype))  # torch's order: its error message
    if batch and use_triton(x, y):
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
    if not delta > 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    input_dtype = getattr(input, "dtype", None)
    input, target = _floating_operands("huber_loss", input, target)
    if not input_dtype.is_floating_point:
        raise RuntimeError(f"result type {_type_name(input.dtype)} can't be cast to the desired output "
                           f"type {_type_name(input_dtype)}")
    _check_weight(weight, input)
    input, target = _broadcast(input, target)
    if weight is None and use_triton(input, target):
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
    if not beta >= 0:  # NaN too, as torch
        raise RuntimeError("smooth_l1_loss does not support negative values for beta.")
    input, target = _floating_operands("smooth_l1_loss", input, target)
    input, target = _broadcast(input, target)
    if use_triton(input, target):
        if beta == 0:
            return pointwise_loss("l1", input, target, reduction=reduction)
        return pointwise_loss("smooth_l1", input, target, param1=beta, reduction=reduction)
    return reference.smooth_l1_loss(input, target, reduction, beta)


def _check_broadcastable(name: str, t: Tensor | None, input: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if torch.broadcast_shapes(t.shape, input.shape) != input.shape:
        raise RuntimeError(
            f"{name} of shape {tuple(t.shape)} must broadcast to the input shape {tuple(input.shape)}"
        )
    if t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "The function 'binary_cross_entropy_with_logits' is not differentiable with respect to "
            f"argument '{name}'. This input cannot have requires_grad True."
        )


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
            and (enum := _lean(input, target, reduction)) is not None):
        if enum == _KERNELS:
            return pointwise_loss("bce_with_logits", input, target, reduction=reduction)
        return torch.binary_cross_entropy_with_logits(input, target, None, None, enum)
    reduction = _reduction_arg(size_average, reduce, reduction)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    if not input.is_floating_point():
        raise NotImplementedError(
            f"binary_cross_entropy_with_logits(): expected a floating-point input, got {input.dtype}"
        )
    if not target.is_floating_point():
        raise RuntimeError(
            f"binary_cross_entropy_with_logits(): expected a floating-point target, got {target.dtype}"
        )
    # torch.nn's result has the target's dtype, also when the input's is wider; fastloss computes
    # in the promoted dtype and rounds once to it
    out_dtype = target.dtype
    input, target = _floating_operands("binary_cross_entropy_with_logits", input, target)
    _check_broadcastable("weight", weight, input)
    _check_broadcastable("pos_weight", pos_weight, input)
    if use_triton(input, target, weight, pos_weight):
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
    if not 0 <= alpha <= 1 and alpha != -1:
        raise ValueError(f"Invalid alpha value: {alpha}. alpha must be in the range [0,1] or -1 for ignore.")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: "
            "'none', 'mean', 'sum'"
        )
    if not gamma >= 0:
        raise ValueError(f"sigmoid_focal_loss(): gamma must be non-negative, got {gamma}")
    if targets.size() != inputs.size():
        raise ValueError(f"Target size ({targets.size()}) must be the same as input size ({inputs.size()})")
    if not inputs.is_floating_point():  # torchvision fails in binary_cross_entropy_with_logits
        raise NotImplementedError(
            f"sigmoid_focal_loss(): expected floating-point inputs (logits), got {inputs.dtype}"
        )
    if not targets.is_floating_point():  # as does an integer target there
        raise RuntimeError(f"sigmoid_focal_loss(): expected floating-point targets, got {targets.dtype}")
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


_TYPE_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool",
}


def _type_name(dtype: torch.dtype) -> str:
    return _TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _autocast_dtype(t: Tensor) -> torch.dtype:
    """The dtype autocast gives ``t`` for cross-entropy (which it runs in float32: floating tensors
    below float64 become float32), or t's own dtype when autocast is off."""
    if torch.is_autocast_enabled(t.device.type) and t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return torch.float32
    return t.dtype


def _check_class_operands(name: str, input: Tensor, target: Tensor, weight: Tensor | None,
                          allow_probabilities: bool, reduction: str) -> bool:
    """torch.nn's checks for a loss over a class dimension (dim 1, or dim 0 of a 1-D input).
    Returns whether ``target`` holds class probabilities (floating, the input's shape)."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name}(): input and target must be Tensors, got "
                        f"{type(input).__name__} and {type(target).__name__}")
    if input.dim() == 0:
        raise ValueError(f"{name}(): expected an input of shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    if not input.is_floating_point():
        raise NotImplementedError(f"{name}(): expected a floating-point input, got {input.dtype}")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if weight is not None and (weight.dim() != 1 or weight.numel() != n_classes):
        raise RuntimeError(
            f"weight tensor should be defined either for all {n_classes} classes or no classes but got "
            f"weight tensor of shape: {list(weight.shape)}"
        )
    if target.shape == input.shape and (allow_probabilities or target.is_floating_point()):
        if not allow_probabilities:
            raise ValueError(f"{name}(): expected class-index targets (int64), got floating-point "
                             f"targets of the input's shape (class probabilities are not supported)")
        if not target.is_floating_point():
            raise RuntimeError(f"Expected floating point type for target with class probabilities, "
                               f"got {_type_name(target.dtype)}")
        return True
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 1 and target.numel() != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
    elif input.dim() == 2 and target.dim() > 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    else:
        batch = target.shape[0] if target.dim() > 0 else 0
        if batch != input.shape[0]:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({batch}).")
        expected = [input.shape[0], *input.shape[2:]]
        if list(target.shape) != expected:
            raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")
    # torch's nll_loss kernels take a class weight of the input's dtype only (probability targets
    # multiply by it and promote instead)
    if weight is not None and _autocast_dtype(weight) != _autocast_dtype(input):
        raise RuntimeError(f"expected scalar type {_type_name(_autocast_dtype(input))} but found "
                           f"{_type_name(_autocast_dtype(weight))}")
    # and (N, C, d1, ...) inputs take int64 targets only (torch's nll_loss2d; an empty batch
    # reduced to a scalar returns before its check)
    if (input.dim() >= 3 and target.dtype == torch.uint8
            and not (target.numel() == 0 and reduction != "none")):
        raise RuntimeError("expected scalar type Long but found Byte")
    return False


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
        return _lean_route(input, target, reduction)
    return None


def _autocast_to_float32(input: Tensor) -> bool:
    """Autocast runs cross-entropy in float32: half-precision logits give a float32 loss."""
    return input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type)


def _grad_wanted(t: Tensor | None) -> bool:
    return isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled()


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
            and 0.0 <= label_smoothing <= 1.0
            and (enum := _lean_class_indices(input, target, reduction)) is not None):
        if enum != _KERNELS:
            return torch._C._nn.cross_entropy_loss(input, target, None, enum, ignore_index, label_smoothing)
        if input.shape[1] > 0 and input.shape[0] == target.shape[0]:
            return softmax_loss("cross_entropy", input, target, None, ignore_index=ignore_index,
                                label_smoothing=label_smoothing, reduction=reduction,
                                inplace_backward=inplace_backward)
    reduction = _reduction_arg(size_average, reduce, reduction)
    # torch checks the upper bound only, and smooths only when label_smoothing > 0: a negative or
    # NaN value means no smoothing
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not label_smoothing > 0.0:
        label_smoothing = 0.0
    if not z_loss >= 0.0:
        raise ValueError(f"cross_entropy(): z_loss must be non-negative, got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"cross_entropy(): softcap must be positive or None, got {softcap}")
    prob = _check_class_operands("cross_entropy", input, target, weight, allow_probabilities=True,
                                 reduction=reduction)
    if input.dim() == 1 and target.dim() == 1 and not prob and label_smoothing > 0.0:
        # torch's smoothing term of a (C,) input with a (1,) target (its backward rejects the
        # target in any case: both backends raise there too)
        raise RuntimeError("output with shape [] doesn't match the broadcast shape [1]")
    if prob and ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if prob and target.dtype != input.dtype:  # torch computes in the promoted dtype
        dtype = torch.promote_types(input.dtype, target.dtype)
        input, target = input.to(dtype), target.to(dtype)
    to_float32 = _autocast_to_float32(input)
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if n_classes > 0 and not _grad_wanted(weight) and use_triton(input, target, weight):
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
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not gamma >= 0:
        raise ValueError(f"focal_loss(): gamma must be non-negative, got {gamma}")
    _check_class_operands("focal_loss", input, target, weight, allow_probabilities=False,
                          reduction=reduction)
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if isinstance(alpha, Tensor) and (alpha.dim() != 1 or alpha.numel() != n_classes):
        raise ValueError(f"focal_loss(): a tensor alpha must have one value per class ({n_classes}), "
                         f"got shape {list(alpha.shape)}")
    to_float32 = _autocast_to_float32(input)
    alpha_t = alpha if isinstance(alpha, Tensor) else None
    if (n_classes > 0 and not _grad_wanted(weight) and not _grad_wanted(alpha_t)
            and use_triton(input, target, weight, alpha_t)):
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

def _check_tensors(name: str, **tensors: object) -> None:
    for arg, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}(): argument '{arg}' must be a Tensor, got {type(t).__name__}")


def _floating_dtype(name: str, *tensors: Tensor) -> torch.dtype:
    """The promoted dtype of the operands, which must be floating."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        raise TypeError(f"{name}(): expected floating-point embeddings, got "
                        f"{', '.join(str(t.dtype) for t in tensors)}")
    return dtype


_label_column_warned = False


def _warn_label_column(shape: tuple[int, ...]) -> None:
    """Warn, once per process, that a (B, 1) contrastive label is read as one label per pair."""
    global _label_column_warned
    if _label_column_warned or torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn
        return
    _label_column_warned = True
    warnings.warn(
        f"contrastive_loss(): label of shape {shape} is read as one label per pair, shape "
        f"{shape[:-1]}: the loss is the mean over the {shape[0]} pairs. (The classic ContrastiveLoss "
        f"snippet broadcasts a {shape} label against the {shape[:-1]} distances into a "
        f"{shape[0]} x {shape[0]} matrix and averages that, a different value; fastloss does not.) "
        "Pass label.squeeze(-1) to silence this warning, shown once.",
        UserWarning,
        stacklevel=3,
    )


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
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    _check_tensors("contrastive_loss", output1=output1, output2=output2, label=label)
    if output1.shape != output2.shape:
        raise ValueError(f"contrastive_loss(): output1 and output2 must have the same shape, got "
                         f"{tuple(output1.shape)} and {tuple(output2.shape)}")
    if output1.dim() not in (1, 2):
        raise ValueError(f"contrastive_loss(): expected (B, D) or (D,) embeddings, got shape "
                         f"{tuple(output1.shape)}")
    batch = output1.shape[:-1]
    if label.shape != batch:
        if label.shape == (*batch, 1) or (not batch and label.shape == (1,)):
            if batch:
                _warn_label_column(tuple(label.shape))
            label = label.reshape(batch)
        else:
            raise ValueError(f"contrastive_loss(): label must have shape {tuple(batch)} (one label per "
                             f"pair) or {(*batch, 1)}, got {tuple(label.shape)}")
    dtype = _floating_dtype("contrastive_loss", output1, output2)
    if dtype in (torch.float16, torch.bfloat16) and output1.device.type != "cpu" and \
            torch.is_autocast_enabled(output1.device.type):
        # the seed guide's composition is float32 there: GPU autocast runs pow (CUDA also norm, so
        # pairwise_distance) in float32; CPU autocast runs neither, and the loss keeps the dtype
        dtype = torch.float32
    x1, x2, y = output1.to(dtype), output2.to(dtype), label.to(dtype)
    if x1.numel() > 0 and use_triton(x1, x2, y):
        n_cols = x1.shape[-1]
        out = embedding_loss("contrastive", x1.reshape(-1, n_cols), x2.reshape(-1, n_cols), y.reshape(-1),
                             margin, reduction=reduction)
        return out.reshape(batch) if reduction == "none" else out
    return reference.contrastive_loss(x1, x2, y, margin, reduction)


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
    if cpu.triplet_applies(anchor, positive, negative, margin, p, eps, swap, size_average, reduce, reduction):
        return torch.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, _REDUCTION_ENUM[reduction])
    reduction = _reduction_arg(size_average, reduce, reduction)
    if margin <= 0:
        raise ValueError(f"margin must be greater than 0, got {margin}")
    _check_tensors("triplet_margin_loss", anchor=anchor, positive=positive, negative=negative)
    if not anchor.dim() == positive.dim() == negative.dim():
        raise RuntimeError(
            "The anchor, positive, and negative tensors are expected to have the same number of "
            f"dimensions, but got: anchor {anchor.dim()}D, positive {positive.dim()}D, and negative "
            f"{negative.dim()}D inputs"
        )
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
    if kernel_p and a.dim() > 0 and a.numel() > 0 and use_triton(a, pos, neg):
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
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    _check_tensors("info_nce", query=query, key=key)
    if query.dim() != 2 or key.dim() != 2:
        raise ValueError(f"info_nce(): query and key must be 2-D (batch, dim), got shapes "
                         f"{tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"info_nce(): query and key must have the same feature size, got "
                         f"{query.shape[1]} and {key.shape[1]}")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"info_nce(): query and key must have the same batch size (row i of key is "
                         f"the positive of row i of query), got {query.shape[0]} and {key.shape[0]}")
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"info_nce(): temperature must be a number or a one-element tensor, got "
                             f"shape {tuple(temperature.shape)}")
        temperature = temperature.reshape(())
    elif not 0 < temperature < float("inf"):
        raise ValueError(f"info_nce(): temperature must be positive and finite, got {temperature}")
    dtype = _floating_dtype("info_nce", query, key)
    query, key = query.to(dtype), key.to(dtype)
    triton = query.shape[0] > 0 and use_triton(query, key)
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

def _check_linear_xent(input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None,
                       weight: Tensor | None, token_weight: Tensor | None, ignore_index: int | None) -> bool:
    """torch 2.13's checks of linear_cross_entropy (input of any batch shape here, not only 1-D or
    2-D), then cross_entropy's on the logits it implies. Returns whether target holds class
    probabilities."""
    for arg, t in (("input", input), ("linear_weight", linear_weight), ("target", target),
                   ("linear_bias", linear_bias), ("weight", weight), ("token_weight", token_weight)):
        if t is not None and not isinstance(t, Tensor):
            raise TypeError(f"linear_cross_entropy(): argument '{arg}' must be a Tensor, got {type(t).__name__}")
    if input.dim() < 1:
        raise RuntimeError(f"expected input with dimensionality at least 1, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    batch, in_features = tuple(input.shape[:-1]), input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions (in_features), "
                           f"got {in_features} and {linear_weight.shape[-1]}, respectively")
    n_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(n_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and not batch:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} "
                           f"requires batched input, (N, {in_features}), got unbatched input with shape "
                           f"{tuple(input.shape)}")
    devices = {t.device for t in (input, linear_weight, target, linear_bias, weight, token_weight) if t is not None}
    if len(devices) > 1:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{', '.join(sorted(str(d) for d in devices))}!")
    if not input.is_floating_point():
        raise NotImplementedError(f"linear_cross_entropy(): expected a floating-point input, got {input.dtype}")
    if linear_weight.dtype != input.dtype:
        raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {_type_name(input.dtype).lower()} "
                           f"!= {_type_name(linear_weight.dtype).lower()}")
    if linear_bias is not None and linear_bias.dtype != input.dtype:
        raise RuntimeError(f"self and mat2 must have the same dtype, but got {_type_name(linear_bias.dtype)} and "
                           f"{_type_name(input.dtype)}")
    if weight is not None and (weight.dim() != 1 or weight.numel() != n_classes):
        raise RuntimeError(f"weight tensor should be defined either for all {n_classes} classes or no classes "
                           f"but got weight tensor of shape: {list(weight.shape)}")
    prob = tuple(target.shape) == (*batch, n_classes, *out_features)
    if prob:
        if ignore_index is not None and ignore_index >= 0:
            raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
        if not target.is_floating_point():
            raise RuntimeError(f"Expected floating point type for target with class probabilities, "
                               f"got {_type_name(target.dtype)}")
    loss_shape = (*batch, *out_features)
    if not prob:
        if tuple(target.shape) != loss_shape and not (not batch and tuple(target.shape) == (1,)):
            if len(batch) == 1 and not out_features and target.dim() == 1:
                raise ValueError(f"Expected input batch_size ({batch[0]}) to match target batch_size "
                                 f"({target.shape[0]}).")
            if len(batch) == 1 and not out_features:
                raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
            raise RuntimeError(f"Expected target size {list(loss_shape)}, got {list(target.shape)}")
        if target.dtype not in (torch.int64, torch.uint8):
            raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")
    if token_weight is not None:
        if tuple(token_weight.shape) not in ((loss_shape,) if prob else (loss_shape, tuple(target.shape))):
            raise ValueError(f"linear_cross_entropy(): token_weight must have the shape of the per-token "
                             f"loss {list(loss_shape)}, got {list(token_weight.shape)}")
        if not token_weight.is_floating_point():
            raise ValueError(f"linear_cross_entropy(): token_weight must be floating-point, got {token_weight.dtype}")
    return prob


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
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if label_smoothing < 0.0 or label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"linear_cross_entropy(): z_loss must be non-negative, got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"linear_cross_entropy(): softcap must be positive or None, got {softcap}")
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
    kernel = use_triton(input, linear_weight, target, linear_bias, weight, token_weight)
    loss = linear_xent_loss(
        input.reshape(-1, in_features), linear_weight, linear_bias, target.reshape(-1), weight,
        token_weight.reshape(-1) if token_weight is not None else None, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
        out_float32=out_float32, kernel=kernel, chunk_rows=chunk,
    )
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss

