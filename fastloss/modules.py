"""nn.Module drop-ins. Each subclasses its torch.nn counterpart where torch.nn has the loss, so the
constructor, attributes, buffers and ``isinstance`` checks are torch's; only ``forward`` changes."""

from __future__ import annotations

from torch import Tensor, nn

from fastloss import functional as F

__all__ = ["MSELoss", "L1Loss", "HuberLoss", "SmoothL1Loss", "BCEWithLogitsLoss", "SigmoidFocalLoss"]


class MSELoss(nn.MSELoss):
    """Drop-in torch.nn.MSELoss: mean squared error between input and target."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class L1Loss(nn.L1Loss):
    """Drop-in torch.nn.L1Loss: mean absolute error between input and target."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(input, target, reduction=self.reduction)


class HuberLoss(nn.HuberLoss):
    """Drop-in torch.nn.HuberLoss(reduction="mean", delta=1.0)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.huber_loss(input, target, reduction=self.reduction, delta=self.delta)


class SmoothL1Loss(nn.SmoothL1Loss):
    """Drop-in torch.nn.SmoothL1Loss(reduction="mean", beta=1.0); beta=0 is L1."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """Drop-in torch.nn.BCEWithLogitsLoss(weight=None, reduction="mean", pos_weight=None)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight
        )


class SigmoidFocalLoss(nn.Module):
    """Sigmoid focal loss module (torchvision's formula); unlike the functional form, the
    default reduction is "mean".

    Args:
        alpha: weight of positives in (0, 1), negatives get 1 - alpha; < 0 disables weighting.
        gamma: focusing exponent, >= 0 (0 gives BCE with logits).
        reduction: "none" | "mean" | "sum".
    """

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"SigmoidFocalLoss: gamma must be non-negative, got {gamma}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"{reduction} is not a valid value for reduction")
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(input, target, self.alpha, self.gamma, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"
