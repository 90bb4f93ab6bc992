"""Grid graphs for vision attention: neighborhood attention (NATTEN) and (shifted) windows (Swin).

A Y x X feature map is a graph of ``N = Y * X`` nodes, node ``y * X + x``; an edge ``key -> query``
is one allowed attention pair. Both kinds are *separable*: a query (y, x) sees a key (ky, kx) iff
``ky`` is allowed for ``y`` on the row axis and ``kx`` for ``x`` on the column axis. Edges are sorted
by query, then by key in row-major order. Each graph carries a :class:`GridStructure` with the
per-edge relative offsets, the row of the relative position bias table each edge reads, and the
:class:`~gatx.backends.structured.Tiling` that the structured backend uses for its dense fast path.

Builders are cached per (shape, arguments, device), 32 graphs per kind (about 16 MB for a 56 x 56
map with k = 7): calling one in every forward pass is a lookup.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends.structured import RowGather, Tiling, axis_tiling, grid_tiling
from ..graph import Graph

__all__ = ["GridStructure", "neighborhood_graph", "window_graph"]

# Query tile length per axis for neighborhoods: 7 x 7 queries read a (6 + k) x (6 + k) halo of keys.
# On CPU (56 x 56 map, k = 7, fwd + bwd) tiles of 7 and 8 were fastest among 4..14; 7 by ~10% with a
# bias (fewer masked score entries), 8 and 7 alike without.
TILE = 7


@dataclass(frozen=True, eq=False)
class GridStructure:
    """What a grid graph is: its kind, parameters, per-edge offsets and its kernel tiling.

    ``kind`` is ``"neighborhood"`` (``size`` = kernel size) or ``"window"`` (``size`` = window size).
    ``offsets`` (E, 2) int64 per-edge (dy, dx) in the convention of the reference implementation:
    NATTEN's ``(key - query) / dilation`` for neighborhoods, Swin's ``query - key`` for windows.
    ``rel_pos_index`` (E,) is the row of a ``((2 * size - 1) ** 2, H)`` bias table that each edge
    reads: ``(dy + size - 1) * (2 * size - 1) + (dx + size - 1)``.
    """

    kind: str
    height: int
    width: int
    size: int
    dilation: int
    shift: int
    offsets: Tensor
    rel_pos_index: Tensor
    tiling: Tiling
    rel_pos_gather: RowGather

    @property
    def table_size(self) -> int:
        """Rows of the relative position bias table: ``(2 * size - 1) ** 2``."""
        return (2 * self.size - 1) ** 2

    def relative_position_bias(self, table: Tensor, batch: int = 1) -> Tensor:
        """Per-edge bias (E, batch * H) from a ``(table_size, H)`` table, repeated over a batch.

        Head index ``b * H + h``, as when a batch is folded into the heads. Same values as
        ``table[rel_pos_index].repeat(1, batch)``; the result is a transposed view of a head-major
        (batch * H, E) tensor, and the backward into the table is a segment sum, not a scatter-add.
        """
        if table.dim() != 2 or table.shape[0] != self.table_size:
            raise ValueError(
                f"the relative position bias table must have shape ({self.table_size}, H) for size {self.size}, "
                f"got {tuple(table.shape)}"
            )
        t = table.t()  # (H, rows)
        if batch > 1:
            t = t.repeat(batch, 1)  # (B*H, rows)
        return self.rel_pos_gather(t).t()  # (E, B*H)

    def __repr__(self) -> str:
        extra = f"kernel_size={self.size}, dilation={self.dilation}" if self.kind == "neighborhood" else (
            f"window_size={self.size}, shift={self.shift}"
        )
        return f"GridStructure({self.kind}, {self.height}x{self.width}, {extra})"


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _device_key(device: torch.device | str | None) -> str:
    return str(torch.device(device)) if device is not None else "cpu"


# ------------------------------------------------------------------------------- one axis


def _neighborhood_axis(L: int, k: int, d: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Allowed (L, L), offsets (L, L) and query tiles of a dilated, clamped 1-D neighborhood.

    Position p lies in group ``p % d`` at index ``p // d``; inside its group (of length ``L_g``) it
    sees the k consecutive members starting at ``clamp(p // d - k // 2, 0, L_g - k)``: the window
    shifts inward at the borders and is never truncated.
    """
    p = torch.arange(L)
    group, index = p % d, p // d
    group_len = (L - group + d - 1) // d  # (L,)
    start = torch.minimum((index - k // 2).clamp(min=0), group_len - k)  # (L,)
    key_index = index[None, :]
    allowed = (group[:, None] == group[None, :]) & (key_index >= start[:, None]) & (key_index < start[:, None] + k)
    offsets = torch.div(p[None, :] - p[:, None], d, rounding_mode="floor")  # key - query, in steps of d
    longest = int(group_len.max())
    t = math.ceil(longest / math.ceil(longest / TILE))  # balanced tiles of at most TILE queries
    tiles = []
    for g in range(d):
        members = list(range(g, L, d))
        m = len(members)
        for j in range(math.ceil(m / t)):
            s = min(j * t, max(m - t, 0))  # the last tile overlaps the previous one instead of padding
            tiles.append(members[s : s + t])
    return allowed, offsets, tiles


def _window_axis(L: int, w: int, s: int) -> tuple[Tensor, Tensor, list[list[int]]]:
    """Allowed (L, L), offsets (L, L) and query tiles of 1-D windows of size w shifted by s.

    Position p lies in window ``floor((p - s) / w)``: windows ``[s + j*w, s + (j+1)*w)`` clipped to
    ``[0, L)``, plus ``[0, s)`` when s > 0. Tiles pack whole windows in Swin's cyclic order (starting
    at s, wrapping to 0), so with L a multiple of w a tile is exactly one of Swin's rolled windows.
    """
    p = torch.arange(L)
    group = torch.div(p - s, w, rounding_mode="floor")
    allowed = group[:, None] == group[None, :]
    offsets = p[:, None] - p[None, :]  # query - key (Swin)
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
    return allowed, offsets, tiles


def _build(kind: str, Y: int, X: int, size: int, dilation: int, shift: int, axes, device: str) -> Graph:
    (ay, oy, ty), (ax, ox, tx) = axes
    tiling, src, dst = grid_tiling(axis_tiling(ay, ty), axis_tiling(ax, tx))
    qy, qx, ky, kx = dst // X, dst % X, src // X, src % X
    offsets = torch.stack([oy[qy, ky], ox[qx, kx]], 1)  # (E, 2)
    assert int(offsets.abs().max()) <= size - 1, "offsets must index the bias table"
    rel = (offsets[:, 0] + size - 1) * (2 * size - 1) + (offsets[:, 1] + size - 1)  # (E,)
    dev = torch.device(device)
    gather = RowGather.build(rel, (2 * size - 1) ** 2).to(dev)
    structure = GridStructure(kind, Y, X, size, dilation, shift, offsets.to(dev), rel.to(dev), tiling.to(dev), gather)
    return Graph(src.to(dev), dst.to(dev), Y * X, Y * X, structure=structure)


# ------------------------------------------------------------------------------- builders


def neighborhood_graph(
    height: int, width: int, kernel_size: int, dilation: int = 1, *, device: torch.device | str | None = None
) -> Graph:
    """The graph of 2-D neighborhood attention (NATTEN semantics) on a ``height x width`` map.

    Every query attends to exactly ``kernel_size ** 2`` keys: per axis, ``kernel_size`` positions
    spaced by ``dilation`` around it, the window shifted inward at the borders (never truncated).
    Dilation splits each axis into ``dilation`` interleaved groups (positions ``p % dilation``)
    that never see each other. Needs ``height, width >= kernel_size * dilation`` and an odd kernel.

    A query's edges list its keys in row-major (ky, kx) order, NATTEN's attention layout: the
    ``(E, H)`` attention reshapes to ``(height, width, kernel_size, kernel_size, H)``. Offsets follow
    NATTEN's relative position bias: ``(key - query) / dilation`` per axis.

    >>> g = neighborhood_graph(8, 8, 3)
    >>> g.num_edges, g.structure
    (576, GridStructure(neighborhood, 8x8, kernel_size=3, dilation=1))
    """
    _check_int(height, "height", 1)
    _check_int(width, "width", 1)
    _check_int(kernel_size, "kernel_size", 1)
    _check_int(dilation, "dilation", 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (a window centred on its query, as in NATTEN), got {kernel_size}")
    if min(height, width) < kernel_size * dilation:
        raise ValueError(
            f"neighborhood attention needs height and width >= kernel_size * dilation = {kernel_size * dilation}, "
            f"got {height}x{width}; use a smaller kernel_size or dilation, or pad the input"
        )
    return _neighborhood_graph(height, width, kernel_size, dilation, _device_key(device))


@functools.lru_cache(maxsize=32)
def _neighborhood_graph(Y: int, X: int, k: int, d: int, device: str) -> Graph:
    axes = (_neighborhood_axis(Y, k, d), _neighborhood_axis(X, k, d))
    return _build("neighborhood", Y, X, k, d, 0, axes, device)


def window_graph(
    height: int, width: int, window_size: int, shift: int = 0, *, device: torch.device | str | None = None
) -> Graph:
    """The graph of Swin's (shifted) window attention on a ``height x width`` map.

    Without a shift, the map is cut into ``window_size x window_size`` windows from the top-left
    corner; tokens attend within their window. With a shift ``0 < shift < window_size``, tokens are
    grouped exactly as Swin's cyclic roll by ``-shift`` plus its attention mask group them: per axis
    ``[0, shift)``, ``[shift, shift + w)``, ``[shift + w, shift + 2w)``, ... No roll and no mask
    tensor are needed: the graph holds exactly the allowed pairs.

    When a side is not a multiple of the window, the last window on that side is cut short (windows
    never wrap around). This equals padding the map at the bottom / right to a multiple of the window,
    running Swin's (shifted) window attention there with the padded tokens masked out as keys, and
    cropping. (timm and Swin's detection code pad too, but let padded zeros take part as keys.)
    A window larger than the map is one window over that whole side; no argument is changed silently.

    Offsets follow Swin's relative position index: ``query - key`` per axis.

    >>> g = window_graph(8, 8, 4, shift=2)
    >>> g.num_edges, g.structure
    (576, GridStructure(window, 8x8, window_size=4, shift=2))
    """
    _check_int(height, "height", 1)
    _check_int(width, "width", 1)
    _check_int(window_size, "window_size", 1)
    _check_int(shift, "shift", 0)
    if shift >= window_size:
        raise ValueError(f"shift must be in [0, window_size={window_size}), got {shift}")
    return _window_graph(height, width, window_size, shift, _device_key(device))


@functools.lru_cache(maxsize=32)
def _window_graph(Y: int, X: int, w: int, s: int, device: str) -> Graph:
    axes = (_window_axis(Y, w, s), _window_axis(X, w, s))
    return _build("window", Y, X, w, 1, s, axes, device)
