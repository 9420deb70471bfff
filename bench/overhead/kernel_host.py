"""Issue 11, item 1: host time of one kernel-path call (fwd+bwd) per family with the launches stubbed:
CPU tensors, backend "triton", TRITON_INTERPRET=1, and every ``*_kernel`` object of every
fastloss.kernels module replaced by a stub whose ``__getitem__`` (the ``kernel[grid]`` step) returns
a no-op launcher, so what is timed is the Python around the launches: validation, dispatch, buffer allocation, autograd (and, for linear_xent,
its small GEMMs, which run for real). (On CPU the softmax family also reads the targets for torch's
IndexError, which CUDA skips.)
``python bench/overhead/kernel_host.py`` (it measures the checkout it lives in); with
``--process-time`` the CPU time of this process is timed instead of wall time, which other work on a
shared machine disturbs less; ``--only WORD`` runs the cases whose name contains WORD."""
import importlib
import os
import pkgutil
import statistics
import sys
import time
import timeit
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch

import fastloss
from fastloss import _backend

torch.set_num_threads(1)
assert _backend.interpreter_enabled()
import fastloss.kernels


class _Stub:
    def __getitem__(self, grid):
        return lambda *a, **k: None
for info in pkgutil.iter_modules(fastloss.kernels.__path__):
    mod = importlib.import_module(f"fastloss.kernels.{info.name}")
    for name in dir(mod):
        if name.endswith("_kernel"):
            setattr(mod, name, _Stub())
fastloss.set_backend("triton")
x = torch.randn(32, 1, requires_grad=True); y = torch.randn(32, 1)
xc = torch.randn(32, 5, requires_grad=True); t = torch.randint(0, 5, (32,))
a = torch.randn(32, 16, requires_grad=True); b = torch.randn(32, 16, requires_grad=True); lab = torch.randint(0, 2, (32,)).float()
q = torch.randn(32, 16, requires_grad=True); k = torch.randn(32, 16, requires_grad=True)
h = torch.randn(32, 16, requires_grad=True); head = torch.randn(5, 16, requires_grad=True)
CASES = {
    "pointwise (MSE 32x1)": (fastloss.MSELoss(), (x, y)),
    "pointwise (BCE-logits 32x1)": (fastloss.BCEWithLogitsLoss(), (x, y.sigmoid())),
    "pointwise combo (.7MSE+.3L1)": (fastloss.CombinedLoss({fastloss.MSELoss(): .7, fastloss.L1Loss(): .3}), (x, y)),
    "softmax (CE 32x5)": (fastloss.CrossEntropyLoss(), (xc, t)),
    "softmax (focal 32x5)": (fastloss.FocalLoss(), (xc, t)),
    "embedding (contrastive 32x16)": (fastloss.ContrastiveLoss(), (a, b, lab)),
    "embedding (triplet 32x16)": (fastloss.TripletMarginLoss(), (a, b, b)),
    "info_nce (32x16)": (fastloss.InfoNCELoss(), (q, k)),
    "linear_xent (32x16 -> 5)": (fastloss.functional.linear_cross_entropy, (h, head, t)),
}
#: ``--only WORD``: the cases whose name contains WORD
ONLY = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
for name, (m, args) in CASES.items():
    if ONLY not in name:
        continue
    leaves = [v for v in args if v.requires_grad]
    def run(m=m, args=args, leaves=leaves):
        m(*args).backward()
        for v in leaves:
            v.grad = None
    for _ in range(50): run()
    timer = timeit.Timer(run, timer=time.process_time if "--process-time" in sys.argv else time.perf_counter)
    ts = [timer.timeit(number=300) / 300 * 1e6 for _ in range(7)]
    print(f"{name:32s} {statistics.median(ts):7.1f} us  (range {min(ts):.1f}-{max(ts):.1f})", flush=True)
