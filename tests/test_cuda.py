"""gatx on a CUDA GPU: the same values and gradients as on the CPU. Skipped where there is none.

The layers and the vision modules are built once on the CPU (float64), copied to the GPU, and run on
the same inputs there with the default backend choice (the Triton kernels for graph attention when
triton is installed); outputs and the gradients of the input and of every parameter must match the
CPU run to float64 rounding. Also: torch.compile on the GPU, sparse (bag-of-words) layer inputs,
autocast, and a training step of examples/cora.py's model. The Triton kernels' own checks on the GPU
are in tests/ops/test_triton.py (its ``cuda`` run).
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import gatx
import gatx.vision as gv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")

CUDA = "cuda"
TRITON = importlib.util.find_spec("triton") is not None


def _graph(n: int = 300, e: int = 3000, seed: int = 0) -> gatx.Graph:
    """A random graph with self-loops, duplicate edges, a hub (node 0: 400 extra in-edges) and nodes without in-edges."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.cat([torch.randint(0, n, (e,), generator=gen), torch.randint(0, n, (400,), generator=gen), torch.arange(n - 20)])
    dst = torch.cat([torch.randint(0, n - 20, (e,), generator=gen), torch.zeros(400, dtype=torch.long), torch.arange(n - 20)])
    return gatx.Graph(src, dst, n, n)


def _close(name: str, got: torch.Tensor | None, want: torch.Tensor | None, tol: float, floor: float = 1.0) -> None:
    """||got - want|| <= tol * max(||want||, floor): a gradient that is zero up to rounding (a bias that
    cancels out, as ACmix's position-encoding bias) is compared absolutely."""
    assert (got is None) == (want is None), f"{name}: gradient present on one device only"
    if want is None:
        return
    got = got.detach().cpu().double()
    want = want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff, size = float((got - want).norm()), float(want.norm())
    assert diff <= tol * max(size, floor), f"{name}: |got - want| = {diff:.3e}, |want| = {size:.3e}, tolerance {tol:g}"


