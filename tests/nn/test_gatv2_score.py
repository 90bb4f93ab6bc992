"""GATv2Conv's per-edge score as one product (gatx.nn.gatv2conv._LeakyScore) against its written-out form
``(leaky_relu(pre) * attn).sum(-1)``: values, gradients, double backward, autocast, and the layer with
a double backward through it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import gatx
from gatx.backends import fused
from gatx.nn.gatv2conv import _LeakyScore


def written_out(pre, attn, slope):
    return (F.leaky_relu(pre, slope) * attn).sum(-1)


@pytest.mark.parametrize("slope", [0.2, 0.0, -0.3, 1.5])
def test_gradcheck_and_double_backward(slope):
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(30, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    attn = torch.randn(1, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    fn = lambda p, a: _LeakyScore.apply(p, a, slope)  # noqa: E731
    assert gradcheck(fn, (pre, attn))
    assert gradgradcheck(fn, (pre, attn))


@pytest.mark.parametrize("slope", [0.2, 0.0, -0.3])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_matches_written_out(slope, layout):
    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(50, 2, 8, dtype=torch.float64, generator=gen)
    if layout == "strided":
        pre = torch.randn(2, 50, 8, dtype=torch.float64, generator=gen).transpose(0, 1)
    pre.requires_grad_()
    attn = torch.randn(1, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    ours, ref = _LeakyScore.apply(pre, attn, slope), written_out(pre, attn, slope)
    torch.testing.assert_close(ours, ref, rtol=1e-14, atol=1e-14)
    g = torch.randn(ours.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, (pre, attn), g), torch.autograd.grad(ref, (pre, attn), g)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_one_input_needs_grad_and_empty():
    pre = torch.randn(10, 2, 4, requires_grad=True)
    assert torch.autograd.grad(_LeakyScore.apply(pre, torch.randn(1, 2, 4), 0.2).sum(), pre)[0].shape == pre.shape
    attn = torch.randn(1, 2, 4, requires_grad=True)
    (g,) = torch.autograd.grad(_LeakyScore.apply(torch.randn(10, 2, 4), attn, 0.2).sum(), attn)
    assert g.shape == attn.shape
    empty = torch.randn(0, 2, 4, requires_grad=True)
    s = _LeakyScore.apply(empty, attn, 0.2)
    s.sum().backward()
    assert s.shape == (0, 2) and empty.grad.shape == (0, 2, 4) and (attn.grad == 0).all()


@pytest.mark.skipif(fused.availability() is not None, reason="the fused kernel is not usable here")
def test_kernel_sums_the_same_for_any_thread_count():
    """attn's gradient sums fixed blocks of rows in a fixed order: the same bits on 1 and 2 threads, and
    non-finite values pass through as written out (NaN stays NaN)."""
    gen = torch.Generator().manual_seed(5)
    src, dst = torch.randint(0, 3000, (9000,), generator=gen), torch.randint(0, 3000, (9000,), generator=gen)
    graph = gatx.Graph(src, dst, 3000, 3000)
    fs, fd = torch.randn(3000, 4, 8, generator=gen), torch.randn(3000, 4, 8, generator=gen)
    ee, attn = torch.randn(9000, 4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    g = torch.randn(9000, 4, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.gat2_score(graph, fs, fd, attn, 0.2, ee, g, (True,) * 4)
        torch.set_num_threads(2)
        two = fused.gat2_score(graph, fs, fd, attn, 0.2, ee, g, (True,) * 4)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    ee[3, 1, 2] = float("nan")
    s = fused.gat2_score(graph, fs, fd, attn, 0.2, ee)
    assert s[3, 1].isnan() and s.isnan().sum() == 1


def test_autocast_bfloat16():
    """Under autocast the written-out product promotes to attn's float32: so does the product here."""
    pre = torch.randn(40, 2, 8, requires_grad=True)
    attn = torch.randn(1, 2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p = pre.bfloat16()
        ours, ref = _LeakyScore.apply(p, attn, 0.2), written_out(p, attn, 0.2)
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours.sum(), (pre, attn))
    g_ref = torch.autograd.grad(ref.sum(), (pre, attn))
    for a, b in zip(g_ours, g_ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)  # bfloat16 pre: one rounding here, two written out


