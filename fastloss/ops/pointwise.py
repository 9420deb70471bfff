"""Launchers and autograd for the pointwise loss family (kernels/pointwise.py).

``pointwise_fwd`` is one torch.library custom op for every loss of the family: it returns the loss
and, for reduced losses, the gradients computed in the same pass. Backward of a reduced loss only
scales those gradients by ``grad_output`` in place (a no-op on device when it is 1; in float16 and
bfloat16, where that product would round the gradient twice, ``pointwise_rescale_`` recomputes it
instead unless grad_output is a power of two); backward of ``reduction="none"`` recomputes the
gradients from input and target in one pass.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastloss import reference, specs
from fastloss.ops._common import (
    HALF_DTYPES,
    flat_block_config,
    max_programs,
    scale_each,
    scale_grad,
    scale_grad_,
)
from fastloss.ops._utils import BackwardSteps, acc_dtype, autograd_pair, cdiv, count_launch, empty

__all__ = ["LOSSES", "MAX_MEMBERS", "pointwise_combination", "pointwise_loss"]

_SPECS = specs.by_family("pointwise")

#: Loss names understood by the kernels (the pointwise specs' kinds); each maps to the spec's
#: ``*_terms`` function in kernels/pointwise.py.
LOSSES = tuple(s.kind for s in _SPECS)


def _reference_call(spec: specs.LossSpec):
    """The spec's fastloss.reference function as ``f(input, target, weight, pos_weight, reduction,
    param1, param2)``: param1 and param2 go to the keywords the spec's ``kernel_params`` name (cast
    to bool where the reference's default is one), weight and pos_weight only when given."""
    fn = getattr(reference, spec.reference)
    signature = inspect.signature(fn).parameters
    names = [(n, bool if isinstance(signature[n].default, bool) else float) for n in spec.kernel_params]

    def call(input, target, weight, pos_weight, reduction, *kernel_params):
        kwargs = {n: cast(v) for (n, cast), v in zip(names, kernel_params)}
        if weight is not None:
            kwargs["weight"] = weight
        if pos_weight is not None:
            kwargs["pos_weight"] = pos_weight
        return fn(input, target, reduction=reduction, **kwargs)

    return call


#: The PyTorch evaluation of each loss (what a double backward differentiates), by kind.
_REFERENCES = {s.kind: _reference_call(s) for s in _SPECS}

#: Most member losses one kernel pass evaluates (TERMS, TERMS_B, TERMS_C in the kernels).
MAX_MEMBERS = 3

@functools.cache
def _kernels():
    import triton.language as tl

    from fastloss.kernels import pointwise as k

    terms = {s.kind: getattr(k, s.terms) for s in _SPECS}
    return k, terms, {torch.float32: tl.float32, torch.float64: tl.float64}


def _broadcast_layout(t: Tensor | None, shape: torch.Size) -> tuple[Tensor | None, int, int]:
    """(flat storage, inner, period) so that element i of ``shape`` reads storage[(i // inner) % period].

    Exact without a copy when the dimensions where ``t`` is not 1 form one contiguous run of the
    broadcast shape (a per-class (C,) weight, a per-sample (N, 1) weight); other layouts are
    expanded into a full copy.
    """
    if t is None:
        return None, 1, 1
    dims = [1] * (len(shape) - t.dim()) + list(t.shape)
    big = [i for i, s in enumerate(dims) if s != 1]
    if not big:
        return t.reshape(1).contiguous(), 1, 1
    first, last = big[0], big[-1] + 1
    if all(dims[i] == shape[i] for i in range(first, last)):
        return t.contiguous().reshape(-1), math.prod(shape[last:]), math.prod(shape[first:last])
    return t.expand(shape).contiguous().reshape(-1), 1, math.prod(shape)


#: _member_args results by (losses, params, scale, terms table); cleared when full.
_MEMBER_ARGS_CACHE: dict[tuple, dict] = {}
_MEMBER_ARGS_CACHE_SIZE = 1024


