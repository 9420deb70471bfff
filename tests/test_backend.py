"""Backend selection: set_backend / use_backend / FASTLOSS_BACKEND, and which path actually runs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_launched, assert_not_launched

import fastloss
import fastloss.functional as FF
from fastloss import _backend
from fastloss.ops import cpu as ops_cpu

HAS_CUDA = torch.cuda.is_available()


def run_python(code: str, env_update: dict[str, str | None]) -> subprocess.CompletedProcess:
    """Run ``python -c code`` in a fresh interpreter with the environment changed as given
    (None removes a variable)."""
    env = dict(os.environ)
    for key, value in env_update.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_default_backend_is_auto():
    # conftest restores "auto" after every test; a fresh import without FASTLOSS_BACKEND is checked below
    assert fastloss.get_backend() == "auto"
    assert _backend.BACKENDS == ("auto", "triton", "torch")


@pytest.mark.parametrize("name", ["auto", "triton", "torch"])
def test_set_backend(name):
    fastloss.set_backend(name)
    assert fastloss.get_backend() == name


@pytest.mark.parametrize("name", ["cuda", "Torch", "", None])
def test_set_backend_rejects_unknown_names(name):
    fastloss.set_backend("torch")
    with pytest.raises(ValueError, match="unknown fastloss backend"):
        fastloss.set_backend(name)
    assert fastloss.get_backend() == "torch", "a rejected name must leave the backend unchanged"
    with pytest.raises(ValueError, match="unknown fastloss backend"), fastloss.use_backend(name):
        pass
    assert fastloss.get_backend() == "torch"


def test_use_backend_restores_previous_backend():
    fastloss.set_backend("torch")
    with fastloss.use_backend("triton"):
        assert fastloss.get_backend() == "triton"
        with fastloss.use_backend("auto"):
            assert fastloss.get_backend() == "auto"
        assert fastloss.get_backend() == "triton"
    assert fastloss.get_backend() == "torch"


def test_use_backend_restores_previous_backend_on_exception():
    fastloss.set_backend("torch")
    with pytest.raises(KeyError), fastloss.use_backend("triton"):
        assert fastloss.get_backend() == "triton"
        raise KeyError("boom")
    assert fastloss.get_backend() == "torch"


@pytest.mark.parametrize(
    "value, expected",
    [("torch", "torch"), (" Triton ", "triton"), ("", "auto"), (None, "auto")],
    ids=["torch", "triton_mixed_case_spaces", "empty", "unset"],
)
def test_environment_variable_sets_starting_backend(value, expected):
    result = run_python("import fastloss; print(fastloss.get_backend())", {"FASTLOSS_BACKEND": value})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_environment_variable_with_unknown_name_fails_at_import():
    result = run_python("import fastloss", {"FASTLOSS_BACKEND": "cudnn"})
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "unknown fastloss backend" in result.stderr
    assert "FASTLOSS_BACKEND='cudnn'" in result.stderr, "the error names the variable and its value"


def test_use_backend_in_one_thread_leaves_another_alone():
    """A block in thread A never changes what thread B sees (the choice is a contextvar)."""
    fastloss.set_backend("auto")
    inside, release = threading.Event(), threading.Event()
    seen = {}

    def a():
        with fastloss.use_backend("triton"):
            inside.set()
            release.wait(30)

    def b():
        inside.wait(30)
        seen["b"] = fastloss.get_backend()
        with assert_not_launched():  # CPU tensors under "auto": the PyTorch path
            FF.mse_loss(torch.randn(8), torch.randn(8))
        release.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen["b"] == "auto"
    assert fastloss.get_backend() == "auto"


def test_interleaved_asyncio_blocks_restore_their_own_backend():
    """Two tasks whose blocks interleave (A enters, B enters, A leaves, B leaves) each see their
    own choice, and the process default is untouched afterwards."""
    fastloss.set_backend("auto")
    log = []

    async def task(name, backend, first, second):
        with fastloss.use_backend(backend):
            await first.wait()
            log.append((name, fastloss.get_backend()))
            second.set()
        log.append((name + " after", fastloss.get_backend()))

    async def main():
        a_go, b_go = asyncio.Event(), asyncio.Event()
        ta = asyncio.create_task(task("a", "triton", a_go, b_go))
        tb = asyncio.create_task(task("b", "torch", b_go, asyncio.Event()))
        await asyncio.sleep(0)
        a_go.set()
        await asyncio.gather(ta, tb)

    asyncio.run(main())
    assert sorted(log) == [("a", "triton"), ("a after", "auto"), ("b", "torch"), ("b after", "auto")]
    assert fastloss.get_backend() == "auto"


def test_set_backend_is_the_process_default_under_a_block():
    """set_backend changes the default; an open use_backend block keeps its own choice."""
    with fastloss.use_backend("torch"):
        fastloss.set_backend("triton")
        assert fastloss.get_backend() == "torch"
    assert fastloss.get_backend() == "triton"
    seen = []
    t = threading.Thread(target=lambda: seen.append(fastloss.get_backend()))
    t.start()
    t.join(30)
    assert seen == ["triton"], "other threads see the process default"


def test_triton_on_cpu_without_interpreter_raises_a_clear_error():
    code = (
        "import torch, fastloss\n"
        "fastloss.set_backend('triton')\n"
        "x = torch.randn(4)\n"
        "try:\n"
        "    fastloss.functional.mse_loss(x, torch.zeros(4))\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError:', e)\n"
        "else:\n"
        "    print('no error')\n"
    )
    result = run_python(code, {"TRITON_INTERPRET": None, "FASTLOSS_BACKEND": None})
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert message.startswith("RuntimeError:"), message
    # says why (CPU tensors, kernels need CUDA or the interpreter) and what to do
    assert "cpu" in message and "CUDA" in message and "TRITON_INTERPRET=1" in message, message
    assert 'set_backend("auto")' in message, message


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter is only switched on without CUDA")
def test_conftest_switched_on_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert _backend.interpreter_enabled()


def _operands(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1030, generator=g).to(device).requires_grad_()
    y = torch.rand(3, 1030, generator=g).to(device)
    return x, y


def _run_family(x, y):
    """One forward and backward of every loss of the family."""
    losses = [
        FF.mse_loss(x, y),
        FF.l1_loss(x, y, reduction="sum"),
        FF.huber_loss(x, y, reduction="none").mean(),
        FF.smooth_l1_loss(x, y, beta=0.5),
        FF.binary_cross_entropy_with_logits(x, y, pos_weight=torch.full((1030,), 2.0, device=x.device)),
        FF.sigmoid_focal_loss(x, y, reduction="mean"),
    ]
    sum(losses).backward()
    return losses


def _expected_family(x, y):
    x = x.detach().requires_grad_()
    p = torch.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    focal = (0.25 * y + 0.75 * (1 - y)) * F.binary_cross_entropy_with_logits(x, y, reduction="none")
    losses = [
        F.mse_loss(x, y),
        F.l1_loss(x, y, reduction="sum"),
        F.huber_loss(x, y, reduction="none").mean(),
        F.smooth_l1_loss(x, y, beta=0.5),
        F.binary_cross_entropy_with_logits(x, y, pos_weight=torch.full((1030,), 2.0, device=x.device)),
        (focal * (1 - p_t) ** 2).mean(),
    ]
    sum(losses).backward()
    return losses, x.grad


def _check_family(x, y):
    losses = _run_family(x, y)
    expected, grad = _expected_family(x, y)
    for loss, exp in zip(losses, expected):
        assert_close(loss.detach(), exp.detach(), torch.float32, "loss")
    assert_close(x.grad, grad, torch.float32, "grad")


@pytest.mark.skipif(HAS_CUDA, reason="on CUDA 'auto' runs the kernels")
def test_auto_on_cpu_runs_the_reference():
    x, y = _operands("cpu")
    with assert_not_launched():
        _check_family(x, y)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_auto_on_cuda_runs_the_kernels():
    x, y = _operands("cuda")
    with assert_launched("pointwise_fwd_kernel", "pointwise_bwd_kernel", "scale_grad_kernel"):
        _check_family(x, y)


def test_auto_with_cpu_tensors_never_launches(device):
    x, y = _operands("cpu")
    with assert_not_launched():
        _run_family(x, y)


def test_torch_never_launches_kernels(device):
    x, y = _operands(device)
    fastloss.set_backend("torch")
    with assert_not_launched():
        _check_family(x, y)


def test_triton_launches_kernels(device):
    x, y = _operands(device)
    kernels = ("pointwise_fwd_kernel", "pointwise_bwd_kernel", "scale_grad_kernel")
    with fastloss.use_backend("triton"), assert_launched(*kernels):
        _check_family(x, y)


def test_modules_follow_the_backend(device):
    x, y = _operands(device)
    module = fastloss.MSELoss()
    with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel"):
        module(x, y)
    with fastloss.use_backend("torch"), assert_not_launched():
        module(x, y)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA and CPU tensors at once")
def test_triton_with_mixed_devices_raises():
    with fastloss.use_backend("triton"), pytest.raises(RuntimeError, match="cannot run"):
        FF.mse_loss(torch.randn(4, device="cuda"), torch.randn(4))


def test_compiled_code_follows_use_backend_blocks(device):
    """Dynamo cannot read the contextvar; compiled code follows the backend selected last and
    recompiles when it changes (a block's choice, in one thread)."""
    x, y = _operands(device)
    compiled = torch.compile(lambda a, b: FF.mse_loss(a, b), fullgraph=True)
    with fastloss.use_backend("torch"), assert_not_launched():
        torch_result = compiled(x, y)
    with fastloss.use_backend("triton"), assert_launched("pointwise_fwd_kernel"):
        kernel_result = compiled(x, y)
    with fastloss.use_backend("torch"), assert_not_launched():
        compiled(x, y)
    assert_close(kernel_result, torch_result)


# --------------------------------------------------------------------------------------------
# "auto" on CUDA: small problems run the PyTorch path (SMALL_PROBLEM_NUMEL)
# --------------------------------------------------------------------------------------------

FAMILIES = ("pointwise", "softmax", "embedding", "info_nce", "linear_xent")


class _FakeCuda:
    """What use_triton reads of a CUDA tensor of ``n`` elements (no GPU needed)."""

    is_cuda = True
    device = torch.device("cuda")

    def __init__(self, n: int) -> None:
        self.n = n

    def numel(self) -> int:
        return self.n


def test_small_problem_thresholds_are_one_per_family():
    assert set(_backend.SMALL_PROBLEM_NUMEL) == set(FAMILIES)
    assert all(isinstance(v, int) and v >= 0 for v in _backend.SMALL_PROBLEM_NUMEL.values())


@pytest.mark.size_routing
@pytest.mark.parametrize("family", FAMILIES)
def test_auto_routes_cuda_problems_by_the_first_tensors_size(family, monkeypatch):
    """The committed thresholds: below, "auto" runs the PyTorch path for CUDA tensors; at the
    threshold and above, the kernels. Only the first tensor's size counts."""
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    limit = _backend.SMALL_PROBLEM_NUMEL[family]
    big = _FakeCuda(10**9)
    if limit > 0:
        assert _backend.small_problem(family, _FakeCuda(limit - 1))
        assert not _backend.use_triton(_FakeCuda(limit - 1), big, family=family)
    assert not _backend.small_problem(family, _FakeCuda(limit))
    assert _backend.use_triton(_FakeCuda(limit), _FakeCuda(1), family=family)
    assert _backend.use_triton(_FakeCuda(0), family=None), "no family: no size routing"


@pytest.mark.size_routing
def test_size_routing_only_under_auto_and_outside_torch_compile(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    monkeypatch.setattr(_backend, "SMALL_PROBLEM_NUMEL", dict.fromkeys(FAMILIES, 100))
    small = _FakeCuda(99)
    assert not _backend.use_triton(small, family="pointwise")
    with fastloss.use_backend("triton"):
        assert _backend.use_triton(small, family="pointwise"), '"triton" never routes by size'
    with fastloss.use_backend("torch"):
        assert not _backend.use_triton(_FakeCuda(100), family="pointwise")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _backend.use_triton(small, family="pointwise"), "compiled code never routes by size"


@pytest.mark.size_routing
def test_cpu_auto_answers_before_size_routing(monkeypatch):
    """On CPU, "auto" returns at the first tensor's device check: the size is never read."""
    def fail(*args):
        raise AssertionError("small_problem ran for CPU tensors")

    monkeypatch.setattr(_backend, "small_problem", fail)
    assert not _backend.use_triton(torch.zeros(3), torch.zeros(3), family="pointwise")
    assert not _backend.use_triton(torch.zeros(3), _FakeCuda(3), family="softmax")


def test_each_loss_routes_as_its_family(monkeypatch):
    """functional passes each loss's family to use_triton (sigmoid focal none: its PyTorch path is
    costlier on the host than the kernels')."""
    seen = []

    def record(*tensors, family=None):
        seen.append(family)
        return False

    monkeypatch.setattr(FF, "use_triton", record)
    # the fused CPU paths (fastloss.ops.cpu) stand aside, as when the kernels are selected, so that
    # these CPU calls reach the dispatch that CUDA inputs take
    monkeypatch.setattr(ops_cpu, "use_triton", lambda *tensors, **kwargs: True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, generator=g), torch.rand(4, 3, generator=g)
    t = torch.randint(0, 3, (4,), generator=g)
    w = torch.randn(5, 3, generator=g)
    calls = {
        "pointwise": [lambda: FF.mse_loss(x, y), lambda: FF.l1_loss(x, y.double()),
                      lambda: FF.huber_loss(x, y), lambda: FF.smooth_l1_loss(x, y, beta=0.5),
                      lambda: FF.binary_cross_entropy_with_logits(x, y), lambda: FF.kl_div(x, y, reduction="sum")],
        "softmax": [lambda: FF.cross_entropy(x, t), lambda: FF.cross_entropy(x, y),
                    lambda: FF.focal_loss(x, t, reduction="none")],
        "embedding": [lambda: FF.contrastive_loss(x, y, t.float()), lambda: FF.triplet_margin_loss(x, y, x)],
        "info_nce": [lambda: FF.info_nce(x, y)],
        "linear_xent": [lambda: FF.linear_cross_entropy(x, w, t)],
        None: [lambda: FF.sigmoid_focal_loss(x, y)],
    }
    for family, fns in calls.items():
        for fn in fns:
            seen.clear()
            fn()
            assert seen == [family], (family, seen)


def _at_size(family: str, n: int):
    """A loss of ``family`` whose first tensor has ``n`` elements, and its float64 operands."""
    g = torch.Generator().manual_seed(n)
    if family == "pointwise":
        x, y = torch.randn(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
        return lambda a, b: FF.mse_loss(a, b) + FF.binary_cross_entropy_with_logits(a, b, reduction="sum"), (x, y)
    if family == "softmax":
        x = torch.randn(n // 5, 5, generator=g, dtype=torch.float64)
        t = torch.randint(0, 5, (n // 5,), generator=g)
        return lambda a, b: FF.cross_entropy(a, b, label_smoothing=0.1) + FF.focal_loss(a, b), (x, t)
    q = torch.randn(n // 4, 4, generator=g, dtype=torch.float64)
    k = torch.randn(n // 4, 4, generator=g, dtype=torch.float64)
    return lambda a, b: FF.info_nce(a, b, symmetric=True), (q, k)


@pytest.mark.size_routing
@pytest.mark.parametrize("family", ["pointwise", "softmax", "info_nce"])
def test_both_sides_of_a_threshold_agree(family, monkeypatch):
    """Just below and at a threshold (set to 60 elements here; each side is what "auto" runs on
    CUDA there), the PyTorch path and the kernels give the same loss and gradients."""
    monkeypatch.setattr(_backend, "SMALL_PROBLEM_NUMEL", dict.fromkeys(FAMILIES, 60))
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    row = {"pointwise": 1, "softmax": 5, "info_nce": 4}[family]
    for n in (60 - row, 60):  # one row below the threshold, and at it
        loss_fn, operands = _at_size(family, n)
        assert operands[0].numel() == n
        assert _backend.use_triton(_FakeCuda(n), family=family) == (n >= 60)
        results = {}
        fwd_kernel = {"pointwise": "pointwise_fwd_kernel", "softmax": "cross_entropy_fwd_kernel",
                      "info_nce": "info_nce_fwd_kernel"}[family]
        for backend in ("torch", "triton"):
            leaves = [o.clone().requires_grad_(o.is_floating_point()) for o in operands]
            ran = assert_launched(fwd_kernel) if backend == "triton" else assert_not_launched()
            with fastloss.use_backend(backend), ran:
                loss = loss_fn(*leaves)
                loss.backward()
            results[backend] = (loss.detach(), *(v.grad for v in leaves if v.requires_grad))
        for got, want in zip(results["triton"], results["torch"]):
            assert_close(got, want, msg=f"{family} n={n}")


@pytest.mark.size_routing
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_auto_on_cuda_runs_small_problems_on_torch(monkeypatch):
    monkeypatch.setattr(_backend, "SMALL_PROBLEM_NUMEL", dict.fromkeys(FAMILIES, 1000))
    g = torch.Generator().manual_seed(0)
    for n, routed in ((999, True), (1000, False)):
        x = torch.randn(n, generator=g).cuda().requires_grad_()
        y = torch.randn(n, generator=g).cuda()
        with assert_not_launched() if routed else assert_launched("pointwise_fwd_kernel"):
            loss = FF.mse_loss(x, y)
        loss.backward()
        xr = x.detach().clone().requires_grad_()
        F.mse_loss(xr, y).backward()
        assert_close(loss.detach(), F.mse_loss(xr, y).detach())
        assert_close(x.grad, xr.grad)


def test_other_tests_run_without_size_routing():
    """conftest sets every threshold to 0 outside size_routing tests: on CUDA, "auto" then runs the
    kernels at every size the tests use."""
    assert set(_backend.SMALL_PROBLEM_NUMEL.values()) == {0}
