"""Unfold graphs: every window of ``nn.Unfold`` as graph nodes, plus the fold back into pixels.

VOLO's outlook attention and ACmix attend inside the ``k x k`` windows that ``nn.Unfold`` cuts
out of a (padded) map. On gatx's kernel a window becomes a set of dst nodes (virtual queries) whose
in-edges come from the window's pixels (the softmax axis):

- ``queries="positions"`` (VOLO): one dst node per (window, position inside the window), node
  ``window * k * k + position``; each has the window's ``k * k`` pixels as in-edges. The output of
  a position is summed back into the pixel it covers by :func:`fold` (``F.fold``).
- ``queries="centre"`` (ACmix): one dst node per window, the query sitting at the window's centre.

Windows are those of ``nn.Unfold(kernel_size, dilation, padding, stride)``: per axis
``L_out = (L + 2 * padding - dilation * (k - 1) - 1) // stride + 1`` windows, window ``w`` holding
the positions ``w * stride - padding + a * dilation``, ``a = 0 .. k - 1``, row-major in 2-D.
A position outside the map follows the padding rule:

- ``pad_mode="zeros"``: its edge comes from one extra source node, the *zero node* (index
  ``height * width``, whose value row is zero: :meth:`UnfoldStructure.with_zero_node`). It takes
  softmax weight but contributes nothing, exactly as zero padding does. Several such edges of one
  query are duplicate edges, on purpose.
- ``pad_mode="reflect"``: its edge comes from the reflected pixel (``ReflectionPad2d``), so a
  border window holds some pixels twice: duplicate edges, each counted in the softmax.

Edges are grouped by dst node, sources in row-major window order, so the (E, H) scores of a
window reshape to ``(num_windows, [k * k,] k * k, H)``. Builders are cached per (shape, arguments,
device): calling one in every forward pass is a lookup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import Graph
from .grid import build_cache, cached

__all__ = ["UnfoldStructure", "fold", "unfold_graph"]


@dataclass(frozen=True, eq=False)
class UnfoldStructure:
    """What an unfold graph is: the map, the ``nn.Unfold`` arguments, and where each dst node folds to.

    ``fold_index`` (num_dst,) int64: the pixel ``y * width + x`` each dst node covers, or
    ``height * width`` (a dummy row, dropped) when that position lies in the padding.
    ``zero_node``: the index of the all-zero source node (``pad_mode="zeros"``), else ``None``.
    """

    height: int
    width: int
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    pad_mode: str
    queries: str
    out_height: int
    out_width: int
    fold_index: Tensor
    zero_node: int | None

    @property
    def num_windows(self) -> int:
        return self.out_height * self.out_width

    def with_zero_node(self, v: Tensor) -> Tensor:
        """Source values (height * width, ...) -> the graph's (num_src, ...): a zero row appended
        for the zero node when ``pad_mode="zeros"``; unchanged for ``"reflect"``."""
        n = self.height * self.width
        if v.shape[0] != n:
            raise ValueError(f"values must have {n} rows (one per pixel, row-major), got shape {tuple(v.shape)}")
        if self.zero_node is None:
            return v
        return torch.cat([v, v.new_zeros((1,) + tuple(v.shape[1:]))], 0)

    def __repr__(self) -> str:
        return (
            f"UnfoldStructure({self.height}x{self.width}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, {self.pad_mode}, queries={self.queries}, "
            f"windows={self.out_height}x{self.out_width})"
        )


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _axis(L: int, k: int, s: int, p: int, d: int, mode: str) -> tuple[Tensor, Tensor]:
    """Per window and position on one axis: (L_out, k) raw positions and (L_out, k) source pixels
    (-1 for the zero node under zero padding)."""
    n = (L + 2 * p - d * (k - 1) - 1) // s + 1
    pos = torch.arange(n)[:, None] * s - p + torch.arange(k)[None, :] * d  # (L_out, k)
    if mode == "reflect":
        src = torch.where(pos < 0, -pos, pos)
        src = torch.where(src > L - 1, 2 * (L - 1) - src, src)
        assert int(src.min()) >= 0 and int(src.max()) < L, "padding < L keeps a single reflection in range"
    else:
        src = torch.where((pos >= 0) & (pos < L), pos, torch.full_like(pos, -1))
    return pos, src


def unfold_graph(
    height: int, width: int, kernel_size: int, *, stride: int = 1, padding: int = 0, dilation: int = 1,
    pad_mode: str = "zeros", queries: str = "positions", device: torch.device | str | None = None,
) -> Graph:
    """The graph of attention inside the windows of ``nn.Unfold(kernel_size, dilation, padding, stride)``.

    dst nodes are the windows' virtual queries (``queries="positions"``: one per window and
    position, for VOLO; ``"centre"``: one per window, for ACmix, needing an odd kernel); every dst
    node has the ``kernel_size ** 2`` positions of its window as in-edges, in row-major order.
    Positions in the padding read the zero node (``pad_mode="zeros"``, source ``height * width``)
    or the reflected pixel (``"reflect"``, needs ``padding < height, width``). See the module
    docstring; ``graph.structure`` is an :class:`UnfoldStructure`, used by :func:`fold`.

    >>> g = unfold_graph(4, 5, 3, padding=1)  # 4 x 5 windows of 9 positions, 9 keys each
    >>> g.num_dst, g.num_src, g.num_edges
    (180, 21, 1620)
    """
    for value, name, minimum in ((height, "height", 1), (width, "width", 1), (kernel_size, "kernel_size", 1),
                                 (stride, "stride", 1), (padding, "padding", 0), (dilation, "dilation", 1)):
        _check_int(value, name, minimum)
    if pad_mode not in ("zeros", "reflect"):
        raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
    if queries not in ("positions", "centre"):
        raise ValueError(f"queries must be 'positions' (VOLO) or 'centre' (ACmix), got {queries!r}")
    if queries == "centre" and kernel_size % 2 == 0:
        raise ValueError(f"queries='centre' needs an odd kernel_size (a window with a centre), got {kernel_size}")
    span = dilation * (kernel_size - 1) + 1
    if min(height, width) + 2 * padding < span:
        raise ValueError(
            f"the window spans {span} pixels but the padded map is only {height + 2 * padding}x{width + 2 * padding}; "
            "use a smaller kernel_size or dilation, or more padding"
        )
    if pad_mode == "reflect" and padding >= min(height, width):
        raise ValueError(
            f"reflection padding must be smaller than the map, got padding={padding} for {height}x{width}; "
            "use a smaller kernel_size or a larger input"
        )
    dev = str(torch.device(device)) if device is not None else "cpu"
    return cached(_unfold_graph, height, width, kernel_size, stride, padding, dilation, pad_mode, queries, dev)


@build_cache(32)
def _unfold_graph(Y: int, X: int, k: int, s: int, p: int, d: int, mode: str, queries: str, device: str) -> Graph:
    pos_y, src_y = _axis(Y, k, s, p, d, mode)  # (Y_out, k) each
    pos_x, src_x = _axis(X, k, s, p, d, mode)  # (X_out, k) each
    Yo, Xo, N = pos_y.shape[0], pos_x.shape[0], Y * X
    ok = (src_y[:, None, :, None] >= 0) & (src_x[None, :, None, :] >= 0)  # (Y_out, X_out, k, k)
    win_src = torch.where(ok, src_y[:, None, :, None] * X + src_x[None, :, None, :], N)  # (Y_out, X_out, k, k)
    inside_y = (pos_y >= 0) & (pos_y < Y)
    inside_x = (pos_x >= 0) & (pos_x < X)
    pix = torch.where(
        inside_y[:, None, :, None] & inside_x[None, :, None, :], pos_y[:, None, :, None] * X + pos_x[None, :, None, :], N
    )  # (Y_out, X_out, k, k): the pixel each position covers, N in the padding
    if queries == "positions":
        src = win_src[:, :, None, None].expand(Yo, Xo, k, k, k, k).reshape(-1)  # (windows * k^2 * k^2,)
        fold_index = pix.reshape(-1)  # (windows * k^2,)
    else:
        src = win_src.reshape(-1)  # (windows * k^2,)
        fold_index = pix[:, :, k // 2, k // 2].reshape(-1)  # (windows,)
    num_dst = fold_index.numel()
    dev = torch.device(device)
    structure = UnfoldStructure(
        Y, X, k, s, p, d, mode, queries, Yo, Xo, fold_index.to(dev), N if mode == "zeros" else None
    )
    num_src = N + 1 if mode == "zeros" else N
    indptr = torch.arange(0, num_dst * k * k + 1, k * k, device=dev)  # edges already grouped by dst: no sort
    return Graph.from_csr(indptr, src.to(dev), num_src, structure=structure)


class _Fold(torch.autograd.Function):
    """(num_dst, ...) -> (num_pixels, ...): forward an index_add, backward a gather."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, num_pixels: int) -> Tensor:
        out = x.new_zeros((num_pixels + 1,) + tuple(x.shape[1:]))  # the last row collects the padding
        out.index_add_(0, index, x)
        ctx.save_for_backward(index)
        return out[:num_pixels]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        grad = F.pad(grad, [0, 0] * (grad.dim() - 1) + [0, 1])  # a zero row for the padding positions
        return grad.index_select(0, index), None, None


