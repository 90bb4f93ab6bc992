"""``sparse_attention(out_bias=...)``: a term added to every output row (a layer's output bias).

The fused CPU kernel adds it as it writes each output row and sums its gradient as its single backward
pass reads the output gradient (where the row term of the softmax gradient becomes ``<g, o - b>``);
every other backend, the deterministic two-pass backward, double backward and half precision add it
afterwards. All of them must give ``o + b`` and the gradients of that, and GATConv hands its bias to the
op only where nothing comes between the attention and the bias.
"""
from __future__ import annotations

import pytest
import torch

import gatx
from gatx import ops
from gatx.backends import fused

needs_fused = pytest.mark.skipif(fused.availability() is not None, reason=f"fused kernel: {fused.availability()}")


def graph(n: int, e: int, seed: int, empty_rows: int = 3) -> gatx.Graph:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (e,), generator=gen)
    dst = torch.randint(0, n - empty_rows, (e,), generator=gen)  # the last rows have no in-edge
    return gatx.Graph(src, dst, n, n)


def attention_inputs(g: gatx.Graph, score: str, H: int, D: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    qk = (g.num_dst, H, D) if score == "dot" else (g.num_dst, H)
    return [r(*qk), r(g.num_src, *qk[1:]), r(g.num_src, H, D), (3 * torch.randn(H, D, generator=gen, dtype=dtype)).requires_grad_()]


def loss_weights(out: torch.Tensor) -> torch.Tensor:
    """The loss's weight on each output entry (the output gradient of :func:`value_and_grads`)."""
    return torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()


def value_and_grads(g: gatx.Graph, x: list[torch.Tensor], score: str, backend: str, want_attn: bool) -> list[torch.Tensor]:
    for t in x:
        t.grad = None
    q, k, v, ob = x
    res = ops.sparse_attention(g, q, k, v, score=score, out_bias=ob, backend=backend, return_attention=want_attn)
    out = res[0] if want_attn else res
    loss = (out * loss_weights(out)).sum()
    if want_attn:
        loss = loss + (res[1] ** 2).sum()
    loss.backward()
    return [out.detach()] + [t.grad.clone() for t in x]


@needs_fused
@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("want_attn,deterministic", [(False, False), (True, False), (False, True)])
def test_fused_matches_the_torch_backend(score, want_attn, deterministic) -> None:
    # 1500 nodes, 30k edges, 8 x 8 heads: (N + E) H (D + 1) > 2^21, so the kernel runs on several threads
    g = graph(1500, 30000, seed=1)
    x = attention_inputs(g, score, 8, 8, torch.float64, seed=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(deterministic)  # passes 1 + 2 instead of the single pass
    try:
        got = value_and_grads(g, x, score, "fused", want_attn)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    want = value_and_grads(g, x, score, "torch", want_attn)
    for name, a, b in zip(("out", "dq", "dk", "dv", "d out_bias"), got, want):
        err = (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < 1e-12, f"{name} differs from the torch backend by {err:.2e}"
    assert torch.equal(got[0][-3:], x[3].detach().expand(3, 8, 8)), "a row with no in-edge is the bias alone"


@needs_fused
def test_float32_specialised_kernel_matches_float64() -> None:
    g = graph(1500, 30000, seed=3)
    x64 = attention_inputs(g, "additive", 8, 8, torch.float64, seed=4)
    x32 = [t.detach().float().requires_grad_() for t in x64]
    want = value_and_grads(g, x64, "additive", "torch", False)
    got = value_and_grads(g, x32, "additive", "fused", False)  # the 8 x 8 float32 instantiation
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
        assert err < 1e-5, f"{name} differs from float64 by {err:.2e}"
    # d out_bias sums the output gradient over 1500 rows, and the loss's sine weights nearly cancel in
    # that sum (|d out_bias| <= 0.7 while the summands' magnitudes add to ~950), so its float32 error is
    # measured against the sum of |summands|, the scale a float32 sum's rounding is bounded by; the
    # error depends on how many threads split the rows
    summands = loss_weights(want[0]).abs().sum(0)
    err = ((got[4].double() - want[4]).abs() / summands).max().item()
    assert err < 1e-6, f"d out_bias differs from float64 by {err:.2e} of the summed magnitudes"


@needs_fused
def test_gradcheck_and_double_backward() -> None:
    g = graph(20, 80, seed=5)
    q, k, v, ob = attention_inputs(g, "additive", 2, 3, torch.float64, seed=6)

    def f(q, k, v, ob):
        return ops.sparse_attention(g, q, k, v, score="additive", out_bias=ob, backend="fused")

    assert torch.autograd.gradcheck(f, (q, k, v, ob))
    assert torch.autograd.gradgradcheck(f, (q, k, v, ob))


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_broadcast_shapes_and_half_precision(backend) -> None:
    if backend == "fused" and fused.availability() is not None:
        pytest.skip(f"fused kernel: {fused.availability()}")
    g = graph(30, 120, seed=7)
    q, k, v = (t.detach() for t in attention_inputs(g, "dot", 2, 4, torch.float32, seed=8)[:3])
    plain = ops.sparse_attention(g, q, k, v, backend=backend)
    for ob in (torch.randn(4), torch.randn(2, 1), torch.randn(1, 4), torch.randn(2, 4)):
        got = ops.sparse_attention(g, q, k, v, out_bias=ob, backend=backend)
        torch.testing.assert_close(got, plain + ob, rtol=1e-6, atol=1e-6)
    half = ops.sparse_attention(g, q.bfloat16(), k.bfloat16(), v.bfloat16(), out_bias=torch.ones(2, 4, dtype=torch.bfloat16),
                                backend=backend)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), plain + 1, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("bad,match", [
    (torch.ones(5), r"out_bias must have shape \(H, Dv\) = \(2, 4\)"),
    (torch.ones(3, 2, 4), r"out_bias must have shape \(H, Dv\)"),
    (torch.ones(2, 4, dtype=torch.float64), "out_bias is torch.float64 but v is torch.float32"),
    (torch.ones(2, 4, dtype=torch.int64), "out_bias must be a floating-point tensor"),
    ([1.0, 2.0], "out_bias must be a tensor"),
])
def test_bad_out_bias_is_refused_with_a_clear_error(bad, match) -> None:
    g = graph(10, 30, seed=9)
    q, k, v = (t.detach() for t in attention_inputs(g, "dot", 2, 4, torch.float32, seed=10)[:3])
    with pytest.raises(ValueError, match=match):
        ops.sparse_attention(g, q, k, v, out_bias=bad)


@pytest.mark.parametrize("kwargs,into_op", [
    ({}, True),
    ({"residual": True}, False),  # the residual comes between: the layer adds the bias after it
    ({"bias": False}, False),
])
def test_gatconv_passes_its_bias_to_the_op_only_when_nothing_comes_between(monkeypatch, kwargs, into_op) -> None:
    seen = []
    real = ops.sparse_attention

    def spy(*args, **kw):
        seen.append(kw.get("out_bias"))
        return real(*args, **kw)

    monkeypatch.setattr(ops, "sparse_attention", spy)
    torch.manual_seed(0)
    g = graph(40, 200, seed=11, empty_rows=0)
    layer = gatx.GATConv(6, 4, 3, **kwargs).double()
    if layer.bias is not None:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(40, 6, dtype=torch.float64)
    got = {}
    for backend in ("torch", "fused") if fused.availability() is None else ("torch",):
        layer.zero_grad()
        out = layer(g, x, backend=backend)
        out.pow(2).sum().backward()
        got[backend] = [out.detach()] + [p.grad.clone() for p in layer.parameters()]
    assert all((s is not None) == into_op for s in seen)
    if "fused" in got:
        for a, b in zip(got["fused"], got["torch"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
