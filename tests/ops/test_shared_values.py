"""``sparse_attention`` with shared values: v of one head, read by every head of the scores.

Head h's output is ``sum_e a[e, h] v[src(e)]`` and v's gradient is the sum over the heads, which is
exactly the attention over v expanded to H heads. The fused kernel reads the one row (its own loops, the
dst pass alone when v needs no gradient); every other backend gets the expanded view. All must agree
with the torch backend on the expanded v, values and every gradient.
"""
from __future__ import annotations

import pytest
import torch

import gatx
from gatx import ops
from gatx.backends import fused
from gatx.ops import BackendUnavailable

needs_fused = pytest.mark.skipif(fused.availability() is not None, reason=f"fused kernel: {fused.availability()}")


def bipartite(n_src: int, n_dst: int, e: int, seed: int) -> gatx.Graph:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n_src, (e,), generator=gen)
    dst = torch.randint(0, n_dst - 2, (e,), generator=gen)  # the last two dst rows have no in-edge
    return gatx.Graph(src, dst, n_src, n_dst)


def inputs(g: gatx.Graph, score: str, H: int, Dv: int, v_grad: bool, seed: int, dtype=torch.float64) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(grad)

    x: dict = {"v": r(g.num_src, 1, Dv, grad=v_grad), "bias": r(g.num_edges, H),
               "edge_weight": torch.rand(g.num_edges, H, generator=gen, dtype=dtype).requires_grad_(),
               "out_bias": r(H, Dv)}
    if score == "dot":
        x.update(q=r(g.num_dst, H, 5), k=r(g.num_src, H, 5))
    elif score == "additive":
        x.update(q=r(g.num_dst, H), k=r(g.num_src, H))
    else:
        x.update(q=None, k=None, logits=r(g.num_edges, H))
    return x


def run(g: gatx.Graph, x: dict, score: str, backend: str, expand: bool, want_attn: bool, p: float) -> list[torch.Tensor]:
    H = x["bias"].shape[1]
    v = x["v"].expand(-1, H, -1) if expand else x["v"]
    kw = {key: x[key] for key in ("bias", "edge_weight", "out_bias")}
    if score == "given":
        kw["logits"] = x["logits"]
    torch.manual_seed(7)  # the same dropout mask on every backend
    res = ops.sparse_attention(g, x["q"], x["k"], v, score=score, dropout_p=p, return_attention=want_attn,
                               backend=backend, **kw)
    out, a = res if want_attn else (res, None)
    loss = (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).cos()).sum()
    if a is not None:
        loss = loss + (a * a).sum()
    wrt = [t for t in x.values() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, wrt)
    return [out.detach()] + ([a.detach()] if a is not None else []) + list(grads)


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        scale = b.abs().max().clamp_min(1.0)
        assert ((a - b).abs().max() / scale).item() < tol


@pytest.mark.parametrize("backend", ["fused", "torch", "dgl"])
@pytest.mark.parametrize("score", ["additive", "dot", "given"])
@pytest.mark.parametrize("H,Dv", [(8, 40), (3, 16)])
@pytest.mark.parametrize("v_grad,want_attn,p", [(False, False, 0.0), (True, False, 0.3), (False, True, 0.3), (True, True, 0.0)])
def test_shared_values_equal_the_expanded_values(backend, score, H, Dv, v_grad, want_attn, p) -> None:
    # 3000 src, 2000 dst, 60k edges: the fused kernel runs on several threads; 8 heads take its
    # register-blocked loops, 3 heads its generic ones, Dv=40 a partial column block
    g = bipartite(3000, 2000, 60000, seed=H)
    x = inputs(g, score, H, Dv, v_grad, seed=Dv)
    want = run(g, x, score, "torch", True, want_attn, p)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = run(g, x, score, backend, False, want_attn, p)
    except BackendUnavailable as err:
        pytest.skip(str(err))
    finally:
        torch.set_num_threads(threads)
    assert_close(got, want, 1e-12)


@needs_fused
def test_shared_values_in_float32_and_deterministic_mode() -> None:
    g = bipartite(3000, 2000, 60000, seed=3)
    for deterministic in (False, True):
        x = inputs(g, "additive", 8, 128, True, seed=4, dtype=torch.float32)
        torch.use_deterministic_algorithms(deterministic)
        try:
            got = run(g, x, "additive", "fused", False, False, 0.0)
        finally:
            torch.use_deterministic_algorithms(False)
        assert_close(got, run(g, x, "additive", "torch", True, False, 0.0), 2e-5)


@needs_fused
def test_shared_values_double_backward() -> None:
    g = bipartite(300, 200, 3000, seed=5)
    x = inputs(g, "additive", 4, 12, True, seed=6)
    res = []
    for backend, v in (("fused", x["v"]), ("torch", x["v"].expand(-1, 4, -1))):
        out = ops.sparse_attention(g, x["q"], x["k"], v, score="additive", backend=backend)
        gq, = torch.autograd.grad((out ** 2).sum(), x["q"], create_graph=True)
        res.append(torch.autograd.grad((gq ** 2).sum(), [x["k"], x["v"]]))
    assert_close(list(res[0]), list(res[1]), 1e-12)


def test_values_of_another_head_count_are_refused() -> None:
    g = bipartite(30, 20, 100, seed=7)
    q, k = torch.randn(20, 4), torch.randn(30, 4)
    with pytest.raises(ValueError, match="same number of heads, or v one head shared by all"):
        ops.sparse_attention(g, q, k, torch.randn(30, 2, 5), score="additive")
    with pytest.raises(ValueError, match="same number of heads, or v one head shared by all"):
        ops.sparse_attention(g, None, None, torch.randn(30, 3, 5), score="given", logits=torch.randn(100, 4))
    # one head of scores and of values is the plain case
    assert ops.sparse_attention(g, q[:, :1], k[:, :1], torch.randn(30, 1, 5), score="additive").shape == (20, 1, 5)


def test_shared_values_under_torch_compile() -> None:
    # while compiling, every backend (the fused one's custom op included) gets v expanded to the heads
    g = bipartite(50, 30, 400, seed=8)
    x = inputs(g, "additive", 4, 6, True, seed=9, dtype=torch.float32)

    def f(q, k, v):
        return ops.sparse_attention(g, q, k, v, score="additive")

    want = f(x["q"], x["k"], x["v"])
    want_grads = torch.autograd.grad(want.sin().sum(), [x["q"], x["k"], x["v"]])
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x["q"], x["k"], x["v"])
    grads = torch.autograd.grad(got.sin().sum(), [x["q"], x["k"], x["v"]])
    assert_close([got] + list(grads), [want] + list(want_grads), 1e-5)
