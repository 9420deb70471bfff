"""Cross-entropy and softmax focal loss (the row family): parity with torch.nn.functional.cross_entropy
and with the classic focal composition, on the Triton kernels (interpreter on CPU) and the reference."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers import TOLERANCES, assert_close, assert_no_less_accurate, assert_not_launched, dtype_id
from helpers import assert_launched as launched
from torch import nn
from torch.nn import functional as F

import fastloss
from fastloss import baselines, reference
from fastloss import functional as FF
from fastloss.ops import _utils
from fastloss.ops import softmax as ops_softmax

FWD = "cross_entropy_fwd_kernel"
BWD = "cross_entropy_bwd_kernel"
DENOM = "cross_entropy_denom_kernel"
SCALE = "scale_grad_kernel"
F64 = torch.float64
# parameters exactly representable in float32 (the kernels take Python floats as float32)
EPS, ZL, CAP = 0.125, 2.0**-7, 4.0


@contextlib.contextmanager
def looped_rows():
    """Force the multi-block (online log-sum-exp + gradient pass) kernel with small blocks."""
    old = ops_softmax.MAX_FUSED_COLS, ops_softmax.LOOP_BLOCK
    ops_softmax.MAX_FUSED_COLS, ops_softmax.LOOP_BLOCK = 64, 64
    try:
        yield
    finally:
        ops_softmax.MAX_FUSED_COLS, ops_softmax.LOOP_BLOCK = old


def ran(backend):
    """The block must run the kernel (backend "triton") or no kernel at all (backend "torch")."""
    return launched(FWD) if backend == "triton" else assert_not_launched()


def logits(shape, dtype=F64, device="cpu", scale=3.0, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(device=device, dtype=dtype)


def class_targets(shape, n_classes, device="cpu", ignore=True, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, n_classes, shape, generator=g)
    if ignore and t.numel() > 2:
        t.view(-1)[1] = -100
    return t.to(device)


def prob_targets(shape, device="cpu", dtype=F64, seed=2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dim = 0 if len(shape) == 1 else 1
    return torch.randn(shape, generator=g, dtype=F64).softmax(dim).to(device=device, dtype=dtype)


def target_shape(shape):
    return () if len(shape) == 1 else (shape[0], *shape[2:])


def loss_and_grads(fn, x, target, grad_output=None, **kw):
    """Loss and gradients of (loss * grad_output).sum() w.r.t. x (and a floating target)."""
    x = x.detach().clone().requires_grad_()
    inputs = [x]
    if target.is_floating_point():
        target = target.detach().clone().requires_grad_()
        inputs.append(target)
    loss = fn(x, target, **kw)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    grads = torch.autograd.grad(loss, inputs, go)
    return loss.detach(), grads


def check(actual, expected, dtype, what):
    loss, grads = actual
    loss_e, grads_e = expected
    assert_close(loss, loss_e, dtype, f"{what}: loss")
    for i, (g, ge) in enumerate(zip(grads, grads_e)):
        assert_close(g, ge, dtype, f"{what}: grad {i}")


# --------------------------------------------------------------------------------------------
# cross-entropy vs torch.nn.functional.cross_entropy (float64)
# --------------------------------------------------------------------------------------------

SHAPES = [(5, 1), (6, 2), (7,), (9, 7), (3, 1031), (2, 5, 3, 2)]
OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smooth": {"label_smoothing": EPS},
    "smooth+weight": {"label_smoothing": EPS, "weight": True},
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cross_entropy_matches_torch(shape, reduction, option, device, triton_backend):
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    kw = dict(OPTIONS[option], reduction=reduction)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(n_classes, dtype=F64, device=device) + 0.5
    x = logits(shape, device=device)
    t = class_targets(target_shape(shape), n_classes, device)
    with launched(FWD):
        actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
    check(actual, loss_and_grads(F.cross_entropy, x, t, **kw), F64, f"{shape} {reduction} {option}")


@pytest.mark.parametrize("option", ["plain", "smooth+weight"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(4, 7), (7,), (2, 5, 3)], ids=str)
def test_cross_entropy_probabilities_match_torch(shape, reduction, option, device, triton_backend):
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    kw = dict(OPTIONS[option], reduction=reduction)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(n_classes, dtype=F64, device=device) + 0.5
    x, y = logits(shape, device=device), prob_targets(shape, device)
    with launched(FWD):
        actual = loss_and_grads(FF.cross_entropy, x, y, **kw)
    check(actual, loss_and_grads(F.cross_entropy, x, y, **kw), F64, f"{shape} {reduction} {option}")


@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_multi_block_rows_match_torch(reduction, prob, device, triton_backend):
    """Rows longer than one block: online log-sum-exp pass, then the gradient pass."""
    shape = (3, 200)
    x = logits(shape, device=device, scale=6.0)
    t = prob_targets(shape, device) if prob else class_targets((3,), 200, device)
    kw = {"reduction": reduction, "label_smoothing": EPS, "weight": torch.rand(200, dtype=F64, device=device)}
    with looped_rows(), launched(FWD):
        actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
    check(actual, loss_and_grads(F.cross_entropy, x, t, **kw), F64, "looped")


def test_class_dim_layout_and_noncontiguous_logits(device, triton_backend):
    """(N, C, d1, d2) with the class dimension strided, transposed (N, C) and sliced logits."""
    seg = logits((2, 3, 4, 5), device=device).permute(0, 3, 1, 2)  # (2, 5, 3, 4), class stride 1
    t = class_targets((2, 3, 4), 5, device)
    cases = [
        (seg, t),
        (logits((7, 6), device=device).t(), class_targets((6,), 7, device)),
        (logits((6, 20), device=device)[:, 3:15:2], class_targets((6,), 6, device)),
    ]
    for x, t in cases:
        assert not x.is_contiguous()
        for kw in ({}, {"label_smoothing": EPS, "reduction": "none"}):
            with launched(FWD):
                actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
            check(actual, loss_and_grads(F.cross_entropy, x, t, **kw), F64, f"{tuple(x.shape)} {kw}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_output_scaling(reduction, device, triton_backend):
    x, t = logits((5, 7), device=device), class_targets((5,), 7, device)
    go = torch.rand(5, dtype=F64, device=device) if reduction == "none" else torch.tensor(2.5, dtype=F64)
    kw = {"reduction": reduction, "label_smoothing": EPS}
    names = (FWD, SCALE) if reduction != "none" else (FWD,)
    with launched(*names):
        actual = loss_and_grads(FF.cross_entropy, x, t, go.to(device), **kw)
    check(actual, loss_and_grads(F.cross_entropy, x, t, go.to(device), **kw), F64, reduction)


def test_all_targets_ignored(device, backend):
    x = logits((4, 6), device=device)
    t = torch.full((4,), -100, device=device)
    w = torch.rand(6, dtype=F64, device=device)
    for kw in ({}, {"weight": w}, {"label_smoothing": EPS}, {"reduction": "sum"}, {"reduction": "none"}):
        with ran(backend):
            actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
        check(actual, loss_and_grads(F.cross_entropy, x, t, **kw), F64, f"all ignored {kw}")


def test_empty_batch(device, backend):
    x = logits((0, 6), device=device)
    t = torch.zeros(0, dtype=torch.long, device=device)
    for reduction in ("mean", "sum", "none"):
        actual = FF.cross_entropy(x, t, reduction=reduction)
        assert_close(actual, F.cross_entropy(x, t, reduction=reduction), F64, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_1d_input_with_0d_or_1_element_target(reduction, device, backend):
    """torch's forward takes a (1,) target for a (C,) input (a 0-d "none" loss either way) but its
    backward rejects it, and so does its label smoothing: fastloss's cross_entropy does the same on
    both backends. focal_loss (no torch counterpart) takes the (1,) target as the 0-d one."""
    x = logits((6,), device=device)
    expected = loss_and_grads(F.cross_entropy, x, torch.tensor(4, device=device), reduction=reduction)
    with ran(backend):
        actual = loss_and_grads(FF.cross_entropy, x, torch.tensor(4, device=device), reduction=reduction)
    check(actual, expected, F64, "0-d target")
    t = torch.tensor([4], device=device)
    assert F.cross_entropy(x, t, reduction=reduction).shape == ()
    with ran(backend):
        loss = FF.cross_entropy(x, t, reduction=reduction)
    assert_close(loss, expected[0], F64, "(1,) target, forward")
    for kw in ({}, {"z_loss": ZL}):
        xg = x.clone().requires_grad_()
        with pytest.raises(RuntimeError, match=r"size mismatch \(got input: \[6\], target: \[1\]\)"):
            torch.autograd.grad(F.cross_entropy(xg, t, reduction=reduction), xg)
        with pytest.raises(RuntimeError, match=r"size mismatch \(got input: \[6\], target: \[1\]\)"):
            torch.autograd.grad(FF.cross_entropy(xg, t, reduction=reduction, **kw), xg)
    for call in (F.cross_entropy, FF.cross_entropy):
        with pytest.raises(RuntimeError, match=r"output with shape \[\] doesn't match the broadcast shape \[1\]"):
            call(x, t, reduction=reduction, label_smoothing=0.1)
    for target in (torch.tensor(4, device=device), t):
        with ran(backend):
            focal = loss_and_grads(FF.focal_loss, x, target, gamma=0.0, reduction=reduction)
        check(focal, expected, F64, f"focal {tuple(target.shape)}")


@pytest.mark.parametrize(("x_dtype", "y_dtype"), [(torch.float32, F64), (torch.float16, torch.float32)], ids=str)
def test_probability_targets_of_another_dtype_promote_like_torch(x_dtype, y_dtype, device, backend):
    x, y = logits((4, 7), x_dtype, device), prob_targets((4, 7), device, y_dtype)
    with ran(backend):
        loss, grads = loss_and_grads(FF.cross_entropy, x, y)
    loss_t, grads_t = loss_and_grads(F.cross_entropy, x, y)
    assert [g.dtype for g in grads] == [g.dtype for g in grads_t] == [x_dtype, y_dtype]
    # torch rounds log_softmax to the logits' dtype first: compare with the exact value
    exact = F.cross_entropy(x.double(), y.double()).to(loss_t.dtype)
    assert_close(loss, exact, y_dtype, "promoted loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_extreme_logits_stay_finite(dtype, device, triton_backend):
    x = (logits((4, 9), device=device) * 1e4).clamp(-3e4, 3e4)
    x[:, 0] = 3e4
    x[:, 1] = -3e4
    t = torch.tensor([0, 1, 2, -100], device=device)
    x = x.to(dtype)
    with launched(FWD):
        loss, (grad,) = loss_and_grads(FF.cross_entropy, x, t, label_smoothing=EPS)
    exact, (grad_exact,) = loss_and_grads(F.cross_entropy, x.double(), t, label_smoothing=EPS)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss.double(), exact, dtype, "loss")
    assert_close(grad.double(), grad_exact, dtype, "grad")


# --------------------------------------------------------------------------------------------
# dtypes: kernels vs the reference in each dtype; half precision vs torch against float64
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=dtype_id)
@pytest.mark.parametrize("shape", [(6, 7), (3, 1031)], ids=str)
def test_kernel_matches_reference_per_dtype(shape, dtype, device):
    x, t = logits(shape, dtype, device), class_targets((shape[0],), shape[1], device)
    w = torch.rand(shape[1], dtype=dtype, device=device) + 0.5
    kw = {"weight": w, "label_smoothing": EPS, "z_loss": ZL}
    with fastloss.use_backend("triton"), launched(FWD):
        actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
    with fastloss.use_backend("torch"):
        expected = loss_and_grads(FF.cross_entropy, x, t, **kw)
    check(actual, expected, dtype, f"{shape} {dtype}")
    assert actual[0].dtype == dtype and actual[1][0].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_no_less_accurate_than_torch(dtype, reduction, device, triton_backend):
    # large, close logits: the target term lse - z_t cancels, which torch's half path rounds badly
    x = (logits((16, 300), F64, device, scale=1.0) + 20.0).to(dtype)
    t = class_targets((16,), 300, device, ignore=False)
    for kw in ({}, {"label_smoothing": EPS}):
        kw = dict(kw, reduction=reduction)
        with launched(FWD):
            loss, (grad,) = loss_and_grads(FF.cross_entropy, x, t, **kw)
        loss_t, (grad_t,) = loss_and_grads(F.cross_entropy, x, t, **kw)
        exact, (grad_e,) = loss_and_grads(F.cross_entropy, x.double(), t, **kw)
        assert_no_less_accurate(loss, loss_t, exact, f"{dtype} {kw} loss")
        assert_no_less_accurate(grad, grad_t, grad_e, f"{dtype} {kw} grad")


def test_autocast_gives_float32(device, backend):
    x = logits((6, 7), torch.bfloat16, device)
    t = class_targets((6,), 7, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        torch_result = F.cross_entropy(x, t)
        actual = FF.cross_entropy(x, t)
        focal = FF.focal_loss(x, t)
    assert torch_result.dtype == actual.dtype == focal.dtype == torch.float32
    # torch's CUDA autocast rounds log_softmax to bfloat16 first: compare with the exact value
    assert_close(actual, F.cross_entropy(x.double(), t).float(), torch.float32, "autocast")


focal_composition = baselines.softmax_focal


def assert_rounded_once(actual, exact, msg, subnormal_steps=0.5):
    """Every element of the 16-bit ``actual`` is ``exact`` rounded once to its dtype: within half a
    unit in the last place (the fp32 arithmetic before that rounding adds far less than 2**-16);
    ``subnormal_steps`` units where the exact value is subnormal."""
    finfo = torch.finfo(actual.dtype)
    e = exact.double()
    ulp = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(finfo.smallest_normal)))) * finfo.eps
    steps = torch.where(e.abs() < finfo.smallest_normal, subnormal_steps, 0.5)
    err = (actual.double() - e).abs()
    bad = err > steps * ulp + 2.0**-16 * e.abs()
    assert not bad.any(), (f"{msg}: {int(bad.sum())} elements are not the exact value rounded once, "
                           f"e.g. {actual[bad][:3].tolist()} for {e[bad][:3].tolist()}")


#: Triton's interpreter truncates float32 -> bfloat16 stores: "rounded once" is checked where stores
#: round to nearest (float16 everywhere, bfloat16 on CUDA).
def _rounds_to_nearest(dtype, device):
    return dtype == torch.float16 or device == "cuda"


HALF_LOSSES = {
    "cross_entropy": (FF.cross_entropy, F.cross_entropy),
    "focal": (lambda x, t, **kw: FF.focal_loss(x, t, 0.25, 2.0, **kw),
              lambda x, t, **kw: focal_composition(x, t, 0.25, 2.0, **kw)),
}


@pytest.mark.parametrize("kind", list(HALF_LOSSES))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_precision_gradient_rounded_once(dtype, reduction, kind, device, triton_backend):
    """16-bit logits, grad_output != 1 (per row for "none", 0.3 for reduced losses): grad_output
    enters the gradient in fp32 before its one rounding (the backward kernel recomputes the rows)
    instead of scaling a stored 16-bit gradient, which rounds twice."""
    ours, theirs = HALF_LOSSES[kind]
    x = logits((64, 1000), F64, device, scale=3.0).to(dtype)
    t = class_targets((64,), 1000, device, ignore=False)
    if reduction == "none":
        go = torch.rand(64, generator=torch.Generator().manual_seed(3), dtype=F64) * 3
    else:
        go = torch.tensor(0.3, dtype=F64)
    go = go.to(device=device, dtype=dtype)
    with launched(FWD, BWD):
        _, (grad,) = loss_and_grads(ours, x, t, go, reduction=reduction)
    _, (grad_t,) = loss_and_grads(theirs, x, t, go, reduction=reduction)
    _, (grad_e,) = loss_and_grads(theirs, x.double(), t, go.double(), reduction=reduction)
    assert grad.dtype == dtype
    assert_no_less_accurate(grad, grad_t, grad_e, f"{kind} {reduction} {dtype}")
    if _rounds_to_nearest(dtype, device):
        assert_rounded_once(grad, grad_e, f"{kind} {reduction} {dtype}")


@pytest.mark.parametrize("grad_output", [1.0, 0.25, 0.3, 4096.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_half_precision_reduced_loss_grad_output(reduction, grad_output, device, triton_backend):
    """A reduced float16 loss keeps the forward's gradient for grad_output 1 and 2**-k (scaled
    exactly on device) and recomputes it otherwise; a loss scale such as 4096 included: many softmax
    gradients are below float16's smallest normal (6.1e-5), stored with fewer bits, which scaling
    up would magnify. grad_output 2**-k may put a product in the subnormal range: one step (2**-24)
    of slack there."""
    x = logits((64, 1000), F64, device, scale=3.0).half()
    t = class_targets((64,), 1000, device)
    go = torch.tensor(grad_output, dtype=torch.float16, device=device)
    with launched(FWD, BWD):
        _, (grad,) = loss_and_grads(FF.cross_entropy, x, t, go, reduction=reduction)
    _, (grad_t,) = loss_and_grads(F.cross_entropy, x, t, go, reduction=reduction)
    _, (grad_e,) = loss_and_grads(F.cross_entropy, x.double(), t, go.double(), reduction=reduction)
    assert_no_less_accurate(grad, grad_t, grad_e, f"{reduction} x {grad_output}")
    assert_rounded_once(grad, grad_e, f"{reduction} x {grad_output}",
                        subnormal_steps=1.0 if grad_output == 0.25 else 0.5)


def test_half_precision_second_backward_rounds_once(device, triton_backend):
    """retain_graph: a second backward recomputes the float16 gradient with its own grad_output."""
    x = logits((16, 300), F64, device, scale=3.0).half().requires_grad_()
    t = class_targets((16,), 300, device)
    for reduction, gos in (("mean", (0.3, 3.0)), ("none", (torch.full((16,), 0.7), torch.full((16,), 5.0)))):
        with launched(FWD):
            loss = FF.cross_entropy(x, t, reduction=reduction)
        for i, go in enumerate(gos):
            go = torch.as_tensor(go, dtype=torch.float16, device=device)
            with launched(BWD):
                (grad,) = torch.autograd.grad(loss, x, go, retain_graph=True)
            _, (grad_e,) = loss_and_grads(F.cross_entropy, x.detach().double(), t, go.double(), reduction=reduction)
            assert_rounded_once(grad, grad_e, f"{reduction} backward {i}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_inplace_backward_scales_the_stored_gradient(reduction, device, triton_backend):
    """inplace_backward=True overwrites the logits, so backward scales the stored gradient (rounding
    twice, within the dtype's tolerance) instead of recomputing it."""
    x0, t = logits((8, 40), torch.float16, device), class_targets((8,), 40, device)
    go = torch.full((8,), 0.3) if reduction == "none" else torch.tensor(0.3)
    go = go.to(device=device, dtype=torch.float16)
    h = x0.clone().requires_grad_()
    out = h * 1.0  # a non-leaf buffer, as a model's output
    with launched(FWD):
        loss = FF.cross_entropy(out, t, reduction=reduction, inplace_backward=True)
    before = _utils.launch_counts[BWD]
    with launched(SCALE) if reduction != "none" else contextlib.nullcontext():
        loss.backward(go)
    assert _utils.launch_counts[BWD] == before
    _, (grad_e,) = loss_and_grads(F.cross_entropy, x0.double(), t, go.double(), reduction=reduction)
    assert_close(h.grad, grad_e.half(), torch.float16, "inplace fp16 grad")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_torch_compile_half_precision_backward(reduction, device):
    """torch.compile(fullgraph=True) traces the 16-bit backward's custom op too."""
    torch._dynamo.reset()
    x0 = logits((6, 11), torch.bfloat16, device)
    t = class_targets((6,), 11, device)
    go = torch.linspace(0.5, 3.0, 6) if reduction == "none" else torch.tensor(0.3)
    go = go.to(device=device, dtype=torch.bfloat16)
    compiled = torch.compile(lambda x: FF.cross_entropy(x, t, reduction=reduction, label_smoothing=EPS),
                             fullgraph=True)
    _, (grad_e,) = loss_and_grads(F.cross_entropy, x0.double(), t, go.double(), reduction=reduction,
                                  label_smoothing=EPS)
    with fastloss.use_backend("triton"), launched(FWD, BWD):
        x = x0.clone().requires_grad_()
        (grad,) = torch.autograd.grad(compiled(x), x, go)
    assert_close(grad, grad_e.to(torch.bfloat16), torch.bfloat16, "compiled bf16 grad")
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# extensions: z_loss, softcap, inplace_backward
# --------------------------------------------------------------------------------------------


def naive_cross_entropy(x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                        z_loss=0.0, softcap=None):
    """z_loss / softcap written out with autograd ops: the reference is checked against it."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    logp = x.log_softmax(1)
    lse = x.logsumexp(1)
    n_classes = x.shape[1]
    w = torch.ones(n_classes, dtype=x.dtype) if weight is None else weight
    if t.is_floating_point():
        y = t * (1 - label_smoothing) + label_smoothing / n_classes
        loss = -(w * y * logp).sum(1) + z_loss * lse**2
        denom = torch.tensor(float(t.shape[0]), dtype=x.dtype)
    else:
        valid = t != ignore_index
        ts = torch.where(valid, t, 0)
        w_t = torch.where(valid, w[ts], 0.0)
        nll = -logp.gather(1, ts[:, None]).squeeze(1)
        smooth = -(w * logp).sum(1)
        loss = (1 - label_smoothing) * w_t * nll + label_smoothing / n_classes * smooth + z_loss * w_t * lse**2
        loss = torch.where(valid, loss, 0.0)
        denom = w_t.sum()
    if reduction == "none":
        return loss
    return loss.sum() / denom if reduction == "mean" else loss.sum()


EXTENSIONS = {
    "z_loss": {"z_loss": ZL},
    "softcap": {"softcap": CAP},
    "all": {"z_loss": ZL, "softcap": CAP, "label_smoothing": EPS, "weight": True},
}


@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", list(EXTENSIONS))
def test_reference_extensions_match_naive_formula(option, reduction, prob):
    x = logits((5, 7), scale=5.0)
    t = prob_targets((5, 7)) if prob else class_targets((5,), 7)
    kw = dict(EXTENSIONS[option], reduction=reduction)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(7, dtype=F64) + 0.5
    check(loss_and_grads(reference.cross_entropy, x, t, **kw), loss_and_grads(naive_cross_entropy, x, t, **kw),
          F64, option)


@pytest.mark.parametrize("looped", [False, True], ids=["single_pass", "looped"])
@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(EXTENSIONS))
def test_extensions_kernel_matches_reference(option, reduction, prob, looped, device, triton_backend):
    shape = (4, 131) if looped else (5, 7)  # 131: odd rows, walked from 16-byte boundaries (PEEL)
    x = logits(shape, device=device, scale=5.0)
    t = prob_targets(shape, device) if prob else class_targets((shape[0],), shape[1], device)
    kw = dict(EXTENSIONS[option], reduction=reduction)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(shape[1], dtype=F64, device=device) + 0.5
    with looped_rows() if looped else contextlib.nullcontext(), launched(FWD):
        actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
    check(actual, loss_and_grads(reference.cross_entropy, x, t, **kw), F64, option)


def test_inplace_backward_writes_grad_into_logits(device, triton_backend):
    x0, t = logits((6, 40), device=device), class_targets((6,), 40, device)
    expected = loss_and_grads(FF.cross_entropy, x0, t, label_smoothing=EPS)
    h = x0.clone().requires_grad_()
    out = h * 1.0  # the logits: a non-leaf buffer, as a model's output
    loss = FF.cross_entropy(out, t, label_smoothing=EPS, inplace_backward=True)
    assert_close(loss.detach(), expected[0], F64, "inplace loss")
    assert_close(out.detach(), expected[1][0], F64, "the logits' memory holds the gradient")
    loss.backward(retain_graph=True)
    assert_close(h.grad, expected[1][0], F64, "inplace grad")
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_logits_never_overwritten_unless_asked(reduction, device, backend):
    """Only inplace_backward=True on the kernels may write into the caller's logits (the PyTorch
    path ignores it)."""
    x0, t = logits((6, 40), device=device), class_targets((6,), 40, device)
    calls = {
        "cross_entropy": lambda x: FF.cross_entropy(x, t, reduction=reduction, label_smoothing=EPS),
        "focal": lambda x: FF.focal_loss(x, t, 0.25, 2.0, reduction),
    }
    if backend == "torch":
        calls["inplace_backward on torch"] = lambda x: FF.cross_entropy(x, t, reduction=reduction,
                                                                        inplace_backward=True)
    for what, call in calls.items():
        x = x0.clone().requires_grad_()
        with ran(backend):
            call(x).sum().backward()
        assert torch.equal(x.detach(), x0), f"{what}: the logits were written"


def test_inplace_backward_on_noncontiguous_logits_keeps_them(device, triton_backend):
    """Where the gradient cannot go into the logits' memory, the logits stay intact and a second
    backward recomputes from them."""
    x0, t = logits((40, 6), device=device).t(), class_targets((6,), 40, device)
    expected = loss_and_grads(FF.cross_entropy, x0, t)
    x = x0.clone().requires_grad_()
    with launched(FWD):
        loss = FF.cross_entropy(x, t, inplace_backward=True)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.equal(x.detach(), x0)
    assert_close(g1, expected[1][0], F64, "first backward")
    assert_close(g2, expected[1][0], F64, "second backward")


def test_second_backward_recomputes(device, triton_backend):
    x, t = logits((5, 7), device=device).requires_grad_(), class_targets((5,), 7, device)
    with launched(FWD):
        loss = FF.cross_entropy(x, t, z_loss=ZL)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g2,) = torch.autograd.grad(loss * 2, x)
    assert_close(g2, 2 * g1, F64, "second backward")


def test_float64_scalars_reach_the_kernel_in_float64(device, triton_backend):
    """label_smoothing, z_loss, softcap, focal alpha and gamma that float32 cannot hold: float64
    logits get float64 results (parameters passed as float32 are off by ~1e-8 relatively)."""
    x, t = logits((6, 7), device=device), class_targets((6,), 7, device)
    exact = {"rtol": 1e-14, "atol": 1e-15}
    for reduction in ("mean", "none"):
        with launched(FWD):
            actual = loss_and_grads(FF.cross_entropy, x, t, label_smoothing=0.1, reduction=reduction)
        expected = loss_and_grads(F.cross_entropy, x, t, label_smoothing=0.1, reduction=reduction)
        torch.testing.assert_close(actual, expected, **exact, msg=lambda m: f"label_smoothing 0.1\n{m}")
        kw = {"z_loss": 1e-3, "softcap": 3.3, "reduction": reduction}
        with launched(FWD):
            actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
        expected = loss_and_grads(naive_cross_entropy, x, t, **kw)
        torch.testing.assert_close(actual, expected, **exact, msg=lambda m: f"z_loss, softcap\n{m}")
    t = class_targets((6,), 7, device, ignore=False)  # the composition has no ignore_index
    for alpha, gamma in ((0.3, 2.0), (1.0, 1.7)):
        with launched(FWD):
            actual = loss_and_grads(FF.focal_loss, x, t, alpha=alpha, gamma=gamma)
        expected = loss_and_grads(focal_composition, x, t, alpha=alpha, gamma=gamma)
        torch.testing.assert_close(actual, expected, **exact)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_ignored_row_with_inf_logits_adds_zero(reduction, device, backend):
    """An ignored row adds 0 to the z-loss too, whatever its logits (w_t lse**2 = 0 * inf = NaN)."""
    x = logits((4, 6), device=device)
    t = torch.tensor([1, -100, 3, -100], device=device)
    x[1, 2] = math.inf
    x[3] = -math.inf
    clean = torch.where(t[:, None] == -100, 0.0, x)  # the same loss by definition
    expected = loss_and_grads(naive_cross_entropy, clean, t, z_loss=ZL, reduction=reduction)
    with ran(backend):
        loss, (grad,) = loss_and_grads(FF.cross_entropy, x, t, z_loss=ZL, reduction=reduction)
    assert_close(loss, expected[0], F64, "loss")
    kept = t != -100  # (torch's own cross-entropy gradient of an inf row is NaN)
    assert_close(grad[kept], expected[1][0][kept], F64, "gradient of the other rows")


@pytest.mark.parametrize("label_smoothing", [-0.1, -1.0, math.nan])
@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
def test_label_smoothing_not_positive_is_none_as_in_torch(label_smoothing, prob, device, backend):
    """torch checks only label_smoothing <= 1 and smooths only when it is > 0."""
    x = logits((5, 7), device=device)
    t = prob_targets((5, 7), device) if prob else class_targets((5,), 7, device)
    for reduction in ("mean", "none"):
        kw = {"label_smoothing": label_smoothing, "reduction": reduction}
        with ran(backend):
            actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
        expected = loss_and_grads(F.cross_entropy, x, t, **kw)
        check(actual, expected, F64, f"label_smoothing={label_smoothing}")
        check(expected, loss_and_grads(F.cross_entropy, x, t, reduction=reduction), F64, "torch: none")


def test_uint8_targets_as_torch(device, backend):
    """torch takes uint8 class indices for (C,) and (N, C) inputs only (its nll_loss2d, which
    (N, C, d1, ...) inputs use, wants int64; an empty batch reduced to a scalar returns before)."""
    for x in (logits((7,), device=device), logits((5, 7), device=device)):
        t = class_targets(target_shape(tuple(x.shape)), 7, device, ignore=False).to(torch.uint8)
        with ran(backend):
            actual = loss_and_grads(FF.cross_entropy, x, t)
        check(actual, loss_and_grads(F.cross_entropy, x, t), F64, f"uint8 {tuple(x.shape)}")
        with ran(backend):
            focal = loss_and_grads(FF.focal_loss, x, t, gamma=0.0)
        check(focal, actual, F64, f"focal uint8 {tuple(x.shape)}")
    for shape in ((2, 7, 3), (1, 7, 1), (0, 7, 3)):
        x = logits(shape, device=device)
        t = torch.zeros(target_shape(shape), dtype=torch.uint8, device=device)
        for call in (F.cross_entropy, FF.cross_entropy, FF.focal_loss):
            with pytest.raises(RuntimeError, match="expected scalar type Long but found Byte"):
                call(x, t, reduction="none")
            if shape[0]:
                with pytest.raises(RuntimeError, match="expected scalar type Long but found Byte"):
                    call(x, t)
    x, t = logits((0, 7, 3), device=device), torch.zeros(0, 3, dtype=torch.uint8, device=device)
    for reduction in ("mean", "sum"):
        assert_close(FF.cross_entropy(x, t, reduction=reduction), F.cross_entropy(x, t, reduction=reduction),
                     F64, f"empty uint8 {reduction}")


def test_class_weight_of_another_dtype_raises_as_torch(device, backend):
    """torch's class-index cross-entropy takes a weight of the input's dtype only (under autocast:
    both as cast to float32); probability targets promote instead."""
    x, t = logits((3, 5), torch.float32, device), class_targets((3,), 5, device)
    for w_dtype, msg in ((F64, "expected scalar type Float but found Double"),
                         (torch.float16, "expected scalar type Float but found Half")):
        w = torch.rand(5, device=device).to(w_dtype)
        for call in (F.cross_entropy, FF.cross_entropy, lambda x, t, weight: FF.focal_loss(x, t, weight=weight)):
            with pytest.raises(RuntimeError, match=msg):
                call(x, t, weight=w)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        x16 = x.to(torch.bfloat16)
        w = torch.rand(5, device=device)
        with ran(backend):
            actual = FF.cross_entropy(x16, t, weight=w)
        assert_close(actual, F.cross_entropy(x16, t, weight=w), torch.float32, "autocast, float32 weight")
        for call in (F.cross_entropy, FF.cross_entropy):
            with pytest.raises(RuntimeError, match="expected scalar type Float but found Double"):
                call(x16, t, weight=w.double())


# --------------------------------------------------------------------------------------------
# focal loss
# --------------------------------------------------------------------------------------------


classic_focal = baselines.softmax_focal


@pytest.mark.parametrize("alpha", [1.0, 0.25, "tensor"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("shape", [(9, 7), (3, 1031), (2, 4, 3)], ids=str)
def test_focal_matches_classic_composition(shape, gamma, alpha, device, backend):
    n_classes = shape[1]
    x = logits(shape, device=device)
    t = class_targets(target_shape(shape), n_classes, device, ignore=False)
    if alpha == "tensor":
        alpha = torch.rand(n_classes, dtype=F64, device=device)
    with ran(backend):
        actual = loss_and_grads(FF.focal_loss, x, t, alpha=alpha, gamma=gamma)
    expected = loss_and_grads(classic_focal, x, t, alpha=alpha, gamma=gamma)
    check(actual, expected, F64, f"focal {shape} gamma={gamma}")
    # and the module form
    crit = fastloss.FocalLoss(alpha, gamma)
    assert_close(crit(x, t), expected[0], F64, "FocalLoss module")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("looped", [False, True], ids=["single_pass", "looped"])
def test_focal_kernel_matches_reference(reduction, looped, device):
    shape = (5, 130)
    x = logits(shape, device=device)
    t = class_targets((5,), 130, device)
    kw = {"alpha": torch.rand(130, dtype=F64, device=device), "gamma": 0.5, "reduction": reduction,
          "weight": torch.rand(130, dtype=F64, device=device) + 0.5}
    with fastloss.use_backend("triton"), looped_rows() if looped else contextlib.nullcontext(), launched(FWD):
        actual = loss_and_grads(FF.focal_loss, x, t, **kw)
    with fastloss.use_backend("torch"):
        expected = loss_and_grads(FF.focal_loss, x, t, **kw)
    check(actual, expected, F64, "focal kernel")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_gamma0_is_cross_entropy(reduction, device, backend):
    x = logits((2, 6, 3), device=device)
    t = class_targets((2, 3), 6, device)
    w = torch.rand(6, dtype=F64, device=device) + 0.5
    kw = {"weight": w, "ignore_index": -100, "reduction": reduction}
    with ran(backend):
        actual = loss_and_grads(FF.focal_loss, x, t, alpha=1.0, gamma=0.0, **kw)
    check(actual, loss_and_grads(F.cross_entropy, x, t, **kw), F64, "gamma=0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0])
def test_focal_gradient_finite_when_confident(gamma, dtype, device, backend):
    x = logits((4, 5), device=device, scale=0.1)
    t = torch.tensor([0, 1, 2, 3], device=device)
    x[torch.arange(4), t] = torch.tensor([60.0, 30.0, 16.0, 5.0], dtype=F64, device=device)
    x = x.to(dtype)
    with ran(backend):
        loss, (grad,) = loss_and_grads(FF.focal_loss, x, t, gamma=gamma)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), grad
    _, (grad_e,) = loss_and_grads(reference.focal_loss, x.double(), t, gamma=gamma)
    assert_close(grad.double(), grad_e, dtype, "confident focal grad")


def test_focal_ignore_index_and_weight(device, backend):
    x = logits((8, 5), device=device)
    t = class_targets((8,), 5, device)
    w = torch.rand(5, dtype=F64, device=device) + 0.5
    with ran(backend):
        loss, (grad,) = loss_and_grads(FF.focal_loss, x, t, gamma=2.0, weight=w)
    # explicit: weighted focal terms over non-ignored rows / sum of their weights
    valid = t != -100
    logp_t = x.log_softmax(1)[valid].gather(1, t[valid, None]).squeeze(1)
    terms = -w[t[valid]] * (1 - logp_t.exp()) ** 2 * logp_t
    assert_close(loss, terms.sum() / w[t[valid]].sum(), F64, "weighted focal")
    assert (grad[~valid] == 0).all()


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
def test_focal_confident_rows_no_less_accurate_than_torch(gamma, device, backend):
    """Confidently wrong (p_t -> 0) and confidently right (p_t -> 1) float32 rows, one at a time:
    fastloss's focal loss and gradient are no less accurate than torch's composition in float32,
    against float64 (p_t, 1 - p_t and the target column's gradient each without cancellation)."""
    margins = [-30, -20, -14, -10, -7, -4, -2, 2, 4, 7, 10, 14]
    x = torch.randn(len(margins), 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.arange(len(margins)) % 5
    for i, margin in enumerate(margins):  # the target logit that far above the others, or below
        x[i, t[i]] = (x[i].max() if margin > 0 else x[i].min()) + margin
    x, t = x.float().to(device), t.to(device)
    with ran(backend):
        loss, (grad,) = loss_and_grads(FF.focal_loss, x, t, gamma=gamma, reduction="none")
    loss_t, (grad_t,) = loss_and_grads(focal_composition, x, t, gamma=gamma, reduction="none")
    exact, (grad_e,) = loss_and_grads(focal_composition, x.double(), t, gamma=gamma, reduction="none")
    for i, margin in enumerate(margins):
        assert_no_less_accurate(loss[i:i + 1], loss_t[i:i + 1], exact[i:i + 1], f"margin {margin} loss")
        assert_no_less_accurate(grad[i], grad_t[i], grad_e[i], f"margin {margin} grad")


# --------------------------------------------------------------------------------------------
# gradcheck (float64, both backends)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["ce", "ce_prob", "ce_seg", "focal"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(case, reduction, device, backend):
    w = torch.rand(5, dtype=F64, device=device) + 0.5
    if case == "focal":
        x = logits((3, 5), device=device)
        t = class_targets((3,), 5, device)
        alpha = torch.rand(5, dtype=F64, device=device)
        fn = lambda x: FF.focal_loss(x, t, alpha, 0.5, reduction, w)
        inputs = (x.requires_grad_(),)
    elif case == "ce_prob":
        x, y = logits((3, 5), device=device), prob_targets((3, 5), device)
        fn = lambda x, y: FF.cross_entropy(x, y, w, reduction=reduction, label_smoothing=EPS,
                                           z_loss=ZL, softcap=CAP)
        inputs = (x.requires_grad_(), y.requires_grad_())
    else:
        shape = (3, 5) if case == "ce" else (2, 5, 2)
        x = logits(shape, device=device)
        t = class_targets(target_shape(shape), 5, device)
        fn = lambda x: FF.cross_entropy(x, t, w, reduction=reduction, label_smoothing=EPS,
                                        z_loss=ZL, softcap=CAP)
        inputs = (x.requires_grad_(),)
    assert torch.autograd.gradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CPU tensors reach the kernels only under the interpreter")),
])
def test_bad_inputs_raise_like_torch(backend_name):
    """On CPU tensors, as torch (an out-of-range target on CUDA is the NaN test below)."""
    with fastloss.use_backend(backend_name):
        _check_bad_inputs()


