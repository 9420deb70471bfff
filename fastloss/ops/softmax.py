"""Launchers and autograd for the softmax row family (kernels/softmax.py): cross-entropy and
softmax focal loss.

``softmax_loss_fwd`` is one torch.library custom op for both losses: it returns the loss and the
gradients with respect to the logits (and to probability targets) made in the same pass. For a
reduced loss they are already divided by the "mean" denominator, which a one-program kernel
computes on device first (no host sync); backward only scales them by ``grad_output`` in place, a
no-op on device when it is 1. For ``reduction="none"`` backward multiplies each row by its
``grad_output``.

16-bit logits: scaling a stored 16-bit gradient would round it twice, so ``_bwd`` (custom op
``softmax_loss_bwd_``, kernel cross_entropy_bwd_kernel) applies grad_output in fp32 before the one
rounding. For ``reduction="none"`` the forward makes no gradient and backward computes it from the
saved logits. For a reduced loss backward scales the stored gradient when grad_output is 0 or
2**-k, k >= 0 (exact: 1 costs nothing, loss / 2**k one pass over the gradient) and recomputes it
from the logits otherwise (a loss scale 2**16 included: float16 gradients stored below 6.1e-5 kept
fewer bits), a branch taken on device (no host sync). With ``inplace_backward=True`` the logits are
gone: the stored gradient is scaled as for fp32 (rounded twice where grad_output is not exact).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastloss import reference, specs
from fastloss.ops._common import HALF_DTYPES, scale_each, scale_grad, scale_grad_
from fastloss.ops._common import check_targets_cpu as _check_targets_cpu  # the name tests patch
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

__all__ = ["KINDS", "softmax_loss"]

#: Loss names understood by the row kernel (the kinds of fastloss.specs's losses this module runs).
KINDS = tuple(s.kind for s in specs.SPECS.values() if s.ops == "softmax")

#: Longest row (in classes) kept on chip in one block and read once; longer rows are looped (an
#: online log-sum-exp pass, then the gradient pass, whose reads mostly hit L2). Measured on an
#: H200: 16-bit rows longer than 8K classes run faster looped, 32-bit rows up to 32K faster fused.
MAX_FUSED_COLS = 32768
MAX_FUSED_COLS_16BIT = 8192
#: Column block of the looped kernel, and the one for 16-bit rows over 64K classes.
LOOP_BLOCK = 8192
LOOP_BLOCK_16BIT_LONG = 4096
#: Elements of one program's tile when several short rows share a program.
ROW_TILE = 2048
#: Column offsets at or past this need int64 arithmetic in the kernel.
INT32_OFFSET_LIMIT = 2**31


@functools.cache
def _kernels():
    import triton.language as tl

    from fastloss.kernels import softmax as k

    return k, {torch.float32: tl.float32, torch.float64: tl.float64}



def _warps(tile: int) -> int:
    return 4 if tile <= 1024 else 8 if tile <= 8192 else 16 if tile <= 16384 else 32


def _row_config(n_rows: int, n_cols: int, dtype: torch.dtype) -> tuple[int, int, bool, int]:
    """(BLOCK_ROWS, BLOCK_SIZE, SINGLE_PASS, num_warps) for rows of n_cols classes of ``dtype``."""
    size = dtype.itemsize
    limit = MAX_FUSED_COLS // 2 if size == 8 else MAX_FUSED_COLS
    if size == 2:
        limit = min(limit, MAX_FUSED_COLS_16BIT)
    if n_cols <= limit:
        block = next_pow2(n_cols)
        rows = max(1, min(ROW_TILE // block, next_pow2(n_rows), 64))
        return rows, block, True, _warps(rows * block)
    if size == 2 and n_cols > 65536:
        return 1, min(LOOP_BLOCK, LOOP_BLOCK_16BIT_LONG), False, 4
    block = min(LOOP_BLOCK, next_pow2(n_cols))
    return 1, block, False, 16 if block >= 8192 else _warps(block)


def _rows_view(t: Tensor, n_cols: int) -> Tensor:
    """(N, C, D) view (or copy, when the trailing dims cannot be flattened) of a logits-like tensor."""
    if t.dim() == 1:
        return t.reshape(1, n_cols, 1)
    return t.reshape(t.shape[0], n_cols, math.prod(t.shape[2:]))


def _loss_shape(input: Tensor) -> tuple[int, ...]:
    """Shape of a reduction="none" loss, as torch's: () for a (C,) input (even with a (1,) target)."""
    return () if input.dim() == 1 else (input.shape[0], *input.shape[2:])


