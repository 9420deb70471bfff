"""Per-call overhead and crossover: forward + backward time against size, fastloss vs torch.nn.

The size sweep of ``python -m fastloss bench --sweep`` as pytest benchmarks: one pytest-benchmark
group per (loss, size), two benchmarks in it, ``fastloss`` and ``torch`` (torch.nn, or the naive
composition where torch.nn has no such loss: the softmax focal loss, the contrastive loss, a
CombinedLoss). The timed step is ``.grad = None`` (untimed setup) then
``loss(*operands).backward(); torch.cuda.synchronize()``; size is the number of elements of each
operand (cross_entropy and focal_loss: ``size // 8`` rows of 8 classes; contrastive: ``size // 16``
pairs of width 16). Small sizes measure the per-call host work, large ones memory traffic: the
crossover is where fastloss's kernels start to beat torch.nn's end to end.

Matrix: CPU sizes 2**5, 2**10, 2**15, 2**20; CUDA every third power of two from 2**8 to 2**26;
float32. Override with FASTLOSS_BENCH_OVERHEAD_SIZES (e.g. ``2**8,2**16``),
FASTLOSS_BENCH_OVERHEAD_LOSSES (names as ``python -m fastloss bench --sweep``) and
FASTLOSS_BENCH_DTYPES. ``extra_info``: loss, impl, size, shape, dtype, device, baseline, and the
shared fields of bench/conftest.py's ``run_timed`` (first call, peak memory, device median on CUDA).
Timings are recorded, never asserted; ``python -m fastloss bench --sweep`` prints the ratios with
their spread and draws the curves.
"""

from __future__ import annotations

import pytest
import torch

from fastloss import _bench

DEVICE = _bench.bench_device()
CUDA = DEVICE.type == "cuda"

LOSSES = _bench.env_list("FASTLOSS_BENCH_OVERHEAD_LOSSES", list(_bench.SWEEP_LOSSES), _bench.resolve_sweep_loss)
SIZES = _bench.env_list("FASTLOSS_BENCH_OVERHEAD_SIZES",
                        _bench.SWEEP_SIZES["cuda"] if CUDA else [2**5, 2**10, 2**15, 2**20], _bench.parse_size)
DTYPES = _bench.env_list("FASTLOSS_BENCH_DTYPES", [torch.float32], _bench.parse_dtype)

CASES = [(loss, n, dtype) for loss in LOSSES for n in SIZES for dtype in DTYPES]
IDS = [f"{loss}-{_bench.size_label(n)}-{_bench.dtype_name(dtype)}" for loss, n, dtype in CASES]

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all
# (short: most of these steps take microseconds).
TIMING = {"warmup": 3, "probes": 3, "round_time_s": 0.1, "min_rounds": 5, "max_rounds": 300}


@pytest.mark.parametrize("impl", ["fastloss", "torch"])
@pytest.mark.parametrize(("loss", "size", "dtype"), CASES, ids=IDS)
def test_overhead(run_timed, loss, size, dtype, impl):
    case = _bench.sweep_case(loss)
    info = {
        "loss": loss, "family": "sweep", "impl": impl, "size": size, "shape": list(case.shape(size)),
        "dtype": _bench.dtype_name(dtype), "device": DEVICE.type,
        "baseline": "fastloss" if impl == "fastloss" else case.torch_label,
    }

    def make_step():
        return case.step(impl, size, dtype, DEVICE, sync=True)

    run_timed(make_step, f"{loss} size={_bench.size_label(size)} {_bench.dtype_name(dtype)}", info, **TIMING)
