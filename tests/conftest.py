"""Shared fixtures. Without CUDA, Triton's interpreter runs the kernels on CPU tensors: it must be
switched on (TRITON_INTERPRET=1) before anything imports triton, so this happens first."""

import os

import torch  # torch does not import triton, so checking CUDA here is safe

if not torch.cuda.is_available():
    # (test_backend.py::test_conftest_switched_on_the_interpreter checks that it took effect)
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

import fastloss
from fastloss.ops import _utils

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    # numpy's floating-point warnings from masked-off lanes inside Triton's interpreter (e.g. 0/0 in
    # a tl.where branch that is not taken); compiled kernels have no such warnings
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


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
