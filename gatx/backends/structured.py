"""Structured backend: dense-batched ``sparse_attention`` for graphs that carry a grid :class:`Tiling`.

Local attention on a grid through per-edge gathers is memory-bound: each key is re-read once per
query that sees it (k*k times for a k x k neighborhood). When a graph was built by a
:mod:`gatx.vision` builder, its ``structure`` holds a :class:`Tiling`: the queries are grouped into
tiles, each tile reads one *halo* of keys (the union of its queries' keys), and attention runs as
one batched matmul-softmax-matmul over all tiles with an additive mask (``-inf`` outside each
query's key set, plus the per-edge ``bias`` scattered into place). Keys are read once per tile
instead of once per query. When no (E, H) output or gradient is needed (no returned attention,
dropout, edge weights, or bias that requires grad), that is one fused ``scaled_dot_product_attention``
call with the mask (the flash kernel on CPU). Otherwise it is written out (matmul, softmax,
matmul) and the backward is autograd's, except for the row gathers (keys into halos, per-edge
values into the dense layout), whose backwards are gathers plus segment sums instead of scatter-adds.
First-order gradients only (use ``backend="torch"`` for double backward).

The tiling is separable: a grid of 1, 2 or 3 axes (e.g. Y x X, node ``y * X + x``, row-major) and
per axis a 1-D tiling; a query may attend a key iff, on every axis, the key's coordinate is allowed
for the query's. This covers neighborhood attention (clamped, dilated or causal windows) and
(shifted) window attention, in 1-D, 2-D and 3-D.

Layout of the dense score tensor: (B*H, T, Qt, Kt) with ``T`` tiles (the product of the per-axis
tile counts), ``Qt`` query slots and ``Kt`` halo slots (products of the per-axis tile and halo
lengths), each flattened row-major over the axes. A query may sit in several tiles (padding of the
last tile); one copy, its *owner*, gives its output. ``edge_pos[e]`` is the dense position of edge
e at its owner copy; ``pos_edge[p]`` the edge at dense position p (``E`` where p is masked).
Results equal the generic path up to float rounding; they do not depend on the tiling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import Graph

NAME = "structured"

__all__ = ["AxisTiling", "RowGather", "Tiling", "axis_tiling", "grid_tiling", "reasons", "sparse_attention"]


@dataclass(frozen=True, eq=False)
class AxisTiling:
    """One axis of a separable tiling: ``L`` positions in ``nt`` tiles of ``T`` query slots and ``K`` halo slots.

    ``neighbors`` (L, C): the allowed key positions of each query position in increasing order, the
    first ``count`` (L,) valid (padding repeats the last). ``queries`` (nt, T) and ``halo`` (nt, K)
    positions, both sorted (padding slots repeat a position; padded halo slots are never allowed).
    ``tile_rank`` (nt, T, K): rank of each halo key among the query slot's allowed keys, -1 where not
    allowed. ``owner`` (L,): the flat slot in ``nt * T`` whose output is kept. ``slot`` (L, C): the
    halo slot, in the owner's tile, of each of a query's keys. Memory is O(L), never (L, L).
    """

    neighbors: Tensor
    count: Tensor
    queries: Tensor
    halo: Tensor
    tile_rank: Tensor
    owner: Tensor
    slot: Tensor
    identity: bool  # every position sits in exactly one query slot, in position order: no gather needed

    @property
    def length(self) -> int:
        return self.neighbors.shape[0]

    def to(self, device: torch.device) -> "AxisTiling":
        moved = [getattr(self, f).to(device) for f in self.__dataclass_fields__ if f != "identity"]
        return AxisTiling(*moved, identity=self.identity)


def axis_tiling(neighbors: Tensor, count: Tensor, tiles: list[list[int]]) -> AxisTiling:
    """Build an :class:`AxisTiling` from sorted per-position key lists and a list of query tiles.

    ``neighbors`` (L, C) and ``count`` (L,) as in :class:`AxisTiling`. Every position must appear in
    some tile; its first appearance is the owner. Tiles shorter than the longest are padded by
    repeating their last position (a non-owner copy).
    """
    L, C = neighbors.shape
    neighbors, count = neighbors.cpu(), count.cpu()
    if not bool((count >= 1).all()):
        raise AssertionError("every position needs at least one allowed key")
    T = max(len(t) for t in tiles)
    queries = torch.tensor([t + [t[-1]] * (T - len(t)) for t in tiles], dtype=torch.int64)  # (nt, T)
    valid = torch.arange(C)[None, :] < count[:, None]  # (L, C)
    halos = [torch.unique(neighbors[q][valid[q]]) for q in (torch.tensor(t) for t in tiles)]  # sorted
    K = max(h.numel() for h in halos)
    halo = torch.stack([torch.cat([h, h[-1:].expand(K - h.numel())]) for h in halos])  # (nt, K), still sorted
    halo_valid = torch.arange(K)[None, :] < torch.tensor([h.numel() for h in halos])[:, None]  # (nt, K)
    keys = neighbors[queries]  # (nt, T, C)
    probe = halo[:, None, :].expand(-1, T, -1).contiguous()  # (nt, T, K)
    pos = torch.searchsorted(keys, probe)  # first match: padding repeats come after the real entry
    hit = (keys.gather(2, pos.clamp(max=C - 1)) == probe) & (pos < count[queries][..., None]) & halo_valid[:, None, :]
    tile_rank = torch.where(hit, pos, -1)  # (nt, T, K)
    flat = queries.reshape(-1)
    owner = torch.full((L,), flat.numel(), dtype=torch.int64).scatter_reduce_(0, flat, torch.arange(flat.numel()), "amin")
    if bool((owner == flat.numel()).any()):
        raise AssertionError("every position must sit in a tile")
    own_halo = halo[owner // T]  # (L, K)
    slot = torch.searchsorted(own_halo, neighbors).clamp(max=K - 1)  # (L, C)
    if not bool(((own_halo.gather(1, slot) == neighbors) | ~valid).all()):
        raise AssertionError("an owner tile's halo must hold its query's keys")
    identity = queries.numel() == L and bool((flat == torch.arange(L)).all())
    return AxisTiling(neighbors, count, queries, halo, tile_rank, owner, slot, identity)


@dataclass(frozen=True, eq=False)
class RowGather:
    """Rows ``index`` (R,) along dim 1 of an (H, n, ...) tensor, with the inverse map for the backward.

    ``perm`` (R,) lists the output rows sorted by source row and ``lengths`` (n,) counts them, so the
    backward is a gather plus a segment sum (autograd's scatter-add backward of ``index_select`` is
    several times slower on CPU).
    """

    index: Tensor
    perm: Tensor
    lengths: Tensor

    @classmethod
    def build(cls, index: Tensor, n: int) -> "RowGather":
        return cls(index, torch.argsort(index, stable=True), torch.bincount(index, minlength=n))

    def __call__(self, x: Tensor) -> Tensor:
        return _GatherRows.apply(x, self)

    def to(self, device: torch.device) -> "RowGather":
        return RowGather(self.index.to(device), self.perm.to(device), self.lengths.to(device))


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, rows: RowGather) -> Tensor:
        ctx.rows = rows
        return x.index_select(1, rows.index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        rows: RowGather = ctx.rows
        H, R = grad.shape[:2]
        g = grad.index_select(1, rows.perm).reshape(H, R, -1)  # (H, R, *) sorted by source row
        lengths = rows.lengths.expand(H, -1).contiguous()  # (H, n)
        out = torch.segment_reduce(g, "sum", lengths=lengths, axis=1, unsafe=True)  # (H, n, *)
        return out.view(H, -1, *grad.shape[2:]), None


@dataclass(frozen=True, eq=False)
class Tiling:
    """A separable tiling of an n-d grid (see the module docstring); the kernel's contract.

    ``axes`` holds one :class:`AxisTiling` per grid axis. ``edge_pos`` (E,) and ``pos_edge`` (P,) map
    edges to dense score positions and back. ``mask`` (T, Qt, Kt) float32 is 0 at the allowed
    (query slot, halo slot) pairs and -inf elsewhere. ``query_nodes`` (T*Qt rows) and ``key_nodes``
    (T*Kt rows) gather the node of each query / halo slot; ``owner`` (N rows) gathers, for each node,
    the query slot whose output it keeps. ``keys_are_queries``: each tile's halo is its query block
    (unshifted windows), so keys are laid out like queries, without a gather. ``full``: no dense
    position is masked (``pos_edge < E``). ``edge_order``: the dense layout is the edge order
    (``pos_edge`` is ``arange(E)``, e.g. one tile holding every query), so per-edge values need no gather.
    """

    axes: tuple[AxisTiling, ...]
    edge_pos: Tensor
    pos_edge: Tensor
    mask: Tensor
    query_nodes: RowGather
    key_nodes: RowGather
    owner: RowGather
    keys_are_queries: bool
    full: bool
    edge_order: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.length for a in self.axes)

    @property
    def num_nodes(self) -> int:
        return math.prod(self.shape)

    @property
    def num_edges(self) -> int:
        return self.edge_pos.numel()

    @property
    def device(self) -> torch.device:
        return self.edge_pos.device

    @property
    def identity(self) -> bool:
        """Each node sits in one query slot and tiles are plain blocks of the grid (no query gather)."""
        return all(a.identity for a in self.axes)

    def to(self, device: torch.device | str) -> "Tiling":
        device = torch.device(device)
        if device == self.device:
            return self
        moved = [getattr(self, f) for f in self.__dataclass_fields__]
        moved = [tuple(a.to(device) for a in m) if isinstance(m, tuple) else m if isinstance(m, bool) else m.to(device) for m in moved]
        return Tiling(*moved)


def _ravel(coords: list[Tensor], shape: list[int]) -> Tensor:
    """Row-major flat index of per-axis coordinates (broadcasting)."""
    flat = torch.zeros((), dtype=torch.int64)
    for c, n in zip(coords, shape):
        flat = flat * n + c
    return flat


def grid_tiling(*axes: AxisTiling) -> tuple[Tiling, Tensor, Tensor]:
    """The tiling of an n-d grid from one :class:`AxisTiling` per axis, and the graph's edges ``(src, dst)``.

    Nodes are numbered row-major over the axes. Edges are sorted by query, then by key in row-major
    order, so a query's edges list its allowed keys as a block: for a k x k neighborhood, the
    attention of one query reshapes to (k, k).
    """
    n, shape = len(axes), [a.length for a in axes]
    counts = torch.ones((), dtype=torch.int64)
    for i, a in enumerate(axes):  # (L_0, ..., L_{n-1}) keys per query, flattened row-major
        counts = counts * a.count.view([-1 if i == j else 1 for j in range(n)])
    counts = counts.reshape(-1)  # (N,)
    N = counts.numel()
    indptr = torch.zeros(N + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    E = int(indptr[-1])
    dst = torch.repeat_interleave(torch.arange(N), counts)  # (E,)
    r = torch.arange(E) - indptr[dst]  # rank of the edge among its query's edges
    q, rem = [torch.empty(0)] * n, dst
    for i in reversed(range(n)):
        q[i], rem = rem % shape[i], rem // shape[i]
    ranks = [torch.empty(0)] * n
    for i in reversed(range(n)):  # the last axis varies fastest among a query's keys
        c = axes[i].count[q[i]]
        ranks[i], r = r % c, r // c
    src = _ravel([a.neighbors[qi, ri] for a, qi, ri in zip(axes, q, ranks)], shape)

    nts = [a.queries.shape[0] for a in axes]
    Ts = [a.queries.shape[1] for a in axes]
    Ks = [a.halo.shape[1] for a in axes]
    own = [a.owner[qi] for a, qi in zip(axes, q)]
    edge_pos = _ravel(
        [o // t for o, t in zip(own, Ts)] + [o % t for o, t in zip(own, Ts)] + [a.slot[qi, ri] for a, qi, ri in zip(axes, q, ranks)],
        nts + Ts + Ks,
    )  # (E,)

    def place(t: Tensor, *dims: int, ndim: int = 3 * n) -> Tensor:  # put t's dims at `dims` of an ndim-d view
        return t.reshape([t.shape[dims.index(j)] if j in dims else 1 for j in range(ndim)])

    # dense positions, laid out (nt_0.., T_0.., K_0..): edge id = indptr[query] + sum_a rank_a * prod_{b>a} count_b
    qnode = _ravel([place(a.queries, i, n + i) for i, a in enumerate(axes)], shape)  # (nt.., T.., 1..)
    eid, step = indptr[qnode], 1
    allowed = torch.ones((), dtype=torch.bool)
    for i in reversed(range(n)):
        a = axes[i]
        eid = eid + place(a.tile_rank, i, n + i, 2 * n + i) * step
        step = step * place(a.count[a.queries], i, n + i)
        allowed = allowed & place(a.tile_rank >= 0, i, n + i, 2 * n + i)
    allowed = allowed.expand(nts + Ts + Ks)
    pos_edge = torch.where(allowed, eid, E).reshape(-1)  # (P,)
    T, Qt, Kt = math.prod(nts), math.prod(Ts), math.prod(Ks)
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).reshape(T, Qt, Kt)
    assert bool((pos_edge[edge_pos] == torch.arange(E)).all()), "edge_pos and pos_edge must agree"
    query_nodes = qnode.expand(nts + Ts + [1] * n).reshape(-1)  # (T*Qt,)
    key_nodes = _ravel([place(a.halo, i, n + i, ndim=2 * n) for i, a in enumerate(axes)], shape).reshape(-1)  # (T*Kt,)
    tile = _ravel([place(a.owner // t, i, ndim=n) for i, (a, t) in enumerate(zip(axes, Ts))], nts)
    slot = _ravel([place(a.owner % t, i, ndim=n) for i, (a, t) in enumerate(zip(axes, Ts))], Ts)
    owner = (tile * Qt + slot).reshape(-1)  # (N,)
    assert bool((query_nodes[owner] == torch.arange(N)).all()), "owners must be copies of their node"
    gathers = (RowGather.build(query_nodes, N), RowGather.build(key_nodes, N), RowGather.build(owner, query_nodes.numel()))
    identity = all(a.identity for a in axes)
    keys_are_queries = identity and torch.equal(key_nodes, query_nodes)
    full = bool((pos_edge < E).all())
    edge_order = full and torch.equal(pos_edge, torch.arange(E))
    return Tiling(tuple(axes), edge_pos, pos_edge, mask, *gathers, keys_are_queries, full, edge_order), src, dst


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
    if bias is not None and (bias.dim() != 2 or (q is not None and bias.shape[1] not in (1, q.shape[1]))):
        out.append(f"the structured backend needs bias of shape (E, H) or (E, 1), got {tuple(bias.shape)}")
    return out


class _EdgesToDense(torch.autograd.Function):
    """(C, E) per-edge values -> (C, P) dense positions, ``fill`` where masked.

    The backward reads only each edge's owner position: positions of non-owner query copies get no
    gradient because their outputs are discarded, and masked positions get none because their
    attention weight is exactly 0. So the backward is a gather, not a scatter-add.
    """

    @staticmethod
    def forward(ctx, vals: Tensor, pos_edge: Tensor, edge_pos: Tensor, fill: float, full: bool) -> Tensor:
        ext = vals if full else torch.cat([vals, vals.new_full((vals.shape[0], 1), fill)], 1)  # (C, E [+ 1])
        ctx.save_for_backward(edge_pos)
        return ext.index_select(1, pos_edge)  # (C, P)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (edge_pos,) = ctx.saved_tensors
        return grad.index_select(1, edge_pos), None, None, None, None


def _edges_to_dense(vals: Tensor, tiling: Tiling, fill: float) -> tuple[Tensor, bool]:
    """(E, C) or (E,) per-edge values -> (C, T*Qt*Kt) in the dense score layout, and whether it is a new tensor.

    When the dense layout is the edge order, that is ``vals`` itself (no gather, and maybe the caller's
    memory: never write into it); otherwise a fresh tensor.
    """
    vals = vals.reshape(vals.shape[0], -1).t()  # (C, E)
    if tiling.edge_order:
        return vals, False
    return _EdgesToDense.apply(vals.contiguous(), tiling.pos_edge, tiling.edge_pos, fill, tiling.full), True


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
    if _all_finite(checked):
        return res
    return _per_edge(graph, q, k, v, scale=scale, bias=bias, edge_weight=edge_weight, dropout_p=dropout_p,
                     return_attention=return_attention)


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every value is finite, from one sum per tensor (an overflowing sum only costs the slow path)."""
    total = sum(t.detach().sum(dtype=torch.float32 if t.element_size() < 4 else None) for t in tensors)
    return bool(torch.isfinite(total))


