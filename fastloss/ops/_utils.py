"""Helpers shared by the launchers: output buffers and a launch counter for tests."""

from __future__ import annotations

import collections

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


def count_launch(name: str) -> None:
    launch_counts[name] += 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype inside kernels: float64 for float64 data, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
