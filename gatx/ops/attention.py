"""Sparse attention over a :class:`gatx.Graph`: scores, edge softmax, aggregation, and their composition.

Conventions: ``E`` edges, ``H`` heads, ``D`` features per head. Scores are (E, H); node features are
(N, H, D) with ``N = num_src`` for keys / values and ``N = num_dst`` for queries.
"""
from __future__ import annotations

import math
from types import ModuleType

import torch.nn.functional as F
from torch import Tensor

from ..graph import Graph
from ._dispatch import select

__all__ = ["gat_score", "dot_score", "edge_softmax", "aggregate", "sparse_attention"]


def _check_graph(graph: Graph) -> None:
    if not isinstance(graph, Graph):
        raise ValueError(
            f"graph must be a gatx.Graph, got {type(graph).__name__}; build one with gatx.Graph(src, dst), "
            "Graph.from_edge_index or Graph.from_dgl"
        )


def _check_rows(t: Tensor, rows: int, name: str, what: str, graph: Graph, min_dim: int = 2) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() < min_dim or t.shape[0] != rows:
        raise ValueError(f"{name} must have shape ({what}={rows}, H{', D' if min_dim > 2 else ''}...), got {tuple(t.shape)}")
    if t.device != graph.device:
        raise ValueError(f"{name} is on {t.device} but the graph is on {graph.device}; move one with .to(device)")


