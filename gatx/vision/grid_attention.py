"""The shared base of the grid attention modules: one forward for every grid graph.

The modules run ``gatx.ops.sparse_attention`` (the kernel GATConv uses) on a cached grid graph. A
batch shares one graph: the batch is folded into the heads, q / k / v of shape (N, B*H, D) with
head index ``b * H + h`` (passed as transposed views of head-major (B*H, N, D) tensors, the layout
the structured backend works in), and the relative position bias table is repeated over the batch
(a :class:`~gatx.ops.TableBias`: on windows, one tile's bias broadcast over the tiles).
Subclasses give the graph (:meth:`_GridAttention.grid_graph`) and their repr head.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import ops
from ..backends.structured_moves import BlockPlan
from ..graph import Graph
from .grid import static_shape

_LAYOUTS = {
    1: ("(B, L, dim={dim})", "permute a (B, C, L) tensor with x.transpose(1, 2)"),
    2: ("(B, height, width, dim={dim})", "permute a (B, C, H, W) tensor with x.permute(0, 2, 3, 1)"),
    3: ("(B, T, height, width, dim={dim})", "permute a (B, C, T, H, W) tensor with x.permute(0, 2, 3, 4, 1)"),
}


def check_grid_input(x: Any, dim: int, ndim: int, name: str) -> None:
    """A (B, *spatial, dim) channels-last tensor with ``ndim`` spatial axes and B >= 1, else ValueError."""
    layout, hint = _LAYOUTS[ndim]
    layout = layout.format(dim=dim)
    if not isinstance(x, Tensor) or x.dim() != ndim + 2 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} expects input of shape {layout} (channels last), got {got}; {hint}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} got an empty batch (input shape {tuple(x.shape)}); pass at least one sample, shape {layout}")


def per_axis(value: Any, n: int, name: str, minimum: int) -> tuple[int, ...]:
    """An int for every axis or one per axis, validated; ValueError otherwise."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be an int >= {minimum} or a tuple of {n} such ints (one per axis), got {value!r}")
    return values


def fmt(value: Any) -> str:
    """A per-axis argument as the user would write it: one int when every axis has it."""
    if isinstance(value, (tuple, list)) and len(set(value)) == 1:
        return str(value[0])
    return str(tuple(value)) if isinstance(value, list) else str(value)


class _HeadMajorQKV(torch.autograd.Function):
    """(B, N, 3*H*D) qkv projection -> q, k, v of shape (N, B*H, D), transposed views of head-major copies.

    The same values as ``qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).reshape(3, B*H, N, D)`` unbound
    into its three heads-first tensors, but the backward writes the three gradients straight into one
    (B, N, 3, H, D) buffer: autograd through the unbind would stack them (a copy) and then copy the
    permuted stack again for the projection's backward (the stack: 2-6 ms of a 50-65 ms step at 56x56,
    B=2, one thread, in two profiles).
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, B: int, N: int, H: int, D: int):
        t = qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).reshape(3, B * H, N, D)  # (3, B*H, N, D)
        ctx.shape = (B, N, H, D)
        return t[0].transpose(0, 1), t[1].transpose(0, 1), t[2].transpose(0, 1)  # (N, B*H, D) each

    @staticmethod
    def backward(ctx, gq: Tensor, gk: Tensor, gv: Tensor):  # unused outputs arrive as zeros (materialized)
        B, N, H, D = ctx.shape
        out = gq.new_empty((B, N, 3, H, D))
        for i, g in enumerate((gq, gk, gv)):
            out[:, :, i].copy_(g.reshape(N, B, H, D).transpose(0, 1))  # (N, B*H, D) -> (B, N, H, D)
        return out.view(B, N, 3 * H * D), None, None, None, None


class _GridAttention(nn.Module):
    """Shared parameters and forward: qkv projection, graph attention with relative position bias, proj.

    ``ndim`` is the number of spatial axes of the input (B, *spatial, C); ``sizes`` the per-axis
    kernel / window sizes that shape the relative position bias table, ``prod(2 * size - 1)`` rows.
    """

    ndim: int = 2

    def __init__(
        self, dim: int, num_heads: int, sizes: Sequence[int], qkv_bias: bool, qk_scale: float | None,
        attn_drop: float, proj_drop: float, rel_pos_bias: bool, backend: str | None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim < 1 or dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads (both positive ints), got dim={dim} and num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_scale = qk_scale
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.empty(math.prod(2 * s - 1 for s in sizes), num_heads))
        else:
            self.register_parameter("relative_position_bias_table", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # subclasses add their own parameters, then end their __init__ with self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init; bias tables from a truncated normal (std 0.02), as Swin and NATTEN."""
        self.qkv.reset_parameters()
        self.proj.reset_parameters()
        for name, p in self.named_parameters(recurse=False):
            if name.endswith("position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)

    def grid_graph(self, shape: tuple[int, ...], device: torch.device) -> Graph:
        """The (cached) grid graph this module attends over, for an input of spatial ``shape``."""
        raise NotImplementedError

    def _tile_order(self, shape: tuple[int, ...], device: torch.device) -> tuple[Graph, BlockPlan] | None:
        """The grid graph with its nodes in tile order and the move of grid rows into it, when every tile
        is a block of the (rolled) grid whose queries are its keys (windows; see
        :func:`gatx.vision.grid.window_tile_order`), else None."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        check_grid_input(x, self.dim, self.ndim, type(self).__name__)
        shape = static_shape(tuple(x.shape[1:-1]))
        # the tile order's moves (a permutation cached on first use, or strided copies) are not traced, as
        # the structured backend's own moves are not; other backends gain nothing from it
        tiles = None
        if not torch.compiler.is_compiling() and self.backend in (None, "structured"):
            tiles = self._tile_order(shape, x.device)
        if tiles is not None:
            return self._attend(x, tiles[0], self.relative_position_bias_table, tiles[1])
        return self._attend(x, self.grid_graph(shape, x.device), self.relative_position_bias_table)

    def _attend(self, x: Tensor, graph: Graph, table: Tensor | None, plan: BlockPlan | None = None) -> Tensor:
        """Attention of (B, *spatial, C) tokens over ``graph``, bias from ``table``. The graph's nodes are
        row-major over spatial, or, with ``plan``, in the order ``plan.to_blocks`` moves the rows into:
        the tokens are moved there before the qkv projection and back after the output projection
        (both act per token), as Swin partitions before and reverses after its attention."""
        B, *S, C = x.shape
        H, D, N = self.num_heads, self.head_dim, math.prod(S)
        x = x.reshape(B, N, C)
        if plan is not None:
            x = plan.to_blocks(x)  # (B, N, C) in tile order
        q, k, v = _HeadMajorQKV.apply(self.qkv(x).reshape(B, N, 3 * C), B, N, H, D)  # (N, B*H, D), head-major
        bias = None if table is None else graph.structure.table_bias(table, B)  # (E, B*H) values
        out = ops.sparse_attention(
            graph, q, k, v, scale=self.scale, bias=bias, dropout_p=self.attn_drop, training=self.training,
            backend=self.backend,
        )  # (N, B*H, D)
        out = self.proj(out.transpose(0, 1).reshape(B, H, N, D).permute(0, 2, 1, 3).reshape(B, N, C))
        if plan is not None:
            out = plan.from_blocks(out)  # back to row-major
        return self.proj_drop(out.reshape(B, *S, C))

    def _common_repr(self) -> str:
        s = f", qk_scale={self.qk_scale}" if self.qk_scale is not None else ""
        s += f", attn_drop={self.attn_drop}" if self.attn_drop else ""
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")
