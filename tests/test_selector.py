"""select_loss and evaluate_losses: the guide's LossSelector as functions returning fastloss modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastloss
from fastloss import baselines, evaluate_losses, select_loss


@pytest.mark.parametrize(
    ("task", "flags", "expected"),
    [
        ("regression", {}, fastloss.MSELoss),
        ("regression", {"has_outliers": True}, fastloss.HuberLoss),
        ("classification", {}, fastloss.CrossEntropyLoss),
        ("classification", {"binary": True}, fastloss.BCEWithLogitsLoss),
        ("classification", {"imbalanced": True}, fastloss.FocalLoss),
        ("classification", {"binary": True, "imbalanced": True}, fastloss.BCEWithLogitsLoss),
    ],
)
def test_select_loss(task, flags, expected) -> None:
    loss = select_loss(task, **flags)
    assert type(loss) is expected
    assert loss is not select_loss(task, **flags)  # a fresh module each call
    # the guide's call shape: a dict of data characteristics, positionally or by name
    assert type(select_loss(task, flags)) is expected
    assert type(select_loss(task, characteristics=flags)) is expected


def test_select_loss_guide_call_shape_and_case() -> None:
    """The guide's ``selector.select_loss('regression', {'has_outliers': True})``, any case."""
    assert type(select_loss("regression", {"has_outliers": True})) is fastloss.HuberLoss
    assert type(select_loss("Regression", {"has_outliers": True})) is fastloss.HuberLoss
    assert type(select_loss(" CLASSIFICATION ", {"imbalanced": 1})) is fastloss.FocalLoss
    assert type(select_loss("regression", {"has_outliers": False})) is fastloss.MSELoss
    # a characteristic holds when the mapping or the keyword says so
    assert type(select_loss("classification", {"imbalanced": True}, binary=True)) is fastloss.BCEWithLogitsLoss
    assert type(select_loss("regression", {}, has_outliers=True)) is fastloss.HuberLoss


def test_select_loss_rejects_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        select_loss("segmentation")
    with pytest.raises(ValueError, match=r"unknown data characteristic\(s\) \['outliers'\]"):
        select_loss("regression", {"outliers": True})  # misspelt: never silently ignored
    with pytest.raises(TypeError, match="characteristics must be a mapping"):
        select_loss("regression", True)
    with pytest.raises(TypeError):
        select_loss("regression", {}, True)  # the flags are keyword-only


_guide_focal = baselines.softmax_focal


def test_evaluate_losses_regression_matches_torch() -> None:
    """The guide's ``evaluate_losses(predictions, targets, 'regression')``: mse, mae, huber."""
    torch.manual_seed(0)
    predictions, targets = torch.randn(32, 1), torch.randn(32, 1)
    results = evaluate_losses(predictions, targets, "Regression")
    assert list(results) == ["mse", "mae", "huber"]
    assert all(isinstance(v, float) for v in results.values())
    assert results["mse"] == pytest.approx(nn.MSELoss()(predictions, targets).item(), rel=1e-6)
    assert results["mae"] == pytest.approx(nn.L1Loss()(predictions, targets).item(), rel=1e-6)
    assert results["huber"] == pytest.approx(nn.HuberLoss(delta=1.0)(predictions, targets).item(), rel=1e-6)


def test_evaluate_losses_classification_none_where_a_loss_does_not_apply() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(40, 5), torch.randint(0, 5, (40,))
    results = evaluate_losses(logits, labels, "classification")
    assert list(results) == ["ce", "bce", "focal"]
    assert results["ce"] == pytest.approx(nn.CrossEntropyLoss()(logits, labels).item(), rel=1e-6)
    assert results["bce"] is None  # (N, C) logits and class indices: BCE does not apply
    assert results["focal"] == pytest.approx(_guide_focal(logits, labels).item(), rel=1e-6)

    binary_logits, binary = torch.randn(40, 1), torch.randint(0, 2, (40, 1)).float()
    results = evaluate_losses(binary_logits, binary, "classification")
    assert results["bce"] == pytest.approx(nn.BCEWithLogitsLoss()(binary_logits, binary).item(), rel=1e-6)
    assert results["focal"] is None  # fastloss's focal loss takes class indices only


def test_evaluate_losses_rejects_unknown_task_and_is_exported() -> None:
    x = torch.randn(8, 1, requires_grad=True)
    results = evaluate_losses(x, torch.randn(8, 1), "regression")
    assert all(isinstance(v, float) for v in results.values())
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_losses(x, torch.randn(8, 1), "ranking")
    assert fastloss.evaluate_losses is evaluate_losses
