"""gatx: sparse graph attention for PyTorch, one kernel family for graphs and images."""
from . import ops, vision
from .graph import CSR, Graph
from .nn import GATConv, GATv2Conv, ZeroInDegreeError

__version__ = "0.1.0"
__all__ = ["CSR", "Graph", "GATConv", "GATv2Conv", "ZeroInDegreeError", "ops", "vision", "__version__"]
