"""Steps and timers: what one measurement of one implementation does, and how it is timed.

Timers (the standard ones, not a loop of our own):

    CUDA   ``triton.testing.do_bench(step, rep=round_time, return_mode="all")``: CUDA events around
           each call, the L2 cleared before each, the number of calls chosen from its own 5-call
           estimate; device time.
    CPU    ``torch.utils.benchmark.Timer("step()").blocked_autorange(min_run_time=round_time)``:
           the timer chooses how many calls make one block; each sample is a block's average.

The implementations of one (loss, shape, dtype) take turns (:func:`interleave`): rounds in which
each is timed once for about ``round_time_s``, the order rotated every round, so that a busy spell
of a shared machine falls on all of them. A record keeps the median of the rounds' medians, their
quartiles and each round's median; :func:`fastloss.cli.report.ratio_stats` pairs rounds. Host time
(``host_s``, :func:`host_time`): seconds to issue one call without synchronizing, the cost the
device cannot hide when the host is the slower side.
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import fastloss
from fastloss.cli.cases import error_reason

#: Interleaved rounds per measurement (``--repeat``), by device type.
DEFAULT_ROUNDS = {"cuda": 5, "cpu": 7}
#: Seconds each implementation is timed in each round (``--round-time``): ``rep`` of do_bench on
#: CUDA, ``min_run_time`` of blocked_autorange on CPU.
DEFAULT_ROUND_TIME_S = 0.05
#: A ratio whose interquartile range over the rounds is wider than this fraction of its median is
#: marked "?" in the tables: the machine was too noisy for that ratio to mean anything.
NOISY_SPREAD = 0.2
#: Calls per burst of :func:`host_time`.
HOST_CALLS = 10


class GradStep:
    """One training step of a loss: the gradients of ``fn(*inputs)`` with respect to the inputs
    requiring grad, by ``torch.autograd.grad`` (handed back, not accumulated) when
    ``autograd_grad``, else by ``.backward()`` into ``.grad`` set to None first (plus a
    synchronize when ``sync``, for wall-clock timers)."""

    def __init__(self, fn: Callable[..., Tensor], inputs: Sequence[Tensor], autograd_grad: bool = False,
                 sync: bool = False):
        self.fn, self.inputs = fn, tuple(inputs)
        self.wrt = tuple(t for t in self.inputs if isinstance(t, Tensor) and t.requires_grad)
        self.autograd_grad = autograd_grad
        self.device = self.inputs[0].device
        self.sync = sync and self.device.type == "cuda"

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
            torch.cuda.synchronize(self.device)


def first_call_s(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``step``, synchronized: on a fresh step, the call that compiles
    (torch.compile graphs, Triton kernels)."""
    t0 = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def peak_memory(step: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call of ``step`` beyond what was allocated before it
    (the gradient buffers included); None off CUDA."""
    if device.type != "cuda":
        return None
    if hasattr(step, "zero_grad"):
        step.zero_grad()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def timer_name(device: torch.device) -> str:
    """What times a round on this device, for reports."""
    if device.type == "cuda":
        return "triton.testing.do_bench (CUDA events around each call, L2 cleared before each)"
    return "torch.utils.benchmark.Timer.blocked_autorange (block averages)"


def time_round(step: Callable[[], Any], device: torch.device, round_time_s: float = DEFAULT_ROUND_TIME_S,
               threads: int | None = None) -> list[float]:
    """Seconds per call of ``step`` in one round of about ``round_time_s``; the timer chooses how
    many calls (see the module doc). A step's own synchronize (``sync``, for wall-clock timers) is
    turned off meanwhile on CUDA, or the events would time the host's round trip too."""
    if device.type == "cuda":
        from triton.testing import do_bench

        own_sync = getattr(step, "sync", False)
        if own_sync:
            step.sync = False
        try:
            times = do_bench(step, warmup=1, rep=max(1.0, round_time_s * 1e3), return_mode="all")
        finally:
            if own_sync:
                step.sync = own_sync
        return [t / 1e3 for t in times]
    from torch.utils import benchmark as torch_benchmark

    timer = torch_benchmark.Timer(stmt="step()", globals={"step": step},
                                  num_threads=threads or torch.get_num_threads())
    return [float(t) for t in timer.blocked_autorange(min_run_time=round_time_s).times]


def host_time(step: Callable[[], Any], device: torch.device, calls: int = HOST_CALLS, bursts: int = 3) -> float:
    """Seconds to issue one call of ``step`` without synchronizing: the median over ``bursts`` of
    the wall time of ``calls`` back-to-back calls (device synchronized before and after each burst,
    outside the timed span), per call. On CPU that is the wall time of a call."""
    own_sync = getattr(step, "sync", False)
    if own_sync:
        step.sync = False
    try:
        per_call = []
        for _ in range(bursts):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                step()
            per_call.append((time.perf_counter() - t0) / calls)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        if own_sync:
            step.sync = own_sync
    return statistics.median(per_call)


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


def release(device: torch.device) -> None:
    """Return cached device memory (between measurements)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_group(makers: dict[str, Callable[[], Any]], recs: dict[str, dict[str, Any]], device: torch.device,
                  rounds: int, warmup: int = 3, round_time_s: float = DEFAULT_ROUND_TIME_S,
                  threads: int | None = None,
                  run_round: Callable[[str, Callable[[], Any]], list[float]] | None = None,
                  host: bool = False) -> None:
    """Time the implementations of one (loss, shape, dtype) against each other, into ``recs``.

    ``makers[impl]()`` builds the step of ``impl`` (a :class:`GradStep` or anything callable, with
    ``zero_grad`` when it holds gradients); each step's first call (compiles) is timed, then
    ``warmup`` calls, its peak memory (CUDA), then the steps are timed by :func:`interleave`
    (``run_round`` defaults to :func:`time_round`), then, when ``host``, their :func:`host_time`.
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
            release(device)
    if run_round is None:
        def run_round(_name: str, step: Callable[[], Any]) -> list[float]:
            return time_round(step, device, round_time_s, threads)
    samples, errors = interleave(steps, rounds, run_round)
    for impl, step in steps.items():
        rec = recs[impl]
        if impl in errors:
            rec.update(status="skipped", reason=errors[impl])
        else:
            summarise(rec, samples[impl], device)
            rec.update(timer=timer_name(device), round_time_s=round_time_s)
            if host:
                try:
                    rec["host_s"] = host_time(step, device)
                except Exception as exc:  # noqa: BLE001 - keep the device timing, say why
                    rec["host_error"] = error_reason(exc)
        if hasattr(step, "zero_grad"):
            step.zero_grad()
    steps.clear()
    release(device)


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); the median three times for a single value."""
    med = statistics.median(values)
    if len(values) < 2:
        return med, med, med
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], med, q[2]


def summarise(rec: dict[str, Any], times: Sequence[float] | Sequence[Sequence[float]],
              device: torch.device) -> None:
    """Median, quartiles, extremes, GB/s, TFLOP/s and share of the copy bandwidth into ``rec``.

    When ``times`` is a list of rounds (:func:`interleave`), the median and quartiles are those of
    the rounds' medians (each round weighs the same, however many samples the timer took in it:
    a round slowed down by a busy machine counts once) and ``round_medians_s`` keeps them; the
    extremes are over every sample.
    """
    rounds = [list(r) for r in times] if times and isinstance(times[0], (list, tuple)) else None
    flat = [t for r in rounds for t in r] if rounds is not None else list(times)
    q1, med, q3 = quartiles([statistics.median(r) for r in rounds] if rounds is not None else flat)
    copy = copy_bandwidth(device)
    nbytes = rec.get("bytes_moved")
    rec.update(
        median_s=med, min_s=min(flat), max_s=max(flat), q1_s=q1, q3_s=q3, repeat=len(flat),
        gbps=nbytes / med / 1e9 if nbytes else None, copy_gbps=copy / 1e9,
        copy_share=nbytes / med / copy if nbytes else None,
    )
    if rec.get("flops_model"):
        rec["tflops"] = rec["flops_model"] / med / 1e12
    if rounds is not None:
        rec.update(rounds=len(rounds), round_medians_s=[statistics.median(r) for r in rounds])


@functools.cache
def _copy_bandwidth(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        nbytes = min(2**30, max(2**24, free // 8))
    else:
        nbytes = 2**26
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = time_round(lambda: dst.copy_(src), device, 0.1)
    return 2 * n * 4 / statistics.median(times)


def copy_bandwidth(device: torch.device | str) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), measured once per
    process and device on a large buffer (1 GiB on CUDA when memory allows, 64 MiB elsewhere)."""
    return _copy_bandwidth(torch.device(device))


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


class _Lines:
    """A stream for tqdm off a terminal: each redraw (``\\r`` + bar) becomes one plain line."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        count = text.split("[")[0]  # the bar without its rates: close() redraws the last line
        if text and count != self.last:
            self.stream.write(text + "\n")
            self.last = count

    def flush(self) -> None:
        self.stream.flush()


def progress(total: int, desc: str = "fastloss", stream=None, lines: int = 5):
    """A tqdm progress bar on ``stream`` (stderr): redrawn in place on a terminal; elsewhere (a
    log, a pipe) about ``lines`` plain lines (the start, every ``1 / lines`` of the total, the
    end). None when tqdm is not installed (``pip install fastloss[bench]``): no progress then."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(total=total, file=stream, desc=desc, dynamic_ncols=True, leave=True, mininterval=0.2)
    return tqdm(total=total, file=_Lines(stream), desc=desc, ncols=100, mininterval=0,
                miniters=max(1, math.ceil(total / max(1, lines))), leave=True)


def advance(bar, label: str) -> None:
    """One step of a :func:`progress` bar (None: nothing), labelled."""
    if bar is not None:
        bar.set_postfix_str(label[:60], refresh=False)
        bar.update(1)
