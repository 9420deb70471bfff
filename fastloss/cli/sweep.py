"""The size sweep, ``python -m fastloss bench --sweep`` (and bench/bench_overhead.py): forward +
backward time against size, fastloss against torch.nn (or the eager composition where torch.nn has
no such loss), per loss; and the crossover it settles.

Size is the number of elements of the first operand (``x``; the logits; the first embedding
rows): cross_entropy and focal_loss run ``size // SWEEP_CLASSES`` rows of SWEEP_CLASSES classes,
contrastive ``size // SWEEP_DIM`` pairs of width SWEEP_DIM, info_nce ``size // SWEEP_INFO_NCE_DIM``
queries of width SWEEP_INFO_NCE_DIM (up to ``MAX_SIZE``: its B x B logits grow as size squared).

Each record has the device time (median over interleaved rounds, fastloss.cli.timing) and the host
time (``host_s``: wall time to issue one call without synchronizing). End to end, a call costs the
larger of the two: a GPU waits for a slow host, a host for a slow GPU. The crossover of a loss is
the smallest measured size from which fastloss is at least as fast end to end as torch at every
larger measured size; per fastloss.ops family (pointwise, softmax, embedding, info_nce) it is the
value suggested for ``fastloss._backend.SMALL_PROBLEM_NUMEL`` (below it, "auto" sends CUDA inputs
to torch). On CUDA the fastloss side runs with ``use_backend("triton")`` (``--backend``), so that
the kernels are timed at every size whatever the threshold in force.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import fastloss
from fastloss import baselines, specs
from fastloss.cli import report
from fastloss.cli.cases import (
    dtype_name,
    make_inputs,
    parse_dtype,
    parse_size,
    shape_label,
    size_label,
    split_list,
)
from fastloss.cli.timing import (
    DEFAULT_ROUND_TIME_S,
    DEFAULT_ROUNDS,
    NOISY_SPREAD,
    GradStep,
    advance,
    device_info,
    measure_group,
    progress,
    timer_name,
)

#: Classes per row of cross_entropy and focal_loss in the sweep (size = rows x classes).
SWEEP_CLASSES = 8
#: Embedding width of contrastive in the sweep (size = pairs x width).
SWEEP_DIM = 16
#: Embedding width of info_nce in the sweep (size = queries x width).
SWEEP_INFO_NCE_DIM = 64
#: Default sweep sizes (elements per operand): every third power of two.
SWEEP_SIZES = {"cpu": [2**k for k in range(5, 21, 3)], "cuda": [2**k for k in range(8, 27, 3)]}
#: Largest size a loss is swept at, by device type (others: none).
MAX_SIZE = {"info_nce": {"cuda": 2**20, "cpu": 2**14}}
COMBINED_WEIGHTS = (0.7, 0.3)


@functools.cache
def _combined_module() -> torch.nn.Module:
    w_mse, w_l1 = COMBINED_WEIGHTS
    return fastloss.CombinedLoss({fastloss.MSELoss(): w_mse, fastloss.L1Loss(): w_l1})


def _fl_combined(x: Tensor, y: Tensor) -> Tensor:
    return _combined_module()(x, y)


def _torch_combined(x: Tensor, y: Tensor) -> Tensor:
    """The two torch.nn calls a CombinedLoss replaces: 0.7 * mse + 0.3 * l1."""
    return baselines.combined(tuple(zip((F.mse_loss, F.l1_loss), COMBINED_WEIGHTS)), x, y)


def _with_backend(fn: Callable[..., Tensor], backend: str | None) -> Callable[..., Tensor]:
    if backend is None:
        return fn

    def call(*args: Tensor) -> Tensor:
        with fastloss.use_backend(backend):
            return fn(*args)

    return call


@dataclasses.dataclass(frozen=True)
class SweepCase:
    """A loss of the size sweep: its fastloss call, its torch.nn call (or the eager composition),
    how a size becomes its operands, and its fastloss.ops family (``ops``, the crossover's key)."""

    name: str
    ops: str
    family: str
    fastloss: Callable[..., Tensor]
    torch: Callable[..., Tensor]
    torch_label: str
    shape: Callable[[int], tuple[int, ...]]                      # size -> first operand's shape
    make_inputs: Callable[..., tuple[Tensor, ...]]               # (shape, dtype, device, seed) -> operands

    def impl(self, impl: str, backend: str | None = None) -> Callable[..., Tensor]:
        """The callable of "fastloss" (under ``use_backend(backend)`` when given) or "torch"."""
        if impl == "fastloss":
            return _with_backend(self.fastloss, backend)
        if impl == "torch":
            return self.torch
        raise ValueError(f"unknown sweep implementation {impl!r}; expected fastloss or torch")

    def max_size(self, device: torch.device) -> int | None:
        return MAX_SIZE.get(self.name, {}).get(device.type)

    def step(self, impl: str, size: int, dtype: torch.dtype, device: torch.device, sync: bool = False,
             seed: int = 0, backend: str | None = None) -> GradStep:
        """A training step of ``impl`` at ``size``: ``.grad = None; loss(*operands).backward()``."""
        ops = self.make_inputs(self.shape(size), dtype, torch.device(device), seed)
        return GradStep(self.impl(impl, backend), ops, sync=sync)


def _flat(size: int) -> tuple[int, ...]:
    return (size,)


def _rows(width: int) -> Callable[[int], tuple[int, ...]]:
    def shape(size: int) -> tuple[int, ...]:
        return (max(1, size // width), width)

    return shape


def _spec_case(name: str, shape: Callable[[int], tuple[int, ...]]) -> SweepCase:
    spec = specs.get(name)
    base, label = spec.baseline_fn()
    return SweepCase(name, spec.ops, spec.family, spec.fastloss_fn, base, label, shape,
                     functools.partial(make_inputs, spec))


@functools.cache
def _sweep_cases() -> dict[str, SweepCase]:
    cases = {name: _spec_case(name, _flat) for name in ("mse", "l1", "huber", "bce_with_logits")}
    cases["cross_entropy"] = _spec_case("cross_entropy", _rows(SWEEP_CLASSES))
    cases["focal_loss"] = _spec_case("focal_loss", _rows(SWEEP_CLASSES))
    cases["contrastive"] = _spec_case("contrastive", _rows(SWEEP_DIM))
    cases["info_nce"] = _spec_case("info_nce", _rows(SWEEP_INFO_NCE_DIM))
    cases["combined"] = SweepCase("combined", "pointwise", "pointwise", _fl_combined, _torch_combined,
                                  "0.7 F.mse_loss + 0.3 F.l1_loss", _flat, functools.partial(make_inputs,
                                                                                          specs.get("mse")))
    return cases


#: The sweep's default losses, in report order, with what each is (the fastloss side).
SWEEP_LOSSES = {
    "mse": "mse_loss", "l1": "l1_loss", "huber": "huber_loss(delta=1)",
    "bce_with_logits": "binary_cross_entropy_with_logits",
    "cross_entropy": f"cross_entropy, {SWEEP_CLASSES} classes",
    "focal_loss": f"softmax focal_loss(alpha 0.25, gamma 2), {SWEEP_CLASSES} classes",
    "contrastive": f"contrastive_loss(margin 2), width {SWEEP_DIM}",
    "info_nce": f"info_nce(temperature 0.07), width {SWEEP_INFO_NCE_DIM}",
    "combined": "CombinedLoss(MSELoss 0.7, L1Loss 0.3)",
}
_SWEEP_ALIASES = {"focal": "focal_loss", "combinedloss": "combined", "combined_loss": "combined"}


def resolve_sweep_loss(name: str) -> str:
    """The sweep's name of a loss: "focal" is the softmax focal loss here, "combined" the
    CombinedLoss; other names as fastloss.specs.resolve_name reads them."""
    key = name.strip().lower().replace("-", "_")
    key = _SWEEP_ALIASES.get(key, key)
    cases = _sweep_cases()
    if key not in cases:
        try:
            key = specs.resolve_name(key)
        except ValueError:
            key = None
    if key not in cases:
        raise ValueError(f"unknown sweep loss {name!r}; expected one of {', '.join(cases)}")
    return key


def sweep_case(name: str) -> SweepCase:
    """The SweepCase of a loss name (see :func:`resolve_sweep_loss`)."""
    return _sweep_cases()[resolve_sweep_loss(name)]


def sweep_record(case: SweepCase, impl: str, size: int, dtype: torch.dtype, device: torch.device,
                 backend: str | None = None) -> dict[str, Any]:
    """A record (fastloss.cli.cases) of the sweep: with ``size`` and ``ops``, without a byte model."""
    shape = case.shape(size)
    rec = {"loss": case.name, "family": case.family, "ops": case.ops, "impl": impl, "size": size,
           "shape": list(shape), "shape_label": shape_label(shape), "dtype": dtype_name(dtype),
           "device": device.type, "baseline": "fastloss.functional" if impl == "fastloss" else case.torch_label,
           "bytes_moved": None, "status": "ok", "reason": None}
    if impl == "fastloss":
        rec["backend"] = backend or fastloss.get_backend()
    return rec


def run_sweep(losses: Sequence[str], sizes: Sequence[int], dtype: torch.dtype, device: torch.device,
              rounds: int, warmup: int = 3, round_time_s: float = DEFAULT_ROUND_TIME_S,
              bar=None, time_limit: float | None = None, backend: str | None = None) -> list[dict]:
    """fastloss (under ``use_backend(backend)`` when given) and torch, interleaved
    (fastloss.cli.timing.measure_group, host time included), per (loss, size): records in that
    order. After ``time_limit`` seconds the rest are skipped, as are sizes above a loss's MAX_SIZE."""
    t0 = time.perf_counter()
    records: list[dict] = []
    for loss in losses:
        case = sweep_case(loss)
        for size in sizes:
            recs = {impl: sweep_record(case, impl, size, dtype, device, backend) for impl in ("fastloss", "torch")}
            limit = case.max_size(device)
            if limit is not None and size > limit:
                reason = f"above {size_label(limit)} (B x B logits)"
            elif time_limit is not None and time.perf_counter() - t0 > time_limit:
                reason = f"time limit of {time_limit:g} s reached"
            else:
                reason = None
                makers = {impl: functools.partial(case.step, impl, size, dtype, device, backend=backend)
                          for impl in recs}
                measure_group(makers, recs, device, rounds, warmup, round_time_s, host=True)
            if reason:
                for rec in recs.values():
                    rec.update(status="skipped", reason=reason)
            records += recs.values()
            advance(bar, f"{case.name} {size_label(size)}")
    return records


def end_to_end(rec: dict | None) -> float | None:
    """Seconds a call costs end to end: the larger of its device time and its host time."""
    if not rec or rec.get("status") != "ok" or rec.get("median_s") is None:
        return None
    return max(rec["median_s"], rec.get("host_s") or 0.0)


def _by_point(records: Iterable[dict]) -> dict[tuple, dict[str, dict]]:
    by: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by.setdefault((r["loss"], r["size"], r["dtype"]), {})[r["impl"]] = r
    return by


def sweep_ratios(records: Iterable[dict]) -> list[dict]:
    """One entry per (loss, size, dtype): torch's time / fastloss's time (> 1: fastloss faster),
    its quartiles over the rounds, whether it is too noisy to read, the two medians, the two host
    times and the two end-to-end times (:func:`end_to_end`)."""
    out = []
    for (loss, size, dtype), impls in _by_point(records).items():
        fl, tn = impls.get("fastloss"), impls.get("torch")
        stats = report.ratio_stats(fl, tn)
        out.append({
            "loss": loss, "ops": (fl or tn or {}).get("ops"), "size": size, "dtype": dtype,
            "ratio": stats[0] if stats else None, "ratio_q1": stats[1] if stats else None,
            "ratio_q3": stats[2] if stats else None, "noisy": report.is_noisy(stats),
            "fastloss_median_s": fl.get("median_s") if fl else None,
            "torch_median_s": tn.get("median_s") if tn else None,
            "fastloss_host_s": fl.get("host_s") if fl else None,
            "torch_host_s": tn.get("host_s") if tn else None,
            "fastloss_end_to_end_s": end_to_end(fl), "torch_end_to_end_s": end_to_end(tn),
        })
    return out


def crossover(records: Iterable[dict]) -> dict[str, dict[str, Any]]:
    """Per loss: ``size``, the smallest measured size from which fastloss's end-to-end time is at
    most torch's at every larger measured size (None when fastloss is slower at the largest), and
    ``sizes``, the sizes where both were measured."""
    points: dict[str, list[dict]] = {}
    for r in sweep_ratios(records):
        if r["fastloss_end_to_end_s"] is not None and r["torch_end_to_end_s"] is not None:
            points.setdefault(r["loss"], []).append(r)
    out = {}
    for loss, pts in points.items():
        pts.sort(key=lambda r: r["size"])
        size = None
        for r in reversed(pts):
            if r["fastloss_end_to_end_s"] > r["torch_end_to_end_s"]:
                break
            size = r["size"]
        out[loss] = {"ops": pts[0]["ops"], "size": size, "sizes": [r["size"] for r in pts]}
    return out


def suggested_thresholds(records: Iterable[dict]) -> dict[str, int | None]:
    """{fastloss.ops family: suggested SMALL_PROBLEM_NUMEL} from the swept losses of each family
    measured: the largest crossover among them (None when the kernels lost at the largest size of
    any of them)."""
    by_ops: dict[str, list[int | None]] = {}
    for c in crossover(records).values():
        by_ops.setdefault(c["ops"], []).append(c["size"])
    return {ops: (None if None in sizes else max(sizes))
            for ops in specs.OPS for sizes in [by_ops.get(ops)] if sizes}


def _us(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    us = seconds * 1e6
    return f"{us:.3g}" if us < 1e3 else f"{us:.0f}"


def format_thresholds(records: Sequence[dict]) -> list[str]:
    """The crossover lines: each loss's crossover and the suggested SMALL_PROBLEM_NUMEL dict."""
    cross = crossover(records)
    if not cross:
        return []
    lines = [("crossover (end to end = max(device time, host time)): smallest measured size from which "
             "fastloss is at least as fast as torch at every larger measured size")]
    for loss, c in cross.items():
        top = size_label(max(c["sizes"]))
        what = (f"from {size_label(c['size'])}" if c["size"] is not None
                else f"never (slower at {top}, the largest measured)")
        lines.append(f"  {loss} ({c['ops']}): {what}")
    sugg = suggested_thresholds(records)
    body = ", ".join(f'"{k}": {"None" if v is None else v}' for k, v in sugg.items())
    lines.append(f"suggested fastloss._backend.SMALL_PROBLEM_NUMEL = {{{body}}}")
    if None in sugg.values():
        lines.append("  (None: the kernels did not win at the largest measured size; keep torch there or "
                     "measure larger sizes)")
    return lines


def format_sweep(records: Sequence[dict], meta: dict | None = None) -> str:
    """The sweep as text: the ratio (torch / fastloss, with its interquartile range) per size and
    loss, the medians, the host times when measured, and the crossover."""
    ratios = sweep_ratios(records)
    losses = list(dict.fromkeys(r["loss"] for r in ratios))
    sizes = sorted({r["size"] for r in ratios})
    cell = {(r["loss"], r["size"]): r for r in ratios}
    out = []
    if meta:
        dev = meta.get("device", {})
        threads = f", {dev['threads']} thread(s)" if dev.get("threads") else ""
        backend = meta.get("config", {}).get("backend")
        out.append(f"fastloss bench --sweep on {dev.get('name', '?')} ({dev.get('type', '?')}{threads}), "
                   f"torch {dev.get('torch')}, triton {dev.get('triton')}, {meta.get('config', {}).get('dtype')}"
                   + (f", fastloss backend {backend}" if backend else ""))
        out.append("fwd+bwd (.grad = None; loss.backward()) against size = elements of the first operand; "
                   "baselines: " + "; ".join(f"{lo}: {lab}" for lo, lab in (meta.get("baselines") or {}).items()))
        out += report.header_notes(meta)
        out.append("host: wall time to issue one call without synchronizing; end to end = max(median, host)")
    skipped = [r for r in records if r.get("status") != "ok"]

    def table(title: str, fmt: Callable[[dict], str]) -> None:
        rows = [["size"] + losses]
        rows += [[size_label(n)] + [fmt(cell[(lo, n)]) if (lo, n) in cell else "-" for lo in losses]
                 for n in sizes]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out.extend(["", title])
        out.extend("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)

    table("torch time / fastloss time (> 1: fastloss faster), median over rounds (interquartile range)",
          lambda r: report.ratio_cell((r["ratio"], r["ratio_q1"], r["ratio_q3"]) if r["ratio"] is not None
                                      else None))
    table("median us, fastloss / torch", lambda r: f"{_us(r['fastloss_median_s'])} / {_us(r['torch_median_s'])}")
    if any(r["fastloss_host_s"] is not None for r in ratios):
        table("host us, fastloss / torch", lambda r: f"{_us(r['fastloss_host_s'])} / {_us(r['torch_host_s'])}")
    if skipped:
        out.append("")
        out.extend(f"skipped: {r['loss']} {size_label(r['size'])} {r['impl']}: {r['reason']}" for r in skipped)
    lines = format_thresholds(records)
    if lines:
        out += [""] + lines
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
                    color=report.PLOT_COLORS.get(impl))
            ax.fill_between(xs, [r["q1_s"] * 1e6 for r in recs], [r["q3_s"] * 1e6 for r in recs],
                            color=report.PLOT_COLORS.get(impl), alpha=0.2, lw=0)
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
    plt = report.pyplot()
    fig = make_sweep_figure(records, meta, plt)
    fig.savefig(path, dpi=110)
    plt.close(fig)




def sweep_main(args: argparse.Namespace, device: torch.device) -> int:
    """``python -m fastloss bench --sweep``: the tables and the crossover on stdout, progress on stderr."""
    try:
        losses = [resolve_sweep_loss(s) for s in split_list(args.losses)] or list(SWEEP_LOSSES)
        sizes = [parse_size(s) for s in split_list(args.sizes)] or SWEEP_SIZES[
            "cuda" if device.type == "cuda" else "cpu"]
        dtypes = [parse_dtype(s) for s in split_list(args.dtypes)] or [torch.float32]
        losses, sizes = list(dict.fromkeys(losses)), sorted(set(sizes))
        if len(set(dtypes)) > 1:
            raise ValueError("--sweep takes one dtype")
        if getattr(args, "shapes", None) or getattr(args, "embed_shapes", None) or args.impls:
            raise ValueError("--sweep sets its own shapes and implementations (fastloss, torch)")
    except ValueError as exc:
        raise SystemExit(f"fastloss bench --sweep: {exc}") from None
    # on CUDA the kernels at every size (whatever threshold "auto" applies); elsewhere as set
    backend = getattr(args, "backend", None) or ("triton" if device.type == "cuda" else None)
    rounds = args.repeat if args.repeat is not None else DEFAULT_ROUNDS["cuda" if device.type == "cuda" else "cpu"]
    warmup = args.warmup if args.warmup is not None else 3
    round_time_s = getattr(args, "round_time", None) or DEFAULT_ROUND_TIME_S
    if rounds < 1 or warmup < 0 or round_time_s <= 0:
        raise SystemExit("fastloss bench: --repeat must be >= 1, --warmup >= 0 and --round-time > 0")
    if args.plot:
        report.pyplot()  # fail before measuring, not after
    bar = None if args.quiet else progress(len(losses) * len(sizes), desc="fastloss sweep")
    started = time.perf_counter()
    records = run_sweep(losses, sizes, dtypes[0], device, rounds, warmup, round_time_s, bar,
                        time_limit=args.time_limit, backend=backend)
    if bar is not None:
        bar.close()
    cases = {lo: sweep_case(lo) for lo in losses}
    meta = {
        "schema": "fastloss-sweep/2",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(device),
        "baselines": {lo: c.torch_label for lo, c in cases.items()},
        "config": {"losses": losses, "sizes": sizes, "shapes": {lo: {str(n): list(c.shape(n)) for n in sizes}
                                                                for lo, c in cases.items()},
                   "dtype": dtype_name(dtypes[0]), "repeat": rounds, "rounds": rounds,
                   "round_time_s": round_time_s, "warmup": warmup, "interleaved": True,
                   "backend": backend or fastloss.get_backend(),
                   "timer": timer_name(device), "noisy_spread": NOISY_SPREAD, "reduction": "mean",
                   "step": ".grad = None; loss(*operands).backward()", "time_limit_s": args.time_limit},
        "elapsed_s": time.perf_counter() - started,
    }
    print(format_sweep(records, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "results": records, "ratios": sweep_ratios(records),
                       "crossover": crossover(records), "small_problem_numel": suggested_thresholds(records)},
                      f, indent=1)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_sweep(records, args.plot, meta)
        print(f"wrote {args.plot}")
    return 0
