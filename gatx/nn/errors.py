"""Errors raised by the graph layers, compatible with code written for DGL.

DGL's layers raise ``dgl.DGLError`` for a graph with zero-in-degree nodes; gatx raises
:class:`ZeroInDegreeError`, a ``ValueError``. So that ``except dgl.DGLError`` keeps working for code
ported from DGL, the raised error is also a ``dgl.DGLError`` whenever DGL is already imported in the
process (it must be, for such code to name ``dgl.DGLError``). gatx never imports DGL to raise it:
``import gatx`` and a failing forward stay free of DGL's import cost.
"""
from __future__ import annotations

import sys
from functools import lru_cache

__all__ = ["ZeroInDegreeError", "zero_in_degree_error"]


class ZeroInDegreeError(ValueError):
    """Some dst nodes have no incoming edge, so a layer's output for them would be meaningless.

    Fix: add self-loops (``graph.add_self_loops()``, ``dgl.add_self_loop(g)``) or build the layer
    with ``allow_zero_in_degree=True`` (those nodes then get zeros plus the bias).

    >>> import torch, gatx
    >>> g = gatx.Graph(torch.tensor([0]), torch.tensor([1]), 2, 2)
    >>> try:
    ...     gatx.GATConv(3, 2, 1)(g, torch.randn(2, 3))
    ... except gatx.nn.ZeroInDegreeError as err:
    ...     print(isinstance(err, ValueError), str(err).split(";")[0])
    True 1 dst nodes have no incoming edge, so their output would be invalid
    """


@lru_cache(maxsize=None)
def _with_dgl_base(dgl_error: type) -> type:
    """ZeroInDegreeError that is also the given ``dgl.DGLError`` class (made once per class)."""

    class DGLZeroInDegreeError(ZeroInDegreeError, dgl_error):
        """A :class:`ZeroInDegreeError` that is also a ``dgl.DGLError`` (raised once DGL is imported)."""

    return DGLZeroInDegreeError


def zero_in_degree_error(message: str) -> ZeroInDegreeError:
    """The error to raise: a :class:`ZeroInDegreeError`, and a ``dgl.DGLError`` if DGL is imported."""
    dgl = sys.modules.get("dgl")
    base = getattr(dgl, "DGLError", None) if dgl is not None else None
    if isinstance(base, type) and issubclass(base, Exception) and not issubclass(ZeroInDegreeError, base):
        return _with_dgl_base(base)(message)
    return ZeroInDegreeError(message)
