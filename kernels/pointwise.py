"""Fused forward+backward driver for elementwise losses.

Every loss of the family is ``loss_i = w_i * f(x_i, y_i)`` for input ``x``, target ``y`` and an
optional broadcast weight ``w``. A loss contributes only a ``*_terms`` function that returns
``(f, df/dx, df/dy)`` for a block; the driver kernels handle loading, weighting, the reduction and
the gradient stores.

For a reduced loss (``mean``/``sum``) the forward kernel also writes ``w * df/dx`` (and ``df/dy``
when the target needs a gradient), so backward only has to multiply by ``grad_output``:
``scale_grad_kernel`` (kernels/common.py) loads that scalar and does nothing when it is 1, without
a host sync. In float16/bfloat16 that product would round the stored (already rounded) gradient a
second time, so ``pointwise_bwd_kernel`` with SCALE does that backward instead: nothing when
grad_output is 1; a power of two scales the stored gradient, which is exact while the result stays
representable (a block where it does not is recomputed); any other grad_output recomputes the
gradient from input and target, grad_output applied in fp32 before the one rounding.

The drivers evaluate ``f = sum_k coef_k f_k`` over up to three member losses (``TERMS``,
``TERMS_B``, ``TERMS_C``; absent members are ``None`` and compile away): one loss is the case of one
member with ``coef`` = 1/n for "mean" and 1 otherwise; fastloss.CombinedLoss uses more members to
evaluate a weighted sum of losses in the same single pass over memory.

Formulas (``d = x - y``):
    mse      f = d^2                                   df/dx = 2 d
    l1       f = |d|                                   df/dx = sign(d)        (0 at d = 0)
    huber    f = d^2 / 2          if |d| < delta       df/dx = d
             f = delta (|d| - delta / 2) otherwise     df/dx = delta sign(d)
    smoothl1 f = d^2 / (2 beta)   if |d| < beta        df/dx = d / beta
             f = |d| - beta / 2   otherwise            df/dx = sign(d)
    (for all four df/dy = -df/dx)

    kl_div (torch.kl_div, x = log-probabilities):
      y a probability: f = xlogy(y, y) - y x        df/dx = -y
             df/dy = xlogy(y != 0, y) + y / y - x  (torch's autograd form: NaN at y = 0, log(y) + 1 - x
             elsewhere; NaN for negative y, as log)
      y a log-probability (log_target): f = exp(y) (y - x)   df/dx = -exp(y)   df/dy = f + exp(y)

    bce with logits, pos_weight p (1 when absent), L = 1 + (p - 1) y:
             f = (1 - y) x + L softplus(-x)  evaluated as  (1 - y) softplus(x) + p y softplus(-x)
             df/dx = (1 - y) - L sigmoid(-x) (x >= 0)  =  L sigmoid(x) - p y (x < 0)
             df/dy = -x + (p - 1) softplus(-x)   (-x without a pos_weight)
    (sums of non-negative terms for hard targets: nothing cancels, so tiny losses and gradients
    at large |x| keep their relative accuracy; torch's float32 formula rounds them to 0).
    softplus(+-x) = max(+-x, 0) + log1p(exp(-|x|)), the log1p by a short series (_log1p_unit).
    Where these forms make inf - inf (x = -inf, infinite targets) torch's own forms give its
    values: f = (1 - y) x + L softplus(-x), df/dx = sigmoid(x) - y, or (p y + 1 - y) sigmoid(x) - p y
    with a pos_weight (NaN for an infinite y), df/dy = p softplus(-x) - softplus(x).

    sigmoid focal (torchvision), s = sigmoid(x), ce = bce(x, y), p_t = s y + (1 - s)(1 - y),
    m = 1 - p_t = s (1 - y) + sigmoid(-x) y (no cancellation for hard targets),
    a_t = alpha y + (1 - alpha)(1 - y) (1 when alpha < 0):
             f = a_t ce m^gamma
             dm/dx = -s (1 - s)(2 y - 1),  dm/dy = 1 - 2 s,  da_t/dy = alpha - (1 - alpha) (0 when alpha < 0)
             df/dx = a_t (dce/dx m^gamma + ce gamma m^(gamma-1) dm/dx)
             df/dy = a_t (dce/dy m^gamma + ce gamma m^(gamma-1) dm/dy) + da_t/dy ce m^gamma
    ``gamma m^(gamma-1) dm`` is evaluated as ``gamma m^gamma (dm/dx / m)`` and
    ``gamma m^gamma (ce / m) dm/dy``: ``|dm/dx| <= m`` and ``ce ~ m`` as m -> 0, so both stay finite
    for tiny m (where m^(gamma-1) overflows for gamma < 1). At m = 0 (saturated logit, hard target)
    dm/dx = ce = 0 and the term is 0, so the gradient stays finite for every gamma >= 0 (torch's
    gamma 0^(gamma-1) is 1 at gamma = 1, kept; inf for gamma < 1, whose inf * 0 is taken as 0).
    gamma = 0 drops the term altogether, as torch.pow's backward does (so an infinite ce at x =
    +-inf leaves a finite df/dx). Targets outside [0, 1] can make m negative: m^gamma is then
    torch.pow's, NaN unless gamma is an integer, (-1)^gamma |m|^gamma if it is.
"""

