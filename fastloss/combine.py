"""Training-side loss wrappers: weighted sums of losses and weight-regularised losses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

from fastloss import modules, specs
from fastloss._backend import transforms_active, use_triton
from fastloss.ops.cpu import DIFFERENCE_LOSSES, difference_combination
from fastloss.ops.pointwise import MAX_MEMBERS, pointwise_combination

__all__ = ["CombinedLoss", "RegularizedLoss"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


#: Per kernel loss name, whether a module's parameters can run fused: False for values the module
#: would reject (it must raise, member by member) and for BCE weights (the fused pass takes none).
_FUSABLE: dict[str, Callable[[nn.Module], bool]] = {
    "huber": lambda m: m.delta > 0,
    "smooth_l1": lambda m: m.beta >= 0,
    "bce_with_logits": lambda m: m.weight is None and m.pos_weight is None,
    "sigmoid_focal": lambda m: m.gamma >= 0 and (0 <= m.alpha <= 1 or m.alpha == -1),
}

#: fastloss module class -> (kernel loss name, the module attributes that are its param1, param2,
#: its _FUSABLE check), for the pointwise losses CombinedLoss fuses (``fused`` in fastloss.specs;
#: read once, here).
_FUSED_MEMBERS: dict[type, tuple[str, tuple[str, ...], Callable[[nn.Module], bool] | None]] = {
    getattr(modules, s.module): (s.kind, s.kernel_params, _FUSABLE.get(s.kind))
    for s in specs.by_family("pointwise") if s.fused
}


def _kernel_member(module: nn.Module) -> tuple[str, float, float] | None:
    """(kernel loss name, param1, param2) of a fastloss pointwise module the fused pass can run, or
    None (other losses, BCE with weights, invalid parameters that must raise in the module)."""
    member = _FUSED_MEMBERS.get(type(module))
    if member is None:
        return None
    name, attributes, fusable = member
    if fusable is not None and not fusable(module):
        return None
    if not attributes:
        return (name, 0.0, 0.0)
    param1 = float(getattr(module, attributes[0]))
    if len(attributes) == 1:  # smooth L1 with beta = 0 is the L1 loss, as in functional
        return ("l1", 0.0, 0.0) if name == "smooth_l1" and param1 == 0 else (name, param1, 0.0)
    return (name, param1, float(getattr(module, attributes[1])))


class CombinedLoss(modules.NotScriptable, nn.Module):
    """Weighted sum of losses over the same (input, target): ``sum_k w_k * loss_k(input, target)``.

        criterion = fastloss.CombinedLoss({fastloss.MSELoss(): 0.7, fastloss.L1Loss(): 0.3})
        criterion = fastloss.CombinedLoss([(fastloss.MSELoss(), 0.7), (fastloss.L1Loss(), 0.3)])

    ``forward(input, target, return_components=False)``; with ``return_components=True`` it returns
    ``(total, [loss_k, ...])`` (unweighted member values, for logging).

    When every member is a fastloss pointwise loss (MSELoss, L1Loss, HuberLoss, SmoothL1Loss,
    BCEWithLogitsLoss without weights, SigmoidFocalLoss) with one reduction and no forward hooks,
    and input and target have one shape and one floating dtype, the sum runs on the Triton kernels as one fused pass per three members: input
    and target are read once and one gradient is written, instead of a pass per member. Otherwise
    (and for ``return_components=True``) the members run one by one.
    """

    def __init__(self, losses: Mapping[nn.Module, float] | Iterable[tuple[nn.Module, float]]) -> None:
        super().__init__()
        pairs = list(losses.items()) if isinstance(losses, Mapping) else [tuple(p) for p in losses]
        if not pairs:
            raise ValueError("CombinedLoss needs at least one (loss, weight) pair")
        for module, weight in pairs:
            if not isinstance(module, nn.Module) and not callable(module):
                raise TypeError(f"CombinedLoss members must be loss modules, got {type(module).__name__}")
            if not isinstance(weight, (int, float)):
                raise TypeError(f"CombinedLoss weights must be numbers, got {type(weight).__name__}")
        self.losses = nn.ModuleList([m for m, _ in pairs])
        self.weights = [float(w) for _, w in pairs]

    def _fused(self, input: Tensor, target: Tensor) -> Tensor | None:
        """The fused sum, or None when the members or operands do not allow it."""
        if (
            not isinstance(input, Tensor)
            or not isinstance(target, Tensor)
            or input.dtype is not target.dtype
            or not input.is_floating_point()
            or input.shape != target.shape
        ):
            return None
        if _module._global_forward_hooks or _module._global_forward_pre_hooks:
            return None
        weighted = []
        reduction = None
        for module, w in zip(self.losses, self.weights):
            member = _kernel_member(module)
            if member is None or module._forward_hooks or module._forward_pre_hooks:
                return None
            if reduction is None:
                reduction = module.reduction
            elif module.reduction != reduction:
                return None
            weighted.append((member[0], w, member[1], member[2]))
        if reduction not in ("none", "mean", "sum"):  # a bad one must raise in the module
            return None
        if not use_triton(input, target):
            if (
                reduction != "none"
                and all(name in DIFFERENCE_LOSSES for name, _, _, _ in weighted)
                and input.dtype in (torch.float32, torch.float64)
                and input.is_cpu
                and target.is_cpu
                and not torch.compiler.is_compiling()
                and not transforms_active()
                and not torch.is_autocast_enabled("cpu")
                and not torch.overrides.has_torch_function_variadic(input, target)
            ):
                # the fused CPU path: one Function, d = input - target once, the gradient made in
                # the forward (fastloss.ops.cpu, tested against the members' reference)
                return difference_combination(weighted, input, target, reduction)
            return None
        groups = [weighted[i:i + MAX_MEMBERS] for i in range(0, len(weighted), MAX_MEMBERS)]
        total = pointwise_combination(groups[0], input, target, reduction)
        for group in groups[1:]:
            total = total + pointwise_combination(group, input, target, reduction)
        return total

    def forward(self, input: Tensor, target: Tensor, return_components: bool = False):
        if not return_components:
            fused = self._fused(input, target)
            if fused is not None:
                return fused
        values = [loss(input, target) for loss in self.losses]
        total = self.weights[0] * values[0]  # (sum() would add a 0 + first)
        for w, v in zip(self.weights[1:], values[1:]):
            total = total + w * v
        return (total, values) if return_components else total

    def extra_repr(self) -> str:
        return f"weights={self.weights}"


def _regularized_parameters(model_or_params, exclude_bias_and_norm: bool) -> list[Tensor]:
    if isinstance(model_or_params, nn.Module):
        if not exclude_bias_and_norm:
            return [p for p in model_or_params.parameters() if p.requires_grad]
        skip: set[int] = set()
        for module in model_or_params.modules():
            if isinstance(module, _NORM_TYPES):
                skip.update(id(p) for p in module.parameters(recurse=False))
        params = []
        for name, p in model_or_params.named_parameters():
            if p.requires_grad and id(p) not in skip and not name.rsplit(".", 1)[-1].startswith("bias"):
                params.append(p)
        return params
    params = [p for p in model_or_params]
    if exclude_bias_and_norm:
        # a bare parameter list has no names: drop 1-d tensors (biases and norm scales)
        params = [p for p in params if p.dim() > 1]
    return params


def _stack(norms: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Stack per-tensor norms (parameters of mixed dtypes are summed in float32)."""
    if len({n.dtype for n in norms}) > 1:
        norms = [n.float() for n in norms]
    return torch.stack(list(norms))


