"""Which implementation runs: the Triton kernels or the PyTorch reference.

``"auto"`` (default): the kernels when every tensor is on CUDA and Triton imports, the reference
otherwise; on CUDA, a problem smaller than its family's ``SMALL_PROBLEM_NUMEL`` runs the reference
too (outside torch.compile), where torch's kernels finish it first. ``"triton"``: always the kernels; CPU tensors only under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported), otherwise a RuntimeError says why.
``"torch"``: always the reference. ``set_backend`` and the environment variable
``FASTLOSS_BACKEND`` set the process-wide default; ``use_backend`` overrides it inside a block, for
the current thread or asyncio task only.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch
from torch.autograd import forward_ad

BACKENDS = ("auto", "triton", "torch")

__all__ = [
    "BACKENDS",
    "SMALL_PROBLEM_NUMEL",
    "get_backend",
    "set_backend",
    "small_problem",
    "transforms_active",
    "use_backend",
    "use_triton",
]


def _from_environment() -> str:
    value = os.environ.get("FASTLOSS_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTLOSS_BACKEND={os.environ['FASTLOSS_BACKEND']!r} is not a fastloss backend "
                         f"(unknown fastloss backend); expected one of {BACKENDS}, or leave it unset")
    return value


#: The process-wide default (set_backend, FASTLOSS_BACKEND).
_default: str = _from_environment()
#: The choice of the innermost ``use_backend`` block of this thread / asyncio task (None outside).
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastloss_backend", default=None)
#: What torch.compile reads instead: Dynamo cannot trace ``ContextVar.get``, but it guards the
#: value of a module global, so a compiled function recompiles when this changes. It is the backend
#: in effect where it was last selected or a block was left: in one thread, the block's own choice.
_compiled: str = _default
#: Whether "triton" has ever been selected in this process (FASTLOSS_BACKEND, set_backend or a
#: use_backend block, in any thread or task); never reset. While it is False the backend in effect
#: anywhere is "auto" or "torch", under both of which a tensor off CUDA means the PyTorch path:
#: use_triton (and the lean checks of fastloss.functional) answer that case with this one global read,
#: before the backend lookup and torch.compiler.is_compiling(). (A counter of open "triton" blocks
#: would not do: an asyncio task or a copied context keeps a block's choice after the block ends.)
_triton_selected: bool = _default == "triton"


def _selected() -> None:
    global _compiled
    _compiled = _scoped.get() or _default


def _check(name: str) -> str:
    """``name`` when it is a backend (ValueError otherwise); notes a selection of "triton"."""
    global _triton_selected
    if name not in BACKENDS:
        raise ValueError(f"unknown fastloss backend {name!r}; expected one of {BACKENDS}")
    if name == "triton":
        _triton_selected = True
    return name


def get_backend() -> str:
    """The backend in effect here: the innermost ``use_backend`` block of this thread or asyncio
    task, else the process default ("auto", "triton" or "torch")."""
    return _scoped.get() or _default


def set_backend(name: str) -> None:
    """Set the process-wide default backend: "auto", "triton" or "torch". A ``use_backend`` block
    that is open in this thread or task keeps its own choice until it ends."""
    global _default
    _default = _check(name)
    _selected()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager that selects a backend inside a ``with`` block, for this thread or asyncio
    task only (a ``contextvars`` variable): other threads and tasks keep theirs, and the previous
    choice comes back when the block ends, also when blocks of several tasks interleave. Code
    compiled by torch.compile follows the backend selected last in the process (in a single
    thread, the block's), and recompiles when it changes: Dynamo cannot read a contextvar."""
    token = _scoped.set(_check(name))
    _selected()
    try:
        yield
    finally:
        _scoped.reset(token)
        _selected()


