"""pytest configuration of the benchmarks (``pytest bench/ --benchmark-only``).

- Collects ``bench_*.py`` files (the project's ``python_files`` only names ``test_*.py``).
- One record format with ``python -m fastloss bench``: each benchmark's ``extra_info`` is a record
  of fastloss.cli.cases (made by ``Case.record`` or ``sweep.sweep_record``) with its timing filled in
  by fastloss.cli.timing.summarise; bench/to_markdown.py reads them as they are.
- ``FASTLOSS_BENCH_BUDGET_S``: after this many seconds of the session, the remaining benchmarks
  are skipped (and listed as such in the JSON) rather than cut off by an outside timeout;
  ``FASTLOSS_BENCH_FILE_BUDGET_S`` the same per bench file (from its first benchmark), so that one
  run of several files gives each its share.
- ``--benchmark-json`` output gains a ``"fastloss"`` entry: device and versions, the copy
  bandwidth, the byte model of each family, and the record of every skipped benchmark with its
  reason (pytest-benchmark itself drops them).
- ``run_timed``: the timing procedure every bench file shares. A bench file's module function
  ``bench_record(**test parameters)`` gives the record of a benchmark the time budget skips.
- Other knobs, read by the bench files (comma-separated, e.g. ``2**20,2**24``):
  ``FASTLOSS_BENCH_DEVICE``, ``FASTLOSS_BENCH_DTYPES``; bench_pointwise.py ``FASTLOSS_BENCH_SIZES``,
  ``FASTLOSS_BENCH_LOSSES``; bench_softmax.py ``FASTLOSS_BENCH_SHAPES`` (``8192x32000``) and
  ``FASTLOSS_BENCH_SOFTMAX_LOSSES``; bench_embedding.py ``FASTLOSS_BENCH_EMBED_LOSSES``,
  ``FASTLOSS_BENCH_INFO_NCE_BATCHES``, ``FASTLOSS_BENCH_PAIR_BATCHES``.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from fastloss.cli import cases, timing

_STATE = pytest.StashKey[dict]()
_L2_BYTES = 256 * 2**20  # as triton.testing.do_bench: larger than any current L2


def pytest_collect_file(file_path, parent):
    # Explicitly named files are collected by pytest's python plugin already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    budget = os.environ.get("FASTLOSS_BENCH_BUDGET_S", "").strip()
    file_budget = os.environ.get("FASTLOSS_BENCH_FILE_BUDGET_S", "").strip()
    config.stash[_STATE] = {"t0": time.monotonic(), "budget_s": float(budget) if budget else None,
                            "file_budget_s": float(file_budget) if file_budget else None, "file_t0": {},
                            "skipped": [], "copy_gbps": None}


def _params(node) -> dict:
    callspec = getattr(node, "callspec", None)
    params = dict(callspec.params) if callspec is not None else {}
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v).removeprefix("torch.")
            for k, v in params.items()}


@pytest.fixture
def bench_state(request) -> dict:
    """Session-wide record shared by the bench files: skips, copy bandwidth, time budget."""
    return request.config.stash[_STATE]


@pytest.fixture
def bench_skip(request, bench_state):
    """``bench_skip(reason, record=None)``: record this benchmark as skipped (its record, or the
    test's parameters, kept in the JSON with the reason) and skip it."""

    def skip(reason: str, record: dict | None = None) -> None:
        rec = dict(record or getattr(request.node, "bench_record", None) or _params(request.node))
        rec.update(status="skipped", reason=reason, name=request.node.name)
        bench_state["skipped"].append(rec)
        pytest.skip(reason)

    return skip


@functools.cache
def _l2_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(_L2_BYTES, dtype=torch.int8, device=device)


@pytest.fixture
def run_timed(benchmark, bench_state, bench_skip, request):
    """``run_timed(record, make_step, group, *, warmup, probes, round_time_s, min_rounds, max_rounds,
    oom_reason=None)``: time one benchmark the way every bench file does, into ``record`` (kept as
    the benchmark's ``extra_info``); returns the median in seconds (None under
    ``--benchmark-disable``).

    ``make_step()`` builds the step (a fastloss.cli.timing.GradStep, or anything with ``__call__``
    and ``zero_grad``, synchronising inside the call on CUDA). Measures the copy bandwidth once per
    session, times the first call (compiles), ``warmup`` untimed calls, ``probes`` timed calls whose
    median picks ``round_time_s / median`` rounds (clamped to [min_rounds, max_rounds]), peak memory
    of one step (CUDA), then ``benchmark.pedantic`` with ``zero_grad``, an L2 flush and a
    synchronize in the untimed setup (pytest-benchmark's wall-clock statistics, ``wall_median_s``).
    The record's times (median, quartiles, extremes, GB/s, TFLOP/s) are, on CUDA, one round of
    fastloss.cli.timing.time_round (triton.testing.do_bench: device time, without the host's
    launch and synchronize round trip that the wall clock adds), elsewhere pytest-benchmark's
    rounds. A failure (OOM, compile error, missing baseline) before or while timed is recorded with
    ``bench_skip``: ``"<impl> failed: <reason>"`` (``oom_reason`` instead, when given and the device
    ran out of memory) or ``"<impl> failed while timed: <reason>"``.
    """
    device = cases.bench_device()

    def release() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def run(record: dict, make_step: Callable[[], Callable[[], None]], group: str, *, warmup: int,
            probes: int, round_time_s: float, min_rounds: int, max_rounds: int,
            oom_reason: str | None = None) -> float | None:
        benchmark.group = group
        request.node.bench_record = record
        impl = record["impl"]
        step = None
        try:
            if bench_state["copy_gbps"] is None:
                bench_state["copy_gbps"] = timing.copy_bandwidth(device) / 1e9
            step = make_step()
            record["first_call_s"] = timing.first_call_s(step, device)  # compiles (torch.compile, Triton)
            for _ in range(warmup):
                step()
            probe = []
            for _ in range(probes):
                t0 = time.perf_counter()
                step()
                probe.append(time.perf_counter() - t0)
            record["peak_mem_bytes"] = timing.peak_memory(step, device)
        except Exception as exc:  # noqa: BLE001 - OOM, compile failure, missing baseline: skipped, go on
            step = None  # free its inputs and gradients before the next benchmark
            release()
            oom = oom_reason is not None and cases.is_oom(exc)
            bench_skip(oom_reason if oom else f"{impl} failed: {cases.error_reason(exc)}", record)
        rounds = int(min(max_rounds, max(min_rounds, round_time_s / max(statistics.median(probe), 1e-9))))

        def setup():
            step.zero_grad()
            if device.type == "cuda":
                _l2_buffer(device).zero_()
                torch.cuda.synchronize(device)

        try:
            benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
        except Exception as exc:  # noqa: BLE001 - as above, while timed
            step.zero_grad()
            step = None
            release()
            bench_skip(f"{impl} failed while timed: {cases.error_reason(exc)}", record)
        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
        times, timer = (list(stats.stats.data), "pytest-benchmark pedantic (wall clock, synchronized)") \
            if stats is not None else (None, None)
        if device.type == "cuda" and stats is not None:
            try:
                times, timer = timing.time_round(step, device, round_time_s), timing.timer_name(device)
            except Exception as exc:  # noqa: BLE001 - keep the wall-clock result, say why
                record["device_timing_error"] = cases.error_reason(exc)
        step.zero_grad()
        step = None
        release()
        if times:
            timing.summarise(record, times, device)
            record.update(timer=timer, wall_median_s=stats.stats.median)
        benchmark.extra_info.update(record)
        return record.get("median_s")

    return run


@pytest.fixture(autouse=True)
def _time_budget(request, bench_state):
    now = time.monotonic()
    budget, file_budget = bench_state["budget_s"], bench_state["file_budget_s"]
    file_t0 = bench_state["file_t0"].setdefault(request.node.path, now)
    reason = None
    if budget is not None and now - bench_state["t0"] > budget:
        reason = f"FASTLOSS_BENCH_BUDGET_S={budget:g} s spent"
    elif file_budget is not None and now - file_t0 > file_budget:
        reason = f"FASTLOSS_BENCH_FILE_BUDGET_S={file_budget:g} s spent in this file"
    if reason:
        make_record = getattr(request.module, "bench_record", None)  # (**test parameters) -> record
        callspec = getattr(request.node, "callspec", None)
        try:
            rec = make_record(**callspec.params) if make_record and callspec else _params(request.node)
        except Exception:  # noqa: BLE001 - the parameters alone, then
            rec = _params(request.node)
        bench_state["skipped"].append({**rec, "name": request.node.name, "status": "skipped", "reason": reason})
        pytest.skip(reason)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    state = config.stash[_STATE]
    device = cases.bench_device()
    try:
        info = timing.device_info(device)
    except Exception as exc:  # noqa: BLE001 - never lose the JSON over its metadata
        info = {"type": device.type, "error": repr(exc)}
    output_json["fastloss"] = {
        "device": info,
        "copy_gbps": state["copy_gbps"],
        "skipped": state["skipped"],
        "budget_s": state["budget_s"],
        "elapsed_s": time.monotonic() - state["t0"],
        "bytes_model": dict(cases.BYTES_MODELS),
    }