def _cols_need_int64(n_cols: int, *col_strides: int) -> bool:
    """Whether a column offset ``(n_cols - 1) * stride`` of some operand overflows int32 (the
    kernel then computes column offsets in int64; row offsets always are)."""
    return (n_cols - 1) * max(abs(s) for s in col_strides) >= INT32_OFFSET_LIMIT


def _row_align(n_inner: int, n_cols: int, *strides: tuple[int, int, int]) -> int:
    """ROW_ALIGN of the row kernel: the largest power of two, at most 16, dividing the class count
    and the first element offset ``n * stride_n + d * stride_d`` of every row of every (N, C, D)
    operand (the probability-target gradient's rows start at ``n * C * D + d``)."""
    if n_inner > 1:
        return pow2_align(1)
    return pow2_align(n_cols, *(stride_n for stride_n, _, _ in strides))


def _peel(single: bool, n_inner: int, row_align: int, x: Tensor, g: Tensor | None) -> int:
    """PEEL of the row kernel: for looped rows that are not 16-byte aligned, 16 bytes in elements,
    when logits and gradient rows are equally misaligned (same row stride, column stride 1, D = 1,
    both 16-byte aligned at the start), else 1 (the walk starts at column 0)."""
    vec = 16 // x.element_size()
    if single or n_inner != 1 or row_align >= vec or x.stride(1) != 1 or x.data_ptr() % 16:
        return 1
    if g is not None and (g.stride(0) != x.stride(0) or g.stride(1) != 1 or g.data_ptr() % 16):
        return 1
    return vec


def _may_overwrite(input: Tensor) -> bool:
    """Whether ``inplace_backward`` may write the gradient into ``input``: its memory must be
    contiguous, and it must not be (a view of) a leaf that requires grad, such as a parameter:
    torch forbids in-place changes to those (the gradient then goes to a buffer of its own)."""
    base = input if input._base is None else input._base
    return input.is_contiguous() and not (base.is_leaf and base.requires_grad)


def _grads_in_forward(dtype: torch.dtype, reduction: str) -> bool:
    """Whether the forward makes the gradients (when asked): not for reduction="none" on 16-bit
    logits, whose backward computes them with the per-row grad_output applied before rounding."""
    return reduction != "none" or dtype not in HALF_DTYPES


