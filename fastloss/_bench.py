"""Benchmark harness: ``python -m fastloss bench`` and the helpers bench/*.py share with it.

What is measured: one training step of a loss with respect to its floating inputs, for three
implementations of the same math (four for cross-entropy):

    fastloss        fastloss.functional (Triton kernels on CUDA, the PyTorch reference elsewhere)
    torch           the torch baseline, eager: torch.nn.functional where torch has the loss,
                    otherwise the usual composition of torch ops (see each family below)
    torch.compile   torch.compile(dynamic=False) of the same torch code
    liger           Liger-Kernel's cross-entropy (CUDA, when ``liger_kernel`` imports)

Three families, each with its inputs, its step and its byte model (DESIGN.md, performance model):

    pointwise   mse, l1, huber, smooth_l1, bce_with_logits, sigmoid_focal: x, y of N elements;
                step ``x.grad = None; f(x, y).backward()``; bytes 3 * N * itemsize (read x, read y,
                write grad).
    row         cross_entropy, focal_loss (softmax focal): logits (N, V), int64 class targets;
                step ``torch.autograd.grad(f(x, t), x)`` (the gradient handed back as is, so
                implementations that write it into the logits' memory are not charged for a copy,
                as in bench/bench_softmax.py); bytes P * N * V * itemsize + 8 * N, P = 2 when a row
                fits on chip (V <= fastloss.ops.softmax.MAX_FUSED_COLS: read logits, write grad),
                3 otherwise (log-sum-exp pass, then read + write).
    embedding   contrastive (margin 2), triplet (torch defaults), info_nce (temperature 0.07):
                k operands (B, D) requiring grad; step ``.grad = None; f(...).backward()``; bytes
                2 * k * B * D * itemsize (read each operand, write its grad); info_nce also
                FLOPs 6 * B**2 * D (the three B x B x D products any method does), reported as
                TFLOP/s. An implementation that runs out of memory is recorded as skipped, "OOM".

Timing: the implementations of one (loss, size, dtype) take turns (:func:`interleave`): rounds
in which each is timed for about ``round_time_s``, the order rotated every round, so that a busy
spell of a shared machine falls on all of them. The timer chooses the number of calls: on CPU
torch.utils.benchmark's ``blocked_autorange`` (samples are block averages), on CUDA CUDA events
around each call with the L2 flushed before each (do_bench style). A record keeps the median, the
quartiles and the median of each round; a ratio (other's time / fastloss's: > 1 means fastloss is
faster) is the median of the per-round ratios, with their interquartile range, marked too noisy
to read when that range is wider than NOISY_SPREAD of it. Peak memory on CUDA is
``torch.cuda.max_memory_allocated()`` during one step minus the memory allocated before it.
Bandwidth: bytes of the family's model over the median, against a device-to-device copy measured
in the same process (bytes read + bytes written).

The size sweep (``--sweep``, :func:`run_sweep`, bench/bench_overhead.py): fastloss against torch.nn
(or the naive composition) per loss of ``SWEEP_LOSSES``, forward + backward against the number of
elements of each operand, the ratio per size, a PNG of the curves (:func:`make_sweep_figure`).

Adding a loss of the row or embedding family is one entry of ``_SHAPED`` (its fastloss call, its
torch baseline, its inputs and byte model) and one line of ``_DEFAULT_SHAPES``.

This module imports only torch, the standard library and fastloss; matplotlib, torchvision and
liger_kernel are optional. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import fastloss
from fastloss import functional as FL

__all__ = [
    "ALL_IMPLS",
    "ALL_LOSSES",
    "BYTES_MODELS",
    "EMBEDDING_LOSSES",
    "IMPLS",
    "LOSSES",
    "ROW_LOSSES",
    "FwdBwd",
    "GradStep",
    "LossCase",
    "ShapedCase",
    "bytes_moved",
    "configure_compile",
    "copy_bandwidth",
    "device_info",
    "error_reason",
    "first_call_s",
    "flush_l2",
    "format_markdown",
    "loss_case",
    "make_inputs",
    "measure",
    "measure_shaped",
    "peak_memory",
    "resolve_loss",
    "run_bench",
    "shaped_case",
    "time_step",
]

IMPLS = ("fastloss", "torch", "torch.compile")
#: Every implementation a record may name, in report order ("fastloss_inplace" is
#: ``cross_entropy(..., inplace_backward=True)``, measured by bench/bench_softmax.py only).
ALL_IMPLS = ("fastloss", "fastloss_inplace", "torch", "torch.compile", "liger")

#: Pointwise loss names in report order, with their fastloss.functional names.
LOSSES = {
    "mse": "mse_loss",
    "l1": "l1_loss",
    "huber": "huber_loss",
    "smooth_l1": "smooth_l1_loss",
    "bce_with_logits": "binary_cross_entropy_with_logits",
    "sigmoid_focal": "sigmoid_focal_loss",
}

_LOSS_ALIASES = {
    **{v: k for k, v in LOSSES.items()},
    "bce": "bce_with_logits",
    "focal": "sigmoid_focal",
    "smoothl1": "smooth_l1",
    "smooth-l1": "smooth_l1",
}

#: Losses of the softmax row family: logits (N, V) and class targets.
ROW_LOSSES = {"cross_entropy": "cross_entropy", "focal_loss": "focal_loss"}
#: Losses of the embedding family: (B, D) operands.
EMBEDDING_LOSSES = {"contrastive": "contrastive_loss", "triplet": "triplet_margin_loss", "info_nce": "info_nce"}
#: Every loss ``python -m fastloss bench`` knows, in report order, with its family.
ALL_LOSSES = {**{k: "pointwise" for k in LOSSES}, **{k: "row" for k in ROW_LOSSES},
              **{k: "embedding" for k in EMBEDDING_LOSSES}}

_SHAPED_ALIASES = {
    **{v: k for k, v in {**ROW_LOSSES, **EMBEDDING_LOSSES}.items()},
    "ce": "cross_entropy", "xent": "cross_entropy", "softmax_focal": "focal_loss",
    "triplet_margin": "triplet", "infonce": "info_nce", "nt_xent": "info_nce",
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
#: Why the focal baseline is not torchvision, when it is not (set on first use).
FOCAL_BASELINE_NOTE: str | None = None
_L2_FLUSH_BYTES = 256 * 2**20  # as triton.testing.do_bench: larger than any current L2


# --------------------------------------------------------------------------------------------
# The losses and their baselines
# --------------------------------------------------------------------------------------------

def _fl_focal(x: Tensor, y: Tensor) -> Tensor:
    return FL.sigmoid_focal_loss(x, y, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="mean")


def _inline_focal(x: Tensor, y: Tensor) -> Tensor:
    """torchvision.ops.sigmoid_focal_loss(x, y, 0.25, 2, "mean"), written out (same ops, same order)."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** FOCAL_GAMMA)
    loss = (FOCAL_ALPHA * y + (1 - FOCAL_ALPHA) * (1 - y)) * loss
    return loss.mean()


@functools.cache
def _focal_baseline() -> tuple[Callable[[Tensor, Tensor], Tensor], str]:
    try:
        from torchvision.ops import sigmoid_focal_loss as tv_focal
    except Exception as exc:  # noqa: BLE001 - not installed, or built for another torch
        global FOCAL_BASELINE_NOTE
        FOCAL_BASELINE_NOTE = f"torchvision not importable ({error_reason(exc)}); using the inline formula"
        return _inline_focal, "inline torchvision formula (torchvision not importable)"

    def _torchvision_focal(x: Tensor, y: Tensor) -> Tensor:
        return tv_focal(x, y, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="mean")

    return _torchvision_focal, "torchvision.ops.sigmoid_focal_loss"


@dataclasses.dataclass(frozen=True)
class LossCase:
    """One loss: its fastloss call, the torch call it is measured against, and its target kind."""

    name: str
    fastloss: Callable[[Tensor, Tensor], Tensor]
    torch: Callable[[Tensor, Tensor], Tensor]
    torch_label: str          # what the torch baseline is, for reports
    binary_target: bool       # targets in [0, 1] (probabilities) rather than real-valued

    def impl(self, impl: str) -> Callable[[Tensor, Tensor], Tensor]:
        """The callable of one implementation ("fastloss", "torch" or "torch.compile")."""
        if impl == "fastloss":
            return self.fastloss
        if impl == "torch":
            return self.torch
        if impl == "torch.compile":
            return compiled(self.torch)
        raise ValueError(f"unknown implementation {impl!r}; expected one of {IMPLS}")


def canonical_loss(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = _LOSS_ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    return key


def loss_case(name: str) -> LossCase:
    """The LossCase of a loss name ("mse", "l1", "huber", "smooth_l1", "bce_with_logits", "sigmoid_focal")."""
    name = canonical_loss(name)
    if name == "sigmoid_focal":
        base, label = _focal_baseline()
        return LossCase(name, _fl_focal, base, label, True)
    table = {
        "mse": (FL.mse_loss, F.mse_loss, "torch.nn.functional.mse_loss", False),
        "l1": (FL.l1_loss, F.l1_loss, "torch.nn.functional.l1_loss", False),
        "huber": (functools.partial(FL.huber_loss, delta=1.0), functools.partial(F.huber_loss, delta=1.0),
                  "torch.nn.functional.huber_loss(delta=1.0)", False),
        "smooth_l1": (functools.partial(FL.smooth_l1_loss, beta=1.0), functools.partial(F.smooth_l1_loss, beta=1.0),
                      "torch.nn.functional.smooth_l1_loss(beta=1.0)", False),
        "bce_with_logits": (FL.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits,
                            "torch.nn.functional.binary_cross_entropy_with_logits", True),
    }
    fl, tf, label, binary = table[name]
    return LossCase(name, fl, tf, label, binary)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of float32, bfloat16, float16, float64")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(text: str | int) -> int:
    """An element count: 1048576, 2**20, 2^20, 1M / 1Mi (2**20), 16K / 16Ki (2**14)."""
    if isinstance(text, int):
        return text
    s = text.strip().replace("_", "")
    try:
        for sep in ("**", "^"):
            if sep in s:
                base, exp = s.split(sep)
                n = int(base) ** int(exp)
                break
        else:
            units = {"k": 2**10, "m": 2**20, "g": 2**30}
            low = s.lower().removesuffix("i")
            n = int(low[:-1]) * units[low[-1]] if low and low[-1] in units else int(s)
    except (ValueError, KeyError):
        raise ValueError(f"cannot read size {text!r}; write e.g. 16777216, 2**24 or 16M") from None
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def size_label(n: int) -> str:
    """2**k for powers of two, the plain number otherwise."""
    return f"2**{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else str(n)


def _split_list(values: Iterable[str] | None) -> list[str]:
    return [p for v in values or () for p in v.replace(",", " ").split()]


def env_list(name: str, default: Iterable[Any], parse: Callable[[str], Any]) -> list[Any]:
    """A comma/space separated list from environment variable ``name``, parsed; ``default`` if unset."""
    raw = os.environ.get(name, "").strip()
    return list(dict.fromkeys(parse(s) for s in _split_list([raw]))) if raw else list(default)


def resolve_loss(name: str) -> str:
    """The canonical name of a loss of any family ("focal" is the sigmoid focal loss,
    "focal_loss" / "softmax_focal" the softmax one)."""
    key = name.strip().lower().replace("-", "_")
    key = _SHAPED_ALIASES.get(key, key)
    if key in ALL_LOSSES:
        return key
    try:
        return canonical_loss(key)
    except ValueError:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(ALL_LOSSES)}") from None


def parse_shape(text: str | Sequence[int]) -> tuple[int, int]:
    """A 2-D shape: 8192x32000, 2**20x128, 16Kx512 (each side as :func:`parse_size`)."""
    if not isinstance(text, str):
        a, b = text
        return parse_size(a), parse_size(b)
    parts = text.strip().lower().split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        return parse_size(parts[0]), parse_size(parts[1])
    except ValueError:
        raise ValueError(f"cannot read shape {text!r}; write e.g. 8192x32000 or 2**20x128") from None


def shape_label(shape: Sequence[int]) -> str:
    """``8192x32000``; sides that are powers of two from 2**20 up as ``2**20``."""
    return "x".join("?" if d is None else size_label(d) if d >= 2**20 else str(d) for d in shape)


def bench_device() -> torch.device:
    """$FASTLOSS_BENCH_DEVICE, else CUDA when available, else CPU."""
    return torch.device(os.environ.get("FASTLOSS_BENCH_DEVICE", "").strip() or default_device())


# --------------------------------------------------------------------------------------------
# The row and embedding families: 2-D shapes, several operands
# --------------------------------------------------------------------------------------------

CONTRASTIVE_MARGIN, INFO_NCE_TEMPERATURE = 2.0, 0.07


def _fl_cross_entropy(x: Tensor, t: Tensor) -> Tensor:
    return FL.cross_entropy(x, t)


