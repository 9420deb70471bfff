"""Per-call overhead and crossover: forward + backward time against size, fastloss vs torch.nn.

The size sweep of ``python -m fastloss bench --sweep`` (fastloss.cli.sweep) as pytest benchmarks:
one pytest-benchmark group per (loss, size), two benchmarks in it, ``fastloss`` and ``torch``
(torch.nn, or the eager composition of fastloss.baselines where torch.nn has no such loss: the
softmax focal loss, the contrastive loss, InfoNCE, a CombinedLoss). The timed step is
``.grad = None`` (untimed setup) then ``loss(*operands).backward(); torch.cuda.synchronize()``;
size is the number of elements of the first operand (shapes as the sweep's). On CUDA the fastloss
side runs with ``use_backend("triton")``, as the sweep's. Small sizes measure the per-call host work,
large ones memory traffic; ``python -m fastloss bench --sweep`` adds the host time and prints the
crossover.

Matrix: CPU sizes 2**5, 2**10, 2**15, 2**20; CUDA every third power of two from 2**8 to 2**26;
float32. Override with FASTLOSS_BENCH_OVERHEAD_SIZES (e.g. ``2**8,2**16``),
FASTLOSS_BENCH_OVERHEAD_LOSSES (names as ``python -m fastloss bench --sweep``) and
FASTLOSS_BENCH_DTYPES. ``extra_info``: the sweep's record. Timings are recorded, never asserted.
"""

from __future__ import annotations

import pytest
import torch

from fastloss.cli import cases, sweep

DEVICE = cases.bench_device()
CUDA = DEVICE.type == "cuda"
BACKEND = "triton" if CUDA else None

LOSSES = cases.env_list("FASTLOSS_BENCH_OVERHEAD_LOSSES", list(sweep.SWEEP_LOSSES), sweep.resolve_sweep_loss)
SIZES = cases.env_list("FASTLOSS_BENCH_OVERHEAD_SIZES",
                       sweep.SWEEP_SIZES["cuda"] if CUDA else [2**5, 2**10, 2**15, 2**20], cases.parse_size)
DTYPES = cases.env_list("FASTLOSS_BENCH_DTYPES", [torch.float32], cases.parse_dtype)

CASES = [(loss, n, dtype) for loss in LOSSES for n in SIZES for dtype in DTYPES]
IDS = [f"{loss}-{cases.size_label(n)}-{cases.dtype_name(dtype)}" for loss, n, dtype in CASES]

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all
# (short: most of these steps take microseconds).
TIMING = {"warmup": 3, "probes": 3, "round_time_s": 0.1, "min_rounds": 5, "max_rounds": 300}


def bench_record(loss: str, size: int, dtype: torch.dtype, impl: str) -> dict:
    return sweep.sweep_record(sweep.sweep_case(loss), impl, size, dtype, DEVICE, BACKEND)


@pytest.mark.parametrize("impl", ["fastloss", "torch"])
@pytest.mark.parametrize(("loss", "size", "dtype"), CASES, ids=IDS)
def test_overhead(run_timed, bench_skip, loss, size, dtype, impl):
    case = sweep.sweep_case(loss)
    record = bench_record(loss, size, dtype, impl)
    limit = case.max_size(DEVICE)
    if limit is not None and size > limit:
        bench_skip(f"above {cases.size_label(limit)} (B x B logits)", record)

    def make_step():
        return case.step(impl, size, dtype, DEVICE, sync=True, backend=BACKEND)

    run_timed(record, make_step, f"{loss} size={cases.size_label(size)} {cases.dtype_name(dtype)}", **TIMING)
