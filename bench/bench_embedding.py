"""Embedding losses, fwd+bwd: fastloss vs torch eager vs torch.compile.

- InfoNCE (reduction="mean", temperature 0.07, normalize=True), queries and keys (B, D) requiring
  grad: fastloss.functional.info_nce against the naive formula ``F.normalize``, ``q @ k.T / t``,
  ``F.cross_entropy(logits, arange(B))`` (eager and torch.compile). CUDA: B = 4096, 16384, 65536,
  D = 512, bfloat16 and float32. An implementation that runs out of memory is recorded as skipped
  with reason "OOM".
- Contrastive (margin 2) and triplet margin (torch defaults) losses, B = 2**20 pairs / triplets of
  D = 128 on CUDA: fastloss against the seed guide's contrastive composition and
  torch.nn.functional.triplet_margin_loss (eager and torch.compile).

One pytest-benchmark group per (loss, B, dtype). The timed step is ``loss = f(*inputs);
loss.backward(); torch.cuda.synchronize()`` with the inputs' ``.grad`` set to None and L2 flushed
in the untimed setup. ``extra_info``: peak memory of one step beyond what was allocated before it
(CUDA), the first call's time (compilation), and for InfoNCE achieved TFLOP/s under the 6 B^2 D
model (the three B x B x D products any method must do), for the pair losses achieved GB/s under
the fused byte model (read every embedding once, write every gradient once) and its share of the
device-to-device copy bandwidth measured in the same run.

Elsewhere (CPU): InfoNCE B = 1024, D = 128 and pair losses B = 2**14, D = 128 in float32, which
time fastloss's PyTorch reference. Override with FASTLOSS_BENCH_EMBED_LOSSES (contrastive, triplet,
info_nce), FASTLOSS_BENCH_INFO_NCE_BATCHES, FASTLOSS_BENCH_PAIR_BATCHES and FASTLOSS_BENCH_DTYPES.
Timings are recorded, never asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastloss import _bench
from fastloss import functional as FL

DEVICE = _bench.bench_device()
CUDA = DEVICE.type == "cuda"
IMPLS = ("fastloss", "torch", "torch.compile")
LOSSES = _bench.env_list("FASTLOSS_BENCH_EMBED_LOSSES", ["info_nce", "contrastive", "triplet"],
                         lambda s: s.strip().lower())
INFO_NCE_BATCHES = _bench.env_list("FASTLOSS_BENCH_INFO_NCE_BATCHES",
                                   [4096, 16384, 65536] if CUDA else [1024], _bench.parse_size)
PAIR_BATCHES = _bench.env_list("FASTLOSS_BENCH_PAIR_BATCHES", [2**20] if CUDA else [2**14],
                               _bench.parse_size)
DTYPES = _bench.env_list("FASTLOSS_BENCH_DTYPES", [torch.bfloat16, torch.float32] if CUDA
                         else [torch.float32], _bench.parse_dtype)
INFO_NCE_DIM = 512 if CUDA else 128
PAIR_DIM = 128
TEMPERATURE, MARGIN = 0.07, 2.0

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all.
TIMING = {"warmup": 2, "probes": 2, "round_time_s": 0.5, "min_rounds": 3, "max_rounds": 20}


# --- the implementations -------------------------------------------------------------------------

def naive_info_nce(q, k):
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = q @ k.T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def fastloss_info_nce(q, k):
    return FL.info_nce(q, k, TEMPERATURE)


def seed_contrastive(x1, x2, label):
    """The seed guide's ContrastiveLoss.forward."""
    d = F.pairwise_distance(x1, x2)
    return torch.mean((1 - label) * torch.pow(d, 2)
                      + label * torch.pow(torch.clamp(MARGIN - d, min=0.0), 2))


def fastloss_contrastive(x1, x2, label):
    return FL.contrastive_loss(x1, x2, label, MARGIN)


def torch_triplet(a, p, n):
    return F.triplet_margin_loss(a, p, n)


def fastloss_triplet(a, p, n):
    return FL.triplet_margin_loss(a, p, n)


_TABLE = {
    "info_nce": (fastloss_info_nce, naive_info_nce, "normalize + q @ k.T / t + F.cross_entropy"),
    "contrastive": (fastloss_contrastive, seed_contrastive, "seed guide ContrastiveLoss (F.pairwise_distance)"),
    "triplet": (fastloss_triplet, torch_triplet, "torch.nn.functional.triplet_margin_loss"),
}
_COMPILED: dict[str, object] = {}


def _impl(loss: str, impl: str):
    fast, base, _ = _TABLE[loss]
    if impl == "fastloss":
        return fast
    if impl == "torch":
        return base
    if loss not in _COMPILED:
        _COMPILED[loss] = torch.compile(base, dynamic=False)
    return _COMPILED[loss]


# --- inputs and the step ---------------------------------------------------------------------------

def _inputs(loss: str, b: int, dtype: torch.dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    d = INFO_NCE_DIM if loss == "info_nce" else PAIR_DIM
    n = {"info_nce": 2, "contrastive": 2, "triplet": 3}[loss]
    xs = [torch.randn(b, d, generator=g, device=DEVICE).to(dtype).requires_grad_() for _ in range(n)]
    if loss == "contrastive":
        xs.append(torch.randint(0, 2, (b,), generator=g, device=DEVICE).to(dtype))
    return xs


def _model(loss: str, b: int, dtype: torch.dtype) -> dict:
    item = torch.empty((), dtype=dtype).element_size()
    if loss == "info_nce":
        return {"flops_model": 6 * b * b * INFO_NCE_DIM}
    operands = 2 if loss == "contrastive" else 3
    return {"bytes_moved": 2 * operands * b * PAIR_DIM * item}


CASES = ([("info_nce", b, dt) for b in INFO_NCE_BATCHES for dt in DTYPES] if "info_nce" in LOSSES else []) + [
    (loss, b, dt) for loss in ("contrastive", "triplet") if loss in LOSSES for b in PAIR_BATCHES for dt in DTYPES]
IDS = [f"{loss}-B{_bench.size_label(b)}-{_bench.dtype_name(dt)}" for loss, b, dt in CASES]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("loss", "b", "dtype"), CASES, ids=IDS)
def test_embedding(run_timed, benchmark, request, loss, b, dtype, impl):
    info = {"loss": loss, "impl": impl, "b": b, "dim": INFO_NCE_DIM if loss == "info_nce" else PAIR_DIM,
            "dtype": _bench.dtype_name(dtype), "device": DEVICE.type,
            "baseline": "fastloss.functional" if impl == "fastloss" else _TABLE[loss][2],
            **_model(loss, b, dtype)}
    request.node.bench_params = info  # a skip record carries them too

    median = run_timed(lambda: _bench.GradStep(_impl(loss, impl), _inputs(loss, b, dtype), sync=True),
                       f"{loss} B={_bench.size_label(b)} {_bench.dtype_name(dtype)}", info,
                       oom_reason="OOM", **TIMING)
    if median and "flops_model" in info:
        benchmark.extra_info["tflops"] = info["flops_model"] / median / 1e12
