"""Which implementation runs: the Triton kernels or the PyTorch reference.

``"auto"`` (default): the kernels when every tensor is on CUDA and Triton imports, the reference
otherwise. ``"triton"``: always the kernels; CPU tensors only under Triton's interpreter
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

__all__ = ["BACKENDS", "get_backend", "set_backend", "transforms_active", "use_backend", "use_triton"]


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastloss backend {name!r}; expected one of {BACKENDS}")
    return name


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


def _selected() -> None:
    global _compiled
    _compiled = _scoped.get() or _default


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


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when the kernels should run for these tensors under the current backend.

    Under ``torch.func`` transforms and forward-mode AD it is False on every backend (the PyTorch
    path runs; see transforms_active). Raises RuntimeError when the backend is "triton" and the
    kernels cannot run here.
    """
    backend = _compiled if torch.compiler.is_compiling() else _scoped.get() or _default
    if backend == "torch":
        return False
    if backend == "auto":
        # the common CPU case is answered by the first tensor's device, before any other probe
        cuda = False
        for t in tensors:
            if t is not None:
                if not t.is_cuda:
                    return False
                cuda = True
        return cuda and triton_available() and not transforms_active()
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
