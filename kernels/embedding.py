"""Pairwise-distance losses on rows of embeddings: contrastive and triplet margin.

Every row ``r`` of the ``(n_rows, n_cols)`` operands is one pair (triplet); a program owns
``BLOCK_ROWS`` rows. When a row fits in one ``BLOCK_COLS`` block (``SINGLE_PASS``) it is loaded
once and stays in registers; otherwise a first loop over the columns accumulates the norms and a
second one re-reads the operands to write the gradients.

Distances are torch's ``pairwise_distance``: ``d(x, y) = || x - y + eps ||_p``, so with
``v = x - y + eps``:

    d = (sum |v|^p)^(1/p)            (sqrt(sum v^2) for p = 2, sum |v| for p = 1)
    dd/dx = g(v) = sign(v) |v|^(p-1) / d^(p-1)        (v / d for p = 2, sign(v) for p = 1)
    dd/dy = -g(v)
    g = 0 where d = 0 (and |v|^(p-1) = 0 where v = 0), as torch's norm backward; a NaN d (a NaN
    operand) gives a NaN g across the row, as torch's grad / d**(p-1) does, even where the row's
    weight is 0 (0 * NaN), except for p = 1 (g = sign(v), and sign(NaN) = 0 as torch's sgn).

Contrastive (label y, 1 = dissimilar pair), p = 2, h = max(margin - d, 0):
    loss  = (1 - y) d^2 + y h^2
    dloss/dd = 2 (1 - y) d - 2 y h,  so  dloss/dx1 = (2 (1 - y) - 2 y h / d) v = -dloss/dx2
    dloss/dy = h^2 - d^2

Triplet (anchor a, positive p, negative n), d_neg = d(a, n), or min(d(a, n), d(p, n)) with swap:
    loss = max(margin + d(a, p) - d_neg, 0)
    the gradient flows where margin + d(a, p) - d_neg >= 0 (torch's clamp_min backward);
    a tie d(a, n) == d(p, n) splits it in halves (torch's minimum backward): c_an + c_pn = 1,
    dloss/da = g(v_ap) - c_an g(v_an)
    dloss/dp = -g(v_ap) - c_pn g(v_pn)
    dloss/dn = c_an g(v_an) + c_pn g(v_pn)

The float parameters (margin, p, eps) arrive as fp64 kernel arguments and are cast to the
accumulation dtype once (a plain Python float argument would be passed as fp32, which would round
margin = 0.1 or eps = 1e-7 in a float64 kernel).

For a reduced loss the forward writes the gradients already multiplied by ``scale`` (1/n_rows for
"mean", computed in the accumulation dtype from the integer ``count``); backward then only scales them
by grad_output (fastloss.kernels.common.scale_grad_kernel).
For ``reduction="none"`` the backward kernels recompute them times a per-row grad_output.

In float16 and bfloat16 that product would round the stored (already rounded) gradients a second
time, so the backward kernels with ``SCALE`` do a reduced loss's backward instead: every program
loads the scalar grad_output and
    returns at once when it is 1 (the stored gradients are the answer);
    scales its rows of the stored gradients when it is a power of two: round(g) 2^k is the rounding
    of g 2^k while the result is representable and no digit of g was lost to a subnormal (which a
    factor > 1 would bring back into the precision); a row with any other element is recomputed;
    recomputes its rows from the operands otherwise, grad_output applied in the accumulation dtype
    before the one rounding.
"""

import triton
import triton.language as tl


@triton.jit
def _pow(a, p):
    """a^p for a >= 0 or NaN: 2^(p log2 a), 0 where a = 0 (log2 would give -inf), NaN for NaN."""
    return tl.where(a == 0, 0.0, tl.exp2(p * tl.log2(tl.where(a == 0, 1.0, a))))


