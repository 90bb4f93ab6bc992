"""gatx.ops: every op against an independent float64 dense reference, on every usable backend."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import usable_backends, random_graph
from hypothesis import given, settings
from hypothesis import strategies as st

from gatx import Graph, ops

BACKENDS = usable_backends()
PRIMITIVE_BACKENDS = usable_backends("edge_softmax")


def dense_reference(g, q, k, v, score, scale=None, bias=None, slope=0.2, edge_weight=None):
    """Attention through per-edge Python-free dense algebra in float64: one (E, N_dst) incidence matrix."""
    q, k, v = q.double(), k.double(), v.double()
    E = g.num_edges
    inc = torch.zeros(g.num_dst, E, dtype=torch.float64)
    inc[g.dst, torch.arange(E)] = 1.0  # (N_dst, E)
    if score == "dot":
        s = (q[g.dst] * k[g.src]).sum(-1) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        if bias is not None:
            s = s + bias.double()
    else:
        s = k[g.src] + q[g.dst] + (bias.double() if bias is not None else 0)
        s = F.leaky_relu(s, slope)
    # softmax per dst through the incidence matrix (mask off-row entries with -inf)
    full = torch.where(inc.bool()[:, :, None], s[None], torch.tensor(float("-inf"), dtype=torch.float64))  # (N_dst, E, H)
    a = torch.softmax(full, dim=1).nan_to_num(0.0)  # rows without edges -> 0
    a_e = (a * inc[:, :, None]).sum(0)  # (E, H)
    if edge_weight is not None:
        a_e = a_e * (edge_weight.double()[:, None] if edge_weight.dim() == 1 else edge_weight.double())
    out = torch.einsum("ne,eh,ehd->nhd", inc, a_e, v[g.src])
    return out, a_e


def _inputs(g, H=3, D=4, dtype=torch.float32, score="dot", seed=1):
    gen = torch.Generator().manual_seed(seed)
    if score == "dot":
        q = torch.randn(g.num_dst, H, D, generator=gen, dtype=dtype)
        k = torch.randn(g.num_src, H, D, generator=gen, dtype=dtype)
    else:
        q = torch.randn(g.num_dst, H, generator=gen, dtype=dtype)
        k = torch.randn(g.num_src, H, generator=gen, dtype=dtype)
    v = torch.randn(g.num_src, H, D, generator=gen, dtype=dtype)
    return q, k, v


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["dot", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_weight", [False, True])
def test_sparse_attention_matches_dense_reference(backend, score, dtype, with_bias, with_weight):
    g = random_graph(seed=3)  # bipartite, with zero in-degree nodes likely
    q, k, v = _inputs(g, dtype=dtype, score=score)
    bias = torch.randn(g.num_edges, 3, dtype=dtype) if with_bias else None
    w = torch.rand(g.num_edges, dtype=dtype) if with_weight else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([bias.clone().requires_grad_()] if with_bias else [])
    lb = leaves[3] if with_bias else None
    out, a = ops.sparse_attention(g, *leaves[:3], score=score, bias=lb, edge_weight=w, return_attention=True, backend=backend)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rb = ref_leaves[3] if with_bias else None
    ref_out, ref_a = dense_reference(g, *ref_leaves[:3], score, bias=rb, edge_weight=w)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert out.dtype == dtype
    assert _max_diff(out, ref_out) < tol, f"output max diff {_max_diff(out, ref_out)}"
    assert _max_diff(a, ref_a) < tol, f"attention max diff {_max_diff(a, ref_a)}"
    grad = torch.randn_like(ref_out)
    (out * grad.to(dtype)).sum().backward()
    (ref_out * grad).sum().backward()
    for name, mine, ref in zip("qkvb", leaves, ref_leaves):
        d = _max_diff(mine.grad, ref.grad)
        assert d < tol * 10, f"grad of {name} max diff {d} ({backend}, {score})"


@pytest.mark.parametrize("backend", PRIMITIVE_BACKENDS)
def test_primitives_match_reference(backend):
    g = random_graph(seed=5)
    q, k, v = _inputs(g)
    s = ops.dot_score(g, q, k, backend=backend)
    assert _max_diff(s, (q[g.dst] * k[g.src]).sum(-1)) < 1e-5
    el, er = torch.randn(g.num_src, 3, 2), torch.randn(g.num_dst, 3, 2)
    assert _max_diff(ops.gat_score(g, el, er, backend=backend), el[g.src] + er[g.dst]) < 1e-6
    a = ops.edge_softmax(g, s, backend=backend)
    seg = torch.zeros(g.num_dst, 3).index_add_(0, g.dst, a)
    has_in = g.in_degrees() > 0
    assert torch.allclose(seg[has_in], torch.ones_like(seg[has_in]), atol=1e-6)
    out = ops.aggregate(g, a, v, backend=backend)
    assert _max_diff(out, torch.zeros(g.num_dst, 3, 4).index_add_(0, g.dst, a[..., None] * v[g.src])) < 1e-5
    assert not bool(out[~has_in].any()), "nodes without in-edges must get zeros"


def test_gradcheck_torch_backend_float64():
    g = random_graph(5, 4, 12, seed=7)
    q, k, v = (t.double().requires_grad_() for t in _inputs(g, H=2, D=3))
    s = torch.randn(g.num_edges, 2, dtype=torch.float64, requires_grad=True)
    el = torch.randn(g.num_src, 2, dtype=torch.float64, requires_grad=True)
    er = torch.randn(g.num_dst, 2, dtype=torch.float64, requires_grad=True)
    a = torch.rand(g.num_edges, 2, dtype=torch.float64, requires_grad=True)
    kw = {"backend": "torch"}
    assert torch.autograd.gradcheck(lambda x: ops.edge_softmax(g, x, **kw), (s,))
    assert torch.autograd.gradcheck(lambda x, y: ops.gat_score(g, x, y, **kw), (el, er))
    assert torch.autograd.gradcheck(lambda x, y: ops.dot_score(g, x, y, **kw), (q, k))
    assert torch.autograd.gradcheck(lambda x, y: ops.aggregate(g, x, y, **kw), (a, v))
    assert torch.autograd.gradcheck(lambda x, y, z: ops.sparse_attention(g, x, y, z, **kw), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda x, y, z, b: ops.sparse_attention(g, x, y, z, score="additive", bias=b, **kw), (er, el, v, s)
    )


@st.composite
def graphs(draw):
    n_src = draw(st.integers(1, 10))
    n_dst = draw(st.sampled_from([n_src, draw(st.integers(1, 10))]))
    e = draw(st.integers(0, 30))  # 0: empty graph
    src = draw(st.lists(st.integers(0, n_src - 1), min_size=e, max_size=e))
    dst = draw(st.lists(st.integers(0, n_dst - 1), min_size=e, max_size=e))  # multi-edges, self-loops allowed
    return Graph(torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64), n_src, n_dst)


@settings(max_examples=40, deadline=None)
@given(graphs(), st.sampled_from(["dot", "additive"]), st.integers(0, 2**16))
def test_backends_agree_on_random_graphs(g, score, seed):
    q, k, v = _inputs(g, H=2, D=3, score=score, seed=seed)
    ref_out, ref_a = dense_reference(g, q, k, v, score)
    for backend in BACKENDS:
        out, a = ops.sparse_attention(g, q, k, v, score=score, return_attention=True, backend=backend)
        assert _max_diff(out, ref_out) < 1e-5, f"{backend}: output max diff {_max_diff(out, ref_out)}"
        assert _max_diff(a, ref_a) < 1e-5, f"{backend}: attention max diff {_max_diff(a, ref_a)}"
        assert torch.isfinite(out).all()


def test_dropout_only_in_training_and_rescales():
    g = random_graph(20, 20, 200, seed=2, self_loops=True)
    q, k, v = _inputs(g, score="additive")
    out_eval = ops.sparse_attention(g, q, k, v, score="additive", dropout_p=0.5, training=False, backend="torch")
    assert torch.allclose(out_eval, ops.sparse_attention(g, q, k, v, score="additive", backend="torch"))
    torch.manual_seed(0)
    _, a = ops.sparse_attention(g, q, k, v, score="additive", dropout_p=0.5, return_attention=True, backend="torch")
    _, a0 = ops.sparse_attention(g, q, k, v, score="additive", return_attention=True, backend="torch")
    kept = a != 0
    assert 0.3 < kept.float().mean().item() < 0.7
    assert torch.allclose(a[kept], 2 * a0[kept], atol=1e-6)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda g, q, k, v: ops.sparse_attention(g, q[:-1], k, v), "q must have shape"),
        (lambda g, q, k, v: ops.sparse_attention(g, q, k, v[:, :2]), "same number of heads"),
        (lambda g, q, k, v: ops.sparse_attention(g, q, k[..., :2], v), r"same \(H, D\)"),
        (lambda g, q, k, v: ops.sparse_attention(g, q, k, v, score="cosine"), "score must be"),
        (lambda g, q, k, v: ops.sparse_attention(g, q, k, v, bias=torch.zeros(3, 3)), "bias must have shape"),
        (lambda g, q, k, v: ops.sparse_attention(g, q, k, v, edge_weight=torch.ones(2)), "edge_weight must have shape"),
        (lambda g, q, k, v: ops.edge_softmax(g, torch.zeros(3, 3)), "scores must have shape"),
        (lambda g, q, k, v: ops.aggregate(g.edge_index, torch.zeros(3, 3), v), "gatx.Graph"),
        (lambda g, q, k, v: ops.sparse_attention(g, q, k, v, backend="cuda"), "backend must be"),
    ],
)
def test_bad_input(call, match):
    g = random_graph(seed=4)
    q, k, v = _inputs(g)
    with pytest.raises(ValueError, match=match):
        call(g, q, k, v)


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    from gatx.backends import dgl as dgl_backend

    monkeypatch.setattr(dgl_backend, "reasons", lambda *a, **k: ["pretend DGL is missing"])
    g = random_graph(seed=4)
    q, k, v = _inputs(g)
    with pytest.raises(ops.BackendUnavailable, match="pretend DGL is missing"):
        ops.sparse_attention(g, q, k, v, backend="dgl")
    out = ops.sparse_attention(g, q, k, v)  # automatic choice still runs
    assert torch.allclose(out, ops.sparse_attention(g, q, k, v, backend="torch"), atol=1e-6)


# ---------------------------------------------------------------- the op boundary (issue 12, items 6 and 10-12)
ALL_BACKENDS = [None] + BACKENDS  # None: automatic choice


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_dgl_layout_for_additive_terms_is_squeezed(backend):
    """DGL's (N, H, 1) el / er give the same (N_dst, H, D) output as (N, H), never (N, H, H, D)."""
    g = random_graph(seed=8)
    q, k, v = _inputs(g, score="additive")
    ref, ref_a = dense_reference(g, q, k, v, "additive")
    out, a = ops.sparse_attention(g, q[..., None], k[..., None], v, score="additive", return_attention=True, backend=backend)
    assert out.shape == ref.shape and a.shape == ref_a.shape
    assert _max_diff(out, ref) < 1e-5, f"max diff {_max_diff(out, ref)}"
    with pytest.raises(ValueError, match=r"one score term per node and head.*\(N, H, 1\)"):
        ops.sparse_attention(g, q[..., None].expand(-1, -1, 2), k[..., None], v, score="additive", backend=backend)
    agg = ops.aggregate(g, a[..., None], v, backend=backend if backend in PRIMITIVE_BACKENDS else None)
    assert _max_diff(agg, ref) < 1e-5, "aggregate with DGL's (E, H, 1) attention"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", ["E", "E1", "EH"])
