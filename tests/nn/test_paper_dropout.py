"""GATConv's dropout options from the GAT authors' implementation: per-head input masks
(``head_feat_drop``) and dropout on the aggregated features (``value_drop``)."""
from __future__ import annotations

import pytest
import torch
from conftest import usable_backends

import gatx
from gatx import Graph
from gatx.nn._utils import head_dropout_linear, project_heads

BACKENDS = usable_backends()


def graph(n=12, e=40, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return Graph(torch.randint(0, n, (e,), generator=gen), torch.randint(0, n, (e,), generator=gen), n, n).add_self_loops()


def sparse_input(n, f, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=gen) * (torch.rand(n, f, generator=gen) < 0.3)


def dense_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(H, N, F) dense factors from per-stored-value factors (H, nnz) of a sparse x (row-major order)."""
    idx = x.to_sparse_coo().coalesce().indices()
    out = torch.zeros(scale.shape[0], *x.shape, dtype=torch.float64)
    out[:, idx[0], idx[1]] = scale.double()
    return out


@pytest.mark.parametrize("layout", [torch.strided, torch.sparse_coo, torch.sparse_csr])
@pytest.mark.parametrize("input_grad", [False, True])
def test_project_heads_matches_float64_reference(layout, input_grad):
    H, D, N, Fin = 3, 4, 9, 7
    x = sparse_input(N, Fin, seed=1)
    weight = torch.randn(H * D, Fin, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    if layout == torch.strided:
        xin, scale = x.clone(), torch.rand(H, N, Fin, generator=gen)
        ref_scale = scale.double()
    else:
        xin = x.to_sparse(layout=layout)
        scale = torch.rand(H, int((x != 0).sum()), generator=gen)
        ref_scale = dense_scale(x, scale)
    xin.requires_grad_(input_grad)
    out = project_heads(xin, scale, weight)  # (N, H*D)

    x64, w64 = x.double().requires_grad_(input_grad), weight.detach().double().requires_grad_()
    ref = torch.cat([(x64 * ref_scale[h]) @ w64.view(H, D, Fin)[h].t() for h in range(H)], 1)
    assert (out.double() - ref).abs().max() < 1e-5, f"output max diff {(out.double() - ref).abs().max()}"
    proj = torch.randn(N, H * D, dtype=torch.float64)
    (out.double() * proj).sum().backward()
    (ref * proj).sum().backward()
    d = (weight.grad.double() - w64.grad).abs().max()
    assert d < 1e-5, f"weight grad max diff {d}"
    if input_grad:
        g = xin.grad.to_dense() if xin.grad.layout != torch.strided else xin.grad
        mask = x != 0 if layout != torch.strided else torch.ones_like(x, dtype=torch.bool)
        d = (g.double() - x64.grad * mask).abs().max()
        assert d < 1e-5, f"input grad max diff {d}"


@pytest.mark.parametrize("sparse", [False, True])
def test_head_masks_are_independent_and_scaled(sparse):
    """Every head draws its own mask (a shared mask gives identical heads for identical weights),
    and the kept entries are scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    H, D, N, Fin, p = 4, 3, 50, 30, 0.5
    lin = torch.nn.Linear(Fin, H * D, bias=False)
    with torch.no_grad():
        lin.weight.copy_(lin.weight[:D].repeat(H, 1))  # every head has head 0's weights
    x = sparse_input(N, Fin, seed=2)
    xin = x.to_sparse_csr() if sparse else x
    out = head_dropout_linear(lin, xin, H, p, training=True).view(N, H, D)
    assert not torch.allclose(out[:, 0], out[:, 1]), "heads 0 and 1 drew the same mask"
    assert torch.allclose(head_dropout_linear(lin, xin, H, p, training=False), lin(x), atol=1e-6)
    eye = torch.nn.Linear(Fin, H * Fin, bias=False)  # identity per head: out = the dropped input
    with torch.no_grad():
        eye.weight.copy_(torch.eye(Fin).repeat(H, 1))
    dropped = head_dropout_linear(eye, xin, H, p, training=True).view(N, H, Fin)
    nz = x != 0
    kept = dropped[nz.unsqueeze(1).expand(-1, H, -1)] / x.unsqueeze(1).expand(-1, H, -1)[nz.unsqueeze(1).expand(-1, H, -1)]
    assert set(kept.round(decimals=4).unique().tolist()) <= {0.0, 2.0}, "kept values are not scaled by 1/(1-p)"
    assert 0.3 < (kept == 0).float().mean() < 0.7, f"dropped fraction {(kept == 0).float().mean():.2f}, p={p}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_options_are_identity_in_eval_and_off_by_default(backend):
    torch.manual_seed(0)
    g, x = graph(), torch.randn(12, 10)
    plain = gatx.GATConv(10, 4, 3, feat_drop=0.6, attn_drop=0.6, residual=True).eval()
    paper = gatx.GATConv(10, 4, 3, feat_drop=0.6, attn_drop=0.6, residual=True, head_feat_drop=True, value_drop=0.6).eval()
    paper.load_state_dict(plain.state_dict())  # same parameters: the options add none
    for xin in (x, x.to_sparse_csr()):
        d = (paper(g, xin, backend=backend) - plain(g, x, backend=backend)).abs().max()
        assert d < 1e-5, f"eval outputs differ by {d}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_drop_drops_aggregated_features_not_scores(backend):
    torch.manual_seed(0)
    g, x = graph(), torch.randn(12, 10)
    layer = gatx.GATConv(10, 4, 3, value_drop=0.5)
    layer.eval()
    out_eval, att_eval = layer(g, x, get_attention=True, backend=backend)
    layer.train()
    out, att = layer(g, x, get_attention=True, backend=backend)
    assert (att - att_eval).abs().max() < 1e-6, "value_drop changed the attention scores"
    assert (out - out_eval).abs().max() > 1e-3, "value_drop=0.5 left the output unchanged"
    layer.value_drop = 1.0  # everything aggregated is dropped: only the (zero) bias remains
    assert layer(g, x, backend=backend).abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_with_both_options_updates_all_weights(backend):
    torch.manual_seed(0)
    g = graph()
    x = sparse_input(12, 10, seed=4).to_sparse_csr()
    layer = gatx.GATConv(10, 4, 3, feat_drop=0.5, residual=True, head_feat_drop=True, value_drop=0.5)
    layer(g, x, backend=backend).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_bad_value_drop_and_repr():
    with pytest.raises(ValueError, match="value_drop must be a probability"):
        gatx.GATConv(8, 4, 2, value_drop=1.5)
    with pytest.raises(TypeError):
        gatx.GATConv(8, 4, 2, 0.0, 0.0, 0.2, False, None, False, True, None, None, True)  # keyword only
    r = repr(gatx.GATConv(8, 4, 2, head_feat_drop=True, value_drop=0.6))
    assert "in_feats=(8, 8), out_feats=4, num_heads=2, head_feat_drop=True, value_drop=0.6\n" in r


@pytest.mark.parametrize("residual", [False, True])
def test_bipartite_and_block_inputs(residual):
    """Per-head masks for a (src, dst) pair and for a block (dst nodes = the first src nodes);
    in eval mode both equal the plain layer."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    src, dst = torch.randint(0, 9, (30,), generator=gen), torch.randint(0, 5, (30,), generator=gen)
    bip, block = Graph(src, dst, 9, 5), Graph(src, dst, 9, 5, is_block=True)
    plain = gatx.GATConv((6, 4), 3, 2, feat_drop=0.5, residual=residual, allow_zero_in_degree=True)
    paper = gatx.GATConv((6, 4), 3, 2, feat_drop=0.5, residual=residual, allow_zero_in_degree=True,
                         head_feat_drop=True, value_drop=0.5)
    paper.load_state_dict(plain.state_dict())
    pair = (torch.randn(9, 6), torch.randn(5, 4))
    out = paper(bip, pair)
    assert out.shape == (5, 2, 3) and torch.isfinite(out).all()
    out.sum().backward()
    assert paper.fc_src.weight.grad is not None and paper.fc_dst.weight.grad is not None
    plain.eval(), paper.eval()
    assert (paper(bip, pair) - plain(bip, pair)).abs().max() < 1e-6
    homo = gatx.GATConv(6, 3, 2, feat_drop=0.5, residual=residual, allow_zero_in_degree=True, head_feat_drop=True)
    x = torch.randn(9, 6)
    assert homo(block, x).shape == (5, 2, 3)
    homo.eval()
    ref = gatx.GATConv(6, 3, 2, residual=residual, allow_zero_in_degree=True)
    ref.load_state_dict(homo.state_dict())
    assert (homo(block, x) - ref.eval()(block, x)).abs().max() < 1e-6