def _check_heads(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{na} and {nb} must have the same number of heads, got {a.shape[1]} and {b.shape[1]}")


def gat_score(graph: Graph, el: Tensor, er: Tensor, edge_score: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """Additive (GAT) score of every edge: ``el[src] + er[dst] (+ edge_score)``.

    Args:
        el: (num_src, H, *) source terms. er: (num_dst, H, *) destination terms.
        edge_score: optional (E, H, *) per-edge term.

    Returns: (E, H, *) scores (before the leaky ReLU).
    """
    _check_graph(graph)
    _check_rows(el, graph.num_src, "el", "num_src", graph)
    _check_rows(er, graph.num_dst, "er", "num_dst", graph)
    _check_heads(el, er, "el", "er")
    out = select(backend, graph, el, er, op="gat_score").gat_score(graph, el, er)
    if edge_score is not None:
        _check_rows(edge_score, graph.num_edges, "edge_score", "E", graph)
        out = out + edge_score
    return out


def dot_score(graph: Graph, q: Tensor, k: Tensor, *, backend: str | None = None) -> Tensor:
    """Dot-product score of every edge: ``<q[dst], k[src]>``; q (num_dst, H, D), k (num_src, H, D) -> (E, H)."""
    _check_graph(graph)
    _check_rows(q, graph.num_dst, "q", "num_dst", graph, 3)
    _check_rows(k, graph.num_src, "k", "num_src", graph, 3)
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q and k must have the same (H, D), got {tuple(q.shape[1:])} and {tuple(k.shape[1:])}")
    return select(backend, graph, q, k, op="dot_score").dot_score(graph, q, k)


def edge_softmax(graph: Graph, scores: Tensor, *, backend: str | None = None) -> Tensor:
    """Softmax of (E, H) scores over the incoming edges of each dst node.

    .. math:: a_{e} = \\exp(s_e) / \\sum_{e' \\in \\mathrm{in}(\\mathrm{dst}(e))} \\exp(s_{e'})
    """
    _check_graph(graph)
    _check_rows(scores, graph.num_edges, "scores", "E", graph)
    return select(backend, graph, scores, op="edge_softmax").edge_softmax(graph, scores)


def aggregate(graph: Graph, attn: Tensor, v: Tensor, *, backend: str | None = None) -> Tensor:
    """Weighted sum of source values over each dst node's in-edges.

    .. math:: h_i = \\sum_{e: j \\to i} a_e \\, v_j

    Args: attn (E, H), v (num_src, H, D). Returns (num_dst, H, D); nodes without in-edges get zeros.
    """
    _check_graph(graph)
    _check_rows(attn, graph.num_edges, "attn", "E", graph)
    _check_rows(v, graph.num_src, "v", "num_src", graph, 3)
    _check_heads(attn, v, "attn", "v")
    return select(backend, graph, attn, v, op="aggregate").aggregate(graph, attn, v)


def sparse_attention(
    graph: Graph,
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor,
    *,
    score: str = "dot",
    logits: Tensor | None = None,
    scale: float | None = None,
    bias: Tensor | None = None,
    negative_slope: float = 0.2,
    edge_weight: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    return_attention: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention of each dst node (query) over its in-edges (keys), one kernel family for all.

    ``score="dot"`` (transformer / vision): :math:`s_e = \\mathrm{scale}\\,\\langle q_i, k_j\\rangle + b_e`
    with q (num_dst, H, D), k (num_src, H, D), ``scale`` default :math:`1/\\sqrt{D}`.
    ``score="additive"`` (GAT): :math:`s_e = \\mathrm{LeakyReLU}(k_j + q_i + b_e)` with per-node
    scalars q (num_dst, H) (``er``) and k (num_src, H) (``el``).
    ``score="given"`` (generated logits, e.g. VOLO's outlook attention): :math:`s_e = \\mathrm{scale}\\,
    \\ell_e + b_e` with ``logits`` :math:`\\ell` of shape (E, H) and ``scale`` default 1; pass
    ``q=None, k=None``.

    Then :math:`a = \\mathrm{softmax}_{\\mathrm{in}(i)}(s)`, dropout, times ``edge_weight``, and
    :math:`o_i = \\sum_{e: j \\to i} a_e v_j`.

    Edges are counted one by one: a duplicate edge (the same key twice for one query, e.g. from
    reflection padding) takes its own share of the softmax and contributes its value twice.

    Args:
        v: (num_src, H, D) values. logits: (E, H) scores for ``score="given"``. bias: optional (E, H)
        per-edge score term (relative position bias, edge features). edge_weight: optional (E,) or
        (E, H) factor applied after the softmax.

    Returns: (num_dst, H, D) outputs, and the (E, H) attention if ``return_attention``.
    """
    _check_graph(graph)
    if score not in ("dot", "additive", "given"):
        raise ValueError(f"score must be 'dot', 'additive' or 'given', got {score!r}")
    _check_rows(v, graph.num_src, "v", "num_src", graph, 3)
    if score == "given":
        if q is not None or k is not None:
            raise ValueError("score='given' scores edges by the logits= argument; pass q=None and k=None")
        if logits is None:
            raise ValueError(f"score='given' needs logits= of shape (E={graph.num_edges}, H)")
        _check_rows(logits, graph.num_edges, "logits", "E", graph)
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape (E={graph.num_edges}, H), got {tuple(logits.shape)}")
        _check_heads(logits, v, "logits", "v")
        scale = scale if scale is not None else 1.0
    elif logits is not None:
        raise ValueError(f"logits= is used only with score='given', got score={score!r}")
    elif score == "dot":
        _check_rows(q, graph.num_dst, "q", "num_dst", graph, 3)
        _check_rows(k, graph.num_src, "k", "num_src", graph, 3)
        if q.shape[1:] != k.shape[1:]:
            raise ValueError(f"q and k must have the same (H, D), got {tuple(q.shape[1:])} and {tuple(k.shape[1:])}")
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    else:
        _check_rows(q, graph.num_dst, "q", "num_dst", graph)
        _check_rows(k, graph.num_src, "k", "num_src", graph)
        _check_heads(q, k, "q", "k")
    if score != "given":
        _check_heads(k, v, "k", "v")
    if bias is not None:
        _check_rows(bias, graph.num_edges, "bias", "E", graph)
    if edge_weight is not None and (edge_weight.shape[0] != graph.num_edges or edge_weight.dim() > 2):
        raise ValueError(f"edge_weight must have shape (E={graph.num_edges},) or (E, H), got {tuple(edge_weight.shape)}")
    dropout_p = dropout_p if training else 0.0
    opts = dict(
        score=score, logits=logits, scale=scale, bias=bias, negative_slope=negative_slope, edge_weight=edge_weight,
        dropout_p=dropout_p, return_attention=return_attention,
    )
    mod = select(backend, graph, q, k, v, bias, edge_weight, logits, op="sparse_attention", **opts)
    fused = getattr(mod, "sparse_attention", None)
    if fused is not None:
        return fused(graph, q, k, v, **opts)
    return compose(mod, graph, q, k, v, **opts)


def compose(
    mod: ModuleType, graph: Graph, q: Tensor | None, k: Tensor | None, v: Tensor, *, score: str,
    logits: Tensor | None, scale: float | None,
    bias: Tensor | None, negative_slope: float, edge_weight: Tensor | None, dropout_p: float,
    return_attention: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """``sparse_attention`` from a backend's primitives (inputs already validated)."""
    if score == "dot":
        s = mod.dot_score(graph, q, k) * scale  # (E, H)
        if bias is not None:
            s = s + bias
    elif score == "given":
        s = logits * scale if scale != 1.0 else logits  # (E, H)
        if bias is not None:
            s = s + bias
    else:
        s = mod.gat_score(graph, k, q)  # (E, H)
        if bias is not None:
            s = s + bias
        s = F.leaky_relu(s, negative_slope)
    a = mod.edge_softmax(graph, s)  # (E, H)
    if dropout_p > 0.0:
        a = F.dropout(a, dropout_p, training=True)
    if edge_weight is not None:
        a = a * (edge_weight.unsqueeze(-1) if edge_weight.dim() == 1 else edge_weight)
    out = mod.aggregate(graph, a, v)  # (N_dst, H, D)
    return (out, a) if return_attention else out
