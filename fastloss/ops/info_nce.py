"""Launchers and autograd for InfoNCE (kernels/info_nce.py): rows of ``a`` scored against every row
of ``b``, never holding the ``(n_rows, n_cols)`` score matrix.

``info_nce_fwd`` is one torch.library custom op. It returns the loss (reduced, or per row for
``reduction="none"``), the log-sum-exps and, for reduced losses, the gradients of both operands:
the row weights of a reduced loss are known in advance (1/n_rows or 1, halves for the symmetric
loss), so the forward computes them in the same sweep over chunks of rows and backward only scales
them by grad_output (ops._common.scale_grad, a no-op on device when it is 1).
``reduction="none"`` (per-row weights known only in backward) and a second backward recompute them
in ``info_nce_bwd``. ``with_cols`` is the symmetric loss of one process (square, offset 0): the
column direction's log-sum-exps come from the tiled forward kernel with the roles swapped.

The sweep: for a chunk of C rows, one GEMM forms the C x n_cols products (fp32 accumulation, fp32
out), ``info_nce_chunk_kernel`` turns them into the rows' log-sum-exp, loss and gradient tile G,
and two GEMMs give dL/da of the chunk and accumulate dL/db (fp32). C x n_cols is capped by
CHUNK_ELEMENTS, so extra memory is O((n_rows + n_cols) * D + CHUNK_ELEMENTS).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from fastloss import reference
from fastloss.ops._common import scale_grad, scale_grad_
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

__all__ = ["info_nce_loss"]

#: Elements of the fp32 score chunk of the gradient sweep (its G tile has as many in the operands'
#: dtype): None means 2**27 on CUDA (512 MiB + 256 MiB for bfloat16), 2**8 elsewhere (the
#: interpreter: several chunks even at test sizes).
CHUNK_ELEMENTS: int | None = None


@functools.cache
def _kernels():
    import triton.language as tl

    from fastloss.kernels import info_nce as k

    return k, {torch.float32: tl.float32, torch.float64: tl.float64}



def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: what torch's matmul does for this dtype. float32 follows
    torch.get_float32_matmul_precision(): "highest" (torch's default) is full float32 ("ieee"),
    "high" / "medium" allow TF32. Ignored for half-precision operands."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        if CONFIG_OVERRIDE and "precision" in CONFIG_OVERRIDE:
            return CONFIG_OVERRIDE["precision"]
        return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return "tf32"


def _dot_fp32(a: Tensor) -> bool:
    """Upcast tl.dot operands: bfloat16 under the interpreter (CPU tensors), which mis-multiplies it."""
    return a.device.type != "cuda" and a.dtype == torch.bfloat16


#: Tile sizes forced by a tuning script (keys of _config's result); None in normal use.
CONFIG_OVERRIDE: dict[str, int] | None = None


def _config(device: torch.device, n_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes: tensor-core tiles on CUDA, small tiles for the interpreter (which runs one program
    at a time, so fewer larger programs are not faster there)."""
    if CONFIG_OVERRIDE is not None and device.type == "cuda":
        return {**_default_config(device, n_dim, dtype), **CONFIG_OVERRIDE}
    return _default_config(device, n_dim, dtype)


def _default_config(device: torch.device, n_dim: int, dtype: torch.dtype) -> dict[str, int]:
    k = max(16, next_pow2(n_dim))
    if device.type != "cuda":
        return {"fwd_m": 16, "fwd_n": 16, "block_k": min(32, k), "fwd_warps": 4, "fwd_stages": 1}
    if dtype in (torch.float32, torch.float64):
        return {"fwd_m": 64, "fwd_n": 128, "block_k": min(32, k), "fwd_warps": 4, "fwd_stages": 2}
    # H200, B = 16384, D = 512, bf16: 128-wide key tiles beat 64 (1.08 vs 1.45 ms)
    return {"fwd_m": 128, "fwd_n": 128, "block_k": min(64, k), "fwd_warps": 8, "fwd_stages": 3}


