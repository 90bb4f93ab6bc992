"""Sparse attention over a :class:`gatx.Graph`: scores, edge softmax, aggregation, and their composition.

Conventions: ``E`` edges, ``H`` heads, ``D`` features per head. Scores are (E, H); node features are
(N, H, D) with ``N = num_src`` for keys / values and ``N = num_dst`` for queries.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._amp import autocast_available
from ..graph import Graph
from . import _checks as C
from ._bias import TableBias, add_out_bias
from ._dispatch import backend_module, select, takes_out_bias, takes_shared_values, takes_table_bias

__all__ = ["gat_score", "dot_score", "edge_softmax", "aggregate", "sparse_attention"]


def _pick(backend: str | None, heads: int) -> str | None:
    """The backend to ask for: with no heads (an empty batch folded into H) nothing is computed, and
    the torch backend returns the empty result (kept in the autograd graph) for every ``backend``."""
    if backend is not None:
        backend_module(backend)  # a bad name is refused even then
    return "torch" if heads == 0 else backend


def _autocast(graph: Graph, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Under ``torch.autocast`` for the graph's device, the floating inputs other than float64 cast to
    autocast's dtype (the rule autocast applies to matmul and attention), e.g. a float32 bias or
    attention vector meeting bfloat16 projections; outside autocast the tensors as given."""
    dev = graph.device.type
    if not (autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors)


def _node_terms(graph: Graph, t: Any, name: str, side: str) -> Tensor:
    """A (N, H, *) per-node tensor on the graph's src (``side="src"``) or dst side."""
    rows = graph.num_src if side == "src" else graph.num_dst
    shape = f"(num_{side}, H, ...)"
    t = C.check_tensor(t, name, graph, shape)
    C.check_rows(t, name, rows, f"num_{side}", tuple(range(2, 9)), shape)
    return t


