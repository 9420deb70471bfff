"""Tolerances and assertions shared by the tests."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

import torch

from fastloss.ops import _utils

#: One table of tolerances per dtype, for fastloss vs an oracle evaluated in the same dtype.
#: Half precision allows ~2.5 ulps: the reference and the kernels round once (round-to-nearest),
#: from float32 results that differ in their last bits, and Triton's interpreter truncates
#: float32 -> bfloat16 instead of rounding to nearest. (Rounding once is checked on its own, per
#: element, by the half-precision gradient tests of each family.)
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2e-2, "atol": 1e-5},
    torch.float16: {"rtol": 2.5e-3, "atol": 1e-5},
}

DTYPES = list(TOLERANCES)
HALF_DTYPES = [torch.bfloat16, torch.float16]

KERNELS = (
    "pointwise_fwd_kernel", "pointwise_bwd_kernel", "scale_grad_kernel",
    "cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel", "cross_entropy_denom_kernel",
    "contrastive_fwd_kernel", "contrastive_bwd_kernel", "triplet_fwd_kernel", "triplet_bwd_kernel",
    "info_nce_fwd_kernel", "info_nce_chunk_kernel",
)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str = "") -> None:
    """actual == expected within the tolerance of ``dtype`` (default: expected's), same dtype and
    shape; NaNs must sit in the same places."""
    dtype = expected.dtype if dtype is None else dtype
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{msg}\n{m}",
                               **TOLERANCES[dtype])


def assert_no_less_accurate(actual: torch.Tensor, torch_result: torch.Tensor, exact: torch.Tensor,
                            msg: str = "") -> None:
    """fastloss in a dtype is never less accurate than torch in that dtype.

    Both are compared with ``exact`` (float64 torch.nn on the same, already rounded, operands): the
    largest error of fastloss may exceed torch's by at most one unit of the dtype's epsilon at the
    largest magnitude (one rounding more, e.g. the interpreter's truncating bf16 store).
    """
    assert actual.dtype == torch_result.dtype, f"{msg}: dtype {actual.dtype} != {torch_result.dtype}"
    assert actual.shape == exact.shape, f"{msg}: shape {actual.shape} != {exact.shape}"
    if exact.numel() == 0:
        return
    exact = exact.double()
    err_fast = (actual.double() - exact).abs().max().item()
    err_torch = (torch_result.double() - exact).abs().max().item()
    slack = torch.finfo(actual.dtype).eps * exact.abs().max().item() + TOLERANCES[actual.dtype]["atol"]
    assert err_fast <= err_torch + slack, (
        f"{msg}: fastloss error {err_fast:.3g} > torch error {err_torch:.3g} + slack {slack:.3g}"
    )


@contextlib.contextmanager
def assert_launched(*names: str) -> Iterator[None]:
    """The block must launch each named kernel (the Triton path ran)."""
    unknown = set(names) - set(KERNELS)
    assert not unknown, f"unknown kernels {unknown}"
    before = collections.Counter(_utils.launch_counts)
    yield
    for name in names:
        assert _utils.launch_counts[name] > before[name], f"{name} was not launched"


@contextlib.contextmanager
def assert_not_launched() -> Iterator[None]:
    """The block must launch no kernel at all (the PyTorch reference ran)."""
    before = collections.Counter(_utils.launch_counts)
    yield
    assert _utils.launch_counts == before, f"kernels ran: {_utils.launch_counts - before}"
