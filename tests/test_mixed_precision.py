"""Mixed precision: float16 / bfloat16 inputs on every backend that takes them, and torch.autocast
through the layers.

Half-precision results are compared with a float64 dense reference computed from the same (rounded)
inputs, so the error measured is the kernels' own, and the bounds are those of one rounding to the
output dtype (unit roundoff 2**-8 for bfloat16, 2**-11 for float16) times 3-4. A kernel that keeps
its running sums in the half type misses them: the blocks backend with its routes' online softmax in
bfloat16 was 1.4e-2 off on dq, and a normaliser added one by one in bfloat16 stalls at 256.
(torch's own CPU reductions and 2-D index_add already add half values in float32, so on CPU the
torch backend's float32 accumulation shows mostly in its products; on CUDA atomics it matters more.)

Triton's half kernels run under its CPU interpreter in tests/ops/test_triton.py; here only on CUDA.
"""
from __future__ import annotations

import logging

import pytest
import torch

import gatx
from gatx import vision
from gatx.ops import BackendUnavailable, select, sparse_attention
from tests.conftest import dgl_or_none, usable_backends

HALF = [torch.bfloat16, torch.float16]
# max |err| / max |ref| allowed, outputs and gradients: 3 (bfloat16) / 4 (float16) unit roundoffs. Measured
# with float32 accumulation: <= 9e-3 / 1.2e-3; the blocks backend summing its routes in bfloat16 gave 1.6e-2
TOL = {torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def hub_graph(n=24, e=160, hub=1500, seed=0):
    """A random graph with self-loops plus one hub row (dst 0) with ``hub`` in-edges (multi-edges)."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.cat([torch.randint(0, n, (e,), generator=gen), torch.arange(n), torch.randint(0, n, (hub,), generator=gen)])
    dst = torch.cat([torch.randint(0, n, (e,), generator=gen), torch.arange(n), torch.zeros(hub, dtype=torch.int64)])
    return gatx.Graph(src, dst, n, n)


def dense_reference(graph, q, k, v, bias, score, scale=None, slope=0.2):
    """float64 softmax attention written densely: edge multiplicities as counts in the (N_dst, N_src) matrix."""
    q, k, v = q.double(), k.double(), v.double()
    N_dst, N_src, H = graph.num_dst, graph.num_src, v.shape[1]
    if score == "dot":
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = torch.einsum("ihd,jhd->hij", q, k) * scale  # (H, N_dst, N_src)
    else:
        s = q.t()[:, :, None] + k.t()[:, None, :]  # (H, N_dst, N_src)
    # per-edge bias: every edge of the reference graphs used with a bias is unique
    b = torch.zeros(H, N_dst, N_src, dtype=torch.float64)
    if bias is not None:
        b[:, graph.dst, graph.src] = bias.double().t()
    s = s + b
    if score == "additive":
        s = torch.nn.functional.leaky_relu(s, slope)
    count = torch.zeros(N_dst, N_src, dtype=torch.float64).index_put_((graph.dst, graph.src), torch.ones(graph.num_edges, dtype=torch.float64), accumulate=True)
    w = torch.where(count > 0, count * torch.exp(s - s.amax(-1, keepdim=True)), torch.zeros_like(s))
    a = w / w.sum(-1, keepdim=True).clamp_min(1e-300)  # (H, N_dst, N_src)
    return torch.einsum("hij,jhd->ihd", a, v)  # (N_dst, H, D)


def rel_err(got, want):
    got, want = got.detach().double(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def check_against_reference(graph, dtype, score, backend, bias=None, D=8, H=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N_src, N_dst = graph.num_src, graph.num_dst
    if score == "dot":
        q, k = torch.randn(N_dst, H, D, generator=gen), torch.randn(N_src, H, D, generator=gen)
    else:
        q, k = torch.randn(N_dst, H, generator=gen), torch.randn(N_src, H, generator=gen)
    v = torch.randn(N_src, H, D, generator=gen)
    g_out = torch.randn(N_dst, H, D, generator=gen)
    dev = graph.device
    leaves = [t.to(dev, dtype).requires_grad_() for t in (q, k, v)]
    b = bias.to(dev, dtype).requires_grad_() if bias is not None else None
    out = sparse_attention(graph, *leaves, score=score, bias=b, backend=backend)
    assert out.dtype == dtype
    got = torch.autograd.grad(out, leaves + ([b] if b is not None else []), g_out.to(dev, dtype))
    got = tuple(t.cpu() for t in got)
    ref_in = [t.detach().cpu().double().requires_grad_() for t in leaves]
    rb = b.detach().cpu().double().requires_grad_() if b is not None else None
    ref = dense_reference(graph.to("cpu"), *ref_in, rb, score)
    want = torch.autograd.grad(ref, ref_in + ([rb] if rb is not None else []), g_out.double())
    for name, x, y in zip(("out", "dq", "dk", "dv", "dbias"), (out.cpu(),) + got, (ref,) + want):
        assert x.dtype == dtype, f"{name} is {x.dtype}, expected {dtype}"
        err = rel_err(x, y)
        assert err < TOL[dtype], f"{backend} {dtype} {score}: {name} max rel err {err:.2e} >= {TOL[dtype]:.1e}"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("score", ["dot", "additive"])
@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_graph_backends_half_match_float64(backend, dtype, score):
    """torch: float32 accumulation in its kernels; fused: float32 copies around the float32 kernel."""
    if backend not in usable_backends():
        pytest.skip(f"the {backend} backend cannot run here")
    check_against_reference(hub_graph(), dtype, score, backend)


@pytest.mark.parametrize("dtype", HALF)
def test_torch_backend_accumulates_long_rows_in_float32(dtype):
    """4096 equal scores into one node: each edge's attention is 1/4096 and the output is the mean
    of the values (a normaliser summed one by one in bfloat16, as torch's 1-D index_add does, stalls at
    256: 16x too much attention; torch's CPU kernels for 2-D and wider already add half values in float32)."""
    E = 4096
    g = gatx.Graph(torch.arange(E), torch.zeros(E, dtype=torch.int64), E, 1)
    v = (torch.randn(E, 1, 4, generator=torch.Generator().manual_seed(1)) + 3).to(dtype)
    z = torch.zeros(E, 1, 4, dtype=dtype)
    out, a = sparse_attention(g, z[:1], z, v, backend="torch", return_attention=True)
    total = float(a.double().sum())
    assert abs(total - 1.0) < TOL[dtype], f"attention of the row sums to {total}, expected 1"
    want = v.double().mean(0, keepdim=True)
    assert rel_err(out, want) < TOL[dtype], f"max rel err {rel_err(out, want):.2e}"


@pytest.mark.parametrize("dtype", HALF)
def test_structured_backend_half_matches_float64(dtype):
    g = vision.neighborhood_graph((6, 7), kernel_size=3)
    bias = torch.randn(g.num_edges, 2, generator=torch.Generator().manual_seed(3))
    check_against_reference(g, dtype, "dot", "structured")  # one fused SDPA call
    check_against_reference(g, dtype, "dot", "structured", bias=bias)  # written out: bias needs its gradient


@pytest.mark.parametrize("dtype", HALF)
def test_blocks_backend_half_matches_float64(dtype):
    gen = torch.Generator().manual_seed(4)
    idx = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(2 * 4)]).view(2, 4, 2)
    check_against_reference(vision.routed_region_graph(idx, (4, 6), 2), dtype, "dot", "blocks")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; on CPU, tests/ops/test_triton.py runs the half kernels in the interpreter")
