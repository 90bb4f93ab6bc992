"""gatx.vision grid builders against NATTEN's and Swin's definitions (masks, edge order, bias indices)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from vision_reference import neighborhood_reference, window_reference

from gatx import Graph
from gatx.vision import GridStructure, neighborhood_graph, window_graph


def dense_of(g: Graph) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, N) [query, key] mask and bias-table row of a grid graph (-1 where there is no edge)."""
    N = g.num_dst
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[g.dst, g.src] = True
    index = torch.full((N, N), -1, dtype=torch.int64)
    index[g.dst, g.src] = g.structure.rel_pos_index
    return mask, index


def check_order(g: Graph) -> None:
    """Edges sorted by query, then by key; no duplicates."""
    key = g.dst * g.num_src + g.src
    assert bool((key[1:] > key[:-1]).all()), "edges must be sorted by (query, key) without duplicates"


NA_CASES = [  # (Y, X, k, d): borders, odd and even sizes, dilation with and without remainder
    (7, 7, 7, 1), (8, 9, 3, 1), (10, 13, 5, 1), (9, 11, 3, 2), (12, 12, 3, 3), (13, 8, 3, 2), (15, 16, 5, 3), (5, 6, 1, 4),
]


@pytest.mark.parametrize("Y,X,k,d", NA_CASES)
def test_neighborhood_graph_matches_natten(Y, X, k, d):
    g = neighborhood_graph(Y, X, k, d)
    mask, index = neighborhood_reference(Y, X, k, d)
    got_mask, got_index = dense_of(g)
    assert torch.equal(got_mask, mask), f"{int((got_mask != mask).sum())} pairs differ from NATTEN's neighborhoods"
    assert torch.equal(got_index, index), f"{int((got_index != index).sum())} bias indices differ from NATTEN's"
    assert g.num_edges == Y * X * k * k and bool((g.in_degrees() == k * k).all())
    check_order(g)
    s = g.structure
    assert isinstance(s, GridStructure) and (s.kind, s.shape, s.size, s.dilation, s.table_size) == (
        "neighborhood", (Y, X), (k, k), (d, d), (2 * k - 1) ** 2)
    # offsets are NATTEN's (key - query) / dilation, and the bias row is built from them
    qy, qx, ky, kx = g.dst // X, g.dst % X, g.src // X, g.src % X
    assert torch.equal(s.offsets, torch.stack([(ky - qy) // d, (kx - qx) // d], 1))


def test_neighborhood_edge_order_is_natten_layout():
    """A query's k*k edges are its keys in row-major window order, so attention reshapes to (Y, X, k, k)."""
    Y, X, k = 6, 7, 3
    g = neighborhood_graph(Y, X, k)
    keys = g.src.view(Y, X, k, k)
    ky, kx = keys // X, keys % X
    assert bool((ky[..., 1:, :] > ky[..., :-1, :]).all()) and bool((kx[..., :, 1:] > kx[..., :, :-1]).all())


WINDOW_CASES = [  # (Y, X, w, s): multiples, shifts, not multiples, window larger than the map
    (8, 8, 4, 0), (8, 8, 4, 2), (12, 8, 4, 1), (14, 14, 7, 3), (10, 7, 4, 0), (10, 7, 4, 3), (9, 11, 3, 1),
    (5, 6, 7, 0), (5, 6, 7, 3), (3, 20, 4, 2),
]


@pytest.mark.parametrize("Y,X,w,s", WINDOW_CASES)
def test_window_graph_matches_swin(Y, X, w, s):
    g = window_graph(Y, X, w, s)
    mask, index = window_reference(Y, X, w, s)
    got_mask, got_index = dense_of(g)
    assert torch.equal(got_mask, mask), f"{int((got_mask != mask).sum())} pairs differ from Swin's roll + mask"
    assert torch.equal(got_index, index), f"{int((got_index != index).sum())} bias indices differ from Swin's"
    check_order(g)
    qy, qx, ky, kx = g.dst // X, g.dst % X, g.src // X, g.src % X
    assert torch.equal(g.structure.offsets, torch.stack([qy - ky, qx - kx], 1)), "offsets must be Swin's query - key"


def test_window_graph_is_block_diagonal_without_shift():
    g = window_graph(8, 8, 4)
    assert g.num_edges == 4 * 16 * 16 and bool((g.in_degrees() == 16).all())


def test_builders_are_cached():
    a = neighborhood_graph(9, 10, 3, 2)
    assert neighborhood_graph(9, 10, 3, 2) is a
    assert neighborhood_graph(9, 10, 3, 2, device="cpu") is a
    assert neighborhood_graph(9, 10, 3, 1) is not a
    w = window_graph(8, 8, 4, 2)
    assert window_graph(8, 8, 4, 2) is w and window_graph(8, 8, 4, 0) is not w


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: neighborhood_graph(8, 8, 3, 3), "kernel_size \\* dilation"),
        (lambda: neighborhood_graph(8, 8, 0), "kernel_size"),
        (lambda: neighborhood_graph(8.0, 8, 3), "height"),
        (lambda: window_graph(8, 8, 4, 4), "shift"),
        (lambda: window_graph(8, 8, 0), "window_size"),
        (lambda: window_graph(8, 8, 4, -1), "shift"),
    ],
)
def test_builder_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@settings(max_examples=25, deadline=None)
@given(
    Y=st.integers(1, 12), X=st.integers(1, 12), k=st.sampled_from([1, 3, 5]), d=st.integers(1, 3),
)
def test_neighborhood_property(Y, X, k, d):
    if min(Y, X) < k * d:
        with pytest.raises(ValueError):
            neighborhood_graph(Y, X, k, d)
        return
    g = neighborhood_graph(Y, X, k, d)
    mask, index = neighborhood_reference(Y, X, k, d)
    got_mask, got_index = dense_of(g)
    assert torch.equal(got_mask, mask) and torch.equal(got_index, index)


