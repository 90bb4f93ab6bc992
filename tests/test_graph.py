"""gatx.Graph: construction from every source, validation, CSR, transforms."""
from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import dgl_or_none
from hypothesis import given, settings
from hypothesis import strategies as st

from gatx import Graph


@st.composite
def edge_lists(draw, max_nodes=12, max_edges=40):
    n_src = draw(st.integers(0, max_nodes))
    n_dst = draw(st.integers(0, max_nodes))
    e = draw(st.integers(0, max_edges)) if n_src and n_dst else 0
    src = draw(st.lists(st.integers(0, max(n_src - 1, 0)), min_size=e, max_size=e))
    dst = draw(st.lists(st.integers(0, max(n_dst - 1, 0)), min_size=e, max_size=e))
    return torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64), n_src, n_dst


@settings(max_examples=60, deadline=None)
@given(edge_lists())
def test_csr_groups_edges_by_dst_in_order(data):
    src, dst, n_src, n_dst = data
    g = Graph(src, dst, n_src, n_dst)
    indptr, perm, csr_src = g.csr()
    assert indptr.shape == (n_dst + 1,) and int(indptr[-1]) == src.numel()
    assert torch.equal(g.in_degrees(), torch.bincount(dst, minlength=n_dst))
    for i in range(n_dst):
        ids = perm[indptr[i]:indptr[i + 1]]
        expected = torch.nonzero(dst == i).flatten()  # edges into i, in edge-id order
        assert torch.equal(ids, expected)
        assert torch.equal(csr_src[indptr[i]:indptr[i + 1]], src[expected])


@settings(max_examples=40, deadline=None)
@given(edge_lists())
def test_transforms_keep_counts(data):
    src, dst, n_src, n_dst = data
    g = Graph(src, dst, n_src, n_dst, is_block=n_dst <= n_src)
    if g.is_block or n_src == n_dst:
        loops = g.add_self_loops()
        assert loops.num_edges == g.num_edges + n_dst
        assert bool((loops.in_degrees() >= 1).all())
        assert torch.equal(loops.src[g.num_edges:], torch.arange(n_dst))
    no_loops = g.remove_self_loops()
    assert not bool((no_loops.src == no_loops.dst).any())
    r = g.reverse()
    assert (r.num_src, r.num_dst) == (n_dst, n_src) and torch.equal(r.src, dst)


def test_defaults_and_repr():
    g = Graph(torch.tensor([0, 3]), torch.tensor([1, 2]))
    assert (g.num_src, g.num_dst, g.num_edges) == (4, 4, 2) and g.is_homogeneous
    assert "num_src=4" in repr(g) and "homogeneous" in repr(g)
    b = Graph(torch.tensor([0, 4], dtype=torch.int32), torch.tensor([1, 0], dtype=torch.int32), 5, 2)
    assert b.src.dtype == torch.int64 and not b.is_homogeneous and "bipartite" in repr(b)
    assert torch.equal(b.edge_index, torch.tensor([[0, 4], [1, 0]]))


