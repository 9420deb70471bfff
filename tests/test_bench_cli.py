"""``python -m fastloss bench``: interleaved timing, spread and noisy ratios, the header, empty
columns, progress output; ``bench --sweep``: its cases, JSON and PNG. Small sizes, short rounds:
nothing here asserts a timing."""

from __future__ import annotations

import io
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from fastloss.__main__ import main
from fastloss.cli import report, sweep, timing


def test_interleave_rotates_the_order_every_round() -> None:
    seen = []
    steps = {name: object() for name in ("a", "b", "c")}
    samples, errors = timing.interleave(steps, 4, lambda name, step: seen.append(name) or [1.0])
    assert seen == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert errors == {} and {k: len(v) for k, v in samples.items()} == {"a": 4, "b": 4, "c": 4}


def test_measure_group_interleaves_real_timer_rounds_and_keeps_per_round_medians() -> None:
    # with the CPU timer itself (torch.utils.benchmark chooses the calls per block): the runs of
    # one implementation alternate with the other's, one run per round
    log: list[str] = []

    class Step:
        def __init__(self, name: str):
            self.name = name

        def __call__(self) -> None:
            log.append(self.name)

        def zero_grad(self) -> None:
            pass

    device = torch.device("cpu")
    recs = {name: {"loss": "x", "impl": name, "status": "ok", "bytes_moved": None} for name in ("fl", "tn")}
    timing.measure_group({"fl": lambda: Step("fl"), "tn": lambda: Step("tn")}, recs, device, rounds=3,
                         warmup=1, round_time_s=0.002)
    timed = log[4:]  # first call + 1 warm-up call of each
    runs = [name for i, name in enumerate(timed) if i == 0 or timed[i - 1] != name]
    # rounds fl tn | tn fl | fl tn: the rotation puts the same implementation on both sides of a
    # round boundary (merged runs), so 4 runs; timing each alone, or without rotating, gives 2 or 6
    assert runs == ["fl", "tn", "fl", "tn"]
    for rec in recs.values():
        assert rec["status"] == "ok" and rec["rounds"] == 3 and len(rec["round_medians_s"]) == 3
        assert rec["q1_s"] <= rec["median_s"] <= rec["q3_s"]
        assert "blocked_autorange" in rec["timer"]


def test_a_step_failing_while_timed_is_skipped_and_the_others_still_timed() -> None:
    calls = {"n": 0}

    def bad():
        calls["n"] += 1
        if calls["n"] > 2:  # first call and warm-up pass
            raise RuntimeError("boom")

    recs = {name: {"impl": name, "status": "ok", "bytes_moved": None} for name in ("ok", "bad")}
    timing.measure_group({"ok": lambda: (lambda: None), "bad": lambda: bad}, recs, torch.device("cpu"),
                         rounds=2, warmup=1, round_time_s=0.001)
    assert recs["ok"]["status"] == "ok" and recs["ok"]["rounds"] == 2
    assert recs["bad"]["status"] == "skipped" and "boom" in recs["bad"]["reason"]


def _rec(impl: str, rounds: list[float], loss: str = "mse", **extra) -> dict:
    q1, med, q3 = timing.quartiles(rounds)
    return {"loss": loss, "family": "pointwise", "impl": impl, "shape": [2**18], "dtype": "float32", "device": "cpu",
            "status": "ok", "median_s": med, "q1_s": q1, "q3_s": q3, "round_medians_s": rounds,
            "bytes_moved": 3 * 4 * 2**18, "peak_mem_bytes": None, **extra}


