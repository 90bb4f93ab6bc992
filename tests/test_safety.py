"""Hardening (issue 12): a Graph owns its indices, validated DGL input, structures that match, the
kernel's own bounds check, one answer for all -inf rows, exact second-order gradients.

Probes of a possible crash run in a fresh interpreter, so a regression fails the test instead of
killing pytest.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import dgl_or_none, random_graph, usable_backends

import gatx
from gatx import Graph, ops
from gatx.vision import neighborhood_graph, window_graph


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout)


def qkv(g: Graph, H: int = 2, D: int = 4, dtype=torch.float64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, H, D, generator=gen, dtype=dtype) for n in (g.num_dst, g.num_src, g.num_src))


# ------------------------------------------------------------------ a Graph owns its indices (item 1)
def test_graph_copies_the_callers_indices():
    src, dst = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 0, 1])
    g = Graph(src, dst)
    ref = ops.sparse_attention(g, *qkv(g), backend="torch")
    src[0], dst[:] = 99, -5  # the caller reuses its buffers
    edge_index = torch.stack([torch.tensor([0, 1]), torch.tensor([1, 0])])
    h = Graph.from_edge_index(edge_index)
    edge_index[0, 0] = 7  # from_edge_index used to keep row views
    assert g.src.tolist() == [0, 1, 2, 2] and g.dst.tolist() == [1, 2, 0, 1] and h.src.tolist() == [0, 1]
    for backend in usable_backends():
        if backend != "structured":
            out = ops.sparse_attention(g, *qkv(g), backend=backend)
            assert (out - ref).abs().max() < 1e-12, backend


_PROBE = """
import torch
from gatx import Graph, ops
from gatx.vision import neighborhood_graph

def attempt(label, fn):
    try:
        print(label, fn(), flush=True)
    except ValueError as err:
        print(label, "refused", "modified in place" in str(err) or "out of range" in str(err), flush=True)
    except ops.BackendUnavailable:
        print(label, "unavailable", flush=True)

# 1. a write into any tensor a Graph hands out, then every backend forward + backward
for target in ("src", "dst", "csr", "csc", "in_degrees"):
    g = Graph(torch.tensor([0, 1, 2, 3, 3]), torch.tensor([1, 2, 3, 0, 1]))
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 3, requires_grad=True) for _ in range(3))
    ref = ops.sparse_attention(g, q, k, v, backend="torch")
    ref_grad = torch.autograd.grad(ref.square().sum(), v)[0]
    get = {"src": lambda: g.src, "dst": lambda: g.dst, "csr": lambda: g.csr().src, "csc": lambda: g.csc().dst,
           "in_degrees": g.in_degrees}[target]
    get()[0] = 10**9  # would read far out of bounds
    attempt(f"{target} accessor", lambda: (get(), "ran")[1])
    for backend in ("torch", "fused", "dgl"):
        def step():
            out = ops.sparse_attention(g, q, k, v, backend=backend)
            grad = torch.autograd.grad(out.square().sum(), v)[0]
            return "same" if torch.allclose(out, ref, atol=1e-5) and torch.allclose(grad, ref_grad, atol=1e-4) else "DIFFERENT"
        attempt(f"{target} {backend}", step)

# 2. the cached vision graphs: a write into their structure poisons nothing silently
x = torch.randn(64, 2, 4)
a, b = neighborhood_graph(8, 8, 3), neighborhood_graph(8, 8, 5)
ops.sparse_attention(a, x, x, x), ops.sparse_attention(b, x, x, x)
a.structure.tiling.pos_edge.zero_()
b.structure.rel_pos_index.fill_(0)
for size in (3, 5):
    attempt(f"vision {size}", lambda: (ops.sparse_attention(neighborhood_graph(8, 8, size), x, x, x), "ran")[1])

# 3. indices changed behind the Graph's back (.data has its own version counter) reach the fused kernel
g = Graph(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]))
g.csr().src.data[0] = 10**12
x = torch.randn(4, 2, 3)
attempt("bypass fused", lambda: (ops.sparse_attention(g, x, x, x, backend="fused"), "ran")[1])
# the same for GATv2Conv: its forward over the CSR; its backward, written after the forward, over the CSR (one
# kernel) or, with the attention returned, the score's over the CSR and the CSC
import gatx
layer = gatx.GATv2Conv(3, 2, 1)
attempt("bypass gatv2", lambda: (layer(g, torch.randn(4, 3)), "ran")[1])


