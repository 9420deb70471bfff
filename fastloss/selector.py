"""select_loss: the practitioner's rule of thumb for a first loss, as a fastloss module."""

from __future__ import annotations

from torch import nn

__all__ = ["TASKS", "select_loss"]

TASKS = ("regression", "classification")


def select_loss(task: str, *, has_outliers: bool = False, binary: bool = False, imbalanced: bool = False) -> nn.Module:
    """Return a fresh fastloss loss module suited to the task.

    - ``"regression"``: HuberLoss when the targets have outliers (quadratic near 0, linear in the
      tails, so outliers do not dominate the gradient), else MSELoss.
    - ``"classification"``: BCEWithLogitsLoss when ``binary`` (one logit per sample or per label),
      else FocalLoss when ``imbalanced`` (down-weights easy, frequent classes), else CrossEntropyLoss.

    Raises ValueError for an unknown task.
    """
    import fastloss

    if task == "regression":
        return fastloss.HuberLoss() if has_outliers else fastloss.MSELoss()
    if task == "classification":
        if binary:
            return fastloss.BCEWithLogitsLoss()
        if imbalanced:
            return fastloss.FocalLoss()
        return fastloss.CrossEntropyLoss()
    raise ValueError(f"select_loss: unknown task {task!r}; expected one of {TASKS}")
