"""Fused linear + cross-entropy, fwd+bwd, reduction="mean": the output layer of a language model.

Implementations (one pytest-benchmark group per (N x H x V, dtype, softcap)):

- ``fastloss``: fastloss.functional.linear_cross_entropy (chunked; the row kernel on CUDA, PyTorch
  ops elsewhere);
- ``torch``: eager ``F.cross_entropy(F.linear(x, W), t)`` (softcap written as ``s tanh(z / s)``);
- ``torch.lce``: torch 2.13's ``F.linear_cross_entropy`` (options=None: its reference path);
- ``torch.lce_chunked``: the same with ``torch.nn.LinearCrossEntropyOptions()`` (its chunked path);
- ``torch.compile``: torch.compile of the eager composition;
- ``liger``: Liger-Kernel's LigerFusedLinearCrossEntropyLoss, ``cce``: Apple's Cut Cross-Entropy
  (``cut_cross_entropy.linear_cross_entropy``); CUDA only, recorded as skipped (with the reason)
  when not installed;
- ``gemms``: the three GEMMs any method must do (``x W^T``, ``G W``, ``G^T x``) and nothing else,
  on the same operands: the floor the GPU target is stated against (6 N H V flops).

torch 2.13's functions are recorded as skipped on older torch; torch has no softcap, so its
``torch.lce*`` rows are skipped for the softcap shape.

The timed step is ``torch.autograd.grad(loss, (x, W))`` (plus a synchronize on CUDA) with L2 flushed
in the untimed setup. ``extra_info``: ``flops_model`` = 6 N H V and achieved TFLOP/s, peak memory of
one step beyond what was allocated before it (CUDA: max_memory_allocated; CPU: the profiler's
allocation trace of a separate untimed call, ``peak_mem_source`` says so), first call's time.

Shapes: CUDA (N, H, V) = (8192, 4096, 128256) bf16 (Llama 3 head), (16384, 2048, 32000) bf16 and
(4096, 2304, 256000) bf16 with softcap 30 (Gemma 2); elsewhere (2048, 512, 32000) float32. Override
with FASTLOSS_BENCH_LXENT_SHAPES="2048x512x32000,512x256x8000" (NxHxV, an optional ``:softcap``
suffix) and FASTLOSS_BENCH_DTYPES; FASTLOSS_BENCH_LXENT_IMPLS limits the implementations.
``extra_info`` is the record of ``python -m fastloss bench`` (fastloss.cli.cases; ``softcap`` added),
which times the fastloss / torch / torch.compile rows interleaved without pytest (``--losses
linear_cross_entropy``). Timings are recorded, never asserted.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from fastloss import baselines
from fastloss import functional as FL
from fastloss.cli import cases
from fastloss.cli.timing import GradStep

DEVICE = cases.bench_device()
CUDA = DEVICE.type == "cuda"
# in the order they run: the floor and the fused baselines first, should a time budget cut the file short
IMPLS = ("fastloss", "gemms", "liger", "cce", "torch.lce_chunked", "torch", "torch.lce", "torch.compile")


def _parse_case(text: str) -> tuple[int, int, int, float | None]:
    shape, _, cap = text.strip().lower().partition(":")
    n, h, v = (cases.parse_size(s) for s in shape.replace("*", "x").split("x"))
    return n, h, v, float(cap) if cap else None


_CUDA_CASES = [(8192, 4096, 128256, None), (16384, 2048, 32000, None), (4096, 2304, 256000, 30.0)]
_CPU_CASES = [(2048, 512, 32000, None)]
SHAPES = cases.env_list("FASTLOSS_BENCH_LXENT_SHAPES", _CUDA_CASES if CUDA else _CPU_CASES, _parse_case)
DTYPES = cases.env_list("FASTLOSS_BENCH_DTYPES", [torch.bfloat16] if CUDA else [torch.float32],
                         cases.parse_dtype)
RUN_IMPLS = cases.env_list("FASTLOSS_BENCH_LXENT_IMPLS", IMPLS, str)

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all
# (a CPU step takes seconds: few rounds)
TIMING = ({"warmup": 2, "probes": 3, "round_time_s": 0.5, "min_rounds": 5, "max_rounds": 30} if CUDA
          else {"warmup": 1, "probes": 1, "round_time_s": 1.0, "min_rounds": 3, "max_rounds": 5})


def label(case) -> str:
    n, h, v, cap = case
    return f"{n}x{h}x{v}" + (f" softcap {cap:g}" if cap else "")


# --------------------------------------------------------------------------------------------
# Implementations: fn(x, W, t) -> loss
# --------------------------------------------------------------------------------------------

@functools.cache
def _eager(softcap):
    return functools.partial(baselines.linear_cross_entropy, softcap=softcap)


@functools.cache
def _compiled(softcap):
    return cases.compiled(_eager(softcap))


def _liger(softcap):
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - not installed, or broken against this torch/triton
        return None, f"liger_kernel not importable ({cases.error_reason(exc)})"
    loss = LigerFusedLinearCrossEntropyLoss(softcap=softcap) if softcap else LigerFusedLinearCrossEntropyLoss()
    return (lambda x, w, t: loss(w, x, t)), None


def _cce(softcap):
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:  # noqa: BLE001
        return None, f"cut_cross_entropy not importable ({cases.error_reason(exc)})"
    return (lambda x, w, t: linear_cross_entropy(x, w, t, softcap=softcap)), None


def implementation(impl: str, softcap: float | None):
    """(fn(x, W, t) -> loss, None), or (None, reason) when it cannot run here."""
    if impl == "fastloss":
        return (lambda x, w, t: FL.linear_cross_entropy(x, w, t, softcap=softcap)), None
    if impl == "torch":
        return _eager(softcap), None
    if impl == "torch.compile":
        return _compiled(softcap), None
    if impl in ("torch.lce", "torch.lce_chunked"):
        if not hasattr(F, "linear_cross_entropy"):
            return None, f"torch {torch.__version__} has no F.linear_cross_entropy (2.13+)"
        if softcap:
            return None, "torch's F.linear_cross_entropy has no softcap"
        options = torch.nn.LinearCrossEntropyOptions() if impl == "torch.lce_chunked" else None
        return (lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)), None
    if impl in ("liger", "cce"):
        if not CUDA:
            return None, f"{impl} needs CUDA"
        return _liger(softcap) if impl == "liger" else _cce(softcap)
    raise ValueError(impl)


class _Gemms:
    """The step of the ``gemms`` row: the three products on the benchmark's operands, G a fixed
    C x V gradient-like operand reused over row chunks of C (no N x V tensor, as fastloss)."""

    def __init__(self, x, w):
        self.x, self.w = x.detach(), w.detach()
        rows = min(self.x.shape[0], 2048 if CUDA else 256)
        self.g = torch.randn(rows, w.shape[0], device=x.device, dtype=x.dtype)
        self.z = torch.empty_like(self.g)
        self.gx = torch.empty_like(self.x)
        self.gw = torch.zeros_like(self.w)

    def zero_grad(self) -> None:
        pass

    def __call__(self) -> None:
        rows = self.g.shape[0]
        for r0 in range(0, self.x.shape[0], rows):
            x_c = self.x[r0:r0 + rows]
            g = self.g[:x_c.shape[0]]
            torch.mm(x_c, self.w.T, out=self.z[:x_c.shape[0]])
            torch.mm(g, self.w, out=self.gx[r0:r0 + rows])
            self.gw.addmm_(g.T, x_c)
        if CUDA:
            torch.cuda.synchronize(DEVICE)


def make_inputs(case, dtype, seed=0):
    n, h, v, _ = case
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, h, generator=g, device=DEVICE).to(dtype).requires_grad_()
    w = (torch.randn(v, h, generator=g, device=DEVICE) / h**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    return x, w, t


def make_step(impl: str, case, dtype, inputs=None):
    """The step ``autograd.grad(fn(x, W, t), (x, W))``; raises NotImplementedError (with the reason)
    when the implementation cannot run here."""
    x, w, t = inputs if inputs is not None else make_inputs(case, dtype)
    if impl == "gemms":
        return _Gemms(x, w)
    fn, reason = implementation(impl, case[3])
    if fn is None:
        raise NotImplementedError(reason)
    return GradStep(fn, (x, w, t), autograd_grad=True, sync=True)


def cpu_peak_bytes(step) -> int | None:
    """Peak bytes allocated on the CPU during one call of ``step`` beyond what was allocated before
    it, from the profiler's allocation trace (torch's CPU allocations are invisible to tracemalloc);
    None on CUDA (run_timed measures it there)."""
    if CUDA:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.remove(path)
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})]
    if not mem:
        return 0  # the step allocated nothing
    start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(m["Total Allocated"] for m in mem) - start


# --------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------

def bench_record(case, dtype: torch.dtype, impl: str) -> dict:
    rec = cases.case("linear_cross_entropy").record(impl, case[:3], dtype, DEVICE, softcap=case[3])
    if impl not in ("fastloss", "torch", "torch.compile"):
        rec["baseline"] = impl
    return rec


PARAMS = [(case, dtype, impl) for case in SHAPES for dtype in DTYPES for impl in IMPLS if impl in RUN_IMPLS]
IDS = [f"{label(c).replace(' ', '-')}-{cases.dtype_name(d)}-{i}" for c, d, i in PARAMS]


@pytest.mark.parametrize(("case", "dtype", "impl"), PARAMS, ids=IDS)
def test_linear_xent(run_timed, bench_skip, benchmark, request, case, dtype, impl):
    record = bench_record(case, dtype, impl)
    request.node.bench_record = record
    try:
        probe = make_step(impl, case, dtype)
    except NotImplementedError as exc:
        bench_skip(str(exc), record)
    cpu_peak = cpu_peak_bytes(probe)
    del probe
    run_timed(record, functools.partial(make_step, impl, case, dtype), f"linear_xent {label(case)} "
              f"{cases.dtype_name(dtype)}", **TIMING)
    if cpu_peak is not None:  # off CUDA run_timed has none: the profiler's allocation trace instead
        benchmark.extra_info.update(peak_mem_bytes=cpu_peak, peak_mem_source="torch.profiler CPU allocations")
