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

The tiling is separable: a grid of Y x X nodes, node ``y * X + x``, and per axis a 1-D tiling; a
query (y, x) may attend a key (ky, kx) iff ``allowed_y[y, ky] and allowed_x[x, kx]``. This covers
neighborhood attention (clamped and dilated windows) and (shifted) window attention.

Layout of the dense score tensor: (B*H, T, Qt, Kt) with ``T = nty * ntx`` tiles, ``Qt = Ty * Tx``
query slots, ``Kt = Ky * Kx`` halo slots, flattened in that order. A query may sit in several tiles
(padding of the last tile); one copy, its *owner*, gives its output. ``edge_pos[e]`` is the dense
position of edge e at its owner copy; ``pos_edge[p]`` the edge at dense position p (``E`` where p is
masked). Results equal the generic path up to float rounding; they do not depend on the tiling.
"""
from __future__ import annotations

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

    ``allowed`` (L, L): query position -> allowed key positions. ``queries`` (nt, T) and ``halo``
    (nt, K) positions (padding slots repeat a position; padded halo slots are never allowed).
    ``tile_allowed`` (nt, T, K). ``owner`` (L,) flat slot in ``nt * T`` whose output is kept.
    ``slot`` (nt, L) halo slot of each key position in each tile (-1: absent). ``rank`` (L, L) rank of a
    key among the allowed keys of a query, in position order (-1: not allowed); ``count`` (L,).
    """

    allowed: Tensor
    queries: Tensor
    halo: Tensor
    tile_allowed: Tensor
    owner: Tensor
    slot: Tensor
    rank: Tensor
    count: Tensor
    identity: bool  # every position sits in exactly one query slot, in position order: no gather needed

    @property
    def length(self) -> int:
        return self.allowed.shape[0]

    def to(self, device: torch.device) -> "AxisTiling":
        moved = [getattr(self, f).to(device) for f in self.__dataclass_fields__ if f != "identity"]
        return AxisTiling(*moved, identity=self.identity)


def axis_tiling(allowed: Tensor, tiles: list[list[int]]) -> AxisTiling:
    """Build an :class:`AxisTiling` from an (L, L) bool ``allowed`` matrix and a list of query tiles.

    Every position must appear in some tile; the first appearance is the owner. Tiles shorter than
    the longest are padded by repeating their last position (a non-owner copy).
    """
    L = allowed.shape[0]
    allowed = allowed.to(torch.bool).cpu()
    if not allowed.any(1).all():
        raise AssertionError("every position needs at least one allowed key")
    T = max(len(t) for t in tiles)
    queries = torch.tensor([t + [t[-1]] * (T - len(t)) for t in tiles], dtype=torch.int64)  # (nt, T)
    halos = [torch.nonzero(allowed[torch.tensor(t)].any(0)).flatten() for t in tiles]
    K = max(h.numel() for h in halos)
    halo = torch.stack([torch.cat([h, h[:1].expand(K - h.numel())]) for h in halos])  # (nt, K)
    valid = torch.arange(K)[None, :] < torch.tensor([h.numel() for h in halos])[:, None]  # (nt, K)
    tile_allowed = allowed[queries[:, :, None], halo[:, None, :]] & valid[:, None, :]  # (nt, T, K)
    owner = torch.full((L,), -1, dtype=torch.int64)
    flat = queries.reshape(-1)
    for i in range(flat.numel() - 1, -1, -1):  # the first appearance wins
        owner[flat[i]] = i
    if (owner < 0).any():
        raise AssertionError("every position must sit in a tile")
    slot = torch.full((len(tiles), L), -1, dtype=torch.int64)
    for t, h in enumerate(halos):
        slot[t, h] = torch.arange(h.numel())
    rank = torch.where(allowed, allowed.long().cumsum(1) - 1, -1)  # (L, L)
    identity = queries.numel() == L and bool((flat == torch.arange(L)).all())
    return AxisTiling(allowed, queries, halo, tile_allowed, owner, slot, rank, allowed.sum(1), identity)


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
    """A separable tiling of a Y x X grid (see the module docstring); the kernel's contract.

    ``edge_pos`` (E,) and ``pos_edge`` (P,) map edges to dense score positions and back.
    ``mask`` (T, Qt, Kt) float32 is 0 at the allowed (query slot, halo slot) pairs and -inf elsewhere.
    ``query_nodes`` (T*Qt rows) and ``key_nodes`` (T*Kt rows) gather the node of each query / halo
    slot; ``owner`` (N rows) gathers, for each node, the query slot whose output it keeps.
    ``keys_are_queries``: each tile's halo is its query block (unshifted windows), so keys are laid
    out like queries, without a gather. ``full``: no dense position is masked (``pos_edge < E``).
    """

    y: AxisTiling
    x: AxisTiling
    edge_pos: Tensor
    pos_edge: Tensor
    mask: Tensor
    query_nodes: RowGather
    key_nodes: RowGather
    owner: RowGather
    keys_are_queries: bool
    full: bool

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.length, self.x.length

    @property
    def num_edges(self) -> int:
        return self.edge_pos.numel()

    @property
    def device(self) -> torch.device:
        return self.edge_pos.device

    @property
    def identity(self) -> bool:
        """Each node sits in one query slot and tiles are plain blocks of the grid (no query gather)."""
        return self.y.identity and self.x.identity

    def to(self, device: torch.device | str) -> "Tiling":
        device = torch.device(device)
        if device == self.device:
            return self
        fields = self.__dataclass_fields__
        return Tiling(*(getattr(self, f) if isinstance(getattr(self, f), bool) else getattr(self, f).to(device) for f in fields))


