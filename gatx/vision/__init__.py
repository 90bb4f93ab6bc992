"""Vision attention as grid graphs: neighborhood and (shifted) window attention on gatx's sparse kernel."""
from .attention import NeighborhoodAttention2d, WindowAttention
from .grid import GridStructure, neighborhood_graph, window_graph

__all__ = ["GridStructure", "NeighborhoodAttention2d", "WindowAttention", "neighborhood_graph", "window_graph"]