import triton
import triton.language as tl

from .common import block_offsets, torch_pow


@triton.jit
def _sign(d):
    return tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(d.dtype)


@triton.jit
def _log1p(z):
    # Goldberg's trick: exact where 1 + z rounds, no libdevice (the interpreter lacks it).
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))


@triton.jit
def _log1p_unit(z):
    """log(1 + z) for z in [0, 1] (z = exp(-|x|) in the softplus), to a few ulp.

    Below float64, as 2 atanh(s) = 2 (s + s^3/3 + ... + s^13/13) with s = z / (2 + z) in [0, 1/3]:
    the truncation is under 2e-8 relatively and every term is positive (nothing cancels). Seven
    multiply-adds and one division, where libdevice's logf (which tl.log compiles to) takes about
    30 instructions, enough to make the sigmoid losses compute-bound. float64: Goldberg's form.
    """
    if z.dtype == tl.float64:
        return _log1p(z)
    s = z / (2.0 + z)
    s2 = s * s
    p = s2 * (1.0 / 13.0) + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p


@triton.jit
def _softplus_neg(x):
    """softplus(-x) = log(1 + exp(-x)), stable for any x."""
    return tl.maximum(-x, 0.0) + _log1p_unit(tl.exp(-tl.abs(x)))


@triton.jit
def mse_terms(x, y, pos_weight, param1, param2):
    """Squared error."""
    d = x - y
    return d * d, 2.0 * d, -2.0 * d


@triton.jit
def l1_terms(x, y, pos_weight, param1, param2):
    """Absolute error."""
    d = x - y
    s = _sign(d)
    return tl.abs(d), s, -s


@triton.jit
def huber_terms(x, y, pos_weight, delta, param2):
    """Huber loss with threshold delta > 0."""
    d = x - y
    a = tl.abs(d)
    small = a < delta
    loss = tl.where(small, 0.5 * d * d, delta * (a - 0.5 * delta))
    # clamp(d, -delta, delta) written as torch's backward does, so a NaN d gives a NaN gradient
    grad = tl.where(d < -delta, -delta, tl.where(d > delta, delta, d))
    return loss, grad, -grad


@triton.jit
def smooth_l1_terms(x, y, pos_weight, beta, param2):
    """Smooth L1 loss with threshold beta > 0 (beta == 0 runs l1_terms)."""
    d = x - y
    a = tl.abs(d)
    small = a < beta
    loss = tl.where(small, 0.5 * d * d / beta, a - 0.5 * beta)
    grad = tl.where(d < -beta, -1.0, tl.where(d > beta, 1.0, d / beta))  # NaN d: NaN, as torch
    return loss, grad, -grad


