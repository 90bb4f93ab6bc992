"""Window attention in tile order: the window graph renumbered so that each window is a run of nodes.

``window_tile_order`` renumbers a window graph (node ``t * Qt + j`` = slot j of window t); the window
modules move their tokens into that order before the qkv projection and back after the output
projection (Swin's partition and reverse), so the structured backend moves no q, k or v. These tests
pin the renumbering to the window graph, and the module's results (outputs, every gradient, dropout
draws, second order) to the row-major path it replaces.
"""
from __future__ import annotations

import pytest
import torch

from gatx.vision import WindowAttention, WindowAttention3d, window_graph
from gatx.vision.grid import window_tile_order


@pytest.mark.parametrize("shape,w,s", [((8, 8), (4, 4), (0, 0)), ((12, 8), (4, 4), (3, 2)), ((16,), (4,), (2,)),
                                       ((4, 8, 8), (2, 4, 4), (1, 2, 2))])
def test_renumbered_graph_is_the_window_graph(shape, w, s):
    """Same edges (in the same order) under the permutation, tiles that are runs of nodes, same bias rows."""
    graph = window_graph(shape, w, s)
    tiled, plan = window_tile_order(shape, w, s)
    N = graph.num_src
    perm = plan.to_blocks(torch.arange(N, dtype=torch.float64).view(1, N, 1)).view(-1).long()  # grid node per slot
    assert torch.equal(torch.sort(perm).values, torch.arange(N))
    assert torch.equal(perm[tiled.src], graph.src) and torch.equal(perm[tiled.dst], graph.dst)
    T, Qt, _ = tiled.structure.tiling.mask.shape
    assert torch.equal(tiled.dst // Qt, tiled.src // Qt), "an edge leaves its window"
    assert tiled.structure.tiling.blocks.identity and torch.equal(tiled.structure.rel_pos_index,
                                                                  graph.structure.rel_pos_index)
    assert window_tile_order(shape, w, s)[0] is tiled  # cached


@pytest.mark.parametrize("shape,w,s", [((10, 8), (4, 4), (0, 0)), ((8, 8), (8, 8), (0, 0)), ((16,), (4,), (0,)),
                                       ((9, 9), (3, 3), (0, 0))])
def test_no_renumbering_without_a_move_to_save(shape, w, s):
    """Windows cut short at a side (padded slots), or tiles already in row order: None (the row-major path)."""
    got = window_tile_order(shape, w, s)
    if shape == (9, 9):  # a full partition: renumbered
        assert got is not None
    else:
        assert got is None


def _results(module, x, gout, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = module(x)
    return [out.detach(), *torch.autograd.grad(out, [x, *module.parameters()], gout)]


@pytest.mark.parametrize("make,shape", [
    (lambda: WindowAttention(12, 4, 3, shift_size=0), (2, 8, 12)),
    (lambda: WindowAttention(12, 4, 3, shift_size=2), (2, 12, 8)),
    (lambda: WindowAttention(12, (4, 2), 3, shift_size=(3, 1), attn_drop=0.3), (2, 8, 8)),
    (lambda: WindowAttention3d(12, (2, 4, 4), 3, shift_size=(1, 2, 2)), (1, 4, 8, 8)),
])
def test_module_equals_the_row_major_path(make, shape, monkeypatch):
    """float64: output and all gradients equal to rounding (dropout: the same draws, in the same dense layout)."""
    torch.manual_seed(0)
    m = make().double()
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0, 0.5)
    x = torch.randn(*shape, 12, dtype=torch.float64)
    gout = torch.randn(*shape, 12, dtype=torch.float64)
    moved = []
    real = type(m)._tile_order
    monkeypatch.setattr(type(m), "_tile_order", lambda self, *a: moved.append(1) or real(self, *a))
    tiled = _results(m, x, gout, seed=5)
    assert moved, "the module did not take the tile order"
    monkeypatch.setattr(type(m), "_tile_order", lambda self, *a: None)
    plain = _results(m, x, gout, seed=5)
    for name, a, b in zip(["out", "x"] + [n for n, _ in m.named_parameters()], tiled, plain):
        assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.abs().max())), f"{name} differs"


def test_second_order_gradients_through_the_moves():
    """gradcheck and gradgradcheck of a shifted window module in tile order (the moves are each other's adjoint)."""
    torch.manual_seed(0)
    m = WindowAttention(4, 2, 2, shift_size=1).double()
    assert m._tile_order((4, 4), torch.device("cpu")) is not None
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))
    assert torch.autograd.gradgradcheck(m, (x,))


def test_other_backends_keep_row_major_order(monkeypatch):
    """An explicit per-edge backend gains nothing from the moves: the module does not ask for the tile order."""
    m = WindowAttention(8, 4, 2, shift_size=2, backend="torch")
    monkeypatch.setattr(type(m), "_tile_order", lambda self, *a: pytest.fail("tile order asked for"))
    m(torch.randn(1, 8, 8, 8))
