"""LossMonitor: record a loss curve without host syncs inside the step, and watch it.

    monitor = fastloss.LossMonitor(patience=3, log_dir="runs/exp1")
    for epoch in range(epochs):
        for x, y in loader:
            loss = criterion(model(x), y)
            loss.backward(); opt.step(); opt.zero_grad()
            monitor.step(loss)                 # keeps a detached device scalar: no .item()
        report = monitor.end_epoch(val_loss=evaluate(model))   # one device->host copy here
        if report.diverging or report.overfitting:
            ...
    monitor.plot("curves.png"); monitor.to_csv("curves.csv")

Values are read from the device only in ``end_epoch`` / ``flush`` (the point the user chooses),
in one copy for all the steps since the last read.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import os
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Literal

import torch

__all__ = ["EpochReport", "LossMonitor", "LossMonitorWarning", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A recorded loss was NaN or infinite (``LossMonitor(on_nonfinite="raise")``).

    Attributes:
        steps: the indices of the non-finite steps just read.
        report: when raised by ``end_epoch``, the EpochReport of the epoch it closed (the epoch is
            recorded before the error is raised); None when raised by ``flush`` mid-epoch (the steps
            are kept and reported by the next ``end_epoch``).
    """

    def __init__(self, message: str, steps: list[int] | None = None, report: EpochReport | None = None) -> None:
        super().__init__(message)
        self.steps = list(steps or [])
        self.report = report


class LossMonitorWarning(UserWarning):
    """Category of every warning LossMonitor emits."""


@dataclasses.dataclass
class EpochReport:
    """What ``LossMonitor.end_epoch`` found at the end of one epoch."""

    epoch: int
    train_loss: float
    val_loss: float | None
    nonfinite_steps: list[int]
    diverging: bool      # the training loss has risen for ``patience`` epochs in a row
    overfitting: bool    # the validation loss rose while the training loss fell, ``patience`` epochs in a row

    @property
    def problems(self) -> list[str]:
        """Names of the detections that fired: "nonfinite", "diverging", "overfitting"."""
        found = []
        if self.nonfinite_steps:
            found.append("nonfinite")
        if self.diverging:
            found.append("diverging")
        if self.overfitting:
            found.append("overfitting")
        return found


