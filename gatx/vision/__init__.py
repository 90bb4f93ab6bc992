"""Vision attention as graphs on gatx's sparse kernel: fixed grids (neighborhoods, (shifted) windows,
1-D / 2-D / 3-D, causal), virtual queries with a fold (outlook attention, ACmix) and data-dependent
routed graphs (bi-level routing attention)."""
from .acmix import ACmix
from .attention import (
    NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d, WindowAttention, WindowAttention3d,
)
from .biformer import BiLevelRoutingAttention
from .grid import GridStructure, neighborhood_graph, window_graph
from .outlook import OutlookAttention
from .routing import region_pool, region_table, routed_region_graph
from .unfold import UnfoldStructure, fold, unfold_graph

__all__ = [
    # graphs
    "GridStructure", "neighborhood_graph", "window_graph", "UnfoldStructure", "unfold_graph", "fold",
    "region_pool", "region_table", "routed_region_graph",
    # modules
    "NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d", "WindowAttention",
    "WindowAttention3d", "OutlookAttention", "BiLevelRoutingAttention", "ACmix",
]
