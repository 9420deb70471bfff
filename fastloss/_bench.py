"""Benchmark harness: ``python -m fastloss bench`` and the helpers bench/*.py share with it.

What is measured: one training step of a loss, ``loss = f(x, y); loss.backward()`` with ``x``
requiring grad (its ``.grad`` set to None first, so nothing accumulates), for three
implementations of the same math:

    fastloss        fastloss.functional (Triton kernels on CUDA, the PyTorch reference elsewhere)
    torch           torch.nn.functional eager (torchvision.ops.sigmoid_focal_loss for the focal loss)
    torch.compile   torch.compile(dynamic=False) of the same torch code

Timing: on CUDA a do_bench-style median of CUDA-event times, with L2 flushed before every
repetition; elsewhere the median of ``time.perf_counter`` after warm-up. Peak memory on CUDA is
``torch.cuda.max_memory_allocated()`` during one step minus the memory allocated before it.
Bandwidth uses the fused 3-pass byte model of DESIGN.md (read input + read target + write grad =
3 * N * itemsize) against a device-to-device copy measured in the same process (bytes read +
bytes written).

This module imports only torch, the standard library and fastloss; matplotlib and torchvision are
optional. Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import fastloss
from fastloss import functional as FL

__all__ = [
    "IMPLS",
    "LOSSES",
    "FwdBwd",
    "LossCase",
    "bytes_moved",
    "configure_compile",
    "copy_bandwidth",
    "device_info",
    "error_reason",
    "flush_l2",
    "format_markdown",
    "loss_case",
    "make_inputs",
    "measure",
    "peak_memory",
    "run_bench",
    "time_step",
]

IMPLS = ("fastloss", "torch", "torch.compile")

#: Loss names in report order, with their fastloss.functional names.
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

def _fl_mse(x: Tensor, y: Tensor) -> Tensor:
    return FL.mse_loss(x, y)


def _fl_l1(x: Tensor, y: Tensor) -> Tensor:
    return FL.l1_loss(x, y)


def _fl_huber(x: Tensor, y: Tensor) -> Tensor:
    return FL.huber_loss(x, y, delta=1.0)


def _fl_smooth_l1(x: Tensor, y: Tensor) -> Tensor:
    return FL.smooth_l1_loss(x, y, beta=1.0)


def _fl_bce(x: Tensor, y: Tensor) -> Tensor:
    return FL.binary_cross_entropy_with_logits(x, y)


def _fl_focal(x: Tensor, y: Tensor) -> Tensor:
    return FL.sigmoid_focal_loss(x, y, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="mean")


def _torch_mse(x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(x, y)


def _torch_l1(x: Tensor, y: Tensor) -> Tensor:
    return F.l1_loss(x, y)


def _torch_huber(x: Tensor, y: Tensor) -> Tensor:
    return F.huber_loss(x, y, delta=1.0)


def _torch_smooth_l1(x: Tensor, y: Tensor) -> Tensor:
    return F.smooth_l1_loss(x, y, beta=1.0)


def _torch_bce(x: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(x, y)


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
        "mse": (_fl_mse, _torch_mse, "torch.nn.functional.mse_loss", False),
        "l1": (_fl_l1, _torch_l1, "torch.nn.functional.l1_loss", False),
        "huber": (_fl_huber, _torch_huber, "torch.nn.functional.huber_loss(delta=1.0)", False),
        "smooth_l1": (_fl_smooth_l1, _torch_smooth_l1, "torch.nn.functional.smooth_l1_loss(beta=1.0)",
                      False),
        "bce_with_logits": (_fl_bce, _torch_bce, "torch.nn.functional.binary_cross_entropy_with_logits",
                            True),
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


def bench_device() -> torch.device:
    """$FASTLOSS_BENCH_DEVICE, else CUDA when available, else CPU."""
    return torch.device(os.environ.get("FASTLOSS_BENCH_DEVICE", "").strip() or default_device())


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


@functools.cache
def _flush_buffer(device: torch.device) -> Tensor:
    return torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)


def flush_l2(device: torch.device) -> None:
    """Evict the GPU's L2 (write a 256 MiB buffer), as triton.testing.do_bench does; no-op off CUDA."""
    if device.type == "cuda":
        _flush_buffer(device).zero_()


