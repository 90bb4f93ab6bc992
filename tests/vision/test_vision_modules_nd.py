"""NeighborhoodAttention1d / 3d, WindowAttention3d and WindowAttention's temporal path against float64 dense
references written from the definitions, and strict loads of the official parameter layouts."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import usable_backends
from test_vision_modules import randomize
from vision_reference import (
    TemporalWindowAttention, VideoSwinWindowAttention3D, dense_module_reference, natten_rpb_dense,
    neighborhood_reference_nd, window_reference_nd,
)

from gatx.vision import (
    NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d, WindowAttention, WindowAttention3d,
    window_graph,
)

TOL = 1e-5


def check(module, x, reference, what, **forward_kw):
    """Output and gradients (input and every parameter, unused ones as zeros) of the float32 module vs
    ``reference(x64)`` in float64."""
    gen = torch.Generator().manual_seed(1)
    x = x.clone().requires_grad_()
    out = module(x, **forward_kw)
    w = torch.randn(out.shape, generator=gen)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad((out * w).sum(), [x, *params], allow_unused=True, materialize_grads=True)
    x64 = x.detach().double().requires_grad_()
    ref = reference(x64)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), [x64, *params], allow_unused=True, materialize_grads=True)
    err = float((out.detach().double() - ref.detach()).abs().max())
    assert err < TOL, f"{what}: output differs from the float64 dense reference by {err:.3g}"
    for n, a, b in zip(["x", *names], grads, ref_grads):
        err, scale = float((a.double() - b).abs().max()), max(1.0, float(b.abs().max()))
        assert err < TOL * scale, f"{what}: grad of {n} differs from the float64 reference by {err:.3g} (max |grad| {scale:.3g})"


NA_CASES = [  # (module, B, shape, k, d, causal, rel_pos_bias)
    (NeighborhoodAttention1d, 2, (13,), 5, 1, False, True),
    (NeighborhoodAttention1d, 1, (14,), 4, 3, False, True),  # even kernel, dilation
    (NeighborhoodAttention1d, 2, (12,), 3, 2, True, True),  # causal: fewer keys at the start
    (NeighborhoodAttention2d, 2, (7, 9), (3, 4), (2, 1), (True, False), True),
    (NeighborhoodAttention3d, 2, (4, 6, 5), 3, (1, 2, 1), False, True),
    (NeighborhoodAttention3d, 1, (5, 5, 7), (3, 3, 2), 1, (True, False, False), True),
    (NeighborhoodAttention3d, 2, (4, 4, 5), (2, 3, 3), 1, True, False),
]


def _axes(v, n):
    return tuple(v) if isinstance(v, tuple) else (v,) * n


@pytest.mark.parametrize("cls,B,shape,k,d,causal,rpb", NA_CASES)
@pytest.mark.parametrize("backend", [None, "torch"])
def test_neighborhood_nd_matches_dense(cls, B, shape, k, d, causal, rpb, backend):
    torch.manual_seed(0)
    m = cls(16, 2, k, d, rel_pos_bias=rpb, backend=backend, is_causal=causal)
    randomize(m, 3)
    n = len(shape)
    mask, index = neighborhood_reference_nd(shape, _axes(k, n), _axes(d, n), _axes(causal, n))
    x = torch.randn(B, *shape, 16, generator=torch.Generator().manual_seed(2))
    check(m, x, lambda x64: dense_module_reference(m, x64, mask, index if rpb else None), f"{cls.__name__} {shape} k={k} d={d} causal={causal}")


WIN3D_CASES = [  # (B, shape, w, s): multiples, per-axis shifts, sides that are not multiples
    (2, (4, 4, 4), (2, 2, 2), 0), (1, (4, 8, 8), (2, 4, 4), (1, 2, 2)), (2, (5, 6, 7), (2, 4, 3), (1, 3, 0)), (1, (3, 5, 4), (4, 3, 3), (2, 1, 1)),
]


@pytest.mark.parametrize("B,shape,w,s", WIN3D_CASES)
@pytest.mark.parametrize("backend", [None, "torch"])
def test_window_attention_3d_matches_dense(B, shape, w, s, backend):
    torch.manual_seed(0)
    m = WindowAttention3d(16, w, 2, shift_size=s, backend=backend)
    randomize(m, 4)
    mask, index = window_reference_nd(shape, _axes(w, 3), _axes(s, 3))
    x = torch.randn(B, *shape, 16, generator=torch.Generator().manual_seed(2))
    check(m, x, lambda x64: dense_module_reference(m, x64, mask, index), f"WindowAttention3d {shape} w={w} s={s}")


@pytest.mark.parametrize("T,backend", [(8, None), (5, "torch"), (1, None)])
def test_temporal_path_matches_dense(T, backend):
    """All T x T pairs, bias temporal_position_bias_table[t_i - t_j + T - 1], no spatial table, no mask."""
    torch.manual_seed(0)
    m = WindowAttention(16, 4, 2, shift_size=1, num_ttokens=T, backend=backend)
    randomize(m, 5)
    x = torch.randn(6, T, 16, generator=torch.Generator().manual_seed(2))
    t = torch.arange(T)
    index = t[:, None] - t[None, :] + T - 1  # (T, T), from the definition
    assert torch.equal(m.t_relative_coords, index.reshape(-1))
    assert torch.equal(window_graph((T,), T).structure.rel_pos_index, index.reshape(-1)), "the graph reads the same rows"
    mask = torch.ones(T, T, dtype=torch.bool)
    check(m, x, lambda x64: dense_module_reference(m, x64, mask, index, table=m.temporal_position_bias_table), f"temporal T={T}", temporal=True)


def test_temporal_weights_load_strictly_and_match():
    """The video adapters' WindowAttention state dict (spatial index + t_relative_coords buffers) loads strictly."""
    torch.manual_seed(0)
    C, H, T = 16, 2, 6
    off = TemporalWindowAttention(C, T, (4, 4), H)
    ours = WindowAttention(C, (4, 4), H, num_ttokens=T)
    ours.load_state_dict(off.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(off.state_dict()) - {"relative_position_index"}
    x = torch.randn(5, T, C, requires_grad=True)
    a, b = ours(x, temporal=True), off(x, temporal=True)
    err = float((a - b).detach().abs().max())
    assert err < TOL, f"temporal path differs from the adapters' formulation by {err:.3g}"
    ga = torch.autograd.grad(a.square().sum(), [x, ours.temporal_position_bias_table, ours.qkv.weight])
    gb = torch.autograd.grad(b.square().sum(), [x, off.temporal_position_bias_table, off.qkv.weight])
    for n, p, r in zip(["x", "temporal table", "qkv.weight"], ga, gb):
        assert float((p - r).abs().max()) < 1e-4 * max(1.0, float(r.abs().max())), f"grad {n} differs from the reference"
    with pytest.raises(RuntimeError, match="temporal_position_bias_table"):
        WindowAttention(C, 4, H).load_state_dict(off.state_dict(), strict=True)  # no temporal path: unexpected keys


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 2, 2), (0, 1, 3)])
def test_video_swin_weights_load_and_match(shift):
    torch.manual_seed(0)
    C, H, w, shape = 16, 2, (2, 4, 4), (4, 8, 8)
    vs = VideoSwinWindowAttention3D(C, w, H, shift)
    ours = WindowAttention3d(C, w, H, shift_size=shift)
    ours.load_state_dict(vs.state_dict(), strict=True)
    x = torch.randn(2, *shape, C, requires_grad=True)
    a, b = ours(x), vs(x)
    err = float((a - b).detach().abs().max())
    assert err < TOL, f"WindowAttention3d differs from Video Swin's formulation by {err:.3g}"
    ga = torch.autograd.grad(a.square().sum(), [x, ours.relative_position_bias_table])
    gb = torch.autograd.grad(b.square().sum(), [x, vs.relative_position_bias_table])
    for n, p, r in zip(["x", "table"], ga, gb):
        assert float((p - r).abs().max()) < 1e-4 * max(1.0, float(r.abs().max())), f"grad {n} differs from Video Swin's"


