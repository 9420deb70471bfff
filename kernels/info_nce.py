"""InfoNCE (contrastive cross-entropy over a batch) without the B x B similarity matrix.

Rows ``a_i`` (queries, ``n_rows`` of them) are scored against rows ``b_j`` (keys, ``n_cols``):
``s_ij = scale * a_i . b_j``; the positive of row i is column ``i + offset`` (offset = 0 for one
process; rank * rows-per-rank when the keys were all-gathered). Per-row loss:

    lse_i  = log sum_j exp(s_ij)
    loss_i = lse_i - s_{i, i + offset}

Forward (``info_nce_fwd_kernel``): one program per BLOCK_M rows walks the key tiles; each tile of
scores is a tensor-core product accumulated in fp32 over D in BLOCK_K slices, folded into an online
log-sum-exp (running max m and sum l: m' = max(m, max_j s_ij), l' = l e^(m - m') + sum_j e^(s_ij - m'))
and then dropped, so only lse (n_rows fp32) is kept. The positive logit is read off the tile
that holds the diagonal. The other direction of a symmetric loss is the same kernel with the roles
of a and b swapped (its lse is the column log-sum-exp of s).

Gradients, for per-row weights w_i = dL/dloss_i (and, for the symmetric loss, per-column weights
c_j = dL/dloss^col_j with column log-sum-exps lse^col_j):

    G_ij = w_i (exp(s_ij - lse_i) - [j = i + offset]) + c_j (exp(s_ij - lse^col_j) - [j = i + offset])
    dL/da_i = scale * sum_j G_ij b_j          dL/db_j = scale * sum_i G_ij a_i

They are computed over chunks of C rows of a (fastloss/ops/info_nce.py): the raw products of the
chunk, a C x n_cols fp32 block, come from one tensor-core GEMM; ``info_nce_chunk_kernel`` turns
them into the rows' log-sum-exp and loss (when the forward computes the gradients itself: reduced
losses, whose row weights are known in advance) and into the G tile; two more GEMMs give dL/da for
the chunk and accumulate dL/db. The chunk is the only score block ever held (C x n_cols is capped),
so memory stays O((n_rows + n_cols) * D + cap). The weights enter divided by ``wscale`` = max |w|,
|c| so that G stays in [-2, 2] when it is stored in half precision for the GEMMs (w = 1/B would
underflow float16); the products are multiplied back by wscale * scale.

``DOT_FP32`` upcasts the operands of tl.dot to float32: set only for bfloat16 under Triton's CPU
interpreter, whose bfloat16 tl.dot returns garbage (triton 3.9); compiled kernels multiply bfloat16
on tensor cores.
"""

import triton
import triton.language as tl