@pytest.mark.parametrize("dtype", HALF)
def test_triton_backend_half_matches_float64(dtype):  # pragma: no cover - needs a GPU
    for score in ("dot", "additive"):
        check_against_reference(hub_graph().to("cuda"), dtype, score, "triton")


def test_backends_without_half_say_why_and_dispatch_falls_back(caplog, monkeypatch):
    """DGL's CPU kernels have no half types: forced, it raises naming the dtype; automatic choice logs
    that and runs the next backend."""
    if dgl_or_none() is None:
        pytest.skip("DGL (the backend without half types on CPU) cannot be imported here")
    g = hub_graph()
    q, k, v = (torch.randn(g.num_dst, 2, 4, dtype=torch.bfloat16) for _ in range(3))
    refusing = ["dgl"]
    monkeypatch.setattr("gatx.ops._dispatch.BACKENDS", ("dgl", "torch"))  # dgl first: its reason must be logged
    for name in refusing:
        with pytest.raises(BackendUnavailable, match="bfloat16"):
            sparse_attention(g, q, k, v, backend=name)
    from gatx.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_logged", set())  # reasons are logged once per session
    with caplog.at_level(logging.INFO, logger="gatx"):
        mod = select(None, g, q, k, v, op="sparse_attention", score="dot")
    assert mod.NAME == "torch"
    logged = " ".join(r.getMessage() for r in caplog.records)
    for name in refusing:
        assert f"backend {name!r} skipped" in logged and "bfloat16" in logged, logged
    out = sparse_attention(g, q, k, v)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_ops_follow_autocast():
    g = hub_graph()
    q, k, v = (torch.randn(g.num_dst, 2, 4) for _ in range(3))
    bias = torch.randn(g.num_edges, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse_attention(g, q, k, v.to(torch.bfloat16), bias=bias)  # float32 q, k, bias meet bfloat16 v
        out64 = sparse_attention(g, q.double(), k.double(), v.double())  # float64 is left alone, as autocast does
    assert out.dtype == torch.bfloat16 and out64.dtype == torch.float64
    with pytest.raises(ValueError, match="share one dtype"):  # outside autocast the mix is refused, as before
        sparse_attention(g, q, k, v.to(torch.bfloat16))


def _autocast_case(module, run, inputs):
    """(output rel err, worst parameter-gradient rel err) of bfloat16 autocast against float32."""
    torch.manual_seed(0)
    out32 = run(module, inputs)
    grads32 = torch.autograd.grad(out32.pow(2).sum(), list(module.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = run(module, inputs)
    assert out16.dtype in (torch.bfloat16, torch.float32)
    grads16 = torch.autograd.grad(out16.float().pow(2).sum(), list(module.parameters()))
    for (name, p), g in zip(module.named_parameters(), grads16):
        assert p.dtype == torch.float32 and g.dtype == torch.float32, f"{name}: param {p.dtype}, grad {g.dtype}"
    err_g = max(rel_err(a, b.double()) for a, b in zip(grads16, grads32))
    return rel_err(out16, out32.double()), err_g


def _graph_layer(module, inputs):
    return module(*inputs)


def _vision(module, inputs):
    return module(inputs)


@pytest.mark.parametrize(
    "case", ["GATConv", "GATConv-sparse", "GATv2Conv", "NeighborhoodAttention2d", "WindowAttention", "BiLevelRoutingAttention",
             "OutlookAttention"]
)
def test_autocast_through_layers(case):
    torch.manual_seed(0)
    if case in ("GATConv", "GATv2Conv"):
        g = hub_graph(n=40, e=300, hub=400)
        module = getattr(gatx, case)(16, 8, 4, residual=True)
        run, inputs = _graph_layer, (g, torch.randn(40, 16))
    elif case == "GATConv-sparse":  # torch's sparse matmuls have no bfloat16 kernels: projected in float32
        g, x = hub_graph(n=40, e=300, hub=400), torch.randn(40, 16).relu().to_sparse()
        module = gatx.GATConv(16, 8, 4, residual=True, feat_drop=0.3, head_feat_drop=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(g, x)  # training: per-head masks on the stored values
        out.float().sum().backward()  # outside the autocast region, as torch recommends
        module.eval()
        run, inputs = _graph_layer, (g, x)
    elif case == "NeighborhoodAttention2d":
        module, run, inputs = vision.NeighborhoodAttention2d(32, 4, 5), _vision, torch.randn(2, 10, 10, 32)
    elif case == "WindowAttention":
        module, run, inputs = vision.WindowAttention(32, 4, 4, shift_size=2), _vision, torch.randn(2, 8, 8, 32)
    elif case == "BiLevelRoutingAttention":  # the blocks backend: float32 routes inside an autocast region
        module, run, inputs = vision.BiLevelRoutingAttention(32, num_heads=4, n_win=2, topk=2), _vision, torch.randn(2, 8, 8, 32)
    else:  # given (generated) logits
        module, run, inputs = vision.OutlookAttention(32, 4), _vision, torch.randn(2, 8, 8, 32)
    err_out, err_grad = _autocast_case(module, run, inputs)
    # bfloat16 projections: a few roundings of 2**-8 per value, compounded through two GEMMs
    assert err_out < 4e-2, f"{case}: autocast output max rel err {err_out:.2e}"
    assert err_grad < 8e-2, f"{case}: autocast parameter-gradient max rel err {err_grad:.2e}"


@pytest.mark.parametrize("case", ["GATConv", "NeighborhoodAttention2d"])
def test_autocast_under_torch_compile(case):
    """torch.compile(fullgraph=True) of a layer run under autocast gives eager autocast's values (the
    ops' autocast casts trace into the graph; aot_eager: no code generation, the same kernels)."""
    torch.manual_seed(0)
    if case == "GATConv":
        g, x = hub_graph(n=40, e=300, hub=400), torch.randn(40, 16)
        module = gatx.GATConv(16, 8, 4)
        run = lambda m: m(g, x)  # noqa: E731
    else:
        x = torch.randn(2, 9, 9, 32)
        module = vision.NeighborhoodAttention2d(32, 4, 5)
        run = lambda m: m(x)  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    outs, grads = [], []
    for m in (module, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(m)
        outs.append(out)
        grads.append(torch.autograd.grad(out.float().pow(2).sum(), list(module.parameters())))
    torch._dynamo.reset()
    assert outs[1].dtype == outs[0].dtype
    err = rel_err(outs[1], outs[0].double())
    assert err < TOL[torch.bfloat16], f"compiled vs eager under autocast: output max rel err {err:.2e}"
    err_g = max(rel_err(a, b.double()) for a, b in zip(grads[1], grads[0]))
    assert err_g < 2 * TOL[torch.bfloat16], f"compiled vs eager under autocast: gradient max rel err {err_g:.2e}"
