"""fastloss: drop-in PyTorch losses as fused Triton kernels, with a PyTorch path on every device.

    import fastloss
    criterion = fastloss.CrossEntropyLoss()   # instead of torch.nn.CrossEntropyLoss()

On CUDA tensors the Triton kernels run; elsewhere the pure-PyTorch reference does. Choose with
``fastloss.set_backend("auto" | "triton" | "torch")``, ``with fastloss.use_backend(...)`` or the
``FASTLOSS_BACKEND`` environment variable.
"""

from fastloss import functional, reference
from fastloss._backend import get_backend, set_backend, use_backend
from fastloss.combine import CombinedLoss, RegularizedLoss
from fastloss.modules import (
    BCEWithLogitsLoss,
    ContrastiveLoss,
    CrossEntropyLoss,
    FocalLoss,
    HuberLoss,
    InfoNCELoss,
    KLDivLoss,
    L1Loss,
    LinearCrossEntropyLoss,
    MSELoss,
    SigmoidFocalLoss,
    SmoothL1Loss,
    TripletMarginLoss,
)
from fastloss.monitor import LossMonitor
from fastloss.selector import evaluate_losses, select_loss

__version__ = "0.1.0"

__all__ = [
    "BCEWithLogitsLoss",
    "CombinedLoss",
    "ContrastiveLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "HuberLoss",
    "InfoNCELoss",
    "KLDivLoss",
    "L1Loss",
    "LinearCrossEntropyLoss",
    "LossMonitor",
    "MSELoss",
    "RegularizedLoss",
    "SigmoidFocalLoss",
    "SmoothL1Loss",
    "TripletMarginLoss",
    "evaluate_losses",
    "functional",
    "get_backend",
    "reference",
    "select_loss",
    "set_backend",
    "use_backend",
]
