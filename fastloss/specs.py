"""One declarative record per loss: the registry that ops, combine, the exports, bench, check and the
tests read.

A :class:`LossSpec` names, for one loss, everything that is otherwise written in several places:
its family, the ops module and kernel kind that run it, its fastloss.functional function and
module class, its PyTorch reference (fastloss.reference), the torch baseline benchmarks time it
against, the keyword arguments benchmarks and checks call both with, how its operands are made and
its default benchmark shapes; for a pointwise loss also its kernel terms, the parameters the kernel
carries and whether CombinedLoss fuses it. Names are strings resolved on use, so that importing this
module imports nothing of fastloss (ops, functional and combine can read it without an import
cycle). Readers copy what they need into their own tables at import time: no loss's call looks a
spec up.

Families (one word everywhere: bench output, records, ops):

    pointwise    element-wise losses of (input, target) of any shape (fastloss.ops.pointwise)
    softmax      a softmax over the class dimension, class-index targets (fastloss.ops.softmax)
    embedding    losses of (B, D) embedding rows (fastloss.ops.embedding, fastloss.ops.info_nce)
    linear_xent  a projection fused with cross-entropy (fastloss.ops.linear_xent)

``ops`` is the fastloss.ops module that runs a loss; it is also the key of
``fastloss._backend.SMALL_PROBLEM_NUMEL`` (the size below which "auto" runs torch on CUDA) and of
the crossover benchmark (``python -m fastloss bench --sweep``).

Adding a loss: one ``LossSpec`` in :data:`SPECS` (see docs/adding-a-loss.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["FAMILIES", "OPS", "SPECS", "LossSpec", "by_family", "get", "resolve", "resolve_name"]

#: Families in report order.
FAMILIES = ("pointwise", "softmax", "embedding", "linear_xent")
#: fastloss.ops modules (and keys of fastloss._backend.SMALL_PROBLEM_NUMEL).
OPS = ("pointwise", "softmax", "embedding", "info_nce", "linear_xent")
#: How operands are made from a shape (fastloss.cli.cases makes them):
#: regression  x, y standard normal (y real-valued)
#: binary      x standard normal, y uniform in [0, 1) (probabilities)
#: log_probs   x log-probabilities, y probabilities, over the last dimension
#: classes     logits (N, V), int64 class targets
#: pairs       two (B, D) rows and a 0/1 label of the dtype
#: triplets    three (B, D) rows
#: queries     queries and keys (B, D)
#: hidden      hidden states (N, H), a projection (V, H), int64 class targets; shape (N, H, V)
OPERANDS = ("regression", "binary", "log_probs", "classes", "pairs", "triplets", "queries", "hidden")

_POINTWISE_SHAPES = MappingProxyType({"cuda": ((2**24,), (2**26,)), "cpu": ((2**18,),)})

#: Shorthands of :func:`resolve`: "F." is torch.nn.functional, "baselines." fastloss.baselines.
_PREFIXES = {"F.": "torch.nn.functional.", "baselines.": "fastloss.baselines.", "nn.": "torch.nn."}


def _split(path: str) -> tuple[str, str]:
    for short, full in _PREFIXES.items():
        if path.startswith(short):
            path = full + path[len(short):]
            break
    module, _, name = path.rpartition(".")
    return module, name


def resolve(path: str) -> Any:
    """The object a dotted name names: ``"F.mse_loss"``, ``"baselines.softmax_focal"``,
    ``"torchvision.ops.sigmoid_focal_loss"``; raises ImportError / AttributeError when it cannot
    be imported here."""
    module, name = _split(path)
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """One loss: what it is, what runs it, what it is measured against, and how.

    ``baseline`` is tried first and ``fallback`` when it does not import (torchvision for the
    sigmoid focal loss); both are called with the operands and ``params``, as the fastloss
    function is.
    """

    name: str                          # canonical name, as in bench output: "mse", "focal_loss"
    family: str                        # one of FAMILIES
    ops: str                           # fastloss.ops module, one of OPS
    kind: str                          # the loss's name in that module's tables (LOSSES / KINDS)
    functional: str                    # fastloss.functional name
    module: str                        # fastloss module class
    reference: str                     # fastloss.reference function (the PyTorch path's oracle)
    baseline: str                      # the torch code benchmarks time as "torch" (see resolve)
    baseline_label: str                # what that is, for reports
    operands: str                      # one of OPERANDS
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # keyword arguments of both calls
    shapes: Mapping[str, tuple[tuple[int, ...], ...]] = dataclasses.field(  # default shapes by device type
        default_factory=lambda: dict(_POINTWISE_SHAPES))
    fallback: str | None = None        # baseline when ``baseline`` does not import
    fallback_label: str | None = None
    torch_module: str | None = None    # the torch.nn class fastloss's module replaces, if any
    aliases: tuple[str, ...] = ()
    # pointwise family only (fastloss.ops.pointwise builds its tables from these at import time):
    terms: str | None = None           # the ``*_terms`` function in kernels/pointwise.py ("<kind>_terms")
    kernel_params: tuple[str, ...] = ()  # the kernel's param1, param2: reference keywords, module attributes
    fused: bool = False                # CombinedLoss runs the module in its fused kernel pass

    def __post_init__(self) -> None:
        if self.family not in FAMILIES or self.ops not in OPS or self.operands not in OPERANDS:
            raise ValueError(f"{self.name}: unknown family, ops or operands "
                             f"({self.family!r}, {self.ops!r}, {self.operands!r})")
        if self.family == "pointwise" and self.terms is None:
            object.__setattr__(self, "terms", self.kind + "_terms")
        if len(self.kernel_params) > 2 or ((self.kernel_params or self.fused) and self.family != "pointwise"):
            raise ValueError(f"{self.name}: kernel_params (at most two) and fused are pointwise fields")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        object.__setattr__(self, "shapes", MappingProxyType(dict(self.shapes)))

    @property
    def fastloss_fn(self) -> Callable[..., Any]:
        """``fastloss.functional.<functional>`` with ``params`` bound."""
        return _bound("fastloss.functional." + self.functional, tuple(self.params.items()))

    def baseline_fn(self) -> tuple[Callable[..., Any], str]:
        """(the torch baseline with ``params`` bound, its label); the fallback when the baseline
        does not import (torchvision missing or built for another torch)."""
        try:
            return _bound(self.baseline, tuple(self.params.items())), self.baseline_label
        except Exception:
            if self.fallback is None:
                raise
            label = f"{self.fallback_label} ({self.baseline.rpartition('.')[0]} not importable)"
            return _bound(self.fallback, tuple(self.params.items())), label

    @property
    def reference_fn(self) -> Callable[..., Any]:
        return resolve("fastloss.reference." + self.reference)

    @property
    def module_cls(self) -> type:
        return resolve("fastloss." + self.module)

    def default_shapes(self, device_type: str) -> list[tuple[int, ...]]:
        """The benchmark shapes on a device type ("cuda"; anything else reads "cpu")."""
        return list(self.shapes["cuda" if device_type == "cuda" else "cpu"])


@functools.cache
def _bound(path: str, params: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    """A call of the function ``path`` names with ``params`` added, looked up in its module at each
    call (so that a patched function is the one called); raises at once if it does not import."""
    module_name, name = _split(path)
    module = importlib.import_module(module_name)
    getattr(module, name)
    kwargs = dict(params)

    def call(*args: Any) -> Any:
        return getattr(module, name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _spec(name: str, family: str, ops: str, kind: str, functional: str, module: str, baseline: str,
          label: str, operands: str, **kw: Any) -> LossSpec:
    return LossSpec(name, family, ops, kind, functional, module, kw.pop("reference", functional), baseline,
                    label, operands, **kw)


#: Every loss, in report order.
SPECS: dict[str, LossSpec] = {s.name: s for s in (
    _spec("mse", "pointwise", "pointwise", "mse", "mse_loss", "MSELoss", "F.mse_loss",
          "torch.nn.functional.mse_loss", "regression", torch_module="MSELoss", fused=True),
    _spec("l1", "pointwise", "pointwise", "l1", "l1_loss", "L1Loss", "F.l1_loss",
          "torch.nn.functional.l1_loss", "regression", torch_module="L1Loss", fused=True),
    _spec("huber", "pointwise", "pointwise", "huber", "huber_loss", "HuberLoss", "F.huber_loss",
          "torch.nn.functional.huber_loss(delta=1.0)", "regression", params={"delta": 1.0},
          torch_module="HuberLoss", kernel_params=("delta",), fused=True),
    _spec("smooth_l1", "pointwise", "pointwise", "smooth_l1", "smooth_l1_loss", "SmoothL1Loss",
          "F.smooth_l1_loss", "torch.nn.functional.smooth_l1_loss(beta=1.0)", "regression",
          params={"beta": 1.0}, torch_module="SmoothL1Loss", aliases=("smoothl1",), kernel_params=("beta",),
          fused=True),
    _spec("bce_with_logits", "pointwise", "pointwise", "bce_with_logits", "binary_cross_entropy_with_logits",
          "BCEWithLogitsLoss", "F.binary_cross_entropy_with_logits",
          "torch.nn.functional.binary_cross_entropy_with_logits", "binary", torch_module="BCEWithLogitsLoss",
          aliases=("bce",), fused=True),
    _spec("sigmoid_focal", "pointwise", "pointwise", "sigmoid_focal", "sigmoid_focal_loss", "SigmoidFocalLoss",
          "torchvision.ops.sigmoid_focal_loss", "torchvision.ops.sigmoid_focal_loss", "binary",
          params={"alpha": 0.25, "gamma": 2.0, "reduction": "mean"}, fallback="baselines.sigmoid_focal",
          fallback_label="inline torchvision formula", aliases=("focal",), kernel_params=("alpha", "gamma"),
          fused=True),
    _spec("kl_div", "pointwise", "pointwise", "kl_div", "kl_div", "KLDivLoss", "F.kl_div",
          "torch.nn.functional.kl_div(reduction='batchmean')", "log_probs", params={"reduction": "batchmean"},
          torch_module="KLDivLoss", aliases=("kldiv", "kl"), kernel_params=("log_target",)),
    _spec("cross_entropy", "softmax", "softmax", "cross_entropy", "cross_entropy", "CrossEntropyLoss",
          "F.cross_entropy", "torch.nn.functional.cross_entropy", "classes", torch_module="CrossEntropyLoss",
          shapes={"cuda": ((8192, 32000), (8192, 128256), (4096, 256000)), "cpu": ((256, 4096),)},
          aliases=("ce", "xent")),
    _spec("focal_loss", "softmax", "softmax", "focal", "focal_loss", "FocalLoss", "baselines.softmax_focal",
          "ce = F.cross_entropy(reduction='none'); (0.25 (1 - exp(-ce))**2 ce).mean()", "classes",
          params={"alpha": 0.25, "gamma": 2.0},
          shapes={"cuda": ((65536, 1000), (8192, 32000)), "cpu": ((256, 4096),)}, aliases=("softmax_focal",)),
    _spec("contrastive", "embedding", "embedding", "contrastive", "contrastive_loss", "ContrastiveLoss",
          "baselines.contrastive", "seed ContrastiveLoss (F.pairwise_distance, margin 2)", "pairs",
          params={"margin": 2.0}, shapes={"cuda": ((2**20, 128),), "cpu": ((4096, 64),)}),
    _spec("triplet", "embedding", "embedding", "triplet", "triplet_margin_loss", "TripletMarginLoss",
          "F.triplet_margin_loss", "torch.nn.functional.triplet_margin_loss", "triplets",
          shapes={"cuda": ((2**20, 128),), "cpu": ((4096, 64),)}, torch_module="TripletMarginLoss",
          aliases=("triplet_margin",)),
    _spec("info_nce", "embedding", "info_nce", "info_nce", "info_nce", "InfoNCELoss", "baselines.info_nce",
          "F.normalize; q @ k.T / 0.07; F.cross_entropy(arange(B))", "queries", params={"temperature": 0.07},
          shapes={"cuda": ((4096, 512), (16384, 512)), "cpu": ((512, 64),)}, aliases=("infonce", "nt_xent")),
    _spec("linear_cross_entropy", "linear_xent", "linear_xent", "linear_cross_entropy", "linear_cross_entropy",
          "LinearCrossEntropyLoss", "baselines.linear_cross_entropy", "F.cross_entropy(F.linear(x, W), t)",
          "hidden", shapes={"cuda": ((8192, 4096, 128256),), "cpu": ((512, 128, 8192),)},
          torch_module="LinearCrossEntropyLoss", aliases=("linear_xent", "lce")),
)}

_NAMES: dict[str, str] = {}
for _s in SPECS.values():
    for _n in (_s.name, _s.functional, *_s.aliases):
        _NAMES.setdefault(_n, _s.name)


def resolve_name(name: str) -> str:
    """The canonical name of a loss from its name, fastloss.functional name or an alias ("focal"
    is the sigmoid focal loss, "focal_loss" / "softmax_focal" the softmax one)."""
    key = name.strip().lower().replace("-", "_")
    if key not in _NAMES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(SPECS)}")
    return _NAMES[key]


def get(name: str) -> LossSpec:
    """The spec of a loss (any name :func:`resolve_name` reads)."""
    return SPECS[resolve_name(name)]


def by_family(family: str, names: Iterable[str] | None = None) -> list[LossSpec]:
    """The specs of one family, in report order (among ``names`` when given)."""
    keep = None if names is None else {resolve_name(n) for n in names}
    return [s for s in SPECS.values() if s.family == family and (keep is None or s.name in keep)]
