"""A per-edge score bias read from a table (relative position bias, edge-type / distance encodings), and
the output bias that ``sparse_attention(out_bias=...)`` adds where a backend does not fuse it."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["TableBias"]


def add_out_bias(res: Tensor | tuple[Tensor, Tensor], out_bias: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    """``sparse_attention``'s result (the (N, H, Dv) output, or it and the attention) with the (H, Dv)
    ``out_bias`` added to every output row; ``res`` itself when there is none."""
    if out_bias is None:
        return res
    if isinstance(res, tuple):
        return res[0] + out_bias, res[1]
    return res + out_bias


class TableBias:
    r"""A per-edge score bias held as a table and one row index per edge, for ``sparse_attention(bias=...)``.

    .. math:: b_{e,\, r H_t + h} = \mathrm{table}[\mathrm{index}_e,\, h], \qquad 0 \le r < \mathrm{repeat}

    It is Swin's and NATTEN's relative position bias (a row per offset), or a Graphormer-style
    encoding (a row per distance or edge type). ``repeat`` copies the table's ``Ht`` heads for a
    batch folded into the heads (head ``r * Ht + h``). Its values equal the (E, repeat * Ht) tensor
    :meth:`per_edge` returns, which is what every backend receives, except the structured backend
    on a grid graph whose tiles all read the same rows (windows, shifted or not): there the bias
    stays one (Ht, Qt, Kt) block, added by broadcasting and its gradient summed over the tiles,
    instead of E * repeat * Ht values read and summed back (Swin's own formulation). Gradients reach
    ``table``; ``index`` is data.

    Args:
        table: (R, Ht) floating-point rows; Ht is 1 (one value for every head) or the heads per repeat.
        index: (E,) int64 / int32 row of ``table`` for every edge, each in [0, R).
        repeat: how many times the Ht heads repeat to make the call's heads (default 1).

    >>> import torch, gatx
    >>> g = gatx.Graph(torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 0, 2]))
    >>> q, k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    >>> bias = gatx.ops.TableBias(torch.randn(5, 2), torch.tensor([0, 4, 1, 1]))
    >>> gatx.ops.sparse_attention(g, q, k, v, bias=bias).shape
    torch.Size([3, 2, 4])
    """

    def __init__(self, table: Tensor, index: Tensor, repeat: int = 1) -> None:
        if not isinstance(table, Tensor) or table.dim() != 2:
            got = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
            raise ValueError(f"TableBias: table must be a tensor of shape (R, H), got {got}")
        if not isinstance(index, Tensor) or index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
            got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
            raise ValueError(f"TableBias: index must be an int64 or int32 tensor of shape (E,), got {got}")
        if index.device != table.device:
            raise ValueError(f"TableBias: index is on {index.device} but table is on {table.device}; move one with .to(device)")
        _check_repeat(repeat, "TableBias: repeat")
        if index.numel():
            lo, hi = (int(t) for t in torch.aminmax(index))
            if lo < 0 or hi >= table.shape[0]:
                raise ValueError(
                    f"TableBias: index values must lie in [0, {table.shape[0]}) (the table's rows), got values in [{lo}, {hi}]"
                )
        self.table, self.index, self.repeat = table, index, repeat

    @property
    def heads(self) -> int:
        """The heads of the per-edge bias: ``repeat * Ht``."""
        return self.repeat * self.table.shape[1]

    @property
    def num_edges(self) -> int:
        return self.index.numel()

    def with_table(self, table: Tensor) -> "TableBias":
        """The same bias reading ``table`` (same shape; e.g. cast to another dtype). A subclass with more
        state overrides this (no generic copy of ``__dict__``: Dynamo 2.11 cannot trace one)."""
        out = object.__new__(type(self))
        out.table, out.index, out.repeat = table, self.index, self.repeat
        return out

    def tile_rows(self, tiling: Any) -> Tensor | None:
        """(Qt * Kt,) table rows of the dense slots of ``tiling`` when every tile reads the same rows, else None."""
        return None

    def dense_rows(self, tiling: Any) -> tuple[Tensor, Tensor] | None:
        """The distinct row patterns of the tiles of ``tiling`` (C, Qt * Kt), the table row at every slot and
        ``R`` (one past the table: a -inf row) where the slot is masked, and each tile's pattern (T,), when
        precomputed (grid graphs whose tiles read different rows: neighborhoods); else None."""
        return None

    def _rows(self, table_t: Tensor) -> Tensor:
        """(Ht, E) rows of the transposed table (a subclass may gather faster)."""
        return table_t.index_select(1, self.index)

    def per_edge(self, table: Tensor | None = None) -> Tensor:
        """The (E, repeat * Ht) bias, from ``table`` if given (same shape) else ``self.table``: a transposed
        view of a head-major (repeat * Ht, E) tensor."""
        rows = self._rows((self.table if table is None else table).t())  # (Ht, E)
        if self.repeat > 1:
            rows = rows.repeat(self.repeat, 1)  # (repeat * Ht, E)
        return rows.t()  # (E, repeat * Ht)

    def stand_in(self) -> Tensor:
        """An (E, heads) tensor of the bias's dtype and device that holds no memory: what backends that
        take only per-edge tensors see while the dispatcher asks them whether they can run."""
        return self.table.new_zeros(()).expand(self.num_edges, self.heads)

    def __repr__(self) -> str:
        return f"TableBias(table={tuple(self.table.shape)}, edges={self.num_edges}, repeat={self.repeat})"


def _check_repeat(repeat: Any, name: str) -> None:
    """``repeat`` (the times the table's heads repeat, e.g. a batch folded into the heads) is an int >= 1."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"{name} must be an int >= 1, got {repeat!r}")
