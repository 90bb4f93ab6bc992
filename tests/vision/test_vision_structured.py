"""The structured backend: chosen automatically for grid graphs, identical to the generic torch path."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gatx import Graph, ops
from gatx.ops import BackendUnavailable, select
from gatx.vision import neighborhood_graph, window_graph

GRAPHS = {
    "na 8x8 k3": lambda: neighborhood_graph(8, 8, 3),  # tiles are blocks: no query gather
    "na 13x10 k5": lambda: neighborhood_graph(13, 10, 5),  # overlapping last tiles
    "na 11x9 k3 d2": lambda: neighborhood_graph(11, 9, 3, 2),
    "na 20x17 k3 d3": lambda: neighborhood_graph(20, 17, 3, 3),
    "win 8x8 w4": lambda: window_graph(8, 8, 4),
    "win 8x8 w4 s2": lambda: window_graph(8, 8, 4, 2),
    "win 10x7 w4 s3": lambda: window_graph(10, 7, 4, 3),
    "win 5x6 w7 s3": lambda: window_graph(5, 6, 7, 3),
    "win 1-D 12 w4": lambda: window_graph((12,), 4),  # dense layout = edge order: per-edge values used as given
    "win 1-D 8 w8": lambda: window_graph((8,), 8),  # one tile of all pairs (the temporal path's graph)
    "na 35x21 k7": lambda: neighborhood_graph(35, 21, 7),  # halo windows: border tiles + one run of interior tiles
    "win 3-D 4x6x6 s1": lambda: window_graph((4, 6, 6), (2, 3, 3), (1, 1, 1)),  # rolled blocks on 3 axes
    "win 7x7 w7": lambda: window_graph(7, 7, 7),  # Swin's last stage: one window, the tile order is the grid's
}


def inputs(g: Graph, H: int, D: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(g.num_dst, H, D, generator=gen, dtype=dtype).requires_grad_() for _ in range(3))
    bias = torch.randn(g.num_edges, H, generator=gen, dtype=dtype).requires_grad_()
    ew = torch.rand(g.num_edges, generator=gen, dtype=dtype).requires_grad_()
    return q, k, v, bias, ew


def run(g, q, k, v, backend, attention=True, **kw):
    """Outputs and gradients of a fixed random loss over the output (and the attention)."""
    res = ops.sparse_attention(g, q, k, v, return_attention=attention, backend=backend, **kw)
    out, attn = res if attention else (res, None)
    gen = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    if attention:
        loss = loss + (attn * attn).sum()
    leaves = [q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    return [out] + ([attn] if attention else []) + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extras", ["none", "bias", "bias+edge_weight", "bias (E, 1)"])
def test_structured_equals_torch(name, dtype, extras):
    g = GRAPHS[name]()
    q, k, v, bias, ew = inputs(g, H=4, D=8, dtype=dtype)
    kw = {}
    if "bias" in extras:
        kw["bias"] = bias[:, :1] if "(E, 1)" in extras else bias
    if "edge_weight" in extras:
        kw["edge_weight"] = ew
    auto = run(g, q, k, v, None, **kw)
    ref = run(g, q, k, v, "torch", **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    names = ["out", "attention", "grad q", "grad k", "grad v", "grad bias", "grad edge_weight"]
    for n, a, b in zip(names, auto, ref):
        err = float((a - b).detach().abs().max())
        assert err <= tol, f"{name} {dtype} {extras}: {n} differs from the torch backend by {err:.3g}"


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", ["none", "constant bias"])
def test_structured_fused_call_equals_torch(name, dtype, bias):
    """Without attention output, dropout, edge weights or a bias that needs a gradient, the structured
    backend makes one fused attention call (SDPA); it must agree with the generic path too."""
    g = GRAPHS[name]()
    q, k, v, b, _ = inputs(g, H=3, D=8, dtype=dtype, seed=5)
    kw = {"bias": b.detach()} if bias != "none" else {}
    auto = run(g, q, k, v, None, attention=False, **kw)
    ref = run(g, q, k, v, "torch", attention=False, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for n, a, r in zip(["out", "grad q", "grad k", "grad v"], auto, ref):
        err = float((a - r).detach().abs().max())
        assert err <= tol, f"{name} {dtype} {bias}: {n} differs from the torch backend by {err:.3g}"


@pytest.mark.parametrize("head_major", [False, True])
def test_bias_in_edge_order_is_not_written_into(head_major):
    """Where the dense layout is the edge order, the caller's bias is read in place, never modified."""
    g = window_graph((8,), 8)
    assert g.structure.tiling.edge_order and not neighborhood_graph(8, 8, 3).structure.tiling.edge_order
    q, k, v, bias, _ = inputs(g, H=3, D=4, dtype=torch.float64)
    given = bias.detach().t().contiguous().t() if head_major else bias.detach().clone()  # (E, H)
    kept = given.clone()
    for attention in (False, True):
        got = run(g, q, k, v, "structured", attention, bias=given)
        ref = run(g, q, k, v, "torch", attention, bias=given)
        assert torch.equal(given, kept), "the bias was written into"
        for a, r in zip(got, ref):
            assert float((a - r).detach().abs().max()) < 1e-12


