"""(Shifted) window attention: Swin (2-D, with an optional temporal path) and Video Swin (3-D)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..backends.structured_moves import BlockPlan
from ..graph import Graph
from .grid import window_graph, window_tile_order
from .grid_attention import _GridAttention, check_grid_input, fmt, per_axis

__all__ = ["WindowAttention", "WindowAttention3d"]


class _WindowAttention(_GridAttention):
    """Window attention on :func:`~gatx.vision.window_graph`: per-axis window and shift, Swin's bias table."""

    def __init__(
        self, dim: int, window_size: int | Sequence[int], num_heads: int, shift_size: int | Sequence[int] = 0,
        qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
        backend: str | None = None, *, num_ttokens: int | None = None,
    ) -> None:
        w = per_axis(window_size, self.ndim, "window_size", 1)
        s = per_axis(shift_size, self.ndim, "shift_size", 0)
        if any(sa >= wa for sa, wa in zip(s, w)):
            raise ValueError(f"need 0 <= shift_size < window_size on every axis, got window_size={window_size} and shift_size={shift_size}")
        if num_ttokens is not None and (isinstance(num_ttokens, bool) or not isinstance(num_ttokens, int) or num_ttokens < 1):
            raise ValueError(f"num_ttokens must be None or an int >= 1 (the number of frames T), got {num_ttokens!r}")
        self.window_size = window_size
        self.shift_size = shift_size
        super().__init__(dim, num_heads, w, qkv_bias, qk_scale, attn_drop, proj_drop, True, backend)
        self.num_ttokens = num_ttokens
        if num_ttokens is not None:  # the temporal path's table and index (the video adapters' names)
            T = num_ttokens
            self.temporal_position_bias_table = nn.Parameter(torch.empty(2 * T - 1, num_heads))
            t = torch.arange(T)
            self.register_buffer("t_relative_coords", (t[:, None] - t[None, :] + T - 1).reshape(-1))  # (T*T,)
        else:
            self.register_parameter("temporal_position_bias_table", None)
            self.register_buffer("t_relative_coords", None)
        self.reset_parameters()

    def grid_graph(self, shape: tuple[int, ...], device: torch.device) -> Graph:
        return window_graph(shape, self.window_size, self.shift_size, device=device)

    def _tile_order(self, shape: tuple[int, ...], device: torch.device) -> tuple[Graph, BlockPlan] | None:
        return window_tile_order(shape, self.window_size, self.shift_size, device=device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "relative_position_index", None)  # Swin's buffer; gatx keeps it in the graph
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, window_size={fmt(self.window_size)}, num_heads={self.num_heads}"
        if any(per_axis(self.shift_size, self.ndim, "shift_size", 0)):
            s += f", shift_size={fmt(self.shift_size)}"
        return s + self._common_repr()