def _quiet_interpreter(device: torch.device):
    """Masked lanes compute with -inf by design; on CPU (Triton's interpreter runs numpy) silence
    numpy's warnings about them."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    import numpy

    return numpy.errstate(all="ignore")


#: Launch configurations of the row kernels already worked out (see _launch_meta); cleared when full.
_LAUNCH_CACHE: dict[tuple, tuple[int, tuple, dict, bool]] = {}
_LAUNCH_CACHE_SIZE = 1024


def _launch_meta(x: Tensor, g3: Tensor | None, y: Tensor, gt: Tensor | None, prob: bool,
                 n_cols: int) -> tuple[int, tuple, dict]:
    """(grid size, stride arguments, compile-time arguments) of the row kernels for (N, C, D) logits
    ``x``, gradient ``g3`` (None when not written), targets ``y`` and target gradient ``gt``.

    Cached per shapes, strides, dtype and flags (and the tuning constants, which tests and sweeps
    change): only PEEL of looped misaligned rows, which also depends on the data pointers, is
    worked out per call."""
    y_strides = y.stride() if prob else None
    key = (x.shape, x.stride(), g3.stride() if g3 is not None else None, y_strides, gt is not None, n_cols,
           x.dtype, MAX_FUSED_COLS, MAX_FUSED_COLS_16BIT, LOOP_BLOCK, LOOP_BLOCK_16BIT_LONG, ROW_TILE,
           INT32_OFFSET_LIMIT, _row_config)
    hit = _LAUNCH_CACHE.get(key)
    if hit is None:
        if len(_LAUNCH_CACHE) >= _LAUNCH_CACHE_SIZE:
            _LAUNCH_CACHE.clear()
        hit = _LAUNCH_CACHE[key] = _launch_config(x, g3, y_strides or (0, 0, 0), gt, prob, n_cols)
    grid, strides, meta, peel = hit
    if peel:
        meta = {**meta, "PEEL": _peel(meta["SINGLE_PASS"], x.shape[2], meta["ROW_ALIGN"], x, g3)}
    return grid, strides, meta


def _launch_config(x: Tensor, g3: Tensor | None, y_strides: tuple, gt: Tensor | None, prob: bool,
                   n_cols: int) -> tuple[int, tuple, dict, bool]:
    """_launch_meta's result worked out, with PEEL 1 and whether PEEL depends on the pointers."""
    n_rows = x.shape[0] * x.shape[2]
    rows, block, single, warps = _row_config(n_rows, n_cols, x.dtype)
    row_align = _row_align(x.shape[2], n_cols, x.stride(), *([g3.stride()] if g3 is not None else []),
                           *([y_strides] if prob else []))
    strides = (*x.stride(), *(g3.stride() if g3 is not None else (0, 0, 0)), *y_strides)
    meta = {
        "SINGLE_PASS": single,
        "COLS_I64": _cols_need_int64(n_cols, x.stride(1), g3.stride(1) if g3 is not None else 0,
                                     y_strides[1], x.shape[2] if gt is not None else 0),
        "ROW_ALIGN": row_align, "PEEL": 1,
        "BLOCK_ROWS": rows, "BLOCK_SIZE": block, "num_warps": warps,
    }
    peel = not (single or x.shape[2] != 1 or row_align >= 16 // x.element_size() or x.stride(1) != 1)
    return cdiv(n_rows, rows), strides, meta, peel


def _options(kind: str, prob: bool, weight: Tensor | None, alpha_weight: Tensor | None,
             label_smoothing: float, z_loss: float, softcap: float, reduction: str,
             acc: torch.dtype) -> dict:
    """The compile-time switches of the row kernels that follow from the loss's options."""
    _, tl_dtype = _kernels()
    return {
        "FOCAL": kind == "focal", "PROB_TARGET": prob, "HAS_WEIGHT": weight is not None,
        "HAS_ALPHA": alpha_weight is not None, "HAS_SMOOTHING": label_smoothing != 0.0,
        "HAS_Z_LOSS": z_loss != 0.0, "HAS_SOFTCAP": softcap != 0.0,
        "SCALE_BY_DENOM": reduction == "mean" and not prob,
        "MEAN_OVER_ROWS": reduction == "mean" and prob, "ACC_DTYPE": tl_dtype[acc],
    }


def _fwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    alpha_weight: Tensor | None,
    kind: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    alpha: float,
    gamma: float,
    reduction: str,
    out_float32: bool,
    inplace: bool,
    grad_input: bool,
    grad_target: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss, d(loss)/d(input), d(loss)/d(target) and the "mean" denominator (each gradient empty when
    not asked or left to backward, see _grads_in_forward; the denominator empty unless used).

    ``input`` is (C,), (N, C) or (N, C, d1, ...); ``target`` class indices of the input's shape
    without the class dimension, or probabilities of the input's shape. With ``inplace`` the input
    gradient is written into ``input`` itself when its layout allows.
    """
    k, _ = _kernels()
    prob = target.is_floating_point()
    n_cols = input.shape[0] if input.dim() == 1 else input.shape[1]
    if not prob and input.device.type == "cpu":
        _check_targets_cpu(target, n_cols, ignore_index)
    x = _rows_view(input, n_cols)
    n_rows = x.shape[0] * x.shape[2]
    acc = acc_dtype(input.dtype)
    out_dtype = torch.float32 if out_float32 else input.dtype
    reduce = reduction != "none"

    overwrite = grad_input and inplace and _may_overwrite(input)
    if not (overwrite or _grads_in_forward(input.dtype, reduction)):
        grad_input = grad_target = False  # backward computes them
    if overwrite:
        gi, g3 = input, x  # x is a view of input
    elif grad_input:
        gi = empty(input.shape, input.dtype, input.device)
        g3 = _rows_view(gi, n_cols)
    else:
        gi = g3 = input.new_empty(0)
    gt = empty(target.shape, target.dtype, target.device) if grad_target else target.new_empty(0)
    y = _rows_view(target, n_cols) if prob else target.reshape(-1).contiguous()
    loss = empty((n_rows,), acc if reduce else out_dtype, input.device)

    options = _options(kind, prob, weight, alpha_weight, label_smoothing, z_loss, softcap, reduction, acc)
    denom = empty((), acc, input.device) if options["SCALE_BY_DENOM"] else input.new_empty(0, dtype=acc)
    w = weight.contiguous() if weight is not None else x
    a = alpha_weight.contiguous() if alpha_weight is not None else x
    if n_rows > 0:
        with _quiet_interpreter(input.device):
            if options["SCALE_BY_DENOM"]:
                k.cross_entropy_denom_kernel[(1,)](
                    y, w, denom, n_rows, n_cols, ignore_index,
                    HAS_WEIGHT=weight is not None, ACC_DTYPE=options["ACC_DTYPE"], BLOCK_SIZE=4096, num_warps=8,
                )
                count_launch("cross_entropy_denom_kernel")
            grid, strides, meta = _launch_meta(x, g3 if grad_input else None, y, gt if grad_target else None,
                                               prob, n_cols)
            k.cross_entropy_fwd_kernel[(grid,)](
                x, y, w, a, loss, g3, gt, denom if options["SCALE_BY_DENOM"] else loss,  # pointers
                n_rows, n_cols, x.shape[2], *strides,                                      # sizes, strides
                ignore_index, label_smoothing, z_loss, softcap, alpha, gamma,              # options
                GRAD_INPUT=grad_input, GRAD_TARGET=grad_target, **options, **meta,
            )
            count_launch("cross_entropy_fwd_kernel")
    if reduce:
        if n_rows == 0:
            out = input.new_full((), math.nan if reduction == "mean" else 0.0, dtype=out_dtype)
        else:
            out = loss.sum().to(out_dtype)
    else:
        out = loss.reshape(_loss_shape(input))
    return out, gi, gt, denom


def _bwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    alpha_weight: Tensor | None,
    denom: Tensor,
    grad_output: Tensor,
    grad_input: Tensor,
    grad_target: Tensor,
    kind: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    alpha: float,
    gamma: float,
    reduction: str,
    stored: bool,
) -> None:
    """grad_output times d(loss)/d(input) into ``grad_input`` and times d(loss)/d(target) into
    ``grad_target`` (each empty when not asked), grad_output applied before the one rounding.

    ``stored``: the buffers hold the forward's gradients of a reduced loss (scaled on device when
    that is exact, recomputed from the logits otherwise); else every element is computed here.
    ``denom`` is the forward's "mean" denominator (unused otherwise).
    """
    k, _ = _kernels()
    prob = target.is_floating_point()
    n_cols = input.shape[0] if input.dim() == 1 else input.shape[1]
    x = _rows_view(input, n_cols)
    n_rows = x.shape[0] * x.shape[2]
    if n_rows == 0:
        return
    want_gi, want_gt = grad_input.numel() > 0, grad_target.numel() > 0
    g3 = _rows_view(grad_input, n_cols) if want_gi else grad_input
    y = _rows_view(target, n_cols) if prob else target.reshape(-1).contiguous()
    go = grad_output.reshape(-1)  # reduction="none": one per row (a view unless not flattenable)
    options = _options(kind, prob, weight, alpha_weight, label_smoothing, z_loss, softcap, reduction,
                       acc_dtype(input.dtype))
    w = weight.contiguous() if weight is not None else x
    a = alpha_weight.contiguous() if alpha_weight is not None else x
    grid, strides, meta = _launch_meta(x, g3 if want_gi else None, y, grad_target if want_gt else None,
                                       prob, n_cols)
    with _quiet_interpreter(input.device):
        k.cross_entropy_bwd_kernel[(grid,)](
            x, y, w, a, go, g3, grad_target, denom if options["SCALE_BY_DENOM"] else go,   # pointers
            n_rows, n_cols, x.shape[2], *strides, go.stride(0),                           # sizes, strides
            ignore_index, label_smoothing, z_loss, softcap, alpha, gamma,                 # options
            GRAD_INPUT=want_gi, GRAD_TARGET=want_gt, GO=1 if reduction == "none" else 2,
            SCALE_STORED=stored, **options, **meta,
        )
    count_launch("cross_entropy_bwd_kernel")


@torch.library.custom_op("fastloss::softmax_loss_fwd", mutates_args=())
def softmax_loss_fwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    alpha_weight: Tensor | None,
    kind: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    alpha: float,
    gamma: float,
    reduction: str,
    out_float32: bool,
    inplace: bool,
    grad_input: bool,
    grad_target: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Custom-op form of _fwd, for torch.compile (never in place: outputs may not alias inputs)."""
    return _fwd(input, target, weight, alpha_weight, kind, ignore_index, label_smoothing, z_loss,
                softcap, alpha, gamma, reduction, out_float32, False, grad_input, grad_target)