def test_structured_is_chosen_automatically():
    g = neighborhood_graph(8, 8, 3)
    q = torch.randn(64, 2, 4)
    mod = select(None, g, q, q, q, op="sparse_attention", score="dot", bias=None)
    assert mod.NAME == "structured"
    plain = Graph(g.src, g.dst, 64, 64)  # same edges, no structure: the generic path
    assert select(None, plain, q, q, q, op="sparse_attention", score="dot", bias=None).NAME != "structured"


def test_structured_reasons():
    from gatx.backends import structured

    g = neighborhood_graph(8, 8, 3)
    q = torch.randn(64, 2, 4)
    assert structured.reasons(g, q, q, q, op="sparse_attention", score="dot") == []
    assert "regular structure" in structured.reasons(Graph(g.src, g.dst, 64, 64), q, op="sparse_attention")[0]
    assert "score='dot'" in structured.reasons(g, q, op="sparse_attention", score="additive")[0]
    assert structured.reasons(g, q, op="edge_softmax") != []
    with pytest.raises(BackendUnavailable, match="regular structure"):
        ops.sparse_attention(Graph(g.src, g.dst, 64, 64), q, q, q, backend="structured")


def test_additive_score_falls_back():
    """GAT-style scores on a grid graph run on the generic path and still agree with it."""
    g = neighborhood_graph(8, 8, 3)
    gen = torch.Generator().manual_seed(0)
    el, er, v = torch.randn(64, 2, generator=gen), torch.randn(64, 2, generator=gen), torch.randn(64, 2, 3, generator=gen)
    a = ops.sparse_attention(g, er, el, v, score="additive")
    b = ops.sparse_attention(g, er, el, v, score="additive", backend="torch")
    assert float((a - b).abs().max()) < 1e-6


def test_attention_dropout():
    """Dropout in the structured path: the output is exactly the returned (dropped) attention applied to v."""
    g = window_graph(8, 8, 4, 2)
    q, k, v, bias, _ = (t.detach() for t in inputs(g, H=3, D=4, dtype=torch.float64))
    torch.manual_seed(0)
    out, attn = ops.sparse_attention(g, q, k, v, bias=bias, dropout_p=0.5, return_attention=True)
    again = ops.aggregate(g, attn, v, backend="torch")
    assert float((out - again).abs().max()) < 1e-12
    _, plain = ops.sparse_attention(g, q, k, v, bias=bias, return_attention=True)
    zeroed = (attn == 0) & (plain > 0)
    assert 0.3 < float(zeroed.double().mean()) < 0.7, "about half the weights must be dropped"
    kept = ~zeroed
    assert float((attn[kept] - 2 * plain[kept]).abs().max()) < 1e-12, "kept weights are scaled by 1 / (1 - p)"
    evald = ops.sparse_attention(g, q, k, v, bias=bias, dropout_p=0.5, training=False)
    assert float((evald - ops.sparse_attention(g, q, k, v, bias=bias, backend="torch")).abs().max()) < 1e-12


@settings(max_examples=15, deadline=None)
@given(
    Y=st.integers(3, 14), X=st.integers(3, 14), k=st.sampled_from([1, 3]), d=st.integers(1, 3),
    w=st.integers(1, 6), s=st.integers(0, 5), window=st.booleans(),
)
def test_structured_property(Y, X, k, d, w, s, window):
    if window:
        g = window_graph(Y, X, w, s % w)
    elif min(Y, X) >= k * d:
        g = neighborhood_graph(Y, X, k, d)
    else:
        return
    q, k_, v, bias, _ = inputs(g, H=2, D=3, dtype=torch.float64, seed=Y * 100 + X)
    attention = bool((Y + X) % 2)  # half the cases take the fused call
    auto = run(g, q, k_, v, None, attention, bias=bias)
    ref = run(g, q, k_, v, "torch", attention, bias=bias)
    for a, b in zip(auto, ref):
        assert float((a - b).detach().abs().max()) < 1e-10


