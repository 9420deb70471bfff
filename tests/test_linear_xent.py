"""Fused linear + cross-entropy (fastloss.functional.linear_cross_entropy, LinearCrossEntropyLoss):
parity with torch.nn's composition ``F.cross_entropy(F.linear(x, W, b), t, ...)`` (z-loss, softcap
and token weights written out in torch ops) in float64 and with torch 2.13's own
``F.linear_cross_entropy``, on the row kernel (Triton's interpreter on CPU) and the PyTorch path;
chunk boundaries, 3-D input, half precision against torch in the same dtype, an allocation recorder
proving that no N x V tensor exists on either path, and torch.compile."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import TOLERANCES, assert_close, assert_no_less_accurate, assert_not_launched, dtype_id
from helpers import assert_launched as launched
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastloss
from fastloss import functional as FL
from fastloss import reference
from fastloss.modules import _TorchLinearCrossEntropyLoss
from fastloss.ops import _utils
from fastloss.ops import linear_xent as ops
from fastloss.ops import softmax as ops_softmax

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FWD = "cross_entropy_fwd_kernel"
F64 = torch.float64
REDUCTIONS = ["mean", "sum", "none"]
# parameters exactly representable in float32 (the row kernel takes Python floats as float32)
EPS, ZL, CAP = 0.125, 2.0**-7, 4.0
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(nn, "LinearCrossEntropyOptions")
needs_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch < 2.13 has no F.linear_cross_entropy")


def ran(backend):
    """The block must run the row kernel (backend "triton") or no kernel at all (backend "torch")."""
    return launched(FWD) if backend == "triton" else assert_not_launched()


@pytest.fixture
def chunk(monkeypatch):
    """``chunk(rows)``: force the rows per chunk for the rest of the test."""
    return lambda rows: monkeypatch.setattr(ops, "CHUNK_ROWS", rows)


# --------------------------------------------------------------------------------------------
# Inputs and the oracle
# --------------------------------------------------------------------------------------------

def make(batch=(13,), h=8, v=37, dtype=F64, bias=False, ignore=True, seed=0, device=DEVICE):
    """x (*batch, h), W (v, h), b (v,) or None, class-index targets (some ignored): logits O(3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, h, generator=g, dtype=F64)
    w = torch.randn(v, h, generator=g, dtype=F64) * (3.0 / math.sqrt(h))
    b = torch.randn(v, generator=g, dtype=F64) if bias else None
    t = torch.randint(0, v, batch, generator=g)
    if ignore and t.numel() > 2:
        t.view(-1)[1::5] = -100
    cast = [a.to(device, dtype) if a is not None else None for a in (x, w, b)]
    return (*cast, t.to(device))


def class_weight(v, dtype=F64, seed=3):
    return (torch.rand(v, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5).to(DEVICE, dtype)


def token_weight(shape, dtype=F64, seed=4):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2).to(DEVICE, dtype)


