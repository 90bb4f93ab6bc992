"""Structured backend: dense-batched ``sparse_attention`` for graphs that carry a grid :class:`Tiling`.

Local attention on a grid through per-edge gathers is memory-bound: each key is re-read once per
query that sees it (k*k times for a k x k neighborhood). When a graph was built by a
:mod:`gatx.vision` builder, its ``structure`` holds a :class:`Tiling`: the queries are grouped into
tiles, each tile reads one *halo* of keys (the union of its queries' keys), and attention runs as
one batched matmul-softmax-matmul over all tiles with an additive mask (``-inf`` outside each
query's key set, plus the per-edge ``bias`` scattered into place). Keys are read once per tile
instead of once per query. A :class:`~gatx.ops.TableBias` whose rows are the same in every tile
(a grid's relative position bias on windows) stays one tile's (H, Qt, Kt) block, added by
broadcasting, its gradient summed over the tiles: Swin's formulation, no per-edge values. When no (E, H) output or gradient is needed (no returned attention,
dropout, edge weights, or bias that requires grad), that is one fused ``scaled_dot_product_attention``
call with the mask (the flash kernel on CPU). With a bias that needs a gradient (relative position
bias) it is :class:`_DenseAttention`: one score buffer, softmax in place, a hand-written backward.
With dropout, edge weights or returned attention it is written out and the backward is autograd's.
Data movement takes the grid's shortcuts where it allows: tiles that are blocks of the (rolled) grid
(windows, shifted windows: Swin's roll + partition) are a row permutation (``BlockPlan``: one
``index_select`` each way, or strided copies for large moves on several threads), halos that are
ranges per axis (neighborhoods) are strided windows (``HaloPlan``); otherwise rows are gathered, with
gathers plus segment sums as backward. Gradients of any order are exact.

The tiling is separable: a grid of 1, 2 or 3 axes (e.g. Y x X, node ``y * X + x``, row-major) and
per axis a 1-D tiling; a query may attend a key iff, on every axis, the key's coordinate is allowed
for the query's. This covers neighborhood attention (clamped, dilated or causal windows) and
(shifted) window attention, in 1-D, 2-D and 3-D.

Layout of the dense score tensor: (B*H, T, Qt, Kt) with ``T`` tiles (the product of the per-axis
tile counts), ``Qt`` query slots and ``Kt`` halo slots (products of the per-axis tile and halo
lengths), each flattened row-major over the axes. A query may sit in several tiles (padding of the
last tile); one copy, its *owner*, gives its output. ``edge_pos[e]`` is the dense position of edge
e at its owner copy; ``pos_edge[p]`` the edge at dense position p (``E`` where p is masked).
Results equal the generic path up to float rounding; they do not depend on the tiling. The
tilings themselves are built in :mod:`gatx.backends.structured_tiling` (re-exported here).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._grad import wanted_grads
from ..graph import Graph
from ..ops._bias import TableBias
from .structured_moves import BlockPlan, HaloPlan
from .structured_tiling import AxisTiling, RowGather, Tiling, axis_tiling, grid_tiling

NAME = "structured"
TAKES_TABLE_BIAS = True  # a TableBias whose rows repeat in every tile stays one tile-sized block

__all__ = ["AxisTiling", "RowGather", "Tiling", "axis_tiling", "grid_tiling", "reasons", "sparse_attention"]


# ---------------------------------------------------------------------------------------- kernel


def tiling_of(graph: Graph) -> Tiling | None:
    """The :class:`Tiling` of a graph built by a :mod:`gatx.vision` builder, else None."""
    tiling = getattr(graph.structure, "tiling", None)
    return tiling if isinstance(tiling, Tiling) else None


def reasons(graph: Graph, *tensors: Tensor | None, op: str = "", **opts: Any) -> list[str]:
    """Why this backend cannot run the input (empty list: it can)."""
    if op and op != "sparse_attention":
        return [f"the structured backend runs only sparse_attention, not {op}"]
    tiling = tiling_of(graph)
    if tiling is None:
        return ["graph has no regular structure (build it with gatx.vision.neighborhood_graph or window_graph)"]
    out = []
    if opts.get("score", "dot") != "dot":
        out.append(f"the structured backend runs score='dot' only, got {opts.get('score')!r}")
    N = tiling.num_nodes
    if graph.num_src != N or graph.num_dst != N or graph.num_edges != tiling.num_edges:
        out.append("graph does not match its structure (edges or node counts differ)")
    if tiling.device != graph.device:
        out.append(f"structure tensors are on {tiling.device} but the graph is on {graph.device}; rebuild the graph on that device")
    q = tensors[0] if tensors else None
    if q is not None and q.dim() != 3:
        out.append(f"the structured backend needs (N, H, D) queries, got {q.dim()} dimensions")
    bias = opts.get("bias")
    if isinstance(bias, TableBias):
        if q is not None and bias.heads not in (1, q.shape[1]):
            out.append(f"the structured backend needs a TableBias with H or 1 heads, got {bias.heads}")
    elif bias is not None and (bias.dim() != 2 or (q is not None and bias.shape[1] not in (1, q.shape[1]))):
        out.append(f"the structured backend needs bias of shape (E, H) or (E, 1), got {tuple(bias.shape)}")
    return out


class _EdgesToDense(torch.autograd.Function):
    """(C, E) per-edge values -> (C, P) dense positions, ``fill`` where masked.

    The backward reads only each edge's owner position: positions of non-owner query copies get no
    gradient because their outputs are discarded, and masked positions get none because their
    attention weight is exactly 0. So the backward is a gather, not a scatter-add.
    """

    @staticmethod
    def forward(ctx, vals: Tensor, pos_edge: Tensor, edge_pos: Tensor, fill: float, full: bool, single: bool) -> Tensor:
        ctx.save_for_backward(edge_pos)
        if single and not full:  # each query in one slot: fill, then write the E edges (a third of P reads)
            return vals.new_full((vals.shape[0], pos_edge.numel()), fill).index_copy_(1, edge_pos, vals)
        ext = vals if full else torch.cat([vals, vals.new_full((vals.shape[0], 1), fill)], 1)  # (C, E [+ 1])
        return ext.index_select(1, pos_edge)  # (C, P)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (edge_pos,) = ctx.saved_tensors
        return grad.index_select(1, edge_pos), None, None, None, None, None


class _FusedSDPA(torch.autograd.Function):
    """``scaled_dot_product_attention`` (the flash kernel on CPU) with gradients of any order.

    The forward keeps the fused call's own autograd graph, and a first-order backward runs it (no
    recomputation). The flash kernel has no double backward, so a backward that builds a graph
    (``create_graph=True``) recomputes the attention written out (matmul, softmax, matmul) from the
    saved inputs and differentiates that: exact second-order gradients instead of an error.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, scale=scale)
        ctx.inner = (out, leaves)
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale = scale
        return out.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, mask = ctx.saved_tensors
        want = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            a = torch.softmax(torch.matmul(q * ctx.scale, k.transpose(-1, -2)) + mask, dim=-1)
            out, inputs = torch.matmul(a, v), [q, k, v]
        else:
            out, inputs = ctx.inner
        return wanted_grads(out, inputs, want, grad, retain_graph=True, create_graph=torch.is_grad_enabled()) + (None, None)