def _per_edge(
    graph: Graph, q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None,
    edge_weight: Tensor | None, dropout_p: float, return_attention: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The same attention edge by edge on the torch backend's kernels (no dense tiles, nothing shared)."""
    from . import torch as reference

    s = reference.dot_score(graph, q, k) * scale  # (E, H)
    if bias is not None:
        s = s + bias
    a = reference.edge_softmax(graph, s.contiguous())  # (E, H); all -inf rows give 0
    if dropout_p > 0.0:
        a = F.dropout(a, dropout_p, training=True)
    if edge_weight is not None:
        a = a * (edge_weight.unsqueeze(-1) if edge_weight.dim() == 1 else edge_weight)
    out = reference.aggregate(graph, a, v)  # (N, H, Dv)
    return (out, a) if return_attention else out


def _tiled(
    graph: Graph, q: Tensor, k: Tensor, v: Tensor, *, scale: float, bias: Tensor | None,
    edge_weight: Tensor | None, dropout_p: float, return_attention: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The dense-tile computation (see the module docstring); non-finite values may spread within a tile."""
    tl = tiling_of(graph)
    H, D, Dv = q.shape[1], q.shape[2], v.shape[2]
    T, Qt, Kt = tl.mask.shape
    n = len(tl.axes)
    nts = [a.queries.shape[0] for a in tl.axes]
    Ts = [a.queries.shape[1] for a in tl.axes]
    q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))  # (H, N, D): no copy when head-major
    if tl.identity:  # tiles are blocks of the grid: one permuting copy
        interleaved = [s for pair in zip(nts, Ts) for s in pair]  # (nt_0, T_0, nt_1, T_1, ...)
        to_tiles = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [2 * n + 1]

        def blocks(t: Tensor) -> Tensor:
            return t.view(H, *interleaved, t.shape[-1]).permute(to_tiles).reshape(H * T, Qt, t.shape[-1])

        Q = blocks(q)
    else:
        Q = tl.query_nodes(q).view(H * T, Qt, D)
    if tl.keys_are_queries:
        K, V = blocks(k), blocks(v)
    else:
        K = tl.key_nodes(k).view(H * T, Kt, D)
        V = tl.key_nodes(v).view(H * T, Kt, Dv)
    dense_bias, fresh = None, False
    if bias is not None:
        dense_bias, fresh = _edges_to_dense(bias.to(Q.dtype), tl, float("-inf"))
        dense_bias = dense_bias.reshape(-1, T, Qt, Kt)  # (1 or H, T, Qt, Kt)
    fused = (bias is None or not bias.requires_grad) and edge_weight is None and dropout_p == 0.0 and not return_attention
    if fused:  # no (T, Qt, Kt) tensor is needed: one fused attention call (flash kernel on CPU)
        mask = tl.mask.to(Q.dtype)[None] if dense_bias is None else dense_bias  # (1 or H, T, Qt, Kt)
        o = F.scaled_dot_product_attention(
            Q.view(H, T, Qt, D), K.view(H, T, Kt, D), V.view(H, T, Kt, Dv), attn_mask=mask, scale=scale
        ).reshape(H * T, Qt, Dv)
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
    if tl.identity:
        to_grid = [0] + [j for i in range(n) for j in (1 + i, 1 + n + i)] + [2 * n + 1]
        o = o.view(H, *nts, *Ts, Dv).permute(to_grid).reshape(H, -1, Dv)  # (H, N, Dv)
    else:
        o = tl.owner(o.view(H, T * Qt, Dv))  # (H, N, Dv)
    out = o.transpose(0, 1)  # (N, H, Dv)
    if return_attention:
        attn = a.reshape(H, -1).index_select(1, tl.edge_pos).t()  # (E, H)
        return out, attn
    return out
