"""torch.compile(fullgraph=True) of every gatx.vision module on CPU: the same values and gradients as eager.

Each module is compiled once (float32, tiny sizes), called twice with fresh inputs of one shape (the
second call must not recompile), and its output and the gradients of the input and of every
parameter are compared with the eager module's. Dynamo's frame counter counts the compilations.
Most modules compile with the ``aot_eager`` backend (Dynamo + AOTAutograd: the graph capture,
functionalization and the autograd graph that inductor would get, in seconds); outlook attention also
goes through inductor (its C++ code generation takes most of a compile; it caught an inductor bug in
the backward of ``avg_pool2d(ceil_mode=True)``). Grid modules under inductor take about a minute
each here, so they are left to the benchmarks.
"""
from __future__ import annotations

import pytest
import torch

import gatx.vision as gv

torch._dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402

# name: (module factory, input shape, forward kwargs, compiler backend)
CASES = {
    "na1d_causal": (lambda: gv.NeighborhoodAttention1d(8, 2, 3, is_causal=True), (2, 10, 8), {}, "aot_eager"),
    "na2d_dilated": (lambda: gv.NeighborhoodAttention2d(8, 2, 3, dilation=2), (2, 6, 7, 8), {}, "aot_eager"),
    "na2d": (lambda: gv.NeighborhoodAttention2d(8, 2, 3), (2, 6, 7, 8), {}, "aot_eager"),
    "na3d": (lambda: gv.NeighborhoodAttention3d(8, 2, (2, 3, 3)), (1, 3, 4, 5, 8), {}, "aot_eager"),
    # several tiles: query blocks and key halos moved (index tables while tracing, the plans' moves eagerly)
    "na2d_tiles": (lambda: gv.NeighborhoodAttention2d(8, 2, 3, rel_pos_bias=True), (2, 12, 12, 8), {}, "aot_eager"),
    # no bias: one fused SDPA call (eagerly an autograd Function whose backward calls autograd.grad)
    "na2d_no_rpb": (lambda: gv.NeighborhoodAttention2d(8, 2, 3, rel_pos_bias=False), (2, 12, 12, 8), {}, "aot_eager"),
    "window_shifted": (lambda: gv.WindowAttention(8, 4, 2, shift_size=2, num_ttokens=3), (2, 8, 6, 8), {}, "aot_eager"),
    "window_shifted_blocks": (lambda: gv.WindowAttention(8, 4, 2, shift_size=2), (2, 8, 8, 8), {}, "aot_eager"),
    "window_temporal": (lambda: gv.WindowAttention(8, 4, 2, num_ttokens=3), (5, 3, 8), {"temporal": True}, "aot_eager"),
    "window3d_shifted": (lambda: gv.WindowAttention3d(8, 2, 2, shift_size=1), (1, 4, 4, 3, 8), {}, "aot_eager"),
    "outlook": (lambda: gv.OutlookAttention(8, 2, 3, 1, 2), (2, 5, 6, 8), {}, "inductor"),
    "biformer": (lambda: gv.BiLevelRoutingAttention(8, 2, n_win=2, topk=2), (2, 4, 6, 8), {}, "aot_eager"),
    "acmix": (lambda: gv.ACmix(8, 8, kernel_att=3, head=2), (2, 8, 5, 6), {}, "aot_eager"),
}


def _run(module: torch.nn.Module, x: torch.Tensor, kw: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and the gradients of x and every parameter under a fixed random output weighting."""
    x = x.detach().requires_grad_()
    out = module(x, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * w).sum(), [x] + list(module.parameters()), allow_unused=True)
    return out.detach(), [torch.zeros(()) if g is None else g for g in grads]  # unused: e.g. the temporal table


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True), f"{name}: max diff {diff:.3e}"


def _compiled_matches_eager(module: torch.nn.Module, shape: tuple, kw: dict, backend: str, calls: int = 2) -> CompileCounterWithBackend:
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    for i in range(calls):
        x = torch.randn(shape)
        out, grads = _run(compiled, x, kw)
        want, want_grads = _run(module, x, kw)
        assert out.abs().sum() > 0, "the output must not be trivially zero"
        _assert_close(f"call {i} output", out, want)
        names = ["x"] + [n for n, _ in module.named_parameters()]
        for name, g, gw in zip(names, grads, want_grads):
            _assert_close(f"call {i} grad {name}", g, gw)
    return counter


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_module_matches_eager_without_recompile(case):
    make, shape, kw, backend = CASES[case]
    torch._dynamo.reset()
    torch.manual_seed(0)
    counter = _compiled_matches_eager(make(), shape, kw, backend)
    assert counter.frame_count == 1, f"{case}: compiled {counter.frame_count} times for two calls of one shape"


def test_new_shapes_recompile_with_their_own_graphs():
    """A new map size traces again (the grid graph depends on the shape); a third size, where Dynamo
    turns on dynamic shapes, is specialised back to plain ints and still matches eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = gv.NeighborhoodAttention2d(8, 2, 3)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    for shape in [(1, 5, 6, 8), (1, 7, 6, 8), (1, 6, 9, 8)]:
        x = torch.randn(shape)
        out, grads = _run(compiled, x, {})
        want, want_grads = _run(module, x, {})
        _assert_close(f"{shape} output", out, want)
        for g, gw in zip(grads, want_grads):
            _assert_close(f"{shape} grad", g, gw)
    assert counter.frame_count == 3, f"expected one compile per shape, got {counter.frame_count}"


def test_modules_with_other_scales_compile_after_one_another():
    """Modules of one class share their forward's code: compiling a second one with another head size
    recompiles that code with dynamic shapes, where Dynamo makes the float ``scale`` symbolic; the
    structured backend's torch.cond takes no float operand, so the scale is specialised first. The
    one-head module checks that both branches' gradients have the same strides (a size-1 head axis
    kept a head-major stride through contiguous())."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    for module, shape in [(gv.NeighborhoodAttention2d(8, 2, 3), (2, 6, 7, 8)),
                          (gv.NeighborhoodAttention1d(32, 2, 7), (2, 20, 32)),
                          (gv.NeighborhoodAttention2d(12, 1, 3), (1, 5, 9, 12))]:
        _compiled_matches_eager(module, shape, {}, "aot_eager")


def test_non_finite_input_takes_the_per_edge_path_when_compiled():
    """The structured backend's non-finite fallback is a torch.cond under compile: an inf in one token
    spreads only to the queries that see it, as eagerly (a dense tile alone would give NaN to its
    whole tile)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = gv.NeighborhoodAttention1d(4, 1, 3, rel_pos_bias=False)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(1, 40, 4)
    x[0, 2] = float("inf")
    with torch.no_grad():
        out, want = compiled(x), module(x)
    assert torch.isfinite(want[0, 10:]).all(), "tokens far from the inf stay finite eagerly"
    _assert_close("output", out, want)


def test_grid_builders_are_constants_for_dynamo():
    """gatx marks its trace-time builder with the flag that torch.compiler.assume_constant_result sets
    (without importing torch._dynamo on import): pin the flag's name."""
    from gatx.vision.grid import _build_while_tracing

    def f():
        return None

    torch.compiler.assume_constant_result(f)
    flags = {k for k, v in vars(f).items() if v is True}
    assert flags and flags <= set(vars(_build_while_tracing)), f"torch marks constants with {flags}"