@settings(max_examples=25, deadline=None)
@given(Y=st.integers(1, 12), X=st.integers(1, 12), w=st.integers(1, 6), s=st.integers(0, 5))
def test_window_property(Y, X, w, s):
    if s >= w:
        with pytest.raises(ValueError):
            window_graph(Y, X, w, s)
        return
    g = window_graph(Y, X, w, s)
    mask, index = window_reference(Y, X, w, s)
    got_mask, got_index = dense_of(g)
    assert torch.equal(got_mask, mask) and torch.equal(got_index, index)
    check_order(g)


@pytest.mark.parametrize("make", [lambda: neighborhood_graph(9, 8, 3, 2), lambda: window_graph(9, 8, 4, 1)])
@pytest.mark.parametrize("batch", [1, 3])
def test_relative_position_bias_gather(make, batch):
    """structure.relative_position_bias equals table[rel_pos_index] repeated over the batch, grads included."""
    s = make().structure
    table = torch.randn(s.table_size, 2, dtype=torch.float64, requires_grad=True)
    got = s.relative_position_bias(table, batch)
    ref = table[s.rel_pos_index].repeat(1, batch)
    assert torch.equal(got, ref)
    w = torch.randn(ref.shape, dtype=torch.float64)
    (g1,) = torch.autograd.grad((got * w).sum(), table)
    (g2,) = torch.autograd.grad((ref * w).sum(), table)
    assert float((g1 - g2).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="table"):
        s.relative_position_bias(torch.zeros(s.table_size + 1, 2))


def test_docstring_examples_run():
    import doctest

    import gatx.vision.grid
    import gatx.vision.neighborhood
    import gatx.vision.window

    for mod in (gatx.vision.grid, gatx.vision.neighborhood, gatx.vision.window):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, f"{mod.__name__}: {result.failed} docstring examples failed"
