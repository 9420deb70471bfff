"""``python -m fastloss check``: every loss once on this device against torch.nn, or the eager
composition of fastloss.baselines where torch.nn lacks the loss (loss and gradients, float32);
each line says OK / FAIL and which implementation ran (the Triton kernels launched, or the
PyTorch path)."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import fastloss
from fastloss import baselines, specs
from fastloss import functional as FL
from fastloss.cli.cases import default_device, error_reason, make_inputs


@dataclasses.dataclass(frozen=True)
class CheckCase:
    """One line of ``python -m fastloss check``: a fastloss call, the call it must agree with, and
    how their operands are made.

    ``make(device, generator)`` returns ``(args, wrt)``: the positional operands both calls take and
    the tensors whose gradients are compared (floating operands, model parameters). Both calls
    return a tensor; a non-scalar one is compared element by element and differentiated through a
    fixed non-uniform weighting of its elements.
    """

    name: str
    reference: str                                # what fastloss is compared with, for the report
    make: Callable[[torch.device, torch.Generator], tuple[tuple, list[Tensor]]]
    fastloss: Callable[..., Tensor]
    torch: Callable[..., Tensor]


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def _check_pointwise(spec: specs.LossSpec) -> CheckCase:
    def make(device: torch.device, g: torch.Generator):
        x, y = make_inputs(spec, (4099,), torch.float32, device, seed=1)  # odd, more than one block
        return (x, y), [x]

    baseline, label = spec.baseline_fn()
    return CheckCase(spec.functional, label, make, spec.fastloss_fn, baseline)


def _class_operands(shape: tuple[int, ...], probabilities: bool = False, ignore: int | None = None):
    """Logits of ``shape`` (class dimension 1) and class-index (or probability) targets."""
    def make(device: torch.device, g: torch.Generator):
        x = _leaf(3 * torch.randn(shape, generator=g, device=device))
        n_classes = shape[1]
        if probabilities:
            t = torch.softmax(torch.randn(shape, generator=g, device=device), dim=1)
        else:
            t = torch.randint(0, n_classes, shape[:1] + shape[2:], generator=g, device=device)
            if ignore is not None:
                t[::5] = ignore
        return (x, t), [x]

    return make


def _z_loss_formula(x: Tensor, t: Tensor) -> Tensor:
    """PaLM's z-loss written out: ce + 1e-3 * logsumexp(x)**2 per row, mean over rows."""
    return (F.cross_entropy(x, t, reduction="none") + 1e-3 * torch.logsumexp(x, dim=1) ** 2).mean()


def _softcap_formula(x: Tensor, t: Tensor) -> Tensor:
    """Gemma 2's soft-capping written out: cross_entropy(30 * tanh(x / 30), t)."""
    return F.cross_entropy(30.0 * torch.tanh(x / 30.0), t)


def _embeddings(operands: int, label: bool = False, b: int = 33, d: int = 17):
    def make(device: torch.device, g: torch.Generator):
        xs = [_leaf(torch.randn(b, d, generator=g, device=device)) for _ in range(operands)]
        extra = [torch.randint(0, 2, (b,), generator=g, device=device).float()] if label else []
        return (*xs, *extra), xs

    return make


def _regression_operands(device: torch.device, g: torch.Generator):
    x = _leaf(torch.randn(129, 3, generator=g, device=device))
    y = torch.randn(129, 3, generator=g, device=device)
    return (x, y), [x]


def _kl_operands(device: torch.device, g: torch.Generator):
    """Log-probabilities (the input) and probabilities (the target) of 37 rows of 11 classes."""
    x = _leaf(torch.log_softmax(torch.randn(37, 11, generator=g, device=device), dim=1))
    y = _leaf(torch.softmax(torch.randn(37, 11, generator=g, device=device), dim=1))
    return (x, y), [x, y]


def _linear_xent_operands(device: torch.device, g: torch.Generator):
    """Hidden states (37, 16), a projection (11, 16) and class indices."""
    x = _leaf(torch.randn(37, 16, generator=g, device=device))
    w = _leaf(0.3 * torch.randn(11, 16, generator=g, device=device))
    t = torch.randint(0, 11, (37,), generator=g, device=device)
    return (x, w, t), [x, w]


def _combined_fastloss(x: Tensor, y: Tensor) -> Tensor:
    return fastloss.CombinedLoss({fastloss.MSELoss(): 0.7, fastloss.L1Loss(): 0.2,
                                  fastloss.HuberLoss(delta=0.5): 0.1})(x, y)


def _combined_formula(x: Tensor, y: Tensor) -> Tensor:
    return baselines.combined(((F.mse_loss, 0.7), (F.l1_loss, 0.2),
                               (functools.partial(F.huber_loss, delta=0.5), 0.1)), x, y)