def _member_args(losses: str, params: list[float], scale: float) -> dict:
    """Kernel keyword arguments of the members: ``losses`` is a comma-separated list of names,
    ``params`` holds (coef, param1, param2) per loss; every coef is multiplied by ``scale``;
    absent members get TERMS_* = None. Cached (callers unpack the dict, never change it)."""
    _, terms, _ = _kernels()
    key = (losses, tuple(params), scale, id(terms))
    kwargs = _MEMBER_ARGS_CACHE.get(key)
    if kwargs is None:
        if len(_MEMBER_ARGS_CACHE) >= _MEMBER_ARGS_CACHE_SIZE:
            _MEMBER_ARGS_CACHE.clear()
        kwargs = _MEMBER_ARGS_CACHE[key] = _work_out_member_args(terms, losses, params, scale)
    return kwargs


def _work_out_member_args(terms: dict, losses: str, params: list[float], scale: float) -> dict:
    names = losses.split(",")
    kwargs = {}
    for i, suffix in enumerate(("", "_b", "_c")):
        present = i < len(names)
        coef, param1, param2 = params[3 * i:3 * i + 3] if present else (0.0, 0.0, 0.0)
        kwargs["TERMS" + suffix.upper()] = terms[names[i]] if present else None
        kwargs["coef" + suffix] = coef * scale
        kwargs["param1" + suffix] = param1
        kwargs["param2" + suffix] = param2
    return kwargs


def _launch_args(input: Tensor, weight: Tensor | None, pos_weight: Tensor | None):
    w, w_inner, w_period = _broadcast_layout(weight, input.shape)
    pw, pw_inner, pw_period = _broadcast_layout(pos_weight, input.shape)
    return (w if w is not None else input, pw if pw is not None else input,
            (w_inner, w_period, pw_inner, pw_period))


def _fwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    losses: str,
    params: list[float],
    reduction: str,
    grad_input: bool,
    grad_target: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """sum_k coef_k loss_k and, for reduced losses, its d/d(input) and d/d(target) (empty when not
    asked). ``params`` holds (coef, param1, param2) for each name in ``losses`` (comma-separated)."""
    k, _, tl_dtype = _kernels()
    x, y = input.contiguous(), target.contiguous()
    n = x.numel()
    reduce = reduction != "none"
    acc = acc_dtype(x.dtype)
    want_gi, want_gt = reduce and grad_input, reduce and grad_target
    gi = empty(x.shape, x.dtype, x.device) if want_gi else x.new_empty(0)
    gt = empty(x.shape, x.dtype, x.device) if want_gt else x.new_empty(0)
    block, warps = flat_block_config(n)
    n_programs = cdiv(n, block)
    out = empty((n_programs,), acc, x.device) if reduce else empty(x.shape, x.dtype, x.device)
    w, pw, layout = _launch_args(x, weight, pos_weight)
    if n > 0:
        k.pointwise_fwd_kernel[(n_programs,)](
            x, y, w, pw, out, gi, gt, n, *layout,
            **_member_args(losses, params, 1.0 / n if reduction == "mean" else 1.0),
            HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
            REDUCE=reduce, GRAD_INPUT=want_gi, GRAD_TARGET=want_gt,
            ACC_DTYPE=tl_dtype[acc], BLOCK_SIZE=block, num_warps=warps,
        )
        count_launch("pointwise_fwd_kernel")
    if reduce:
        if n == 0:
            out = x.new_full((), math.nan if reduction == "mean" else 0.0)
        else:
            out = out.sum().to(x.dtype)
    return out, gi, gt


# The custom-op form of _fwd, for torch.compile (same signature; eager autograd calls _fwd)
pointwise_fwd = torch.library.custom_op("fastloss::pointwise_fwd", mutates_args=())(_fwd)


@pointwise_fwd.register_fake
def _(input, target, weight, pos_weight, losses, params, reduction, grad_input, grad_target):
    reduce = reduction != "none"
    out = input.new_empty(()) if reduce else input.new_empty(input.shape)
    gi = input.new_empty(input.shape) if reduce and grad_input else input.new_empty(0)
    gt = input.new_empty(input.shape) if reduce and grad_target else input.new_empty(0)
    return out, gi, gt


