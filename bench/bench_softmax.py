"""Cross-entropy and softmax focal loss, fwd+bwd, reduction="mean".

Cross-entropy: fastloss (and fastloss with ``inplace_backward=True``) vs torch.nn.functional eager
vs torch.compile of it vs Liger-Kernel's LigerCrossEntropyLoss (when ``liger_kernel`` imports;
recorded as skipped otherwise). Focal: fastloss.functional.focal_loss vs the classic composition
(``ce = cross_entropy(x, t, reduction="none"); (alpha (1 - exp(-ce))**gamma ce).mean()``) eager
and under torch.compile.

One pytest-benchmark group per (loss, N x V, dtype). The timed step is
``torch.autograd.grad(loss_fn(x, t), x); torch.cuda.synchronize()`` with the L2 flushed in the
untimed setup: ``autograd.grad`` hands the gradient back as is, so implementations that write it
into the logits' memory (Liger, ``inplace_backward``) are not charged for the copy that
``x.grad`` of a leaf would make.

``extra_info``: bytes under the pass model of DESIGN.md (a row that fits on chip: read logits +
write grad = 2 N V itemsize; longer rows: 3 N V itemsize), GB/s from the median, the copy
bandwidth measured in this run and the share of it, peak memory of one step beyond the inputs
(CUDA), and the first call's time (compiles).

Matrix: CUDA (N, V) = (8192, 32000), (8192, 128256), (4096, 256000) for cross-entropy and
(65536, 1000), (8192, 32000) for focal, in bfloat16 and float32; elsewhere small shapes in
float32. Override with FASTLOSS_BENCH_SHAPES="8192x32000,4096x256000", FASTLOSS_BENCH_DTYPES,
FASTLOSS_BENCH_LOSSES="cross_entropy,focal". ``python bench/bench_softmax.py`` prints the same
measurements as a table without pytest. Timings are recorded, never asserted.
"""

from __future__ import annotations

import functools
import statistics
import sys

import pytest
import torch
import torch.nn.functional as F

from fastloss import _bench
from fastloss import functional as FL
from fastloss.ops import softmax as ops_softmax

DEVICE = _bench.bench_device()
CUDA = DEVICE.type == "cuda"

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
CE_IMPLS = ("fastloss", "fastloss_inplace", "torch", "torch.compile", "liger")
FOCAL_IMPLS = ("fastloss", "torch", "torch.compile")


def _parse_shape(text: str) -> tuple[int, int]:
    n, v = text.lower().replace("*", "x").split("x")
    return _bench.parse_size(n), _bench.parse_size(v)


_CE_SHAPES = [(8192, 32000), (8192, 128256), (4096, 256000)] if CUDA else [(256, 1000), (64, 40000)]
_FOCAL_SHAPES = [(65536, 1000), (8192, 32000)] if CUDA else [(1024, 100)]
_SHAPES = _bench.env_list("FASTLOSS_BENCH_SHAPES", [], _parse_shape)
LOSSES = _bench.env_list("FASTLOSS_BENCH_LOSSES", ["cross_entropy", "focal"], str)
DTYPES = _bench.env_list("FASTLOSS_BENCH_DTYPES", [torch.bfloat16, torch.float32] if CUDA
                         else [torch.float32], _bench.parse_dtype)

CASES = [
    (loss, shape, dtype)
    for loss in LOSSES
    for shape in (_SHAPES or (_CE_SHAPES if loss == "cross_entropy" else _FOCAL_SHAPES))
    for dtype in DTYPES
]

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all.
TIMING = {"warmup": 3, "probes": 3, "round_time_s": 0.3 if CUDA else 0.5, "min_rounds": 5, "max_rounds": 30}


def _label(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def bytes_moved(shape: tuple[int, int], dtype: torch.dtype) -> int:
    """Fewest bytes of a fused fwd+bwd: 2 passes over the logits when a row fits on chip (read
    logits, write grad), 3 otherwise (log-sum-exp pass, then read + write); targets included."""
    n, v = shape
    passes = 2 if v <= ops_softmax.MAX_FUSED_COLS else 3   # "fits on chip", whatever the kernel does
    return passes * n * v * torch.empty((), dtype=dtype).element_size() + 8 * n


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------

def _fl_ce(x, t):
    return FL.cross_entropy(x, t)


class _ModelOutput(torch.autograd.Function):
    """Identity whose output is the input's memory as a non-leaf tensor, as a model's logits are:
    inplace_backward never overwrites a leaf that requires grad."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _fl_ce_inplace(x, t):
    return FL.cross_entropy(_ModelOutput.apply(x), t, inplace_backward=True)


def _torch_ce(x, t):
    return F.cross_entropy(x, t)


def _fl_focal(x, t):
    return FL.focal_loss(x, t, FOCAL_ALPHA, FOCAL_GAMMA)


def _classic_focal(x, t):
    ce = F.cross_entropy(x, t, reduction="none")
    pt = torch.exp(-ce)
    return (FOCAL_ALPHA * (1 - pt) ** FOCAL_GAMMA * ce).mean()


@functools.cache
def _liger_ce():
    """Liger-Kernel's cross-entropy module, or the reason it cannot run."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss(reduction="mean"), None
    except Exception as exc:  # noqa: BLE001 - not installed, or broken against this torch/triton
        reason = f"liger_kernel not importable ({_bench.error_reason(exc)})"
    try:  # the autograd.Function alone, should the transformers-side module fail to import
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except Exception:  # noqa: BLE001
        return None, reason
    return (lambda x, t: LigerCrossEntropyFunction.apply(x, t, None)[0]), None


def implementation(loss: str, impl: str):
    """(fn(x, t) -> loss, None), or (None, reason) when it cannot run here."""
    if loss == "focal":
        fns = {"fastloss": _fl_focal, "torch": _classic_focal}
        if impl == "torch.compile":
            return _bench.compiled(_classic_focal), None
        return fns[impl], None
    if impl == "liger":
        if not CUDA:
            return None, "Liger-Kernel needs CUDA"
        return _liger_ce()
    if impl == "torch.compile":
        return _bench.compiled(_torch_ce), None
    return {"fastloss": _fl_ce, "fastloss_inplace": _fl_ce_inplace, "torch": _torch_ce}[impl], None


def make_inputs(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0):
    n, v = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, v, generator=g, device=DEVICE).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g, device=DEVICE)
    return x, t


