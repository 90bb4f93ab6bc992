"""GATConv's aggregate-first path: on a sampled block, ``W_h (sum_j a_ij x_j)`` per head instead of
``sum_j a_ij (W_h x_j)`` (the fused kernel with x as values shared by every head, then one GEMM per head
over the dst rows only). The two orders are equal up to rounding: every output, attention and gradient
must match the project-first path (and DGL's GATConv, where DGL is importable), and the cost rule must
keep full graphs, inputs that need a gradient and other backends on the project-first path.
"""
from __future__ import annotations

import pytest
import torch
from conftest import dgl_or_none

import gatx
import gatx.nn.gatconv as gatconv
from gatx.backends import fused

needs_fused = pytest.mark.skipif(fused.availability() is not None, reason=f"fused kernel: {fused.availability()}")
dgl = dgl_or_none()


def sampled_block(n_dst: int, fanout: int, n_all: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(src, dst, n_src) of a block as neighbour sampling makes it: fanout edges into each dst node from
    random nodes of an n_all-node graph, src ids relabelled with the dst nodes first."""
    gen = torch.Generator().manual_seed(seed)
    dst = torch.arange(n_dst).repeat_interleave(fanout)
    nbr = torch.randint(0, n_all, (dst.numel(),), generator=gen)
    uniq, inv = torch.unique(torch.cat([torch.arange(n_dst), nbr]), return_inverse=True)
    return inv[n_dst:], dst, uniq.numel()


def step(layer, graph, x, order: bool, monkeypatch, **kw):
    """Output, attention and every gradient of one fwd+bwd with the path forced (``order``)."""
    monkeypatch.setattr(gatconv, "AGGREGATE_FIRST", order)
    layer.zero_grad()
    torch.manual_seed(3)  # the same dropout masks on both paths
    out, a = layer(graph, x, get_attention=True, **kw)
    weights = torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()
    ((out * weights).sum() + (a ** 2).sum()).backward()
    return [out.detach(), a.detach()] + [p.grad.clone() for p in layer.parameters()]


@needs_fused
@pytest.mark.parametrize("kw", [
    {},
    {"residual": True, "feat_drop": 0.2, "attn_drop": 0.3},
    {"bias": False, "activation": torch.nn.functional.elu, "negative_slope": 0.1},
    {"edge_feats": 3, "allow_zero_in_degree": True},
], ids=["plain", "residual-dropout", "no-bias-activation", "edge-feats"])
def test_aggregate_first_equals_project_first(kw, monkeypatch) -> None:
    src, dst, n_src = sampled_block(300, 7, 20000, seed=1)
    g = gatx.Graph(src, dst, n_src, 300, is_block=True)
    torch.manual_seed(0)
    layer = gatx.GATConv(24, 5, 8, **kw).double()
    x = torch.randn(n_src, 24, dtype=torch.float64)
    extra = {"edge_weight": torch.rand(g.num_edges, dtype=torch.float64)}
    if "edge_feats" in kw:
        extra["edge_feat"] = torch.randn(g.num_edges, 3, dtype=torch.float64)
    want = step(layer, g, x, False, monkeypatch, **extra)
    got = step(layer, g, x, True, monkeypatch, **extra)
    for a, b in zip(got, want):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() < 1e-13


@needs_fused
@pytest.mark.skipif(dgl is None, reason="DGL is not importable here")
def test_aggregate_first_matches_dgl_on_a_block(monkeypatch) -> None:
    src, dst, n_src = sampled_block(200, 10, 5000, seed=2)
    g = gatx.Graph(src, dst, n_src, 200, is_block=True)
    block = dgl.create_block((src, dst), num_src_nodes=n_src, num_dst_nodes=200)
    torch.manual_seed(1)
    ours = gatx.GATConv(16, 6, 8, residual=True).double()
    ref = dgl.nn.pytorch.GATConv(16, 6, 8, residual=True).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(n_src, 16, dtype=torch.float64)
    monkeypatch.setattr(gatconv, "AGGREGATE_FIRST", True)
    out, a = ours(g, x, get_attention=True)
    out.pow(2).sum().backward()
    ref_out, ref_a = ref(block, (x, x[:200]), get_attention=True)
    ref_out.pow(2).sum().backward()
    assert (out - ref_out).abs().max().item() < 1e-12
    assert (a - ref_a).abs().max().item() < 1e-12
    for name, p in ours.named_parameters():
        assert (p.grad - dict(ref.named_parameters())[name].grad).abs().max().item() < 1e-11, name


@needs_fused
def test_the_rule_aggregates_first_only_where_it_pays(monkeypatch) -> None:
    monkeypatch.setattr(gatconv, "AGGREGATE_FIRST", None)
    src, dst, n_src = sampled_block(2000, 10, 100000, seed=3)  # about 10 src rows per dst row, one edge each
    block = gatx.Graph(src, dst, n_src, 2000, is_block=True)
    x = torch.randn(n_src, 128)
    assert gatconv.aggregates_first(block, x, 8, 32, None)
    assert gatconv.aggregates_first(block, x, 8, 32, "fused")
    assert not gatconv.aggregates_first(block, x, 8, 8, None)  # D = 8: the projection is cheap
    assert not gatconv.aggregates_first(block, x, 8, 32, "torch")  # another backend: as asked
    assert not gatconv.aggregates_first(block, x.requires_grad_(), 8, 32, None)  # x's gradient: project
    full = gatx.Graph(torch.randint(0, 2000, (40000,)), torch.arange(2000).repeat_interleave(20), 2000, 2000)
    assert not gatconv.aggregates_first(full, torch.randn(2000, 128), 8, 32, None)  # in-degree 20
    monkeypatch.setattr(gatconv, "AGGREGATE_FIRST", False)
    assert not gatconv.aggregates_first(block, torch.randn(n_src, 128), 8, 32, None)


@needs_fused
def test_value_dropout_and_folded_dimensions_keep_the_projection(monkeypatch) -> None:
    # value_drop drops the projected values, (N, *, F) inputs fold * into the heads: neither has an
    # aggregate-first form, so forcing it must not change what they compute
    src, dst, n_src = sampled_block(100, 5, 3000, seed=4)
    g = gatx.Graph(src, dst, n_src, 100, is_block=True)
    for kw, x in (({"value_drop": 0.5}, torch.randn(n_src, 8)), ({}, torch.randn(n_src, 2, 8))):
        torch.manual_seed(0)
        layer = gatx.GATConv(8, 4, 2, **kw)
        outs = []
        for order in (False, True):
            monkeypatch.setattr(gatconv, "AGGREGATE_FIRST", order)
            torch.manual_seed(5)
            outs.append(layer(g, x))
        assert torch.equal(outs[0], outs[1])