def _bwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    grad_output: Tensor,
    losses: str,
    params: list[float],
    scale: float,
    grad_input: bool,
    grad_target: bool,
) -> tuple[Tensor, Tensor]:
    """grad_output * d(sum_k scale coef_k loss_k)/d(input|target); grad_output has input's shape or
    is a scalar."""
    k, _, tl_dtype = _kernels()
    x, y = input.contiguous(), target.contiguous()
    n = x.numel()
    acc = acc_dtype(x.dtype)
    gi = empty(x.shape, x.dtype, x.device) if grad_input else x.new_empty(0)
    gt = empty(x.shape, x.dtype, x.device) if grad_target else x.new_empty(0)
    if all(s == 0 for s in grad_output.stride()):
        # a scalar, or one broadcast to the loss's shape (``loss.sum().backward()`` gives that):
        # every program reads its one element, no loss-sized copy
        go, stride = grad_output, 0
    else:
        go, stride = grad_output.expand(x.shape).contiguous(), 1
    w, pw, layout = _launch_args(x, weight, pos_weight)
    block, warps = flat_block_config(n)
    if n > 0 and (grad_input or grad_target):
        k.pointwise_bwd_kernel[(cdiv(n, block),)](
            x, y, w, pw, go, gi, gt, n, stride, *layout, **_member_args(losses, params, scale),
            HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
            GRAD_INPUT=grad_input, GRAD_TARGET=grad_target, SCALE=False,
            ACC_DTYPE=tl_dtype[acc], BLOCK_SIZE=block, num_warps=warps,
        )
        count_launch("pointwise_bwd_kernel")
    return gi, gt


# The custom-op form of _bwd, for torch.compile (same signature; eager autograd calls _bwd)
pointwise_bwd = torch.library.custom_op("fastloss::pointwise_bwd", mutates_args=())(_bwd)


@pointwise_bwd.register_fake
def _(input, target, weight, pos_weight, grad_output, losses, params, scale, grad_input, grad_target):
    gi = input.new_empty(input.shape) if grad_input else input.new_empty(0)
    gt = input.new_empty(input.shape) if grad_target else input.new_empty(0)
    return gi, gt


def _rescale(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    grad_output: Tensor,
    grad_input: Tensor | None,
    grad_target: Tensor | None,
    losses: str,
    params: list[float],
    scale: float,
) -> None:
    """grad_input and grad_target (a reduced 16-bit loss's forward-made gradients, either may be
    None) times the scalar grad_output in place, rounded once: nothing when grad_output is 1, the
    stored values scaled when it is a power of two (exact where the result is representable), else
    recomputed from input and target with grad_output applied before the rounding. One launch."""
    k, _, tl_dtype = _kernels()
    x, y = input.contiguous(), target.contiguous()
    n = x.numel()
    if n == 0 or (grad_input is None and grad_target is None):
        return
    w, pw, layout = _launch_args(x, weight, pos_weight)
    block, warps = flat_block_config(n)
    grid = min(cdiv(n, block), max_programs(x.device))
    k.pointwise_bwd_kernel[(grid,)](
        # pointers: operands, grad_output (a scalar), the gradients scaled in place
        x, y, w, pw, grad_output,
        grad_input if grad_input is not None else x, grad_target if grad_target is not None else x,
        # sizes, broadcast layouts, members
        n, 0, *layout, **_member_args(losses, params, scale),
        # options
        HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
        GRAD_INPUT=grad_input is not None, GRAD_TARGET=grad_target is not None, SCALE=True,
        ACC_DTYPE=tl_dtype[acc_dtype(x.dtype)], BLOCK_SIZE=block, num_warps=warps,
    )
    count_launch("pointwise_bwd_kernel")


# The custom-op form of _rescale, for torch.compile (same signature; eager autograd calls _rescale)
pointwise_rescale_ = torch.library.custom_op(
    "fastloss::pointwise_rescale_", mutates_args=("grad_input", "grad_target"))(_rescale)


@pointwise_rescale_.register_fake
def _(input, target, weight, pos_weight, grad_output, grad_input, grad_target, losses, params, scale):
    return None


class _Params(NamedTuple):
    """The non-tensor arguments of the family's forward, as they cross autograd."""

    losses: str          # member names, comma-separated
    params: list[float]  # (coef, param1, param2) per member
    reduction: str


def _setup_context(ctx, tensors, p: _Params, want, output):
    ctx.save_for_backward(*tensors)
    # A reduced loss's gradients are made by the forward (None where not asked)
    return (output[1] if want[0] else None, output[2] if want[1] else None) if p.reduction != "none" else None


