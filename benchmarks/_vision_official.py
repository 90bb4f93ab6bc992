"""The official formulations of the vision attention family, written from their definitions.

Used by ``bench_vision_family.py`` as baselines. Each is an ``nn.Module`` with the official module's
parameter (and buffer) names, so it loads the gatx module's state dict with ``strict=True``, and it
computes the layer the way the official code does (unfold / gather / dense), whose time and memory are
what gatx is compared with. Definitions: /work/shared/vision-family.md and the papers (VOLO, BiFormer,
ACmix, the Swin video adapters' temporal path); no code copied.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ACmixUnfold", "BiFormerGather", "TemporalDense", "VoloUnfoldFold"]


class VoloUnfoldFold(nn.Module):
    """VOLO's OutlookAttention as its code computes it: unfold the padded v, generated logits, fold."""

    def __init__(self, dim: int, heads: int, k: int, padding: int, stride: int) -> None:
        super().__init__()
        self.heads, self.k, self.padding, self.stride = heads, k, padding, stride
        self.scale = (dim // heads) ** -0.5
        self.v = nn.Linear(dim, dim, bias=False)
        self.attn = nn.Linear(dim, k ** 4 * heads)
        self.proj = nn.Linear(dim, dim)
        self.unfold = nn.Unfold(k, padding=padding, stride=stride)
        self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True)

    def forward(self, x: Any) -> Any:
        B, Y, X, C = x.shape
        h, k2, s = self.heads, self.k ** 2, self.stride
        L = math.ceil(Y / s) * math.ceil(X / s)
        v = self.unfold(self.v(x).permute(0, 3, 1, 2))  # (B, C*k2, L): k2 copies of v
        v = v.reshape(B, h, C // h, k2, L).permute(0, 1, 4, 3, 2)  # (B, h, L, k2, D)
        centre = self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, Yo, Xo, C)
        a = self.attn(centre).reshape(B, L, h, k2, k2).permute(0, 2, 1, 3, 4)  # (B, h, L, i, j)
        a = (a * self.scale).softmax(-1)
        out = (a @ v).permute(0, 1, 4, 3, 2).reshape(B, C * k2, L)  # (B, C*k2, L)
        out = F.fold(out, (Y, X), self.k, padding=self.padding, stride=s)  # (B, C, Y, X)
        return self.proj(out.permute(0, 2, 3, 1))


class _QKV(nn.Module):
    """BiFormer's ``qkv`` submodule: one linear to q, k (qk_dim each) and v (dim), in that order."""

    def __init__(self, dim: int, qk_dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)


class BiFormerGather(nn.Module):
    """BiFormer's bi-level routing attention as its code computes it: route, gather k / v, dense attention."""

    def __init__(self, dim: int, heads: int, n_win: int, topk: int, dwconv: int, index_select: bool = False) -> None:
        super().__init__()
        self.dim, self.heads, self.n_win, self.topk, self.index_select = dim, heads, n_win, topk, index_select
        self.scale = dim ** -0.5  # qk_dim = dim: one scale over the full qk_dim
        self.qkv = _QKV(dim, dim)
        self.wo = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, dwconv, padding=dwconv // 2, groups=dim)

    def forward(self, x: Any) -> Any:
        B, Y, X, C = x.shape
        n, H, K = self.n_win, self.heads, self.topk
        h, w = Y // n, X // n
        R, P = n * n, h * w
        t = self.qkv.qkv(x).view(B, n, h, n, w, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, R, P, -1)  # (B, R, P, 3C)
        q, kv = t[..., :C], t[..., C:]  # (B, R, P, C), (B, R, P, 2C)
        with torch.no_grad():  # hard routing: no gradient
            aff = (q.mean(2) * self.scale) @ kv[..., :C].mean(2).transpose(1, 2)  # (B, R, R)
            idx = aff.topk(K, -1).indices  # (B, R, topk)
        if self.index_select:  # backward: an index_add into kv
            rows = (idx + torch.arange(0, B * R, R, device=x.device).view(B, 1, 1)).reshape(-1)  # (B*R*topk,)
            sel = kv.reshape(B * R, P, 2 * C).index_select(0, rows)  # (B*R*topk, P, 2C)
        else:  # KVGather: gather from an expanded view; backward allocates (B, R, R, P, 2C)
            sel = torch.gather(kv.unsqueeze(1).expand(B, R, R, P, 2 * C), 2,
                               idx.view(B, R, K, 1, 1).expand(B, R, K, P, 2 * C))  # (B, R, topk, P, 2C)
        k, v = sel.reshape(B * R, K * P, 2 * C).split([C, C], -1)  # (B*R, topk*P, C) each
        qh = q.reshape(B * R, P, H, -1).transpose(1, 2)  # (B*R, H, P, D)
        kh = k.reshape(B * R, K * P, H, -1).permute(0, 2, 3, 1)  # (B*R, H, D, topk*P)
        vh = v.reshape(B * R, K * P, H, -1).transpose(1, 2)  # (B*R, H, topk*P, D)
        out = ((qh * self.scale) @ kh).softmax(-1) @ vh  # (B*R, H, P, D)
        out = out.transpose(1, 2).reshape(B, n, n, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Y, X, C)
        v_map = t[..., 2 * C:].reshape(B, n, n, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, Y, X)
        return self.wo(out + self.lepe(v_map).permute(0, 2, 3, 1))


