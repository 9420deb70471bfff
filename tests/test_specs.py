"""fastloss.specs: one record per loss, every name it holds resolves, and each loss's fastloss
function, PyTorch reference and benchmark baseline compute the same loss and gradients (against
torch.nn or the eager composition of fastloss.baselines) on the operands the benchmarks make."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import assert_close

import fastloss
from fastloss import functional as FL
from fastloss import specs
from fastloss.cli import cases

SPECS = list(specs.SPECS.values())


def test_every_loss_of_the_library_has_a_spec() -> None:
    public = {name for name, fn in inspect.getmembers(FL, inspect.isfunction)
              if fn.__module__ == FL.__name__ and not name.startswith("_")}
    assert {s.functional for s in SPECS} == public
    assert {s.module for s in SPECS} <= set(fastloss.__all__)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_spec_names_resolve(spec) -> None:
    assert spec.family in specs.FAMILIES and "_" not in spec.family.replace("linear_xent", "")
    assert spec.ops in specs.OPS
    assert callable(spec.fastloss_fn) and callable(spec.reference_fn) and isinstance(spec.module_cls, type)
    assert callable(spec.baseline_fn()[0])
    for alias in (spec.name, spec.functional, *spec.aliases):
        assert specs.resolve_name(alias) == spec.name
    assert spec.default_shapes("cuda") and spec.default_shapes("cpu")


def test_aliases_are_unambiguous_and_unknown_names_raise() -> None:
    assert specs.resolve_name("focal") == "sigmoid_focal" and specs.resolve_name("softmax_focal") == "focal_loss"
    assert specs.resolve_name("binary_cross_entropy_with_logits") == "bce_with_logits"
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        specs.resolve_name("nope")


_SMALL = {"regression": (257,), "binary": (257,), "log_probs": (13, 7), "classes": (13, 7), "pairs": (13, 5),
          "triplets": (13, 5), "queries": (13, 5), "hidden": (13, 5, 7)}


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_fastloss_reference_and_baseline_agree(spec) -> None:
    """The benchmark compares like with like: on the operands it makes, fastloss (PyTorch path),
    the spec's baseline (torch.nn or the eager composition) agree in value and gradients."""
    ops = cases.make_inputs(spec, _SMALL[spec.operands], torch.float64, "cpu", seed=2)
    wrt = [t for t in ops if t.requires_grad]
    results = []
    for fn in (spec.fastloss_fn, spec.baseline_fn()[0]):
        loss = fn(*ops)
        results.append((loss.detach(), torch.autograd.grad(loss, wrt)))
    (a, ga), (b, gb) = results
    assert_close(a, b, torch.float64, spec.name)
    for x, y in zip(ga, gb):
        assert_close(x, y, torch.float64, spec.name)
