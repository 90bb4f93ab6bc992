"""The structured backend's shared-tile bias: a grid's TableBias stays one tile's block when every
tile reads the same table rows (windows), and gives the per-edge values and gradients exactly; where
tiles read different rows (neighborhoods), it is built from the tiles' few distinct row patterns."""
import pytest
import torch

import gatx
from gatx.vision import neighborhood_graph, window_graph
from gatx.vision.grid import _GridBias

UNIFORM = {
    "2d_shift0": lambda: window_graph((8, 8), 4, 0),
    "2d_shift2": lambda: window_graph((8, 12), 4, (2, 1)),
    "3d_shift": lambda: window_graph((4, 8, 8), (2, 4, 4), (1, 2, 2)),
    "1d_shift": lambda: window_graph((16,), 4, 1),
    "na_one_tile": lambda: neighborhood_graph((5, 5), 5),
}


@pytest.fixture
def no_per_edge(monkeypatch):
    """Fail if the grid bias is materialized per edge: the tile path must not need it."""
    def refuse(self, table=None):
        raise AssertionError("the per-edge bias was built")
    monkeypatch.setattr(_GridBias, "per_edge", refuse)


def _inputs(g, heads, batch, dtype, seed=0):
    torch.manual_seed(seed)
    N, D = g.num_dst, 3
    q, k, v = (torch.randn(batch * heads, N, D, dtype=dtype).transpose(0, 1).requires_grad_() for _ in range(3))
    table = torch.randn(g.structure.table_size, heads, dtype=dtype, requires_grad=True)
    return q, k, v, table


@pytest.mark.parametrize("name", sorted(UNIFORM))
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tile_bias_matches_the_torch_reference(name, batch, dtype, no_per_edge):
    g = UNIFORM[name]()
    assert g.structure.tile_rows is not None, "a window graph whose tiles all read the same rows"
    heads = 2
    q, k, v, table = _inputs(g, heads, batch, dtype)
    bias = g.structure.table_bias(table, batch)
    out = gatx.ops.sparse_attention(g, q, k, v, bias=bias, backend="structured")
    got = [out, *torch.autograd.grad(out.square().sum(), [q, k, v, table])]
    with torch.no_grad():  # the fused (no gradient) path with the same tile bias
        fused = gatx.ops.sparse_attention(g, q, k, v, bias=bias, backend="structured")
    per_edge = table[g.structure.rel_pos_index].repeat(1, batch)  # (E, batch * heads), the definition
    ref = gatx.ops.sparse_attention(g, q, k, v, bias=per_edge, backend="torch")
    want = [ref, *torch.autograd.grad(ref.square().sum(), [q, k, v, table])]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for what, a, b in zip(["out", "dq", "dk", "dv", "dtable"], got, want):
        err = float((a - b).detach().abs().max())
        assert err < tol, f"{name}: {what} differs from the per-edge reference by {err:.3g}"
    err = float((fused - ref).detach().abs().max())
    assert err < tol, f"{name}: the no-grad path differs by {err:.3g}"


@pytest.mark.parametrize("make", [lambda: window_graph((4, 4), 2, 1), lambda: window_graph((8,), 4, 1)])
def test_tile_bias_second_order(make, no_per_edge):
    """gradgradcheck through the dense core with a shared-tile bias and a mask (float64, small graphs)."""
    g = make()
    assert g.structure.tile_rows is not None and not g.structure.tiling.full
    q, k, v, table = _inputs(g, 1, 2, torch.float64)

    def f(q, k, v, table):
        return gatx.ops.sparse_attention(g, q, k, v, bias=g.structure.table_bias(table, 2), backend="structured")

    assert torch.autograd.gradgradcheck(f, (q, k, v, table), eps=1e-6, atol=1e-5)


def test_tile_rows_only_where_every_tile_agrees():
    """Clamped neighborhoods and windows with a short last window read different rows per tile: no tile rows."""
    assert neighborhood_graph((14, 14), 7).structure.tile_rows is None
    assert window_graph((11, 10), 4, 2).structure.tile_rows is None
    g = window_graph((8, 8), 4, 2)
    s, tl = g.structure, g.structure.tiling
    T, Qt, Kt = tl.mask.shape
    dense = torch.full((T * Qt * Kt,), -1, dtype=torch.long)
    dense[tl.edge_pos] = s.rel_pos_index
    dense = dense.view(T, Qt * Kt)
    allowed = dense >= 0
    assert bool((dense == s.tile_rows)[allowed].all()), "every allowed slot reads its tile row"


