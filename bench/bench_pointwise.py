"""Pointwise losses, fwd+bwd, reduction="mean": fastloss vs torch.nn eager vs torch.compile.

One pytest-benchmark group per (loss, N, dtype). The timed step is
``x.grad`` already None (set in the untimed setup, with the L2 flushed on CUDA);
``loss = f(x, y); loss.backward(); torch.cuda.synchronize()``.

``extra_info`` of each benchmark: bytes moved under the 3-pass model (3 * N * itemsize), achieved
GB/s from the median, the device-to-device copy bandwidth measured in this run and the achieved
share of it, peak memory of one step on CUDA (None elsewhere) and the first call's time (compile).

Matrix: CUDA N = 2**20, 2**24, 2**26 in float32 and bfloat16; elsewhere N = 2**16 in float32
(fastloss then runs its PyTorch reference). Override with FASTLOSS_BENCH_SIZES / _DTYPES / _LOSSES.
Timings are recorded, never asserted.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from fastloss import _bench

DEVICE = _bench.bench_device()
CUDA = DEVICE.type == "cuda"

# The headline case first, so that a time budget (FASTLOSS_BENCH_BUDGET_S) cuts the rest.
_ORDER = ["sigmoid_focal", "mse", "bce_with_logits", "huber", "smooth_l1", "l1"]
LOSSES = _bench.env_list("FASTLOSS_BENCH_LOSSES", _ORDER, _bench.canonical_loss)
SIZES = _bench.env_list("FASTLOSS_BENCH_SIZES", [2**20, 2**24, 2**26] if CUDA else [2**16],
                        _bench.parse_size)
DTYPES = _bench.env_list("FASTLOSS_BENCH_DTYPES", [torch.float32, torch.bfloat16] if CUDA
                         else [torch.float32], _bench.parse_dtype)

CASES = [(loss, n, dtype) for loss in LOSSES for n in SIZES for dtype in DTYPES]
IDS = [f"{loss}-{_bench.size_label(n)}-{_bench.dtype_name(dtype)}" for loss, n, dtype in CASES]

WARMUP = 3
ROUND_TIME_S = 0.25 if CUDA else 0.3   # timed rounds per benchmark: about this long in total
MIN_ROUNDS, MAX_ROUNDS = 5, 30


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("impl", _bench.IMPLS)
@pytest.mark.parametrize(("loss", "n", "dtype"), CASES, ids=IDS)
def test_pointwise(benchmark, bench_state, bench_skip, loss, n, dtype, impl):
    case = _bench.loss_case(loss)
    benchmark.group = f"{loss} N={_bench.size_label(n)} {_bench.dtype_name(dtype)}"
    info = {
        "loss": loss, "impl": impl, "n": n, "dtype": _bench.dtype_name(dtype), "device": DEVICE.type,
        "baseline": "fastloss.functional" if impl == "fastloss" else case.torch_label,
        "bytes_moved": _bench.bytes_moved(n, dtype),
    }
    benchmark.extra_info.update(info)

    try:
        if bench_state["copy_gbps"] is None:
            bench_state["copy_gbps"] = _bench.copy_bandwidth(DEVICE) / 1e9
        x, y = _bench.make_inputs(case, n, dtype, DEVICE)
        step = _bench.FwdBwd(case.impl(impl), x, y, sync=True)
        t0 = time.perf_counter()
        step()  # compiles (torch.compile graphs, Triton kernels)
        first_call_s = time.perf_counter() - t0
        for _ in range(WARMUP):
            step()
        probe = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            probe.append(time.perf_counter() - t0)
        peak = _bench.peak_memory(step, DEVICE)
    except Exception as exc:  # noqa: BLE001 - OOM, compile failure: recorded as skipped, go on
        if CUDA:
            torch.cuda.empty_cache()
        bench_skip(f"{impl} failed: {_bench.error_reason(exc)}")

    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROUND_TIME_S / max(statistics.median(probe), 1e-9))))

    def setup():
        step.zero_grad()
        _bench.flush_l2(DEVICE)
        _sync()

    try:
        benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    except Exception as exc:  # noqa: BLE001 - as above, while timed
        if CUDA:
            torch.cuda.empty_cache()
        bench_skip(f"{impl} failed while timed: {_bench.error_reason(exc)}")
    step.zero_grad()

    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    median = stats.stats.median if stats is not None else None
    copy_gbps = bench_state["copy_gbps"]
    gbps = info["bytes_moved"] / median / 1e9 if median else None
    benchmark.extra_info.update(
        peak_mem_bytes=peak,
        first_call_s=first_call_s,
        gbps=gbps,
        copy_gbps=copy_gbps,
        copy_share=gbps / copy_gbps if gbps and copy_gbps else None,
    )
