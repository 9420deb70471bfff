"""LossMonitor: recording without syncs in the step, detections, TensorBoard, PNG and CSV output."""

from __future__ import annotations

import csv
import math
import warnings

import pytest
import torch

from fastloss.monitor import EpochReport, LossMonitor, LossMonitorWarning, NonFiniteLossError


def run_curve(monitor: LossMonitor, train: list[float], val: list[float] | None = None,
              steps_per_epoch: int = 3) -> list[EpochReport]:
    reports = []
    for epoch, t in enumerate(train):
        for _ in range(steps_per_epoch):
            monitor.step(torch.tensor(t))
        reports.append(monitor.end_epoch(val_loss=None if val is None else val[epoch]))
    return reports


def test_step_keeps_device_tensor_until_read() -> None:
    m = LossMonitor()
    loss = torch.tensor(2.5, requires_grad=True) * 1.0
    m.step(loss)
    assert m.step_losses == []  # nothing read yet
    assert m._pending[0].requires_grad is False
    assert m.flush() == [2.5]
    m.step(1.5)
    report = m.end_epoch()
    assert m.step_losses == [2.5, 1.5]
    assert report.train_loss == pytest.approx(2.0)
    assert report.problems == []


def test_step_rejects_non_scalar() -> None:
    with pytest.raises(ValueError, match="scalar"):
        LossMonitor().step(torch.ones(3))