def make_step(loss: str, impl: str, shape, dtype, inputs=None) -> _bench.GradStep:
    """The step ``autograd.grad(fn(x, t), x)``; raises NotImplementedError when the implementation
    cannot run here (Liger off CUDA or not importable)."""
    fn, reason = implementation(loss, impl)
    if fn is None:
        raise NotImplementedError(reason)
    x, t = inputs if inputs is not None else make_inputs(shape, dtype)
    if impl in ("fastloss_inplace", "liger"):
        x = x.detach().clone().requires_grad_()  # they overwrite the logits; keep the shared ones
    return _bench.GradStep(fn, (x, t), autograd_grad=True, sync=True)


# --------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------

PARAMS = [(loss, shape, dtype, impl) for loss, shape, dtype in CASES
          for impl in (CE_IMPLS if loss == "cross_entropy" else FOCAL_IMPLS)]
IDS = [f"{loss}-{_label(shape)}-{_bench.dtype_name(dtype)}-{impl}" for loss, shape, dtype, impl in PARAMS]


@pytest.mark.parametrize(("loss", "shape", "dtype", "impl"), PARAMS, ids=IDS)
def test_softmax(run_timed, loss, shape, dtype, impl):
    info = {"loss": loss, "impl": impl, "n": shape[0], "v": shape[1], "dtype": _bench.dtype_name(dtype),
            "device": DEVICE.type, "bytes_moved": bytes_moved(shape, dtype)}
    run_timed(functools.partial(make_step, loss, impl, shape, dtype),
              f"{loss} {_label(shape)} {_bench.dtype_name(dtype)}", info, **TIMING)


# --------------------------------------------------------------------------------------------
# python bench/bench_softmax.py: the same measurements as one table
# --------------------------------------------------------------------------------------------

def main() -> int:
    repeat = 20 if CUDA else 5
    copy = _bench.copy_bandwidth(DEVICE)
    print(f"device: {torch.cuda.get_device_name(DEVICE) if CUDA else 'cpu'}; "
          f"torch {torch.__version__}; copy {copy / 1e9:.0f} GB/s; timer: "
          f"{'cuda events, L2 flushed' if CUDA else 'perf_counter'}, median of {repeat}\n")
    print("| loss | N x V | dtype | impl | ms | vs fastloss | GB/s | % copy | peak MiB | first s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for loss, shape, dtype in CASES:
        impls = CE_IMPLS if loss == "cross_entropy" else FOCAL_IMPLS
        inputs = make_inputs(shape, dtype)
        base = None
        for impl in impls:
            try:
                step = make_step(loss, impl, shape, dtype, inputs)
                first = _bench.first_call_s(step, DEVICE)  # compiles (torch.compile graphs, Triton kernels)
                peak = _bench.peak_memory(step, DEVICE)
                med = statistics.median(_bench.time_step(step, DEVICE, repeat=repeat,
                                                         warmup=TIMING["warmup"]))
            except Exception as exc:  # noqa: BLE001 - recorded, go on
                print(f"| {loss} | {_label(shape)} | {_bench.dtype_name(dtype)} | {impl} | skipped: "
                      f"{_bench.error_reason(exc)[:80]} | | | | | |")
                step = None
                if CUDA:
                    torch.cuda.empty_cache()
                continue
            base = med if impl == "fastloss" else base
            gbps = bytes_moved(shape, dtype) / med / 1e9
            ratio = f"{med / base:.2f}x" if base else ""
            mib = f"{peak / 2**20:.0f}" if peak is not None else "-"
            print(f"| {loss} | {_label(shape)} | {_bench.dtype_name(dtype)} | {impl} | {med * 1e3:.3f} | "
                  f"{ratio} | {gbps:.0f} | {100 * gbps * 1e9 / copy:.0f} | {mib} | {first:.1f} |", flush=True)
            del step
            if CUDA:
                torch.cuda.empty_cache()
        del inputs
    return 0


if __name__ == "__main__":
    sys.exit(main())
