"""sparse_attention(score="given"): generated per-edge logits, and duplicate edges counted twice.

The reference is a float64 loop over dst rows written from the definition
s_e = scale * logits_e + bias_e, a = softmax over the row's edges (each edge on its own), o_i = sum_e a_e v_src(e).
"""
from __future__ import annotations

import pytest
import torch

from gatx import Graph
from gatx.ops import BackendUnavailable, sparse_attention
from tests.conftest import usable_backends

BACKENDS = usable_backends(score="given")


def _reference(g: Graph, logits, v, scale, bias=None):
    s = scale * logits + (bias if bias is not None else 0)
    out = torch.zeros((g.num_dst,) + tuple(v.shape[1:]), dtype=torch.float64)
    for i in range(g.num_dst):
        rows = (g.dst == i).nonzero().flatten()
        if rows.numel():
            a = torch.softmax(s[rows], 0)  # (deg, H): duplicates are separate rows
            out[i] = (a.unsqueeze(-1) * v[g.src[rows]]).sum(0)
    return out


def _graph_with_duplicates():
    # dst 0 sees src 1 three times and src 2 once; dst 1 sees 0 and 2 twice; dst 3 has no in-edge
    src = torch.tensor([1, 2, 1, 1, 0, 2, 2, 4, 3])
    dst = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])
    return Graph(src, dst, 5, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_given_scores_match_reference(backend, with_bias):
    g = _graph_with_duplicates()
    gen = torch.Generator().manual_seed(3)
    E, H, D = g.num_edges, 3, 4
    logits = torch.randn(E, H, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(g.num_src, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(E, H, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    out = sparse_attention(g, None, None, v, score="given", logits=logits, scale=0.37, bias=bias, backend=backend)
    ref = _reference(g, logits, v, 0.37, bias)
    assert (out - ref).abs().max() < 1e-12, f"max diff {(out - ref).abs().max():.3e}"
    w = torch.randn_like(ref)
    inputs = [logits, v] + ([bias] if with_bias else [])
    got = torch.autograd.grad((out * w).sum(), inputs)
    want = torch.autograd.grad((ref * w).sum(), inputs)
    for name, a, b in zip(["logits", "v", "bias"], got, want):
        assert (a - b).abs().max() < 1e-12, f"grad {name}: max diff {(a - b).abs().max():.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_edges_count_twice(backend):
    """Two copies of an edge with equal logits take twice the weight of a single edge."""
    g = Graph(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]), 2, 1)
    logits = torch.zeros(3, 1, dtype=torch.float64)
    v = torch.tensor([[[1.0]], [[4.0]]], dtype=torch.float64)
    out, attn = sparse_attention(g, None, None, v, score="given", logits=logits, return_attention=True, backend=backend)
    assert torch.allclose(attn.flatten(), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert out.item() == pytest.approx(2 / 3 * 1.0 + 1 / 3 * 4.0)  # a deduplicating kernel gives 2.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_edges_dot_score(backend):
    """The same rule on the dot-product path (ACmix's reflection padding)."""
    g = _graph_with_duplicates()
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(g.num_dst, 2, 3, generator=gen, dtype=torch.float64)
    k = torch.randn(g.num_src, 2, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(g.num_src, 2, 3, generator=gen, dtype=torch.float64)
    out = sparse_attention(g, q, k, v, backend=backend)
    logits = (q[g.dst] * k[g.src]).sum(-1)
    ref = _reference(g, logits, v, 3 ** -0.5)
    assert (out - ref).abs().max() < 1e-12, f"max diff {(out - ref).abs().max():.3e}"


def test_given_scores_errors():
    g = _graph_with_duplicates()
    v = torch.randn(g.num_src, 2, 3)
    with pytest.raises(ValueError, match="logits="):
        sparse_attention(g, None, None, v, score="given")
    with pytest.raises(ValueError, match="q=None"):
        sparse_attention(g, torch.randn(4, 2, 3), None, v, score="given", logits=torch.randn(g.num_edges, 2))
    with pytest.raises(ValueError, match="logits"):
        sparse_attention(g, None, None, v, score="given", logits=torch.randn(g.num_edges + 1, 2))
    with pytest.raises(ValueError, match="heads"):
        sparse_attention(g, None, None, v, score="given", logits=torch.randn(g.num_edges, 3))
    with pytest.raises(ValueError, match="only with score='given'"):
        sparse_attention(g, torch.randn(4, 2, 3), torch.randn(5, 2, 3), v, logits=torch.randn(g.num_edges, 2))
    with pytest.raises(BackendUnavailable, match="structured"):
        sparse_attention(g, None, None, v, score="given", logits=torch.randn(g.num_edges, 2), backend="structured")


def test_from_csr():
    g = Graph.from_csr(torch.tensor([0, 2, 2, 5]), torch.tensor([1, 0, 2, 2, 1]), num_src=4)
    assert (g.num_src, g.num_dst, g.num_edges) == (4, 3, 5)
    assert g.dst.tolist() == [0, 0, 2, 2, 2]
    csr = g.csr()
    assert csr.indptr.tolist() == [0, 2, 2, 5] and csr.perm.tolist() == list(range(5))
    ref = Graph(g.src, g.dst, 4, 3).csr()
    assert torch.equal(ref.indptr, csr.indptr) and torch.equal(ref.src, csr.src) and torch.equal(ref.perm, csr.perm)
    for bad, match in [
        ((torch.tensor([1, 2]), torch.tensor([0])), "start at 0"),
        ((torch.tensor([0, 2, 1]), torch.tensor([0, 1])), "non-decreasing"),
        ((torch.tensor([0, 3]), torch.tensor([0, 1])), "number of edges"),
        ((torch.tensor([0, 1]), torch.tensor([5])), "num_src"),
    ]:
        with pytest.raises(ValueError, match=match):
            Graph.from_csr(*bad)