def _torch_cross_entropy(x: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(x, t)


def _fl_softmax_focal(x: Tensor, t: Tensor) -> Tensor:
    return FL.focal_loss(x, t, FOCAL_ALPHA, FOCAL_GAMMA)


def _classic_softmax_focal(x: Tensor, t: Tensor) -> Tensor:
    """The classic softmax focal loss composition (alpha 0.25, gamma 2)."""
    ce = F.cross_entropy(x, t, reduction="none")
    pt = torch.exp(-ce)
    return (FOCAL_ALPHA * (1 - pt) ** FOCAL_GAMMA * ce).mean()


def _fl_contrastive(x1: Tensor, x2: Tensor, label: Tensor) -> Tensor:
    return FL.contrastive_loss(x1, x2, label, CONTRASTIVE_MARGIN)


def _seed_contrastive(x1: Tensor, x2: Tensor, label: Tensor) -> Tensor:
    """The seed guide's ContrastiveLoss.forward (margin 2; label 1 = dissimilar pair)."""
    d = F.pairwise_distance(x1, x2)
    return torch.mean((1 - label) * torch.pow(d, 2)
                      + label * torch.pow(torch.clamp(CONTRASTIVE_MARGIN - d, min=0.0), 2))


def _fl_triplet(a: Tensor, p: Tensor, n: Tensor) -> Tensor:
    return FL.triplet_margin_loss(a, p, n)


def _torch_triplet(a: Tensor, p: Tensor, n: Tensor) -> Tensor:
    return F.triplet_margin_loss(a, p, n)


def _fl_info_nce(q: Tensor, k: Tensor) -> Tensor:
    return FL.info_nce(q, k, INFO_NCE_TEMPERATURE)


def _naive_info_nce(q: Tensor, k: Tensor) -> Tensor:
    """Normalise, the full B x B similarity matrix, cross-entropy against the diagonal."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = q @ k.T / INFO_NCE_TEMPERATURE
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


@functools.cache
def liger_cross_entropy() -> tuple[Callable[[Tensor, Tensor], Tensor] | None, str | None]:
    """(Liger-Kernel's cross-entropy ``fn(logits, target)``, None), or (None, why it cannot run).

    Imported as bench/bench_softmax.py does: the transformers-side module, else the bare
    autograd.Function. Liger writes the gradient into the logits' memory.
    """
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

        return LigerCrossEntropyLoss(reduction="mean"), None
    except Exception as exc:  # noqa: BLE001 - not installed, or broken against this torch/triton
        reason = f"liger_kernel not importable ({error_reason(exc)})"
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except Exception:  # noqa: BLE001
        return None, reason
    return (lambda x, t: LigerCrossEntropyFunction.apply(x, t, None)[0]), None


def row_passes(n_cols: int) -> int:
    """Passes over the logits of the fewest-bytes fused fwd+bwd: 2 when a row of ``n_cols`` classes
    fits on chip (fastloss.ops.softmax.MAX_FUSED_COLS, whatever the kernel then chooses for the
    dtype; as bench/bench_softmax.py counts), 3 otherwise."""
    from fastloss.ops import softmax as ops_softmax

    return 2 if n_cols <= ops_softmax.MAX_FUSED_COLS else 3


def row_single_pass(shape: Sequence[int], dtype: torch.dtype) -> bool | None:
    """Whether fastloss's row kernel reads each row once for this shape and dtype (its launch
    helper's choice), for the records; None if that helper cannot be asked."""
    try:
        from fastloss.ops import softmax as ops_softmax

        return bool(ops_softmax._row_config(shape[0], shape[1], dtype)[2])
    except Exception:  # noqa: BLE001 - private helper: informational only
        return None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _row_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n, v = shape
    return row_passes(v) * n * v * _itemsize(dtype) + 8 * n  # + the int64 targets


def _embedding_bytes(operands: int) -> Callable[[Sequence[int], torch.dtype], int]:
    def model(shape: Sequence[int], dtype: torch.dtype) -> int:
        b, d = shape
        return 2 * operands * b * d * _itemsize(dtype)

    return model


def _info_nce_flops(shape: Sequence[int]) -> int:
    b, d = shape
    return 6 * b * b * d


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _row_inputs(shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Logits (N, V) standard normal requiring grad, targets (N,) int64 uniform over the classes."""
    n, v = shape
    g = _generator(device, seed)
    x = torch.randn(n, v, generator=g, device=device).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g, device=device)
    return x, t


def _embedding_inputs(operands: int, label: bool = False):
    def make(shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0):
        """``operands`` (B, D) standard normal requiring grad (+ a 0/1 label of ``dtype``)."""
        b, d = shape
        g = _generator(device, seed)
        xs = [torch.randn(b, d, generator=g, device=device).to(dtype).requires_grad_()
              for _ in range(operands)]
        if label:
            xs.append(torch.randint(0, 2, (b,), generator=g, device=device).to(dtype))
        return tuple(xs)

    return make


@dataclasses.dataclass(frozen=True)
class ShapedCase:
    """A loss of the row or embedding family: its fastloss call, its torch baseline, how its
    inputs are made from a 2-D shape, and its byte (and FLOP) model."""

    name: str
    family: str                                   # "row" | "embedding"
    fastloss: Callable[..., Tensor]
    torch: Callable[..., Tensor]
    torch_label: str
    make_inputs: Callable[..., tuple[Tensor, ...]]  # (shape, dtype, device, seed) -> operands
    bytes_moved: Callable[[Sequence[int], torch.dtype], int]
    flops: Callable[[Sequence[int]], int] | None = None
    liger: bool = False                           # Liger-Kernel has this loss
    autograd_grad: bool = False                   # step: torch.autograd.grad, not .backward()

    @property
    def impls(self) -> tuple[str, ...]:
        return IMPLS + ("liger",) if self.liger else IMPLS

    def impl(self, impl: str, device: torch.device) -> Callable[..., Tensor]:
        """The callable of one implementation; raises NotImplementedError with the reason when it
        cannot run here (Liger off CUDA or not installed)."""
        if impl == "fastloss":
            return self.fastloss
        if impl == "torch":
            return self.torch
        if impl == "torch.compile":
            return compiled(self.torch)
        if impl == "liger" and self.liger:
            if device.type != "cuda":
                raise NotImplementedError("Liger-Kernel needs CUDA")
            fn, reason = liger_cross_entropy()
            if fn is None:
                raise NotImplementedError(reason)
            return fn
        raise ValueError(f"unknown implementation {impl!r} for {self.name}; expected one of {self.impls}")


_SHAPED: dict[str, ShapedCase] = {
    "cross_entropy": ShapedCase(
        "cross_entropy", "row", _fl_cross_entropy, _torch_cross_entropy,
        "torch.nn.functional.cross_entropy", _row_inputs, _row_bytes, liger=True, autograd_grad=True),
    "focal_loss": ShapedCase(
        "focal_loss", "row", _fl_softmax_focal, _classic_softmax_focal,
        "ce = F.cross_entropy(reduction='none'); (0.25 (1 - exp(-ce))**2 ce).mean()",
        _row_inputs, _row_bytes, autograd_grad=True),
    "contrastive": ShapedCase(
        "contrastive", "embedding", _fl_contrastive, _seed_contrastive,
        "seed ContrastiveLoss (F.pairwise_distance, margin 2)", _embedding_inputs(2, label=True),
        _embedding_bytes(2)),
    "triplet": ShapedCase(
        "triplet", "embedding", _fl_triplet, _torch_triplet, "torch.nn.functional.triplet_margin_loss",
        _embedding_inputs(3), _embedding_bytes(3)),
    "info_nce": ShapedCase(
        "info_nce", "embedding", _fl_info_nce, _naive_info_nce,
        "F.normalize; q @ k.T / 0.07; F.cross_entropy(arange(B))", _embedding_inputs(2),
        _embedding_bytes(2), flops=_info_nce_flops),
}

#: Default shapes per loss: (N, V) for the row family, (B, D) for the embedding family.
_DEFAULT_SHAPES: dict[str, dict[str, list[tuple[int, int]]]] = {
    "cuda": {
        "cross_entropy": [(8192, 32000), (8192, 128256), (4096, 256000)],
        "focal_loss": [(65536, 1000), (8192, 32000)],
        "contrastive": [(2**20, 128)],
        "triplet": [(2**20, 128)],
        "info_nce": [(4096, 512), (16384, 512)],
    },
    "cpu": {
        "cross_entropy": [(256, 4096)],
        "focal_loss": [(256, 4096)],
        "contrastive": [(4096, 64)],
        "triplet": [(4096, 64)],
        "info_nce": [(512, 64)],
    },
}


def shaped_case(name: str) -> ShapedCase:
    """The ShapedCase of a row- or embedding-family loss name."""
    key = resolve_loss(name)
    if key not in _SHAPED:
        raise ValueError(f"{name!r} is not a row or embedding loss; expected one of {', '.join(_SHAPED)}")
    return _SHAPED[key]


def default_shapes(name: str, device: torch.device) -> list[tuple[int, int]]:
    """The shapes ``python -m fastloss bench`` runs a row / embedding loss at on this device."""
    table = _DEFAULT_SHAPES["cuda" if device.type == "cuda" else "cpu"]
    return list(table[resolve_loss(name)])


def torch_label(name: str) -> str:
    """What the torch baseline of a loss (any family) is, for reports."""
    key = resolve_loss(name)
    return _SHAPED[key].torch_label if key in _SHAPED else loss_case(key).torch_label


# --------------------------------------------------------------------------------------------
# Inputs, steps, timing, memory, bandwidth
# --------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_inputs(case: LossCase | str, n: int, dtype: torch.dtype, device: torch.device | str,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """``x`` (N,) standard normal, requiring grad; ``y`` (N,) uniform in [0, 1) for probability
    targets, standard normal otherwise. Generated in float32 and cast, so every dtype sees the same
    values."""
    case = loss_case(case) if isinstance(case, str) else case
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, generator=g, device=device).to(dtype).requires_grad_()
    if case.binary_target:
        y = torch.rand(n, generator=g, device=device).to(dtype)
    else:
        y = torch.randn(n, generator=g, device=device).to(dtype)
    return x, y


class FwdBwd:
    """One training step of a loss: ``x.grad = None; f(x, y).backward()`` (plus a synchronize
    when ``sync``, for wall-clock timers)."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, sync: bool = False):
        self.fn, self.x, self.y = fn, x, y
        self.sync = sync and x.device.type == "cuda"

    def zero_grad(self) -> None:
        self.x.grad = None

    def __call__(self) -> None:
        self.x.grad = None
        self.fn(self.x, self.y).backward()
        if self.sync:
            torch.cuda.synchronize(self.x.device)


class GradStep:
    """One training step of a loss of several operands: the gradients of ``fn(*inputs)`` with
    respect to ``wrt`` (the inputs requiring grad), by ``torch.autograd.grad`` (handed back, not
    accumulated) when ``autograd_grad``, else by ``.backward()`` into ``.grad`` set to None first
    (plus a synchronize when ``sync``, for wall-clock timers)."""

    def __init__(self, fn: Callable[..., Tensor], inputs: Sequence[Tensor], autograd_grad: bool = False,
                 sync: bool = False):
        self.fn, self.inputs = fn, tuple(inputs)
        self.wrt = tuple(t for t in self.inputs if t.requires_grad)
        self.autograd_grad = autograd_grad
        self.sync = sync and self.inputs[0].device.type == "cuda"

    def zero_grad(self) -> None:
        for t in self.wrt:
            t.grad = None

    def __call__(self) -> None:
        if self.autograd_grad:
            torch.autograd.grad(self.fn(*self.inputs), self.wrt)
        else:
            self.zero_grad()
            self.fn(*self.inputs).backward()
        if self.sync:
            torch.cuda.synchronize(self.inputs[0].device)


@functools.cache
def _flush_buffer(device: torch.device) -> Tensor:
    return torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)


def flush_l2(device: torch.device) -> None:
    """Evict the GPU's L2 (write a 256 MiB buffer), as triton.testing.do_bench does; no-op off CUDA."""
    if device.type == "cuda":
        _flush_buffer(device).zero_()


def first_call_s(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``step``, synchronized: on a fresh step, the call that compiles
    (torch.compile graphs, Triton kernels)."""
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def time_step(step: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 3,
              flush: bool = True) -> list[float]:
    """Seconds per call of ``step``, ``repeat`` samples after ``warmup`` calls.

    CUDA: one pair of CUDA events around each call, L2 flushed before each (do_bench style), a
    single synchronize at the end; a step's own synchronize (``sync``, for wall-clock timers) is
    turned off meanwhile, or the events would time the host's round trip too. Elsewhere:
    ``time.perf_counter`` around each call.
    """
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        own_sync = getattr(step, "sync", False)
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        if own_sync:
            step.sync = False
        try:
            for start, end in zip(starts, ends):
                if flush:
                    flush_l2(device)
                start.record()
                step()
                end.record()
            torch.cuda.synchronize(device)
        finally:
            if own_sync:
                step.sync = own_sync
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def peak_memory(step: FwdBwd | GradStep | Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of ``step`` beyond what was allocated before it
    (the gradient buffers included); None off CUDA."""
    if device.type != "cuda":
        return None
    if isinstance(step, (FwdBwd, GradStep)):
        step.zero_grad()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bytes_moved(n: int, dtype: torch.dtype) -> int:
    """Fewest bytes a fused fwd+bwd of a reduced pointwise loss moves: read x, read y, write grad."""
    return 3 * n * torch.empty((), dtype=dtype).element_size()


@functools.cache
def _copy_bandwidth(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(2**30, max(2**24, free // 8))
        repeat = 20
    else:
        nbytes, repeat = 2**26, 10
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_step(lambda: dst.copy_(src), device, repeat=repeat, warmup=3, flush=False)
    return 2 * n * 4 / statistics.median(times)


def copy_bandwidth(device: torch.device | str) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), measured once per
    process and device on a large buffer (1 GiB on CUDA when memory allows, 64 MiB elsewhere)."""
    return _copy_bandwidth(torch.device(device))


def configure_compile() -> None:
    """Let one torch.compile'd function hold a graph per (shape, dtype) the benchmarks use.

    Without CUDA, compile in-process: on a small CPU machine inductor's pool of compile workers
    starts in the background after the first compile and steals the cores being measured.
    """
    if not torch.cuda.is_available() and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    cfg = torch._dynamo.config
    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        if hasattr(cfg, name) and getattr(cfg, name) < value:
            setattr(cfg, name, value)


@functools.cache
def compiled(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """torch.compile(fn, dynamic=False), one wrapper per function (its graphs are cached per shape)."""
    configure_compile()
    return torch.compile(fn, dynamic=False)


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is the device running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def error_reason(exc: BaseException) -> str:
    """``ExceptionType: first line of the message`` for skip records; just "OOM" for out of memory."""
    if is_oom(exc):
        return "OOM"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")




def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Interleaved timing: every implementation of one (loss, size, dtype) in turn, round after round
# --------------------------------------------------------------------------------------------

#: Interleaved rounds per measurement (``--repeat``), by device type.
DEFAULT_ROUNDS = {"cuda": 5, "cpu": 7}
#: Seconds each implementation is timed in each round (``--round-time``): on CPU the
#: ``min_run_time`` of torch.utils.benchmark's ``blocked_autorange``, which chooses how many calls
#: make one timed block; on CUDA the time the event-timed calls of a round add up to (at least 5,
#: at most 200 calls, counted from a 3-call probe).
DEFAULT_ROUND_TIME_S = 0.05
#: A ratio whose interquartile range over the rounds is wider than this fraction of its median is
#: marked "?" in the tables: the machine was too noisy for that ratio to mean anything.
NOISY_SPREAD = 0.2
_CUDA_MIN_CALLS, _CUDA_MAX_CALLS = 5, 200


def timer_name(device: torch.device) -> str:
    """What times a round on this device, for reports."""
    if device.type == "cuda":
        return "CUDA events around each call, L2 flushed before each"
    return "torch.utils.benchmark.Timer.blocked_autorange (block averages)"


def time_round(step: Callable[[], Any], device: torch.device, round_time_s: float = DEFAULT_ROUND_TIME_S,
               threads: int | None = None) -> list[float]:
    """Seconds per call of ``step`` in one round of about ``round_time_s``; the timer chooses how
    many calls.

    CPU: torch.utils.benchmark ``Timer("step()").blocked_autorange(min_run_time=round_time_s)`` with
    ``threads`` torch threads (default: the current number); each sample is a block's average.
    CUDA: :func:`time_step` (CUDA events, L2 flushed before each call), as many calls as fit in
    ``round_time_s`` by a 3-call probe (5 to 200).
    """
    if device.type == "cuda":
        probe = statistics.median(time_step(step, device, repeat=3, warmup=0))
        calls = int(min(_CUDA_MAX_CALLS, max(_CUDA_MIN_CALLS, round_time_s / max(probe, 1e-7))))
        return time_step(step, device, repeat=calls, warmup=0)
    from torch.utils import benchmark as torch_benchmark

    timer = torch_benchmark.Timer(stmt="step()", globals={"step": step},
                                  num_threads=threads or torch.get_num_threads())
    return [float(t) for t in timer.blocked_autorange(min_run_time=round_time_s).times]


def interleave(steps: dict[str, Callable[[], Any]], rounds: int,
               run_round: Callable[[str, Callable[[], Any]], list[float]],
               ) -> tuple[dict[str, list[list[float]]], dict[str, str]]:
    """Time every step once per round, ``rounds`` times, starting each round one implementation
    further on (a, b, c; b, c, a; c, a, b; ...), so that a slow spell of a shared machine falls on
    all of them and none is always first after another's warm caches.

    Returns ({name: [samples of each round]}, {name: reason} for steps that raised; a step that
    raised is not run again).
    """
    names = list(steps)
    samples: dict[str, list[list[float]]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if name in errors:
                continue
            try:
                samples[name].append(list(run_round(name, steps[name])))
            except Exception as exc:  # noqa: BLE001 - OOM or failure while timed: record, go on
                errors[name] = f"failed while timed: {error_reason(exc)}"
    return samples, errors


def measure_group(makers: dict[str, Callable[[], Any]], recs: dict[str, dict[str, Any]], device: torch.device,
                  rounds: int, warmup: int = 3, round_time_s: float = DEFAULT_ROUND_TIME_S,
                  threads: int | None = None,
                  run_round: Callable[[str, Callable[[], Any]], list[float]] | None = None) -> None:
    """Time the implementations of one (loss, size, dtype) against each other, into ``recs``.

    ``makers[impl]()`` builds the step of ``impl`` (a :class:`FwdBwd` / :class:`GradStep`);
    each step's first call (compiles) is timed, then ``warmup`` calls, its peak memory (CUDA),
    then the steps are timed by :func:`interleave` (``run_round`` defaults to :func:`time_round`).
    Never raises for a failing implementation: its record gets status "skipped" and the reason
    (a NotImplementedError's message: it cannot run here).
    """
    steps: dict[str, Any] = {}
    for impl, make in makers.items():
        rec = recs[impl]
        step = None
        try:
            step = make()
            rec["first_call_s"] = first_call_s(step, device)
            for _ in range(warmup):
                step()
            rec["peak_mem_bytes"] = peak_memory(step, device)
            steps[impl] = step
        except NotImplementedError as exc:  # cannot run here (Liger off CUDA or not installed)
            rec.update(status="skipped", reason=str(exc) or error_reason(exc))
        except Exception as exc:  # noqa: BLE001 - OOM, compile or backend failure: record, go on
            rec.update(status="skipped", reason=error_reason(exc))
        if rec.get("status") != "ok":
            if step is not None and hasattr(step, "zero_grad"):
                step.zero_grad()
            step = None  # drop the failed step's tensors before returning memory
            _release(device)
    if run_round is None:
        def run_round(_name: str, step: Callable[[], Any]) -> list[float]:
            return time_round(step, device, round_time_s, threads)
    samples, errors = interleave(steps, rounds, run_round)
    for impl, step in steps.items():
        if hasattr(step, "zero_grad"):
            step.zero_grad()
        rec = recs[impl]
        if impl in errors:
            rec.update(status="skipped", reason=errors[impl])
        else:
            _summarise(rec, samples[impl], device)
            rec.update(timer=timer_name(device), round_time_s=round_time_s)
    steps.clear()
    _release(device)


def pointwise_record(case: LossCase, impl: str, n: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """The fields of a pointwise record known before measuring (status "ok" until it fails)."""
    return {
        "loss": case.name, "family": "pointwise", "impl": impl, "n": n, "shape": [n],
        "shape_label": size_label(n), "dtype": dtype_name(dtype), "device": device.type,
        "baseline": case.torch_label if impl != "fastloss" else "fastloss.functional",
        "bytes_moved": bytes_moved(n, dtype), "status": "ok", "reason": None,
    }


def measure(case: LossCase | str, impl: str, n: int, dtype: torch.dtype, device: torch.device,
            repeat: int, warmup: int = 3, inputs: tuple[Tensor, Tensor] | None = None,
            round_time_s: float = DEFAULT_ROUND_TIME_S) -> dict[str, Any]:
    """Time and size one (loss, implementation, N, dtype) alone, over ``repeat`` rounds of
    :func:`time_round`. Never raises for a failing implementation: the record then has status
    "skipped" and the reason. (``python -m fastloss bench`` times the implementations interleaved:
    :func:`measure_group`.)"""
    case = loss_case(case) if isinstance(case, str) else case
    device = torch.device(device)
    rec = pointwise_record(case, impl, n, dtype, device)

    def make() -> FwdBwd:
        x, y = inputs if inputs is not None else make_inputs(case, n, dtype, device)
        return FwdBwd(case.impl(impl), x, y)

    measure_group({impl: make}, {impl: rec}, device, repeat, warmup, round_time_s)
    return rec


def shaped_record(case: ShapedCase, impl: str, shape: Sequence[int], dtype: torch.dtype,
                  device: torch.device) -> dict[str, Any]:
    """The fields of a row / embedding record known before measuring (status "ok" until it fails)."""
    shape = tuple(int(d) for d in shape)
    dims = {"n": shape[0], "v": shape[1]} if case.family == "row" else {"b": shape[0], "dim": shape[1]}
    rec: dict[str, Any] = {
        "loss": case.name, "family": case.family, "impl": impl, **dims, "shape": list(shape),
        "shape_label": shape_label(shape), "dtype": dtype_name(dtype), "device": device.type,
        "baseline": {"fastloss": "fastloss.functional", "liger": "Liger-Kernel LigerCrossEntropyLoss"}
        .get(impl, case.torch_label),
        "bytes_moved": case.bytes_moved(shape, dtype), "status": "ok", "reason": None,
    }
    if case.family == "row":
        rec["passes"] = row_passes(shape[1])
        rec["kernel_single_pass"] = row_single_pass(shape, dtype)
    if case.flops is not None:
        rec["flops_model"] = case.flops(shape)
    return rec


def _shaped_maker(case: ShapedCase, impl: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                  inputs: tuple[Tensor, ...] | None) -> Callable[[], GradStep]:
    def make() -> GradStep:
        fn = case.impl(impl, device)
        ops = inputs if inputs is not None else case.make_inputs(tuple(shape), dtype, device)
        if impl == "liger":  # overwrites the logits with their gradient: keep the shared ones
            ops = (ops[0].detach().clone().requires_grad_(), *ops[1:])
        return GradStep(fn, ops, autograd_grad=case.autograd_grad)

    return make


def measure_shaped(case: ShapedCase | str, impl: str, shape: Sequence[int], dtype: torch.dtype,
                   device: torch.device, repeat: int, warmup: int = 3,
                   inputs: tuple[Tensor, ...] | None = None,
                   round_time_s: float = DEFAULT_ROUND_TIME_S) -> dict[str, Any]:
    """Time and size one (row / embedding loss, implementation, shape, dtype) alone, over
    ``repeat`` rounds. Never raises for a failing implementation: the record then has status
    "skipped" and the reason ("OOM" when the device ran out of memory)."""
    case = shaped_case(case) if isinstance(case, str) else case
    device = torch.device(device)
    rec = shaped_record(case, impl, shape, dtype, device)
    measure_group({impl: _shaped_maker(case, impl, shape, dtype, device, inputs)}, {impl: rec}, device,
                  repeat, warmup, round_time_s)
    _add_tflops(rec)
    return rec


def _add_tflops(rec: dict[str, Any]) -> None:
    if rec.get("status") == "ok" and rec.get("flops_model"):
        rec["tflops"] = rec["flops_model"] / rec["median_s"] / 1e12


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); the median three times for a single value."""
    med = statistics.median(values)
    if len(values) < 2:
        return med, med, med
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], med, q[2]


def _summarise(rec: dict[str, Any], times: Sequence[float] | Sequence[Sequence[float]],
               device: torch.device) -> None:
    """Median, quartiles, extremes, GB/s and share of the copy bandwidth into ``rec``.

    When ``times`` is a list of rounds (:func:`interleave`), the median and quartiles are those of
    the rounds' medians (each round weighs the same, however many samples the timer took in it:
    a round slowed down by a busy machine counts once) and ``round_medians_s`` keeps them; the
    extremes are over every sample.
    """
    rounds = [list(r) for r in times] if times and isinstance(times[0], (list, tuple)) else None
    flat = [t for r in rounds for t in r] if rounds is not None else list(times)
    q1, med, q3 = _quartiles([statistics.median(r) for r in rounds] if rounds is not None else flat)
    copy = copy_bandwidth(device)
    rec.update(
        median_s=med, min_s=min(flat), max_s=max(flat), q1_s=q1, q3_s=q3, repeat=len(flat),
        gbps=rec["bytes_moved"] / med / 1e9 if rec.get("bytes_moved") else None, copy_gbps=copy / 1e9,
        copy_share=rec["bytes_moved"] / med / copy if rec.get("bytes_moved") else None,
    )
    if rounds is not None:
        rec.update(rounds=len(rounds), round_medians_s=[statistics.median(r) for r in rounds])


def device_info(device: torch.device) -> dict[str, Any]:
    """Device name and the versions that matter for reading a benchmark."""
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "fastloss": fastloss.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "backend": fastloss.get_backend(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - a broken triton install is reported, not fatal
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, sm_count=props.multi_processor_count,
            memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------

def _ms(rec: dict | None) -> str:
    """The median in ms (3 significant digits), with half the interquartile range as a % of it."""
    if not rec or rec.get("status") != "ok" or rec.get("median_s") is None:
        return "-"
    med = rec["median_s"]
    text = f"{med * 1e3:.3g}"
    if rec.get("q1_s") is not None and rec.get("q3_s") is not None and med > 0:
        text += f" ±{50 * (rec['q3_s'] - rec['q1_s']) / med:.0f}%"
    return text


def _mib(rec: dict | None) -> str:
    if not rec or rec.get("status") != "ok" or rec.get("peak_mem_bytes") is None:
        return "-"
    return f"{rec['peak_mem_bytes'] / 2**20:.0f}"


def _pct(rec: dict | None) -> str:
    if not rec or rec.get("status") != "ok" or rec.get("copy_share") is None:
        return "-"
    return f"{100 * rec['copy_share']:.0f}%"


def _gbps(rec: dict | None) -> str:
    return f"{rec['gbps']:.0f}" if rec and rec.get("status") == "ok" and rec.get("gbps") else "-"


def _tflops(rec: dict | None) -> str:
    if not rec or rec.get("status") != "ok" or not rec.get("median_s") or not rec.get("flops_model"):
        return "-"
    return f"{rec['flops_model'] / rec['median_s'] / 1e12:.3g}"


def _ratio(num: dict | None, den: dict | None, key: str = "median_s") -> float | None:
    if not num or not den or num.get("status") != "ok" or den.get("status") != "ok":
        return None
    a, b = num.get(key), den.get(key)
    return b / a if a and b is not None else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def ratio_stats(fl: dict | None, other: dict | None) -> tuple[float, float, float] | None:
    """(median, q1, q3) of ``other``'s time over fastloss's time: > 1 means fastloss is faster.

    When both records have per-round medians of the same rounds (timed interleaved), the ratio of
    each round and their median and quartiles; otherwise the ratio of the medians, with the
    extreme ratios of the quartiles (other's q1 / fastloss's q3, other's q3 / fastloss's q1) as its
    spread (no spread when the records have no quartiles). None when either was not measured.
    """
    if not fl or not other or fl.get("status") != "ok" or other.get("status") != "ok":
        return None
    if not fl.get("median_s") or other.get("median_s") is None:
        return None
    a, b = fl.get("round_medians_s"), other.get("round_medians_s")
    if a and b and len(a) == len(b) and all(x > 0 for x in a):
        q1, med, q3 = _quartiles([y / x for x, y in zip(a, b)])
        return med, q1, q3
    med = other["median_s"] / fl["median_s"]
    if fl.get("q1_s") and fl.get("q3_s") and other.get("q1_s") is not None and other.get("q3_s") is not None:
        return med, other["q1_s"] / fl["q3_s"], other["q3_s"] / fl["q1_s"]
    return med, med, med


def is_noisy(stats: tuple[float, float, float] | None) -> bool:
    """Whether a ratio's interquartile range is wider than NOISY_SPREAD of its median."""
    return stats is not None and stats[0] > 0 and (stats[2] - stats[1]) / stats[0] > NOISY_SPREAD


def _ratio_cell(stats: tuple[float, float, float] | None) -> str:
    """``1.32x (1.28-1.35)``: the median ratio and its interquartile range; ``?`` appended when the
    range is too wide for the ratio to mean anything (:func:`is_noisy`)."""
    if stats is None:
        return "-"
    med, lo, hi = stats
    text = f"{med:.2f}x" if lo == hi else f"{med:.2f}x ({lo:.2f}-{hi:.2f})"
    return text + " ?" if is_noisy(stats) else text


def _drop_empty_columns(header: list[str], rows: list[list[str]], keep: int = 2
                        ) -> tuple[list[str], list[list[str]]]:
    """The table without the columns (after the first ``keep``) that are "-" in every row."""
    cols = [i for i in range(len(header))
            if i < keep or not rows or any(row[i] not in ("-", "") for row in rows)]
    return [header[i] for i in cols], [[row[i] for i in cols] for row in rows]


#: Column names of each implementation: (in "<name> ms" and "vs <name>", in "a/b/c" columns).
_IMPL_NAMES = {"fastloss": ("fastloss", "fl"), "fastloss_inplace": ("inplace", "inplace"),
               "torch": ("torch", "torch"), "torch.compile": ("compile", "compile"),
               "liger": ("liger", "liger")}
_DIM_HEADER = {"pointwise": "N", "row": "N x V", "embedding": "B x D"}
_FAMILY_ORDER = ("pointwise", "row", "embedding")
#: What each table measures, under its heading (family, metric).
_SECTION_NOTES = {
    ("pointwise", "gbps"): "Pointwise losses, x and y of N elements, step `x.grad = None; loss(x, y).backward()`; "
                           "GB/s and % copy under 3 x N x itemsize (read x, read y, write grad).",
    ("row", "gbps"): "Row family, logits N x V and int64 targets, step `torch.autograd.grad(loss(x, t), x)`; "
                     "GB/s and % copy under P x N x V x itemsize + 8 N, P = 2 when V <= 32768 (a row fits "
                     "on chip: read logits, write grad), else 3. focal_loss is the softmax focal loss "
                     "(alpha 0.25, gamma 2) against the classic cross_entropy(reduction='none') composition.",
    ("embedding", "gbps"): "Embedding pair losses, k operands of B x D (contrastive k = 2 with margin 2 against "
                           "the seed composition, triplet k = 3 against F.triplet_margin_loss), step "
                           "`.grad = None; loss.backward()`; GB/s and % copy under 2 x k x B x D x itemsize.",
    ("embedding", "tflops"): "InfoNCE, query and key B x D, temperature 0.07, against the naive formula "
                             "(normalize, q @ k.T / t, cross_entropy with arange labels: a B x B matrix); "
                             "TFLOP/s under 6 x B^2 x D (the three B x B x D products).",
}


def _parse_shape_field(value: Any) -> list[int | None] | None:
    """A record's shape as a list (None for an unknown side), from a list or a string such as
    "(8192, 32000)" (a pytest parameter); None when there is none."""
    if isinstance(value, str):
        value = [p for p in value.replace("x", ",").strip("()[] ").split(",") if p.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        return None
    try:
        return [None if v is None else int(v) for v in value]
    except (TypeError, ValueError):
        return None


def normalize_record(rec: dict) -> dict:
    """A record from any source (this CLI, bench/bench_*.py ``extra_info`` or their skip lists) with
    ``family``, ``shape`` (a list), ``shape_label`` and a canonical loss name."""
    r = dict(rec)
    shape = _parse_shape_field(r.get("shape"))
    if shape is None:
        if "v" in r:
            shape = [r.get("n"), r["v"]]
        elif "b" in r:
            shape = [r["b"], r.get("dim")]
        elif r.get("n") is not None:
            shape = [r["n"]]
    loss = r.get("loss")
    fam = r.get("family")
    if fam is None:
        if "v" in r or (loss in ("cross_entropy", "focal", "focal_loss") and shape and len(shape) == 2):
            fam = "row"
        elif "b" in r or loss in EMBEDDING_LOSSES:
            fam = "embedding"
        else:
            fam = "pointwise"
    if isinstance(loss, str):
        if fam == "row" and loss == "focal":  # bench/bench_softmax.py's name of the softmax focal loss
            loss = "focal_loss"
        else:
            try:
                loss = resolve_loss(loss)
            except ValueError:
                pass
    if shape and len(shape) == 2 and None not in shape:
        r.setdefault("n" if fam == "row" else "b", shape[0])
        r.setdefault("v" if fam == "row" else "dim", shape[1])
    r.update(loss=loss, family=fam, shape=shape)
    if shape and None not in shape:
        r["shape_label"] = size_label(shape[0]) if len(shape) == 1 else shape_label(shape)
    return r


def _metric(rec: dict) -> str:
    return "tflops" if rec.get("flops_model") or rec.get("loss") == "info_nce" else "gbps"


def _shape_key(rec: dict) -> tuple:
    return tuple(rec.get("shape") or (rec.get("n"),))


def group_records(records: Iterable[dict]) -> dict[tuple[str, tuple, str], dict[str, dict]]:
    """{(loss, shape, dtype): {impl: record}} in first-seen order (records normalised first)."""
    groups: dict[tuple[str, tuple, str], dict[str, dict]] = {}
    for r in records:
        r = normalize_record(r)
        groups.setdefault((r["loss"], _shape_key(r), r["dtype"]), {})[r["impl"]] = r
    return groups


def sort_records(records: Iterable[dict]) -> list[dict]:
    """Normalised records ordered by family, loss (report order), shape, dtype, implementation."""
    losses, impls = list(ALL_LOSSES), list(ALL_IMPLS)
    dtypes = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}

    def key(r: dict) -> tuple:
        return (_FAMILY_ORDER.index(r["family"]) if r["family"] in _FAMILY_ORDER else 9,
                losses.index(r["loss"]) if r.get("loss") in losses else 99,
                tuple(d or 0 for d in _shape_key(r)), dtypes.get(r.get("dtype"), 9),
                impls.index(r["impl"]) if r.get("impl") in impls else 9)

    return sorted((normalize_record(r) for r in records), key=key)


def _impls_in(groups: dict[tuple[str, tuple, str], dict[str, dict]]) -> list[str]:
    seen = {i for by in groups.values() for i in by}
    return [i for i in ALL_IMPLS if i in seen] + sorted(i for i in seen if i not in ALL_IMPLS)


def _table(groups: dict[tuple[str, tuple, str], dict[str, dict]], cuda: bool, bandwidth: bool = True,
           family: str = "pointwise", metric: str = "gbps") -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per (loss, shape, dtype) group, one column per implementation present."""
    impls = _impls_in(groups)
    others = [i for i in impls if i != "fastloss"]
    names = [_IMPL_NAMES.get(i, (i, i)) for i in impls]
    short = "/".join(s for _, s in names)
    header = [_DIM_HEADER.get(family, "shape"), "dtype"] + [f"{n} ms" for n, _ in names]
    header += [f"vs {_IMPL_NAMES.get(i, (i, i))[0]}" for i in others] + [f"peak MiB {short}"]
    if bandwidth:
        header += (["fastloss TFLOP/s", f"TFLOP/s {short}"] if metric == "tflops"
                   else ["fastloss GB/s", f"% copy BW {short}"])
    rows = []
    for (_loss, shape, dtype), by in groups.items():
        fl = by.get("fastloss")
        recs = [by.get(i) for i in impls]
        label = size_label(shape[0]) if len(shape) == 1 else shape_label(shape)
        row = [label, dtype] + [_ms(r) for r in recs] + [_ratio_cell(ratio_stats(fl, by.get(i))) for i in others]
        row.append(" / ".join(_mib(r) for r in recs) if cuda else "-")
        if bandwidth:
            if metric == "tflops":
                row += [_tflops(fl), " / ".join(_tflops(r) for r in recs)]
            else:
                row += [_gbps(fl), " / ".join(_pct(r) for r in recs)]
        rows.append(row)
    return _drop_empty_columns(header, rows)


def _skips(groups: dict[tuple[str, tuple, str], dict[str, dict]]) -> list[str]:
    """One line per skip reason, naming the (loss shape dtype: implementations) it hit."""
    by_reason: dict[str, dict[str, list[str]]] = {}
    whole: dict[str, int] = {}
    for (loss, shape, dtype), by in groups.items():
        for impl, r in by.items():
            if r.get("status") != "ok":
                key = f"{loss} {size_label(shape[0]) if len(shape) == 1 else shape_label(shape)} {dtype}"
                whole[key] = len(by)
                by_reason.setdefault(str(r.get("reason")), {}).setdefault(key, []).append(impl)
    lines = []
    for reason, hit in by_reason.items():
        what = "; ".join(k if len(v) == whole[k] else f"{k} ({', '.join(v)})" for k, v in hit.items())
        lines.append(f"skipped ({reason}): {what}")
    return lines


def _focal_target(groups: dict[tuple[str, tuple, str], dict[str, dict]]) -> list[str]:
    """The issue's target for the sigmoid focal loss: >= 4x faster than torchvision eager, <= 1/3 memory."""
    lines = []
    for (loss, shape, dtype), by in groups.items():
        fl, tn = by.get("fastloss"), by.get("torch")
        if loss != "sigmoid_focal" or not fl or fl.get("device") != "cuda":
            continue
        speed = _ratio(fl, tn)
        mem = None
        if fl and tn and fl.get("peak_mem_bytes") is not None and tn.get("peak_mem_bytes"):
            mem = fl["peak_mem_bytes"] / tn["peak_mem_bytes"]
        if speed is None:
            continue
        ok = speed >= 4 and (mem is None or mem <= 1 / 3)
        mem_txt = "peak memory n/a" if mem is None else f"{mem:.2f}x the peak memory (target <= 0.33x)"
        lines.append(f"sigmoid_focal {size_label(shape[0])} {dtype}: fastloss {speed:.1f}x faster than "
                     f"{tn['baseline']} eager (target >= 4x), {mem_txt}: {'MET' if ok else 'NOT MET'}")
    return lines


def _baseline_of(loss: str, records: Iterable[dict]) -> str:
    for r in records:
        if r.get("impl") in ("torch", "torch.compile") and r.get("baseline"):
            return r["baseline"]
    try:
        return torch_label(loss)
    except ValueError:
        return "?"


def _sections(records: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """Normalised records by (family, metric), in report order."""
    out: dict[tuple[str, str], list[dict]] = {}
    for r in sort_records(records):
        out.setdefault((r["family"], _metric(r)), []).append(r)
    return out


_MODEL_TEXT = {
    "pointwise": "pointwise 3*N*itemsize",
    "row": "row P*N*V*itemsize + 8*N (P = 2 if V <= 32768 else 3)",
    "embedding": "embedding 2*k*B*D*itemsize (k operands); info_nce TFLOP/s of 6*B^2*D",
}


def header_notes(meta: dict) -> list[str]:
    """The lines that say how to read the tables: the timer, what the fastloss column is on this
    device, what a ratio is and when it is marked too noisy."""
    dev, conf = meta.get("device", {}), meta.get("config", {})
    lines = []
    if conf.get("timer"):
        threads = f", {dev['threads']} torch thread(s)" if dev.get("threads") else ""
        lines.append(f"timer: {conf['timer']}; the implementations of a row take turns, "
                     f"{conf.get('repeat', '?')} interleaved rounds of ~{conf.get('round_time_s', '?')} s "
                     f"each{threads}")
    lines.append("ms: median over the rounds of each round's median time per step, ±half their interquartile "
                 "range as a % of the median")
    if dev.get("type") == "cpu" and (dev.get("threads") or 1) > 1:
        lines.append(f"(on a busy machine, --threads 1 steadies the times: with {dev['threads']} threads an op "
                     "waits for its slowest thread)")
    if dev.get("type") and dev.get("type") != "cuda":
        path = ("the Triton kernels in Triton's interpreter" if dev.get("backend") == "triton"
                else "fastloss's PyTorch path (the Triton kernels run on CUDA only)")
        lines.append(f"on {dev['type']} the fastloss column times {path}")
    lines.append("vs X: X's time / fastloss's time, the median over rounds (its interquartile range): "
                 "> 1 means fastloss is faster, < 1 slower; '?' marks a ratio whose range is wider "
                 f"than {NOISY_SPREAD:.0%} of it: too noisy to read, re-run on a quieter machine")
    return lines


def format_text(records: Sequence[dict], meta: dict | None = None) -> str:
    """Plain-text tables, one per loss, for the terminal."""
    records = [normalize_record(r) for r in records]
    by_loss: dict[str, list[dict]] = {}
    for r in records:
        by_loss.setdefault(r["loss"], []).append(r)
    cuda = any(r.get("device") == "cuda" for r in records)
    out = []
    if meta:
        dev = meta.get("device", {})
        copy = meta.get("copy_gbps")
        out.append(f"fastloss bench on {dev.get('name', '?')} ({dev.get('type', '?')}), torch "
                   f"{dev.get('torch')}, triton {dev.get('triton')}, copy bandwidth "
                   f"{copy:.0f} GB/s" if copy else "")
        families = [f for f in _FAMILY_ORDER if any(r["family"] == f for r in records)]
        out.append("fwd+bwd, reduction='mean'; bytes models: " + "; ".join(_MODEL_TEXT[f] for f in families))
        out += header_notes(meta)
    for loss, recs in by_loss.items():
        groups = group_records(recs)
        family, metric = recs[0]["family"], _metric(recs[0])
        out.append("")
        out.append(f"== {loss} (torch baseline: {_baseline_of(loss, recs)}) ==")
        header, rows = _table(groups, cuda, bandwidth=cuda, family=family, metric=metric)
        rows = [header] + rows
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            out.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        out.extend("  " + s for s in _skips(groups))
        out.extend("  " + s for s in _focal_target(groups))
    return "\n".join(out).lstrip("\n")


def format_markdown(records: Sequence[dict], title: str | None = None) -> str:
    """Markdown: one table per family (InfoNCE apart, in TFLOP/s), one row per (loss, shape, dtype)
    group, one column per implementation present; skips and the sigmoid-focal target below."""
    cuda = any(r.get("device") == "cuda" for r in records)
    out = [f"### {title}", ""] if title else []
    notes: list[str] = []
    for (family, metric), recs in _sections(records).items():
        groups = group_records(recs)
        note = _SECTION_NOTES.get((family, metric))
        if note:
            out += [note, ""]
        header, rows = _table(groups, cuda, family=family, metric=metric)
        header = ["loss"] + header
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" if i < 3 else "--:" for i in range(len(header))) + "|")
        for (loss, _shape, _d), row in zip(groups, rows):
            out.append("| " + " | ".join([loss] + row) + " |")
        out.append("")
        notes += _skips(groups) + _focal_target(groups)
    baselines = sorted({r["baseline"] for r in records if r.get("loss") == "sigmoid_focal"
                        and r.get("impl") not in ("fastloss", None) and r.get("baseline")})
    notes += [f"sigmoid_focal torch baseline: {b}" for b in baselines]
    if notes:
        out.extend(f"- {s}" for s in notes)
    return "\n".join(out).rstrip("\n") + "\n"


#: Bar colours of the implementations in the bench plot.
_PLOT_COLORS = {"fastloss": "#d62728", "fastloss_inplace": "#ff9896", "torch": "#7f7f7f",
                "torch.compile": "#1f77b4", "liger": "#2ca02c"}
#: A panel whose largest bar is more than this many times its smallest gets a log scale.
LOG_SCALE_RANGE = 10.0


def _plot_value(rec: dict, quantity: str) -> float | None:
    """The plotted value of a record ("ms", "gbps" or "tflops"), None when it was not measured."""
    if not rec or rec.get("status") != "ok" or not rec.get("median_s"):
        return None
    if quantity == "ms":
        return rec["median_s"] * 1e3
    if quantity == "tflops":
        return rec["flops_model"] / rec["median_s"] / 1e12 if rec.get("flops_model") else None
    return rec.get("gbps")


def _bar_label(value: float) -> str:
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


_QUANTITY_LABEL = {"ms": "median time, ms (lower is better)",
                   "gbps": "GB/s under the bytes model (higher is better)",
                   "tflops": "TFLOP/s of 6 B^2 D (higher is better)"}


def make_bench_figure(records: Sequence[dict], meta: dict | None, plt):
    """The bench figure: one panel per (family, shape, dtype), a group of bars per loss, one bar per
    implementation measured there, each labelled with its value.

    On CUDA the bars are achieved GB/s under the family's bytes model (TFLOP/s for InfoNCE) with the
    copy bandwidth as a dashed line; elsewhere they are median times in ms (a CPU's copy bandwidth,
    measured on a buffer larger than its caches, is no ceiling for inputs that fit in them). A panel
    whose values span more than LOG_SCALE_RANGE gets a log scale. Implementations with no measurement
    in a panel get no legend entry; a skipped measurement is marked "skipped" where its bar would be.
    """
    panels: dict[tuple[str, str, str, str], dict[str, dict[str, dict]]] = {}
    for r in sort_records(records):
        key = (r["family"], _metric(r), r.get("shape_label") or "?", r["dtype"])
        panels.setdefault(key, {}).setdefault(r["loss"], {})[r["impl"]] = r
    cuda = any(r.get("device") == "cuda" for r in records)
    k = max(1, len(panels))
    cols = min(3, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.5 * cols, 8.5), 4.2 * rows + 0.6), squeeze=False,
                             layout="constrained")
    handles: dict[str, Any] = {}  # one legend for the figure: an entry per implementation with a bar
    for ax, ((family, metric, label, dtype), by_loss) in zip(axes.flat, panels.items()):
        quantity = metric if cuda else "ms"
        losses = list(by_loss)
        measured = [i for i in ALL_IMPLS if any(_plot_value(by.get(i), quantity) is not None
                                                for by in by_loss.values())]
        width = 0.8 / max(1, len(measured))
        values = []
        for j, impl in enumerate(measured):
            xs, heights, skipped = [], [], []
            for i, lo in enumerate(losses):
                x = i + (j - (len(measured) - 1) / 2) * width
                v = _plot_value(by_loss[lo].get(impl), quantity)
                if v is not None:
                    xs.append(x)
                    heights.append(v)
                elif impl in by_loss[lo]:
                    skipped.append(x)
            bars = ax.bar(xs, heights, width, label=impl, color=_PLOT_COLORS.get(impl))
            handles.setdefault(impl, bars)
            ax.bar_label(bars, labels=[_bar_label(v) for v in heights], fontsize=7, padding=2,
                         rotation=90 if len(measured) * len(losses) > 8 else 0)
            for x in skipped:
                ax.annotate("skipped", (x, 0), xytext=(0, 3), textcoords="offset points", xycoords=("data", "axes fraction"),
                            rotation=90, fontsize=6, ha="center", va="bottom", color="0.4")
            values += heights
        copy = next((r.get("copy_gbps") for lo in losses for r in by_loss[lo].values()
                     if r.get("copy_gbps")), None)
        if cuda and copy and quantity == "gbps":
            line = ax.axhline(copy, ls="--", color="k", lw=1, label=f"copy {copy:.0f} GB/s")
            handles.setdefault(f"device-to-device copy ({copy:.0f} GB/s)", line)
            values.append(copy)
        absent = {i: r.get("reason") for by in by_loss.values() for i, r in by.items() if i not in measured}
        if absent:
            ax.text(0.01, 0.98, "not measured: " + "; ".join(f"{i} ({why})" for i, why in absent.items()),
                    transform=ax.transAxes, ha="left", va="top", fontsize=7, color="0.35")
        if values and max(values) / min(values) > LOG_SCALE_RANGE:
            ax.set_yscale("log")
            ax.set_ylim(min(values) / 2, max(values) * 6)
        elif values:
            ax.set_ylim(0, max(values) * 1.3)
        ax.set_xticks(range(len(losses)), losses, rotation=20 if len(losses) > 3 else 0, fontsize=8)
        ax.set_ylabel(_QUANTITY_LABEL[quantity], fontsize=8)
        ax.set_title(f"{family}: {_DIM_HEADER.get(family, 'shape')} = {label}, {dtype}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    dev = (meta or {}).get("device", {})
    what = "achieved GB/s (TFLOP/s for InfoNCE)" if cuda else "median time per step"
    fig.suptitle(f"fastloss fwd+bwd, reduction='mean': {what}\non {dev.get('name', '?')} "
                 f"(torch {dev.get('torch', '?')}, triton {dev.get('triton', '?')})", fontsize=10)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles),
                   fontsize=9, frameon=False)
    return fig


def plot(records: Sequence[dict], path: str, meta: dict | None = None) -> None:
    """Write :func:`make_bench_figure` to ``path`` (PNG). Needs matplotlib."""
    plt = _pyplot()
    fig = make_bench_figure(records, meta, plt)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("fastloss bench --plot needs matplotlib: pip install fastloss[plot]") from None
    return plt


# --------------------------------------------------------------------------------------------
# The size sweep: python -m fastloss bench --sweep, bench/bench_overhead.py
# --------------------------------------------------------------------------------------------

#: Classes per row of cross_entropy and focal_loss in the sweep (size = rows x classes).
SWEEP_CLASSES = 8
#: Embedding width of contrastive in the sweep (size = pairs x width).
SWEEP_DIM = 16
#: Default sweep sizes (elements per operand): every third power of two.
SWEEP_SIZES = {"cpu": [2**k for k in range(5, 21, 3)], "cuda": [2**k for k in range(8, 27, 3)]}


def _combined_weights() -> tuple[float, float]:
    return 0.7, 0.3


@functools.cache
def _combined_module() -> torch.nn.Module:
    w_mse, w_l1 = _combined_weights()
    return fastloss.CombinedLoss({fastloss.MSELoss(): w_mse, fastloss.L1Loss(): w_l1})


def _fl_combined(x: Tensor, y: Tensor) -> Tensor:
    return _combined_module()(x, y)


def _torch_combined(x: Tensor, y: Tensor) -> Tensor:
    """The two torch.nn calls a CombinedLoss replaces: 0.7 * mse + 0.3 * l1."""
    w_mse, w_l1 = _combined_weights()
    return w_mse * F.mse_loss(x, y) + w_l1 * F.l1_loss(x, y)


@dataclasses.dataclass(frozen=True)
class SweepCase:
    """A loss of the size sweep: its fastloss call, its torch.nn call (or the naive composition
    where torch.nn has none), and how a size (elements per operand) becomes its operands."""

    name: str
    fastloss: Callable[..., Tensor]
    torch: Callable[..., Tensor]
    torch_label: str
    shape: Callable[[int], tuple[int, ...]]                      # size -> operand shape
    make_inputs: Callable[..., tuple[Tensor, ...]]               # (shape, dtype, device, seed) -> operands

    def impl(self, impl: str) -> Callable[..., Tensor]:
        if impl == "fastloss":
            return self.fastloss
        if impl == "torch":
            return self.torch
        raise ValueError(f"unknown sweep implementation {impl!r}; expected fastloss or torch")

    def step(self, impl: str, size: int, dtype: torch.dtype, device: torch.device, sync: bool = False,
             seed: int = 0) -> GradStep:
        """A training step of ``impl`` at ``size``: ``.grad = None; loss(*operands).backward()``."""
        ops = self.make_inputs(self.shape(size), dtype, torch.device(device), seed)
        return GradStep(self.impl(impl), ops, sync=sync)


def _flat(size: int) -> tuple[int, ...]:
    return (size,)


def _rows(width: int) -> Callable[[int], tuple[int, ...]]:
    def shape(size: int) -> tuple[int, ...]:
        return (max(1, size // width), width)

    return shape


def _pointwise_inputs(name: str) -> Callable[..., tuple[Tensor, ...]]:
    def make(shape: Sequence[int], dtype: torch.dtype, device: torch.device, seed: int = 0):
        return make_inputs(name, shape[0], dtype, device, seed)

    return make


def _sweep_cases() -> dict[str, SweepCase]:
    cases = {}
    for name in LOSSES:
        lc = loss_case(name)
        cases[name] = SweepCase(name, lc.fastloss, lc.torch, lc.torch_label, _flat, _pointwise_inputs(name))
    cases["cross_entropy"] = SweepCase(
        "cross_entropy", _fl_cross_entropy, _torch_cross_entropy, "torch.nn.functional.cross_entropy",
        _rows(SWEEP_CLASSES), _row_inputs)
    cases["focal_loss"] = SweepCase(
        "focal_loss", _fl_softmax_focal, _classic_softmax_focal,
        "ce = F.cross_entropy(reduction='none'); (0.25 (1 - exp(-ce))**2 ce).mean()",
        _rows(SWEEP_CLASSES), _row_inputs)
    cases["contrastive"] = SweepCase(
        "contrastive", _fl_contrastive, _seed_contrastive, "seed ContrastiveLoss (F.pairwise_distance, margin 2)",
        _rows(SWEEP_DIM), _embedding_inputs(2, label=True))
    cases["combined"] = SweepCase(
        "combined", _fl_combined, _torch_combined, "0.7 F.mse_loss + 0.3 F.l1_loss",
        _flat, _pointwise_inputs("mse"))
    return cases


#: The sweep's default losses, in report order, with what each is (the fastloss side).
SWEEP_LOSSES = {
    "mse": "mse_loss", "l1": "l1_loss", "huber": "huber_loss(delta=1)",
    "bce_with_logits": "binary_cross_entropy_with_logits",
    "cross_entropy": f"cross_entropy, {SWEEP_CLASSES} classes",
    "focal_loss": f"softmax focal_loss(alpha 0.25, gamma 2), {SWEEP_CLASSES} classes",
    "contrastive": f"contrastive_loss(margin 2), width {SWEEP_DIM}",
    "combined": "CombinedLoss(MSELoss 0.7, L1Loss 0.3)",
}
_SWEEP_ALIASES = {"focal": "focal_loss", "combinedloss": "combined", "combined_loss": "combined"}


def resolve_sweep_loss(name: str) -> str:
    """The sweep's name of a loss: "focal" is the softmax focal loss here, "combined" the
    CombinedLoss; any pointwise loss of ``python -m fastloss bench`` is accepted too."""
    key = name.strip().lower().replace("-", "_")
    key = _SWEEP_ALIASES.get(key, key)
    cases = _sweep_cases()
    if key not in cases:
        try:
            key = resolve_loss(key)
        except ValueError:
            key = None
    if key not in cases:
        raise ValueError(f"unknown sweep loss {name!r}; expected one of {', '.join(cases)}")
    return key


def sweep_case(name: str) -> SweepCase:
    """The SweepCase of a loss name (see :func:`resolve_sweep_loss`)."""
    return _sweep_cases()[resolve_sweep_loss(name)]


def sweep_record(case: SweepCase, impl: str, size: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    shape = case.shape(size)
    return {"loss": case.name, "family": "sweep", "impl": impl, "size": size, "shape": list(shape),
            "shape_label": "x".join(str(d) for d in shape), "dtype": dtype_name(dtype), "device": device.type,
            "baseline": "fastloss" if impl == "fastloss" else case.torch_label, "status": "ok", "reason": None}


def run_sweep(losses: Sequence[str], sizes: Sequence[int], dtype: torch.dtype, device: torch.device,
              rounds: int, warmup: int = 3, round_time_s: float = DEFAULT_ROUND_TIME_S,
              progress: Progress | None = None, time_limit: float | None = None) -> list[dict]:
    """fastloss and torch.nn (or the naive composition), interleaved (:func:`measure_group`), per
    (loss, size): records in that order. After ``time_limit`` seconds the rest are skipped."""
    t0 = time.perf_counter()
    records: list[dict] = []
    for loss in losses:
        case = sweep_case(loss)
        for size in sizes:
            recs = {impl: sweep_record(case, impl, size, dtype, device) for impl in ("fastloss", "torch")}
            if time_limit is not None and time.perf_counter() - t0 > time_limit:
                for rec in recs.values():
                    rec.update(status="skipped", reason=f"time limit of {time_limit:g} s reached")
            else:
                makers = {impl: functools.partial(case.step, impl, size, dtype, device) for impl in recs}
                measure_group(makers, recs, device, rounds, warmup, round_time_s)
            records += recs.values()
            if progress:
                progress.update(f"{case.name} {size_label(size)}")
    return records


def sweep_ratios(records: Iterable[dict]) -> list[dict]:
    """One entry per (loss, size, dtype): torch's time / fastloss's time (> 1: fastloss faster),
    its quartiles over the rounds, whether it is too noisy to read, and the two medians."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by.setdefault((r["loss"], r["size"], r["dtype"]), {})[r["impl"]] = r
    out = []
    for (loss, size, dtype), impls in by.items():
        fl, tn = impls.get("fastloss"), impls.get("torch")
        stats = ratio_stats(fl, tn)
        out.append({
            "loss": loss, "size": size, "dtype": dtype,
            "ratio": stats[0] if stats else None, "ratio_q1": stats[1] if stats else None,
            "ratio_q3": stats[2] if stats else None, "noisy": is_noisy(stats),
            "fastloss_median_s": fl.get("median_s") if fl else None,
            "torch_median_s": tn.get("median_s") if tn else None,
        })
    return out


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    return f"{us:.3g}" if us < 1e3 else f"{us:.0f}"


def format_sweep(records: Sequence[dict], meta: dict | None = None) -> str:
    """The sweep as text: the ratio (torch / fastloss, with its interquartile range) per size and
    loss, then the two medians in microseconds."""
    ratios = sweep_ratios(records)
    losses = list(dict.fromkeys(r["loss"] for r in ratios))
    sizes = sorted({r["size"] for r in ratios})
    cell = {(r["loss"], r["size"]): r for r in ratios}
    out = []
    if meta:
        dev = meta.get("device", {})
        threads = f", {dev['threads']} thread(s)" if dev.get("threads") else ""
        out.append(f"fastloss bench --sweep on {dev.get('name', '?')} ({dev.get('type', '?')}{threads}), "
                   f"torch {dev.get('torch')}, triton {dev.get('triton')}, {meta.get('config', {}).get('dtype')}")
        out.append("fwd+bwd (.grad = None; loss.backward()) against size = elements per operand; baselines: "
                   + "; ".join(f"{lo}: {lab}" for lo, lab in (meta.get("baselines") or {}).items()))
        out += header_notes(meta)
    skipped = [r for r in records if r.get("status") != "ok"]

    def table(title: str, fmt: Callable[[dict], str]) -> None:
        rows = [["size"] + losses]
        rows += [[size_label(n)] + [fmt(cell[(lo, n)]) if (lo, n) in cell else "-" for lo in losses]
                 for n in sizes]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out.extend(["", title])
        out.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)

    table("torch time / fastloss time (> 1: fastloss faster), median over rounds (interquartile range)",
          lambda r: _ratio_cell((r["ratio"], r["ratio_q1"], r["ratio_q3"]) if r["ratio"] is not None else None))
    table("median us, fastloss / torch", lambda r: f"{_us(r['fastloss_median_s'])} / {_us(r['torch_median_s'])}")
    if skipped:
        out.append("")
        out.extend(f"skipped: {r['loss']} {size_label(r['size'])} {r['impl']}: {r['reason']}" for r in skipped)
    return "\n".join(out).lstrip("\n")


def make_sweep_figure(records: Sequence[dict], meta: dict | None, plt):
    """One log-log panel per loss (median time against size, fastloss and torch, the interquartile
    range shaded) and a last panel with every loss's ratio torch / fastloss against size (> 1:
    fastloss faster; bars: interquartile range over the rounds; hollow markers: too noisy)."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    # minor ticks: label 2 and 5 of each decade only (every one crowds a panel spanning decades)
    sparse = FuncFormatter(lambda v, _pos: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else "")
    by_loss: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        if r.get("status") == "ok":
            by_loss.setdefault(r["loss"], {}).setdefault(r["impl"], []).append(r)
    ratios = sweep_ratios(records)
    k = len(by_loss) + 1
    cols = min(3, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows + 0.6), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax, (loss, impls) in zip(flat, by_loss.items()):
        for impl, recs in impls.items():
            recs = sorted(recs, key=lambda r: r["size"])
            xs = [r["size"] for r in recs]
            label = "fastloss" if impl == "fastloss" else recs[0].get("baseline", impl)
            ax.plot(xs, [r["median_s"] * 1e6 for r in recs], "o-", ms=3, label=label[:48],
                    color=_PLOT_COLORS.get(impl))
            ax.fill_between(xs, [r["q1_s"] * 1e6 for r in recs], [r["q3_s"] * 1e6 for r in recs],
                            color=_PLOT_COLORS.get(impl), alpha=0.2, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_title(loss, fontsize=10)
        ax.set_xlabel("elements per operand", fontsize=8)
        ax.set_ylabel("median fwd+bwd, us", fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    ax = flat[len(by_loss)]
    for i, loss in enumerate(by_loss):
        pts = sorted((r for r in ratios if r["loss"] == loss and r["ratio"] is not None), key=lambda r: r["size"])
        if not pts:
            continue
        color = f"C{i % 10}"
        xs = [r["size"] for r in pts]
        ys = [r["ratio"] for r in pts]
        err = [[y - r["ratio_q1"] for y, r in zip(ys, pts)], [r["ratio_q3"] - y for y, r in zip(ys, pts)]]
        ax.errorbar(xs, ys, yerr=err, fmt="-", color=color, lw=1, capsize=2, label=loss)
        for x, y, r in zip(xs, ys, pts):
            ax.plot([x], [y], "o", ms=4, color=color, mfc="none" if r["noisy"] else color)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)  # ratios span a decade or so: label every tick
    ax.tick_params(axis="y", which="both", labelsize=7)
    ax.set_title("torch time / fastloss time (> 1: fastloss faster)", fontsize=10)
    ax.set_xlabel("elements per operand", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncols=2)
    for extra in flat[k:]:
        extra.axis("off")
    dev = (meta or {}).get("device", {})
    fig.suptitle(f"fastloss vs torch.nn, forward + backward against size, on {dev.get('name', '?')} "
                 f"({dev.get('type', '?')}, torch {dev.get('torch', '?')})", fontsize=10)
    return fig


def plot_sweep(records: Sequence[dict], path: str, meta: dict | None = None) -> None:
    """Write :func:`make_sweep_figure` to ``path`` (PNG). Needs matplotlib."""
    plt = _pyplot()
    fig = make_sweep_figure(records, meta, plt)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_main(args: argparse.Namespace, device: torch.device) -> int:
    """``python -m fastloss bench --sweep``: the ratio table on stdout, progress on stderr."""
    try:
        losses = [resolve_sweep_loss(s) for s in _split_list(args.losses)] or list(SWEEP_LOSSES)
        sizes = [parse_size(s) for s in _split_list(args.sizes)] or SWEEP_SIZES[
            "cuda" if device.type == "cuda" else "cpu"]
        dtypes = [parse_dtype(s) for s in _split_list(args.dtypes)] or [torch.float32]
        losses, sizes = list(dict.fromkeys(losses)), sorted(set(sizes))
        if len(set(dtypes)) > 1:
            raise ValueError("--sweep takes one dtype")
        if getattr(args, "shapes", None) or getattr(args, "embed_shapes", None) or args.impls:
            raise ValueError("--sweep sets its own shapes and implementations (fastloss, torch)")
    except ValueError as exc:
        raise SystemExit(f"fastloss bench --sweep: {exc}") from None
    rounds = args.repeat if args.repeat is not None else DEFAULT_ROUNDS["cuda" if device.type == "cuda" else "cpu"]
    warmup = args.warmup if args.warmup is not None else 3
    round_time_s = getattr(args, "round_time", None) or DEFAULT_ROUND_TIME_S
    if rounds < 1 or warmup < 0 or round_time_s <= 0:
        raise SystemExit("fastloss bench: --repeat must be >= 1, --warmup >= 0 and --round-time > 0")
    if args.plot:
        _pyplot()  # fail before measuring, not after
    progress = None if args.quiet else Progress(len(losses) * len(sizes), desc="fastloss sweep")
    started = time.perf_counter()
    records = run_sweep(losses, sizes, dtypes[0], device, rounds, warmup, round_time_s, progress,
                        time_limit=args.time_limit)
    if progress:
        progress.close()
    cases = {lo: sweep_case(lo) for lo in losses}
    meta = {
        "schema": "fastloss-sweep/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "baselines": {lo: c.torch_label for lo, c in cases.items()},
        "config": {"losses": losses, "sizes": sizes, "shapes": {lo: {str(n): list(c.shape(n)) for n in sizes}
                                                                for lo, c in cases.items()},
                   "dtype": dtype_name(dtypes[0]), "repeat": rounds, "rounds": rounds,
                   "round_time_s": round_time_s, "warmup": warmup, "interleaved": True,
                   "timer": timer_name(device), "noisy_spread": NOISY_SPREAD, "reduction": "mean",
                   "step": ".grad = None; loss(*operands).backward()", "time_limit_s": args.time_limit},
        "elapsed_s": time.perf_counter() - started,
    }
    print(format_sweep(records, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "results": records, "ratios": sweep_ratios(records)}, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_sweep(records, args.plot, meta)
        print(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------------------------
# The CLI: python -m fastloss bench
# --------------------------------------------------------------------------------------------

def default_plan(device: torch.device) -> tuple[list[int], list[torch.dtype], int, int]:
    """(sizes, dtypes, interleaved rounds, warmup calls) suited to the device."""
    if device.type == "cuda":
        return [2**24, 2**26], [torch.float32, torch.bfloat16], DEFAULT_ROUNDS["cuda"], 5
    return [2**18], [torch.float32], DEFAULT_ROUNDS["cpu"], 3


class Progress:
    """Progress on stderr: on a terminal, a tqdm bar redrawn in place on one line; elsewhere (a log,
    a pipe), or on a terminal without tqdm, at most ``lines`` plain lines (the first item, then one
    line per ``1 / lines`` of the total, the last item always).

    tqdm is optional (``pip install fastloss[bench]``): nothing but the terminal display needs it.
    """

    def __init__(self, total: int, stream=None, lines: int = 5, desc: str = "fastloss"):
        self.total, self.done, self.lines = max(0, total), 0, max(1, lines)
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._next = 1  # plain lines: the item count at which the next line is written
        self._bar = None
        if self.tty:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, file=self.stream, desc=desc, dynamic_ncols=True,
                                 leave=True, mininterval=0.2)

    def update(self, label: str, advance: int = 1) -> None:
        self.done += advance
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60], refresh=False)
            self._bar.update(advance)
            return
        if self.done < self._next and self.done < self.total:
            return
        step = max(1, math.ceil(self.total / self.lines))
        self._next = (self.done // step + 1) * step
        self.stream.write(f"[{self.done}/{self.total} {time.perf_counter() - self.t0:.0f}s] {label}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _pointwise_step(case: LossCase, impl: str, inputs: tuple[Tensor, Tensor]) -> FwdBwd:
    return FwdBwd(case.impl(impl), *inputs)


def run_bench(losses: Sequence[str], sizes: Sequence[int], dtypes: Sequence[torch.dtype],
              device: torch.device, repeat: int, warmup: int, impls: Sequence[str] | None = None,
              time_limit: float | None = None, progress: Progress | None = None,
              shapes: dict[str, Sequence[tuple[int, int]]] | None = None,
              round_time_s: float = DEFAULT_ROUND_TIME_S, threads: int | None = None) -> list[dict]:
    """Measure every (loss, N or shape, dtype, implementation); records in that order.

    Pointwise losses run at ``sizes``; row and embedding losses at ``shapes[loss]`` (their
    :func:`default_shapes` when absent). ``impls`` (default: every implementation of each loss)
    is intersected with what each loss has, so "liger" only runs for cross-entropy. The
    implementations of one (loss, size, dtype) are timed interleaved (:func:`measure_group`),
    ``repeat`` rounds of about ``round_time_s`` each. After ``time_limit`` seconds the remaining
    measurements are recorded as skipped. ``progress`` advances once per (loss, size, dtype).
    """
    t0 = time.perf_counter()
    records = []
    for loss, where, dtype, names in bench_plan(losses, sizes, dtypes, device, impls, shapes):
        pointwise = ALL_LOSSES[loss] == "pointwise"
        case: LossCase | ShapedCase = loss_case(loss) if pointwise else shaped_case(loss)
        recs = {impl: (pointwise_record(case, impl, where, dtype, device) if pointwise
                       else shaped_record(case, impl, where, dtype, device)) for impl in names}
        shown = size_label(where) if pointwise else shape_label(where)
        label = f"{loss} {'N=' if pointwise else ''}{shown} {dtype_name(dtype)}"
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            for rec in recs.values():
                rec.update(status="skipped", reason=f"time limit of {time_limit:g} s reached")
        else:
            try:
                inputs = (make_inputs(case, where, dtype, device) if pointwise
                          else case.make_inputs(where, dtype, device))
            except Exception as exc:  # noqa: BLE001 - OOM making the shared inputs: every impl skipped
                inputs = None
                for rec in recs.values():
                    rec.update(status="skipped", reason=error_reason(exc))
            if inputs is not None:
                if pointwise:
                    makers = {impl: functools.partial(_pointwise_step, case, impl, inputs) for impl in names}
                else:
                    makers = {impl: _shaped_maker(case, impl, where, dtype, device, inputs) for impl in names}
                measure_group(makers, recs, device, repeat, warmup, round_time_s, threads)
                for rec in recs.values():
                    _add_tflops(rec)
            del inputs
            _release(device)
        records += recs.values()
        if progress:
            progress.update(label)
    return records


def bench_plan(losses: Sequence[str], sizes: Sequence[int], dtypes: Sequence[torch.dtype],
               device: torch.device, impls: Sequence[str] | None = None,
               shapes: dict[str, Sequence[tuple[int, int]]] | None = None,
               ) -> list[tuple[str, Any, torch.dtype, list[str]]]:
    """[(loss, N or (a, b), dtype, implementations)] in measuring order (see :func:`run_bench`)."""
    plan = []
    for loss in losses:
        loss = resolve_loss(loss)
        if ALL_LOSSES[loss] == "pointwise":
            have, where_list = IMPLS, list(sizes)
        else:
            have = shaped_case(loss).impls
            where_list = list((shapes or {}).get(loss) or default_shapes(loss, device))
        names = [i for i in (impls or have) if i in have]
        if not names:
            continue
        plan += [(loss, where, dtype, names) for where in where_list for dtype in dtypes]
    return plan


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    families = "; ".join(f"{fam}: {' '.join(k for k, f in ALL_LOSSES.items() if f == fam)}"
                         for fam in _FAMILY_ORDER)
    p.add_argument("--losses", nargs="+", metavar="LOSS",
                   help=f"losses to run, comma or space separated (default: all). {families}")
    p.add_argument("--sizes", nargs="+", metavar="N",
                   help="pointwise losses: element counts, e.g. 2**24 16M 67108864 "
                        "(default: CUDA 2**24 2**26, CPU 2**18)")
    p.add_argument("--shapes", nargs="+", metavar="NxV",
                   help="row losses (cross_entropy, focal_loss): logits shapes, e.g. 8192x32000 4096x256000 "
                        "(default, CUDA: cross_entropy 8192x32000 8192x128256 4096x256000, focal_loss "
                        "65536x1000 8192x32000; CPU: 256x4096)")
    p.add_argument("--embed-shapes", nargs="+", metavar="BxD",
                   help="embedding losses (contrastive, triplet, info_nce): batch x dim, e.g. 2**20x128 "
                        "(default, CUDA: contrastive/triplet 2**20x128, info_nce 4096x512 16384x512; CPU: "
                        "4096x64 and 512x64)")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help="float32, bfloat16, float16 (default: CUDA float32 bfloat16, CPU float32)")
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help=f"implementations (default: all): {', '.join(IMPLS)}, liger (cross_entropy only)")
    p.add_argument("--repeat", type=int, metavar="ROUNDS",
                   help="interleaved rounds: the implementations of a row take turns, each timed once per "
                        f"round (default: CUDA {DEFAULT_ROUNDS['cuda']}, CPU {DEFAULT_ROUNDS['cpu']})")
    p.add_argument("--round-time", type=float, metavar="SECONDS", default=DEFAULT_ROUND_TIME_S,
                   help="time per implementation per round; the timer chooses the number of calls "
                        "(torch.utils.benchmark blocked_autorange on CPU, CUDA events on CUDA; default "
                        f"{DEFAULT_ROUND_TIME_S})")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default: CUDA 5, CPU 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads while timing (default: torch's current)")
    p.add_argument("--sweep", action="store_true",
                   help="size sweep instead: fwd+bwd time of fastloss and torch.nn (or the naive composition) "
                        f"against size per loss ({', '.join(SWEEP_LOSSES)}); --sizes sets the element "
                        "counts (default: CPU 2**5 .. 2**20, CUDA 2**8 .. 2**26, every third power of "
                        "two), --plot draws time against size (log-log) and the ratio")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop starting measurements after this long; the rest are recorded as skipped")
    p.add_argument("--json", metavar="PATH", help="write every measurement and the device/versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


#: The byte model of each family, for JSON metadata.
BYTES_MODELS = {
    "pointwise": "3 * N * itemsize (read input, read target, write grad)",
    "row": "P * N * V * itemsize + 8 * N (int64 targets); P = 2 when V <= 32768 (a row fits on chip: "
           "read logits, write grad), else 3 (log-sum-exp pass, then read + write)",
    "embedding": "2 * k * B * D * itemsize (read k operands, write their grads); info_nce also "
                 "flops_model = 6 * B**2 * D",
}


def bench_main(args: argparse.Namespace) -> int:
    """``python -m fastloss bench``: tables on stdout, progress on stderr."""
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastloss bench: CUDA was requested but torch.cuda.is_available() is False")
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise SystemExit("fastloss bench: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    if getattr(args, "sweep", False):
        return sweep_main(args, device)
    sizes, dtypes, repeat, warmup = default_plan(device)
    try:
        losses = [resolve_loss(s) for s in _split_list(args.losses)] or list(ALL_LOSSES)
        sizes = [parse_size(s) for s in _split_list(args.sizes)] or sizes
        row_shapes = [parse_shape(s) for s in _split_list(getattr(args, "shapes", None))]
        embed_shapes = [parse_shape(s) for s in _split_list(getattr(args, "embed_shapes", None))]
        dtypes = [parse_dtype(s) for s in _split_list(args.dtypes)] or dtypes
        impls = _split_list(args.impls) or None
        losses, sizes, dtypes, row_shapes, embed_shapes = (
            list(dict.fromkeys(v)) for v in (losses, sizes, dtypes, row_shapes, embed_shapes))
        known = IMPLS + ("liger",)
        bad = [i for i in impls or () if i not in known]
        if bad:
            raise ValueError(f"unknown implementation(s) {bad}; expected {', '.join(known)}")
        impls = list(dict.fromkeys(impls)) if impls else None
    except ValueError as exc:
        raise SystemExit(f"fastloss bench: {exc}") from None
    shapes = {loss: (row_shapes if ALL_LOSSES[loss] == "row" else embed_shapes) or default_shapes(loss, device)
              for loss in losses if ALL_LOSSES[loss] != "pointwise"}
    repeat = args.repeat if args.repeat is not None else repeat
    warmup = args.warmup if args.warmup is not None else warmup
    round_time_s = getattr(args, "round_time", None) or DEFAULT_ROUND_TIME_S
    if repeat < 1 or warmup < 0 or round_time_s <= 0:
        raise SystemExit("fastloss bench: --repeat must be >= 1, --warmup >= 0 and --round-time > 0")
    if args.plot:
        _pyplot()  # fail before measuring, not after

    plan = bench_plan(losses, sizes, dtypes, device, impls, shapes)
    progress = None if args.quiet else Progress(len(plan) + 1, desc="fastloss bench")
    started = time.perf_counter()
    copy = copy_bandwidth(device)
    if progress:
        progress.update(f"copy bandwidth {copy / 1e9:.0f} GB/s")
    records = run_bench(losses, sizes, dtypes, device, repeat, warmup, impls,
                        time_limit=args.time_limit, progress=progress, shapes=shapes,
                        round_time_s=round_time_s)
    if progress:
        progress.close()
    families = [f for f in _FAMILY_ORDER if any(ALL_LOSSES[lo] == f for lo in losses)]
    meta = {
        "schema": "fastloss-bench/3",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "copy_gbps": copy / 1e9,
        "baselines": {name: torch_label(name) for name in losses},
        "focal_baseline_note": FOCAL_BASELINE_NOTE,
        "config": {"losses": losses, "sizes": sizes,
                   "shapes": {lo: [list(s) for s in v] for lo, v in shapes.items()},
                   "dtypes": [dtype_name(d) for d in dtypes],
                   "impls": impls or "all", "repeat": repeat, "rounds": repeat, "round_time_s": round_time_s,
                   "warmup": warmup, "reduction": "mean", "interleaved": True,
                   "bytes_model": {f: BYTES_MODELS[f] for f in families},
                   "timer": timer_name(device), "noisy_spread": NOISY_SPREAD,
                   "time_limit_s": args.time_limit},
        "elapsed_s": time.perf_counter() - started,
    }
    print(format_text(records, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "results": records}, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(records, args.plot, meta)
        print(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------------------------
# python -m fastloss check
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CheckCase:
    """One line of ``python -m fastloss check``: a fastloss call, the call it must agree with, and
    how their operands are made.

    ``make(device, generator)`` returns ``(args, wrt)``: the positional operands both calls take and
    the tensors whose gradients are compared (floating operands, model parameters). Both calls
    return a tensor; a non-scalar one is compared element by element and differentiated through a
    fixed non-uniform weighting of its elements.
    """

    name: str
    reference: str                                # what fastloss is compared with, for the report
    make: Callable[[torch.device, torch.Generator], tuple[tuple, list[Tensor]]]
    fastloss: Callable[..., Tensor]
    torch: Callable[..., Tensor]


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def _check_pointwise(name: str) -> CheckCase:
    case = loss_case(name)

    def make(device: torch.device, g: torch.Generator):
        x, y = make_inputs(case, 4099, torch.float32, device, seed=1)  # odd, more than one block
        return (x, y), [x]

    return CheckCase(LOSSES[name], case.torch_label, make, case.fastloss, case.torch)


def _class_operands(shape: tuple[int, ...], probabilities: bool = False, ignore: int | None = None):
    """Logits of ``shape`` (class dimension 1) and class-index (or probability) targets."""
    def make(device: torch.device, g: torch.Generator):
        x = _leaf(3 * torch.randn(shape, generator=g, device=device))
        n_classes = shape[1]
        if probabilities:
            t = torch.softmax(torch.randn(shape, generator=g, device=device), dim=1)
        else:
            t = torch.randint(0, n_classes, shape[:1] + shape[2:], generator=g, device=device)
            if ignore is not None:
                t[::5] = ignore
        return (x, t), [x]

    return make


def _z_loss_formula(x: Tensor, t: Tensor) -> Tensor:
    """PaLM's z-loss written out: ce + 1e-3 * logsumexp(x)**2 per row, mean over rows."""
    return (F.cross_entropy(x, t, reduction="none") + 1e-3 * torch.logsumexp(x, dim=1) ** 2).mean()


def _softcap_formula(x: Tensor, t: Tensor) -> Tensor:
    """Gemma 2's soft-capping written out: cross_entropy(30 * tanh(x / 30), t)."""
    return F.cross_entropy(30.0 * torch.tanh(x / 30.0), t)


def _classic_focal(x: Tensor, t: Tensor) -> Tensor:
    """The classic focal composition: alpha * (1 - exp(-ce))**gamma * ce, alpha 0.25, gamma 2."""
    ce = F.cross_entropy(x, t, reduction="none")
    return (FOCAL_ALPHA * (1 - torch.exp(-ce)) ** FOCAL_GAMMA * ce).mean()


def _embeddings(operands: int, label: bool = False, b: int = 33, d: int = 17):
    def make(device: torch.device, g: torch.Generator):
        xs = [_leaf(torch.randn(b, d, generator=g, device=device)) for _ in range(operands)]
        extra = [torch.randint(0, 2, (b,), generator=g, device=device).float()] if label else []
        return (*xs, *extra), xs

    return make


def _symmetric_info_nce_formula(q: Tensor, k: Tensor) -> Tensor:
    """CLIP's loss written out: the mean of the query->key and key->query cross-entropies."""
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = q @ k.T / INFO_NCE_TEMPERATURE
    labels = torch.arange(q.shape[0], device=q.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _regression_operands(device: torch.device, g: torch.Generator):
    x = _leaf(torch.randn(129, 3, generator=g, device=device))
    y = torch.randn(129, 3, generator=g, device=device)
    return (x, y), [x]


def _kl_operands(device: torch.device, g: torch.Generator):
    """Log-probabilities (the input) and probabilities (the target) of 37 rows of 11 classes."""
    x = _leaf(torch.log_softmax(torch.randn(37, 11, generator=g, device=device), dim=1))
    y = _leaf(torch.softmax(torch.randn(37, 11, generator=g, device=device), dim=1))
    return (x, y), [x, y]


def _linear_xent_operands(device: torch.device, g: torch.Generator):
    """Hidden states (37, 16), a projection (11, 16) and class indices."""
    x = _leaf(torch.randn(37, 16, generator=g, device=device))
    w = _leaf(0.3 * torch.randn(11, 16, generator=g, device=device))
    t = torch.randint(0, 11, (37,), generator=g, device=device)
    return (x, w, t), [x, w]


def _linear_xent_formula(x: Tensor, w: Tensor, t: Tensor) -> Tensor:
    """The logits made in full: F.cross_entropy(F.linear(x, w), t)."""
    return F.cross_entropy(F.linear(x, w), t)


def _combined_fastloss(x: Tensor, y: Tensor) -> Tensor:
    return fastloss.CombinedLoss({fastloss.MSELoss(): 0.7, fastloss.L1Loss(): 0.2,
                                  fastloss.HuberLoss(delta=0.5): 0.1})(x, y)


def _combined_formula(x: Tensor, y: Tensor) -> Tensor:
    return 0.7 * F.mse_loss(x, y) + 0.2 * F.l1_loss(x, y) + 0.1 * F.huber_loss(x, y, delta=0.5)


def _regularized_operands(device: torch.device, g: torch.Generator):
    with torch.random.fork_rng(devices=[]):  # the check leaves the global RNG alone
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device)
    with torch.no_grad():  # weights from ``g``, as the operands
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, device=device))
    x = torch.randn(31, 5, generator=g, device=device)
    y = torch.randn(31, 3, generator=g, device=device)
    return (model, x, y), list(model.parameters())


def _regularized_fastloss(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return fastloss.RegularizedLoss(fastloss.MSELoss(), model, l1=1e-3, l2=1e-2)(model(x), y)


def _regularized_formula(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    weights = [model[0].weight, model[2].weight]  # biases excluded (fastloss's default)
    return (F.mse_loss(model(x), y) + 1e-3 * sum(w.abs().sum() for w in weights)
            + 1e-2 * sum((w * w).sum() for w in weights))


def _regularized_guide_fastloss(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return fastloss.RegularizedLoss.from_guide(fastloss.MSELoss(), model, l1_lambda=0.01,
                                               l2_lambda=0.01)(model(x), y)


def _regularized_guide_formula(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The guide's RegularizedLoss.forward: unsquared L2 norm of every parameter, biases included."""
    params = list(model.parameters())
    return (F.mse_loss(model(x), y) + 0.01 * sum(torch.norm(p, 1) for p in params)
            + 0.01 * sum(torch.norm(p, 2) for p in params))


def check_cases() -> list[CheckCase]:
    """Every loss ``python -m fastloss check`` runs, in report order."""
    ce_torch = "F.cross_entropy"
    w_classes = 11

    def weighted(fn):
        def call(x: Tensor, t: Tensor) -> Tensor:
            w = torch.linspace(0.5, 2.0, w_classes, device=x.device)
            return fn(x, t, weight=w, ignore_index=-100)
        return call

    cases = [_check_pointwise(name) for name in LOSSES]
    cases += [
        CheckCase("cross_entropy", ce_torch, _class_operands((37, w_classes)), FL.cross_entropy,
                  F.cross_entropy),
        CheckCase("cross_entropy(weight, ignore_index)", f"{ce_torch}(weight, ignore_index)",
                  _class_operands((37, w_classes), ignore=-100), weighted(FL.cross_entropy),
                  weighted(F.cross_entropy)),
        CheckCase("cross_entropy(label_smoothing=0.1)", f"{ce_torch}(label_smoothing=0.1)",
                  _class_operands((37, w_classes)),
                  functools.partial(FL.cross_entropy, label_smoothing=0.1),
                  functools.partial(F.cross_entropy, label_smoothing=0.1)),
        CheckCase("cross_entropy(probability targets)", f"{ce_torch} (probability targets)",
                  _class_operands((37, w_classes), probabilities=True), FL.cross_entropy, F.cross_entropy),
        CheckCase("cross_entropy((N, C, d) input)", f"{ce_torch} ((N, C, d) input)",
                  _class_operands((5, w_classes, 7)), FL.cross_entropy, F.cross_entropy),
        CheckCase("cross_entropy(reduction='none')", f"{ce_torch}(reduction='none')",
                  _class_operands((37, w_classes)), functools.partial(FL.cross_entropy, reduction="none"),
                  functools.partial(F.cross_entropy, reduction="none")),
        CheckCase("cross_entropy(z_loss=1e-3)", "ce + 1e-3 * logsumexp**2 (formula)",
                  _class_operands((37, w_classes)), functools.partial(FL.cross_entropy, z_loss=1e-3),
                  _z_loss_formula),
        CheckCase("cross_entropy(softcap=30)", "F.cross_entropy(30 tanh(x / 30)) (formula)",
                  _class_operands((37, w_classes)), functools.partial(FL.cross_entropy, softcap=30.0),
                  _softcap_formula),
        CheckCase("focal_loss(alpha=0.25, gamma=2)", "alpha (1 - exp(-ce))**gamma ce (formula)",
                  _class_operands((37, w_classes)),
                  functools.partial(FL.focal_loss, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA), _classic_focal),
        CheckCase("contrastive_loss(margin=2)", "the guide's ContrastiveLoss (formula)",
                  _embeddings(2, label=True), _fl_contrastive, _seed_contrastive),
        CheckCase("triplet_margin_loss", "F.triplet_margin_loss", _embeddings(3), _fl_triplet, _torch_triplet),
        CheckCase("info_nce(temperature=0.07)", "F.cross_entropy(q @ k.T / t, arange(B)) (formula)",
                  _embeddings(2), _fl_info_nce, _naive_info_nce),
        CheckCase("info_nce(symmetric=True)", "both directions' F.cross_entropy, averaged (formula)",
                  _embeddings(2), functools.partial(FL.info_nce, temperature=INFO_NCE_TEMPERATURE,
                                                    symmetric=True), _symmetric_info_nce_formula),
        CheckCase("linear_cross_entropy", "F.cross_entropy(F.linear(x, W), t) (formula)",
                  _linear_xent_operands, FL.linear_cross_entropy, _linear_xent_formula),
        CheckCase("kl_div(reduction='batchmean')", "F.kl_div(reduction='batchmean')", _kl_operands,
                  functools.partial(FL.kl_div, reduction="batchmean"),
                  functools.partial(F.kl_div, reduction="batchmean")),
        CheckCase("CombinedLoss(MSE .7, L1 .2, Huber .1)", "0.7 F.mse_loss + 0.2 F.l1_loss + 0.1 F.huber_loss",
                  _regression_operands, _combined_fastloss, _combined_formula),
        CheckCase("RegularizedLoss(MSE, l1=1e-3, l2=1e-2)", "F.mse_loss + l1 sum|w| + l2 sum w**2 (formula)",
                  _regularized_operands, _regularized_fastloss, _regularized_formula),
        CheckCase("RegularizedLoss.from_guide(MSE, .01, .01)", "the guide's RegularizedLoss (formula)",
                  _regularized_operands, _regularized_guide_fastloss, _regularized_guide_formula),
    ]
    return cases


def _cotangent(out: Tensor) -> Tensor:
    """A fixed non-uniform weighting of a loss's elements (1 for a scalar)."""
    if out.dim() == 0:
        return torch.ones_like(out)
    return torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)


def _value_and_grads(fn: Callable[..., Tensor], args: tuple, wrt: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    out = fn(*args)
    grads = torch.autograd.grad(out, wrt, grad_outputs=_cotangent(out), allow_unused=True)
    return out.detach(), [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]


def implementation_ran(launches: collections.Counter) -> str:
    """"kernels (names)" when any Triton kernel was launched, else "PyTorch path"."""
    if not launches:
        return "PyTorch path"
    return "kernels: " + ", ".join(sorted(launches))


def run_check(case: CheckCase, device: torch.device, rtol: float = 1e-4, atol: float = 1e-6
              ) -> tuple[str, Tensor, float]:
    """(implementation that ran, fastloss's loss, max |gradient difference|); raises AssertionError
    on a mismatch of the loss or of any gradient."""
    from fastloss.ops import _utils

    g = torch.Generator(device=device).manual_seed(1)
    args, wrt = case.make(device, g)
    before = collections.Counter(_utils.launch_counts)
    got, g_got = _value_and_grads(case.fastloss, args, wrt)
    ran = implementation_ran(_utils.launch_counts - before)
    for w in wrt:
        w.grad = None
    want, g_want = _value_and_grads(case.torch, args, wrt)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"loss: {m}")
    err = 0.0
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"gradient {i}: {m}")
        if a.numel():
            err = max(err, (a - b).abs().max().item())
    return ran, got, err


def check_main(args: argparse.Namespace) -> int:
    """Run every loss once on the device against torch.nn, or a naive formula where torch.nn lacks
    the loss (loss and gradients, float32); print OK / FAIL and which implementation ran; return 1
    when any fails."""
    device = torch.device(args.device) if args.device else default_device()
    backend = getattr(args, "backend", None) or fastloss.get_backend()
    failures = 0
    print(f"fastloss {fastloss.__version__} check on {device} (torch {torch.__version__}, backend "
          f"{backend}): loss and gradients in float32 against torch.nn, or the naive formula where "
          "torch.nn has no such loss")
    with fastloss.use_backend(backend), warnings.catch_warnings():
        # Triton's interpreter computes masked-off lanes too (log(0) there is expected)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        for case in check_cases():
            try:
                ran, value, err = run_check(case, device)
                shown = (f"loss {value.item():.6g}" if value.numel() == 1
                         else f"{value.numel()} losses summing to {value.sum().item():.6g}")
                print(f"  OK    {case.name:<42} [{ran}] {shown}, max |grad diff| {err:.1e}"
                      f" vs {case.reference}")
            except Exception as exc:  # noqa: BLE001 - any error is this loss's FAIL line
                failures += 1
                text = str(exc).strip().splitlines() if isinstance(exc, AssertionError) else []
                reason = f"mismatch: {' '.join(text[:3])}" if text else error_reason(exc)
                print(f"  FAIL  {case.name:<42} {reason} (vs {case.reference})")
    print("all OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="fastloss backend for the check (default: the current one, FASTLOSS_BACKEND or "
                        "auto); triton on CPU needs TRITON_INTERPRET=1")
