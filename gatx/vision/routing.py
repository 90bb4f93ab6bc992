"""Data-dependent graphs for routing attention, built per forward pass and batched.

Routing attention (BiFormer's bi-level routing) cuts a ``Y x X`` map into ``n_win x n_win``
regions (region ``r = j * n_win + i`` for region row ``j`` and column ``i``, each of
``P = (Y / n_win) * (X / n_win)`` pixels) and lets every region pick, per sample, the ``topk``
regions its pixels attend to. The batch becomes ONE block-diagonal :class:`gatx.Graph` over
``B * Y * X`` nodes (node ``b * Y * X + y * X + x``): pixel ``p`` of sample ``b`` receives an edge
from every pixel of each region in ``idx[b, region(p)]``, so attention never crosses samples.

The graph is built with a handful of vectorised gathers (no Python loop over samples, regions or
pixels) from a cached per-(shape, n_win, device) table of each region's pixels; its edges come out
grouped by destination, so the graph's CSR is known without a sort (as :meth:`gatx.Graph.from_csr`;
the indices are derived from validated routes, so the per-edge checks are skipped). Routing
indices are integers and carry no gradient.

The graph carries a :class:`~gatx.backends.blocks.RegionBlocks` structure (the routes), so
``gatx.ops.sparse_attention`` runs it on the blocks backend: one batched matmul per route over the
query regions, without gathering the routed keys / values. Every other backend runs the explicit edges.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._modes import outside_inference
from ..backends.blocks import RegionBlocks
from ..graph import Graph
from .grid import _check_int, _device_key, build_cache, cached

__all__ = ["region_pool", "region_table", "routed_region_graph"]


def _check_regions(height: int, width: int, n_win: int) -> None:
    _check_int(height, "height", 1)
    _check_int(width, "width", 1)
    _check_int(n_win, "n_win", 1)
    if height % n_win or width % n_win:
        raise ValueError(
            f"height and width must be divisible by n_win={n_win} (the number of regions per side), got "
            f"{height}x{width}; pad the map to a multiple of n_win (BiLevelRoutingAttention(auto_pad=True) does)"
        )


def region_table(height: int, width: int, n_win: int, *, device: torch.device | str | None = None) -> Tensor:
    """(R, P) pixel ids ``y * width + x`` of each region, regions and pixels in row-major order (cached).

    >>> region_table(4, 4, 2).tolist()
    [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    """
    _check_regions(height, width, n_win)
    return _region_table(height, width, n_win, _device_key(device))


@build_cache(32)
def _region_table(Y: int, X: int, n: int, device: str) -> Tensor:
    h, w = Y // n, X // n
    pix = torch.arange(Y * X).view(n, h, n, w).permute(0, 2, 1, 3)  # (n, n, h, w): region row, col, then pixel
    return pix.reshape(n * n, h * w).to(device)  # (R, P)


@build_cache(32)
def _pixel_region(Y: int, X: int, n: int, device: str) -> Tensor:
    h, w = Y // n, X // n
    ry = torch.arange(Y) // h
    rx = torch.arange(X) // w
    return (ry[:, None] * n + rx[None, :]).reshape(-1).to(device)  # (N,) region of each pixel


@functools.lru_cache(maxsize=8)
def _rows_cached(num_dst: int, degree: int, device: str) -> tuple[Tensor, Tensor, Tensor, tuple[int, int, int]]:
    E = num_dst * degree
    indptr = torch.arange(0, E + 1, degree, device=device)  # (num_dst + 1,)
    dst = torch.arange(num_dst, device=device).view(num_dst, 1).expand(num_dst, degree).reshape(-1)  # (E,)
    perm = torch.arange(E, device=device)  # (E,) edges are in row order
    return indptr, dst, perm, (indptr._version, dst._version, perm._version)


@outside_inference  # cached tensors serve later calls, which may train
def _rows(num_dst: int, degree: int, device: str) -> tuple[Tensor, Tensor, Tensor]:
    """(indptr, dst, perm) of a graph with ``degree`` in-edges per dst node, edges in row order (cached).

    Graphs share these tensors; if one was written in place (a Graph then refuses to run), the cache
    is rebuilt so later graphs never inherit the damage.
    """
    indptr, dst, perm, versions = _rows_cached(num_dst, degree, device)
    if (indptr._version, dst._version, perm._version) != versions:
        _rows_cached.cache_clear()
        indptr, dst, perm, _ = _rows_cached(num_dst, degree, device)
    return indptr, dst, perm


def region_pool(x: Tensor, n_win: int) -> Tensor:
    """Mean of a (B, Y, X, C) map over each of its ``n_win x n_win`` regions: (B, R, C), R = n_win ** 2.

    >>> region_pool(torch.arange(16.).view(1, 4, 4, 1), 2).flatten().tolist()
    [2.5, 4.5, 10.5, 12.5]
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"region_pool expects a (B, Y, X, C) tensor, got {got}")
    B, Y, X, C = x.shape
    _check_regions(Y, X, n_win)
    regions = x.reshape(B, n_win, Y // n_win, n_win, X // n_win, C)
    # one axis at a time: torch reduces the two axes at once 3-7x slower on CPU (56x56, 7x7 regions, C=96: 1.2 ms
    # against 0.2 ms); a region's mean is its sum over the rows, then over the columns, divided by its size
    return regions.sum(2).sum(3).div_((Y // n_win) * (X // n_win)).reshape(B, n_win * n_win, C)


def routed_region_graph(idx: Tensor, grid: tuple[int, int], n_win: int) -> Graph:
    """The block-diagonal graph of region routing: each pixel attends to every pixel of its region's routes.

    .. math::
        \\mathcal{N}(b, p) = \\{\\, b \\cdot N + s \\;:\\; s \\in \\mathrm{region}(\\mathrm{idx}[b, \\mathrm{region}(p), t]),
        \\ t < \\mathrm{topk} \\,\\}

    Every node has ``topk * P`` in-edges, listed route by route (in the order of ``idx``), each
    region's pixels in row-major order. A region routed twice gives duplicate edges (counted twice
    by the softmax): pass distinct routes, as ``torch.topk`` gives.

    Args:
        idx: (B, R, topk) int routes: ``idx[b, r]`` are the regions that region ``r`` of sample ``b``
            attends to, ``R = n_win ** 2``, regions numbered row-major.
        grid: ``(height, width)`` of the map, both divisible by ``n_win``.
        n_win: regions per side.

    Shapes:
        ``idx`` (B, R, topk) -> a graph of ``B * height * width`` nodes and ``B * height * width * topk * P``
        edges, ``P = (height / n_win) * (width / n_win)``.

    >>> g = routed_region_graph(torch.tensor([[[1], [0], [3], [2]]]), (4, 4), 2)
    >>> g.num_dst, g.num_edges, g.csr().src[:4].tolist()
    (16, 64, [2, 3, 6, 7])
    """
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid must be a (height, width) pair, got {grid!r}")
    Y, X = grid
    _check_regions(Y, X, n_win)
    R = n_win * n_win
    if not isinstance(idx, Tensor) or idx.dim() != 3 or idx.shape[1] != R:
        got = tuple(idx.shape) if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"idx must have shape (B, R={R}, topk) (R = n_win ** 2 regions), got {got}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"idx must hold int64 or int32 region ids, got {idx.dtype}; convert it with idx.long()")
    B, _, topk = idx.shape
    if B == 0 or topk == 0:
        raise ValueError(f"idx must have a batch and topk of at least 1, got shape {tuple(idx.shape)}")
    lo, hi = torch.aminmax(idx)
    if torch.compiler.is_compiling():  # the ids are data: checked when the compiled graph runs
        torch._assert_async((lo >= 0) & (hi < R), f"region ids in idx must lie in [0, {R})")
    elif int(lo) < 0 or int(hi) >= R:
        raise ValueError(f"region ids in idx must lie in [0, {R}), got ids from {int(lo)} to {int(hi)}")
    device = _device_key(idx.device)
    table = cached(_region_table, Y, X, n_win, device)  # (R, P)
    N, P = Y * X, table.shape[1]
    offset = torch.arange(0, B * N, N, device=idx.device).view(B, 1, 1)  # (B, 1, 1)
    routed = (table[idx.long().reshape(-1)].view(B, R, topk * P) + offset)  # (B, R, topk*P) node ids per region
    src = routed.index_select(1, cached(_pixel_region, Y, X, n_win, device)).reshape(-1)  # (B*N*topk*P,) grouped by dst
    indptr, dst, perm = cached(_rows, B * N, topk * P, device)  # the same for every forward of this shape: cached
    structure = RegionBlocks((Y, X), n_win, idx.to(torch.int64, copy=True))
    # src / dst derive from the validated routes: in range and grouped by dst by construction, so the
    # graph skips from_csr's per-edge checks and copies (they would be most of the build time)
    return Graph._trusted_csr(indptr, src, dst, B * N, perm=perm, structure=structure)
