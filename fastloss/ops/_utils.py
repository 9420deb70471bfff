"""Helpers shared by the launchers: output buffers and a launch counter for tests."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any, NamedTuple

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


def _differentiable_grads(ctx, grad_loss: torch.Tensor, reference: Callable) -> tuple:
    """Gradients for a double backward (``create_graph=True``: hessian, hvp, gradgradcheck,
    second-order optimisers): the kernels' gradients have no graph of their own, so the loss is
    evaluated again by the PyTorch reference on the saved operands, which are still attached to
    their graph, and differentiated with ``create_graph=True``. The result is differentiable with
    respect to the operands and to ``grad_loss``, exactly as torch.nn's gradients are."""
    ctx.grads = None  # the forward-made gradients are not used: free them now
    loss, inputs = reference(ctx)
    wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need]
    grads = torch.autograd.grad(loss, [inputs[i] for i in wanted], grad_loss.to(loss.dtype),
                                create_graph=True, allow_unused=True)
    out: list[torch.Tensor | None] = [None] * len(ctx.needs_input_grad)
    for i, g in zip(wanted, grads):
        out[i] = g
    return tuple(out)


class BackwardSteps(NamedTuple):
    """The launches a family's backward makes, in one of the two forms autograd_pair runs it: the
    launchers themselves (eager) or their custom ops (traced by torch.compile). Fields a family
    does not use stay None."""

    fwd: Callable | None = None         # the forward launcher, for a backward that recomputes with it
    bwd: Callable | None = None         # recompute the gradients with a given grad_output
    rescale: Callable | None = None     # 16-bit forward-made gradients times grad_output, rounded once
    scale_grad: Callable | None = None  # a forward-made gradient times grad_output
    eager: bool = True                  # the launchers (buffers may be scaled in place), else the ops


def autograd_pair(
    op: Callable[..., tuple[torch.Tensor, ...]],
    launcher: Callable[..., tuple[torch.Tensor, ...]],
    params: type[tuple],
    n_tensors: int,
    *,
    setup_context: Callable[[Any, tuple, Any, tuple, tuple], tuple | None],
    scale_stored: Callable[[Any, torch.Tensor, tuple, BackwardSteps], tuple],
    recompute: Callable[[Any, torch.Tensor, BackwardSteps], tuple],
    reference: Callable[[Any], tuple[torch.Tensor, tuple]],
    eager: BackwardSteps,
    traced: BackwardSteps,
) -> Callable[..., torch.Tensor]:
    """Autograd for a family's forward, once for both ways it runs; returns
    ``run(*tensors, params, want) -> loss``.

    The family's forward takes ``n_tensors`` tensor arguments (None where absent), then the fields
    of its ``params`` record (a NamedTuple of the loss's non-tensor arguments), then ``want``, one
    flag per tensor that needs a gradient from the forward. ``op`` is the torch.library custom op
    (traced by torch.compile) that wraps ``launcher``; both take these arguments flat (a custom
    op's schema has no records) and return ``(loss, *buffers)`` where the buffers (gradients made
    in the forward, statistics) are internal. In eager mode ``run`` goes through an
    autograd.Function that calls ``launcher`` directly, which saves the custom-op dispatch cost
    (tens of microseconds a call, a large share of a loss that runs in ~100 us).

    In both forms ``ctx.params`` is the record and ``ctx.want`` the flags.
    ``setup_context(ctx, tensors, params, want, output)`` saves what backward needs and returns
    the gradients the forward made (a tuple, None where one was not made), or None when backward
    computes them. The first backward hands those out once: ``scale_stored(ctx, grad_loss, stored,
    steps)`` multiplies them by grad_output (in place where it can), and autograd takes the
    buffers without a copy; a backward with nothing stored (the forward made no gradients, or a
    second backward after ``retain_graph=True``) calls ``recompute(ctx, grad_loss, steps)``. Both
    return gradients in the order of the tensor arguments (shorter is fine); ``steps`` is
    ``eager`` or ``traced``, the launches of the form that runs.

    ``reference(ctx) -> (loss, inputs)`` evaluates the same loss with differentiable PyTorch ops
    from what ``setup_context`` saved; ``inputs`` lines up with the tensor arguments (None where
    there is no tensor). It serves the double backward (see _differentiable_grads).
    ``setup_context`` may set ``ctx.overwritten`` to the input tensors the launcher wrote into
    (``inplace_backward``): the eager Function marks them dirty, so autograd raises, as for any
    in-place operation, when a saved copy of them is used later, and a later use of the
    overwritten values in the graph raises in this backward.
    """
    n_flat = n_tensors + len(params._fields)

    def setup(ctx, tensors, p, want, output):
        ctx.params, ctx.want = p, want
        ctx.grads = setup_context(ctx, tensors, p, want, output)

    def backward(ctx, grad_loss, steps: BackwardSteps) -> tuple:
        stored, ctx.grads = ctx.grads, None  # handed out once
        if stored is not None:
            grads = scale_stored(ctx, grad_loss, stored, steps)
        else:
            grads = recompute(ctx, grad_loss, steps)
        needs = ctx.needs_input_grad
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None,) * (len(needs) - len(grads))

    def setup_context_op(ctx, inputs, output):
        setup(ctx, inputs[:n_tensors], params._make(inputs[n_tensors:n_flat]), inputs[n_flat:], output)
        ctx.mark_non_differentiable(*output[1:])

    op.register_autograd(lambda ctx, grad_loss, *_: backward(ctx, grad_loss, traced),
                         setup_context=setup_context_op)

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            *tensors, p, want = inputs
            output = launcher(*tensors, *p, *want)
            ctx.overwritten = ()
            setup(ctx, tensors, p, want, output)
            if ctx.overwritten:
                ctx.mark_dirty(*ctx.overwritten)
                ctx.set_materialize_grads(False)
            return (output[0], *ctx.overwritten)

        @staticmethod
        def backward(ctx, grad_loss, *grad_overwritten):
            if any(g is not None for g in grad_overwritten):
                raise RuntimeError(
                    "fastloss: the logits passed with inplace_backward=True hold the loss's gradient "
                    "after the call, and something used them afterwards; call the loss with "
                    "inplace_backward=False if the logits are used after the loss")
            if grad_loss is None:
                return (None,) * len(ctx.needs_input_grad)
            if torch.is_grad_enabled():  # create_graph=True
                return _differentiable_grads(ctx, grad_loss, reference)
            return backward(ctx, grad_loss, eager)

    Eager.__name__ = Eager.__qualname__ = f"{getattr(op, '_name', 'fastloss')}_eager".replace("::", "_")

    def run(*args) -> torch.Tensor:
        """``run(*tensors, params, want)``: the loss, differentiable."""
        if torch.compiler.is_compiling():
            *tensors, p, want = args
            return op(*tensors, *p, *want)[0]
        return Eager.apply(*args)[0]

    return run