@triton.jit
def _abs_pow(v, p, P_MODE: tl.constexpr):
    """|v|^p for P_MODE 1 (p = 1), 2 (p = 2) or 0 (any p > 0)."""
    if P_MODE == 1:
        return tl.abs(v)
    elif P_MODE == 2:
        return v * v
    else:
        return _pow(tl.abs(v), p)


@triton.jit
def _finish_norm(acc, p, P_MODE: tl.constexpr):
    """d = acc^(1/p) from acc = sum |v|^p."""
    if P_MODE == 1:
        return acc
    elif P_MODE == 2:
        return tl.sqrt(acc)
    else:
        return tl.where(acc == 0, 0.0, tl.exp2(tl.log2(tl.where(acc == 0, 1.0, acc)) / p))


@triton.jit
def _norm_grad(v, d, p, P_MODE: tl.constexpr):
    """dd/dv for d = ||v||_p; v is [BLOCK_ROWS, BLOCK_COLS], d is [BLOCK_ROWS]; 0 where d = 0, NaN
    where d is NaN (p != 1)."""
    dd = d[:, None]
    nonzero = dd != 0  # true for a NaN d: the masks below must let NaN through
    d_safe = tl.where(nonzero, dd, 1.0)
    sign = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0)).to(v.dtype)
    if P_MODE == 1:
        g = sign
    elif P_MODE == 2:
        g = v / d_safe
    else:
        g = sign * _pow(tl.abs(v), p - 1.0) / _pow(d_safe, p - 1.0)
    return tl.where(nonzero, g, 0.0)


@triton.jit
def _program_rows(n_rows, n_cols, count, COL_ALIGN: tl.constexpr, ACC_DTYPE: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr):
    """(n_cols, pid, rows, row_mask, 1 / count) of this program's BLOCK_ROWS rows.

    n_cols comes back written so that Triton sees it is a multiple of COL_ALIGN (a power of two
    dividing it, at most 16, from the launcher): rows then start 16-byte aligned in its analysis
    and are read with vector loads, e.g. for D = 300 or 1000, not only for multiples of 16.
    1 / count is computed in ACC_DTYPE (a float argument would be fp32).
    """
    if COL_ALIGN > 1:
        n_cols = (n_cols // COL_ALIGN) * COL_ALIGN
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    return n_cols, pid, rows, rows < n_rows, tl.full((), 1.0, ACC_DTYPE) / count


@triton.jit
def _tile(rows, row_mask, c0, n_cols, BLOCK_COLS: tl.constexpr):
    """Offsets and mask of the [BLOCK_ROWS, BLOCK_COLS] block of columns c0.. of these rows."""
    cols = c0 + tl.arange(0, BLOCK_COLS)
    offs = rows[:, None] * n_cols + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < n_cols)
    return offs, mask


@triton.jit
def _diff(x_ptr, y_ptr, offs, mask, eps, ACC_DTYPE: tl.constexpr):
    """v = x - y + eps (0 on masked lanes)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    return tl.where(mask, x - y + eps, 0.0)


@triton.jit
def _is_power_of_two(go):
    """Whether the scalar go is +-2^k, a normal float32 (its mantissa bits are 0)."""
    bits = go.to(tl.float32).to(tl.int32, bitcast=True)
    exponent = (bits >> 23) & 0xFF
    return ((bits & 0x7FFFFF) == 0) & (exponent != 0) & (exponent != 0xFF)


@triton.jit
def _scale_stored(grad_ptr, offs, mask, go, ACC_DTYPE: tl.constexpr):
    """Stored 16-bit gradients at offs times go (a power of two), in place; 1 where that is not the
    one rounding of the exact gradient times go, else 0: where the product is not representable,
    where go > 1 scales a subnormal (or zero) gradient, whose lost digits would then show, and
    where the stored gradient overflowed to +-inf. A NaN gradient gives 1 (recomputed: NaN again)."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    scaled = g * go
    tl.store(grad_ptr + offs, scaled.to(grad_ptr.dtype.element_ty), mask=mask)
    if grad_ptr.dtype.element_ty == tl.float16:
        min_normal = 6.103515625e-05           # 2**-14
    else:
        min_normal = 1.1754943508222875e-38    # 2**-126, bfloat16
    representable = scaled.to(grad_ptr.dtype.element_ty).to(ACC_DTYPE) == scaled
    smallest = tl.where(tl.abs(go) > 1.0, min_normal, 0.0)  # of the g that go may scale
    exact = representable & (tl.abs(g) >= smallest) & (tl.abs(g) < float("inf"))
    return tl.where(mask & ~exact, 1, 0)


