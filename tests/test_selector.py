"""select_loss returns the fastloss module the rule of thumb names."""

from __future__ import annotations

import pytest

import fastloss
from fastloss import select_loss


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


def test_select_loss_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        select_loss("segmentation")
    with pytest.raises(TypeError):
        select_loss("regression", True)  # flags are keyword-only
