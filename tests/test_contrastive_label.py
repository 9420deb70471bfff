"""contrastive_loss with a (B, 1) label: one label per pair, and a warning (once) that says so,
since the guide's snippet broadcasts such a label into a B x B matrix."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close, assert_launched, assert_not_launched

import fastloss
from fastloss import _validation, baselines
from fastloss import functional as FL

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


_per_pair = baselines.contrastive


_guide_broadcast = baselines.contrastive


def _operands():
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    x2 = x1 + 0.8 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    label = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0], [0.0]], dtype=torch.float64)
    return x1.to(DEVICE), x2.to(DEVICE), label.to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "torch"], indirect=True)
def test_column_label_is_one_label_per_pair_and_warns_once(backend, monkeypatch) -> None:
    monkeypatch.setattr(_validation, "_label_column_warned", False)
    x1, x2, label = _operands()
    want = _per_pair(x1, x2, label.squeeze(1))
    assert abs(want.item() - _guide_broadcast(x1, x2, label).item()) > 1e-3  # the guide's value differs
    launched = assert_launched("contrastive_fwd_kernel") if backend == "triton" else assert_not_launched()
    with warnings.catch_warnings(record=True) as caught, launched:
        warnings.simplefilter("always")
        got = fastloss.ContrastiveLoss(margin=2.0)(x1, x2, label)
        again = FL.contrastive_loss(x1, x2, label)
        FL.contrastive_loss(x1, x2, label.squeeze(1))
    assert_close(got, want)
    assert_close(again, want)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    # the warning points at the caller of contrastive_loss (here the module's forward)
    assert next(w.filename for w in caught if issubclass(w.category, UserWarning)).endswith("modules.py")
    assert "(6, 1) is read as one label per pair" in messages[0]
    assert "6 x 6 matrix" in messages[0] and "label.squeeze(-1)" in messages[0]


def test_per_pair_label_does_not_warn(monkeypatch) -> None:
    monkeypatch.setattr(_validation, "_label_column_warned", False)
    x1, x2, label = _operands()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FL.contrastive_loss(x1, x2, label.squeeze(1))
        FL.contrastive_loss(x1[0], x2[0], label[0])  # one unbatched pair, label (1,)
