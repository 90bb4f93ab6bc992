"""Independent references for the vision tests: NATTEN's and Swin's definitions, written out directly.

Nothing here imports gatx.vision: masks and bias indices come from the reference definitions
(NATTEN's piecewise window / bias start per axis; Swin's roll + window partition + region mask).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ------------------------------------------------------------------ neighborhood attention (NATTEN)
def natten_window_start(i: int, L: int, k: int, d: int) -> int:
    """First key of query i along an axis of length L (NATTEN's piecewise definition)."""
    n = k // 2
    if d == 1:
        if i < n:
            return 0
        if i + n >= L:
            return L - k
        return i - n
    if i - n * d < 0:
        return i % d
    if i + n * d >= L:
        r = i % d
        full = (L // d) * d  # positions covered by complete rounds of d groups
        extra = L - full  # groups that have one more member
        return (full + r - (k - 1) * d) if r < extra else (full + r - k * d)
    return i - n * d


def natten_bias_start(i: int, L: int, k: int, d: int) -> int:
    """First row / column of NATTEN's (2k-1, 2k-1) bias used by query i along an axis."""
    n = k // 2
    if d == 1:
        if i < n:
            return k - 1 - i
        if i + n >= L:
            return L - 1 - i
        return n
    if i - n * d < 0:
        return k - 1 - i // d
    if i + n * d >= L:
        return (L - i - 1) // d
    return n


def neighborhood_reference(Y: int, X: int, k: int, d: int) -> tuple[Tensor, Tensor]:
    """(N, N) bool mask [query, key] and (N, N) row of the ((2k-1)^2, H) table (-1 where masked)."""
    N = Y * X
    mask = torch.zeros(N, N, dtype=torch.bool)
    index = torch.full((N, N), -1, dtype=torch.int64)
    for y in range(Y):
        sy, py = natten_window_start(y, Y, k, d), natten_bias_start(y, Y, k, d)
        for x in range(X):
            sx, px = natten_window_start(x, X, k, d), natten_bias_start(x, X, k, d)
            for i in range(k):
                for j in range(k):
                    key = (sy + i * d) * X + (sx + j * d)
                    mask[y * X + x, key] = True
                    index[y * X + x, key] = (py + i) * (2 * k - 1) + (px + j)
    return mask, index


# ------------------------------------------------------------------ (shifted) windows (Swin)
def swin_relative_position_index(w: int) -> Tensor:
    """Swin's (w*w, w*w) relative position index: (dy + w - 1) * (2w - 1) + (dx + w - 1), d = query - key."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, w*w)
    rel = (coords[:, :, None] - coords[:, None, :]) + (w - 1)  # (2, w*w, w*w)
    return rel[0] * (2 * w - 1) + rel[1]


def swin_region_labels(Yp: int, Xp: int, w: int, s: int) -> Tensor:
    """Swin's img_mask region labels (in rolled coordinates) on a Yp x Xp map."""
    img = torch.zeros(Yp, Xp, dtype=torch.int64)
    if s > 0:
        slices = (slice(0, -w), slice(-w, -s), slice(-s, None))
        cnt = 0
        for hs in slices:
            for ws in slices:
                img[hs, ws] = cnt
                cnt += 1
    return img


def window_reference(Y: int, X: int, w: int, s: int) -> tuple[Tensor, Tensor]:
    """(N, N) mask and table-row index of Swin's (shifted) window attention.

    The map is padded at the bottom / right to a multiple of w, rolled by -s, cut into windows; a
    pair attends iff it shares a window and a region label and the key is not padding.
    """
    Yp, Xp = math.ceil(Y / w) * w, math.ceil(X / w) * w
    labels = swin_region_labels(Yp, Xp, w, s)
    rpi = swin_relative_position_index(w)
    N = Y * X
    mask = torch.zeros(N, N, dtype=torch.bool)
    index = torch.full((N, N), -1, dtype=torch.int64)
    for wy in range(Yp // w):
        for wx in range(Xp // w):
            toks = []  # (within-window slot, original node or None, label)
            for i in range(w):
                for j in range(w):
                    ry, rx = wy * w + i, wx * w + j
                    oy, ox = (ry + s) % Yp, (rx + s) % Xp  # rolled position -> original position
                    node = oy * X + ox if oy < Y and ox < X else None
                    toks.append((i * w + j, node, int(labels[ry, rx])))
            for a, qa, la in toks:
                for b, kb, lb in toks:
                    if qa is not None and kb is not None and la == lb:
                        mask[qa, kb] = True
                        index[qa, kb] = rpi[a, b]
    return mask, index


# ------------------------------------------------------------------ dense float64 module reference
def dense_module_reference(module: nn.Module, x: Tensor, mask: Tensor, index: Tensor | None) -> Tensor:
    """A qkv / proj attention module's forward as full float64 attention under a boolean mask."""
    B, Y, X, C = x.shape
    H = module.num_heads
    D = C // H
    W, b = module.qkv.weight.double(), module.qkv.bias
    qkv = F.linear(x.double(), W, None if b is None else b.double())  # (B, Y, X, 3C)
    q, k, v = qkv.view(B, Y * X, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each
    s = (q @ k.transpose(-1, -2)) * module.scale  # (B, H, N, N)
    table = module.relative_position_bias_table
    if table is not None and index is not None:
        s = s + table.double()[index.clamp(min=0)].permute(2, 0, 1)[None]  # (1, H, N, N)
    s = s.masked_fill(~mask, float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, Y, X, C)
    return F.linear(o, module.proj.weight.double(), module.proj.bias.double())


# ------------------------------------------------------------------ Swin's own formulation
class SwinWindowAttention(nn.Module):
    """Swin's WindowAttention plus the block's roll / partition / mask / reverse, on (B, Y, X, C).

    A direct reimplementation of the reference forward (shift mask of -100), for weight loading.
    Y and X must be multiples of the window.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int, shift_size: int = 0, Y: int = 0, X: int = 0):
        super().__init__()
        w = window_size
        self.window_size, self.num_heads, self.shift_size = w, num_heads, shift_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * w - 1) ** 2, num_heads) * 0.5)
        self.register_buffer("relative_position_index", swin_relative_position_index(w))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        attn_mask = None
        if shift_size > 0:
            labels = self._partition(swin_region_labels(Y, X, w, shift_size)[None, :, :, None].float())
            labels = labels.view(-1, w * w)  # (nW, w*w)
            diff = labels[:, None, :] - labels[:, :, None]
            attn_mask = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
        self.register_buffer("attn_mask", attn_mask, persistent=False)

    def _partition(self, x: Tensor) -> Tensor:
        B, Y, X, C = x.shape
        w = self.window_size
        return x.view(B, Y // w, w, X // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w, w, C)

    def forward(self, x: Tensor) -> Tensor:
        B, Y, X, C = x.shape
        w, h, s = self.window_size, self.num_heads, self.shift_size
        if s:
            x = torch.roll(x, (-s, -s), (1, 2))
        xw = self._partition(x).view(-1, w * w, C)
        Bw = xw.shape[0]
        qkv = self.qkv(xw).reshape(Bw, w * w, 3, h, C // h).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * self.scale) @ qkv[1].transpose(-2, -1)
        rpb = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(w * w, w * w, -1)
        attn = attn + rpb.permute(2, 0, 1)[None]
        if self.attn_mask is not None:
            nW = self.attn_mask.shape[0]
            attn = (attn.view(Bw // nW, nW, h, w * w, w * w) + self.attn_mask[None, :, None]).view(-1, h, w * w, w * w)
        o = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(Bw, w * w, C)
        o = self.proj(o).view(B, Y // w, X // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Y, X, C)
        if s:
            o = torch.roll(o, (s, s), (1, 2))
        return o


class NattenStyleAttention2d(nn.Module):
    """NATTEN's NeighborhoodAttention2D parameter layout (qkv, rpb (H, 2k-1, 2k-1), proj) and semantics."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int, dilation: int = 1):
        super().__init__()
        self.num_heads, self.kernel_size, self.dilation = num_heads, kernel_size, dilation
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rpb = nn.Parameter(torch.randn(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1) * 0.5)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, Y, X, C = x.shape
        h, k, d = self.num_heads, self.kernel_size, self.dilation
        q, kk, v = self.qkv(x).view(B, Y, X, 3, h, C // h).permute(3, 0, 4, 1, 2, 5)  # (B, h, Y, X, D)
        out = torch.empty_like(q)
        for y in range(Y):
            sy, py = natten_window_start(y, Y, k, d), natten_bias_start(y, Y, k, d)
            ys = torch.arange(k) * d + sy
            for x_ in range(X):
                sx, px = natten_window_start(x_, X, k, d), natten_bias_start(x_, X, k, d)
                xs = torch.arange(k) * d + sx
                keys = kk[:, :, ys][:, :, :, xs]  # (B, h, k, k, D)
                vals = v[:, :, ys][:, :, :, xs]
                a = (q[:, :, y, x_, None, None, :] * self.scale * keys).sum(-1) + self.rpb[:, py : py + k, px : px + k]
                a = a.flatten(2).softmax(-1).view(B, h, k, k)
                out[:, :, y, x_] = (a[..., None] * vals).sum((2, 3))
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(B, Y, X, C))
