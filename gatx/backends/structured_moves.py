"""Moves of the structured backend between grid rows and tiles.

:class:`BlockPlan`: tiles that are blocks of the grid rolled per axis (windows, Swin's shifted
windows) are a permutation of the grid's rows: one ``index_select`` fills them and one with the inverse
permutation empties them back, or, for large moves on several threads, a few strided copies (the
permutation itself is built once from the same copies).
:class:`HaloPlan`: key halos that are ranges per axis (neighborhoods) are strided windows of the
grid; the adjoint adds them back. Each move is a pair of autograd Functions that are each other's
backward, so gradients of any order are exact. Plans are built once per graph (see
:func:`gatx.backends.structured_tiling.grid_tiling`) and hold Python ints; a block plan also keeps its
permutation and the inverse once used, per device (two int64 tensors of the grid's size).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .structured_tiling import AxisTiling

__all__ = ["BlockPlan", "HaloPlan"]


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """Grid rows <-> tiles that are blocks of the grid rolled by ``-rotation`` per axis: a row permutation.

    For an (H, N, C) tensor with rows the grid nodes (row-major over ``shape``), :meth:`to_blocks`
    gives (H, *nts, *Ts, C), flattened to (H, T * Qt, C): tile (t_0, ..) slot (j_0, ..) holds the
    node at ``(t_a * T_a + j_a + r_a) % L_a`` per axis, i.e. Swin's roll and window partition in one
    ``index_select`` of rows (no roll), or, for large moves on several threads, the strided copies of
    the pieces below (one ``as_strided`` pair and ``copy_`` each; see :func:`_by_copies`);
    :meth:`from_blocks` is the inverse. The gather's cost is per row, the copies' mostly per piece: at
    14x14, C=96, shift 3 (9 pieces) a move took 4.4 us gathered against 91 us copied.
    ``boxes`` per axis: (t0, t1, j0, j1, p0), tiles [t0, t1) x slots [j0, j1) that read positions p0,
    p0 + 1, ... (row-major); at most 3 per axis.
    ``identity``: the tile order is the grid's row order (no roll, and no axis before the last one with
    several tiles has a tile longer than 1: one window over the whole grid, any 1-D tiling, Swin's
    last stage), so both moves return x itself and nothing is copied.
    ``copies``: one strided copy per combination of boxes, (sizes (*ms, *ws), grid row-stride multipliers,
    grid row offset, tile row-stride multipliers, tile row offset) (9 pieces for a 2-D shifted grid),
    which build the permutation: :meth:`rows` copies the grid's row numbers through them, once per
    device.
    """

    shape: tuple[int, ...]
    nts: tuple[int, ...]
    Ts: tuple[int, ...]
    boxes: tuple[tuple[tuple[int, int, int, int, int], ...], ...]
    identity: bool = False
    copies: tuple[Piece, ...] = ()
    _rows: dict = field(default_factory=dict, compare=False, repr=False)  # device -> (perm, inverse)

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
        pieces = _piece_plan(shape, nts, Ts, [[b + (b[3] - b[2],) for b in axis] for axis in boxes])
        return cls(shape, nts, Ts, tuple(boxes), identity, pieces)

    def rows(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(perm, inverse), int64 (N,) on ``device``: tile slot s holds grid row ``perm[s]``, grid row r
        sits in slot ``inverse[r]``. Built on first use per device and kept."""
        got = self._rows.get(device)
        if got is None:
            N = math.prod(self.shape)
            perm = torch.arange(N)
            if not self.identity:
                perm = _copied_to_blocks(self, perm.view(1, N, 1)).view(N)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(N)
            got = self._rows[device] = (perm.to(device), inv.to(device))
        return got

    def to_blocks(self, x: Tensor) -> Tensor:
        """(H, N, C) grid rows -> (H, T * Qt, C) tile slots, row-major over (*nts, *Ts); differentiable (any order).

        A new tensor, except for an ``identity`` plan: then ``x`` itself (never write into the result)."""
        return x if self.identity else _ToBlocks.apply(x, self)

    def from_blocks(self, x: Tensor) -> Tensor:
        """(H, T * Qt, C) tile slots -> (H, N, C) grid rows; the inverse of :meth:`to_blocks` (``x`` itself
        for an ``identity`` plan)."""
        return x if self.identity else _FromBlocks.apply(x, self)


# A strided piece: (sizes (*ms, *ws) of a box of tiles x slots, grid row-stride multipliers, grid row offset,
# tile row-stride multipliers, tile row offset); in rows, so that it applies to any (H, rows, C) strides.
Piece = tuple[tuple[int, ...], tuple[int, ...], int, tuple[int, ...], int]


def _piece_plan(shape: tuple[int, ...], nts: tuple[int, ...], Ts: tuple[int, ...],
                boxes: list[list[tuple[int, int, int, int, int, int]]]) -> tuple[Piece, ...]:
    """One :data:`Piece` per combination of per-axis boxes (t0, t1, j0, j1, p0, step): tiles [t0, t1) x slots
    [j0, j1) of axis a, slot (t, j) at grid position ``p0 + (t - t0) * step + (j - j0)``; the tiles are
    (*nts, *Ts) row-major."""
    n = len(shape)
    grid_step = [math.prod(shape[a + 1:]) for a in range(n)]  # rows per step along axis a of the grid
    tile_step = tuple([math.prod(nts[a + 1:]) * math.prod(Ts) for a in range(n)] + [math.prod(Ts[a + 1:]) for a in range(n)])
    out = []
    for combo in itertools.product(*boxes):
        size = tuple([b[1] - b[0] for b in combo] + [b[3] - b[2] for b in combo])
        g_rows = tuple([b[5] * g for b, g in zip(combo, grid_step)] + grid_step)
        g_off = sum(b[4] * g for b, g in zip(combo, grid_step))
        t_off = sum(b[0] * tile_step[a] + b[2] * tile_step[n + a] for a, b in enumerate(combo))
        out.append((size, g_rows, g_off, tile_step, t_off))
    return tuple(out)


