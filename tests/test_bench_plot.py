"""The bench PNG: readable bars (log scale where the range demands it, a value on each bar, no
legend entry without a bar), time on CPU and bandwidth against the copy line on CUDA."""

from __future__ import annotations

import pytest

from fastloss.cli import report

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _rec(loss, impl, median_s, device="cpu", family="pointwise", shape=(2**18,), status="ok", **extra):
    rec = {"loss": loss, "impl": impl, "dtype": "float32", "device": device, "shape": list(shape),
           "status": status, "reason": None if status == "ok" else "Liger-Kernel needs CUDA",
           "bytes_moved": 3 * 4 * shape[0], **extra}
    if family:
        rec["family"] = family
    if status == "ok":
        rec.update(median_s=median_s, gbps=rec["bytes_moved"] / median_s / 1e9, copy_gbps=5.0)
    return rec


def _records(device="cpu"):
    # a 1000x range of times in one panel, and more than the copy bandwidth for torch (cache-resident)
    recs = [_rec("mse", "fastloss", 2e-4, device), _rec("mse", "torch", 2e-5, device),
            _rec("mse", "torch.compile", 2e-2, device), _rec("l1", "fastloss", 3e-4, device),
            _rec("l1", "torch", 4e-5, device), _rec("l1", "torch.compile", 1e-3, device)]
    ce = (256, 4096)
    recs += [_rec("cross_entropy", impl, t, device, "softmax", ce) for impl, t in
             [("fastloss", 1e-3), ("torch", 2e-3), ("torch.compile", 1.5e-3)]]
    recs.append(_rec("cross_entropy", "liger", None, device, "softmax", ce, status="skipped"))
    return recs


def test_cpu_plot_shows_times_with_labels_and_log_scale(tmp_path) -> None:
    meta = {"device": {"name": "x86_64", "torch": "2.13", "triton": "3.9"}}
    fig = report.make_bench_figure(_records(), meta, plt)
    pointwise, row = fig.axes[0], fig.axes[1]
    assert "ms" in pointwise.get_ylabel() and "lower is better" in pointwise.get_ylabel()
    assert pointwise.get_yscale() == "log"  # 2e-5 .. 2e-2 s: linear bars would be invisible
    assert row.get_yscale() == "linear"  # 1 .. 2 ms
    assert not [line for line in pointwise.get_lines() if line.get_linestyle() == "--"]  # no copy line on CPU
    for ax, n_bars in ((pointwise, 6), (row, 3)):
        bars = [b for c in ax.containers for b in c]
        assert len(bars) == n_bars
        labels = [t.get_text() for t in ax.texts if not t.get_text().startswith(("skipped", "not measured"))]
        assert len(labels) == n_bars  # every bar labelled with its value
        low, high = ax.get_ylim()
        assert all(low < b.get_height() < high for b in bars)
    assert {t.get_text() for t in pointwise.texts} >= {"0.2", "0.02", "20"}  # ms values
    # liger was only skipped: no legend entry without a bar, a note in its panel instead
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["fastloss", "torch", "torch.compile"]
    assert "not measured: liger (Liger-Kernel needs CUDA)" in [t.get_text() for t in row.texts]
    path = tmp_path / "bench.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    from matplotlib import image

    pixels = image.imread(path)
    assert pixels.shape[0] >= 250 and pixels.shape[1] >= 700
    ink = float((pixels[..., :3] < 0.95).any(axis=-1).mean())
    assert 0.02 < ink < 0.6, ink


def test_cuda_plot_shows_bandwidth_against_the_copy_line() -> None:
    recs = [_rec("mse", impl, t, "cuda") for impl, t in [("fastloss", 1e-4), ("torch", 3e-4)]]
    recs += [_rec("l1", "fastloss", 1.2e-4, "cuda"), _rec("l1", "torch", None, "cuda", status="skipped")]
    fig = report.make_bench_figure(recs, None, plt)
    (ax,) = [a for a in fig.axes if a.get_visible() and a.axison]
    assert "GB/s" in ax.get_ylabel()
    (copy,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert copy.get_ydata()[0] == 5.0
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["fastloss", "torch", "device-to-device copy (5 GB/s)"]
    assert len([t for t in ax.texts if t.get_text() and t.get_text() != "skipped"]) == 3  # one per bar
    assert [t.get_text() for t in ax.texts].count("skipped") == 1  # where l1's torch bar would be
    plt.close(fig)


def test_plot_writes_png(tmp_path) -> None:
    path = tmp_path / "b.png"
    report.plot(_records(), str(path), None)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
