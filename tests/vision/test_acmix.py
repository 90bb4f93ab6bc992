"""gatx.vision.ACmix against a float64 dense reference written from the paper's / official definitions.

Attention branch, the literal formula: for query i (pixels [::s, ::s]) and the kernel_att^2 window
positions j (spacing dilation) of the reflection-padded k, v, pe:
logit = (q_i * head_dim^-0.5) . (k_j + pe_i - pe_j), softmax over j, out = sum_j a_j v_j.
(The module drops the pe_i term, which cancels in the softmax; matching this reference proves it.)
Convolution branch: fc mixes the 3 * head maps of (B, 3 * head, head_dim, pixels) into kernel_conv^2,
arranged (B, head_dim * kernel_conv^2, Y, X), then a zero-padded grouped convolution written as a sum
over kernel offsets. Output rate1 * att + rate2 * conv.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gatx.vision import ACmix, unfold_graph
from tests.conftest import usable_backends
from tests.vision.vision_reference import assert_module_matches

BACKENDS = usable_backends()


def _reflect(i: int, L: int) -> int:
    i = abs(i)
    return 2 * (L - 1) - i if i > L - 1 else i


def _conv1x1(conv_w, conv_b, t):
    out = torch.einsum("oc,bcyx->boyx", conv_w[:, :, 0, 0], t)
    return out + conv_b[None, :, None, None] if conv_b is not None else out


def acmix_reference(x, p, head, katt, kconv, s, d):
    B, _, Y, X = x.shape
    q, k, v = (_conv1x1(p[f"{n}.weight"], p[f"{n}.bias"], x) for n in ("conv1", "conv2", "conv3"))
    C = q.shape[1]
    D, N = C // head, Y * X
    gx = torch.linspace(-1, 1, X, dtype=x.dtype).expand(Y, X)
    gy = torch.linspace(-1, 1, Y, dtype=x.dtype)[:, None].expand(Y, X)
    pe = _conv1x1(p["conv_p.weight"], p["conv_p.bias"], torch.stack([gx, gy])[None])  # (1, D, Y, X)
    pad = d * (katt - 1) // 2
    ry = [_reflect(i, Y) for i in range(-pad, Y + pad)]
    rx = [_reflect(i, X) for i in range(-pad, X + pad)]
    kp, vp, pep = (t[:, :, ry][:, :, :, rx] for t in (k, v, pe))  # reflection padded
    Yo, Xo = math.ceil(Y / s), math.ceil(X / s)
    qi = q[:, :, ::s, ::s].reshape(B, head, D, Yo, Xo) * D ** -0.5
    pei = pe[:, :, ::s, ::s].reshape(1, 1, D, Yo, Xo)
    logits, vals = [], []
    for a in range(katt):
        for b in range(katt):
            sl = (slice(None), slice(None), slice(a * d, a * d + s * (Yo - 1) + 1, s), slice(b * d, b * d + s * (Xo - 1) + 1, s))
            kj, pej = kp[sl].reshape(B, head, D, Yo, Xo), pep[sl].reshape(1, 1, D, Yo, Xo)
            logits.append((qi * (kj + pei - pej)).sum(2))  # (B, head, Yo, Xo)
            vals.append(vp[sl].reshape(B, head, D, Yo, Xo))
    att = torch.softmax(torch.stack(logits, -1), -1)  # (B, head, Yo, Xo, katt^2)
    out_att = torch.einsum("bhyxj,bhdyxj->bhdyx", att, torch.stack(vals, -1)).reshape(B, C, Yo, Xo)

    f = torch.cat([t.reshape(B, head, D, N) for t in (q, k, v)], 1)  # (B, 3 head, D, N)
    kc2 = kconv * kconv
    g = torch.einsum("mc,bcdn->bdmn", p["fc.weight"][:, :, 0, 0], f).reshape(B, D * kc2, Y, X)
    cp = kconv // 2
    gp = x.new_zeros(B, D * kc2, Y + 2 * cp, X + 2 * cp)
    gp[:, :, cp : cp + Y, cp : cp + X] = g
    gp = gp.view(B, D, kc2, Y + 2 * cp, X + 2 * cp)  # group = head_dim index, kc^2 inputs per group
    w = p["dep_conv.weight"].view(D, C // D, kc2, kconv, kconv)  # output channel o = group * (C // D) + r
    out_conv = 0
    for a in range(kconv):
        for b in range(kconv):
            patch = gp[..., a : a + s * (Yo - 1) + 1 : s, b : b + s * (Xo - 1) + 1 : s]  # (B, D, kc2, Yo, Xo)
            out_conv = out_conv + torch.einsum("grm,bgmyx->bgryx", w[..., a, b], patch)
    out_conv = out_conv.reshape(B, C, Yo, Xo)
    return p["rate1"] * out_att + p["rate2"] * out_conv


class ACmixReference(nn.Module):
    """Parameters under the official names (dep_conv without bias), forward = the dense reference."""

    def __init__(self, cin, cout, katt=7, head=4, kconv=3, stride=1, dilation=1):
        super().__init__()
        self.args = (head, katt, kconv, stride, dilation)
        self.rate1, self.rate2 = nn.Parameter(torch.rand(1)), nn.Parameter(torch.rand(1))
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(cin, cout, 1) for _ in range(3))
        self.conv_p = nn.Conv2d(2, cout // head, 1)
        self.fc = nn.Conv2d(3 * head, kconv * kconv, 1, bias=False)
        self.dep_conv = nn.Conv2d(kconv * kconv * (cout // head), cout, kconv, groups=cout // head, bias=False)
        with torch.no_grad():
            self.dep_conv.weight.normal_()  # not the shift init: every tap matters

    def forward(self, x):
        return acmix_reference(x, dict(self.named_parameters()), *self.args)


CONFIGS = [  # (Y, X, kernel_att, head, kernel_conv, stride, dilation)
    (7, 9, 3, 2, 3, 1, 1), (8, 8, 7, 2, 3, 1, 1), (7, 9, 5, 2, 3, 2, 1), (8, 6, 7, 4, 3, 2, 1),
    (9, 7, 3, 2, 5, 1, 2), (5, 6, 5, 2, 3, 3, 1),
]


def _pair(Y, X, katt, head, kconv, s, d, cin=6, cout=8, backend=None, seed=0):
    torch.manual_seed(seed)
    ref = ACmixReference(cin, cout, katt, head, kconv, s, d).double()
    ours = ACmix(cin, cout, katt, head, kconv, s, d, backend=backend).double()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Y,X,katt,head,kconv,s,d", CONFIGS)
def test_matches_literal_formula_outputs_and_gradients(backend, Y, X, katt, head, kconv, s, d):
    ours, ref = _pair(Y, X, katt, head, kconv, s, d, backend=backend, seed=Y * X + katt)
    x = torch.randn(2, 6, Y, X, dtype=torch.float64, requires_grad=True)
    out = assert_module_matches(ours, ref, x)
    assert out.shape == (2, 8, math.ceil(Y / s), math.ceil(X / s))


def test_border_windows_hold_duplicate_keys():
    """Reflection padding at the border: the graph keeps both copies (a deduplicating graph would differ)."""
    m = ACmix(6, 8, kernel_att=5, head=2)
    g = m.attention_graph(6, 7, "cpu")
    first = g.src[:25]  # query (0, 0)
    assert first.numel() == 25 and first.unique().numel() == 9
    ours, ref = _pair(6, 7, 5, 2, 3, 1, 1)
    x = torch.randn(1, 6, 6, 7, dtype=torch.float64)
    assert (ours(x) - ref(x)).abs()[..., 0, 0].max() < 1e-12


def test_float32_default_backend():
    ours, ref = _pair(8, 8, 7, 2, 3, 1, 1)
    m32 = ACmix(6, 8, 7, 2)
    m32.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    out = m32(x.float())
    assert out.dtype == torch.float32 and (out.double() - ref(x)).abs().max() < 1e-4


def test_default_init_matches_official():
    m = ACmix(8, 16, kernel_att=7, head=4, kernel_conv=3)
    assert m.rate1.shape == (1,) and m.rate1.item() == 0.5 and m.rate2.item() == 0.5
    assert m.dep_conv.bias is None and m.dep_conv.weight.shape == (16, 9, 3, 3) and m.dep_conv.groups == 4
    for n in range(9):
        want = torch.zeros(3, 3)
        want[n // 3, n % 3] = 1.0
        assert torch.equal(m.dep_conv.weight[:, n], want.expand(16, 3, 3)), f"shift kernel {n}"
    assert m.fc.weight.shape == (9, 12, 1, 1) and m.fc.bias is None and m.conv_p.weight.shape == (4, 2, 1, 1)


def test_state_dict_round_trip_strict():
    ours, ref = _pair(7, 9, 5, 2, 3, 2, 1)
    convs = {f"{c}.{p}" for c in ("conv1", "conv2", "conv3", "conv_p") for p in ("weight", "bias")}
    want = {"rate1", "rate2", "fc.weight", "dep_conv.weight"} | convs
    assert set(ours.state_dict()) == want
    back = ACmixReference(6, 8, 5, 2, 3, 2, 1).double()
    back.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 6, 7, 9, dtype=torch.float64)
    assert torch.equal(back(x), ref(x))


def test_graph_is_cached_and_strided():
    m = ACmix(4, 8, kernel_att=3, head=2, stride=2)
    g = m.attention_graph(7, 9, "cpu")
    assert m.attention_graph(7, 9, "cpu") is g and g is unfold_graph(
        7, 9, 3, stride=2, padding=1, pad_mode="reflect", queries="centre"
    )
    assert g.num_dst == 4 * 5 and g.num_src == 63


def test_repr_pinned():
    assert ACmix(64, 64).extra_repr() == "64, 64, kernel_att=7, head=4, kernel_conv=3, stride=1, dilation=1"
    m = ACmix(8, 16, kernel_att=5, head=2, stride=2, backend="torch")
    assert repr(m).startswith("ACmix(\n  8, 16, kernel_att=5, head=2, kernel_conv=3, stride=2, dilation=1, backend='torch'\n")
    assert "(dep_conv): Conv2d(72, 16, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=8, bias=False)" in repr(m)


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 9, 9, 6), "channels last"),  # (B, H, W, C)
        (torch.randn(2, 5, 9, 9), "in_planes=6"),
        (torch.randn(0, 6, 9, 9), "at least one sample"),
        (torch.randn(6, 9, 9), "shape"),
        (torch.randn(1, 6, 3, 9), "height and width > 3"),
        (torch.ones(1, 6, 9, 9, dtype=torch.long), "floating"),
        ([1.0], "got list"),
    ],
)
def test_bad_input(x, match):
    with pytest.raises(ValueError, match=match):
        ACmix(6, 8, kernel_att=7, head=2)(x)


def test_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        ACmix(6, 10, head=4)
    with pytest.raises(ValueError, match="odd"):
        ACmix(6, 8, kernel_att=4, head=2)
    with pytest.raises(ValueError, match="odd"):
        ACmix(6, 8, kernel_conv=2, head=2)
    with pytest.raises(ValueError, match="stride"):
        ACmix(6, 8, head=2, stride=0)


def test_non_contiguous_input():
    """A permuted (channels-last strided) input gives the same result as a contiguous one, to rounding:
    torch's own convolutions pick a layout-specific kernel on some CPUs (4.4e-16 apart in float64 on an
    AVX-512 EPYC, for a bare 1x1 Conv2d too), so the two may differ in the last bit."""
    from gatx.vision import ACmix

    torch.manual_seed(0)
    m = ACmix(16, 16, kernel_att=5, head=2).double()
    x = torch.randn(2, 9, 7, 16, dtype=torch.float64).permute(0, 3, 1, 2)  # (B, C, Y, X), strided
    assert not x.is_contiguous()
    torch.testing.assert_close(m(x), m(x.contiguous()), rtol=1e-13, atol=1e-13)