@triton.jit
def bce_with_logits_terms(x, y, pos_weight, has_pos_weight, param2):
    """Binary cross-entropy on logits x, with pos_weight (1.0 when absent; has_pos_weight != 0 when
    one was given, which changes torch's results for infinite targets)."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    log1p_e = _log1p_unit(e)
    sp_neg = tl.maximum(-x, 0.0) + log1p_e                    # softplus(-x)
    sp_pos = tl.maximum(x, 0.0) + log1p_e                     # softplus(x) = x + softplus(-x)
    sig_neg = tl.where(x >= 0, e * r, r)                      # sigmoid(-x)
    sig_pos = tl.where(x >= 0, r, e * r)                      # sigmoid(x) = 1 - sigmoid(-x)
    # (1 - y) x + (1 + (p - 1) y) softplus(-x), with x = softplus(x) - softplus(-x): a sum of
    # non-negative terms for y in [0, 1], so a loss of 1e-9 at x = -20, y = 0 is not lost to
    # cancellation (torch's own formula rounds it to 0 in float32); likewise the gradient
    # dloss/dx = lw sigmoid(x) - p y = (1 - y) - lw sigmoid(-x), lw = 1 + (p - 1) y: each form on
    # the side where its sigmoid is the small one, so a hard target never cancels
    py = pos_weight * y
    lw = 1.0 + (pos_weight - 1.0) * y
    loss = (1.0 - y) * sp_pos + py * sp_neg
    grad_x = tl.where(x >= 0, (1.0 - y) - lw * sig_neg, lw * sig_pos - py)
    # torch's own forms where those make inf - inf (x = -inf, infinite targets): its values, NaN
    # included; without a pos_weight torch has no (p - 1) y term (0 * inf for an infinite y)
    with_pw = has_pos_weight != 0.0
    y_inf = tl.abs(y) == float("inf")
    loss = tl.where((x == float("-inf")) | y_inf, (1.0 - y) * x + tl.where(with_pw, lw, 1.0) * sp_neg, loss)
    grad_x = tl.where(y_inf, tl.where(with_pw, (py + 1.0 - y) * sig_pos - py, sig_pos - y), grad_x)
    grad_y = tl.where(with_pw, tl.where(x == float("-inf"), pos_weight * sp_neg, (pos_weight - 1.0) * sp_neg - x),
                      -x)
    return loss, grad_x, grad_y


@triton.jit
def sigmoid_focal_terms(x, y, pos_weight, alpha, gamma):
    """torchvision's sigmoid focal loss (alpha < 0 disables the class weighting)."""
    e = tl.exp(-tl.abs(x))
    r = 1.0 / (1.0 + e)
    s = tl.where(x >= 0, r, e * r)  # sigmoid(x)
    s_neg = tl.where(x >= 0, e * r, r)  # sigmoid(-x) = 1 - s
    log1p_e = _log1p_unit(e)
    # bce(x, y) as a sum of non-negative terms (see bce_with_logits_terms)
    ce = (1.0 - y) * (tl.maximum(x, 0.0) + log1p_e) + y * (tl.maximum(-x, 0.0) + log1p_e)
    ce = tl.where(x == float("-inf"), (1.0 - y) * x + tl.maximum(-x, 0.0), ce)  # torch's NaN there
    dce_dx = tl.where(x >= 0, (1.0 - y) - s_neg, s - y)  # s - y, cancelling only as it must
    dce_dy = -x
    m = s * (1.0 - y) + s_neg * y  # 1 - p_t; negative for some targets outside [0, 1]
    m_gamma = torch_pow(m, gamma)
    dm_dx = -s * s_neg * (2.0 * y - 1.0)
    dm_dy = 1.0 - 2.0 * s
    # gamma m^(gamma-1) overflows for tiny m when gamma < 1 (and 0 * inf at gamma = 0), so use
    # gamma m^gamma (dm/dx / m) and gamma m^gamma (ce / m): |dm/dx| <= m and ce ~ m as m -> 0.
    # (Divisions, not one reciprocal: 1 / m overflows for a subnormal m.) At m = 0, m^gamma / m
    # stands for 0^(gamma-1): 1 at gamma = 1, else 0 (see the module docstring).
    nonzero = m != 0
    m_safe = tl.where(nonzero, m, 1.0)
    m_gamma_m = tl.where(nonzero, m_gamma, tl.where(gamma == 1.0, 1.0, 0.0))
    dpow_dx = gamma * m_gamma_m * (dm_dx / m_safe)
    dpow_dy = gamma * m_gamma_m * (ce / m_safe) * dm_dy
    # gamma = 0: no term at all, as torch.pow's backward (ce may be infinite at x = +-inf)
    focus_dx = tl.where(gamma == 0.0, 0.0, ce * dpow_dx)
    focus_dy = tl.where(gamma == 0.0, 0.0, dpow_dy)
    use_alpha = alpha >= 0
    a_t = tl.where(use_alpha, alpha * y + (1.0 - alpha) * (1.0 - y), 1.0)
    loss = a_t * ce * m_gamma
    grad_x = a_t * (dce_dx * m_gamma + focus_dx)
    # da_t/dy ce m^gamma formed as autograd does, alpha cm - (1 - alpha) cm (NaN for an infinite
    # ce, as torch's); no term at all without alpha
    cm = ce * m_gamma
    grad_y = a_t * (dce_dy * m_gamma + focus_dy) + tl.where(use_alpha, alpha * cm - (1.0 - alpha) * cm, 0.0)
    return loss, grad_x, grad_y