class ACmixUnfold(nn.Module):
    """ACmix as its official code computes it: unfold of reflection-padded k, v, pe; the literal logit."""

    def __init__(self, dim: int, heads: int, katt: int, kconv: int = 3) -> None:
        super().__init__()
        self.heads, self.katt, D = heads, katt, dim // heads
        self.rate1, self.rate2 = nn.Parameter(torch.empty(1)), nn.Parameter(torch.empty(1))
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(dim, dim, 1) for _ in range(3))
        self.conv_p = nn.Conv2d(2, D, 1)
        self.fc = nn.Conv2d(3 * heads, kconv * kconv, 1, bias=False)
        self.dep_conv = nn.Conv2d(kconv * kconv * D, dim, kconv, padding=kconv // 2, groups=D, bias=False)
        self.pad = nn.ReflectionPad2d((katt - 1) // 2)
        self.unfold = nn.Unfold(katt)

    def forward(self, x: Any) -> Any:
        B, _, Y, X = x.shape
        hd, k2 = self.heads, self.katt ** 2
        q, k, v = self.conv1(x), self.conv2(x), self.conv3(x)  # (B, C, Y, X)
        C = q.shape[1]
        D = C // hd
        grid = torch.stack([torch.linspace(-1, 1, X, dtype=x.dtype, device=x.device).expand(Y, X),
                            torch.linspace(-1, 1, Y, dtype=x.dtype, device=x.device)[:, None].expand(Y, X)])
        pe = self.conv_p(grid[None])  # (1, D, Y, X)
        qa = q.view(B * hd, D, Y, X) * D ** -0.5
        ku = self.unfold(self.pad(k.view(B * hd, D, Y, X))).view(B * hd, D, k2, Y, X)  # k2 copies of k
        peu = self.unfold(self.pad(pe)).view(1, D, k2, Y, X)
        att = (qa.unsqueeze(2) * (ku + pe.unsqueeze(2) - peu)).sum(1).softmax(1)  # (B*hd, k2, Y, X)
        vu = self.unfold(self.pad(v.view(B * hd, D, Y, X))).view(B * hd, D, k2, Y, X)
        out_att = (att.unsqueeze(1) * vu).sum(2).view(B, C, Y, X)
        f = self.fc(torch.cat([t.view(B, hd, D, Y * X) for t in (q, k, v)], 1))  # (B, kc^2, D, N)
        out_conv = self.dep_conv(f.permute(0, 2, 1, 3).reshape(B, -1, Y, X))
        return self.rate1 * out_att + self.rate2 * out_conv


class TemporalDense(nn.Module):
    """The temporal path of the Swin video adapters' WindowAttention: dense attention over the T tokens."""

    def __init__(self, dim: int, heads: int, T: int, window: int, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.scale, self.sdpa = heads, (dim // heads) ** -0.5, sdpa
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))  # spatial, unused here
        self.temporal_position_bias_table = nn.Parameter(torch.zeros(2 * T - 1, heads))
        t = torch.arange(T)
        self.register_buffer("t_relative_coords", (t[:, None] - t[None, :] + T - 1).reshape(-1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Any) -> Any:
        B_, T, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B', h, T, D) each
        bias = self.temporal_position_bias_table[self.t_relative_coords].view(T, T, -1).permute(2, 0, 1)  # (h, T, T)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)).softmax(-1) @ v  # (B', h, T, D)
        return self.proj(out.transpose(1, 2).reshape(B_, T, C))