def gatv2_backward(get_attention, which):
    h = Graph(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0]))
    out = layer(h, torch.randn(4, 3, requires_grad=True), get_attention=get_attention)
    (h.csr().src if which == "csr" else h.csc().dst).data[0] = 10**12
    (out[0] if get_attention else out).sum().backward()
    return "ran"


attempt("bypass gatv2-backward", lambda: gatv2_backward(False, "csr"))
attempt("bypass gatv2-attention-backward", lambda: gatv2_backward(True, "csc"))
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def probe() -> dict[str, str]:
    """The crash probes above, run once in a fresh interpreter: label -> outcome."""
    r = run_python(_PROBE)
    assert r.returncode == 0 and "done" in r.stdout, f"the process died ({r.returncode}):\n{r.stdout}\n{r.stderr[-2000:]}"
    words = [line.split() for line in r.stdout.splitlines() if line != "done"]
    return {" ".join(w[:2]): " ".join(w[2:]) for w in words}


@pytest.mark.parametrize("target", ["src", "dst", "csr", "csc", "in_degrees"])
def test_in_place_write_to_a_graph_is_refused_not_crashed(probe, target):
    """After a write into any tensor a Graph hands out, the accessor refuses, and every backend
    (forward and backward) refuses or, if it never reads that tensor, gives the unchanged result."""
    assert probe[f"{target} accessor"] == "refused True", probe
    for backend in ("torch", "fused", "dgl"):
        assert probe[f"{target} {backend}"] in ("refused True", "unavailable", "same"), (backend, probe)
    if target in ("src", "dst"):
        assert probe[f"{target} torch"] == "refused True"


def test_cached_vision_graph_refuses_a_written_structure(probe):
    assert probe["vision 3"] == "refused True" and probe["vision 5"] == "refused True", probe


def test_fused_kernel_checks_bounds_itself(probe):
    """The kernel's own bounds check: an error, never a read out of bounds."""
    assert probe["bypass fused"] in ("refused True", "unavailable"), probe
    from gatx.backends import fused

    if fused.availability() is None:  # GATv2Conv's node-row score runs on the fused library then
        for label in ("bypass gatv2", "bypass gatv2-backward", "bypass gatv2-attention-backward"):
            assert probe[label] == "refused True", (label, probe)


@pytest.mark.parametrize("backend", [b for b in usable_backends() if b in ("torch", "fused", "dgl")])
def test_write_between_forward_and_backward_never_gives_a_silent_gradient(backend):
    """The backward refuses, or (dgl: DGL keeps its own copy of the structure) differentiates the
    forward that actually ran."""
    g = random_graph(n_src=8, n_dst=8, e=30, seed=3)
    q, k, v = (t.requires_grad_() for t in qkv(g))
    ref = torch.autograd.grad(ops.sparse_attention(g, q, k, v, backend="torch").square().sum(), (q, k, v))
    out = ops.sparse_attention(g, q, k, v, backend=backend)
    g.src[0] = (g.src[0] + 1) % 8  # a valid id, so only the version counter can tell
    try:
        got = torch.autograd.grad(out.square().sum(), (q, k, v))
    except (ValueError, RuntimeError) as err:
        assert "modified" in str(err), err
        return
    assert backend == "dgl", f"{backend} ran its backward on a modified graph"
    assert all(torch.allclose(x, y, atol=1e-10) for x, y in zip(got, ref))


def test_graph_is_intact_and_version_checks_are_cheap():
    g = neighborhood_graph(8, 8, 3)
    assert g.is_intact()
    h = Graph(torch.tensor([0, 1]), torch.tensor([1, 0]))
    h.src.add_(0)  # even a no-op write bumps the version: refused
    assert not h.is_intact()
    with pytest.raises(ValueError, match="graph.src was modified in place"):
        h.csr()


# ------------------------------------------------------------------ validation (items 2 and 9)
def test_validate_flag_is_gone():
    with pytest.raises(TypeError):
        Graph(torch.tensor([0]), torch.tensor([5]), 1, 1, validate=False)


