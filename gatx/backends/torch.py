"""Pure-PyTorch backend: gather / scatter kernels. Runs on any device and dtype; the reference in tests."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..graph import Graph

NAME = "torch"


def reasons(graph: Graph, *tensors: Tensor | None, op: str = "", **opts: Any) -> list[str]:
    """Why this backend cannot run the input: never (it is the fallback)."""
    return []


def gat_score(graph: Graph, el: Tensor, er: Tensor) -> Tensor:
    """(E, H, *) = el[src] + er[dst]."""
    return el.index_select(0, graph.src) + er.index_select(0, graph.dst)


def dot_score(graph: Graph, q: Tensor, k: Tensor) -> Tensor:
    """(E, H) = <q[dst], k[src]> over the last dimension."""
    return (q.index_select(0, graph.dst) * k.index_select(0, graph.src)).sum(-1)


class _EdgeSoftmax(torch.autograd.Function):
    """Softmax of (E, H) scores over each dst node's incoming edges; saves only the output."""

    @staticmethod
    def forward(ctx, scores: Tensor, dst: Tensor, num_dst: int) -> Tensor:
        idx = dst.view(-1, *([1] * (scores.dim() - 1))).expand_as(scores)
        shape = (num_dst,) + tuple(scores.shape[1:])
        # (N_dst, H) running max; nodes without edges or with all -inf scores keep -inf -> use 0. A NaN
        # score makes its row's normaliser NaN, so the whole row is NaN (as a dense softmax)
        row_max = scores.new_full(shape, float("-inf")).scatter_reduce_(0, idx, scores, "amax")
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        ex = (scores - row_max.index_select(0, dst)).exp_()  # (E, H)
        denom = scores.new_zeros(shape).index_add_(0, dst, ex)  # (N_dst, H)
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)  # no (unmasked) edge: 0; NaN stays NaN
        out = ex.div_(denom.index_select(0, dst))
        ctx.save_for_backward(out, dst)
        ctx.num_dst = num_dst
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out, dst = ctx.saved_tensors
        ga = grad_out * out  # (E, H)
        shape = (ctx.num_dst,) + tuple(out.shape[1:])
        row = out.new_zeros(shape).index_add_(0, dst, ga)  # (N_dst, H)
        return ga - out * row.index_select(0, dst), None, None


def edge_softmax(graph: Graph, scores: Tensor) -> Tensor:
    return _EdgeSoftmax.apply(scores, graph.dst, graph.num_dst)


def aggregate(graph: Graph, attn: Tensor, v: Tensor) -> Tensor:
    """(N_dst, H, D) = sum over in-edges e of attn[e] * v[src[e]]."""
    msg = v.index_select(0, graph.src) * attn.unsqueeze(-1)  # (E, H, D)
    out = v.new_zeros((graph.num_dst,) + tuple(v.shape[1:]))
    return out.index_add(0, graph.dst, msg.to(out.dtype))
