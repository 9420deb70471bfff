"""pytest configuration of the benchmarks (``pytest bench/ --benchmark-only``).

- Collects ``bench_*.py`` files (the project's ``python_files`` only names ``test_*.py``).
- ``FASTLOSS_BENCH_BUDGET_S``: after this many seconds of the session, the remaining benchmarks
  are skipped (and listed as such in the JSON) rather than cut off by an outside timeout.
- ``--benchmark-json`` output gains a ``"fastloss"`` entry: device and versions, the copy
  bandwidth, the byte model of each family, and every skipped benchmark with its reason and
  parameters (pytest-benchmark itself drops them; a test that set ``request.node.bench_params``
  before skipping adds those too).
- Other knobs, read by the bench files (comma-separated, e.g. ``2**20,2**24``):
  ``FASTLOSS_BENCH_DEVICE``, ``FASTLOSS_BENCH_DTYPES``; pointwise ``FASTLOSS_BENCH_SIZES``,
  ``FASTLOSS_BENCH_LOSSES``; bench_softmax.py ``FASTLOSS_BENCH_SHAPES`` (``8192x32000``) and
  ``FASTLOSS_BENCH_LOSSES``; bench_embedding.py ``FASTLOSS_BENCH_EMBED_LOSSES``,
  ``FASTLOSS_BENCH_INFO_NCE_BATCHES``, ``FASTLOSS_BENCH_PAIR_BATCHES``.
"""

from __future__ import annotations

import os
import time

import pytest

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
