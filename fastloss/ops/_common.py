"""What the families' launchers and autograd share (rather than importing each other's private
names): the 16-bit dtypes, the flat-pass launch configuration, the in-place gradient scale every
reduced loss's backward makes (kernels/common.py), and torch's IndexError for class indices."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from fastloss.ops._utils import acc_dtype, cdiv, count_launch

__all__ = [
    "HALF_DTYPES",
    "check_targets_cpu",
    "flat_block_config",
    "max_programs",
    "scale_each",
    "scale_grad",
    "scale_grad_",
    "tl_dtype",
]

#: Dtypes whose forward-made gradients backward rescales (or recomputes) so that they are rounded
#: once: multiplying a stored 16-bit gradient by grad_output would round it a second time.
HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _kernels():
    from fastloss.kernels import common as k

    return k


@functools.cache
def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of an accumulation dtype (float32 or float64)."""
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def flat_block_config(n: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a flat pass over n elements."""
    return (1024, 4) if n <= 65536 else (4096, 8)


@functools.cache
def max_programs(device: torch.device) -> int:
    """Programs of a grid-stride pass (a few per SM; 4 under the interpreter)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def scale_grad(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output in place; the kernel skips the pass on device when grad_output == 1."""
    n = grad.numel()
    if n == 0:
        return
    block, warps = flat_block_config(n)
    grid = min(cdiv(n, block), max_programs(grad.device))
    _kernels().scale_grad_kernel[(grid,)](
        grad, grad_output, n, ACC_DTYPE=tl_dtype(acc_dtype(grad.dtype)), BLOCK_SIZE=block,
        num_warps=warps,
    )
    count_launch("scale_grad_kernel")


# The custom-op form of scale_grad, for torch.compile (same signature; eager autograd calls scale_grad)
scale_grad_ = torch.library.custom_op("fastloss::scale_grad_", mutates_args=("grad",))(scale_grad)


@scale_grad_.register_fake
def _(grad, grad_output):
    return None


def scale_each(grads: tuple, grad_output: Tensor, scale: Callable[[Tensor, Tensor], None]) -> tuple:
    """Every gradient of ``grads`` (None skipped) times grad_output in place, by ``scale``
    (scale_grad, or its custom op under torch.compile); returns ``grads``."""
    for g in grads:
        if g is not None:
            scale(g, grad_output)
    return grads


def check_targets_cpu(target: Tensor, n_cols: int, ignore_index: int) -> None:
    """torch's IndexError for an out-of-range class index (CPU only: this reads the values). One
    min / max pass settles the usual case, every index in range; otherwise the full check finds the
    first offending index that is not ignore_index."""
    if target.numel():
        lo, hi = torch.aminmax(target)
        if lo.item() >= 0 and hi.item() < n_cols:
            return
    bad = (target != ignore_index) & ((target < 0) | (target >= n_cols))
    if bad.any():
        raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