def time_step(step: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 3,
              flush: bool = True) -> list[float]:
    """Seconds per call of ``step``, ``repeat`` samples after ``warmup`` calls.

    CUDA: one pair of CUDA events around each call, L2 flushed before each (do_bench style), a
    single synchronize at the end. Elsewhere: ``time.perf_counter`` around each call.
    """
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
        for start, end in zip(starts, ends):
            if flush:
                flush_l2(device)
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def peak_memory(step: FwdBwd | Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of ``step`` beyond what was allocated before it
    (the gradient buffer included); None off CUDA."""
    if device.type != "cuda":
        return None
    if isinstance(step, FwdBwd):
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


def error_reason(exc: BaseException) -> str:
    """``ExceptionType: first line of the message``, for skip records."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(case: LossCase | str, impl: str, n: int, dtype: torch.dtype, device: torch.device,
            repeat: int, warmup: int = 3, inputs: tuple[Tensor, Tensor] | None = None) -> dict[str, Any]:
    """Time and size one (loss, implementation, N, dtype). Never raises for a failing
    implementation: the record then has status "skipped" and the reason."""
    case = loss_case(case) if isinstance(case, str) else case
    device = torch.device(device)
    rec: dict[str, Any] = {
        "loss": case.name, "impl": impl, "n": n, "dtype": dtype_name(dtype), "device": device.type,
        "baseline": case.torch_label if impl != "fastloss" else "fastloss.functional",
        "bytes_moved": bytes_moved(n, dtype), "status": "ok", "reason": None,
    }
    try:
        x, y = inputs if inputs is not None else make_inputs(case, n, dtype, device)
        step = FwdBwd(case.impl(impl), x, y)
        t0 = time.perf_counter()
        step()  # first call: compiles torch.compile graphs and Triton kernels
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec["first_call_s"] = time.perf_counter() - t0
        times = time_step(step, device, repeat=repeat, warmup=warmup)
        rec["peak_mem_bytes"] = peak_memory(step, device)
        step.zero_grad()
    except Exception as exc:  # noqa: BLE001 - OOM, compile or backend failure: record, go on
        rec.update(status="skipped", reason=error_reason(exc))
    if rec["status"] != "ok":
        x = y = step = None  # drop the failed step's tensors before returning memory
        _release(device)
        return rec
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [med, med, med]
    copy = copy_bandwidth(device)
    rec.update(
        median_s=med, min_s=min(times), max_s=max(times), q1_s=q[0], q3_s=q[2], repeat=len(times),
        gbps=rec["bytes_moved"] / med / 1e9, copy_gbps=copy / 1e9,
        copy_share=rec["bytes_moved"] / med / copy,
    )
    return rec


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
    return f"{rec['median_s'] * 1e3:.3f}" if rec and rec.get("status") == "ok" else "-"


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


def _ratio(num: dict | None, den: dict | None, key: str = "median_s") -> float | None:
    if not num or not den or num.get("status") != "ok" or den.get("status") != "ok":
        return None
    a, b = num.get(key), den.get(key)
    return b / a if a and b is not None else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def group_records(records: Iterable[dict]) -> dict[tuple[str, int, str], dict[str, dict]]:
    """{(loss, n, dtype): {impl: record}} in first-seen order."""
    groups: dict[tuple[str, int, str], dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["loss"], r["n"], r["dtype"]), {})[r["impl"]] = r
    return groups


def _table_rows(groups: dict[tuple[str, int, str], dict[str, dict]], cuda: bool,
                bandwidth: bool = True) -> list[list[str]]:
    rows = []
    for (_loss, n, dtype), by in groups.items():
        fl, tn, tc = by.get("fastloss"), by.get("torch"), by.get("torch.compile")
        row = [size_label(n), dtype, _ms(fl), _ms(tn), _ms(tc), _x(_ratio(fl, tn)), _x(_ratio(fl, tc))]
        row.append(" / ".join(_mib(r) for r in (fl, tn, tc)) if cuda else "-")
        if bandwidth:
            row.append(_gbps(fl))
            row.append(" / ".join(_pct(r) for r in (fl, tn, tc)))
        rows.append(row)
    return rows