def test_ratio_is_torch_over_fastloss_per_round_and_noisy_ratios_are_marked() -> None:
    fl = _rec("fastloss", [1.0, 1.0, 1.0, 1.0, 1.0])
    steady = _rec("torch", [2.0, 2.02, 1.98, 2.0, 2.01])
    noisy = _rec("torch", [0.9, 3.0, 1.5, 2.5, 0.5])
    med, lo, hi = report.ratio_stats(fl, steady)
    assert med == pytest.approx(2.0) and lo <= med <= hi  # torch twice as slow: fastloss 2x faster
    assert not report.is_noisy((med, lo, hi))
    assert report.is_noisy(report.ratio_stats(fl, noisy))
    # paired by round: the same slow spell in both leaves the ratio steady
    assert not report.is_noisy(report.ratio_stats(_rec("fastloss", [1, 5, 1, 5, 1]),
                                                  _rec("torch", [2, 10, 2, 10, 2])))
    assert report.ratio_cell(report.ratio_stats(fl, steady)).startswith("2.00x (")
    assert report.ratio_cell(report.ratio_stats(fl, noisy)).endswith(" ?")


def test_text_report_explains_itself_marks_noise_and_drops_empty_columns() -> None:
    recs = [_rec("fastloss", [1e-4] * 5), _rec("torch", [0.9e-4, 3e-4, 1.5e-4, 2.5e-4, 0.5e-4]),
            _rec("torch.compile", [2e-4] * 5)]
    ce = {"loss": "cross_entropy", "family": "softmax", "shape": [256, 4096]}
    recs += [_rec("fastloss", [1e-3] * 5, **ce), _rec("torch", [1e-3] * 5, **ce),
             {**ce, "impl": "liger", "dtype": "float32", "device": "cpu", "status": "skipped",
              "reason": "Liger-Kernel needs CUDA"}]
    meta = {"device": {"type": "cpu", "name": "x86_64", "torch": "2.13", "triton": "3.9", "backend": "auto",
                       "threads": 1},
            "copy_gbps": 10.0, "config": {"timer": timing.timer_name(torch.device("cpu")), "repeat": 5,
                                          "round_time_s": 0.05}}
    text = report.format_text(recs, meta)
    assert "on cpu the fastloss column times fastloss's PyTorch path" in text
    assert "> 1 means fastloss is faster" in text and "'?' marks" in text
    assert "5 interleaved rounds" in text and "blocked_autorange" in text
    lines = text.splitlines()
    mse_header = next(line for line in lines if line.strip().startswith("N ") and "vs torch" in line)
    assert "peak MiB" not in mse_header  # no peak memory off CUDA
    mse_row = lines[lines.index(mse_header) + 1]
    assert "1.50x (0.90-2.50) ?" in mse_row  # torch's time swings 0.5x-3x: its ratio means nothing
    assert mse_row.rstrip().endswith("2.00x")  # vs torch.compile: steady, unmarked
    assert "±" in mse_row
    ce_header = next(line for line in lines if "N x V" in line)
    assert "liger" not in ce_header  # empty on this device
    ce_row = lines[lines.index(ce_header) + 1]
    assert "1.00x" in ce_row and not ce_row.rstrip().endswith("?")
    assert "skipped (Liger-Kernel needs CUDA)" in text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_prints_a_few_lines_when_not_a_terminal() -> None:
    pytest.importorskip("tqdm")
    stream = io.StringIO()
    bar = timing.progress(200, stream=stream, lines=5)
    for i in range(200):
        timing.advance(bar, f"item {i}")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 2 <= len(lines) <= 7 and "\r" not in stream.getvalue()
    assert "0/200" in lines[0] and "200/200" in lines[-1] and "item 199" in lines[-1]


def test_progress_redraws_one_line_on_a_terminal() -> None:
    pytest.importorskip("tqdm")
    stream = _Tty()
    bar = timing.progress(200, stream=stream)
    for i in range(200):
        timing.advance(bar, f"item {i}")
    bar.close()
    out = stream.getvalue()
    assert out.count("\n") == 1 and out.count("\r") >= 2 and "200/200" in out