def _check_bad_inputs():
    x = logits((3, 5))
    cases = [
        (lambda m: m.cross_entropy(x, torch.tensor([1, 2, 3, 4])), ValueError, "batch_size"),
        (lambda m: m.cross_entropy(x, torch.tensor([1.0, 2.0, 3.0])), RuntimeError, "Long"),
        (lambda m: m.cross_entropy(x, torch.tensor([1, 2, 3], dtype=torch.int32)), RuntimeError, "Long"),
        (lambda m: m.cross_entropy(x, torch.tensor([1, 2, 5])), IndexError, "Target 5 is out of bounds"),
        (lambda m: m.cross_entropy(x, torch.tensor([1, -3, 2])), IndexError, "Target -3 is out of bounds"),
        (lambda m: m.cross_entropy(x, torch.tensor([1, 2, 3]), label_smoothing=1.5), RuntimeError,
         "label_smoothing"),
        (lambda m: m.cross_entropy(x, torch.tensor([1, 2, 3]), weight=torch.ones(4, dtype=F64)),
         RuntimeError, "weight tensor"),
        (lambda m: m.cross_entropy(x, torch.tensor([1, 2, 3]), reduction="avg"), ValueError, "reduction"),
        (lambda m: m.cross_entropy(logits((2, 5, 4)), torch.zeros(2, 3, dtype=torch.long)), RuntimeError,
         "Expected target size"),
        (lambda m: m.cross_entropy(x, prob_targets((3, 5)), ignore_index=1), RuntimeError, "ignore_index"),
        (lambda m: m.cross_entropy(logits((5,)), torch.tensor([1, 2])), ValueError, "1D target must have size 1"),
        (lambda m: m.cross_entropy(x, torch.zeros(3, 5, dtype=torch.long)), RuntimeError,
         "Expected floating point type for target with class probabilities, got Long"),
        (lambda m: m.cross_entropy(logits((5,)), torch.zeros(5, dtype=torch.long)), RuntimeError,
         "Expected floating point type"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call(F)
        with pytest.raises(error, match=match):
            call(FF)
    t = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="gamma"):
        FF.focal_loss(x, t, gamma=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        fastloss.FocalLoss(gamma=-0.5)
    with pytest.raises(ValueError, match="z_loss"):
        FF.cross_entropy(x, t, z_loss=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        FF.cross_entropy(x, t, softcap=0.0)
    with pytest.raises(ValueError, match="one value per class"):
        FF.focal_loss(x, t, alpha=torch.ones(4, dtype=F64))
    with pytest.raises(ValueError, match="batch_size"):
        FF.focal_loss(x, torch.tensor([1, 2]))


class _RecordingKernel:
    """Stands in for a Triton kernel: records the arguments of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((args, kw))


@pytest.mark.parametrize("case", ["grad_input", "prob_target", "grad_target"])
def test_column_offsets_past_int32_use_int64(case, monkeypatch):
    """(N, C, D) operands whose (C - 1) * stride_col overflows int32 (meta tensors, no memory):
    the kernel is told to compute column offsets in int64, for every operand it addresses."""
    fwd = _RecordingKernel()
    fake = type("K", (), {"cross_entropy_fwd_kernel": fwd, "cross_entropy_denom_kernel": _RecordingKernel()})
    monkeypatch.setattr(ops_softmax, "_kernels", lambda: (fake, {torch.float32: None}))
    d = 2**30  # (3 - 1) * d = 2**31
    x = torch.empty(1, 3, d, device="meta", dtype=torch.float32)
    prob = case != "grad_input"
    y = torch.empty(1, 3, d, device="meta") if prob else torch.empty(1, d, device="meta", dtype=torch.long)
    if prob:  # the logits themselves with class stride 1: only the target (and its gradient) overflow
        x = torch.empty(1, d, 3, device="meta").transpose(1, 2)
    ops_softmax._fwd(x, y, None, None, "cross_entropy", -100, 0.0, 0.0, 0.0, 1.0, 0.0, "sum", False, False,
                     case == "grad_input", case == "grad_target")
    ((args, kw),) = fwd.launches
    wide = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 3 and 2 * a.stride(1) >= 2**31]
    assert wide and kw["COLS_I64"], "int32 column offsets would overflow"


def test_int64_column_offsets_give_the_same_results(monkeypatch, device, triton_backend):
    monkeypatch.setattr(ops_softmax, "INT32_OFFSET_LIMIT", 1)
    x, y = logits((2, 5, 3), device=device), prob_targets((2, 5, 3), device)
    t = class_targets((2, 3), 5, device)
    for target, kw in ((t, {"label_smoothing": EPS}), (y, {"reduction": "none"})):
        with launched(FWD):
            actual = loss_and_grads(FF.cross_entropy, x, target, **kw)
        check(actual, loss_and_grads(F.cross_entropy, x, target, **kw), F64, f"int64 columns {kw}")


def _row_offsets(t: torch.Tensor, n_cols: int) -> list[int]:
    """First element offset of every loss row of an (N, C, d...) or (C,) operand."""
    if t.dim() == 1:
        return [0]
    n, d = t.shape[0], math.prod(t.shape[2:])
    view = t.reshape(n, n_cols, d)
    return [i * view.stride(0) + j * view.stride(2) for i in range(n) for j in range(d)]


ALIGN_LAYOUTS = {
    "1000 classes": lambda: torch.empty(3, 1000),
    "24 classes": lambda: torch.empty(5, 24),
    "odd classes": lambda: torch.empty(4, 7),
    "sliced, row stride 40": lambda: torch.empty(3, 40)[:, :24],
    "sliced at offset 4": lambda: torch.empty(3, 40)[:, 4:28],
    "transposed": lambda: torch.empty(6, 8).t(),
    "segmentation": lambda: torch.empty(2, 8, 4, 4),
    "one row": lambda: torch.empty(24),
    "broadcast rows": lambda: torch.empty(1, 24).expand(5, 24),
}


@pytest.mark.parametrize("prob", [False, True], ids=["indices", "probabilities"])
@pytest.mark.parametrize("layout", list(ALIGN_LAYOUTS))
def test_row_align_divides_every_row_offset(layout, prob, monkeypatch):
    """The ROW_ALIGN hint lets the compiler issue 16-byte accesses; a wrong one would misread on a
    GPU (the interpreter does not care), so check it against every row's offset, brute force."""
    fwd = _RecordingKernel()
    fake = type("K", (), {"cross_entropy_fwd_kernel": fwd, "cross_entropy_denom_kernel": _RecordingKernel()})
    monkeypatch.setattr(ops_softmax, "_kernels", lambda: (fake, {torch.float32: None}))
    x = ALIGN_LAYOUTS[layout]()
    n_cols = x.shape[0] if x.dim() == 1 else x.shape[1]
    if prob:  # probabilities broadcast over the rows (row stride 0)
        y = torch.empty(x.shape[1:]).expand(x.shape) if x.dim() > 1 else torch.empty(x.shape)
    else:
        y = torch.zeros(target_shape(tuple(x.shape)), dtype=torch.long)
    ops_softmax._fwd(x, y, None, None, "cross_entropy", -100, 0.0, 0.0, 0.0, 1.0, 0.0, "sum", False, False,
                     True, prob)
    ((_, kw),) = fwd.launches
    align = kw["ROW_ALIGN"]
    operands = [x, torch.empty(x.shape)] + ([y, torch.empty(y.shape)] if prob else [])  # + gradients
    offsets = [o for t in operands for o in _row_offsets(t, n_cols)]
    assert all(o % align == 0 for o in offsets), f"ROW_ALIGN {align} does not divide {offsets}"
    assert n_cols % align == 0, "the class count enters the column mask: it must be a multiple too"
    g = math.gcd(n_cols, *offsets)
    assert align == min(g & -g, 16), f"ROW_ALIGN {align} is not the largest for offsets {offsets}"


@pytest.mark.parametrize("shape", [(5, 24), (3, 1000), (2, 12)], ids=str)
def test_aligned_rows_match_torch(shape, device, triton_backend):
    """Row offsets and class counts divisible by 4 or 8 (ROW_ALIGN > 1), contiguous and sliced."""
    n, c = shape
    wide = logits((n, c + 8), device=device)
    t = class_targets((n,), c, device, ignore=False)  # the classic focal composition has no ignore_index
    for x in (wide[:, :c].contiguous(), wide[:, :c], wide[:, 8:]):
        for kw in ({}, {"label_smoothing": EPS, "reduction": "none"}):
            with launched(FWD):
                actual = loss_and_grads(FF.cross_entropy, x, t, **kw)
            check(actual, loss_and_grads(F.cross_entropy, x, t, **kw), F64, f"{shape} {kw}")
        with launched(FWD):
            actual = loss_and_grads(FF.focal_loss, x, t, alpha=0.25, gamma=2.0)
        check(actual, loss_and_grads(classic_focal, x, t, alpha=0.25, gamma=2.0), F64, f"{shape} focal")


PEEL_LAYOUTS = {  # (make logits, dtype, looped) -> PEEL
    "odd fp32 looped": (lambda: torch.empty(4, 203), 4),
    "odd bf16 looped": (lambda: torch.empty(4, 203, dtype=torch.bfloat16), 8),
    "odd fp64 looped": (lambda: torch.empty(4, 203, dtype=F64), 2),
    "202 classes bf16 looped": (lambda: torch.empty(4, 202, dtype=torch.bfloat16), 8),
    "aligned rows": (lambda: torch.empty(4, 200), 1),
    "start not 16-byte aligned": (lambda: torch.empty(4, 207)[:, 1:204], 1),
    "transposed": (lambda: torch.empty(203, 4).t(), 1),
    "segmentation": (lambda: torch.empty(2, 203, 3), 1),
}


@pytest.mark.parametrize("layout", list(PEEL_LAYOUTS))
def test_peel_only_where_rows_are_equally_misaligned(layout, monkeypatch):
    """Looped rows that do not start 16-byte aligned are walked from the boundary before them
    (PEEL = 16 bytes in elements) only when logits and gradient share that misalignment."""
    fwd = _RecordingKernel()
    fake = type("K", (), {"cross_entropy_fwd_kernel": fwd, "cross_entropy_denom_kernel": _RecordingKernel()})
    monkeypatch.setattr(ops_softmax, "_kernels", lambda: (fake, {torch.float32: None, F64: None}))
    make, peel = PEEL_LAYOUTS[layout]
    x = make()
    t = torch.zeros(target_shape(tuple(x.shape)), dtype=torch.long)
    with looped_rows():
        ops_softmax._fwd(x, t, None, None, "cross_entropy", -100, 0.0, 0.0, 0.0, 1.0, 0.0, "mean", False,
                         False, True, False)
    ((_, kw),) = fwd.launches
    assert not kw["SINGLE_PASS"]
    assert kw["PEEL"] == peel


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("n_cols", [201, 202, 203, 206])
def test_misaligned_looped_rows_match_torch(n_cols, dtype, device, triton_backend):
    """Looped rows of every misalignment (N = 8 rows of 201..206 classes start at every residue),
    walked from 16-byte boundaries: a partial first block, full blocks, a partial last one."""
    x = logits((8, n_cols), dtype, device=device)
    t = class_targets((8,), n_cols, device)
    y = prob_targets((8, n_cols), device, dtype)
    options = [(t, {}), (t, {"label_smoothing": EPS, "weight": True, "reduction": "none"}),
               (y, {"reduction": "sum"}), (t, {"z_loss": ZL, "softcap": CAP})]
    for target, kw in options:
        if kw.pop("weight", False):
            kw["weight"] = torch.rand(n_cols, dtype=F64, device=device).to(dtype) + 0.5
        with looped_rows(), launched(FWD):
            actual = loss_and_grads(FF.cross_entropy, x, target, **kw)
        expected = loss_and_grads(reference.cross_entropy, x.double(), target.double()
                                  if target.is_floating_point() else target,
                                  **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        expected = (expected[0].to(actual[0].dtype), tuple(g.to(dtype) for g in expected[1]))
        check(actual, expected, dtype, f"{n_cols} classes {kw}")
    with looped_rows(), launched(FWD):
        actual = loss_and_grads(FF.focal_loss, x, t, alpha=0.25, gamma=2.0)
    expected = loss_and_grads(reference.focal_loss, x.double(), t, alpha=0.25, gamma=2.0)
    check(actual, (expected[0].to(actual[0].dtype), tuple(g.to(dtype) for g in expected[1])), dtype,
          f"{n_cols} classes focal")


def test_out_of_range_target_in_kernel_gives_nan(monkeypatch, device, triton_backend):
    """The CUDA path never reads out of bounds: such a row's loss and gradient are NaN."""
    monkeypatch.setattr(ops_softmax, "_check_targets_cpu", lambda *args: None)
    x = logits((3, 5), device=device).requires_grad_()
    t = torch.tensor([1, 7, -4], device=device)
    with launched(FWD):
        loss = FF.cross_entropy(x, t, reduction="none")
    loss.sum().backward()
    assert torch.isnan(loss[1:]).all() and torch.isfinite(loss[0])
    assert torch.isfinite(x.grad[0]).all() and torch.isnan(x.grad[1:]).all()


# --------------------------------------------------------------------------------------------
# modules and torch.compile
# --------------------------------------------------------------------------------------------


def test_cross_entropy_module_is_torch_drop_in(device, backend):
    w = torch.rand(7, dtype=F64, device=device) + 0.5
    ours = fastloss.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=EPS)
    theirs = nn.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=EPS)
    assert isinstance(ours, nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x, t = logits((9, 7), device=device), class_targets((9,), 7, device)
    t[t == -100] = 3
    check(loss_and_grads(lambda x, t: ours(x, t), x, t), loss_and_grads(lambda x, t: theirs(x, t), x, t),
          F64, "module")
    legacy = fastloss.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    assert "z_loss=0.5" in repr(fastloss.CrossEntropyLoss(z_loss=0.5))


@pytest.mark.parametrize("compile_backend", ["auto", "triton"])
def test_torch_compile_fullgraph(compile_backend, device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 11)).to(device)
    data = torch.randn(12, 8, device=device)
    t = torch.randint(0, 11, (12,), device=device)
    t[3] = -100
    ce = fastloss.CrossEntropyLoss(label_smoothing=EPS, z_loss=ZL)
    focal = fastloss.FocalLoss(alpha=0.25, gamma=2.0)

    def step(ce_fn, focal_fn):
        out = model(data)
        return ce_fn(out, t) + focal_fn(out, t.clamp_min(0))

    expected = step(lambda o, t: reference.cross_entropy(o, t, label_smoothing=EPS, z_loss=ZL),
                    lambda o, t: classic_focal(o, t, 0.25, 2.0))
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    compiled = torch.compile(lambda: step(ce, focal), fullgraph=True)
    kernels = compile_backend == "triton" or device == "cuda"
    with fastloss.use_backend(compile_backend):
        before = _utils.launch_counts[FWD]
        for _ in range(2):  # the second call reuses the compiled graph
            model.zero_grad()
            loss = compiled()
            loss.backward()
            assert_close(loss.detach(), expected.detach(), torch.float32, f"compiled {compile_backend}")
            for p, g in zip(model.parameters(), expected_grads):
                assert_close(p.grad, g, torch.float32, f"compiled {compile_backend} parameter grad")
        assert (_utils.launch_counts[FWD] > before) == kernels
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (a 4 GiB logits tensor)")
def test_int64_offsets_large_logits():
    """N x V > 2**31: row offsets must be int64."""
    n, v = 8400, 256000
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    t[-1] = v - 1
    x.requires_grad_()
    loss = FF.cross_entropy(x, t, reduction="none")
    rows = [0, n // 2, n - 1]
    expected = F.cross_entropy(x.detach()[rows].float(), t[rows], reduction="none")
    torch.testing.assert_close(loss[rows].float(), expected, rtol=1e-2, atol=1e-2)
    loss.sum().backward()
    g = x.grad[rows].float()
    ge = torch.softmax(x.detach()[rows].float(), 1)
    ge[torch.arange(3), t[rows]] -= 1
    torch.testing.assert_close(g, ge, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [5, -1], ids=["too_large", "negative"])
def test_focal_out_of_range_target_is_index_error_on_both_backends(backend, bad):
    """torch's IndexError for an out-of-range class index, whichever path runs on CPU."""
    x = logits((3, 5))
    t = torch.tensor([0, bad, 2])
    with fastloss.use_backend(backend), pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
        fastloss.functional.focal_loss(x, t)
    with fastloss.use_backend(backend):  # ignore_index is not out of range
        fastloss.functional.focal_loss(x, torch.tensor([0, -100, 2]))
