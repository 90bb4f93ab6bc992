"""Vision attention as grid graphs: neighborhood and (shifted) window attention on gatx's sparse kernel."""
from .attention import NeighborhoodAttention2d, WindowAttention
from .grid import GridStructure, neighborhood_graph, window_graph
from .acmix import ACmix
from .outlook import OutlookAttention
from .unfold import UnfoldStructure, fold, unfold_graph

__all__ = ["GridStructure", "NeighborhoodAttention2d", "WindowAttention", "neighborhood_graph", "window_graph"]
__all__ += ["ACmix", "OutlookAttention", "UnfoldStructure", "fold", "unfold_graph"]
