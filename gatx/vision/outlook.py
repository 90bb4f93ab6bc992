"""VOLO's outlook attention on gatx's sparse attention kernel: generated logits over an unfold graph, then fold."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..graph import Graph
from .grid import static_shape
from .unfold import fold, unfold_graph

__all__ = ["OutlookAttention"]


def _check_input(x: Any, dim: int) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != dim:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        hint = " (channels last); permute a (B, C, H, W) tensor with x.permute(0, 2, 3, 1)"
        raise ValueError(f"OutlookAttention expects input of shape (B, height, width, dim={dim}){hint}, got {got}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"OutlookAttention needs a non-empty batch and map, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"OutlookAttention needs a floating-point input, got {x.dtype}")


def _ceil_avg_pool(x: Tensor, s: int) -> Tensor:
    """``F.avg_pool2d(x, s, s, ceil_mode=True)`` of (B, C, Y, X): a last window cut by the border averages its
    pixels inside. Under torch.compile written as zero padding and a divide by the in-map fraction: inductor's
    CPU backward of the ceil_mode pool gives wrong input gradients (torch 2.13, a 5 x 6 map, s = 2)."""
    if not torch.compiler.is_compiling():
        return F.avg_pool2d(x, s, s, ceil_mode=True)
    pad = (0, (-x.shape[3]) % s, 0, (-x.shape[2]) % s)
    inside = F.avg_pool2d(F.pad(x.new_ones(1, 1, x.shape[2], x.shape[3]), pad), s, s)  # (1, 1, Y_out, X_out)
    return F.avg_pool2d(F.pad(x, pad), s, s) / inside


class OutlookAttention(nn.Module):
    r"""Outlook attention from `VOLO: Vision Outlooker for Visual Recognition <https://arxiv.org/abs/2106.13112>`_,
    on gatx's sparse attention kernel (``score="given"``) over an :func:`unfold_graph`.

    For every window :math:`w` (centre token :math:`c_w`: the pixel itself, or the
    ``AvgPool2d(stride, stride, ceil_mode=True)`` average when ``stride > 1``), a linear layer
    generates a :math:`k^2 \times k^2` attention matrix per head; row :math:`i` is the output position
    in the window, column :math:`j` the source position (the softmax axis). Values are projected, then
    zero padded; the window outputs are summed into the pixels they cover (``F.fold``):

    .. math::
        a_{w,ij} = \mathrm{softmax}_j\big(s\, [W_a c_w + b_a]_{ij}\big), \qquad
        o_p = W_o \big\Vert_h \sum_{(w, i) \mapsto p}\ \sum_j a_{w,ij}\, v_{w,j}

    per head, with :math:`v = W_v x` (zero at padded positions, which still take softmax weight) and
    :math:`s` = ``qk_scale or head_dim ** -0.5``. As a graph: dst nodes are the (window, position)
    pairs, each with the window's :math:`k^2` positions as in-edges (padded ones from a zero source
    node); the softmax, attention dropout and aggregation are one ``gatx.ops.sparse_attention`` call,
    then :func:`fold`. No unfolded (B, C k^2, windows) value tensor is built.

    Parameters are VOLO's (``v``, ``attn``, ``proj``; ``v.bias`` only with ``qkv_bias``), so
    ``load_state_dict`` takes the official module's state dict. Windows follow
    ``nn.Unfold(kernel_size, padding=padding, stride=stride)``; as in VOLO their count per side must be
    ``ceil(side / stride)`` (e.g. ``padding = (kernel_size - 1) // 2`` for odd kernels), else a ValueError.
    Every stride follows this unfold / fold definition (VOLO's first release, timm). A later revision of
    VOLO's repository replaced the stride-1 branch by a shortcut (a (2k-1)^2 unfold of v and the attention
    folded per pixel) that computes a different function; VOLO's models use stride 2, where all agree.

    Args:
        dim: channels C. num_heads: H (C must be divisible by H).
        kernel_size: window size k (default 3). padding: zero padding of the values (default 1).
        stride: window stride; > 1 pools the centre tokens (default 1).
        qkv_bias: bias in ``v`` (default False). qk_scale: logit scale (default ``head_dim ** -0.5``).
        attn_drop: dropout on the attention weights (default 0). proj_drop: dropout on the output (default 0).
        backend: ``None`` (fastest that can run: the fused CPU kernel), ``"torch"``, ``"dgl"``, ...

    Shapes:
        input (B, Y, X, C) channels last, as VOLO; output (B, Y, X, C).

    >>> import torch, gatx.vision
    >>> oa = gatx.vision.OutlookAttention(dim=32, num_heads=4, kernel_size=3, padding=1, stride=2)
    >>> oa(torch.randn(2, 7, 9, 32)).shape
    torch.Size([2, 7, 9, 32])
    """

    def __init__(
        self, dim: int, num_heads: int, kernel_size: int = 3, padding: int = 1, stride: int = 1,
        qkv_bias: bool = False, qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim must be divisible by num_heads >= 1, got dim={dim} and num_heads={num_heads}")
        if kernel_size < 1 or padding < 0 or stride < 1:
            raise ValueError(f"need kernel_size >= 1, padding >= 0, stride >= 1, got {kernel_size}, {padding}, {stride}")
        if not 0.0 <= attn_drop <= 1.0:
            raise ValueError(f"attn_drop must be in [0, 1], got {attn_drop}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.qk_scale = qk_scale
        self.scale = qk_scale or self.head_dim ** -0.5  # VOLO's rule: 0 or None -> the default
        self.attn_drop = attn_drop
        self.backend = backend
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, kernel_size ** 4 * num_heads)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default Linear init (the official module's; VOLO's network re-initialises its Linears)."""
        self.v.reset_parameters()
        self.attn.reset_parameters()
        self.proj.reset_parameters()

    def unfold_graph(self, height: int, width: int, device: Any) -> Graph:
        """The (cached) graph of (window, position) virtual queries for a height x width map."""
        graph = unfold_graph(height, width, self.kernel_size, stride=self.stride, padding=self.padding, device=device)
        st = graph.structure
        want = (math.ceil(height / self.stride), math.ceil(width / self.stride))
        if (st.out_height, st.out_width) != want:
            raise ValueError(
                f"OutlookAttention with kernel_size={self.kernel_size}, padding={self.padding}, stride={self.stride} "
                f"cuts a {height}x{width} map into {st.out_height}x{st.out_width} windows, but VOLO pools "
                f"{want[0]}x{want[1]} centre tokens (ceil(side / stride)); use padding=(kernel_size - 1) // 2"
            )
        return graph

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.dim)
        B, Y, X, C = x.shape
        H, D, N, k2 = self.num_heads, self.head_dim, Y * X, self.kernel_size ** 2
        graph = self.unfold_graph(*static_shape((Y, X)), x.device)  # one graph per map size, also when compiled
        st = graph.structure
        v = self.v(x).view(B, N, H, D).transpose(0, 1).reshape(N, B * H, D)  # (N, B*H, D), b-major heads
        v = st.with_zero_node(v)  # (N + 1, B*H, D): the padding's zero row
        if self.stride > 1:
            centre = _ceil_avg_pool(x.permute(0, 3, 1, 2), self.stride).permute(0, 2, 3, 1)
        else:
            centre = x  # (B, Y_out, X_out, C)
        logits = self.attn(centre).view(B, st.num_windows, H, k2, k2)  # (B, windows, H, i, j)
        logits = logits.permute(1, 3, 4, 0, 2).reshape(graph.num_edges, B * H).contiguous()  # (E, B*H), edge (w, i, j)
        out = ops.sparse_attention(
            graph, None, None, v, score="given", logits=logits, scale=self.scale, dropout_p=self.attn_drop,
            training=self.training, backend=self.backend,
        )  # (windows * k^2, B*H, D)
        out = fold(graph, out)  # (N, B*H, D)
        out = out.view(N, B, C).transpose(0, 1).reshape(B, Y, X, C)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, padding={self.padding}"
        s += f", stride={self.stride}" + (", qkv_bias=True" if self.v.bias is not None else "")
        s += f", qk_scale={self.qk_scale}" if self.qk_scale is not None else ""
        s += f", attn_drop={self.attn_drop}" if self.attn_drop else ""
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")
