"""The fused CPU paths of contrastive_loss and info_nce (fastloss.ops.cpu, issue 11 item 2), the
lean triplet_margin_loss (torch's op) and the accuracy of CombinedLoss's fused sums.

On CPU in eager mode these losses run one autograd.Function that makes the gradient in the forward.
Each test checks the fused path ran (the autograd node's class) and compares its values and every
gradient with the PyTorch reference (fastloss.reference, the oracle) in float32 and float64 and
with the naive torch composition in float64; the cases the fused path does not take (errors, other
shapes, transforms, compile, autocast, double backward) must keep the reference's results.
"""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import TOLERANCES, assert_close, assert_no_less_accurate, dtype_id

import fastloss
import fastloss.functional as FL
from fastloss import reference
from fastloss.ops import cpu

F64 = torch.float64
DTYPES = [torch.float32, torch.float64]
SHAPES = [(1, 1), (7, 3), (33, 65)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=F64, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=F64) * scale).to(dtype).requires_grad_()


def _node(loss: torch.Tensor) -> str:
    return type(loss.grad_fn).__name__


def _grads(loss, inputs, grad_output):
    wanted = [t for t in inputs if t.requires_grad]
    return torch.autograd.grad(loss, wanted, grad_output)


def _assert_within_torch_error(actual, torch_result, exact, msg, factor=2.0):
    """fastloss's largest error against ``exact`` (float64 on the same rounded operands) is at most
    ``factor`` times torch's (the reference's in the same dtype), plus half an ulp of the largest
    exact value (the result's own rounding); no atol, which would hide errors in small values."""
    exact = exact.double()
    err = (actual.double() - exact).abs().max().item()
    err_torch = (torch_result.double() - exact).abs().max().item()
    half_ulp = 0.5 * torch.finfo(actual.dtype).eps * exact.abs().max().item()
    assert err <= factor * err_torch + half_ulp, (
        f"{msg}: fastloss error {err:.3g} > {factor:g} x torch's {err_torch:.3g} + {half_ulp:.3g}")


# --------------------------------------------------------------------------------------------
# Contrastive loss
# --------------------------------------------------------------------------------------------

def _seed_contrastive(x1, x2, y, margin, reduction):
    """The seed guide's composition (F.pairwise_distance), any reduction."""
    d = F.pairwise_distance(x1, x2)
    loss = (1 - y) * torch.pow(d, 2) + y * torch.pow(torch.clamp(margin - d, min=0.0), 2)
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def _pairs(shape, dtype, soft, seed=0):
    x1 = _randn(*shape, dtype=dtype, seed=seed)
    x2 = _randn(*shape, dtype=dtype, seed=seed + 1)
    if soft:
        y = torch.rand(shape[0], generator=_gen(seed + 2), dtype=F64).to(dtype).requires_grad_()
    else:
        y = torch.randint(0, 2, (shape[0],), generator=_gen(seed + 2)).to(dtype)
    return x1, x2, y


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("margin", [2.0, 0.5, -1.0])
@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_contrastive_matches_reference(shape, soft, margin, reduction, dtype, torch_backend):
    x1, x2, y = _pairs(shape, dtype, soft)
    actual = FL.contrastive_loss(x1, x2, y, margin, reduction)
    assert _node(actual) == "_ContrastiveBackward"
    grad_output = torch.rand(actual.shape, generator=_gen(9), dtype=F64).to(dtype) + 0.5  # != 1
    g_actual = _grads(actual, (x1, x2, y), grad_output)
    expected = reference.contrastive_loss(x1, x2, y, margin, reduction)
    g_expected = _grads(expected, (x1, x2, y), grad_output)
    assert_close(actual, expected, msg="loss")
    for name, a, e in zip(("output1", "output2", "label"), g_actual, g_expected):
        assert_close(a, e, msg=f"grad {name}")
    # and the seed composition in float64
    ops64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (x1, x2, y)]
    seed = _seed_contrastive(*ops64, margin, reduction)
    g_seed = _grads(seed, ops64, grad_output.double())
    assert_close(actual.double(), seed, dtype, "loss vs seed composition")
    for name, a, e in zip(("output1", "output2", "label"), g_actual, g_seed):
        assert_close(a.double(), e, dtype, f"grad {name} vs seed composition")


