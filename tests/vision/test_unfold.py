"""gatx.vision.unfold_graph / fold: the windows of nn.Unfold as graph nodes, and the fold back into pixels.

References: torch's own F.unfold / F.fold on index images (every window position reads the pixel id it
holds after padding), and a float64 loop over windows for the fold.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatx.vision import UnfoldStructure, fold, unfold_graph

CASES = [  # (Y, X, k, stride, padding, dilation)
    (7, 9, 3, 1, 1, 1), (7, 9, 3, 2, 1, 1), (7, 9, 5, 2, 2, 1), (6, 8, 2, 2, 0, 1), (9, 6, 3, 3, 0, 1),
    (8, 7, 3, 1, 2, 2), (5, 5, 5, 1, 2, 1),
]


def _window_sources(Y, X, k, s, p, d, mode):
    """(windows, k*k) source pixel of every window position, by F.unfold of a padded id image."""
    ids = torch.arange(Y * X, dtype=torch.float64).view(1, 1, Y, X) + 1  # 0 is kept for the zero padding
    padded = F.pad(ids, [p] * 4, mode="constant" if mode == "zeros" else "reflect")
    cols = F.unfold(padded, k, dilation=d, stride=s)[0]  # (k*k, windows)
    src = cols.t().long() - 1  # (windows, k*k); -1 = padding
    return torch.where(src < 0, torch.full_like(src, Y * X), src)


@pytest.mark.parametrize("Y,X,k,s,p,d", CASES)
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_graph_matches_unfold(Y, X, k, s, p, d, mode):
    if mode == "reflect" and p >= min(Y, X):
        pytest.skip("reflection needs padding < side")
    want = _window_sources(Y, X, k, s, p, d, mode)  # (windows, k*k)
    for queries in ("positions", "centre"):
        if queries == "centre" and k % 2 == 0:
            continue
        g = unfold_graph(Y, X, k, stride=s, padding=p, dilation=d, pad_mode=mode, queries=queries)
        st = g.structure
        assert isinstance(st, UnfoldStructure) and st.num_windows == want.shape[0]
        per_window = k * k if queries == "positions" else 1
        assert g.num_dst == st.num_windows * per_window and g.num_edges == g.num_dst * k * k
        assert g.num_src == Y * X + (mode == "zeros")
        assert torch.equal(g.dst, torch.arange(g.num_dst).repeat_interleave(k * k))
        src = g.src.view(st.num_windows, per_window, k * k)
        assert torch.equal(src, want[:, None, :].expand_as(src)), f"{queries}: sources differ from F.unfold"


def test_reflect_graph_has_duplicate_edges_and_zeros_graph_the_zero_node():
    g = unfold_graph(5, 6, 5, padding=2, pad_mode="reflect", queries="centre")
    corner = g.src[: 25]  # query (0, 0): rows -2..2 reflect to 2, 1, 0, 1, 2
    assert corner.unique().numel() == 9 and corner.numel() == 25
    assert (corner == 1 * 6 + 1).sum() == 4  # pixel (1, 1) four times
    z = unfold_graph(5, 6, 3, padding=1)
    assert z.structure.zero_node == 30 and int((z.src == 30).sum()) > 0
    v = torch.randn(30, 2, 3)
    vz = z.structure.with_zero_node(v)
    assert vz.shape == (31, 2, 3) and torch.equal(vz[:30], v) and not vz[30].any()
    assert unfold_graph(5, 6, 3, padding=1, pad_mode="reflect").structure.with_zero_node(v) is v


@pytest.mark.parametrize("Y,X,k,s,p,d", CASES)
def test_fold_matches_F_fold(Y, X, k, s, p, d):
    g = unfold_graph(Y, X, k, stride=s, padding=p, dilation=d)
    L, K, C = g.structure.num_windows, k * k, 3
    gen = torch.Generator().manual_seed(Y * 100 + X)
    x = torch.randn(L * K, C, dtype=torch.float64, generator=gen, requires_grad=True)  # dst (w, i) -> row w*K + i
    out = fold(g, x)  # (Y*X, C)
    cols = x.view(L, K, C).permute(2, 1, 0).reshape(1, C * K, L)  # F.fold layout (B, C*k*k, L)
    ref = F.fold(cols, (Y, X), k, dilation=d, padding=p, stride=s)[0].permute(1, 2, 0).reshape(Y * X, C)
    assert (out - ref).abs().max() < 1e-12
    w = torch.randn(Y * X, C, dtype=torch.float64, generator=gen)
    (gx,) = torch.autograd.grad((out * w).sum(), x)
    (rx,) = torch.autograd.grad((ref * w).sum(), x)
    assert (gx - rx).abs().max() < 1e-12


def test_fold_double_backward():
    g = unfold_graph(3, 4, 3, padding=1, stride=2)
    x = torch.randn(g.num_dst, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fold(g, t) ** 2, (x,))


def test_centre_queries_fold_to_their_pixel():
    g = unfold_graph(7, 9, 5, stride=2, padding=2, pad_mode="reflect", queries="centre")
    ys, xs = torch.meshgrid(torch.arange(0, 7, 2), torch.arange(0, 9, 2), indexing="ij")
    assert torch.equal(g.structure.fold_index, (ys * 9 + xs).flatten())


def test_cached_per_arguments():
    a = unfold_graph(6, 6, 3, padding=1)
    assert unfold_graph(6, 6, 3, padding=1, device="cpu") is a
    assert unfold_graph(6, 6, 3, padding=1, stride=2) is not a
    assert "UnfoldStructure(6x6, kernel_size=3, stride=1, padding=1" in repr(a.structure)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(height=0, width=4, kernel_size=3), "height"),
        (dict(height=4, width=4, kernel_size=3, stride=0), "stride"),
        (dict(height=4, width=4, kernel_size=True), "kernel_size"),
        (dict(height=4, width=4, kernel_size=3, pad_mode="circular"), "pad_mode"),
        (dict(height=4, width=4, kernel_size=3, queries="all"), "queries"),
        (dict(height=4, width=4, kernel_size=2, queries="centre"), "odd"),
        (dict(height=2, width=4, kernel_size=5), "spans 5 pixels"),
        (dict(height=3, width=4, kernel_size=7, padding=3, pad_mode="reflect"), "smaller than the map"),
    ],
)
def test_builder_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        unfold_graph(**kwargs)


def test_fold_errors():
    g = unfold_graph(4, 4, 3, padding=1)
    from gatx import Graph

    with pytest.raises(ValueError, match="unfold_graph"):
        fold(Graph(torch.tensor([0]), torch.tensor([0])), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="num_dst=144"):
        fold(g, torch.zeros(10, 2))
    with pytest.raises(ValueError, match="one per pixel"):
        g.structure.with_zero_node(torch.zeros(15, 2))