@softmax_loss_fwd.register_fake
def _(input, target, weight, alpha_weight, kind, ignore_index, label_smoothing, z_loss, softcap,
      alpha, gamma, reduction, out_float32, inplace, grad_input, grad_target):
    dtype = torch.float32 if out_float32 else input.dtype
    if reduction == "none":
        out = input.new_empty(_loss_shape(input), dtype=dtype)
    else:
        out = input.new_empty((), dtype=dtype)
    made = _grads_in_forward(input.dtype, reduction)
    gi = input.new_empty(input.shape) if grad_input and made else input.new_empty(0)
    gt = target.new_empty(target.shape) if grad_target and made else target.new_empty(0)
    acc = acc_dtype(input.dtype)
    scale_by_denom = reduction == "mean" and not target.is_floating_point()
    denom = input.new_empty((), dtype=acc) if scale_by_denom else input.new_empty(0, dtype=acc)
    return out, gi, gt, denom


# The custom-op form of _bwd, for torch.compile (eager autograd calls _bwd)
softmax_loss_bwd_ = torch.library.custom_op(
    "fastloss::softmax_loss_bwd_", mutates_args=("grad_input", "grad_target"))(_bwd)


@softmax_loss_bwd_.register_fake
def _(input, target, weight, alpha_weight, denom, grad_output, grad_input, grad_target, kind,
      ignore_index, label_smoothing, z_loss, softcap, alpha, gamma, reduction, stored):
    return None