@pytest.mark.parametrize("cls,shape,k,d", [(NeighborhoodAttention1d, (11,), 5, 2), (NeighborhoodAttention3d, (5, 6, 7), (3, 3, 5), (1, 2, 1))])
def test_natten_rpb_converts_on_load(cls, shape, k, d):
    """NATTEN < 0.20's rpb (H, 2k-1, ...) loads as the table and gives NATTEN's bias at every query (borders, dilation)."""
    torch.manual_seed(0)
    C, H, n = 16, 2, len(shape)
    k3, d3 = _axes(k, n), _axes(d, n)
    ours = cls(C, H, k, d)
    randomize(ours, 6)
    state = {n_: p.detach().clone() for n_, p in ours.state_dict().items() if n_ != "relative_position_bias_table"}
    state["rpb"] = torch.randn(H, *(2 * x - 1 for x in k3)) * 0.5
    ours.load_state_dict(state, strict=True)
    mask, _ = neighborhood_reference_nd(shape, k3, d3, (False,) * n)
    bias = natten_rpb_dense(shape, k3, d3, state["rpb"])  # (N, N, H)
    x = torch.randn(2, *shape, C)
    with torch.no_grad():
        err = float((ours(x).double() - dense_module_reference(ours, x.double(), mask, None, dense_bias=bias)).abs().max())
    assert err < TOL, f"{cls.__name__} with a converted rpb differs from NATTEN's bias by {err:.3g}"


