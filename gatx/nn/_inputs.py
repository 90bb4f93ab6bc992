"""Validation of the graph layers' arguments and inputs, once, at the layer boundary.

Constructor arguments: positive widths and head counts, dropout probabilities in [0, 1].
Forward inputs: the graph (gatx Graph, DGL graph or edge_index), features of shape (N, *, D_in)
(dense; sparse COO / CSR only as (N, D_in)) whose dtype and device match the layer's parameters,
and edge features. Every failure is a ValueError that says what was expected, what was received
and how to fix it.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..graph import Graph
from ._utils import as_graph, dropout, is_sparse, rows_prefix
from .errors import zero_in_degree_error


def check_width(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_in_feats(in_feats: Any) -> tuple[int, int]:
    """``in_feats`` as (src_width, dst_width): an int, or a pair of ints for bipartite input."""
    if isinstance(in_feats, tuple):
        if len(in_feats) != 2:
            raise ValueError(f"in_feats must be an int or a (src_width, dst_width) pair, got {in_feats!r}")
        return check_width(in_feats[0], "in_feats[0]"), check_width(in_feats[1], "in_feats[1]")
    w = check_width(in_feats, "in_feats")
    return w, w


def check_prob(p: Any, name: str) -> float:
    """A dropout probability: a real number in [0, 1] (NaN refused)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def store_layer_args(layer: Any, in_feats: Any, out_feats: Any, num_heads: Any, feat_drop: Any, attn_drop: Any,
                     allow_zero_in_degree: bool, edge_feats: Any, backend: str | None) -> tuple[int, int, int | None, float, float]:
    """Validate the arguments GATConv and GATv2Conv share and store them under DGL's attribute names;
    returns ``(num_heads, out_feats, edge_feats, feat_drop, attn_drop)`` checked."""
    layer._in_src_feats, layer._in_dst_feats = check_in_feats(in_feats)
    layer._num_heads = num_heads = check_width(num_heads, "num_heads")
    layer._out_feats = out_feats = check_width(out_feats, "out_feats")
    layer._edge_feats = edge_feats = check_width(edge_feats, "edge_feats") if edge_feats is not None else None
    layer._allow_zero_in_degree = allow_zero_in_degree
    layer.backend = backend
    return num_heads, out_feats, edge_feats, check_prob(feat_drop, "feat_drop"), check_prob(attn_drop, "attn_drop")


