"""BiLevelRoutingAttention against a float64 dense reference written from BiFormer's definition."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import usable_backends
from torch import nn

from gatx.vision import BiLevelRoutingAttention

TOL = 1e-5
BACKENDS = [None, "blocks", *usable_backends()]


class ReferenceBRA(nn.Module):
    """Bi-level routing attention from the paper's definition, with the official parameter names.

    Routing: region means of q / k via a (R, N) averaging matrix, scaled affinity, top-k. Token
    attention: a dense (B, N, N) mask (pixel p may see pixel j iff j's region is routed from p's
    region), masked softmax over all pixel pairs per head. No gatx code is used.
    """

    def __init__(self, dim, num_heads, n_win, qk_dim, qk_scale, topk, side_dwconv, auto_pad):
        super().__init__()
        self.num_heads, self.n_win, self.qk_dim, self.topk = num_heads, n_win, qk_dim, topk
        self.scale = qk_scale or qk_dim ** -0.5
        self.qkv = nn.Module()
        self.qkv.qkv = nn.Linear(dim, 2 * qk_dim + dim)
        self.wo = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)

    def forward(self, x):
        B, Y0, X0, C = x.shape
        n = self.n_win
        Y, X = -(-Y0 // n) * n, -(-X0 // n) * n
        x = F.pad(x, (0, 0, 0, X - X0, 0, Y - Y0))
        N, R, H, Ck = Y * X, n * n, self.num_heads, self.qk_dim
        q, k, v = self.qkv.qkv(x).reshape(B, N, -1).split([Ck, Ck, C], -1)
        ys, xs = torch.meshgrid(torch.arange(Y), torch.arange(X), indexing="ij")
        region = ((ys // (Y // n)) * n + xs // (X // n)).reshape(N)  # (N,)
        avg = (region[None, :] == torch.arange(R)[:, None]).to(x.dtype)
        avg = avg / avg.sum(1, keepdim=True)  # (R, N)
        affinity = (avg @ q.detach()) * self.scale @ (avg @ k.detach()).transpose(1, 2)  # (B, R, R)
        top = affinity.topk(self.topk + 1 if self.topk < R else self.topk, -1).values
        idx = affinity.topk(self.topk, -1).indices  # (B, R, topk)
        routed = torch.zeros(B, R, R, dtype=torch.bool).scatter_(2, idx, True)
        allowed = routed[:, region][:, :, region]  # (B, N, N): query pixel, key pixel
        qh, kh, vh = (t.reshape(B, N, H, -1).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        s = (qh @ kh.transpose(-1, -2)) * self.scale
        a = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)
        out = (a @ vh).transpose(1, 2).reshape(B, Y, X, C)
        out = out + self.lepe(v.reshape(B, Y, X, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)[:, :Y0, :X0]
        margin = (top[..., self.topk - 1] - top[..., -1]).min() if self.topk < R else torch.tensor(1.0)
        return out, idx, margin


def randomize(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


CASES = [  # (B, Y, X, dim, heads, n_win, qk_dim, topk, side_dwconv, auto_pad)
    (2, 8, 8, 16, 2, 2, None, 1, 3, False),  # topk = 1, batch 2
    (3, 12, 9, 16, 4, 3, None, 4, 3, False),  # rectangular regions, topk > 1
    (2, 8, 12, 16, 2, 4, 24, 3, 5, False),  # qk_dim != dim, LePE kernel 5
    (2, 10, 7, 8, 2, 3, None, 2, 3, True),  # n_win divides neither side: auto_pad
    (1, 6, 6, 8, 1, 2, None, 4, 3, False),  # topk = all regions (dense)
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_dense_reference(case, backend):
    B, Y, X, dim, heads, n_win, qk_dim, topk, side, pad = case
    ref = ReferenceBRA(dim, heads, n_win, qk_dim or dim, None, topk, side, pad).double()
    randomize(ref, 7)
    m = BiLevelRoutingAttention(dim, heads, n_win, qk_dim, topk=topk, side_dwconv=side, auto_pad=pad, backend=backend)
    m.load_state_dict({k: v.float() for k, v in ref.state_dict().items()}, strict=True)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, Y, X, dim, generator=gen).requires_grad_()
    w = torch.randn(B, Y, X, dim, generator=gen)
    out = m(x)
    grads = torch.autograd.grad((out * w).sum(), [x, *m.parameters()])
    x64 = x.detach().double().requires_grad_()
    want, idx, margin = ref(x64)
    assert float(margin) > 1e-4, f"routing near a tie (margin {float(margin):.2g}): float32 may route differently"
    if B > 1:
        assert any(not torch.equal(idx[0], idx[b]) for b in range(1, B)), "samples should route differently"
    ref_grads = torch.autograd.grad((want * w.double()).sum(), [x64, *ref.parameters()])
    err = float((out.detach().double() - want.detach()).abs().max())
    assert err < TOL, f"{case} {backend}: output differs from the float64 reference by {err:.3g}"
    names = ["x"] + [n for n, _ in m.named_parameters()]
    ref_names = ["x"] + [n for n, _ in ref.named_parameters()]
    assert names == ref_names
    for n, a, b in zip(names, grads, ref_grads):
        err, scale = float((a.double() - b).abs().max()), max(1.0, float(b.abs().max()))
        assert err < TOL * scale, f"{case} {backend}: grad of {n} differs by {err:.3g} (max |grad| {scale:.3g})"


def test_routes_follow_the_definition_and_carry_no_gradient():
    torch.manual_seed(0)
    m = BiLevelRoutingAttention(8, 2, n_win=2, topk=2)
    q, k = torch.randn(2, 4, 6, 8, requires_grad=True), torch.randn(2, 4, 6, 8, requires_grad=True)
    idx = m.routes(q, k)
    assert idx.shape == (2, 4, 2) and not idx.requires_grad
    q_r = q.detach().reshape(2, 2, 2, 2, 3, 8).mean((2, 4)).reshape(2, 4, 8)  # region (j, i) = rows j, cols i
    k_r = k.detach().reshape(2, 2, 2, 2, 3, 8).mean((2, 4)).reshape(2, 4, 8)
    want = (q_r @ k_r.transpose(1, 2)).topk(2, -1).indices  # the positive scale does not change the order
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)


def test_state_dict_round_trip_and_repr():
    ref = ReferenceBRA(16, 2, 2, 16, None, 2, 3, False)
    m = BiLevelRoutingAttention(16, num_heads=2, n_win=2, topk=2)
    assert set(m.state_dict()) == {"qkv.qkv.weight", "qkv.qkv.bias", "wo.weight", "wo.bias", "lepe.weight", "lepe.bias"}
    m.load_state_dict(ref.state_dict(), strict=True)
    ref2 = ReferenceBRA(16, 2, 2, 16, None, 2, 3, False)
    ref2.load_state_dict(m.state_dict(), strict=True)
    for (n, a), (_, b) in zip(ref.state_dict().items(), ref2.state_dict().items()):
        assert torch.equal(a, b), n
    assert repr(m) == (
        "BiLevelRoutingAttention(\n  dim=16, num_heads=2, n_win=2, qk_dim=16, topk=2, side_dwconv=3\n"
        "  (qkv): _QKVLinear(\n    (qkv): Linear(in_features=16, out_features=48, bias=True)\n  )\n"
        "  (wo): Linear(in_features=16, out_features=16, bias=True)\n"
        "  (lepe): Conv2d(16, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=16)\n)"
    )
    m2 = BiLevelRoutingAttention(8, 2, 7, qk_dim=4, qk_scale=0.5, param_attention="qkv", side_dwconv=0, auto_pad=True,
                                 backend="torch")
    assert m2.extra_repr() == (
        "dim=8, num_heads=2, n_win=7, qk_dim=4, topk=4, side_dwconv=0, qk_scale=0.5, param_attention='qkv', "
        "auto_pad=True, backend='torch'"
    )
    assert set(m2.state_dict()) == {"qkv.qkv.weight", "qkv.qkv.bias"}


def test_qkv_mode_and_no_lepe_match_reference():
    """param_attention='qkv' (no output projection) and side_dwconv=0 (no LePE) as in BiFormer."""
    ref = ReferenceBRA(8, 2, 2, 8, 0.3, 2, 3, False).double()
    randomize(ref, 2)
    with torch.no_grad():
        ref.wo.weight.copy_(torch.eye(8))
        ref.wo.bias.zero_()
        ref.lepe.weight.zero_()
        ref.lepe.bias.zero_()
    m = BiLevelRoutingAttention(8, 2, 2, qk_scale=0.3, topk=2, param_attention="qkv", side_dwconv=0).double()
    m.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith("qkv.")}, strict=True)
    x = torch.randn(2, 4, 4, 8, dtype=torch.float64)
    with torch.no_grad():
        want, _, margin = ref(x)
        err = float((m(x) - want).abs().max())
    assert float(margin) > 1e-6
    assert err < 1e-10, err


@pytest.mark.parametrize("kwargs,match", [
    (dict(kv_downsample_mode="ada_avgpool"), "kv_downsample_mode='ada_avgpool'"),
    (dict(param_routing=True, diff_routing=True), "param_routing=True"),
    (dict(diff_routing=True), "diff_routing=True"),
    (dict(soft_routing=True), "soft_routing=True"),
    (dict(param_attention="none"), "param_attention"),
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(qk_dim=10, num_heads=4), "divisible by num_heads"),
    (dict(topk=5, n_win=2), "at most the number of regions"),
    (dict(topk=0), "topk must be an int >= 1"),
    (dict(side_dwconv=4), "side_dwconv must be odd"),
])
def test_unsupported_and_invalid_arguments(kwargs, match):
    args = dict(dim=16, num_heads=2, n_win=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BiLevelRoutingAttention(**args)


@pytest.mark.parametrize("shape,match", [
    ((0, 4, 4, 8), "non-empty input"),
    ((2, 0, 4, 8), "non-empty input"),
    ((2, 4, 4, 7), "dim=8"),
    ((4, 4, 8), "dim=8"),
    ((1, 5, 4, 8), "divisible by n_win=2, got 5x4; pad the input or pass auto_pad=True"),
])
def test_bad_inputs(shape, match):
    m = BiLevelRoutingAttention(8, 2, n_win=2, topk=1)
    with pytest.raises(ValueError, match=match):
        m(torch.randn(shape))