class LossMonitor:
    """Records losses per step and per epoch, detects trouble, and logs to TensorBoard.

    Args:
        patience: how many consecutive epochs of rising training loss ("diverging"), or of rising
            validation loss while the training loss falls ("overfitting"), before it is reported.
        on_nonfinite: "warn" (default) or "raise" (NonFiniteLossError) when a NaN/inf loss is read.
        log_dir: directory for TensorBoard event files (scalars ``loss/step``, ``loss/train``,
            ``loss/val``); needs the tensorboard package (``pip install fastloss[tensorboard]``).
            None (default) writes none.
        warn: emit a LossMonitorWarning when "diverging" or "overfitting" fires.
        tags: TensorBoard tag names, a mapping with any of the keys "step", "train", "val" (the
            others keep their defaults ``loss/step``, ``loss/train``, ``loss/val``). The guide's
            ``TrainerWithTensorBoard`` names: ``tags={"step": "Loss/Train", "train": "Loss/Epoch"}``.

    With ``on_nonfinite="raise"``, the error raised in ``end_epoch`` comes after the epoch is
    closed and recorded (``error.report``); one raised by ``flush`` mid-epoch keeps the non-finite
    steps for the next ``end_epoch`` to report. Nothing is lost either way.
    """

    #: Default TensorBoard tag of each scalar.
    DEFAULT_TAGS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"step": "loss/step", "train": "loss/train", "val": "loss/val"})

    def __init__(
        self,
        patience: int = 3,
        on_nonfinite: Literal["warn", "raise"] = "warn",
        log_dir: str | os.PathLike | None = None,
        warn: bool = True,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        unknown = sorted(set(tags or {}) - set(self.DEFAULT_TAGS))
        if unknown:
            raise ValueError(f"tags: unknown key(s) {unknown}; expected among {sorted(self.DEFAULT_TAGS)}")
        self.tags = {**self.DEFAULT_TAGS, **(tags or {})}
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if on_nonfinite not in ("warn", "raise"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'raise', got {on_nonfinite!r}")
        self.patience = patience
        self.on_nonfinite = on_nonfinite
        self.warn = warn
        self.step_losses: list[float] = []
        self.train_losses: list[float] = []
        self.val_losses: list[float | None] = []
        self.reports: list[EpochReport] = []
        self._pending: list[torch.Tensor | float] = []
        self._epoch_start = 0
        self._nonfinite: list[int] = []  # non-finite steps of the current epoch
        self._writer = None
        if log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    "LossMonitor(log_dir=...) writes TensorBoard files and needs the tensorboard "
                    "package: pip install tensorboard (or fastloss[tensorboard])"
                ) from e
            self._writer = SummaryWriter(log_dir=os.fspath(log_dir))

    # recording -------------------------------------------------------------------------------
    def step(self, loss: torch.Tensor | float) -> None:
        """Record one step's loss. A tensor is kept (detached) on its device; nothing is read yet."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"step() expects a scalar loss, got a tensor of shape {tuple(loss.shape)}")
            loss = loss.detach().reshape(())
        self._pending.append(loss)

    def flush(self) -> list[float]:
        """Read the pending step losses from the device (one copy per device) and return them as
        floats."""
        if not self._pending:
            return []
        by_device: dict[torch.device, list[int]] = {}
        for i, v in enumerate(self._pending):
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(i)
        values = [v if isinstance(v, torch.Tensor) else float(v) for v in self._pending]
        for indices in by_device.values():
            # stacked on the device, then one device->host copy for all of them
            read = torch.stack([self._pending[i].float() for i in indices]).tolist()
            for i, v in zip(indices, read):
                values[i] = v
        self._pending.clear()
        first = len(self.step_losses)
        self.step_losses.extend(values)
        bad = [first + i for i, v in enumerate(values) if not math.isfinite(v)]
        if self._writer is not None:
            for i, v in enumerate(values):
                self._writer.add_scalar(self.tags["step"], v, first + i)
        # kept before raising: the epoch's report names them whether or not this read raised
        self._nonfinite.extend(bad)
        if bad:
            msg = f"non-finite loss at step(s) {bad[:10]}{' ...' if len(bad) > 10 else ''}"
            if self.on_nonfinite == "raise":
                raise NonFiniteLossError(msg, steps=bad)
            warnings.warn(msg, LossMonitorWarning, stacklevel=2)
        return values

    def end_epoch(self, val_loss: torch.Tensor | float | None = None, train_loss: float | None = None) -> EpochReport:
        """Close an epoch: read pending steps, record the epoch means, run the detections.

        Args:
            val_loss: the epoch's validation loss, if any.
            train_loss: the epoch's training loss; default: the mean of the finite step losses of
                this epoch (NaN when there are none).

        With ``on_nonfinite="raise"``, a non-finite step of this epoch raises NonFiniteLossError
        after the epoch is recorded; its ``report`` attribute is this epoch's EpochReport.
        """
        error = None
        try:
            self.flush()
        except NonFiniteLossError as exc:  # close the epoch first, then raise
            error = exc
        steps = self.step_losses[self._epoch_start:]
        self._epoch_start = len(self.step_losses)
        if train_loss is None:
            finite = [v for v in steps if math.isfinite(v)]
            train_loss = sum(finite) / len(finite) if finite else math.nan
        train_loss = float(train_loss)
        val = None if val_loss is None else float(val_loss)
        self.train_losses.append(train_loss)
        self.val_losses.append(val)
        epoch = len(self.train_losses) - 1
        report = EpochReport(
            epoch=epoch,
            train_loss=train_loss,
            val_loss=val,
            nonfinite_steps=self._nonfinite,
            diverging=self._diverging(),
            overfitting=self._overfitting(),
        )
        self._nonfinite = []
        self.reports.append(report)
        if self._writer is not None:
            self._writer.add_scalar(self.tags["train"], train_loss, epoch)
            if val is not None:
                self._writer.add_scalar(self.tags["val"], val, epoch)
            self._writer.flush()
        if self.warn and report.diverging:
            warnings.warn(f"epoch {epoch}: training loss has risen for {self.patience} epochs in a row "
                          "(diverging: lower the learning rate?)", LossMonitorWarning, stacklevel=2)
        if self.warn and report.overfitting:
            warnings.warn(f"epoch {epoch}: validation loss rose while training loss fell for "
                          f"{self.patience} epochs in a row (overfitting)", LossMonitorWarning, stacklevel=2)
        if error is not None:
            error.report = report
            raise error
        return report

    # detections -------------------------------------------------------------------------------
    def _diverging(self) -> bool:
        t = self.train_losses
        if len(t) <= self.patience:
            return False
        recent = t[-self.patience - 1:]
        return all(b > a for a, b in itertools.pairwise(recent))

    def _overfitting(self) -> bool:
        t, v = self.train_losses, self.val_losses
        if len(t) <= self.patience or any(x is None for x in v[-self.patience - 1:]):
            return False
        tr, va = t[-self.patience - 1:], v[-self.patience - 1:]
        return all(b < a for a, b in itertools.pairwise(tr)) and all(b > a for a, b in itertools.pairwise(va))

    # output -----------------------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike) -> None:
        """Write one row per epoch: epoch, train_loss, val_loss, problems."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "train_loss", "val_loss", "problems"])
            for r in self.reports:
                w.writerow([r.epoch, r.train_loss, "" if r.val_loss is None else r.val_loss,
                            ";".join(r.problems)])

    def plot(self, path: str | os.PathLike, title: str = "loss") -> None:
        """Write a PNG of the step, training and validation curves (needs matplotlib)."""
        self.flush()
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("LossMonitor.plot needs matplotlib: pip install fastloss[plot]") from e
        fig, (ax_step, ax_epoch) = plt.subplots(1, 2, figsize=(10, 4))
        ax_step.plot(self.step_losses, lw=0.8)
        ax_step.set(xlabel="step", ylabel="loss", title=f"{title}: steps")
        epochs = range(len(self.train_losses))
        ax_epoch.plot(epochs, self.train_losses, marker="o", label="train")
        if any(v is not None for v in self.val_losses):
            ax_epoch.plot(epochs, [math.nan if v is None else v for v in self.val_losses], marker="o",
                          label="val")
        ax_epoch.set(xlabel="epoch", ylabel="loss", title=f"{title}: epochs")
        ax_epoch.legend()
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