@triton.jit
def kl_div_terms(x, y, pos_weight, log_target, param2):
    """Kullback-Leibler divergence of input log-probabilities x from target y (log_target != 0: y
    holds log-probabilities), in torch.kl_div's forms (see the module docstring)."""
    if log_target != 0.0:
        t = tl.exp(y)
        loss = t * (y - x)
        grad_x = -t
        grad_y = loss + t
    else:
        nonzero = y != 0.0
        log_y = tl.log(y)
        loss = tl.where(nonzero, y * log_y, 0.0) - y * x  # xlogy(y, y): 0 at y = 0, NaN for a NaN y
        grad_x = -y
        grad_y = tl.where(nonzero, log_y, 0.0) + y / y - x
    return loss, grad_x, grad_y


@triton.jit
def _add_member(x, y, pw, loss, dx, dy, TERMS: tl.constexpr, coef, param1, param2,
                ACC_DTYPE: tl.constexpr):
    """(loss, dx, dy) + coef * TERMS(x, y, ...); unchanged when TERMS is None.

    The float parameters arrive as fp64 and are cast to ACC_DTYPE here (a plain Python float would
    be passed as fp32, which would round delta, alpha or 1/n in a float64 kernel)."""
    if TERMS is not None:
        coef = tl.full((), coef, ACC_DTYPE)
        l, gx, gy = TERMS(x, y, pw, tl.full((), param1, ACC_DTYPE), tl.full((), param2, ACC_DTYPE))
        loss += coef * l
        dx += coef * gx
        dy += coef * gy
    return loss, dx, dy


@triton.jit
def _terms(
    x, y, pw,
    TERMS: tl.constexpr, coef, param1, param2,
    TERMS_B: tl.constexpr, coef_b, param1_b, param2_b,
    TERMS_C: tl.constexpr, coef_c, param1_c, param2_c,
    ACC_DTYPE: tl.constexpr,
):
    """sum_k coef_k * (f_k, df_k/dx, df_k/dy) over the members present."""
    zero = tl.zeros(x.shape, ACC_DTYPE)
    loss, dx, dy = _add_member(x, y, pw, zero, zero, zero, TERMS, coef, param1, param2, ACC_DTYPE)
    loss, dx, dy = _add_member(x, y, pw, loss, dx, dy, TERMS_B, coef_b, param1_b, param2_b, ACC_DTYPE)
    loss, dx, dy = _add_member(x, y, pw, loss, dx, dy, TERMS_C, coef_c, param1_c, param2_c, ACC_DTYPE)
    return loss, dx, dy


