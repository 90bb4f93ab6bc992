r"""Synthetic node-classification graphs: a degree-corrected stochastic block model with planted classes.

Every node ``i`` gets a class :math:`y_i` (uniform over ``C`` classes) and a degree weight
:math:`\theta_i` from a Pareto law, so expected degrees follow a power law
:math:`P(k) \propto k^{-\gamma}` (``degree_exponent``) with hubs, cut off at the structural limit
:math:`k_{\max} = \sqrt{\bar k N}` unless ``max_degree`` says otherwise. Each undirected edge draws
one endpoint with probability :math:`\propto \theta_i`; with probability ``homophily`` (:math:`h`)
the other endpoint comes from the same class, else from another class (chosen in proportion to the
classes' total weight), again :math:`\propto \theta_j` inside that class. Self-loops and duplicates
are discarded and topped up until exactly ``num_edges`` directed edges remain (both directions of
each pair), so the *edge homophily* (the fraction of edges joining two nodes of one class) is
:math:`h` up to sampling noise. Features are class-correlated:

.. math::
    x_i = s\,\mu_{y_i} + \varepsilon_i, \qquad \mu_c = v_c / \lVert v_c \rVert,\; v_c \sim \mathcal N(0, I_F),
    \qquad \varepsilon_i \sim \mathcal N(0, I_F)

with ``feature_signal`` :math:`s`: features alone separate the classes only partly, and the graph
(through homophily) carries the rest. Everything is vectorised numpy driven by one seeded generator:
the same arguments give the same graph, byte for byte. 1M nodes / 20M edges take about a minute and
a few GB of memory.

>>> from gatx.data.synthetic import make_sbm, edge_homophily
>>> ds = make_sbm(2000, 20000, num_classes=5, num_features=16, homophily=0.8, seed=0)
>>> ds.graph.num_edges, tuple(ds.features.shape), ds.num_classes
(20000, (2000, 16), 5)
>>> abs(edge_homophily(ds.graph, ds.labels) - 0.8) < 0.03
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..graph import Graph

__all__ = ["NodeDataset", "make_sbm", "edge_homophily"]


@dataclass(frozen=True, repr=False)
class NodeDataset:
    """One graph for node classification, in the layout of OGB's node-property datasets.

    ``graph`` is a :class:`gatx.Graph` (edges ``src -> dst``), ``features`` (N, F) float32,
    ``labels`` (N,) int64, and the split as int64 node ids ``train_idx``, ``val_idx``, ``test_idx``.
    """

    name: str
    graph: Graph
    features: Tensor
    labels: Tensor
    train_idx: Tensor
    val_idx: Tensor
    test_idx: Tensor
    num_classes: int

    @property
    def num_nodes(self) -> int:
        return self.graph.num_dst

    def __repr__(self) -> str:
        split = "/".join(str(t.numel()) for t in (self.train_idx, self.val_idx, self.test_idx))
        return (
            f"NodeDataset({self.name!r}, nodes={self.num_nodes}, edges={self.graph.num_edges}, "
            f"features={self.features.shape[1]}, classes={self.num_classes}, train/val/test={split})"
        )


def edge_homophily(graph: Graph, labels: Tensor) -> float:
    """The fraction of edges whose two endpoints have the same label (Zhu et al., 2020)."""
    if graph.num_edges == 0:
        raise ValueError("edge homophily is undefined for a graph without edges")
    return (labels[graph.src] == labels[graph.dst]).double().mean().item()


def _check(num_nodes: int, num_edges: int, num_classes: int, num_features: int, homophily: float,
           degree_exponent: float, max_degree: float | None, split: tuple[float, float]) -> None:
    for name, value, low in (("num_nodes", num_nodes, 2), ("num_classes", num_classes, 1), ("num_features", num_features, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(num_edges, (int, np.integer)) or num_edges < 2 or num_edges % 2:
        raise ValueError(
            f"num_edges counts the directed edges of a symmetric graph (two per node pair), so it must be "
            f"an even int >= 2, got {num_edges!r}"
        )
    pairs = num_nodes * (num_nodes - 1) // 2
    if num_edges // 2 > pairs // 4:
        raise ValueError(
            f"num_edges={num_edges} is too dense for {num_nodes} nodes: at most {2 * (pairs // 4)} "
            "(a quarter of all node pairs) can be placed by sampling; use more nodes or fewer edges"
        )
    if not 0.0 <= homophily <= 1.0:
        raise ValueError(f"homophily must be in [0, 1], got {homophily}")
    if num_classes == 1 and homophily < 1.0:
        raise ValueError(f"with one class every edge is homophilous, so homophily must be 1.0, got {homophily}")
    if not degree_exponent > 2.0:
        raise ValueError(
            f"degree_exponent must be > 2 (a power law with a finite mean degree), got {degree_exponent}; "
            "2.1-3.0 is typical of real graphs"
        )
    if max_degree is not None and not max_degree >= 2.0 * num_edges / num_nodes:
        raise ValueError(f"max_degree must be at least the mean degree {2 * num_edges / num_nodes:.1f}, got {max_degree}")
    train, val = split
    if not (0.0 < train and 0.0 <= val and train + val < 1.0):
        raise ValueError(f"split must be (train, val) fractions > 0 with train + val < 1, got {split}")


def _weights(rng: np.random.Generator, n: int, mean_degree: float, gamma: float, k_max: float) -> np.ndarray:
    """Pareto degree weights (tail exponent ``gamma``), capped so no expected degree exceeds ``k_max``."""
    theta = (1.0 - rng.random(n)) ** (-1.0 / (gamma - 1.0))  # (N,) >= 1, P(theta > t) = t^(1 - gamma)
    for _ in range(8):  # the cap changes the mean, which changes the cap: a few fixed-point steps
        cap = k_max * theta.mean() / mean_degree
        if theta.max() <= cap * (1 + 1e-9):
            break
        np.minimum(theta, cap, out=theta)
    return theta


def _sample_pairs(rng, m, labels, order, cum, starts, h, num_classes):
    """``m`` endpoint pairs: the first ~ theta, the second ~ theta inside a same / other class."""
    total = cum[-1]
    a = order[np.searchsorted(cum, rng.random(m) * total, side="right")]  # (m,)
    cls = labels[a]
    same = rng.random(m) < h
    mass = np.diff(np.concatenate([[0.0], cum[starts[1:] - 1]]))  # (C,) total weight per class
    target = cls.copy()
    other = np.flatnonzero(~same)
    probs = mass / mass.sum()
    while other.size:  # another class, in proportion to class weight: redraw collisions
        draw = rng.choice(num_classes, size=other.size, p=probs)
        ok = draw != cls[other]
        target[other[ok]] = draw[ok]
        other = other[~ok]
    lo = np.where(starts[target] > 0, cum[starts[target] - 1], 0.0)
    hi = cum[starts[target + 1] - 1]
    pick = np.searchsorted(cum, lo + rng.random(m) * (hi - lo), side="right")
    np.clip(pick, starts[target], starts[target + 1] - 1, out=pick)  # float round-off at class edges
    return a, order[pick]


def make_sbm(
    num_nodes: int,
    num_edges: int,
    num_classes: int = 10,
    num_features: int = 64,
    homophily: float = 0.7,
    degree_exponent: float = 2.5,
    feature_signal: float = 1.0,
    max_degree: float | None = None,
    split: tuple[float, float] = (0.1, 0.1),
    seed: int = 0,
) -> NodeDataset:
    """A degree-corrected SBM graph with planted classes and class-correlated features (see the module doc).

    Args:
        num_nodes: N.
        num_edges: directed edges of the symmetric result (2 per node pair; even).
        num_classes: C, classes drawn uniformly per node (default 10).
        num_features: F (default 64).
        homophily: target edge homophily h in [0, 1] (default 0.7; 1/C is what random wiring gives).
        degree_exponent: gamma > 2 of the degree power law (default 2.5; lower = more and larger hubs).
        feature_signal: s, the distance of the class means from the origin in units of the
            per-feature noise (default 1.0; larger = features alone classify better).
        max_degree: cap on expected degrees (default ``sqrt(mean_degree * N)``, the structural cutoff).
        split: (train, val) fractions of a random node split; the rest is test (default (0.1, 0.1)).
        seed: seed of the one numpy generator all randomness comes from (default 0).

    Shapes:
        ``graph``: N nodes, ``num_edges`` edges sorted by (dst, src); ``features`` (N, F); ``labels`` (N,).

    >>> ds = make_sbm(1000, 8000, num_classes=4, num_features=8, seed=1)
    >>> bool((ds.graph.src != ds.graph.dst).all()), ds.train_idx.numel()
    (True, 100)
    """
    _check(num_nodes, num_edges, num_classes, num_features, homophily, degree_exponent, max_degree, split)
    rng = np.random.default_rng(seed)
    n, target = int(num_nodes), int(num_edges) // 2
    mean_degree = 2.0 * target / n
    labels = rng.integers(0, num_classes, n)  # (N,)
    k_max = max_degree if max_degree is not None else math.sqrt(mean_degree * n)
    theta = _weights(rng, n, mean_degree, degree_exponent, min(k_max, n - 1))

    order = np.argsort(labels, kind="stable")  # nodes grouped by class
    counts = np.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"num_nodes={n} is too small for {num_classes} classes: some class got no node")
    starts = np.concatenate([[0], np.cumsum(counts)])  # (C + 1,)
    cum = np.cumsum(theta[order])  # (N,) float64

    keys = np.empty(0, dtype=np.int64)  # undirected pairs as min * N + max
    for _ in range(30):
        need = target - keys.size
        if need <= 0:
            break
        a, b = _sample_pairs(rng, int(need * 1.05) + 64, labels, order, cum, starts, homophily, num_classes)
        keep = a != b
        lo, hi = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
        keys = np.unique(np.concatenate([keys, lo * n + hi]))
    if keys.size < target:
        raise ValueError(
            f"could not place {num_edges} distinct edges on {num_nodes} nodes with max_degree={k_max:.0f}; "
            "raise max_degree or num_nodes, or lower num_edges"
        )
    if keys.size > target:
        keys = keys[np.sort(rng.choice(keys.size, target, replace=False))]
    lo, hi = keys // n, keys % n
    src, dst = np.concatenate([lo, hi]), np.concatenate([hi, lo])
    del keys, lo, hi
    directed = np.sort(dst * n + src)  # sorted by (dst, src)
    src, dst = directed % n, directed // n
    del directed

    centers = rng.standard_normal((num_classes, num_features))
    centers *= feature_signal / np.linalg.norm(centers, axis=1, keepdims=True)
    feats = rng.standard_normal((n, num_features), dtype=np.float32)  # (N, F)
    feats += centers.astype(np.float32)[labels]

    perm = rng.permutation(n)
    n_train, n_val = max(1, int(round(split[0] * n))), int(round(split[1] * n))
    idx = torch.from_numpy(perm)
    graph = Graph(torch.from_numpy(src), torch.from_numpy(dst), n, n)
    name = f"sbm-n{n}-e{num_edges}-c{num_classes}-h{homophily:g}-s{seed}"
    return NodeDataset(
        name, graph, torch.from_numpy(feats), torch.from_numpy(labels.astype(np.int64)),
        idx[:n_train].sort().values, idx[n_train : n_train + n_val].sort().values,
        idx[n_train + n_val :].sort().values, num_classes,
    )
