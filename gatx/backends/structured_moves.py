"""Strided moves of the structured backend: grid rows to tiles without index gathers.

:class:`BlockPlan`: tiles that are blocks of the grid rolled per axis (windows, Swin's shifted
windows) are filled by a few strided copies, and emptied back by the inverse copies.
:class:`HaloPlan`: key halos that are ranges per axis (neighborhoods) are strided windows of the
grid; the adjoint adds them back. Each move is a pair of autograd Functions that are each other's
backward, so gradients of any order are exact. Plans are built once per graph (see
:func:`gatx.backends.structured_tiling.grid_tiling`) and hold only Python ints.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .structured_tiling import AxisTiling

__all__ = ["BlockPlan", "HaloPlan"]


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Grid rows <-> tiles that are blocks of the grid rolled by ``-rotation`` per axis, by strided copies.

    For an (H, N, C) tensor with rows the grid nodes (row-major over ``shape``), :meth:`to_blocks`
    gives (H, *nts, *Ts, C), flattened to (H, T * Qt, C): tile (t_0, ..) slot (j_0, ..) holds the
    node at ``(t_a * T_a + j_a + r_a) % L_a`` per axis, i.e. Swin's roll and window partition in one
    copy (no index tensor, no roll);
    :meth:`from_blocks` is the inverse. ``boxes`` per axis: (t0, t1, j0, j1, p0), tiles [t0, t1) x
    slots [j0, j1) that read positions p0, p0 + 1, ... (row-major); at most 3 per axis.
    ``identity``: the tile order is the grid's row order (no roll, and no axis before the last one with
    several tiles has a tile longer than 1: one window over the whole grid, any 1-D tiling, Swin's
    last stage), so both moves return x itself and nothing is copied.
    ``copies``: one strided copy per combination of boxes, (sizes (*ms, *ws), grid row-stride multipliers,
    grid row offset, tile row-stride multipliers, tile row offset), precomputed so that a move costs one
    ``as_strided`` pair and one ``copy_`` per piece (9 pieces for a 2-D shifted grid).
    """

    shape: tuple[int, ...]
    nts: tuple[int, ...]
    Ts: tuple[int, ...]
    boxes: tuple[tuple[tuple[int, int, int, int, int], ...], ...]
    identity: bool = False
    copies: tuple[tuple[tuple[int, ...], tuple[int, ...], int, tuple[int, ...], int], ...] = ()

    @classmethod
    def build(cls, axes: tuple[AxisTiling, ...]) -> "BlockPlan":
        boxes = []
        for a in axes:
            L, T, r = a.length, a.queries.shape[1], a.rotation
            out, pieces = [], [(0, L - r, r)] + ([(L - r, L, 0)] if r else [])  # slot range, first position
            for lo, hi, p0 in pieces:
                p = lo
                while p < hi:
                    t, j = divmod(p, T)
                    n = (hi - p) // T if j == 0 else 0
                    end = p + n * T if n else min(hi, (t + 1) * T)
                    out.append((t, t + max(n, 1), j, j + (end - p if not n else T), p0 + p - lo))
                    p = end
            boxes.append(tuple(out))
        nts, Ts = tuple(a.queries.shape[0] for a in axes), tuple(a.queries.shape[1] for a in axes)
        # (*nts, *Ts) is the grid's (nt_0, T_0, nt_1, T_1, ..) order iff no T_a > 1 precedes an nt_b > 1 (a < b)
        last_split = max([b for b, nt in enumerate(nts) if nt > 1], default=0)
        identity = all(a.rotation == 0 for a in axes) and all(T == 1 for T in Ts[:last_split])
        shape = tuple(a.length for a in axes)
        return cls(shape, nts, Ts, tuple(boxes), identity, _copies(shape, nts, Ts, tuple(boxes)))

    def _pairs(self, grid: Tensor, tiles: Tensor):
        """(grid piece, tile piece) strided views of every box combination, both in tile layout (H, *ms, *ws, C).

        ``grid`` (H, N, C) and ``tiles`` (H, T * Qt, C) may have any strides: splitting the row axis is a view
        of any tensor, so each piece is one ``as_strided`` of the row stride times the precomputed multipliers."""
        (gH, gN, gC), (tH, tN, tC) = grid.stride(), tiles.stride()
        g0, t0 = grid.storage_offset(), tiles.storage_offset()
        H, C = grid.shape[0], grid.shape[-1]
        for size, g_rows, g_off, t_rows, t_off in self.copies:
            yield (grid.as_strided((H, *size, C), (gH, *[m * gN for m in g_rows], gC), g0 + g_off * gN),
                   tiles.as_strided((H, *size, C), (tH, *[m * tN for m in t_rows], tC), t0 + t_off * tN))

    def to_blocks(self, x: Tensor) -> Tensor:
        """(H, N, C) grid rows -> (H, T * Qt, C) tile slots, row-major over (*nts, *Ts); differentiable (any order).

        A new tensor, except for an ``identity`` plan: then ``x`` itself (never write into the result)."""
        return x if self.identity else _ToBlocks.apply(x, self)

    def from_blocks(self, x: Tensor) -> Tensor:
        """(H, T * Qt, C) tile slots -> (H, N, C) grid rows; the inverse of :meth:`to_blocks` (``x`` itself
        for an ``identity`` plan)."""
        return x if self.identity else _FromBlocks.apply(x, self)


