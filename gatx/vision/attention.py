"""Vision attention modules on grid graphs: neighborhood attention and (shifted) window attention.

Both run ``gatx.ops.sparse_attention`` (the kernel GATConv uses) on a cached grid graph. A batch of
images shares one graph: the batch is folded into the heads, q / k / v of shape (N, B*H, D) with
head index ``b * H + h`` (passed as transposed views of head-major (B*H, N, D) tensors, the layout
the structured backend works in), and the (E, H) relative position bias is repeated over the batch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..graph import Graph
from .grid import neighborhood_graph, window_graph

__all__ = ["NeighborhoodAttention2d", "WindowAttention"]


def _check_input(x: Any, dim: int, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{name} expects input of shape (B, height, width, dim={dim}) (channels last), got {got}; "
            "permute a (B, C, H, W) tensor with x.permute(0, 2, 3, 1)"
        )


class _GridAttention(nn.Module):
    """Shared parameters and forward: qkv projection, graph attention with relative position bias, proj."""

    def __init__(
        self, dim: int, num_heads: int, size: int, qkv_bias: bool, qk_scale: float | None, attn_drop: float,
        proj_drop: float, rel_pos_bias: bool, backend: str | None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim} and num_heads={num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_scale = qk_scale
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.attn_drop = attn_drop
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.empty((2 * size - 1) ** 2, num_heads))
        else:
            self.register_parameter("relative_position_bias_table", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init; the bias table from a truncated normal (std 0.02), as Swin and NATTEN."""
        self.qkv.reset_parameters()
        self.proj.reset_parameters()
        if self.relative_position_bias_table is not None:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def grid_graph(self, height: int, width: int, device: torch.device) -> Graph:
        """The (cached) grid graph this module attends over, for a height x width feature map."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.dim, type(self).__name__)
        graph = self.grid_graph(x.shape[1], x.shape[2], x.device)
        B, Y, X, C = x.shape
        H, D, N = self.num_heads, self.head_dim, Y * X
        qkv = self.qkv(x).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).reshape(3, B * H, N, D)  # (3, B*H, N, D)
        q, k, v = (t.transpose(0, 1) for t in qkv)  # (N, B*H, D) each, head-major in memory
        bias = None
        if self.relative_position_bias_table is not None:
            bias = graph.structure.relative_position_bias(self.relative_position_bias_table, B)  # (E, B*H)
        out = ops.sparse_attention(
            graph, q, k, v, scale=self.scale, bias=bias, dropout_p=self.attn_drop, training=self.training,
            backend=self.backend,
        )  # (N, B*H, D)
        out = out.transpose(0, 1).reshape(B, H, Y, X, D).permute(0, 2, 3, 1, 4).reshape(B, Y, X, C)
        return self.proj_drop(self.proj(out))

    def _common_repr(self) -> str:
        s = f", qk_scale={self.qk_scale}" if self.qk_scale is not None else ""
        s += f", attn_drop={self.attn_drop}" if self.attn_drop else ""
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")


class NeighborhoodAttention2d(_GridAttention):
    r"""2-D neighborhood attention from `Neighborhood Attention Transformer <https://arxiv.org/abs/2204.07143>`_
    (dilated: `DiNAT <https://arxiv.org/abs/2209.15001>`_), on gatx's sparse attention kernel.

    Each token attends to the ``kernel_size x kernel_size`` neighborhood of :func:`neighborhood_graph`
    (NATTEN semantics: windows shift inward at the borders, dilation interleaves groups):

    .. math::
        a_{ij} = \mathrm{softmax}_{j \in \mathcal{N}(i)}\big(s\, q_i^\top k_j + B[\delta_{ij}]\big),
        \qquad o_i = W_o \big\Vert_{h} \sum_{j \in \mathcal{N}(i)} a_{ij}\, v_j

    per head, with :math:`[q, k, v] = W_{qkv} x` and :math:`\delta_{ij} = (j - i) / \mathrm{dilation}`.

    Parameters are named as in Swin (``qkv``, ``proj``, ``relative_position_bias_table`` of shape
    ``((2k-1)^2, heads)``). NATTEN's ``rpb`` of shape ``(heads, 2k-1, 2k-1)`` is the same table:
    ``relative_position_bias_table = rpb.permute(1, 2, 0).reshape(-1, heads)``; a state dict with an
    ``rpb`` entry (NATTEN's ``NeighborhoodAttention2D``) is converted on load.

    Args:
        dim: channels C. num_heads: H (C must be divisible by H).
        kernel_size: odd neighborhood size k. dilation: spacing of the neighborhood (default 1).
        qkv_bias: bias in the qkv projection (default True). qk_scale: score scale (default D ** -0.5).
        attn_drop: dropout on the attention weights (default 0). proj_drop: dropout on the output (default 0).
        rel_pos_bias: learn a relative position bias (default True).
        backend: ``None`` (fastest that can run: the structured dense path), ``"torch"``, ...

    Shapes:
        input (B, Y, X, C), Y and X >= kernel_size * dilation; output (B, Y, X, C).

    >>> import torch, gatx.vision
    >>> na = gatx.vision.NeighborhoodAttention2d(dim=32, num_heads=4, kernel_size=3)
    >>> na(torch.randn(2, 9, 10, 32)).shape
    torch.Size([2, 9, 10, 32])
    """

    def __init__(
        self, dim: int, num_heads: int, kernel_size: int, dilation: int = 1, qkv_bias: bool = True,
        qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, rel_pos_bias: bool = True,
        backend: str | None = None,
    ) -> None:
        if kernel_size % 2 == 0 or kernel_size < 1 or dilation < 1:
            raise ValueError(f"kernel_size must be odd and >= 1 and dilation >= 1, got {kernel_size} and {dilation}")
        self.kernel_size = kernel_size
        self.dilation = dilation
        super().__init__(dim, num_heads, kernel_size, qkv_bias, qk_scale, attn_drop, proj_drop, rel_pos_bias, backend)

    def grid_graph(self, height: int, width: int, device: torch.device) -> Graph:
        return neighborhood_graph(height, width, self.kernel_size, self.dilation, device=device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        rpb = state_dict.pop(prefix + "rpb", None)
        if rpb is not None:  # NATTEN layout (H, 2k-1, 2k-1) -> ((2k-1)^2, H)
            state_dict[prefix + "relative_position_bias_table"] = rpb.permute(1, 2, 0).reshape(-1, rpb.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, dilation={self.dilation}"
        if self.relative_position_bias_table is None:
            s += ", rel_pos_bias=False"
        return s + self._common_repr()


class WindowAttention(_GridAttention):
    r"""(Shifted) window attention from `Swin Transformer <https://arxiv.org/abs/2103.14030>`_ on gatx's
    sparse attention kernel, without window partition, roll or mask tensor.

    Tokens attend within the windows of :func:`window_graph` (shift 0: W-MSA; shift > 0: SW-MSA,
    grouped exactly as Swin's cyclic roll plus attention mask):

    .. math::
        a_{ij} = \mathrm{softmax}_{j \in \mathcal{W}(i)}\big(s\, q_i^\top k_j + B[i - j]\big),
        \qquad o_i = W_o \big\Vert_{h} \sum_{j \in \mathcal{W}(i)} a_{ij}\, v_j

    Parameters are Swin's (``qkv``, ``proj``, ``relative_position_bias_table`` of shape
    ``((2w-1)^2, heads)``, same index convention), so ``load_state_dict`` takes the state dict of
    Swin's ``WindowAttention`` (its ``relative_position_index`` buffer is recomputed, so it is
    dropped on load). Input and output are whole maps (B, Y, X, C): this module is the attention
    part of Swin's block, roll and window partition included. Sides that are not a multiple of the
    window get a short last window (see :func:`window_graph`).

    Args:
        dim: channels C. window_size: w. num_heads: H. shift_size: the shift, in [0, w) (default 0).
        qkv_bias: bias in the qkv projection (default True). qk_scale: score scale (default D ** -0.5).
        attn_drop, proj_drop: dropout on the attention weights / the output (default 0).
        backend: ``None`` (fastest that can run: the structured dense path), ``"torch"``, ...

    Shapes:
        input (B, Y, X, C); output (B, Y, X, C).

    >>> import torch, gatx.vision
    >>> wa = gatx.vision.WindowAttention(dim=32, window_size=4, num_heads=4, shift_size=2)
    >>> wa(torch.randn(2, 8, 8, 32)).shape
    torch.Size([2, 8, 8, 32])
    """

    def __init__(
        self, dim: int, window_size: int, num_heads: int, shift_size: int = 0, qkv_bias: bool = True,
        qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str | None = None,
    ) -> None:
        if window_size < 1 or not 0 <= shift_size < window_size:
            raise ValueError(f"need window_size >= 1 and 0 <= shift_size < window_size, got {window_size} and {shift_size}")
        self.window_size = window_size
        self.shift_size = shift_size
        super().__init__(dim, num_heads, window_size, qkv_bias, qk_scale, attn_drop, proj_drop, True, backend)

    def grid_graph(self, height: int, width: int, device: torch.device) -> Graph:
        return window_graph(height, width, self.window_size, self.shift_size, device=device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "relative_position_index", None)  # Swin's buffer; gatx keeps it in the graph
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}"
        if self.shift_size:
            s += f", shift_size={self.shift_size}"
        return s + self._common_repr()
