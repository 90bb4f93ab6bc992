"""Vision attention as grid graphs: neighborhood and (shifted) window attention on gatx's sparse kernel."""
from .attention import (
    NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d, WindowAttention, WindowAttention3d,
)
from .biformer import BiLevelRoutingAttention
from .grid import GridStructure, neighborhood_graph, window_graph
from .routing import region_pool, region_table, routed_region_graph
from .acmix import ACmix
from .outlook import OutlookAttention
from .unfold import UnfoldStructure, fold, unfold_graph

__all__ = ["GridStructure", "NeighborhoodAttention2d", "WindowAttention", "neighborhood_graph", "window_graph"]
__all__ += ["NeighborhoodAttention1d", "NeighborhoodAttention3d", "WindowAttention3d"]
__all__ += ["ACmix", "OutlookAttention", "UnfoldStructure", "fold", "unfold_graph"]
__all__ += ["BiLevelRoutingAttention", "region_pool", "region_table", "routed_region_graph"]
