"""`python -m fastloss demo` end to end at a tiny size."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

import fastloss
from fastloss import _demo


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_demo_runs_and_matches_torch_at_step_0(backend, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    with fastloss.use_backend(backend):
        runs = _demo.run_demo(epochs=2, samples=256, batch=128, out=str(tmp_path), quiet=True)
    assert [r.section for r in runs].count("regression") == 4
    assert {r.section for r in runs} == {"regression", "imbalanced", "binary", "siamese"}
    for section in {r.section for r in runs}:
        group = [r for r in runs if r.section == section]
        for fl, ref in zip(group[::2], group[1::2]):
            assert fl.name.startswith("fastloss")
            assert fl.step0 == pytest.approx(ref.step0, rel=1e-5, abs=1e-6), (fl.name, ref.name)
            assert len(fl.monitor.train_losses) == 2
    png = tmp_path / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_demo_command_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastloss", "demo", "--epochs", "1", "--samples", "256", "--quiet",
         "--out", str(tmp_path / "out")],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for section in ("regression", "imbalanced", "binary", "siamese"):
        assert f"== {section} ==" in result.stdout
    assert "DIFFERENT" not in result.stdout
    assert "recall c4" in result.stdout and "test MAE" in result.stdout


def _png_stats(path) -> tuple[int, int, float]:
    """(width, height, share of pixels that are not white) of a PNG."""
    from matplotlib import image

    pixels = image.imread(path)
    ink = (pixels[..., :3] < 0.95).any(axis=-1)
    return pixels.shape[1], pixels.shape[0], float(ink.mean())


def test_demo_figure_is_readable(tmp_path) -> None:
    """Top row: one panel per loss, fastloss a line and its torch.nn counterpart open markers on it
    (neither hides the other); bottom row: one panel per problem with its test metric per epoch (MSE
    and Huber compared by test MAE, not by their incomparable training losses)."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _demo.run_demo(epochs=3, samples=256, batch=128, out=str(tmp_path), quiet=True)
    fig = _demo.make_figure(runs, plt)
    axes = fig.axes
    assert len(axes) == 6 + 4
    for ax in axes[:6]:
        fl, ref = ax.get_lines()
        assert fl.get_linestyle() == "-" and fl.get_marker() in ("None", None, "")
        assert ref.get_linestyle() == "None" and ref.get_marker() == "o" and ref.get_markerfacecolor() == "none"
        assert fl.get_color() != ref.get_markeredgecolor()
        assert "max rel. diff" in ax.get_legend().get_title().get_text()
        assert ax.get_ylabel() == "training loss"
    titles = [ax.get_title() for ax in axes[:6]]
    assert sum("(regression)" in t for t in titles) == 2  # MSE and Huber: separate panels
    regression = axes[6]
    assert regression.get_ylabel() == "test MAE"
    assert {line.get_label() for line in regression.get_lines()} >= {"fastloss MSELoss", "fastloss HuberLoss"}
    assert [len(line.get_xdata()) for line in regression.get_lines()] == [3] * 4
    plt.close(fig)
    width, height, ink = _png_stats(tmp_path / "loss_curves.png")
    assert width >= 1200 and height >= 500
    assert 0.03 < ink < 0.6, ink  # drawn on, not blank, not a solid block
