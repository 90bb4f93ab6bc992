"""``torch.compile(fullgraph=True)`` of GATConv / GATv2Conv on CPU: the same outputs, attention and
gradients as eager, for the automatic backend and the fused and torch backends forced; the
zero-in-degree error raised by the compiled layer; graphs whose CSR is built inside the trace or
before it; no recompiles once a graph is cached.

Most cases compile with ``backend="aot_eager"`` (Dynamo's capture, the custom ops' fake
implementations and registered autograd, AOTAutograd -- everything gatx contributes), one with the
default Inductor backend, so the file stays within CI's time.
"""
from __future__ import annotations

import pytest
import torch
from conftest import random_graph

import gatx
from gatx.backends import fused_build

pytestmark = pytest.mark.skipif(fused_build.compiler() is None, reason="no C++ compiler here to build the fused kernel")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def warm(g):
    """Build a graph's CSR and CSC eagerly (what one eager call does), so a trace reads them."""
    g.csr()
    g.csc()
    return g


def run(layer, graph, feat, **kw):
    """(outputs, gradients of the parameters and the features) of one forward + backward."""
    for p in list(layer.parameters()) + [f for f in (feat if isinstance(feat, tuple) else (feat,))]:
        p.grad = None
    res = layer(graph, feat, **kw)
    outs = res if isinstance(res, tuple) else (res,)
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    leaves = list(layer.parameters()) + list(feat if isinstance(feat, tuple) else (feat,))
    return [o.detach().clone() for o in outs], {i: p.grad.clone() for i, p in enumerate(leaves) if p.grad is not None}


def assert_compiled_matches(layer, graph, feat, backend="aot_eager", **kw):
    tol = 1e-10 if feat_dtype(feat) == torch.float64 else 2e-5
    eager_out, eager_grads = run(layer, graph, feat, **kw)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    comp_out, comp_grads = run(compiled, graph, feat, **kw)
    for i, (a, b) in enumerate(zip(comp_out, eager_out)):
        err = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
        assert err < tol, f"output {i}: compiled vs eager max rel diff {err:.2e}"
    assert comp_grads.keys() == eager_grads.keys()
    for i in eager_grads:
        b = eager_grads[i]
        err = float((comp_grads[i] - b).abs().max()) / max(1.0, float(b.abs().max()))
        assert err < tol, f"gradient of leaf {i}: compiled vs eager max rel diff {err:.2e}"
    return compiled


def feat_dtype(feat):
    return (feat[0] if isinstance(feat, tuple) else feat).dtype


def features(n, width, dtype, prefix=()):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, *prefix, width, generator=gen, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("backend, dtype", [(None, torch.float32), ("fused", torch.float64)])
def test_gatconv_output_bias_inside_the_op(backend, dtype):
    """No residual: the layer hands its bias to the op, which the traced custom op adds in the kernel."""
    g = warm(random_graph(12, 12, 40, self_loops=True))
    layer = gatx.GATConv(6, 4, 3, backend=backend).to(dtype)
    with torch.no_grad():
        layer.bias.normal_()
    assert_compiled_matches(layer, g, features(12, 6, dtype), get_attention=True)
    assert_compiled_matches(layer, g, features(12, 6, dtype))


@pytest.mark.parametrize("backend, dtype", [(None, torch.float32), ("fused", torch.float64), ("torch", torch.float64)])
def test_gatconv_residual_bias_edge_weight_attention(backend, dtype):
    g = warm(random_graph(12, 12, 40, self_loops=True))
    layer = gatx.GATConv(6, 4, 3, residual=True, backend=backend).to(dtype)
    w = torch.rand(g.num_edges, dtype=dtype)
    assert_compiled_matches(layer, g, features(12, 6, dtype), edge_weight=w, get_attention=True)


def test_gatconv_block_pair_prefix_and_eval_dropout():
    """A sampling block (bipartite, dst nodes first), (N, *, F) features with a prefix, dropout layers in eval."""
    gen = torch.Generator().manual_seed(1)
    src, dst = torch.randint(0, 10, (30,), generator=gen), torch.randint(0, 4, (30,), generator=gen)
    loop = torch.arange(4)
    block = warm(gatx.Graph(torch.cat([src, loop]), torch.cat([dst, loop]), 10, 4, is_block=True))
    layer = gatx.GATConv(5, 3, 2, feat_drop=0.3, attn_drop=0.4, residual=True).double().eval()
    assert_compiled_matches(layer, block, features(10, 5, torch.float64, prefix=(2,)), get_attention=True)
    pair = gatx.GATConv((5, 7), 3, 2, residual=True)  # (src, dst) feature pair on a bipartite graph
    bip = warm(random_graph(10, 4, 30, seed=2))
    pair.set_allow_zero_in_degree(True)
    assert_compiled_matches(pair, bip, (features(10, 5, torch.float32), features(4, 7, torch.float32)))


