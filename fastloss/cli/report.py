"""Reports of bench records (fastloss.cli.cases describes the record): plain-text tables for the
terminal, markdown for results files, a PNG of bars.

A ratio ("vs X") is X's time over fastloss's: > 1 means fastloss is faster. When both records were
timed in the same interleaved rounds it is the median of the per-round ratios, with their
interquartile range, marked "?" when that range is wider than NOISY_SPREAD of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from fastloss import specs
from fastloss.cli.cases import ALL_IMPLS, shape_label, size_label, torch_label
from fastloss.cli.timing import NOISY_SPREAD, quartiles


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
        q1, med, q3 = quartiles([y / x for x, y in zip(a, b)])
        return med, q1, q3
    med = other["median_s"] / fl["median_s"]
    if fl.get("q1_s") and fl.get("q3_s") and other.get("q1_s") is not None and other.get("q3_s") is not None:
        return med, other["q1_s"] / fl["q3_s"], other["q3_s"] / fl["q1_s"]
    return med, med, med


def is_noisy(stats: tuple[float, float, float] | None) -> bool:
    """Whether a ratio's interquartile range is wider than NOISY_SPREAD of its median."""
    return stats is not None and stats[0] > 0 and (stats[2] - stats[1]) / stats[0] > NOISY_SPREAD


def ratio_cell(stats: tuple[float, float, float] | None) -> str:
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
_DIM_HEADER = {"pointwise": "N", "softmax": "N x V", "embedding": "B x D", "linear_xent": "N x H x V"}
_FAMILY_ORDER = specs.FAMILIES
#: What each table measures, under its heading (family, metric).
_SECTION_NOTES = {
    ("pointwise", "gbps"): "Pointwise losses, x and y of N elements, step `x.grad = None; loss(x, y).backward()`; "
                           "GB/s and % copy under 3 x N x itemsize (read x, read y, write grad).",
    ("softmax", "gbps"): "Softmax family, logits N x V and int64 targets, step "
                         "`torch.autograd.grad(loss(x, t), x)`; GB/s and % copy under P x N x V x itemsize + 8 N, "
                         "P = 2 when V <= 32768 (a row fits "
                         "on chip: read logits, write grad), else 3. focal_loss is the softmax focal loss "
                         "(alpha 0.25, gamma 2) against the classic cross_entropy(reduction='none') composition.",
    ("embedding", "gbps"): "Embedding pair losses, k operands of B x D (contrastive k = 2 with margin 2 against "
                           "the seed composition, triplet k = 3 against F.triplet_margin_loss), step "
                           "`.grad = None; loss.backward()`; GB/s and % copy under 2 x k x B x D x itemsize.",
    ("embedding", "tflops"): "InfoNCE, query and key B x D, temperature 0.07, against the naive formula "
                             "(normalize, q @ k.T / t, cross_entropy with arange labels: a B x B matrix); "
                             "TFLOP/s under 6 x B^2 x D (the three B x B x D products).",
    ("linear_xent", "tflops"): "Fused linear + cross-entropy, hidden states N x H, projection V x H, int64 targets, "
                               "step `torch.autograd.grad(loss, (x, W))`, against "
                               "F.cross_entropy(F.linear(x, W), t); TFLOP/s under 6 x N x H x V (the three GEMMs).",
}


def _metric(rec: dict) -> str:
    return "tflops" if rec.get("flops_model") or rec.get("loss") == "info_nce" else "gbps"


def _shape_key(rec: dict) -> tuple:
    return tuple(rec.get("shape") or ())


def group_records(records: Iterable[dict]) -> dict[tuple[str, tuple, str], dict[str, dict]]:
    """{(loss, shape, dtype): {impl: record}} in first-seen order."""
    groups: dict[tuple[str, tuple, str], dict[str, dict]] = {}
    for r in records:
        groups.setdefault((r["loss"], _shape_key(r), r["dtype"]), {})[r["impl"]] = r
    return groups


def sort_records(records: Iterable[dict]) -> list[dict]:
    """Records ordered by family, loss (report order), shape, dtype, implementation."""
    losses, impls = list(specs.SPECS), list(ALL_IMPLS)
    dtypes = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}

    def key(r: dict) -> tuple:
        return (_FAMILY_ORDER.index(r["family"]) if r["family"] in _FAMILY_ORDER else 9,
                losses.index(r["loss"]) if r.get("loss") in losses else 99,
                tuple(d or 0 for d in _shape_key(r)), dtypes.get(r.get("dtype"), 9),
                impls.index(r["impl"]) if r.get("impl") in impls else 9)

    return sorted(records, key=key)


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
        row = [label, dtype] + [_ms(r) for r in recs] + [ratio_cell(ratio_stats(fl, by.get(i))) for i in others]
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
    "softmax": "softmax P*N*V*itemsize + 8*N (P = 2 if V <= 32768 else 3)",
    "linear_xent": "linear_xent TFLOP/s of 6*N*H*V",
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
    records = list(records)
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
PLOT_COLORS = {"fastloss": "#d62728", "fastloss_inplace": "#ff9896", "torch": "#7f7f7f",
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
            bars = ax.bar(xs, heights, width, label=impl, color=PLOT_COLORS.get(impl))
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
    plt = pyplot()
    fig = make_bench_figure(records, meta, plt)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("fastloss bench --plot needs matplotlib: pip install fastloss[plot]") from None
    return plt
