"""info_nce(..., gather=True) under torch.distributed: two processes on the gloo backend (CPU), each
holding half of a batch, against one process holding the whole batch.

What each rank returns is the reduction over its own rows of the loss against the gathered batch:
for "mean" the ranks' average is the single-process loss and DDP's gradient averaging gives the
single-process parameter gradients (each rank's embedding gradient is world_size x its share);
for "sum" the ranks' losses and gradients add up to the single-process ones.
"""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastloss
from fastloss import functional as FL

WORLD = 2
ROWS = 9          # rows per rank (odd); the global batch of 18 spans two 16-row interpreter tiles
IN, DIM = 6, 7    # encoder input and embedding sizes (odd)
TOL = {"rtol": 1e-9, "atol": 1e-12}
#: A rank left waiting in a collective (its peer failed or deadlocked) gives up after this long...
COLLECTIVE_TIMEOUT_S = 60
#: ...and the test fails (killing both ranks) if they have not both finished after this long.
SPAWN_TIMEOUT_S = 180


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}\n{m}", **TOL)


def _case(rank: int, symmetric: bool, reduction: str) -> None:
    torch.manual_seed(0)  # identical encoders and data on every rank
    enc_q, enc_k = nn.Linear(IN, DIM).double(), nn.Linear(IN, DIM).double()
    params = [*enc_q.parameters(), *enc_k.parameters()]
    x = torch.randn(WORLD * ROWS, IN, dtype=torch.float64)
    y = x + 0.5 * torch.randn(WORLD * ROWS, IN, dtype=torch.float64)
    mine = slice(rank * ROWS, (rank + 1) * ROWS)
    temperature = 0.3

    # One process with the whole batch.
    q_all, k_all = enc_q(x), enc_k(y)
    single = FL.info_nce(q_all, k_all, temperature, reduction, symmetric)
    single_grads = torch.autograd.grad(single.sum(), params + [q_all, k_all])
    single_rows = FL.info_nce(q_all.detach(), k_all.detach(), temperature, "none", symmetric)

    # This rank's half, keys (and queries) gathered from both ranks.
    q, k = enc_q(x[mine]), enc_k(y[mine])
    loss = FL.info_nce(q, k, temperature, reduction, symmetric, gather=True)
    if reduction == "none":
        _close(loss, single_rows[mine], "per-row losses of this rank's rows")
    else:
        own = single_rows[mine].mean() if reduction == "mean" else single_rows[mine].sum()
        _close(loss, own, "this rank's loss: the reduction over its own rows")
        total = loss.detach().clone()
        dist.all_reduce(total)
        _close(total / WORLD if reduction == "mean" else total, single, "ranks' losses combined")
    grads = torch.autograd.grad(loss.sum(), params + [q, k])

    # DDP averages parameter gradients over ranks; "sum" losses add up, so their gradients too.
    for g, want, name in zip(grads[:len(params)], single_grads[:len(params)], ("wq", "bq", "wk", "bk")):
        g = g.clone()
        dist.all_reduce(g)
        _close(g / WORLD if reduction == "mean" else g, want, f"parameter gradient {name}")
    factor = WORLD if reduction == "mean" else 1
    _close(grads[-2], factor * single_grads[-2][mine], "query embedding gradient")
    _close(grads[-1], factor * single_grads[-1][mine], "key embedding gradient")


def _worker(rank: int, init_file: str, backend: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        fastloss.set_backend(backend)
        for symmetric in (False, True):
            for reduction in ("mean", "sum", "none"):
                _case(rank, symmetric, reduction)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gathered_info_nce_equals_single_process(backend, tmp_path):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("gloo runs on CPU tensors: the kernels need Triton's interpreter there")
    _spawn_with_deadline(_worker, (str(tmp_path / "rendezvous"), backend), SPAWN_TIMEOUT_S)


def _spawn_with_deadline(fn, args, timeout_s: float) -> None:
    """mp.spawn(fn, args, WORLD), failing (and killing the ranks) after timeout_s instead of hanging
    CI; a rank's exception is re-raised here as mp.spawn does."""
    context = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def test_gather_without_process_group_raises():
    q = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        FL.info_nce(q, q, gather=True)


def _hang(rank: int) -> None:
    time.sleep(3600)


def test_hung_ranks_fail_the_test_instead_of_hanging():
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="did not finish"):
        _spawn_with_deadline(_hang, (), timeout_s=2)
    assert time.monotonic() - start < 60
