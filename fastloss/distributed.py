"""All-gather with gradients, for losses that score local rows against the whole global batch
(``fastloss.functional.info_nce(..., gather=True)``).

``all_gather_with_grad(x)`` concatenates every rank's ``x`` along dim 0 (rank order). Its backward
sums the gradient of the gathered tensor over all ranks and hands each rank the slice of its own
rows: every rank's loss contributes to every rank's inputs, as one process holding the whole batch
would see it (open_clip's ``gather_with_grad``). Every rank must pass the same shape, and every rank
must run backward (the backward is a collective too).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_with_grad", "rank_and_world_size"]


def rank_and_world_size(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``; a clear error when torch.distributed is not
    initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "gather=True needs torch.distributed to be initialised (torch.distributed.init_process_group)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        rank, world = rank_and_world_size(group)
        ctx.rank, ctx.world = rank, world
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        n = grad.shape[0] // ctx.world
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty((n, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        else:  # gloo has no reduce-scatter: sum everything, keep our rows
            total = grad.clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.group)
            out = total[ctx.rank * n:(ctx.rank + 1) * n]
        return out, None


def all_gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Every rank's ``x`` concatenated along dim 0, gradients summed back to the owning rank."""
    return _AllGather.apply(x, group)