def _mean_scale(p: _Params, input: Tensor) -> float:
    """The factor of every coef in a backward launch: 1 / n for "mean"."""
    return 1.0 / input.numel() if p.reduction == "mean" and input.numel() else 1.0


def _scale_stored(ctx, grad_loss: Tensor, stored: tuple, steps: BackwardSteps) -> tuple:
    input, target, weight, pos_weight = ctx.saved_tensors
    p = ctx.params
    if input.dtype in HALF_DTYPES:  # scaling would round the stored gradients a second time
        steps.rescale(input, target, weight, pos_weight, grad_loss, *stored, p.losses, p.params,
                      _mean_scale(p, input))
    else:
        scale_each(stored, grad_loss, steps.scale_grad)
    return stored


def _recompute(ctx, grad_loss: Tensor, steps: BackwardSteps) -> tuple:
    """reduction="none", or a second backward through a reduced loss (retain_graph=True), whose
    forward-made gradients were already handed out: from input and target."""
    input, target, weight, pos_weight = ctx.saved_tensors
    p = ctx.params
    return steps.bwd(input, target, weight, pos_weight, grad_loss, p.losses, p.params, _mean_scale(p, input),
                     *ctx.needs_input_grad[:2])


def _reference(ctx) -> tuple[Tensor, tuple]:
    """The loss again in PyTorch, from the saved operands (for a double backward)."""
    input, target, weight, pos_weight = ctx.saved_tensors
    p = ctx.params
    params = p.params
    loss = sum(params[3 * i] * _REFERENCES[name](input, target, weight, pos_weight, p.reduction,
                                                 *params[3 * i + 1:3 * i + 3])
               for i, name in enumerate(p.losses.split(",")))
    return loss, (input, target)


_apply = autograd_pair(
    pointwise_fwd, _fwd, _Params, 4,
    setup_context=_setup_context, scale_stored=_scale_stored, recompute=_recompute, reference=_reference,
    eager=BackwardSteps(bwd=_bwd, rescale=_rescale, scale_grad=scale_grad),
    traced=BackwardSteps(bwd=pointwise_bwd, rescale=pointwise_rescale_, scale_grad=scale_grad_, eager=False),
)


def _run(input: Tensor, target: Tensor, weight: Tensor | None, pos_weight: Tensor | None,
         losses: str, params: list[float], reduction: str) -> Tensor:
    grad = torch.is_grad_enabled()
    return _apply(input, target, weight, pos_weight, _Params(losses, params, reduction),
                  (grad and input.requires_grad, grad and target.requires_grad))


def pointwise_loss(
    loss: str,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    param1: float = 0.0,
    param2: float = 0.0,
    reduction: str = "mean",
    coef: float = 1.0,
) -> Tensor:
    """Run one loss of the family on the kernels. Operands must be validated, broadcast, one dtype.

    ``coef`` multiplies the loss (and its gradients) inside the kernels: kl_div's "batchmean" is
    reduction "sum" with coef 1 / input.size(0) (the size before broadcasting, as torch divides by).

    Under torch.compile the torch.library custom ops are traced (no graph break); in eager mode an
    autograd.Function calls the same launchers directly.
    """
    if loss == "bce_with_logits":  # its param1 says whether a pos_weight was given (see its terms)
        param1 = 1.0 if pos_weight is not None else 0.0
    return _run(input, target, weight, pos_weight, loss, [float(coef), float(param1), float(param2)], reduction)


def pointwise_combination(
    members: list[tuple[str, float, float, float]], input: Tensor, target: Tensor, reduction: str = "mean"
) -> Tensor:
    """``sum_k coef_k * loss_k(input, target)`` in one kernel pass; ``members`` holds
    (loss, coef, param1, param2) for at most MAX_MEMBERS losses, all with this reduction."""
    if not 0 < len(members) <= MAX_MEMBERS:
        raise ValueError(f"pointwise_combination takes 1 to {MAX_MEMBERS} members, got {len(members)}")
    losses = ",".join(m[0] for m in members)
    params = [float(v) for m in members for v in m[1:]]
    return _run(input, target, None, None, losses, params, reduction)
