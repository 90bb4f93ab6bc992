"""GATv2's attention as one kernel (gatx.nn.gatv2conv._FusedGAT2: the score computed per edge from the node
rows inside the softmax and aggregation, and one backward pass over the dst rows) against GATv2's
definition written out in torch ops (Brody et al. 2022: e = a^T LeakyReLU(W_s h_j + W_d h_i), softmax over
the in-edges, sum of alpha W_s h_j), and GATv2Conv's default path against its torch backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import gatx
from gatx.backends import fused
from gatx.nn.gatv2conv import _FusedGAT2

pytestmark = pytest.mark.skipif(fused.availability() is not None, reason=f"fused kernel: {fused.availability()}")


def written_out(src, dst, num_dst, fs, fd, attn, ee, slope, keep, keep_scale):
    """GATv2's attention from its definition: scores, the softmax over each dst node's in-edges (a node
    without in-edges gets zeros), the dropout mask, the weighted sum of the src rows."""
    z = fs[src] + fd[dst] + (ee if ee is not None else 0)  # (E, H, D)
    s = (F.leaky_relu(z, slope) * attn).sum(-1)  # (E, H)
    H = s.shape[1]
    m = s.new_full((num_dst, H), float("-inf")).scatter_reduce(0, dst[:, None].expand(-1, H), s.detach(), "amax")
    w = torch.exp(s - m[dst])
    den = s.new_zeros((num_dst, H)).index_add(0, dst, w)
    a = w / den[dst]
    if keep is not None:
        a = a * keep.to(a.dtype) * keep_scale
    return fs.new_zeros((num_dst,) + fs.shape[1:]).index_add(0, dst, a[..., None] * fs[src])


def bipartite(ns: int, nd: int, E: int, seed: int) -> gatx.Graph:
    """Random edges, with the last dst node without in-edges and the last src node without out-edges."""
    gen = torch.Generator().manual_seed(seed)
    src, dst = torch.randint(0, ns - 1, (E,), generator=gen), torch.randint(0, nd - 1, (E,), generator=gen)
    src[:4], dst[:4] = src[0], dst[0]  # a multi-edge
    return gatx.Graph(src, dst, ns, nd)


def make(g: gatx.Graph, H: int, D: int, edge_term: bool, drop: bool, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()  # noqa: E731
    fs, fd, attn = r(g.num_src, H, D), r(g.num_dst, H, D), r(1, H, D)
    ee = r(g.num_edges, H, D) if edge_term else None
    keep = (torch.rand(g.num_edges, H, generator=gen) > 0.4).view(torch.uint8) if drop else None
    return fs, fd, attn, ee, keep, (1 / 0.6 if drop else 1.0)


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("edge_term", [False, True])
@pytest.mark.parametrize("slope", [0.2, 0.0, -0.3])
@pytest.mark.parametrize("heads", [(3, 4), (8, 8), (2, 16)])
def test_matches_written_out_float64(heads, slope, edge_term, drop):
    """Values and the gradients of fs, fd, attn and ee, float64, on a bipartite graph with a dst node of no
    in-edges (zeros) and a src node of no out-edges (zero gradient)."""
    g = bipartite(9, 7, 60, seed=heads[0])
    fs, fd, attn, ee, keep, ks = make(g, *heads, edge_term, drop, seed=heads[1])
    ours = _FusedGAT2.apply(fs, fd, attn, ee, keep, ks, slope, g)
    ref = written_out(g.src, g.dst, g.num_dst, fs, fd, attn[0], ee, slope, keep, ks)
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=1e-13)
    assert (ours[-1] == 0).all()
    w = torch.randn(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs = [t for t in (fs, fd, attn, ee) if t is not None]
    got, want = torch.autograd.grad(ours, inputs, w), torch.autograd.grad(ref, inputs, w)
    for name, a, b in zip(("fs", "fd", "attn", "ee"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"d{name}: {m}")  # noqa: B023
    assert (got[0][-1] == 0).all()


@pytest.mark.parametrize("heads", [(8, 8), (2, 16), (2, 32), (1, 64), (3, 5)])
def test_float32_on_several_threads_matches_float64(heads):
    """float32 at the kernel's compile-time shapes (8 x 8, widths 16, 32, 64) and a generic one, on a graph
    large enough for two threads (each thread's sum of fs's gradient, added at the end)."""
    H, D = heads
    g = bipartite(2000, 1500, 30000, seed=D)
    fs, fd, attn, ee, keep, ks = make(g, H, D, True, True, seed=H)
    f32 = [t.detach().float().requires_grad_() for t in (fs, fd, attn, ee)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ours = _FusedGAT2.apply(*f32, keep, ks, 0.2, g)
        w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
        got = torch.autograd.grad(ours, f32, w)
    finally:
        torch.set_num_threads(threads)
    ref = written_out(g.src, g.dst, g.num_dst, fs, fd, attn[0], ee, 0.2, keep, ks)
    want = torch.autograd.grad(ref, (fs, fd, attn, ee), w.double())
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("fs", "fd", "attn", "ee"), got, want):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, f"d{name} differs from float64 by {err:.1e} (relative to its largest entry)"


def test_gradcheck_and_double_backward():
    """Numerical gradients, and a backward that builds a graph (it differentiates the written-out form)."""
    g = bipartite(6, 5, 16, seed=3)
    fs, fd, attn, ee, keep, ks = make(g, 2, 3, True, True, seed=4)
    fn = lambda a, b, c, d: _FusedGAT2.apply(a, b, c, d, keep, ks, 0.2, g)  # noqa: E731
    assert gradcheck(fn, (fs, fd, attn, ee))
    assert gradgradcheck(fn, (fs, fd, attn, ee))


def test_shared_rows_and_retained_graph():
    """fd a slice of fs (share_weights): each input's gradient counts its own uses, also in a double
    backward; a second backward through a retained graph gives the same gradient."""
    g = bipartite(8, 6, 30, seed=5)
    base = torch.randn(8, 2, 4, dtype=torch.float64, requires_grad=True)
    attn = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    out = _FusedGAT2.apply(base, base[:6], attn, None, None, 1.0, 0.2, g)
    ref = written_out(g.src, g.dst, 6, base, base[:6], attn[0], None, 0.2, None, 1.0)
    first = torch.autograd.grad(out.square().sum(), (base, attn), retain_graph=True)
    again = torch.autograd.grad(out.square().sum(), (base, attn))
    want = torch.autograd.grad(ref.square().sum(), (base, attn), retain_graph=True)
    for a, b, c in zip(first, again, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    (gb,) = torch.autograd.grad(_FusedGAT2.apply(base, base[:6], attn, None, None, 1.0, 0.2, g).square().sum(), base,
                                create_graph=True)
    (gb_ref,) = torch.autograd.grad(ref.square().sum(), base, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gb.square().sum(), attn)[0],
                               torch.autograd.grad(gb_ref.square().sum(), attn)[0], rtol=1e-11, atol=1e-11)


def test_empty_graphs():
    """No edges (zeros, zero gradients), no dst nodes, no src nodes."""
    for ns, nd, E in ((5, 4, 0), (5, 0, 0), (0, 3, 0)):
        g = gatx.Graph(torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long), ns, nd)
        fs, fd, attn, ee, keep, ks = make(g, 2, 3, False, False)
        out = _FusedGAT2.apply(fs, fd, attn, None, None, 1.0, 0.2, g)
        assert out.shape == (nd, 2, 3) and (out == 0).all()
        got = torch.autograd.grad(out.sum(), (fs, fd, attn), allow_unused=True)
        assert all(t is None or (t == 0).all() for t in got)


@pytest.mark.parametrize("share_weights", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_layer_matches_torch_backend(share_weights, training):
    """GATv2Conv's default path (one kernel) and its torch backend, float64, with attention dropout (the same
    RNG draws), a residual, edge features and zero-in-degree nodes: outputs and every parameter's and the
    input's gradient."""
    gen = torch.Generator().manual_seed(7)
    n = 60
    src, dst = torch.randint(0, n, (500,), generator=gen), torch.randint(0, n - 2, (500,), generator=gen)
    g = gatx.Graph(src, dst, n, n)
    x = torch.randn(n, 12, generator=gen, dtype=torch.float64)
    ef = torch.randn(g.num_edges, 3, generator=gen, dtype=torch.float64)
    results = {}
    for backend in (None, "torch"):
        torch.manual_seed(0)
        layer = gatx.GATv2Conv(12, 4, 3, attn_drop=0.4, residual=True, edge_feats=3, share_weights=share_weights,
                               allow_zero_in_degree=True).double().train(training)
        xi = x.clone().requires_grad_()
        torch.manual_seed(42)
        out = layer(g, xi, edge_feat=ef, backend=backend)
        out.square().sum().backward()
        results[backend] = [out, xi.grad] + [p.grad for p in layer.parameters()]
    for ours, ref in zip(results[None], results["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_layer_routes(monkeypatch):
    """With a gradient to come, the layer takes the one-kernel path by default; the two-call path (score,
    then attention) when the attention is returned, when torch asks for deterministic algorithms, or when
    the per-thread sums would pass 1 GiB. Without one, the kernel's forward alone, the attention too. All
    give the same output."""
    calls = {"fn": 0, "forward": 0}
    real_fn, real_fwd = _FusedGAT2.apply, fused.gat2_attention
    monkeypatch.setattr(gatx.nn.gatv2conv._FusedGAT2, "apply", lambda *a: calls.update(fn=calls["fn"] + 1) or real_fn(*a))
    monkeypatch.setattr(fused, "gat2_attention",
                        lambda *a, **k: calls.update(forward=calls["forward"] + 1) or real_fwd(*a, **k))
    g = bipartite(30, 30, 200, seed=9)
    layer = gatx.GATv2Conv(5, 4, 2, allow_zero_in_degree=True).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    ref = layer(g, x)
    assert calls == {"fn": 1, "forward": 1}  # the Function's forward calls the kernel's
    out, a = layer(g, x, get_attention=True)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        torch.testing.assert_close(layer(g, x), ref, rtol=1e-13, atol=1e-13)
    finally:
        torch.use_deterministic_algorithms(was)
    monkeypatch.setattr(fused, "gat2_fits", lambda *a: False)
    torch.testing.assert_close(layer(g, x), ref, rtol=1e-13, atol=1e-13)
    assert calls == {"fn": 1, "forward": 1}
    with torch.no_grad():
        out2, a2 = layer(g, x, get_attention=True)
        out3 = layer(g, x)
    assert calls == {"fn": 1, "forward": 3}
    torch.testing.assert_close(out2, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out3, ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(a2, a, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("training", [False, True])
def test_attention_without_gradient_matches_torch_backend(training):
    """Under no_grad the layer returns the kernel's attention (after dropout: the same draws as the torch
    backend's F.dropout) and output, as the torch backend does (float64, 8 x 8 on two threads)."""
    g = bipartite(3000, 3000, 40000, seed=11)
    x = torch.randn(3000, 16, dtype=torch.float64)
    got = {}
    for backend in (None, "torch"):
        torch.manual_seed(0)
        layer = gatx.GATv2Conv(16, 8, 8, attn_drop=0.3, allow_zero_in_degree=True).double().train(training)
        torch.manual_seed(5)
        with torch.no_grad():
            got[backend] = layer(g, x, get_attention=True, backend=backend)
    for ours, ref in zip(got[None], got["torch"]):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    assert got[None][1].shape == (g.num_edges, 8, 1)
