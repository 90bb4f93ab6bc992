"""Grid graphs for vision attention: neighborhood attention (NATTEN) and (shifted) windows (Swin).

A grid of 1, 2 or 3 axes, e.g. a sequence (L,), an image (Y, X) or a video (T, Y, X), is a graph of
``N = prod(shape)`` nodes numbered row-major (node ``y * X + x`` on an image); an edge
``key -> query`` is one allowed attention pair. Both kinds are *separable*: a query sees a key iff,
on every axis, the key's coordinate is allowed for the query's. Edges are sorted by query, then by
key in row-major order. Each graph carries a :class:`GridStructure` with the per-edge relative
offsets (E, ndim), the row of the relative position bias table each edge reads, and the
:class:`~gatx.backends.structured.Tiling` that the structured backend uses for its dense fast path.

Per-axis arguments (kernel / window size, dilation, shift, causality) take an int (or bool) for
every axis or a tuple with one value per axis. Builders are cached per (shape, arguments, device),
32 graphs per kind (about 16 MB for a 56 x 56 map with k = 7): calling one in every forward pass is
a lookup.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..backends.structured import RowGather, Tiling, axis_tiling, grid_tiling
from ..backends.structured_moves import BlockPlan
from .._modes import outside_inference
from ..graph import Graph
from ..ops import TableBias
from ..ops._bias import _check_repeat

__all__ = ["GridStructure", "neighborhood_graph", "window_graph"]

# Query tile length per axis for neighborhoods, by number of axes (CPU, fwd + bwd, C = 96, 3 heads):
# 2-D: 7 x 7 queries read a (6 + k) x (6 + k) halo; on 56 x 56, k = 7, 7 and 8 were fastest among 4..14.
# 1-D: L = 4096, k = 7: 16 beat 8, 32 and 64 by 15-30%. 3-D: 8 x 28 x 28, k = (3, 7, 7): 4 beat 2, 3, 5
# and 7; (1 or 2, 4, 4) came within the noise of a loaded machine, so one length per axis is kept.
TILE = {1: 16, 2: 7, 3: 4}
_SEQ = (tuple, list, torch.Size)


def _fmt(values: tuple) -> str:
    """One value when every axis has it, else the tuple."""
    return str(values[0]) if len(set(values)) == 1 else str(values)


@dataclasses.dataclass(frozen=True, eq=False)
class GridStructure:
    """What a grid graph is: its kind, per-axis parameters, per-edge offsets and its kernel tiling.

    ``kind`` is ``"neighborhood"`` (``size`` = kernel size) or ``"window"`` (``size`` = window size);
    ``shape``, ``size``, ``dilation``, ``shift`` and ``is_causal`` hold one entry per axis.
    ``offsets`` (E, ndim) int64 per-edge offsets in the convention of the reference implementation:
    NATTEN's ``(key - query) / dilation`` for neighborhoods, Swin's ``query - key`` for windows.
    ``rel_pos_index`` (E,) is the row of a ``(prod(2 * size - 1), H)`` bias table that each edge
    reads: the offsets shifted by ``size - 1`` and flattened row-major with radix ``2 * size - 1``
    (for 2-D: ``(dy + k - 1) * (2k - 1) + (dx + k - 1)``; Video Swin's 3-D index likewise).
    ``tile_rows`` (Qt * Kt,) is the table row of every dense slot of the tiling when all tiles read
    the same rows at their allowed slots (windows, shifted or not, that divide the sides), else None.
    ``dense_rows`` otherwise (neighborhoods): the tiles' distinct row patterns ``(C, Qt * Kt)``, the table
    row of every slot, ``table_size`` (one row past the table: a -inf row) where the slot is masked,
    and each tile's pattern (T,). Neighborhood tiles away from the borders read the same rows, so C is
    small (9 for 2-D k=7 on 56x56 against T=64): the structured backend gathers C tiles' bias from the
    table and copies it to the T tiles, and sums the gradient back the same two ways.
    """

    kind: str
    shape: tuple[int, ...]
    size: tuple[int, ...]
    dilation: tuple[int, ...]
    shift: tuple[int, ...]
    is_causal: tuple[bool, ...]
    offsets: Tensor
    rel_pos_index: Tensor
    tiling: Tiling
    rel_pos_gather: RowGather
    tile_rows: Tensor | None
    dense_rows: tuple[Tensor, Tensor] | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def table_size(self) -> int:
        """Rows of the relative position bias table: ``prod(2 * size - 1)``."""
        return math.prod([2 * s - 1 for s in self.size])  # a list: Dynamo traces no generator here

    def table_bias(self, table: Tensor, batch: int = 1) -> TableBias:
        """The relative position bias of a ``(table_size, H)`` table as a :class:`~gatx.ops.TableBias`
        for ``sparse_attention`` on this graph, repeated over a batch folded into the heads (head
        ``b * H + h``). Its per-edge form equals ``table[rel_pos_index].repeat(1, batch)``, gathered
        once on (H, E) with a segment-sum backward; on the structured backend, when all tiles read the
        same rows, it stays one tile's bias (see ``tile_rows``)."""
        if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[0] != self.table_size:
            got = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
            raise ValueError(
                f"the relative position bias table must have shape ({self.table_size}, H) for size {_fmt(self.size)}, got {got}"
            )
        return _GridBias(table, self, batch)

    def relative_position_bias(self, table: Tensor, batch: int = 1) -> Tensor:
        """Per-edge bias (E, batch * H) from a ``(table_size, H)`` table, repeated over a batch:
        :meth:`table_bias`'s per-edge form, a transposed view of a head-major (batch * H, E) tensor."""
        return self.table_bias(table, batch).per_edge()

    def __repr__(self) -> str:
        if self.kind == "neighborhood":
            extra = f"kernel_size={_fmt(self.size)}, dilation={_fmt(self.dilation)}"
            extra += f", is_causal={_fmt(self.is_causal)}" if any(self.is_causal) else ""
        else:
            extra = f"window_size={_fmt(self.size)}, shift={_fmt(self.shift)}"
        return f"GridStructure({self.kind}, {'x'.join(map(str, self.shape))}, {extra})"


class _GridBias(TableBias):
    """:meth:`GridStructure.table_bias`: the structure's row index (valid by construction, so not
    re-checked), gathered with its :class:`RowGather`, and its ``tile_rows`` for its own tiling."""

    def __init__(self, table: Tensor, structure: GridStructure, repeat: int) -> None:
        _check_repeat(repeat, "batch")
        self.table, self.index, self.repeat = table, structure.rel_pos_index, repeat
        self._structure = structure

    def with_table(self, table: Tensor) -> "_GridBias":
        return _GridBias(table, self._structure, self.repeat)

    def tile_rows(self, tiling: Any) -> Tensor | None:
        return self._structure.tile_rows if tiling is self._structure.tiling else None

    def dense_rows(self, tiling: Any) -> tuple[Tensor, Tensor] | None:
        return self._structure.dense_rows if tiling is self._structure.tiling else None

    def _rows(self, table_t: Tensor) -> Tensor:
        return self._structure.rel_pos_gather(table_t)  # (H, E)


def _tile_rows(rel: Tensor, tiling: Tiling) -> Tensor | None:
    """(Qt * Kt,) the table row of each dense slot when every tile reads the same rows wherever its slot
    is allowed, else None (slots masked in every tile read row 0: the mask makes them -inf anyway)."""
    T, Qt, Kt = tiling.mask.shape
    dense = torch.cat([rel, rel.new_full((1,), -1)])[tiling.pos_edge].view(T, Qt * Kt)  # -1: masked
    hi = dense.max(0).values
    lo = torch.where(dense < 0, hi, dense).min(0).values
    return hi.clamp(min=0) if bool((lo == hi).all()) else None


# ------------------------------------------------------------------------------- arguments


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _per_axis(value: Any, n: int, name: str, minimum: int) -> tuple[int, ...]:
    """An int for every axis, or a tuple with one int per axis."""
    if isinstance(value, _SEQ):
        if len(value) != n:
            raise ValueError(f"{name} needs one value per axis ({n} axes), got {tuple(value)!r}; or pass one int for all")
        return tuple(_check_int(v, name, minimum) for v in value)
    return (_check_int(value, name, minimum),) * n


def _per_axis_bool(value: Any, n: int, name: str) -> tuple[bool, ...]:
    values = tuple(value) if isinstance(value, _SEQ) else (value,) * n
    if len(values) != n or not all(isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a bool or a tuple of {n} bools (one per axis), got {value!r}")
    return values


def _bind(fn: str, shape: Any, args: tuple, named: dict[str, Any]) -> tuple[tuple[int, ...], dict[str, Any]]:
    """The grid shape and named arguments of either call form of a builder.

    ``fn(shape_tuple, size, third)`` or the 2-D form ``fn(height, width, size, third)``; any of them
    may be given by keyword (``named`` holds height, width, size, third; None = not given).
    """
    if isinstance(shape, _SEQ):
        if named["height"] is not None or named["width"] is not None:
            raise TypeError(f"{fn}() takes a shape tuple or height and width, not both")
        order, positional = list(named)[2:], list(args)
    else:
        order, positional = list(named), ([] if shape is None else [shape]) + list(args)
    if len(positional) > len(order):
        raise TypeError(f"{fn}() takes at most {len(order)} positional values ({', '.join(order)}), got {len(positional)}")
    for name, value in zip(order, positional):
        if named[name] is not None:
            raise TypeError(f"{fn}() got multiple values for {name!r}")
        named[name] = value
    if not isinstance(shape, _SEQ):
        if named["height"] is None or named["width"] is None:
            raise TypeError(f"{fn}() needs a shape tuple, e.g. {fn}((T, Y, X), ...), or height and width")
        shape = (named["height"], named["width"])
    shape = tuple(shape)
    if not 1 <= len(shape) <= 3:
        raise ValueError(f"{fn}() builds grids of 1, 2 or 3 axes, got shape {shape!r}")
    for i, L in enumerate(shape):
        _check_int(L, "height" if len(shape) == 2 and i == 0 else "width" if len(shape) == 2 else f"shape[{i}]", 1)
    return shape, named


def _device_key(device: torch.device | str | None) -> str:
    return str(torch.device(device)) if device is not None else "cpu"


class _Traced:
    """Objects built while torch.compile traces, one attribute each (see :func:`cached`).

    Attributes, not a dict: within one trace Dynamo snapshots a container the first time it reads it,
    so a dict filled later in the same trace would look stale; an attribute read goes to the object
    itself. ``names`` maps a build's key to its attribute; the oldest of more than 64 builds is dropped
    (a compiled call that used it fails its guard and re-traces).
    """

    def __init__(self) -> None:
        self.names: dict[tuple, str] = {}
        self.count = 0


_TRACED = _Traced()


def _build_while_tracing(module: str, name: str, args: tuple) -> str:
    """Run the builder ``module.name`` on ``args`` eagerly, keep the result on ``_TRACED``; return its attribute.

    Marked as a constant for Dynamo (the flag ``torch.compiler.assume_constant_result`` sets, without
    importing ``torch._dynamo``, 2 s, with gatx): Dynamo calls it with the real arguments while tracing
    instead of tracing it, and takes the name it returns as a constant.
    """
    key = (module, name, *args)
    if key not in _TRACED.names:
        if len(_TRACED.names) >= 64:
            delattr(_TRACED, _TRACED.names.pop(next(iter(_TRACED.names))))
        _TRACED.count += 1
        _TRACED.names[key] = f"built_{_TRACED.count}"
        built = getattr(sys.modules[module], name)(*args)
        if isinstance(built, Graph):  # made here, not in the trace: a cache filled while tracing fails a guard next call
            built.csr(), built.csc()
        setattr(_TRACED, _TRACED.names[key], built)
    return _TRACED.names[key]


_build_while_tracing._dynamo_marked_constant = True


def build_cache(maxsize: int = 32) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``functools.lru_cache(maxsize)`` for a builder given to :func:`cached`, behind a plain function.

    :func:`cached` reads the builder's ``__module__`` and ``__name__`` while Dynamo traces. On an
    ``lru_cache`` object Dynamo 2.11 cannot read them as constants (``fullgraph=True`` then fails
    with "WrapperUserFunctionVariable() is not a constant"); on a plain function every release can.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        memo = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        @outside_inference  # cached tensors serve later calls, which may train
        def builder(*args: Any) -> Any:
            return memo(*args)

        builder.cache_clear = memo.cache_clear  # type: ignore[attr-defined]
        builder.cache_info = memo.cache_info  # type: ignore[attr-defined]
        return builder

    return wrap


def cached(builder: Callable[..., Any], *args: Any) -> Any:
    """``builder(*args)``: a cached build (graph, index table) that depends only on ``args``.

    ``args`` are Python values (shapes, sizes, device names), never tensors. Eagerly this is the
    builder's own cache lookup. While ``torch.compile`` traces, the builder runs eagerly at trace time
    and the traced code reads its result from a global object, so Dynamo sees an ordinary global (its
    tensors are graph inputs, guarded) and never traces the construction, whose index arithmetic is
    data-dependent (``.tolist()``, ``int(tensor)``). Symbolic sizes (dynamic shapes) are specialised
    first: a grid graph is built per shape.
    """
    if not torch.compiler.is_compiling():
        return builder(*args)
    return getattr(_TRACED, _build_while_tracing(builder.__module__, builder.__name__, tuple(static_shape(a) for a in args)))


def static_shape(value: Any) -> Any:
    """Symbolic ints (dynamic shapes under torch.compile) as plain ints, specialised with a guard;
    tuples element-wise; anything else unchanged."""
    if not torch.compiler.is_compiling():
        return value
    if isinstance(value, (tuple, list)):
        return tuple(static_shape(v) for v in value)
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):  # a symbolic size reads as int here
        from torch.fx.experimental.symbolic_shapes import guard_scalar

        return guard_scalar(value)
    return value


# ------------------------------------------------------------------------------- one axis


def _tiles(members: list[list[int]], tile: int) -> list[list[int]]:
    """Balanced query tiles of at most ``tile`` consecutive members of each group."""
    longest = max(len(m) for m in members)
    t = math.ceil(longest / math.ceil(longest / tile))
    out = []
    for m in members:
        for j in range(math.ceil(len(m) / t)):
            s = min(j * t, max(len(m) - t, 0))  # the last tile overlaps the previous one instead of padding
            out.append(m[s : s + t])
    return out


def _neighborhood_axis(L: int, k: int, d: int, causal: bool, tile: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Sorted keys (L, k), key counts (L,) and query tiles of a dilated 1-D neighborhood.

    Position p lies in group ``p % d`` at index ``p // d`` and sees members of its group only.
    Non-causal: the k consecutive members starting at ``clamp(p // d - k // 2, 0, L_g - k)`` (the
    window shifts inward at the borders, never truncated). Causal: the members at indices
    ``p // d - k + 1 .. p // d`` that exist (fewer than k near the start), as NATTEN.
    """
    p = torch.arange(L)
    group, index = p % d, p // d
    group_len = (L - group + d - 1) // d  # (L,)
    if causal:
        start = (index - k + 1).clamp(min=0)
        count = index - start + 1
    else:
        start = torch.minimum((index - k // 2).clamp(min=0), group_len - k)  # (L,)
        count = torch.full((L,), k)
    j = torch.minimum(torch.arange(k)[None, :], count[:, None] - 1)  # padding repeats the last key
    keys = (start[:, None] + j) * d + group[:, None]  # (L, k)
    return keys, count, _tiles([list(range(g, L, d)) for g in range(d)], tile)


def _window_axis(L: int, w: int, s: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Sorted keys (L, min(w, L)), key counts (L,) and query tiles of 1-D windows of size w shifted by s.

    Position p lies in window ``floor((p - s) / w)``: windows ``[s + j*w, s + (j+1)*w)`` clipped to
    ``[0, L)``, plus ``[0, s)`` when s > 0. Tiles pack whole windows in Swin's cyclic order (starting
    at s, wrapping to 0), so with L a multiple of w a tile is exactly one of Swin's rolled windows.
    """
    p = torch.arange(L)
    group = torch.div(p - s, w, rounding_mode="floor")
    lo = (group * w + s).clamp(min=0)
    hi = (group * w + s + w).clamp(max=L)
    count = hi - lo  # (L,)
    C = int(count.max())
    keys = lo[:, None] + torch.minimum(torch.arange(C)[None, :], count[:, None] - 1)  # (L, C)
    runs: list[list[int]] = []
    for pos in list(range(min(s, L), L)) + list(range(min(s, L))):
        if runs and group[pos] == group[runs[-1][-1]]:
            runs[-1].append(pos)
        else:
            runs.append([pos])
    capacity = max(len(r) for r in runs)
    tiles: list[list[int]] = []
    for run in runs:
        if tiles and len(tiles[-1]) + len(run) <= capacity:
            tiles[-1] = tiles[-1] + run
        else:
            tiles.append(list(run))
    return keys, count, tiles


def _build(kind: str, shape: tuple, size: tuple, dilation: tuple, shift: tuple, causal: tuple, axes, device: str) -> Graph:
    tiling, src, dst = grid_tiling(*(axis_tiling(keys, count, tiles) for keys, count, tiles in axes))
    n, qs, ks = len(shape), [], []
    for q_or_k, out in ((dst, qs), (src, ks)):
        rem = q_or_k
        for L in reversed(shape):
            out.insert(0, rem % L)
            rem = rem // L
    if kind == "neighborhood":  # NATTEN: (key - query) / dilation (exact: both lie in one group)
        offsets = torch.stack([torch.div(k - q, d, rounding_mode="floor") for q, k, d in zip(qs, ks, dilation)], 1)
    else:  # Swin: query - key
        offsets = torch.stack([q - k for q, k in zip(qs, ks)], 1)  # (E, n)
    rel = torch.zeros(offsets.shape[0], dtype=torch.int64)
    for a in range(n):
        assert int(offsets[:, a].abs().max()) <= size[a] - 1, "offsets must index the bias table"
        rel = rel * (2 * size[a] - 1) + offsets[:, a] + size[a] - 1  # (E,)
    dev = torch.device(device)
    gather = RowGather.build(rel, math.prod(2 * s - 1 for s in size)).to(dev)
    rows, R = _tile_rows(rel, tiling), math.prod(2 * s - 1 for s in size)
    dense = None
    if rows is None:  # each tile's row pattern, -inf row R where masked; the distinct patterns and each tile's
        per_tile = torch.cat([rel, rel.new_full((1,), R)])[tiling.pos_edge].view(tiling.mask.shape[0], -1)
        patterns, tile_pattern = torch.unique(per_tile, dim=0, return_inverse=True)  # (C, Qt * Kt), (T,)
        dense = (patterns.to(dev), tile_pattern.to(dev))
    structure = GridStructure(kind, shape, size, dilation, shift, causal, offsets.to(dev), rel.to(dev), tiling.to(dev),
                              gather, None if rows is None else rows.to(dev), dense)
    N = math.prod(shape)
    return Graph(src.to(dev), dst.to(dev), N, N, structure=structure)


# ------------------------------------------------------------------------------- builders


def neighborhood_graph(
    shape: int | Sequence[int] | None = None, *args: Any, kernel_size: int | Sequence[int] | None = None,
    dilation: int | Sequence[int] | None = None, is_causal: bool | Sequence[bool] = False,
    height: int | None = None, width: int | None = None, device: torch.device | str | None = None,
) -> Graph:
    """The graph of neighborhood attention (NATTEN's ``na1d`` / ``na2d`` / ``na3d``) on a 1-, 2- or 3-d grid.

    Call forms: ``neighborhood_graph(shape, kernel_size, dilation=1, *, is_causal=False, device=None)``
    with ``shape`` a tuple of 1 to 3 sides, e.g. ``(T, Y, X)``, and the 2-D form
    ``neighborhood_graph(height, width, kernel_size, dilation=1, *, device=None)``. ``kernel_size``,
    ``dilation`` and ``is_causal`` take one value for every axis or a tuple with one per axis.

    Per axis, a query sees ``kernel_size`` positions spaced by ``dilation``: around it, the window
    shifted inward at the borders (never truncated), or, on a causal axis, the positions at or
    before it (fewer near the start of the axis). Dilation splits an axis into ``dilation``
    interleaved groups (positions ``p % dilation``) that never see each other. Needs every side
    ``>= kernel_size * dilation`` (as NATTEN). Even kernels follow NATTEN: ``k // 2`` keys before
    the query and ``k // 2 - 1`` after, away from the borders.

    A query's edges list its keys in row-major order, NATTEN's attention layout: on an image the
    ``(E, H)`` attention reshapes to ``(height, width, kernel_size, kernel_size, H)``. Offsets follow
    NATTEN's relative position bias: ``(key - query) / dilation`` per axis (in ``[-(k-1), 0]`` on a
    causal axis), indexing a ``prod(2k - 1)``-row table.

    >>> g = neighborhood_graph(8, 8, 3)
    >>> g.num_edges, g.structure
    (576, GridStructure(neighborhood, 8x8, kernel_size=3, dilation=1))
    >>> neighborhood_graph((4, 6, 6), kernel_size=(3, 5, 5), is_causal=(True, False, False)).structure
    GridStructure(neighborhood, 4x6x6, kernel_size=(3, 5, 5), dilation=1, is_causal=(True, False, False))
    """
    named = dict(height=height, width=width, kernel_size=kernel_size, dilation=dilation)
    shape, named = _bind("neighborhood_graph", shape, args, named)
    n = len(shape)
    if named["kernel_size"] is None:
        raise TypeError("neighborhood_graph() needs kernel_size")
    k = _per_axis(named["kernel_size"], n, "kernel_size", 1)
    d = _per_axis(1 if named["dilation"] is None else named["dilation"], n, "dilation", 1)
    causal = _per_axis_bool(is_causal, n, "is_causal")
    if any(L < ka * da for L, ka, da in zip(shape, k, d)):
        raise ValueError(
            f"neighborhood attention needs every side >= kernel_size * dilation = {_fmt(tuple(a * b for a, b in zip(k, d)))}, "
            f"got {'x'.join(map(str, shape))}; use a smaller kernel_size or dilation, or pad the input"
        )
    return cached(_neighborhood_graph, shape, k, d, causal, _device_key(device))


@build_cache(32)
def _neighborhood_graph(shape: tuple, k: tuple, d: tuple, causal: tuple, device: str) -> Graph:
    tile = TILE[len(shape)]
    axes = [_neighborhood_axis(L, ka, da, ca, tile) for L, ka, da, ca in zip(shape, k, d, causal)]
    return _build("neighborhood", shape, k, d, (0,) * len(shape), causal, axes, device)


def window_graph(
    shape: int | Sequence[int] | None = None, *args: Any, window_size: int | Sequence[int] | None = None,
    shift: int | Sequence[int] | None = None, height: int | None = None, width: int | None = None,
    device: torch.device | str | None = None,
) -> Graph:
    """The graph of (shifted) window attention (Swin, Video Swin) on a 1-, 2- or 3-d grid.

    Call forms: ``window_graph(shape, window_size, shift=0, *, device=None)`` with ``shape`` a tuple
    of 1 to 3 sides, e.g. ``(T, Y, X)``, and the 2-D form ``window_graph(height, width, window_size,
    shift=0, *, device=None)``. ``window_size`` and ``shift`` take one int for every axis or a tuple
    with one per axis, each shift in ``[0, window_size)``.

    Without a shift, each axis is cut into windows from its start; tokens attend within their
    window (the product of the per-axis windows). With a shift ``0 < s < w`` on an axis, tokens are
    grouped exactly as Swin's cyclic roll by ``-s`` plus its attention mask group them: per axis
    ``[0, s)``, ``[s, s + w)``, ``[s + w, s + 2w)``, ... (Video Swin's 3-D mask is the same product
    over three axes). No roll and no mask tensor are needed: the graph holds exactly the allowed pairs.

    When a side is not a multiple of the window, the last window on that side is cut short (windows
    never wrap around). This equals padding the grid at the end of each axis to a multiple of the
    window, running (shifted) window attention there with the padded tokens masked out as keys, and
    cropping. (timm, Swin's detection code and Video Swin pad too, but let padded zeros take part as
    keys.) A window larger than a side is one window over that whole side; no argument is changed
    silently (Video Swin shrinks such a window to the side and drops its shift: pass those values
    to match it on small inputs).

    Offsets follow Swin's relative position index: ``query - key`` per axis.

    >>> g = window_graph(8, 8, 4, shift=2)
    >>> g.num_edges, g.structure
    (576, GridStructure(window, 8x8, window_size=4, shift=2))
    >>> window_graph((4, 8, 8), window_size=(2, 4, 4), shift=(1, 2, 2)).structure
    GridStructure(window, 4x8x8, window_size=(2, 4, 4), shift=(1, 2, 2))
    """
    named = dict(height=height, width=width, window_size=window_size, shift=shift)
    shape, named = _bind("window_graph", shape, args, named)
    n = len(shape)
    if named["window_size"] is None:
        raise TypeError("window_graph() needs window_size")
    w = _per_axis(named["window_size"], n, "window_size", 1)
    s = _per_axis(0 if named["shift"] is None else named["shift"], n, "shift", 0)
    if any(sa >= wa for sa, wa in zip(s, w)):
        raise ValueError(f"shift must be in [0, window_size={_fmt(w)}) on every axis, got {_fmt(s)}")
    return cached(_window_graph, shape, w, s, _device_key(device))


@build_cache(32)
def _window_graph(shape: tuple, w: tuple, s: tuple, device: str) -> Graph:
    axes = [_window_axis(L, wa, sa) for L, wa, sa in zip(shape, w, s)]
    return _build("window", shape, w, (1,) * len(shape), s, (False,) * len(shape), axes, device)


def window_tile_order(
    shape: Sequence[int], window_size: int | Sequence[int], shift: int | Sequence[int] = 0, *,
    device: torch.device | str | None = None,
) -> tuple[Graph, BlockPlan] | None:
    """:func:`window_graph` with its nodes renumbered in tile order, and the :class:`BlockPlan` that moves
    grid rows into that order; None unless every window is a full block of the (rolled) grid.

    Node ``t * Qt + j`` of the renumbered graph is slot j of window t (the node the window graph's
    ``query_nodes`` puts there); its edges are the window graph's, in the same order, and its
    structure the same but for the renumbering: the same dense layout, bias rows and mask, with
    an identity block plan. Tokens moved into tile order before a per-token projection (Swin's roll
    and window partition, one move of the C-wide input) then need no move per q, k and v: a window
    attention module moves its input in and its output back (2 moves of C channels instead of 4, and
    likewise in the backward). Cached like the window graph.
    """
    shape = tuple(shape)
    n = len(shape)
    w, s = _per_axis(window_size, n, "window_size", 1), _per_axis(shift, n, "shift", 0)
    return cached(_window_tile_order, shape, w, s, _device_key(device))


@build_cache(32)
def _window_tile_order(shape: tuple, w: tuple, s: tuple, device: str) -> tuple[Graph, BlockPlan] | None:
    graph = _window_graph(shape, w, s, device)
    tl = graph.structure.tiling
    T, Qt, _ = tl.mask.shape
    N = tl.num_nodes
    plan = tl.blocks
    if plan is None or plan.identity or not tl.keys_are_queries or T * Qt != N:
        return None  # no move to save, or windows cut short at a side (padded slots: not a renumbering)
    perm = tl.query_nodes.index  # (N,) the grid node in each slot: a permutation here
    slots = torch.arange(N, device=perm.device)
    inv = torch.empty_like(perm)
    inv[perm] = slots
    tiles = dataclasses.replace(
        tl, blocks=BlockPlan((N,), (T,), (Qt,), (), identity=True), query_nodes=RowGather.build(slots, N),
        key_nodes=RowGather.build(inv[tl.key_nodes.index], N), owner=RowGather.build(tl.owner.index[perm], T * Qt))
    structure = dataclasses.replace(graph.structure, tiling=tiles)
    return Graph(inv[graph.src], inv[graph.dst], N, N, structure=structure), plan