def _rows_fwd(a: Tensor, b: Tensor, offset: int, scale: float) -> tuple[Tensor, Tensor]:
    k, tl_dtype = _kernels()
    n_rows, n_dim = a.shape
    n_cols = b.shape[0]
    acc = acc_dtype(a.dtype)
    loss = empty((n_rows,), acc, a.device)
    lse = empty((n_rows,), acc, a.device)
    cfg = _config(a.device, n_dim, a.dtype)
    grid = (cdiv(n_rows, cfg["fwd_m"]),)
    k.info_nce_fwd_kernel[grid](
        a, b, loss, lse, n_rows, n_cols, n_dim, a.stride(0), b.stride(0), offset, scale,
        PRECISION=_precision(a.dtype), ACC_DTYPE=tl_dtype[acc], DOT_FP32=_dot_fp32(a),
        BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], BLOCK_K=cfg["block_k"],
        ALIGN=pow2_align(n_dim, a.stride(0), b.stride(0)),
        num_warps=cfg["fwd_warps"], num_stages=cfg["fwd_stages"],
    )
    count_launch("info_nce_fwd_kernel")
    return loss, lse


def _prescale(a: Tensor, scale: float) -> tuple[Tensor, float]:
    """Kernels receive ``scale`` as a float32 scalar; for float64 operands it is applied to ``a`` here
    instead, in float64, so that float64 results keep float64 accuracy."""
    if a.dtype == torch.float64 and scale != 1.0:
        return a * scale, 1.0
    return a, scale


@functools.cache
def _mixed_gemm(device_type: str) -> bool:
    """Whether half-precision GEMMs can write fp32 products (aten::mm.dtype / mm.dtype_out: CUDA,
    recent torch); otherwise the sweep multiplies fp32 copies of the operands."""
    overloads = torch.ops.aten.mm.overloads()
    return device_type == "cuda" and "dtype" in overloads and "dtype_out" in overloads


