"""``python -m fastloss check``: every loss against torch.nn or its naive formula, the implementation
that ran named on each line, and a non-zero exit status on a mismatch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastloss import __main__ as cli
from fastloss import functional as FL

#: What each line must name: every loss of the library, cross-entropy with its options.
EXPECTED = [
    "mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss", "cross_entropy ", "cross_entropy(weight, ignore_index)",
    "cross_entropy(label_smoothing=0.1)", "cross_entropy(probability targets)",
    "cross_entropy((N, C, d) input)", "cross_entropy(reduction='none')", "cross_entropy(z_loss=1e-3)",
    "cross_entropy(softcap=30)", "focal_loss(alpha=0.25, gamma=2)", "contrastive_loss(margin=2)",
    "triplet_margin_loss", "info_nce(temperature=0.07)", "info_nce(symmetric=True)",
    "linear_cross_entropy", "kl_div(reduction='batchmean')", "CombinedLoss(",
    "RegularizedLoss(MSE", "RegularizedLoss.from_guide(",
]


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(("  OK", "  FAIL"))]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_check_runs_every_loss_and_names_the_implementation(backend, capsys) -> None:
    assert cli.main(["check", "--backend", backend]) == 0
    lines = _lines(capsys.readouterr().out)
    assert len(lines) == len(EXPECTED)
    for name, line in zip(EXPECTED, lines):
        assert line.startswith("  OK") and name in line, (name, line)
        if backend == "torch":
            assert "[PyTorch path]" in line, line
        else:
            assert "[kernels: " in line, line  # a kernel was launched for every loss
    triton_lines = {line.split("[")[0].split()[-1]: line for line in lines}
    if backend == "triton":
        assert "cross_entropy_fwd_kernel" in triton_lines["cross_entropy"]
        assert "info_nce_chunk_kernel" in next(v for k, v in triton_lines.items() if k.startswith("info_nce"))


def test_check_fails_with_exit_status_1_on_a_mismatch(monkeypatch, capsys) -> None:
    real = FL.focal_loss
    monkeypatch.setattr(FL, "focal_loss", lambda *a, **k: real(*a, **k) * 1.01)
    assert cli.main(["check", "--backend", "torch"]) == 1
    out = capsys.readouterr().out
    (fail,) = [line for line in _lines(out) if line.startswith("  FAIL")]
    assert "focal_loss" in fail and "mismatch" in fail and "formula" in fail
    assert out.rstrip().endswith("1 FAILED")


def test_check_fails_when_a_loss_raises(monkeypatch, capsys) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(FL, "triplet_margin_loss", broken)
    assert cli.main(["check", "--backend", "torch"]) == 1
    (fail,) = [line for line in _lines(capsys.readouterr().out) if line.startswith("  FAIL")]
    assert "triplet_margin_loss" in fail and "RuntimeError: kernel exploded" in fail


def test_check_command_line_exit_status() -> None:
    result = subprocess.run([sys.executable, "-m", "fastloss", "check", "--backend", "torch"],
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("all OK")


def test_check_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    cli.main(["check", "--backend", "torch"])
    assert torch.equal(torch.rand(3), want)