def fold(graph: Graph, x: Tensor) -> Tensor:
    """Sum the outputs of an unfold graph's dst nodes into the pixels they cover (``F.fold``).

    .. math:: y_p = \\sum_{(w, i):\\ \\mathrm{pixel}(w, i) = p} x_{(w, i)}

    Positions lying in the padding are dropped; there is no normalisation. The backward is a
    gather (each dst node covers at most one pixel).

    Args:
        graph: a graph from :func:`unfold_graph`. x: (num_dst, ...) per dst node.

    Returns: (height * width, ...) per pixel, row-major.

    >>> g = unfold_graph(3, 3, 3, padding=1)
    >>> fold(g, torch.ones(g.num_dst, 1)).view(3, 3)  # how many windows cover each pixel
    tensor([[4., 6., 4.],
            [6., 9., 6.],
            [4., 6., 4.]])
    """
    structure = getattr(graph, "structure", None)
    if not isinstance(structure, UnfoldStructure):
        raise ValueError("fold needs a graph built by gatx.vision.unfold_graph (its structure says where nodes fold to)")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != graph.num_dst:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (num_dst={graph.num_dst}, ...), got {got}")
    if x.device != graph.device:
        raise ValueError(f"x is on {x.device} but the graph is on {graph.device}; move one with .to(device)")
    return _Fold.apply(x, structure.fold_index, structure.height * structure.width)