def _pieces(grid: Tensor, tiles: Tensor, pieces: tuple[Piece, ...]):
    """(grid piece, tile piece) strided views, both (H, *ms, *ws, C), of ``grid`` (H, N, C) and ``tiles``
    (H, T * S, C) of any strides: splitting the row axis is a view of any tensor, so each piece is one
    ``as_strided`` (the precomputed multipliers times the row stride; no slicing per call)."""
    (gH, gN, gC), (tH, tN, tC) = grid.stride(), tiles.stride()
    g0, t0 = grid.storage_offset(), tiles.storage_offset()
    H, C = grid.shape[0], grid.shape[-1]
    for size, g_rows, g_off, t_rows, t_off in pieces:
        yield (grid.as_strided((H, *size, C), (gH, *[m * gN for m in g_rows], gC), g0 + g_off * gN),
               tiles.as_strided((H, *size, C), (tH, *[m * tN for m in t_rows], tC), t0 + t_off * tN))


def _by_copies(plan: BlockPlan, x: Tensor) -> bool:
    """Whether to move ``x`` by the strided copies rather than one row gather. ``index_select`` along
    dim 1 runs on one thread on the CPU, a strided ``copy_`` on all of them, at a fixed cost per piece
    (2 threads: a 1-piece move of 150k / 300k / 1.8M floats took 16 / 32 / 256 us gathered against 17 /
    29 / 121 us copied; 9 pieces, 600k / 1.8M floats: 60 / 224 against 92 / 158 us; on 1 thread the gather
    won at every size measured)."""
    return (x.device.type == "cpu" and torch.get_num_threads() > 1
            and x.numel() >= (1 << 17 if len(plan.copies) == 1 else 1 << 20))


def _copied_to_blocks(plan: BlockPlan, x: Tensor) -> Tensor:
    out = x.new_empty(x.shape[0], math.prod(plan.nts) * math.prod(plan.Ts), x.shape[-1])
    for src, dst in _pieces(x, out, plan.copies):
        dst.copy_(src)
    return out


def _to_blocks(plan: BlockPlan, x: Tensor) -> Tensor:
    if _by_copies(plan, x):
        return _copied_to_blocks(plan, x)
    return x.index_select(1, plan.rows(x.device)[0])  # a new tensor, never a view


def _from_blocks(plan: BlockPlan, x: Tensor) -> Tensor:
    if not _by_copies(plan, x):
        return x.index_select(1, plan.rows(x.device)[1])
    out = x.new_empty(x.shape[0], math.prod(plan.shape), x.shape[-1])
    for src, dst in _pieces(out, x, plan.copies):
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
    ``windows`` and ``chunks``: those copies and adds as precomputed strided pieces (see :class:`BlockPlan`).
    """

    shape: tuple[int, ...]
    nts: tuple[int, ...]
    Ks: tuple[int, ...]
    runs: tuple[tuple[tuple[int, int, int, int], ...], ...]
    windows: tuple[Piece, ...] = ()
    chunks: tuple[Piece, ...] = ()

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
        shape, nts, Ks = tuple(a.length for a in axes), tuple(a.halo.shape[0] for a in axes), tuple(a.halo.shape[1] for a in axes)
        whole = [[(t0, t1, 0, K, lo, step) for t0, t1, lo, step in axis] for axis, K in zip(runs, Ks)]
        chunks = [[(t0, t1, c, min(c + step, K), lo + c, step) for t0, t1, lo, step in axis for c in range(0, K, step)]
                  for axis, K in zip(runs, Ks)]  # at most `step` slots: the windows of one add never overlap
        return cls(shape, nts, Ks, tuple(runs), _piece_plan(shape, nts, Ks, whole), _piece_plan(shape, nts, Ks, chunks))

    def gather(self, x: Tensor) -> Tensor:
        """(H, N, C) grid rows -> (H, T * Kt, C) halo slots; differentiable (any order)."""
        return _HaloGather.apply(x, self)


def _halo_gather(plan: HaloPlan, x: Tensor) -> Tensor:
    out = x.new_empty(x.shape[0], math.prod(plan.nts) * math.prod(plan.Ks), x.shape[-1])
    for window, tile in _pieces(x, out, plan.windows):
        tile.copy_(window)
    return out


def _halo_scatter(plan: HaloPlan, y: Tensor) -> Tensor:
    out = y.new_zeros(y.shape[0], math.prod(plan.shape), y.shape[-1])
    for window, tile in _pieces(out, y, plan.chunks):
        window.add_(tile)
    return out


# the halo windows' gather and its adjoint (windows added back)
_HaloGather, _HaloScatter = _adjoint_pair("_HaloGather", _halo_gather, "_HaloScatter", _halo_scatter)
