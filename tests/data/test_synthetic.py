"""gatx.data.synthetic.make_sbm: the properties it promises (edge count, symmetry, homophily, heavy-tailed
degrees, class-correlated features, split, determinism) measured on generated graphs."""
from __future__ import annotations

import pytest
import torch

from gatx.data.synthetic import edge_homophily, make_sbm


@pytest.fixture(scope="module")
def sbm():
    return make_sbm(20000, 200000, num_classes=8, num_features=16, homophily=0.7, seed=3)


def test_structure(sbm):
    g, n = sbm.graph, sbm.num_nodes
    assert (g.num_src, g.num_dst, g.num_edges) == (n, n, 200000)
    assert not (g.src == g.dst).any(), "no self-loops"
    key = g.dst * n + g.src
    assert torch.equal(key, key.sort().values), "edges are sorted by (dst, src)"
    assert key.unique().numel() == g.num_edges, "no duplicate edges"
    assert torch.equal(key, (g.src * n + g.dst).sort().values), "symmetric: every edge has its reverse"
    assert "edges=200000" in repr(sbm) and "classes=8" in repr(sbm)


@pytest.mark.parametrize("h", [0.05, 0.5, 0.9])
def test_homophily_is_the_target(h):
    ds = make_sbm(20000, 160000, num_classes=6, num_features=4, homophily=h, seed=1)
    got = edge_homophily(ds.graph, ds.labels)
    assert abs(got - h) < 0.02, f"edge homophily {got:.4f}, target {h}"
    counts = torch.bincount(ds.labels, minlength=6).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.1, f"classes are drawn uniformly: {counts.tolist()}"


def hill_exponent(deg: torch.Tensor, k_min: float) -> float:
    """Maximum-likelihood power-law exponent of the degrees >= k_min (Clauset et al., 2009)."""
    tail = deg[deg >= k_min].double()
    return 1.0 + tail.numel() / torch.log(tail / k_min).sum().item()


def test_degrees_are_heavy_tailed(sbm):
    deg = sbm.graph.in_degrees().double()
    top = deg.sort(descending=True).values[: deg.numel() // 100].sum() / deg.sum()
    assert deg.max() > 20 * deg.mean(), f"hubs: max degree {deg.max():.0f}, mean {deg.mean():.1f}"
    assert top > 0.1, f"the top 1% of nodes hold {top:.3f} of the edges"
    assert deg.max() <= (deg.mean() * sbm.num_nodes) ** 0.5 * 1.3, "the structural cutoff caps hubs"
    gamma = hill_exponent(deg, 3 * deg.mean().item())
    assert abs(gamma - 2.5) < 0.3, f"tail exponent {gamma:.2f}, target 2.5"
    flat = make_sbm(20000, 200000, num_classes=8, num_features=4, degree_exponent=50.0, seed=3)
    deg = flat.graph.in_degrees().double()
    top = deg.sort(descending=True).values[:200].sum() / deg.sum()
    assert deg.max() < 5 * deg.mean() and top < 0.03, f"a steep exponent gives no hubs (top 1% hold {top:.3f})"


def nearest_mean_accuracy(ds) -> float:
    x, y = ds.features.double(), ds.labels
    means = torch.stack([x[ds.train_idx][y[ds.train_idx] == c].mean(0) for c in range(ds.num_classes)])
    pred = torch.cdist(x[ds.test_idx], means).argmin(1)
    return (pred == y[ds.test_idx]).double().mean().item()


def test_features_are_class_correlated(sbm):
    x, y = sbm.features.double(), sbm.labels
    within = torch.cat([x[y == c] - x[y == c].mean(0) for c in range(8)])
    assert abs(within.std().item() - 1.0) < 0.02, "unit noise around the class means"
    norms = torch.stack([x[y == c].mean(0).norm() for c in range(8)])
    assert ((norms - 1.0).abs() < 0.1).all(), f"class means at distance feature_signal=1: {norms.tolist()}"
    acc = nearest_mean_accuracy(sbm)
    assert 0.3 < acc < 0.8, f"features alone: {acc:.3f} (chance 0.125) -- informative, not sufficient"
    noise = make_sbm(20000, 200000, num_classes=8, num_features=16, feature_signal=0.0, seed=3)
    assert nearest_mean_accuracy(noise) < 0.16, "feature_signal=0: features carry no class information"


def test_split_and_determinism(sbm):
    parts = [sbm.train_idx, sbm.val_idx, sbm.test_idx]
    assert [p.numel() for p in parts] == [2000, 2000, 16000]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(20000)), "a partition of the nodes"
    again = make_sbm(20000, 200000, num_classes=8, num_features=16, homophily=0.7, seed=3)
    for a, b in [(sbm.graph.src, again.graph.src), (sbm.graph.dst, again.graph.dst), (sbm.features, again.features),
                 (sbm.labels, again.labels), (sbm.train_idx, again.train_idx)]:
        assert torch.equal(a, b), "same seed, same graph"
    other = make_sbm(20000, 200000, num_classes=8, num_features=16, homophily=0.7, seed=4)
    assert not torch.equal(sbm.graph.src, other.graph.src) and not torch.equal(sbm.labels, other.labels)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_edges=1001), "even"),
    (dict(num_nodes=10, num_edges=40), "too dense"),
    (dict(homophily=1.5), "homophily must be in"),
    (dict(num_classes=1, homophily=0.5), "one class"),
    (dict(degree_exponent=2.0), "degree_exponent must be > 2"),
    (dict(split=(0.6, 0.5)), "split"),
    (dict(num_nodes=2.5), "num_nodes must be an int"),
    (dict(max_degree=1.0), "max_degree"),
    (dict(num_nodes=8, num_edges=8, num_classes=7), "too small|too dense"),
])
def test_bad_arguments(kwargs, match):
    args = dict(num_nodes=1000, num_edges=4000) | kwargs
    with pytest.raises(ValueError, match=match):
        make_sbm(**args)
