"""gatx.vision.OutlookAttention (VOLO) against a float64 dense reference written from the definition.

Reference: values projected then zero padded; centre tokens = mean of each stride x stride cell (partial
cells at the bottom / right average their valid pixels); per window and head a (k*k, k*k) logit matrix
(row = output position, column = source position), scaled, softmax over the columns; every window's
outputs added into the pixels its positions cover (padding dropped); proj. Windows are cut by slicing
a padded tensor (no F.unfold / F.fold, no graph).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gatx.vision import OutlookAttention
from tests.conftest import usable_backends
from tests.vision.vision_reference import assert_module_matches

BACKENDS = usable_backends(score="given")


def volo_reference(x, params, heads, k, pad, s, scale):
    B, Y, X, C = x.shape
    D = C // heads
    v = x @ params["v.weight"].t() + (params["v.bias"] if "v.bias" in params else 0)
    Yo, Xo = math.ceil(Y / s), math.ceil(X / s)
    centre = torch.stack(
        [torch.stack([x[:, a * s : a * s + s, b * s : b * s + s].mean((1, 2)) for b in range(Xo)], 1) for a in range(Yo)], 1
    )  # (B, Yo, Xo, C)
    logits = (centre @ params["attn.weight"].t() + params["attn.bias"]).view(B, Yo, Xo, heads, k * k, k * k)
    attn = torch.softmax(logits * scale, -1)
    PY, PX = max((Yo - 1) * s + k, pad + Y), max((Xo - 1) * s + k, pad + X)
    vp = x.new_zeros(B, PY, PX, C)
    vp[:, pad : pad + Y, pad : pad + X] = v

    def cut(t, a, b):  # position (a, b) of every window: (B, Yo, Xo, heads, D)
        return t[:, a : a + s * (Yo - 1) + 1 : s, b : b + s * (Xo - 1) + 1 : s].reshape(B, Yo, Xo, heads, D)

    vwin = torch.stack([cut(vp, j // k, j % k) for j in range(k * k)], -2)  # (B, Yo, Xo, heads, k*k, D)
    owin = attn @ vwin  # (B, Yo, Xo, heads, k*k (i), D)
    outp = x.new_zeros(B, PY, PX, C)
    for i in range(k * k):
        a, b = i // k, i % k
        outp[:, a : a + s * (Yo - 1) + 1 : s, b : b + s * (Xo - 1) + 1 : s] += owin[..., i, :].reshape(B, Yo, Xo, C)
    out = outp[:, pad : pad + Y, pad : pad + X]
    return out @ params["proj.weight"].t() + params["proj.bias"]


class VOLOReference(nn.Module):
    """Parameters under VOLO's names, forward = the dense reference."""

    def __init__(self, dim, heads, k, pad, s, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.heads, self.k, self.pad, self.s = heads, k, pad, s
        self.scale = qk_scale or (dim // heads) ** -0.5
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn = nn.Linear(dim, k ** 4 * heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return volo_reference(x, dict(self.named_parameters()), self.heads, self.k, self.pad, self.s, self.scale)


CONFIGS = [  # (Y, X, k, padding, stride, qkv_bias)
    (7, 9, 3, 1, 1, False), (7, 9, 3, 1, 2, True), (7, 9, 5, 2, 2, False), (6, 7, 5, 2, 1, True),
    (9, 6, 3, 0, 3, False), (8, 6, 2, 0, 2, True),
]


def _pair(Y, X, k, pad, s, qkv_bias, dim=12, heads=3, qk_scale=None, seed=0, backend=None):
    torch.manual_seed(seed)
    ref = VOLOReference(dim, heads, k, pad, s, qkv_bias, qk_scale).double()
    ours = OutlookAttention(dim, heads, k, pad, s, qkv_bias=qkv_bias, qk_scale=qk_scale, backend=backend).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Y,X,k,pad,s,qkv_bias", CONFIGS)
def test_matches_reference_outputs_and_gradients(backend, Y, X, k, pad, s, qkv_bias):
    ours, ref = _pair(Y, X, k, pad, s, qkv_bias, backend=backend, seed=Y * X + k)
    x = torch.randn(2, Y, X, 12, dtype=torch.float64, requires_grad=True)
    out = assert_module_matches(ours, ref, x)
    assert out.shape == (2, Y, X, 12)


def test_qk_scale_and_float32_default_backend():
    ours, ref = _pair(7, 9, 3, 1, 2, False, qk_scale=0.7)
    x = torch.randn(3, 7, 9, 12, dtype=torch.float64)
    assert (ours(x) - ref(x)).abs().max() < 1e-12
    ours32 = OutlookAttention(12, 3, 3, 1, 2, qk_scale=0.7)
    ours32.load_state_dict(ref.state_dict())
    out32 = ours32(x.float())
    assert out32.dtype == torch.float32 and (out32.double() - ref(x)).abs().max() < 1e-5


def test_state_dict_round_trip_strict():
    ours, ref = _pair(7, 9, 3, 1, 2, True)
    assert set(ours.state_dict()) == {"v.weight", "v.bias", "attn.weight", "attn.bias", "proj.weight", "proj.bias"}
    back = VOLOReference(12, 3, 3, 1, 2, qkv_bias=True).double()
    back.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 7, 9, 12, dtype=torch.float64)
    assert torch.equal(back(x), ref(x))
    no_bias = OutlookAttention(12, 3)
    assert "v.bias" not in no_bias.state_dict() and no_bias.attn.weight.shape == (81 * 3, 12)


def test_repr_pinned():
    assert repr(OutlookAttention(192, 6, 3, 1, 2)) == (
        "OutlookAttention(\n  dim=192, num_heads=6, kernel_size=3, padding=1, stride=2\n"
        "  (v): Linear(in_features=192, out_features=192, bias=False)\n"
        "  (attn): Linear(in_features=192, out_features=486, bias=True)\n"
        "  (proj): Linear(in_features=192, out_features=192, bias=True)\n"
        "  (proj_drop): Dropout(p=0.0, inplace=False)\n)"
    )
    m = OutlookAttention(8, 2, 5, 2, qkv_bias=True, qk_scale=0.5, attn_drop=0.1, backend="torch")
    assert m.extra_repr() == (
        "dim=8, num_heads=2, kernel_size=5, padding=2, stride=1, qkv_bias=True, qk_scale=0.5, attn_drop=0.1, "
        "backend='torch'"
    )


def _uniform_counter(p):
    """dim = heads = 1, v = 1 everywhere (zero padded), uniform logits, proj = identity: a pixel's output
    is (kept edges among the 81 of its 9 virtual queries) / (9 * (1 - p))."""
    m = OutlookAttention(1, 1, 3, 1, 1, qkv_bias=True, attn_drop=p)
    with torch.no_grad():
        for t in (m.v.weight, m.attn.weight, m.attn.bias, m.proj.bias):
            t.zero_()
        m.v.bias.fill_(1.0)
        m.proj.weight.fill_(1.0)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_drop_masks_edges(backend):
    p = 0.3
    m = _uniform_counter(p)
    m.backend = backend
    x = torch.randn(2, 30, 30, 1)
    m.eval()
    ev = m(x)
    inner = (slice(None), slice(2, -2), slice(2, -2))  # pixels whose 9 windows hold no padding
    assert torch.allclose(ev[inner], torch.full_like(ev[inner], 9.0))  # eval: no dropout
    assert torch.equal(m(x), ev)
    m.train()
    torch.manual_seed(0)
    tr = m(x)[inner] * 9 * (1 - p)  # kept-edge counts of inner pixels
    assert (tr - tr.round()).abs().max() < 1e-3 and tr.min() >= 0 and tr.max() <= 81
    frac = tr.sum() / (tr.numel() * 81)
    assert abs(frac - (1 - p)) < 0.01, f"kept fraction {frac:.4f}, expected {1 - p}"
    torch.manual_seed(0)
    assert torch.equal(m(x)[inner] * 9 * (1 - p), tr)  # same seed, same mask
    assert not torch.equal(m(x)[inner] * 9 * (1 - p), tr)


def test_attn_drop_is_unbiased_and_one_drops_all():
    torch.manual_seed(1)
    m = OutlookAttention(8, 2, 3, 1, 2, attn_drop=0.5).double()
    x = torch.randn(1, 5, 6, 8, dtype=torch.float64)
    m.eval()
    ev = m(x)
    m.train()
    draws = torch.stack([m(x) for _ in range(200)])
    se = draws.std(0) / 200 ** 0.5
    assert ((draws.mean(0) - ev).abs() <= 5 * se + 1e-9).all(), "train-mode mean differs from eval"
    m1 = OutlookAttention(8, 2, 3, 1, 2, attn_drop=1.0).double()
    assert torch.allclose(m1(x), m1.proj.bias.expand(1, 5, 6, 8))  # every weight dropped: proj(0)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 12, 7, 9), "channels last"),  # (B, C, H, W)
        (torch.randn(0, 7, 9, 12), "non-empty"),
        (torch.randn(2, 7, 9, 10), "dim=12"),
        (torch.randn(7, 9, 12), "shape"),
        (torch.ones(1, 7, 9, 12, dtype=torch.long), "floating"),
        ("image", "got str"),
    ],
)
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        OutlookAttention(12, 3)(x)


def test_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        OutlookAttention(10, 3)
    with pytest.raises(ValueError, match="attn_drop"):
        OutlookAttention(12, 3, attn_drop=1.5)
    with pytest.raises(ValueError, match=r"ceil\(side / stride\)"):
        OutlookAttention(12, 3, kernel_size=3, padding=0)(torch.randn(1, 7, 9, 12))