class _WrittenOut:
    apply = staticmethod(written_out)


def test_layer_double_backward(monkeypatch):
    """A gradient penalty through GATv2Conv (create_graph=True) equals the written-out score's."""
    torch.manual_seed(0)
    g = gatx.Graph(torch.tensor([0, 1, 2, 3, 1, 2]), torch.tensor([1, 2, 3, 0, 0, 1]))
    layer = gatx.GATv2Conv(5, 3, 2, backend="torch").double()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)

    def penalty():
        (gx,) = torch.autograd.grad(layer(g, x).square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), list(layer.parameters()) + [x])

    ours = penalty()
    monkeypatch.setattr(gatx.nn.gatv2conv, "_LeakyScore", _WrittenOut)
    ref = penalty()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("share_weights", [False, True])
def test_training_step_with_attention_dropout_matches_torch_backend(share_weights):
    """The layer's softmax, attention dropout and aggregation run as one sparse_attention call (the fused
    kernel by default): the same dropout draws, outputs, attention and gradients as the torch backend's
    edge_softmax / F.dropout / aggregate (float64)."""
    gen = torch.Generator().manual_seed(3)
    src, dst = torch.randint(0, 40, (300,), generator=gen), torch.randint(0, 40, (300,), generator=gen)
    g = gatx.Graph(torch.cat([src, torch.arange(40)]), torch.cat([dst, torch.arange(40)]), 40, 40)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64)
    ef = torch.randn(g.num_edges, 3, generator=gen, dtype=torch.float64)
    results = {}
    for backend in (None, "torch"):
        torch.manual_seed(0)
        layer = gatx.GATv2Conv(12, 4, 3, attn_drop=0.4, residual=True, edge_feats=3, share_weights=share_weights).double()
        torch.manual_seed(42)
        out, a = layer(g, x, get_attention=True, edge_feat=ef, backend=backend)
        (out.square().sum() + a.square().sum()).backward()
        results[backend] = [out, a] + [p.grad for p in layer.parameters()]
    assert (results[None][1] == 0).any()  # dropout drew zeros
    for ours, ref in zip(results[None], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(fused.availability() is not None, reason="the fused kernel is not usable here")
@pytest.mark.parametrize("edge_term", [False, True])
@pytest.mark.parametrize("slope", [0.2, 0.0, -0.3])
@pytest.mark.parametrize("shape", [(7, 7), (9, 5), (4, 6)])
@pytest.mark.parametrize("heads", [(3, 4), (8, 8), (2, 16)])
def test_node_score_matches_written_out(slope, shape, edge_term, heads):
    """The score from the node rows (no (E, H, D) pre-activations) on a bipartite graph with a node of no
    in-edges and one of no out-edges: values and all three gradients as the written-out form, float64;
    gradcheck and a double backward (3 x 4 heads)."""
    from gatx.nn.gatv2conv import _NodeScore

    ns, nd = shape
    H, D = heads
    gen = torch.Generator().manual_seed(ns * 10 + nd)
    src, dst = torch.randint(0, ns - 1, (40,), generator=gen), torch.randint(0, nd - 1, (40,), generator=gen)
    g = gatx.Graph(src, dst, ns, nd)
    fs = torch.randn(ns, H, D, dtype=torch.float64, generator=gen, requires_grad=True)
    fd = torch.randn(nd, H, D, dtype=torch.float64, generator=gen, requires_grad=True)
    attn = torch.randn(1, H, D, dtype=torch.float64, generator=gen, requires_grad=True)
    ee = torch.randn(40, H, D, dtype=torch.float64, generator=gen, requires_grad=True) if edge_term else None
    inputs = tuple(t for t in (fs, fd, attn, ee) if t is not None)
    ours = _NodeScore.apply(fs, fd, attn, ee, slope, g)
    ref = written_out(fs[src] + fd[dst] + (ee if edge_term else 0), attn, slope)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)
    w = torch.randn(ours.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, inputs, w), torch.autograd.grad(ref, inputs, w)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if heads != (3, 4):  # the numerical Jacobians of wider rows take minutes; the small shape covers them
        return
    fn = lambda s_, d_, a_, *e_: _NodeScore.apply(s_, d_, a_, e_[0] if e_ else None, slope, g)  # noqa: E731
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.skipif(fused.availability() is not None, reason="the fused kernel is not usable here")
@pytest.mark.parametrize("edge_term", [False, True])
@pytest.mark.parametrize("slope", [0.2, -0.3])
@pytest.mark.parametrize("heads", [(8, 8), (2, 16)])
def test_node_score_float32_compile_time_shapes_match_float64(slope, edge_term, heads):
    """float32 at the kernel's compile-time shapes (8 heads x 8 features: the vectorised score's shuffle
    tree; width 16 at any head count) on a graph of 5,000 edges (enough for the kernel to use both
    threads): values and all gradients as the float64 written-out form."""
    from gatx.nn.gatv2conv import _NodeScore

    H, D = heads
    gen = torch.Generator().manual_seed(5)
    ns, nd, E = 1000, 700, 5000
    src, dst = torch.randint(0, ns, (E,), generator=gen), torch.randint(0, nd, (E,), generator=gen)
    g = gatx.Graph(src, dst, ns, nd)
    f64 = [torch.randn(n, H, D, dtype=torch.float64, generator=gen) for n in (ns, nd, 1, E)]
    if not edge_term:
        f64 = f64[:3]
    f32 = [t.float().requires_grad_() for t in f64]
    f64 = [t.requires_grad_() for t in f64]
    ours = _NodeScore.apply(*f32[:3], f32[3] if edge_term else None, slope, g)
    ref = written_out(f64[0][src] + f64[1][dst] + (f64[3] if edge_term else 0), f64[2], slope)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    w = torch.randn(ours.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad(ours, f32, w.float()), torch.autograd.grad(ref, f64, w)):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(fused.availability() is not None, reason="the fused kernel is not usable here")
