"""gatx's custom operators pass ``torch.library.opcheck`` (schema, fake / meta implementation, autograd
registration, AOT dispatch with static and dynamic shapes) and their gradients are right: the fused
attention op's first and second derivatives by finite differences in float64, and its outputs against
the composed torch backend. Edge cases: no edges, no dst nodes, dropout keep-masks, the attention not
returned, inputs that need no gradient."""
from __future__ import annotations

import pytest
import torch

import gatx
from gatx import ops
from gatx.backends import fused, fused_build

pytestmark = pytest.mark.skipif(fused_build.compiler() is None, reason="no C++ compiler here to build the fused kernel")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    why = fused.availability()
    assert why is None, why
    from gatx.ops import _library  # noqa: F401 - registers the ops

    import gatx.nn._inputs  # noqa: F401 - registers gatx::check_in_degrees


def graph_tensors(g):
    csr, csc = g.csr(), g.csc()
    return (csr.indptr, csr.src, csr.perm, csc.indptr, csc.dst, csc.perm)


def inputs(g, H, D, dtype, dot, *, bias=True, weight="E", dropout=False, grad=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qk = (H, D) if dot else (H,)

    def t(*shape, rand=torch.randn):
        return rand(*shape, generator=gen, dtype=dtype).requires_grad_(grad)

    q, k, v = t(g.num_dst, *qk), t(g.num_src, *qk), t(g.num_src, H, D + 1)
    b = t(g.num_edges, H) if bias else None
    w = {"E": lambda: t(g.num_edges, rand=torch.rand), "EH": lambda: t(g.num_edges, H, rand=torch.rand),
         None: lambda: None}[weight]()
    keep = (torch.rand(g.num_edges, H, generator=gen) > 0.3).view(torch.uint8) if dropout else None
    return q, k, v, b, w, keep


CASES = [  # (dot, dtype, bias, weight, dropout, want_attn, grad)
    (False, torch.float64, True, "E", False, True, True),
    (True, torch.float64, True, "EH", True, True, True),
    (True, torch.float32, False, None, False, False, True),
    (False, torch.float32, True, "EH", True, False, False),
]


@pytest.mark.parametrize("dot, dtype, bias, weight, dropout, want_attn, grad", CASES)
def test_fused_attention_passes_opcheck(dot, dtype, bias, weight, dropout, want_attn, grad):
    g = gatx.Graph(torch.randint(0, 6, (24,)), torch.randint(0, 5, (24,)), 6, 5)
    q, k, v, b, w, keep = inputs(g, 2, 3, dtype, dot, bias=bias, weight=weight, dropout=dropout, grad=grad)
    keep_scale = 1 / 0.7 if dropout else 1.0
    args = (*graph_tensors(g), q, k, v, b, w, keep, g.num_src, dot, 0.5, 0.2, keep_scale, want_attn)
    torch.library.opcheck(torch.ops.gatx.fused_attention2.default, args)
    out, stat, attn = torch.ops.gatx.fused_attention2(*args)
    assert attn.shape == ((g.num_edges, 2) if want_attn else (0, 2))
    assert stat.shape == (g.num_dst, 2, 2)
    # the op gives the values of the public op on the torch backend (which draws no mask: compare without dropout)
    if not dropout:
        ref = ops.sparse_attention(g, q, k, v, score="dot" if dot else "additive", scale=0.5 if dot else None,
                                   bias=b, edge_weight=w, return_attention=True, backend="torch")
        err = float((out - ref[0]).detach().abs().max())
        assert err < (1e-12 if dtype == torch.float64 else 1e-5), f"op vs torch backend: max diff {err:.2e}"
        if want_attn:
            assert float((attn - ref[1]).detach().abs().max()) < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dot", [False, True])
def test_fused_attention_backward_passes_opcheck(dot):
    g = gatx.Graph(torch.randint(0, 6, (24,)), torch.randint(0, 5, (24,)), 6, 5)
    q, k, v, b, w, keep = inputs(g, 2, 3, torch.float64, dot, weight="EH", dropout=True, grad=False)
    args = (*graph_tensors(g), q, k, v, b, w, keep, g.num_src, dot, 0.5, 0.2, 1 / 0.7, True)
    out, stat, attn = torch.ops.gatx.fused_attention2(*args)
    ob = torch.randn(2, 4, dtype=torch.float64)
    cases = [([True] * 5, torch.randn_like(attn), None), ([False, True, False, False, True], torch.randn_like(attn), None),
             ([True] * 5, None, None),  # no attention gradient: the single-pass backward
             ([True] * 6, None, ob), ([True, False, True, False, False, True], torch.randn_like(attn), ob)]
    for needs, g_attn, out_bias in cases:
        bargs = (*graph_tensors(g), q, k, v, b, w, keep, stat, out, torch.randn_like(out), g_attn,
                 g.num_src, dot, 0.5, 0.2, 1 / 0.7, needs, out_bias)
        torch.library.opcheck(torch.ops.gatx.fused_attention2_backward.default, bargs)
        grads = torch.ops.gatx.fused_attention2_backward(*bargs)
        assert [g_.numel() > 0 for g_ in grads] == needs + [False] * (6 - len(needs))
        if out_bias is not None:  # the out_bias gradient: the sum of the output gradient's rows
            torch.testing.assert_close(grads[5], bargs[14].sum(0))


@pytest.mark.parametrize("dot", [False, True])
def test_fused_attention_first_and_second_derivatives(dot):
    """Finite differences in float64 through the custom op (gradgradcheck: create_graph=True backward)."""
    g = gatx.Graph(torch.tensor([0, 1, 2, 3, 1, 0, 4]), torch.tensor([0, 0, 1, 2, 2, 3, 3]), 5, 4)
    q, k, v, b, w, keep = inputs(g, 2, 2, torch.float64, dot, weight="E", dropout=True)
    gt = graph_tensors(g)

    ob = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, b, w, ob):
        out, _, attn = torch.ops.gatx.fused_attention2(*gt, q, k, v, b, w, keep, g.num_src, dot, 0.7, 0.2, 1 / 0.7, True, ob)
        return out, attn

    assert torch.autograd.gradcheck(f, (q, k, v, b, w, ob))
    assert torch.autograd.gradgradcheck(f, (q, k, v, b, w, ob))


