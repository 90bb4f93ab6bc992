"""Routed region graphs (gatx.vision.routing) and the blocks backend that runs them."""
from __future__ import annotations

import pytest
import torch
from conftest import usable_backends

from gatx import Graph, ops
from gatx.backends import blocks
from gatx.ops import BackendUnavailable, select
from gatx.vision import region_pool, region_table, routed_region_graph


def brute_force_edges(idx, Y, X, n):
    """Sorted (dst, src) pairs from the definition, one Python loop per pixel."""
    B, R, topk = idx.shape
    h, w = Y // n, X // n
    region = lambda y, x: (y // h) * n + x // w  # noqa: E731
    pixels = {r: [y * X + x for y in range(Y) for x in range(X) if region(y, x) == r] for r in range(R)}
    pairs = []
    for b in range(B):
        for y in range(Y):
            for x in range(X):
                for r in idx[b, region(y, x)].tolist():
                    pairs += [(b * Y * X + y * X + x, b * Y * X + s) for s in pixels[r]]
    return sorted(pairs)


def random_routes(B, n, topk, seed):
    gen = torch.Generator().manual_seed(seed)
    R = n * n
    return torch.stack([torch.randperm(R, generator=gen)[:topk] for _ in range(B * R)]).view(B, R, topk)


@pytest.mark.parametrize("B,Y,X,n,topk", [(1, 4, 4, 2, 1), (3, 6, 9, 3, 2), (2, 8, 4, 4, 5)])
def test_graph_holds_exactly_the_routed_pairs(B, Y, X, n, topk):
    idx = random_routes(B, n, topk, seed=B + topk)
    g = routed_region_graph(idx, (Y, X), n)
    P = (Y // n) * (X // n)
    assert g.num_src == g.num_dst == B * Y * X and g.num_edges == B * Y * X * topk * P
    assert sorted(zip(g.dst.tolist(), g.src.tolist())) == brute_force_edges(idx, Y, X, n)
    assert torch.equal(g.in_degrees(), torch.full((B * Y * X,), topk * P))
    assert bool((g.dst.diff() >= 0).all()), "edges must come grouped by dst (from_csr, no sort)"
    assert torch.equal(g.csr().src, g.src) and torch.equal(g.csr().perm, torch.arange(g.num_edges))
    assert bool(((g.src // (Y * X)) == (g.dst // (Y * X))).all()), "block-diagonal: no edge crosses samples"
    assert isinstance(g.structure, blocks.RegionBlocks) and torch.equal(g.structure.idx, idx)


def test_region_table_and_pool():
    assert region_table(4, 6, 2).tolist() == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9, 10, 11],
                                              [12, 13, 14, 18, 19, 20], [15, 16, 17, 21, 22, 23]]
    x = torch.randn(2, 4, 6, 3, dtype=torch.float64)
    table = region_table(4, 6, 2)
    want = x.reshape(2, 24, 3)[:, table].mean(2)  # (B, R, C)
    assert torch.allclose(region_pool(x, 2), want)
    assert region_table(4, 6, 2) is region_table(4, 6, 2), "tables are cached per (shape, n_win, device)"


@pytest.mark.parametrize("kwargs,match", [
    (dict(idx=torch.zeros(2, 3, 1, dtype=torch.long)), r"shape \(B, R=4, topk\)"),
    (dict(idx=torch.zeros(2, 4, 1)), "int64 or int32"),
    (dict(idx=torch.full((1, 4, 1), 4)), r"in \[0, 4\), got ids from 4 to 4"),
    (dict(idx=torch.full((1, 4, 1), -1)), r"in \[0, 4\)"),
    (dict(idx=torch.zeros(0, 4, 1, dtype=torch.long)), "batch and topk of at least 1"),
    (dict(grid=(5, 4)), "divisible by n_win=2"),
    (dict(grid=(4,)), "height, width"),
    (dict(n_win=0), "n_win must be an int >= 1"),
])
def test_bad_routes(kwargs, match):
    args = dict(idx=torch.zeros(1, 4, 1, dtype=torch.long), grid=(4, 4), n_win=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        routed_region_graph(**args)


def dense_attention(g, q, k, v, scale):
    """float64 masked softmax over the graph's edges; a duplicate edge counts twice (multiplicity)."""
    ones = torch.ones(g.num_edges, dtype=q.dtype)
    mult = torch.zeros(g.num_dst, g.num_src, dtype=q.dtype).index_put_((g.dst, g.src), ones, accumulate=True)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    s = s.masked_fill(mult == 0, float("-inf"))
    a = torch.softmax(s, -1) * mult
    a = a / a.sum(-1, keepdim=True)
    return torch.einsum("hij,jhd->ihd", a, v)


@pytest.mark.parametrize("backend", ["blocks", *usable_backends()])
@pytest.mark.parametrize("dup", [False, True])
def test_blocks_backend_and_others_match_dense(backend, dup):
    B, Y, X, n, topk, H = 2, 6, 8, 2, 3, 2
    idx = random_routes(B, n, topk, seed=5)
    if dup:
        idx[:, :, 2] = idx[:, :, 0]  # a region routed twice: its edges count twice in the softmax
    g = routed_region_graph(idx, (Y, X), n)
    gen = torch.Generator().manual_seed(1)
    N = B * Y * X
    q, k = (torch.randn(N, H, 3, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(N, H, 5, generator=gen, requires_grad=True)  # Dv != Dk
    out = ops.sparse_attention(g, q, k, v, scale=0.7, backend=backend)
    w = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * w).sum(), [q, k, v])
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = dense_attention(g, q64, k64, v64, 0.7)
    want_grads = torch.autograd.grad((want * w.double()).sum(), [q64, k64, v64])
    err = float((out.detach().double() - want.detach()).abs().max())
    assert err < 1e-5, f"{backend}: output differs from the dense reference by {err:.3g}"
    for name, a, b in zip("qkv", grads, want_grads):
        err = float((a.double() - b).abs().max())
        assert err < 1e-5, f"{backend}: grad of {name} differs by {err:.3g}"


def test_dispatch_picks_blocks_for_routed_graphs_only():
    idx = random_routes(2, 2, 2, seed=0)
    g = routed_region_graph(idx, (4, 4), 2)
    q = torch.randn(g.num_dst, 2, 4)
    assert select(None, g, q, q, q, op="sparse_attention", score="dot") is blocks
    bias = torch.zeros(g.num_edges, 2)
    assert select(None, g, q, q, q, bias, op="sparse_attention", score="dot", bias=bias) is not blocks
    plain = Graph(g.src, g.dst, g.num_src, g.num_dst)
    with pytest.raises(BackendUnavailable, match="no region-block structure"):
        ops.sparse_attention(plain, q, q, q, backend="blocks")
    with pytest.raises(BackendUnavailable, match="without attention dropout"):
        ops.sparse_attention(g, q, q, q, dropout_p=0.5, backend="blocks")
    # the other options fall back to a generic backend on the same graph and agree with blocks
    out = ops.sparse_attention(g, q, q, q, bias=bias)
    assert torch.allclose(out, ops.sparse_attention(g, q, q, q, backend="blocks"), atol=1e-6)


def test_blocks_backward_is_first_order_only():
    idx = random_routes(1, 2, 2, seed=3)
    g = routed_region_graph(idx, (4, 4), 2)
    q = torch.randn(g.num_dst, 1, 4, requires_grad=True)
    out = ops.sparse_attention(g, q, q, q, backend="blocks")
    w = torch.randn(out.shape, requires_grad=True)
    (gq,) = torch.autograd.grad(out, q, w, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gq.sum().backward()


def test_shared_row_tables_survive_an_in_place_write():
    """Graphs of one shape share cached dst / CSR tensors; a write into one must not reach the next graph."""
    idx = random_routes(1, 2, 1, seed=4)
    g1 = routed_region_graph(idx, (4, 4), 2)
    want = g1.dst.clone()
    g1.dst.add_(1)  # a user writing into a graph's indices (the graph then refuses to run)
    with pytest.raises(ValueError, match="modified in place"):
        g1.src
    g2 = routed_region_graph(idx, (4, 4), 2)
    assert torch.equal(g2.dst, want) and torch.equal(g2.csr().perm, torch.arange(g2.num_edges))
