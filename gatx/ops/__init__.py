"""Functional sparse-attention kernels over a :class:`gatx.Graph`; each takes ``backend=``."""
from ._bias import TableBias
from ._dispatch import BACKENDS, BackendUnavailable, select
from .attention import aggregate, dot_score, edge_softmax, gat_score, sparse_attention

__all__ = [
    "BACKENDS", "BackendUnavailable", "TableBias", "select",
    "aggregate", "dot_score", "edge_softmax", "gat_score", "sparse_attention",
]
