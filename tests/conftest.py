"""Shared fixtures. Without CUDA, Triton's interpreter runs the kernels on CPU tensors: it must be
switched on (TRITON_INTERPRET=1) before anything imports triton, so this happens first."""

import os

import torch  # torch does not import triton, so checking CUDA here is safe

if not torch.cuda.is_available():
    # (test_backend.py::test_conftest_switched_on_the_interpreter checks that it took effect)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

import fastloss
from fastloss import _backend
from fastloss.ops import _utils

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    # numpy's floating-point warnings from masked-off lanes inside Triton's interpreter (e.g. 0/0 in
    # a tl.where branch that is not taken); compiled kernels have no such warnings
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")
    config.addinivalue_line("markers", "size_routing: keeps fastloss._backend.SMALL_PROBLEM_NUMEL (tests of "
                            "the routing); other tests run with every threshold at 0")


@pytest.fixture(autouse=True)
def _no_size_routing(request, monkeypatch):
    """Every threshold of "auto"'s size routing at 0, so that on CUDA the kernels run at every size
    the tests use (GPU coverage does not shrink), except in tests marked size_routing."""
    if request.node.get_closest_marker("size_routing") is None:
        monkeypatch.setattr(_backend, "SMALL_PROBLEM_NUMEL", dict.fromkeys(_backend.SMALL_PROBLEM_NUMEL, 0))


@pytest.fixture
def device() -> str:
    """"cuda" when available, else "cpu" (kernels then run in Triton's interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _poison_outputs_and_restore_backend(monkeypatch):
    """NaN-fill fresh kernel outputs so unwritten elements fail; leave the backend at "auto"."""
    monkeypatch.setattr(_utils, "POISON_OUTPUTS", True)
    yield
    fastloss.set_backend("auto")


@pytest.fixture
def triton_backend():
    """Run the test body on the Triton kernels (interpreter on CPU)."""
    with fastloss.use_backend("triton"):
        yield "triton"


@pytest.fixture
def torch_backend():
    """Run the test body on the PyTorch reference."""
    with fastloss.use_backend("torch"):
        yield "torch"


@pytest.fixture(params=["triton", "torch"])
def backend(request):
    """Run the test body once on the kernels and once on the reference."""
    with fastloss.use_backend(request.param):
        yield request.param
