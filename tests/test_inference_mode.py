"""gatx under ``torch.inference_mode()``, and training after it.

Tensors made in inference mode carry no version counter and autograd refuses to save them. gatx keeps
index tensors across calls (a graph's CSR and in-degrees, the vision builders' grid graphs, cached
edge_index graphs): built in an inference-mode call, they must still serve a training call after it.
Each case uses shapes no other test uses, so its caches are first built inside inference mode.
"""
from __future__ import annotations

import pytest
import torch

import gatx
from gatx import vision


def _gat_layer(kind: str):
    src = torch.randint(0, 37, (211,), generator=torch.Generator().manual_seed(0))
    dst = torch.randint(0, 37, (211,), generator=torch.Generator().manual_seed(1))
    x = torch.randn(37, 11)
    if kind == "gat_edge_index":  # PyG-style input: the layer caches the Graph it builds
        conv = gatx.GATConv(11, 5, 3, allow_zero_in_degree=True)
        return (lambda inp: conv(torch.stack([src, dst]), inp)), conv, x
    conv = (gatx.GATv2Conv if kind == "gatv2" else gatx.GATConv)(11, 5, 3, allow_zero_in_degree=True)
    graph = gatx.Graph(src, dst, 37, 37)  # built outside; its CSR is built on first use, inside
    return (lambda inp: conv(graph, inp)), conv, x


MODULES = {
    "window": lambda: (vision.WindowAttention(12, 3, 2, shift_size=1), torch.randn(2, 9, 6, 12)),
    "window3d": lambda: (vision.WindowAttention3d(12, (2, 3, 3), 2, shift_size=(1, 1, 1)), torch.randn(1, 4, 6, 9, 12)),
    "na1d": lambda: (vision.NeighborhoodAttention1d(12, 2, 5), torch.randn(2, 23, 12)),
    "na2d": lambda: (vision.NeighborhoodAttention2d(12, 2, 5), torch.randn(2, 11, 13, 12)),
    "na3d": lambda: (vision.NeighborhoodAttention3d(12, 2, 3), torch.randn(1, 5, 6, 7, 12)),
    "outlook": lambda: (vision.OutlookAttention(12, 2, 3, 1, 2), torch.randn(2, 9, 11, 12)),
    "routing": lambda: (vision.BiLevelRoutingAttention(12, 2, n_win=2, topk=2), torch.randn(2, 10, 14, 12)),
    "acmix": lambda: (vision.ACmix(12, 12, kernel_att=5, head=2), torch.randn(2, 12, 11, 9)),
}


@pytest.mark.parametrize("kind", ["gat", "gatv2", "gat_edge_index"] + sorted(MODULES))
def test_inference_mode_then_training(kind):
    """Same output in inference mode as outside it, and a training step afterwards on the same caches."""
    torch.manual_seed(0)
    if kind in MODULES:
        module, x = MODULES[kind]()
        call = module
    else:
        call, module, x = _gat_layer(kind)
    module.eval()
    with torch.inference_mode():
        inferred = call(x)
    assert inferred.is_inference()
    module.train()
    xg = x.clone().requires_grad_()
    out = call(xg)
    out.square().sum().backward()  # raises if a cached index tensor were an inference tensor
    assert xg.grad is not None and all(p.grad is not None for p in module.parameters() if p.requires_grad)
    module.eval()
    with torch.no_grad():
        assert torch.allclose(call(x), inferred, atol=1e-6)


def test_graph_of_inference_tensors_trains_and_stays_guarded():
    """A Graph built in inference mode from inference tensors holds normal copies: it serves autograd
    later, and writing into its tensors is still caught."""
    with torch.inference_mode():
        src, dst = torch.randint(0, 19, (90,)), torch.randint(0, 19, (90,))
        graph = gatx.Graph(src, dst, 19, 19)
        graph.csr()
    assert not graph.src.is_inference() and not graph.csr().indptr.is_inference()
    conv = gatx.GATConv(4, 3, 2, allow_zero_in_degree=True)
    x = torch.randn(19, 4, requires_grad=True)
    conv(graph, x).sum().backward()
    assert x.grad is not None
    graph.src.add_(0)  # an in-place write (of nothing): the version counter moves
    with pytest.raises(ValueError, match="modified in place"):
        conv(graph, x)
