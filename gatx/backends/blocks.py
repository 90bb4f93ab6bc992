"""Blocks backend: dense-batched ``sparse_attention`` for graphs made of dense region-to-region blocks.

Routing attention (BiFormer) builds graphs in which every query of a region sees every key of each
of the ``topk`` regions it routed to: per sample, ``R`` regions of ``P`` pixels, and an edge block
of ``P x P`` edges per (query region, routed region) pair. A graph built by
:func:`gatx.vision.routed_region_graph` carries a :class:`RegionBlocks` structure with the routes;
this backend runs such a graph as ``topk`` batched matmuls over the ``B * R`` query regions instead
of per-edge gathers.

It never gathers the ``topk`` routed regions at once (the official BiFormer code does, taking
``topk`` times the memory of k and v): the routes are visited one at a time with an online softmax
(FlashAttention's running max and normaliser), and only the inputs, the output and the per-row
log-sum-exp (B*R, H, P) are kept for backward, which recomputes each route's scores. The largest
temporary is one route's (B*R, H, P, P) score block.

Limits: ``score="dot"`` without bias, edge weights, dropout or returned attention (other backends
run those); first-order gradients only (use ``backend="torch"`` for double backward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._amp import autocast_off
from ..graph import Graph

NAME = "blocks"

__all__ = ["RegionBlocks", "blocks_of", "reasons", "sparse_attention"]


@dataclass(frozen=True, eq=False)
class RegionBlocks:
    """Region routing on a ``grid = (Y, X)`` map cut into ``n_win x n_win`` regions.

    ``idx`` (B, R, topk): the regions that region ``r`` of sample ``b`` attends to (row-major region
    ids). Node ``b * Y * X + y * X + x`` is pixel (y, x) of sample b; each pixel attends to every pixel
    of its region's routed regions (in the order of ``idx``, pixels row-major inside a region).
    """

    grid: tuple[int, int]
    n_win: int
    idx: Tensor

    @property
    def num_edges(self) -> int:
        B, _, topk = self.idx.shape
        Y, X = self.grid
        return B * Y * X * topk * (Y // self.n_win) * (X // self.n_win)

    def __repr__(self) -> str:
        B, R, topk = self.idx.shape
        return f"RegionBlocks({self.grid[0]}x{self.grid[1]}, n_win={self.n_win}, batch={B}, topk={topk})"


def blocks_of(graph: Graph) -> RegionBlocks | None:
    """The :class:`RegionBlocks` of a graph built by :func:`gatx.vision.routed_region_graph`, else None."""
    s = graph.structure
    return s if isinstance(s, RegionBlocks) else None


def reasons(graph: Graph, *tensors: Tensor | None, op: str = "", **opts: Any) -> list[str]:
    """Why this backend cannot run the input (empty list: it can)."""
    if op and op != "sparse_attention":
        return [f"the blocks backend runs only sparse_attention, not {op}"]
    blocks = blocks_of(graph)
    if blocks is None:
        return ["graph has no region-block structure (build it with gatx.vision.routed_region_graph)"]
    out = []
    B = blocks.idx.shape[0]
    Y, X = blocks.grid
    if graph.num_src != B * Y * X or graph.num_dst != B * Y * X or graph.num_edges != blocks.num_edges:
        out.append("graph does not match its region-block structure (edges or node counts differ)")
    if blocks.idx.device != graph.device:
        out.append(f"routes are on {blocks.idx.device} but the graph is on {graph.device}; rebuild the graph on that device")
    if opts.get("score", "dot") != "dot":
        out.append(f"the blocks backend runs score='dot' only, got {opts.get('score')!r}")
    for name in ("bias", "edge_weight"):
        if opts.get(name) is not None:
            out.append(f"the blocks backend takes no {name}")
    if opts.get("dropout_p", 0.0) > 0.0:
        out.append("the blocks backend runs without attention dropout")
    if opts.get("return_attention"):
        out.append("the blocks backend does not return the (E, H) attention")
    qkv = [t for t in tensors[:3] if t is not None]
    if any(t.dim() != 3 for t in qkv):
        out.append(f"the blocks backend needs (N, H, D) q, k and v, got {[t.dim() for t in qkv]} dimensions")
    if any(not t.is_floating_point() for t in qkv) or len({t.dtype for t in qkv}) > 1:
        out.append(f"the blocks backend needs q, k and v of one floating dtype, got {sorted({str(t.dtype) for t in qkv})}")
    return out


class _RoutedAttention(torch.autograd.Function):
    """Attention of each query region over its routed key regions, one route at a time.

    q (G, H, P, Dk), k (G, H, P, Dk), v (G, H, P, Dv) in region layout (G = B * R region slots);
    ``sel`` (topk, G): the region slot each query region reads for each route.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sel: Tensor, scale: float) -> Tensor:
        m = l = acc = None
        for t in range(sel.shape[0]):
            kt, vt = k.index_select(0, sel[t]), v.index_select(0, sel[t])  # (G, H, P, D) one route
            s = torch.matmul(q, kt.transpose(-1, -2)).mul_(scale)  # (G, H, P, P)
            mt = s.amax(-1, keepdim=True)  # (G, H, P, 1)
            if m is None:
                m = mt
                p = s.sub_(m).exp_()
                l, acc = p.sum(-1, keepdim=True), torch.matmul(p, vt)
            else:
                m_new = torch.maximum(m, mt)
                alpha = (m - m_new).exp_()  # rescales what the earlier routes summed
                p = s.sub_(m_new).exp_()
                l = l.mul_(alpha).add_(p.sum(-1, keepdim=True))
                acc = acc.mul_(alpha).add_(torch.matmul(p, vt))
                m = m_new
        # the saved tensors are made out of place: torch 2.11's compiled backward read wrong values for
        # saved results of in-place ops (tests/vision/test_vision_compile.py on 2.11)
        out = acc / l  # (G, H, P, Dv)
        lse = m + l.log()  # (G, H, P, 1)
        ctx.save_for_backward(q, k, v, sel, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        q, k, v, sel, out, lse = ctx.saved_tensors
        scale = ctx.scale
        g = g.contiguous()
        delta = (g * out).sum(-1, keepdim=True)  # (G, H, P, 1): rowsum(dO * O)
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        dv = torch.zeros_like(v) if ctx.needs_input_grad[2] else None
        for t in range(sel.shape[0]):
            kt, vt = k.index_select(0, sel[t]), v.index_select(0, sel[t])  # (G, H, P, D)
            a = torch.matmul(q, kt.transpose(-1, -2)).mul_(scale).sub_(lse).exp_()  # (G, H, P, P) attention
            if dv is not None:
                dv.index_add_(0, sel[t], torch.matmul(a.transpose(-1, -2), g))
            ds = torch.matmul(g, vt.transpose(-1, -2)).sub_(delta).mul_(a)  # (G, H, P, P) dscore / scale
            dq.add_(torch.matmul(ds, kt))
            if dk is not None:
                dk.index_add_(0, sel[t], torch.matmul(ds.transpose(-1, -2), q))
        dq.mul_(scale)
        if dk is not None:
            dk.mul_(scale)
        return (dq if ctx.needs_input_grad[0] else None), dk, dv, None, None


def _to_regions(t: Tensor, B: int, Y: int, X: int, n: int) -> Tensor:
    """(B*Y*X, H, D) node rows -> (B*R, H, P, D) region layout (a permutation, copied once)."""
    H, D = t.shape[1], t.shape[2]
    t = t.reshape(B, n, Y // n, n, X // n, H, D).permute(0, 1, 3, 5, 2, 4, 6)  # (B, n, n, H, h, w, D)
    return t.reshape(B * n * n, H, (Y // n) * (X // n), D)


def sparse_attention(graph: Graph, q: Tensor, k: Tensor, v: Tensor, *, score: str, logits: Tensor | None,
                     scale: float | None, bias: Tensor | None, negative_slope: float, edge_weight: Tensor | None,
                     dropout_p: float, return_attention: bool) -> Tensor:
    """``gatx.ops.sparse_attention`` on a region-routed graph (inputs already validated by the op)."""
    blocks = blocks_of(graph)
    (Y, X), n, idx = blocks.grid, blocks.n_win, blocks.idx
    B, R, topk = idx.shape
    sel = (idx + torch.arange(0, B * R, R, device=idx.device).view(B, 1, 1)).permute(2, 0, 1).reshape(topk, B * R)
    # float16 / bfloat16: the online softmax's max, normaliser and sums (and the backward's) run in float32
    acc = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    qr, kr, vr = (_to_regions(t, B, Y, X, n).to(acc) for t in (q, k, v))
    dev = q.device.type  # the routes run in the dtype chosen above, not autocast's
    with autocast_off(dev):
        out = _RoutedAttention.apply(qr, kr, vr, sel, float(scale))  # (B*R, H, P, Dv)
    H, Dv = v.shape[1], v.shape[2]
    out = out.view(B, n, n, H, Y // n, X // n, Dv).permute(0, 1, 4, 2, 5, 3, 6)  # (B, n, h, n, w, H, Dv)
    return out.reshape(B * Y * X, H, Dv).to(v.dtype)