def test_window_module_takes_the_tile_path(no_per_edge):
    """WindowAttention on sides that are multiples of the window never builds the per-edge bias."""
    m = gatx.vision.WindowAttention(16, 4, 2, shift_size=2)
    x = torch.randn(2, 8, 8, 16, requires_grad=True)
    m(x).sum().backward()
    assert m.relative_position_bias_table.grad is not None


PATTERNS = {  # tiles that read different rows: clamped neighborhoods (any dilation / causality), short windows
    "na_2d": lambda: neighborhood_graph((14, 14), 7),
    "na_2d_dilated": lambda: neighborhood_graph((20, 18), 3, dilation=2),
    "na_1d_causal": lambda: neighborhood_graph((40,), 5, is_causal=True),
    "na_2d_causal": lambda: neighborhood_graph((10, 12), 3, is_causal=(True, False)),
    "na_3d": lambda: neighborhood_graph((5, 6, 7), 3),
    "window_short_last": lambda: window_graph((11, 10), 4, 2),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("batch,heads", [(1, 2), (3, 2), (2, 1)])
@pytest.mark.parametrize("grad", [True, False])
def test_row_pattern_bias_matches_the_torch_reference(name, batch, heads, grad, no_per_edge):
    """The dense bias from the distinct row patterns equals the per-edge definition: outputs and every
    gradient (float64), with and without gradients (the no-grad call takes the dense core too)."""
    g = PATTERNS[name]()
    assert g.structure.tile_rows is None and g.structure.dense_rows is not None
    q, k, v, table = _inputs(g, heads, batch, torch.float64)
    bias = g.structure.table_bias(table, batch)
    per_edge = table[g.structure.rel_pos_index].repeat(1, batch)  # (E, batch * heads), the definition
    with torch.set_grad_enabled(grad):
        out = gatx.ops.sparse_attention(g, q, k, v, bias=bias, backend="structured")
        ref = gatx.ops.sparse_attention(g, q, k, v, bias=per_edge, backend="torch")
    got, want = [out], [ref]
    if grad:
        got += torch.autograd.grad(out.square().sum(), [q, k, v, table])
        want += torch.autograd.grad(ref.square().sum(), [q, k, v, table])
    for what, a, b in zip(["out", "dq", "dk", "dv", "dtable"], got, want):
        err = float((a - b).detach().abs().max())
        assert err < 1e-12, f"{name}: {what} differs from the per-edge reference by {err:.3g}"


def test_row_patterns_are_the_tiles_rows():
    """Each tile's pattern holds its slots' table rows (the -inf row where masked), and interior tiles share one:
    a 56x56 map with k=7 has 9 patterns for its 64 tiles (corners, edges, interior)."""
    g = neighborhood_graph((20, 20), 5)
    s, tl = g.structure, g.structure.tiling
    T, Qt, Kt = tl.mask.shape
    patterns, tile_pattern = s.dense_rows
    R = s.table_size
    dense = patterns[tile_pattern].view(-1)  # (T * Qt * Kt,)
    assert torch.equal(dense[tl.edge_pos], s.rel_pos_index), "an edge's slot reads its row"
    masked = tl.pos_edge == g.num_edges
    assert bool((dense[masked] == R).all()) and bool((dense[~masked] < R).all()), "masked slots read the -inf row"
    assert patterns.shape[0] == len({tuple(r) for r in dense.view(T, -1).tolist()}), "the patterns are distinct"
    assert neighborhood_graph((56, 56), 7).structure.dense_rows[0].shape[0] == 9


def test_row_pattern_bias_second_order(no_per_edge):
    """gradgradcheck through the dense core with a row-pattern bias (float64, a small clamped neighborhood)."""
    g = neighborhood_graph((9, 4), 3)
    assert g.structure.dense_rows is not None and not g.structure.tiling.full
    q, k, v, table = _inputs(g, 1, 2, torch.float64)

    def f(q, k, v, table):
        return gatx.ops.sparse_attention(g, q, k, v, bias=g.structure.table_bias(table, 2), backend="structured")

    assert torch.autograd.gradgradcheck(f, (q, k, v, table), eps=1e-6, atol=1e-5)


def test_neighborhood_module_takes_the_pattern_path(no_per_edge):
    """NeighborhoodAttention2d with its relative position bias never builds the per-edge bias."""
    m = gatx.vision.NeighborhoodAttention2d(16, 2, 5)
    x = torch.randn(2, 9, 9, 16, requires_grad=True)
    m(x).sum().backward()
    assert m.relative_position_bias_table.grad is not None
