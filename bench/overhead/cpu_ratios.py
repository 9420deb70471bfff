"""Issue 11, items 1-2: CPU forward+backward time of fastloss (backend auto) against torch.nn / the
eager composition, one thread, the two implementations interleaved sample by sample (each sample
~20 ms of calls, the order alternating; timed in CPU time of the process, time.process_time, so
that waiting for a core of a shared machine is not counted; ``--wall`` times wall-clock); prints per case the medians and the median and range of
the per-sample ratios fastloss / torch (> 1: fastloss is slower). Run from the repository root:

    python bench/overhead/cpu_ratios.py [rounds] [case filter]           issue 11's table
    python bench/overhead/cpu_ratios.py --sweep [rounds] [loss filter]   every loss, 2^5 .. 2^24
    (add --wall for wall-clock time)

The sweep times each loss at 2^5, 2^8, ..., 2^20, 2^22 and 2^24 elements per operand (embedding
losses: rows of a fixed width; cross-entropy: 8 classes, then 1000 and 32000 up to 8192 x 32000;
InfoNCE from 2^8 up to B = 4096, its naive composition holding the B x B scores). For a before/after
comparison put the checkout to measure first on PYTHONPATH (``PYTHONPATH=. python bench/...``: run
as a script, the script's folder, not the repository, comes first on sys.path). Records, never
asserts timings (it checks the two agree)."""
import statistics
import sys
import time
import timeit

import torch
import torch.nn.functional as TF

import fastloss
import fastloss.functional as FL
from fastloss import baselines

torch.set_num_threads(1)
torch.manual_seed(0)
SWEEP = "--sweep" in sys.argv
TIMER = time.perf_counter if "--wall" in sys.argv else time.process_time
ARGS = [a for a in sys.argv[1:] if a not in ("--sweep", "--wall")]
ROUNDS = int(ARGS[0]) if ARGS else 7
ONLY = ARGS[1] if len(ARGS) > 1 else None


def pw(n, c=1):
    x = torch.randn(n, c, requires_grad=True); y = torch.randn(n, c); return x, y
def bce(n, c=1):
    x = torch.randn(n, c, requires_grad=True); y = torch.rand(n, c).round(); return x, y
def ce(n, c):
    x = torch.randn(n, c, requires_grad=True); y = torch.randint(0, c, (n,)); return x, y
def kl(n, c=1):
    x = torch.randn(n, c).log_softmax(0).requires_grad_(); y = torch.rand(n, c); return x, y
def emb(n, d, label=False, operands=2):
    xs = [torch.randn(n, d, requires_grad=True) for _ in range(operands)]
    return (*xs, torch.randint(0, 2, (n,)).float()) if label else tuple(xs)


classic_focal = baselines.softmax_focal
def classic_sfocal(x, y):
    return baselines.sigmoid_focal(x, y, reduction="mean")
classic_con = baselines.contrastive
naive_info_nce = baselines.info_nce
def fl_info_nce(q, k):
    return FL.info_nce(q, k, 0.07)
def torch_combined(x, y):
    return 0.7 * TF.mse_loss(x, y) + 0.3 * TF.l1_loss(x, y)


mse_f, mse_t = fastloss.MSELoss(), torch.nn.MSELoss()
l1_f, l1_t = fastloss.L1Loss(), torch.nn.L1Loss()
hub_f, hub_t = fastloss.HuberLoss(), torch.nn.HuberLoss()
sl1_f, sl1_t = fastloss.SmoothL1Loss(), torch.nn.SmoothL1Loss()
bce_f, bce_t = fastloss.BCEWithLogitsLoss(), torch.nn.BCEWithLogitsLoss()
kl_f, kl_t = fastloss.KLDivLoss(reduction="batchmean"), torch.nn.KLDivLoss(reduction="batchmean")
ce_f, ce_t = fastloss.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
tri_f, tri_t = fastloss.TripletMarginLoss(), torch.nn.TripletMarginLoss()
foc_f = fastloss.FocalLoss(alpha=1.0, gamma=2.0)
comb_f = fastloss.CombinedLoss({fastloss.MSELoss(): 0.7, fastloss.L1Loss(): 0.3})
sfoc_f = fastloss.SigmoidFocalLoss()
con_f = fastloss.ContrastiveLoss()

