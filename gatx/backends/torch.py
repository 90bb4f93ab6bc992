"""Pure-PyTorch backend: gather / scatter kernels. Runs on any device and dtype; the reference in tests.

Half-precision inputs (float16, bfloat16) are computed in float32 and returned in their own dtype:
the dot products, the softmax's row max and normaliser and the weighted sums all accumulate in
float32 (as the Triton kernels and cuBLAS do), so an edge's share of a row with thousands of
in-edges is not lost to rounding. The cost: the (E, H, D) message and product temporaries are
float32 (twice the bytes of half ones); the saved (E, H) attention stays in the input dtype.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..graph import Graph

NAME = "torch"
_HALF = (torch.float16, torch.bfloat16)


def reasons(graph: Graph, *tensors: Tensor | None, op: str = "", **opts: Any) -> list[str]:
    """Why this backend cannot run the input: never (it is the fallback)."""
    return []


def acc(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype: float32 for float16 / bfloat16, else ``t`` itself."""
    return t.float() if t.dtype in _HALF else t


def gat_score(graph: Graph, el: Tensor, er: Tensor) -> Tensor:
    """(E, H, *) = el[src] + er[dst] (one rounding per edge in every dtype: nothing to accumulate)."""
    return el.index_select(0, graph.src) + er.index_select(0, graph.dst)


def dot_score(graph: Graph, q: Tensor, k: Tensor) -> Tensor:
    """(E, H) = <q[dst], k[src]> over the last dimension (float32 products and sum for half inputs)."""
    s = (acc(q).index_select(0, graph.dst) * acc(k).index_select(0, graph.src)).sum(-1)  # (E, H)
    return s.to(q.dtype)


class _EdgeSoftmax(torch.autograd.Function):
    """Softmax of (E, H) scores over each dst node's incoming edges; saves only the output."""

    @staticmethod
    def forward(ctx, scores: Tensor, dst: Tensor, num_dst: int) -> Tensor:
        s = acc(scores)  # (E, H) float32 for half scores
        idx = dst.view(-1, *([1] * (s.dim() - 1))).expand_as(s)
        shape = (num_dst,) + tuple(s.shape[1:])
        # (N_dst, H) running max; nodes without edges or with all -inf scores keep -inf -> use 0. A NaN
        # score makes its row's normaliser NaN, so the whole row is NaN (as a dense softmax)
        row_max = s.new_full(shape, float("-inf")).scatter_reduce_(0, idx, s, "amax")
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        # eagerly in place (one (E, H) buffer); traced, out of place and with no .to() that returns its
        # input: with either, torch 2.11's compiled backward read a wrong saved tensor (outputs right,
        # score gradients off; tests/test_compile.py on 2.11)
        eager = not torch.compiler.is_compiling()
        ex = s - row_max.index_select(0, dst)
        ex = ex.exp_() if eager else ex.exp()  # (E, H)
        denom = s.new_zeros(shape).index_add_(0, dst, ex)  # (N_dst, H)
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)  # no (unmasked) edge: 0; NaN stays NaN
        out = ex.div_(denom.index_select(0, dst)) if eager else ex / denom.index_select(0, dst)
        out = out if out.dtype == scores.dtype else out.to(scores.dtype)
        ctx.save_for_backward(out, dst)
        ctx.num_dst = num_dst
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out, dst = ctx.saved_tensors
        a = acc(out)
        ga = acc(grad_out) * a  # (E, H)
        shape = (ctx.num_dst,) + tuple(a.shape[1:])
        row = a.new_zeros(shape).index_add_(0, dst, ga)  # (N_dst, H)
        return (ga - a * row.index_select(0, dst)).to(out.dtype), None, None


def edge_softmax(graph: Graph, scores: Tensor) -> Tensor:
    return _EdgeSoftmax.apply(scores, graph.dst, graph.num_dst)


def aggregate(graph: Graph, attn: Tensor, v: Tensor) -> Tensor:
    """(N_dst, H, D) = sum over in-edges e of attn[e] * v[src[e]] (float32 sums for half inputs)."""
    va = acc(v)
    msg = va.index_select(0, graph.src) * acc(attn).unsqueeze(-1)  # (E, H, D)
    out = va.new_zeros((graph.num_dst,) + tuple(v.shape[1:]))
    return out.index_add(0, graph.dst, msg.to(out.dtype)).to(v.dtype)