@pytest.mark.parametrize("backend, dtype", [(None, torch.float32), ("torch", torch.float64)])
def test_gatv2conv_matches_eager(backend, dtype):
    g = warm(random_graph(12, 12, 40, self_loops=True))
    layer = gatx.GATv2Conv(6, 4, 3, residual=True, attn_drop=0.5, backend=backend).to(dtype).eval()
    assert_compiled_matches(layer, g, features(12, 6, dtype, prefix=(2,)), get_attention=True)


def test_sparse_attention_with_inductor():
    """The default backend (Inductor) around the fused custom op, forward and backward. (The layers under
    Inductor generate C++ kernels for the projections, a minute or more with a cold cache on a small CI
    machine; their capture and gradients are checked above with aot_eager, their timing in
    benchmarks/bench_compile.py.)"""
    g = warm(random_graph(12, 12, 40, self_loops=True))
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(12, 2, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(12, 2, 3, generator=gen).requires_grad_()
    w, b = torch.rand(g.num_edges, generator=gen), torch.randn(g.num_edges, 2, generator=gen)

    def f(q, k, v):
        out, a = gatx.ops.sparse_attention(g, q, k, v, score="additive", bias=b, edge_weight=w, return_attention=True)
        return out.sum() + (a * a).sum(), out

    results = []
    # no on-disk caches: their keys do not cover a custom op's schema, so a graph cached before the op
    # changed would call it with the old arguments
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for fn in (f, torch.compile(f, fullgraph=True)):
            for t in (q, k, v):
                t.grad = None
            loss, out = fn(q, k, v)
            loss.backward()
            results.append([out.detach(), q.grad, k.grad, v.grad])
    for name, a, e in zip(("out", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: compiled (Inductor) vs eager: {m}")


@pytest.mark.parametrize("layer_cls", [gatx.GATConv, gatx.GATv2Conv])
def test_compiled_layer_raises_zero_in_degree_error(layer_cls):
    """The count is not known while tracing: the check runs in the compiled code and raises there."""
    layer = layer_cls(4, 2, 1)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    g = warm(gatx.Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 1]), 4, 4))  # nodes 0 and 3: no in-edge
    with pytest.raises(gatx.nn.ZeroInDegreeError, match="2 dst nodes have no incoming edge"):
        compiled(g, torch.randn(4, 4))
    ok = warm(g.add_self_loops())  # the same shapes otherwise: the compiled check passes and returns values
    torch.testing.assert_close(compiled(ok, torch.ones(4, 4)), layer(ok, torch.ones(4, 4)))


def test_graph_built_outside_and_reused_without_recompiles():
    """A graph used first inside the compiled function gets its CSR / CSC built in the trace (and cached
    on it); the next call compiles once more to read the cache, later calls run without compiling.
    A graph cached before the first call (warm) compiles once."""
    layer = gatx.GATConv(6, 4, 2)
    x = features(12, 6, torch.float32)
    cold = random_graph(12, 12, 40, seed=4, self_loops=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    stats = torch._dynamo.utils.counters["stats"]
    for i in range(3):
        out, grads = run(compiled, cold, x)
        ref, ref_grads = run(layer, cold, x)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(grads, ref_grads)
        if i == 0:
            assert cold._csr is not None and cold._csc is not None, "the trace did not cache the CSR / CSC"
    assert stats["unique_graphs"] == 2, dict(stats)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    hot = warm(random_graph(12, 12, 40, seed=5, self_loops=True))
    for _ in range(3):
        run(compiled, hot, x)
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 1, dict(stats)


def test_empty_graph_compiles():
    """No edges: zeros plus the bias (allow_zero_in_degree), gradients still flow to the bias."""
    g = warm(gatx.Graph(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 5, 5))
    layer = gatx.GATConv(3, 2, 2, allow_zero_in_degree=True)
    with torch.no_grad():
        layer.bias.normal_()
    assert_compiled_matches(layer, g, features(5, 3, torch.float32))