def _grads(module: torch.nn.Module, call, x: torch.Tensor, seed: int = 3):
    """Output, d(out . w)/dx and every parameter's gradient for a fixed random weighting w."""
    x = x.detach().clone().requires_grad_(x.is_floating_point() and x.layout == torch.strided)
    out = call(module, x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    params = [p for p in module.parameters() if p.requires_grad]
    leaves = ([x] if x.requires_grad else []) + params
    grads = torch.autograd.grad((out * w).sum(), leaves, allow_unused=True)
    names = ["input"] if x.requires_grad else []
    names += [n.removeprefix("_orig_mod.") for n, p in module.named_parameters() if p.requires_grad]  # compiled: prefixed
    return out, dict(zip(names, grads))


def _same_on_both(module: torch.nn.Module, call, x: torch.Tensor, tol: float) -> None:
    module = module.double()
    gpu = copy.deepcopy(module).to(CUDA)
    x = x.double() if x.is_floating_point() else x
    out, grads = _grads(module, lambda m, t: call(m, t, "cpu"), x)
    got, got_grads = _grads(gpu, lambda m, t: call(m, t, CUDA), x.to(CUDA))
    assert got.device.type == "cuda"
    _close("output", got, out, tol)
    assert set(got_grads) == set(grads)
    for name in grads:
        _close(name, got_grads[name], grads[name], tol)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("cls", [gatx.GATConv, gatx.GATv2Conv])
def test_layer_on_cuda_matches_cpu(cls, residual):
    g = _graph()
    torch.manual_seed(0)
    layer = cls(12, 5, 4, residual=residual, allow_zero_in_degree=True)
    w = torch.rand(g.num_edges, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def call(m, x, dev):  # DGL's GATv2Conv has no edge_weight
        return m(g.to(dev), x, edge_weight=w.to(dev)) if cls is gatx.GATConv else m(g.to(dev), x)

    _same_on_both(layer, call, torch.randn(g.num_src, 12, generator=torch.Generator().manual_seed(1)), 1e-12)


def test_layer_on_cuda_runs_triton_and_returns_the_same_attention():
    if not TRITON:
        pytest.skip("triton is not installed: CUDA runs on the torch backend")
    g = _graph(seed=1).to(CUDA)
    q = torch.randn(g.num_src, 1, device=CUDA)
    assert gatx.ops.select(None, g, q, op="sparse_attention", score="additive").NAME == "triton"
    torch.manual_seed(0)
    layer = gatx.GATConv(12, 5, 4, allow_zero_in_degree=True).to(CUDA)
    ref = copy.deepcopy(layer)
    ref.backend = "torch"
    x = torch.randn(g.num_src, 12, device=CUDA)
    out, a = layer(g, x, get_attention=True)
    out_ref, a_ref = ref(g, x, get_attention=True)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)


def test_sparse_features_on_cuda():
    """Bag-of-words inputs as sparse CSR on the GPU (Cora's layout): the dense input's values and gradients."""
    g = _graph(seed=2)
    gen = torch.Generator().manual_seed(4)
    dense = torch.rand(g.num_src, 50, generator=gen, dtype=torch.float64) * (torch.rand(g.num_src, 50, generator=gen) < 0.05)
    torch.manual_seed(0)
    layer = gatx.GATConv(50, 8, 2, allow_zero_in_degree=True).double().to(CUDA)
    gd = g.to(CUDA)
    out_s, grads_s = _grads(layer, lambda m, t: m(gd, t), dense.to(CUDA).to_sparse_csr())
    out_d, grads_d = _grads(layer, lambda m, t: m(gd, t), dense.to(CUDA))
    _close("output", out_s, out_d.cpu(), 1e-12)
    for name in grads_s:
        _close(name, grads_s[name], grads_d[name].cpu(), 1e-12)


# name: (module factory, input shape, forward kwargs)
VISION = {
    "na1d_causal": (lambda: gv.NeighborhoodAttention1d(8, 2, 3, is_causal=True), (2, 10, 8), {}),
    "na2d_dilated": (lambda: gv.NeighborhoodAttention2d(8, 2, 3, dilation=2), (2, 6, 7, 8), {}),
    "na2d": (lambda: gv.NeighborhoodAttention2d(8, 2, 3), (2, 9, 11, 8), {}),
    "na3d": (lambda: gv.NeighborhoodAttention3d(8, 2, (2, 3, 3)), (1, 3, 4, 5, 8), {}),
    "window_shifted": (lambda: gv.WindowAttention(8, 4, 2, shift_size=2, num_ttokens=3), (2, 8, 6, 8), {}),
    "window_temporal": (lambda: gv.WindowAttention(8, 4, 2, num_ttokens=3), (5, 3, 8), {"temporal": True}),
    "window3d_shifted": (lambda: gv.WindowAttention3d(8, 2, 2, shift_size=1), (1, 4, 4, 3, 8), {}),
    "outlook": (lambda: gv.OutlookAttention(8, 2, 3, 1, 2), (2, 5, 6, 8), {}),
    "biformer": (lambda: gv.BiLevelRoutingAttention(8, 2, n_win=2, topk=2), (2, 4, 6, 8), {}),
    "acmix": (lambda: gv.ACmix(8, 8, kernel_att=3, head=2), (2, 8, 5, 6), {}),
}


@pytest.mark.parametrize("name", list(VISION))
def test_vision_module_on_cuda_matches_cpu(name):
    make, shape, kw = VISION[name]
    torch.manual_seed(0)
    module = make()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    _same_on_both(module, lambda m, t, dev: m(t, **kw), x, 1e-12)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_layer_on_cuda_matches_eager(backend):
    g = _graph(seed=3).to(CUDA)
    torch.manual_seed(0)
    layer = gatx.GATConv(12, 5, 4, residual=True, allow_zero_in_degree=True).to(CUDA)
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(g.num_src, 12, device=CUDA)
    out, grads = _grads(layer, lambda m, t: m(g, t), x)
    got, got_grads = _grads(compiled, lambda m, t: m(g, t), x)
    torch.testing.assert_close(got, out, rtol=1e-4, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_on_cuda(dtype):
    """Under torch.autocast("cuda") the layer returns the autocast dtype, close to the float32 result."""
    g = _graph(seed=4).to(CUDA)
    torch.manual_seed(0)
    layer = gatx.GATConv(12, 5, 4, allow_zero_in_degree=True).to(CUDA)
    x = torch.randn(g.num_src, 12, device=CUDA)
    want = layer(g, x)
    with torch.autocast("cuda", dtype=dtype):
        got = layer(g, x)
    assert got.dtype == dtype
    err = float((got.detach().float() - want.detach()).norm() / want.detach().norm())
    assert err < (5e-3 if dtype == torch.float16 else 3e-2), err
    got.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in layer.parameters())
