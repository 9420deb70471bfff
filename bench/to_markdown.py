"""Combine a GPU check's outputs into one JSON and render markdown.

    # what bench/gpu_check.sh runs: combine and render
    python bench/to_markdown.py --pytest-json bench.json --sweep-json crossover.json \\
        --tune-json tune.json --tests-junit tests.xml --step tests=0 --step bench=0 \\
        --out-json bench/results/2026-01-01-nvidia-h100.json --out-md bench/results/2026-01-01-nvidia-h100.md

    # re-render a combined JSON, or render one pytest-benchmark / `fastloss bench --json` file
    python bench/to_markdown.py bench/results/2026-01-01-nvidia-h100.json
    python bench/to_markdown.py --pytest-json .benchmarks/run.json

Markdown goes to --out-md, or stdout. The pytest-benchmark files and ``python -m fastloss bench``
write one record format (fastloss.cli.cases), rendered by fastloss.cli.report.format_markdown:
one table per family (pointwise; softmax: cross-entropy and softmax focal; embedding: contrastive
and triplet, InfoNCE in TFLOP/s; linear_xent), one row per (loss, shape, dtype). The crossover
sweep (``--sweep-json``: ``python -m fastloss bench --sweep --json``) is rendered by
fastloss.cli.sweep.format_sweep, with the suggested SMALL_PROBLEM_NUMEL; the row-kernel launch
sweep (``--tune-json``: bench/sweep_softmax.py --json) as its records. Missing or empty inputs
are reported, never fatal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any

# the fastloss of the checkout this script is in (bench/ is not installed; another fastloss may be)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastloss.cli import report, sweep


def load_json(path: str | None, notes: list[str]) -> dict | None:
    if not path:
        return None
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        notes.append(f"{path}: not read ({exc.strerror or exc})")
        return None
    if not text.strip():
        notes.append(f"{path}: empty (no benchmark finished)")
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        notes.append(f"{path}: invalid JSON ({exc})")
        return None


def junit_summary(path: str | None, notes: list[str]) -> dict | None:
    """Counts and failing test ids from a pytest --junitxml file."""
    if not path:
        return None
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        notes.append(f"{path}: no test report ({exc})")
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out: dict[str, Any] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0}
    for s in suites:
        for key, attr in (("tests", "tests"), ("failures", "failures"), ("errors", "errors"),
                          ("skipped", "skipped")):
            out[key] += int(s.get(attr, 0) or 0)
        out["time_s"] += float(s.get("time", 0) or 0)
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    failed = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").strip().splitlines()
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}"
                          + (f" - {msg[0][:200]}" if msg else ""))
    out["failed"] = failed
    return out


def merge_pytest(datas: list[dict]) -> dict | None:
    """Several pytest-benchmark JSON files (one per bench file run) as one: benchmarks and skips
    concatenated, the first file's machine and device facts."""
    datas = [d for d in datas if d]
    if len(datas) <= 1:
        return datas[0] if datas else None
    out = dict(datas[0])
    out["benchmarks"] = [b for d in datas for b in d.get("benchmarks", [])]
    fl = dict(datas[0].get("fastloss") or {})
    fl["skipped"] = [s for d in datas for s in (d.get("fastloss") or {}).get("skipped", [])]
    fl["copy_gbps"] = next((d["fastloss"]["copy_gbps"] for d in datas
                            if (d.get("fastloss") or {}).get("copy_gbps")), None)
    fl["elapsed_s"] = sum((d.get("fastloss") or {}).get("elapsed_s") or 0 for d in datas)
    out["fastloss"] = fl
    return out


def pytest_records(data: dict | None) -> list[dict]:
    """pytest-benchmark JSON -> records (bench/conftest.py keeps each benchmark's record as its
    ``extra_info``): the measured ones, then the skipped ones, in report order."""
    if not data:
        return []
    records = [dict(b["extra_info"]) for b in data.get("benchmarks", [])
               if "family" in (b.get("extra_info") or {})]
    records += [dict(r) for r in (data.get("fastloss") or {}).get("skipped", []) if "family" in r]
    return report.sort_records(records)


