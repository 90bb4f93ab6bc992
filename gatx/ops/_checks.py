"""Input validation for ``gatx.ops``: every check runs once, at the op boundary, before any backend.

Rules (the same for every backend, so automatic dispatch never picks a backend that then fails):

- tensors are dense (strided), floating point, on the graph's device, with exactly the documented
  number of dimensions (a tensor that would broadcast into a wrong shape is refused, not reshaped);
- all floating inputs of one call share one dtype: a mix (e.g. a float64 ``edge_weight`` with float32
  ``v``) raises a ValueError that names both tensors and says which cast fixes it;
- per-edge and per-node tensors have exactly E, ``num_src`` or ``num_dst`` rows;
- the DGL layouts with a trailing singleton dimension are accepted and squeezed where they are
  unambiguous: additive ``q`` / ``k`` (N, H, 1) and ``aggregate``'s ``attn`` (E, H, 1); a per-edge
  ``bias`` (E,) is read as (E, 1), i.e. shared by all heads;
- scalars (``scale``, ``negative_slope``, ``dropout_p``) are finite real numbers, ``dropout_p`` in [0, 1].
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

from ..graph import Graph


def check_graph(graph: Any) -> None:
    if not isinstance(graph, Graph):
        raise ValueError(
            f"graph must be a gatx.Graph, got {type(graph).__name__}; build one with gatx.Graph(src, dst), "
            "Graph.from_edge_index or Graph.from_dgl"
        )


def check_tensor(t: Any, name: str, graph: Graph, shape: str) -> Tensor:
    """``t`` is a dense floating-point tensor on the graph's device (``shape`` is for the message)."""
    if not isinstance(t, Tensor):
        hint = f"; wrap it with torch.as_tensor({name})" if isinstance(t, (list, tuple)) else ""
        if isinstance(t, numbers.Number):
            hint = f"; for one value on every edge pass torch.full(..., {t!r}) with the shape above"
        raise ValueError(f"{name} must be a tensor of shape {shape}, got {type(t).__name__}{hint}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; call {name}.to_dense()")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}; convert it with {name}.float()")
    if t.device != graph.device:
        raise ValueError(f"{name} is on {t.device} but the graph is on {graph.device}; move one with .to(device)")
    return t


def check_rows(t: Tensor, name: str, rows: int, rows_name: str, dims: tuple[int, ...], shape: str) -> None:
    """``t`` has ``rows`` rows and one of ``dims`` dimensions."""
    if t.dim() not in dims or t.shape[0] != rows:
        raise ValueError(f"{name} must have shape {shape} with {rows_name}={rows}, got {tuple(t.shape)}")


def check_width(t: Tensor, name: str, shape: str) -> None:
    """The last (feature) dimension of ``t`` is not empty."""
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature per head (D >= 1), got shape {tuple(t.shape)} ({shape})")


def same_heads(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{na} and {nb} must have the same number of heads, got {a.shape[1]} and {b.shape[1]}")


def value_heads(scores: Tensor, v: Tensor, name: str) -> None:
    """v has the scores' heads, or one head that every head reads (shared values)."""
    if v.shape[1] not in (1, scores.shape[1]):
        raise ValueError(f"{name} and v must have the same number of heads, or v one head shared by all, got "
                         f"{scores.shape[1]} and {v.shape[1]}")


def broadcasts_to(t: Tensor, name: str, shape: tuple[int, ...], described: str) -> None:
    """``t`` broadcasts to exactly ``shape`` (``described`` names it in the message)."""
    try:
        ok = torch.broadcast_shapes(t.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must have shape {described} = {tuple(shape)} or one that broadcasts to it, got {tuple(t.shape)}")


def same_dtype(**tensors: Tensor | None) -> None:
    """All given floating tensors share one dtype; the first named one sets it."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first, ref = named[0]
    for name, t in named[1:]:
        if t.dtype != ref.dtype:
            raise ValueError(
                f"{name} is {t.dtype} but {first} is {ref.dtype}: the inputs of one call must share one dtype; "
                f"cast {name} with {name}.to({ref.dtype}) (or the others to {t.dtype})"
            )


def squeeze_dgl(t: Tensor, name: str, rows: int, rows_name: str, shape: str) -> Tensor:
    """(N, H) as given, or DGL's (N, H, 1) squeezed to (N, H); anything else is refused."""
    if t.dim() == 3 and t.shape[0] == rows and t.shape[2] == 1:
        return t.squeeze(2)
    if t.dim() == 3 and t.shape[0] == rows:
        raise ValueError(
            f"{name} must hold one score term per node and head, shape {shape} (or DGL's (N, H, 1)) with "
            f"{rows_name}={rows}, got {tuple(t.shape)}; reduce the last dimension first (e.g. "
            f"(feat * attn).sum(-1)), or use gat_score / edge_softmax / aggregate for vector (GATv2) scores"
        )
    check_rows(t, name, rows, rows_name, (2,), shape)
    return t


def per_edge(t: Any, name: str, graph: Graph, heads: int, *, flat_is: str) -> Tensor:
    """A per-edge tensor: (E,), (E, 1) or (E, H). ``flat_is="column"`` turns (E,) into (E, 1)."""
    E = graph.num_edges
    shape = f"(E,), (E, 1) or (E, H) with E={E}, H={heads}"
    t = check_tensor(t, name, graph, shape)
    if t.dim() not in (1, 2) or t.shape[0] != E or (t.dim() == 2 and t.shape[1] not in (1, heads)):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t.unsqueeze(1) if flat_is == "column" and t.dim() == 1 else t


def table_bias(bias: Any, graph: Graph, heads: int) -> Tensor:
    """A :class:`~gatx.ops.TableBias` for this graph (an index per edge, H or 1 heads); returns its table."""
    table = check_tensor(bias.table, "bias.table", graph, "(R, H)")
    E = graph.num_edges
    if bias.num_edges != E:
        raise ValueError(f"bias (a TableBias) must index one table row per edge, E={E}, got {bias.num_edges} indices")
    if bias.heads not in (1, heads):
        raise ValueError(
            f"bias (a TableBias) must give H={heads} or 1 heads, got repeat={bias.repeat} x {bias.table.shape[1]} table columns"
        )
    return table


def real(x: Any, name: str, *, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number (0-dim tensors without gradient are read as numbers)."""
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.requires_grad:
            what = "requires grad" if x.requires_grad else f"has shape {tuple(x.shape)}"
            raise ValueError(
                f"{name} must be a Python number, got a tensor that {what}; for a learnable {name} multiply the "
                "scores' input (q or logits) by it instead"
            )
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not -math.inf < x < math.inf:  # math.isfinite, in a form torch.compile traces for symbolic floats
        raise ValueError(f"{name} must be finite, got {x}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {x}")
    return x
