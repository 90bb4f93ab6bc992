"""Input checks behind :class:`gatx.Graph` (kept apart so graph.py stays readable)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor


def as_index(t: Any, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t)
        except Exception as err:  # noqa: BLE001 - report what was received
            raise ValueError(f"{name} must be a 1-D integer tensor, got {type(t).__name__}") from err
        if t.numel() == 0:
            t = t.to(torch.int64)
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"{name} must be int64 or int32, got {t.dtype}; convert it with {name}.long()"
        )
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D with one entry per edge, got shape {tuple(t.shape)}")
    return t.to(torch.int64, copy=True, memory_format=torch.contiguous_format)  # owned: the caller may reuse t


def tensors_of(obj: Any, depth: int = 0) -> list[tuple[str, Tensor]]:
    """Every tensor held by a structure object (dataclass / named tuple / container fields, 4 levels deep)."""
    if isinstance(obj, Tensor):
        return [("", obj)]
    if depth >= 4 or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):
        items = list(zip(obj._fields, obj))
    elif isinstance(obj, (list, tuple)):
        items = [(str(i), x) for i, x in enumerate(obj)]
    elif isinstance(obj, dict):
        items = [(str(key), x) for key, x in obj.items()]
    else:
        return []
    return [(f"{name}.{sub}" if sub else name, t) for name, x in items for sub, t in tensors_of(x, depth + 1)]


def structure_edges(structure: Any) -> tuple[Tensor, Tensor] | None:
    """The (src, dst) a ``gatx.vision`` structure describes, from its tiling (None: no tiling to read).

    Uses ``structure.tiling.edges()`` when the tiling defines it, else the tiling contract of
    :mod:`gatx.backends.structured`: ``edge_pos`` (E,) positions in the dense (T, Qt, Kt) layout of
    ``mask``, ``query_nodes.index`` (T*Qt,) and ``key_nodes.index`` (T*Kt,) the node of every slot.
    """
    tiling = getattr(structure, "tiling", None)
    if tiling is None:
        return None
    if callable(getattr(tiling, "edges", None)):
        return tiling.edges()
    try:
        pos, (_, Qt, Kt) = tiling.edge_pos, tiling.mask.shape
        dst = tiling.query_nodes.index[pos // Kt]  # (E,)
        src = tiling.key_nodes.index[(pos // (Qt * Kt)) * Kt + pos % Kt]  # (E,)
    except (AttributeError, ValueError, TypeError, IndexError, RuntimeError):
        return None
    return src, dst


def as_count(n: Any, name: str) -> int:
    if isinstance(n, Tensor):
        if n.numel() != 1:
            raise ValueError(f"{name} must be a non-negative int, got a tensor of shape {tuple(n.shape)}")
        n = n.item()
    if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    n = int(n)
    if n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n}")
    return n


def is_sorted(key: Tensor) -> bool:
    """True when ``key`` (1-D) never decreases: its edges are already grouped (O(E), no sort)."""
    return key.numel() < 2 or bool((key[1:] >= key[:-1]).all())


def stable_order(key: Tensor, rows: int) -> Tensor:
    """``argsort(key, stable=True)`` (int64) for ids in [0, rows); sorts int32 keys when the ids fit
    (2x faster on CPU than int64)."""
    if rows <= torch.iinfo(torch.int32).max:
        return torch.argsort(key.to(torch.int32), stable=True).to(torch.int64)
    return torch.argsort(key, stable=True)


def checked_grouping(adj: tuple[Tensor, Tensor, Tensor], other: Tensor, key: Tensor, rows: int, kind: type) -> Any:
    """DGL's (indptr, other endpoint, edge ids) as a CSR / CSC if it describes these edges (O(E)), else None."""
    indptr, nbr, perm = (t.long() for t in adj)
    E = other.numel()
    if indptr.numel() != rows + 1 or nbr.numel() != E or perm.numel() != E or int(indptr[0]) != 0 \
            or int(indptr[-1]) != E or (E and (int(perm.min()) < 0 or int(perm.max()) >= E)):
        return None
    counts = indptr.diff()
    if rows and int(counts.min()) < 0:
        return None
    row_of = torch.repeat_interleave(torch.arange(rows, device=indptr.device), counts)  # (E,)
    if not (torch.equal(other.index_select(0, perm), nbr) and torch.equal(key.index_select(0, perm), row_of)):
        return None
    return kind(indptr, perm, nbr)
