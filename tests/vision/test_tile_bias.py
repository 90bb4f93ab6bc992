"""The structured backend's shared-tile bias: a grid's TableBias stays one tile's block when every
tile reads the same table rows (windows), and gives the per-edge values and gradients exactly."""
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
