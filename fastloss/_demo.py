"""``python -m fastloss demo``: the loss-function guide's training loops on synthetic data.

Four small problems, each trained with a fastloss loss and with its torch.nn (or classic formula)
counterpart from the same initial weights:

* regression with outliers: MSE vs Huber, test MAE on clean data;
* imbalanced 5-class classification: cross-entropy vs focal loss, per-class recall;
* binary classification: BCE with logits, accuracy;
* siamese embedding: contrastive loss, mean distance of similar and dissimilar pairs.

The data is made at run time; the whole demo takes about 35-45 s on a shared 2-core CPU and uses
CUDA (and so the Triton kernels) when present. It writes a PNG (``loss_curves.png``: top, each
loss's training curve with fastloss as a line and its counterpart as open markers on it; bottom,
each problem's test metric per epoch) and, when the tensorboard package is installed, TensorBoard
event files.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

import fastloss
from fastloss import baselines
from fastloss.cli.timing import advance, progress
from fastloss.monitor import LossMonitor

Batch = tuple[Tensor, ...]


@dataclasses.dataclass
class Run:
    """One training run: its name, the step-0 loss, the final metrics and their value after each
    epoch (``history[metric][epoch]``)."""

    section: str
    name: str
    step0: float
    metrics: dict[str, float]
    monitor: LossMonitor
    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=20, help="epochs per run (default 20)")
    p.add_argument("--samples", type=int, default=4096, help="training samples per problem (default 4096)")
    p.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    p.add_argument("--out", default="fastloss-demo", help="output folder for the PNG and TensorBoard files")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _batches(tensors: Batch, batch: int, gen: torch.Generator) -> list[Batch]:
    n = tensors[0].shape[0]
    order = torch.randperm(n, generator=gen, device="cpu").to(tensors[0].device)
    return [tuple(t[order[i:i + batch]] for t in tensors) for i in range(0, n, batch)]


def _train(model: nn.Module, loss_fn: Callable[..., Tensor], data: Batch, epochs: int, batch: int,
           seed: int, lr: float, log_dir: str | None, bar, label: str,
           evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
           ) -> tuple[LossMonitor, dict[str, list[float]]]:
    """Adam on ``loss_fn(model, *batch)``; losses recorded by a LossMonitor (read once per epoch),
    ``evaluate(model)`` after each epoch (in eval mode, without gradients) into the history."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    monitor = LossMonitor(warn=False, log_dir=log_dir)
    history: dict[str, list[float]] = {}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for b in _batches(data, batch, gen):
            loss = loss_fn(model, *b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            monitor.step(loss)
        monitor.end_epoch()
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                for key, value in evaluate(model).items():
                    history.setdefault(key, []).append(value)
            model.train()
        advance(bar, label)
    monitor.close()
    return monitor, history


def _fresh(make: Callable[[], nn.Module], seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return make().to(device)


# the problems ---------------------------------------------------------------------------------

def _regression_data(n: int, device: torch.device, gen: torch.Generator):
    d = 8
    w = torch.randn(d, 1, generator=gen)
    x = torch.randn(2 * n, d, generator=gen)
    y = x @ w + 0.1 * torch.randn(2 * n, 1, generator=gen)
    x_train, y_train, x_test, y_test = x[:n], y[:n].clone(), x[n:], y[n:]
    outliers = torch.rand(n, generator=gen) < 0.1
    y_train[outliers] += 30.0 * torch.randn(int(outliers.sum()), 1, generator=gen).abs()
    return [t.to(device) for t in (x_train, y_train, x_test, y_test)]


def _classification_data(n: int, device: torch.device, gen: torch.Generator, priors: list[float]):
    k, d = len(priors), 10
    centers = 1.1 * torch.randn(k, d, generator=gen)
    labels = torch.multinomial(torch.tensor(priors), n, replacement=True, generator=gen)
    x = centers[labels] + torch.randn(n, d, generator=gen)
    per_class = max(n // (4 * k), 50)
    test_labels = torch.arange(k).repeat_interleave(per_class)
    x_test = centers[test_labels] + torch.randn(len(test_labels), d, generator=gen)
    return [t.to(device) for t in (x, labels, x_test, test_labels)]


def _pairs_data(n: int, device: torch.device, gen: torch.Generator):
    k, d = 6, 16
    centers = 3.0 * torch.randn(k, d, generator=gen)

    def make(m: int):
        a = torch.randint(0, k, (m,), generator=gen)
        same = torch.rand(m, generator=gen) < 0.5
        b = torch.where(same, a, (a + torch.randint(1, k, (m,), generator=gen)) % k)
        xa = centers[a] + torch.randn(m, d, generator=gen)
        xb = centers[b] + torch.randn(m, d, generator=gen)
        return xa, xb, (~same).float()  # label 1 = dissimilar

    return [t.to(device) for t in (*make(n), *make(n // 2))]


def _recall(logits: Tensor, labels: Tensor, k: int) -> list[float]:
    pred = logits.argmax(-1)
    return [float((pred[labels == c] == c).float().mean()) for c in range(k)]


def run_demo(epochs: int = 20, samples: int = 4096, batch: int = 256, out: str | None = "fastloss-demo",
             device: str | torch.device | None = None, seed: int = 0, quiet: bool = False) -> list[Run]:
    """Train every problem with fastloss and with torch.nn; return the runs (see module doc)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tb_root = None
    if out is not None:
        os.makedirs(out, exist_ok=True)
        try:
            import tensorboard  # noqa: F401

            tb_root = os.path.join(out, "tensorboard")
        except ImportError:
            tb_root = None
    gen = torch.Generator().manual_seed(seed)
    plan = 12  # runs below
    bar = None if quiet else progress(plan * epochs, desc="fastloss demo")
    runs: list[Run] = []

    def train(section: str, name: str, make: Callable[[], nn.Module], loss_fn, data: Batch, lr: float,
              step0_inputs: Batch, metrics: Callable[[nn.Module], dict[str, float]]) -> None:
        model = _fresh(make, seed, dev)
        with torch.no_grad():
            step0 = float(loss_fn(model, *step0_inputs))
        log_dir = None if tb_root is None else os.path.join(tb_root, f"{section}-{name}".replace(" ", "_"))
        monitor, history = _train(model, loss_fn, data, epochs, batch, seed, lr, log_dir, bar,
                                  f"{section}: {name}", evaluate=metrics)
        model.eval()
        with torch.no_grad():
            runs.append(Run(section, name, step0, metrics(model), monitor, history))

    # 1. regression with outliers
    x, y, x_test, y_test = _regression_data(samples, dev, gen)

    def mae(model: nn.Module) -> dict[str, float]:
        return {"test MAE": float((model(x_test) - y_test).abs().mean())}

    linear = lambda: nn.Linear(8, 1)
    for name, loss in [("fastloss MSELoss", fastloss.MSELoss()), ("torch.nn MSELoss", nn.MSELoss()),
                       ("fastloss HuberLoss", fastloss.HuberLoss(delta=1.0)),
                       ("torch.nn HuberLoss", nn.HuberLoss(delta=1.0))]:
        train("regression", name, linear, lambda m, a, b, loss=loss: loss(m(a), b), (x, y), 0.05, (x, y), mae)

    # 2. imbalanced 5-class classification
    priors = [0.6, 0.2, 0.12, 0.05, 0.03]
    xc, tc, xc_test, tc_test = _classification_data(samples, dev, gen, priors)

    def recalls(model: nn.Module) -> dict[str, float]:
        r = _recall(model(xc_test), tc_test, len(priors))
        return {**{f"recall c{c}": v for c, v in enumerate(r)}, "mean recall": sum(r) / len(r)}

    mlp = lambda: nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
    for name, loss in [("fastloss CrossEntropyLoss", fastloss.CrossEntropyLoss()),
                       ("torch.nn CrossEntropyLoss", nn.CrossEntropyLoss()),
                       ("fastloss FocalLoss", fastloss.FocalLoss(alpha=1.0, gamma=2.0)),
                       ("classic focal formula", baselines.softmax_focal)]:
        train("imbalanced", name, mlp, lambda m, a, b, loss=loss: loss(m(a), b), (xc, tc), 0.01, (xc, tc), recalls)

    # 3. binary classification
    xb, tb, xb_test, tb_test = _classification_data(samples, dev, gen, [0.7, 0.3])
    yb, yb_test = tb.float().unsqueeze(1), tb_test.float().unsqueeze(1)

    def accuracy(model: nn.Module) -> dict[str, float]:
        return {"test accuracy": float(((model(xb_test) > 0).float() == yb_test).float().mean())}

    logistic = lambda: nn.Linear(10, 1)
    for name, loss in [("fastloss BCEWithLogitsLoss", fastloss.BCEWithLogitsLoss()),
                       ("torch.nn BCEWithLogitsLoss", nn.BCEWithLogitsLoss())]:
        train("binary", name, logistic, lambda m, a, b, loss=loss: loss(m(a), b), (xb, yb), 0.05, (xb, yb),
              accuracy)

    # 4. siamese embedding
    pa, pb, pl, pa_test, pb_test, pl_test = _pairs_data(samples, dev, gen)

    def distances(model: nn.Module) -> dict[str, float]:
        d = TF.pairwise_distance(model(pa_test), model(pb_test))
        return {"similar d": float(d[pl_test == 0].mean()), "dissimilar d": float(d[pl_test == 1].mean())}

    embed = lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    for name, loss in [("fastloss ContrastiveLoss", fastloss.ContrastiveLoss(margin=2.0)),
                       ("classic contrastive formula", baselines.contrastive)]:
        train("siamese", name, embed, lambda m, a, b, c, loss=loss: loss(m(a), m(b), c), (pa, pb, pl), 0.01,
              (pa, pb, pl), distances)

    if bar is not None:
        bar.close()
    if out is not None:
        plot_runs(runs, os.path.join(out, "loss_curves.png"))
    return runs


#: The metric each problem's lower panel shows after every epoch (the losses of one problem are not
#: on one scale, their test metric is).
PLOT_METRICS = {
    "regression": ("test MAE", ["test MAE"]),
    "imbalanced": ("mean recall (5 classes)", ["mean recall"]),
    "binary": ("test accuracy", ["test accuracy"]),
    "siamese": ("mean distance of test pairs", ["similar d", "dissimilar d"]),
}
_FL_STYLE = {"ls": "-", "lw": 2.0}
_REF_STYLE = {"ls": "none", "marker": "o", "ms": 6, "mfc": "none", "mew": 1.3}


def _pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """(fastloss run, its torch.nn / classic-formula counterpart), in run order."""
    out = []
    for section in dict.fromkeys(r.section for r in runs):
        group = [r for r in runs if r.section == section]
        out += list(zip(group[::2], group[1::2]))
    return out


def _short(name: str) -> str:
    return name.removeprefix("fastloss ")


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b)), default=0.0)


def _log_if_wide(ax, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")


def make_figure(runs: list[Run], plt):
    """The demo's figure: top row, one panel per loss, its training loss per epoch with fastloss as a
    line and the torch.nn (or classic formula) run from the same weights as open markers on it, so
    both stay visible; bottom row, one panel per problem, the test metric per epoch of each loss
    (comparable across the problem's losses, where the training losses are not)."""
    pairs = _pairs(runs)
    sections = list(dict.fromkeys(r.section for r in runs))
    n_top, n_bottom = max(1, len(pairs)), max(1, len(sections))
    from matplotlib.ticker import MaxNLocator

    fig = plt.figure(figsize=(max(3.2 * n_top, 4.6 * n_bottom), 7.8), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    top_axes = top.subplots(1, n_top, squeeze=False)[0]
    bottom_axes = bottom.subplots(1, n_bottom, squeeze=False)[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    epochs = lambda r: range(1, len(r.monitor.train_losses) + 1)
    for ax, (fl, ref) in zip(top_axes, pairs):
        ax.plot(epochs(fl), fl.monitor.train_losses, color=colors[0], label=fl.name, **_FL_STYLE)
        ax.plot(epochs(ref), ref.monitor.train_losses, color=colors[1], label=ref.name, **_REF_STYLE)
        _log_if_wide(ax, fl.monitor.train_losses + ref.monitor.train_losses)
        diff = _max_rel_diff(fl.monitor.train_losses, ref.monitor.train_losses)
        ax.set_title(f"{_short(fl.name)} ({fl.section})", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7, loc="upper right", title=f"max rel. diff {diff:.1e}", title_fontsize=7)
        ax.grid(alpha=0.3)
    for ax, section in zip(bottom_axes, sections):
        ylabel, keys = PLOT_METRICS.get(section, (None, []))
        keys = [k for k in keys if any(k in fl.history for fl, _ in pairs)]
        for k, (fl, ref) in enumerate(p for p in pairs if p[0].section == section):
            for m, key in enumerate(keys):
                color = colors[(2 * k + m + 2) % len(colors)]
                what = f" {key}" if len(keys) > 1 else ""
                ax.plot(epochs(fl), fl.history[key], color=color, label=f"{fl.name}{what}", **_FL_STYLE)
                ax.plot(epochs(ref), ref.history[key], color=color, label=f"{ref.name}{what}", **_REF_STYLE)
        if section == "siamese":
            ax.axhline(2.0, color="0.5", ls=":", lw=1, label="margin 2")
        ax.set_title(f"{section}: {ylabel}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel or "")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("fastloss (lines) vs torch.nn or the classic formula (open markers), from the same initial "
                 "weights and batches.\nTop: training loss of each loss. Bottom: the test metric of each "
                 "problem (comparable across its losses)", fontsize=11)
    return fig


def plot_runs(runs: list[Run], path: str) -> None:
    """Write :func:`make_figure` to ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no PNG; pip install fastloss[plot])", file=sys.stderr)
        return
    fig = make_figure(runs, plt)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_runs(runs: list[Run]) -> str:
    lines = []
    for section in dict.fromkeys(r.section for r in runs):
        group = [r for r in runs if r.section == section]
        keys = list(group[0].metrics)
        lines.append(f"\n== {section} ==")
        lines.append(f"{'loss':30s} {'step-0 loss':>12s} " + " ".join(f"{k:>13s}" for k in keys))
        for r in group:
            lines.append(f"{r.name:30s} {r.step0:12.6f} " + " ".join(f"{r.metrics[k]:13.4f}" for k in keys))
        pairs = [(a, b) for a, b in zip(group[::2], group[1::2])]
        for a, b in pairs:
            same = math.isclose(a.step0, b.step0, rel_tol=1e-5, abs_tol=1e-7)
            lines.append(f"  step 0: {a.name} vs {b.name}: {'equal' if same else 'DIFFERENT'}"
                         f" (|diff| = {abs(a.step0 - b.step0):.2e})")
    return "\n".join(lines)


def demo_main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    runs = run_demo(args.epochs, args.samples, args.batch, args.out, args.device, args.seed, args.quiet)
    print(format_runs(runs))
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\n{len(runs)} runs on {dev} in {time.perf_counter() - t0:.1f} s; loss curves: "
          f"{os.path.join(args.out, 'loss_curves.png')}"
          + (f"; TensorBoard: tensorboard --logdir {os.path.join(args.out, 'tensorboard')}"
             if os.path.isdir(os.path.join(args.out, "tensorboard")) else ""))
    equal = all(math.isclose(a.step0, b.step0, rel_tol=1e-5, abs_tol=1e-7)
                for s in dict.fromkeys(r.section for r in runs)
                for a, b in zip([r for r in runs if r.section == s][::2], [r for r in runs if r.section == s][1::2]))
    return 0 if equal else 1
