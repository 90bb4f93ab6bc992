"""GATConv's projection of dense features that are mostly zeros runs as a sparse product (nn/_utils).

The sparse path (a cached CSR copy, made the second time the same unchanged tensor comes) must give
the dense path's outputs and parameter gradients to float64 precision, and must never serve a stale
copy: an in-place change, a tensor that needs a gradient or one with many nonzeros stays dense.
"""
from __future__ import annotations

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
