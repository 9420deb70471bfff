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