def test_fast_paths_are_taken():
    """The layouts the fast paths rely on: (shifted) windows as blocks of the rolled grid with keys laid
    out like queries, unshifted windows' per-edge values as rows, neighborhood halos as strided windows."""
    shifted = window_graph(8, 8, 4, 2).structure.tiling
    assert shifted.blocks is not None and shifted.keys_are_queries and not shifted.full
    assert [a.rotation for a in shifted.axes] == [2, 2]
    plain = window_graph(8, 8, 4).structure.tiling
    assert plain.blocks is not None and plain.keys_are_queries and plain.edge_rows
    na = neighborhood_graph(35, 21, 7).structure.tiling
    assert na.blocks is not None and na.halo is not None and not na.keys_are_queries
    assert [r[:2] for r in na.halo.runs[0]] == [(0, 1), (1, 4), (4, 5)], na.halo.runs  # border tiles alone
    assert neighborhood_graph(11, 9, 3, 2).structure.tiling.halo is None  # dilated: halos are not ranges


@pytest.mark.parametrize("name", ["win 8x8 w4 s2", "win 3-D 4x6x6 s1", "na 13x10 k5", "na 35x21 k7",  # 13x10: halo only
                                  "win 1-D 12 w4"])  # an identity plan: the moves are x itself
def test_block_and_halo_moves_are_adjoint(name):
    """to_blocks / from_blocks are inverse permutations and the halo gather's backward is its adjoint
    (<gather(x), y> = <x, scatter(y)>); the backward of the backward is the move again (exact double backward)."""
    tl = GRAPHS[name]().structure.tiling
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, tl.num_nodes, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    moves = ([tl.blocks.to_blocks] if tl.blocks is not None else []) + ([tl.halo.gather] if tl.halo is not None else [])
    assert moves, f"{name}: no fast path to check"
    if tl.blocks is not None:
        y = tl.blocks.to_blocks(x)
        assert torch.equal(tl.blocks.from_blocks(y), x), f"{name}: from_blocks(to_blocks(x)) != x"
        assert torch.equal(y, x[:, tl.query_nodes.index]), f"{name}: slots hold the wrong nodes"
    if tl.halo is not None:
        keys = tl.halo.gather(x)
        assert torch.equal(keys, x[:, tl.key_nodes.index]), f"{name}: halo windows differ from the key gather"
    for move in moves:
        out = move(x)
        r = torch.randn(out.shape, generator=gen, dtype=torch.float64, requires_grad=True)
        (back,) = torch.autograd.grad(out, x, r, create_graph=True)
        err = float(((out * r).sum() - (x * back).sum()).detach())
        assert abs(err) < 1e-10, f"{name}: {move.__name__} backward is not its adjoint ({err:.3g})"
        z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        (again,) = torch.autograd.grad(back, r, z)  # the backward of the backward: the move itself
        assert torch.equal(again, move(z)), f"{name}: {move.__name__} double backward differs from the move"


IDENTITY = {((8,), 8, 0): True, ((12,), 4, 0): True, ((12,), 4, 2): False, ((7, 7), 7, 0): True,
            ((14, 7), 7, 0): True, ((14, 14), 7, 0): False, ((7, 14), 7, 0): False, ((14, 14), 7, 3): False,
            ((4, 7, 7), (2, 7, 7), 0): True, ((4, 14, 14), (2, 7, 7), 0): False, ((1, 14, 14), (1, 7, 7), 0): False}


@pytest.mark.parametrize("case", list(IDENTITY))
def test_identity_block_plans(case):
    """A block plan is marked ``identity`` exactly when its strided copies would leave every row where it is
    (one window over the grid, 1-D windows, Swin's last stage, windows cut along the first axis only); then
    both moves return x itself, and the result equals the copies' (so no caller depends on which ran)."""
    from gatx.backends import structured_moves as moves

    shape, window, shift = case
    plan = window_graph(shape, window, shift).structure.tiling.blocks
    x = torch.randn(2, torch.Size(plan.shape).numel(), 3, dtype=torch.float64)
    copied = moves._ToBlocks.apply(x, plan)
    assert plan.identity == IDENTITY[case] == torch.equal(copied, x), (case, plan.nts, plan.Ts)
    if plan.identity:
        assert plan.to_blocks(x) is x and plan.from_blocks(x) is x
    assert torch.equal(plan.to_blocks(x), copied) and torch.equal(plan.from_blocks(copied), x)