def _copies(shape: tuple[int, ...], nts: tuple[int, ...], Ts: tuple[int, ...],
            boxes: tuple[tuple[tuple[int, int, int, int, int], ...], ...]):
    """:attr:`BlockPlan.copies` from the boxes: box (t0, t1, j0, j1, p0) on axis a covers tiles [t0, t1) x slots
    [j0, j1), slot (t, j) reading grid position p0 + (t - t0) * (j1 - j0) + (j - j0) (row-major runs)."""
    n = len(shape)
    grid_step = [math.prod(shape[a + 1:]) for a in range(n)]  # rows per step along axis a of the grid
    tile_step = [math.prod(nts[a + 1:]) * math.prod(Ts) for a in range(n)] + [math.prod(Ts[a + 1:]) for a in range(n)]
    out = []
    for combo in itertools.product(*boxes):
        ms, ws = [b[1] - b[0] for b in combo], [b[3] - b[2] for b in combo]
        g_rows = [w * g for w, g in zip(ws, grid_step)] + grid_step
        g_off = sum(b[4] * g for b, g in zip(combo, grid_step))
        t_off = sum(b[0] * tile_step[a] + b[2] * tile_step[n + a] for a, b in enumerate(combo))
        out.append((tuple(ms + ws), tuple(g_rows), g_off, tuple(tile_step), t_off))
    return tuple(out)


def _to_blocks(plan: BlockPlan, x: Tensor) -> Tensor:
    out = x.new_empty(x.shape[0], math.prod(plan.nts) * math.prod(plan.Ts), x.shape[-1])  # returned as is: not a view
    for src, dst in plan._pairs(x, out):
        dst.copy_(src)
    return out


def _from_blocks(plan: BlockPlan, x: Tensor) -> Tensor:
    out = x.new_empty(x.shape[0], math.prod(plan.shape), x.shape[-1])
    for src, dst in plan._pairs(out, x):
        src.copy_(dst)
    return out


def _adjoint_pair(name: str, move: Callable[[Any, Tensor], Tensor], adjoint_name: str,
                  adjoint: Callable[[Any, Tensor], Tensor]) -> tuple[type, type]:
    """Two autograd Functions ``f(x, plan) = move(plan, x)`` and ``g(y, plan) = adjoint(plan, y)`` for a
    linear move and its adjoint: each one's backward is the other, so gradients are exact at any order."""

    def function(fn_name: str, fn: Callable[[Any, Tensor], Tensor], other: list[type]) -> type:
        def forward(ctx, x: Tensor, plan: Any) -> Tensor:
            ctx.plan = plan
            return fn(plan, x)

        def backward(ctx, grad: Tensor):
            return other[0].apply(grad, ctx.plan), None

        return type(fn_name, (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward),
            "__doc__": f"``{fn.__name__}`` as an autograd Function; its backward is its adjoint."})

    second: list[type] = []
    first = function(name, move, second)
    second.append(function(adjoint_name, adjoint, [first]))
    return first, second[0]


# a permutation of rows and its inverse (its adjoint)
_ToBlocks, _FromBlocks = _adjoint_pair("_ToBlocks", _to_blocks, "_FromBlocks", _from_blocks)