def test_per_edge_layouts(backend, shape):
    """bias and edge_weight as (E,), (E, 1) (shared by the heads) or (E, H), against the float64 reference."""
    g = random_graph(seed=9)
    q, k, v = _inputs(g)
    gen = torch.Generator().manual_seed(2)
    full_b, full_w = torch.randn(g.num_edges, 1, generator=gen), torch.rand(g.num_edges, 1, generator=gen)
    if shape == "EH":
        full_b, full_w = full_b.expand(-1, 3) * torch.tensor([1.0, -2.0, 0.5]), full_w.expand(-1, 3) * torch.tensor([1.0, 0.3, 2.0])
    b, w = {"E": (full_b[:, 0], full_w[:, 0]), "E1": (full_b, full_w), "EH": (full_b, full_w)}[shape]
    ref, _ = dense_reference(g, q, k, v, "dot", bias=full_b.expand(-1, 3), edge_weight=full_w.expand(-1, 3))
    out = ops.sparse_attention(g, q, k, v, bias=b, edge_weight=w, backend=backend)
    assert _max_diff(out, ref) < 1e-5, f"{shape}: max diff {_max_diff(out, ref)}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("score", ["dot", "additive"])
def test_mixed_dtypes_are_refused_on_every_backend(backend, score):
    """A float64 edge_weight with float32 q / k / v is one clear error, whatever the backend, not a DGLError."""
    g = random_graph(seed=10)
    q, k, v = _inputs(g, score=score)
    w64 = torch.rand(g.num_edges, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"edge_weight is torch.float64 but v is torch.float32.*cast edge_weight"):
        ops.sparse_attention(g, q, k, v, score=score, edge_weight=w64, backend=backend)
    with pytest.raises(ValueError, match=r"bias is torch.float64 but v is torch.float32"):
        ops.sparse_attention(g, q, k, v, score=score, bias=w64, backend=backend)
    with pytest.raises(ValueError, match=r"q is torch.float64 but v is torch.float32"):
        ops.sparse_attention(g, q.double(), k, v, score=score, backend=backend)
    # once cast, it runs and agrees with the float64 reference
    ref, _ = dense_reference(g, q, k, v, score, edge_weight=w64)
    out = ops.sparse_attention(g, q, k, v, score=score, edge_weight=w64.float(), backend=backend)
    assert _max_diff(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf"), "0.5", True])
def test_bad_dropout_p_is_refused(backend, p):
    g = random_graph(seed=11)
    q, k, v = _inputs(g, score="additive")
    for training in (True, False):  # a bad value is a bug even where dropout is off
        with pytest.raises(ValueError, match="dropout_p must"):
            ops.sparse_attention(g, q, k, v, score="additive", dropout_p=p, training=training, backend=backend)


def test_dropout_p_bounds_are_accepted():
    g = random_graph(20, 20, 100, seed=12, self_loops=True)
    q, k, v = _inputs(g, score="additive")
    for backend in BACKENDS:
        out = ops.sparse_attention(g, q, k, v, score="additive", dropout_p=1.0, backend=backend)
        assert not out.any(), f"{backend}: dropout_p=1 drops every edge"
        out0 = ops.sparse_attention(g, q, k, v, score="additive", dropout_p=0.0, backend=backend)
        assert _max_diff(out0, ops.sparse_attention(g, q, k, v, score="additive", backend="torch")) < 1e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda g, q, k, v: dict(q=q[..., :0], k=k[..., :0]), "at least one feature per head"),
        (lambda g, q, k, v: dict(v=v[..., :0]), "at least one feature per head"),
        (lambda g, q, k, v: dict(v=v.long()), "v must be a floating-point tensor.*v.float()"),
        (lambda g, q, k, v: dict(q=q.to(torch.complex64)), "q must be a floating-point"),
        (lambda g, q, k, v: dict(v=v.flatten(1).to_sparse().unsqueeze(-1)), "v must be a dense"),
        (lambda g, q, k, v: dict(v=v[..., None]), r"v must have shape \(num_src, H, D\)"),
        (lambda g, q, k, v: dict(q=q[:, 0]), r"q must have shape \(num_dst, H, D\)"),
        (lambda g, q, k, v: dict(edge_weight=0.5), r"edge_weight must be a tensor of shape \(E,\).*torch.full"),
        (lambda g, q, k, v: dict(edge_weight=[1.0] * g.num_edges), "edge_weight must be a tensor.*got list"),
        (lambda g, q, k, v: dict(edge_weight=torch.ones(g.num_edges, dtype=torch.bool)), "edge_weight must be a floating"),
        (lambda g, q, k, v: dict(edge_weight=torch.ones(g.num_edges, 2)), r"edge_weight must have shape \(E,\), \(E, 1\) or \(E, H\)"),
        (lambda g, q, k, v: dict(bias=torch.ones(g.num_edges, 3, 1)), "bias must have shape"),
        (lambda g, q, k, v: dict(scale=torch.tensor(2.0, requires_grad=True)), "scale must be a Python number.*multiply"),
        (lambda g, q, k, v: dict(scale=float("nan")), "scale must be finite"),
        (lambda g, q, k, v: dict(negative_slope="0.2"), "negative_slope must be a real number"),
    ],
)
def test_bad_tensors_are_named(backend, make, match):
    g = random_graph(seed=13)
    q, k, v = _inputs(g)
    kw = dict(q=q, k=k, v=v)
    kw.update(make(g, q, k, v))
    with pytest.raises(ValueError, match=match):
        ops.sparse_attention(g, kw.pop("q"), kw.pop("k"), kw.pop("v"), backend=backend, **kw)