@pytest.mark.parametrize("cls,k", [(NeighborhoodAttention1d, 3), (NeighborhoodAttention2d, 3), (NeighborhoodAttention3d, (3, 3, 3))])
def test_natten_020_state_dict_needs_rel_pos_bias_false(cls, k):
    """NATTEN >= 0.20 modules have no bias: a clear error names rel_pos_bias=False, which then loads strictly."""
    state = {n: p for n, p in cls(16, 2, k, rel_pos_bias=False).state_dict().items()}  # qkv / proj only
    try:  # the real thing when natten is here (constructing its module runs no kernel)
        import natten

        natten_cls = {1: natten.NeighborhoodAttention1D, 2: natten.NeighborhoodAttention2D, 3: natten.NeighborhoodAttention3D}[cls.ndim]
        state = natten_cls(16, 2, k).state_dict()
    except ImportError:
        pass
    with pytest.raises(ValueError, match="rel_pos_bias=False"):
        cls(16, 2, k).load_state_dict(state)
    m = cls(16, 2, k, rel_pos_bias=False)
    m.load_state_dict(state, strict=True)
    assert torch.equal(m.qkv.weight, state["qkv.weight"])
    cls(16, 2, k).load_state_dict(state, strict=False)  # a partial load stays possible


def _modules():
    return [
        (lambda be: NeighborhoodAttention1d(16, 2, 3, 2, backend=be, is_causal=True), (2, 11, 16), {}),
        (lambda be: NeighborhoodAttention3d(16, 2, (3, 3, 2), backend=be, is_causal=(True, False, False)), (2, 4, 5, 6, 16), {}),
        (lambda be: WindowAttention3d(16, (2, 3, 3), 2, shift_size=(1, 1, 2), backend=be), (2, 4, 5, 6, 16), {}),
        (lambda be: WindowAttention(16, 3, 2, backend=be, num_ttokens=5), (7, 5, 16), {"temporal": True}),
    ]


@pytest.mark.parametrize("backend", ["structured"] + [b for b in usable_backends() if b != "torch"])
@pytest.mark.parametrize("which", range(4))
def test_modules_nd_on_every_backend(backend, which):
    """One parameter layout across backends: the same outputs and gradients as the torch backend."""
    make, shape, kw = _modules()[which]
    torch.manual_seed(0)
    ref, mod = make("torch"), make(backend)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(shape, requires_grad=True)
    results = []
    for m in (ref, mod):
        out = m(x, **kw)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *m.parameters()], allow_unused=True, materialize_grads=True)])
    for a, b in zip(*results):
        err = float((a - b).detach().abs().max())
        assert err < 1e-5 * max(1.0, float(b.detach().abs().max())), f"{type(mod).__name__} on {backend}: differs from torch by {err:.3g}"