def test_fused_contrastive_zero_distance_and_one_operand_needing_grad(torch_backend):
    """A pair at distance exactly 0 (x1 - x2 = -1e-6) has gradient 0 as torch's norm gives; only the
    operands that require grad receive one."""
    x1 = torch.zeros(3, 4, dtype=F64)
    x2 = torch.full((3, 4), 1e-6, dtype=F64)
    x2[1] = torch.randn(4, generator=_gen(0), dtype=F64)
    x2.requires_grad_()
    y = torch.tensor([1.0, 1.0, 0.0], dtype=F64)
    for reduction in ("mean", "none"):
        actual = FL.contrastive_loss(x1, x2, y, 2.0, reduction)
        assert _node(actual) == "_ContrastiveBackward"
        expected = reference.contrastive_loss(x1, x2, y, 2.0, reduction)
        assert_close(actual, expected)
        (g,) = torch.autograd.grad(actual.sum(), x2)
        (g_ref,) = torch.autograd.grad(expected.sum(), x2)
        assert_close(g, g_ref)
        assert torch.all(g[0] == 0) and torch.all(g[2] == 0)


def test_fused_contrastive_second_backward_and_no_grad(torch_backend):
    x1, x2, y = _pairs((5, 4), F64, soft=True)
    for reduction in ("mean", "none"):
        loss = FL.contrastive_loss(x1, x2, y, 1.5, reduction)
        go = torch.ones_like(loss)
        g1 = torch.autograd.grad(loss, (x1, x2, y), go, retain_graph=True)
        g2 = torch.autograd.grad(loss, (x1, x2, y), 3 * go)
        g_ref = torch.autograd.grad(reference.contrastive_loss(x1, x2, y, 1.5, reduction), (x1, x2, y), go)
        for a, b, e in zip(g1, g2, g_ref):
            assert_close(a, e)
            assert_close(b, 3 * e)
    with torch.no_grad():
        assert_close(FL.contrastive_loss(x1, x2, y), reference.contrastive_loss(x1, x2, y).detach())


