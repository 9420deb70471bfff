"""select_loss and evaluate_losses: the loss-function guide's ``LossSelector``, as functions that
return fastloss modules.

    criterion = fastloss.select_loss("regression", {"has_outliers": True})   # the guide's call
    criterion = fastloss.select_loss("classification", imbalanced=True)      # or keywords
    values = fastloss.evaluate_losses(predictions, targets, "regression")    # {"mse": ..., ...}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

__all__ = ["CHARACTERISTICS", "TASKS", "evaluate_losses", "select_loss"]

TASKS = ("regression", "classification")
#: The data characteristics select_loss reads (the guide's keys).
CHARACTERISTICS = ("has_outliers", "binary", "imbalanced")


def _task(name: str, caller: str) -> str:
    """The task name, case and surrounding spaces ignored; ValueError for an unknown one."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in TASKS:
        raise ValueError(f"{caller}: unknown task {name!r}; expected one of {TASKS} (case ignored)")
    return key


def select_loss(task: str, characteristics: Mapping[str, object] | None = None, *, has_outliers: bool = False,
                binary: bool = False, imbalanced: bool = False) -> nn.Module:
    """Return a fresh fastloss loss module suited to the task (the guide's rule of thumb).

    - ``"regression"``: HuberLoss when the targets have outliers (quadratic near 0, linear in the
      tails, so outliers do not dominate the gradient), else MSELoss.
    - ``"classification"``: BCEWithLogitsLoss when ``binary`` (one logit per sample or per label),
      else FocalLoss when ``imbalanced`` (down-weights easy, frequent classes), else CrossEntropyLoss.

    Args:
        task: "regression" or "classification", in any case.
        characteristics: the guide's dict of data characteristics, e.g. ``{"has_outliers": True}``;
            keys among ``has_outliers``, ``binary``, ``imbalanced`` (read for truth, as the guide's
            ``.get(key, False)``). Any other key raises ValueError (a misspelt key would otherwise be
            ignored without a word).
        has_outliers, binary, imbalanced: the same characteristics as keywords. A characteristic
            holds when the mapping or the keyword says so.

    Raises ValueError for an unknown task or characteristic (the guide returns None for an unknown
    task).
    """
    import fastloss

    task = _task(task, "select_loss")
    flags = {"has_outliers": has_outliers, "binary": binary, "imbalanced": imbalanced}
    if characteristics is not None:
        if not isinstance(characteristics, Mapping):
            raise TypeError(f"select_loss: characteristics must be a mapping such as {{'has_outliers': True}}, "
                            f"got {type(characteristics).__name__}")
        unknown = [k for k in characteristics if k not in CHARACTERISTICS]
        if unknown:
            raise ValueError(f"select_loss: unknown data characteristic(s) {unknown}; expected keys among "
                             f"{CHARACTERISTICS}")
        for key, value in characteristics.items():
            flags[key] = flags[key] or bool(value)
    if task == "regression":
        return fastloss.HuberLoss() if flags["has_outliers"] else fastloss.MSELoss()
    if flags["binary"]:
        return fastloss.BCEWithLogitsLoss()
    if flags["imbalanced"]:
        return fastloss.FocalLoss()
    return fastloss.CrossEntropyLoss()


def _candidates(task: str) -> dict[str, nn.Module]:
    """The guide's ``LossSelector.loss_functions[task]`` as fastloss modules, in the guide's order."""
    import fastloss

    if task == "regression":
        return {"mse": fastloss.MSELoss(), "mae": fastloss.L1Loss(), "huber": fastloss.HuberLoss(delta=1.0)}
    return {"ce": fastloss.CrossEntropyLoss(), "bce": fastloss.BCEWithLogitsLoss(),
            "focal": fastloss.FocalLoss(alpha=1.0, gamma=2.0)}


#: What a candidate raises when it does not apply to the predictions and targets it is given
#: (wrong shapes, class indices where probabilities are expected, ...).
_DOES_NOT_APPLY = (ValueError, RuntimeError, TypeError, IndexError, NotImplementedError)


def evaluate_losses(predictions: Tensor, targets: Tensor, task: str) -> dict[str, float | None]:
    """The value of every candidate loss of the task on ``(predictions, targets)``, as the guide's
    ``LossSelector.evaluate_losses``: a dict of Python floats.

    - ``"regression"``: ``{"mse", "mae", "huber"}`` (MSELoss, L1Loss, HuberLoss(delta=1.0)); an
      error (e.g. non-floating targets) propagates, as in the guide.
    - ``"classification"``: ``{"ce", "bce", "focal"}`` (CrossEntropyLoss, BCEWithLogitsLoss,
      FocalLoss(alpha=1, gamma=2)); a loss that does not apply to these operands is None (e.g. "bce"
      for ``(N, C)`` logits and class indices; "ce" and "focal" for class-index losses given float
      targets of another shape). Where the guide catches every exception, only the errors a loss
      raises for operands it does not take are caught.

    The values are computed without building an autograd graph. ``task`` is case-insensitive;
    an unknown task raises ValueError (the guide treats every task but "regression" as
    classification). fastloss's FocalLoss takes class indices only, so it is None for probability
    targets, where the guide's ``F.cross_entropy``-based focal loss would score them.
    """
    task = _task(task, "evaluate_losses")
    results: dict[str, float | None] = {}
    with torch.no_grad():
        for name, loss_fn in _candidates(task).items():
            if task == "regression":
                results[name] = loss_fn(predictions, targets).item()
                continue
            try:
                results[name] = loss_fn(predictions, targets).item()
            except _DOES_NOT_APPLY:
                results[name] = None
    return results
