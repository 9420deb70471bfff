"""Torch-parity validation for fastloss.functional: the argument, shape and dtype checks that give
torch.nn's (or torchvision's) errors and warnings, with their types and messages, and the dtype
helpers they share. functional.py calls these on its full path and then only dispatches; the lean
path there (plain operands, default arguments) implies these checks with a few attribute reads and
skips them."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn import _reduction

_REDUCTIONS = ("none", "mean", "sum")


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


_KL_REDUCTIONS = (*_REDUCTIONS, "batchmean")
_KL_MEAN_WARNING = (
    "reduction: 'mean' divides the total loss by both the batch size and the support size."
    "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
    "'mean' will be changed to behave the same as 'batchmean' in the next major release."
)


def _check_kl_operands(input: Tensor, target: Tensor) -> None:
    """torch.kl_div's errors for operands that are not Tensors, complex or integral."""
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        bad, pos, arg = ("input", 1, input) if not isinstance(input, Tensor) else ("target", 2, target)
        raise TypeError(f"kl_div(): argument '{bad}' (position {pos}) must be Tensor, not {type(arg).__name__}")
    if input.is_complex() or target.is_complex():
        raise RuntimeError("kl_div: Complex inputs not supported.")
    if not (input.is_floating_point() and target.is_floating_point()):
        raise RuntimeError("kl_div: Integral inputs not supported.")


def _huber_operands(input: Tensor, target: Tensor, delta: float) -> tuple[Tensor, Tensor, torch.dtype]:
    """huber_loss's checks (``delta`` positive; an integer input cannot take the floating result):
    both operands in their common floating dtype, and the input's own dtype, the result's."""
    if not delta > 0:
        raise RuntimeError("huber_loss does not support non-positive values for delta.")
    input_dtype = getattr(input, "dtype", None)
    input, target = _floating_operands("huber_loss", input, target)
    if not input_dtype.is_floating_point:
        raise RuntimeError(f"result type {_type_name(input.dtype)} can't be cast to the desired output "
                           f"type {_type_name(input_dtype)}")
    return input, target, input_dtype


def _check_smooth_l1_beta(beta: float) -> None:
    if not beta >= 0:  # NaN too, as torch
        raise RuntimeError("smooth_l1_loss does not support negative values for beta.")


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


def _check_bce_operands(input: Tensor, target: Tensor) -> None:
    """binary_cross_entropy_with_logits's checks: one shape, floating input and target."""
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


def _check_sigmoid_focal(inputs: Tensor, targets: Tensor, alpha: float, gamma: float, reduction: str) -> None:
    """torchvision's sigmoid_focal_loss checks (alpha, reduction), gamma >= 0, and the errors its
    binary_cross_entropy_with_logits call raises (shape, floating operands)."""
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


def _check_z_loss_softcap(name: str, z_loss: float, softcap: float | None) -> None:
    if not z_loss >= 0.0:
        raise ValueError(f"{name}(): z_loss must be non-negative, got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"{name}(): softcap must be positive or None, got {softcap}")


def _cross_entropy_options(label_smoothing: float, z_loss: float, softcap: float | None) -> float:
    """cross_entropy's checks of its scalar options; returns the label smoothing to apply."""
    # torch checks the upper bound only, and smooths only when label_smoothing > 0: a negative or
    # NaN value means no smoothing
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if not label_smoothing > 0.0:
        label_smoothing = 0.0
    _check_z_loss_softcap("cross_entropy", z_loss, softcap)
    return label_smoothing


def _check_cross_entropy_targets(input: Tensor, target: Tensor, prob: bool, label_smoothing: float,
                                 ignore_index: int) -> None:
    """cross_entropy's errors that depend on the kind of target (after _check_class_operands)."""
    if input.dim() == 1 and target.dim() == 1 and not prob and label_smoothing > 0.0:
        # torch's smoothing term of a (C,) input with a (1,) target (its backward rejects the
        # target in any case: both backends raise there too)
        raise RuntimeError("output with shape [] doesn't match the broadcast shape [1]")
    if prob and ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")


def _check_focal(input: Tensor, target: Tensor, weight: Tensor | None, alpha: float | Tensor, gamma: float,
                 reduction: str) -> int:
    """focal_loss's checks (gamma, the class operands as cross_entropy's with class-index
    targets, a tensor alpha of one value per class). Returns the number of classes."""
    if not gamma >= 0:
        raise ValueError(f"focal_loss(): gamma must be non-negative, got {gamma}")
    _check_class_operands("focal_loss", input, target, weight, allow_probabilities=False,
                          reduction=reduction)
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if isinstance(alpha, Tensor) and (alpha.dim() != 1 or alpha.numel() != n_classes):
        raise ValueError(f"focal_loss(): a tensor alpha must have one value per class ({n_classes}), "
                         f"got shape {list(alpha.shape)}")
    return n_classes


def _autocast_to_float32(input: Tensor) -> bool:
    """Autocast runs cross-entropy in float32: half-precision logits give a float32 loss."""
    return input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type)


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


def _warn_label_column(shape: tuple[int, ...], stacklevel: int = 3) -> None:
    """Warn, once per process, that a (B, 1) contrastive label is read as one label per pair
    (``stacklevel`` 3 points at the caller of the function that calls this one)."""
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
        stacklevel=stacklevel,
    )


def _contrastive_label(output1: Tensor, output2: Tensor, label: Tensor) -> Tensor:
    """contrastive_loss's checks (Tensors, equal (B, D) or (D,) embeddings, one label per pair);
    returns the label of shape (B,) (a (B, 1) label reshaped, with its warning)."""
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
                _warn_label_column(tuple(label.shape), stacklevel=4)
            label = label.reshape(batch)
        else:
            raise ValueError(f"contrastive_loss(): label must have shape {tuple(batch)} (one label per "
                             f"pair) or {(*batch, 1)}, got {tuple(label.shape)}")
    return label


def _check_triplet(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> None:
    """triplet_margin_loss's checks, as torch's: a positive margin, Tensors of one dimensionality."""
    if margin <= 0:
        raise ValueError(f"margin must be greater than 0, got {margin}")
    _check_tensors("triplet_margin_loss", anchor=anchor, positive=positive, negative=negative)
    if not anchor.dim() == positive.dim() == negative.dim():
        raise RuntimeError(
            "The anchor, positive, and negative tensors are expected to have the same number of "
            f"dimensions, but got: anchor {anchor.dim()}D, positive {positive.dim()}D, and negative "
            f"{negative.dim()}D inputs"
        )


def _info_nce_temperature(query: Tensor, key: Tensor, temperature: float | Tensor) -> float | Tensor:
    """info_nce's checks (2-D query and key of one shape, a positive finite or one-element tensor
    temperature); returns the temperature (a tensor one reshaped to 0-dim)."""
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
    return temperature


def _check_linear_xent_options(label_smoothing: float, z_loss: float, softcap: float | None) -> None:
    if label_smoothing < 0.0 or label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    _check_z_loss_softcap("linear_cross_entropy", z_loss, softcap)


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