class _DenseAttention(torch.autograd.Function):
    """softmax(scale * Q K^T + add [+ mask]) V over (H*T) tiles, with a hand-written backward that allocates less.

    ``add`` (A, T or 1, Qt, Kt), A dividing H, is the additive term: a dense bias (with -inf outside
    each query's keys when it is per edge), or one tile's bias shared by all tiles (then ``mask``,
    (1, T, Qt, Kt) or None when nothing is masked, holds the -inf). Head ``r * A + a`` reads ``add[a]``.
    The forward takes one (H*T, Qt, Kt) buffer: scores, then the softmax in place. The first-order
    backward takes one more: dA = dO V^T, turned into the score gradient in place (softmax backward);
    summed over the heads and tiles ``add`` is shared by, that is the gradient of ``add``. No autograd
    graph of score-sized temporaries, no CopySlices. A backward that builds a graph
    (``create_graph=True``) recomputes the attention written out from the saved inputs and
    differentiates that.
    """

    @staticmethod
    def forward(ctx, Q: Tensor, K: Tensor, V: Tensor, add: Tensor, mask: Tensor | None, scale: float, T: int) -> Tensor:
        s = torch.bmm(Q, K.transpose(1, 2))  # (H*T, Qt, Kt)
        s5 = _by_add(s, add, T)  # (H / A, A, T, Qt, Kt)
        torch.add(add, s5, alpha=scale, out=s5)  # scale * q.k + bias, in place
        if mask is not None:
            s5.add_(mask)
        torch._softmax(s, -1, False, out=s)  # the attention, in place
        ctx.save_for_backward(Q, K, V, add, mask, s)
        ctx.scale, ctx.T = scale, T
        return torch.bmm(s, V)  # (H*T, Qt, Dv)

    @staticmethod
    def backward(ctx, grad: Tensor):
        Q, K, V, add, mask, a = ctx.saved_tensors
        scale, T, want = ctx.scale, ctx.T, ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: a differentiable recomputation
            s = _by_add(torch.bmm(Q * scale, K.transpose(1, 2)), add, T) + add
            if mask is not None:
                s = s + mask
            out = torch.bmm(torch.softmax(s, -1).view_as(a), V)
            return wanted_grads(out, (Q, K, V, add), want[:4], grad, create_graph=True) + (None, None, None)
        grad = grad.contiguous()
        gV = torch.bmm(a.transpose(1, 2), grad) if want[2] else None  # (H*T, Kt, Dv)
        ds = torch.bmm(grad, V.transpose(1, 2))  # (H*T, Qt, Kt): dA
        torch._softmax_backward_data(ds, a, -1, a.dtype, grad_input=ds)  # dS, in place
        # the scale as the products' alpha (beta = 0 ignores the empty buffers' contents): no pass scaling them
        gQ = Q.new_empty(Q.shape).baddbmm_(ds, K, beta=0, alpha=scale) if want[0] else None
        gK = K.new_empty(K.shape).baddbmm_(ds.transpose(1, 2), Q, beta=0, alpha=scale) if want[1] else None
        gadd = None
        if want[3]:
            ds5 = _by_add(ds, add, T)  # (H / A, A, T, Qt, Kt)
            # one reduction per shared axis, outermost first: torch reduces the two axes at once 3-12x slower
            # (CPU, (2..32, 3, 4..64, 49, 49): 0.46 -> 0.05 ms at B=2 14x14, 69 -> 5.8 ms at B=32 56x56)
            gadd = ds5.sum(0) if ds5.shape[0] > 1 else ds5[0]  # (A, T, Qt, Kt)
            if add.shape[1] != T:  # one tile's bias for every tile
                gadd = gadd.sum(1, keepdim=True)
            gadd = gadd.view(add.shape)
        return gQ, gK, gV, gadd, None, None, None