class _FakeBlock:
    """Enough of a DGL block for Graph.from_dgl, with dst ids past num_dst_nodes (a misused to_block)."""

    canonical_etypes = [("_N", "_E", "_N")]
    ntypes = ["_N"]
    is_block = True

    def edges(self, order="eid"):
        return torch.tensor([0, 1, 2]), torch.tensor([0, 1, 7])

    def num_src_nodes(self):
        return 3

    def num_dst_nodes(self):
        return 2


def test_from_dgl_validates_like_any_input():
    with pytest.raises(ValueError, match="dst ids must be < num_dst=2"):
        Graph.from_dgl(_FakeBlock())


@pytest.mark.skipif(dgl_or_none() is None, reason="DGL is not importable here")
def test_from_dgl_copies_and_ignores_later_changes_to_the_dgl_graph():
    dgl = dgl_or_none()
    dg = dgl.graph((torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])), num_nodes=3)
    g = Graph.from_dgl(dg)
    dg.add_edges(torch.tensor([0, 0]), torch.tensor([0, 1]))  # in place, on the user's DGL graph
    assert g.num_edges == 3 and g.to_dgl().num_edges() == 3 and int(g.csr().indptr[-1]) == 3


def test_structure_of_another_graph_is_refused():
    a, b = neighborhood_graph(8, 8, 3), window_graph(8, 8, 3)
    with pytest.raises(ValueError, match="does not describe this graph's edges"):
        Graph(b.src, b.dst, 64, 64, structure=a.structure)
    flipped = a.dst.clone()
    flipped[[0, -1]] = flipped[[-1, 0]]  # two edges of different queries swap their queries
    with pytest.raises(ValueError, match="does not describe"):
        Graph(a.src, flipped, 64, 64, structure=a.structure)
    same = Graph(a.src, a.dst, 64, 64, structure=a.structure)  # the graph it was built for: accepted
    q = torch.randn(64, 2, 4)
    assert torch.allclose(ops.sparse_attention(same, q, q, q), ops.sparse_attention(a, q, q, q, backend="torch"), atol=1e-6)


# ------------------------------------------------------------------ all -inf rows (item 7)
@pytest.mark.parametrize("backend", [b for b in usable_backends() if b != "structured"])
def test_all_masked_rows_give_zero_output_attention_and_gradient(backend):
    g = random_graph(n_src=6, n_dst=5, e=24, seed=2)
    q, k, v = (t.requires_grad_() for t in qkv(g))
    bias = torch.randn(g.num_edges, 2, dtype=torch.float64)
    bias[g.dst == 1] = float("-inf")  # every in-edge of dst 1, both heads
    bias[(g.dst == 2).nonzero()[:, 0], 0] = float("-inf")  # dst 2, head 0 only
    bias.requires_grad_()
    out, a = ops.sparse_attention(g, q, k, v, bias=bias, return_attention=True, backend=backend)
    (out.square().sum() + a.sum()).backward()
    dead = (g.dst == 1)[:, None] | ((g.dst == 2)[:, None] & (torch.arange(2) == 0))  # (E, H)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[2, 0].abs().max() == 0
    assert a[dead].abs().max() == 0 and torch.isfinite(a).all()
    for t in (q, k, v, bias):
        assert torch.isfinite(t.grad).all(), f"{backend}: non-finite gradient"
    assert bias.grad[dead].abs().max() == 0


def test_all_masked_rows_on_a_grid():
    g = window_graph(6, 6, 3)
    q, k, v = qkv(g)
    bias = torch.zeros(g.num_edges, 2, dtype=torch.float64)
    bias[g.dst == 7] = float("-inf")
    for backend in usable_backends():
        out = ops.sparse_attention(g, q, k, v, bias=bias, backend=backend)
        assert torch.isfinite(out).all() and out[7].abs().max() == 0, backend


