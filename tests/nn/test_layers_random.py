"""GATConv / GATv2Conv on random configurations, float64: the default path (gatx's fused kernels where they
run), the torch backend and DGL's layer with the same weights agree on the output, the attention and every
gradient. Each seed draws a graph (homogeneous or bipartite, repeated edges, optional self-loops, nodes
without in-edges), head count and width, input widths and the layer's options; the fixed-case parity
tests in test_gatconv.py cover the named cases, this covers their combinations."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import dgl_or_none
from test_gatconv import run

import gatx

dgl = dgl_or_none()
needs_dgl = pytest.mark.skipif(dgl is None, reason="DGL is not importable here")
TOL = 1e-10  # float64


def config(seed: int, layer: str) -> dict:
    rnd = random.Random(seed)
    bipartite = rnd.random() < 0.4
    n_src = rnd.randint(1, 30)
    n_dst = rnd.randint(1, 30) if bipartite else n_src
    gen = torch.Generator().manual_seed(seed)
    e = rnd.randint(0, 120)
    src, dst = torch.randint(0, n_src, (e,), generator=gen), torch.randint(0, n_dst, (e,), generator=gen)
    if not bipartite and rnd.random() < 0.5:
        src, dst = torch.cat([src, torch.arange(n_src)]), torch.cat([dst, torch.arange(n_src)])
    f_src = rnd.randint(1, 12)
    kw = dict(negative_slope=rnd.choice([0.2, 0.0, 0.5]), residual=rnd.random() < 0.5, bias=rnd.random() < 0.7,
              allow_zero_in_degree=True, activation=rnd.choice([None, torch.nn.functional.elu]))
    if layer == "GATv2Conv":
        kw["share_weights"] = not bipartite and rnd.random() < 0.4
    return dict(bipartite=bipartite, n_src=n_src, n_dst=n_dst, src=src, dst=dst,
                in_feats=(f_src, rnd.randint(1, 12)) if bipartite else f_src,
                heads=rnd.choice([1, 2, 3, 8]), out=rnd.choice([1, 3, 8, 16]), kw=kw,
                edge_weight=layer == "GATConv" and rnd.random() < 0.5)


@needs_dgl
@pytest.mark.parametrize("layer", ["GATConv", "GATv2Conv"])
@pytest.mark.parametrize("seed", range(12))
def test_random_configuration_matches_torch_backend_and_dgl(layer, seed):
    c = config(2 * seed + (layer == "GATv2Conv"), layer)
    torch.manual_seed(seed)
    ours = getattr(gatx, layer)(c["in_feats"], c["out"], c["heads"], **c["kw"]).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()  # DGL's init leaves some parameters zero: every term of the score counts here
    on_torch = getattr(gatx, layer)(c["in_feats"], c["out"], c["heads"], backend="torch", **c["kw"]).double()
    ref = getattr(dgl.nn.pytorch, layer)(c["in_feats"], c["out"], c["heads"], **c["kw"]).double()
    on_torch.load_state_dict(ours.state_dict())
    ref.load_state_dict(ours.state_dict())
    graph = gatx.Graph(c["src"], c["dst"], c["n_src"], c["n_dst"])
    if c["bipartite"]:
        ref_graph = dgl.heterograph({("s", "e", "d"): (c["src"], c["dst"])}, {"s": c["n_src"], "d": c["n_dst"]})
    else:
        ref_graph = dgl.graph((c["src"], c["dst"]), num_nodes=c["n_src"])
    gen = torch.Generator().manual_seed(seed)
    widths = c["in_feats"] if c["bipartite"] else (c["in_feats"],)
    feat = tuple(torch.randn(n, w, generator=gen, dtype=torch.float64) for n, w in zip((c["n_src"], c["n_dst"]), widths))
    extra = {"edge_weight": torch.rand(c["src"].numel(), generator=gen, dtype=torch.float64)} if c["edge_weight"] else {}
    if not c["bipartite"]:
        feat = feat[0]
    got = run(ours, graph, feat, **extra)
    for name, other in (("torch backend", run(on_torch, graph, feat, **extra)), ("DGL", run(ref, ref_graph, feat, **extra))):
        assert got[0].shape == other[0].shape, name
        torch.testing.assert_close(got[0], other[0], rtol=TOL, atol=TOL, msg=lambda m: f"{name} output: {m}")
        torch.testing.assert_close(got[1], other[1], rtol=TOL, atol=TOL, msg=lambda m: f"{name} attention: {m}")
        for i, (a, b) in enumerate(zip(got[2], other[2], strict=True)):
            torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=lambda m: f"{name} grad of input {i}: {m}")
        assert got[3].keys() == other[3].keys(), name
        for key in got[3]:
            torch.testing.assert_close(got[3][key], other[3][key], rtol=TOL, atol=TOL, msg=lambda m: f"{name} grad {key}: {m}")