def _by_add(s: Tensor, add: Tensor, T: int) -> Tensor:
    """The (H*T, Qt, Kt) scores as (H / A, A, T, Qt, Kt), so that ``add`` (A, T or 1, Qt, Kt) broadcasts over them."""
    return s.view(-1, add.shape[0], T, *s.shape[1:])


def _strided_plans(tiling: Tiling) -> tuple[BlockPlan | None, HaloPlan | None]:
    """The tiling's grid moves (block permutations, halo windows) where they can run: eagerly, or only an
    identity block plan (no move) while torch.compile traces. Their copies go through ``as_strided`` at
    storage offsets, which Dynamo can neither read nor functionalize, and a block plan's permutation is
    built and cached on first use, so a traced call moves rows with the tiling's row gathers instead
    (``query_nodes``, ``key_nodes``, ``owner``), as for other tiles."""
    compiling = torch.compiler.is_compiling()
    blocks = tiling.blocks if tiling.blocks is not None and (tiling.blocks.identity or not compiling) else None
    return blocks, None if compiling else tiling.halo


def _edges_to_dense(vals: Tensor, tiling: Tiling, fill: float) -> tuple[Tensor, bool]:
    """(E, C) or (E,) per-edge values -> (C, T*Qt*Kt) in the dense score layout, and whether it is a new tensor.

    When the dense layout is the edge order, that is ``vals`` itself (no gather, and maybe the caller's
    memory: never write into it); otherwise a fresh tensor.
    """
    vals = vals.reshape(vals.shape[0], -1).t()  # (C, E)
    if tiling.edge_order:
        return vals, False
    T, Qt, Kt = tiling.mask.shape
    if tiling.edge_rows:  # (C, N, Kt) rows, moved like the queries (the block plan's moves when tiles are blocks)
        rows = vals.contiguous().view(vals.shape[0], -1, Kt)
        blocks, _ = _strided_plans(tiling)
        dense = blocks.to_blocks(rows) if blocks is not None else tiling.query_nodes(rows)
        return dense.view(vals.shape[0], -1), dense is not rows  # an identity plan moves nothing (vals' memory)
    return _EdgesToDense.apply(vals.contiguous(), tiling.pos_edge, tiling.edge_pos, fill, tiling.full,
                               tiling.blocks is not None), True


