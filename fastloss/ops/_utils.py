"""Helpers shared by the launchers: output buffers and a launch counter for tests."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any

import torch

#: When True, fresh output buffers are filled with NaN so that an unwritten element shows up in
#: tests. Off in normal use (it costs a pass over memory).
POISON_OUTPUTS = False

#: Kernel launches by kernel name; tests read it to prove the Triton path ran.
launch_counts: collections.Counter[str] = collections.Counter()


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, poisoned with NaN when POISON_OUTPUTS is set."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints: the number of programs that cover a elements in blocks of b."""
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block sizes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()


def pow2_align(*values: int) -> int:
    """The largest power of two, at most 16, dividing every value (16 when all are 0): the alignment
    hint a kernel may assert of row offsets built from these values, to get 16-byte accesses."""
    g = math.gcd(*values)
    return min(g & -g, 16) if g else 16


def count_launch(name: str) -> None:
    launch_counts[name] += 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype inside kernels: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _not_differentiable(grads: tuple) -> tuple:
    """The launchers' gradients have no graph of their own: under create_graph=True give them one
    that raises when differentiated (as ``once_differentiable`` does, also when grad_output does not
    require grad), instead of gradients that silently drop their dependence on the inputs."""
    err = torch._C._functions.DelayedError(
        b"fastloss's kernels are differentiable once: a double backward (create_graph=True) needs "
        b"the PyTorch path, fastloss.use_backend('torch')", len(grads))
    aliases = [None if g is None else g.detach().requires_grad_() for g in grads]
    out = err(*aliases)
    out = out if isinstance(out, tuple) else (out,)
    return tuple(None if g is None else o for g, o in zip(grads, out))


def autograd_pair(
    op: Callable[..., tuple[torch.Tensor, ...]],
    launcher: Callable[..., tuple[torch.Tensor, ...]],
    setup_context: Callable[[Any, tuple, tuple], None],
    backward_op: Callable[[Any, torch.Tensor], tuple],
    backward_eager: Callable[[Any, torch.Tensor], tuple],
) -> Callable[..., torch.Tensor]:
    """Autograd for a family's forward, once for both ways it runs; returns ``run(*args) -> loss``.

    ``op`` is the torch.library custom op (traced by torch.compile) that wraps ``launcher``; both
    return ``(loss, *buffers)`` where the buffers (gradients made in the forward, statistics) are
    internal. ``setup_context(ctx, inputs, output)`` is shared; ``backward_op`` calls the custom ops,
    ``backward_eager`` the launchers. In eager mode ``run`` goes through an autograd.Function that
    calls ``launcher`` directly, which saves the custom-op dispatch cost (tens of microseconds a
    call, a large share of a loss that runs in ~100 us).
    """

    def setup_context_op(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])

    op.register_autograd(lambda ctx, grad_loss, *_: backward_op(ctx, grad_loss),
                         setup_context=setup_context_op)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = launcher(*inputs)
            setup_context(ctx, inputs, output)
            return output[0]

        @staticmethod
        def backward(ctx, grad_loss):
            with torch.no_grad():
                grads = backward_eager(ctx, grad_loss)
            if torch.is_grad_enabled():  # create_graph=True: see _not_differentiable
                grads = _not_differentiable(grads)
            return grads

    Eager.__name__ = Eager.__qualname__ = f"{getattr(op, '_name', 'fastloss')}_eager".replace("::", "_")

    def run(*args) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return op(*args)[0]
        return Eager.apply(*args)

    return run
