"""Cross-entropy and softmax focal loss, fwd+bwd, reduction="mean".

Cross-entropy: fastloss (and fastloss with ``inplace_backward=True``) vs torch.nn.functional eager
vs torch.compile of it vs Liger-Kernel's LigerCrossEntropyLoss (when ``liger_kernel`` imports;
recorded as skipped otherwise). Focal: fastloss.functional.focal_loss (alpha 0.25, gamma 2) vs the
classic composition of fastloss.baselines.softmax_focal eager and under torch.compile.

One pytest-benchmark group per (loss, N x V, dtype). The timed step is
``torch.autograd.grad(loss_fn(x, t), x); torch.cuda.synchronize()`` with the L2 flushed in the
untimed setup: ``autograd.grad`` hands the gradient back as is, so implementations that write it
into the logits' memory (Liger, ``inplace_backward``) are not charged for the copy that ``x.grad``
of a leaf would make. ``extra_info`` is the record of ``python -m fastloss bench`` (GB/s under the
pass model of the softmax family: 2 N V itemsize when a row fits on chip, else 3 N V itemsize).

Matrix: CUDA (N, V) = (8192, 32000), (8192, 128256), (4096, 256000) for cross-entropy and
(65536, 1000), (8192, 32000) for focal, in bfloat16 and float32; elsewhere small shapes in
float32. Override with FASTLOSS_BENCH_SHAPES="8192x32000,4096x256000", FASTLOSS_BENCH_DTYPES,
FASTLOSS_BENCH_SOFTMAX_LOSSES="cross_entropy,focal_loss". ``python -m fastloss bench --losses
cross_entropy focal_loss`` times the same steps interleaved, without pytest. Timings are recorded,
never asserted.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastloss import functional as FL
from fastloss import specs
from fastloss.cli import cases
from fastloss.cli.timing import GradStep

DEVICE = cases.bench_device()
CUDA = DEVICE.type == "cuda"

CE_IMPLS = ("fastloss", "fastloss_inplace", "torch", "torch.compile", "liger")
FOCAL_IMPLS = cases.IMPLS

_CE_SHAPES = [(8192, 32000), (8192, 128256), (4096, 256000)] if CUDA else [(256, 1000), (64, 40000)]
_FOCAL_SHAPES = [(65536, 1000), (8192, 32000)] if CUDA else [(1024, 100)]
_SHAPES = cases.env_list("FASTLOSS_BENCH_SHAPES", [], cases.parse_shape)
LOSSES = cases.env_list("FASTLOSS_BENCH_SOFTMAX_LOSSES", ["cross_entropy", "focal_loss"], specs.resolve_name)
DTYPES = cases.env_list("FASTLOSS_BENCH_DTYPES", [torch.bfloat16, torch.float32] if CUDA
                        else [torch.float32], cases.parse_dtype)

CASES = [(loss, shape, dtype) for loss in LOSSES
         for shape in (_SHAPES or (_CE_SHAPES if loss == "cross_entropy" else _FOCAL_SHAPES)) for dtype in DTYPES]

# bench/conftest.py run_timed: untimed calls, probe calls, then timed rounds of about round_time_s in all.
TIMING = {"warmup": 3, "probes": 3, "round_time_s": 0.3 if CUDA else 0.5, "min_rounds": 5, "max_rounds": 30}


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


def make_step(loss: str, impl: str, shape, dtype, inputs=None) -> GradStep:
    """The step ``autograd.grad(fn(x, t), x)``; raises NotImplementedError when the implementation
    cannot run here (Liger off CUDA or not importable)."""
    case = cases.case(loss)
    fn = _fl_ce_inplace if impl == "fastloss_inplace" else case.impl(impl, DEVICE)
    x, t = inputs if inputs is not None else case.make_inputs(shape, dtype, DEVICE)
    if impl in ("fastloss_inplace", "liger"):
        x = x.detach().clone().requires_grad_()  # they overwrite the logits; keep the shared ones
    return GradStep(fn, (x, t), autograd_grad=True, sync=True)


def bench_record(loss: str, shape, dtype: torch.dtype, impl: str) -> dict:
    return cases.case(loss).record(impl, shape, dtype, DEVICE)


PARAMS = [(loss, shape, dtype, impl) for loss, shape, dtype in CASES
          for impl in (CE_IMPLS if loss == "cross_entropy" else FOCAL_IMPLS)]
IDS = [f"{loss}-{cases.shape_label(shape)}-{cases.dtype_name(dtype)}-{impl}" for loss, shape, dtype, impl in PARAMS]


@pytest.mark.parametrize(("loss", "shape", "dtype", "impl"), PARAMS, ids=IDS)
def test_softmax(run_timed, loss, shape, dtype, impl):
    run_timed(bench_record(loss, shape, dtype, impl), functools.partial(make_step, loss, impl, shape, dtype),
              f"{loss} {cases.shape_label(shape)} {cases.dtype_name(dtype)}", **TIMING)
