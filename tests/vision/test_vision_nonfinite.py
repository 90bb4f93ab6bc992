"""The structured backend keeps non-finite values where the graph puts them, like every other backend.

A dense tile lets a query's masked slots read real keys and values of the halo; a NaN / Inf there, or
a score that overflows, must still reach only the queries whose edges carry it, and a row whose edges
are all ``-inf`` gives 0 output and 0 attention (issue 12 item 7), on the fused SDPA call and the
written-out path, forward and backward. Reference: the torch backend (edge by edge), NaNs compared
as equal; every case is built so that a leak into the tile changes the result.
"""
from __future__ import annotations

import math

import pytest
import torch

from gatx import ops
from gatx.backends import structured
from gatx.vision import neighborhood_graph, window_graph

GRAPHS = {
    "na 13x10 k5": lambda: neighborhood_graph(13, 10, 5),  # 7x7 query tiles, an 11x11 halo
    "win 8x8 w4 s2": lambda: window_graph(8, 8, 4, 2),  # shifted windows
    "na 1-D L=40 k3 causal": lambda: neighborhood_graph((40,), kernel_size=3, is_causal=True),  # 16-query tiles
    "win 8x8 w4": lambda: window_graph(8, 8, 4),  # no masked slot: only the output is checked
}
POISONS = ["nan value", "inf value", "inf key", "-inf key", "overflowing key", "nan query", "row fully masked"]
NODE = 9  # the poisoned node: in a tile that also holds queries it does not reach, in every graph above


def poisoned(g, poison: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(g.num_dst, 2, 4, generator=gen, dtype=dtype) for _ in range(3))
    q = q.abs() + 0.1  # positive queries: an infinite key gives infinite scores, not NaN
    bias = torch.randn(g.num_edges, 2, generator=gen, dtype=dtype)
    big = torch.finfo(dtype).max / 2
    if poison == "nan value":
        v[NODE, 0, 1] = math.nan
    elif poison == "inf value":
        v[NODE, 1, 2] = math.inf
    elif poison == "inf key":
        k[NODE, 0] = math.inf
    elif poison == "-inf key":  # finite outputs (exp(-inf) = 0), but 0 * inf in the backward
        k[NODE, 1] = -math.inf
    elif poison == "overflowing key":  # finite inputs, yet q . k overflows to +inf
        k[NODE] = big
    elif poison == "nan query":
        q[NODE, 1, 0] = math.nan
    elif poison == "row fully masked":  # every in-edge of NODE masked by the bias: 0 output and 0 attention
        bias[g.dst == NODE] = -math.inf
    return q, k, v, bias


def outputs_and_grads(g, q, k, v, bias, backend, attention, bias_grad):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    bias = bias.clone().requires_grad_(bias_grad)
    res = ops.sparse_attention(g, q, k, v, bias=bias, return_attention=attention, backend=backend)
    outs = list(res) if attention else [res]
    gen = torch.Generator().manual_seed(11)
    loss = sum((o * torch.rand(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    leaves = [q, k, v] + ([bias] if bias_grad else [])
    return outs + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("path", ["fused", "written out"])
def test_non_finite_values_stay_local(name, poison, path):
    g = GRAPHS[name]()
    fused = path == "fused"  # no attention, no bias gradient: one SDPA call; else matmul-softmax-matmul
    dtype = torch.float32 if poison == "overflowing key" else torch.float64
    q, k, v, bias = poisoned(g, poison, dtype)
    got = outputs_and_grads(g, q, k, v, bias, "structured", not fused, not fused)
    want = outputs_and_grads(g, q, k, v, bias, "torch", not fused, not fused)
    labels = ["out"] + ([] if fused else ["attention"]) + ["grad q", "grad k", "grad v"] + ([] if fused else ["grad bias"])
    for label, a, b in zip(labels, got, want):
        assert torch.equal(a.isnan(), b.isnan()), (
            f"{name} {poison} ({path}): {label} is NaN at {int(a.isnan().sum())} entries, torch at {int(b.isnan().sum())}"
        )
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True), f"{name} {poison} ({path}): {label} differs from torch"
    if poison == "row fully masked":
        assert float(got[0][NODE].detach().abs().max()) == 0.0, "a row whose edges are all masked gives 0"
        if not fused:
            assert float(got[1][g.dst == NODE].detach().abs().max()) == 0.0, "and 0 attention"
    elif poison != "-inf key":
        n = int((~torch.isfinite(want[0])).any(-1).any(-1).sum())
        assert n > 0, f"{name} {poison}: the poison must reach some output, or the case tests nothing"


def test_finite_inputs_take_the_dense_path_alone(monkeypatch):
    """Finite inputs with finite results never pay for the per-edge recomputation."""

    def refuse(*args, **kwargs):
        raise AssertionError("finite inputs must not be recomputed edge by edge")

    monkeypatch.setattr(structured, "_per_edge", refuse)
    g = neighborhood_graph(13, 10, 5)
    q, k, v, bias = poisoned(g, "none", torch.float32)
    for attention in (False, True):
        outputs_and_grads(g, q, k, v, bias, "structured", attention, attention)
    huge = torch.full((g.num_dst, 2, 4), 1e30)  # finite, though every score overflows: must be recomputed
    with pytest.raises(AssertionError, match="edge by edge"):
        ops.sparse_attention(g, huge, huge, v, backend="structured")
