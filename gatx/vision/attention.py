"""Vision attention modules on grid graphs: neighborhood attention and (shifted) window attention.

The modules live in :mod:`gatx.vision.neighborhood` (NATTEN's 1-D / 2-D / 3-D neighborhoods) and
:mod:`gatx.vision.window` (Swin, its temporal path, Video Swin), on the shared forward of
:mod:`gatx.vision.grid_attention`; this module keeps ``from gatx.vision.attention import ...`` working.
"""
from .grid_attention import _GridAttention
from .neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d
from .window import WindowAttention, WindowAttention3d

__all__ = [
    "NeighborhoodAttention1d", "NeighborhoodAttention2d", "NeighborhoodAttention3d", "WindowAttention", "WindowAttention3d",
    "_GridAttention",
]
