"""1-D and 3-D grid graphs, causal neighborhoods, 3-D shifted windows: against NATTEN's and Video Swin's
definitions, NATTEN itself (an external reference, when it runs here), and the generic kernel path."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import usable_backends
from hypothesis import given, settings
from hypothesis import strategies as st
from test_vision_grid import check_order, dense_of
from vision_reference import neighborhood_reference_nd, window_reference_nd

from gatx import ops
from gatx.vision import neighborhood_graph, window_graph

NA_CASES = [  # (shape, k, d, causal): 1-D and 3-D, borders, dilation with remainders, even kernels, causal axes
    ((13,), (3,), (1,), (False,)),
    ((13,), (4,), (2,), (False,)),
    ((11,), (3,), (2,), (True,)),
    ((9,), (5,), (1,), (True,)),
    ((7, 9), (3, 4), (2, 1), (True, False)),
    ((4, 5, 6), (3, 3, 3), (1, 1, 2), (False, False, False)),
    ((5, 6, 7), (3, 3, 2), (1, 2, 1), (True, False, False)),
    ((6, 4, 5), (2, 3, 5), (2, 1, 1), (True, True, False)),
]


@pytest.mark.parametrize("shape,k,d,causal", NA_CASES)
def test_neighborhood_graph_nd_matches_definition(shape, k, d, causal):
    g = neighborhood_graph(shape, k, d, is_causal=causal)
    mask, index = neighborhood_reference_nd(shape, k, d, causal)
    got_mask, got_index = dense_of(g)
    assert torch.equal(got_mask, mask), f"{int((got_mask != mask).sum())} pairs differ from NATTEN's neighborhoods"
    assert torch.equal(got_index, index), f"{int((got_index != index).sum())} bias rows differ"
    check_order(g)
    s = g.structure
    assert (s.shape, s.size, s.dilation, s.is_causal, s.table_size) == (shape, k, d, causal, math.prod(2 * x - 1 for x in k))
    for a in range(len(shape)):  # causal axes only look back: offsets in [-(k-1), 0]
        lo, hi = int(s.offsets[:, a].min()), int(s.offsets[:, a].max())
        assert (lo, hi) == ((-(k[a] - 1), 0) if causal[a] else (lo, hi)) and -(k[a] - 1) <= lo <= hi <= k[a] - 1


def test_causal_start_of_axis_sees_fewer_keys():
    """As NATTEN: at the start of a causal axis a query has fewer than k keys (not a window moved forward)."""
    g = neighborhood_graph((10,), 4, is_causal=True)
    assert g.in_degrees().tolist() == [1, 2, 3] + [4] * 7
    g = neighborhood_graph((10,), 3, 2, is_causal=True)
    assert g.in_degrees().tolist() == [1, 1, 2, 2] + [3] * 6
    assert g.src[g.dst == 5].tolist() == [1, 3, 5]


WINDOW_CASES = [  # (shape, w, s): 1-D, 3-D, per-axis shifts (some 0), not multiples, window larger than a side
    ((10,), (4,), (0,)), ((10,), (4,), (3,)), ((8,), (8,), (0,)),
    ((4, 8, 8), (2, 4, 4), (1, 2, 2)), ((4, 6, 6), (2, 3, 3), (0, 1, 2)), ((5, 7, 6), (2, 4, 3), (1, 3, 0)),
    ((3, 5, 5), (4, 3, 3), (2, 1, 1)),
]


@pytest.mark.parametrize("shape,w,s", WINDOW_CASES)
def test_window_graph_nd_matches_video_swin(shape, w, s):
    g = window_graph(shape, w, s)
    mask, index = window_reference_nd(shape, w, s)
    got_mask, got_index = dense_of(g)
    assert torch.equal(got_mask, mask), f"{int((got_mask != mask).sum())} pairs differ from Video Swin's roll + mask"
    assert torch.equal(got_index, index), f"{int((got_index != index).sum())} bias rows differ from Video Swin's index"
    check_order(g)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), k=st.integers(1, 4), d=st.integers(1, 2),
    causal=st.lists(st.booleans(), min_size=3, max_size=3), w=st.integers(1, 4), s=st.integers(0, 3),
)
def test_grid_nd_property(shape, k, d, causal, w, s):
    shape, n = tuple(shape), len(shape)
    causal = tuple(causal[:n])
    if min(shape) >= k * d:
        g = neighborhood_graph(shape, k, d, is_causal=causal)
        mask, index = neighborhood_reference_nd(shape, (k,) * n, (d,) * n, causal)
        assert torch.equal(dense_of(g)[0], mask) and torch.equal(dense_of(g)[1], index)
    else:
        with pytest.raises(ValueError, match="kernel_size \\* dilation"):
            neighborhood_graph(shape, k, d, is_causal=causal)
    sw = tuple((s + a) % w for a in range(n))
    g = window_graph(shape, w, sw)
    mask, index = window_reference_nd(shape, (w,) * n, sw)
    assert torch.equal(dense_of(g)[0], mask) and torch.equal(dense_of(g)[1], index)


def test_call_forms_agree():
    """The 2-D form, its keywords, and the shape-tuple form give the same (cached) graph."""
    a = neighborhood_graph(9, 10, 3, 2)
    assert neighborhood_graph((9, 10), 3, 2) is a
    assert neighborhood_graph(9, 10, kernel_size=3, dilation=2) is a
    assert neighborhood_graph(height=9, width=10, kernel_size=(3, 3), dilation=(2, 2)) is a
    assert neighborhood_graph((9, 10), kernel_size=3, dilation=2, is_causal=False) is a
    w = window_graph(8, 8, 4, 2)
    assert window_graph((8, 8), 4, 2) is w and window_graph(8, 8, window_size=4, shift=2) is w
    assert window_graph((8, 8), window_size=(4, 4), shift=(2, 2)) is w


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: neighborhood_graph((4, 5, 6, 7), 3), ValueError, "1, 2 or 3 axes"),
        (lambda: neighborhood_graph((), 3), ValueError, "1, 2 or 3 axes"),
        (lambda: neighborhood_graph((8, 0), 3), ValueError, "shape\\[1\\]|width"),
        (lambda: neighborhood_graph((8, 8, 8), (3, 3)), ValueError, "one value per axis"),
        (lambda: neighborhood_graph((8,), 3, is_causal=(True, False)), ValueError, "is_causal"),
        (lambda: neighborhood_graph((8,), 3, is_causal=1), ValueError, "is_causal"),
        (lambda: neighborhood_graph((8, 8, 8), (3, 5, 3), (1, 2, 1)), ValueError, "kernel_size \\* dilation"),
        (lambda: neighborhood_graph((8, 8)), TypeError, "kernel_size"),
        (lambda: neighborhood_graph(16, kernel_size=3), TypeError, "shape tuple"),
        (lambda: neighborhood_graph((8, 8), 3, 1, 1), TypeError, "positional"),
        (lambda: neighborhood_graph((8, 8), 3, kernel_size=3), TypeError, "multiple values"),
        (lambda: neighborhood_graph((8, 8), 3, height=8), TypeError, "not both"),
        (lambda: window_graph((4, 8, 8), (2, 4, 4), (2, 1, 1)), ValueError, "shift"),
        (lambda: window_graph((4, 8, 8), (2, 4), 0), ValueError, "one value per axis"),
        (lambda: window_graph((4, 8, 8), 2, -1), ValueError, "shift"),
    ],
)
def test_builder_nd_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_structure_repr_and_table_size():
    s = neighborhood_graph((4, 6, 6), (3, 5, 5), is_causal=(True, False, False)).structure
    assert repr(s) == "GridStructure(neighborhood, 4x6x6, kernel_size=(3, 5, 5), dilation=1, is_causal=(True, False, False))"
    assert s.table_size == 5 * 9 * 9 and s.offsets.shape == (s.rel_pos_index.numel(), 3)
    assert repr(window_graph((16,), 4, 1).structure) == "GridStructure(window, 16, window_size=4, shift=1)"
    assert window_graph((4, 8, 8), (2, 4, 4)).structure.table_size == 3 * 7 * 7


def test_long_1d_sequence_builds_in_linear_memory():
    """Axis tables are O(L): a 1-D neighborhood over 2**15 positions builds without (L, L) matrices."""
    L = 1 << 15
    g = neighborhood_graph((L,), 7, is_causal=True)
    assert g.num_edges == 7 * L - 21 and g.structure.tiling.pos_edge.numel() < 40 * L


# ---------------------------------------------------------------- the kernel on n-d graphs, every backend
ND_GRAPHS = {
    "na 1d k4 d2": lambda: neighborhood_graph((23,), 4, 2),
    "na 1d causal k5": lambda: neighborhood_graph((21,), 5, is_causal=True),
    "na 3d": lambda: neighborhood_graph((4, 6, 5), (3, 3, 3), (1, 2, 1)),
    "na 3d causal": lambda: neighborhood_graph((5, 5, 6), (3, 3, 2), is_causal=(True, False, False)),
    "win 1d s2": lambda: window_graph((11,), 4, 2),
    "win 3d": lambda: window_graph((4, 4, 4), (2, 2, 2)),
    "win 3d shifted": lambda: window_graph((5, 6, 6), (2, 4, 3), (1, 2, 1)),
}


def _run(g, backend, attention, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(g.num_dst, 3, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    b = torch.randn(g.num_edges, 3, generator=gen, dtype=torch.float64).requires_grad_(bias == "grad")
    res = ops.sparse_attention(g, q, k, v, bias=None if bias == "none" else b, return_attention=attention, backend=backend)
    out, attn = res if attention else (res, None)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() + (0 if attn is None else attn.square().sum())
    leaves = [q, k, v] + ([b] if bias == "grad" else [])
    return [out] + ([attn] if attention else []) + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("name", list(ND_GRAPHS))
@pytest.mark.parametrize("backend,attention,bias", [
    ("structured", True, "grad"), ("structured", False, "const"), ("structured", False, "none"),
] + [(b, True, "grad") for b in usable_backends() if b != "torch"])
def test_nd_graphs_on_every_backend(name, backend, attention, bias):
    """n-d grid graphs run on the structured dense path (both its calls) and the per-edge backends alike."""
    g = ND_GRAPHS[name]()
    got, ref = _run(g, backend, attention, bias), _run(g, "torch", attention, bias)
    for i, (a, b) in enumerate(zip(got, ref)):
        err = float((a - b).detach().abs().max())
        assert err < 1e-10, f"{name} on {backend}: result {i} differs from the torch backend by {err:.3g}"


# ---------------------------------------------------------------- NATTEN itself as an external reference
NATTEN_CASES = [  # (shape, k, d, causal); natten's first call per configuration costs seconds on CPU
    ((11, 9), (3, 4), (2, 1), (True, False)),  # causal + dilation (fewer keys at the start), even clamped kernel
    ((4, 5, 6), (2, 3, 3), (1, 1, 2), (True, False, False)),  # 3-D, one causal axis, dilation with a remainder
]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("shape,k,d,causal", NATTEN_CASES)
def test_neighborhoods_match_natten(shape, k, d, causal):
    """natten.na2d / na3d (the version installed here) and gatx's graph give the same attention output."""
    natten = pytest.importorskip("natten", reason="natten is not installed")
    gen = torch.Generator().manual_seed(0)
    B, H, D = 2, 2, 16
    q, k_, v = (torch.randn(B, *shape, H, D, generator=gen) for _ in range(3))
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(shape)]
    try:
        ref = fn(q, k_, v, kernel_size=k, dilation=d, is_causal=causal)  # (B, *shape, H, D)
    except (NotImplementedError, RuntimeError, ImportError) as e:  # a build without a CPU path: say why
        pytest.skip(f"natten {natten.__version__} cannot run a forward pass here: {type(e).__name__}: {e}")
    g = neighborhood_graph(shape, k, d, is_causal=causal)
    N = math.prod(shape)

    def fold(t):  # (B, *shape, H, D) -> (N, B*H, D), batch folded into the heads
        return t.reshape(B, N, H, D).permute(1, 0, 2, 3).reshape(N, B * H, D)

    out = ops.sparse_attention(g, fold(q), fold(k_), fold(v))  # default scale D ** -0.5, as NATTEN's
    out = out.reshape(N, B, H, D).permute(1, 0, 2, 3).reshape(ref.shape)
    err = float((out - ref).abs().max())
    assert err < 1e-5, f"gatx differs from natten {natten.__version__} by {err:.3g} (shape {shape}, k={k}, d={d}, causal={causal})"