def sparse_attention(
    graph: Graph, q: Tensor, k: Tensor, v: Tensor, *, score: str, scale: float, bias: Tensor | None,
    negative_slope: float, edge_weight: Tensor | None, dropout_p: float, return_attention: bool,
    logits: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``gatx.ops.sparse_attention`` (score="dot") as batched dense attention over the graph's tiles.

    Works head-major: (N, H, D) inputs whose memory is (H, N, D) (``t.transpose(0, 1)`` of a
    contiguous tensor, as the vision modules pass them) are used without a copy, others are copied
    once. The output (N, H, Dv) is such a transposed view of an (H, N, Dv) tensor.

    Non-finite values stay where the graph puts them, as on every other backend. In a dense tile a
    query's masked slots still read real keys and values of the halo: a NaN / Inf key or value, or a
    score that overflows, would reach every query of the tile (``-inf + inf`` and ``0 * NaN`` are
    NaN), and softmax gives NaN to a row whose edges are all ``-inf`` (the documented answer is 0).
    Both can only produce non-finite numbers, so the result is checked: when the output (or the
    returned attention) is not all finite, or, with gradients and masked slots, q or k is not, the
    call is computed per edge instead (the torch backend's kernels, the reference semantics). One
    sum per checked tensor and, on a GPU, one synchronisation; finite inputs with finite results
    take the dense path alone. (A non-finite value of v always shows in the output: every halo slot
    is some query's key.) Not covered: a non-finite *upstream gradient* of one query spreads to the
    keys and values of its tile.
    """
    res = _tiled(graph, q, k, v, scale=scale, bias=bias, edge_weight=edge_weight, dropout_p=dropout_p,
                 return_attention=return_attention)
    checked = list(res) if return_attention else [res]
    if not tiling_of(graph).full and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        checked += [q, k]  # finite outputs, yet 0 * inf in the backward of a masked slot (e.g. a -inf key)
    table = bias if isinstance(bias, TableBias) else None
    if torch.compiler.is_compiling():  # no data-dependent branch in a traced graph: torch.cond picks when it runs
        inputs = dict(q=q, k=k, v=v, bias=table.table if table is not None else bias, edge_weight=edge_weight)
        from torch.fx.experimental.symbolic_shapes import guard_scalar

        # Dynamo makes a float attribute symbolic once a frame recompiles (dynamic shapes): torch.cond takes no floats
        scale, dropout_p = guard_scalar(scale), guard_scalar(dropout_p)
        return _finite_or_per_edge(checked, res, inputs, lambda t: _per_edge(
            graph, t["q"], t["k"], t["v"], scale=scale, edge_weight=t["edge_weight"], dropout_p=dropout_p,
            return_attention=return_attention, bias=table.per_edge(t["bias"]) if table is not None else t["bias"]))
    if _all_finite(checked):
        return res
    bias = table.per_edge() if table is not None else bias
    return _per_edge(graph, q, k, v, scale=scale, bias=bias, edge_weight=edge_weight, dropout_p=dropout_p,
                     return_attention=return_attention)


class _ContiguousGrad(torch.autograd.Function):
    """A copy whose backward makes the gradient contiguous (both torch.cond branches must agree on layouts)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # contiguous() keeps any stride of a size-1 axis (one head: (N, 1, D) with the head-major N * D), whose
        # order torch.cond compares too: view it flat and back for the row-major strides
        return grad.contiguous().view(-1).view(grad.shape)


def _finite_or_per_edge(checked: list[Tensor], res: Any, inputs: dict[str, Tensor | None], per_edge: Any) -> Any:
    """The check above under torch.compile: ``res`` when ``checked`` is all finite, else ``per_edge(inputs)``,
    as one ``torch.cond`` (both branches are compiled, the taken one runs). Its operands are contiguous
    copies of the inputs and of ``res`` (operands must not alias, and q, k, v are often views of one qkv
    tensor; both branches must give outputs and gradients the same layouts): contiguous outputs."""
    outs = list(res) if isinstance(res, tuple) else [res]
    total = sum(t.detach().sum(dtype=torch.float32 if t.element_size() < 4 else None) for t in checked)
    names = [n for n, t in inputs.items() if t is not None]

    def dense(*operands: Tensor) -> list[Tensor]:
        return [_ContiguousGrad.apply(t) for t in operands[len(names):]]

    def fallback(*operands: Tensor) -> list[Tensor]:
        operands = tuple(_ContiguousGrad.apply(t) for t in operands[:len(names)])  # contiguous gradients in both
        got = per_edge({**inputs, **dict(zip(names, operands))})
        return [t.clone(memory_format=torch.contiguous_format) for t in (got if isinstance(got, tuple) else [got])]

    operands = tuple(t.clone(memory_format=torch.contiguous_format) for t in [inputs[n] for n in names] + outs)
    picked = torch.cond(torch.isfinite(total), dense, fallback, operands)
    return tuple(picked) if isinstance(res, tuple) else picked[0]


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every value is finite, from one sum per tensor (an overflowing sum only costs the slow path)
    and one read of their total (one synchronisation on a GPU). The total is read as a Python float: the
    0-dim tensor ops of an ``isfinite`` test cost about 0.1 ms per call on a CPU, 1-3% of a window layer."""
    sums = [t.detach().sum(dtype=torch.float32 if t.element_size() < 4 else None) for t in tensors]
    total = sums[0] if len(sums) == 1 else sum(sums)
    return math.isfinite(total.item())


def _per_edge(
    graph: Graph, q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None,
    edge_weight: Tensor | None, dropout_p: float, return_attention: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The same attention edge by edge on the torch backend's kernels (no dense tiles, nothing shared)."""
    from ..ops.attention import compose
    from . import torch as reference

    return compose(reference, graph, q, k, v, score="dot", logits=None, scale=scale, bias=bias, negative_slope=0.0,
                   edge_weight=edge_weight, dropout_p=dropout_p, return_attention=return_attention)


def _tiled(
    graph: Graph, q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None,
    edge_weight: Tensor | None, dropout_p: float, return_attention: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The dense-tile computation (see the module docstring); non-finite values may spread within a tile."""
    tl = tiling_of(graph)
    H, D, Dv = q.shape[1], q.shape[2], v.shape[2]
    T, Qt, Kt = tl.mask.shape
    q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))  # (H, N, D): no copy when head-major
    blocks, halo = _strided_plans(tl)
    if blocks is not None:  # tiles are blocks of the (rolled) grid: a row permutation
        Q = blocks.to_blocks(q).view(H * T, Qt, D)
    else:
        Q = tl.query_nodes(q).view(H * T, Qt, D)
    if tl.keys_are_queries and blocks is not None:
        K, V = blocks.to_blocks(k).view(H * T, Kt, D), blocks.to_blocks(v).view(H * T, Kt, Dv)
    elif halo is not None:  # each halo is a range per axis: strided windows of the grid, no gather
        K, V = halo.gather(k).view(H * T, Kt, D), halo.gather(v).view(H * T, Kt, Dv)
    else:
        K = tl.key_nodes(k).view(H * T, Kt, D)
        V = tl.key_nodes(v).view(H * T, Kt, Dv)
    plain = edge_weight is None and dropout_p == 0.0 and not return_attention
    dense_bias, fresh, mask = None, False, None
    rows = bias.tile_rows(tl) if isinstance(bias, TableBias) and plain else None
    if rows is not None:  # every tile reads the same rows: one tile's bias, broadcast over the tiles (as Swin)
        Ht = bias.table.shape[1]
        dense_bias = bias.table.t().index_select(1, rows).view(Ht, 1, Qt, Kt)  # (Ht, 1, Qt, Kt)
        mask = None if tl.full else tl.mask.to(Q.dtype)[None]  # (1, T, Qt, Kt)
    elif isinstance(bias, TableBias) and plain and bias.dense_rows(tl) is not None:
        # tiles read different rows (neighborhoods): the few distinct tiles' bias gathered from the table and a
        # -inf row, copied to the tiles and shared by the repeats (no per-edge (E, repeat * Ht) values, no fill
        # and scatter); autograd's index_add_ sums the gradient back both ways
        patterns, tile_pattern = bias.dense_rows(tl)  # (C, Qt * Kt), (T,)
        table_t = bias.table.t().to(Q.dtype)  # (Ht, R)
        ext = torch.cat([table_t, table_t.new_full((table_t.shape[0], 1), float("-inf"))], 1)  # (Ht, R + 1)
        per_pattern = ext.index_select(1, patterns.view(-1)).view(-1, patterns.shape[0], Qt * Kt)  # (Ht, C, Qt*Kt)
        dense_bias = per_pattern.index_select(1, tile_pattern).view(-1, T, Qt, Kt)  # (Ht, T, Qt, Kt)
    elif bias is not None:
        bias = bias.per_edge() if isinstance(bias, TableBias) else bias  # (E, H) or (E, 1)
        dense_bias, fresh = _edges_to_dense(bias.to(Q.dtype), tl, float("-inf"))
        dense_bias = dense_bias.reshape(-1, T, Qt, Kt)  # (1 or H, T, Qt, Kt)
    add = tl.mask.to(Q.dtype)[None] if dense_bias is None else dense_bias  # (A, T or 1, Qt, Kt)
    if plain and rows is None and (dense_bias is None or not dense_bias.requires_grad) and add.shape[0] in (1, H):
        # no (T, Qt, Kt) tensor is needed: one fused attention call (flash kernel on CPU)
        q4, k4, v4 = Q.view(H, T, Qt, D), K.view(H, T, Kt, D), V.view(H, T, Kt, Dv)
        if torch.compiler.is_compiling():  # _FusedSDPA's backward calls autograd.grad, which Dynamo does not trace
            o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=add, scale=scale)
        else:
            o = _FusedSDPA.apply(q4, k4, v4, add, scale)
        o = o.reshape(H * T, Qt, Dv)
    elif plain:  # bias with gradient, or one tile's bias (the flash kernel takes 2x as long to broadcast it
        # over 5-d views as this takes; 56x56 windows, B=2, 2 threads: 8.0 against 3.7 ms), or a bias shared
        # by the repeats of a table's heads: the dense core
        o = _DenseAttention.apply(Q, K, V, add, mask, scale, T)  # (H*T, Qt, Dv)
    else:
        Q = Q * scale
        if dense_bias is None:
            s = torch.bmm(Q, K.transpose(1, 2)).view(H, T, Qt, Kt)
            s = s.add_(tl.mask.to(s.dtype)).view(H * T, Qt, Kt)  # -inf outside each query's keys
        elif dense_bias.shape[0] == H and not fresh:  # the bias as given (edge order): never written into
            s = torch.baddbmm(dense_bias.reshape(H * T, Qt, Kt), Q, K.transpose(1, 2))  # (H*T, Qt, Kt)
        else:  # accumulate the scores into a fresh dense bias, in place (its backward needs no values)
            s = dense_bias.expand(H, -1, -1, -1).reshape(H * T, Qt, Kt)
            if dense_bias.shape[0] != H:
                s = s.contiguous()
            s = s.baddbmm_(Q, K.transpose(1, 2))  # (H*T, Qt, Kt)
        a = torch.softmax(s, dim=-1)  # (H*T, Qt, Kt)
        if dropout_p > 0.0:
            a = F.dropout(a, dropout_p, training=True)
        if edge_weight is not None:
            w = _edges_to_dense(edge_weight.to(a.dtype), tl, 0.0)[0].reshape(-1, T, Qt, Kt)
            a = a * w.expand(H, -1, -1, -1).reshape(H * T, Qt, Kt)
        o = torch.bmm(a, V)  # (H*T, Qt, Dv)
    if blocks is not None:
        o = blocks.from_blocks(o.view(H, T * Qt, Dv))  # (H, N, Dv)
    else:
        o = tl.owner(o.view(H, T * Qt, Dv))  # (H, N, Dv)
    out = o.transpose(0, 1)  # (N, H, Dv)
    if return_attention:
        attn = a.reshape(H, -1).index_select(1, tl.edge_pos).t()  # (E, H)
        return out, attn
    return out
