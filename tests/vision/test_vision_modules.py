"""NeighborhoodAttention2d and WindowAttention against float64 dense references, Swin and NATTEN weights."""
from __future__ import annotations

import pytest
import torch
from conftest import usable_backends
from vision_reference import (
    NattenStyleAttention2d, SwinWindowAttention, dense_module_reference, neighborhood_reference, window_reference,
)

from gatx.vision import NeighborhoodAttention2d, WindowAttention

TOL = 1e-5


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights of a trained-looking scale (bias table included) so every term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 2 and p.shape[0] != p.shape[1] * 3 else 0.2))


def check_against(module, x, mask, index, what):
    """Output and gradients (input and every parameter) of the float32 module vs the float64 reference."""
    gen = torch.Generator().manual_seed(1)
    x = x.clone().requires_grad_()
    out = module(x)
    w = torch.randn(out.shape, generator=gen)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad((out * w).sum(), [x, *params])
    x64 = x.detach().double().requires_grad_()
    ref = dense_module_reference(module, x64, mask, index)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), [x64, *params])
    err = float((out.detach().double() - ref.detach()).abs().max())
    assert err < TOL, f"{what}: output differs from the float64 dense reference by {err:.3g}"
    names = ["x"] + [n for n, _ in module.named_parameters()]
    for n, a, b in zip(names, grads, ref_grads):
        err, scale = float((a.double() - b).abs().max()), max(1.0, float(b.abs().max()))
        assert err < TOL * scale, (  # parameter grads sum over every token: compare relative to their size
            f"{what}: grad of {n} differs from the float64 reference by {err:.3g} (max |grad| {scale:.3g})"
        )


NA_CASES = [  # (B, Y, X, k, d, rel_pos_bias)
    (2, 7, 7, 7, 1, True),  # the whole map is one window; borders everywhere
    (1, 8, 9, 3, 1, True),  # even / odd sides
    (2, 13, 10, 5, 1, True),  # tiles overlap at the end
    (2, 11, 12, 3, 2, True),  # dilation, remainder groups
    (1, 9, 9, 3, 3, False),  # dilation = 3, no bias
]


@pytest.mark.parametrize("B,Y,X,k,d,rpb", NA_CASES)
@pytest.mark.parametrize("backend", [None, "torch"])
def test_neighborhood_attention_matches_dense(B, Y, X, k, d, rpb, backend):
    torch.manual_seed(0)
    m = NeighborhoodAttention2d(16, 2, k, d, rel_pos_bias=rpb, backend=backend)
    randomize(m, 3)
    mask, index = neighborhood_reference(Y, X, k, d)
    x = torch.randn(B, Y, X, 16, generator=torch.Generator().manual_seed(2))
    check_against(m, x, mask, index if rpb else None, f"NA {Y}x{X} k={k} d={d} backend={backend}")


WIN_CASES = [  # (B, Y, X, w, s)
    (2, 8, 8, 4, 0), (2, 8, 8, 4, 2), (1, 12, 8, 4, 3), (2, 10, 7, 4, 3), (1, 9, 11, 3, 1), (2, 5, 6, 7, 0),
]


@pytest.mark.parametrize("B,Y,X,w,s", WIN_CASES)
@pytest.mark.parametrize("backend", [None, "torch"])
def test_window_attention_matches_dense(B, Y, X, w, s, backend):
    torch.manual_seed(0)
    m = WindowAttention(16, w, 2, shift_size=s, backend=backend)
    randomize(m, 4)
    mask, index = window_reference(Y, X, w, s)
    x = torch.randn(B, Y, X, 16, generator=torch.Generator().manual_seed(2))
    check_against(m, x, mask, index, f"window {Y}x{X} w={w} s={s} backend={backend}")


@pytest.mark.parametrize("shift", [0, 2, 3])
def test_swin_weights_load_and_match_swin(shift):
    """A Swin-style state dict (relative_position_index buffer included) loads strictly; same outputs."""
    torch.manual_seed(0)
    Y, X, w, C, H = 12, 8, 4, 16, 2
    swin = SwinWindowAttention(C, w, H, shift, Y, X)
    ours = WindowAttention(C, w, H, shift_size=shift)
    ours.load_state_dict(swin.state_dict(), strict=True)
    assert torch.equal(ours.relative_position_bias_table, swin.relative_position_bias_table)
    x = torch.randn(2, Y, X, C, requires_grad=True)
    a, b = ours(x), swin(x)
    err = float((a - b).detach().abs().max())
    assert err < TOL, f"gatx WindowAttention differs from Swin's formulation by {err:.3g}"
    ga = torch.autograd.grad(a.square().sum(), [x, ours.relative_position_bias_table])
    gb = torch.autograd.grad(b.square().sum(), [x, swin.relative_position_bias_table])
    for n, p, r in zip(["x", "table"], ga, gb):
        assert float((p - r).abs().max()) < 1e-4 * max(1.0, float(r.abs().max())), f"grad {n} differs from Swin's"