# ------------------------------------------------------------------ second-order gradients (item 5)
def _dense_gat(conv: gatx.GATConv, g: Graph, x: torch.Tensor) -> torch.Tensor:
    """GATConv as a dense float64 masked softmax (the paper's definition), for graphs without multi-edges."""
    N, H, D = g.num_dst, conv._num_heads, conv._out_feats
    h = conv.fc(x).view(N, H, D)
    el, er = (h * conv.attn_l).sum(-1), (h * conv.attn_r).sum(-1)  # (N, H)
    s = torch.nn.functional.leaky_relu(el[None] + er[:, None], 0.2)  # (dst, src, H)
    mask = torch.zeros(N, N, dtype=torch.bool)
    mask[g.dst, g.src] = True
    a = torch.softmax(s.masked_fill(~mask[..., None], float("-inf")), 1)
    return torch.einsum("ijh,jhd->ihd", a, h) + conv.bias.view(H, D)


@pytest.mark.parametrize("loss", ["sum", "square"])
def test_gradient_penalty_matches_the_dense_reference_on_every_backend(loss):
    """grad(loss, x, create_graph=True) then backward: the fused kernel once dropped this term silently."""
    gen = torch.Generator().manual_seed(5)
    pairs = torch.unique(torch.randint(0, 16, (2, 60), generator=gen), dim=1)
    g = Graph(pairs[0], pairs[1], 16).remove_self_loops().add_self_loops()
    x = torch.randn(16, 6, dtype=torch.float64, generator=gen)
    grads = {}
    for backend in ["dense"] + [b for b in usable_backends() if b != "structured"]:
        torch.manual_seed(1)
        conv = gatx.GATConv(6, 4, 2, backend=None if backend == "dense" else backend).double()
        torch.nn.init.normal_(conv.bias)
        xi = x.clone().requires_grad_()
        out = _dense_gat(conv, g, xi) if backend == "dense" else conv(g, xi)
        (gx,) = torch.autograd.grad(out.sum() if loss == "sum" else out.square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in conv.parameters() if p.grad is not None])
    ref = grads.pop("dense")
    for backend, got in grads.items():
        diff = (got - ref).abs().max().item()
        assert diff <= 1e-9 * (1 + ref.abs().max().item()), f"{backend}: max diff {diff:.3g}"


@pytest.mark.skipif("fused" not in usable_backends(), reason="the fused kernel is not usable here")
@pytest.mark.parametrize("score", ["dot", "additive"])
def test_fused_second_order_with_every_option_matches_torch(score):
    g = random_graph(n_src=7, n_dst=6, e=30, seed=8)
    gen = torch.Generator().manual_seed(3)
    shape = (lambda n: (n, 2, 3)) if score == "dot" else (lambda n: (n, 2))
    base = [torch.randn(*shape(n), generator=gen, dtype=torch.float64) for n in (6, 7)]
    base += [torch.randn(7, 2, 3, generator=gen, dtype=torch.float64), torch.randn(30, 2, generator=gen, dtype=torch.float64),
             torch.rand(30, generator=gen, dtype=torch.float64)]
    results = {}
    for backend in ("torch", "fused"):
        ins = [t.clone().requires_grad_() for t in base]
        torch.manual_seed(0)  # the same dropout mask on both backends
        out, a = ops.sparse_attention(g, *ins[:3], score=score, bias=ins[3], edge_weight=ins[4], dropout_p=0.3,
                                      return_attention=True, backend=backend)
        first = torch.autograd.grad(out.square().sum() + (a * a).sum(), ins, create_graph=True)
        second = torch.autograd.grad(sum((f * f).sum() for f in first), ins)
        results[backend] = list(first) + list(second)
    for i, (x, y) in enumerate(zip(results["fused"], results["torch"])):
        assert (x - y).abs().max() < 1e-10, f"tensor {i}: max diff {(x - y).abs().max():.3g}"


# ------------------------------------------------------------------ noise (issue 13 item 14)
def test_no_sparse_csr_beta_warning_from_gatxs_own_sparse_tensors():
    r = run_python(
        """
        import torch, gatx
        from gatx.data import row_normalize
        g = gatx.Graph(torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 2, 3, 4, 0]))
        x = row_normalize(torch.rand(5, 4).to_sparse_coo())  # COO in: gatx makes the CSR tensors
        gatx.GATConv(4, 2, 2)(g, x).sum().backward()
        gatx.GATConv(4, 2, 2, head_feat_drop=True, feat_drop=0.5)(g, x)
        """
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Sparse CSR tensor support is in beta" not in r.stderr, r.stderr
