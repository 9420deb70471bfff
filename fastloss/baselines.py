"""The straightforward torch compositions fastloss is measured and tested against, one copy each.

Where torch.nn has no such loss, users write it from torch ops; these are those compositions,
written the usual way (not the numerically careful way of :mod:`fastloss.reference`), so that a
benchmark's "torch" column and a test's oracle are what a user would otherwise run:

    softmax_focal        the classic softmax focal loss ``alpha (1 - exp(-ce))**gamma ce``
    sigmoid_focal        torchvision.ops.sigmoid_focal_loss's formula, verbatim
    contrastive          the seed guide's ContrastiveLoss (F.pairwise_distance, label 1 = dissimilar)
    SeedContrastiveLoss  the same as the guide's nn.Module, verbatim
    info_nce             naive InfoNCE: normalise, the full B x B similarity matrix, cross-entropy
                         against the diagonal (both directions averaged when symmetric)
    linear_cross_entropy the logits made in full: F.cross_entropy(F.linear(x, W), t)
    combined             the torch.nn calls a CombinedLoss replaces: sum of weight * F.<loss>(x, y)

Used by ``python -m fastloss bench`` / ``check`` / ``demo`` (fastloss.cli, fastloss._demo), the
pytest-benchmark files in bench/ and the tests. Imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SeedContrastiveLoss",
    "combined",
    "contrastive",
    "info_nce",
    "linear_cross_entropy",
    "reduce",
    "sigmoid_focal",
    "softmax_focal",
]


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """``loss.mean()`` / ``loss.sum()`` / ``loss`` for "mean" / "sum" / "none"."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"{reduction} is not a valid value for reduction")


def softmax_focal(x: Tensor, t: Tensor, alpha: float | Tensor = 1.0, gamma: float = 2.0,
                  reduction: str = "mean") -> Tensor:
    """The classic softmax focal composition: ``ce = F.cross_entropy(x, t, reduction="none")``,
    ``alpha (1 - exp(-ce))**gamma ce``; a tensor ``alpha`` is per class (``alpha[t]``)."""
    ce = F.cross_entropy(x, t, reduction="none")
    pt = torch.exp(-ce)
    if isinstance(alpha, Tensor):
        alpha = alpha[t]
    return reduce(alpha * (1 - pt) ** gamma * ce, reduction)


def sigmoid_focal(x: Tensor, y: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                  reduction: str = "none") -> Tensor:
    """torchvision.ops.sigmoid_focal_loss, verbatim (same ops, same order, same defaults; alpha < 0
    means no alpha weighting). torchvision is not a dependency."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * y + (1 - alpha) * (1 - y)
        loss = alpha_t * loss
    return reduce(loss, reduction)


class SeedContrastiveLoss(nn.Module):
    """The seed guide's ContrastiveLoss, verbatim (label 1 = dissimilar pair)."""

    def __init__(self, margin: float = 2.0):
        super().__init__()
        self.margin = margin

    def forward(self, output1: Tensor, output2: Tensor, label: Tensor) -> Tensor:
        euclidean_distance = F.pairwise_distance(output1, output2)
        loss_contrastive = torch.mean(
            (1 - label) * torch.pow(euclidean_distance, 2)
            + (label) * torch.pow(torch.clamp(self.margin - euclidean_distance, min=0.0), 2)
        )
        return loss_contrastive


def contrastive(x1: Tensor, x2: Tensor, label: Tensor, margin: float = 2.0, reduction: str = "mean") -> Tensor:
    """The seed guide's contrastive composition with a choice of reduction ("mean" is exactly
    :class:`SeedContrastiveLoss`; a (B, 1) label broadcasts against the (B,) distances as there)."""
    d = F.pairwise_distance(x1, x2)
    return reduce((1 - label) * torch.pow(d, 2) + label * torch.pow(torch.clamp(margin - d, min=0.0), 2),
                  reduction)


def info_nce(q: Tensor, k: Tensor, temperature: float = 0.07, reduction: str = "mean", symmetric: bool = False,
             normalize: bool = True) -> Tensor:
    """The textbook InfoNCE, materialising the B x B logits: rows L2-normalised (``normalize``),
    ``F.cross_entropy(q @ k.T / temperature, arange(B))``; ``symmetric`` averages it with the
    key -> query direction (CLIP)."""
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    if not symmetric:
        return F.cross_entropy(logits, labels, reduction=reduction)
    loss = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                  + F.cross_entropy(logits.T, labels, reduction="none"))
    return reduce(loss, reduction)


def linear_cross_entropy(x: Tensor, w: Tensor, t: Tensor, softcap: float | None = None,
                         reduction: str = "mean") -> Tensor:
    """The logits made in full: ``F.cross_entropy(F.linear(x, W), t)``, soft-capped as
    ``softcap * tanh(z / softcap)`` when ``softcap`` is given."""
    z = F.linear(x, w)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, t, reduction=reduction)


def combined(terms: Sequence[tuple[Callable[..., Tensor], float]], *args: Tensor) -> Tensor:
    """The torch calls a CombinedLoss replaces: ``sum(weight * fn(*args))`` in the order given."""
    total = None
    for fn, weight in terms:
        part = weight * fn(*args)
        total = part if total is None else total + part
    return total
