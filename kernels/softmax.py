"""Row kernels of the softmax family: cross-entropy and softmax focal loss.

Logits are read as an (N, C, D) view: row ``r`` of the loss is ``n = r // D``, ``d = r % D`` and its
C classes sit ``stride_logits_col`` apart, so (C,), (N, C) and (N, C, d1, ..., dk) inputs of any
strides need no copy. One program handles ``BLOCK_ROWS`` rows (several short rows, or one long one).
The forward kernel writes the loss of each row and, when asked, the gradient of the loss with
respect to the logits (and to probability targets): backward then only multiplies by grad_output.
For 16-bit logits that would round the gradient twice (once stored, once scaled), so there the
backward kernel runs the same rows again with grad_output in the row factors (fp32) and rounds
once: always for reduction="none" (whose forward makes no gradient), and for a reduced loss
unless grad_output is 0 or 2^-k, k >= 0 (1, or gradient accumulation's 1/2^k: the stored gradient
times it is exact, see _softmax_rows).

Online log-sum-exp. Per row ``m = max_j z_j``, ``d = sum_j exp(z_j - m)``, ``lse = m + log d``.
Over column blocks, with the block's own max ``m_b``: ``m' = max(m, m_b)``,
``d' = d exp(m - m') + sum_b exp(z_j - m')``. A row that fits one block (SINGLE_PASS) is read once
and its gradient written once; a longer row is read twice (this pass, then the gradient pass).

Sums of the form ``S = sum_j c_j (lse - z_j)`` (label smoothing, probability targets) are kept as
``W log d + A`` with ``W = sum_j c_j`` and ``A = sum_j c_j (m - z_j)``: every term of ``A`` is >= 0,
so nothing cancels, and when m grows by ``delta`` the running ``A`` grows by ``W delta``.

Softcap s (Gemma 2): ``z = s tanh(x / s)``, ``dz/dx = 1 - tanh^2 = 4 e / (1 + e)^2``,
``e = exp(-2 |x| / s)``. Without it ``z = x``.

Cross-entropy, class-index target t, class weight w (1 when absent; ``w_t`` = 0 on ignored rows),
label smoothing eps, C classes, z-loss coefficient zl (PaLM), ``W = sum_j w_j``:
    loss   = (1 - eps) w_t (lse - z_t) + (eps / C) sum_j w_j (lse - z_j) + zl w_t lse^2
    dl/dz_j = p_j [(1 - eps) w_t + (eps / C) W + 2 zl w_t lse] - (1 - eps) w_t [j == t]
              - (eps / C) w_j
    (torch's formula: the smoothing term is masked on ignored rows and "mean" divides the sum
    by sum_rows w_t.) ``lse - z_t`` is evaluated as ``(m - z_t) + log d``.

Probability targets y, ``y'_j = (1 - eps) y_j + eps / C``, ``Y = sum_j w_j y'_j``:
    loss    = sum_j w_j y'_j (lse - z_j) + zl lse^2
    dl/dz_j = p_j (Y + 2 zl lse) - w_j y'_j
    dl/dy_j = (1 - eps) w_j (lse - z_j)

Softmax focal loss, class-index target t, ``l = lse - z_t = -log p_t``, ``q = 1 - p_t``,
alpha ``a_t`` (a float or a per-class value):
    loss    = a_t w_t q^g l
    dq/dz_j = p_t (p_j - [j == t]),  dl/dz_j = p_j - [j == t]
    dloss/dz_j = P (p_j - [j == t]),  P = a_t w_t (q^g + g p_t q^g l / q)
    ``l / q`` -> 1 as q -> 0 (it is taken as 1 at q = 0), so the gradient stays finite when
    p_t -> 1 for every g >= 0, 0 < g < 1 included. Each factor is computed without cancellation:
    ``p_t = exp(-l)`` (never ``1 - q``: confidently wrong rows have p_t ~ 0, q ~ 1), and
    ``q = 1 - p_t`` where p_t < 1/2 but ``-expm1(-l)`` where p_t >= 1/2; the target column's
    gradient is ``-P q`` (never ``P (p_t - 1)``, which cancels as p_t -> 1).

Rows whose target is ignore_index get loss 0 and gradient 0. A target outside [0, C) that is not
ignore_index is never used as an address (it is clamped); its row gets NaN loss and gradient.
"""

import triton
import triton.language as tl

from .common import torch_pow


@triton.jit
def _expm1(x):
    # Kahan's trick: exact where exp(x) rounds to 1, no libdevice (the interpreter lacks it).
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(u)))


