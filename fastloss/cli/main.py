"""The command line: ``python -m fastloss bench | check | demo`` (fastloss/__main__.py calls
:func:`main`). ``bench`` times every loss of fastloss.specs (or ``--losses``) for each
implementation of fastloss.cli.cases, interleaved (fastloss.cli.timing), and prints the tables of
fastloss.cli.report; ``bench --sweep`` is fastloss.cli.sweep."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Sequence
from typing import Any

import torch

from fastloss import specs
from fastloss.cli import cases, report, sweep
from fastloss.cli.cases import (
    IMPLS,
    dtype_name,
    error_reason,
    parse_dtype,
    parse_shape,
    parse_size,
    shape_label,
    split_list,
)
from fastloss.cli.timing import (
    DEFAULT_ROUND_TIME_S,
    DEFAULT_ROUNDS,
    NOISY_SPREAD,
    GradStep,
    advance,
    copy_bandwidth,
    device_info,
    measure_group,
    progress,
    release,
    timer_name,
)


def default_plan(device: torch.device) -> tuple[list[int], list[torch.dtype], int, int]:
    """(pointwise sizes, dtypes, interleaved rounds, warmup calls) suited to the device."""
    if device.type == "cuda":
        return [2**24, 2**26], [torch.float32, torch.bfloat16], DEFAULT_ROUNDS["cuda"], 5
    return [2**18], [torch.float32], DEFAULT_ROUNDS["cpu"], 3


def _maker(case: cases.Case, impl: str, device: torch.device, inputs: tuple[torch.Tensor, ...]):
    def make() -> GradStep:
        fn = case.impl(impl, device)
        ops = inputs
        if impl == "liger":  # overwrites the logits with their gradient: keep the shared ones
            ops = (ops[0].detach().clone().requires_grad_(), *ops[1:])
        return GradStep(fn, ops, autograd_grad=case.autograd_grad)

    return make


def bench_plan(losses: Sequence[str], dtypes: Sequence[torch.dtype], device: torch.device,
               impls: Sequence[str] | None = None, shapes: dict[str, Sequence[tuple[int, ...]]] | None = None,
               ) -> list[tuple[cases.Case, tuple[int, ...], torch.dtype, list[str]]]:
    """[(case, shape, dtype, implementations)] in measuring order: each loss at ``shapes[loss]``
    (its spec's default shapes when absent), ``impls`` (default: every implementation of each
    loss) intersected with what each loss has, so "liger" only runs for cross-entropy."""
    plan = []
    for loss in losses:
        case = cases.case(loss)
        names = [i for i in (impls or case.impls) if i in case.impls]
        where = list((shapes or {}).get(case.name) or case.default_shapes(device))
        plan += [(case, tuple(s), dtype, names) for s in where for dtype in dtypes] if names else []
    return plan


def run_bench(plan: Sequence[tuple[cases.Case, tuple[int, ...], torch.dtype, list[str]]], device: torch.device,
              repeat: int, warmup: int, time_limit: float | None = None, bar=None,
              round_time_s: float = DEFAULT_ROUND_TIME_S, threads: int | None = None) -> list[dict]:
    """Measure every (loss, shape, dtype, implementation) of ``plan``: records in that order. The
    implementations of one (loss, shape, dtype) are timed interleaved, ``repeat`` rounds of about
    ``round_time_s`` each. After ``time_limit`` seconds the remaining measurements are recorded as
    skipped. ``bar`` (fastloss.cli.timing.progress) advances once per (loss, shape, dtype)."""
    t0 = time.perf_counter()
    records = []
    for case, shape, dtype, names in plan:
        recs = {impl: case.record(impl, shape, dtype, device) for impl in names}
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            for rec in recs.values():
                rec.update(status="skipped", reason=f"time limit of {time_limit:g} s reached")
        else:
            try:
                inputs = case.make_inputs(shape, dtype, device)
            except Exception as exc:  # noqa: BLE001 - OOM making the shared inputs: every impl skipped
                inputs = None
                for rec in recs.values():
                    rec.update(status="skipped", reason=error_reason(exc))
            if inputs is not None:
                makers = {impl: _maker(case, impl, device, inputs) for impl in names}
                measure_group(makers, recs, device, repeat, warmup, round_time_s, threads)
            del inputs
            release(device)
        records += recs.values()
        advance(bar, f"{case.name} {shape_label(shape)} {dtype_name(dtype)}")
    return records


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    families = "; ".join(f"{fam}: {' '.join(s.name for s in specs.by_family(fam))}" for fam in specs.FAMILIES)
    p.add_argument("--losses", nargs="+", metavar="LOSS",
                   help=f"losses to run, comma or space separated (default: all). {families}")
    p.add_argument("--sizes", nargs="+", metavar="N",
                   help="pointwise losses: element counts, e.g. 2**24 16M 67108864 "
                        "(default: CUDA 2**24 2**26, CPU 2**18)")
    p.add_argument("--shapes", nargs="+", metavar="NxV",
                   help="softmax losses (cross_entropy, focal_loss): logits shapes, e.g. 8192x32000 "
                        "4096x256000 (default, CUDA: cross_entropy 8192x32000 8192x128256 4096x256000, "
                        "focal_loss 65536x1000 8192x32000; CPU: 256x4096)")
    p.add_argument("--embed-shapes", nargs="+", metavar="BxD",
                   help="embedding losses (contrastive, triplet, info_nce): batch x dim, e.g. 2**20x128 "
                        "(default, CUDA: contrastive/triplet 2**20x128, info_nce 4096x512 16384x512; CPU: "
                        "4096x64 and 512x64)")
    p.add_argument("--lxent-shapes", nargs="+", metavar="NxHxV",
                   help="linear_cross_entropy: tokens x hidden x vocabulary (default, CUDA: 8192x4096x128256; "
                        "CPU: 512x128x8192)")
    p.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                   help="float32, bfloat16, float16 (default: CUDA float32 bfloat16, CPU float32)")
    p.add_argument("--impls", nargs="+", metavar="IMPL",
                   help=f"implementations (default: all): {', '.join(IMPLS)}, liger (cross_entropy only)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="fastloss backend of the fastloss side (default: the current one; --sweep on CUDA: "
                        "triton, so that the kernels are timed at every size)")
    p.add_argument("--repeat", type=int, metavar="ROUNDS",
                   help="interleaved rounds: the implementations of a row take turns, each timed once per "
                        f"round (default: CUDA {DEFAULT_ROUNDS['cuda']}, CPU {DEFAULT_ROUNDS['cpu']})")
    p.add_argument("--round-time", type=float, metavar="SECONDS", default=DEFAULT_ROUND_TIME_S,
                   help="time per implementation per round; the timer chooses the number of calls "
                        "(torch.utils.benchmark blocked_autorange on CPU, triton.testing.do_bench on CUDA; "
                        f"default {DEFAULT_ROUND_TIME_S})")
    p.add_argument("--warmup", type=int, help="untimed calls before timing (default: CUDA 5, CPU 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads while timing (default: torch's current)")
    p.add_argument("--sweep", action="store_true",
                   help="size sweep instead: fwd+bwd device and host time of fastloss and torch.nn (or the "
                        f"eager composition) against size per loss ({', '.join(sweep.SWEEP_LOSSES)}), and "
                        "the crossover: the suggested fastloss._backend.SMALL_PROBLEM_NUMEL per family; "
                        "--sizes sets the element counts (default: CPU 2**5 .. 2**20, CUDA 2**8 .. 2**26, "
                        "every third power of two), --plot draws time against size (log-log) and the ratio")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop starting measurements after this long; the rest are recorded as skipped")
    p.add_argument("--json", metavar="PATH", help="write every measurement and the device/versions as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _shapes(args: argparse.Namespace, losses: Sequence[str], sizes: Sequence[int]) -> dict[str, list[tuple]]:
    given = {"softmax": getattr(args, "shapes", None), "embedding": getattr(args, "embed_shapes", None),
             "linear_xent": getattr(args, "lxent_shapes", None)}
    out: dict[str, list[tuple]] = {}
    for loss in losses:
        fam = specs.get(loss).family
        if fam == "pointwise":
            out[loss] = [(n,) for n in sizes]
        elif given[fam]:
            out[loss] = list(dict.fromkeys(parse_shape(s) for s in split_list(given[fam])))
    return out


def bench_main(args: argparse.Namespace) -> int:
    """``python -m fastloss bench``: tables on stdout, progress on stderr."""
    import fastloss

    device = torch.device(args.device) if args.device else cases.default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastloss bench: CUDA was requested but torch.cuda.is_available() is False")
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise SystemExit("fastloss bench: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    if getattr(args, "sweep", False):
        return sweep.sweep_main(args, device)
    sizes, dtypes, repeat, warmup = default_plan(device)
    try:
        losses = list(dict.fromkeys(specs.resolve_name(s) for s in split_list(args.losses))) or list(specs.SPECS)
        sizes = list(dict.fromkeys(parse_size(s) for s in split_list(args.sizes))) or sizes
        dtypes = list(dict.fromkeys(parse_dtype(s) for s in split_list(args.dtypes))) or dtypes
        shapes = _shapes(args, losses, sizes)
        impls = list(dict.fromkeys(split_list(args.impls))) or None
        known = IMPLS + ("liger",)
        bad = [i for i in impls or () if i not in known]
        if bad:
            raise ValueError(f"unknown implementation(s) {bad}; expected {', '.join(known)}")
    except ValueError as exc:
        raise SystemExit(f"fastloss bench: {exc}") from None
    repeat = args.repeat if args.repeat is not None else repeat
    warmup = args.warmup if args.warmup is not None else warmup
    round_time_s = getattr(args, "round_time", None) or DEFAULT_ROUND_TIME_S
    if repeat < 1 or warmup < 0 or round_time_s <= 0:
        raise SystemExit("fastloss bench: --repeat must be >= 1, --warmup >= 0 and --round-time > 0")
    if args.plot:
        report.pyplot()  # fail before measuring, not after

    plan = bench_plan(losses, dtypes, device, impls, shapes)
    bar = None if args.quiet else progress(len(plan) + 1, desc="fastloss bench")
    started = time.perf_counter()
    backend = getattr(args, "backend", None) or fastloss.get_backend()
    with fastloss.use_backend(backend):
        copy = copy_bandwidth(device)
        advance(bar, f"copy bandwidth {copy / 1e9:.0f} GB/s")
        records = run_bench(plan, device, repeat, warmup, time_limit=args.time_limit, bar=bar,
                            round_time_s=round_time_s)
        info = device_info(device)
    if bar is not None:
        bar.close()
    families = [f for f in specs.FAMILIES if any(specs.get(lo).family == f for lo in losses)]
    meta: dict[str, Any] = {
        "schema": "fastloss-bench/4",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info,
        "copy_gbps": copy / 1e9,
        "baselines": {name: cases.torch_label(name) for name in losses},
        "config": {"losses": losses, "shapes": {lo: [list(s) for s in v] for lo, v in shapes.items()},
                   "dtypes": [dtype_name(d) for d in dtypes],
                   "impls": impls or "all", "repeat": repeat, "rounds": repeat, "round_time_s": round_time_s,
                   "warmup": warmup, "reduction": "mean", "interleaved": True, "backend": backend,
                   "bytes_model": {f: cases.BYTES_MODELS[f] for f in families},
                   "timer": timer_name(device), "noisy_spread": NOISY_SPREAD,
                   "time_limit_s": args.time_limit},
        "elapsed_s": time.perf_counter() - started,
    }
    print(report.format_text(records, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "results": records}, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        report.plot(records, args.plot, meta)
        print(f"wrote {args.plot}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The parser of ``python -m fastloss``."""
    from fastloss import _demo
    from fastloss.cli import check

    p = argparse.ArgumentParser(prog="python -m fastloss", description="fastloss command line: bench, check, demo.")
    sub = p.add_subparsers(dest="command", metavar="{bench,check,demo}")
    bench = sub.add_parser(
        "bench", help="benchmark fastloss against torch.nn eager and torch.compile",
        description="Median time, speed-up, peak memory and share of copy bandwidth of the forward "
                    "and backward of every loss (pointwise, softmax, embedding and linear cross-entropy "
                    "families) for fastloss, torch.nn eager and torch.compile (and Liger-Kernel's "
                    "cross-entropy when installed), timed in interleaved rounds; each ratio is the other's "
                    "time over fastloss's (> 1: fastloss faster), marked '?' when too noisy to read. "
                    "--sweep: fwd+bwd time against size, fastloss vs torch.nn, per loss, and the crossover.",
    )
    add_bench_arguments(bench)
    chk = sub.add_parser(
        "check", help="run every loss once against torch.nn or its naive formula; print OK / FAIL",
        description="Every loss (pointwise, cross-entropy with its options, focal, contrastive, triplet, "
                    "InfoNCE, linear cross-entropy, KL divergence, CombinedLoss, RegularizedLoss) once in "
                    "float32 on this device: loss and gradients against torch.nn, or the naive formula where "
                    "torch.nn lacks the loss. Each line names the implementation that ran (the Triton kernels "
                    "launched, or the PyTorch path). Exit status 1 when any loss disagrees or fails.",
    )
    check.add_check_arguments(chk)
    demo = sub.add_parser(
        "demo", help="train small models with fastloss and torch.nn losses and compare",
        description="Regression with outliers (MSE vs Huber), imbalanced classification (cross-entropy "
                    "vs focal), binary classification (BCE) and a siamese embedding (contrastive), each "
                    "with the fastloss loss and its torch.nn counterpart from the same initial weights.",
    )
    _demo.add_demo_arguments(demo)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    if args.command == "demo":
        from fastloss import _demo

        return _demo.demo_main(args)
    if args.command == "bench":
        return bench_main(args)
    from fastloss.cli import check

    return check.check_main(args)