def gat_score(graph: Graph, el: Tensor, er: Tensor, edge_score: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """Additive (GAT) score of every edge: ``el[src] + er[dst] (+ edge_score)``.

    Args:
        el: (num_src, H, *) source terms. er: (num_dst, H, *) destination terms (the same ``*``).
        edge_score: optional (E, H, *) per-edge term.

    Returns: (E, H, *) scores (before the leaky ReLU).
    """
    C.check_graph(graph)
    el = _node_terms(graph, el, "el", "src")
    er = _node_terms(graph, er, "er", "dst")
    if el.shape[1:] != er.shape[1:]:
        raise ValueError(f"el and er must have the same (H, ...) shape, got {tuple(el.shape[1:])} and {tuple(er.shape[1:])}")
    if edge_score is not None:
        want = (graph.num_edges,) + tuple(el.shape[1:])
        edge_score = C.check_tensor(edge_score, "edge_score", graph, f"(E, H, ...) = {want}")
        if tuple(edge_score.shape) != want:
            raise ValueError(f"edge_score must have shape (E, H, ...) = {want}, got {tuple(edge_score.shape)}")
    el, er, edge_score = _autocast(graph, el, er, edge_score)
    C.same_dtype(el=el, er=er, edge_score=edge_score)
    out = select(_pick(backend, el.shape[1]), graph, el, er, op="gat_score").gat_score(graph, el, er)
    return out + edge_score if edge_score is not None else out


def dot_score(graph: Graph, q: Tensor, k: Tensor, *, backend: str | None = None) -> Tensor:
    """Dot-product score of every edge: ``<q[dst], k[src]>``; q (num_dst, H, D), k (num_src, H, D) -> (E, H)."""
    C.check_graph(graph)
    q = C.check_tensor(q, "q", graph, "(num_dst, H, D)")
    k = C.check_tensor(k, "k", graph, "(num_src, H, D)")
    C.check_rows(q, "q", graph.num_dst, "num_dst", (3,), "(num_dst, H, D)")
    C.check_rows(k, "k", graph.num_src, "num_src", (3,), "(num_src, H, D)")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q and k must have the same (H, D), got {tuple(q.shape[1:])} and {tuple(k.shape[1:])}")
    q, k = _autocast(graph, q, k)
    C.same_dtype(q=q, k=k)
    return select(_pick(backend, q.shape[1]), graph, q, k, op="dot_score").dot_score(graph, q, k)


def edge_softmax(graph: Graph, scores: Tensor, *, backend: str | None = None) -> Tensor:
    """Softmax of (E, H, *) scores over the incoming edges of each dst node.

    .. math:: a_{e} = \\exp(s_e) / \\sum_{e' \\in \\mathrm{in}(\\mathrm{dst}(e))} \\exp(s_{e'})
    """
    C.check_graph(graph)
    scores = C.check_tensor(scores, "scores", graph, "(E, H)")
    C.check_rows(scores, "scores", graph.num_edges, "E", tuple(range(2, 9)), "(E, H, ...)")
    mod = select(_pick(backend, scores.shape[1]), graph, scores, op="edge_softmax")
    return mod.edge_softmax(graph, scores.contiguous())  # DGL writes into it: no strided views


def aggregate(graph: Graph, attn: Tensor, v: Tensor, *, backend: str | None = None) -> Tensor:
    """Weighted sum of source values over each dst node's in-edges.

    .. math:: h_i = \\sum_{e: j \\to i} a_e \\, v_j

    Args: attn (E, H) (DGL's (E, H, 1) is accepted), v (num_src, H, D). Returns (num_dst, H, D); nodes
    without in-edges get zeros.
    """
    C.check_graph(graph)
    attn = C.check_tensor(attn, "attn", graph, "(E, H)")
    v = C.check_tensor(v, "v", graph, "(num_src, H, D)")
    attn = C.squeeze_dgl(attn, "attn", graph.num_edges, "E", "(E, H)")
    C.check_rows(v, "v", graph.num_src, "num_src", (3,), "(num_src, H, D)")
    C.same_heads(attn, v, "attn", "v")
    attn, v = _autocast(graph, attn, v)
    C.same_dtype(v=v, attn=attn)
    return select(_pick(backend, v.shape[1]), graph, attn, v, op="aggregate").aggregate(graph, attn, v)


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
    out_bias: Tensor | None = None,
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
        q, k: ``score="dot"``: (num_dst, H, D) and (num_src, H, D). ``score="additive"``: (num_dst, H)
            and (num_src, H); DGL's (N, H, 1) layout is accepted and squeezed. ``None`` for "given".
        v: (num_src, H, Dv) values, or (num_src, 1, Dv) values that every head reads (shared values:
            head h's output is :math:`\\sum_e a_{e,h} v_j`; GATConv aggregates its input rows so when
            that is cheaper than projecting every src row).
        logits: (E, H) scores for ``score="given"``.
        bias: optional per-edge score term (relative position bias, edge features, a -inf mask):
            (E, H), or (E, 1) / (E,) shared by all heads; or a :class:`TableBias` (a table row per
            edge, e.g. a relative position bias table) with H or 1 heads.
        edge_weight: optional (E,), (E, 1) or (E, H) factor applied after the softmax.
        dropout_p: dropout on the attention, a probability in [0, 1] (applied only if ``training``).
        out_bias: optional term added to every output row, of shape (H, Dv) or one that broadcasts to it
            (a layer's output bias): :math:`o_i + b`. The fused CPU kernel adds it in its own pass over the
            output and sums its gradient in its backward pass; other backends add it afterwards.

    All floating inputs of one call must share one dtype (a mix raises a ValueError saying which
    tensor to cast; under ``torch.autocast`` all but float64 ones are first cast to autocast's dtype),
    and every shape is checked here, for every backend. With H = 0 (an empty
    batch folded into the heads) the result is empty and comes from the torch backend.

    Returns: (num_dst, H, Dv) outputs, and the (E, H) attention if ``return_attention``.

    >>> import torch, gatx
    >>> g = gatx.Graph(torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 0, 2]))
    >>> q, k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 5)
    >>> gatx.ops.sparse_attention(g, q, k, v).shape
    torch.Size([3, 2, 5])
    """
    C.check_graph(graph)
    if score not in ("dot", "additive", "given"):
        raise ValueError(f"score must be 'dot', 'additive' or 'given', got {score!r}")
    v = C.check_tensor(v, "v", graph, "(num_src, H, D)")
    C.check_rows(v, "v", graph.num_src, "num_src", (3,), "(num_src, H, D)")
    C.check_width(v, "v", "(num_src, H, D)")
    if score == "given":
        if q is not None or k is not None:
            raise ValueError("score='given' scores edges by the logits= argument; pass q=None and k=None")
        if logits is None:
            raise ValueError(f"score='given' needs logits= of shape (E={graph.num_edges}, H)")
        logits = C.check_tensor(logits, "logits", graph, "(E, H)")
        C.check_rows(logits, "logits", graph.num_edges, "E", (2,), "(E, H)")
        C.value_heads(logits, v, "logits")
        scale = C.real(scale, "scale") if scale is not None else 1.0
    elif logits is not None:
        raise ValueError(f"logits= is used only with score='given', got score={score!r}")
    elif score == "dot":
        q = C.check_tensor(q, "q", graph, "(num_dst, H, D)")
        k = C.check_tensor(k, "k", graph, "(num_src, H, D)")
        C.check_rows(q, "q", graph.num_dst, "num_dst", (3,), "(num_dst, H, D)")
        C.check_rows(k, "k", graph.num_src, "num_src", (3,), "(num_src, H, D)")
        if q.shape[1:] != k.shape[1:]:
            raise ValueError(f"q and k must have the same (H, D), got {tuple(q.shape[1:])} and {tuple(k.shape[1:])}")
        C.check_width(q, "q", "(num_dst, H, D)")
        scale = C.real(scale, "scale") if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    else:
        q = C.check_tensor(q, "q", graph, "(num_dst, H)")
        k = C.check_tensor(k, "k", graph, "(num_src, H)")
        q = C.squeeze_dgl(q, "q", graph.num_dst, "num_dst", "(num_dst, H)")
        k = C.squeeze_dgl(k, "k", graph.num_src, "num_src", "(num_src, H)")
        if scale is not None:
            raise ValueError("scale is used with score='dot' or 'given'; the additive score has no scale")
    if score != "given":
        C.same_heads(q, k, "q", "k")
        C.value_heads(k, v, "k")
    H = logits.shape[1] if score == "given" else q.shape[1]  # the scores' heads; v has them or one
    values = None  # the bias's values: the per-edge tensor, or a TableBias's table (cast and dtype-checked)
    if isinstance(bias, TableBias):
        values = C.table_bias(bias, graph, H)
    elif bias is not None:
        values = C.per_edge(bias, "bias", graph, H, flat_is="column")  # (E, H) or (E, 1)
    if edge_weight is not None:
        edge_weight = C.per_edge(edge_weight, "edge_weight", graph, H, flat_is="weight")
    if out_bias is not None:
        out_bias = C.check_tensor(out_bias, "out_bias", graph, "(H, Dv)")
        C.broadcasts_to(out_bias, "out_bias", (H, v.shape[2]), "(H, Dv)")
    q, k, v, logits, values, edge_weight, out_bias = _autocast(graph, q, k, v, logits, values, edge_weight, out_bias)
    if not isinstance(bias, TableBias):
        bias = values
    elif values is not bias.table:
        bias = bias.with_table(values)
    C.same_dtype(v=v, q=q, k=k, logits=logits, bias=values, edge_weight=edge_weight, out_bias=out_bias)
    negative_slope = C.real(negative_slope, "negative_slope")
    dropout_p = C.real(dropout_p, "dropout_p", lo=0.0, hi=1.0)
    dropout_p = dropout_p if training else 0.0
    opts = dict(
        score=score, logits=logits, scale=scale, bias=bias, negative_slope=negative_slope, edge_weight=edge_weight,
        dropout_p=dropout_p, return_attention=bool(return_attention),
    )
    # shared values (one head of v for all H): backends are asked about, and except the ones that read
    # them so get, v expanded to H heads (a view; autograd sums its gradient over the heads)
    full = v.expand(v.shape[0], H, v.shape[2]) if v.shape[1] != H else v
    mod = select(_pick(backend, H), graph, q, k, full, bias, edge_weight, logits, op="sparse_attention", **opts)
    if torch.compiler.is_compiling() or not takes_shared_values(mod):
        v = full
    if isinstance(bias, TableBias) and not takes_table_bias(mod):
        opts["bias"] = bias.per_edge()  # (E, H) or (E, 1)
    if out_bias is not None and takes_out_bias(mod):
        return mod.sparse_attention(graph, q, k, v, out_bias=out_bias, **opts)
    fused = getattr(mod, "sparse_attention", None)
    res = fused(graph, q, k, v, **opts) if fused is not None else compose(mod, graph, q, k, v, **opts)
    return add_out_bias(res, out_bias)


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
    a = mod.edge_softmax(graph, s.contiguous())  # (E, H); DGL refuses strided views
    if dropout_p > 0.0:
        a = F.dropout(a, dropout_p, training=True)
    if edge_weight is not None:
        a = a * (edge_weight.unsqueeze(-1) if edge_weight.dim() == 1 else edge_weight)
    out = mod.aggregate(graph, a, v)  # (N_dst, H, D)
    return (out, a) if return_attention else out