def test_healthy_curve_is_quiet() -> None:
    m = LossMonitor(patience=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reports = run_curve(m, [2.0, 1.5, 1.2, 1.0, 0.9, 0.85], [2.1, 1.7, 1.4, 1.3, 1.25, 1.2])
    assert all(r.problems == [] for r in reports)
    assert m.train_losses == pytest.approx([2.0, 1.5, 1.2, 1.0, 0.9, 0.85])


def test_diverging_fires_after_patience_epochs() -> None:
    m = LossMonitor(patience=3)
    with pytest.warns(LossMonitorWarning, match="risen for 3 epochs"):
        reports = run_curve(m, [1.0, 0.9, 1.0, 1.1, 1.3])
    assert [r.diverging for r in reports] == [False, False, False, False, True]
    assert reports[-1].problems == ["diverging"]


def test_overfitting_fires_when_val_rises_and_train_falls() -> None:
    m = LossMonitor(patience=2)
    with pytest.warns(LossMonitorWarning, match="overfitting"):
        reports = run_curve(m, [1.0, 0.8, 0.6, 0.5], [1.0, 0.9, 1.0, 1.1])
    assert [r.overfitting for r in reports] == [False, False, False, True]
    assert reports[-1].problems == ["overfitting"]
    assert not any(r.diverging for r in reports)


def test_nonfinite_warns_and_reports_the_step() -> None:
    m = LossMonitor()
    m.step(torch.tensor(1.0))
    m.step(torch.tensor(float("nan")))
    m.step(torch.tensor(float("inf")))
    with pytest.warns(LossMonitorWarning, match=r"non-finite loss at step\(s\) \[1, 2\]"):
        report = m.end_epoch()
    assert report.nonfinite_steps == [1, 2]
    assert report.problems == ["nonfinite"]
    assert report.train_loss == 1.0  # the finite steps' mean


def test_nonfinite_raises_when_asked() -> None:
    m = LossMonitor(on_nonfinite="raise")
    m.step(torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError):
        m.flush()


def test_nonfinite_raise_in_end_epoch_closes_the_epoch() -> None:
    """After end_epoch raises, the epoch is recorded with its non-finite step; the next epoch is
    its own (nothing merged, nothing lost)."""
    m = LossMonitor(on_nonfinite="raise", warn=False)
    m.step(torch.tensor(1.0))
    m.step(torch.tensor(float("nan")))
    m.step(torch.tensor(3.0))
    with pytest.raises(NonFiniteLossError) as info:
        m.end_epoch(val_loss=0.5)
    assert info.value.steps == [1]
    assert info.value.report.epoch == 0
    assert info.value.report.nonfinite_steps == [1]
    assert info.value.report.problems == ["nonfinite"]
    assert m.train_losses == [2.0] and m.val_losses == [0.5]
    m.step(torch.tensor(5.0))
    report = m.end_epoch()
    assert report.epoch == 1 and report.train_loss == 5.0 and report.nonfinite_steps == []
    assert [r.nonfinite_steps for r in m.reports] == [[1], []]


def test_nonfinite_raise_in_flush_keeps_the_steps_for_end_epoch() -> None:
    m = LossMonitor(on_nonfinite="raise", warn=False)
    m.step(torch.tensor(1.0))
    m.step(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError) as info:
        m.flush()
    assert info.value.steps == [1] and info.value.report is None
    m.step(torch.tensor(2.0))
    report = m.end_epoch()  # the steps read before the error belong to this epoch
    assert report.nonfinite_steps == [1]
    assert report.train_loss == 1.5
    assert m.step_losses[0] == 1.0 and math.isinf(m.step_losses[1]) and m.step_losses[2] == 2.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        LossMonitor(patience=0)
    with pytest.raises(ValueError):
        LossMonitor(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="unknown key"):
        LossMonitor(tags={"epoch": "Loss/Epoch"})


def test_csv_and_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    m = LossMonitor(patience=2, warn=False)
    run_curve(m, [1.0, 0.8, 0.6, 0.5], [1.0, 0.9, 1.0, 1.1])
    m.to_csv(tmp_path / "curve.csv")
    with open(tmp_path / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train_loss"]) for r in rows] == pytest.approx([1.0, 0.8, 0.6, 0.5])
    assert [float(r["val_loss"]) for r in rows] == pytest.approx([1.0, 0.9, 1.0, 1.1])
    assert rows[-1]["problems"] == "overfitting"
    m.plot(tmp_path / "curve.png")
    from matplotlib import image

    data = (tmp_path / "curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(tmp_path / "curve.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0  # not a blank canvas


def test_tensorboard_events_read_back(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = LossMonitor(log_dir=tmp_path, warn=False)
    run_curve(m, [1.0, 0.5], [1.2, 0.7], steps_per_epoch=2)
    m.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/step", "loss/train", "loss/val"} <= tags
    assert [e.value for e in acc.Scalars("loss/step")] == pytest.approx([1.0, 1.0, 0.5, 0.5])
    assert [e.step for e in acc.Scalars("loss/step")] == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx([1.0, 0.5])
    assert [e.value for e in acc.Scalars("loss/val")] == pytest.approx([1.2, 0.7])
    assert not math.isnan(acc.Scalars("loss/train")[0].wall_time)


def test_tensorboard_tags_are_chosen_by_the_user(tmp_path) -> None:
    """The guide's TrainerWithTensorBoard tags: Loss/Train per step, Loss/Epoch per epoch."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = LossMonitor(log_dir=tmp_path, warn=False, tags={"step": "Loss/Train", "train": "Loss/Epoch"})
    run_curve(m, [1.0, 0.5], [1.2, 0.7], steps_per_epoch=2)
    m.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"Loss/Train", "Loss/Epoch", "loss/val"}
    assert [e.value for e in acc.Scalars("Loss/Train")] == pytest.approx([1.0, 1.0, 0.5, 0.5])
    assert [e.step for e in acc.Scalars("Loss/Train")] == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("Loss/Epoch")] == pytest.approx([1.0, 0.5])


def test_flush_reads_all_pending_steps_in_one_copy(monkeypatch) -> None:
    """The step losses recorded since the last read come to the host in one copy, not one each."""
    m = LossMonitor()
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        m.step(torch.tensor(v) * 1.0)
    m.step(6.0)  # a plain float needs no read
    reads = []
    for name in ("cpu", "tolist", "item", "__float__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    assert m.flush() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert len(reads) == 1, reads