_HEADER = ["N", "dtype", "fastloss ms", "torch ms", "compile ms", "vs torch", "vs compile",
           "peak MiB fl/torch/compile", "fastloss GB/s", "% copy BW fl/torch/compile"]


def _skips(groups: dict[tuple[str, int, str], dict[str, dict]]) -> list[str]:
    """One line per skip reason, naming the (loss N dtype: implementations) it hit."""
    by_reason: dict[str, dict[str, list[str]]] = {}
    for (loss, n, dtype), by in groups.items():
        for impl, r in by.items():
            if r.get("status") != "ok":
                key = f"{loss} {size_label(n)} {dtype}"
                by_reason.setdefault(str(r.get("reason")), {}).setdefault(key, []).append(impl)
    lines = []
    for reason, hit in by_reason.items():
        what = "; ".join(k if len(v) == len(IMPLS) else f"{k} ({', '.join(v)})" for k, v in hit.items())
        lines.append(f"skipped ({reason}): {what}")
    return lines


def _focal_target(groups: dict[tuple[str, int, str], dict[str, dict]]) -> list[str]:
    """The issue's target for the sigmoid focal loss: >= 4x faster than torchvision eager, <= 1/3 memory."""
    lines = []
    for (loss, n, dtype), by in groups.items():
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
        lines.append(f"sigmoid_focal {size_label(n)} {dtype}: fastloss {speed:.1f}x faster than "
                     f"{tn['baseline']} eager (target >= 4x), {mem_txt}: {'MET' if ok else 'NOT MET'}")
    return lines


def format_text(records: Sequence[dict], meta: dict | None = None) -> str:
    """Plain-text tables, one per loss, for the terminal."""
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
        out.append("fwd+bwd of loss(x, y).backward(), reduction='mean'; median times; bytes model "
                   "3*N*itemsize")
    for loss, recs in by_loss.items():
        groups = group_records(recs)
        out.append("")
        out.append(f"== {loss} (torch baseline: {loss_case(loss).torch_label}) ==")
        header = _HEADER if cuda else _HEADER[:-2]
        rows = [header] + _table_rows(groups, cuda, bandwidth=cuda)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            out.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        out.extend("  " + s for s in _skips(groups))
        out.extend("  " + s for s in _focal_target(groups))
    return "\n".join(out).lstrip("\n")


def format_markdown(records: Sequence[dict], title: str | None = None) -> str:
    """Markdown: one table row per (loss, N, dtype) group, skips and the focal-loss target below."""
    groups = group_records(records)
    cuda = any(r.get("device") == "cuda" for r in records)
    out = [f"### {title}", ""] if title else []
    header = ["loss"] + _HEADER
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join("---" if i < 3 else "--:" for i in range(len(header))) + "|")
    for (loss, _n, _d), row in zip(groups, _table_rows(groups, cuda)):
        out.append("| " + " | ".join([loss] + row) + " |")
    notes = _skips(groups) + _focal_target(groups)
    baselines = sorted({r["baseline"] for r in records if r.get("loss") == "sigmoid_focal"
                        and r.get("impl") != "fastloss"})
    notes += [f"sigmoid_focal torch baseline: {b}" for b in baselines]
    if notes:
        out.append("")
        out.extend(f"- {s}" for s in notes)
    return "\n".join(out) + "\n"