@pytest.mark.parametrize("k,d", [(3, 1), (5, 2)])
def test_natten_weights_load_and_match_natten(k, d):
    """NATTEN's rpb (H, 2k-1, 2k-1) converts to the table on load; outputs follow NATTEN's semantics."""
    torch.manual_seed(0)
    C, H, Y, X = 8, 2, 11, 10
    nat = NattenStyleAttention2d(C, H, k, d)
    ours = NeighborhoodAttention2d(C, H, k, d)
    ours.load_state_dict(nat.state_dict(), strict=True)
    x = torch.randn(2, Y, X, C)
    with torch.no_grad():
        err = float((ours(x) - nat(x)).abs().max())
    assert err < TOL, f"gatx NA differs from a NATTEN-semantics reference by {err:.3g}"


def test_attention_dropout_trains_and_eval_is_deterministic():
    m = NeighborhoodAttention2d(16, 2, 3, attn_drop=0.5)
    x = torch.randn(2, 8, 8, 16)
    m.train()
    a, b = m(x), m(x)
    assert not torch.equal(a, b), "attention dropout must act in training mode"
    m.eval()
    ref = NeighborhoodAttention2d(16, 2, 3)
    ref.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert float((m(x) - ref(x)).abs().max()) < 1e-6, "eval mode must not drop"


def test_repr():
    assert repr(NeighborhoodAttention2d(96, 3, 7)) == (
        "NeighborhoodAttention2d(\n  dim=96, num_heads=3, kernel_size=7, dilation=1\n"
        "  (qkv): Linear(in_features=96, out_features=288, bias=True)\n"
        "  (proj): Linear(in_features=96, out_features=96, bias=True)\n"
        "  (proj_drop): Dropout(p=0.0, inplace=False)\n)"
    )
    s = repr(NeighborhoodAttention2d(32, 4, 5, 2, rel_pos_bias=False, attn_drop=0.1))
    assert s.splitlines()[1] == "  dim=32, num_heads=4, kernel_size=5, dilation=2, rel_pos_bias=False, attn_drop=0.1"
    assert repr(WindowAttention(96, 7, 3, shift_size=3)).splitlines()[1] == "  dim=96, window_size=7, num_heads=3, shift_size=3"


def test_parameter_names_and_shapes():
    m = WindowAttention(96, 7, 3)
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == {
        "relative_position_bias_table": (169, 3), "qkv.weight": (288, 96), "qkv.bias": (288,),
        "proj.weight": (96, 96), "proj.bias": (96,),
    }
    assert NeighborhoodAttention2d(96, 3, 7, rel_pos_bias=False).relative_position_bias_table is None


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: NeighborhoodAttention2d(10, 3, 3), "divisible"),
        (lambda: NeighborhoodAttention2d(12, 3, 0), "kernel_size"),
        (lambda: NeighborhoodAttention2d(12, 3, (3, 3, 3)), "kernel_size"),
        (lambda: NeighborhoodAttention2d(12, 3, 3, is_causal=(True,)), "is_causal"),
        (lambda: WindowAttention(12, 4, 3, shift_size=4), "shift_size"),
        (lambda: NeighborhoodAttention2d(12, 3, 3)(torch.randn(2, 12, 8, 8)), "channels last"),
        (lambda: NeighborhoodAttention2d(12, 3, 3)(torch.randn(8, 8, 12)), "channels last"),
        (lambda: NeighborhoodAttention2d(12, 3, 5)(torch.randn(1, 4, 8, 12)), "kernel_size \\* dilation"),
    ],
)
def test_module_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("make", [lambda: NeighborhoodAttention2d(16, 2, 3), lambda: WindowAttention(16, 4, 2, 2)])
def test_modules_take_the_structured_path(make, monkeypatch):
    """By default the modules run on the dense-batched structured backend, not the per-edge path."""
    from gatx.backends import structured

    calls = []
    real = structured.sparse_attention
    monkeypatch.setattr(structured, "sparse_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    make()(torch.randn(2, 8, 8, 16))
    assert calls == [1]


@pytest.mark.parametrize("backend", ["structured"] + usable_backends())
@pytest.mark.parametrize("kind", ["na", "window"])
def test_modules_on_every_backend(backend, kind):
    """One parameter layout across backends: same outputs and gradients as the torch reference."""
    torch.manual_seed(0)
    make = (lambda be: NeighborhoodAttention2d(16, 2, 3, 2, backend=be)) if kind == "na" else (
        lambda be: WindowAttention(16, 4, 2, shift_size=2, backend=be))
    ref, mod = make("torch"), make(backend)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, 10, 16, requires_grad=True)
    outs = []
    for m in (ref, mod):
        out = m(x)
        outs.append([out, *torch.autograd.grad(out.square().sum(), [x, *m.parameters()])])
    for a, b in zip(*outs):
        err = float((a - b).detach().abs().max())
        assert err < 1e-5 * max(1.0, float(b.detach().abs().max())), f"{kind} on {backend}: differs from torch by {err:.3g}"
