"""Independent references for the vision tests: NATTEN's and Swin's definitions, written out directly.

Nothing here imports gatx.vision: masks and bias indices come from the reference definitions
(NATTEN's piecewise window / bias start per axis; Swin's roll + window partition + region mask).
"""
from __future__ import annotations

import itertools
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
_MODULE_TABLE = object()


def dense_module_reference(
    module: nn.Module, x: Tensor, mask: Tensor, index: Tensor | None, table: Tensor | None | object = _MODULE_TABLE,
    dense_bias: Tensor | None = None,
) -> Tensor:
    """A qkv / proj attention module's forward on (B, *spatial, C) as full float64 attention under a
    boolean (N, N) mask, plus ``table[index]`` (the module's relative_position_bias_table unless
    ``table`` is given) or an explicit (N, N, H) ``dense_bias``."""
    B, *S, C = x.shape
    N, H = math.prod(S), module.num_heads
    D = C // H
    W, b = module.qkv.weight.double(), module.qkv.bias
    qkv = F.linear(x.double(), W, None if b is None else b.double())  # (B, *S, 3C)
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # (B, H, N, D) each
    s = (q @ k.transpose(-1, -2)) * module.scale  # (B, H, N, N)
    table = module.relative_position_bias_table if table is _MODULE_TABLE else table
    if table is not None and index is not None:
        s = s + table.double()[index.clamp(min=0)].permute(2, 0, 1)[None]  # (1, H, N, N)
    if dense_bias is not None:
        s = s + dense_bias.double().permute(2, 0, 1)[None]
    s = s.masked_fill(~mask, float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, *S, C)
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


# ------------------------------------------------------------------ n-d neighborhoods (NATTEN na1d / na2d / na3d)
def natten_keys(i: int, L: int, k: int, d: int, causal: bool) -> list[int]:
    """Keys of query i along an axis: NATTEN's clamped window, or its causal window (the k positions
    i, i - d, ..., i - (k-1) d that exist: fewer than k near the start of the axis)."""
    if causal:
        return [i - j * d for j in range(k - 1, -1, -1) if i - j * d >= 0]
    start = natten_window_start(i, L, k, d)
    return [start + j * d for j in range(k)]


def _ravel(coords, shape) -> int:
    flat = 0
    for c, n in zip(coords, shape):
        flat = flat * n + c
    return flat


