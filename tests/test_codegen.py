"""What the kernels compile to on a GPU, checked without one: the launchers' arguments for some
bandwidth-bound shapes are compiled for sm_90 (tests/codegen_probe.py, in a process without the
interpreter) and the PTX must move the rows 8 or 16 bytes at a time. Triton vectorises only what
it can prove aligned; rows of 1000 classes or 300 features are aligned only through the launchers'
alignment hints, which these tests guard (without them every element is its own load and store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from codegen_probe import CASES, DTYPES, HALF_CASES, HALF_DTYPES

import fastloss

#: The main kernels whose rows are checked; small kernels (the cross-entropy denominator) are not.
ROW_KERNELS = {"pointwise_fwd_kernel", "cross_entropy_fwd_kernel", "contrastive_fwd_kernel",
               "triplet_fwd_kernel"}
#: Scalar accesses a row kernel may keep: per-row target, target logit, label, denominator; the
#: loss (or partial sum) store of each compiled path.
MAX_SCALAR_LOADS, MAX_SCALAR_STORES = 4, 2
#: Sizes not divisible by 16 (50257 classes: rows start misaligned too): only the partial blocks
#: (a last one; a first one of each misaligned row) may use element-wise accesses.
ODD_SIZES = {"mse 2**20+1", "cross_entropy 64x50257"}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the probe compiles the fastloss these tests import (a checkout's, not an installed copy)
    root = str(Path(fastloss.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    probe = Path(__file__).with_name("codegen_probe.py")
    run = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, f"compiling for sm_90 failed:\n{run.stderr[-4000:]}"
    return json.loads(run.stdout)


def _row_kernel(compiled, case, dtype):
    kernels = [k for k in compiled[f"{case} {dtype}"] if k["kernel"] in ROW_KERNELS]
    assert len(kernels) == 1, f"expected one row kernel launch, got {[k['kernel'] for k in kernels]}"
    return kernels[0]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", sorted(set(CASES) - ODD_SIZES))
def test_rows_are_moved_in_vectors(case, dtype, compiled):
    k = _row_kernel(compiled, case, dtype)
    scalar_loads = [op for op in k["loads"] if ".v" not in op]
    scalar_stores = [op for op in k["stores"] if ".v" not in op]
    assert any(".v" in op for op in k["loads"]), f"no vector load: {k['loads']}"
    assert any(".v" in op for op in k["stores"]), f"no vector store: {k['stores']}"
    assert len(scalar_loads) <= MAX_SCALAR_LOADS, f"element-wise loads: {k['loads']}"
    assert len(scalar_stores) <= MAX_SCALAR_STORES, f"element-wise stores: {k['stores']}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", sorted(ODD_SIZES))
def test_full_blocks_of_odd_sizes_are_moved_in_vectors(case, dtype, compiled):
    """The full blocks still use vector loads and stores."""
    k = _row_kernel(compiled, case, dtype)
    assert sum(".v" in op for op in k["loads"]) >= 2, f"input and target not vector-loaded: {k['loads']}"
    assert any(".v" in op for op in k["stores"]), f"no vector store: {k['stores']}"


@pytest.mark.parametrize("dtype", list(HALF_DTYPES))
@pytest.mark.parametrize("case", sorted(HALF_CASES))
def test_half_precision_rescale_moves_rows_in_vectors(case, dtype, compiled):
    """The backward kernel that rescales (or recomputes) a reduced 16-bit loss's gradients: one
    launch whose row accesses (stored gradients, operands) are vectors; the element-wise ones are
    per-row or scalar (grad_output, the contrastive label and its gradient)."""
    kernels = compiled[f"{case} {dtype}"]
    assert [k["kernel"] for k in kernels] == [case.split()[0] + "_bwd_kernel"]
    loads, stores = kernels[0]["loads"], kernels[0]["stores"]
    assert sum(".v" in op for op in loads) >= 8, f"operands and stored gradients not vector-loaded: {loads}"
    assert sum(".v" in op for op in stores) >= 8, f"gradients not vector-stored: {stores}"
    assert sum(".v" not in op for op in stores) <= 2, f"element-wise stores: {stores}"
