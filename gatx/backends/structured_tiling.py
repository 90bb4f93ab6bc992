"""The grid tilings of the structured backend: which queries share a tile, which keys its halo holds.

A :class:`Tiling` is the structured backend's contract (see :mod:`gatx.backends.structured` for the
dense layout it describes): per grid axis an :class:`AxisTiling` (1-D tiles of query positions and
their key halos), combined by :func:`grid_tiling` into the n-d tiling and the graph's edges.
:class:`RowGather` is a row gather whose backward is a gather plus a segment sum; :class:`BlockPlan`
moves rows between the grid and tiles that are blocks of the (rolled) grid (a row permutation). The
:mod:`gatx.vision` builders make these once per graph (cached); memory is O(L) per axis.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .structured_moves import BlockPlan, HaloPlan

__all__ = ["AxisTiling", "BlockPlan", "HaloPlan", "RowGather", "Tiling", "axis_tiling", "grid_tiling"]


@dataclass(frozen=True, eq=False)
class AxisTiling:
    """One axis of a separable tiling: ``L`` positions in ``nt`` tiles of ``T`` query slots and ``K`` halo slots.

    ``neighbors`` (L, C): the allowed key positions of each query position in increasing order, the
    first ``count`` (L,) valid (padding repeats the last). ``queries`` (nt, T) and ``halo`` (nt, K)
    positions (padding slots repeat a position, or, when every halo is a range, widen it to K
    positions; padded halo slots are never allowed); halos are
    sorted, except that when every tile's halo is exactly its query set (windows), each halo lists
    its tile's queries in query order, so keys are laid out like queries.
    ``tile_rank`` (nt, T, K): rank of each halo key among the query slot's allowed keys, -1 where not
    allowed. ``owner`` (L,): the flat slot in ``nt * T`` whose output is kept. ``slot`` (L, C): the
    halo slot, in the owner's tile, of each of a query's keys. ``rotation``: r when the query slots,
    flattened, are the positions ``(arange(L) + r) % L`` (each position in one slot, tiles are blocks
    of the axis rolled by -r, as Swin's shifted windows), else None. Memory is O(L), never (L, L).
    """

    neighbors: Tensor
    count: Tensor
    queries: Tensor
    halo: Tensor
    tile_rank: Tensor
    owner: Tensor
    slot: Tensor
    rotation: int | None

    @property
    def length(self) -> int:
        return self.neighbors.shape[0]

    def to(self, device: torch.device) -> "AxisTiling":
        moved = [getattr(self, f).to(device) for f in self.__dataclass_fields__ if f != "rotation"]
        return AxisTiling(*moved, rotation=self.rotation)


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
    if K <= L and all(torch.equal(h, h[0] + torch.arange(h.numel())) for h in halos):
        # every halo is a range: widen the short ones (border tiles) to K positions, so all halos are
        # ranges of one length (strided windows, see HaloPlan); the added positions are never allowed
        halo = torch.stack([torch.arange(K) + min(int(h[0]), L - K) for h in halos])  # (nt, K)
        halo_valid = torch.ones(halo.shape, dtype=torch.bool)
    else:
        halo = torch.stack([torch.cat([h, h[-1:].expand(K - h.numel())]) for h in halos])  # (nt, K), still sorted
        halo_valid = torch.arange(K)[None, :] < torch.tensor([h.numel() for h in halos])[:, None]  # (nt, K)
    flat = queries.reshape(-1)
    r = int(flat[0]) if flat.numel() == L else 0
    rotation = r if flat.numel() == L and torch.equal(flat, (torch.arange(L) + r) % L) else None
    if rotation is not None and K == T and torch.equal(halo, queries.sort(1).values):
        halo = queries.clone()  # each halo is its tile's query set: list it in query order (keys_are_queries)
    keys = neighbors[queries]  # (nt, T, C)
    probe = halo[:, None, :].expand(-1, T, -1).contiguous()  # (nt, T, K)
    pos = torch.searchsorted(keys, probe)  # first match: padding repeats come after the real entry
    hit = (keys.gather(2, pos.clamp(max=C - 1)) == probe) & (pos < count[queries][..., None]) & halo_valid[:, None, :]
    tile_rank = torch.where(hit, pos, -1)  # (nt, T, K)
    owner = torch.full((L,), flat.numel(), dtype=torch.int64).scatter_reduce_(0, flat, torch.arange(flat.numel()), "amin")
    if bool((owner == flat.numel()).any()):
        raise AssertionError("every position must sit in a tile")
    order = halo.argsort(dim=1, stable=True)[owner // T]  # (L, K): sorts the owner tile's halo
    own_halo = halo[owner // T].gather(1, order)  # (L, K) sorted
    slot = order.gather(1, torch.searchsorted(own_halo, neighbors).clamp(max=K - 1))  # (L, C)
    if not bool(((halo[owner // T].gather(1, slot) == neighbors) | ~valid).all()):
        raise AssertionError("an owner tile's halo must hold its query's keys")
    return AxisTiling(neighbors, count, queries, halo, tile_rank, owner, slot, rotation)


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
    """Rows of dim 1; its backward is :class:`_SumRows`, whose backward is this gather again, so
    gradients of any order are exact (both maps are linear and each other's adjoint)."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: RowGather) -> Tensor:
        ctx.rows = rows
        return x.index_select(1, rows.index)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _SumRows.apply(grad, ctx.rows), None


class _SumRows(torch.autograd.Function):
    """The adjoint of :class:`_GatherRows`: rows summed into their source rows (gather + segment sum)."""

    @staticmethod
    def forward(ctx, grad: Tensor, rows: RowGather) -> Tensor:
        ctx.rows = rows
        H, R = grad.shape[:2]
        g = grad.index_select(1, rows.perm).reshape(H, R, -1)  # (H, R, *) sorted by source row
        lengths = rows.lengths.expand(H, -1).contiguous()  # (H, n)
        out = torch.segment_reduce(g, "sum", lengths=lengths, axis=1, unsafe=True)  # (H, n, *)
        return out.view(H, -1, *grad.shape[2:])

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _GatherRows.apply(grad, ctx.rows), None


@dataclass(frozen=True, eq=False)
class Tiling:
    """A separable tiling of an n-d grid (see the module docstring); the kernel's contract.

    ``axes`` holds one :class:`AxisTiling` per grid axis. ``edge_pos`` (E,) and ``pos_edge`` (P,) map
    edges to dense score positions and back. ``mask`` (T, Qt, Kt) float32 is 0 at the allowed
    (query slot, halo slot) pairs and -inf elsewhere. ``query_nodes`` (T*Qt rows) and ``key_nodes``
    (T*Kt rows) gather the node of each query / halo slot; ``owner`` (N rows) gathers, for each node,
    the query slot whose output it keeps. ``blocks``: a :class:`BlockPlan` when every axis is a
    rotation (tiles are blocks of the rolled grid: windows, or neighborhoods whose tiles divide the
    sides), so queries need no gather; else None. ``keys_are_queries``: with ``blocks``, each tile's
    halo is its query block in the same order ((shifted) windows), so keys are laid out like
    queries. ``halo``: a :class:`HaloPlan` when each halo is a range per axis (keys read as strided
    windows instead of gathered rows), else None. ``full``: no dense position is masked (``pos_edge < E``). ``edge_order``: the dense
    layout is the edge order (``pos_edge`` is ``arange(E)``, e.g. one tile holding every query), so
    per-edge values need no gather. ``edge_rows``: full, and each dense row (query slot) holds its
    query's edges in edge order, so per-edge values, as (N, Kt) rows, move like queries.
    """

    axes: tuple[AxisTiling, ...]
    edge_pos: Tensor
    pos_edge: Tensor
    mask: Tensor
    query_nodes: RowGather
    key_nodes: RowGather
    owner: RowGather
    blocks: BlockPlan | None
    halo: HaloPlan | None
    keys_are_queries: bool
    full: bool
    edge_order: bool
    edge_rows: bool

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

    def to(self, device: torch.device | str) -> "Tiling":
        device = torch.device(device)
        if device == self.device:
            return self
        moved = [getattr(self, f) for f in self.__dataclass_fields__]
        moved = [tuple(a.to(device) for a in m) if isinstance(m, tuple) else m if isinstance(m, (bool, BlockPlan, HaloPlan)) or m is None
                 else m.to(device) for m in moved]
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
    blocks = BlockPlan.build(tuple(axes)) if all(a.rotation is not None for a in axes) else None
    keys_are_queries = blocks is not None and torch.equal(key_nodes, query_nodes)
    full = bool((pos_edge < E).all())
    edge_order = full and torch.equal(pos_edge, torch.arange(E))
    rows = indptr[query_nodes][:, None] + torch.arange(Kt)  # (T*Qt, Kt): each slot's query's edges in order
    edge_rows = full and bool((counts == Kt).all()) and torch.equal(pos_edge.view(-1, Kt), rows)
    halo = None if keys_are_queries else HaloPlan.build(tuple(axes))
    tiling = Tiling(tuple(axes), edge_pos, pos_edge, mask, *gathers, blocks, halo, keys_are_queries, full, edge_order, edge_rows)
    return tiling, src, dst