def _scale_rows(grad: Tensor, grad_output: Tensor, n_cols: int, inplace: bool) -> Tensor:
    """grad * grad_output broadcast over the class dimension (reduction="none")."""
    go = grad_output.reshape(-1, 1, _rows_view(grad, n_cols).shape[2]).to(grad.dtype)
    g3 = _rows_view(grad, n_cols)
    if inplace:
        g3.mul_(go)
        return grad
    return (g3 * go).reshape(grad.shape)


class _Params(NamedTuple):
    """The non-tensor arguments of the forward, as they cross autograd."""

    kind: str               # "cross_entropy" or "focal"
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float          # 0.0: no softcap
    alpha: float            # 1.0 when a per-class alpha_weight is given
    gamma: float
    reduction: str
    out_float32: bool       # a float32 loss whatever the logits dtype (autocast)
    inplace: bool           # inplace_backward: the gradient may overwrite the logits


def _setup_context(ctx, tensors, p: _Params, want, output):
    input, target, weight, alpha_weight = tensors
    ctx.n_cols = input.shape[0] if input.dim() == 1 else input.shape[1]
    # torch's backward rejects a (1,) class-index target of a (C,) input (its forward takes it)
    ctx.one_element_target = (p.kind == "cross_entropy" and input.dim() == 1 and target.dim() == 1
                              and not target.is_floating_point())
    # the logits are kept for a second backward (retain_graph) unless they were overwritten: with
    # inplace_backward on a contiguous input in eager mode (never by the custom op)
    overwritten = want[0] and output[1] is input
    ctx.save_for_backward(None if overwritten else input, target, weight, alpha_weight)
    if overwritten and input._base is None:
        # marked dirty by autograd_pair's Function: a saved copy of the logits can no longer be
        # used, and a later use of the overwritten logits raises in backward
        ctx.overwritten = (input,)
    elif overwritten:
        # a view (logits.view(-1, V)): autograd cannot mark a view dirty in a Function with two
        # outputs, so only the version counter moves (shared with the base): a saved copy of the
        # logits raises as after any in-place change, a later read sees the gradient
        torch.autograd.graph.increment_version(input)
    ctx.denom = output[3]
    # the forward-made gradients (None when backward computes them)
    if overwritten or _grads_in_forward(input.dtype, p.reduction):
        return (output[1] if want[0] else None, output[2] if want[1] else None)
    return None