def _chunk_rows(n_rows: int, n_cols: int, device: torch.device) -> int:
    cap = CHUNK_ELEMENTS if CHUNK_ELEMENTS is not None else (1 << 27 if device.type == "cuda" else 1 << 8)
    return max(1, min(n_rows, cap // max(n_cols, 1)))


def _sweep(a: Tensor, b: Tensor, offset: int, scale: float, lse: Tensor, loss: Tensor | None,
           w_row: Tensor | None, lse_col: Tensor | None, w_col: Tensor | None,
           factor_a, factor_b, need_a: bool, need_b: bool,
           grad_dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """One pass over chunks of rows of ``a``: with ``loss`` given, computes lse and loss of every row;
    with w_row given, the gradients factor_a * sum_j G_ij b_j and factor_b * sum_i G_ij a_i, G built
    from w_row (and lse_col / w_col when given), rounded once to ``grad_dtype``."""
    k, tl_dtype = _kernels()
    n_rows, n_dim = a.shape
    n_cols = b.shape[0]
    acc = acc_dtype(a.dtype)
    # Operands of the GEMMs: half precision only where its products can be written in fp32.
    direct = a.dtype in (torch.float32, torch.float64) or _mixed_gemm(a.device.type)
    a_mm, b_mm = (a, b) if direct else (a.to(acc), b.to(acc))
    half = a_mm.dtype not in (torch.float32, torch.float64)
    chunk = _chunk_rows(n_rows, n_cols, a.device)
    write_grad = w_row is not None and (need_a or need_b)
    s_buf = empty((chunk, n_cols), acc, a.device)
    g_buf = empty((chunk, n_cols), a_mm.dtype, a.device) if write_grad else s_buf
    grad_a = empty(a.shape, grad_dtype, a.device) if write_grad and need_a else None
    grad_b = torch.zeros((n_cols, n_dim), dtype=acc, device=a.device) if write_grad and need_b else None
    block_r, block_n, warps = (8, 512, 8) if a.is_cuda else (4, 64, 4)
    dummy = lse[:1]
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        a_c, s_c, g_c = a_mm[r0:r1], s_buf[:r1 - r0], g_buf[:r1 - r0]
        if half:
            torch.ops.aten.mm.dtype_out(a_c, b_mm.T, torch.float32, out=s_c)
        else:
            torch.mm(a_c, b_mm.T, out=s_c)
        k.info_nce_chunk_kernel[(cdiv(r1 - r0, block_r),)](
            s_c, lse[r0:r1], loss[r0:r1] if loss is not None else dummy,
            w_row[r0:r1] if write_grad else dummy,
            lse_col if lse_col is not None else dummy, w_col if w_col is not None else dummy,
            g_c, r1 - r0, n_cols, r0, offset, scale,
            COMPUTE_LSE=loss is not None, WRITE_GRAD=write_grad, HAS_COL=lse_col is not None,
            ACC_DTYPE=tl_dtype[acc], BLOCK_R=block_r, BLOCK_N=block_n, ALIGN=pow2_align(n_cols),
            num_warps=warps,
        )
        count_launch("info_nce_chunk_kernel")
        if grad_a is not None:
            ga = torch.ops.aten.mm.dtype(g_c, b_mm, torch.float32) if half else torch.mm(g_c, b_mm)
            grad_a[r0:r1] = ga * factor_a
        if grad_b is not None:
            if half:  # a fp32 product added to the fp32 accumulator (no aliased out= GEMM)
                grad_b += torch.ops.aten.mm.dtype(g_c.T, a_c, torch.float32)
            else:
                grad_b.addmm_(g_c.T, a_c)
    if grad_b is not None:
        grad_b = (grad_b * factor_b).to(grad_dtype)
    return grad_a, grad_b


def _row_weight(reduction: str, n_rows: int, with_cols: bool) -> float:
    """dL/dloss_i of a reduced loss (per direction for the symmetric one)."""
    return (0.5 if with_cols else 1.0) / (n_rows if reduction == "mean" else 1)


def _combine(loss: Tensor, loss_c: Tensor | None, reduction: str) -> Tensor:
    out = loss if loss_c is None else 0.5 * (loss + loss_c)
    if reduction == "mean":
        return out.mean()
    if reduction == "sum":
        return out.sum()
    return out


def _fwd(a: Tensor, b: Tensor, offset: int, scale: float, with_cols: bool, reduction: str,
         need_a: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse_rows, lse_cols, grad_a, grad_b): the gradients (times 1 as grad_output) for reduced
    losses when asked, empty tensors otherwise; lse_cols empty unless with_cols."""
    a, b = a.contiguous(), b.contiguous()
    a_s, scale_k = _prescale(a, scale)
    loss_c = lse_c = None
    if with_cols:
        loss_c, lse_c = _rows_fwd(b, a_s, -offset, scale_k)
    if reduction != "none" and (need_a or need_b):
        acc = acc_dtype(a.dtype)
        loss = empty((a.shape[0],), acc, a.device)
        lse = empty((a.shape[0],), acc, a.device)
        w = _row_weight(reduction, a.shape[0], with_cols)
        ones_r = torch.ones(a.shape[0], dtype=acc, device=a.device)
        ones_c = torch.ones(b.shape[0], dtype=acc, device=a.device) if with_cols else None
        # kept in the accumulation dtype (fp32 for half operands, O(B * D)): backward multiplies
        # them by grad_output and rounds once
        ga, gb = _sweep(a_s, b, offset, scale_k, lse, loss, ones_r, lse_c, ones_c,
                        w * scale, w * scale_k, need_a, need_b, acc)
    else:
        loss, lse = _rows_fwd(a_s, b, offset, scale_k)
        ga = gb = None
    empty0 = a.new_empty(0)
    return (_combine(loss, loss_c, reduction), lse, lse_c if with_cols else lse.new_empty(0),
            ga if ga is not None else empty0, gb if gb is not None else empty0)


# The custom-op form of _fwd, for torch.compile (same signature; eager autograd calls _fwd)
info_nce_fwd = torch.library.custom_op("fastloss::info_nce_fwd", mutates_args=())(_fwd)


@info_nce_fwd.register_fake
def _(a, b, offset, scale, with_cols, reduction, need_a, need_b):
    acc = acc_dtype(a.dtype)
    loss = a.new_empty(() if reduction != "none" else a.shape[:1], dtype=acc)
    lse = a.new_empty(a.shape[:1], dtype=acc)
    lse_c = a.new_empty(b.shape[:1] if with_cols else (0,), dtype=acc)
    grads = reduction != "none"
    return (loss, lse, lse_c, a.new_empty(a.shape, dtype=acc) if grads and need_a else a.new_empty(0),
            b.new_empty(b.shape, dtype=acc) if grads and need_b else b.new_empty(0))


def _bwd(a: Tensor, b: Tensor, lse: Tensor, lse_c: Tensor, grad_loss: Tensor, offset: int, scale: float,
         with_cols: bool, reduction: str, need_a: bool, need_b: bool) -> tuple[Tensor, Tensor]:
    """(dL/da, dL/db) recomputed from the operands and log-sum-exps, for dL/dloss = grad_loss (a
    scalar for reduced losses, per row for "none")."""
    a, b = a.contiguous(), b.contiguous()
    a_s, scale_k = _prescale(a, scale)
    acc = lse.dtype
    n_rows = a.shape[0]
    if reduction == "none":
        w = grad_loss.to(acc) * (0.5 if with_cols else 1.0)
    else:
        w = (grad_loss.to(acc) * _row_weight(reduction, n_rows, with_cols)).expand(n_rows)
    # One scale for the weights, on device (no sync), so G stays O(1) in half precision.
    wscale = w.abs().amax().clamp_min(torch.finfo(acc).tiny)
    w = (w / wscale).contiguous()
    empty0 = a.new_empty(0)
    ga, gb = empty0, empty0
    if need_a or need_b:
        ga_, gb_ = _sweep(a_s, b, offset, scale_k, lse, None, w, lse_c if with_cols else None,
                          w if with_cols else None, wscale * scale, wscale * scale_k, need_a, need_b,
                          a.dtype)
        ga = ga_ if ga_ is not None else empty0
        gb = gb_ if gb_ is not None else empty0
    return ga, gb


# The custom-op form of _bwd, for torch.compile (same signature; eager autograd calls _bwd)
info_nce_bwd = torch.library.custom_op("fastloss::info_nce_bwd", mutates_args=())(_bwd)


@info_nce_bwd.register_fake
def _(a, b, lse, lse_c, grad_loss, offset, scale, with_cols, reduction, need_a, need_b):
    return (a.new_empty(a.shape) if need_a else a.new_empty(0),
            b.new_empty(b.shape) if need_b else b.new_empty(0))



class _Params(NamedTuple):
    """The non-tensor arguments of the forward, as they cross autograd."""

    offset: int      # the positive of row i is row i + offset of b
    scale: float
    with_cols: bool  # the symmetric loss of one process
    reduction: str


def _setup_context(ctx, tensors, p: _Params, want, output):
    a, b = tensors
    _, lse, lse_c, ga, gb = output
    ctx.save_for_backward(a, b, lse, lse_c)
    # A reduced loss's gradients are made by the forward (None where not asked)
    return (ga if want[0] else None, gb if want[1] else None) if p.reduction != "none" else None


def _scale_stored(ctx, grad_loss: Tensor, stored: tuple, steps: BackwardSteps) -> tuple:
    a = ctx.saved_tensors[0]
    for g in stored:
        if g is not None and g.dtype == a.dtype:
            steps.scale_grad(g, grad_loss)
    # half-precision operands: fp32 gradients, scaled and then rounded once
    return tuple(g if g is None or g.dtype == a.dtype else (g * grad_loss).to(a.dtype) for g in stored)


def _recompute(ctx, grad_loss: Tensor, steps: BackwardSteps) -> tuple:
    """reduction="none", or a second backward (retain_graph=True) through a reduced loss whose
    forward-made gradients were already handed out."""
    a, b, lse, lse_c = ctx.saved_tensors
    p = ctx.params
    return steps.bwd(a, b, lse, lse_c, grad_loss, p.offset, p.scale, p.with_cols, p.reduction,
                     *ctx.needs_input_grad[:2])


def _reference(ctx) -> tuple[Tensor, tuple]:
    """The loss again in PyTorch, from the saved operands (for a double backward)."""
    a, b, _, _ = ctx.saved_tensors
    p = ctx.params
    loss = reference.info_nce_rows(a, b, p.scale, p.offset)
    loss_c = reference.info_nce_rows(b, a, p.scale, -p.offset) if p.with_cols else None
    return _combine(loss, loss_c, p.reduction), (a, b)


_apply = autograd_pair(
    info_nce_fwd, _fwd, _Params, 2,
    setup_context=_setup_context, scale_stored=_scale_stored, recompute=_recompute, reference=_reference,
    eager=BackwardSteps(bwd=_bwd, scale_grad=scale_grad),
    traced=BackwardSteps(bwd=info_nce_bwd, scale_grad=scale_grad_, eager=False),
)


def info_nce_loss(a: Tensor, b: Tensor, scale: float, offset: int = 0, with_cols: bool = False,
                  reduction: str = "mean") -> Tensor:
    """InfoNCE of rows of ``a`` (M, D) against all rows of ``b`` (N, D), the positive of row i being
    row i + offset of b; with ``with_cols`` (M == N, offset 0) averaged row by row with the b -> a
    direction. Reduced over rows by ``reduction`` (per-row losses for "none"). Operands validated,
    2-D, one floating dtype, M, N >= 1; the result in float32 (float64 for float64 operands)."""
    grad = torch.is_grad_enabled()
    return _apply(a, b, _Params(int(offset), float(scale), bool(with_cols), reduction),
                  (grad and a.requires_grad, grad and b.requires_grad))
