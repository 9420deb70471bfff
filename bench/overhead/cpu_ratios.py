"""Issue 11, items 1-2: CPU forward+backward time of fastloss (backend auto) against torch.nn / the
eager composition, one thread, the two implementations interleaved sample by sample (each sample
~20 ms of calls); prints per case the medians and the median and range of the per-sample ratios
fastloss / torch (> 1: fastloss is slower). Run from the repository root:
``python bench/overhead/cpu_ratios.py [rounds] [case filter]``; for a before/after comparison put
the other checkout first on PYTHONPATH. Records, never asserts timings (it checks the two agree)."""
import statistics
import sys
import time
import timeit

import torch

import fastloss
from fastloss import baselines

torch.set_num_threads(1)
torch.manual_seed(0)
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 7

def pw(n, c=1):
    x = torch.randn(n, c, requires_grad=True); y = torch.randn(n, c); return x, y
def bce(n, c=1):
    x = torch.randn(n, c, requires_grad=True); y = torch.rand(n, c).round(); return x, y
def ce(n, c):
    x = torch.randn(n, c, requires_grad=True); y = torch.randint(0, c, (n,)); return x, y

classic_focal = baselines.softmax_focal

mse_f, mse_t = fastloss.MSELoss(), torch.nn.MSELoss()
l1_f, l1_t = fastloss.L1Loss(), torch.nn.L1Loss()
hub_f, hub_t = fastloss.HuberLoss(), torch.nn.HuberLoss()
bce_f, bce_t = fastloss.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss()
ce_f, ce_t = fastloss.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
foc_f = fastloss.FocalLoss(alpha=1.0, gamma=2.0)
comb_f = fastloss.CombinedLoss({fastloss.MSELoss(): 0.7, fastloss.L1Loss(): 0.3})
sfoc_f = fastloss.SigmoidFocalLoss()
def classic_sfocal(x, y):
    return baselines.sigmoid_focal(x, y, reduction="mean")
con_f = fastloss.ContrastiveLoss()
classic_con = baselines.contrastive
def emb(n, d):
    a = torch.randn(n, d, requires_grad=True); b = torch.randn(n, d, requires_grad=True)
    return a, b, torch.randint(0, 2, (n,)).float()

CASES = [
    ("MSE 32x1", pw(32), mse_f, mse_t),
    ("L1 32x1", pw(32), l1_f, l1_t),
    ("Huber 32x1", pw(32), hub_f, hub_t),
    ("BCE-logits 32x1", bce(32), bce_f, bce_t),
    ("CE 32x5", ce(32, 5), ce_f, ce_t),
    ("CE 4096x1000", ce(4096, 1000), ce_f, ce_t),
    ("MSE 2^20", pw(1 << 20), mse_f, mse_t),
    ("CE 256x256", ce(256, 256), ce_f, ce_t),
    ("focal 32x5 vs classic", ce(32, 5), foc_f, classic_focal),
    ("focal 256x256 vs classic", ce(256, 256), foc_f, classic_focal),
    ("focal 4096x1000 vs classic", ce(4096, 1000), foc_f, classic_focal),
    ("Combined .7MSE+.3L1 32x1", pw(32), comb_f, lambda x, y: 0.7 * mse_t(x, y) + 0.3 * l1_t(x, y)),
    ("Combined .7MSE+.3L1 2^16", pw(1 << 16), comb_f, lambda x, y: 0.7 * mse_t(x, y) + 0.3 * l1_t(x, y)),
    ("Combined .7MSE+.3L1 2^20", pw(1 << 20), comb_f, lambda x, y: 0.7 * mse_t(x, y) + 0.3 * l1_t(x, y)),
    ("sigmoid focal 32x1 vs classic", bce(32), sfoc_f, classic_sfocal),
    ("sigmoid focal 2^16 vs classic", bce(1 << 16), sfoc_f, classic_sfocal),
    ("sigmoid focal 2^20 vs classic", bce(1 << 20), sfoc_f, classic_sfocal),
    ("contrastive 32x16 vs classic", emb(32, 16), con_f, classic_con),
    ("contrastive 4096x64 vs classic", emb(4096, 64), con_f, classic_con),
]
only = sys.argv[2] if len(sys.argv) > 2 else None

def step(fn, args):
    def run():
        fn(*args).backward()
        for a in args:
            a.grad = None
    return run

print(f"{'case':34s} {'torch/eager us':>16s} {'fastloss us':>14s} {'ratio med':>9s} {'ratio range':>14s}")
for name, args, f, t in CASES:
    if only and only not in name:
        continue
    # check the results agree
    lf, lt = f(*args), t(*args)
    assert torch.allclose(lf, lt, rtol=1e-4, atol=1e-6), (name, lf, lt)
    runs = {"f": step(f, args), "t": step(t, args)}
    for r in runs.values():
        r()
    # choose number so each sample takes ~20 ms
    t0 = time.perf_counter(); runs["t"](); dt = time.perf_counter() - t0
    number = max(1, int(0.02 / max(dt, 1e-6)))
    samp = {"f": [], "t": []}
    for i in range(ROUNDS):
        order = ("f", "t") if i % 2 == 0 else ("t", "f")
        for k in order:
            samp[k].append(timeit.timeit(runs[k], number=number) / number * 1e6)
    ratios = [a / b for a, b in zip(samp["f"], samp["t"])]
    mf, mt = statistics.median(samp["f"]), statistics.median(samp["t"])
    print(f"{name:34s} {mt:16.1f} {mf:14.1f} {statistics.median(ratios):9.2f} "
          f"{min(ratios):6.2f}-{max(ratios):<6.2f}", flush=True)