def grid_tiling(ay: AxisTiling, ax: AxisTiling) -> tuple[Tiling, Tensor, Tensor]:
    """The 2-D tiling of two axes, and the graph's edges ``(src, dst)`` in the order the kernel expects.

    Edges are sorted by query (row-major ``y * X + x``), then by key in row-major order, so a query's
    edges list its allowed keys as a (rows x cols) block: for a k x k neighborhood, the attention of
    one query reshapes to (k, k).
    """
    Y, X = ay.length, ax.length
    counts = (ay.count[:, None] * ax.count[None, :]).reshape(-1)  # (N,)
    indptr = torch.zeros(Y * X + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    E = int(indptr[-1])
    dst = torch.repeat_interleave(torch.arange(Y * X), counts)  # (E,)
    r = torch.arange(E) - indptr[dst]  # rank of the edge among its query's edges
    qy, qx = dst // X, dst % X
    cx = ax.count[qx]
    nbr_y = _neighbors(ay.allowed)  # (Y, max count)
    nbr_x = _neighbors(ax.allowed)
    ky, kx = nbr_y[qy, r // cx], nbr_x[qx, r % cx]
    src = ky * X + kx

    nty, Ty = ay.queries.shape
    ntx, Tx = ax.queries.shape
    Ky, Kx = ay.halo.shape[1], ax.halo.shape[1]
    oy, ox = ay.owner[qy], ax.owner[qx]
    ty, iy, tx, ix = oy // Ty, oy % Ty, ox // Tx, ox % Tx
    hy, hx = ay.slot[ty, ky], ax.slot[tx, kx]
    assert bool((hy >= 0).all() and (hx >= 0).all()), "an owner tile's halo must hold its query's keys"
    edge_pos = ((((ty * ntx + tx) * Ty + iy) * Tx + ix) * Ky + hy) * Kx + hx  # (E,)

    # dense position -> edge id, through indptr[query] + rank_y * count_x + rank_x
    q_y, q_x = ay.queries, ax.queries  # (nty, Ty), (ntx, Tx)
    k_y, k_x = ay.halo, ax.halo  # (nty, Ky), (ntx, Kx)
    rank_y = ay.rank[q_y[:, :, None], k_y[:, None, :]]  # (nty, Ty, Ky)
    rank_x = ax.rank[q_x[:, :, None], k_x[:, None, :]]  # (ntx, Tx, Kx)
    base = indptr[q_y[:, None, :, None] * X + q_x[None, :, None, :]]  # (nty, ntx, Ty, Tx)
    eid = (
        base[..., None, None]
        + rank_y[:, None, :, None, :, None] * ax.count[q_x][None, :, None, :, None, None]
        + rank_x[None, :, None, :, None, :]
    )  # (nty, ntx, Ty, Tx, Ky, Kx)
    mask = ay.tile_allowed[:, None, :, None, :, None] & ax.tile_allowed[None, :, None, :, None, :]
    pos_edge = torch.where(mask, eid, torch.full_like(eid, E)).reshape(-1)  # (P,)
    mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")).reshape(nty * ntx, Ty * Tx, Ky * Kx)
    assert bool((pos_edge[edge_pos] == torch.arange(E)).all()), "edge_pos and pos_edge must agree"
    query_nodes = (q_y[:, None, :, None] * X + q_x[None, :, None, :]).reshape(-1)  # (T*Qt,)
    key_nodes = (k_y[:, None, :, None] * X + k_x[None, :, None, :]).reshape(-1)  # (T*Kt,)
    owner = (((ay.owner // Ty)[:, None] * ntx + (ax.owner // Tx)[None, :]) * (Ty * Tx)
             + (ay.owner % Ty)[:, None] * Tx + (ax.owner % Tx)[None, :]).reshape(-1)  # (N,)
    assert bool((query_nodes[owner] == torch.arange(Y * X)).all()), "owners must be copies of their node"
    gathers = (RowGather.build(query_nodes, Y * X), RowGather.build(key_nodes, Y * X), RowGather.build(owner, query_nodes.numel()))
    identity = ay.identity and ax.identity
    keys_are_queries = identity and torch.equal(key_nodes, query_nodes)
    full = bool((pos_edge < E).all())
    return Tiling(ay, ax, edge_pos, pos_edge, mask, *gathers, keys_are_queries, full), src, dst


def _neighbors(allowed: Tensor) -> Tensor:
    """(L, max count) allowed key positions of each query in increasing order (padded with 0)."""
    L = allowed.shape[0]
    order = torch.argsort((~allowed).to(torch.int8), dim=1, stable=True)  # allowed first, in order
    return order[:, : int(allowed.sum(1).max())] if L else order


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
    Y, X = tiling.shape
    if graph.num_src != Y * X or graph.num_dst != Y * X or graph.num_edges != tiling.num_edges:
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


def _edges_to_dense(vals: Tensor, tiling: Tiling, fill: float) -> Tensor:
    """(E, C) or (E,) per-edge values -> (C, T*Qt*Kt) in the dense score layout."""
    vals = vals.reshape(vals.shape[0], -1).t().contiguous()  # (C, E)
    return _EdgesToDense.apply(vals, tiling.pos_edge, tiling.edge_pos, fill, tiling.full)


def sparse_attention(
    graph: Graph, q: Tensor, k: Tensor, v: Tensor, *, score: str, scale: float, bias: Tensor | None,
    negative_slope: float, edge_weight: Tensor | None, dropout_p: float, return_attention: bool,
    logits: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``gatx.ops.sparse_attention`` (score="dot") as batched dense attention over the graph's tiles.

    Works head-major: (N, H, D) inputs whose memory is (H, N, D) (``t.transpose(0, 1)`` of a
    contiguous tensor, as the vision modules pass them) are used without a copy, others are copied
    once. The output (N, H, Dv) is such a transposed view of an (H, N, Dv) tensor.
    """
    tl = tiling_of(graph)
    H, D, Dv = q.shape[1], q.shape[2], v.shape[2]
    T, Qt, Kt = tl.mask.shape
    nty, Ty = tl.y.queries.shape
    ntx, Tx = tl.x.queries.shape
    q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))  # (H, N, D): no copy when head-major
    if tl.identity:  # tiles are blocks of the grid: one permuting copy
        def blocks(t: Tensor) -> Tensor:
            return t.view(H, nty, Ty, ntx, Tx, -1).permute(0, 1, 3, 2, 4, 5).reshape(H * T, Qt, t.shape[-1])

        Q = blocks(q)
    else:
        Q = tl.query_nodes(q).view(H * T, Qt, D)
    if tl.keys_are_queries:
        K, V = blocks(k), blocks(v)
    else:
        K = tl.key_nodes(k).view(H * T, Kt, D)
        V = tl.key_nodes(v).view(H * T, Kt, Dv)
    dense_bias = None
    if bias is not None:
        dense_bias = _edges_to_dense(bias.to(Q.dtype), tl, float("-inf")).view(-1, T, Qt, Kt)  # (1 or H, T, Qt, Kt)
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
        else:  # accumulate the scores into the fresh dense bias, in place (its backward needs no values)
            s = dense_bias.expand(H, -1, -1, -1).reshape(H * T, Qt, Kt)
            if dense_bias.shape[0] != H:
                s = s.contiguous()
            s = s.baddbmm_(Q, K.transpose(1, 2))  # (H*T, Qt, Kt)
        a = torch.softmax(s, dim=-1)  # (H*T, Qt, Kt)
        if dropout_p > 0.0:
            a = F.dropout(a, dropout_p, training=True)
        if edge_weight is not None:
            w = _edges_to_dense(edge_weight.to(a.dtype), tl, 0.0).view(-1, T, Qt, Kt)
            a = a * w.expand(H, -1, -1, -1).reshape(H * T, Qt, Kt)
        o = torch.bmm(a, V)  # (H*T, Qt, Dv)
    if tl.identity:
        o = o.view(H, nty, ntx, Ty, Tx, Dv).permute(0, 1, 3, 2, 4, 5).reshape(H, -1, Dv)  # (H, N, Dv)
    else:
        o = tl.owner(o.view(H, T * Qt, Dv))  # (H, N, Dv)
    out = o.transpose(0, 1)  # (N, H, Dv)
    if return_attention:
        attn = a.reshape(H, -1).index_select(1, tl.edge_pos).t()  # (E, H)
        return out, attn
    return out
