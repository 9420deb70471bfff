"""Launchers and autograd for fused linear + cross-entropy: ``cross_entropy(x @ W.T + b, target)``
over chunks of rows, never holding the (N, V) logits or their gradient.

The sweep (``_sweep``), for each chunk of C rows::

    logits_c  = x_c W^T + b               one GEMM into a C x V buffer owned here
    loss_c, g = rows of the loss           in place in that buffer: the softmax family's row kernel
                                           (fastloss.ops.softmax._fwd) on the Triton path, torch ops
                                           on the PyTorch path; g = s_c * dloss/dlogits
    dX_c      = g W                        GEMM
    dW       += g^T x_c                    GEMM (fp32 accumulator for 16-bit weights)
    db       += sum over the rows of g

``s`` is each row's factor in the gradient: its token weight, times 1 / denominator for "mean"
(times grad_output in a recomputing backward). C comes from a byte budget (CHUNK_BYTES) and H, V,
so the extra memory is one C x V buffer (two with softcap on the PyTorch path) plus O(C x H),
beside the gradients themselves.

Reduced losses: the "mean" denominator (sum over non-ignored rows of class weight x token weight)
is computed on device before the sweep, so the forward makes the gradients already divided by it
and backward only multiplies them by grad_output (no host sync; on the Triton path the shared scale
kernel, ops._common.scale_grad, a no-op on device when grad_output is 1). ``reduction="none"``: the
forward computes the losses only; backward sweeps again with s = grad_output x token weight.

Per-row formulas (those of the row kernel, kernels/softmax.py): class-index target t, class
weight w (1 when absent, w_t = 0 on ignored rows), smoothing eps, C classes, z-loss zl, softcap s
(``z = s tanh(x / s)``, else ``z = x``), ``W = sum_j w_j``::

    loss    = (1 - eps) w_t (lse - z_t) + (eps / C) sum_j w_j (lse - z_j) + zl w_t lse^2
    dl/dz_j = p_j [(1 - eps) w_t + (eps / C) W + 2 zl w_t lse] - (1 - eps) w_t [j == t]
              - (eps / C) w_j
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from fastloss import reference
from fastloss.ops._common import HALF_DTYPES, scale_grad, scale_grad_
from fastloss.ops._utils import BackwardSteps, acc_dtype, autograd_pair, empty

__all__ = ["CHUNK_BYTES", "CHUNK_ROWS", "chunk_rows", "linear_xent_loss"]

#: Bytes of the per-chunk buffers (the C x V logits, plus C x H temporaries); None: 512 MiB on
#: CUDA (2048 rows of a 128256-class bf16 head; not tuned on a GPU yet), 32 MiB elsewhere (254 rows
#: at H = 512, V = 32000 float32: GEMMs of that many rows ran at their full one-core rate on the
#: CPU that set it, and the peak stays under torch 2.13's chunked path, 98 vs 133 MiB).
CHUNK_BYTES: int | None = None
#: Rows per chunk, forcing the choice (tests force tiny chunks); None: from CHUNK_BYTES.
CHUNK_ROWS: int | None = None
#: Fewest rows a budget-chosen chunk gets (GEMMs of fewer rows run far below their peak rate).
MIN_CHUNK_ROWS = 16

class _Params(NamedTuple):
    """The non-tensor arguments of the loss, as they cross autograd (and reach the sweep)."""

    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float          # 0.0: no softcap
    reduction: str
    out_float32: bool       # a float32 loss whatever the operands' dtype (autocast)
    kernel: bool            # the Triton row kernel, else torch ops
    chunk_rows: int         # 0: from the budget


def chunk_rows(n_rows: int, in_features: int, n_classes: int, dtype: torch.dtype, device: torch.device,
               forced: int = 0) -> int:
    """Rows per chunk: ``forced`` or CHUNK_ROWS when set, else as many as fit the byte budget (one
    row costs its V logits in the chunk's dtype and a few H-sized temporaries), at least
    MIN_CHUNK_ROWS, at most n_rows."""
    rows = forced or CHUNK_ROWS
    if not rows:
        budget = CHUNK_BYTES if CHUNK_BYTES is not None else (2**29 if device.type == "cuda" else 2**25)
        per_row = (n_classes + 2 * in_features) * dtype.itemsize
        rows = max(MIN_CHUNK_ROWS, budget // max(per_row, 1))
    return max(1, min(n_rows, rows))


@functools.cache
def _mixed_gemm(device_type: str) -> bool:
    """Whether 16-bit GEMMs can write fp32 products on this device (aten::mm.dtype: CUDA, recent
    torch); otherwise fp32 copies of the operands are multiplied."""
    return device_type == "cuda" and {"dtype", "dtype_out"} <= set(torch.ops.aten.mm.overloads())


@functools.cache
def _addmm_into_fp32(device: torch.device) -> bool:
    """Whether ``addmm.dtype_out`` accumulates 16-bit products into an fp32 tensor in place on this
    device (torch versions differ: older ones want ``self`` in the operands' dtype)."""
    if device.type != "cuda" or "dtype_out" not in torch.ops.aten.addmm.overloads():
        return False
    a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
    c = torch.zeros(16, 16, dtype=torch.float32, device=device)
    try:
        torch.ops.aten.addmm.dtype_out(c, a, a, torch.float32, out=c)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _mm_fp32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b of 16-bit operands as an fp32 product (into ``out`` when given): written in fp32 by
    the GEMM where torch can (aten::mm.dtype on CUDA), else the product of fp32 copies."""
    if _mixed_gemm(a.device.type):
        if out is None:
            return torch.ops.aten.mm.dtype(a, b, torch.float32)
        return torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _accumulate_fp32(acc: Tensor, a: Tensor, b: Tensor, block_rows: int, first: bool) -> None:
    """acc += a @ b (acc = a @ b when ``first``) for 16-bit a, b and an fp32 acc, accumulated in
    fp32: in place by cuBLAS where torch allows it, else ``block_rows`` rows of acc at a time (a
    bounded fp32 temporary)."""
    if first:
        _mm_fp32(a, b, out=acc)
        return
    if _addmm_into_fp32(acc.device):
        torch.ops.aten.addmm.dtype_out(acc, a, b, torch.float32, out=acc)
        return
    for r0 in range(0, acc.shape[0], block_rows):
        acc[r0:r0 + block_rows] += _mm_fp32(a[r0:r0 + block_rows], b)


def _target_weight(target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype,
                   n_classes: int) -> Tensor:
    """w_t of every row: weight[target] (1 without weight), 0 where target == ignore_index (and
    where it is out of range: such rows get a NaN loss, never an out-of-bounds read)."""
    valid = target != ignore_index
    if weight is None:
        return valid.to(dtype)
    idx = torch.where(valid, target, 0).clamp(0, max(n_classes - 1, 0))
    return torch.where(valid, weight.to(dtype)[idx], 0.0)


# --------------------------------------------------------------------------------------------
# One chunk of rows, PyTorch ops: loss and gradient in place in the logits buffer
# --------------------------------------------------------------------------------------------

def _rows_torch(z: Tensor, dz: Tensor | None, target: Tensor, weight: Tensor | None, p: _Params,
                scale: Tensor | None, grad: bool) -> Tensor:
    """Loss of each row of logits ``z`` (C, V) (accumulation dtype); with ``grad`` z is overwritten
    by ``scale * dloss/dlogits`` (``scale`` per row (C,), or 0-dim, or None for 1). ``dz`` is a
    (C, V) buffer for the softcap's derivative (softcap only)."""
    n_cols = z.shape[1]
    eps, zl = p.label_smoothing, p.z_loss
    valid = target != p.ignore_index
    in_range = (target >= 0) & (target < n_cols)
    bad = valid & ~in_range
    t = torch.where(valid & in_range, target, 0).unsqueeze(1)
    w_t = _target_weight(target, weight, p.ignore_index, z.dtype, n_cols)
    if p.softcap:
        z.div_(p.softcap).tanh_()
        if grad:
            torch.mul(z, z, out=dz).neg_().add_(1.0)   # d(s tanh(x / s))/dx = 1 - tanh^2, as autograd's
        z.mul_(p.softcap)
    m = z.amax(1, keepdim=True)
    z.sub_(m)                                          # z - m <= 0: nothing below cancels
    z_t = z.gather(1, t).squeeze(1)
    if eps:
        w = weight.to(z.dtype) if weight is not None else None
        a_sum = -(z @ w) if w is not None else -z.sum(1)  # sum_j w_j (m - z_j) >= 0
        w_sum = w.sum() if w is not None else float(n_cols)
    z.exp_()
    d = z.sum(1)
    log_d = d.log()
    lse = m.squeeze(1) + log_d
    loss = (1.0 - eps) * w_t * (log_d - z_t)
    if eps:
        loss = loss + (eps / n_cols) * (w_sum * log_d + a_sum)
    if zl:
        loss = loss + zl * w_t * lse * lse
    nan = torch.full((), float("nan"), dtype=z.dtype, device=z.device)
    loss = torch.where(bad, nan, torch.where(valid, loss, 0.0))
    if not grad:
        return loss
    # g_j = p_j P - [j == t] Q - w_j R, rows of ignored targets 0, of out-of-range targets NaN
    coef_p = (1.0 - eps) * w_t + (2.0 * zl) * w_t * lse
    if eps:
        coef_p = coef_p + (eps / n_cols) * w_sum
    coef_q = (1.0 - eps) * w_t
    row = torch.where(bad, nan, torch.where(valid, 1.0, 0.0).to(z.dtype))
    if scale is not None:
        row = row * scale
    z.mul_((coef_p * row / d).unsqueeze(1))
    z.scatter_add_(1, t, (-coef_q * row).unsqueeze(1))
    if eps:
        coef_r = (eps / n_cols) * row
        if weight is not None:
            z.addr_(coef_r, weight.to(z.dtype), alpha=-1.0)
        else:
            z.sub_(coef_r.unsqueeze(1))
    if p.softcap:
        z.mul_(dz)
    return loss



def _rows_kernel(z: Tensor, target: Tensor, weight: Tensor | None, p: _Params, grad: bool) -> Tensor:
    """Loss of each row of logits ``z`` (C, V) by the softmax family's row kernel (accumulation
    dtype); with ``grad`` the kernel writes dloss/dlogits into z itself."""
    from fastloss.ops import softmax as softmax_ops

    loss, gi = softmax_ops._fwd(
        input=z, target=target, weight=weight, alpha_weight=None, kind="cross_entropy",
        ignore_index=p.ignore_index, label_smoothing=p.label_smoothing, z_loss=p.z_loss,
        softcap=p.softcap, alpha=1.0, gamma=0.0, reduction="none", out_float32=z.dtype in HALF_DTYPES,
        inplace=True, grad_input=grad, grad_target=False,
    )[:2]
    if grad and gi is not z:  # the launcher declined to write in place
        z.copy_(gi)
    return loss


# --------------------------------------------------------------------------------------------
# The sweep over chunks of rows
# --------------------------------------------------------------------------------------------

def _finish(acc: Tensor | None, scale: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An accumulated gradient times ``scale`` (0-dim, or None for 1), in ``dtype``: one pass."""
    if acc is None or (scale is None and acc.dtype == dtype):
        return acc
    if scale is None:
        return acc.to(dtype)
    if acc.dtype == dtype:
        return acc.mul_(scale)
    return torch.mul(acc, scale, out=torch.empty(acc.shape, dtype=dtype, device=acc.device))


def _sweep(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, class_weight: Tensor | None, p: _Params,
           row_scale: Tensor | None, scale: Tensor | None, need_x: bool, need_w: bool, need_b: bool,
           ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row losses (accumulation dtype, without the scales) and, when asked, the gradients of
    ``sum_i scale * row_scale_i * loss_i`` with respect to x (N, H), w (V, H) and b (V,) (None when
    not asked). ``row_scale`` (N,) and ``scale`` (0-dim) may each be None (1)."""
    n, h = x.shape
    v = w.shape[0]
    device = x.device
    acc = acc_dtype(x.dtype)
    grad = need_x or need_w or need_b
    # GEMM operands: the input's dtype on the kernel path (logits rounded to it, as F.linear's);
    # on the PyTorch path the accumulation dtype (fp32 copies of 16-bit operands: CPU has no
    # 16-bit GEMM writing fp32).
    op = x.dtype if p.kernel else acc
    fp32_out = op in HALF_DTYPES          # backward GEMMs of 16-bit operands write fp32 products
    w_op = w.to(op)
    b_op = b.to(op) if b is not None else None
    losses = empty((n,), acc, device)
    gx = empty((n, h), x.dtype, device) if need_x else None
    # dW: written by the first chunk's GEMM, accumulated by the others (zeros when there is none)
    gw = (torch.empty if n else torch.zeros)((v, h), dtype=acc if fp32_out else op, device=device) if need_w else None
    gb = torch.zeros((v,), dtype=acc, device=device) if need_b else None
    # Factors of the gradient rows: per row when there is a row_scale (scale folded in), applied to
    # the chunk's gradient; else the scalar goes to dX per chunk and to dW, db once at the end.
    factor = row_scale * scale if row_scale is not None and scale is not None else row_scale
    late = scale if factor is None and p.kernel else None
    rows = chunk_rows(n, h, v, op, device, p.chunk_rows)
    buf = torch.empty((rows, v), dtype=op, device=device)
    dz_buf = torch.empty((rows, v), dtype=op, device=device) if p.softcap and grad and not p.kernel else None
    block = max(1, rows * v // (2 * h))  # rows of dW per fp32 product where no in-place fp32 addmm
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x_c, t_c, z = x[r0:r1].to(op), target[r0:r1], buf[:r1 - r0]
        if b_op is not None:
            torch.addmm(b_op, x_c, w_op.T, out=z)
        else:
            torch.mm(x_c, w_op.T, out=z)
        f_c = factor[r0:r1] if factor is not None else None
        if p.kernel:
            losses[r0:r1] = _rows_kernel(z, t_c, class_weight, p, grad)
            if grad and f_c is not None:
                z.mul_(f_c.unsqueeze(1))
        else:
            dz = dz_buf[:r1 - r0] if dz_buf is not None else None
            # the factors cost nothing here: they multiply the rows' coefficients
            losses[r0:r1] = _rows_torch(z, dz, t_c, class_weight, p, f_c if factor is not None else scale, grad)
        if not grad:
            continue
        g = z  # the rows' gradient with respect to their logits, factors applied
        if need_x:
            gx_c = gx[r0:r1]
            if fp32_out or op != x.dtype:
                prod = _mm_fp32(g, w) if fp32_out else torch.mm(g, w_op)
                if late is not None:
                    prod.mul_(late)
                gx_c.copy_(prod)  # one rounding to the input's dtype
            else:
                torch.mm(g, w_op, out=gx_c)
                if late is not None:
                    gx_c.mul_(late)
        if need_w:
            if fp32_out:
                _accumulate_fp32(gw, g.T, x_c, block, first=r0 == 0)
            elif r0 == 0:
                torch.mm(g.T, x_c, out=gw)
            else:
                gw.addmm_(g.T, x_c)
        if need_b:
            gb += g.sum(0, dtype=acc)
    return (losses, gx, _finish(gw, late, w.dtype), _finish(gb, late, b.dtype) if b is not None else None)


def _mean_denominator(target: Tensor, class_weight: Tensor | None, token_weight: Tensor | None,
                      ignore_index: int, n_classes: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(w_t per row, denominator of "mean", scale of the gradients), all on device: the scale is
    1 / denominator, or 0 when every row is ignored (torch's gradient is then 0, its loss NaN)."""
    w_t = _target_weight(target, class_weight, ignore_index, dtype, n_classes)
    weighted = w_t * token_weight if token_weight is not None else w_t
    denom = weighted.sum()
    any_valid = (target != ignore_index).any()
    return w_t, denom, torch.where(any_valid, 1.0 / denom, torch.zeros_like(denom))


# --------------------------------------------------------------------------------------------
# Forward and backward ops
# --------------------------------------------------------------------------------------------

def _fwd(
    input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, class_weight: Tensor | None,
    token_weight: Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
    reduction: str, out_float32: bool, kernel: bool, chunk_rows: int,
    need_input: bool, need_weight: bool, need_bias: bool, need_token_weight: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, per-row losses, d/dinput, d/dweight, d/dbias, d/dtoken_weight).

    ``input`` (N, H), ``weight`` (V, H), ``bias`` (V,), ``target`` (N,) class indices,
    ``class_weight`` (V,), ``token_weight`` (N,). For a reduced loss the gradients asked for are
    made here (times grad_output 1); otherwise, and for what was not asked, they are empty. The
    per-row losses (without token weights, accumulation dtype) serve the token weights' gradient
    of reduction="none".
    """
    p = _Params(ignore_index, label_smoothing, z_loss, softcap, reduction, out_float32, kernel, chunk_rows)
    acc = acc_dtype(input.dtype)
    out_dtype = torch.float32 if out_float32 else input.dtype
    reduce = reduction != "none"
    tw = token_weight.to(acc) if token_weight is not None else None
    scale = w_t = denom = None
    if reduction == "mean":
        w_t, denom, scale = _mean_denominator(target, class_weight, tw, ignore_index, weight.shape[0], acc)
    with torch.autocast(input.device.type, enabled=False):
        losses, gx, gw, gb = _sweep(input, weight, bias, target, class_weight, p, tw, scale,
                                    reduce and need_input, reduce and need_weight, reduce and need_bias)
    weighted = losses * tw if tw is not None else losses
    gt = None
    if reduction == "none":
        out = weighted.to(out_dtype, copy=True)  # outputs of a custom op may not alias each other
    else:
        total = weighted.sum()
        out_acc = total / denom if reduction == "mean" else total
        out = out_acc.to(out_dtype)
        if need_token_weight:
            gt = (losses - out_acc * w_t) / denom if reduction == "mean" else losses.clone()
            gt = gt.to(token_weight.dtype)
    return (out, losses, *(g if g is not None else input.new_empty(0) for g in (gx, gw, gb, gt)))


linear_xent_fwd = torch.library.custom_op("fastloss::linear_xent_fwd", mutates_args=())(_fwd)


@linear_xent_fwd.register_fake
def _(input, weight, bias, target, class_weight, token_weight, ignore_index, label_smoothing, z_loss,
      softcap, reduction, out_float32, kernel, chunk_rows, need_input, need_weight, need_bias,
      need_token_weight):
    acc = acc_dtype(input.dtype)
    dtype = torch.float32 if out_float32 else input.dtype
    reduce = reduction != "none"
    out = input.new_empty(() if reduce else target.shape, dtype=dtype)
    grads = [(input, need_input), (weight, need_weight), (bias, need_bias), (token_weight, need_token_weight)]
    return (out, input.new_empty(target.shape, dtype=acc),
            *(t.new_empty(t.shape) if reduce and need and t is not None else input.new_empty(0)
              for t, need in grads))


def _bwd(
    input: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, class_weight: Tensor | None,
    row_scale: Tensor, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
    kernel: bool, chunk_rows: int, need_input: bool, need_weight: bool, need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i row_scale_i * loss_i`` with respect to input, weight and bias, swept
    again from the operands (reduction="none", or a second backward); empty when not asked."""
    p = _Params(ignore_index, label_smoothing, z_loss, softcap, "none", False, kernel, chunk_rows)
    with torch.autocast(input.device.type, enabled=False):
        _, gx, gw, gb = _sweep(input, weight, bias, target, class_weight, p, row_scale, None,
                               need_input, need_weight, need_bias)
    return tuple(g if g is not None else input.new_empty(0) for g in (gx, gw, gb))


linear_xent_bwd = torch.library.custom_op("fastloss::linear_xent_bwd", mutates_args=())(_bwd)


@linear_xent_bwd.register_fake
def _(input, weight, bias, target, class_weight, row_scale, ignore_index, label_smoothing, z_loss,
      softcap, kernel, chunk_rows, need_input, need_weight, need_bias):
    return tuple(t.new_empty(t.shape) if need and t is not None else input.new_empty(0)
                 for t, need in ((input, need_input), (weight, need_weight), (bias, need_bias)))


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

def _setup_context(ctx, tensors, p: _Params, want, output):
    _, losses, gx, gw, gb, gt = output
    ctx.save_for_backward(*tensors, losses)
    # A reduced loss's gradients are made by the forward (None where not asked)
    return tuple(g if n else None for g, n in zip((gx, gw, gb, gt), want)) if p.reduction != "none" else None


def _row_scale(ctx, grad_loss: Tensor) -> Tensor:
    """Each row's factor in the gradient, for a sweep in backward: grad_output (per row for "none")
    times the token weight, times 1 / the "mean" denominator."""
    _, weight, _, target, class_weight, token_weight, losses = ctx.saved_tensors
    p = ctx.params
    acc = losses.dtype
    s = grad_loss.to(acc).reshape(-1).expand(target.shape[0])
    if token_weight is not None:
        s = s * token_weight.to(acc)
    if p.reduction == "mean":
        s = s * _mean_denominator(target, class_weight, token_weight.to(acc) if token_weight is not None else None,
                                  p.ignore_index, weight.shape[0], acc)[2]
    return s.contiguous()


def _scale_stored(ctx, grad_loss: Tensor, stored: tuple, steps: BackwardSteps) -> tuple:
    gx, gw, gb, gt = (steps.scale_grad(g, grad_loss, ctx.params.kernel) if g is not None else None
                      for g in stored)
    return gx, gw, gb, None, None, gt


def _recompute(ctx, grad_loss: Tensor, steps: BackwardSteps) -> tuple:
    """reduction="none", or a second backward (retain_graph=True) through a reduced loss whose
    forward-made gradients were already handed out: sweep again."""
    input, weight, bias, target, class_weight, token_weight, losses = ctx.saved_tensors
    p = ctx.params
    need = ctx.needs_input_grad
    s = _row_scale(ctx, grad_loss)
    gx, gw, gb = steps.bwd(input, weight, bias, target, class_weight, s, p.ignore_index, p.label_smoothing,
                           p.z_loss, p.softcap, p.kernel, p.chunk_rows, need[0], need[1],
                           need[2] and bias is not None)
    gt = None
    if need[5]:
        if p.reduction == "none":
            gt = (grad_loss.reshape(-1).to(losses.dtype) * losses).to(token_weight.dtype)
        else:
            gt = _token_weight_grad(ctx, grad_loss)
    return gx, gw, gb, None, None, gt


def _token_weight_grad(ctx, grad_loss: Tensor) -> Tensor:
    """d(reduced loss)/d(token_weight) from the saved per-row losses (a second backward)."""
    _, weight, _, target, class_weight, token_weight, losses = ctx.saved_tensors
    p = ctx.params
    acc = losses.dtype
    tw = token_weight.to(acc)
    g = losses
    if p.reduction == "mean":
        w_t, denom, _ = _mean_denominator(target, class_weight, tw, p.ignore_index, weight.shape[0], acc)
        g = (losses - (losses * tw).sum() / denom * w_t) / denom
    return (g * grad_loss.to(acc)).to(token_weight.dtype)


def _scale_op(g: Tensor, grad_loss: Tensor, kernel: bool) -> Tensor:
    """grad * grad_output under torch.compile: the scale custom op (in place) on the kernel path,
    an out-of-place product on the PyTorch path."""
    if kernel:
        scale_grad_(g, grad_loss)
        return g
    return g * grad_loss.to(g.dtype)


def _scale_eager(g: Tensor, grad_loss: Tensor, kernel: bool) -> Tensor:
    """grad *= grad_output in place: the scale kernel on the kernel path (no pass on device when
    grad_output is 1), torch's mul_ on the PyTorch path."""
    if kernel:
        scale_grad(g, grad_loss)
    else:
        g.mul_(grad_loss.to(g.dtype))
    return g


def _reference(ctx) -> tuple[Tensor, tuple]:
    """The loss again in PyTorch, from the saved operands (for a double backward)."""
    input, weight, bias, target, class_weight, token_weight, _ = ctx.saved_tensors
    p = ctx.params
    x = input.float() if p.out_float32 else input
    w = weight.float() if p.out_float32 else weight
    b = bias.float() if p.out_float32 and bias is not None else bias
    loss = reference.linear_cross_entropy(x, w, target, b, class_weight, p.ignore_index, p.reduction,
                                          p.label_smoothing, p.z_loss, p.softcap or None, token_weight)
    return loss, (input, weight, bias, None, None, token_weight)


_apply = autograd_pair(
    linear_xent_fwd, _fwd, _Params, 6,
    setup_context=_setup_context, scale_stored=_scale_stored, recompute=_recompute, reference=_reference,
    eager=BackwardSteps(bwd=_bwd, scale_grad=_scale_eager),
    traced=BackwardSteps(bwd=linear_xent_bwd, scale_grad=_scale_op, eager=False),
)


def linear_xent_loss(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    out_float32: bool = False,
    kernel: bool = False,
    chunk_rows: int = 0,
) -> Tensor:
    """Cross-entropy of ``input @ weight.T + bias`` (never formed whole) against class indices.
    Arguments must be validated: input (N, H), weight (V, H), bias (V,) or None, one floating dtype;
    target (N,) integer; class_weight (V,), token_weight (N,) or None. ``kernel``: the row kernel
    (Triton) computes each chunk's loss and gradient, else torch ops. ``chunk_rows`` > 0 forces the
    rows per chunk. The result has the input's dtype (float32 with ``out_float32``), shape () or
    (N,) for reduction="none". Under torch.compile the custom ops are traced (no graph break); in
    eager mode an autograd.Function calls the same functions directly.
    """
    grad = torch.is_grad_enabled()
    p = _Params(int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0), reduction,
                bool(out_float32), bool(kernel), int(chunk_rows))
    want = (grad and input.requires_grad, grad and weight.requires_grad,
            grad and bias is not None and bias.requires_grad,
            grad and token_weight is not None and token_weight.requires_grad)
    return _apply(input, weight, bias, target, class_weight, token_weight, p, want)
