"""The fused kernel's row layouts and bounds checks: q, k, v read in place as column slices of a wider
buffer (GATConv's [feat | el | er] projection) give the values of contiguous copies, gradients written
as column slices of one buffer are the same values, and every pass refuses an out-of-range index."""
from __future__ import annotations

import pytest
import torch
from conftest import random_graph

import gatx
from gatx import ops
from gatx.backends import fused, fused_build
from gatx.nn import _utils

pytestmark = pytest.mark.skipif(fused_build.compiler() is None, reason="no C++ compiler here to build the fused kernel")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    why = fused.availability()
    assert why is None, why


def sliced_inputs(n, H, D, dtype, score, seed=0):
    """q, k, v as column slices [v | k | q] of one (n, H*D + 2 * width) buffer, a leaf."""
    gen = torch.Generator().manual_seed(seed)
    kw = H * D if score == "dot" else H
    buf = torch.randn(n, H * D + 2 * kw, generator=gen, dtype=dtype, requires_grad=True)
    shape = (n, H, D) if score == "dot" else (n, H)
    v = buf[:, : H * D].view(n, H, D)
    k = buf[:, H * D : H * D + kw].view(shape)
    q = buf[:, H * D + kw :].view(shape)
    return buf, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("deterministic", [False, True])  # the single backward pass, or passes 1 + 2
def test_column_slices_match_contiguous_copies(dtype, score, deterministic):
    g = random_graph(40, 40, 300, seed=3)
    H, D = 8, 8
    buf, q, k, v = sliced_inputs(g.num_src, H, D, dtype, score)
    assert v.stride(0) == buf.shape[1] and not v.is_contiguous()
    gout = torch.randn(g.num_dst, H, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    torch.use_deterministic_algorithms(deterministic)
    try:
        out = ops.sparse_attention(g, q, k, v, score=score, backend="fused")
        (grad,) = torch.autograd.grad(out, buf, gout)
        copies = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ref = ops.sparse_attention(g, *copies, score=score, backend="fused")
        ref_grads = torch.autograd.grad(ref, copies, gout)
    finally:
        torch.use_deterministic_algorithms(False)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(out, ref, atol=tol, rtol=0), (out - ref).abs().max()
    kw = H * D if score == "dot" else H
    parts = (grad[:, H * D + kw :], grad[:, H * D : H * D + kw], grad[:, : H * D])  # dq, dk, dv
    for got, want in zip(parts, ref_grads):
        want = want.reshape(got.shape)
        assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()


def test_gatconv_gradients_arrive_stacked_and_match_the_torch_backend(monkeypatch):
    """The fused backward writes [dv | dk | dq] into one buffer; the projection's backward then runs one
    product per gradient (its stacked path), with the values of the torch backend's per-term path."""
    seen = []
    real = _utils.side_by_side
    monkeypatch.setattr(_utils, "side_by_side", lambda *a: seen.append(real(*a)) or seen[-1])
    g = random_graph(50, 50, 400, seed=4, self_loops=True)
    torch.manual_seed(0)
    layer = gatx.GATConv(12, 4, num_heads=3).double()
    x = torch.randn(50, 12, dtype=torch.float64, requires_grad=True)
    grads = {}
    for backend in ("fused", "torch"):
        layer.zero_grad()
        x.grad = None
        out = layer(g, x, backend=backend)
        out.backward(torch.ones_like(out))
        grads[backend] = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    assert seen[0] is not None and seen[1] is None, "the fused backward did not hand over stacked gradients"
    for a, b in zip(grads["fused"], grads["torch"]):
        assert torch.allclose(a, b, atol=1e-12, rtol=0), (a - b).abs().max()


@pytest.mark.parametrize("which", [0, 1, 2, 3])
@pytest.mark.parametrize("corrupt", ["nbr", "negative nbr", "eid", "indptr decreasing", "indptr past the end"])
def test_every_pass_refuses_an_index_out_of_range(which, corrupt):
    """The bounds check runs inside each pass (bad_row / bad_edge): each one returns an error, none reads
    out of bounds (a crash here would take the test process down)."""
    g = random_graph(30, 30, 200, seed=5)
    H, D = 8, 8
    q, k, v = torch.randn(30, H), torch.randn(30, H), torch.randn(30, H, D)
    c = g.csr() if which <= 1 else g.csc()
    indptr, nbr, eid = c.indptr.clone(), (c.src if which <= 1 else c.dst).clone(), c.perm.clone()
    if corrupt == "nbr":
        nbr[len(nbr) // 2] = 10**12
    elif corrupt == "negative nbr":
        nbr[-1] = -1
    elif corrupt == "eid":
        eid[3] = len(eid)
    elif corrupt == "indptr decreasing":
        indptr[5] = indptr[7] + 1
    else:
        indptr[10] = len(nbr) + 100
    rows = (indptr, nbr, eid, 30)
    stat, g_out = torch.zeros(30, 2, H), torch.randn(30, H, D)
    out = torch.empty(30, H, D) if which != 1 else torch.empty(30, H)
    extra = {0: {}, 1: dict(g=g_out), 2: dict(g=g_out, dk=torch.empty(30, H)),
             3: dict(g=g_out, o=torch.randn(30, H, D), dk=torch.empty(30, H), dq=torch.empty(30, H))}[which]
    with pytest.raises(ValueError, match="out of range"):
        fused._call(which, False, rows, q, k, v, None, None, None, 1.0, 1.0, 0.2, stat, out=out, **extra)
