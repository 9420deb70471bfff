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

__all__ = [
    "mse_loss",
    "l1_loss",
    "huber_loss",
    "smooth_l1_loss",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
]

_REDUCTIONS = ("none", "mean", "sum")


def _reduction_arg(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def _result_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """torch.result_type(a, b), written so that torch.compile traces it without a graph break."""
    if a.dtype == b.dtype:
        return a.dtype
    # a 0-dim tensor does not promote a dimensioned one of the same category (floating, integral)
    if (a.dim() == 0) != (b.dim() == 0) and a.is_floating_point() == b.is_floating_point():
        return b.dtype if a.dim() == 0 else a.dtype
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
    inputs, targets = _floating_operands("sigmoid_focal_loss", inputs, targets)
    if use_triton(inputs, targets):
        return pointwise_loss("sigmoid_focal", inputs, targets, param1=alpha, param2=gamma,
                              reduction=reduction)
    return reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)