@pytest.mark.parametrize("share_weights", [False, True])
def test_layer_on_node_score_matches_torch_backend(share_weights):
    """GATv2Conv without edge features takes the node-row score by default: outputs, attention and every
    gradient as the torch backend's written-out layer (float64, a block-like bipartite graph too)."""
    gen = torch.Generator().manual_seed(11)
    for ns, nd in ((30, 30), (30, 12)):
        src = torch.randint(0, ns, (200,), generator=gen)
        dst = torch.cat([torch.arange(nd), torch.randint(0, nd, (200 - nd,), generator=gen)])
        g = gatx.Graph(src, dst, ns, nd)
        x = torch.randn(ns, 10, dtype=torch.float64, generator=gen)
        feat = (x, x[:nd]) if ns != nd else x
        results = {}
        for backend in (None, "torch"):
            torch.manual_seed(0)
            layer = gatx.GATv2Conv(10, 4, 3, residual=True, share_weights=share_weights).double()
            out, a = layer(g, feat, get_attention=True, backend=backend)
            (out.square().sum() + a.square().sum()).backward()
            results[backend] = [out, a] + [p.grad for p in layer.parameters()]
        for ours, ref in zip(results[None], results["torch"]):
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("get_attention", [False, True])
@pytest.mark.parametrize("share_weights", [False, True])
def test_gradient_penalty_with_shared_weights_matches_torch_backend(share_weights, get_attention):
    """A double backward through the default path equals the torch backend's, also when fd is a slice of
    fs (shared weights): each recomputation differentiates fresh aliases of its inputs, so fs's gradient
    does not count fd's uses a second time (it did through the score from the node rows)."""
    g = gatx.Graph(torch.tensor([0, 1, 2, 3, 1, 2, 0]), torch.tensor([1, 2, 3, 0, 0, 1, 1]))
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    res = {}
    for backend in (None, "torch"):
        torch.manual_seed(1)
        layer = gatx.GATv2Conv(5, 3, 2, share_weights=share_weights).double()
        r = layer(g, x, get_attention=get_attention, backend=backend)
        loss = r[0].square().sum() + r[1].square().sum() if get_attention else r.square().sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        res[backend] = torch.autograd.grad(gx.square().sum(), list(layer.parameters()) + [x])
    for ours, ref in zip(res[None], res["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)
