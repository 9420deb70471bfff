"""InfoNCE: the chunked reference and the tiled kernels (Triton's interpreter on CPU) against the
naive formula -- normalise, q @ k.T / t, cross_entropy with arange labels (both directions for the
symmetric loss) -- in float64, the kernels against the reference per dtype, and the reference's
peak memory on CPU."""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCES, assert_close, dtype_id
from helpers import assert_launched as launched
from helpers import assert_not_launched as not_launched
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastloss
from fastloss import baselines, reference
from fastloss import functional as FL
from fastloss.ops import _utils
from fastloss.ops import info_nce as info_nce_ops
from fastloss.ops.info_nce import info_nce_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REDUCTIONS = ["mean", "sum", "none"]


naive_info_nce = baselines.info_nce


def _inputs(b, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g, dtype=torch.float64)
    k = q + torch.randn(b, d, generator=g, dtype=torch.float64)  # positives correlated with queries
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k)]


def _grads(out, inputs, seed=1):
    go = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, go.to(out.device, out.dtype))


def _leaf_copies(ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def _ran(backend, *kernels):
    """The block must launch these kernels on the "triton" backend, and none on "torch"."""
    return launched(*kernels) if backend == "triton" else not_launched()


def _check_against_naive(q, k, dtype_oracle=torch.float64, **kw):
    out = FL.info_nce(q, k, **kw)
    ref = _leaf_copies((q, k), dtype_oracle)
    want = naive_info_nce(*ref, **kw)
    assert out.dtype == q.dtype and out.shape == want.shape
    assert_close(out, want.to(out.dtype), msg="loss")
    for g, w, name in zip(_grads(out, (q, k)), _grads(want, ref), ("query", "key")):
        assert_close(g, w.to(g.dtype), msg=f"d/d{name}")


# Odd sizes, one row, a batch crossing tile edges (16-row tiles in the interpreter).
SHAPES = [(1, 5), (2, 3), (33, 17), (40, 70)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2k", "symmetric"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_match_naive_float64(shape, symmetric, reduction, triton_backend):
    q, k = _inputs(*shape, torch.float64)
    with launched("info_nce_chunk_kernel"):
        _check_against_naive(q, k, temperature=0.1, reduction=reduction, symmetric=symmetric)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2k", "symmetric"])
@pytest.mark.parametrize("shape", SHAPES + [(100, 8)], ids=str)
def test_reference_matches_naive_float64(shape, symmetric, reduction, normalize, torch_backend, monkeypatch):
    # 64-element chunks: several chunks of rows (each under activation checkpointing) for B >= 9
    monkeypatch.setattr(reference, "INFO_NCE_CHUNK_ELEMENTS", 64)
    q, k = _inputs(*shape, torch.float64)
    with not_launched():
        _check_against_naive(q, k, temperature=0.07, reduction=reduction, symmetric=symmetric,
                             normalize=normalize)


def test_default_arguments_and_module(backend):
    q, k = _inputs(33, 17, torch.float64)
    want = naive_info_nce(q.detach(), k.detach())
    with _ran(backend, "info_nce_chunk_kernel"):
        assert_close(FL.info_nce(q, k), want)
    module = fastloss.InfoNCELoss()
    assert (module.temperature, module.reduction, module.symmetric, module.normalize, module.gather) == (
        0.07, "mean", False, True, False)
    with _ran(backend, "info_nce_chunk_kernel"):
        assert_close(module(q, k), want)
    sym = fastloss.InfoNCELoss(temperature=0.2, reduction="none", symmetric=True, normalize=False)
    with _ran(backend, "info_nce_fwd_kernel"):
        assert_close(sym(q, k), naive_info_nce(q.detach(), k.detach(), 0.2, "none", True, False))


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2k", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_kernels_match_reference_per_dtype(dtype, symmetric, triton_backend):
    q, k = _inputs(37, 48, dtype)
    with launched("info_nce_chunk_kernel"):
        out = FL.info_nce(q, k, symmetric=symmetric)
    with fastloss.use_backend("torch"), not_launched():
        ref = _leaf_copies((q, k))
        want = FL.info_nce(*ref, symmetric=symmetric)
    assert_close(out, want, msg="loss")
    # float32: the forward-made gradients are scaled in place; half: they are float32, scaled and
    # rounded once by torch
    with launched("scale_grad_kernel") if dtype == torch.float32 else contextlib.nullcontext():
        grads = _grads(out, (q, k))
    for g, w in zip(grads, _grads(want, ref)):
        if q.is_cuda and dtype in (torch.bfloat16, torch.float16):
            # On CUDA the kernels also round the softmax - delta tile to the dtype (the operand of
            # the tensor-core product), as torch's own half-precision backward does with its logits
            # gradient: allow a few ulps of the largest gradient. Elsewhere the tile stays float32.
            tol = TOLERANCES[dtype]
            atol = tol["atol"] + 4 * torch.finfo(dtype).eps * w.abs().max().item()
            torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=atol)
        else:
            assert_close(g, w, msg="grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_precision_no_less_accurate_than_naive_torch(dtype, triton_backend):
    """Against float64 on the same rounded inputs, the kernels' loss and gradients are at least as
    accurate as the naive formula evaluated by torch in the same dtype."""
    q, k = _inputs(48, 32, dtype)
    with launched("info_nce_chunk_kernel"):
        out = FL.info_nce(q, k)
    grads = torch.autograd.grad(out, (q, k))
    exact_in = _leaf_copies((q, k), torch.float64)
    exact = naive_info_nce(*exact_in)
    exact_grads = torch.autograd.grad(exact, exact_in)
    torch_in = _leaf_copies((q, k))
    naive = naive_info_nce(*torch_in)
    naive_grads = torch.autograd.grad(naive, torch_in)
    eps = torch.finfo(dtype).eps
    for ours, theirs, ex, name in [(out, naive, exact, "loss")] + [
            (g, n, e, f"grad {i}") for i, (g, n, e) in enumerate(zip(grads, naive_grads, exact_grads))]:
        err_ours = (ours.double() - ex).abs().max().item()
        err_torch = (theirs.double() - ex).abs().max().item()
        assert err_ours <= err_torch + eps * ex.abs().max().item(), (name, err_ours, err_torch)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the G tile is rounded for tensor cores")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_gradients_with_grad_output_are_rounded_once(dtype, reduction, triton_backend):
    """A scaled loss (grad_output 0.3): the forward-made gradients are scaled before their one
    rounding, so nearly every element is the correctly rounded float64 gradient (rounding twice,
    once in the forward and once after scaling, misses a large share of them)."""
    g = torch.Generator().manual_seed(0)
    # independent rows: well-conditioned scores, so that float32 arithmetic is far finer than a
    # half-precision ulp of the gradient
    q, k = (torch.randn(24, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
    go = torch.tensor(0.3, dtype=dtype)  # the loss has the operands' dtype
    with launched("info_nce_chunk_kernel"):
        out = FL.info_nce(q, k, reduction=reduction, normalize=False)  # (normalising rounds too)
    grads = torch.autograd.grad(out, (q, k), go)
    exact_in = _leaf_copies((q, k), torch.float64)
    exact_grads = torch.autograd.grad(naive_info_nce(*exact_in, reduction=reduction, normalize=False),
                                      exact_in, go.double())
    for i, (g, e) in enumerate(zip(grads, exact_grads)):
        rounded = e.to(dtype)
        share = (g != rounded).double().mean().item()
        assert share <= 0.02, f"grad {i}: {share:.1%} of the elements are not the correctly rounded value"
        ulp = torch.finfo(dtype).eps * e.abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((g.double() - e).abs() <= ulp).all(), f"grad {i}: an element is off by more than 1 ulp"


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2k", "symmetric"])
def test_tensor_temperature_gets_a_gradient(symmetric, backend):
    q, k = _inputs(9, 6, torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    with _ran(backend, "info_nce_chunk_kernel"):
        out = FL.info_nce(q, k, t, symmetric=symmetric)
    ref = _leaf_copies((q, k, t))
    want = naive_info_nce(ref[0], ref[1], ref[2], symmetric=symmetric)
    assert_close(out, want)
    for g, w in zip(torch.autograd.grad(out, (q, k, t)), torch.autograd.grad(want, ref)):
        assert_close(g, w)


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2k", "symmetric"])
def test_gradcheck(symmetric, backend):
    q, k = _inputs(5, 4, torch.float64)
    with _ran(backend, "info_nce_fwd_kernel", "info_nce_chunk_kernel"):
        assert torch.autograd.gradcheck(
            lambda a, b: FL.info_nce(a, b, 0.5, "none", symmetric), (q, k))


def test_offset_rows_against_all_keys(triton_backend):
    """The building block of gather=True: rows of q scored against a larger key set whose row
    i + offset is the positive of row i."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(21, 9, generator=g, dtype=torch.float64, requires_grad=True)
    with launched("info_nce_fwd_kernel"):
        rows = info_nce_loss(q, keys, 2.0, offset=14, reduction="none")
    q2, k2 = _leaf_copies((q, keys))
    want = F.cross_entropy(2.0 * q2 @ k2.T, torch.arange(14, 21), reduction="none")
    assert_close(rows, want)
    for a, b in zip(_grads(rows, (q, keys)), _grads(want, (q2, k2))):
        assert_close(a, b)
    assert_close(reference.info_nce_rows(q2, k2, 2.0, 14), want)


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2k", "symmetric"])
def test_forward_made_gradients_second_backward_and_no_grad(symmetric, triton_backend):
    """A reduced loss computes its gradients in the forward (backward scales them by grad_output);
    a second backward (retain_graph) recomputes them; under no_grad only the tiled forward runs."""
    q, k = _inputs(21, 10, torch.float64)
    with launched("info_nce_chunk_kernel"):
        out = FL.info_nce(q, k, 0.2, symmetric=symmetric)
    with launched("scale_grad_kernel"):
        g1 = torch.autograd.grad(2.5 * out, (q, k), retain_graph=True)
    with launched("info_nce_chunk_kernel"):
        g2 = torch.autograd.grad(out, (q, k))
    ref = _leaf_copies((q, k))
    want = torch.autograd.grad(naive_info_nce(*ref, 0.2, symmetric=symmetric), ref)
    for a, b, w in zip(g1, g2, want):
        assert_close(a, 2.5 * w, msg="first backward, grad_output 2.5")
        assert_close(b, w, msg="second backward")
    before = collections.Counter(_utils.launch_counts)
    with torch.no_grad():
        assert_close(FL.info_nce(q, k, 0.2, symmetric=symmetric), naive_info_nce(q, k, 0.2, symmetric=symmetric))
    assert _utils.launch_counts["info_nce_fwd_kernel"] > before["info_nce_fwd_kernel"]
    assert _utils.launch_counts["info_nce_chunk_kernel"] == before["info_nce_chunk_kernel"]


def test_bad_inputs(backend):
    q, k = _inputs(4, 3, torch.float32)
    with pytest.raises(ValueError, match="same batch size"):
        FL.info_nce(q, k[:3])
    with pytest.raises(ValueError, match="same feature size"):
        FL.info_nce(q, k[:, :2])
    with pytest.raises(ValueError, match="2-D"):
        FL.info_nce(q[0], k[0])
    with pytest.raises(ValueError, match="2-D"):
        FL.info_nce(q.reshape(2, 2, 3), k.reshape(2, 2, 3))
    for t in (0.0, -0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            FL.info_nce(q, k, t)
        with pytest.raises(ValueError, match="temperature"):
            fastloss.InfoNCELoss(temperature=t)
    with pytest.raises(ValueError, match="temperature"):
        FL.info_nce(q, k, torch.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        FL.info_nce(q, k, reduction="batchmean")
    with pytest.raises(ValueError, match="reduction"):
        fastloss.InfoNCELoss(reduction="batchmean")
    with pytest.raises(TypeError, match="floating"):
        FL.info_nce(q.long(), k.long())
    with pytest.raises(TypeError):
        FL.info_nce(q, k.tolist())
    with pytest.raises(RuntimeError, match="torch.distributed"):
        FL.info_nce(q, k, gather=True)


def test_empty_batch_and_nan(backend):
    q, k = _inputs(0, 3, torch.float32)
    assert torch.isnan(FL.info_nce(q, k))
    assert FL.info_nce(q, k, reduction="none").shape == (0,)
    q, k = _inputs(5, 3, torch.float32)
    with torch.no_grad():
        q[1, 0] = float("nan")
    with _ran(backend, "info_nce_fwd_kernel"):
        out = FL.info_nce(q, k, reduction="none")
    assert torch.isnan(out[1])


def test_inputs_are_not_modified(triton_backend):
    q, k = _inputs(6, 5, torch.float32)
    before = [q.detach().clone(), k.detach().clone()]
    with launched("info_nce_chunk_kernel", "scale_grad_kernel"):
        FL.info_nce(q, k, symmetric=True).backward()
    assert torch.equal(q.detach(), before[0]) and torch.equal(k.detach(), before[1])


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an aten op returns inside the block."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _largest_tensor_of_fwd_bwd(b, symmetric, reduction):
    q, k = _inputs(b, 4, torch.float32)
    with _LargestTensor() as rec:
        FL.info_nce(q, k, symmetric=symmetric, reduction=reduction).sum().backward()
    return rec.numel


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["q2k", "symmetric"])
def test_kernel_path_never_holds_the_b_by_b_scores(symmetric, reduction, triton_backend, monkeypatch):
    """Forward and backward on the kernels allocate nothing of B x B elements: the largest tensor is
    O(B * D) or the capped chunk of scores (CHUNK_ELEMENTS). With an uncapped chunk the same
    recorder does see a B x B block, so it watches the buffers that matter."""
    b = 64
    monkeypatch.setattr(info_nce_ops, "CHUNK_ELEMENTS", 256)
    with launched("info_nce_chunk_kernel"):
        assert _largest_tensor_of_fwd_bwd(b, symmetric, reduction) < b * b // 2
    monkeypatch.setattr(info_nce_ops, "CHUNK_ELEMENTS", b * b)
    assert _largest_tensor_of_fwd_bwd(b, symmetric, reduction) >= b * b


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch, torch.nn.functional as F
    from fastloss import reference

    def rss():  # resident bytes now
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    def peak():  # resident bytes at the peak of this program so far
        # VmHWM belongs to the address space exec made; ru_maxrss would also count the forked copy
        # of the parent before exec (the whole pytest process, when the suite runs)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc/self/status")

    def naive(q, k):
        qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return F.cross_entropy(qn @ kn.T / 0.07, torch.arange(q.shape[0]))

    loss = {"reference": lambda q, k: reference.info_nce(q, k, 0.07), "naive": naive}[sys.argv[1]]
    B, D = int(sys.argv[2]), 256
    torch.manual_seed(0)
    q, k = torch.randn(64, D, requires_grad=True), torch.randn(64, D, requires_grad=True)
    loss(q, k).backward()  # warm-up: libraries and kernels loaded before measuring
    q, k = torch.randn(B, D, requires_grad=True), torch.randn(B, D, requires_grad=True)
    base = rss()
    loss(q, k).backward()
    print(peak() - base)
""")

MEMORY_BATCH = 8192


def _peak_rss_of(which: str, batch: int) -> int:
    """Peak resident bytes of one fwd+bwd of ``which`` at (batch, 256) float32, above what was
    resident before it, measured in a fresh process: torch's CPU allocations are invisible to
    tracemalloc, and ru_maxrss is a high-water mark over the process's whole life.

    glibc raises its mmap threshold after the first large free, after which freed 16 MiB chunks stay
    resident (RSS then grows with every chunk even under no_grad); a fixed threshold keeps every
    tensor over 1 MiB mmap'd and returned on free, so RSS follows live memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    env["OMP_NUM_THREADS"] = "1"  # one allocation arena
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, which, str(batch)],
                            capture_output=True, text=True, env=env, timeout=300, check=True)
    return int(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_reference_memory_is_chunked():
    """Peak resident memory of reference.info_nce fwd+bwd at B=8192, D=256 on CPU: at most a quarter
    of the naive formula's, which must hold the float32 B x B logits and their gradient (512 MiB)
    (measured: about 126 MiB against 793 MiB).
    Each is measured in its own process, so neither peak includes the other's."""
    b = MEMORY_BATCH
    naive = _peak_rss_of("naive", b)
    chunked = _peak_rss_of("reference", b)
    assert naive >= 2 * b * b * 4, f"the naive formula's peak ({naive / 2**20:.0f} MiB) was not measured"
    assert chunked <= naive / 4, f"reference peak {chunked / 2**20:.0f} MiB vs naive {naive / 2**20:.0f} MiB"
