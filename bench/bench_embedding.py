"""Embedding losses, fwd+bwd: fastloss vs torch eager vs torch.compile.

- InfoNCE (reduction="mean", temperature 0.07, normalize=True), queries and keys (B, D) requiring
  grad: fastloss.functional.info_nce against the naive formula of fastloss.baselines.info_nce
  (``F.normalize``, ``q @ k.T / t``, ``F.cross_entropy(logits, arange(B))``; eager and
  torch.compile). CUDA: B = 4096, 16384, 65536, D = 512, bfloat16 and float32. An implementation
  that runs out of memory is recorded as skipped with reason "OOM".
- Contrastive (margin 2) and triplet margin (torch defaults) losses, B = 2**20 pairs / triplets of
  D = 128 on CUDA: fastloss against the seed guide's contrastive composition and
  torch.nn.functional.triplet_margin_loss (eager and torch.compile).

One pytest-benchmark group per (loss, B, dtype). The timed step is ``loss = f(*inputs);
loss.backward(); torch.cuda.synchronize()`` with the inputs' ``.grad`` set to None and L2 flushed
in the untimed setup. ``extra_info`` is the record of ``python -m fastloss bench`` (TFLOP/s under
6 B^2 D for InfoNCE, GB/s under 2 k B D itemsize for the pair losses).

Elsewhere (CPU): InfoNCE B = 1024, D = 128 and pair losses B = 2**14, D = 128 in float32, which
time fastloss's PyTorch path. Override with FASTLOSS_BENCH_EMBED_LOSSES (contrastive, triplet,
info_nce), FASTLOSS_BENCH_INFO_NCE_BATCHES, FASTLOSS_BENCH_PAIR_BATCHES and FASTLOSS_BENCH_DTYPES.
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
LOSSES = cases.env_list("FASTLOSS_BENCH_EMBED_LOSSES", ["info_nce", "contrastive", "triplet"], specs.resolve_name)
INFO_NCE_BATCHES = cases.env_list("FASTLOSS_BENCH_INFO_NCE_BATCHES",
                                  [4096, 16384, 65536] if CUDA else [1024], cases.parse_size)
PAIR_BATCHES = cases.env_list("FASTLOSS_BENCH_PAIR_BATCHES", [2**20] if CUDA else [2**14], cases.parse_size)
DTYPES = cases.env_list("FASTLOSS_BENCH_DTYPES", [torch.bfloat16, torch.float32] if CUDA
                        else [torch.float32], cases.parse_dtype)
INFO_NCE_DIM = 512 if CUDA else 128
PAIR_DIM = 128

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all.
TIMING = {"warmup": 2, "probes": 2, "round_time_s": 0.5, "min_rounds": 3, "max_rounds": 20}

CASES = ([("info_nce", b, dt) for b in INFO_NCE_BATCHES for dt in DTYPES] if "info_nce" in LOSSES else []) + [
    (loss, b, dt) for loss in ("contrastive", "triplet") if loss in LOSSES for b in PAIR_BATCHES for dt in DTYPES]
IDS = [f"{loss}-B{cases.size_label(b)}-{cases.dtype_name(dt)}" for loss, b, dt in CASES]


def _shape(loss: str, b: int) -> tuple[int, int]:
    return b, INFO_NCE_DIM if loss == "info_nce" else PAIR_DIM


def bench_record(loss: str, b: int, dtype: torch.dtype, impl: str) -> dict:
    return cases.case(loss).record(impl, _shape(loss, b), dtype, DEVICE)


@pytest.mark.parametrize("impl", cases.IMPLS)
@pytest.mark.parametrize(("loss", "b", "dtype"), CASES, ids=IDS)
def test_embedding(run_timed, loss, b, dtype, impl):
    case = cases.case(loss)

    def make_step():
        return GradStep(case.impl(impl, DEVICE), case.make_inputs(_shape(loss, b), dtype, DEVICE), sync=True)

    run_timed(bench_record(loss, b, dtype, impl), make_step,
              f"{loss} B={cases.size_label(b)} {cases.dtype_name(dtype)}", oom_reason="OOM", **TIMING)
