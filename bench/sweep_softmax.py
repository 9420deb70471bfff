"""Launch-configuration sweep of the softmax row kernel (cross-entropy / focal fwd+bwd), for tuning
``fastloss.ops.softmax._row_config`` from measurements instead of guesses.

For each case, in priority order, every candidate (BLOCK_ROWS, BLOCK_SIZE, SINGLE_PASS, num_warps)
replaces ``_row_config``; the step ``autograd.grad(loss(x, t), x)`` is timed on CUDA events (L2
cleared before each call: fastloss.cli.timing.time_round) and its loss compared with the committed
configuration's (a candidate that changes the loss is marked WRONG LOSS and makes the exit status
1). The committed
configuration is timed first and again last, so the table shows the run-to-run drift.

    python bench/sweep_softmax.py [--budget S] [--json PATH]

Stops starting new candidates after ``--budget`` seconds (default 40; each candidate compiles).
Prints a markdown table. Without CUDA it runs small shapes under Triton's interpreter
(TRITON_INTERPRET=1 is set before triton is imported), which checks the script, not the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastloss  # after TRITON_INTERPRET
from fastloss import functional as FL
from fastloss.cli import cases, timing
from fastloss.ops import _utils
from fastloss.ops import softmax as ops_softmax

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

#: (loss, N, V, dtype), most wanted first: the targets issue #3 missed on an H200.
CASES = [
    ("cross_entropy", 8192, 32000, torch.bfloat16),
    ("focal", 65536, 1000, torch.float32),
    ("focal", 65536, 1000, torch.bfloat16),
    ("cross_entropy", 8192, 32000, torch.float32),
] if CUDA else [("cross_entropy", 16, 300, torch.float32), ("focal", 64, 40, torch.float32)]


def candidates(n_cols: int, dtype: torch.dtype) -> list[tuple[int, int, bool, int]]:
    """Single-pass tiles (when a row fits in 32K elements) and looped column blocks."""
    out = []
    width = ops_softmax.next_pow2(n_cols)
    if width <= 32768:
        for rows in (1, 2, 4, 8):
            tile = rows * width
            if tile > 32768 or (rows > 1 and tile > 8192):
                continue
            for warps in (4, 8, 16, 32):
                if 32 * warps * 4 <= tile <= 32 * warps * 64:  # 4 to 64 elements per thread
                    out.append((rows, width, True, warps))
    if n_cols > 2048:
        for block in (2048, 4096, 8192):
            if block < n_cols:
                out.extend((1, block, False, warps) for warps in (4, 8, 16) if 32 * warps * 4 <= block)
    if not CUDA:
        out = out[:3]  # the interpreter is slow: check the mechanics only
    return out


def _loss_fn(loss: str):
    if loss == "focal":
        return lambda x, t: FL.focal_loss(x, t, 0.25, 2.0)
    return FL.cross_entropy


def _run(loss, x, t, config, round_time_s):
    """(median seconds, loss value) of the step with _row_config forced to ``config`` (None: as
    committed)."""
    original = ops_softmax._row_config
    if config is not None:
        ops_softmax._row_config = lambda n_rows, n_cols, dtype: config
    launches = _utils.launch_counts["cross_entropy_fwd_kernel"]
    try:
        with fastloss.use_backend("triton"):  # the kernels, also under the CPU interpreter
            fn = _loss_fn(loss)
            value = fn(x, t).detach().float()
            step = timing.GradStep(fn, (x, t), autograd_grad=True)
            for _ in range(2):
                step()
            times = timing.time_round(step, DEVICE, round_time_s)
    finally:
        ops_softmax._row_config = original
    if _utils.launch_counts["cross_entropy_fwd_kernel"] == launches:
        raise RuntimeError("the row kernel did not run")
    return statistics.median(times), value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=40.0, help="seconds before no new candidate starts")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--round-time", type=float, default=0.1 if CUDA else 0.001,
                        help="seconds of timed calls per candidate (triton.testing.do_bench's rep on CUDA)")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    name = torch.cuda.get_device_name(DEVICE) if CUDA else "cpu (interpreter: mechanics only)"
    print(f"device: {name}; torch {torch.__version__}; medians of {timing.timer_name(DEVICE)}, "
          f"~{args.round_time} s per candidate\n")
    print("| loss | N x V | dtype | BLOCK_ROWS | BLOCK | single | warps | ms | vs committed | GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    records = []
    for loss, n, v, dtype in CASES:
        if time.monotonic() - t0 > args.budget:
            break
        g = torch.Generator(device=DEVICE).manual_seed(0)
        x = torch.randn(n, v, generator=g, device=DEVICE).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g, device=DEVICE)
        committed = ops_softmax._row_config(n, v, dtype)
        passes = 2 if committed[2] else 3
        nbytes = passes * n * v * x.element_size()
        base, ref = _run(loss, x, t, None, args.round_time)
        todo = [c for c in candidates(v, dtype) if c != committed] + [None]
        for config in [None, *todo]:
            if config is not None and time.monotonic() - t0 > args.budget:
                break
            if config is None and records and records[-1]["case"] == f"{loss} {n}x{v} {dtype}":
                med, value = _run(loss, x, t, None, args.round_time)  # the committed one again, last
            elif config is None:
                med, value = base, ref
            else:
                try:
                    med, value = _run(loss, x, t, config, args.round_time)
                except Exception as exc:  # noqa: BLE001 - a config the compiler rejects: record it
                    records.append({"case": f"{loss} {n}x{v} {dtype}", "config": config,
                                    "error": cases.error_reason(exc)})
                    print(f"| {loss} | {n}x{v} | {cases.dtype_name(dtype)} | {config} | failed: "
                          f"{cases.error_reason(exc)[:60]} | | | | | |")
                    continue
            ok = torch.allclose(value, ref, rtol=2**-7 if dtype.itemsize == 2 else 1e-4, atol=1e-6)
            shown = config or committed
            rec = {"case": f"{loss} {n}x{v} {dtype}", "loss": loss, "n": n, "v": v,
                   "dtype": cases.dtype_name(dtype), "config": list(shown), "committed": config is None,
                   "median_s": med, "vs_committed": base / med, "gbps": nbytes / med / 1e9, "loss_ok": ok}
            records.append(rec)
            tag = " (committed)" if config is None else ""
            print(f"| {loss} | {n}x{v} | {cases.dtype_name(dtype)} | {shown[0]} | {shown[1]} | "
                  f"{shown[2]} | {shown[3]}{tag} | {med * 1e3:.3f} | {base / med:.2f}x | "
                  f"{nbytes / med / 1e9:.0f}{'' if ok else ' WRONG LOSS'} |", flush=True)
        del x, t
        if CUDA:
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "records": records}, f, indent=1)
    return 0 if all(r.get("loss_ok", True) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
