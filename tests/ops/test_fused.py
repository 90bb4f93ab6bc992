"""The fused CPU backend: float64 gradcheck, parity with the torch backend (outputs, attention and every
gradient) on the compile-time-specialised and generic shapes, dropout with a shared mask, edge cases,
and the fallback when it cannot run."""
from __future__ import annotations


import pytest
import torch
from conftest import dgl_or_none, random_graph
from hypothesis import given, settings
from hypothesis import strategies as st

import gatx
from gatx import Graph, ops
from gatx.backends import fused, fused_build


pytestmark = pytest.mark.skipif(fused_build.compiler() is None, reason="no C++ compiler here to build the fused kernel")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """The compiled kernel; its absence is a failure wherever a C++ compiler exists."""
    why = fused.availability()
    assert why is None, why


def make_inputs(g, H, D, dtype, score, bias, weight, seed=1):
    gen = torch.Generator().manual_seed(seed)
    qk = (H, D) if score == "dot" else (H,)
    q = torch.randn(g.num_dst, *qk, generator=gen, dtype=dtype)
    k = torch.randn(g.num_src, *qk, generator=gen, dtype=dtype)
    v = torch.randn(g.num_src, H, D, generator=gen, dtype=dtype)
    b = torch.randn(g.num_edges, H, generator=gen, dtype=dtype) if bias else None
    w = None
    if weight == "E":
        w = torch.rand(g.num_edges, generator=gen, dtype=dtype)
    elif weight == "EH":
        w = torch.rand(g.num_edges, H, generator=gen, dtype=dtype)
    return [q, k, v, b, w]


