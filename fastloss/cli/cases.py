"""The losses as benchmark cases, read from :mod:`fastloss.specs`: implementations, operands, the
byte (and FLOP) model of each family, and the record every measurement fills.

A record (one measurement of one implementation; the CLI, the sweep and the pytest-benchmark files
in bench/ all write this format, and the reports read it as it is):

    loss, family, impl, shape (list), shape_label, dtype, device, baseline, status ("ok" | "skipped"),
    reason, bytes_moved, flops_model (when the family has one), size (sweep: elements per operand),
    then, once timed (fastloss.cli.timing): median_s, q1_s, q3_s, min_s, max_s, repeat, rounds,
    round_medians_s, timer, round_time_s, first_call_s, peak_mem_bytes, gbps, copy_gbps, copy_share,
    tflops, host_s (seconds to issue one call without synchronizing, when measured)

Implementations: "fastloss" (fastloss.functional: the Triton kernels on CUDA, the PyTorch path
elsewhere), "torch" (the spec's torch baseline, eager), "torch.compile" (torch.compile of it,
dynamic=False), "liger" (Liger-Kernel's cross-entropy, CUDA, when ``liger_kernel`` imports).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from fastloss import specs
from fastloss.specs import LossSpec

IMPLS = ("fastloss", "torch", "torch.compile")
#: Every implementation a record may name, in report order ("fastloss_inplace" is
#: ``cross_entropy(..., inplace_backward=True)``, measured by bench/bench_softmax.py only).
ALL_IMPLS = ("fastloss", "fastloss_inplace", "torch", "torch.compile", "liger")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}

#: The byte model of each family, for reports and JSON metadata.
BYTES_MODELS = {
    "pointwise": "3 * N * itemsize (read input, read target, write grad)",
    "softmax": "P * N * V * itemsize + 8 * N (int64 targets); P = 2 when V <= 32768 (a row fits on chip: "
               "read logits, write grad), else 3 (log-sum-exp pass, then read + write)",
    "embedding": "2 * k * B * D * itemsize (read k operands, write their grads); info_nce also "
                 "flops_model = 6 * B**2 * D",
    "linear_xent": "flops_model = 6 * N * H * V (the three GEMMs any method does)",
}


# --------------------------------------------------------------------------------------------
# Parsing and labels
# --------------------------------------------------------------------------------------------

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


def parse_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """A shape of 2 or 3 sides: 8192x32000, 2**20x128, 16Kx512, 8192x4096x128256 (each side as
    :func:`parse_size`)."""
    if not isinstance(text, str):
        return tuple(parse_size(d) for d in text)
    parts = text.strip().lower().replace("*x", "x").split("x")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        return tuple(parse_size(p) for p in parts)
    except ValueError:
        raise ValueError(f"cannot read shape {text!r}; write e.g. 8192x32000 or 2**20x128") from None


def shape_label(shape: Sequence[int | None]) -> str:
    """``8192x32000``; sides that are powers of two from 2**20 up as ``2**20``; a 1-D shape as
    :func:`size_label`."""
    if len(shape) == 1 and shape[0] is not None:
        return size_label(shape[0])
    return "x".join("?" if d is None else size_label(d) if d >= 2**20 else str(d) for d in shape)


def split_list(values: Iterable[str] | None) -> list[str]:
    """Command-line values split further at commas and spaces."""
    return [p for v in values or () for p in v.replace(",", " ").split()]


def env_list(name: str, default: Iterable[Any], parse: Callable[[str], Any]) -> list[Any]:
    """A comma/space separated list from environment variable ``name``, parsed; ``default`` if unset."""
    raw = os.environ.get(name, "").strip()
    return list(dict.fromkeys(parse(s) for s in split_list([raw]))) if raw else list(default)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_device() -> torch.device:
    """$FASTLOSS_BENCH_DEVICE, else CUDA when available, else CPU."""
    return torch.device(os.environ.get("FASTLOSS_BENCH_DEVICE", "").strip() or default_device())


def error_reason(exc: BaseException) -> str:
    """``ExceptionType: first line of the message`` for skip records; just "OOM" for out of memory."""
    if is_oom(exc):
        return "OOM"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is the device running out of memory."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------

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
def compiled(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """torch.compile(fn, dynamic=False), one wrapper per function (its graphs are cached per shape)."""
    configure_compile()
    return torch.compile(fn, dynamic=False)


@functools.cache
def liger_cross_entropy() -> tuple[Callable[[Tensor, Tensor], Tensor] | None, str | None]:
    """(Liger-Kernel's cross-entropy ``fn(logits, target)``, None), or (None, why it cannot run):
    the transformers-side module, else the bare autograd.Function. Liger writes the gradient into
    the logits' memory."""
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


# --------------------------------------------------------------------------------------------
# Operands and models
# --------------------------------------------------------------------------------------------

def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def row_passes(n_cols: int) -> int:
    """Passes over the logits of the fewest-bytes fused fwd+bwd: 2 when a row of ``n_cols`` classes
    fits on chip (fastloss.ops.softmax.MAX_FUSED_COLS, whatever the kernel then chooses), 3 otherwise."""
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


_OPERAND_COUNT = {"pairs": 2, "triplets": 3, "queries": 2}


def bytes_moved(spec: LossSpec, shape: Sequence[int], dtype: torch.dtype) -> int | None:
    """Fewest bytes a fused fwd+bwd of the loss moves (the family's model, BYTES_MODELS); None for
    InfoNCE and linear cross-entropy, which are measured in FLOP/s."""
    item = _itemsize(dtype)
    if spec.family == "pointwise":
        return 3 * shape[0] * item
    if spec.family == "softmax":
        n, v = shape
        return row_passes(v) * n * v * item + 8 * n
    if spec.family == "embedding" and spec.ops == "embedding":
        b, d = shape
        return 2 * _OPERAND_COUNT[spec.operands] * b * d * item
    return None


def flops(spec: LossSpec, shape: Sequence[int]) -> int | None:
    """The FLOPs any method does: 6 B^2 D for InfoNCE (three B x B x D products), 6 N H V for
    linear cross-entropy (three GEMMs); None for the memory-bound losses."""
    if spec.ops == "info_nce":
        b, d = shape
        return 6 * b * b * d
    if spec.ops == "linear_xent":
        n, h, v = shape
        return 6 * n * h * v
    return None


def make_inputs(spec: LossSpec, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                seed: int = 0) -> tuple[Tensor, ...]:
    """The operands of ``spec`` at ``shape`` (see fastloss.specs.OPERANDS), the differentiable ones
    requiring grad. Generated in float32 and cast, so every dtype sees the same values."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=g, device=device)

    kind = spec.operands
    if kind in ("regression", "binary"):
        (n,) = shape
        x = randn(n).to(dtype).requires_grad_()
        y = torch.rand(n, generator=g, device=device) if kind == "binary" else randn(n)
        return x, y.to(dtype)
    if kind == "log_probs":
        x = torch.log_softmax(randn(*shape), dim=-1).to(dtype).requires_grad_()
        return x, torch.softmax(randn(*shape), dim=-1).to(dtype)
    if kind == "classes":
        n, v = shape
        x = randn(n, v).to(dtype).requires_grad_()
        return x, torch.randint(0, v, (n,), generator=g, device=device)
    if kind == "hidden":
        n, h, v = shape
        x = randn(n, h).to(dtype).requires_grad_()
        w = (randn(v, h) / h**0.5).to(dtype).requires_grad_()
        return x, w, torch.randint(0, v, (n,), generator=g, device=device)
    b, d = shape
    xs: list[Tensor] = [randn(b, d).to(dtype).requires_grad_() for _ in range(_OPERAND_COUNT[kind])]
    if kind == "pairs":
        xs.append(torch.randint(0, 2, (b,), generator=g, device=device).to(dtype))
    return tuple(xs)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    """A loss as a benchmark case: its spec's calls, operands and models."""

    spec: LossSpec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def impls(self) -> tuple[str, ...]:
        return IMPLS + ("liger",) if self.name == "cross_entropy" else IMPLS

    @property
    def autograd_grad(self) -> bool:
        """Whether the step hands the gradient back (``torch.autograd.grad``) rather than
        accumulating it into ``.grad``: the softmax family (so that implementations that write the
        gradient into the logits' memory are not charged for a copy) and linear cross-entropy."""
        return self.family in ("softmax", "linear_xent")

    @property
    def torch_label(self) -> str:
        return self.baseline()[1]

    def baseline(self) -> tuple[Callable[..., Tensor], str]:
        return self.spec.baseline_fn()

    def impl(self, impl: str, device: torch.device | str = "cpu") -> Callable[..., Tensor]:
        """The callable of one implementation; raises NotImplementedError with the reason when it
        cannot run here (Liger off CUDA or not installed)."""
        if impl == "fastloss":
            return self.spec.fastloss_fn
        if impl == "torch":
            return self.baseline()[0]
        if impl == "torch.compile":
            return compiled(self.baseline()[0])
        if impl == "liger" and "liger" in self.impls:
            if torch.device(device).type != "cuda":
                raise NotImplementedError("Liger-Kernel needs CUDA")
            fn, reason = liger_cross_entropy()
            if fn is None:
                raise NotImplementedError(reason)
            return fn
        raise ValueError(f"unknown implementation {impl!r} for {self.name}; expected one of {self.impls}")

    def make_inputs(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
                    seed: int = 0) -> tuple[Tensor, ...]:
        return make_inputs(self.spec, shape, dtype, device, seed)

    def default_shapes(self, device: torch.device | str) -> list[tuple[int, ...]]:
        return self.spec.default_shapes(torch.device(device).type)

    def record(self, impl: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
               **extra: Any) -> dict[str, Any]:
        """The fields of a record known before measuring (status "ok" until it fails)."""
        shape = [int(d) for d in shape]
        rec: dict[str, Any] = {
            "loss": self.name, "family": self.family, "impl": impl, "shape": shape,
            "shape_label": shape_label(shape), "dtype": dtype_name(dtype), "device": torch.device(device).type,
            "baseline": {"fastloss": "fastloss.functional", "fastloss_inplace": "fastloss.functional",
                         "liger": "Liger-Kernel LigerCrossEntropyLoss"}.get(impl) or self.torch_label,
            "bytes_moved": bytes_moved(self.spec, shape, dtype), "status": "ok", "reason": None,
        }
        model = flops(self.spec, shape)
        if model is not None:
            rec["flops_model"] = model
        if self.family == "softmax":
            rec["passes"] = row_passes(shape[1])
            rec["kernel_single_pass"] = row_single_pass(shape, dtype)
        rec.update(extra)
        return rec


def case(name: str) -> Case:
    """The Case of a loss (any name fastloss.specs.resolve_name reads)."""
    return Case(specs.get(name))


def torch_label(name: str) -> str:
    """What the torch baseline of a loss is, for reports."""
    return case(name).torch_label