@pytest.mark.parametrize("case", [((14, 14), 7, 0), ((14, 14), 7, 3), ((14, 21), 7, (3, 2)), ((4, 6, 6), (2, 3, 3), (1, 1, 1)),
                                  ((12,), 4, 2)])
def test_block_moves_gather_equals_copies(monkeypatch, case):
    """A block plan moves rows by one row gather (its cached permutation) or, for large moves on several
    threads, by its strided copies (``_by_copies``): both give the same tensor, both ways, and the
    permutation and its inverse are inverse maps on the tensor's device."""
    from gatx.backends import structured_moves as moves

    shape, window, shift = case
    plan = window_graph(shape, window, shift).structure.tiling.blocks
    assert plan is not None and not plan.identity, case
    x = torch.randn(3, torch.Size(shape).numel(), 5, dtype=torch.float64)
    got = {}
    for copies in (False, True):
        monkeypatch.setattr(moves, "_by_copies", lambda plan, x, copies=copies: copies)
        tiles = plan.to_blocks(x)
        got[copies] = (tiles, plan.from_blocks(tiles))
    assert torch.equal(got[False][0], got[True][0]) and torch.equal(got[False][1], x) and torch.equal(got[True][1], x)
    perm, inv = plan.rows(x.device)
    assert perm.dtype == torch.long and torch.equal(perm[inv], torch.arange(perm.numel()))
    assert plan.rows(x.device)[0] is perm  # built once per device


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3), st.booleans()), min_size=1, max_size=3))
def test_identity_flag_matches_the_copies(axes):
    """Over random 1-3-D (shifted) window grids: ``identity`` iff the copies are the identity permutation
    (a shifted axis of one window has no block plan: its rolled window is not a block of the grid)."""
    from gatx.backends import structured_moves as moves

    window = tuple(w for w, _, _ in axes)
    shape = tuple(w * n for w, n, _ in axes)
    shift = tuple(w // 2 if s else 0 for w, _, s in axes)
    plan = window_graph(shape, window, shift).structure.tiling.blocks
    if plan is None:
        assert any(s and n == 1 for (_, n, s) in axes), (shape, window, shift)
        return
    x = torch.randn(2, torch.Size(shape).numel(), 3, dtype=torch.float64)
    assert plan.identity == torch.equal(moves._ToBlocks.apply(x, plan), x), (shape, window, shift)


@pytest.mark.parametrize("case", ["window_shift", "window_3d", "na_2d", "na_2d_rect", "na_3d"])
def test_row_gathers_equal_the_strided_moves(case):
    """While torch.compile traces, tiles are filled and emptied by the tiling's row gathers (query_nodes,
    key_nodes, owner) instead of the strided moves: the same rows as the copies (to_blocks, from_blocks,
    the halo gather), and the key gather's backward is the halo scatter."""
    from gatx.backends import structured_moves as moves

    graph = {"window_shift": lambda: window_graph((14, 21), 7, 3), "window_3d": lambda: window_graph((4, 6, 6), (2, 3, 3), (1, 1, 1)),
             "na_2d": lambda: neighborhood_graph((20, 20), 7), "na_2d_rect": lambda: neighborhood_graph((12, 17), (3, 5)),
             "na_3d": lambda: neighborhood_graph((6, 9, 10), (3, 3, 5))}[case]()
    tiling = graph.structure.tiling
    assert tiling.blocks is not None or tiling.halo is not None, case
    N = graph.num_dst
    x = torch.randn(2, N, 3, dtype=torch.float64, requires_grad=True)
    if tiling.blocks is not None and not tiling.blocks.identity:
        plan = tiling.blocks
        tiles = moves._ToBlocks.apply(x, plan)
        assert torch.equal(tiling.query_nodes(x), tiles)
        assert torch.equal(tiling.owner(tiles), moves._FromBlocks.apply(tiles, plan))
    if tiling.halo is not None:
        plan = tiling.halo
        halo = moves._HaloGather.apply(x, plan)
        assert torch.equal(tiling.key_nodes(x), halo)
        y = torch.randn(halo.shape, dtype=torch.float64)
        want = moves._HaloScatter.apply(y, plan)
        (got,) = torch.autograd.grad(tiling.key_nodes(x), x, y)
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