class WindowAttention(_WindowAttention):
    r"""(Shifted) window attention from `Swin Transformer <https://arxiv.org/abs/2103.14030>`_ on gatx's
    sparse attention kernel, without window partition, roll or mask tensor; optionally with the
    temporal path of Swin-based video adapters (attention across T frames).

    Tokens attend within the windows of :func:`~gatx.vision.window_graph` (shift 0: W-MSA; shift > 0:
    SW-MSA, grouped exactly as Swin's cyclic roll plus attention mask):

    .. math::
        a_{ij} = \mathrm{softmax}_{j \in \mathcal{W}(i)}\big(s\, q_i^\top k_j + B[i - j]\big),
        \qquad o_i = W_o \big\Vert_{h} \sum_{j \in \mathcal{W}(i)} a_{ij}\, v_j

    Parameters are Swin's (``qkv``, ``proj``, ``relative_position_bias_table`` of shape
    ``((2w-1)^2, heads)``, same index convention), so ``load_state_dict`` takes the state dict of
    Swin's ``WindowAttention`` (its ``relative_position_index`` buffer is recomputed, so it is
    dropped on load). Input and output are whole maps (B, Y, X, C): this module is the attention
    part of Swin's block, roll and window partition included. Sides that are not a multiple of the
    window get a short last window (see :func:`~gatx.vision.window_graph`).

    Temporal path (``num_ttokens=T``): ``forward(x, temporal=True)`` takes (B', T, C), B' = batch x
    spatial positions, and attends across the T tokens, all pairs, with the same ``qkv`` / ``proj``
    and a bias :math:`B_t[t_i - t_j]` from ``temporal_position_bias_table`` (2T-1, heads), indexed by
    the buffer ``t_relative_coords`` (T*T,) ``= t_i - t_j + T - 1``; no spatial table, no mask. It
    runs on the same kernel, over the graph ``window_graph((T,), T)`` (batch folded into the heads).
    The parameter and buffer names are those of the Swin video adapters' ``WindowAttention(dim,
    num_ttokens, window_size, num_heads, use_temporal=True, ...)``, so their state dict loads strictly
    (the audio-visual variant's extra ``temporal_position_bias_table_audio`` / ``t_relative_coords_a``
    are not part of this module: drop them, or load with ``strict=False``).

    Args:
        dim: channels C. window_size: w, an int or (wy, wx). num_heads: H.
        shift_size: the shift, in [0, w) per axis (default 0).
        qkv_bias: bias in the qkv projection (default True). qk_scale: score scale (default D ** -0.5).
        attn_drop, proj_drop: dropout on the attention weights / the output (default 0).
        backend: ``None`` (fastest that can run: the structured dense path), ``"torch"``, ...
        num_ttokens: T, the number of frames of the temporal path (default None: no temporal path).
        use_temporal: with ``num_ttokens``, create the temporal path (default True; the adapters' flag).

    Shapes:
        input (B, Y, X, C); output (B, Y, X, C). Temporal path: input (B', T, C); output (B', T, C).

    >>> import torch, gatx.vision
    >>> wa = gatx.vision.WindowAttention(dim=32, window_size=4, num_heads=4, shift_size=2, num_ttokens=8)
    >>> wa(torch.randn(2, 8, 8, 32)).shape, wa(torch.randn(128, 8, 32), temporal=True).shape
    (torch.Size([2, 8, 8, 32]), torch.Size([128, 8, 32]))
    """

    ndim = 2

    def __init__(
        self, dim: int, window_size: int | Sequence[int], num_heads: int, shift_size: int | Sequence[int] = 0,
        qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
        backend: str | None = None, *, num_ttokens: int | None = None, use_temporal: bool = True,
    ) -> None:
        super().__init__(
            dim, window_size, num_heads, shift_size, qkv_bias, qk_scale, attn_drop, proj_drop, backend,
            num_ttokens=num_ttokens if use_temporal else None,
        )

    def forward(self, x: Tensor, temporal: bool = False) -> Tensor:
        if not temporal:
            return super().forward(x)
        name = f"{type(self).__name__}(temporal=True)"
        if self.num_ttokens is None:
            raise ValueError(f"{name} needs the temporal path: construct the module with num_ttokens=T (the number of frames)")
        check_grid_input(x, self.dim, 1, name)
        if x.shape[1] != self.num_ttokens:
            raise ValueError(
                f"{name} expects (B', T={self.num_ttokens}, {self.dim}) tokens (num_ttokens={self.num_ttokens}), "
                f"got {tuple(x.shape)}; fold the spatial positions into the batch: (B, T, Y, X, C) -> (B*Y*X, T, C)"
            )
        graph = window_graph((self.num_ttokens,), self.num_ttokens, device=x.device)  # all pairs of frames
        return self._attend(x, graph, self.temporal_position_bias_table)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", num_ttokens={self.num_ttokens}" if self.num_ttokens is not None else "")


class WindowAttention3d(_WindowAttention):
    r"""3-D (shifted) window attention from `Video Swin Transformer <https://arxiv.org/abs/2106.13230>`_
    on gatx's sparse attention kernel, without window partition, roll or mask tensor.

    Tokens of a (T, Y, X) video attend within the 3-D windows of :func:`~gatx.vision.window_graph`
    (a shift per axis groups them exactly as Video Swin's 3-D cyclic roll plus attention mask):

    .. math::
        a_{ij} = \mathrm{softmax}_{j \in \mathcal{W}(i)}\big(s\, q_i^\top k_j + B[i - j]\big),
        \qquad o_i = W_o \big\Vert_{h} \sum_{j \in \mathcal{W}(i)} a_{ij}\, v_j

    with :math:`i - j` the (dt, dy, dx) offset. Parameters are Video Swin's ``WindowAttention3D``
    (``qkv``, ``proj``, ``relative_position_bias_table`` of shape ((2Wt-1)(2Wh-1)(2Ww-1), heads),
    same index convention); its ``relative_position_index`` buffer is dropped on load. The shift,
    an argument of Video Swin's block, is an argument here. Video Swin shrinks a window larger than
    the input to the input and drops its shift; here no argument changes silently (pass the shrunk
    values to match it on such inputs). ``qkv_bias`` defaults to True, as Video Swin's blocks pass it.

    Args:
        dim: channels C. window_size: (Wt, Wh, Ww) or one int. num_heads: H.
        shift_size: (St, Sh, Sw) or one int, each in [0, W) (default 0).
        qkv_bias: bias in the qkv projection (default True). qk_scale: score scale (default D ** -0.5).
        attn_drop, proj_drop: dropout on the attention weights / the output (default 0).
        backend: ``None`` (fastest that can run: the structured dense path), ``"torch"``, ...

    Shapes:
        input (B, T, Y, X, C); output (B, T, Y, X, C).

    >>> import torch, gatx.vision
    >>> wa = gatx.vision.WindowAttention3d(dim=32, window_size=(2, 4, 4), num_heads=4, shift_size=(1, 2, 2))
    >>> wa(torch.randn(2, 4, 8, 8, 32)).shape
    torch.Size([2, 4, 8, 8, 32])
    """

    ndim = 3

    def __init__(
        self, dim: int, window_size: int | Sequence[int], num_heads: int, shift_size: int | Sequence[int] = 0,
        qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__(dim, window_size, num_heads, shift_size, qkv_bias, qk_scale, attn_drop, proj_drop, backend)