def _reject_one_element_target(ctx) -> None:
    """torch's backward error for a (1,) class-index target of a (C,) input."""
    if ctx.one_element_target:
        raise RuntimeError(f"size mismatch (got input: [{ctx.n_cols}], target: [1])")


def _backward_16bit(ctx, grad_loss: Tensor, stored: tuple | None, steps: BackwardSteps) -> tuple:
    """16-bit logits: grad_output enters the gradient before its one rounding (see the module
    docstring), scaling the forward's ``stored`` gradients or computing them."""
    input, target, weight, alpha_weight = ctx.saved_tensors
    p, (grad_input, grad_target) = ctx.params, ctx.want
    if stored is None:
        gi = empty(input.shape, input.dtype, input.device) if grad_input else input.new_empty(0)
        gt = empty(target.shape, target.dtype, target.device) if grad_target else target.new_empty(0)
    else:
        gi = stored[0] if grad_input else input.new_empty(0)
        gt = stored[1] if grad_target else target.new_empty(0)
    steps.bwd(input, target, weight, alpha_weight, ctx.denom, grad_loss, gi, gt, p.kind, p.ignore_index,
              p.label_smoothing, p.z_loss, p.softcap, p.alpha, p.gamma, p.reduction, stored is not None)
    return (gi if grad_input else None, gt if grad_target else None)


def _scale(ctx, grad_loss: Tensor, grads: tuple, steps: BackwardSteps) -> tuple:
    """fp32 / fp64 gradients (and 16-bit ones of logits overwritten by inplace_backward, which
    rounds twice here) times grad_output: in place for a reduced loss, per row for "none"."""
    if ctx.params.reduction != "none":
        return scale_each(grads, grad_loss, steps.scale_grad)
    return tuple(_scale_rows(g, grad_loss, ctx.n_cols, steps.eager) if g is not None else None for g in grads)


