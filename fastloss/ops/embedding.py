"""Launchers and autograd for the pairwise-distance losses (kernels/embedding.py).

``embedding_fwd`` is one torch.library custom op for the family (``loss`` = "contrastive" or
"triplet"): it returns the loss and, for reduced losses, the gradients of the three operands
computed in the same pass. Operands are ``(x, y, z)`` = (output1, output2, label) for the
contrastive loss and (anchor, positive, negative) for the triplet loss, each ``(n_rows, n_cols)``
(the label ``(n_rows,)``). Backward of a reduced loss scales those gradients by ``grad_output`` in
place (ops._common.scale_grad, a no-op on device when it is 1; in float16 and
bfloat16, where that product would round the gradients twice, ``embedding_rescale_`` instead keeps
them, scales them when grad_output is a power of two, or recomputes them: one launch, rounded once);
backward of ``reduction="none"`` recomputes them in one pass.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastloss import reference, specs
from fastloss.ops._common import HALF_DTYPES, scale_each, scale_grad, scale_grad_
from fastloss.ops._utils import (
    BackwardSteps,
    acc_dtype,
    autograd_pair,
    cdiv,
    count_launch,
    empty,
    next_pow2,
    pow2_align,
)

__all__ = ["LOSSES", "embedding_loss"]

#: Loss names understood by the kernels (the kinds of fastloss.specs's losses this module runs).
LOSSES = tuple(s.kind for s in specs.SPECS.values() if s.ops == "embedding")


@functools.cache
def _kernels():
    import triton.language as tl

    from fastloss.kernels import embedding as k

    return k, {torch.float32: tl.float32, torch.float64: tl.float64}


@functools.lru_cache(maxsize=1024)
def _block_config(n_cols: int) -> tuple[int, int, bool, int]:
    """(BLOCK_ROWS, BLOCK_COLS, SINGLE_PASS, num_warps) for rows of n_cols elements (cached)."""
    block_cols = min(next_pow2(max(n_cols, 1)), 1024)
    block_rows = max(1, 2048 // block_cols)
    return block_rows, block_cols, n_cols <= block_cols, 4 if block_rows * block_cols <= 1024 else 8



def _p_mode(p: float) -> int:
    return 1 if p == 1.0 else 2 if p == 2.0 else 0


def _grad_buffers(x: Tensor, y: Tensor, z: Tensor, want: tuple[bool, bool, bool]):
    return tuple(empty(t.shape, t.dtype, t.device) if w else t.new_empty(0) for t, w in zip((x, y, z), want))


def _fwd(
    x: Tensor,
    y: Tensor,
    z: Tensor,
    loss: str,
    margin: float,
    p: float,
    eps: float,
    swap: bool,
    reduction: str,
    grad_x: bool,
    grad_y: bool,
    grad_z: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and, for reduced losses, d(loss)/d(x, y, z) (empty tensors when not asked). The
    operands come first here (autograd_pair's order: tensors, parameters, gradient flags)."""
    k, tl_dtype = _kernels()
    x, y, z = x.contiguous(), y.contiguous(), z.contiguous()
    n_rows, n_cols = x.shape
    reduce = reduction != "none"
    acc = acc_dtype(x.dtype)
    want = (reduce and grad_x, reduce and grad_y, reduce and grad_z)
    gx, gy, gz = _grad_buffers(x, y, z, want)
    block_rows, block_cols, single, warps = _block_config(n_cols)
    n_programs = cdiv(n_rows, block_rows)
    out = empty((n_programs,), acc, x.device) if reduce else empty((n_rows,), x.dtype, x.device)
    count = n_rows if reduction == "mean" and n_rows else 1
    common = {"REDUCE": reduce, "ACC_DTYPE": tl_dtype[acc], "BLOCK_ROWS": block_rows,
              "BLOCK_COLS": block_cols, "SINGLE_PASS": single, "COL_ALIGN": pow2_align(n_cols),
              "num_warps": warps}
    if n_rows > 0:
        if loss == "contrastive":
            k.contrastive_fwd_kernel[(n_programs,)](
                x, y, z, out, gx, gy, gz, n_rows, n_cols, margin, eps, count,
                GRAD_X1=want[0], GRAD_X2=want[1], GRAD_LABEL=want[2], **common,
            )
            count_launch("contrastive_fwd_kernel")
        else:
            k.triplet_fwd_kernel[(n_programs,)](
                x, y, z, out, gx, gy, gz, n_rows, n_cols, margin, p, eps, count,
                P_MODE=_p_mode(p), SWAP=swap, GRAD_A=want[0], GRAD_P=want[1], GRAD_N=want[2], **common,
            )
            count_launch("triplet_fwd_kernel")
    if reduce:
        if n_rows == 0:
            out = x.new_full((), math.nan if reduction == "mean" else 0.0)
        else:
            out = out.sum().to(x.dtype)
    return out, gx, gy, gz


