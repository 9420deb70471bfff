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

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all.
TIMING = {"warmup": 3, "probes": 3, "round_time_s": 0.25 if CUDA else 0.3, "min_rounds": 5, "max_rounds": 30}


@pytest.mark.parametrize("impl", _bench.IMPLS)
@pytest.mark.parametrize(("loss", "n", "dtype"), CASES, ids=IDS)
def test_pointwise(run_timed, loss, n, dtype, impl):
    case = _bench.loss_case(loss)
    info = {
        "loss": loss, "impl": impl, "n": n, "dtype": _bench.dtype_name(dtype), "device": DEVICE.type,
        "baseline": "fastloss.functional" if impl == "fastloss" else case.torch_label,
        "bytes_moved": _bench.bytes_moved(n, dtype),
    }

    def make_step():
        x, y = _bench.make_inputs(case, n, dtype, DEVICE)
        return _bench.FwdBwd(case.impl(impl), x, y, sync=True)

    run_timed(make_step, f"{loss} N={_bench.size_label(n)} {_bench.dtype_name(dtype)}", info, **TIMING)
