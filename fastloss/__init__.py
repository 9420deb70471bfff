"""fastloss: drop-in PyTorch losses as fused Triton kernels, with a PyTorch path on every device.

    import fastloss
    criterion = fastloss.CrossEntropyLoss()   # instead of torch.nn.CrossEntropyLoss()

On CUDA tensors the Triton kernels run; elsewhere the pure-PyTorch reference does. Choose with
``fastloss.set_backend("auto" | "triton" | "torch")``, ``with fastloss.use_backend(...)`` or the
``FASTLOSS_BACKEND`` environment variable.
"""

from fastloss import functional, modules, reference
from fastloss._backend import get_backend, set_backend, use_backend
from fastloss.combine import CombinedLoss, RegularizedLoss
from fastloss.modules import *  # the loss module classes: every name in modules.__all__
from fastloss.monitor import LossMonitor
from fastloss.selector import evaluate_losses, select_loss

__version__ = "0.1.0"

__all__ = [
    "CombinedLoss",
    "LossMonitor",
    "RegularizedLoss",
    "evaluate_losses",
    "functional",
    "get_backend",
    "reference",
    "select_loss",
    "set_backend",
    "use_backend",
]
__all__ += modules.__all__  # a new module class is exported by listing it there
__all__.sort()