@pytest.mark.parametrize(
    "src, dst, kwargs, match",
    [
        (torch.tensor([0.0, 1.0]), torch.tensor([1, 0]), {}, "int64 or int32"),
        (torch.tensor([0, 1]), torch.tensor([1]), {}, "one entry per edge"),
        (torch.tensor([[0, 1]]), torch.tensor([[1, 0]]), {}, "1-D"),
        (torch.tensor([0, 5]), torch.tensor([1, 0]), {"num_src": 3, "num_dst": 3}, "src ids must be < num_src=3"),
        (torch.tensor([0, 1]), torch.tensor([1, 7]), {"num_src": 3, "num_dst": 3}, "dst ids must be < num_dst=3"),
        (torch.tensor([-1, 1]), torch.tensor([1, 0]), {}, "non-negative"),
        (torch.tensor([0, 1]), torch.tensor([1, 0]), {"num_src": -2}, "non-negative int"),
        (torch.tensor([0, 1]), torch.tensor([1, 0]), {"num_src": 2, "num_dst": 3, "is_block": True}, "prefix"),
    ],
)
def test_bad_input_raises_value_error(src, dst, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Graph(src, dst, **kwargs)


def test_from_edge_index_and_bad_shape():
    ei = torch.tensor([[0, 1, 2], [1, 2, 0]])
    g = Graph.from_edge_index(ei)
    assert torch.equal(g.src, ei[0]) and torch.equal(g.dst, ei[1]) and g.num_src == 3
    gb = Graph.from_edge_index(ei, (4, 3))
    assert (gb.num_src, gb.num_dst) == (4, 3)
    with pytest.raises(ValueError, match=r"shape \(2, E\)"):
        Graph.from_edge_index(torch.tensor([0, 1, 2]))


def test_from_scipy_keeps_coo_order():
    m = sp.random(5, 4, density=0.5, format="csr", random_state=0)
    g = Graph.from_scipy(m)
    coo = m.tocoo()
    assert (g.num_src, g.num_dst) == (5, 4)
    assert np.array_equal(g.src.numpy(), coo.row) and np.array_equal(g.dst.numpy(), coo.col)
    with pytest.raises(ValueError, match="scipy.sparse"):
        Graph.from_scipy(np.eye(3))


def test_from_networkx_undirected_gives_both_directions():
    G = nx.Graph()
    G.add_nodes_from(["a", "b", "c", "d"])  # d isolated
    G.add_edges_from([("a", "b"), ("b", "c")])
    g = Graph.from_networkx(G)
    assert g.num_src == 4 and g.num_edges == 4
    pairs = set(zip(g.src.tolist(), g.dst.tolist()))
    assert pairs == {(0, 1), (1, 2), (1, 0), (2, 1)}
    D = nx.DiGraph([(0, 1)])
    assert Graph.from_networkx(D).num_edges == 1


@pytest.mark.skipif(dgl_or_none() is None, reason="DGL is not importable here")
def test_dgl_round_trip_and_blocks():
    dgl = dgl_or_none()
    g = Graph(torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 0, 0]))
    d = g.to_dgl()
    assert d.num_nodes() == 3 and torch.equal(torch.stack(d.edges()), g.edge_index)
    back = Graph.from_dgl(dgl.graph((torch.tensor([2, 0]), torch.tensor([1, 1])), num_nodes=4))
    assert torch.equal(back.src, torch.tensor([2, 0])) and back.num_src == 4
    block = dgl.create_block((torch.tensor([0, 3, 4]), torch.tensor([0, 1, 1])), num_src_nodes=5, num_dst_nodes=2)
    gb = Graph.from_dgl(block)
    assert gb.is_block and (gb.num_src, gb.num_dst) == (5, 2)
    bip = Graph(torch.tensor([0, 3]), torch.tensor([1, 0]), 4, 2).to_dgl()
    assert (bip.num_src_nodes(), bip.num_dst_nodes()) == (4, 2)


def test_to_device_is_identity_on_same_device():
    g = Graph(torch.tensor([0]), torch.tensor([0]))
    assert g.to("cpu") is g


def test_derived_graphs_share_guarded_storage():
    """reverse(), from_csr() and to() make no unchecked copies: a write through any of them is refused."""
    g = Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
    r = g.reverse()
    r.src[0] = 2  # r.src is g.dst
    for graph in (g, r):
        assert not graph.is_intact()
        with pytest.raises(ValueError, match="modified in place"):
            graph.csr()
    c = Graph.from_csr(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1]))
    c.csr().indptr[1] = 3
    with pytest.raises(ValueError, match=r"csr\(\).indptr was modified in place"):
        c.csr()
    assert Graph(torch.tensor([0]), torch.tensor([0])).to("cpu").is_intact()


def _copies():
    import copy
    import io
    import pickle

    def saved(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return {"deepcopy": copy.deepcopy, "pickle": lambda obj: pickle.loads(pickle.dumps(obj)), "torch.save": saved}


def _graphs():
    import copy

    from gatx.vision import routed_region_graph, window_graph

    plain = Graph(torch.randint(0, 30, (120,)), torch.randint(0, 30, (120,)), 30, 30)
    plain.csr(), plain.csc(), plain.in_degrees()  # guarded caches too
    idx = torch.randint(0, 4, (2, 4, 2), generator=torch.Generator().manual_seed(0))
    # private copies of the builders' graphs, which share cached tensors: this test writes into its graph
    return {"plain": plain, "window": copy.deepcopy(window_graph(8, 8, 4, shift=2)),
            "routed": copy.deepcopy(routed_region_graph(idx, (8, 8), 2))}


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("kind", ["plain", "window", "routed"])
def test_copies_of_a_graph_work_and_stay_guarded(how, kind):
    """A copied Graph (pickle, deepcopy, torch.save: a DataLoader worker's batches too) gives the same
    results, refuses in-place writes to its own tensors, and a graph written before the copy stays refused."""
    from gatx import ops

    graph = _graphs()[kind]
    copy_of = _copies()[how]
    n = graph.num_src
    q = torch.randn(n, 2, 4, generator=torch.Generator().manual_seed(1))
    copied = copy_of(graph)
    assert copied.is_intact() and torch.equal(ops.sparse_attention(copied, q, q, q), ops.sparse_attention(graph, q, q, q))
    copied.src.add_(0)  # an in-place write (of nothing) moves the copy's version counter
    assert not copied.is_intact() and graph.is_intact()
    with pytest.raises(ValueError, match="modified in place"):
        ops.sparse_attention(copied, q, q, q)
    graph.dst.add_(0)
    assert not copy_of(graph).is_intact()