def check_feat(x: Any, width: int, rows: int | None, name: str, param: Tensor) -> None:
    """(N, *, width) dense, or (N, width) sparse COO / CSR; floating, with the parameters' dtype and device."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor of shape (N, *, in_feats={width}), got {type(x).__name__}")
    sparse = is_sparse(x)
    if not sparse and x.layout != torch.strided:
        raise ValueError(f"{name} must be dense or sparse COO / CSR, got layout {x.layout}; convert it with .to_sparse_csr()")
    if x.dim() < 2 or (sparse and x.dim() != 2):
        want = f"(N, in_feats={width})" if sparse else f"(N, *, in_feats={width})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.shape[-1] != width:
        raise ValueError(
            f"{name} has {x.shape[-1]} features per node but the layer was built with in_feats={width}; "
            "construct the layer with the matching in_feats"
        )
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows but the graph has {rows} such nodes")
    if not x.is_floating_point():
        kind = "sparse " if sparse else ""
        raise ValueError(f"{name} must be a {kind}floating-point tensor, got {x.dtype}; convert it with {name}.float()")
    if x.dtype != param.dtype:
        raise ValueError(
            f"{name} is {x.dtype} but the layer's parameters are {param.dtype}; cast the model "
            f"(layer.to({x.dtype})) or the input ({name}.to({param.dtype}))"
        )
    if x.device != param.device:
        raise ValueError(
            f"{name} is on {x.device} but the layer's parameters are on {param.device}; move the model or the "
            "input with .to(device)"
        )


class LayerInputs(NamedTuple):
    graph: Graph
    h_src: Tensor  # (N_src, *, F_src), after input dropout
    h_dst: Tensor  # (N_dst, *, F_dst)
    paired: bool  # feat was a (src, dst) pair
    prefix: tuple[int, ...]  # the * dimensions (empty for (N, F) input)


def layer_inputs(
    graph: Any, feat: Tensor | tuple[Tensor, Tensor], in_src: int, in_dst: int, p: float, training: bool,
    param: Tensor,
) -> LayerInputs:
    """Validate a layer's (graph, feat), build the Graph and apply input dropout.

    Without a pair, ``h_dst`` is the first ``num_dst`` rows of ``h_src`` (a block's dst nodes are
    its first src nodes).
    """
    if isinstance(feat, (tuple, list)):
        if len(feat) != 2:
            raise ValueError(f"feat must be a tensor or a (src_feat, dst_feat) pair, got {len(feat)} items")
        check_feat(feat[0], in_src, None, "src feat", param)
        check_feat(feat[1], in_dst, None, "dst feat", param)
        if feat[0].shape[1:-1] != feat[1].shape[1:-1]:
            raise ValueError(
                f"src feat and dst feat must have the same middle dimensions (N, *, D_in), got "
                f"{tuple(feat[0].shape)} and {tuple(feat[1].shape)}"
            )
        g = as_graph(graph, feat[0].shape[0], feat[1].shape[0])
        check_feat(feat[0], in_src, g.num_src, "src feat", param)
        check_feat(feat[1], in_dst, g.num_dst, "dst feat", param)
        prefix = tuple(feat[0].shape[1:-1])
        return LayerInputs(g, dropout(feat[0], p, training), dropout(feat[1], p, training), True, prefix)
    check_feat(feat, in_src, None, "feat", param)
    g = as_graph(graph, feat.shape[0], feat.shape[0])
    check_feat(feat, in_src, g.num_src, "feat", param)
    if g.num_dst != g.num_src and not g.is_block:
        raise ValueError(
            f"this graph is bipartite ({g.num_src} src, {g.num_dst} dst nodes): pass feat as a "
            "(src_feat, dst_feat) pair, or build the graph with is_block=True"
        )
    h_src = dropout(feat, p, training)
    return LayerInputs(g, h_src, rows_prefix(h_src, g.num_dst), False, tuple(feat.shape[1:-1]))


def check_zero_in_degree(graph: Graph, allow: bool) -> None:
    """Raise :class:`~gatx.nn.ZeroInDegreeError` (a ValueError, and a ``dgl.DGLError`` once DGL is imported).

    While ``torch.compile`` traces, the count cannot be read on the host: the check runs as the
    custom op ``gatx::check_in_degrees``, which the compiled graph keeps (it has a side effect) and
    which raises the same error when the compiled function runs.
    """
    if allow or graph.num_dst == 0:
        return
    if torch.compiler.is_compiling():
        torch.ops.gatx.check_in_degrees(graph.in_degrees())
        return
    _raise_if_missing(graph._num_zero_in_degree())


@torch.library.custom_op("gatx::check_in_degrees", mutates_args=())
def _check_in_degrees(in_degrees: Tensor) -> None:
    """Raise ZeroInDegreeError when an entry of the (num_dst,) in-degrees is 0 (a graph-layer check as an op)."""
    _raise_if_missing(int((in_degrees == 0).sum()))


@_check_in_degrees.register_fake
def _check_in_degrees_fake(in_degrees: Tensor) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.gatx.check_in_degrees.default)  # a check: never dead code


def _raise_if_missing(missing: int) -> None:
    """Raise ZeroInDegreeError when ``missing`` (the number of dst nodes without an incoming edge) is not 0."""
    if missing:
        raise zero_in_degree_error(
            f"{missing} dst nodes have no incoming edge, so their output would be invalid; add "
            "self-loops with graph.add_self_loops() (dgl.add_self_loop(g) for a DGL graph) or pass "
            "allow_zero_in_degree=True to give them zeros"
        )


def check_edge_feat(layer: Any, edge_feat: Any, graph: Graph, width: int | None, param: Tensor) -> None:
    if layer.fc_edge is None:
        raise ValueError("edge_feat was given but the layer was built without edge_feats=...")
    if not isinstance(edge_feat, Tensor) or edge_feat.layout != torch.strided:
        raise ValueError(f"edge_feat must be a dense tensor of shape (E={graph.num_edges}, edge_feats={width}), got {type(edge_feat).__name__}")
    if edge_feat.dim() != 2 or edge_feat.shape != (graph.num_edges, width):
        raise ValueError(f"edge_feat must have shape (E={graph.num_edges}, edge_feats={width}), got {tuple(edge_feat.shape)}")
    check_feat(edge_feat, width, None, "edge_feat", param)


def fold(prefix: tuple[int, ...]) -> int:
    """How many copies of the heads the * dimensions make (heads are folded as (N, S*H, D))."""
    return math.prod(prefix)
