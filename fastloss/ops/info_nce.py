"""Launchers and autograd for InfoNCE (kernels/info_nce.py): per-row losses of rows of ``a`` scored
against every row of ``b``, never holding the ``(n_rows, n_cols)`` score matrix.

``info_nce_fwd`` returns the per-row losses and log-sum-exps (fp32; fp64 for fp64 operands) and,
with ``with_cols`` (the symmetric loss of one process: square, offset 0), the same for the other
direction, i.e. for the columns of the score matrix. ``info_nce_bwd`` turns per-row (and per-column)
weights into the gradients of both operands, in two launches of one kernel that recompute the score
tiles. The reduction is left to the caller (torch ops on n_rows values).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fastloss.ops._utils import acc_dtype, count_launch, empty

__all__ = ["info_nce_losses"]


@functools.cache
def _kernels():
    import triton.language as tl

    from fastloss.kernels import info_nce as k

    return k, {torch.float32: tl.float32, torch.float64: tl.float64}


def _next_pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


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
    k = max(16, _next_pow2(n_dim))
    if device.type != "cuda":
        return {"fwd_m": 16, "fwd_n": 16, "bwd_m": 16, "bwd_n": 16, "block_k": min(32, k),
                "block_do": min(64, k), "fwd_warps": 4, "bwd_warps": 4, "fwd_stages": 1, "bwd_stages": 1}
    if dtype in (torch.float32, torch.float64):
        return {"fwd_m": 64, "fwd_n": 128, "bwd_m": 64, "bwd_n": 64, "block_k": min(32, k),
                "block_do": min(128, k), "fwd_warps": 4, "bwd_warps": 8, "fwd_stages": 2, "bwd_stages": 2}
    # H200, B = 16384, D = 512, bf16: a whole 512-wide gradient row block per program (one recompute
    # of the score tiles) beats 256-wide halves (9.1 vs 13.6 ms fwd+bwd); 128-wide key tiles in the
    # forward beat 64 (1.08 vs 1.45 ms).
    return {"fwd_m": 128, "fwd_n": 128, "bwd_m": 64, "bwd_n": 64, "block_k": min(64, k),
            "block_do": min(512, k), "fwd_warps": 8, "bwd_warps": 8, "fwd_stages": 3, "bwd_stages": 2}


def _rows_fwd(a: Tensor, b: Tensor, offset: int, scale: float) -> tuple[Tensor, Tensor]:
    k, tl_dtype = _kernels()
    n_rows, n_dim = a.shape
    n_cols = b.shape[0]
    acc = acc_dtype(a.dtype)
    loss = empty((n_rows,), acc, a.device)
    lse = empty((n_rows,), acc, a.device)
    cfg = _config(a.device, n_dim, a.dtype)
    grid = (triton_cdiv(n_rows, cfg["fwd_m"]),)
    k.info_nce_fwd_kernel[grid](
        a, b, loss, lse, n_rows, n_cols, n_dim, a.stride(0), b.stride(0), offset, scale,
        PRECISION=_precision(a.dtype), ACC_DTYPE=tl_dtype[acc], DOT_FP32=_dot_fp32(a),
        BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], BLOCK_K=cfg["block_k"],
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


def _fwd(a: Tensor, b: Tensor, offset: int, scale: float, with_cols: bool
         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss_rows, lse_rows, loss_cols, lse_cols); the column ones empty unless with_cols."""
    a, b = a.contiguous(), b.contiguous()
    a, scale = _prescale(a, scale)
    loss, lse = _rows_fwd(a, b, offset, scale)
    if with_cols:
        loss_c, lse_c = _rows_fwd(b, a, -offset, scale)
    else:
        loss_c = lse_c = loss.new_empty(0)
    return loss, lse, loss_c, lse_c