def _regularized_operands(device: torch.device, g: torch.Generator):
    with torch.random.fork_rng(devices=[]):  # the check leaves the global RNG alone
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device)
    with torch.no_grad():  # weights from ``g``, as the operands
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, device=device))
    x = torch.randn(31, 5, generator=g, device=device)
    y = torch.randn(31, 3, generator=g, device=device)
    return (model, x, y), list(model.parameters())


def _regularized_fastloss(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return fastloss.RegularizedLoss(fastloss.MSELoss(), model, l1=1e-3, l2=1e-2)(model(x), y)


def _regularized_formula(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    weights = [model[0].weight, model[2].weight]  # biases excluded (fastloss's default)
    return (F.mse_loss(model(x), y) + 1e-3 * sum(w.abs().sum() for w in weights)
            + 1e-2 * sum((w * w).sum() for w in weights))


def _regularized_guide_fastloss(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return fastloss.RegularizedLoss.from_guide(fastloss.MSELoss(), model, l1_lambda=0.01,
                                               l2_lambda=0.01)(model(x), y)


def _regularized_guide_formula(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The guide's RegularizedLoss.forward: unsquared L2 norm of every parameter, biases included."""
    params = list(model.parameters())
    return (F.mse_loss(model(x), y) + 0.01 * sum(torch.norm(p, 1) for p in params)
            + 0.01 * sum(torch.norm(p, 2) for p in params))


def check_cases() -> list[CheckCase]:
    """Every loss ``python -m fastloss check`` runs, in report order."""
    ce_torch = "F.cross_entropy"
    w_classes = 11

    def weighted(fn):
        def call(x: Tensor, t: Tensor) -> Tensor:
            w = torch.linspace(0.5, 2.0, w_classes, device=x.device)
            return fn(x, t, weight=w, ignore_index=-100)
        return call

    # kl_div has a line of its own below (log-probability operands, batchmean, both gradients)
    cases = [_check_pointwise(s) for s in specs.by_family("pointwise") if s.name != "kl_div"]
    focal, contrastive, triplet, info_nce = (specs.get(n) for n in ("focal_loss", "contrastive", "triplet",
                                                                  "info_nce"))
    cases += [
        CheckCase("cross_entropy", ce_torch, _class_operands((37, w_classes)), FL.cross_entropy,
                  F.cross_entropy),
        CheckCase("cross_entropy(weight, ignore_index)", f"{ce_torch}(weight, ignore_index)",
                  _class_operands((37, w_classes), ignore=-100), weighted(FL.cross_entropy),
                  weighted(F.cross_entropy)),
        CheckCase("cross_entropy(label_smoothing=0.1)", f"{ce_torch}(label_smoothing=0.1)",
                  _class_operands((37, w_classes)),
                  functools.partial(FL.cross_entropy, label_smoothing=0.1),
                  functools.partial(F.cross_entropy, label_smoothing=0.1)),
        CheckCase("cross_entropy(probability targets)", f"{ce_torch} (probability targets)",
                  _class_operands((37, w_classes), probabilities=True), FL.cross_entropy, F.cross_entropy),
        CheckCase("cross_entropy((N, C, d) input)", f"{ce_torch} ((N, C, d) input)",
                  _class_operands((5, w_classes, 7)), FL.cross_entropy, F.cross_entropy),
        CheckCase("cross_entropy(reduction='none')", f"{ce_torch}(reduction='none')",
                  _class_operands((37, w_classes)), functools.partial(FL.cross_entropy, reduction="none"),
                  functools.partial(F.cross_entropy, reduction="none")),
        CheckCase("cross_entropy(z_loss=1e-3)", "ce + 1e-3 * logsumexp**2 (formula)",
                  _class_operands((37, w_classes)), functools.partial(FL.cross_entropy, z_loss=1e-3),
                  _z_loss_formula),
        CheckCase("cross_entropy(softcap=30)", "F.cross_entropy(30 tanh(x / 30)) (formula)",
                  _class_operands((37, w_classes)), functools.partial(FL.cross_entropy, softcap=30.0),
                  _softcap_formula),
        CheckCase("focal_loss(alpha=0.25, gamma=2)", "alpha (1 - exp(-ce))**gamma ce (formula)",
                  _class_operands((37, w_classes)),
                  focal.fastloss_fn, focal.baseline_fn()[0]),
        CheckCase("contrastive_loss(margin=2)", "the guide's ContrastiveLoss (formula)",
                  _embeddings(2, label=True), contrastive.fastloss_fn, contrastive.baseline_fn()[0]),
        CheckCase("triplet_margin_loss", "F.triplet_margin_loss", _embeddings(3), triplet.fastloss_fn,
                  triplet.baseline_fn()[0]),
        CheckCase("info_nce(temperature=0.07)", "F.cross_entropy(q @ k.T / t, arange(B)) (formula)",
                  _embeddings(2), info_nce.fastloss_fn, info_nce.baseline_fn()[0]),
        CheckCase("info_nce(symmetric=True)", "both directions' F.cross_entropy, averaged (formula)",
                  _embeddings(2), functools.partial(FL.info_nce, temperature=0.07, symmetric=True),
                  functools.partial(baselines.info_nce, temperature=0.07, symmetric=True)),
        CheckCase("linear_cross_entropy", "F.cross_entropy(F.linear(x, W), t) (formula)",
                  _linear_xent_operands, FL.linear_cross_entropy, baselines.linear_cross_entropy),
        CheckCase("kl_div(reduction='batchmean')", "F.kl_div(reduction='batchmean')", _kl_operands,
                  functools.partial(FL.kl_div, reduction="batchmean"),
                  functools.partial(F.kl_div, reduction="batchmean")),
        CheckCase("CombinedLoss(MSE .7, L1 .2, Huber .1)", "0.7 F.mse_loss + 0.2 F.l1_loss + 0.1 F.huber_loss",
                  _regression_operands, _combined_fastloss, _combined_formula),
        CheckCase("RegularizedLoss(MSE, l1=1e-3, l2=1e-2)", "F.mse_loss + l1 sum|w| + l2 sum w**2 (formula)",
                  _regularized_operands, _regularized_fastloss, _regularized_formula),
        CheckCase("RegularizedLoss.from_guide(MSE, .01, .01)", "the guide's RegularizedLoss (formula)",
                  _regularized_operands, _regularized_guide_fastloss, _regularized_guide_formula),
    ]
    return cases


def _cotangent(out: Tensor) -> Tensor:
    """A fixed non-uniform weighting of a loss's elements (1 for a scalar)."""
    if out.dim() == 0:
        return torch.ones_like(out)
    return torch.linspace(0.5, 1.5, out.numel(), device=out.device, dtype=out.dtype).reshape(out.shape)


def _value_and_grads(fn: Callable[..., Tensor], args: tuple, wrt: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    out = fn(*args)
    grads = torch.autograd.grad(out, wrt, grad_outputs=_cotangent(out), allow_unused=True)
    return out.detach(), [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]


def implementation_ran(launches: collections.Counter) -> str:
    """"kernels (names)" when any Triton kernel was launched, else "PyTorch path"."""
    if not launches:
        return "PyTorch path"
    return "kernels: " + ", ".join(sorted(launches))


def run_check(case: CheckCase, device: torch.device, rtol: float = 1e-4, atol: float = 1e-6
              ) -> tuple[str, Tensor, float]:
    """(implementation that ran, fastloss's loss, max |gradient difference|); raises AssertionError
    on a mismatch of the loss or of any gradient."""
    from fastloss.ops import _utils

    g = torch.Generator(device=device).manual_seed(1)
    args, wrt = case.make(device, g)
    before = collections.Counter(_utils.launch_counts)
    got, g_got = _value_and_grads(case.fastloss, args, wrt)
    ran = implementation_ran(_utils.launch_counts - before)
    for w in wrt:
        w.grad = None
    want, g_want = _value_and_grads(case.torch, args, wrt)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"loss: {m}")
    err = 0.0
    for i, (a, b) in enumerate(zip(g_got, g_want)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, i=i: f"gradient {i}: {m}")
        if a.numel():
            err = max(err, (a - b).abs().max().item())
    return ran, got, err


def check_main(args: argparse.Namespace) -> int:
    """Run every loss once on the device against torch.nn, or a naive formula where torch.nn lacks
    the loss (loss and gradients, float32); print OK / FAIL and which implementation ran; return 1
    when any fails."""
    device = torch.device(args.device) if args.device else default_device()
    backend = getattr(args, "backend", None) or fastloss.get_backend()
    failures = 0
    print(f"fastloss {fastloss.__version__} check on {device} (torch {torch.__version__}, backend "
          f"{backend}): loss and gradients in float32 against torch.nn, or the naive formula where "
          "torch.nn has no such loss")
    with fastloss.use_backend(backend), warnings.catch_warnings():
        # Triton's interpreter computes masked-off lanes too (log(0) there is expected)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
        for case in check_cases():
            try:
                ran, value, err = run_check(case, device)
                shown = (f"loss {value.item():.6g}" if value.numel() == 1
                         else f"{value.numel()} losses summing to {value.sum().item():.6g}")
                print(f"  OK    {case.name:<42} [{ran}] {shown}, max |grad diff| {err:.1e}"
                      f" vs {case.reference}")
            except Exception as exc:  # noqa: BLE001 - any error is this loss's FAIL line
                failures += 1
                text = str(exc).strip().splitlines() if isinstance(exc, AssertionError) else []
                reason = f"mismatch: {' '.join(text[:3])}" if text else error_reason(exc)
                print(f"  FAIL  {case.name:<42} {reason} (vs {case.reference})")
    print("all OK" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


def add_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="fastloss backend for the check (default: the current one, FASTLOSS_BACKEND or "
                        "auto); triton on CPU needs TRITON_INTERPRET=1")