@triton.jit
def _scale_stored_rows(
    g1_ptr, g2_ptr, g3_ptr, rows, row_mask, n_cols, go,
    G1: tl.constexpr, G2: tl.constexpr, G3: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """These rows of the stored [n_rows, n_cols] gradients g1..g3 (those flagged) times go (a power
    of two) in place; per row, the number of elements that must be recomputed (see _scale_stored)."""
    redo = tl.zeros((BLOCK_ROWS,), tl.int32)
    for c0 in range(0, n_cols, BLOCK_COLS):
        offs, mask = _tile(rows, row_mask, c0, n_cols, BLOCK_COLS)
        if G1:
            redo += tl.sum(_scale_stored(g1_ptr, offs, mask, go, ACC_DTYPE), axis=1)
        if G2:
            redo += tl.sum(_scale_stored(g2_ptr, offs, mask, go, ACC_DTYPE), axis=1)
        if G3:
            redo += tl.sum(_scale_stored(g3_ptr, offs, mask, go, ACC_DTYPE), axis=1)
    return redo


@triton.jit
def _contrastive_rows(
    x1_ptr, x2_ptr, label_ptr, rows, row_mask, n_cols, margin, eps,
    ACC_DTYPE: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """(loss, coefficient of v in dloss/dx1, dloss/dlabel, v of the first block) of these rows."""
    offs, mask = _tile(rows, row_mask, 0, n_cols, BLOCK_COLS)
    v = _diff(x1_ptr, x2_ptr, offs, mask, eps, ACC_DTYPE)
    sq = tl.sum(v * v, axis=1)
    if not SINGLE_PASS:
        for c0 in range(BLOCK_COLS, n_cols, BLOCK_COLS):
            offs_c, mask_c = _tile(rows, row_mask, c0, n_cols, BLOCK_COLS)
            vc = _diff(x1_ptr, x2_ptr, offs_c, mask_c, eps, ACC_DTYPE)
            sq += tl.sum(vc * vc, axis=1)
    d = tl.sqrt(sq)
    y = tl.load(label_ptr + rows, mask=row_mask, other=0.0).to(ACC_DTYPE)
    h = tl.maximum(margin - d, 0.0, propagate_nan=tl.PropagateNan.ALL)
    loss = (1.0 - y) * sq + y * h * h
    # dloss/dd / d, 0 where d = 0; a NaN d must make it NaN (torch's gradient is NaN across the row)
    coef = 2.0 * (1.0 - y) - tl.where(d != 0, 2.0 * y * h / tl.where(d != 0, d, 1.0), 0.0)
    return tl.where(row_mask, loss, 0.0), coef, h * h - sq, v


@triton.jit
def _contrastive_store(
    x1_ptr, x2_ptr, grad_x1_ptr, grad_x2_ptr, rows, row_mask, v, coef, n_cols, eps,
    GRAD_X1: tl.constexpr, GRAD_X2: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """grad_x1 = coef v, grad_x2 = -coef v (coef already holds the scale and grad_output)."""
    for c0 in range(0, n_cols, BLOCK_COLS):
        offs, mask = _tile(rows, row_mask, c0, n_cols, BLOCK_COLS)
        if not SINGLE_PASS:
            v = _diff(x1_ptr, x2_ptr, offs, mask, eps, ACC_DTYPE)
        g = coef[:, None] * v
        if GRAD_X1:
            tl.store(grad_x1_ptr + offs, g.to(grad_x1_ptr.dtype.element_ty), mask=mask)
        if GRAD_X2:
            tl.store(grad_x2_ptr + offs, (-g).to(grad_x2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def contrastive_fwd_kernel(
    x1_ptr,               # [n_rows, n_cols] contiguous, floating
    x2_ptr,               # [n_rows, n_cols] contiguous, same dtype
    label_ptr,            # [n_rows] same dtype (1 = dissimilar pair)
    loss_ptr,             # [n_rows] input dtype, or [n_programs] ACC_DTYPE partial sums iff REDUCE
    grad_x1_ptr,          # [n_rows, n_cols] scale * dloss/dx1, written iff REDUCE and GRAD_X1
    grad_x2_ptr,          # [n_rows, n_cols] scale * dloss/dx2, written iff REDUCE and GRAD_X2
    grad_label_ptr,       # [n_rows] scale * dloss/dlabel, written iff REDUCE and GRAD_LABEL
    n_rows, n_cols,
    margin: tl.float64,   # cast to ACC_DTYPE below
    eps: tl.float64,      # pairwise_distance's eps
    count,                # n_rows for "mean", 1 otherwise: partials and gradients are scaled by 1/count
    REDUCE: tl.constexpr, GRAD_X1: tl.constexpr, GRAD_X2: tl.constexpr, GRAD_LABEL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    SINGLE_PASS: tl.constexpr, COL_ALIGN: tl.constexpr,
):
    """Contrastive loss of BLOCK_ROWS pairs and, for reduced losses, its gradients."""
    n_cols, pid, rows, row_mask, scale = _program_rows(n_rows, n_cols, count, COL_ALIGN, ACC_DTYPE,
                                                       BLOCK_ROWS)
    margin, eps = tl.full((), margin, ACC_DTYPE), tl.full((), eps, ACC_DTYPE)
    loss, coef, dlabel, v = _contrastive_rows(
        x1_ptr, x2_ptr, label_ptr, rows, row_mask, n_cols, margin, eps,
        ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
    )
    if REDUCE:
        tl.store(loss_ptr + pid, (tl.sum(loss, axis=0) * scale).to(loss_ptr.dtype.element_ty))
        if GRAD_X1 or GRAD_X2:
            _contrastive_store(
                x1_ptr, x2_ptr, grad_x1_ptr, grad_x2_ptr, rows, row_mask, v, coef * scale, n_cols, eps,
                GRAD_X1, GRAD_X2, ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
            )
        if GRAD_LABEL:
            tl.store(grad_label_ptr + rows, (dlabel * scale).to(grad_label_ptr.dtype.element_ty),
                     mask=row_mask)
    else:
        tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _contrastive_grads(
    x1_ptr, x2_ptr, label_ptr, grad_x1_ptr, grad_x2_ptr, grad_label_ptr, rows, row_mask, n_cols,
    margin, eps, go,
    GRAD_X1: tl.constexpr, GRAD_X2: tl.constexpr, GRAD_LABEL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """Gradients of these rows recomputed from the operands, times go (per row, or a scalar; the
    1/count scale included), rounded once when stored."""
    _, coef, dlabel, v = _contrastive_rows(
        x1_ptr, x2_ptr, label_ptr, rows, row_mask, n_cols, margin, eps,
        ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
    )
    if GRAD_X1 or GRAD_X2:
        _contrastive_store(
            x1_ptr, x2_ptr, grad_x1_ptr, grad_x2_ptr, rows, row_mask, v, coef * go, n_cols, eps,
            GRAD_X1, GRAD_X2, ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
        )
    if GRAD_LABEL:
        tl.store(grad_label_ptr + rows, (dlabel * go).to(grad_label_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def contrastive_bwd_kernel(
    x1_ptr,               # [n_rows, n_cols] contiguous, floating
    x2_ptr,               # [n_rows, n_cols] contiguous, same dtype
    label_ptr,            # [n_rows] same dtype
    grad_output_ptr,      # [n_rows] (stride_grad_output = 1) or a scalar (stride 0; SCALE: a scalar)
    grad_x1_ptr,          # [n_rows, n_cols] written iff GRAD_X1 (SCALE: the forward's, read first)
    grad_x2_ptr,          # [n_rows, n_cols] written iff GRAD_X2 (SCALE: the forward's, read first)
    grad_label_ptr,       # [n_rows] written iff GRAD_LABEL (SCALE: the forward's, read first)
    n_rows, n_cols, stride_grad_output,
    margin: tl.float64,   # cast to ACC_DTYPE below
    eps: tl.float64,
    count,                # grad_output is divided by it (n_rows when replaying a "mean" loss, else 1)
    GRAD_X1: tl.constexpr, GRAD_X2: tl.constexpr, GRAD_LABEL: tl.constexpr,
    SCALE: tl.constexpr,  # the grad_*_ptr hold a reduced 16-bit loss's forward-made gradients
    ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    SINGLE_PASS: tl.constexpr, COL_ALIGN: tl.constexpr,
):
    """Gradients of the contrastive loss recomputed from the operands, times grad_output; with
    SCALE, the forward's gradients times grad_output, rounded once (see the module docstring)."""
    n_cols, _, rows, row_mask, scale = _program_rows(n_rows, n_cols, count, COL_ALIGN, ACC_DTYPE,
                                                       BLOCK_ROWS)
    margin, eps = tl.full((), margin, ACC_DTYPE), tl.full((), eps, ACC_DTYPE)
    if SCALE:
        go = tl.load(grad_output_ptr).to(ACC_DTYPE)
        if go != 1.0:
            redo = row_mask
            if _is_power_of_two(go):
                bad = _scale_stored_rows(grad_x1_ptr, grad_x2_ptr, grad_x2_ptr, rows, row_mask, n_cols,
                                         go, GRAD_X1, GRAD_X2, False, ACC_DTYPE, BLOCK_ROWS, BLOCK_COLS)
                if GRAD_LABEL:
                    bad += _scale_stored(grad_label_ptr, rows, row_mask, go, ACC_DTYPE)
                redo = row_mask & (bad > 0)
            if tl.max(redo.to(tl.int32), axis=0) > 0:
                _contrastive_grads(
                    x1_ptr, x2_ptr, label_ptr, grad_x1_ptr, grad_x2_ptr, grad_label_ptr, rows, redo,
                    n_cols, margin, eps, go * scale, GRAD_X1, GRAD_X2, GRAD_LABEL,
                    ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
                )
    else:
        go = tl.load(grad_output_ptr + rows * stride_grad_output, mask=row_mask, other=0.0)
        _contrastive_grads(
            x1_ptr, x2_ptr, label_ptr, grad_x1_ptr, grad_x2_ptr, grad_label_ptr, rows, row_mask,
            n_cols, margin, eps, go.to(ACC_DTYPE) * scale, GRAD_X1, GRAD_X2, GRAD_LABEL,
            ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
        )


@triton.jit
def _triplet_rows(
    a_ptr, p_ptr, n_ptr, rows, row_mask, n_cols, margin, norm_p, eps,
    P_MODE: tl.constexpr, SWAP: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """Loss, distances, gradient weights and the first block's differences of these triplets."""
    offs, mask = _tile(rows, row_mask, 0, n_cols, BLOCK_COLS)
    v_ap = _diff(a_ptr, p_ptr, offs, mask, eps, ACC_DTYPE)
    v_an = _diff(a_ptr, n_ptr, offs, mask, eps, ACC_DTYPE)
    acc_ap = tl.sum(_abs_pow(v_ap, norm_p, P_MODE), axis=1)
    acc_an = tl.sum(_abs_pow(v_an, norm_p, P_MODE), axis=1)
    if SWAP:
        v_pn = _diff(p_ptr, n_ptr, offs, mask, eps, ACC_DTYPE)
        acc_pn = tl.sum(_abs_pow(v_pn, norm_p, P_MODE), axis=1)
    else:
        v_pn = v_an
        acc_pn = acc_an
    if not SINGLE_PASS:
        for c0 in range(BLOCK_COLS, n_cols, BLOCK_COLS):
            offs_c, mask_c = _tile(rows, row_mask, c0, n_cols, BLOCK_COLS)
            acc_ap += tl.sum(_abs_pow(_diff(a_ptr, p_ptr, offs_c, mask_c, eps, ACC_DTYPE), norm_p,
                                      P_MODE), axis=1)
            acc_an += tl.sum(_abs_pow(_diff(a_ptr, n_ptr, offs_c, mask_c, eps, ACC_DTYPE), norm_p,
                                      P_MODE), axis=1)
            if SWAP:
                acc_pn += tl.sum(_abs_pow(_diff(p_ptr, n_ptr, offs_c, mask_c, eps, ACC_DTYPE),
                                          norm_p, P_MODE), axis=1)
    d_ap = _finish_norm(acc_ap, norm_p, P_MODE)
    d_an = _finish_norm(acc_an, norm_p, P_MODE)
    if SWAP:
        d_pn = _finish_norm(acc_pn, norm_p, P_MODE)
        c_an = tl.where(d_an < d_pn, 1.0, tl.where(d_an == d_pn, 0.5, 0.0))
        d_neg = tl.minimum(d_an, d_pn, propagate_nan=tl.PropagateNan.ALL)  # NaN in, NaN out
    else:
        d_pn = d_an
        c_an = tl.full(d_an.shape, 1.0, ACC_DTYPE)
        d_neg = d_an
    z = margin + d_ap - d_neg
    loss = tl.where(row_mask, tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
    active = tl.where(row_mask & (z >= 0), 1.0, 0.0).to(ACC_DTYPE)
    c_an = c_an.to(ACC_DTYPE)
    return loss, d_ap, d_an, d_pn, active * c_an, active * (1.0 - c_an), active, v_ap, v_an, v_pn


@triton.jit
def _triplet_store(
    a_ptr, p_ptr, n_ptr, grad_a_ptr, grad_p_ptr, grad_n_ptr, rows, row_mask,
    v_ap, v_an, v_pn, d_ap, d_an, d_pn, w_ap, w_an, w_pn, n_cols, norm_p, eps,
    P_MODE: tl.constexpr, SWAP: tl.constexpr,
    GRAD_A: tl.constexpr, GRAD_P: tl.constexpr, GRAD_N: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """Store the three gradients; w_xy are the per-row weights of g(v_xy) (scale folded in)."""
    for c0 in range(0, n_cols, BLOCK_COLS):
        offs, mask = _tile(rows, row_mask, c0, n_cols, BLOCK_COLS)
        if not SINGLE_PASS:
            v_ap = _diff(a_ptr, p_ptr, offs, mask, eps, ACC_DTYPE)
            v_an = _diff(a_ptr, n_ptr, offs, mask, eps, ACC_DTYPE)
            if SWAP:
                v_pn = _diff(p_ptr, n_ptr, offs, mask, eps, ACC_DTYPE)
        g_ap = w_ap[:, None] * _norm_grad(v_ap, d_ap, norm_p, P_MODE)
        g_an = w_an[:, None] * _norm_grad(v_an, d_an, norm_p, P_MODE)
        if SWAP:
            g_pn = w_pn[:, None] * _norm_grad(v_pn, d_pn, norm_p, P_MODE)
        else:
            g_pn = tl.zeros_like(g_ap)
        if GRAD_A:
            tl.store(grad_a_ptr + offs, (g_ap - g_an).to(grad_a_ptr.dtype.element_ty), mask=mask)
        if GRAD_P:
            tl.store(grad_p_ptr + offs, (-g_ap - g_pn).to(grad_p_ptr.dtype.element_ty), mask=mask)
        if GRAD_N:
            tl.store(grad_n_ptr + offs, (g_an + g_pn).to(grad_n_ptr.dtype.element_ty), mask=mask)


@triton.jit
def triplet_fwd_kernel(
    anchor_ptr,           # [n_rows, n_cols] contiguous, floating
    positive_ptr,         # [n_rows, n_cols] contiguous, same dtype
    negative_ptr,         # [n_rows, n_cols] contiguous, same dtype
    loss_ptr,             # [n_rows] input dtype, or [n_programs] ACC_DTYPE partial sums iff REDUCE
    grad_anchor_ptr,      # [n_rows, n_cols] scale * dloss/danchor, written iff REDUCE and GRAD_A
    grad_positive_ptr,    # [n_rows, n_cols] written iff REDUCE and GRAD_P
    grad_negative_ptr,    # [n_rows, n_cols] written iff REDUCE and GRAD_N
    n_rows, n_cols,
    margin: tl.float64,   # cast to ACC_DTYPE below
    norm_p: tl.float64,   # the norm's p, 0 < p < inf
    eps: tl.float64,      # pairwise_distance's eps
    count,                # n_rows for "mean", 1 otherwise: partials and gradients are scaled by 1/count
    P_MODE: tl.constexpr, SWAP: tl.constexpr, REDUCE: tl.constexpr,
    GRAD_A: tl.constexpr, GRAD_P: tl.constexpr, GRAD_N: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    SINGLE_PASS: tl.constexpr, COL_ALIGN: tl.constexpr,
):
    """Triplet margin loss of BLOCK_ROWS triplets and, for reduced losses, its gradients."""
    n_cols, pid, rows, row_mask, scale = _program_rows(n_rows, n_cols, count, COL_ALIGN, ACC_DTYPE,
                                                       BLOCK_ROWS)
    margin, norm_p = tl.full((), margin, ACC_DTYPE), tl.full((), norm_p, ACC_DTYPE)
    eps = tl.full((), eps, ACC_DTYPE)
    loss, d_ap, d_an, d_pn, w_an, w_pn, w_ap, v_ap, v_an, v_pn = _triplet_rows(
        anchor_ptr, positive_ptr, negative_ptr, rows, row_mask, n_cols, margin, norm_p, eps,
        P_MODE, SWAP, ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
    )
    if REDUCE:
        tl.store(loss_ptr + pid, (tl.sum(loss, axis=0) * scale).to(loss_ptr.dtype.element_ty))
        if GRAD_A or GRAD_P or GRAD_N:
            _triplet_store(
                anchor_ptr, positive_ptr, negative_ptr, grad_anchor_ptr, grad_positive_ptr,
                grad_negative_ptr, rows, row_mask, v_ap, v_an, v_pn, d_ap, d_an, d_pn,
                w_ap * scale, w_an * scale, w_pn * scale, n_cols, norm_p, eps,
                P_MODE, SWAP, GRAD_A, GRAD_P, GRAD_N, ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
            )
    else:
        tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _triplet_grads(
    a_ptr, p_ptr, n_ptr, grad_a_ptr, grad_p_ptr, grad_n_ptr, rows, row_mask, n_cols,
    margin, norm_p, eps, go,
    P_MODE: tl.constexpr, SWAP: tl.constexpr,
    GRAD_A: tl.constexpr, GRAD_P: tl.constexpr, GRAD_N: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_COLS: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    """Gradients of these triplets recomputed from the operands, times go (per row, or a scalar;
    the 1/count scale included), rounded once when stored."""
    _, d_ap, d_an, d_pn, w_an, w_pn, w_ap, v_ap, v_an, v_pn = _triplet_rows(
        a_ptr, p_ptr, n_ptr, rows, row_mask, n_cols, margin, norm_p, eps,
        P_MODE, SWAP, ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
    )
    _triplet_store(
        a_ptr, p_ptr, n_ptr, grad_a_ptr, grad_p_ptr, grad_n_ptr,
        rows, row_mask, v_ap, v_an, v_pn, d_ap, d_an, d_pn, w_ap * go, w_an * go, w_pn * go,
        n_cols, norm_p, eps, P_MODE, SWAP, GRAD_A, GRAD_P, GRAD_N, ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
    )


@triton.jit
def triplet_bwd_kernel(
    anchor_ptr,           # [n_rows, n_cols] contiguous, floating
    positive_ptr,         # [n_rows, n_cols] contiguous, same dtype
    negative_ptr,         # [n_rows, n_cols] contiguous, same dtype
    grad_output_ptr,      # [n_rows] (stride_grad_output = 1) or a scalar (stride 0; SCALE: a scalar)
    grad_anchor_ptr,      # [n_rows, n_cols] written iff GRAD_A (SCALE: the forward's, read first)
    grad_positive_ptr,    # [n_rows, n_cols] written iff GRAD_P (SCALE: the forward's, read first)
    grad_negative_ptr,    # [n_rows, n_cols] written iff GRAD_N (SCALE: the forward's, read first)
    n_rows, n_cols, stride_grad_output,
    margin: tl.float64,   # cast to ACC_DTYPE below
    norm_p: tl.float64,
    eps: tl.float64,
    count,                # grad_output is divided by it (n_rows when replaying a "mean" loss, else 1)
    P_MODE: tl.constexpr, SWAP: tl.constexpr,
    GRAD_A: tl.constexpr, GRAD_P: tl.constexpr, GRAD_N: tl.constexpr,
    SCALE: tl.constexpr,  # the grad_*_ptr hold a reduced 16-bit loss's forward-made gradients
    ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
    SINGLE_PASS: tl.constexpr, COL_ALIGN: tl.constexpr,
):
    """Gradients of the triplet margin loss recomputed from the operands, times grad_output; with
    SCALE, the forward's gradients times grad_output, rounded once (see the module docstring)."""
    n_cols, _, rows, row_mask, scale = _program_rows(n_rows, n_cols, count, COL_ALIGN, ACC_DTYPE,
                                                       BLOCK_ROWS)
    margin, norm_p = tl.full((), margin, ACC_DTYPE), tl.full((), norm_p, ACC_DTYPE)
    eps = tl.full((), eps, ACC_DTYPE)
    if SCALE:
        go = tl.load(grad_output_ptr).to(ACC_DTYPE)
        if go != 1.0:
            redo = row_mask
            if _is_power_of_two(go):
                bad = _scale_stored_rows(grad_anchor_ptr, grad_positive_ptr, grad_negative_ptr, rows,
                                         row_mask, n_cols, go, GRAD_A, GRAD_P, GRAD_N,
                                         ACC_DTYPE, BLOCK_ROWS, BLOCK_COLS)
                redo = row_mask & (bad > 0)
            if tl.max(redo.to(tl.int32), axis=0) > 0:
                _triplet_grads(
                    anchor_ptr, positive_ptr, negative_ptr, grad_anchor_ptr, grad_positive_ptr,
                    grad_negative_ptr, rows, redo, n_cols, margin, norm_p, eps, go * scale,
                    P_MODE, SWAP, GRAD_A, GRAD_P, GRAD_N, ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
                )
    else:
        go = tl.load(grad_output_ptr + rows * stride_grad_output, mask=row_mask, other=0.0)
        _triplet_grads(
            anchor_ptr, positive_ptr, negative_ptr, grad_anchor_ptr, grad_positive_ptr,
            grad_negative_ptr, rows, row_mask, n_cols, margin, norm_p, eps, go.to(ACC_DTYPE) * scale,
            P_MODE, SWAP, GRAD_A, GRAD_P, GRAD_N, ACC_DTYPE, BLOCK_COLS, SINGLE_PASS,
        )
