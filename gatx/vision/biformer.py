"""BiFormer's bi-level routing attention on gatx's sparse attention kernel."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .grid import static_shape
from .routing import region_pool, routed_region_graph

__all__ = ["BiLevelRoutingAttention"]


class _QKVLinear(nn.Module):
    """One linear map ``dim -> qk_dim + qk_dim + dim`` (q, k, v in that order); BiFormer's ``qkv`` submodule."""

    def __init__(self, dim: int, qk_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.qkv(x).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)


def _unsupported(name: str, value: Any, supported: str) -> ValueError:
    return ValueError(
        f"{name}={value!r} is not supported by gatx's BiLevelRoutingAttention: it runs BiFormer's default mode "
        f"({supported}: no key/value downsampling, hard non-differentiable routing, as BiFormer-T/S/B use); "
        f"use the official module for {name}={value!r}"
    )


class BiLevelRoutingAttention(nn.Module):
    r"""Bi-level routing attention from `BiFormer <https://arxiv.org/abs/2303.08810>`_ (CVPR 2023), on one
    ``gatx.ops.sparse_attention`` call over a block-diagonal routed graph.

    The (B, Y, X, C) map is cut into ``n_win x n_win`` regions. With :math:`[q, k, v] = W_{qkv} x`
    (q, k of ``qk_dim`` channels), region queries / keys are region means
    :math:`\hat q_r = \mathrm{mean}_{p \in r}\, q_p`, :math:`\hat k_r = \mathrm{mean}_{p \in r}\, k_p`
    (detached), and each region routes to the ``topk`` regions of highest affinity
    :math:`s\,\hat q_r^\top \hat k_{r'}` (its own region is not forced in). Every pixel then attends, per
    head, to every pixel of its region's routed regions :math:`\mathcal{N}(p)`:

    .. math::
        a_{pj} = \mathrm{softmax}_{j \in \mathcal{N}(p)}\big(s\, q_p^{h\top} k_j^h\big), \qquad
        o_p = W_o\Big(\big\Vert_h \sum_{j \in \mathcal{N}(p)} a_{pj}\, v_j^h + \mathrm{LePE}(v)_p\Big)

    with one scale :math:`s` = ``qk_scale or qk_dim ** -0.5`` (over the full ``qk_dim``, as BiFormer)
    for routing and attention, and LePE a depthwise ``side_dwconv`` convolution of v over the whole
    map (zero padding, crossing region borders).

    The routes become one graph for the whole batch (:func:`gatx.vision.routed_region_graph`, node
    ``b * Y * X + p``), and the attention runs on it as one ``sparse_attention`` call (heads as heads);
    by default on the blocks backend, which never gathers the routed keys / values (BiFormer's code
    materialises them, ``topk`` times the memory of k and v).

    Constructor arguments and parameter names are BiFormer's (``qkv.qkv``, ``wo``, ``lepe``), so
    ``load_state_dict`` takes the state dict of the official ``BiLevelRoutingAttention`` (``strict=True``).
    Only the default modes run: ``kv_downsample_mode="identity"``, ``param_routing=False``,
    ``diff_routing=False``, ``soft_routing=False``; ``param_attention`` may be ``"qkvo"`` or ``"qkv"``
    (no output projection). ``kv_per_win``, ``kv_downsample_ratio`` and ``kv_downsample_kernel`` are
    stored but unused, as in the official default mode.

    Args:
        dim: channels C. num_heads: heads (C and qk_dim divisible by it; default 8).
        n_win: regions per side (default 7). qk_dim: channels of q and k (default C).
        qk_scale: score scale (default ``qk_dim ** -0.5``; like BiFormer, 0 / None mean the default).
        topk: routed regions per region, in [1, n_win ** 2] (default 4).
        side_dwconv: odd LePE kernel size, 0 for none (default 3).
        auto_pad: zero-pad the map at the bottom / right to a multiple of ``n_win`` before the
            projection (padded tokens take part as keys, unmasked, as BiFormer), then crop (default False).
        backend: ``None`` (fastest that can run: the blocks backend), ``"torch"``, ``"fused"``, ...

    Shapes:
        input (B, Y, X, C), Y and X divisible by ``n_win`` unless ``auto_pad``; output (B, Y, X, C).

    >>> import torch, gatx.vision
    >>> bra = gatx.vision.BiLevelRoutingAttention(dim=32, num_heads=2, n_win=2, topk=2)
    >>> bra(torch.randn(2, 8, 6, 32)).shape
    torch.Size([2, 8, 6, 32])
    """

    def __init__(
        self, dim: int, num_heads: int = 8, n_win: int = 7, qk_dim: int | None = None, qk_scale: float | None = None,
        kv_per_win: int = 4, kv_downsample_ratio: int = 4, kv_downsample_kernel: int | None = None,
        kv_downsample_mode: str = "identity", topk: int = 4, param_attention: str = "qkvo",
        param_routing: bool = False, diff_routing: bool = False, soft_routing: bool = False, side_dwconv: int = 3,
        auto_pad: bool = False, *, backend: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (("dim", dim, 1), ("num_heads", num_heads, 1), ("n_win", n_win, 1),
                                 ("topk", topk, 1), ("side_dwconv", side_dwconv, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        qk_dim = qk_dim or dim
        if dim % num_heads or qk_dim % num_heads:
            raise ValueError(
                f"dim and qk_dim must be divisible by num_heads, got dim={dim}, qk_dim={qk_dim}, num_heads={num_heads}"
            )
        if topk > n_win * n_win:
            raise ValueError(f"topk must be at most the number of regions n_win ** 2 = {n_win * n_win}, got {topk}")
        if side_dwconv and side_dwconv % 2 == 0:
            raise ValueError(f"side_dwconv must be odd (a centred depthwise kernel) or 0 for no LePE, got {side_dwconv}")
        if kv_downsample_mode != "identity":
            raise _unsupported("kv_downsample_mode", kv_downsample_mode, "'identity'")
        routing = {"param_routing": param_routing, "diff_routing": diff_routing, "soft_routing": soft_routing}
        for name, value in routing.items():
            if value:
                raise _unsupported(name, value, "False")
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention must be 'qkvo' or 'qkv' (as in BiFormer), got {param_attention!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.qk_dim = qk_dim
        self.qk_scale = qk_scale
        self.scale = qk_scale or qk_dim ** -0.5
        self.kv_per_win = kv_per_win
        self.kv_downsample_ratio = kv_downsample_ratio
        self.kv_downsample_kernel = kv_downsample_kernel
        self.kv_downsample_mode = kv_downsample_mode
        self.topk = topk
        self.param_attention = param_attention
        self.param_routing = param_routing
        self.diff_routing = diff_routing
        self.soft_routing = soft_routing
        self.side_dwconv = side_dwconv
        self.auto_pad = auto_pad
        self.backend = backend
        self.qkv = _QKVLinear(dim, qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        if side_dwconv:
            self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        else:
            self.register_module("lepe", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default Linear / Conv2d init, as the official module."""
        self.qkv.qkv.reset_parameters()
        if isinstance(self.wo, nn.Linear):
            self.wo.reset_parameters()
        if self.lepe is not None:
            self.lepe.reset_parameters()

    def routes(self, q: Tensor, k: Tensor) -> Tensor:
        """(B, R, topk) routed regions from (B, Y, X, qk_dim) q and k: top-k scaled region affinity, no gradient."""
        with torch.no_grad():
            q_r, k_r = region_pool(q.detach(), self.n_win), region_pool(k.detach(), self.n_win)  # (B, R, qk_dim)
            affinity = torch.matmul(q_r * self.scale, k_r.transpose(-1, -2))  # (B, R, R)
            return torch.topk(affinity, self.topk, dim=-1).indices

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.dim or 0 in x.shape[:3]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"BiLevelRoutingAttention expects a non-empty input of shape (B, height, width, dim={self.dim}) "
                f"(channels last), got {got}; permute a (B, C, H, W) tensor with x.permute(0, 2, 3, 1)"
            )
        n = self.n_win
        B, Y0, X0, C = x.shape
        if self.auto_pad:
            x = F.pad(x, (0, 0, 0, (-X0) % n, 0, (-Y0) % n))  # zeros at the bottom / right
        elif Y0 % n or X0 % n:
            raise ValueError(
                f"height and width must be divisible by n_win={n}, got {Y0}x{X0}; pad the input or pass auto_pad=True"
            )
        Y, X = static_shape((x.shape[1], x.shape[2]))  # plain ints also under torch.compile with dynamic shapes
        H = self.num_heads
        q, k, v = self.qkv(x)  # (B, Y, X, qk_dim), (B, Y, X, qk_dim), (B, Y, X, C)
        graph = routed_region_graph(self.routes(q, k), (Y, X), n)  # B * Y * X nodes
        out = ops.sparse_attention(
            graph, q.reshape(B * Y * X, H, -1), k.reshape(B * Y * X, H, -1), v.reshape(B * Y * X, H, -1),
            scale=self.scale, backend=self.backend,
        ).view(B, Y, X, C)  # (B, Y, X, C)
        if self.lepe is not None:
            out = out + self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # depthwise conv over the whole map
        out = self.wo(out)
        if Y != Y0 or X != X0:
            out = out[:, :Y0, :X0].contiguous()
        return out

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, qk_dim={self.qk_dim}, topk={self.topk}"
        s += f", side_dwconv={self.side_dwconv}"
        if self.qk_scale:
            s += f", qk_scale={self.qk_scale}"
        if self.param_attention != "qkvo":
            s += f", param_attention={self.param_attention!r}"
        if self.auto_pad:
            s += ", auto_pad=True"
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")
