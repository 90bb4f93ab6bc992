"""Neighborhood attention (NAT / DiNAT, NATTEN semantics) in 1-D, 2-D and 3-D on gatx's sparse kernel."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..graph import Graph
from .grid import neighborhood_graph
from .grid_attention import _GridAttention, fmt, per_axis

__all__ = ["NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d"]


class _NeighborhoodAttention(_GridAttention):
    r"""Neighborhood attention from `Neighborhood Attention Transformer <https://arxiv.org/abs/2204.07143>`_
    (dilated: `DiNAT <https://arxiv.org/abs/2209.15001>`_), on gatx's sparse attention kernel.

    Each token attends to its neighborhood in :func:`~gatx.vision.neighborhood_graph` (NATTEN's
    ``na1d`` / ``na2d`` / ``na3d``: windows shift inward at the borders, dilation interleaves
    groups, a causal axis sees only positions at or before the query):

    .. math::
        a_{ij} = \mathrm{softmax}_{j \in \mathcal{N}(i)}\big(s\, q_i^\top k_j + B[\delta_{ij}]\big),
        \qquad o_i = W_o \big\Vert_{h} \sum_{j \in \mathcal{N}(i)} a_{ij}\, v_j

    per head, with :math:`[q, k, v] = W_{qkv} x` and :math:`\delta_{ij} = (j - i) / \mathrm{dilation}`
    per axis.

    Parameters are named as in Swin (``qkv``, ``proj``, ``relative_position_bias_table`` of shape
    ``(prod(2k-1), heads)``). NATTEN < 0.20's ``rpb`` of shape ``(heads, 2k-1, ...)`` is the same
    table: ``relative_position_bias_table = rpb.reshape(heads, -1).t()``; a state dict with an
    ``rpb`` entry is converted on load. NATTEN >= 0.20 modules have no bias: load their state dict
    into a module built with ``rel_pos_bias=False`` (a strict load without a bias says so).

    Args:
        dim: channels C. num_heads: H (C must be divisible by H).
        kernel_size: neighborhood size k, one int or one per axis. dilation: spacing (default 1).
        qkv_bias: bias in the qkv projection (default True). qk_scale: score scale (default D ** -0.5).
        attn_drop: dropout on the attention weights (default 0). proj_drop: dropout on the output (default 0).
        rel_pos_bias: learn a relative position bias (default True).
        backend: ``None`` (fastest that can run: the structured dense path), ``"torch"``, ...
        is_causal: per axis (or one bool for all), keys only at or before the query (default False).
    """

    def __init__(
        self, dim: int, num_heads: int, kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
        qkv_bias: bool = True, qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
        rel_pos_bias: bool = True, backend: str | None = None, *, is_causal: bool | Sequence[bool] = False,
    ) -> None:
        n = self.ndim
        k = per_axis(kernel_size, n, "kernel_size", 1)
        per_axis(dilation, n, "dilation", 1)
        causal = tuple(is_causal) if isinstance(is_causal, (tuple, list)) else (is_causal,) * n
        if len(causal) != n or not all(isinstance(c, bool) for c in causal):
            raise ValueError(f"is_causal must be a bool or a tuple of {n} bools (one per axis), got {is_causal!r}")
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.is_causal = is_causal
        super().__init__(dim, num_heads, k, qkv_bias, qk_scale, attn_drop, proj_drop, rel_pos_bias, backend)
        self.reset_parameters()

    def grid_graph(self, shape: tuple[int, ...], device: torch.device) -> Graph:
        return neighborhood_graph(shape, self.kernel_size, self.dilation, is_causal=self.is_causal, device=device)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, plus a clear error for a NATTEN >= 0.20 state dict (no bias) in strict mode."""
        if strict and self.relative_position_bias_table is not None and not {"rpb", "relative_position_bias_table"} & set(state_dict):
            raise ValueError(
                f"{type(self).__name__}: the state dict has no relative position bias (rpb or relative_position_bias_table), "
                "as NATTEN >= 0.20 modules have none; construct this module with rel_pos_bias=False to load it"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        rpb = state_dict.pop(prefix + "rpb", None)
        if rpb is not None:  # NATTEN < 0.20 layout (H, 2k-1, ...) -> (prod(2k-1), H)
            state_dict[prefix + "relative_position_bias_table"] = rpb.reshape(rpb.shape[0], -1).t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={fmt(self.kernel_size)}, dilation={fmt(self.dilation)}"
        causal = self.is_causal if isinstance(self.is_causal, (tuple, list)) else (self.is_causal,)
        if any(causal):
            s += f", is_causal={fmt(self.is_causal)}"
        if self.relative_position_bias_table is None:
            s += ", rel_pos_bias=False"
        return s + self._common_repr()


class NeighborhoodAttention1d(_NeighborhoodAttention):
    __doc__ = _NeighborhoodAttention.__doc__ + """
    Shapes:
        input (B, L, C), L >= kernel_size * dilation; output (B, L, C).

    >>> import torch, gatx.vision
    >>> na = gatx.vision.NeighborhoodAttention1d(dim=32, num_heads=4, kernel_size=5, is_causal=True)
    >>> na(torch.randn(2, 20, 32)).shape
    torch.Size([2, 20, 32])
    """

    ndim = 1


class NeighborhoodAttention2d(_NeighborhoodAttention):
    __doc__ = _NeighborhoodAttention.__doc__ + """
    Shapes:
        input (B, Y, X, C), Y and X >= kernel_size * dilation; output (B, Y, X, C).

    >>> import torch, gatx.vision
    >>> na = gatx.vision.NeighborhoodAttention2d(dim=32, num_heads=4, kernel_size=3)
    >>> na(torch.randn(2, 9, 10, 32)).shape
    torch.Size([2, 9, 10, 32])
    """

    ndim = 2


class NeighborhoodAttention3d(_NeighborhoodAttention):
    __doc__ = _NeighborhoodAttention.__doc__ + """
    Shapes:
        input (B, T, Y, X, C), each side >= kernel_size * dilation on its axis; output (B, T, Y, X, C).

    >>> import torch, gatx.vision
    >>> na = gatx.vision.NeighborhoodAttention3d(dim=32, num_heads=4, kernel_size=(3, 5, 5), is_causal=(True, False, False))
    >>> na(torch.randn(2, 4, 6, 7, 32)).shape
    torch.Size([2, 4, 6, 7, 32])
    """

    ndim = 3