def test_bench_cli_interleaved_json(tmp_path, capsys) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "--losses", "mse", "--sizes", "2**8", "--impls", "fastloss", "torch", "--repeat", "3",
                 "--round-time", "0.002", "--warmup", "1", "--json", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "vs torch" in out and "PyTorch path" in out
    assert len(err.splitlines()) <= 3  # captured stderr is not a terminal: a few lines
    doc = json.loads(path.read_text())
    assert doc["config"]["interleaved"] and doc["config"]["rounds"] == 3
    for rec in doc["results"]:
        assert rec["status"] == "ok" and len(rec["round_medians_s"]) == 3


def test_sweep_cases_compare_like_with_like() -> None:
    # each sweep loss's two sides compute the same loss and gradients (so the ratio is a speed ratio)
    assert sweep.resolve_sweep_loss("focal") == "focal_loss"  # softmax focal in the sweep
    assert sweep.resolve_sweep_loss("CombinedLoss") == "combined"
    for name in sweep.SWEEP_LOSSES:
        case = sweep.sweep_case(name)
        results = []
        for impl in ("fastloss", "torch"):
            ops = case.make_inputs(case.shape(96), torch.float32, torch.device("cpu"), 3)
            wrt = [t for t in ops if t.requires_grad]
            loss = case.impl(impl)(*ops)
            results.append((loss.detach(), torch.autograd.grad(loss, wrt)))
        (a, ga), (b, gb) = results
        assert_close(a, b, torch.float32)
        for x, y in zip(ga, gb):
            assert_close(x, y, torch.float32)
    x, y = torch.randn(40), torch.randn(40)
    assert_close(sweep.sweep_case("combined").torch(x, y), 0.7 * F.mse_loss(x, y) + 0.3 * F.l1_loss(x, y))