@triton.jit
def _scores(
    a_ptr, b_ptr, rows, cols, row_mask, col_mask, n_dim, stride_a_row, stride_b_row, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """s = scale * a[rows] . b[cols]^T for one [BLOCK_M, BLOCK_N] tile, accumulated over D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC_DTYPE)
    for k0 in range(0, n_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < n_dim
        a = tl.load(a_ptr + rows[:, None] * stride_a_row + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_b_row + ks[:, None],
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
    return acc * scale


@triton.jit
def info_nce_fwd_kernel(
    a_ptr,                # [n_rows, n_dim] row stride stride_a_row, inner stride 1
    b_ptr,                # [n_cols, n_dim] row stride stride_b_row, inner stride 1, same dtype
    loss_ptr,             # [n_rows] ACC_DTYPE, lse_i - s_{i, i + offset}
    lse_ptr,              # [n_rows] ACC_DTYPE, log sum_j exp(s_ij)
    n_rows, n_cols, n_dim, stride_a_row, stride_b_row,
    offset,               # the positive of row i is column i + offset
    scale,                # 1 / temperature
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ALIGN: tl.constexpr,
):
    """Per-row InfoNCE loss and log-sum-exp of BLOCK_M rows, by an online log-sum-exp over key tiles.

    ALIGN (a power of two <= 16) divides n_dim and both row strides: rewritten through it, Triton
    sees 16-byte aligned rows for D = 300 or 1000 too, not only for multiples of 16.
    """
    if ALIGN > 1:
        n_dim = (n_dim // ALIGN) * ALIGN
        stride_a_row = (stride_a_row // ALIGN) * ALIGN
        stride_b_row = (stride_b_row // ALIGN) * ALIGN
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    target = rows + offset
    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_DTYPE)
    l_i = tl.zeros((BLOCK_M,), ACC_DTYPE)
    pos = tl.zeros((BLOCK_M,), ACC_DTYPE)
    for n0 in range(0, n_cols, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_mask = cols < n_cols
        s = _scores(a_ptr, b_ptr, rows, cols, row_mask, col_mask, n_dim, stride_a_row, stride_b_row,
                    scale, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, ACC_DTYPE, DOT_FP32)
        s = tl.where(col_mask[None, :], s, float("-inf"))
        pos += tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(loss_ptr + rows, lse - pos, mask=row_mask)


@triton.jit
def info_nce_chunk_kernel(
    s_ptr,                # [n_rows, n_cols] fp32 raw products a_i . b_j of a chunk of rows (row stride n_cols)
    lse_ptr,              # [n_rows] ACC_DTYPE, written iff COMPUTE_LSE, read otherwise
    loss_ptr,             # [n_rows] ACC_DTYPE lse_i - s_{i, i + offset}, written iff COMPUTE_LSE
    w_row_ptr,            # [n_rows] ACC_DTYPE row weights / wscale, read iff WRITE_GRAD
    lse_col_ptr,          # [n_cols] ACC_DTYPE column log-sum-exps, read iff HAS_COL
    w_col_ptr,            # [n_cols] ACC_DTYPE column weights / wscale, read iff HAS_COL
    grad_ptr,             # [n_rows, n_cols] G / wscale in the operands' dtype, written iff WRITE_GRAD
    n_rows, n_cols,
    row0,                 # global index of the chunk's first row: the positive of row r is column
    offset,               # row0 + r + offset
    scale,                # 1 / temperature, applied to s here
    COMPUTE_LSE: tl.constexpr, WRITE_GRAD: tl.constexpr, HAS_COL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, ALIGN: tl.constexpr,
):
    """Log-sum-exp / loss of BLOCK_R rows of a score chunk and/or their gradient tile G (ALIGN: a
    power of two <= 16 dividing n_cols, as in info_nce_fwd_kernel)."""
    if ALIGN > 1:
        n_cols = (n_cols // ALIGN) * ALIGN
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    target = row0 + rows + offset
    if COMPUTE_LSE:
        m_i = tl.full((BLOCK_R,), float("-inf"), ACC_DTYPE)
        l_i = tl.zeros((BLOCK_R,), ACC_DTYPE)
        pos = tl.zeros((BLOCK_R,), ACC_DTYPE)
        for n0 in range(0, n_cols, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            s = tl.load(s_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask,
                        other=float("-inf")).to(ACC_DTYPE) * scale
            pos += tl.sum(tl.where(cols[None, :] == target[:, None], s, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # masked rows: no -inf - -inf
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), axis=1)
            m_i = m_new
        lse = m_i + tl.log(l_i)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        tl.store(loss_ptr + rows, lse - pos, mask=row_mask)
    if WRITE_GRAD:
        if not COMPUTE_LSE:
            lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        w_r = tl.load(w_row_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
        for n0 in range(0, n_cols, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_mask = cols < n_cols
            mask = row_mask[:, None] & col_mask[None, :]
            s = tl.load(s_ptr + rows[:, None] * n_cols + cols[None, :], mask=mask,
                        other=0.0).to(ACC_DTYPE) * scale
            eq = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
            g = w_r[:, None] * (tl.exp(s - lse[:, None]) - eq)
            if HAS_COL:
                lse_c = tl.load(lse_col_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
                w_c = tl.load(w_col_ptr + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
                g += w_c[None, :] * (tl.exp(s - lse_c[None, :]) - eq)
            tl.store(grad_ptr + rows[:, None] * n_cols + cols[None, :],
                     g.to(grad_ptr.dtype.element_ty), mask=mask)