@triton.jit
def _load_operands(
    input_ptr, target_ptr, weight_ptr, pos_weight_ptr, offs, mask,
    weight_inner, weight_period, pos_weight_inner, pos_weight_period,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Input, target, weight and pos_weight for one block, upcast to ACC_DTYPE.

    A weight broadcast over the input is read at ``(offs // inner) % period``: the flat index
    of the input element in the weight's own contiguous storage.
    """
    x = tl.load(input_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(target_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    w = tl.full(x.shape, 1.0, ACC_DTYPE)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + (offs // weight_inner) % weight_period, mask=mask, other=0.0)
        w = w.to(ACC_DTYPE)
    pw = tl.full(x.shape, 1.0, ACC_DTYPE)
    if HAS_POS_WEIGHT:
        pw = tl.load(pos_weight_ptr + (offs // pos_weight_inner) % pos_weight_period, mask=mask,
                     other=1.0)
        pw = pw.to(ACC_DTYPE)
    return x, y, w, pw


@triton.jit
def pointwise_fwd_kernel(
    input_ptr,            # [n_elements] contiguous, floating
    target_ptr,           # [n_elements] contiguous, same dtype as input
    weight_ptr,           # [weight_period * ...] contiguous, read iff HAS_WEIGHT
    pos_weight_ptr,       # [pos_weight_period * ...] contiguous, read iff HAS_POS_WEIGHT
    loss_ptr,             # [n_elements] input dtype, or [n_programs] ACC_DTYPE partials iff REDUCE
    grad_input_ptr,       # [n_elements] input dtype, dloss/dinput, written iff GRAD_INPUT
    grad_target_ptr,      # [n_elements] input dtype, dloss/dtarget, written iff GRAD_TARGET
    n_elements,
    weight_inner, weight_period, pos_weight_inner, pos_weight_period,
    coef: tl.float64,     # member A: coefficient (1/n for "mean", 1 otherwise) and parameters
    param1: tl.float64,   # (delta, beta, alpha, gamma)
    param2: tl.float64,
    coef_b: tl.float64, param1_b: tl.float64, param2_b: tl.float64,   # member B, iff TERMS_B
    coef_c: tl.float64, param1_c: tl.float64, param2_c: tl.float64,   # member C, iff TERMS_C
    TERMS: tl.constexpr, TERMS_B: tl.constexpr, TERMS_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    REDUCE: tl.constexpr, GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Per-element loss (or per-program partial sums) and, for reduced losses, the gradients."""
    pid = tl.program_id(0).to(tl.int64)
    if (pid + 1) * BLOCK_SIZE <= n_elements:  # every block but a partial last one
        _fwd_block(
            input_ptr, target_ptr, weight_ptr, pos_weight_ptr, loss_ptr, grad_input_ptr,
            grad_target_ptr, pid, n_elements, weight_inner, weight_period, pos_weight_inner,
            pos_weight_period, coef, param1, param2, coef_b, param1_b, param2_b, coef_c, param1_c,
            param2_c, TERMS, TERMS_B, TERMS_C, HAS_WEIGHT, HAS_POS_WEIGHT, REDUCE, GRAD_INPUT,
            GRAD_TARGET, ACC_DTYPE, BLOCK_SIZE, FULL=True,
        )
    else:
        _fwd_block(
            input_ptr, target_ptr, weight_ptr, pos_weight_ptr, loss_ptr, grad_input_ptr,
            grad_target_ptr, pid, n_elements, weight_inner, weight_period, pos_weight_inner,
            pos_weight_period, coef, param1, param2, coef_b, param1_b, param2_b, coef_c, param1_c,
            param2_c, TERMS, TERMS_B, TERMS_C, HAS_WEIGHT, HAS_POS_WEIGHT, REDUCE, GRAD_INPUT,
            GRAD_TARGET, ACC_DTYPE, BLOCK_SIZE, FULL=False,
        )


@triton.jit
def _fwd_block(
    input_ptr, target_ptr, weight_ptr, pos_weight_ptr, loss_ptr, grad_input_ptr, grad_target_ptr,
    pid, n_elements, weight_inner, weight_period, pos_weight_inner, pos_weight_period,
    coef, param1, param2, coef_b, param1_b, param2_b, coef_c, param1_c, param2_c,
    TERMS: tl.constexpr, TERMS_B: tl.constexpr, TERMS_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    REDUCE: tl.constexpr, GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, FULL: tl.constexpr,
):
    """Block pid of pointwise_fwd_kernel (FULL: it lies inside [0, n_elements), see _block)."""
    offs, mask = block_offsets(pid * BLOCK_SIZE, n_elements, BLOCK_SIZE, FULL)
    x, y, w, pw = _load_operands(
        input_ptr, target_ptr, weight_ptr, pos_weight_ptr, offs, mask,
        weight_inner, weight_period, pos_weight_inner, pos_weight_period,
        HAS_WEIGHT, HAS_POS_WEIGHT, ACC_DTYPE,
    )
    loss, dx, dy = _terms(
        x, y, pw, TERMS, coef, param1, param2, TERMS_B, coef_b, param1_b, param2_b,
        TERMS_C, coef_c, param1_c, param2_c, ACC_DTYPE,
    )
    loss = loss * w
    if REDUCE:
        # masked lanes are not neutral for every loss (bce(0, 0) = log 2), so zero them
        partial = tl.sum(tl.where(mask, loss, 0.0), axis=0)
        tl.store(loss_ptr + pid, partial.to(loss_ptr.dtype.element_ty))
        if GRAD_INPUT:
            tl.store(grad_input_ptr + offs, (dx * w).to(grad_input_ptr.dtype.element_ty), mask=mask)
        if GRAD_TARGET:
            tl.store(grad_target_ptr + offs, (dy * w).to(grad_target_ptr.dtype.element_ty),
                     mask=mask)
    else:
        tl.store(loss_ptr + offs, loss.to(loss_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pointwise_bwd_kernel(
    input_ptr,            # [n_elements] contiguous, floating
    target_ptr,           # [n_elements] contiguous, same dtype as input
    weight_ptr,           # broadcast weight, read iff HAS_WEIGHT
    pos_weight_ptr,       # broadcast pos_weight, read iff HAS_POS_WEIGHT
    grad_output_ptr,      # [n_elements] (stride_grad_output = 1) or a scalar (stride 0; SCALE: a scalar)
    grad_input_ptr,       # [n_elements] input dtype, written iff GRAD_INPUT (SCALE: read first)
    grad_target_ptr,      # [n_elements] input dtype, written iff GRAD_TARGET (SCALE: read first)
    n_elements, stride_grad_output,
    weight_inner, weight_period, pos_weight_inner, pos_weight_period,
    coef: tl.float64,     # member coefficients and parameters, as in pointwise_fwd_kernel
    param1: tl.float64,   # (a replayed "mean" loss passes coef = 1/n)
    param2: tl.float64,
    coef_b: tl.float64, param1_b: tl.float64, param2_b: tl.float64,
    coef_c: tl.float64, param1_c: tl.float64, param2_c: tl.float64,
    TERMS: tl.constexpr, TERMS_B: tl.constexpr, TERMS_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr,
    SCALE: tl.constexpr,  # grad_*_ptr hold a reduced 16-bit loss's forward-made gradients
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Gradients times grad_output, recomputed from input and target (reduction="none", a second
    backward); with SCALE, a reduced 16-bit loss's forward-made gradients times the scalar
    grad_output, rounded once more only where that is exact, else recomputed (grid-stride loop)."""
    pid = tl.program_id(0).to(tl.int64)
    if SCALE:
        go = tl.load(grad_output_ptr).to(ACC_DTYPE)
        if go != 1.0:
            # a power of two (a normal float: the mantissa bits are 0) scales a rounded gradient
            # into the rounding of the scaled one, while the result stays representable
            bits = go.to(tl.float32).to(tl.int32, bitcast=True)
            exponent = (bits >> 23) & 0xFF
            power_of_two = ((bits & 0x7FFFFF) == 0) & (exponent != 0) & (exponent != 0xFF)
            step = tl.num_programs(0).to(tl.int64) * BLOCK_SIZE
            for start in range(pid * BLOCK_SIZE, n_elements, step):
                if start + BLOCK_SIZE <= n_elements:
                    _rescale_block(
                        input_ptr, target_ptr, weight_ptr, pos_weight_ptr, grad_input_ptr,
                        grad_target_ptr, go, power_of_two, start, n_elements, weight_inner,
                        weight_period, pos_weight_inner, pos_weight_period, coef, param1, param2,
                        coef_b, param1_b, param2_b, coef_c, param1_c, param2_c, TERMS, TERMS_B,
                        TERMS_C, HAS_WEIGHT, HAS_POS_WEIGHT, GRAD_INPUT, GRAD_TARGET, ACC_DTYPE,
                        BLOCK_SIZE, FULL=True,
                    )
                else:
                    _rescale_block(
                        input_ptr, target_ptr, weight_ptr, pos_weight_ptr, grad_input_ptr,
                        grad_target_ptr, go, power_of_two, start, n_elements, weight_inner,
                        weight_period, pos_weight_inner, pos_weight_period, coef, param1, param2,
                        coef_b, param1_b, param2_b, coef_c, param1_c, param2_c, TERMS, TERMS_B,
                        TERMS_C, HAS_WEIGHT, HAS_POS_WEIGHT, GRAD_INPUT, GRAD_TARGET, ACC_DTYPE,
                        BLOCK_SIZE, FULL=False,
                    )
    elif (pid + 1) * BLOCK_SIZE <= n_elements:  # every block but a partial last one
        _bwd_block(
            input_ptr, target_ptr, weight_ptr, pos_weight_ptr, grad_output_ptr, grad_input_ptr,
            grad_target_ptr, pid, n_elements, stride_grad_output, weight_inner, weight_period,
            pos_weight_inner, pos_weight_period, coef, param1, param2, coef_b, param1_b, param2_b,
            coef_c, param1_c, param2_c, TERMS, TERMS_B, TERMS_C, HAS_WEIGHT, HAS_POS_WEIGHT,
            GRAD_INPUT, GRAD_TARGET, ACC_DTYPE, BLOCK_SIZE, FULL=True,
        )
    else:
        _bwd_block(
            input_ptr, target_ptr, weight_ptr, pos_weight_ptr, grad_output_ptr, grad_input_ptr,
            grad_target_ptr, pid, n_elements, stride_grad_output, weight_inner, weight_period,
            pos_weight_inner, pos_weight_period, coef, param1, param2, coef_b, param1_b, param2_b,
            coef_c, param1_c, param2_c, TERMS, TERMS_B, TERMS_C, HAS_WEIGHT, HAS_POS_WEIGHT,
            GRAD_INPUT, GRAD_TARGET, ACC_DTYPE, BLOCK_SIZE, FULL=False,
        )


@triton.jit
def _bwd_block(
    input_ptr, target_ptr, weight_ptr, pos_weight_ptr, grad_output_ptr, grad_input_ptr,
    grad_target_ptr, pid, n_elements, stride_grad_output,
    weight_inner, weight_period, pos_weight_inner, pos_weight_period,
    coef, param1, param2, coef_b, param1_b, param2_b, coef_c, param1_c, param2_c,
    TERMS: tl.constexpr, TERMS_B: tl.constexpr, TERMS_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, FULL: tl.constexpr,
):
    """Block pid of pointwise_bwd_kernel (FULL as in _fwd_block)."""
    offs, mask = block_offsets(pid * BLOCK_SIZE, n_elements, BLOCK_SIZE, FULL)
    x, y, w, pw = _load_operands(
        input_ptr, target_ptr, weight_ptr, pos_weight_ptr, offs, mask,
        weight_inner, weight_period, pos_weight_inner, pos_weight_period,
        HAS_WEIGHT, HAS_POS_WEIGHT, ACC_DTYPE,
    )
    go = tl.load(grad_output_ptr + offs * stride_grad_output, mask=mask, other=0.0).to(ACC_DTYPE)
    _, dx, dy = _terms(
        x, y, pw, TERMS, coef, param1, param2, TERMS_B, coef_b, param1_b, param2_b,
        TERMS_C, coef_c, param1_c, param2_c, ACC_DTYPE,
    )
    w = w * go
    if GRAD_INPUT:
        tl.store(grad_input_ptr + offs, (dx * w).to(grad_input_ptr.dtype.element_ty), mask=mask)
    if GRAD_TARGET:
        tl.store(grad_target_ptr + offs, (dy * w).to(grad_target_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_exactly(grad_ptr, offs, mask, go, ACC_DTYPE: tl.constexpr):
    """(g * go, whether that is the one rounding of the exact gradient times go) for the stored
    16-bit gradients g of a block, go a power of two: it is while g * go is representable, unless
    go > 1 lifts a subnormal (or zero) g, whose lost digits would then show, or g is infinite."""
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
    scaled = g * go
    if grad_ptr.dtype.element_ty == tl.float16:
        min_normal = 6.103515625e-05           # 2**-14
    else:
        min_normal = 1.1754943508222875e-38    # 2**-126, bfloat16
    representable = scaled.to(grad_ptr.dtype.element_ty).to(ACC_DTYPE) == scaled
    smallest = tl.where(tl.abs(go) <= 1.0, 0.0, min_normal)  # of the g that go may scale
    # (NaN: recomputed, NaN again; an infinite g overflowed in the forward: recomputed, as g * go
    # may be finite)
    exact = representable & (tl.abs(g) >= smallest) & (tl.abs(g) < float("inf"))
    return scaled, exact | ~mask


@triton.jit
def _rescale_block(
    input_ptr, target_ptr, weight_ptr, pos_weight_ptr, grad_input_ptr, grad_target_ptr,
    go, power_of_two, start, n_elements,
    weight_inner, weight_period, pos_weight_inner, pos_weight_period,
    coef, param1, param2, coef_b, param1_b, param2_b, coef_c, param1_c, param2_c,
    TERMS: tl.constexpr, TERMS_B: tl.constexpr, TERMS_C: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    GRAD_INPUT: tl.constexpr, GRAD_TARGET: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, FULL: tl.constexpr,
):
    """The block at start of pointwise_bwd_kernel with SCALE: the stored gradients times go where
    that rounds exactly (go a power of two), the rest recomputed (FULL as in _fwd_block)."""
    offs, mask = block_offsets(start, n_elements, BLOCK_SIZE, FULL)
    gi = tl.zeros((BLOCK_SIZE,), ACC_DTYPE)
    gt = tl.zeros((BLOCK_SIZE,), ACC_DTYPE)
    exact = tl.zeros((BLOCK_SIZE,), tl.int1)
    if power_of_two:
        exact = tl.full((BLOCK_SIZE,), 1, tl.int1)
        if GRAD_INPUT:
            gi, exact_i = _scaled_exactly(grad_input_ptr, offs, mask, go, ACC_DTYPE)
            exact = exact & exact_i
        if GRAD_TARGET:
            gt, exact_t = _scaled_exactly(grad_target_ptr, offs, mask, go, ACC_DTYPE)
            exact = exact & exact_t
    if tl.sum((~exact).to(tl.int32), axis=0) > 0:
        x, y, w, pw = _load_operands(
            input_ptr, target_ptr, weight_ptr, pos_weight_ptr, offs, mask,
            weight_inner, weight_period, pos_weight_inner, pos_weight_period,
            HAS_WEIGHT, HAS_POS_WEIGHT, ACC_DTYPE,
        )
        _, dx, dy = _terms(
            x, y, pw, TERMS, coef, param1, param2, TERMS_B, coef_b, param1_b, param2_b,
            TERMS_C, coef_c, param1_c, param2_c, ACC_DTYPE,
        )
        w = w * go  # grad_output applied in ACC_DTYPE, before the one rounding
        gi = tl.where(exact, gi, dx * w)
        gt = tl.where(exact, gt, dy * w)
    if GRAD_INPUT:
        tl.store(grad_input_ptr + offs, gi.to(grad_input_ptr.dtype.element_ty), mask=mask)
    if GRAD_TARGET:
        tl.store(grad_target_ptr + offs, gt.to(grad_target_ptr.dtype.element_ty), mask=mask)