def run(backend, g, inputs, score, dropout_p=0.0, seed=0, attn=True, grad_seed=7):
    """Outputs, attention and gradients of every input, for a random linear loss on out and attention."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
    q, k, v, b, w = leaves
    torch.manual_seed(seed)
    res = ops.sparse_attention(g, q, k, v, score=score, bias=b, edge_weight=w, dropout_p=dropout_p,
                               return_attention=attn, backend=backend)
    out, a = res if attn else (res, None)
    gen = torch.Generator().manual_seed(grad_seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if attn:
        loss = loss + (a * torch.randn(a.shape, generator=gen, dtype=a.dtype)).sum()
    if loss.requires_grad:
        loss.backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return out, a, grads


def assert_close(got, want, dtype, what):
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    for name, x, y in zip(["out", "attention", "dq", "dk", "dv", "dbias", "dweight"], got, want):
        if y is None:
            assert x is None, f"{what}: {name} should be None"
            continue
        assert x is not None, f"{what}: {name} missing"
        diff = (x.double() - y.double()).abs().max().item() if y.numel() else 0.0
        assert diff <= tol * (1 + y.double().abs().max().item() if y.numel() else 1), f"{what}: {name} differs by {diff:.3g}"


def compare(g, H, D, dtype, score, bias, weight, dropout_p=0.0, attn=True):
    inputs = make_inputs(g, H, D, dtype, score, bias, weight)
    f = run("fused", g, inputs, score, dropout_p, attn=attn)
    t = run("torch", g, inputs, score, dropout_p, attn=attn)
    what = f"H={H} D={D} {dtype} {score} bias={bias} weight={weight} p={dropout_p}"
    assert_close([f[0], f[1], *f[2]], [t[0], t[1], *t[2]], dtype, what)


# H x D: (8, 8) and (*, 8/16/32/64) run compile-time-specialised float32 kernels; the rest is generic
SHAPES = [(8, 8), (3, 8), (2, 16), (3, 32), (1, 64), (3, 4), (8, 5)]


@pytest.mark.parametrize("H,D", SHAPES)
@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_torch_backend(H, D, score, dtype):
    g = random_graph(n_src=30, n_dst=25, e=200, seed=H * D)
    compare(g, H, D, dtype, score, bias=False, weight=None)
    compare(g, H, D, dtype, score, bias=True, weight="EH", dropout_p=0.3)


@pytest.mark.parametrize("dk,dv", [(8, 16), (16, 8), (5, 32)])
def test_dot_with_key_width_other_than_value_width(dk, dv):
    g = random_graph(n_src=30, n_dst=25, e=200, seed=dk + dv)
    q, k, _, b, w = make_inputs(g, 4, dk, torch.float32, "dot", True, "E")
    v = make_inputs(g, 4, dv, torch.float32, "dot", False, None, seed=2)[2]
    f = run("fused", g, [q, k, v, b, w], "dot")
    t = run("torch", g, [q, k, v, b, w], "dot")
    assert_close([f[0], f[1], *f[2]], [t[0], t[1], *t[2]], torch.float32, f"dk={dk} dv={dv}")


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight", [None, "E", "EH"])
@pytest.mark.parametrize("attn", [False, True])
def test_options_match_torch_backend(score, bias, weight, attn):
    g = random_graph(n_src=14, n_dst=12, e=25, seed=3)  # bipartite, some nodes without edges
    assert (g.in_degrees() == 0).any() and (g.csc().indptr.diff() == 0).any()
    compare(g, 3, 4, torch.float32, score, bias, weight, attn=attn)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_bias_and_weight_of_one_column_broadcast_over_heads(score):
    g = random_graph(n_src=20, n_dst=15, e=120, seed=8)
    q, k, v, _, _ = make_inputs(g, 4, 8, torch.float64, score, False, None)
    b = torch.randn(g.num_edges, 1, dtype=torch.float64)
    w = torch.rand(g.num_edges, 1, dtype=torch.float64)
    f = run("fused", g, [q, k, v, b, w], score)
    t = run("torch", g, [q, k, v, b, w], score)
    assert_close([f[0], f[1], *f[2]], [t[0], t[1], *t[2]], torch.float64, "(E, 1) bias and weight")


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_uses_the_same_mask_as_the_composed_path(score, dtype):
    g = random_graph(n_src=40, n_dst=40, e=400, seed=5, self_loops=True)
    for p in (0.25, 0.6, 1.0):
        compare(g, 8, 8, dtype, score, bias=True, weight="E", dropout_p=p)
    # and the mask is a real draw: two seeds drop different edges
    inputs = make_inputs(g, 8, 8, dtype, score, True, None)
    a1 = run("fused", g, inputs, score, 0.5, seed=1)[1]
    a2 = run("fused", g, inputs, score, 0.5, seed=2)[1]
    assert not torch.equal(a1 == 0, a2 == 0)


@pytest.mark.parametrize("score", ["additive", "dot"])
def test_gradcheck_float64(score):
    g = random_graph(n_src=6, n_dst=5, e=16, seed=2)  # includes zero in-degree dst nodes
    q, k, v, b, w = [t.requires_grad_() for t in make_inputs(g, 2, 3, torch.float64, score, True, "EH")]

    def f(q, k, v, b, w):
        out, a = ops.sparse_attention(g, q, k, v, score=score, bias=b, edge_weight=w, return_attention=True,
                                      backend="fused")
        return out, a

    assert torch.autograd.gradcheck(f, (q, k, v, b, w))
    w1 = torch.rand(g.num_edges, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, w: f(q, k, v, None, w)[0], (q, k, v, w1))


def test_zero_in_degree_rows_are_zero_not_nan():
    g = Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 1, 3]), 5, 5)  # dst 0, 2, 4 have no in-edges
    q, k, v, _, _ = make_inputs(g, 2, 3, torch.float32, "additive", False, None)
    v.requires_grad_()
    out = ops.sparse_attention(g, q, k, v, score="additive", backend="fused")
    assert torch.isfinite(out).all() and out[[0, 2, 4]].abs().max() == 0
    out.sum().backward()
    assert torch.isfinite(v.grad).all() and v.grad[[3, 4]].abs().max() == 0  # sources without out-edges


def test_all_masked_row_gives_zeros_like_the_reference():
    g = random_graph(n_src=6, n_dst=4, e=20, seed=9)
    q, k, v, b, _ = make_inputs(g, 2, 4, torch.float32, "dot", True, None)
    b[g.dst == 1] = float("-inf")  # every in-edge of dst 1 masked
    f_out, f_a = ops.sparse_attention(g, q, k, v, bias=b, return_attention=True, backend="fused")
    t_out, t_a = ops.sparse_attention(g, q, k, v, bias=b, return_attention=True, backend="torch")
    assert torch.isfinite(f_out).all() and f_out[1].abs().max() == 0
    assert (f_out - t_out).abs().max() < 1e-5 and (f_a - t_a).abs().max() < 1e-6


@pytest.mark.parametrize("n_src,n_dst", [(0, 0), (4, 3), (3, 0), (0, 2)])
def test_empty_graph(n_src, n_dst):
    g = Graph(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), n_src, n_dst)
    q = torch.randn(n_dst, 2, 3, requires_grad=True)
    k = torch.randn(n_src, 2, 3, requires_grad=True)
    v = torch.randn(n_src, 2, 3, requires_grad=True)
    out, a = ops.sparse_attention(g, q, k, v, return_attention=True, backend="fused")
    assert out.shape == (n_dst, 2, 3) and a.shape == (0, 2) and (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and (t.grad == 0).all()


def test_multi_edges_self_loops_and_blocks():
    src = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 5, 1])
    dst = torch.tensor([0, 1, 1, 1, 2, 0, 2, 1, 0, 1])  # repeated 0->1 and 1->1, self-loops
    g = Graph(src, dst, 6, 3, is_block=True)
    for score in ("additive", "dot"):
        compare(g, 2, 8, torch.float64, score, bias=True, weight="E")


def test_result_does_not_depend_on_thread_count():
    g = random_graph(n_src=500, n_dst=400, e=6000, seed=4)
    inputs = make_inputs(g, 8, 8, torch.float32, "additive", True, "E")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("fused", g, inputs, "additive")
        torch.set_num_threads(2)
        two = run("fused", g, inputs, "additive")
    finally:
        torch.set_num_threads(before)
    for x, y in zip([one[0], one[1], *one[2]], [two[0], two[1], *two[2]]):
        assert torch.equal(x, y)  # no atomics: every output is reduced in one fixed order


@settings(max_examples=25, deadline=None)
@given(n_src=st.integers(1, 12), n_dst=st.integers(1, 12), e=st.integers(0, 60), seed=st.integers(0, 10**6),
       score=st.sampled_from(["additive", "dot"]), H=st.sampled_from([1, 3, 8]), D=st.sampled_from([1, 8, 16]))
def test_property_matches_torch_backend(n_src, n_dst, e, seed, score, H, D):
    g = random_graph(n_src, n_dst, e, seed)
    compare(g, H, D, torch.float64, score, bias=bool(seed % 2), weight=[None, "E", "EH"][seed % 3])


def test_gatconv_training_step_matches_torch_backend():
    g = random_graph(n_src=60, n_dst=60, e=500, seed=11, self_loops=True)
    x = torch.randn(60, 16)
    ew = torch.rand(g.num_edges)
    ef = torch.randn(g.num_edges, 5)
    layers = {}
    for backend in ("fused", "torch"):
        torch.manual_seed(0)
        layers[backend] = gatx.GATConv(16, 8, 8, attn_drop=0.3, edge_feats=5, residual=True, backend=backend)
    results = {}
    for backend, layer in layers.items():
        torch.manual_seed(42)
        out, a = layer(g, x, edge_weight=ew, edge_feat=ef, get_attention=True)
        (out.square().sum() + a.sum()).backward()
        results[backend] = [out, a] + [p.grad for p in layer.parameters()]
    for x1, x2 in zip(results["fused"], results["torch"]):
        diff = (x1 - x2).abs().max().item()
        assert diff <= 1e-5 * (1 + x2.abs().max().item()), f"max diff {diff:.3g} (scale {x2.abs().max().item():.3g})"


# ------------------------------------------------------------------ when it cannot run
def test_reasons_name_what_is_unsupported():
    g = random_graph()
    q, k, v, _, _ = make_inputs(g, 2, 4, torch.float32, "dot", False, None)
    assert fused.reasons(g, q, k, v, op="sparse_attention", score="dot") == []
    assert any("sparse_attention" in r for r in fused.reasons(g, q, op="edge_softmax"))
    assert fused.reasons(g, q.half(), k.half(), v.half(), op="sparse_attention", score="dot") == []  # run in float32 copies
    assert any("float8_e4m3fn" in r for r in fused.reasons(g, q.to(torch.float8_e4m3fn), op="sparse_attention"))
    assert any("one dtype" in r for r in fused.reasons(g, q, k.double(), v, op="sparse_attention"))
    assert any("cpu only" in r for r in fused.reasons(g.to("meta"), q, op="sparse_attention"))
    assert any("2 dims" in r for r in fused.reasons(g, q, k, v, op="sparse_attention", score="additive"))
    bad = torch.zeros(g.num_edges, 3)  # 3 columns for 2 heads
    assert any("bias" in r for r in fused.reasons(g, q, k, v, op="sparse_attention", score="dot", bias=bad))
    assert any("edge_weight" in r for r in fused.reasons(g, q, k, v, op="sparse_attention", score="dot", edge_weight=bad))


def test_unsupported_input_falls_back_to_another_backend():
    g = random_graph()
    q, k, v, _, _ = make_inputs(g, 2, 4, torch.float32, "dot", False, None)
    s = torch.randn(g.num_edges, 2)
    with pytest.raises(ops.BackendUnavailable, match="fused"):
        ops.edge_softmax(g, s, backend="fused")  # it runs only sparse_attention
    assert torch.allclose(ops.edge_softmax(g, s), ops.edge_softmax(g, s, backend="torch"), atol=1e-6)
    # bfloat16 runs in float32 copies (tests/test_mixed_precision.py checks it against float64)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    auto, ref = ops.sparse_attention(g, q, k, v), ops.sparse_attention(g, q, k, v, backend="torch")
    assert auto.dtype == torch.bfloat16 and torch.allclose(auto.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_build_failure_becomes_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_state", fused._State())
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GATX_CACHE_DIR", str(tmp_path / "cache"))
    g = random_graph()
    why = fused.reasons(g, torch.zeros(7, 2, 4), op="sparse_attention")
    assert len(why) == 1 and "fused CPU kernel is unavailable" in why[0], why
    q, k, v, _, _ = make_inputs(g, 2, 4, torch.float32, "dot", False, None)
    assert ops.select(None, g, q, k, v, op="sparse_attention", score="dot").NAME != "fused"


def test_kernel_is_cached_by_source_and_flags(tmp_path, monkeypatch):
    cxx = fused_build.compiler()
    monkeypatch.setenv("GATX_CACHE_DIR", str(tmp_path))
    assert fused_build.library_dir() == tmp_path
    name = fused_build.library_name(cxx)
    assert name.startswith("fused_attention-") and name.endswith(".so")
    monkeypatch.setattr(fused_build, "FLAGS", fused_build.FLAGS + ["-DGATX_UNUSED"])
    assert fused_build.library_name(cxx) != name


@pytest.mark.skipif(dgl_or_none() is None, reason="DGL cannot be imported here")
@pytest.mark.parametrize("block", [False, True])
def test_graph_from_dgl_reuses_dgls_csr_and_csc(block):
    dgl = dgl_or_none()
    gen = torch.Generator().manual_seed(6)
    n_src, n_dst = 40, (25 if block else 40)
    src, dst = torch.randint(0, n_src, (300,), generator=gen), torch.randint(0, n_dst, (300,), generator=gen)
    if block:
        dg = dgl.create_block((src, dst), num_src_nodes=n_src, num_dst_nodes=n_dst)
    else:
        dg = dgl.graph((src, dst), num_nodes=n_src)
    wrapped, plain = Graph.from_dgl(dg), Graph(src, dst, n_src, n_dst, is_block=block)
    for x, y in zip(wrapped.csr() + wrapped.csc(), plain.csr() + plain.csc()):
        assert torch.equal(x, y)  # same grouping, and the same (stable) order inside each row
    compare(wrapped, 3, 8, torch.float64, "additive", bias=True, weight="E")