@triton.jit
def _softcap(x, softcap):
    """(softcap * tanh(x / softcap), d/dx of it) without libdevice."""
    e = tl.exp(-2.0 * tl.abs(x) / softcap)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    return softcap * t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _load_z(
    logits_ptr, offs, mask, softcap,
    HAS_SOFTCAP: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Logits at offs (-inf where masked), softcapped when asked, and dz/dx (1 without softcap)."""
    x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(ACC_DTYPE)
    if HAS_SOFTCAP:
        z, dz = _softcap(x, softcap)
        z = tl.where(mask, z, float("-inf"))
    else:
        z = x
        dz = tl.full(x.shape, 1.0, ACC_DTYPE)
    return z, dz


@triton.jit
def _smooth_coef(
    target_ptr, weight_ptr, cols, mask, t_offs, label_smoothing, inv_n_cols,
    HAS_WEIGHT: tl.constexpr, PROB_TARGET: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """c_j of the sum_j c_j (lse - z_j) term: w_j y'_j for probability targets, w_j otherwise."""
    if HAS_WEIGHT:
        c = tl.load(weight_ptr + cols + tl.zeros(mask.shape, tl.int32), mask=mask, other=0.0)
        c = c.to(ACC_DTYPE)
    else:
        c = tl.where(mask, 1.0, 0.0).to(ACC_DTYPE)
    if PROB_TARGET:
        y = tl.load(target_ptr + t_offs, mask=mask, other=0.0).to(ACC_DTYPE)
        c = c * ((1.0 - label_smoothing) * y + label_smoothing * inv_n_cols)
    return c


@triton.jit
def cross_entropy_fwd_kernel(
    logits_ptr,           # [N, C, D] strided, floating
    target_ptr,           # [n_rows] integer class indices, or [N, C, D] strided probabilities
    weight_ptr,           # [C] class weights, read iff HAS_WEIGHT
    alpha_ptr,            # [C] focal alpha per class, read iff HAS_ALPHA
    loss_ptr,             # [n_rows] per-row loss (times scale), loss dtype
    grad_ptr,             # [N, C, D] strided, logits dtype, scale * dloss/dlogits iff GRAD_INPUT
    grad_target_ptr,      # [N, C, D] contiguous, scale * dloss/dtarget iff GRAD_TARGET
    denom_ptr,            # [] sum of target weights; scale is 1 / it iff SCALE_BY_DENOM
    n_rows, n_cols, n_inner,                                  # N * D, C, D
    stride_logits_n, stride_logits_col, stride_logits_d,
    stride_grad_n, stride_grad_col, stride_grad_d,
    stride_target_n, stride_target_col, stride_target_d,      # probability targets only
    ignore_index,
    # float64 (a Python float would be passed as float32), cast to ACC_DTYPE in the kernel
    label_smoothing: tl.float64, z_loss: tl.float64, softcap: tl.float64, alpha: tl.float64,
    gamma: tl.float64,
    FOCAL: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_ALPHA: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SCALE_BY_DENOM: tl.constexpr, MEAN_OVER_ROWS: tl.constexpr,
    GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr, SINGLE_PASS: tl.constexpr,
    COLS_I64: tl.constexpr, ROW_ALIGN: tl.constexpr, PEEL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Loss of BLOCK_ROWS rows and, when asked, their gradients (see _softmax_rows)."""
    _softmax_rows(
        logits_ptr, target_ptr, weight_ptr, alpha_ptr, loss_ptr, grad_ptr, grad_target_ptr,
        denom_ptr, loss_ptr, 0,
        n_rows, n_cols, n_inner,
        stride_logits_n, stride_logits_col, stride_logits_d,
        stride_grad_n, stride_grad_col, stride_grad_d,
        stride_target_n, stride_target_col, stride_target_d,
        ignore_index, label_smoothing, z_loss, softcap, alpha, gamma,
        FOCAL, PROB_TARGET, HAS_WEIGHT, HAS_ALPHA, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP,
        SCALE_BY_DENOM, MEAN_OVER_ROWS, GRAD_INPUT, GRAD_TARGET, SINGLE_PASS, COLS_I64, ROW_ALIGN,
        PEEL, ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE, GO=0, SCALE_STORED=False,
    )


@triton.jit
def cross_entropy_bwd_kernel(
    logits_ptr,           # [N, C, D] strided, floating
    target_ptr,           # [n_rows] integer class indices, or [N, C, D] strided probabilities
    weight_ptr,           # [C] class weights, read iff HAS_WEIGHT
    alpha_ptr,            # [C] focal alpha per class, read iff HAS_ALPHA
    grad_output_ptr,      # [n_rows] strided (GO == 1) or [] (GO == 2): the loss's grad_output
    grad_ptr,             # [N, C, D] strided, logits dtype, grad_output * dloss/dlogits iff GRAD_INPUT
    grad_target_ptr,      # [N, C, D] contiguous, grad_output * dloss/dtarget iff GRAD_TARGET
    denom_ptr,            # [] sum of target weights; scale is 1 / it iff SCALE_BY_DENOM
    n_rows, n_cols, n_inner,                                  # N * D, C, D
    stride_logits_n, stride_logits_col, stride_logits_d,
    stride_grad_n, stride_grad_col, stride_grad_d,
    stride_target_n, stride_target_col, stride_target_d,      # probability targets only
    stride_go,                                                # GO == 1
    ignore_index,
    label_smoothing: tl.float64, z_loss: tl.float64, softcap: tl.float64, alpha: tl.float64,
    gamma: tl.float64,
    FOCAL: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_ALPHA: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SCALE_BY_DENOM: tl.constexpr, MEAN_OVER_ROWS: tl.constexpr,
    GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr, SINGLE_PASS: tl.constexpr,
    COLS_I64: tl.constexpr, ROW_ALIGN: tl.constexpr, PEEL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, GO: tl.constexpr, SCALE_STORED: tl.constexpr,
):
    """Gradients of BLOCK_ROWS rows with grad_output applied before the one rounding to the
    gradient's dtype (16-bit logits; see _softmax_rows for GO and SCALE_STORED)."""
    _softmax_rows(
        logits_ptr, target_ptr, weight_ptr, alpha_ptr, grad_output_ptr, grad_ptr, grad_target_ptr,
        denom_ptr, grad_output_ptr, stride_go,
        n_rows, n_cols, n_inner,
        stride_logits_n, stride_logits_col, stride_logits_d,
        stride_grad_n, stride_grad_col, stride_grad_d,
        stride_target_n, stride_target_col, stride_target_d,
        ignore_index, label_smoothing, z_loss, softcap, alpha, gamma,
        FOCAL, PROB_TARGET, HAS_WEIGHT, HAS_ALPHA, HAS_SMOOTHING, HAS_Z_LOSS, HAS_SOFTCAP,
        SCALE_BY_DENOM, MEAN_OVER_ROWS, GRAD_INPUT, GRAD_TARGET, SINGLE_PASS, COLS_I64, ROW_ALIGN,
        PEEL, ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE, GO, SCALE_STORED,
    )


@triton.jit
def _softmax_rows(
    logits_ptr, target_ptr, weight_ptr, alpha_ptr, loss_ptr, grad_ptr, grad_target_ptr, denom_ptr,
    grad_output_ptr, stride_go,
    n_rows, n_cols, n_inner,
    stride_logits_n, stride_logits_col, stride_logits_d,
    stride_grad_n, stride_grad_col, stride_grad_d,
    stride_target_n, stride_target_col, stride_target_d,
    ignore_index, label_smoothing, z_loss, softcap, alpha, gamma,
    FOCAL: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_ALPHA: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SCALE_BY_DENOM: tl.constexpr, MEAN_OVER_ROWS: tl.constexpr,
    GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr, SINGLE_PASS: tl.constexpr,
    COLS_I64: tl.constexpr, ROW_ALIGN: tl.constexpr, PEEL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, GO: tl.constexpr, SCALE_STORED: tl.constexpr,
):
    """The row program of both kernels (arguments as theirs; loss_ptr is stored iff GO == 0).

    GO == 0: forward, the loss (and gradients times scale when asked). GO == 1: backward of
    reduction="none", gradients times the row's grad_output[row * stride_go]. GO == 2: backward of a
    reduced loss, gradients times the scalar grad_output; with SCALE_STORED the gradient buffers
    hold the forward's gradients (times scale, rounded once): when grad_output is 1 they are left,
    when it is 0 or 2^-k (k >= 0) they are multiplied by it (exact, except for a product in
    float16's subnormal range, below 6.1e-5, which may be one subnormal step, 6e-8, off), otherwise
    the rows are recomputed from the logits with grad_output in the row factors, rounded once.

    ROW_ALIGN is a power of two (at most 16) dividing every row's first element offset in logits,
    gradient and probability targets; the launcher derives it from the strides. Triton proves
    alignment only for strides divisible by 16, so without the hint rows of e.g. 1000 classes are
    read and written one element at a time instead of 16 bytes at a time.

    Looped rows (one row a program) walk column blocks [start, start + BLOCK_SIZE); blocks inside
    [0, n_cols) run with an all-true mask, the others with the real one. PEEL > 1 (16 bytes in
    elements; the launcher sets it only when logits and gradient rows start equally misaligned, with
    column stride 1 and D = 1) starts the walk at column -(row offset mod PEEL), so that the blocks
    start 16-byte aligned in memory even when rows do not (50257 classes, say).
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    n = rows // n_inner
    dd = rows - n * n_inner
    logit_row = n * stride_logits_n + dd * stride_logits_d          # [BLOCK_ROWS] int64
    target_row = n * stride_target_n + dd * stride_target_d
    grad_row = n * stride_grad_n + dd * stride_grad_d
    gt_row = n * n_cols * n_inner + dd                              # contiguous [N, C, D]
    if ROW_ALIGN > 1:
        # exact (ROW_ALIGN divides them all); written so that Triton sees the divisibility, which
        # tl.multiple_of loses when its operation is folded away. n_cols too, so that the column
        # mask is uniform over each vector.
        n_cols = (n_cols // ROW_ALIGN) * ROW_ALIGN
        logit_row = (logit_row // ROW_ALIGN) * ROW_ALIGN
        target_row = (target_row // ROW_ALIGN) * ROW_ALIGN
        grad_row = (grad_row // ROW_ALIGN) * ROW_ALIGN
        gt_row = (gt_row // ROW_ALIGN) * ROW_ALIGN
    one = tl.full((), 1.0, ACC_DTYPE)
    inv_n_cols = one / n_cols
    # the float64 scalars in the accumulation dtype (tl.full also takes the interpreter's floats)
    eps = tl.full((), label_smoothing, ACC_DTYPE)
    z_loss = tl.full((), z_loss, ACC_DTYPE)
    softcap = tl.full((), softcap, ACC_DTYPE)
    alpha = tl.full((), alpha, ACC_DTYPE)
    gamma = tl.full((), gamma, ACC_DTYPE)
    NEED_C: tl.constexpr = PROB_TARGET or HAS_SMOOTHING

    run = True
    if GO == 2:
        go = tl.load(grad_output_ptr).to(ACC_DTYPE)
        if SCALE_STORED:
            # the stored, once-rounded gradient times go is the once-rounded product when go is 0
            # or a power of two 2^-k (mantissa bits all 0); not for |go| > 1: a float16 gradient
            # stored below 6.1e-5 kept fewer bits, which a loss scale of 2^16 would bring to light
            exact = ((go.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFF) == 0) & (tl.abs(go) <= 1.0)
            if exact & (go != 1.0):
                _scale_stored(grad_ptr, grad_target_ptr, grad_row, gt_row, row_mask, pid, stride_logits_n,
                              n_cols, n_inner, stride_grad_col, go, GRAD_INPUT, GRAD_TARGET, SINGLE_PASS,
                              COLS_I64, PEEL, ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE)
            run = exact == 0
    if run:
        # per-row target quantities: validity, clamped index, weight, target logit
        if PROB_TARGET:
            valid = row_mask
            bad = rows < 0
            t = tl.zeros((BLOCK_ROWS,), tl.int64)
            w_t = tl.where(row_mask, 1.0, 0.0).to(ACC_DTYPE)
        else:
            t = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
            valid = row_mask & (t != ignore_index)
            in_range = (t >= 0) & (t < n_cols)
            bad = valid & ~in_range
            t = tl.where(valid & in_range, t, 0)
            if HAS_WEIGHT:
                w_t = tl.load(weight_ptr + t, mask=valid & in_range, other=0.0).to(ACC_DTYPE)
            else:
                w_t = tl.where(valid, 1.0, 0.0).to(ACC_DTYPE)
            z_t = _load_z(logits_ptr, logit_row + t * stride_logits_col, valid & in_range, softcap,
                          HAS_SOFTCAP, ACC_DTYPE)[0]
        if SCALE_BY_DENOM:
            scale = one / tl.load(denom_ptr).to(ACC_DTYPE)
        elif MEAN_OVER_ROWS:
            scale = one / n_rows
        else:
            scale = one
        if GO == 1:
            scale = scale * tl.load(grad_output_ptr + rows * stride_go, mask=row_mask, other=0.0).to(ACC_DTYPE)
        elif GO == 2:
            scale = scale * go

        cols = tl.arange(0, BLOCK_SIZE)
        if COLS_I64:  # some (n_cols - 1) * stride_*_col does not fit in int32
            cols = cols.to(tl.int64)
        # pass 1: m, d and (for smoothing / probability targets) W = sum c_j, A = sum c_j (m - z_j)
        if SINGLE_PASS:
            mask = row_mask[:, None] & (cols < n_cols)[None, :]
            z, dz = _load_z(logits_ptr, logit_row[:, None] + (cols * stride_logits_col)[None, :], mask,
                            softcap, HAS_SOFTCAP, ACC_DTYPE)
            m = tl.max(z, axis=1)
            m = tl.where(row_mask, m, 0.0)
            e = tl.exp(z - m[:, None])
            d = tl.sum(e, axis=1)
            if NEED_C:
                c = _smooth_coef(target_ptr, weight_ptr, cols[None, :], mask,
                                 target_row[:, None] + (cols * stride_target_col)[None, :],
                                 eps, inv_n_cols, HAS_WEIGHT, PROB_TARGET, ACC_DTYPE)
                c_sum = tl.sum(c, axis=1)
                a_sum = tl.sum(tl.where(mask, c * (m[:, None] - z), 0.0), axis=1)
        else:
            m = tl.full((BLOCK_ROWS,), float("-inf"), ACC_DTYPE)
            d = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
            c_sum = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
            a_sum = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
            c_first = _first_col(pid, stride_logits_n, PEEL)
            for start in range(c_first, n_cols, BLOCK_SIZE):
                if (start >= 0) & (start + BLOCK_SIZE <= n_cols):
                    m, d, c_sum, a_sum = _lse_step(
                        logits_ptr, target_ptr, weight_ptr, logit_row, target_row, row_mask, start,
                        n_cols, stride_logits_col, stride_target_col, softcap, eps, inv_n_cols,
                        m, d, c_sum, a_sum, HAS_SOFTCAP, NEED_C, HAS_WEIGHT, PROB_TARGET, COLS_I64, PEEL,
                        ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE, FULL=True,
                    )
                else:
                    m, d, c_sum, a_sum = _lse_step(
                        logits_ptr, target_ptr, weight_ptr, logit_row, target_row, row_mask, start,
                        n_cols, stride_logits_col, stride_target_col, softcap, eps, inv_n_cols,
                        m, d, c_sum, a_sum, HAS_SOFTCAP, NEED_C, HAS_WEIGHT, PROB_TARGET, COLS_I64, PEEL,
                        ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE, FULL=False,
                    )
        d = tl.where(row_mask, d, 1.0)      # rows past n_rows: keep them finite
        log_d = tl.log(d)
        lse = m + log_d

        # per-row loss, and the row factors of the gradient g_j = p_j P - [j == t] Q - c_j R
        # (focal: g_j = p_j P for j != t and g_t = -Q, see the module docstring)
        if PROB_TARGET:
            loss = c_sum * log_d + a_sum
            coef_p = c_sum
            coef_q = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
            coef_r = tl.full((BLOCK_ROWS,), 1.0, ACC_DTYPE)
        elif FOCAL:
            nll = (m - z_t) + log_d
            # p_t and q = 1 - p_t each without cancellation: q = 1 - p_t is exact enough where
            # p_t < 1/2, -expm1(-l) where p_t >= 1/2 (there p_t = exp(-l) itself is accurate)
            p_t = tl.exp(-nll)
            q = tl.where(nll > 0.6931471805599453, 1.0 - p_t, -_expm1(-nll))
            if HAS_ALPHA:
                a_t = tl.load(alpha_ptr + t, mask=valid, other=0.0).to(ACC_DTYPE)
            else:
                a_t = alpha
            q_g = torch_pow(q, gamma)
            ratio = tl.where(q > 0, nll / tl.where(q > 0, q, 1.0), 1.0)    # l / q -> 1 as q -> 0
            loss = a_t * w_t * q_g * nll
            coef_p = a_t * w_t * (q_g + gamma * p_t * q_g * ratio)
            coef_q = coef_p * q
            coef_r = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
        else:
            nll = (m - z_t) + log_d
            loss = (1.0 - eps) * w_t * nll
            coef_p = (1.0 - eps) * w_t
            coef_q = coef_p
            coef_r = tl.zeros((BLOCK_ROWS,), ACC_DTYPE)
            if HAS_SMOOTHING:
                loss = loss + eps * inv_n_cols * (c_sum * log_d + a_sum)
                coef_p = coef_p + eps * inv_n_cols * c_sum
                coef_r = coef_r + eps * inv_n_cols
        if HAS_Z_LOSS:
            loss = loss + z_loss * w_t * lse * lse
            coef_p = coef_p + 2.0 * z_loss * w_t * lse
        # ignored rows: exactly 0 (their smoothing term too); out-of-range targets: NaN
        row_scale = tl.where(bad, float("nan"), tl.where(valid, scale, 0.0))
        if GO == 0:
            # ignored rows: 0 * scale, so a "mean" over no target at all is 0 / 0 = NaN, as in torch
            loss = tl.where(bad, float("nan"), tl.where(valid, loss, 0.0) * scale)
            tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)

        if GRAD_INPUT or GRAD_TARGET:
            # where, not a product: an ignored row's factors may be inf or NaN (its z_t is -inf)
            coef_p = tl.where(bad, float("nan"), tl.where(valid, coef_p * scale, 0.0))
            coef_q = tl.where(bad, float("nan"), tl.where(valid, coef_q * scale, 0.0))
            coef_r = tl.where(bad, float("nan"), tl.where(valid, coef_r * scale, 0.0))
            inv_d = 1.0 / d
            if SINGLE_PASS:
                _grad_block(
                    z, dz, e * inv_d[:, None], mask, cols,
                    grad_row[:, None] + (cols * stride_grad_col)[None, :], t, coef_p, coef_q, coef_r, m,
                    lse, row_scale, target_ptr, weight_ptr, grad_ptr, grad_target_ptr, gt_row,
                    target_row, stride_target_col, n_inner, eps, inv_n_cols,
                    FOCAL, PROB_TARGET, HAS_WEIGHT, NEED_C, GRAD_INPUT, GRAD_TARGET, ACC_DTYPE,
                )
            else:
                c_first = _first_col(pid, stride_logits_n, PEEL)
                for start in range(c_first, n_cols, BLOCK_SIZE):
                    if (start >= 0) & (start + BLOCK_SIZE <= n_cols):
                        _grad_step(
                            logits_ptr, target_ptr, weight_ptr, grad_ptr, grad_target_ptr, logit_row,
                            grad_row, gt_row, target_row, row_mask, start, n_cols, n_inner,
                            stride_logits_col, stride_grad_col, stride_target_col, softcap, eps,
                            inv_n_cols, t, coef_p, coef_q, coef_r, m, lse, inv_d, row_scale,
                            FOCAL, HAS_SOFTCAP, PROB_TARGET, HAS_WEIGHT, NEED_C, GRAD_INPUT, GRAD_TARGET,
                            COLS_I64, PEEL, ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE, FULL=True,
                        )
                    else:
                        _grad_step(
                            logits_ptr, target_ptr, weight_ptr, grad_ptr, grad_target_ptr, logit_row,
                            grad_row, gt_row, target_row, row_mask, start, n_cols, n_inner,
                            stride_logits_col, stride_grad_col, stride_target_col, softcap, eps,
                            inv_n_cols, t, coef_p, coef_q, coef_r, m, lse, inv_d, row_scale,
                            FOCAL, HAS_SOFTCAP, PROB_TARGET, HAS_WEIGHT, NEED_C, GRAD_INPUT, GRAD_TARGET,
                            COLS_I64, PEEL, ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE, FULL=False,
                        )


@triton.jit
def _scale_stored(
    grad_ptr, grad_target_ptr, grad_row, gt_row, row_mask, pid, stride_logits_n, n_cols, n_inner,
    stride_grad_col, go,
    GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr, SINGLE_PASS: tl.constexpr,
    COLS_I64: tl.constexpr, PEEL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Multiply the stored gradient rows (and probability-target gradient rows) by go in place,
    walking the columns as the gradient pass does."""
    if SINGLE_PASS:
        _scale_block(grad_ptr, grad_target_ptr, grad_row, gt_row, row_mask, 0, n_cols, n_inner,
                     stride_grad_col, go, GRAD_INPUT, GRAD_TARGET, COLS_I64, PEEL, ACC_DTYPE,
                     BLOCK_ROWS, BLOCK_SIZE, FULL=False)
    else:
        for start in range(_first_col(pid, stride_logits_n, PEEL), n_cols, BLOCK_SIZE):
            if (start >= 0) & (start + BLOCK_SIZE <= n_cols):
                _scale_block(grad_ptr, grad_target_ptr, grad_row, gt_row, row_mask, start, n_cols,
                             n_inner, stride_grad_col, go, GRAD_INPUT, GRAD_TARGET, COLS_I64, PEEL,
                             ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE, FULL=True)
            else:
                _scale_block(grad_ptr, grad_target_ptr, grad_row, gt_row, row_mask, start, n_cols,
                             n_inner, stride_grad_col, go, GRAD_INPUT, GRAD_TARGET, COLS_I64, PEEL,
                             ACC_DTYPE, BLOCK_ROWS, BLOCK_SIZE, FULL=False)


@triton.jit
def _scale_block(
    grad_ptr, grad_target_ptr, grad_row, gt_row, row_mask, start, n_cols, n_inner, stride_grad_col,
    go, GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr, COLS_I64: tl.constexpr,
    PEEL: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    FULL: tl.constexpr,
):
    """One column block of _scale_stored."""
    cols = tl.arange(0, BLOCK_SIZE)
    if COLS_I64:
        cols = cols.to(tl.int64)
    cs, offs, mask = _block_tile(grad_row, start, cols, row_mask, n_cols, stride_grad_col,
                                 PEEL, BLOCK_ROWS, BLOCK_SIZE, FULL)
    if GRAD_INPUT:
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(grad_ptr + offs, (g * go).to(grad_ptr.dtype.element_ty), mask=mask)
    if GRAD_TARGET:
        offs = gt_row[:, None] + (cs * n_inner)[None, :]
        g = tl.load(grad_target_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(grad_target_ptr + offs, (g * go).to(grad_target_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _first_col(pid, stride_logits_n, PEEL: tl.constexpr):
    """Column where a looped row's walk starts: 0, or with PEEL the column at the 16-byte boundary
    at or before the row's first element (row pid starts at element pid * stride_logits_n)."""
    if PEEL > 1:
        return -((pid * stride_logits_n) % PEEL)
    else:
        return 0


@triton.jit
def _block_tile(row_off, start, cols, row_mask, n_cols, stride_col,
                PEEL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                FULL: tl.constexpr):
    """(column indices, element offsets, mask) of columns start.. of a looped row. FULL blocks
    lie inside [0, n_cols): their mask is a constant (compiled away) and, with PEEL, their offsets
    are written so that Triton sees them PEEL-aligned (exact: the walk starts there)."""
    cs = start + cols
    if FULL:
        mask = tl.full((BLOCK_ROWS, BLOCK_SIZE), 1, tl.int1)
        if PEEL > 1:  # column stride 1
            offs = (((row_off + start) // PEEL) * PEEL)[:, None] + cols[None, :]
        else:
            offs = row_off[:, None] + (cs * stride_col)[None, :]
    else:
        mask = row_mask[:, None] & ((cs >= 0) & (cs < n_cols))[None, :]
        offs = row_off[:, None] + (cs * stride_col)[None, :]
    return cs, offs, mask


@triton.jit
def _lse_step(
    logits_ptr, target_ptr, weight_ptr, logit_row, target_row, row_mask, start,
    n_cols, stride_logits_col, stride_target_col, softcap, eps, inv_n_cols, m, d, c_sum, a_sum,
    HAS_SOFTCAP: tl.constexpr, NEED_C: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    PROB_TARGET: tl.constexpr, COLS_I64: tl.constexpr, PEEL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, FULL: tl.constexpr,
):
    """One column block of the online log-sum-exp pass (and of W, A; see the module docstring)."""
    cols = tl.arange(0, BLOCK_SIZE)
    if COLS_I64:
        cols = cols.to(tl.int64)
    cs, offs, mask = _block_tile(logit_row, start, cols, row_mask, n_cols, stride_logits_col,
                                 PEEL, BLOCK_ROWS, BLOCK_SIZE, FULL)
    z = _load_z(logits_ptr, offs, mask, softcap, HAS_SOFTCAP, ACC_DTYPE)[0]
    m_new = tl.maximum(m, tl.max(z, axis=1))
    m_new = tl.where(row_mask, m_new, 0.0)
    d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
    if NEED_C:
        c = _smooth_coef(target_ptr, weight_ptr, cs[None, :], mask,
                         target_row[:, None] + (cs * stride_target_col)[None, :],
                         eps, inv_n_cols, HAS_WEIGHT, PROB_TARGET, ACC_DTYPE)
        grow = tl.where(m == float("-inf"), 0.0, m_new - m)
        a_sum = a_sum + c_sum * grow + tl.sum(tl.where(mask, c * (m_new[:, None] - z), 0.0), axis=1)
        c_sum = c_sum + tl.sum(c, axis=1)
    return m_new, d, c_sum, a_sum


@triton.jit
def _grad_step(
    logits_ptr, target_ptr, weight_ptr, grad_ptr, grad_target_ptr, logit_row, grad_row, gt_row,
    target_row, row_mask, start, n_cols, n_inner, stride_logits_col, stride_grad_col,
    stride_target_col, softcap, eps, inv_n_cols, t, coef_p, coef_q, coef_r, m, lse, inv_d, row_scale,
    FOCAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    NEED_C: tl.constexpr, GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr,
    COLS_I64: tl.constexpr, PEEL: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, FULL: tl.constexpr,
):
    """One column block of the gradient pass of a looped row."""
    cols = tl.arange(0, BLOCK_SIZE)
    if COLS_I64:
        cols = cols.to(tl.int64)
    cs, offs, mask = _block_tile(logit_row, start, cols, row_mask, n_cols, stride_logits_col,
                                 PEEL, BLOCK_ROWS, BLOCK_SIZE, FULL)
    grad_offs = _block_tile(grad_row, start, cols, row_mask, n_cols, stride_grad_col,
                            PEEL, BLOCK_ROWS, BLOCK_SIZE, FULL)[1]
    z, dz = _load_z(logits_ptr, offs, mask, softcap, HAS_SOFTCAP, ACC_DTYPE)
    p = tl.exp(z - m[:, None]) * inv_d[:, None]
    _grad_block(
        z, dz, p, mask, cs, grad_offs, t, coef_p, coef_q, coef_r, m, lse, row_scale,
        target_ptr, weight_ptr, grad_ptr, grad_target_ptr, gt_row, target_row,
        stride_target_col, n_inner, eps, inv_n_cols,
        FOCAL, PROB_TARGET, HAS_WEIGHT, NEED_C, GRAD_INPUT, GRAD_TARGET, ACC_DTYPE,
    )


@triton.jit
def _grad_block(
    z, dz, p, mask, cols, grad_offs, t, coef_p, coef_q, coef_r, m, lse, row_scale,
    target_ptr, weight_ptr, grad_ptr, grad_target_ptr, gt_row, target_row,
    stride_target_col, n_inner, eps, inv_n_cols,
    FOCAL: tl.constexpr, PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_C: tl.constexpr,
    GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Store scale * dloss/dlogits (and dloss/dtarget) for one [BLOCK_ROWS, BLOCK_SIZE] block."""
    if GRAD_INPUT:
        g = p * coef_p[:, None]
        if FOCAL:  # the target column is -Q itself: P (p_t - 1) would cancel as p_t -> 1
            g = tl.where(cols[None, :] == t[:, None], -coef_q[:, None], g)
        elif not PROB_TARGET:
            g = g - tl.where(cols[None, :] == t[:, None], coef_q[:, None], 0.0)
        if NEED_C:
            c = _smooth_coef(target_ptr, weight_ptr, cols[None, :], mask,
                             target_row[:, None] + (cols * stride_target_col)[None, :],
                             eps, inv_n_cols, HAS_WEIGHT, PROB_TARGET, ACC_DTYPE)
            g = g - c * coef_r[:, None]
        g = g * dz
        tl.store(grad_ptr + grad_offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    if GRAD_TARGET:
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + cols[None, :] + tl.zeros(mask.shape, tl.int32), mask=mask,
                        other=0.0).to(ACC_DTYPE)
        else:
            w = tl.full(mask.shape, 1.0, ACC_DTYPE)
        gy = (1.0 - eps) * w * (lse[:, None] - z) * row_scale[:, None]
        tl.store(grad_target_ptr + gt_row[:, None] + (cols * n_inner)[None, :],
                 gy.to(grad_target_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_denom_kernel(
    target_ptr,           # [n_rows] integer class indices
    weight_ptr,           # [C] class weights, read iff HAS_WEIGHT
    denom_ptr,            # [] ACC_DTYPE, sum over non-ignored rows of weight[target] (or 1)
    n_rows, n_cols, ignore_index,
    HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Denominator of a "mean" over class-index targets, in one program (deterministic)."""
    acc = tl.zeros((BLOCK_SIZE,), ACC_DTYPE)
    for start in range(0, n_rows, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_rows
        t = tl.load(target_ptr + offs, mask=mask, other=ignore_index).to(tl.int64)
        valid = mask & (t != ignore_index)
        if HAS_WEIGHT:
            t = tl.minimum(tl.maximum(t, 0), n_cols - 1)
            acc += tl.load(weight_ptr + t, mask=valid, other=0.0).to(ACC_DTYPE)
        else:
            acc += tl.where(valid, 1.0, 0.0).to(ACC_DTYPE)
    tl.store(denom_ptr, tl.sum(acc, axis=0).to(denom_ptr.dtype.element_ty))