def split_sweep(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(table records, size-sweep records: bench/bench_overhead.py's, which have a ``size``)."""
    return [r for r in records if "size" not in r], [r for r in records if "size" in r]


def _strip_pytest(data: dict | None) -> dict | None:
    """pytest-benchmark JSON without the raw per-round samples (kept small for the repository)."""
    if not data:
        return data
    out = dict(data)
    out["benchmarks"] = [{**b, "stats": {k: v for k, v in (b.get("stats") or {}).items() if k != "data"}}
                         for b in data.get("benchmarks", [])]
    return out


def combine(args: argparse.Namespace) -> dict:
    notes: list[str] = []
    pytest_data = merge_pytest([load_json(path, notes) for path in args.pytest_json or []])
    cli_data = load_json(args.cli_json, notes)
    sweep_data = load_json(args.sweep_json, notes)
    tune_data = load_json(args.tune_json, notes)
    tests = junit_summary(args.tests_junit, notes)
    steps = {}
    for item in args.step or []:
        name, _, rc = item.partition("=")
        steps[name] = int(rc) if rc.strip().lstrip("-").isdigit() else rc
    device = ((cli_data or {}).get("device") or ((pytest_data or {}).get("fastloss") or {}).get("device")
              or (sweep_data or {}).get("device") or {})
    return {
        "schema": "fastloss-gpu-check/2",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": args.git_rev,
        "device": device,
        "steps": steps,
        "ok": bool(steps) and all(v == 0 for v in steps.values()),
        "tests": tests,
        "pytest_benchmark": _strip_pytest(pytest_data),
        "cli": cli_data,
        "sweep": sweep_data,
        "tune": tune_data,
        "notes": notes,
    }


def _rc_text(rc: Any) -> str:
    if rc == 0:
        return "ok"
    why = {124: ": timed out", 137: ": killed", 5: ": no tests collected", 2: ": interrupted or usage error"}
    return f"FAILED (rc {rc}{why.get(rc, '') if isinstance(rc, int) else ''})"


def render(doc: dict) -> str:
    """Markdown of a combined JSON (or of a bare pytest-benchmark / CLI JSON wrapped by main)."""
    dev = doc.get("device") or {}
    title = dev.get("name", "unknown device")
    date = (doc.get("date") or "")[:10]
    out = [f"# fastloss benchmarks: {title}{', ' + date if date else ''}", ""]
    facts = [f"torch {dev.get('torch')}", f"triton {dev.get('triton')}"]
    if dev.get("cuda"):
        facts.append(f"CUDA {dev['cuda']}")
    if dev.get("python"):
        facts.append(f"python {dev['python']}")
    if doc.get("git_rev"):
        facts.append(f"git {doc['git_rev']}")
    out.append("- " + ", ".join(facts))
    copies = []
    pb = doc.get("pytest_benchmark") or {}
    cli = doc.get("cli") or {}
    if (pb.get("fastloss") or {}).get("copy_gbps"):
        copies.append(f"{pb['fastloss']['copy_gbps']:.0f} GB/s (pytest run)")
    if cli.get("copy_gbps"):
        copies.append(f"{cli['copy_gbps']:.0f} GB/s (CLI run)")
    if copies:
        out.append("- device-to-device copy (bytes read + written): " + ", ".join(copies))
    if doc.get("steps"):
        steps = ", ".join(f"{k} {_rc_text(v)}" for k, v in doc["steps"].items())
        out.append(f"- steps: {steps}; overall {'PASS' if doc.get('ok') else 'FAIL'}")
    tests = doc.get("tests")
    if tests:
        out.append(f"- tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} "
                   f"errors, {tests['skipped']} skipped in {tests['time_s']:.0f} s")
        out.extend(f"  - FAILED {t}" for t in tests.get("failed", [])[:30])
    out.extend(f"- note: {n}" for n in doc.get("notes") or [])
    out.append("")
    out.append("All numbers: one fwd+bwd step of the loss, reduction=\"mean\", median time (on CUDA: "
               "CUDA events around the step, L2 flushed before each, no synchronize inside: device "
               "time). GB/s and % copy "
               "use the fewest bytes a fused fwd+bwd moves (each input read once, each gradient written "
               "once; the model of each family is stated above its table) over the median time, against "
               "the device-to-device copy. Peak memory: max_memory_allocated during one step minus what "
               "was allocated before (gradients included).")
    out.append("")
    records, overhead = split_sweep(pytest_records(pb))
    if records:
        out.append("## pytest bench/ (pytest-benchmark; L2 flushed and grad cleared in setup; on CUDA "
                   "the times are triton.testing.do_bench's, measured after pytest-benchmark's wall-clock "
                   "rounds, which are in the JSON as wall_median_s)")
        out.append("")
        out.append(report.format_markdown(records))
    if cli.get("results"):
        conf = cli.get("config") or {}
        rounds = "interleaved rounds" if conf.get("interleaved") else "repetitions"
        out.append(f"## python -m fastloss bench ({conf.get('timer', '')}, {conf.get('repeat')} {rounds})")
        out.append("")
        out.append(report.format_markdown(report.sort_records(list(cli["results"]))))
    if overhead:
        out += ["## pytest bench/bench_overhead.py: time against size", "", "```",
                sweep.format_sweep(overhead), "```", ""]
    sw = doc.get("sweep") or {}
    if sw.get("results"):
        conf = sw.get("config") or {}
        out.append(f"## python -m fastloss bench --sweep (fastloss backend {conf.get('backend')}): time against "
                   "size and the crossover")
        out.append("")
        out.append("```")
        out.append(sweep.format_sweep(sw["results"]))
        out.append("```")
        out.append("")
    tune = (doc.get("tune") or {}).get("records")
    if tune:
        out.append("## bench/sweep_softmax.py: row-kernel launch configurations")
        out.append("")
        out.append("| case | config (BLOCK_ROWS, BLOCK, single pass, warps) | ms | vs committed | GB/s | loss |")
        out.append("|---|---|--:|--:|--:|---|")
        for r in tune:
            if "error" in r:
                out.append(f"| {r['case']} | {r['config']} | failed: {r['error'][:80]} | | | |")
            else:
                tag = " (committed)" if r.get("committed") else ""
                out.append(f"| {r['case']} | {r['config']}{tag} | {r['median_s'] * 1e3:.3f} | "
                           f"{r['vs_committed']:.2f}x | {r['gbps']:.0f} | {'ok' if r['loss_ok'] else 'WRONG'} |")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("combined", nargs="?", help="a combined JSON written by --out-json, to re-render")
    p.add_argument("--pytest-json", action="append", metavar="PATH",
                   help="pytest --benchmark-json output (repeatable: one per bench file run)")
    p.add_argument("--cli-json", help="python -m fastloss bench --json output")
    p.add_argument("--sweep-json", help="python -m fastloss bench --sweep --json output (the crossover)")
    p.add_argument("--tune-json", help="bench/sweep_softmax.py --json output")
    p.add_argument("--tests-junit", help="pytest --junitxml output of the test suite")
    p.add_argument("--step", action="append", metavar="NAME=RC", help="exit status of a step (repeatable)")
    p.add_argument("--git-rev", help="commit the run was made from")
    p.add_argument("--out-json", help="write the combined JSON here")
    p.add_argument("--out-md", help="write the markdown here (default: stdout)")
    p.add_argument("--out-png", help="write the bar chart of the pytest benchmarks here (needs matplotlib)")
    args = p.parse_args(argv)
    if args.combined:
        notes: list[str] = []
        doc = load_json(args.combined, notes)
        if doc is None:
            print("; ".join(notes), file=sys.stderr)
            return 1
        if "benchmarks" in doc:  # a bare pytest-benchmark file
            doc = {"pytest_benchmark": doc, "device": (doc.get("fastloss") or {}).get("device"),
                   "date": doc.get("datetime")}
        elif "results" in doc and "schema" in doc and doc["schema"].startswith("fastloss-bench"):
            doc = {"cli": doc, "device": doc.get("device"), "date": doc.get("date")}
    else:
        doc = combine(args)
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(doc, f, indent=1)
    md = render(doc)
    if args.out_png:
        records = split_sweep(pytest_records(doc.get("pytest_benchmark")))[0]
        if records:
            try:
                report.plot(records, args.out_png, {"device": doc.get("device") or {}})
            except SystemExit as exc:  # no matplotlib: the markdown still goes out
                print(exc, file=sys.stderr)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(md)
    else:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