@dataclass(frozen=True, eq=False)
class HaloPlan:
    """Key halos that are contiguous ranges per axis, read as strided windows of the grid (no index gather).

    When every tile's halo on an axis is ``lo_t + arange(K)`` (neighborhoods without dilation), the
    keys of all tiles are (H, *nts, *Ks, C) windows of the (H, *shape, C) grid. ``runs`` per axis:
    (t0, t1, lo, stride), tiles [t0, t1) whose halos start at ``lo + (t - t0) * stride`` (the interior
    tiles form one run, the clamped border tiles their own). :meth:`gather` copies the windows, run by
    run; its adjoint adds them back (chunks of at most ``stride`` slots, so one add never overlaps).
    """

    shape: tuple[int, ...]
    nts: tuple[int, ...]
    Ks: tuple[int, ...]
    runs: tuple[tuple[tuple[int, int, int, int], ...], ...]

    @classmethod
    def build(cls, axes: tuple[AxisTiling, ...]) -> "HaloPlan | None":
        runs = []
        for a in axes:
            halo = a.halo
            nt, K = halo.shape
            if not torch.equal(halo, halo[:, :1] + torch.arange(K)):
                return None
            lo, out, t0 = halo[:, 0].tolist(), [], 0
            while t0 < nt:
                t1, step = t0 + 1, (lo[t0 + 1] - lo[t0] if t0 + 1 < nt else 0)
                if t0 + 2 < nt and lo[t0 + 2] - lo[t0 + 1] != step:
                    step = 0  # a border tile: alone, so that the interior tiles form one run
                while t1 < nt and lo[t1] - lo[t1 - 1] == step and step > 0:
                    t1 += 1
                out.append((t0, t1, lo[t0], step if t1 - t0 > 1 else K))
                t0 = t1
            runs.append(tuple(out))
        return cls(tuple(a.length for a in axes), tuple(a.halo.shape[0] for a in axes),
                   tuple(a.halo.shape[1] for a in axes), tuple(runs))

    def _windows(self, grid: Tensor, chunked: bool):
        """(run box of the (H, *nts, *Ks, C) halo tensor, strided window view of ``grid``) pairs."""
        n, st = len(self.shape), grid.stride()
        for combo in itertools.product(*self.runs):
            chunks = [[(c, min(c + r[3], K)) for c in range(0, K, r[3])] if chunked else [(0, K)]
                      for r, K in zip(combo, self.Ks)]
            for cs in itertools.product(*chunks):
                size = [grid.shape[0]] + [r[1] - r[0] for r in combo] + [c1 - c0 for c0, c1 in cs] + [grid.shape[-1]]
                stride = [st[0]] + [r[3] * st[1 + i] for i, r in enumerate(combo)] + [st[1 + i] for i in range(n)] + [st[-1]]
                offset = grid.storage_offset() + sum((r[2] + c0) * st[1 + i] for i, (r, (c0, _)) in enumerate(zip(combo, cs)))
                box = (slice(None),) + tuple(slice(r[0], r[1]) for r in combo) + tuple(slice(c0, c1) for c0, c1 in cs)
                yield box, grid.as_strided(size, stride, offset)

    def gather(self, x: Tensor) -> Tensor:
        """(H, N, C) grid rows -> (H, T * Kt, C) halo slots; differentiable (any order)."""
        return _HaloGather.apply(x, self)


def _halo_gather(plan: HaloPlan, x: Tensor) -> Tensor:
    H, C = x.shape[0], x.shape[-1]
    out = x.new_empty(H, math.prod(plan.nts) * math.prod(plan.Ks), C)
    tiles = out.view(H, *plan.nts, *plan.Ks, C)
    for box, window in plan._windows(x.contiguous().view(H, *plan.shape, C), chunked=False):
        tiles[box].copy_(window)
    return out


def _halo_scatter(plan: HaloPlan, y: Tensor) -> Tensor:
    H, C = y.shape[0], y.shape[-1]
    out = y.new_zeros(H, math.prod(plan.shape), C)
    tiles = y.reshape(H, *plan.nts, *plan.Ks, C)
    for box, window in plan._windows(out.view(H, *plan.shape, C), chunked=True):
        window.add_(tiles[box])
    return out


# the halo windows' gather and its adjoint (windows added back)
_HaloGather, _HaloScatter = _adjoint_pair("_HaloGather", _halo_gather, "_HaloScatter", _halo_scatter)