CASES = [
    ("MSE 32x1", lambda: pw(32), mse_f, mse_t),
    ("L1 32x1", lambda: pw(32), l1_f, l1_t),
    ("Huber 32x1", lambda: pw(32), hub_f, hub_t),
    ("BCE-logits 32x1", lambda: bce(32), bce_f, bce_t),
    ("CE 32x5", lambda: ce(32, 5), ce_f, ce_t),
    ("CE 4096x1000", lambda: ce(4096, 1000), ce_f, ce_t),
    ("MSE 2^20", lambda: pw(1 << 20), mse_f, mse_t),
    ("CE 256x256", lambda: ce(256, 256), ce_f, ce_t),
    ("focal 32x5 vs classic", lambda: ce(32, 5), foc_f, classic_focal),
    ("focal 256x256 vs classic", lambda: ce(256, 256), foc_f, classic_focal),
    ("focal 4096x1000 vs classic", lambda: ce(4096, 1000), foc_f, classic_focal),
    ("focal 8192x8 vs classic", lambda: ce(8192, 8), foc_f, classic_focal),
    ("focal 32768x2 vs classic", lambda: ce(32768, 2), foc_f, classic_focal),
    ("focal 2048x32 vs classic", lambda: ce(2048, 32), foc_f, classic_focal),
    ("focal 1024x64 vs classic", lambda: ce(1024, 64), foc_f, classic_focal),
    ("Combined .7MSE+.3L1 32x1", lambda: pw(32), comb_f, torch_combined),
    ("Combined .7MSE+.3L1 2^16", lambda: pw(1 << 16), comb_f, torch_combined),
    ("Combined .7MSE+.3L1 2^17", lambda: pw(1 << 17), comb_f, torch_combined),
    ("Combined .7MSE+.3L1 2^20", lambda: pw(1 << 20), comb_f, torch_combined),
    ("sigmoid focal 32x1 vs classic", lambda: bce(32), sfoc_f, classic_sfocal),
    ("sigmoid focal 2^16 vs classic", lambda: bce(1 << 16), sfoc_f, classic_sfocal),
    ("sigmoid focal 2^20 vs classic", lambda: bce(1 << 20), sfoc_f, classic_sfocal),
    ("contrastive 32x16 vs classic", lambda: emb(32, 16, True), con_f, classic_con),
    ("contrastive 4096x16 vs classic", lambda: emb(4096, 16, True), con_f, classic_con),
    ("contrastive 4096x64 vs classic", lambda: emb(4096, 64, True), con_f, classic_con),
    ("InfoNCE 32x16 vs naive", lambda: emb(32, 16), fl_info_nce, naive_info_nce),
    ("InfoNCE 4096x16 vs naive", lambda: emb(4096, 16), fl_info_nce, naive_info_nce),
    ("InfoNCE 1024x64 vs naive", lambda: emb(1024, 64), fl_info_nce, naive_info_nce),
    ("InfoNCE 2048x64 vs naive", lambda: emb(2048, 64), fl_info_nce, naive_info_nce),
    ("InfoNCE 512x128 vs naive", lambda: emb(512, 128), fl_info_nce, naive_info_nce),
    ("InfoNCE 4096x128 vs naive", lambda: emb(4096, 128), fl_info_nce, naive_info_nce),
    ("triplet 32x16", lambda: emb(32, 16, operands=3), tri_f, tri_t),
    ("KL batchmean 32x1", lambda: kl(32), kl_f, kl_t),
]