def test_fused_contrastive_autograd_features(torch_backend):
    """Double backward (gradgradcheck), torch.func, forward-mode AD, torch.compile and autocast
    give the reference's results."""
    x1, x2, y = _pairs((4, 3), F64, soft=True)

    def loss(a, b, lab):
        return FL.contrastive_loss(a, b, lab, 2.5, "sum")

    def ref(a, b, lab):
        return reference.contrastive_loss(a, b, lab, 2.5, "sum")

    assert _node(loss(x1, x2, y)) == "_ContrastiveBackward"
    assert torch.autograd.gradcheck(loss, (x1, x2, y))
    assert torch.autograd.gradgradcheck(loss, (x1, x2, y))
    ops = [t.detach() for t in (x1, x2, y)]
    assert_close(torch.func.hessian(loss)(*ops), torch.func.hessian(ref)(*ops))
    per_pair = torch.func.vmap(torch.func.grad(lambda a, b, lab: loss(a[None], b[None], lab[None])))(*ops)
    expected = torch.func.vmap(torch.func.grad(lambda a, b, lab: ref(a[None], b[None], lab[None])))(*ops)
    assert_close(per_pair, expected)
    tangent = torch.randn(4, 3, generator=_gen(4), dtype=F64)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(loss(fwAD.make_dual(ops[0], tangent), ops[1], ops[2])).tangent
    (g,) = torch.autograd.grad(ref(x1, x2, y), x1)
    assert_close(out, (g * tangent).sum())
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, lab: FL.contrastive_loss(a, b, lab), backend="eager", fullgraph=True)
    assert_close(compiled(x1, x2, y), reference.contrastive_loss(x1, x2, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = FL.contrastive_loss(x1, x2, y)
    assert _node(under_autocast) != "_ContrastiveBackward"
    assert_close(under_autocast, reference.contrastive_loss(x1, x2, y))


def test_contrastive_other_cases_keep_the_full_path(torch_backend):
    """Errors, a (B, 1) label (with its warning), unbatched pairs, integer labels and mixed dtypes
    behave as before: the full path's messages and the reference's values."""
    x1, x2, y = _pairs((6, 5), torch.float32, soft=False)
    with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
        FL.contrastive_loss(x1, x2, y, reduction="bogus")
    with pytest.raises(ValueError, match="must have the same shape"):
        FL.contrastive_loss(x1, x2[:, :4], y)
    with pytest.raises(ValueError, match="label must have shape"):
        FL.contrastive_loss(x1, x2, y[:5])
    with pytest.raises(TypeError, match="argument 'label' must be a Tensor"):
        FL.contrastive_loss(x1, x2, [0.0] * 6)
    with pytest.raises(TypeError, match="expected floating-point embeddings"):
        FL.contrastive_loss(x1.long(), x2.long(), y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        column = FL.contrastive_loss(x1, x2, y[:, None])
    assert_close(column, reference.contrastive_loss(x1, x2, y))
    for args in ((x1, x2, y.long()), (x1, x2.double(), y), (x1[0], x2[0], y[:1].reshape(()))):
        out = FL.contrastive_loss(*args)
        assert _node(out) != "_ContrastiveBackward"
        dtype = torch.promote_types(args[0].dtype, args[1].dtype)
        expected = reference.contrastive_loss(args[0].to(dtype), args[1].to(dtype), args[2].to(dtype))
        assert_close(out, expected)


# --------------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------------

def _naive_info_nce(q, k, temperature, reduction, symmetric, normalize):
    """Per direction (query -> key, and key -> query for symmetric) F.cross_entropy of the full
    B x B scores against arange(B), rows F.normalize'd first; the directions averaged row by row."""
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    directions = [(q, k), (k, q)] if symmetric else [(q, k)]
    rows = [F.cross_entropy(a @ b.T / temperature, torch.arange(a.shape[0]), reduction="none")
            for a, b in directions]
    loss = sum(rows) / len(rows)
    return loss.mean() if reduction == "mean" else loss.sum()


def _assert_grad_close(actual, expected, dtype, msg):
    """Gradients of the B x B scores' softmax sum B terms of size up to 1 / temperature, each
    rounded (the order differs from autograd's): the tolerance of ``dtype`` plus 32 epsilon at the
    largest magnitude. (Measured in float32 at 33 x 65: about 10 epsilon for both the fused path and
    the reference, against the float64 composition.)"""
    tol = TOLERANCES[dtype]
    atol = tol["atol"] + 32 * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=tol["rtol"], atol=atol,
                               msg=lambda m: f"{msg}\n{m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize("symmetric", [False, True], ids=["one-way", "symmetric"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_info_nce_matches_reference(shape, normalize, symmetric, temperature, reduction, dtype,
                                          torch_backend):
    scale = 1.0 if normalize else 0.3
    q = _randn(*shape, dtype=dtype, seed=0, scale=scale)
    k = _randn(*shape, dtype=dtype, seed=1, scale=scale)
    actual = FL.info_nce(q, k, temperature, reduction, symmetric, normalize)
    assert _node(actual) == "_InfoNCEBackward"
    grad_output = torch.tensor(1.7, dtype=dtype)
    g_actual = torch.autograd.grad(actual, (q, k), grad_output)
    expected = reference.info_nce(q, k, temperature, reduction, symmetric, normalize)
    g_expected = torch.autograd.grad(expected, (q, k), grad_output)
    assert_close(actual, expected, msg="loss")
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    naive = _naive_info_nce(q64, k64, temperature, reduction, symmetric, normalize)
    g_naive = torch.autograd.grad(naive, (q64, k64), grad_output.double())
    assert_close(actual.double(), naive, dtype, "loss vs naive")
    for name, a, e, n in zip(("query", "key"), g_actual, g_expected, g_naive):
        _assert_grad_close(a, e, dtype, f"grad {name}")
        _assert_grad_close(a, n, dtype, f"grad {name} vs naive")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fused_info_nce_in_chunks(dtype, torch_backend, monkeypatch):
    """Rows scored in several chunks (the last one short) give the reference's loss and gradients;
    symmetric losses too large for one chunk take the reference."""
    monkeypatch.setattr(reference, "INFO_NCE_CHUNK_ELEMENTS", 100)  # 33 keys: chunks of 3 rows
    q, k = _randn(33, 8, dtype=dtype, seed=0), _randn(33, 8, dtype=dtype, seed=1)
    actual = FL.info_nce(q, k, 0.1)
    assert _node(actual) == "_InfoNCEBackward"
    expected = reference.info_nce(q, k, 0.1)
    assert_close(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, (q, k)), torch.autograd.grad(expected, (q, k))):
        assert_close(a, e)
    symmetric = FL.info_nce(q, k, 0.1, symmetric=True)
    assert _node(symmetric) != "_InfoNCEBackward"
    assert_close(symmetric, reference.info_nce(q, k, 0.1, symmetric=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_fused_info_nce_cache_chunks(normalize, reduction, dtype, torch_backend, monkeypatch):
    """The fused path's own chunks (_NCE_CHUNK_ELEMENTS, below the reference's bound; forced to
    2 rows here, the last one short), a zero row and a key stored transposed give the float64
    composition's loss and gradients (grad_output != 1), the gradients in the operands' layout."""
    monkeypatch.setattr(cpu, "_NCE_CHUNK_ELEMENTS", 2 * 67)
    scale = 1.0 if normalize else 0.3
    q = _randn(67, 5, dtype=dtype, seed=0, scale=scale)
    k = _randn(5, 67, dtype=dtype, seed=1, scale=scale).detach().T.requires_grad_()
    with torch.no_grad():
        q[3] = 0.0
    actual = FL.info_nce(q, k, 0.2, reduction, normalize=normalize)
    assert _node(actual) == "_InfoNCEBackward"
    grad_output = torch.tensor(0.6, dtype=dtype)
    g_actual = torch.autograd.grad(actual, (q, k), grad_output)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    naive = _naive_info_nce(q64, k64, 0.2, reduction, False, normalize)
    g_naive = torch.autograd.grad(naive, (q64, k64), grad_output.double())
    assert_close(actual.double(), naive, dtype, "loss vs naive")
    for name, a, e in zip(("query", "key"), g_actual, g_naive):
        _assert_grad_close(a, e, dtype, f"grad {name} vs naive")
    q.grad = k.grad = None
    FL.info_nce(q, k, 0.2, reduction, normalize=normalize).backward()
    assert q.grad.stride() == q.stride()


def test_fused_info_nce_symmetric_keeps_the_reference_accuracy(torch_backend):
    """torch.softmax's sum of the exponentials drops those below half an ulp of its running sum:
    along the columns (dim 0) of 1024 float32 scores its probabilities came out 9 eps too large on
    average, the symmetric loss's error 25-40x the reference's and the gradients' 2.3-3.6x. The
    fused path divides each column (row) by its probabilities' pairwise sum: loss and gradients
    within twice the reference's error in float32, against float64 (reduction "sum")."""
    g = _gen(0)
    q = torch.randn(1024, 32, generator=g, dtype=F64)
    k = (q + 0.5 * torch.randn(1024, 32, generator=g, dtype=F64)).float().requires_grad_()
    q = q.float().requires_grad_()
    actual = FL.info_nce(q, k, 0.05, "sum", symmetric=True)
    assert _node(actual) == "_InfoNCEBackward"
    expected = reference.info_nce(q, k, 0.05, "sum", symmetric=True)
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    exact = reference.info_nce(q64, k64, 0.05, "sum", symmetric=True)
    for name, a, e, x in zip(("loss", "grad query", "grad key"),
                             (actual, *torch.autograd.grad(actual, (q, k))),
                             (expected, *torch.autograd.grad(expected, (q, k))),
                             (exact, *torch.autograd.grad(exact, (q64, k64)))):
        _assert_within_torch_error(a, e, x, name)


def test_fused_info_nce_chunks_sum_the_loss_once(torch_backend, monkeypatch):
    """The rows' log-probabilities are summed once, pairwise, as the reference's: adding the
    chunks' sums one by one made the float32 loss's error 3-5x the reference's at B = 8192 (256
    chunks), 8.5x here (1024 chunks of 2 rows, forced)."""
    monkeypatch.setattr(cpu, "_NCE_CHUNK_ELEMENTS", 2 * 2048)
    g = _gen(0)
    q = torch.randn(2048, 8, generator=g, dtype=F64)
    k = (q + 0.5 * torch.randn(2048, 8, generator=g, dtype=F64)).float()
    q = q.float().requires_grad_()
    actual = FL.info_nce(q, k, 0.07, "sum")
    assert _node(actual) == "_InfoNCEBackward"
    expected = reference.info_nce(q, k, 0.07, "sum")
    exact = reference.info_nce(q.detach().double(), k.double(), 0.07, "sum")
    _assert_within_torch_error(actual, expected, exact, "loss")


def test_fused_info_nce_zero_rows_and_underflow(torch_backend):
    """A zero row (norm below F.normalize's eps) and diagonal probabilities that underflow (a tiny
    temperature) give the reference's loss and gradients."""
    q, k = _randn(5, 4, seed=0), _randn(5, 4, seed=1)
    with torch.no_grad():
        q[2] = 0.0
        k[4] = 1e-14
    for temperature, symmetric in ((0.07, False), (0.07, True), (1e-3, False), (1e-3, True)):
        actual = FL.info_nce(q, k, temperature, symmetric=symmetric)
        assert _node(actual) == "_InfoNCEBackward"
        expected = reference.info_nce(q, k, temperature, symmetric=symmetric)
        assert torch.isfinite(expected)
        assert_close(actual, expected, msg=f"{temperature}, {symmetric}")
        for a, e in zip(torch.autograd.grad(actual, (q, k)), torch.autograd.grad(expected, (q, k))):
            assert_close(a, e, msg=f"{temperature}, {symmetric}")
    raw = _randn(6, 3, seed=2, scale=30.0)
    actual = FL.info_nce(raw, raw.detach().flip(0), 1e-3, normalize=False)  # p_ii = exp(-1e5): log from lse
    expected = reference.info_nce(raw, raw.detach().flip(0), 1e-3, normalize=False)
    assert torch.isfinite(actual)
    assert_close(actual, expected)
    assert_close(torch.autograd.grad(actual, raw)[0], torch.autograd.grad(expected, raw)[0])


def test_fused_info_nce_second_backward_and_no_grad(torch_backend):
    q, k = _randn(6, 5, seed=0), _randn(6, 5, seed=1)
    loss = FL.info_nce(q, k, 0.2, symmetric=True)
    g1 = torch.autograd.grad(loss, (q, k), retain_graph=True)
    g2 = torch.autograd.grad(loss, (q, k), torch.tensor(-2.0, dtype=F64))
    g_ref = torch.autograd.grad(reference.info_nce(q, k, 0.2, symmetric=True), (q, k))
    for a, b, e in zip(g1, g2, g_ref):
        assert_close(a, e)
        assert_close(b, -2 * e)
    (g_query_only,) = torch.autograd.grad(FL.info_nce(q, k.detach(), 0.2), q)
    assert_close(g_query_only, torch.autograd.grad(reference.info_nce(q, k.detach(), 0.2), q)[0])
    with torch.no_grad():
        assert_close(FL.info_nce(q, k), reference.info_nce(q, k).detach())


def test_fused_info_nce_autograd_features(torch_backend):
    """Double backward (gradgradcheck), torch.func, forward-mode AD, torch.compile and autocast
    give the reference's results."""
    q, k = _randn(4, 3, seed=0), _randn(4, 3, seed=1)

    def loss(a, b):
        return FL.info_nce(a, b, 0.5, "sum", True)

    def ref(a, b):
        return reference.info_nce(a, b, 0.5, "sum", True)

    assert _node(loss(q, k)) == "_InfoNCEBackward"
    assert torch.autograd.gradcheck(loss, (q, k))
    assert torch.autograd.gradgradcheck(loss, (q, k))
    assert_close(torch.func.hessian(loss)(q.detach(), k.detach()), torch.func.hessian(ref)(q.detach(), k.detach()))
    assert_close(torch.func.grad(loss)(q.detach(), k.detach()), torch.func.grad(ref)(q.detach(), k.detach()))
    tangent = torch.randn(4, 3, generator=_gen(4), dtype=F64)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(loss(fwAD.make_dual(q.detach(), tangent), k.detach())).tangent
    (g,) = torch.autograd.grad(ref(q, k), q)
    assert_close(out, (g * tangent).sum())
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: FL.info_nce(a, b, 0.5), backend="eager", fullgraph=True)
    assert_close(compiled(q, k), reference.info_nce(q, k, 0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = FL.info_nce(q, k, 0.5)
    assert _node(under_autocast) != "_InfoNCEBackward"
    assert_close(under_autocast, reference.info_nce(q, k, 0.5))


def test_info_nce_other_cases_keep_the_full_path(torch_backend):
    """reduction "none", a tensor temperature, mixed dtypes and every error behave as before."""
    q, k = _randn(5, 4, seed=0), _randn(5, 4, seed=1)
    none = FL.info_nce(q, k, 0.1, "none", symmetric=True)
    assert _node(none) != "_InfoNCEBackward"
    assert_close(none, reference.info_nce(q, k, 0.1, "none", symmetric=True))
    t = torch.tensor(0.3, dtype=F64, requires_grad=True)
    learnable = FL.info_nce(q, k, t)
    assert _node(learnable) != "_InfoNCEBackward"
    assert_close(torch.autograd.grad(learnable, t)[0], torch.autograd.grad(reference.info_nce(q, k, t), t)[0])
    mixed = FL.info_nce(q.float(), k, 0.1)
    assert_close(mixed, reference.info_nce(q.float().double(), k, 0.1))
    with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
        FL.info_nce(q, k, reduction="bogus")
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        FL.info_nce(q, k, 0.0)
    with pytest.raises(ValueError, match="temperature must be positive and finite"):
        FL.info_nce(q, k, float("nan"))
    with pytest.raises(ValueError, match="same batch size"):
        FL.info_nce(q, k[:4])
    with pytest.raises(ValueError, match="same feature size"):
        FL.info_nce(q, k[:, :3])
    with pytest.raises(ValueError, match="must be 2-D"):
        FL.info_nce(q[0], k[0])
    with pytest.raises(TypeError, match="expected floating-point embeddings"):
        FL.info_nce(q.long(), k.long())


# --------------------------------------------------------------------------------------------
# Triplet margin loss: the common case is torch's own op
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("p,swap", [(2.0, False), (1, True), (3.5, False), (float("inf"), True)])
@pytest.mark.parametrize("shape", [(5,), (7, 3), (2, 3, 4)], ids=lambda s: "x".join(map(str, s)))
def test_triplet_common_case_is_torch_op(shape, p, swap, reduction, dtype, torch_backend, monkeypatch):
    """Plain CPU operands of one shape and dtype go straight to torch.triplet_margin_loss: exactly
    torch.nn's values and gradients, without the reference."""
    monkeypatch.setattr(reference, "triplet_margin_loss", lambda *a, **k: pytest.fail("reference ran"))
    ops = [_randn(*shape, dtype=dtype, seed=i) for i in range(3)]
    actual = FL.triplet_margin_loss(*ops, margin=0.7, p=p, eps=1e-5, swap=swap, reduction=reduction)
    expected = F.triplet_margin_loss(*ops, margin=0.7, p=p, eps=1e-5, swap=swap, reduction=reduction)
    go = torch.rand(actual.shape, generator=_gen(5), dtype=F64).to(dtype)
    assert torch.equal(actual, expected)
    for a, e in zip(torch.autograd.grad(actual, ops, go), torch.autograd.grad(expected, ops, go)):
        assert torch.equal(a, e)


def test_triplet_lean_path_autograd_features(torch_backend):
    """torch.func transforms take the full path (torch's op has no batching rule and would warn);
    torch.compile, autocast and double backward give torch.nn's results."""
    a, pos, neg = (_randn(4, 3, seed=i) for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "performance drop" warning from vmap's fallback
        per_sample = torch.func.vmap(torch.func.grad(
            lambda x, y, z: FL.triplet_margin_loss(x[None], y[None], z[None], margin=2.0)))(
            a.detach(), pos.detach(), neg.detach())
    for i in range(4):
        (expected,) = torch.autograd.grad(F.triplet_margin_loss(a[i:i + 1], pos[i:i + 1], neg[i:i + 1], margin=2.0), a)
        assert_close(per_sample[i], expected[i])
    assert torch.autograd.gradgradcheck(lambda x: FL.triplet_margin_loss(x, pos, neg, margin=2.0), (a,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y, z: FL.triplet_margin_loss(x, y, z, swap=True), backend="eager",
                             fullgraph=True)
    assert_close(compiled(a, pos, neg), F.triplet_margin_loss(a, pos, neg, swap=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_close(FL.triplet_margin_loss(a.float(), pos.float(), neg.float()),
                     F.triplet_margin_loss(a.float(), pos.float(), neg.float()))


def test_triplet_other_cases_keep_the_full_path(torch_backend):
    """Legacy arguments, broadcasting, mixed and integer dtypes and the errors behave as before."""
    a, pos, neg = (_randn(4, 3, seed=i) for i in range(3))
    with pytest.raises(ValueError, match="margin must be greater than 0"):
        FL.triplet_margin_loss(a, pos, neg, margin=0.0)
    with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
        FL.triplet_margin_loss(a, pos, neg, reduction="bogus")
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        FL.triplet_margin_loss(a, pos, neg[0])
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        legacy = FL.triplet_margin_loss(a, pos, neg, reduce=False)
    assert_close(legacy, reference.triplet_margin_loss(a, pos, neg, reduction="none"))
    for args in ((a, pos, neg[:1]), (a, pos.float(), neg), (a.long(), pos.long(), neg.long())):
        expected = F.triplet_margin_loss(*args)
        assert_close(FL.triplet_margin_loss(*args), expected)


# --------------------------------------------------------------------------------------------
# Softmax focal loss: the short-row form (few classes) and the softmax form
# --------------------------------------------------------------------------------------------

def _focal_logits(n, c, dtype, seed=0):
    """Scale-3 logits, every fourth row confident (its target 25 above the rest: p_t rounds to 1 in
    float32, q about 1e-11) and every fifth row hopeless (its target 200 below: p_t underflows in
    float32), one logit -inf, with their targets."""
    x = torch.randn(n, c, generator=_gen(seed), dtype=F64) * 3.0
    t = torch.randint(0, c, (n,), generator=_gen(seed + 1))
    rows = torch.arange(n)
    x[rows[::4], t[::4]] += 25.0
    x[rows[1::5], t[1::5]] -= 200.0
    if c > 1:
        x[2, (t[2] + 1) % c] = -math.inf  # a class that cannot be: probability 0, gradient 0
    return x.to(dtype).requires_grad_(), t


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("classes", [1, 2, 5, 17])
@pytest.mark.parametrize("form", ["short", "softmax"])
def test_fused_focal_forms_match_reference(form, classes, gamma, reduction, dtype, torch_backend, monkeypatch):
    """Both forms of the fused softmax focal loss (forced with _SHORT_ROW), on odd shapes with
    confident and underflowing rows, give the float64 reference's loss and gradient (grad_output
    != 1) within the dtype's tolerance, and are no less accurate than the reference in the dtype."""
    monkeypatch.setattr(cpu, "_SHORT_ROW", {d: (1 << 30) if form == "short" else 0 for d in DTYPES})
    monkeypatch.setattr(cpu, "_SHORT_ROW_MIN_ROWS", 1)
    x, t = _focal_logits(37, classes, dtype)
    actual = FL.focal_loss(x, t, 0.25, gamma, reduction)
    assert _node(actual) == "_SoftmaxFocalBackward"
    grad_output = torch.tensor(1.7, dtype=dtype)
    (g_actual,) = torch.autograd.grad(actual, x, grad_output)
    x64 = x.detach().double().requires_grad_()
    exact = reference.focal_loss(x64, t, 0.25, gamma, reduction)
    (g_exact,) = torch.autograd.grad(exact, x64, grad_output.double())
    assert_close(actual.double(), exact, dtype, "loss")
    assert_close(g_actual.double(), g_exact, dtype, "grad")
    expected = reference.focal_loss(x, t, 0.25, gamma, reduction)
    (g_expected,) = torch.autograd.grad(expected, x, grad_output)
    assert_no_less_accurate(actual, expected.detach(), exact, "loss")
    assert_no_less_accurate(g_actual, g_expected, g_exact, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("classes", [2, 8])
def test_fused_focal_short_rows_keep_small_target_probabilities(classes, dtype, torch_backend):
    """Wide logits (scale 10) put many targets at probabilities far below eps: the short-row form
    takes p_t as exp(log p_t), not 1 + expm1(log p_t) (rounded to a multiple of eps / 2, which made
    the gradient's largest error 6x the reference's in float32). Its largest gradient error against
    float64 stays within twice the reference's in the dtype, plus four roundings (reduction "sum":
    gradients of order 1, above the tolerance table's atol)."""
    rows = max(cpu._SHORT_ROW_MIN_ROWS, 2048)
    x = _randn(rows, classes, dtype=dtype, seed=3, scale=10.0)
    t = torch.randint(0, classes, (rows,), generator=_gen(4))
    actual = FL.focal_loss(x, t, 0.25, 2.0, "sum")
    assert _node(actual) == "_SoftmaxFocalBackward"
    (g_actual,) = torch.autograd.grad(actual, x)
    (g_torch,) = torch.autograd.grad(reference.focal_loss(x, t, 0.25, 2.0, "sum"), x)
    x64 = x.detach().double().requires_grad_()
    (g_exact,) = torch.autograd.grad(reference.focal_loss(x64, t, 0.25, 2.0, "sum"), x64)
    err = (g_actual.double() - g_exact).abs().max().item()
    err_torch = (g_torch.double() - g_exact).abs().max().item()
    # (plus four roundings at the largest gradient: in float64 the reference is the exact value, and
    # the short-row form's log-sum-exp, expm1 and products leave about 3 ulp there)
    assert err <= 2.0 * err_torch + 4.0 * torch.finfo(dtype).eps * g_exact.abs().max().item(), (err, err_torch)


def test_fused_focal_one_hopeless_row_leaves_the_others_exact(torch_backend):
    """Logits near 70 (targets 1.5 above the rest: p_t in [0.3, 0.9]) and one hopeless row (p_t
    below 2**-100): only that row takes log p_t as x_t - logsumexp(x), whose error is |x| eps; the
    softmax form used it for every row once one was tiny, and the gradient's error was 6x the
    reference's. Loss and gradient within twice the reference's error in float32 (no atol)."""
    rows, classes = 64, 20
    x = 70.0 + 0.5 * torch.randn(rows, classes, generator=_gen(5), dtype=F64)
    t = torch.randint(0, classes, (rows,), generator=_gen(6))
    x[torch.arange(rows), t] += 1.5
    x[7, t[7]] = -100.0
    x = x.float().requires_grad_()
    actual = FL.focal_loss(x, t, 0.25, 2.0, "sum")
    assert _node(actual) == "_SoftmaxFocalBackward"
    expected = reference.focal_loss(x, t, 0.25, 2.0, "sum")
    x64 = x.detach().double().requires_grad_()
    exact = reference.focal_loss(x64, t, 0.25, 2.0, "sum")
    _assert_within_torch_error(actual, expected, exact, "loss")
    _assert_within_torch_error(torch.autograd.grad(actual, x)[0], torch.autograd.grad(expected, x)[0],
                               torch.autograd.grad(exact, x64)[0], "grad")


def test_fused_focal_short_rows_by_default(torch_backend, monkeypatch):
    """Few classes on enough rows take the short-row form by default (no torch.softmax call); many
    classes, or few rows, the softmax form."""
    calls = []
    real = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    for dtype in DTYPES:
        for rows in (cpu._SHORT_ROW_MIN_ROWS - 1, cpu._SHORT_ROW_MIN_ROWS):
            for classes in (2, cpu._SHORT_ROW[dtype] - 1, cpu._SHORT_ROW[dtype]):
                x, t = _focal_logits(rows, classes, dtype)
                calls.clear()
                loss = FL.focal_loss(x, t)
                assert _node(loss) == "_SoftmaxFocalBackward"
                short = classes < cpu._SHORT_ROW[dtype] and rows >= cpu._SHORT_ROW_MIN_ROWS
                assert bool(calls) != short, (dtype, rows, classes)
                assert_close(loss, reference.focal_loss(x, t))


# --------------------------------------------------------------------------------------------
# CombinedLoss: the fused sums stay as accurate as torch's at large sizes
# --------------------------------------------------------------------------------------------

def test_combined_fused_sums_are_accurate_at_large_sizes(torch_backend):
    """A float32 dot of 4M elements accumulates 1e-5 of relative error: the fused combination sums
    in chunks, no less accurate than torch.nn's own two calls, against float64."""
    n = (1 << 22) + 5
    x = torch.randn(n, generator=_gen(0))
    y = torch.randn(n, generator=_gen(1))
    members = [
        ({fastloss.MSELoss(): 0.7, fastloss.L1Loss(): 0.3}, lambda a, b: 0.7 * F.mse_loss(a, b) + 0.3 * F.l1_loss(a, b)),
        ({fastloss.HuberLoss(delta=0.5): 0.5, fastloss.SmoothL1Loss(): 0.5},
         lambda a, b: 0.5 * F.huber_loss(a, b, delta=0.5) + 0.5 * F.smooth_l1_loss(a, b)),
    ]
    for losses, composition in members:
        xg = x.clone().requires_grad_()
        actual = fastloss.CombinedLoss(losses)(xg, y)
        assert type(actual.grad_fn).__name__ == "_CombinationBackward"
        assert_no_less_accurate(actual, composition(x, y), composition(x.double(), y.double()))


def _huber_elements(d, delta):
    c = d.clamp(-delta, delta)
    return c * (d - 0.5 * c)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_combined_fused_sums_keep_torch_accuracy(dtype, torch_backend):
    """Each member's sum is torch.sum's pairwise sum, as torch.nn's: the BLAS dots it replaced made
    the loss's error 3-4x torch.nn's in float32 and 8-10x in float64 at 2**16 elements (means over
    draws). Against the exact sum of the per-element losses of d = input - target as both round it
    (math.fsum of their float64 values: exact for float32 operands; for float64 ones the rounded
    values both sides sum), fastloss's error over four draws stays within twice torch.nn's
    (reduction "sum", two chunks and a tail)."""
    n = (1 << 17) + 5
    members = [
        ({fastloss.MSELoss(reduction="sum"): 0.7, fastloss.L1Loss(reduction="sum"): 0.3},
         lambda a, b: 0.7 * F.mse_loss(a, b, reduction="sum") + 0.3 * F.l1_loss(a, b, reduction="sum"),
         lambda d: [(0.7, d * d), (0.3, d.abs())]),
        ({fastloss.HuberLoss(delta=0.5, reduction="sum"): 0.5, fastloss.SmoothL1Loss(reduction="sum"): 0.5},
         lambda a, b: 0.5 * F.huber_loss(a, b, delta=0.5, reduction="sum") + 0.5 * F.smooth_l1_loss(a, b, reduction="sum"),
         lambda d: [(0.5, _huber_elements(d, 0.5)), (0.5, _huber_elements(d, 1.0))]),
    ]
    for losses, composition, elements in members:
        err = err_torch = 0
        for seed in range(4):
            x = _randn(n, dtype=dtype, seed=2 * seed)
            y = _randn(n, dtype=dtype, seed=2 * seed + 1).detach()
            actual = fastloss.CombinedLoss(losses)(x, y)
            assert _node(actual) == "_CombinationBackward"
            d = (x.detach().double() - y.double()).to(dtype).double()
            exact = sum(Fraction(coef) * Fraction(math.fsum(v.tolist())) for coef, v in elements(d))
            err += abs(Fraction(actual.item()) - exact)
            err_torch += abs(Fraction(composition(x, y).item()) - exact)
        assert err <= 2 * err_torch, (float(err), float(err_torch))
