"""GATConv / GATv2Conv as DGL drop-ins (issue 12, items 12 and 15-17): (N, *, D_in) features against
DGL's GATConv and a float64 reference, the residual with 0 dst nodes, the zero-in-degree error class,
and clear errors for bad constructor arguments and inputs."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import dgl_or_none, usable_backends

import gatx
from gatx import Graph

BACKENDS = usable_backends()
EDGE_BACKENDS = usable_backends("edge_softmax")
dgl = dgl_or_none()
needs_dgl = pytest.mark.skipif(dgl is None, reason="DGL is not importable here")


def rel_diff(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if a.numel() else 0.0


def reference(layer, src, dst, x_src, x_dst, n_dst, edge_weight=None, block=False):
    """float64 GAT / GATv2 from the papers' definitions, one slice of the * dimensions at a time.

    Returns (out (N_dst, *, H, D), attention (E, *, H, 1), the float64 parameters by name)."""
    p = {n: t.detach().double().requires_grad_() for n, t in layer.named_parameters()}
    H, D = layer._num_heads, layer._out_feats
    v2 = isinstance(layer, gatx.GATv2Conv)
    x_src, x_dst = x_src.double(), x_dst.double()
    prefix = x_src.shape[1:-1]
    xs, xd = x_src.reshape(x_src.shape[0], -1, x_src.shape[-1]), x_dst.reshape(x_dst.shape[0], -1, x_dst.shape[-1])

    def lin(name, x):
        out = x @ p[f"{name}.weight"].t()
        return out + p[f"{name}.bias"] if f"{name}.bias" in p else out

    outs, atts = [], []
    for s in range(xs.shape[1]):
        if v2:
            hs = lin("fc_src", xs[:, s]).view(-1, H, D)
            hd = hs[:n_dst] if layer.share_weights and block else lin("fc_src" if layer.share_weights else "fc_dst", xd[:, s]).view(-1, H, D)
            e = (F.leaky_relu(hs[src] + hd[dst], layer.leaky_relu.negative_slope) * p["attn"]).sum(-1)  # (E, H)
        else:
            w_src = "fc" if "fc.weight" in p else "fc_src"
            w_dst = "fc" if "fc.weight" in p else "fc_dst"
            hs = lin(w_src, xs[:, s]).view(-1, H, D)
            hd = hs[:n_dst] if block else lin(w_dst, xd[:, s]).view(-1, H, D)
            e = F.leaky_relu((hs * p["attn_l"]).sum(-1)[src] + (hd * p["attn_r"]).sum(-1)[dst], layer.leaky_relu.negative_slope)
        a = torch.zeros_like(e)
        for i in range(n_dst):
            rows = (dst == i).nonzero().flatten()
            if rows.numel():
                a[rows] = torch.softmax(e[rows], 0)
        if edge_weight is not None:
            a = a * edge_weight.double().view(-1, 1)
        out = torch.zeros(n_dst, H, D, dtype=torch.float64).index_add(0, dst, a[..., None] * hs[src])
        if layer.res_fc is not None and n_dst:
            xr = xd[:n_dst, s]
            out = out + (lin("res_fc", xr) if isinstance(layer.res_fc, torch.nn.Linear) else xr).view(n_dst, H, D)
        if not v2 and layer.has_explicit_bias:
            out = out + p["bias"].view(H, D)
        outs.append(out)
        atts.append(a)
    out = torch.stack(outs, 1).view(n_dst, *prefix, H, D)
    return out, torch.stack(atts, 1).view(-1, *prefix, H, 1), p


def check_against_reference(layer, graph, feat, src, dst, n_dst, backend, edge_weight=None, block=False):
    pair = isinstance(feat, tuple)
    leaves = tuple(f.clone().requires_grad_() for f in (feat if pair else (feat,)))
    kw = {"edge_weight": edge_weight} if edge_weight is not None else {}
    out, att = layer(graph, leaves if pair else leaves[0], get_attention=True, backend=backend, **kw)
    ref_leaves = [f.detach().double().requires_grad_() for f in leaves]
    ref, ref_att, p = reference(layer, src, dst, ref_leaves[0], ref_leaves[-1] if pair else ref_leaves[0], n_dst, edge_weight, block)
    assert out.shape == ref.shape and att.shape == ref_att.shape, (out.shape, ref.shape, att.shape, ref_att.shape)
    assert rel_diff(out, ref) < 1e-5, f"output max diff {rel_diff(out, ref)}"
    assert rel_diff(att, ref_att) < 1e-5, f"attention max diff {rel_diff(att, ref_att)}"
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * w.float()).sum().backward()
    (ref * w).sum().backward()
    for name, param in layer.named_parameters():
        d = rel_diff(param.grad, p[name].grad)
        assert d < 1e-5, f"grad of {name} max diff {d}"
    for mine, theirs in zip(leaves, ref_leaves):
        assert rel_diff(mine.grad, theirs.grad) < 1e-5, f"input grad max diff {rel_diff(mine.grad, theirs.grad)}"
    layer.zero_grad()


def edges(n_src, n_dst, e, seed, loops=True):
    gen = torch.Generator().manual_seed(seed)
    src, dst = torch.randint(0, n_src, (e,), generator=gen), torch.randint(0, n_dst, (e,), generator=gen)
    if loops:
        src, dst = torch.cat([src, torch.arange(n_dst)]), torch.cat([dst, torch.arange(n_dst)])
    return src, dst


# ---------------------------------------------------------------- (N, *, D_in) features (item 15)
@pytest.mark.parametrize("backend", [None] + BACKENDS)
@pytest.mark.parametrize("layer_cls", ["GATConv", "GATv2Conv"])
@pytest.mark.parametrize("kind", ["homogeneous", "pair", "block"])
def test_extra_dims_match_float64_reference(backend, layer_cls, kind):
    if layer_cls == "GATv2Conv" and backend not in [None] + EDGE_BACKENDS:
        pytest.skip(f"GATv2Conv composes primitives that {backend} does not run")
    torch.manual_seed(0)
    in_feats = (6, 5) if kind == "pair" else 6
    layer = getattr(gatx, layer_cls)(in_feats, 4, 3, residual=True)
    prefix = (2, 3)
    if kind == "pair":
        src, dst = edges(9, 7, 30, seed=1)
        graph, n_dst = Graph(src, dst, 9, 7), 7
        feat = (torch.randn(9, *prefix, 6), torch.randn(7, *prefix, 5))
    elif kind == "block":
        src, dst = edges(9, 4, 20, seed=2)
        graph, n_dst = Graph(src, dst, 9, 4, is_block=True), 4
        feat = torch.randn(9, *prefix, 6)
    else:
        src, dst = edges(8, 8, 30, seed=3)
        graph, n_dst = Graph(src, dst, 8, 8), 8
        feat = torch.randn(8, *prefix, 6)
    w = torch.rand(graph.num_edges) if layer_cls == "GATConv" else None
    check_against_reference(layer, graph, feat, src, dst, n_dst, backend, edge_weight=w, block=kind == "block")


@needs_dgl
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["homogeneous", "pair", "block"])
def test_gatconv_extra_dims_match_dgl(backend, kind):
    torch.manual_seed(0)
    in_feats = (6, 5) if kind == "pair" else 6
    ref = dgl.nn.GATConv(in_feats, 4, 3, residual=True)
    ours = gatx.GATConv(in_feats, 4, 3, residual=True)
    ours.load_state_dict(ref.state_dict())
    if kind == "pair":
        src, dst = edges(9, 7, 30, seed=4)
        g = dgl.heterograph({("A", "r", "B"): (src, dst)}, {"A": 9, "B": 7})
        feat = (torch.randn(9, 2, 6), torch.randn(7, 2, 5))
    elif kind == "block":
        src, dst = edges(9, 4, 20, seed=5)
        g = dgl.create_block((src, dst), 9, 4)
        feat = torch.randn(9, 2, 6)
    else:
        src, dst = edges(8, 8, 30, seed=6, loops=False)
        g = dgl.add_self_loop(dgl.graph((src, dst), num_nodes=8))
        feat = torch.randn(8, 2, 6)
    results = []
    for layer, extra in ((ref, {}), (ours, {"backend": backend})):
        leaves = tuple(f.clone().requires_grad_() for f in (feat if isinstance(feat, tuple) else (feat,)))
        out, att = layer(g, leaves if isinstance(feat, tuple) else leaves[0], get_attention=True, **extra)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append((out, att, [f.grad for f in leaves], {n: q.grad.clone() for n, q in layer.named_parameters()}))
    (rout, ratt, rfg, rpg), (out, att, fg, pg) = results
    assert out.shape == rout.shape and att.shape == ratt.shape
    assert rel_diff(out, rout) < 1e-5 and rel_diff(att, ratt) < 1e-5, f"max diff {rel_diff(out, rout)}, {rel_diff(att, ratt)}"
    for a, b in zip(fg, rfg):
        assert rel_diff(a, b) < 1e-5
    for n in rpg:
        assert rel_diff(pg[n], rpg[n]) < 1e-5, f"grad of {n}: {rel_diff(pg[n], rpg[n])}"


def test_pair_with_different_extra_dims_is_refused():
    layer = gatx.GATConv((6, 5), 4, 2)
    g = Graph(torch.tensor([0, 1]), torch.tensor([0, 1]), 3, 2)
    with pytest.raises(ValueError, match="same middle dimensions"):
        layer(g, (torch.randn(3, 2, 6), torch.randn(2, 3, 5)))


# ---------------------------------------------------------------- residual with 0 dst nodes (item 16)
@pytest.mark.parametrize("backend", [None] + BACKENDS)
@pytest.mark.parametrize("layer_cls", ["GATConv", "GATv2Conv"])
@pytest.mark.parametrize("in_dst", [5, 12])  # linear residual / identity residual (H * D = 12)
def test_residual_is_skipped_without_dst_nodes(backend, layer_cls, in_dst):
    if layer_cls == "GATv2Conv" and backend not in [None] + EDGE_BACKENDS:
        pytest.skip(f"GATv2Conv composes primitives that {backend} does not run")
    layer = getattr(gatx, layer_cls)((6, in_dst), 4, 3, residual=True)
    g = Graph(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 5, 0)
    x_src = torch.randn(5, 6, requires_grad=True)
    out, att = layer(g, (x_src, torch.randn(0, in_dst)), get_attention=True, backend=backend)
    assert out.shape == (0, 3, 4) and att.shape == (0, 3, 1)
    out.sum().backward()  # still differentiable
    if dgl is not None and layer_cls == "GATConv":  # a DGL block with 0 dst nodes, the case
        block = dgl.create_block((torch.zeros(0, dtype=torch.int64),) * 2, 5, 0)
        assert layer(block, (torch.randn(5, 6), torch.randn(0, in_dst)), backend=backend).shape == (0, 3, 4)


# ---------------------------------------------------------------- the zero-in-degree error (item 17)
def _zero_in_degree_call():
    g = Graph(torch.tensor([0]), torch.tensor([1]), 3, 3)
    gatx.GATConv(4, 2, 2)(g, torch.randn(3, 4))


def test_zero_in_degree_error_is_a_value_error_without_dgl(monkeypatch):
    for name in [n for n in sys.modules if n == "dgl" or n.startswith("dgl.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(gatx.ZeroInDegreeError, match="2 dst nodes have no incoming edge") as info:
        _zero_in_degree_call()
    assert type(info.value) is gatx.ZeroInDegreeError and isinstance(info.value, ValueError)
    assert "dgl" not in sys.modules, "raising the error must not import DGL"


@needs_dgl
@pytest.mark.parametrize("layer_cls", ["GATConv", "GATv2Conv"])
def test_code_written_for_dgl_catches_it(layer_cls):
    g = dgl.graph((torch.tensor([0, 1]), torch.tensor([1, 1])), num_nodes=3)
    for layer in (getattr(dgl.nn, layer_cls)(4, 2, 2), getattr(gatx, layer_cls)(4, 2, 2)):
        with pytest.raises(dgl.DGLError):  # the same except clause catches DGL's error and gatx's
            layer(g, torch.randn(3, 4))
    try:
        getattr(gatx, layer_cls)(4, 2, 2)(g, torch.randn(3, 4))
    except dgl.DGLError as err:
        assert isinstance(err, gatx.ZeroInDegreeError) and isinstance(err, ValueError)
        assert "add_self_loop" in str(err)


# ---------------------------------------------------------------- clear errors (items 11 and 12)
@pytest.mark.parametrize("layer_cls", ["GATConv", "GATv2Conv"])
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=0), "num_heads must be a positive int, got 0"),
        (dict(num_heads=-2), "num_heads must be a positive int, got -2"),
        (dict(num_heads=2.0), "num_heads must be a positive int"),
        (dict(out_feats=0), "out_feats must be a positive int, got 0"),
        (dict(in_feats=0), "in_feats must be a positive int, got 0"),
        (dict(in_feats=(4, 0)), r"in_feats\[1\] must be a positive int"),
        (dict(edge_feats=0), "edge_feats must be a positive int"),
        (dict(feat_drop=float("nan")), r"feat_drop must be a probability in \[0, 1\], got nan"),
        (dict(feat_drop=1.5), r"feat_drop must be a probability in \[0, 1\]"),
        (dict(attn_drop=-0.1), r"attn_drop must be a probability in \[0, 1\]"),
    ],
)
def test_bad_constructor_arguments(layer_cls, kwargs, match):
    args = dict(in_feats=4, out_feats=3, num_heads=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        getattr(gatx, layer_cls)(args.pop("in_feats"), args.pop("out_feats"), args.pop("num_heads"), **args)


def test_bad_value_drop():
    with pytest.raises(ValueError, match=r"value_drop must be a probability in \[0, 1\], got nan"):
        gatx.GATConv(4, 3, 2, value_drop=float("nan"))


@pytest.mark.parametrize("layer_cls", ["GATConv", "GATv2Conv"])
def test_bad_forward_inputs(layer_cls):
    layer = getattr(gatx, layer_cls)(4, 3, 2)
    g = Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"feat is torch.float64 but the layer's parameters are torch.float32; cast the model"):
        layer(g, x.double())
    with pytest.raises(ValueError, match="feat must be a sparse floating-point tensor, got torch.int64"):
        layer(g, torch.ones(3, 4, dtype=torch.int64).to_sparse())
    with pytest.raises(ValueError, match=r"feat must have shape \(N, \*, in_feats=4\)"):
        layer(g, torch.randn(3))
    assert layer.double()(g, x.double()).dtype == torch.float64  # the fix the message names works


def test_bad_edge_weight_is_named():
    layer = gatx.GATConv(4, 3, 2)
    g = Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"edge_weight must be a tensor of shape \(E,\)"):
        layer(g, x, edge_weight=0.5)
    with pytest.raises(ValueError, match="edge_weight must be a tensor.*got list"):
        layer(g, x, edge_weight=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="edge_weight is torch.float64 but v is torch.float32.*cast edge_weight"):
        layer(g, x, edge_weight=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="edge_feat was given"):
        layer(g, x, edge_feat=torch.randn(3, 2))
