"""Pointwise losses, fwd+bwd, reduction="mean": fastloss vs torch.nn eager vs torch.compile.

One pytest-benchmark group per (loss, N, dtype). The timed step is ``x.grad`` already None (set in
the untimed setup, with the L2 flushed on CUDA); ``loss = f(x, y); loss.backward();
torch.cuda.synchronize()``. The losses, their baselines and operands are fastloss.specs's
(through fastloss.cli.cases); ``extra_info`` is the record of ``python -m fastloss bench``
(bench/conftest.py ``run_timed``).

Matrix: CUDA N = 2**20, 2**24, 2**26 in float32 and bfloat16; elsewhere N = 2**16 in float32
(fastloss then runs its PyTorch path). Override with FASTLOSS_BENCH_SIZES / _DTYPES / _LOSSES.
Timings are recorded, never asserted.
"""

from __future__ import annotations

import pytest
import torch

from fastloss import specs
from fastloss.cli import cases
from fastloss.cli.timing import GradStep

DEVICE = cases.bench_device()
CUDA = DEVICE.type == "cuda"

# The headline case first, so that a time budget (FASTLOSS_BENCH_BUDGET_S) cuts the rest;
# then every other pointwise loss of fastloss.specs (a new spec is benchmarked at the end).
_FIRST = ["sigmoid_focal", "mse", "bce_with_logits", "huber", "smooth_l1", "l1"]
_ORDER = _FIRST + [s.name for s in specs.by_family("pointwise") if s.name not in _FIRST]
LOSSES = cases.env_list("FASTLOSS_BENCH_LOSSES", _ORDER, specs.resolve_name)
SIZES = cases.env_list("FASTLOSS_BENCH_SIZES", [2**20, 2**24, 2**26] if CUDA else [2**16], cases.parse_size)
DTYPES = cases.env_list("FASTLOSS_BENCH_DTYPES", [torch.float32, torch.bfloat16] if CUDA
                        else [torch.float32], cases.parse_dtype)

CASES = [(loss, n, dtype) for loss in LOSSES for n in SIZES for dtype in DTYPES]
IDS = [f"{loss}-{cases.size_label(n)}-{cases.dtype_name(dtype)}" for loss, n, dtype in CASES]

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all.
TIMING = {"warmup": 3, "probes": 3, "round_time_s": 0.25 if CUDA else 0.3, "min_rounds": 5, "max_rounds": 30}


def bench_record(loss: str, n: int, dtype: torch.dtype, impl: str) -> dict:
    return cases.case(loss).record(impl, (n,), dtype, DEVICE)


@pytest.mark.parametrize("impl", cases.IMPLS)
@pytest.mark.parametrize(("loss", "n", "dtype"), CASES, ids=IDS)
def test_pointwise(run_timed, loss, n, dtype, impl):
    case = cases.case(loss)

    def make_step():
        return GradStep(case.impl(impl, DEVICE), case.make_inputs((n,), dtype, DEVICE), sync=True)

    run_timed(bench_record(loss, n, dtype, impl), make_step,
              f"{loss} N={cases.size_label(n)} {cases.dtype_name(dtype)}", **TIMING)
