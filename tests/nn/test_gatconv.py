"""GATConv / GATv2Conv: parity with DGL's and PyG's layers (same weights), outputs and gradients."""
from __future__ import annotations

import pytest
import torch
from conftest import dgl_or_none, usable_backends

import gatx
from gatx import Graph

BACKENDS = usable_backends()
dgl = dgl_or_none()
needs_dgl = pytest.mark.skipif(dgl is None, reason="DGL is not importable here")
TOL = 1e-5


def rel_diff(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if a.numel() else 0.0


def random_edges(n_src, n_dst, e, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_src, (e,), generator=gen), torch.randint(0, n_dst, (e,), generator=gen)


def run(layer, graph, feat, backend=None, **kw):
    """Forward + backward through a fixed random projection; returns output, attention, grads."""
    feats = tuple(f.clone().requires_grad_() for f in feat) if isinstance(feat, tuple) else feat.clone().requires_grad_()
    extra = {"backend": backend} if backend else {}
    out, att = layer(graph, feats, get_attention=True, **kw, **extra)
    gen = torch.Generator().manual_seed(123)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    f_grads = [f.grad for f in (feats if isinstance(feats, tuple) else (feats,))]
    p_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad()
    return out, att, f_grads, p_grads


def assert_same(ours, ref, what):
    out, att, fg, pg = ours
    rout, ratt, rfg, rpg = ref
    assert out.shape == rout.shape, f"{what}: output shape {out.shape} vs {rout.shape}"
    assert rel_diff(out, rout) < TOL, f"{what}: output max diff {rel_diff(out, rout)}"
    assert rel_diff(att, ratt) < TOL, f"{what}: attention max diff {rel_diff(att, ratt)}"
    for a, b in zip(fg, rfg):
        assert rel_diff(a, b) < TOL, f"{what}: input grad max diff {rel_diff(a, b)}"
    assert pg.keys() == rpg.keys()
    for n in pg:
        assert rel_diff(pg[n], rpg[n]) < TOL, f"{what}: grad of {n} max diff {rel_diff(pg[n], rpg[n])}"


CASES = [  # (residual, bias, in_feats, activation)
    (False, True, 16, None),
    (True, True, 16, None),  # linear residual (16 != 12)
    (True, False, 12, torch.nn.functional.elu),  # identity residual
    (False, False, (16, 10), None),
    (True, True, (16, 10), None),
]


@needs_dgl
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual, bias, in_feats, act", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_gatconv_matches_dgl(backend, residual, bias, in_feats, act, weighted):
    torch.manual_seed(0)
    ref = dgl.nn.GATConv(in_feats, 4, 3, residual=residual, bias=bias, activation=act)
    ours = gatx.GATConv(in_feats, 4, 3, residual=residual, bias=bias, activation=act)
    ours.load_state_dict(ref.state_dict())
    if isinstance(in_feats, tuple):  # bipartite: 30 src, 20 dst
        src, dst = random_edges(30, 20, 150, seed=1)
        dst = torch.cat([dst, torch.arange(20)])
        src = torch.cat([src, torch.arange(20)])
        g = dgl.heterograph({("A", "r", "B"): (src, dst)}, {"A": 30, "B": 20})
        feat = (torch.randn(30, 16), torch.randn(20, 10))
    else:
        src, dst = random_edges(25, 25, 120, seed=2)
        g = dgl.add_self_loop(dgl.graph((src, dst), num_nodes=25))
        feat = torch.randn(25, in_feats)
    w = torch.rand(g.num_edges()) if weighted else None
    expected = run(ref, g, feat, edge_weight=w)
    for graph in (g, Graph.from_dgl(g)):  # a DGL graph or a gatx Graph
        assert_same(run(ours, graph, feat, backend, edge_weight=w), expected, f"GATConv {backend}")


@needs_dgl
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("share_weights", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_gatv2conv_matches_dgl(backend, share_weights, residual):
    torch.manual_seed(0)
    ref = dgl.nn.GATv2Conv(16, 4, 3, residual=residual, share_weights=share_weights)
    ours = gatx.GATv2Conv(16, 4, 3, residual=residual, share_weights=share_weights)
    ours.load_state_dict(ref.state_dict())
    src, dst = random_edges(25, 25, 120, seed=3)
    g = dgl.add_self_loop(dgl.graph((src, dst), num_nodes=25))
    feat = torch.randn(25, 16)
    assert_same(run(ours, g, feat, backend if backend in usable_backends("edge_softmax") else None), run(ref, g, feat), "GATv2Conv")


@needs_dgl
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", ["GATConv", "GATv2Conv"])
def test_sampling_block_matches_dgl(backend, layer):
    torch.manual_seed(0)
    ref = getattr(dgl.nn, layer)(16, 4, 2, residual=True)
    ours = getattr(gatx, layer)(16, 4, 2, residual=True)
    ours.load_state_dict(ref.state_dict())
    src, dst = random_edges(40, 12, 100, seed=4)
    block = dgl.create_block((torch.cat([src, torch.arange(12)]), torch.cat([dst, torch.arange(12)])), 40, 12)
    feat = torch.randn(40, 16)
    be = backend if layer == "GATConv" or backend in usable_backends("edge_softmax") else None
    assert_same(run(ours, block, feat, be), run(ref, block, feat), f"{layer} block")
    assert_same(run(ours, Graph.from_dgl(block), feat, be), run(ref, block, feat), f"{layer} gatx block")


@needs_dgl
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_in_degree_gives_zeros_plus_bias(backend):
    g = dgl.graph((torch.tensor([0, 1]), torch.tensor([1, 1])), num_nodes=4)
    ref = dgl.nn.GATConv(5, 3, 2, allow_zero_in_degree=True)
    ours = gatx.GATConv(5, 3, 2, allow_zero_in_degree=True)
    with torch.no_grad():
        ref.bias.uniform_()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 5)
    out = ours(g, x, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[[0, 2, 3]], ref.bias.view(1, 2, 3).expand(3, 2, 3))
    assert rel_diff(out, ref(g, x)) < TOL
    strict = gatx.GATConv(5, 3, 2)
    with pytest.raises(ValueError, match=r"3 dst nodes have no incoming edge.*add_self_loops"):
        strict(Graph.from_dgl(g), x)


@pytest.mark.parametrize("layer", ["GATConv", "GATv2Conv"])
def test_zero_in_degree_count_is_cached_and_guarded(layer):
    """The layers count zero-in-degree nodes once per graph; every call still raises on such a graph, and
    a write into the graph's indices (or its cached in-degrees) is still refused, not hidden by the count."""
    x = torch.randn(4, 5)
    conv = getattr(gatx, layer)(5, 3, 2)
    g = Graph(torch.tensor([0, 1]), torch.tensor([1, 1]), 4, 4)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"3 dst nodes have no incoming edge"):
            conv(g, x)
    assert g._zero_in == 3
    ok = Graph(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 0, 3, 2]), 4, 4)
    conv(ok, x)
    assert ok._zero_in == 0
    ok.in_degrees()[0] = 0  # the cached count must not outlive a write into the degrees
    with pytest.raises(ValueError, match="in place"):
        conv(ok, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edge_dim", [None, 6])
def test_gatconv_matches_pyg(backend, edge_dim):
    pyg = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    ref = pyg.GATConv(16, 4, heads=3, add_self_loops=False, edge_dim=edge_dim)
    ours = gatx.GATConv(16, 4, 3, edge_feats=edge_dim)
    with torch.no_grad():
        ref.bias.normal_()
        ours.fc.weight.copy_(ref.lin.weight)
        ours.attn_l.copy_(ref.att_src)
        ours.attn_r.copy_(ref.att_dst)
        ours.bias.copy_(ref.bias)
        if edge_dim:
            ours.fc_edge.weight.copy_(ref.lin_edge.weight)
            ours.attn_e.copy_(ref.att_edge)
    src, dst = random_edges(30, 30, 200, seed=5)
    ei = torch.stack([torch.cat([src, torch.arange(30)]), torch.cat([dst, torch.arange(30)])])
    x = torch.randn(30, 16)
    ef = torch.randn(ei.shape[1], edge_dim) if edge_dim else None
    out, (_, alpha) = ref(x, ei, edge_attr=ef, return_attention_weights=True)
    mine, att = ours(ei, x, get_attention=True, edge_feat=ef, backend=backend)  # edge_index input
    assert rel_diff(mine.flatten(1), out) < TOL, f"max diff {rel_diff(mine.flatten(1), out)}"
    assert rel_diff(att.squeeze(-1), alpha) < TOL


def test_gatv2conv_matches_pyg_with_edge_features():
    pyg = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    ref = pyg.GATv2Conv(16, 4, heads=3, add_self_loops=False, edge_dim=5)
    ours = gatx.GATv2Conv(16, 4, 3, edge_feats=5)
    with torch.no_grad():
        ours.fc_src.weight.copy_(ref.lin_l.weight)
        ours.fc_src.bias.copy_(ref.lin_l.bias)
        ours.fc_dst.weight.copy_(ref.lin_r.weight)
        ours.fc_dst.bias.copy_(ref.lin_r.bias)
        ours.fc_edge.weight.copy_(ref.lin_edge.weight)
        ours.attn.copy_(ref.att)
    src, dst = random_edges(30, 30, 200, seed=6)
    ei = torch.stack([torch.cat([src, torch.arange(30)]), torch.cat([dst, torch.arange(30)])])
    x, ef = torch.randn(30, 16), torch.randn(ei.shape[1], 5)
    out = ref(x, ei, edge_attr=ef) - ref.bias
    assert rel_diff(ours(ei, x, edge_feat=ef).flatten(1), out) < TOL


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_features_match_dense(layout, backend):
    torch.manual_seed(0)
    layer = gatx.GATConv(40, 4, 2, residual=True)
    g = Graph(*random_edges(15, 15, 60, seed=7), 15, 15).add_self_loops()
    x = torch.randn(15, 40) * (torch.rand(15, 40) < 0.1)
    xs = x.to_sparse(layout=layout)
    dense_out, _, _, dense_grads = run(layer, g, x, backend)
    out = layer(g, xs, backend=backend)
    gen = torch.Generator().manual_seed(123)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()  # same projection as run()
    assert rel_diff(out, dense_out) < TOL, f"output max diff {rel_diff(out, dense_out)}"
    for name in ("fc.weight", "res_fc.weight", "attn_l"):  # gradients flow through the sparse projection
        d = rel_diff(dict(layer.named_parameters())[name].grad, dense_grads[name])
        assert d < TOL, f"grad of {name} max diff {d}"
    layer.zero_grad()
    layer.feat_drop.p = 0.5  # dropout keeps the input sparse and still trains
    layer.train()
    assert torch.isfinite(layer(g, xs, backend=backend)).all()


def test_bad_input_is_value_error():
    layer = gatx.GATConv(8, 4, 2)
    g = Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="in_feats=8"):
        layer(g, torch.randn(3, 7))
    with pytest.raises(ValueError, match="5 rows but the graph has 3"):
        layer(g, torch.randn(5, 8))
    with pytest.raises(ValueError, match="floating-point"):
        layer(g, torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="edge_index"):
        layer([[0, 1], [1, 0]], torch.randn(3, 8))
    with pytest.raises(ValueError, match="src ids must be < num_src=3"):
        layer(torch.tensor([[0, 9], [1, 0]]), torch.randn(3, 8))  # a bad index never reaches a kernel
    with pytest.raises(ValueError, match="bipartite"):
        layer(Graph(torch.tensor([0, 4]), torch.tensor([1, 0]), 5, 2), torch.randn(5, 8))
    with pytest.raises(ValueError, match="without edge_feats"):
        layer(g, torch.randn(3, 8), edge_feat=torch.randn(3, 2))
    with pytest.raises(ValueError, match="edge_feat must have shape"):
        gatx.GATConv(8, 4, 2, edge_feats=2)(g, torch.randn(3, 8), edge_feat=torch.randn(4, 2))


def test_repr_is_pinned():
    assert repr(gatx.GATConv(8, 4, 2, edge_feats=3, backend="torch")) == (
        "GATConv(\n"
        "  in_feats=(8, 8), out_feats=4, num_heads=2, edge_feats=3, backend='torch'\n"
        "  (fc): Linear(in_features=8, out_features=8, bias=False)\n"
        "  (fc_edge): Linear(in_features=3, out_features=8, bias=False)\n"
        "  (feat_drop): Dropout(p=0.0, inplace=False)\n"
        "  (attn_drop): Dropout(p=0.0, inplace=False)\n"
        "  (leaky_relu): LeakyReLU(negative_slope=0.2)\n"
        ")"
    )
    assert "share_weights=True" in repr(gatx.GATv2Conv(8, 4, 2, share_weights=True))


def test_edge_index_graph_is_cached_per_tensor():
    from gatx.nn._utils import as_graph

    ei = torch.tensor([[0, 1], [1, 0]])
    assert as_graph(ei, 2, 2) is as_graph(ei, 2, 2)
    ei[0, 0] = 1  # in-place change -> rebuilt
    assert as_graph(ei, 2, 2).src[0].item() == 1
