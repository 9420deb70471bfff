"""pytest configuration of the benchmarks (``pytest bench/ --benchmark-only``).

- Collects ``bench_*.py`` files (the project's ``python_files`` only names ``test_*.py``).
- ``FASTLOSS_BENCH_BUDGET_S``: after this many seconds of the session, the remaining benchmarks
  are skipped (and listed as such in the JSON) rather than cut off by an outside timeout.
- ``--benchmark-json`` output gains a ``"fastloss"`` entry: device and versions, the copy
  bandwidth, the byte model of each family, and every skipped benchmark with its reason and
  parameters (pytest-benchmark itself drops them; a test that set ``request.node.bench_params``
  before skipping adds those too).
- ``run_timed``: the timing procedure every bench file shares (first call, warm-up, rounds chosen
  from a probe, peak memory, ``benchmark.pedantic`` with grads cleared and L2 flushed in the setup,
  failures recorded as skipped, GB/s and share of the copy bandwidth in ``extra_info``).
- Other knobs, read by the bench files (comma-separated, e.g. ``2**20,2**24``):
  ``FASTLOSS_BENCH_DEVICE``, ``FASTLOSS_BENCH_DTYPES``; pointwise ``FASTLOSS_BENCH_SIZES``,
  ``FASTLOSS_BENCH_LOSSES``; bench_softmax.py ``FASTLOSS_BENCH_SHAPES`` (``8192x32000``) and
  ``FASTLOSS_BENCH_LOSSES``; bench_embedding.py ``FASTLOSS_BENCH_EMBED_LOSSES``,
  ``FASTLOSS_BENCH_INFO_NCE_BATCHES``, ``FASTLOSS_BENCH_PAIR_BATCHES``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from fastloss import _bench

_STATE = pytest.StashKey[dict]()


def pytest_collect_file(file_path, parent):
    # Explicitly named files are collected by pytest's python plugin already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    budget = os.environ.get("FASTLOSS_BENCH_BUDGET_S", "").strip()
    config.stash[_STATE] = {
        "t0": time.monotonic(),
        "budget_s": float(budget) if budget else None,
        "skipped": [],
        "copy_gbps": None,
    }


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
    """``bench_skip(reason)``: record this benchmark as skipped (kept in the JSON) and skip it."""

    def skip(reason: str) -> None:
        extra = getattr(request.node, "bench_params", None) or {}
        extra = {k: v for k, v in extra.items() if isinstance(v, (int, float, str, bool, type(None)))}
        bench_state["skipped"].append({"name": request.node.name, "nodeid": request.node.nodeid,
                                       **extra, **_params(request.node), "reason": reason})
        pytest.skip(reason)

    return skip


@pytest.fixture
def run_timed(benchmark, bench_state, bench_skip):
    """``run_timed(make_step, group, info, *, warmup, probes, round_time_s, min_rounds, max_rounds,
    oom_reason=None)``: time one benchmark the way every bench file does; returns the median in
    seconds (None under ``--benchmark-disable``): on CUDA the device median (below), elsewhere the
    wall-clock one.

    ``make_step()`` builds the step (a ``_bench.FwdBwd`` / ``_bench.GradStep`` or anything with
    ``__call__`` and ``zero_grad``, synchronising inside the call on CUDA). Sets ``benchmark.group``
    and ``extra_info`` to ``info``, then: measures the copy bandwidth once per session, times the
    first call (compiles), ``warmup`` untimed calls, ``probes`` timed calls whose median picks
    ``round_time_s / median`` rounds (clamped to [min_rounds, max_rounds]), peak memory of one step
    (CUDA), then ``benchmark.pedantic`` with ``zero_grad``, an L2 flush and a synchronize in the
    untimed setup (pytest-benchmark's wall-clock statistics), and on CUDA ``_bench.time_step``: CUDA
    events around the step without its synchronize, L2 flushed before each (device time, as
    triton.testing.do_bench and the copy bandwidth are measured; the wall clock adds the host's
    launch and synchronize round trip, which dominates sub-millisecond steps on a slow host).
    A failure (OOM, compile error, missing baseline) before or while timed is
    recorded with ``bench_skip``: ``"<impl> failed: <reason>"`` (``oom_reason`` instead, when given
    and the device ran out of memory) or ``"<impl> failed while timed: <reason>"``.
    ``extra_info`` gains ``peak_mem_bytes``, ``first_call_s``, ``wall_median_s``,
    ``device_median_s`` (None off CUDA), and when ``info`` has ``bytes_moved``: ``gbps`` (bytes over
    the returned median), ``copy_gbps`` and ``copy_share``.
    """
    device = _bench.bench_device()

    def release() -> None:
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def run(make_step: Callable[[], Callable[[], None]], group: str, info: dict, *, warmup: int,
            probes: int, round_time_s: float, min_rounds: int, max_rounds: int,
            oom_reason: str | None = None) -> float | None:
        benchmark.group = group
        benchmark.extra_info.update(info)
        impl = info["impl"]
        step = None
        try:
            if bench_state["copy_gbps"] is None:
                bench_state["copy_gbps"] = _bench.copy_bandwidth(device) / 1e9
            step = make_step()
            first_call_s = _bench.first_call_s(step, device)  # compiles (torch.compile, Triton)
            for _ in range(warmup):
                step()
            probe = []
            for _ in range(probes):
                t0 = time.perf_counter()
                step()
                probe.append(time.perf_counter() - t0)
            peak = _bench.peak_memory(step, device)
        except Exception as exc:  # noqa: BLE001 - OOM, compile failure, missing baseline: skipped, go on
            step = None  # free its inputs and gradients before the next benchmark
            release()
            oom = oom_reason is not None and _bench.is_oom(exc)
            bench_skip(oom_reason if oom else f"{impl} failed: {_bench.error_reason(exc)}")
        rounds = int(min(max_rounds, max(min_rounds, round_time_s / max(statistics.median(probe), 1e-9))))

        def setup():
            step.zero_grad()
            _bench.flush_l2(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        try:
            benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
        except Exception as exc:  # noqa: BLE001 - as above, while timed
            step.zero_grad()
            step = None
            release()
            bench_skip(f"{impl} failed while timed: {_bench.error_reason(exc)}")
        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
        wall_median = stats.stats.median if stats is not None else None
        device_times, device_error = None, None
        if device.type == "cuda" and stats is not None:  # CUDA events: device time, no host round trip
            try:
                device_times = sorted(_bench.time_step(step, device, repeat=max(rounds, 10), warmup=1))
            except Exception as exc:  # noqa: BLE001 - keep the wall-clock result, say why
                device_error = _bench.error_reason(exc)
        step.zero_grad()
        step = None
        release()

        device_median = statistics.median(device_times) if device_times else None
        median = device_median if device_median is not None else wall_median
        extra = {"peak_mem_bytes": peak, "first_call_s": first_call_s, "wall_median_s": wall_median,
                 "device_median_s": device_median,
                 "device_min_s": device_times[0] if device_times else None,
                 "device_max_s": device_times[-1] if device_times else None,
                 "device_repeat": len(device_times) if device_times else None,
                 "device_timing_error": device_error}
        if "bytes_moved" in info:
            gbps = info["bytes_moved"] / median / 1e9 if median else None
            copy_gbps = bench_state["copy_gbps"]
            extra.update(gbps=gbps, copy_gbps=copy_gbps,
                         copy_share=gbps / copy_gbps if gbps and copy_gbps else None)
        benchmark.extra_info.update(extra)
        return median

    return run


@pytest.fixture(autouse=True)
def _time_budget(request, bench_state):
    budget = bench_state["budget_s"]
    if budget is not None and time.monotonic() - bench_state["t0"] > budget:
        reason = f"FASTLOSS_BENCH_BUDGET_S={budget:g} s spent"
        bench_state["skipped"].append({"name": request.node.name, "nodeid": request.node.nodeid,
                                       "reason": reason, **_params(request.node)})
        pytest.skip(reason)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    state = config.stash[_STATE]
    device = _bench.bench_device()
    try:
        info = _bench.device_info(device)
    except Exception as exc:  # noqa: BLE001 - never lose the JSON over its metadata
        info = {"type": device.type, "error": repr(exc)}
    output_json["fastloss"] = {
        "device": info,
        "copy_gbps": state["copy_gbps"],
        "skipped": state["skipped"],
        "budget_s": state["budget_s"],
        "elapsed_s": time.monotonic() - state["t0"],
        "bytes_model": dict(_bench.BYTES_MODELS),
    }
