"""Compile what the launchers would launch, for an sm_90 GPU, without a GPU; print the global
memory access widths of the PTX as JSON.

Run as a script by tests/test_codegen.py, in a process without TRITON_INTERPRET (the interpreter
replaces compiled kernels). The launchers run on meta tensors; each kernel launch is compiled
with the specialisation Triton's JIT would apply to those arguments (integers equal to 1 become
constants, integers and data pointers divisible by 16 are marked so), then its PTX is scanned
for ld.global / st.global instructions and their vector width.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import warnings

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastloss import specs
from fastloss.ops import embedding as ops_embedding
from fastloss.ops import pointwise as ops_pointwise
from fastloss.ops import softmax as ops_softmax

PTR_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16",
             torch.float16: "*fp16", torch.int64: "*i64", torch.int32: "*i32"}
TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


class CompilingKernel:
    """Stands in for ``kernel[grid](*args, **meta)``: compiles instead of launching."""

    def __init__(self, fn, results: list[dict]):
        self.fn, self.results = fn, results

    def __getitem__(self, grid):
        return self.compile

    def compile(self, *args, num_warps: int = 4, num_stages: int = 3, **consts):
        params = inspect.signature(self.fn.fn).parameters
        names = list(params)
        values = dict(zip(names, args)) | consts
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(names):
            v = values[name]
            if name in consts or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
                signature[name], constexprs[(i,)] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                signature[name] = PTR_TYPES[v.dtype]
                if v.storage_offset() * v.element_size() % 16 == 0:  # meta storage: aligned
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(v, float):  # as the JIT: the declared type (tl.float64) or fp32
                signature[name] = "fp64" if params[name].annotation in (tl.float64, "tl.float64") else "fp32"
            elif isinstance(v, bool):
                signature[name] = "i1"
            else:
                signature[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=self.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": num_warps, "num_stages": num_stages}).asm["ptx"]
        self.results.append({
            "kernel": self.fn.fn.__name__,
            "loads": re.findall(r"\bld\.global(?:\.[a-z0-9]+)*", ptx),
            "stores": re.findall(r"\bst\.global(?:\.[a-z0-9]+)*", ptx),
        })


def _fake(module, results):
    """A stand-in for a kernels module whose kernels compile."""
    fake = type(module.__name__, (), {})()
    for name, obj in vars(module).items():
        if isinstance(obj, triton.runtime.JITFunction):
            setattr(fake, name, CompilingKernel(obj, results))
    return fake


def softmax_case(n_rows: int, n_cols: int, dtype: torch.dtype, kind: str) -> list[dict]:
    from fastloss.kernels import softmax as softmax_kernels

    results: list[dict] = []
    ops_softmax._kernels = lambda: (_fake(softmax_kernels, results), TL_DTYPES)
    x = torch.empty(n_rows, n_cols, dtype=dtype, device="meta")
    t = torch.empty(n_rows, dtype=torch.int64, device="meta")
    ops_softmax._fwd(x, t, None, None, kind, -100, 0.0, 0.0, 0.0, 0.25, 2.0, "mean", False, False,
                     True, False)
    return results


def embedding_case(n_rows: int, n_cols: int, dtype: torch.dtype, loss: str) -> list[dict]:
    from fastloss.kernels import embedding

    results: list[dict] = []
    ops_embedding._kernels = lambda: (_fake(embedding, results), TL_DTYPES)
    x, y = (torch.empty(n_rows, n_cols, dtype=dtype, device="meta") for _ in range(2))
    z = torch.empty(n_rows, dtype=dtype, device="meta") if loss == "contrastive" else y.clone()
    ops_embedding._fwd(x, y, z, loss, 1.0, 2.0, 1e-6, False, "mean", True, True, False)
    return results


def embedding_rescale_case(n_rows: int, n_cols: int, dtype: torch.dtype, loss: str) -> list[dict]:
    """The backward of a reduced 16-bit loss (SCALE: the forward's gradients rescaled in place)."""
    from fastloss.kernels import embedding

    results: list[dict] = []
    ops_embedding._kernels = lambda: (_fake(embedding, results), TL_DTYPES)
    x, y = (torch.empty(n_rows, n_cols, dtype=dtype, device="meta") for _ in range(2))
    z = torch.empty(n_rows, dtype=dtype, device="meta") if loss == "contrastive" else y.clone()
    grads = [torch.empty_like(t) for t in (x, y, z)]
    go = torch.empty((), dtype=dtype, device="meta")
    ops_embedding._rescale(loss, x, y, z, go, *grads, 1.0, 2.0, 1e-6, False, n_rows)
    return results


def pointwise_case(n: int, dtype: torch.dtype, loss: str) -> list[dict]:
    from fastloss.kernels import pointwise

    results: list[dict] = []
    _, terms, _ = ops_pointwise._kernels()
    ops_pointwise._kernels = lambda: (_fake(pointwise, results), terms, TL_DTYPES)
    x, y = (torch.empty(n, dtype=dtype, device="meta") for _ in range(2))
    ops_pointwise._fwd(x, y, None, None, loss, [1.0, 0.25, 2.0], "mean", True, False)
    return results


CASES = {
    # every pointwise loss of fastloss.specs (Triton's interpreter, which runs the tests, never
    # compiles a loss's terms: this does)
    **{f"{s.kind} 2**20": lambda dt, kind=s.kind: pointwise_case(2**20, dt, kind)
       for s in specs.by_family("pointwise")},
    "mse 2**20+1": lambda dt: pointwise_case(2**20 + 1, dt, "mse"),
    "focal 4096x1000": lambda dt: softmax_case(4096, 1000, dt, "focal"),
    "cross_entropy 4096x1000": lambda dt: softmax_case(4096, 1000, dt, "cross_entropy"),
    "cross_entropy 64x32000": lambda dt: softmax_case(64, 32000, dt, "cross_entropy"),
    "cross_entropy 64x128256": lambda dt: softmax_case(64, 128256, dt, "cross_entropy"),
    "cross_entropy 64x50257": lambda dt: softmax_case(64, 50257, dt, "cross_entropy"),
    "contrastive 4096x300": lambda dt: embedding_case(4096, 300, dt, "contrastive"),
    "triplet 4096x300": lambda dt: embedding_case(4096, 300, dt, "triplet"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: Launches that exist for 16-bit operands only, compiled in those dtypes
HALF_CASES = {
    "contrastive rescale 4096x300": lambda dt: embedding_rescale_case(4096, 300, dt, "contrastive"),
    "triplet rescale 4096x300": lambda dt: embedding_rescale_case(4096, 300, dt, "triplet"),
}
HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # triton 3.9's note about TRITON_DEFAULT_FP_FUSION
    # every case in both dtypes: {"<case> <dtype>": [{"kernel", "loads", "stores"}, ...]}
    out = {f"{case} {name}": run(dtype) for case, run in CASES.items() for name, dtype in DTYPES.items()}
    out |= {f"{case} {name}": run(dtype) for case, run in HALF_CASES.items()
            for name, dtype in HALF_DTYPES.items()}
    json.dump(out, sys.stdout)