@pytest.mark.parametrize("n_src, n_dst, E, H", [(4, 3, 0, 2), (4, 0, 0, 2), (3, 3, 5, 0)])
def test_fused_attention_opcheck_on_empty_input(n_src, n_dst, E, H):
    """No edges (every row empty: zeros), no dst nodes, no heads."""
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, n_src, (E,), generator=gen)
    dst = torch.randint(0, max(n_dst, 1), (E,), generator=gen)
    g = gatx.Graph(src, dst, n_src, n_dst)
    q, k, v, b, w, keep = inputs(g, H, 2, torch.float64, False)
    args = (*graph_tensors(g), q, k, v, b, w, keep, g.num_src, False, 1.0, 0.2, 1.0, True)
    torch.library.opcheck(torch.ops.gatx.fused_attention2.default, args)
    out, _, attn = torch.ops.gatx.fused_attention2(*args)
    assert out.shape == (n_dst, H, 3) and attn.shape == (E, H)
    assert not out.any()  # rows without edges give zeros
    out.sum().backward()
    assert q.grad.shape == q.shape and not v.grad.any()


def test_check_in_degrees_passes_opcheck_and_raises():
    torch.library.opcheck(torch.ops.gatx.check_in_degrees.default, (torch.tensor([1, 2, 1]),))
    with pytest.raises(gatx.nn.ZeroInDegreeError, match="2 dst nodes have no incoming edge"):
        torch.ops.gatx.check_in_degrees(torch.tensor([1, 0, 3, 0]))


@pytest.mark.parametrize("dot", [False, True])
def test_fused_attention_with_out_bias_passes_opcheck(dot):
    """The (H, Dv) output bias is added by the forward and its gradient comes from the backward op."""
    g = gatx.Graph(torch.randint(0, 6, (24,)), torch.randint(0, 5, (24,)), 6, 5)
    q, k, v, b, w, keep = inputs(g, 2, 3, torch.float64, dot)
    ob = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    args = (*graph_tensors(g), q, k, v, b, w, keep, g.num_src, dot, 0.5, 0.2, 1.0, False, ob)
    torch.library.opcheck(torch.ops.gatx.fused_attention2.default, args)
    out, _, _ = torch.ops.gatx.fused_attention2(*args)
    plain, _, _ = torch.ops.gatx.fused_attention2(*args[:-1])
    torch.testing.assert_close(out, plain + ob)