def test_zero_heads_is_an_empty_result():
    """H = 0 (e.g. an empty batch folded into the heads) gives empty outputs, like torch's own attention."""
    g = random_graph(seed=14)
    q, k, v = (t[:, :0] for t in _inputs(g))
    for backend in ALL_BACKENDS:
        out, a = ops.sparse_attention(g, q, k, v, return_attention=True, backend=backend)
        assert out.shape == (g.num_dst, 0, 4) and a.shape == (g.num_edges, 0), backend


def test_primitives_refuse_wrong_shapes_and_dtypes():
    g = random_graph(seed=15)
    q, k, v = _inputs(g)
    with pytest.raises(ValueError, match=r"el and er must have the same \(H, ...\) shape"):
        ops.gat_score(g, torch.randn(g.num_src, 3, 2), torch.randn(g.num_dst, 3, 1))
    with pytest.raises(ValueError, match=r"edge_score must have shape"):
        ops.gat_score(g, torch.randn(g.num_src, 3), torch.randn(g.num_dst, 3), torch.randn(g.num_edges))
    with pytest.raises(ValueError, match="er is torch.float64 but el is torch.float32"):
        ops.gat_score(g, torch.randn(g.num_src, 3), torch.randn(g.num_dst, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="attn is torch.float64 but v is torch.float32"):
        ops.aggregate(g, torch.rand(g.num_edges, 3, dtype=torch.float64), v)
    with pytest.raises(ValueError, match=r"v must have shape \(num_src, H, D\)"):
        ops.aggregate(g, torch.rand(g.num_edges, 3), v[..., None])
    with pytest.raises(ValueError, match="scores must be a floating-point"):
        ops.edge_softmax(g, torch.ones(g.num_edges, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"k must have shape \(num_src, H, D\)"):
        ops.dot_score(g, q, k[:, 0])


@pytest.mark.parametrize("backend", [b for b in PRIMITIVE_BACKENDS])
def test_a_nan_score_makes_its_row_nan_and_only_its_row(backend):
    """As a dense softmax: a NaN normaliser is not replaced by 1 (which gave finite, unnormalised weights)."""
    g = Graph(torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 1, 2]), 3, 3)
    s = torch.tensor([[math.nan], [1.0], [2.0], [-3.0]])
    a = ops.edge_softmax(g, s, backend=backend)
    assert torch.isnan(a[:2]).all(), f"row 0 has a NaN score: {a.flatten()}"
    assert a[2].item() == 1.0 and a[3].item() == 1.0, f"rows 1 and 2 are finite: {a.flatten()}"
