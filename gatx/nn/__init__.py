"""Modules that own parameters and call :mod:`gatx.ops`."""
from .errors import ZeroInDegreeError
from .gatconv import GATConv
from .gatv2conv import GATv2Conv

__all__ = ["GATConv", "GATv2Conv", "ZeroInDegreeError"]