def plot(records: Sequence[dict], path: str, meta: dict | None = None) -> None:
    """Bar chart of achieved GB/s (3-pass model) per loss, one panel per (N, dtype), with the copy
    bandwidth as a dashed line. Needs matplotlib."""
    plt = _pyplot()
    panels: dict[tuple[int, str], dict[str, dict[str, dict]]] = {}
    for r in records:
        panels.setdefault((r["n"], r["dtype"]), {}).setdefault(r["loss"], {})[r["impl"]] = r
    k = max(1, len(panels))
    cols = min(2, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 3.8 * rows), squeeze=False)
    colors = {"fastloss": "#d62728", "torch": "#7f7f7f", "torch.compile": "#1f77b4"}
    width = 0.26
    for ax, ((n, dtype), by_loss) in zip(axes.flat, panels.items()):
        losses = list(by_loss)
        for j, impl in enumerate(IMPLS):
            vals = [by_loss[lo].get(impl, {}).get("gbps") or 0.0 for lo in losses]
            xs = [i + (j - 1) * width for i in range(len(losses))]
            ax.bar(xs, vals, width, label=impl, color=colors[impl])
        copy = next((r.get("copy_gbps") for lo in losses for r in by_loss[lo].values()
                     if r.get("copy_gbps")), None)
        if copy:
            ax.axhline(copy, ls="--", color="k", lw=1, label=f"copy {copy:.0f} GB/s")
        ax.set_xticks(range(len(losses)), losses, rotation=20, fontsize=8)
        ax.set_ylabel("GB/s (3 x N x itemsize / median)")
        ax.set_title(f"N = {size_label(n)}, {dtype}", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    dev = (meta or {}).get("device", {})
    fig.suptitle(f"fastloss fwd+bwd, reduction='mean' on {dev.get('name', '?')} "
                 f"(torch {dev.get('torch', '?')}, triton {dev.get('triton', '?')})", fontsize=11)
    fig.tight_layout()
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
# The CLI: python -m fastloss bench
# --------------------------------------------------------------------------------------------

def default_plan(device: torch.device) -> tuple[list[int], list[torch.dtype], int, int]:
    """(sizes, dtypes, repeat, warmup) suited to the device."""
    if device.type == "cuda":
        return [2**24, 2**26], [torch.float32, torch.bfloat16], 30, 5
    return [2**18], [torch.float32], 15, 3


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, one line per item in a log)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, label: str, advance: int = 1) -> None:
        self.done += advance
        frac = self.done / self.total if self.total else 1.0
        fill = round(frac * self.width)
        bar = "#" * fill + "." * (self.width - fill)
        text = f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:5.1f}s {label}"
        if self.tty:
            self.stream.write("\r" + text[:120].ljust(120))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_bench(losses: Sequence[str], sizes: Sequence[int], dtypes: Sequence[torch.dtype],
              device: torch.device, repeat: int, warmup: int, impls: Sequence[str] = IMPLS,
              time_limit: float | None = None, progress: Progress | None = None) -> list[dict]:
    """Measure every (loss, N, dtype, implementation); records in that order. After
    ``time_limit`` seconds the remaining ones are recorded as skipped."""
    t0 = time.perf_counter()
    records = []
    for loss in losses:
        case = loss_case(loss)
        for n in sizes:
            for dtype in dtypes:
                inputs = None
                for impl in impls:
                    label = f"{loss} N={size_label(n)} {dtype_name(dtype)} {impl}"
                    if time_limit is not None and time.perf_counter() - t0 > time_limit:
                        rec = {"loss": case.name, "impl": impl, "n": n, "dtype": dtype_name(dtype),
                               "device": device.type, "status": "skipped",
                               "baseline": case.torch_label if impl != "fastloss" else "fastloss.functional",
                               "reason": f"time limit of {time_limit:g} s reached",
                               "bytes_moved": bytes_moved(n, dtype)}
                    else:
                        if inputs is None:
                            try:
                                inputs = make_inputs(case, n, dtype, device)
                            except Exception:  # noqa: BLE001 - OOM: measure() records it per implementation
                                inputs = None
                        rec = measure(case, impl, n, dtype, device, repeat, warmup, inputs=inputs)
                    records.append(rec)
                    if progress:
                        progress.update(label)
                del inputs
                _release(device)
    return records


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--losses", nargs="+", metavar="LOSS",
                   help=f"losses to run (default: all): {', '.join(LOSSES)}; comma or space separated")
    p.add_argument("--sizes", nargs="+", metavar="N",
                   help="element counts, e.g. 2**24 16M 67108864 (default: CUDA 2**24 2**26, CPU 2**18)")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help="float32, bfloat16, float16 (default: CUDA float32 bfloat16, CPU float32)")
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help=f"implementations (default: all): {', '.join(IMPLS)}")
    p.add_argument("--repeat", type=int, help="timed repetitions per measurement (default: CUDA 30, CPU 15)")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default: CUDA 5, CPU 3)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop starting measurements after this long; the rest are recorded as skipped")
    p.add_argument("--json", metavar="PATH", help="write every measurement and the device/versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def bench_main(args: argparse.Namespace) -> int:
    """``python -m fastloss bench``: tables on stdout, progress on stderr."""
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastloss bench: CUDA was requested but torch.cuda.is_available() is False")
    sizes, dtypes, repeat, warmup = default_plan(device)
    try:
        losses = [canonical_loss(s) for s in _split_list(args.losses)] or list(LOSSES)
        sizes = [parse_size(s) for s in _split_list(args.sizes)] or sizes
        dtypes = [parse_dtype(s) for s in _split_list(args.dtypes)] or dtypes
        impls = _split_list(args.impls) or list(IMPLS)
        losses, sizes, dtypes, impls = (list(dict.fromkeys(v)) for v in (losses, sizes, dtypes, impls))
        bad = [i for i in impls if i not in IMPLS]
        if bad:
            raise ValueError(f"unknown implementation(s) {bad}; expected {', '.join(IMPLS)}")
    except ValueError as exc:
        raise SystemExit(f"fastloss bench: {exc}") from None
    repeat = args.repeat if args.repeat is not None else repeat
    warmup = args.warmup if args.warmup is not None else warmup
    if repeat < 1 or warmup < 0:
        raise SystemExit("fastloss bench: --repeat must be >= 1 and --warmup >= 0")
    if args.plot:
        _pyplot()  # fail before measuring, not after

    total = len(losses) * len(sizes) * len(dtypes) * len(impls) + 1
    progress = None if args.quiet else Progress(total)
    started = time.perf_counter()
    copy = copy_bandwidth(device)
    if progress:
        progress.update(f"copy bandwidth {copy / 1e9:.0f} GB/s")
    records = run_bench(losses, sizes, dtypes, device, repeat, warmup, impls,
                        time_limit=args.time_limit, progress=progress)
    if progress:
        progress.close()
    meta = {
        "schema": "fastloss-bench/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "copy_gbps": copy / 1e9,
        "baselines": {name: loss_case(name).torch_label for name in losses},
        "focal_baseline_note": FOCAL_BASELINE_NOTE,
        "config": {"losses": losses, "sizes": sizes, "dtypes": [dtype_name(d) for d in dtypes],
                   "impls": impls, "repeat": repeat, "warmup": warmup, "reduction": "mean",
                   "bytes_model": "3 * N * itemsize (read input, read target, write grad)",
                   "timer": "cuda events, L2 flushed, median" if device.type == "cuda"
                   else "time.perf_counter, median",
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

def check_main(args: argparse.Namespace) -> int:
    """Run each loss once on the device against torch (loss and input gradient, float32)."""
    device = torch.device(args.device) if args.device else default_device()
    from fastloss._backend import use_triton

    n = 4099  # odd, more than one block
    failures = 0
    print(f"fastloss {fastloss.__version__} check on {device} (torch {torch.__version__}, backend "
          f"{fastloss.get_backend()})")
    for name, fn_name in LOSSES.items():
        case = loss_case(name)
        try:
            x, y = make_inputs(case, n, torch.float32, device, seed=1)
            ran = "triton" if use_triton(x, y) else "torch reference"
            got = case.fastloss(x, y)
            (g_got,) = torch.autograd.grad(got, x)
            want = case.torch(x, y)
            (g_want,) = torch.autograd.grad(want, x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-7)
            err = (g_got - g_want).abs().max().item()
            print(f"  OK    {fn_name:<34} [{ran}] loss {got.item():.6g}, max |grad diff| {err:.1e}")
        except Exception as exc:  # noqa: BLE001 - any error is this loss's FAIL line
            failures += 1
            print(f"  FAIL  {fn_name:<34} {error_reason(exc)}")
    print("all OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