def neighborhood_reference_nd(shape, k, d, causal) -> tuple[Tensor, Tensor]:
    """(N, N) bool mask [query, key] and (N, N) table row (-1 where masked) of an n-d neighborhood.

    Per axis NATTEN's keys (:func:`natten_keys`); the table row flattens ``(key - query) / d + k - 1``
    row-major with radix ``2k - 1`` (NATTEN's relative position convention).
    """
    n, N = len(shape), math.prod(shape)
    keys = [[natten_keys(i, L, k[a], d[a], causal[a]) for i in range(L)] for a, L in enumerate(shape)]
    mask = torch.zeros(N, N, dtype=torch.bool)
    index = torch.full((N, N), -1, dtype=torch.int64)
    for q in itertools.product(*(range(L) for L in shape)):
        for key in itertools.product(*(keys[a][q[a]] for a in range(n))):
            qi, ki = _ravel(q, shape), _ravel(key, shape)
            mask[qi, ki] = True
            index[qi, ki] = _ravel([(key[a] - q[a]) // d[a] + k[a] - 1 for a in range(n)], [2 * x - 1 for x in k])
    return mask, index


def natten_rpb_dense(shape, k, d, rpb: Tensor) -> Tensor:
    """(N, N, H) bias of NATTEN (< 0.20) from its ``rpb`` (H, 2k_0 - 1, ...): query q, window slot i per
    axis reads ``rpb[:, b_0 + i_0, b_1 + i_1, ...]`` with ``b = natten_bias_start`` (non-causal only)."""
    n, N = len(shape), math.prod(shape)
    out = torch.zeros(N, N, rpb.shape[0], dtype=rpb.dtype)
    for q in itertools.product(*(range(L) for L in shape)):
        starts = [natten_window_start(q[a], shape[a], k[a], d[a]) for a in range(n)]
        bstarts = [natten_bias_start(q[a], shape[a], k[a], d[a]) for a in range(n)]
        for slots in itertools.product(*(range(x) for x in k)):
            key = [starts[a] + slots[a] * d[a] for a in range(n)]
            out[_ravel(q, shape), _ravel(key, shape)] = rpb[(slice(None), *(b + i for b, i in zip(bstarts, slots)))]
    return out


# ------------------------------------------------------------------ Video Swin's (shifted) 3-D windows
def video_swin_relative_position_index(w) -> Tensor:
    """Video Swin's (prod w, prod w) index: (query - key + w - 1) per axis, flattened with radix 2w - 1."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(x) for x in w), indexing="ij")).flatten(1)  # (n, prod w)
    rel = coords[:, :, None] - coords[:, None, :] + torch.tensor(w)[:, None, None] - 1
    index = torch.zeros(rel.shape[1:], dtype=torch.int64)
    for a, x in enumerate(w):
        index = index * (2 * x - 1) + rel[a]
    return index


def video_swin_labels(padded, w, s) -> Tensor:
    """Video Swin's img_mask on the padded grid: per axis the slices (:-w), (-w:-s), (-s:), counted over nested loops."""
    img = torch.zeros(padded, dtype=torch.int64)
    per_axis = [(slice(-wa), slice(-wa, -sa), slice(-sa, None)) for wa, sa in zip(w, s)]
    for cnt, sl in enumerate(itertools.product(*per_axis)):
        img[sl] = cnt
    return img


def window_reference_nd(shape, w, s) -> tuple[Tensor, Tensor]:
    """(N, N) mask and table row of (Video) Swin's (shifted) window attention on a 1- to 3-d grid.

    The grid is padded at the end of each axis to a multiple of the window, rolled by -s, cut into
    windows; a pair attends iff it shares a window and an img_mask label (only when some shift > 0)
    and neither token is padding. The row is Video Swin's relative position index in the window.
    """
    padded = [math.ceil(L / x) * x for L, x in zip(shape, w)]
    labels = video_swin_labels(padded, w, s) if any(s) else torch.zeros(padded, dtype=torch.int64)
    rpi = video_swin_relative_position_index(w)
    tokens = []  # (window id, slot in window, original node or None, label) per rolled position
    for r in itertools.product(*(range(P) for P in padded)):
        orig = [(ra + sa) % P for ra, sa, P in zip(r, s, padded)]
        node = _ravel(orig, shape) if all(o < L for o, L in zip(orig, shape)) else None
        win = tuple(ra // x for ra, x in zip(r, w))
        tokens.append((win, _ravel([ra % x for ra, x in zip(r, w)], w), node, int(labels[r])))
    N = math.prod(shape)
    mask = torch.zeros(N, N, dtype=torch.bool)
    index = torch.full((N, N), -1, dtype=torch.int64)
    by_window: dict = {}
    for t in tokens:
        by_window.setdefault(t[0], []).append(t)
    for group in by_window.values():
        for _, a, qa, la in group:
            for _, b, kb, lb in group:
                if qa is not None and kb is not None and la == lb:
                    mask[qa, kb] = True
                    index[qa, kb] = rpi[a, b]
    return mask, index


class VideoSwinWindowAttention3D(nn.Module):
    """Video Swin's WindowAttention3D plus its block's roll / partition / mask (-100) / reverse on
    (B, T, Y, X, C), with the official parameter and buffer names. Sides must be multiples of the window."""

    def __init__(self, dim: int, window_size, num_heads: int, shift_size=(0, 0, 0)):
        super().__init__()
        self.window_size, self.num_heads, self.shift_size = tuple(window_size), num_heads, tuple(shift_size)
        self.scale = (dim // num_heads) ** -0.5
        rows = math.prod(2 * x - 1 for x in window_size)
        self.relative_position_bias_table = nn.Parameter(torch.randn(rows, num_heads) * 0.5)
        self.register_buffer("relative_position_index", video_swin_relative_position_index(self.window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _partition(self, x: Tensor) -> Tensor:
        B, T, Y, X, C = x.shape
        wt, wy, wx = self.window_size
        x = x.view(B, T // wt, wt, Y // wy, wy, X // wx, wx, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(-1, wt * wy * wx, C)

    def forward(self, x: Tensor) -> Tensor:
        B, T, Y, X, C = x.shape
        s, h, M = self.shift_size, self.num_heads, math.prod(self.window_size)
        if any(s):
            x = torch.roll(x, tuple(-a for a in s), (1, 2, 3))
        xw = self._partition(x)  # (B*nW, M, C)
        qkv = self.qkv(xw).reshape(xw.shape[0], M, 3, h, C // h).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * self.scale) @ qkv[1].transpose(-2, -1)
        rpb = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].view(M, M, -1)
        attn = attn + rpb.permute(2, 0, 1)[None]
        if any(s):
            labels = self._partition(video_swin_labels((T, Y, X), self.window_size, s)[None, ..., None].float())[..., 0]
            diff = labels[:, None, :] - labels[:, :, None]  # (nW, M, M)
            mask = diff.masked_fill(diff != 0, -100.0)
            nW = mask.shape[0]
            attn = (attn.view(-1, nW, h, M, M) + mask[None, :, None]).view(-1, h, M, M)
        o = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(-1, M, C)
        wt, wy, wx = self.window_size
        o = self.proj(o).view(B, T // wt, Y // wy, X // wx, wt, wy, wx, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
        o = o.reshape(B, T, Y, X, C)
        if any(s):
            o = torch.roll(o, s, (1, 2, 3))
        return o


class TemporalWindowAttention(nn.Module):
    """The Swin video adapters' WindowAttention(dim, num_ttokens, window_size, num_heads, use_temporal=True)
    from its definition: Swin's spatial table and index buffer, plus ``temporal_position_bias_table``
    (2T-1, H) and the persistent buffer ``t_relative_coords`` = t_i - t_j + T - 1. Only the temporal
    path's forward (input (B', T, C)) is written out here."""

    def __init__(self, dim: int, num_ttokens: int, window_size, num_heads: int, use_temporal: bool = True):
        super().__init__()
        self.num_heads, self.num_ttokens = num_heads, num_ttokens
        self.scale = (dim // num_heads) ** -0.5
        wy, wx = window_size
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * wy - 1) * (2 * wx - 1), num_heads) * 0.5)
        self.register_buffer("relative_position_index", video_swin_relative_position_index((wy, wx)))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if use_temporal:
            T = num_ttokens
            self.temporal_position_bias_table = nn.Parameter(torch.randn(2 * T - 1, num_heads) * 0.5)
            t = torch.arange(T)
            self.register_buffer("t_relative_coords", (t[:, None] - t[None, :] + T - 1).view(-1))

    def forward(self, x: Tensor, temporal: bool = True) -> Tensor:
        assert temporal, "only the temporal path is written out"
        B_, T, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(B_, T, 3, h, C // h).permute(2, 0, 3, 1, 4)  # [q | k | v], head-major
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.temporal_position_bias_table[self.t_relative_coords].view(T, T, -1).permute(2, 0, 1)
        attn = (attn + bias[None]).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B_, T, C))


def assert_module_matches(ours: nn.Module, ref: nn.Module, x: Tensor, out_tol: float = 1e-12,
                          grad_tol: float = 1e-11) -> Tensor:
    """ours(x) equals ref(x), and so do the gradients of x and of every parameter (matched by name)
    under a random output weighting; returns ours(x). x must require grad."""
    out, want = ours(x), ref(x)
    assert (out - want).abs().max() < out_tol, f"max diff {(out - want).abs().max():.3e}"
    w = torch.randn_like(want)
    names = [n for n, _ in ours.named_parameters()]
    got = torch.autograd.grad((out * w).sum(), [x] + list(ours.parameters()), retain_graph=True)
    exp = torch.autograd.grad((want * w).sum(), [x] + [dict(ref.named_parameters())[n] for n in names])
    for name, a, b in zip(["x"] + names, got, exp):
        assert (a - b).abs().max() < grad_tol, f"grad {name}: max diff {(a - b).abs().max():.3e}"
    return out