def test_sweep_cli_writes_json_and_png(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    js, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    assert main(["bench", "--sweep", "--losses", "mse", "cross_entropy", "combined", "--sizes", "2**5", "2**7",
                 "--repeat", "2", "--round-time", "0.002", "--warmup", "1", "--json", str(js),
                 "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    assert "torch time / fastloss time (> 1: fastloss faster)" in out and "2**7" in out
    assert len(err.splitlines()) <= 7
    doc = json.loads(js.read_text())
    assert doc["schema"] == "fastloss-sweep/2" and doc["config"]["sizes"] == [32, 128]
    assert doc["config"]["shapes"]["cross_entropy"]["128"] == [16, sweep.SWEEP_CLASSES]
    assert len(doc["results"]) == 3 * 2 * 2
    assert {(r["loss"], r["size"], r["impl"]) for r in doc["results"]} == {
        (lo, n, i) for lo in ("mse", "cross_entropy", "combined") for n in (32, 128) for i in ("fastloss", "torch")}
    for rec in doc["results"]:
        assert rec["status"] == "ok" and rec["median_s"] > 0 and len(rec["round_medians_s"]) == 2
    assert len(doc["ratios"]) == 6
    for r in doc["ratios"]:
        assert r["ratio_q1"] <= r["ratio"] <= r["ratio_q3"] and isinstance(r["noisy"], bool)
    by = {(rec["loss"], rec["size"], rec["impl"]): rec["round_medians_s"] for rec in doc["results"]}
    for r in doc["ratios"]:  # the median of the per-round ratios (a busy spell falls on both sides)
        fl, tn = by[(r["loss"], r["size"], "fastloss")], by[(r["loss"], r["size"], "torch")]
        assert r["ratio"] == pytest.approx(statistics.median(t / f for f, t in zip(fl, tn)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_rejects_what_it_cannot_do() -> None:
    with pytest.raises(SystemExit, match="one dtype"):
        main(["bench", "--sweep", "--dtypes", "float32", "bfloat16"])
    with pytest.raises(SystemExit, match="unknown sweep loss"):
        main(["bench", "--sweep", "--losses", "triplet"])


def _point(loss, size, impl, device_s, host_s, ops="pointwise"):
    return {"loss": loss, "ops": ops, "family": ops, "impl": impl, "size": size, "dtype": "float32",
            "status": "ok", "median_s": device_s, "q1_s": device_s, "q3_s": device_s, "host_s": host_s}


def test_crossover_is_end_to_end_and_holds_at_every_larger_size() -> None:
    # fastloss: 100 us of host work, device time growing with size; torch: 20 us host, slower device
    recs = []
    for size, fl_dev, tn_dev in [(2**8, 10e-6, 8e-6), (2**11, 20e-6, 15e-6), (2**14, 60e-6, 80e-6),
                                 (2**17, 300e-6, 500e-6), (2**20, 2e-3, 4e-3)]:
        recs += [_point("mse", size, "fastloss", fl_dev, 100e-6), _point("mse", size, "torch", tn_dev, 20e-6)]
    # device time alone would say 2**14; end to end (max with the 100 us host time) fastloss loses there
    assert sweep.crossover(recs)["mse"]["size"] == 2**17
    # a loss that wins at a small size, loses in the middle and wins above: the crossover is above
    recs += [_point("contrastive", 2**8, "fastloss", 1e-6, 1e-6, "embedding"),
             _point("contrastive", 2**8, "torch", 5e-6, 5e-6, "embedding"),
             _point("contrastive", 2**11, "fastloss", 9e-6, 9e-6, "embedding"),
             _point("contrastive", 2**11, "torch", 5e-6, 5e-6, "embedding"),
             _point("contrastive", 2**14, "fastloss", 9e-6, 9e-6, "embedding"),
             _point("contrastive", 2**14, "torch", 20e-6, 5e-6, "embedding"),
             _point("cross_entropy", 2**8, "fastloss", 9e-6, 9e-6, "softmax"),
             _point("cross_entropy", 2**8, "torch", 5e-6, 5e-6, "softmax")]
    assert sweep.crossover(recs)["contrastive"]["size"] == 2**14
    assert sweep.suggested_thresholds(recs) == {"pointwise": 2**17, "softmax": None, "embedding": 2**14}
    text = "\n".join(sweep.format_thresholds(recs))
    assert 'SMALL_PROBLEM_NUMEL = {"pointwise": 131072, "softmax": None, "embedding": 16384}' in text


def test_sweep_with_the_kernels_forced_records_host_time_and_the_crossover(tmp_path, capsys) -> None:
    # the CUDA crossover's code path on CPU: backend triton runs the kernels in Triton's interpreter
    from fastloss.ops import _utils

    js = tmp_path / "sweep.json"
    before = sum(_utils.launch_counts.values())
    assert main(["bench", "--sweep", "--backend", "triton", "--losses", "mse", "cross_entropy", "contrastive",
                 "info_nce", "--sizes", "2**7", "--repeat", "1", "--round-time", "0.001", "--warmup", "0",
                 "--quiet", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert sum(_utils.launch_counts.values()) > before  # the kernels ran on the fastloss side
    assert "host us, fastloss / torch" in out and "suggested fastloss._backend.SMALL_PROBLEM_NUMEL = {" in out
    doc = json.loads(js.read_text())
    assert doc["config"]["backend"] == "triton"
    for rec in doc["results"]:
        assert rec["status"] == "ok" and rec["host_s"] > 0 and rec["size"] == 128
        assert rec["family"] in ("pointwise", "softmax", "embedding")
    assert set(doc["small_problem_numel"]) == {"pointwise", "softmax", "embedding", "info_nce"}
    assert {c["ops"] for c in doc["crossover"].values()} == {"pointwise", "softmax", "embedding", "info_nce"}


def test_bench_records_name_families_in_one_word(tmp_path) -> None:
    path = tmp_path / "bench.json"
    assert main(["bench", "--losses", "cross_entropy", "kl_div", "--sizes", "2**6", "--shapes", "8x5",
                 "--impls", "fastloss", "torch", "--repeat", "1", "--round-time", "0.001", "--warmup", "0",
                 "--quiet", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert {(r["loss"], r["family"]) for r in doc["results"]} == {("cross_entropy", "softmax"),
                                                                  ("kl_div", "pointwise")}
    assert all(r["status"] == "ok" and r["shape"] for r in doc["results"])
