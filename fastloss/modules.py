"""nn.Module drop-ins. Each subclasses its torch.nn counterpart where torch.nn has the loss, so the
constructor, attributes, buffers and ``isinstance`` checks are torch's; only ``forward`` changes.

fastloss modules are not TorchScript-compatible (their forward dispatches in Python to Triton
kernels and torch.library custom ops): ``torch.jit.script`` of one, or of a model holding one,
raises a RuntimeError that says so; ``torch.compile`` and ``torch.export`` are supported."""

from __future__ import annotations

import math

from torch import Tensor, nn

from fastloss import functional as F

__all__ = [
    "BCEWithLogitsLoss",
    "ContrastiveLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "HuberLoss",
    "InfoNCELoss",
    "KLDivLoss",
    "L1Loss",
    "LinearCrossEntropyLoss",
    "MSELoss",
    "SigmoidFocalLoss",
    "SmoothL1Loss",
    "TripletMarginLoss",
]


#: What ``self._buffers.get`` answers for a name that is not a buffer (a forward then reads the
#: attribute through the full path).
_ABSENT = object()

# The forwards of losses torch.nn has first try the lean path (fastloss.functional's ``_*_lean``:
# torch's op, or the kernels, for plain tensors and the default options), with the module's
# attributes passed straight in; anything else goes through the functional form as before.


class NotScriptable:
    """Mixin of every fastloss nn.Module: ``torch.jit.script`` raises a plain RuntimeError.

    ``torch.jit.script`` calls ``__prepare_scriptable__`` on a module and on each of its submodules
    before compiling anything, so the message replaces TorchScript's compiler errors about the
    Python code behind ``forward``. Nothing else uses the hook (eager mode, pickling, torch.compile
    and torch.export never call it).
    """

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"fastloss.{type(self).__name__} is not TorchScript-compatible: torch.jit.script cannot "
            "compile fastloss modules (their forward runs Triton kernels and custom ops from Python). "
            "Use torch.compile or torch.export instead."
        )


class MSELoss(NotScriptable, nn.MSELoss):
    """Drop-in torch.nn.MSELoss: mean squared error between input and target."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class L1Loss(NotScriptable, nn.L1Loss):
    """Drop-in torch.nn.L1Loss: mean absolute error between input and target."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(input, target, reduction=self.reduction)


