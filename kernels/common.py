"""Kernel helpers shared by the families: torch.pow's semantics for a scalar exponent, the blocks of
a flat pass, and the in-place gradient scale that every family's backward uses.

``scale_grad_kernel``: a reduced loss's forward stores its gradients already multiplied by the
loss's factors, so backward only multiplies them by ``grad_output``; the kernel loads that scalar
and does nothing when it is 1, without a host sync.
"""

import triton
import triton.language as tl


@triton.jit
def torch_pow(m, gamma):
    """m ** gamma as torch.pow for a scalar gamma >= 0: x ** 0 = 1 for every x (NaN included), a
    negative m gives NaN unless gamma is an integer (then (-1)**gamma |m|**gamma). gamma == 2, the
    focal losses' default, is one multiplication (uniform branches: the others are skipped)."""
    if gamma == 2.0:
        p = m * m
    elif gamma == 0.0:
        p = tl.full(m.shape, 1.0, m.dtype)
    else:
        p = tl.exp2(gamma * tl.log2(tl.abs(m)))  # log2(0) = -inf: 0 ** gamma = 0 for gamma > 0
        whole = gamma == tl.floor(gamma)
        odd = whole & (2.0 * tl.floor(0.5 * gamma) != gamma)
        p = tl.where(m < 0, tl.where(whole, tl.where(odd, -p, p), float("nan")), p)
    return p


@triton.jit
def block_offsets(start, n_elements, BLOCK_SIZE: tl.constexpr, FULL: tl.constexpr):
    """Offsets of the block at start and their mask. Triton proves a mask ``offs < n`` uniform over
    a vector (and so uses 16-byte accesses) only when n is divisible by 16; the kernels therefore
    run the blocks that lie inside [0, n_elements) (FULL, decided at run time) with a constant mask,
    which compiles away, and only a partial last block with the real one."""
    offs = start + tl.arange(0, BLOCK_SIZE)
    if FULL:
        mask = tl.full((BLOCK_SIZE,), 1, tl.int1)
    else:
        mask = offs < n_elements
    return offs, mask


@triton.jit
def scale_grad_kernel(
    grad_ptr,             # [n_elements] contiguous, scaled in place
    grad_output_ptr,      # [] the reduced loss's grad_output
    n_elements,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """grad *= grad_output, skipped on device when grad_output == 1 (grid-stride loop)."""
    go = tl.load(grad_output_ptr).to(ACC_DTYPE)
    if go != 1.0:
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK_SIZE
        for start in range(pid * BLOCK_SIZE, n_elements, step):
            if start + BLOCK_SIZE <= n_elements:
                _scale_block(grad_ptr, go, start, n_elements, ACC_DTYPE, BLOCK_SIZE, FULL=True)
            else:
                _scale_block(grad_ptr, go, start, n_elements, ACC_DTYPE, BLOCK_SIZE, FULL=False)


@triton.jit
def _scale_block(grad_ptr, go, start, n_elements, ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 FULL: tl.constexpr):
    offs, mask = block_offsets(start, n_elements, BLOCK_SIZE, FULL)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(grad_ptr + offs, (g * go).to(grad_ptr.dtype.element_ty), mask=mask)