#: Size routing under "auto" (issue 11, item 3): a CUDA loss whose first tensor (input, logits,
#: output1 / anchor, query, or linear_cross_entropy's input) has fewer elements than its family's
#: entry runs the PyTorch path (torch.nn's op where torch has the loss), which finishes it sooner.
#: 0 never routes. Backend "triton" and torch.compile'd code never route by size; neither do
#: sigmoid_focal_loss (its PyTorch path is a composition of many ops, costlier on the host than
#: the kernel path: 269 vs 192 us below) and CombinedLoss's fused path (fastloss.combine).
#:
#: NOT YET MEASURED ON A GPU. Derived from host-overhead figures of the 2-core CPU machine as
#: follows; bench/gpu_check.sh's crossover benchmark prints measured values for this dict.
#: Model: neither path syncs, so a call takes max(host, device) time. Where the kernel path's host
#: time H_k exceeds the PyTorch path's H_t, the PyTorch path is no slower as long as torch's device
#: time D_t(n) <= H_k: the threshold is n* = H_k / (D_t per element), rounded down to a power of
#: two, the smaller over float32 / bfloat16. Where H_k <= H_t the kernels (which also move fewer
#: bytes) are never slower: 0.
#:  - H_k / H_t: fwd+bwd at the smallest shapes of bench/overhead/kernel_host.py, launches stubbed
#:    (backend "triton") vs backend "torch", CPU, one thread, interleaved medians, 2026-12-05 on
#:    the busy shared machine, halved: torch's MSE 32x1 took 83 us there against 38 us when the
#:    machine was quiet. Not counted: a GPU host's faster core, and the 2-6 real Triton launches
#:    per call (stubbed here); taken to cancel.
#:  - D_t per element on one H200: copy bandwidth 4.26 TB/s (bench/results/
#:    2026-11-26-h200-softmax.md: 2341 GB/s is 55 % of copy); torch's cross-entropy and the naive
#:    InfoNCE as measured there; torch's pointwise losses modelled.
#:  - "pointwise": MSE 32x1, H_k / H_t = 170 / 84 us -> 85 / 42 (BCE-with-logits 198 / 117,
#:    kl_div 187 / 146). torch's mse_loss fwd+bwd makes 7 passes (fwd reads x, y, writes the
#:    elementwise loss, reads it for the mean; bwd reads x, y, writes the grad): float32 28 B at
#:    4.26 TB/s = 6.6 ps per element; 85 us / 6.6 ps = 12.9M -> 2^23.
#:  - "softmax": CE 32x5, 238 / 83 us -> 119 / 42 (CPU's target read for torch's IndexError,
#:    skipped on CUDA, left out; focal 248 / 234). torch's CE on the H200, 8192 x 32000: float32
#:    2.231 ms = 8.5 ps per logit (bfloat16 4.6); 119 us / 8.5 ps = 14.0M -> 2^23.
#:  - "embedding": contrastive 32x16, 264 / 403 us; triplet 279 / 378 (torch.nn's triplet and the
#:    contrastive composition are many small ops): H_k < H_t, 0.
#:  - "info_nce": 32x16, 920 / 687 us -> 460 / 344. The naive loss (B x B scores) took 1.44 ms at
#:    B = 4096 in bfloat16 on the H200 (2026-11-26-h200-embedding-probe.json), growing as B^2;
#:    D = 512 assumed: D_t = 460 us at B = 4096 * sqrt(0.46 / 1.44) = 2315, n = 2315 * 512 =
#:    1.19M -> 2^20.
#:  - "linear_xent": 32x16 rows, V = 64, 722 / 840 us (both run the chunked op; the kernel
#:    replaces several torch row ops with one launch): H_k < H_t, 0.
SMALL_PROBLEM_NUMEL: dict[str, int] = {
    "pointwise": 1 << 23,
    "softmax": 1 << 23,
    "embedding": 0,
    "info_nce": 1 << 20,
    "linear_xent": 0,
}

_triton_ok: bool | None = None
_interpret: bool | None = None


# Both probes import modules, which torch.compile cannot trace: their results are constant for the
# life of the process, so dynamo calls them once and folds the answer into the graph.
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether the triton package can be imported (checked once)."""
    global _triton_ok
    if _triton_ok is None:
        try:
            _triton_ok = importlib.util.find_spec("triton") is not None and bool(
                importlib.import_module("triton")
            )
        except Exception:  # noqa: BLE001 - a broken triton install (driver, ABI) means "not available"
            _triton_ok = False
    return _triton_ok


@torch.compiler.assume_constant_result
def interpreter_enabled() -> bool:
    """Whether fastloss's kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    global _interpret
    if _interpret is None:
        _interpret = False
        if triton_available():
            from triton.runtime.interpreter import InterpretedFunction

            from fastloss.kernels import pointwise

            _interpret = isinstance(pointwise.pointwise_fwd_kernel, InterpretedFunction)
    return _interpret


def transforms_active() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jacrev, jacfwd, hessian, ...) or forward-mode
    AD (``torch.autograd.forward_ad.dual_level``) is active. The kernels' autograd.Function supports
    neither (it has no vmap rule and no jvp), so such calls run the PyTorch path, which supports
    both; eager double backward, by contrast, stays on the kernels (see ops._utils.autograd_pair).
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.maybe_current_level() is not None or forward_ad._current_level >= 0


def small_problem(family: str, tensor: torch.Tensor) -> bool:
    """Whether a loss of ``family`` whose first tensor is ``tensor`` is too small for the kernels to
    beat torch's own end to end: fewer elements than ``SMALL_PROBLEM_NUMEL[family]``."""
    return tensor.numel() < SMALL_PROBLEM_NUMEL[family]


def use_triton(*tensors: torch.Tensor | None, family: str | None = None) -> bool:
    """True when the kernels should run for these tensors under the current backend.

    Under ``torch.func`` transforms and forward-mode AD it is False on every backend (the PyTorch
    path runs; see transforms_active). Under "auto", a ``family`` (a key of SMALL_PROBLEM_NUMEL)
    routes CUDA problems by size: False when the first tensor is below the family's threshold
    (small_problem), except under torch.compile. Raises RuntimeError when the backend is "triton"
    and the kernels cannot run here.
    """
    if not _triton_selected:  # "auto" or "torch": a tensor off CUDA answers (see _triton_selected)
        for t in tensors:
            if t is not None:
                if not t.is_cuda:
                    return False
                break
    backend = _compiled if torch.compiler.is_compiling() else _scoped.get() or _default
    if backend == "torch":
        return False
    if backend == "auto":
        # the common CPU case is answered by the first tensor's device, before any other probe
        first = None
        for t in tensors:
            if t is not None:
                if not t.is_cuda:
                    return False
                if first is None:
                    first = t
        return (first is not None and triton_available() and not transforms_active()
                and (family is None or torch.compiler.is_compiling() or not small_problem(family, first)))
    if transforms_active():
        return False
    devices = {t.device.type for t in tensors if t is not None}
    if not triton_available():
        raise RuntimeError(
            'fastloss backend "triton" was requested but triton cannot be imported; '
            'install it (pip install triton) or use fastloss.set_backend("auto")'
        )
    if devices <= {"cuda"}:
        return True
    if devices <= {"cpu"} and interpreter_enabled():
        return True
    raise RuntimeError(
        f'fastloss backend "triton" cannot run on {sorted(devices)} tensors: the kernels need '
        "CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported; "
        'move the tensors to CUDA or use fastloss.set_backend("auto")'
    )