class HuberLoss(NotScriptable, nn.HuberLoss):
    """Drop-in torch.nn.HuberLoss(reduction="mean", delta=1.0)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class SmoothL1Loss(NotScriptable, nn.SmoothL1Loss):
    """Drop-in torch.nn.SmoothL1Loss(reduction="mean", beta=1.0); beta=0 is L1."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class BCEWithLogitsLoss(NotScriptable, nn.BCEWithLogitsLoss):
    """Drop-in torch.nn.BCEWithLogitsLoss(weight=None, reduction="mean", pos_weight=None)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        buffers = self._buffers  # (self.weight is a buffer: _buffers skips Module.__getattr__)
        if (buffers.get("weight", _ABSENT) is None and buffers.get("pos_weight", _ABSENT) is None
                and (loss := F._bce_with_logits_lean(input, target, self.reduction)) is not None):
            return loss
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )


class KLDivLoss(NotScriptable, nn.KLDivLoss):
    """Drop-in torch.nn.KLDivLoss(reduction="mean", log_target=False); input holds log-probabilities."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        reduction = self.reduction
        if reduction != "mean" and (loss := F._kl_div_lean(input, target, reduction, self.log_target)) is not None:
            return loss  # ("mean" takes F.kl_div, which warns as torch's)
        return F.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class SigmoidFocalLoss(NotScriptable, nn.Module):
    """Sigmoid focal loss module (torchvision's formula); unlike the functional form, the
    default reduction is "mean".

    Args:
        alpha: weight of positives in [0, 1], negatives get 1 - alpha; -1 disables weighting
            (any other value raises ValueError in forward, as torchvision's).
        gamma: focusing exponent, >= 0 (0 gives BCE with logits).
        reduction: "none" | "mean" | "sum".
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"SigmoidFocalLoss: gamma must be non-negative, got {gamma}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class CrossEntropyLoss(NotScriptable, nn.CrossEntropyLoss):
    """Drop-in torch.nn.CrossEntropyLoss(weight=None, size_average=None, ignore_index=-100,
    reduce=None, reduction="mean", label_smoothing=0.0), with keyword-only extensions:

    Args:
        z_loss: coefficient of ``lse**2`` added per row (PaLM's z-loss); 0 disables it. With
            ``weight`` the z term of a row is multiplied by ``weight[target]`` like its
            cross-entropy term, so "mean" divides both terms by the same sum of target weights
            (Liger-Kernel leaves the z term unweighted and divides it by the number of
            non-ignored rows instead: two denominators).
        softcap: when set, logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
        inplace_backward: when True (Triton path, eager mode) the gradient is written into the
            logits' memory, saving one logits-sized buffer; the logits are overwritten, so use it
            only when nothing reads them after the loss. Off by default.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        if not z_loss >= 0.0:
            raise ValueError(f"CrossEntropyLoss: z_loss must be non-negative, got {z_loss}")
        if softcap is not None and not softcap > 0.0:
            raise ValueError(f"CrossEntropyLoss: softcap must be positive or None, got {softcap}")
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if (self._buffers.get("weight", _ABSENT) is None and not self.z_loss and self.softcap is None
                and (loss := F._cross_entropy_lean(input, target, self.ignore_index, self.reduction,
                                                   self.label_smoothing, self.inplace_backward)) is not None):
            return loss
        return F.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, softcap=self.softcap,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        parts = []
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.inplace_backward:
            parts.append("inplace_backward=True")
        return ", ".join(parts)


class FocalLoss(NotScriptable, nn.Module):
    """Multi-class softmax focal loss: ``-alpha_t (1 - p_t)**gamma log(p_t)`` per sample.

    Args:
        alpha: a float, or a per-class tensor of C values (``alpha_t = alpha[target]``).
        gamma: focusing exponent, >= 0; 0 (with alpha=1) is cross-entropy.
        reduction: "none" | "mean" | "sum".
        weight: optional per-class weight multiplying each sample's loss, as CrossEntropyLoss's;
            "mean" divides by the sum of ``weight[target]`` over non-ignored samples (their number
            without weight), so FocalLoss(1.0, 0.0) equals CrossEntropyLoss.
        ignore_index: targets equal to it contribute neither loss nor gradient.

    Input (N, C) or (N, C, d1, ...) logits (or (C,)), target class indices. Without weight or
    ignored targets this equals the classic composition ``ce = cross_entropy(x, t,
    reduction="none"); (alpha * (1 - exp(-ce))**gamma * ce).mean()``, in values and gradients.
    """

    def __init__(
        self,
        alpha: float | Tensor = 1.0,
        gamma: float = 2.0,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"FocalLoss: gamma must be non-negative, got {gamma}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = float(alpha)
        self.register_buffer("weight", weight)
        self.gamma = gamma
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.focal_loss(input, target, self.alpha, self.gamma, self.reduction, self.weight,
                            self.ignore_index)

    def extra_repr(self) -> str:
        alpha = "tensor" if isinstance(self.alpha, Tensor) else self.alpha
        return f"alpha={alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class ContrastiveLoss(NotScriptable, nn.Module):
    """Contrastive loss of embedding pairs: ``(1 - label) d**2 + label clamp(margin - d, min=0)**2``
    with ``d = pairwise_distance(output1, output2)``; label 1 marks a dissimilar pair.

    Args:
        margin: distance beyond which dissimilar pairs cost nothing (default 2.0).
        reduction: "mean" over pairs (default), "sum" or "none".

    ``forward(output1, output2, label)``: embeddings ``(B, D)``, label ``(B,)`` (or ``(B, 1)``); see
    fastloss.functional.contrastive_loss.
    """

    def __init__(self, margin: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        self.margin = margin
        self.reduction = reduction

    def forward(self, output1: Tensor, output2: Tensor, label: Tensor) -> Tensor:
        return F.contrastive_loss(output1, output2, label, self.margin, self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class TripletMarginLoss(NotScriptable, nn.TripletMarginLoss):
    """Drop-in torch.nn.TripletMarginLoss(margin=1.0, p=2.0, eps=1e-6, swap=False, reduction="mean")."""

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        if (loss := F._triplet_lean(anchor, positive, negative, self.margin, self.p, self.eps, self.swap,
                                    self.reduction)) is not None:
            return loss
        return F.triplet_margin_loss(anchor, positive, negative, margin=self.margin, p=self.p,
                                     eps=self.eps, swap=self.swap, reduction=self.reduction)


class InfoNCELoss(NotScriptable, nn.Module):
    """InfoNCE / NT-Xent over a batch: row i of ``key`` is the positive of row i of ``query``.

    Args:
        temperature: softmax temperature, > 0 (default 0.07).
        reduction: "mean" over rows (default), "sum" or "none".
        symmetric: average the query -> key and key -> query directions (CLIP).
        normalize: L2-normalise the rows of query and key first (default True).
        gather: all-gather keys (and queries) across torch.distributed ranks, with gradients; see
            fastloss.functional.info_nce for what each rank's loss is.

    On CUDA the kernels never form the B x B similarity matrix (extra memory O(B * D) plus one capped
    chunk of scores).
    """

    def __init__(self, temperature: float = 0.07, reduction: str = "mean", symmetric: bool = False,
                 normalize: bool = True, gather: bool = False) -> None:
        super().__init__()
        if not 0 < temperature < float("inf"):
            raise ValueError(f"InfoNCELoss: temperature must be positive and finite, got {temperature}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        self.temperature = temperature
        self.reduction = reduction
        self.symmetric = symmetric
        self.normalize = normalize
        self.gather = gather

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return F.info_nce(query, key, self.temperature, self.reduction, self.symmetric, self.normalize,
                          gather=self.gather)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, reduction={self.reduction!r}, "
                f"symmetric={self.symmetric}, normalize={self.normalize}, gather={self.gather}")


class _TorchLinearCrossEntropyLoss(nn.Module):
    """torch 2.13's nn.LinearCrossEntropyLoss constructor and state, for older torch: the projection
    in ``self.linear`` (an nn.Linear of ``num_classes`` outputs), the class weight as the buffer
    ``weight``, and the attributes ``num_classes``, ``out_features``, ``reduction``,
    ``ignore_index``, ``label_smoothing``, ``options``."""

    def __init__(self, in_features: int, num_classes: int, *, out_features: tuple[int, ...] = (),
                 bias: bool = False, device=None, dtype=None, reduction: str = "mean",
                 weight: Tensor | None = None, ignore_index: int | None = None,
                 label_smoothing: float = 0.0, options=None) -> None:
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__()
        self.reduction = reduction
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = out_features
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)
        self.options = options


class LinearCrossEntropyLoss(NotScriptable, getattr(nn, "LinearCrossEntropyLoss", _TorchLinearCrossEntropyLoss)):
    """Drop-in torch.nn.LinearCrossEntropyLoss(in_features, num_classes, *, bias=False, device=None,
    dtype=None, reduction="mean", weight=None, ignore_index=-100, label_smoothing=0.0): the
    cross-entropy of ``self.linear(input)`` (the output projection it holds) against class indices,
    never forming the logits (see fastloss.functional.linear_cross_entropy). Subclasses torch's
    module where torch has it (torch >= 2.13: same parameters, buffers and state_dict); on older
    torch the same constructor and state.

    Args:
        z_loss: coefficient of ``lse**2`` added per token (PaLM's z-loss); 0 disables it.
        softcap: when set, logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
        options: torch's LinearCrossEntropyOptions; only its ``batch_chunk_size`` is used.

    ``forward(input, target, token_weight=None)``: input ``(..., in_features)``, target class indices
    of the batch shape, optional per-token weights of the target's shape.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        options=None,
    ) -> None:
        super().__init__(in_features, num_classes, bias=bias, device=device, dtype=dtype, reduction=reduction,
                         weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
                         options=options)
        if not z_loss >= 0.0:
            raise ValueError(f"LinearCrossEntropyLoss: z_loss must be non-negative, got {z_loss}")
        if softcap is not None and not softcap > 0.0:
            raise ValueError(f"LinearCrossEntropyLoss: softcap must be positive or None, got {softcap}")
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, input: Tensor, target: Tensor, token_weight: Tensor | None = None) -> Tensor:
        return F.linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, token_weight=token_weight, options=self.options,
        )

    def extra_repr(self) -> str:
        parts = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                 f"bias={self.linear.bias is not None}", f"reduction={self.reduction}",
                 f"ignore_index={self.ignore_index}", f"label_smoothing={self.label_smoothing}"]
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        return ", ".join(parts)

