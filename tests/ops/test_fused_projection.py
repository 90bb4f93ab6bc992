"""GATConv's projection of dense features that are mostly zeros runs as a sparse product (nn/_utils).

The sparse path (a cached CSR copy, made the second time the same unchanged tensor comes) must give
the dense path's outputs and parameter gradients to float64 precision, and must never serve a stale
copy: an in-place change, a tensor that needs a gradient or one with many nonzeros stays dense.
"""
from __future__ import annotations

import pytest
import torch

from gatx.nn import _utils


def bag_of_words(n: int, f: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, f, generator=gen) < density
    return (mask * torch.rand(n, f, generator=gen, dtype=torch.float64)).contiguous()  # (N, F), mostly 0


def params(f: int, H: int = 4, D: int = 8, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(H * D, f), (1, H, D), (1, H, D)]
    return [torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_() for s in shapes]


def project(x: torch.Tensor, ps: list[torch.Tensor], n_dst: int, seed: int = 2) -> tuple[str, list[torch.Tensor]]:
    """(name of the autograd node that ran, [feat, el, er, dW, dattn_l, dattn_r]) for a random linear loss."""
    for p in ps:
        p.grad = None
    feat, el, er = _utils.scored_projection(x, *ps, n_dst)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in (feat, el, er))
    loss.backward()
    return type(feat.grad_fn).__name__, [feat.detach(), el.detach(), er.detach()] + [p.grad.clone() for p in ps]


def assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for name, a, b in zip(["feat", "el", "er", "dW", "dattn_l", "dattn_r"], got, want):
        err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < 1e-12, f"{name}: the sparse path differs from the dense one by {err:.2e}"


def test_mostly_zero_features_run_sparse_with_the_same_values() -> None:
    ps = params(900)
    for n_dst in (1200, 700):  # homogeneous graph, and a block whose dst nodes are the first rows
        x = bag_of_words(1200, 900, 0.02, seed=3)  # >= 2^20 entries, 2% nonzero; a new tensor each time
        first, dense = project(x, ps, n_dst)
        second, sparse = project(x, ps, n_dst)
        assert "Sparse" not in first and "Sparse" in second, (first, second)
        assert_same(sparse, dense)


def test_no_stale_copy_and_dense_inputs_stay_dense() -> None:
    x = bag_of_words(1100, 1000, 0.03, seed=4)
    ps = params(1000)
    project(x, ps, 1100)
    assert "Sparse" in project(x, ps, 1100)[0]
    x[5, :40] = 1.0  # in place: the cached copy is stale
    name, got = project(x, ps, 1100)
    assert "Sparse" not in name, "an in-place change must not be served from the old copy"
    with torch.no_grad():
        want = x @ ps[0].t()
    assert torch.allclose(got[0], want, rtol=1e-12, atol=1e-12)
    busy = bag_of_words(1100, 1000, 0.5, seed=5)  # half nonzero: dense
    assert all("Sparse" not in project(busy, ps, 1100)[0] for _ in range(2))
    needs_grad = x.clone().requires_grad_()
    assert all("Sparse" not in project(needs_grad, ps, 1100)[0] for _ in range(2))
    small = bag_of_words(100, 50, 0.02, seed=6)  # below the size where a conversion pays
    assert all("Sparse" not in project(small, params(50), 100)[0] for _ in range(2))


def test_small_parameter_products_match_their_matrix_definitions() -> None:
    # score_rows, _weight_grad and _attn_grads compute block-diagonal matrix products as products and
    # sums over D (off BLAS: a BLAS call on these sizes starts a parallel region, which waits for a
    # descheduled thread when other processes share the cores); the matrix forms are their definitions
    gen = torch.Generator().manual_seed(7)
    H, D, F, N = 3, 5, 11, 40
    W = torch.randn(H * D, F, generator=gen, dtype=torch.float64)
    al, ar = (torch.randn(1, H, D, generator=gen, dtype=torch.float64) for _ in range(2))
    p = torch.randn(H * D + 2 * H, F, generator=gen, dtype=torch.float64)
    Bl, Br = _utils.head_blocks(al), _utils.head_blocks(ar)  # (H*D, H), block-diagonal
    torch.testing.assert_close(_utils.score_rows(al, W), Bl.t() @ W, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(_utils._weight_grad(p, al, ar), p[:H * D] + Bl @ p[H * D:H * D + H] + Br @ p[H * D + H:],
                               rtol=1e-14, atol=1e-14)

    def diagonal_blocks(m: torch.Tensor) -> torch.Tensor:  # (H, H*D) -> (H, D): row h's block h
        return torch.stack([m[h, h * D:(h + 1) * D] for h in range(H)])

    feat = torch.randn(N, H * D, generator=gen, dtype=torch.float64)
    g_el, g_er = torch.randn(N, H, generator=gen, dtype=torch.float64), torch.randn(30, H, generator=gen, dtype=torch.float64)
    for want, term in zip(_utils._attn_grads(feat, g_el, g_er, 30, True, True), (g_el, g_er)):  # from feat's rows
        m = term.t() @ feat[:term.shape[0]]  # (H, H*D)
        torch.testing.assert_close(want[0], diagonal_blocks(m), rtol=1e-14, atol=1e-14)
    for term, got in enumerate(_utils._attn_grads(feat, g_el, g_er, 30, True, True, p, W)):
        m = p[H * D + term * H:H * D + (term + 1) * H] @ W.t()  # (H, H*D); the gradient is its diagonal blocks
        torch.testing.assert_close(got[0], diagonal_blocks(m), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_gatconv_step_calls_blas_only_for_node_sized_products(backend) -> None:
    import gatx

    n = 300
    gen = torch.Generator().manual_seed(8)
    g = gatx.Graph(torch.randint(0, n, (3000,), generator=gen), torch.randint(0, n, (3000,), generator=gen), n, n)
    layer = gatx.GATConv(16, 8, 4, allow_zero_in_degree=True, backend=backend)
    x = torch.randn(n, 16, generator=gen, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        layer(g, x).sum().backward()
    products = [(e.name, e.input_shapes) for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm")]
    assert products, "the projection's products should show in the profile"
    for name, shapes in products:
        assert any(n in s for s in shapes if s), f"{name} {shapes}: a product of parameter-sized operands runs on BLAS"