@torch.library.custom_op("fastloss::info_nce_fwd", mutates_args=())
def info_nce_fwd(a: Tensor, b: Tensor, offset: int, scale: float, with_cols: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Custom-op form of _fwd, for torch.compile."""
    return _fwd(a, b, offset, scale, with_cols)


@info_nce_fwd.register_fake
def _(a, b, offset, scale, with_cols):
    acc = acc_dtype(a.dtype)
    rows = a.new_empty(a.shape[:1], dtype=acc)
    cols = a.new_empty(b.shape[:1] if with_cols else (0,), dtype=acc)
    return rows, rows.new_empty(rows.shape), cols, cols.new_empty(cols.shape)


def _grad_launch(a, b, lse_row, w_row, lse_col, w_col, wscale, offset, scale, has_row, has_col):
    """dL/da with G built from the row statistics (has_row) and/or the column ones (has_col)."""
    k, tl_dtype = _kernels()
    n_rows, n_dim = a.shape
    n_cols = b.shape[0]
    grad = empty(a.shape, a.dtype, a.device)
    cfg = _config(a.device, n_dim, a.dtype)
    grid = (triton_cdiv(n_rows, cfg["bwd_m"]), triton_cdiv(n_dim, cfg["block_do"]))
    k.info_nce_bwd_kernel[grid](
        a, b, lse_row, w_row, lse_col, w_col, wscale, grad,
        n_rows, n_cols, n_dim, a.stride(0), b.stride(0), offset, scale,
        HAS_ROW=has_row, HAS_COL=has_col, PRECISION=_precision(a.dtype),
        ACC_DTYPE=tl_dtype[acc_dtype(a.dtype)], DOT_FP32=_dot_fp32(a),
        BLOCK_M=cfg["bwd_m"], BLOCK_N=cfg["bwd_n"], BLOCK_K=cfg["block_k"], BLOCK_DO=cfg["block_do"],
        num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"],
    )
    count_launch("info_nce_bwd_kernel")
    return grad


def _bwd(a: Tensor, b: Tensor, lse: Tensor, lse_c: Tensor, grad_rows: Tensor, grad_cols: Tensor,
         offset: int, scale: float, with_cols: bool, need_a: bool, need_b: bool) -> tuple[Tensor, Tensor]:
    """(dL/da, dL/db) for dL/dloss_rows = grad_rows (and dL/dloss_cols = grad_cols with with_cols)."""
    a, b = a.contiguous(), b.contiguous()
    unscaled = scale
    a, scale = _prescale(a, scale)
    acc = lse.dtype
    w = grad_rows.to(acc).contiguous()
    w_c = grad_cols.to(acc).contiguous() if with_cols else w
    # One scale for both weight vectors, on device (no sync); a floor keeps all-zero weights finite.
    wscale = w.abs().amax() if w.numel() else w.new_zeros(())
    if with_cols and w_c.numel():
        wscale = torch.maximum(wscale, w_c.abs().amax())
    wscale = wscale.clamp_min(torch.finfo(acc).tiny).reshape(1)
    ga = gb = a.new_empty(0)
    if need_a:
        ga = _grad_launch(a, b, lse, w, lse_c if with_cols else lse, w_c, wscale, offset, scale,
                          True, with_cols)
        if scale != unscaled:  # float64: s = (scale * a) . b, so dL/da = scale * dL/d(scale * a)
            ga = ga * unscaled
    if need_b:
        gb = _grad_launch(b, a, lse_c if with_cols else lse, w_c, lse, w, wscale, -offset, scale,
                          with_cols, True)
    return ga, gb


@torch.library.custom_op("fastloss::info_nce_bwd", mutates_args=())
def info_nce_bwd(a: Tensor, b: Tensor, lse: Tensor, lse_c: Tensor, grad_rows: Tensor, grad_cols: Tensor,
                 offset: int, scale: float, with_cols: bool, need_a: bool, need_b: bool
                 ) -> tuple[Tensor, Tensor]:
    """Custom-op form of _bwd, for torch.compile."""
    return _bwd(a, b, lse, lse_c, grad_rows, grad_cols, offset, scale, with_cols, need_a, need_b)


@info_nce_bwd.register_fake
def _(a, b, lse, lse_c, grad_rows, grad_cols, offset, scale, with_cols, need_a, need_b):
    return (a.new_empty(a.shape) if need_a else a.new_empty(0),
            b.new_empty(b.shape) if need_b else b.new_empty(0))


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _setup_context(ctx, inputs, output):
    a, b, offset, scale, with_cols = inputs
    _, lse, _, lse_c = output
    ctx.save_for_backward(a, b, lse, lse_c)
    ctx.args = (offset, scale, with_cols)


def _backward(ctx, grad_rows, grad_cols, bwd):
    a, b, lse, lse_c = ctx.saved_tensors
    offset, scale, with_cols = ctx.args
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_rows is None:
        grad_rows = lse.new_zeros(lse.shape)
    if grad_cols is None or not with_cols:
        grad_cols = lse_c.new_zeros(lse_c.shape)
    ga, gb = bwd(a, b, lse, lse_c, grad_rows, grad_cols, offset, scale, with_cols, need_a, need_b)
    return ga if need_a else None, gb if need_b else None, None, None, None


def _setup_context_op(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.mark_non_differentiable(output[1], output[3])


def _backward_op(ctx, grad_rows, _grad_lse, grad_cols, _grad_lse_c):
    return _backward(ctx, grad_rows, grad_cols, info_nce_bwd)


info_nce_fwd.register_autograd(_backward_op, setup_context=_setup_context_op)


class _InfoNCE(torch.autograd.Function):
    """Eager twin of the custom ops: the same launchers and backward without the dispatch cost."""

    @staticmethod
    def forward(ctx, a, b, offset, scale, with_cols):
        output = _fwd(a, b, offset, scale, with_cols)
        _setup_context(ctx, (a, b, offset, scale, with_cols), output)
        return output[0], output[2]

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):
        return _backward(ctx, grad_rows, grad_cols, _bwd)


def info_nce_losses(a: Tensor, b: Tensor, scale: float, offset: int = 0, with_cols: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
    """Per-row InfoNCE losses of ``a`` (M, D) against ``b`` (N, D), positive of row i = row i + offset
    of b, and with ``with_cols`` (M == N, offset 0) the per-row losses of the other direction (b
    against a). Operands validated, 2-D, one floating dtype, M, N >= 1; results in float32 (float64
    for float64 operands)."""
    args = (a, b, int(offset), float(scale), bool(with_cols))
    if torch.compiler.is_compiling():
        rows, _, cols, _ = info_nce_fwd(*args)
    else:
        rows, cols = _InfoNCE.apply(*args)
    return rows, cols if with_cols else None
