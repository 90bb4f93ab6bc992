"""Second-order gradients through the structured backend equal the torch backend's (issue 12, item 5).

A gradient-penalty style loss (the squared norm of first-order gradients, built with
``create_graph=True``) is differentiated again; both dense paths of the backend are covered (the fused
SDPA call without a bias gradient, the written-out path with one), on neighborhood, window and
shifted-window graphs, whose query gathers differ.
"""
from __future__ import annotations

import pytest
import torch

from gatx import ops
from gatx.vision import neighborhood_graph, window_graph

GRAPHS = {
    "neighborhood": lambda: neighborhood_graph(6, 7, 3),
    "window": lambda: window_graph(6, 6, 3),
    "shifted_window": lambda: window_graph(6, 6, 3, shift=1),
}


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_second_order_matches_torch(name, with_bias):
    g = GRAPHS[name]()
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(g.num_dst, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    bias0 = torch.randn(g.num_edges, 2, generator=gen, dtype=torch.float64)
    results = {}
    for backend in ("torch", "structured"):
        q, k, v = (t.clone().requires_grad_() for t in base)
        bias = bias0.clone().requires_grad_() if with_bias else None
        inputs = (q, k, v) + ((bias,) if with_bias else ())
        out = ops.sparse_attention(g, q, k, v, bias=bias, backend=backend)
        first = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        results[backend] = torch.autograd.grad(sum(t.square().sum() for t in first), inputs)
    for i, (a, b) in enumerate(zip(results["torch"], results["structured"])):
        assert (a - b).abs().max() < 1e-10, f"input {i}: max diff {(a - b).abs().max():.3e}"


def test_first_order_unchanged_by_the_wrapper():
    """Repeated first-order backward (retain_graph) through the fused call gives the same gradients."""
    g = neighborhood_graph(7, 7, 3)
    q, k, v = (torch.randn(g.num_dst, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ops.sparse_attention(g, q, k, v, backend="structured")
    a = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    b = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(ops.sparse_attention(g, q, k, v, backend="torch").sum(), (q, k, v))
    for x, y, r in zip(a, b, ref):
        assert torch.equal(x, y) and (x - r).abs().max() < 1e-12
