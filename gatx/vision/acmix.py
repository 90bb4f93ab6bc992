"""ACmix (self-attention and convolution mixed) with its attention branch on gatx's sparse attention kernel."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..graph import Graph
from .grid import static_shape
from .unfold import unfold_graph

__all__ = ["ACmix"]


def position_grid(height: int, width: int, *, dtype: torch.dtype, device: Any) -> Tensor:
    """(1, 2, height, width) normalised coordinates: channel 0 is x = linspace(-1, 1, width) along
    the width, channel 1 is y = linspace(-1, 1, height) along the height (ACmix's ``position``)."""
    x = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device).expand(height, width)
    y = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)[:, None].expand(height, width)
    return torch.stack([x, y])[None]


class ACmix(nn.Module):
    r"""ACmix from `On the Integration of Self-Attention and Convolution <https://arxiv.org/abs/2111.14556>`_,
    its local attention branch on gatx's sparse attention kernel (``score="dot"``) over an
    :func:`unfold_graph` with reflection padding.

    Shared 1x1 projections :math:`q, k, v` feed two branches. Attention: every query pixel :math:`i`
    (at ``[::stride, ::stride]``) attends to the ``kernel_att x kernel_att`` window around it
    (spacing ``dilation``), reflection padded, with a position encoding
    :math:`p = \mathrm{conv\_p}(\text{grid})` shared by the heads:

    .. math::
        a_{ij} = \mathrm{softmax}_{j}\big((d^{-1/2} q_i)^\top (k_j + p_i - p_j)\big), \qquad
        o^{att}_i = \big\Vert_h \sum_j a_{ij}\, v_j

    per head (:math:`d` = head_dim). Reflection puts some keys of a border window in it twice: they
    are duplicate edges, each with its own share of the softmax. The term :math:`q_i^\top p_i` is the
    same for every key of a query and cancels in the softmax (its gradient is zero too), so the branch
    runs as dot attention with keys :math:`k_j - p_j`. Convolution: ``fc`` maps the concatenated
    q, k, v (arranged (B, 3 heads, head_dim, pixels)) to ``kernel_conv ** 2`` shifted feature maps,
    then the grouped ``dep_conv`` (initialised as one-hot shift kernels) aggregates them, as in the
    official code. Output :math:`\mathrm{rate1}\, o^{att} + \mathrm{rate2}\, o^{conv}` (both start at 0.5).

    Parameters are the official module's (``conv1``/``conv2``/``conv3`` for q/k/v, ``conv_p``, ``fc``,
    ``dep_conv`` without bias, ``rate1``, ``rate2``), so ``load_state_dict`` takes its state dict.
    Layout (B, C, H, W) channels first, as the official ACmix (a drop-in for a ResNet conv), unlike
    gatx's transformer modules. Beyond the official forward, which runs only with ``kernel_conv=3``,
    ``dilation=1`` and sides divisible by ``stride``: ``dep_conv`` pads ``kernel_conv // 2``, the
    window is dilated (reflection padding ``dilation * (kernel_att - 1) // 2``), and a side L gives
    ``ceil(L / stride)`` outputs in both branches.

    Args:
        in_planes: input channels. out_planes: output channels (divisible by ``head``).
        kernel_att: odd attention window (default 7). head: attention heads (default 4).
        kernel_conv: odd convolution kernel (default 3). stride: output stride (default 1).
        dilation: spacing of the attention window (default 1).
        backend: ``None`` (fastest that can run: the fused CPU kernel), ``"torch"``, ``"dgl"``, ...

    Shapes:
        input (B, in_planes, Y, X) with Y, X > dilation * (kernel_att - 1) // 2;
        output (B, out_planes, ceil(Y / stride), ceil(X / stride)).

    >>> import torch, gatx.vision
    >>> m = gatx.vision.ACmix(16, 16, kernel_att=5, head=4)
    >>> m(torch.randn(2, 16, 7, 9)).shape
    torch.Size([2, 16, 7, 9])
    """

    def __init__(
        self, in_planes: int, out_planes: int, kernel_att: int = 7, head: int = 4, kernel_conv: int = 3,
        stride: int = 1, dilation: int = 1, backend: str | None = None,
    ) -> None:
        super().__init__()
        if head < 1 or out_planes % head != 0:
            raise ValueError(f"out_planes must be divisible by head >= 1, got out_planes={out_planes} and head={head}")
        if kernel_att < 1 or kernel_att % 2 == 0 or kernel_conv < 1 or kernel_conv % 2 == 0:
            raise ValueError(f"kernel_att and kernel_conv must be odd and >= 1, got {kernel_att} and {kernel_conv}")
        if stride < 1 or dilation < 1 or in_planes < 1:
            raise ValueError(f"need in_planes, stride, dilation >= 1, got {in_planes}, {stride}, {dilation}")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.head = head
        self.head_dim = out_planes // head
        self.kernel_att = kernel_att
        self.kernel_conv = kernel_conv
        self.stride = stride
        self.dilation = dilation
        self.padding_att = (dilation * (kernel_att - 1) + 1) // 2
        self.backend = backend
        self.rate1 = nn.Parameter(torch.empty(1))
        self.rate2 = nn.Parameter(torch.empty(1))
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, kernel_size=1)
        self.conv_p = nn.Conv2d(2, self.head_dim, kernel_size=1)
        self.fc = nn.Conv2d(3 * head, kernel_conv ** 2, kernel_size=1, bias=False)
        self.dep_conv = nn.Conv2d(
            kernel_conv ** 2 * self.head_dim, out_planes, kernel_size=kernel_conv, padding=kernel_conv // 2,
            stride=stride, groups=self.head_dim, bias=False,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default Conv2d init for the projections and ``fc``; rates 0.5; ``dep_conv`` as one-hot shifts
        (kernel n of every output channel is 1 at offset (n // kernel_conv, n % kernel_conv))."""
        for conv in (self.conv1, self.conv2, self.conv3, self.conv_p, self.fc):
            conv.reset_parameters()
        with torch.no_grad():
            self.rate1.fill_(0.5)
            self.rate2.fill_(0.5)
            kc = self.kernel_conv
            shifts = torch.eye(kc * kc).view(kc * kc, kc, kc)  # (kc^2, kc, kc)
            self.dep_conv.weight.copy_(shifts.expand(self.out_planes, kc * kc, kc, kc))

    def attention_graph(self, height: int, width: int, device: Any) -> Graph:
        """The (cached) graph of the attention branch: one query per output pixel, its reflection-padded window."""
        return unfold_graph(
            height, width, self.kernel_att, stride=self.stride, padding=self.padding_att, dilation=self.dilation,
            pad_mode="reflect", queries="centre", device=device,
        )

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_planes:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            hint = ""
            if isinstance(x, Tensor) and x.dim() == 4 and x.shape[-1] == self.in_planes:
                hint = "; it looks channels last: permute it with x.permute(0, 3, 1, 2)"
            raise ValueError(
                f"ACmix expects input of shape (B, in_planes={self.in_planes}, height, width) (channels first, "
                f"as the official ACmix), got {got}{hint}"
            )
        if x.shape[0] == 0:
            raise ValueError(f"ACmix needs a batch of at least one sample, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"ACmix needs a floating-point input, got {x.dtype}")
        if min(x.shape[2], x.shape[3]) <= self.padding_att:
            raise ValueError(
                f"ACmix reflection-pads by {self.padding_att} (kernel_att={self.kernel_att}, dilation={self.dilation}), "
                f"which needs height and width > {self.padding_att}, got {x.shape[2]}x{x.shape[3]}; "
                "use a smaller kernel_att or a larger input"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        B, _, Y, X = x.shape
        Hd, D, N, s = self.head, self.head_dim, Y * X, self.stride
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)  # (B, C, Y, X) each
        pe = self.conv_p(position_grid(Y, X, dtype=x.dtype, device=x.device))  # (1, D, Y, X)

        # attention branch: dot attention with keys k - pe (the query's own pe term cancels)
        graph = self.attention_graph(*static_shape((Y, X)), x.device)  # one graph per map size, also when compiled
        Yo, Xo = graph.structure.out_height, graph.structure.out_width
        qn = q.reshape(B * Hd, D, Y, X)[:, :, ::s, ::s].reshape(B * Hd, D, Yo * Xo).permute(2, 0, 1)  # (Nq, B*Hd, D)
        kn = (k.reshape(B, Hd, D, Y, X) - pe.reshape(1, 1, D, Y, X)).reshape(B * Hd, D, N).permute(2, 0, 1)  # (N, B*Hd, D)
        vn = v.reshape(B * Hd, D, N).permute(2, 0, 1)  # (N, B*Hd, D)
        att = ops.sparse_attention(graph, qn, kn, vn, scale=D ** -0.5, backend=self.backend)  # (Nq, B*Hd, D)
        out_att = att.permute(1, 2, 0).reshape(B, self.out_planes, Yo, Xo)

        # convolution branch, as the official code
        f = torch.cat([t.reshape(B, Hd, D, N) for t in (q, k, v)], 1)  # (B, 3*Hd, D, N)
        f = self.fc(f)  # (B, kc^2, D, N)
        f = f.permute(0, 2, 1, 3).reshape(B, -1, Y, X)  # (B, D*kc^2, Y, X)
        out_conv = self.dep_conv(f)  # (B, out_planes, Yo, Xo)
        return self.rate1 * out_att + self.rate2 * out_conv

    def extra_repr(self) -> str:
        s = f"{self.in_planes}, {self.out_planes}, kernel_att={self.kernel_att}, head={self.head}"
        s += f", kernel_conv={self.kernel_conv}, stride={self.stride}, dilation={self.dilation}"
        return s + (f", backend={self.backend!r}" if self.backend is not None else "")