# The custom-op form of _fwd, for torch.compile (same signature; eager autograd calls _fwd)
embedding_fwd = torch.library.custom_op("fastloss::embedding_fwd", mutates_args=())(_fwd)


@embedding_fwd.register_fake
def _(x, y, z, loss, margin, p, eps, swap, reduction, grad_x, grad_y, grad_z):
    reduce = reduction != "none"
    out = x.new_empty(()) if reduce else x.new_empty(x.shape[:1])
    grads = tuple(t.new_empty(t.shape) if reduce and w else t.new_empty(0)
                  for t, w in zip((x, y, z), (grad_x, grad_y, grad_z)))
    return (out, *grads)


def _bwd(
    loss: str,
    x: Tensor,
    y: Tensor,
    z: Tensor,
    grad_output: Tensor,
    margin: float,
    p: float,
    eps: float,
    swap: bool,
    count: int,
    grad_x: bool,
    grad_y: bool,
    grad_z: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_output / count * d(loss)/d(x, y, z); grad_output is (n_rows,) or a scalar."""
    k, tl_dtype = _kernels()
    x, y, z = x.contiguous(), y.contiguous(), z.contiguous()
    n_rows, n_cols = x.shape
    gx, gy, gz = _grad_buffers(x, y, z, (grad_x, grad_y, grad_z))
    if grad_output.dim() == 0:
        go, stride = grad_output, 0
    else:
        go, stride = grad_output.contiguous(), 1
    block_rows, block_cols, single, warps = _block_config(n_cols)
    common = {"ACC_DTYPE": tl_dtype[acc_dtype(x.dtype)], "BLOCK_ROWS": block_rows,
              "BLOCK_COLS": block_cols, "SINGLE_PASS": single, "COL_ALIGN": pow2_align(n_cols),
              "num_warps": warps}
    grid = (cdiv(n_rows, block_rows),)
    if n_rows > 0 and (grad_x or grad_y or grad_z):
        if loss == "contrastive":
            k.contrastive_bwd_kernel[grid](
                x, y, z, go, gx, gy, gz, n_rows, n_cols, stride, margin, eps, count,
                GRAD_X1=grad_x, GRAD_X2=grad_y, GRAD_LABEL=grad_z, SCALE=False, **common,
            )
            count_launch("contrastive_bwd_kernel")
        else:
            k.triplet_bwd_kernel[grid](
                x, y, z, go, gx, gy, gz, n_rows, n_cols, stride, margin, p, eps, count,
                P_MODE=_p_mode(p), SWAP=swap, GRAD_A=grad_x, GRAD_P=grad_y, GRAD_N=grad_z, SCALE=False,
                **common,
            )
            count_launch("triplet_bwd_kernel")
    return gx, gy, gz


# The custom-op form of _bwd, for torch.compile (same signature; eager autograd calls _bwd)
embedding_bwd = torch.library.custom_op("fastloss::embedding_bwd", mutates_args=())(_bwd)


@embedding_bwd.register_fake
def _(loss, x, y, z, grad_output, margin, p, eps, swap, count, grad_x, grad_y, grad_z):
    return tuple(t.new_empty(t.shape) if w else t.new_empty(0)
                 for t, w in zip((x, y, z), (grad_x, grad_y, grad_z)))



def _rescale(
    loss: str,
    x: Tensor,
    y: Tensor,
    z: Tensor,
    grad_output: Tensor,
    grad_x: Tensor | None,
    grad_y: Tensor | None,
    grad_z: Tensor | None,
    margin: float,
    p: float,
    eps: float,
    swap: bool,
    count: int,
) -> None:
    """A reduced 16-bit loss's forward-made gradients (None where not made) times the scalar
    grad_output in place, rounded once: kept when grad_output is 1, scaled when it is a power of
    two (rows where that is not exact are recomputed), otherwise recomputed from the operands with
    grad_output applied before the rounding. One launch, no host sync."""
    k, tl_dtype = _kernels()
    x, y, z = x.contiguous(), y.contiguous(), z.contiguous()
    n_rows, n_cols = x.shape
    want = (grad_x is not None, grad_y is not None, grad_z is not None)
    if n_rows == 0 or not any(want):
        return
    gx, gy, gz = (g if g is not None else t for g, t in zip((grad_x, grad_y, grad_z), (x, y, z)))
    block_rows, block_cols, single, warps = _block_config(n_cols)
    common = {"SCALE": True, "ACC_DTYPE": tl_dtype[acc_dtype(x.dtype)], "BLOCK_ROWS": block_rows,
              "BLOCK_COLS": block_cols, "SINGLE_PASS": single, "COL_ALIGN": pow2_align(n_cols),
              "num_warps": warps}
    grid = (cdiv(n_rows, block_rows),)
    if loss == "contrastive":
        k.contrastive_bwd_kernel[grid](
            # pointers: operands, grad_output (a scalar), the gradients scaled in place
            x, y, z, grad_output, gx, gy, gz,
            # sizes, grad_output's stride, parameters
            n_rows, n_cols, 0, margin, eps, count,
            GRAD_X1=want[0], GRAD_X2=want[1], GRAD_LABEL=want[2], **common,
        )
        count_launch("contrastive_bwd_kernel")
    else:
        k.triplet_bwd_kernel[grid](
            x, y, z, grad_output, gx, gy, gz,
            n_rows, n_cols, 0, margin, p, eps, count,
            P_MODE=_p_mode(p), SWAP=swap, GRAD_A=want[0], GRAD_P=want[1], GRAD_N=want[2], **common,
        )
        count_launch("triplet_bwd_kernel")


# The custom-op form of _rescale, for torch.compile (same signature; eager autograd calls _rescale)
embedding_rescale_ = torch.library.custom_op(
    "fastloss::embedding_rescale_", mutates_args=("grad_x", "grad_y", "grad_z"))(_rescale)


@embedding_rescale_.register_fake
def _(loss, x, y, z, grad_output, grad_x, grad_y, grad_z, margin, p, eps, swap, count):
    return None


class _Params(NamedTuple):
    """The non-tensor arguments of the forward, as they cross autograd."""

    loss: str       # "contrastive" or "triplet"
    margin: float
    p: float        # the triplet loss's norm degree
    eps: float
    swap: bool
    reduction: str


def _setup_context(ctx, tensors, params: _Params, want, output):
    ctx.save_for_backward(*tensors)
    # A reduced loss's gradients are made by the forward (None where not asked)
    return tuple(g if w else None for g, w in zip(output[1:], want)) if params.reduction != "none" else None


def _count(params: _Params, n_rows: int) -> int:
    """The divisor of every row's gradient in a backward launch: n_rows for "mean"."""
    return n_rows if params.reduction == "mean" and n_rows else 1


def _scale_stored(ctx, grad_loss: Tensor, stored: tuple, steps: BackwardSteps) -> tuple:
    x, y, z = ctx.saved_tensors
    params = ctx.params
    if x.dtype in HALF_DTYPES:  # scaling would round the stored gradients a second time
        steps.rescale(params.loss, x, y, z, grad_loss, *stored, params.margin, params.p, params.eps,
                      params.swap, _count(params, x.shape[0]))
    else:
        scale_each(stored, grad_loss, steps.scale_grad)
    return stored


def _recompute(ctx, grad_loss: Tensor, steps: BackwardSteps) -> tuple:
    """reduction="none", or a second backward through a reduced loss (retain_graph=True) whose
    forward-made gradients were already handed out: from the operands."""
    x, y, z = ctx.saved_tensors
    params = ctx.params
    return steps.bwd(params.loss, x, y, z, grad_loss, params.margin, params.p, params.eps, params.swap,
                     _count(params, x.shape[0]), *ctx.needs_input_grad[:3])


def _reference(ctx) -> tuple[Tensor, tuple]:
    """The loss again in PyTorch, from the saved operands (for a double backward)."""
    x, y, z = ctx.saved_tensors
    params = ctx.params
    if params.loss == "contrastive":
        out = reference.contrastive_loss(x, y, z, params.margin, params.reduction)
    else:
        out = reference.triplet_margin_loss(x, y, z, params.margin, params.p, params.eps, params.swap,
                                            params.reduction)
    return out, (x, y, z)


_apply = autograd_pair(
    embedding_fwd, _fwd, _Params, 3,
    setup_context=_setup_context, scale_stored=_scale_stored, recompute=_recompute, reference=_reference,
    eager=BackwardSteps(bwd=_bwd, rescale=_rescale, scale_grad=scale_grad),
    traced=BackwardSteps(bwd=embedding_bwd, rescale=embedding_rescale_, scale_grad=scale_grad_, eager=False),
)


def embedding_loss(
    loss: str,
    x: Tensor,
    y: Tensor,
    z: Tensor,
    margin: float,
    p: float = 2.0,
    eps: float = 1e-6,
    swap: bool = False,
    reduction: str = "mean",
) -> Tensor:
    """Run one loss of the family on the kernels. Operands must be validated, 2-D ``(rows, D)`` (the
    contrastive label ``(rows,)``) and of one floating dtype; the result has x's dtype and, for
    ``reduction="none"``, shape ``(rows,)``."""
    grad = torch.is_grad_enabled()
    return _apply(x, y, z, _Params(loss, float(margin), float(p), float(eps), bool(swap), reduction),
                  (grad and x.requires_grad, grad and y.requires_grad, grad and z.requires_grad))
