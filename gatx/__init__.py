"""gatx: sparse graph attention for PyTorch, one kernel family for graphs and images."""
from . import ops, vision
from .graph import CSR, Graph
from .nn import GATConv, GATv2Conv, ZeroInDegreeError
from .backends.dgl import GatxDGLWorkaroundWarning, import_dgl  # imports DGL only when called
from .backends.fused_build import GatxKernelCacheWarning

__version__ = "0.1.0"
__all__ = ["CSR", "Graph", "GATConv", "GATv2Conv", "ZeroInDegreeError", "GatxDGLWorkaroundWarning", "GatxKernelCacheWarning", "import_dgl", "ops", "vision", "__version__"]