class RegularizedLoss(modules.NotScriptable, nn.Module):
    """``criterion(...) + l1 * sum |w| + l2 * sum w^2`` over a model's weights.

    ``l2`` multiplies the *squared* L2 norm by default (what weight decay adds), not the norm itself:
    the gradient is ``2 * l2 * w``. Adding ``l2 * ||w||`` instead would give a gradient
    ``l2 * w / ||w||`` of fixed size and a kink at zero.

    The loss-function guide's ``RegularizedLoss(base_criterion, model, l1_lambda, l2_lambda)`` adds
    the *unsquared* L2 norm of every parameter tensor, biases and normalisation parameters included
    (``sum_p ||p||_2``). That exact value is::

        RegularizedLoss(criterion, model, l1=0.01, l2=0.01, l2_squared=False,
                        exclude_bias_and_norm=False)

    or ``RegularizedLoss.from_guide(criterion, model, l1_lambda=0.01, l2_lambda=0.01)``. The guide's
    keyword names passed to the constructor raise a TypeError that names fastloss's.

    Args:
        criterion: the data loss (any callable returning a scalar tensor).
        model_or_params: an nn.Module, or an iterable of parameters (parameters with
            ``requires_grad=False`` are not regularised).
        l1, l2: coefficients (>= 0).
        exclude_bias_and_norm: skip biases and normalisation-layer parameters (for a plain
            parameter list: skip 1-d tensors).
        l2_squared: True (default): ``l2 * sum_p ||p||_2**2`` (= ``l2 * sum w^2``); False:
            ``l2 * sum_p ||p||_2``, the norm of each parameter tensor, unsquared (the guide's).

    The norms use multi-tensor (foreach) kernels: one launch for all parameters, not a loop.
    """

    def __init__(self, criterion=None, model_or_params=None, l1: float = 0.0, l2: float = 0.0,
                 exclude_bias_and_norm: bool = True, *, l2_squared: bool = True, **guide_keywords) -> None:
        if guide_keywords:
            _reject_guide_keywords(guide_keywords)
        if criterion is None or model_or_params is None:
            raise TypeError("RegularizedLoss() needs criterion and model_or_params: "
                            "RegularizedLoss(criterion, model_or_params, l1=0.0, l2=0.0, ...)")
        super().__init__()
        if l1 < 0 or l2 < 0:
            raise ValueError(f"l1 and l2 must be non-negative, got l1={l1}, l2={l2}")
        self.criterion = criterion
        self.l1 = float(l1)
        self.l2 = float(l2)
        self.exclude_bias_and_norm = exclude_bias_and_norm
        self.l2_squared = bool(l2_squared)
        # plain list, not registered: the parameters belong to the model
        self._params = _regularized_parameters(model_or_params, exclude_bias_and_norm)

    @classmethod
    def from_guide(cls, base_criterion, model, l1_lambda: float = 0.01, l2_lambda: float = 0.01
                   ) -> RegularizedLoss:
        """The guide's ``RegularizedLoss(base_criterion, model, l1_lambda=0.01, l2_lambda=0.01)``:
        ``base + l1_lambda * sum_p ||p||_1 + l2_lambda * sum_p ||p||_2`` over every parameter,
        biases included, the L2 norm unsquared."""
        return cls(base_criterion, model, l1=l1_lambda, l2=l2_lambda, exclude_bias_and_norm=False,
                   l2_squared=False)

    def penalty(self) -> Tensor:
        """l1 * sum|w| + l2 * sum w^2 (or l2 * sum_p ||p||_2 with ``l2_squared=False``) over the
        regularised parameters."""
        params = self._params
        if not params or (self.l1 == 0 and self.l2 == 0):
            p = params[0] if params else None
            return torch.zeros((), device=p.device if p is not None else None,
                               dtype=p.dtype if p is not None else None)
        total = 0
        if self.l1:
            total = total + self.l1 * _stack(torch._foreach_norm(params, 1)).sum()
        if self.l2:
            # norm backward is defined (zero) at p = 0
            norms = _stack(torch._foreach_norm(params, 2))
            total = total + self.l2 * (norms.square() if self.l2_squared else norms).sum()
        return total

    def forward(self, *args, **kwargs) -> Tensor:
        return self.criterion(*args, **kwargs) + self.penalty()

    def extra_repr(self) -> str:
        return (f"l1={self.l1}, l2={self.l2}, exclude_bias_and_norm={self.exclude_bias_and_norm}, "
                f"l2_squared={self.l2_squared}")


#: The guide's keyword names and fastloss's.
_GUIDE_KEYWORDS = {"l1_lambda": "l1", "l2_lambda": "l2", "base_criterion": "criterion", "model": "model_or_params"}


def _reject_guide_keywords(keywords: dict) -> None:
    """TypeError for unknown keywords, naming fastloss's keyword for each of the guide's."""
    names = ", ".join(repr(k) for k in keywords)
    hints = [f"{k}= is {_GUIDE_KEYWORDS[k]}=" for k in keywords if k in _GUIDE_KEYWORDS]
    msg = f"RegularizedLoss() got unexpected keyword argument(s) {names}"
    if hints:
        msg += (f"; fastloss's names: {', '.join(hints)}. Note that fastloss's l2 multiplies the squared "
                "L2 norm and skips biases and normalisation parameters by default; the guide's formula "
                "exactly is RegularizedLoss(criterion, model, l1=..., l2=..., l2_squared=False, "
                "exclude_bias_and_norm=False), or RegularizedLoss.from_guide(base_criterion, model, "
                "l1_lambda=..., l2_lambda=...)")
    raise TypeError(msg)