SWEEP_SIZES = [1 << k for k in (5, 8, 11, 14, 17, 20, 22, 24)]
EMB_WIDTH, NCE_WIDTH, NCE_MAX_ROWS = 16, 64, 4096
SWEEP_CASES = [  # (loss, fastloss, torch / composition, size -> operands, sizes)
    ("mse", mse_f, mse_t, pw, SWEEP_SIZES),
    ("l1", l1_f, l1_t, pw, SWEEP_SIZES),
    ("huber", hub_f, hub_t, pw, SWEEP_SIZES),
    ("smooth_l1", sl1_f, sl1_t, pw, SWEEP_SIZES),
    ("bce_with_logits", bce_f, bce_t, bce, SWEEP_SIZES),
    ("kl_div batchmean", kl_f, kl_t, kl, SWEEP_SIZES),
    ("cross_entropy C=8", ce_f, ce_t, lambda n: ce(n // 8, 8), SWEEP_SIZES),
    ("cross_entropy C=1000", ce_f, ce_t, lambda n: ce(n // 1000, 1000), [1 << 14, 1 << 17, 1 << 20, 1 << 22]),
    ("cross_entropy C=32000", ce_f, ce_t, lambda n: ce(n // 32000, 32000),
     [1 << 17, 1 << 20, 1 << 22, 1 << 24, 8192 * 32000]),
    (f"triplet D={EMB_WIDTH}", tri_f, tri_t, lambda n: emb(n // EMB_WIDTH, EMB_WIDTH, operands=3),
     SWEEP_SIZES),
    ("softmax focal C=8 vs classic", foc_f, classic_focal, lambda n: ce(n // 8, 8), SWEEP_SIZES),
    ("softmax focal C=32 vs classic", foc_f, classic_focal, lambda n: ce(n // 32, 32),
     [1 << 11, 1 << 14, 1 << 16, 1 << 17, 1 << 18, 1 << 20]),
    ("sigmoid focal vs classic", sfoc_f, classic_sfocal, bce, SWEEP_SIZES),
    (f"contrastive D={EMB_WIDTH} vs seed", con_f, classic_con,
     lambda n: emb(n // EMB_WIDTH, EMB_WIDTH, True), SWEEP_SIZES + [1 << 16]),
    (f"InfoNCE D={NCE_WIDTH} vs naive", fl_info_nce, naive_info_nce, lambda n: emb(n // NCE_WIDTH, NCE_WIDTH),
     [s for s in SWEEP_SIZES + [1 << 16] if NCE_WIDTH <= s <= NCE_WIDTH * NCE_MAX_ROWS]),
    ("CombinedLoss .7 MSE + .3 L1", comb_f, torch_combined, pw, SWEEP_SIZES + [1 << 16]),
]


def step(fn, args):
    def run():
        fn(*args).backward()
        for a in args:
            a.grad = None
    return run


def measure(name, args, f, t):
    lf, lt = f(*args), t(*args)  # check the results agree
    assert torch.allclose(lf, lt, rtol=1e-4, atol=1e-6), (name, lf, lt)
    runs = {"f": step(f, args), "t": step(t, args)}
    for r in runs.values():
        r()
    t0 = TIMER(); runs["t"](); dt = TIMER() - t0
    number = max(1, int(0.02 / max(dt, 1e-6)))  # each sample ~20 ms
    samp = {"f": [], "t": []}
    for i in range(ROUNDS):
        for k in (("f", "t") if i % 2 == 0 else ("t", "f")):
            samp[k].append(timeit.timeit(runs[k], number=number, timer=TIMER) / number * 1e6)
    ratios = [a / b for a, b in zip(samp["f"], samp["t"])]
    mf, mt = statistics.median(samp["f"]), statistics.median(samp["t"])
    print(f"{name:42s} {mt:13.1f} {mf:13.1f} {statistics.median(ratios):9.2f} "
          f"{min(ratios):6.2f}-{max(ratios):<6.2f}", flush=True)


print(f"{'case':42s} {'torch/eager us':>13s} {'fastloss us':>13s} {'ratio med':>9s} {'ratio range':>13s}")
if SWEEP:
    for loss, f, t, make, sizes in SWEEP_CASES:
        if ONLY and ONLY not in loss:
            continue
        for size in sorted(set(sizes)):
            args = make(size)
            measure(f"{loss} {'x'.join(map(str, args[0].shape))}", args, f, t)
            del args
else:
    for name, make, f, t in CASES:
        if not ONLY or ONLY in name:
            measure(name, make(), f, t)