@pytest.mark.parametrize(
    "make,shape,kw",
    [
        (lambda: NeighborhoodAttention1d(16, 2, 3), (0, 9, 16), {}),
        (lambda: NeighborhoodAttention2d(16, 2, 3), (0, 9, 9, 16), {}),
        (lambda: NeighborhoodAttention3d(16, 2, 3), (0, 3, 9, 9, 16), {}),
        (lambda: WindowAttention(16, 4, 2), (0, 8, 8, 16), {}),
        (lambda: WindowAttention(16, 4, 2, num_ttokens=4), (0, 4, 16), {"temporal": True}),
        (lambda: WindowAttention3d(16, 2, 2), (0, 2, 4, 4, 16), {}),
    ],
)
def test_empty_batch_is_a_clear_error(make, shape, kw):
    with pytest.raises(ValueError, match="empty batch"):
        make()(torch.randn(shape), **kw)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: NeighborhoodAttention1d(16, 2, 3)(torch.randn(2, 9, 9, 16)), "\\(B, L, dim=16\\)"),
        (lambda: NeighborhoodAttention3d(16, 2, 3)(torch.randn(2, 9, 9, 16)), "\\(B, T, height, width, dim=16\\)"),
        (lambda: NeighborhoodAttention3d(16, 2, (3, 3)), "kernel_size"),
        (lambda: NeighborhoodAttention3d(16, 2, 3)(torch.randn(1, 2, 9, 9, 16)), "kernel_size \\* dilation"),
        (lambda: WindowAttention3d(16, (2, 4, 4), 2, shift_size=(2, 0, 0)), "shift_size"),
        (lambda: WindowAttention3d(16, (2, 4), 2), "window_size"),
        (lambda: WindowAttention(16, 4, 2)(torch.randn(3, 4, 16), temporal=True), "num_ttokens=T"),
        (lambda: WindowAttention(16, 4, 2, num_ttokens=4)(torch.randn(3, 5, 16), temporal=True), "T=4"),
        (lambda: WindowAttention(16, 4, 2, num_ttokens=0), "num_ttokens"),
    ],
)
def test_module_nd_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_repr_and_parameters():
    assert repr(NeighborhoodAttention1d(64, 4, 7, is_causal=True)).splitlines()[1] == (
        "  dim=64, num_heads=4, kernel_size=7, dilation=1, is_causal=True")
    assert repr(NeighborhoodAttention3d(96, 3, (3, 7, 7), (1, 2, 2), rel_pos_bias=False, is_causal=(True, False, False))).splitlines()[1] == (
        "  dim=96, num_heads=3, kernel_size=(3, 7, 7), dilation=(1, 2, 2), is_causal=(True, False, False), rel_pos_bias=False")
    assert repr(WindowAttention3d(96, (2, 7, 7), 3, shift_size=(1, 3, 3))) == (
        "WindowAttention3d(\n  dim=96, window_size=(2, 7, 7), num_heads=3, shift_size=(1, 3, 3)\n"
        "  (qkv): Linear(in_features=96, out_features=288, bias=True)\n"
        "  (proj): Linear(in_features=96, out_features=96, bias=True)\n"
        "  (proj_drop): Dropout(p=0.0, inplace=False)\n)"
    )
    assert repr(WindowAttention(96, 7, 3, num_ttokens=8)).splitlines()[1] == "  dim=96, window_size=7, num_heads=3, num_ttokens=8"
    shapes = {n: tuple(p.shape) for n, p in WindowAttention3d(96, (2, 7, 7), 3).named_parameters()}
    assert shapes["relative_position_bias_table"] == (3 * 13 * 13, 3)
    m = WindowAttention(96, 7, 3, num_ttokens=8)
    assert tuple(m.temporal_position_bias_table.shape) == (15, 3)
    assert [n for n, _ in m.named_buffers()] == ["t_relative_coords"] and "t_relative_coords" in m.state_dict()
    assert WindowAttention(96, 7, 3).temporal_position_bias_table is None
    assert WindowAttention(96, 7, 3, num_ttokens=8, use_temporal=False).num_ttokens is None
    assert math.prod(NeighborhoodAttention3d(32, 2, (3, 5, 5)).relative_position_bias_table.shape) == 5 * 9 * 9 * 2