def oracle(x, w, t, b=None, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
           z_loss=0.0, softcap=None, token_weight=None):
    """torch.nn's composition; z-loss, softcap and token weights written out in torch ops."""
    logits = F.linear(x.reshape(-1, x.shape[-1]), w, b)
    tt = t.reshape(-1)
    if not z_loss and softcap is None and token_weight is None:
        out = F.cross_entropy(logits, tt, weight, ignore_index=ignore_index, reduction=reduction,
                              label_smoothing=label_smoothing)
        return out.reshape(t.shape) if reduction == "none" else out
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    ce = F.cross_entropy(logits, tt, weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    valid = tt != ignore_index
    w_t = torch.where(valid, weight[tt.clamp_min(0)] if weight is not None else 1.0, 0.0).to(ce.dtype)
    loss = ce + z_loss * w_t * torch.logsumexp(logits, 1) ** 2
    tw = token_weight.reshape(-1) if token_weight is not None else torch.ones_like(loss)
    loss = loss * tw
    if reduction == "none":
        return loss.reshape(t.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / (w_t * tw).sum()


def leaves(*ts):
    return [t.detach().clone().requires_grad_() if t is not None and t.is_floating_point() else t for t in ts]


def loss_and_grads(fn, x, w, t, b=None, tw=None, go_seed=7, **kw):
    """Loss and gradients of sum(loss * grad_output) w.r.t. x, w (and b, tw when given)."""
    x, w, b, tw = leaves(x, w, b, tw)
    kw = {**kw, **({"token_weight": tw} if tw is not None else {})}
    loss = fn(x, w, t, b=b, **kw)
    go = torch.rand(loss.shape, generator=torch.Generator().manual_seed(go_seed), dtype=F64)
    wrt = [a for a in (x, w, b, tw) if a is not None]
    grads = torch.autograd.grad(loss, wrt, go.to(loss.device, loss.dtype))
    return loss.detach(), grads


def ours(x, w, t, b=None, **kw):
    return FL.linear_cross_entropy(x, w, t, linear_bias=b, **kw)


def torch_lce(x, w, t, b=None, **kw):
    return F.linear_cross_entropy(x, w, t, linear_bias=b, **kw)


def check(got, want, dtype, msg):
    (loss, grads), (loss_w, grads_w) = got, want
    assert_close(loss, loss_w.to(loss.dtype), dtype, f"{msg}: loss")
    assert len(grads) == len(grads_w)
    for i, (g, gw) in enumerate(zip(grads, grads_w)):
        assert_close(g, gw.to(g.dtype), dtype, f"{msg}: grad {i}")


OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": EPS},
    "weight_smoothing": {"weight": True, "label_smoothing": EPS},
    "z_loss": {"z_loss": ZL},
    "softcap": {"softcap": CAP},
    "token_weight": {"token_weight": True},
    "ignore_index_3": {"ignore_index": 3},
    "everything": {"bias": True, "weight": True, "label_smoothing": EPS, "z_loss": ZL, "softcap": CAP,
                   "token_weight": True},
}


def _case(name, batch=(13,), h=8, v=37, dtype=F64):
    """(x, w, t, b, tw, keyword arguments) of one OPTIONS entry."""
    opts = dict(OPTIONS[name])
    x, w, b, t = make(batch, h, v, dtype, bias=opts.pop("bias", False))
    if opts.get("ignore_index") == 3:
        t = t.clamp_min(0)
        t.view(-1)[::4] = 3
    if opts.pop("weight", False):
        opts["weight"] = class_weight(v, dtype)
    tw = token_weight(t.shape, dtype) if opts.pop("token_weight", False) else None
    return x, w, t, b, tw, opts


# --------------------------------------------------------------------------------------------
# Parity with torch.nn's composition, float64, both paths
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_torch_composition_float64(name, reduction, backend, chunk):
    """Every option against ``F.cross_entropy(F.linear(x, W, b), t, ...)``, loss and every gradient,
    13 rows in chunks of 4 (the last chunk partial)."""
    chunk(4)
    x, w, t, b, tw, kw = _case(name)
    with ran(backend):
        got = loss_and_grads(ours, x, w, t, b, tw, reduction=reduction, **kw)
    want = loss_and_grads(oracle, x, w, t, b, tw, reduction=reduction, **kw)
    check(got, want, F64, f"{name} {reduction} {backend}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_reference_matches_torch_composition(name, reduction):
    """fastloss.reference.linear_cross_entropy, the oracle of double backward, against torch.nn."""
    x, w, t, b, tw, kw = _case(name, batch=(3, 5))
    got = loss_and_grads(lambda x, w, t, b=None, weight=None, ignore_index=-100, label_smoothing=0.0,
                         z_loss=0.0, softcap=None, token_weight=None, reduction="mean":
                         reference.linear_cross_entropy(x, w, t, b, weight, ignore_index, reduction,
                                                        label_smoothing, z_loss, softcap, token_weight),
                         x, w, t, b, tw, reduction=reduction, **kw)
    want = loss_and_grads(oracle, x, w, t, b, tw, reduction=reduction, **kw)
    check(got, want, F64, f"reference {name} {reduction}")


@needs_torch_lce
@pytest.mark.parametrize("chunked", [False, True], ids=["options=None", "options"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["plain", "bias", "weight", "smoothing", "weight_smoothing", "ignore_index_3"])
def test_matches_torch_linear_cross_entropy(name, reduction, chunked, backend, chunk):
    """Against torch 2.13's F.linear_cross_entropy (its reference path, and its chunked path with
    LinearCrossEntropyOptions), every option torch has, the same arguments passed to both (options
    included), in float64; plus torch's default ignore_index=None."""
    chunk(4)
    x, w, t, b, _, kw = _case(name)
    if chunked:
        kw["options"] = nn.LinearCrossEntropyOptions(batch_chunk_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "options ignored" for label smoothing
        with ran(backend):
            got = loss_and_grads(ours, x, w, t, b, reduction=reduction, **kw)
        want = loss_and_grads(torch_lce, x, w, t, b, reduction=reduction, **kw)
        check(got, want, F64, f"{name} {reduction}")
        if "ignore_index" not in kw:
            with ran(backend):
                got = loss_and_grads(ours, x, w, t, b, reduction=reduction, ignore_index=None, **kw)
            want = loss_and_grads(torch_lce, x, w, t, b, reduction=reduction, ignore_index=None, **kw)
            check(got, want, F64, f"{name} {reduction} ignore_index=None")


@needs_torch_lce
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_float32_and_bf16_match_torch_linear_cross_entropy(dtype, backend, chunk):
    """Same dtype as torch's own op, its tolerance (bf16: fastloss computes the softmax in fp32)."""
    chunk(8)
    x, w, b, t = make((20,), 16, 50, dtype, bias=True)
    with ran(backend):
        got = loss_and_grads(ours, x, w, t, b)
    want = loss_and_grads(torch_lce, *(a.float() for a in (x, w)), t, b.float())
    (loss, grads), (loss_w, grads_w) = got, want
    assert loss.dtype == dtype
    tol = {"rtol": 2e-2, "atol": 2e-3} if dtype == torch.bfloat16 else TOLERANCES[torch.float32]
    torch.testing.assert_close(loss.float(), loss_w, **tol)
    for g, gw in zip(grads, grads_w):
        torch.testing.assert_close(g.float(), gw, **tol)


# --------------------------------------------------------------------------------------------
# gradcheck / gradgradcheck (float64, both backends)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["bias", "everything"])
def test_gradcheck(name, reduction, backend, chunk):
    """Input, weight, bias and token weights all get checked gradients (5 rows in chunks of 2)."""
    chunk(2)
    x, w, t, b, tw, kw = _case(name, batch=(5,), h=3, v=6)
    tw = tw if tw is not None else token_weight(t.shape)
    inputs = [a.detach().requires_grad_() for a in (x, w, b, tw) if a is not None]

    def fn(x, w, b, tw):
        return FL.linear_cross_entropy(x, w, t, linear_bias=b, token_weight=tw, reduction=reduction, **kw)

    with ran(backend):
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradgradcheck(reduction, backend, chunk):
    """Double backward through the PyTorch reference, from either path's forward."""
    chunk(2)
    x, w, t, b, tw, kw = _case("everything", batch=(4,), h=3, v=5)
    inputs = [a.detach().requires_grad_() for a in (x, w, b)]

    def fn(x, w, b):
        return FL.linear_cross_entropy(x, w, t, linear_bias=b, token_weight=tw, reduction=reduction, **kw)

    with ran(backend):
        assert torch.autograd.gradgradcheck(fn, inputs)


# --------------------------------------------------------------------------------------------
# Chunk boundaries, shapes, empty and fully ignored inputs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 14])
def test_chunk_boundaries(n, reduction, backend, chunk):
    """N below, at, just past and well past a 4-row chunk; on the kernel path the row kernel runs
    once per chunk of the forward (and again per chunk of the recomputing backward for "none")."""
    chunk(4)
    x, w, b, t = make((n,), 8, 37, bias=True)
    before = _utils.launch_counts[FWD]
    with ran(backend):
        got = loss_and_grads(ours, x, w, t, b, reduction=reduction, label_smoothing=EPS)
    if backend == "triton":
        sweeps = 2 if reduction == "none" else 1
        assert _utils.launch_counts[FWD] - before == sweeps * math.ceil(n / 4)
    want = loss_and_grads(oracle, x, w, t, b, reduction=reduction, label_smoothing=EPS)
    check(got, want, F64, f"n={n} {reduction}")


def test_options_batch_chunk_size_sets_the_chunk(triton_backend):
    """torch's LinearCrossEntropyOptions(batch_chunk_size=k) gives chunks of k rows."""
    x, w, _, t = make((10,))
    before = _utils.launch_counts[FWD]
    FL.linear_cross_entropy(x, w, t, options=nn.LinearCrossEntropyOptions(batch_chunk_size=3)
                            if HAS_TORCH_LCE else type("O", (), {"batch_chunk_size": 3})())
    assert _utils.launch_counts[FWD] - before == 4


def test_chunk_rows_from_budget(monkeypatch):
    """Rows per chunk: the byte budget over one row's V logits and H temporaries, at least
    MIN_CHUNK_ROWS, at most N; CHUNK_ROWS forces it."""
    monkeypatch.setattr(ops, "CHUNK_BYTES", 2**20)
    assert ops.chunk_rows(10**6, 64, 1000, torch.float32, torch.device("cpu")) == 2**20 // (1128 * 4)
    assert ops.chunk_rows(10**6, 64, 10**6, torch.float32, torch.device("cpu")) == ops.MIN_CHUNK_ROWS
    assert ops.chunk_rows(7, 64, 1000, torch.float32, torch.device("cpu")) == 7
    monkeypatch.setattr(ops, "CHUNK_ROWS", 5)
    assert ops.chunk_rows(10**6, 64, 1000, torch.float32, torch.device("cpu")) == 5


@pytest.mark.parametrize("block", [3, 100])
def test_fp32_accumulation_of_16bit_products(block):
    """dW of 16-bit operands: the first chunk writes acc = a @ b, later ones add to it in fp32 (in
    place where torch allows, else ``block`` rows of acc at a time)."""
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(7, 5, generator=g).to(DEVICE, torch.bfloat16) for _ in range(3)]
    b = [torch.randn(5, 4, generator=g).to(DEVICE, torch.bfloat16) for _ in range(3)]
    acc = torch.full((7, 4), float("nan"), device=DEVICE)
    for i in range(3):
        ops._accumulate_fp32(acc, a[i], b[i], block, first=i == 0)
    expected = sum(ai.double() @ bi.double() for ai, bi in zip(a, b))
    torch.testing.assert_close(acc.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction, backend, chunk):
    """torch: "mean" over no target is NaN with zero gradients; "sum" 0; "none" zeros."""
    chunk(4)
    x, w, b, t = make((6,), bias=True)
    t = torch.full_like(t, -100)
    with ran(backend):
        got = loss_and_grads(ours, x, w, t, b, reduction=reduction, label_smoothing=EPS, z_loss=ZL)
    want = loss_and_grads(oracle, x, w, t, b, reduction=reduction, label_smoothing=EPS)
    check(got, want, F64, f"all ignored {reduction}")
    if reduction == "mean":
        assert got[0].isnan() and all((g == 0).all() for g in got[1])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input(reduction, backend):
    x, w, b, t = make((0,), bias=True)
    got = loss_and_grads(ours, x, w, t, b, reduction=reduction)
    want = loss_and_grads(oracle, x, w, t, b, reduction=reduction)
    check(got, want, F64, f"empty {reduction}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_3d_input_and_token_weights(reduction, backend, chunk):
    """(B, T, H) input, (B, T) targets and token weights; "none" gives (B, T)."""
    chunk(4)
    x, w, b, t = make((2, 7), bias=True)
    tw = token_weight(t.shape)
    with ran(backend):
        got = loss_and_grads(ours, x, w, t, b, tw, reduction=reduction, z_loss=ZL)
    want = loss_and_grads(oracle, x, w, t, b, tw, reduction=reduction, z_loss=ZL)
    assert got[0].shape == (() if reduction != "none" else (2, 7))
    check(got, want, F64, f"3-D {reduction}")


def test_unbatched_input(backend):
    """(H,) input with a 0-dim target, as torch's: a 0-dim loss for every reduction."""
    x, w, _, t = make((1,), ignore=False)
    for reduction in REDUCTIONS:
        got = loss_and_grads(ours, x[0], w, t[0], reduction=reduction)
        want = loss_and_grads(oracle, x[0], w, t[0], reduction=reduction)
        assert got[0].shape == ()
        check(got, want, F64, f"unbatched {reduction}")


def test_uint8_targets(backend):
    """Byte class indices, which torch accepts, give the int64 targets' loss and gradients."""
    x, w, _, t = make((9,), ignore=False)
    got = loss_and_grads(ours, x, w, t.to(torch.uint8), weight=class_weight(37))
    want = loss_and_grads(oracle, x, w, t, weight=class_weight(37))
    check(got, want, F64, "uint8 targets")


def test_token_weight_mean_denominator(backend):
    """"mean" with token weights = sum(tw * w_t * loss) / sum(tw * w_t) over non-ignored tokens."""
    x, w, _, t = make((9,))
    tw, cw = token_weight(t.shape), class_weight(37)
    ce = F.cross_entropy(F.linear(x, w), t, cw, reduction="none")
    valid = t != -100
    expected = (ce * tw).sum() / (tw * cw[t.clamp_min(0)] * valid).sum()
    assert_close(ours(x, w, t, weight=cw, token_weight=tw), expected, F64, "token-weighted mean")


# --------------------------------------------------------------------------------------------
# Half precision: never less accurate than torch in the same dtype
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_precision_no_less_accurate_than_torch(dtype, reduction, backend, chunk):
    """Loss and gradients against float64 torch.nn on the same rounded operands, compared with
    torch.nn's own composition run in the same dtype."""
    chunk(16)
    n, h, v = (40, 16, 64) if backend == "triton" else (96, 32, 300)
    x, w, b, t = make((n,), h, v, dtype, bias=True)
    with ran(backend):
        got = loss_and_grads(ours, x, w, t, b, reduction=reduction)
    theirs = loss_and_grads(oracle, x, w, t, b, reduction=reduction)
    exact = loss_and_grads(oracle, *(a.double() for a in (x, w)), t, b.double(), reduction=reduction)
    assert got[0].dtype == dtype
    assert_no_less_accurate(got[0], theirs[0], exact[0], f"{dtype_id(dtype)} loss")
    for i, (g, gt, ge) in enumerate(zip(got[1], theirs[1], exact[1])):
        assert_no_less_accurate(g, gt, ge, f"{dtype_id(dtype)} grad {i}")


def test_autocast_matches_torch(backend):
    """Under autocast the projection runs in the autocast dtype and the loss is float32, as torch's;
    the float32 parameters get float32 gradients."""
    x, w, b, t = make((12,), 16, 40, torch.float32, bias=True)
    x, w, b = leaves(x, w, b)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = ours(x, w, t, b, label_smoothing=EPS)
        expected = F.cross_entropy(F.linear(x, w, b), t, label_smoothing=EPS)
    assert loss.dtype == expected.dtype == torch.float32
    got = torch.autograd.grad(loss, (x, w, b))
    want = torch.autograd.grad(expected, (x, w, b))
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=1e-3)
    for g, gw in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, gw, rtol=5e-2, atol=2e-3)


# --------------------------------------------------------------------------------------------
# Memory: no N x V tensor on either path
# --------------------------------------------------------------------------------------------

class _Shapes(TorchDispatchMode):
    """Records the bytes of every tensor an aten op returns inside the block (bytes, not elements:
    Triton's interpreter moves kernel arguments as byte views), and host reads of tensor values."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.scalar_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _record_fwd_bwd(reduction, **kw):
    n, h, v = 64, 4, 40
    x, w, b, t = make((n,), h, v, torch.float32, bias=True)
    x, w, b = leaves(x, w, b)
    with _Shapes() as rec:
        loss = FL.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **kw)
        loss.sum().backward()
    return rec, n * v * 4  # bytes of float32 N x V logits


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_never_allocates_n_by_v(reduction, backend, chunk):
    """Forward and backward allocate no tensor of N x V elements: the largest is the chunk (8 x V),
    the weight (V x H) or the input (N x H). With one chunk of all N rows the same recorder does
    see an N x V tensor, so it watches the buffers that matter."""
    chunk(8)
    with ran(backend):
        rec, nv = _record_fwd_bwd(reduction, label_smoothing=EPS, softcap=CAP,
                                  token_weight=token_weight(64, torch.float32))
    assert rec.largest <= nv // 8
    chunk(64)
    rec, nv = _record_fwd_bwd(reduction)
    assert rec.largest >= nv


def test_no_host_sync_in_the_sweep(backend, chunk, monkeypatch):
    """Forward and backward read no tensor value on the host (no .item(), no branch on data) once
    the CPU-only target check (torch's IndexError) is off: the "mean" denominator stays on device."""
    chunk(8)
    monkeypatch.setattr(FL, "_check_targets_cpu", lambda *a: None)
    monkeypatch.setattr(ops_softmax, "_check_targets_cpu", lambda *a: None)
    for reduction in REDUCTIONS:
        with ran(backend):
            rec, _ = _record_fwd_bwd(reduction, token_weight=token_weight(64, torch.float32))
        assert rec.scalar_reads == 0, reduction


# --------------------------------------------------------------------------------------------
# Autograd behaviour
# --------------------------------------------------------------------------------------------

def test_forward_made_gradients_second_backward_and_no_grad(backend, chunk):
    """A reduced loss's forward-made gradients, a second backward (retain_graph) that sweeps again,
    only the gradients asked for, and no gradient work under no_grad."""
    chunk(4)
    x, w, b, t = make((9,), bias=True)
    tw = token_weight(t.shape)
    x, w, b, tw = leaves(x, w, b, tw)
    loss = ours(x, w, t, b, token_weight=tw, z_loss=ZL)
    g1 = torch.autograd.grad(loss, (x, w, b, tw), retain_graph=True)
    g2 = torch.autograd.grad(loss * 3, (x, w, b, tw))
    for a, c in zip(g1, g2):
        assert_close(c, 3 * a, F64, "second backward")
    only_w = torch.autograd.grad(ours(x.detach(), w, t, b.detach()), (w,))[0]
    assert_close(only_w, torch.autograd.grad(oracle(x.detach(), w, t, b.detach()), (w,))[0], F64, "only W")
    with torch.no_grad():
        assert_close(ours(x, w, t, b), oracle(x, w, t, b), F64, "no_grad")


def test_inputs_are_not_modified(backend, chunk):
    chunk(4)
    x, w, b, t = make((9,), bias=True)
    copies = [a.clone() for a in (x, w, b, t)]
    x, w, b = leaves(x, w, b)
    ours(x, w, t, b, softcap=CAP).backward()
    for a, c in zip((x, w, b, t), copies):
        assert torch.equal(a.detach(), c)


def test_torch_func_grad_runs_the_reference(backend):
    """torch.func transforms run the PyTorch reference (the chunked Function has no vmap rule)."""
    x, w, b, t = make((6,), bias=True)
    grad_w = torch.func.grad(lambda w: ours(x, w, t, b, z_loss=ZL))(w)
    w2 = leaves(w)[0]
    expected = torch.autograd.grad(oracle(x, w2, t, b, z_loss=ZL), (w2,))[0]
    assert_close(grad_w, expected, F64, "torch.func.grad")


# --------------------------------------------------------------------------------------------
# Validation: torch's errors
# --------------------------------------------------------------------------------------------

def _errors(case, fn):
    """The exception type ``case(fn)`` raises (None if none)."""
    try:
        case(fn)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return type(exc)
    return None


@needs_torch_lce
def test_bad_inputs_raise_torchs_errors(backend):
    x, w, b, t = make((4,), 3, 5, torch.float32, bias=True, ignore=False)
    cases = {
        "weight dtype": lambda f: f(x, w.double(), t),
        "bias dtype": lambda f: f(x, w, t, linear_bias=b.double()),
        "bias shape": lambda f: f(x, w, t, linear_bias=b[:3]),
        "in_features": lambda f: f(x, w[:, :2], t),
        "int target": lambda f: f(x, w, t.int()),
        "target batch": lambda f: f(x, w, t[:3]),
        "2-D target": lambda f: f(x, w, t[:, None]),
        "out of range": lambda f: f(x, w, t + 10),
        "class weight shape": lambda f: f(x, w, t, weight=torch.ones(4)),
        "reduction": lambda f: f(x, w, t, reduction="avg"),
        "smoothing": lambda f: f(x, w, t, label_smoothing=1.5),
        "1-D weight": lambda f: f(x, w[0], t),
        "0-D input": lambda f: f(x[0, 0], w, t[0]),
    }
    for name, case in cases.items():
        theirs = _errors(case, F.linear_cross_entropy)
        assert theirs is not None, name
        assert _errors(case, FL.linear_cross_entropy) is theirs, name
    for kw in ({"z_loss": -1.0}, {"softcap": 0.0}, {"token_weight": torch.ones(3)}):
        with pytest.raises(ValueError):
            FL.linear_cross_entropy(x, w, t, **kw)


# --------------------------------------------------------------------------------------------
# The module and torch.compile
# --------------------------------------------------------------------------------------------

@needs_torch_lce
def test_module_is_torch_drop_in(backend):
    """Subclass of torch's module: same parameters, buffers and state_dict; torch's state loads and
    gives torch's loss and gradients."""
    cw = class_weight(11, torch.float32)
    kw = {"bias": True, "weight": cw, "label_smoothing": EPS, "reduction": "sum"}
    theirs = nn.LinearCrossEntropyLoss(8, 11, ignore_index=-100, **kw)
    mine = fastloss.LinearCrossEntropyLoss(8, 11, **kw)
    assert isinstance(mine, nn.LinearCrossEntropyLoss)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    mine.load_state_dict(theirs.state_dict())
    x, _, _, t = make((6,), 8, 11, torch.float32)
    x1, x2 = leaves(x, x)
    lm, lt = mine(x1, t), theirs(x2, t)
    assert_close(lm, lt, torch.float32, "module loss")
    lm.backward()
    lt.backward()
    assert_close(x1.grad, x2.grad, torch.float32, "module input grad")
    for pm, pt in zip(mine.parameters(), theirs.parameters()):
        assert_close(pm.grad, pt.grad, torch.float32, "module parameter grad")
    assert "z_loss=0.5" in repr(fastloss.LinearCrossEntropyLoss(4, 3, z_loss=0.5))


@needs_torch_lce
def test_fallback_module_has_torchs_state():
    """The base used on torch < 2.13 has torch 2.13's constructor, parameters and state_dict keys."""
    cw = class_weight(11, torch.float32)
    for kw in ({}, {"bias": True, "weight": cw}):
        fallback = _TorchLinearCrossEntropyLoss(8, 11, **kw)
        theirs = nn.LinearCrossEntropyLoss(8, 11, **kw)
        assert fallback.state_dict().keys() == theirs.state_dict().keys()
        assert {n: p.shape for n, p in fallback.named_parameters()} == {
            n: p.shape for n, p in theirs.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("compile_backend", ["auto", "triton"])
def test_torch_compile_fullgraph(compile_backend, reduction):
    """A model ending in LinearCrossEntropyLoss compiles with fullgraph=True and matches eager,
    with ignored targets (Liger-Kernel's issue 1338: a wrong loss under compile)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 16), nn.Tanh()).to(DEVICE)
    head = fastloss.LinearCrossEntropyLoss(16, 11, bias=True, label_smoothing=EPS, z_loss=ZL,
                                           reduction=reduction).to(DEVICE)
    data = torch.randn(12, 8, device=DEVICE)
    t = torch.randint(0, 11, (12,), device=DEVICE)
    t[::3] = -100
    params = [*body.parameters(), *head.parameters()]

    def step(loss_fn):
        return loss_fn(body(data), t).sum()

    def eager(h, t):
        return oracle(h, head.linear.weight, t, head.linear.bias, reduction=reduction, label_smoothing=EPS,
                      z_loss=ZL)

    expected = step(eager)
    expected_grads = torch.autograd.grad(expected, params)
    compiled = torch.compile(lambda: step(head), fullgraph=True)
    kernels = compile_backend == "triton" or DEVICE == "cuda"
    with fastloss.use_backend(compile_backend):
        before = _utils.launch_counts[FWD]
        for _ in range(2):  # the second call reuses the compiled graph
            loss = compiled()
            grads = torch.autograd.grad(loss, params)
            assert_close(loss.detach(), expected.detach(), torch.float32, f"compiled {compile_backend}")
            for g, ge in zip(grads, expected_grads):
                assert_close(g, ge, torch.float32, f"compiled {compile_backend} parameter grad")
        assert (_utils.launch_counts[FWD] > before) == kernels
    torch._dynamo.reset()