def _scale_stored(ctx, grad_loss: Tensor, stored: tuple, steps: BackwardSteps) -> tuple:
    _reject_one_element_target(ctx)
    input = ctx.saved_tensors[0]
    if input is not None and input.dtype in HALF_DTYPES:
        return _backward_16bit(ctx, grad_loss, stored, steps)
    return _scale(ctx, grad_loss, stored, steps)


def _recompute(ctx, grad_loss: Tensor, steps: BackwardSteps) -> tuple:
    """16-bit reduction="none" (the forward made no gradient), or a second backward (retain_graph)
    whose forward-made gradients were already handed out."""
    _reject_one_element_target(ctx)
    input, target, weight, alpha_weight = ctx.saved_tensors
    if input is None:
        raise RuntimeError(
            "fastloss: a second backward through a loss computed with inplace_backward=True "
            "is not supported (its logits were overwritten by the gradient)"
        )
    if input.dtype in HALF_DTYPES:
        return _backward_16bit(ctx, grad_loss, None, steps)
    want = ctx.want
    # never in place when recomputing
    _, gi, gt, _ = steps.fwd(input, target, weight, alpha_weight, *ctx.params._replace(inplace=False), *want)
    return _scale(ctx, grad_loss, (gi if want[0] else None, gt if want[1] else None), steps)


def _reference(ctx) -> tuple[Tensor, tuple]:
    """The loss again in PyTorch, from the saved operands (for a double backward)."""
    input, target, weight, alpha_weight = ctx.saved_tensors
    if input is None:
        raise RuntimeError(
            "fastloss: a double backward (create_graph=True) through a loss computed with "
            "inplace_backward=True is not supported (its logits were overwritten by the gradient)")
    p = ctx.params
    x = input.float() if p.out_float32 else input
    if p.kind == "cross_entropy":
        loss = reference.cross_entropy(x, target, weight, p.ignore_index, p.reduction, p.label_smoothing,
                                       p.z_loss, p.softcap or None)
    else:
        loss = reference.focal_loss(x, target, p.alpha if alpha_weight is None else alpha_weight, p.gamma,
                                    p.reduction, weight, p.ignore_index)
    return loss, (input, target)


_apply = autograd_pair(
    softmax_loss_fwd, _fwd, _Params, 4,
    setup_context=_setup_context, scale_stored=_scale_stored, recompute=_recompute, reference=_reference,
    eager=BackwardSteps(fwd=_fwd, bwd=_bwd, scale_grad=scale_grad),
    traced=BackwardSteps(fwd=softmax_loss_fwd, bwd=softmax_loss_bwd_, scale_grad=scale_grad_, eager=False),
)


def softmax_loss(
    kind: str,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    *,
    alpha: float | Tensor = 1.0,
    gamma: float = 0.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    out_float32: bool = False,
    inplace_backward: bool = False,
) -> Tensor:
    """Run cross-entropy or softmax focal loss on the kernels. Arguments must be validated.

    ``target`` holds class indices (any integer dtype) or, for cross-entropy, probabilities of the
    input's shape. ``out_float32`` gives a float32 loss (autocast) whatever the logits dtype.
    Under torch.compile the custom op is traced (no graph break, never in place); in eager mode an
    autograd.Function calls the same launchers directly.
    """
    grad = torch.is_grad_enabled()
    alpha_weight = alpha if isinstance(alpha, Tensor) else None
    p = _Params(kind, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0),
                1.0 if alpha_weight is not None else float(alpha), float(gamma), reduction, bool(out_float32),
                bool(inplace_backward))
    want = (grad and input.requires_grad, grad and target.is_floating_point() and target.requires_grad)
    return _apply(input, target, weight, alpha_weight, p, want)
