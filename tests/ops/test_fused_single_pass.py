"""The fused kernel's single backward pass (``_call(3, ...)``) against a float64 reference and passes 1 + 2.

Pass 3 computes every gradient in one pass over the src rows, taking the softmax gradient's row term
from the forward's output (``<g, o>``) and scattering dq into per-thread buffers; it must give the
gradients of the two-pass backward (and of an independent autograd reference) to float64 precision,
on graphs large enough that the kernel runs on several threads.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gatx
from gatx.backends import fused

pytestmark = pytest.mark.skipif(fused.availability() is not None, reason=f"fused kernel: {fused.availability()}")


def make_graph(n_src: int, n_dst: int, e: int, seed: int) -> gatx.Graph:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n_src, (e,), generator=gen)
    dst = torch.randint(0, max(1, n_dst - 3), (e,), generator=gen)  # the last dst rows have no in-edge
    src[:5], dst[:5] = src[0], dst[0]  # a multi-edge
    return gatx.Graph(src, dst, n_src, n_dst)


def inputs(g: gatx.Graph, H: int, D: int, dot: bool, bias: bool, weight: str | None, drop: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    E = g.num_edges
    x = {"q": r(g.num_dst, H, D) if dot else r(g.num_dst, H), "k": r(g.num_src, H, D) if dot else r(g.num_src, H),
         "v": r(g.num_src, H, D), "bias": r(E, H) if bias else None,
         "ew": None if weight is None else (r(E).exp() if weight == "E" else r(E, H).exp()),
         "keep": (torch.rand(E, H, generator=gen) > 0.3).view(torch.uint8) if drop else None}
    x["g"] = r(g.num_dst, H, D)
    return x


def reference(g: gatx.Graph, x: dict, dot: bool, scale: float, slope: float, keep_scale: float) -> torch.Tensor:
    """out (N_dst, H, D) from the definitions, with torch ops over the edges (autograd gives the gradients)."""
    src, dst = g.src, g.dst
    if dot:
        s = (x["q"][dst] * x["k"][src]).sum(-1) * scale  # (E, H)
        s = s + x["bias"] if x["bias"] is not None else s
    else:
        z = x["q"][dst] + x["k"][src]  # (E, H)
        s = F.leaky_relu(z + x["bias"] if x["bias"] is not None else z, slope)
    idx = dst[:, None].expand_as(s)
    m = torch.full((g.num_dst, s.shape[1]), -torch.inf, dtype=s.dtype).scatter_reduce(0, idx, s.detach(), "amax")
    p = torch.exp(s - m[dst])
    p = p / torch.zeros_like(m).index_add(0, dst, p)[dst]  # (E, H) softmax over each dst's in-edges
    if x["keep"] is not None:
        p = p * x["keep"].to(p.dtype) * keep_scale
    if x["ew"] is not None:
        p = p * (x["ew"][:, None] if x["ew"].dim() == 1 else x["ew"])
    return torch.zeros_like(x["g"]).index_add(0, dst, p[..., None] * x["v"][src])


def run_passes(g: gatx.Graph, x: dict, dot: bool, scale: float, slope: float, keep_scale: float, single: bool) -> dict:
    csr, csc = g.csr(), g.csc()
    rows, rows_t = (csr.indptr, csr.src, csr.perm, g.num_src), (csc.indptr, csc.dst, csc.perm, g.num_dst)
    q, k, v, bias, ew, keep = (x[n] for n in ("q", "k", "v", "bias", "ew", "keep"))
    H, D = v.shape[1], v.shape[2]
    out, stat = v.new_empty(g.num_dst, H, D), v.new_empty(g.num_dst, 2, H)
    args = (q, k, v, bias, ew, keep, keep_scale, scale, slope, stat)
    fused._call(0, dot, rows, *args, out=out)
    grads = {"q": torch.empty_like(q), "k": torch.empty_like(k), "v": torch.empty_like(v),
             "bias": torch.empty_like(bias) if bias is not None else None, "ew": torch.empty_like(ew) if ew is not None else None}
    kw = dict(out=grads["v"], dk=grads["k"], attn=grads["bias"], dw=grads["ew"])
    if single:
        fused._call(3, dot, rows_t, *args, g=x["g"], o=out, dq=grads["q"], **kw)
    else:
        fused._call(1, dot, rows, *args, g=x["g"], out=grads["q"], attn=grads["bias"], dw=grads["ew"])
        fused._call(2, dot, rows_t, *args, g=x["g"], out=grads["v"], dk=grads["k"])
    return {"out": out} | {n: t for n, t in grads.items() if t is not None}


@pytest.mark.parametrize("dot", [False, True])
@pytest.mark.parametrize("bias,weight,drop", [(False, None, False), (True, "E", False), (True, "EH", True)])
def test_single_pass_matches_reference_and_two_passes(dot, bias, weight, drop) -> None:
    g = make_graph(2000, 1500, 35000, seed=1)  # (N + E) H (D + 1) > 2^21: the kernel uses several threads
    x = inputs(g, 8, 8, dot, bias, weight, drop, seed=2)
    scale, slope, keep_scale = (0.35, 0.2, 1.0 / 0.7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        single = run_passes(g, x, dot, scale, slope, keep_scale, single=True)
        two = run_passes(g, x, dot, scale, slope, keep_scale, single=False)
    finally:
        torch.set_num_threads(threads)
    leaves = {n: x[n].clone().requires_grad_() for n in single if n != "out"}
    ref_out = reference(g, x | leaves, dot, scale, slope, keep_scale)
    ref = {"out": ref_out.detach()} | dict(zip(leaves, torch.autograd.grad(ref_out, list(leaves.values()), x["g"])))
    for name, want in ref.items():
        for label, got in (("single pass", single[name]), ("two passes", two[name])):
            err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
            assert err < 1e-11, f"{label}: d{name} differs from the float64 reference by {err:.2e}"


def test_single_pass_barely_depends_on_thread_count() -> None:
    g = make_graph(2000, 1800, 40000, seed=3)  # (N + E) H (D + 1) > 2^21: several threads
    x = inputs(g, 8, 8, False, True, None, False, seed=4)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(run_passes(g, x, False, 1.0, 0.2, 1.0, single=True))
    finally:
        torch.set_num_threads(threads)
    for other in got[1:]:  # dq's partial sums are grouped by thread: the last bits may differ
        for name, t in got[0].items():
            assert torch.allclose(other[name], t, rtol=1e-12, atol=1e-12), f"d{name} changes with the thread count"


def test_single_pass_refuses_an_attention_gradient() -> None:
    g = make_graph(10, 8, 30, seed=5)
    x = inputs(g, 2, 4, False, False, None, False, seed=6)
    csc = g.csc()
    stat = x["v"].new_zeros(g.num_dst, 2, 2)
    with pytest.raises(ValueError, match="no attention gradient"):
        fused._call(3, False, (csc.indptr, csc.dst, csc.perm, g.num_dst), x["q"], x["k"], x["v"], None, None, None, 1.0,
                    1.0, 0.2, stat, g=x["g"], ga=torch.zeros(g.num_edges, 2, dtype=torch.float64), o=x["g"])


def test_deterministic_algorithms_give_the_same_bits_on_any_thread_count() -> None:
    """torch.use_deterministic_algorithms(True): the fused backward runs passes 1 + 2 (no per-thread sums)."""
    g = make_graph(2000, 1800, 40000, seed=7)
    x = inputs(g, 8, 8, False, True, None, False, seed=8)
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    got = []
    try:
        torch.use_deterministic_algorithms(True)
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = [x[k].clone().requires_grad_() for k in ("q", "k", "v", "bias")]
            out = gatx.ops.sparse_attention(g, *leaves[:3], score="additive", bias=leaves[3], backend="fused")
            out.backward(x["g"])
            got.append([t.grad for t in leaves])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), *got):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads under deterministic algorithms"
