"""torch.nn.functional-style API: validates arguments once and dispatches to the kernels or the
PyTorch reference (see fastloss._backend)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn import _reduction

from fastloss import reference
from fastloss._backend import use_triton
from fastloss.ops.pointwise import pointwise_loss
from fastloss.ops.softmax import softmax_loss

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

_REDUCTIONS = ("none", "mean", "sum")


def _reduction_arg(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
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
    Weighted calls run the PyTorch reference.
    """
    reduction = _reduction_arg(size_average, reduce, reduction)
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
    """Mean absolute error, as torch.nn.functional.l1_loss (weighted calls run the reference)."""
    reduction = _reduction_arg(size_average, reduce, reduction)
    input, target = _floating_operands("l1_loss", input, target)
    _check_weight(weight, input)
    input, target = _broadcast(input, target)
    if weight is None and use_triton(input, target):
        return pointwise_loss("l1", input, target, reduction=reduction)
    return reference.l1_loss(input, target, reduction, weight)


def huber_loss(
    input: Tensor,
    target: Tensor,
    reduction: str = "mean",
    delta: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Huber loss, as torch.nn.functional.huber_loss; ``delta`` must be positive."""
    reduction = _reduction_arg(None, None, reduction)
    if not delta > 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    input, target = _floating_operands("huber_loss", input, target)
    _check_weight(weight, input)
    input, target = _broadcast(input, target)
    if weight is None and use_triton(input, target):
        return pointwise_loss("huber", input, target, param1=delta, reduction=reduction)
    return reference.huber_loss(input, target, reduction, delta, weight)


def smooth_l1_loss(
    input: Tensor,
    target: Tensor,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    beta: float = 1.0,
) -> Tensor:
    """Smooth L1 loss, as torch.nn.functional.smooth_l1_loss; ``beta`` = 0 is plain L1."""
    reduction = _reduction_arg(size_average, reduce, reduction)
    if beta < 0:
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
    input, target = _floating_operands("binary_cross_entropy_with_logits", input, target)
    _check_broadcastable("weight", weight, input)
    _check_broadcastable("pos_weight", pos_weight, input)
    if use_triton(input, target, weight, pos_weight):
        return pointwise_loss("bce_with_logits", input, target, weight, pos_weight, reduction=reduction)
    return reference.binary_cross_entropy_with_logits(input, target, weight, reduction, pos_weight)


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Sigmoid focal loss (Lin et al., 2017), exactly torchvision.ops.sigmoid_focal_loss.

    ``alpha_t (1 - p_t)^gamma * bce_with_logits(inputs, targets)``, where ``p_t`` is the probability
    of the target and ``alpha_t = alpha`` for positives, ``1 - alpha`` for negatives; ``alpha < 0``
    disables the weighting. Note torchvision's default ``reduction="none"``.
    """
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
    inputs, targets = _floating_operands("sigmoid_focal_loss", inputs, targets)
    if use_triton(inputs, targets):
        return pointwise_loss("sigmoid_focal", inputs, targets, param1=alpha, param2=gamma,
                              reduction=reduction)
    return reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)


_TYPE_NAMES = {
    torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.bool: "Bool",
}


def _check_class_operands(name: str, input: Tensor, target: Tensor, weight: Tensor | None,
                          allow_probabilities: bool) -> bool:
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
    if target.is_floating_point() and target.shape == input.shape:
        if not allow_probabilities:
            raise ValueError(f"{name}(): expected class-index targets (int64), got floating-point "
                             f"targets of the input's shape (class probabilities are not supported)")
        return True
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
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
        name_ = _TYPE_NAMES.get(target.dtype, str(target.dtype).removeprefix("torch."))
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {name_}")
    return False


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
      ``weight[target]`` like the cross-entropy term and 0 on ignored rows, so "mean" divides both
      terms by the same sum of target weights.
    - ``softcap``: logits become ``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).
    - ``inplace_backward``: on the Triton path the gradient is written into the logits' own memory
      (saving one logits-sized buffer): the logits tensor is overwritten after the call, so only
      use it when nothing reads the logits afterwards; a second backward through the same graph
      then raises. Ignored under torch.compile and on the PyTorch path.

    On the Triton path the gradient is computed in the forward pass and the "mean" is taken on
    device (no host sync). Out-of-range targets raise IndexError on CPU; on CUDA such rows get a
    NaN loss and gradient instead of an out-of-bounds access.
    """
    reduction = _reduction_arg(size_average, reduce, reduction)
    if label_smoothing < 0.0 or label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"cross_entropy(): z_loss must be non-negative, got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"cross_entropy(): softcap must be positive or None, got {softcap}")
    prob = _check_class_operands("cross_entropy", input, target, weight, allow_probabilities=True)
    if prob and ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
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
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not gamma >= 0:
        raise ValueError(f"focal_loss(): gamma must be non-negative, got {gamma}")
    _check_class_operands("focal_loss", input, target, weight, allow_probabilities=False)
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
    if to_float32:
        input = input.float()
    return reference.focal_loss(input, target, alpha, gamma, reduction, weight, ignore_index)
