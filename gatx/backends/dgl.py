"""DGL backend: DGL's fused sparse kernels (gSDDMM, edge softmax, gSpMM) through ``dgl.ops``.

DGL 2.1.0, the newest Linux wheel, fails to import on recent torch for reasons that do not touch its
core kernels: ``dgl.graphbolt`` needs a ``libgraphbolt_pytorch_<torch version>.so`` that was never
built for that torch (and, with torchdata >= 0.10, the removed ``torchdata.datapipes``). Only when a
plain ``import dgl`` fails inside ``dgl.graphbolt`` does :func:`import_dgl` retry with that one
subpackage replaced by a stub that raises a clear error when anything in it is touched, and warn
once. Any other failure is reported as a reason, and gatx runs on its own backends.
"""
from __future__ import annotations

import sys
import traceback
import types
import warnings
from typing import Any

import torch
from torch import Tensor

from ..graph import Graph

NAME = "dgl"

class _ImportState:
    """What the one import attempt gave: the module, or the reason it failed."""

    module: Any = None
    error: str | None = None
    tried: bool = False
    cuda: bool | None = None


_state = _ImportState()


class GraphboltUnavailable(AttributeError):
    """Raised when code touches ``dgl.graphbolt`` after gatx stubbed it out."""


def _graphbolt_stub() -> types.ModuleType:
    stub = types.ModuleType("dgl.graphbolt")
    stub.__doc__ = "Stub installed by gatx: the real dgl.graphbolt cannot load on this torch."

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise GraphboltUnavailable(
            f"dgl.graphbolt.{name} is unavailable: DGL {_dgl_version()} ships no graphbolt library for "
            f"torch {torch.__version__}, so gatx replaced dgl.graphbolt with a stub to use DGL's core "
            "kernels. Install a DGL build that matches your torch to use GraphBolt."
        )

    stub.__getattr__ = __getattr__  # module-level __getattr__ (PEP 562)
    return stub


def _dgl_version() -> str:
    try:
        from importlib.metadata import version

        return version("dgl")
    except Exception:  # noqa: BLE001
        return "?"


def _failed_in_graphbolt(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return any("/dgl/graphbolt/" in f.filename.replace("\\", "/") for f in frames)


def _purge_dgl_modules() -> None:
    for name in [n for n in sys.modules if n == "dgl" or n.startswith("dgl.")]:
        del sys.modules[name]


def import_dgl() -> Any:
    """Import DGL (with the narrow graphbolt workaround if needed) or raise ImportError with the reason."""
    if _state.module is not None:
        return _state.module
    if _state.tried:
        raise ImportError(_state.error)
    _state.tried = True
    try:
        import dgl  # noqa: F401
    except Exception as err:  # noqa: BLE001 - DGL raises many kinds; each becomes a reason
        if not _failed_in_graphbolt(err):
            msg = f"{type(err).__name__}: {err}"
            if "setuptools.extern" in str(err):
                msg += " (DGL needs the 'packaging' package on setuptools >= 70: pip install packaging)"
            _purge_dgl_modules()
            _state.error = f"import dgl failed: {msg}"
            raise ImportError(_state.error) from err
        first = f"{type(err).__name__}: {err}"
        _purge_dgl_modules()
        stub = _graphbolt_stub()
        sys.modules["dgl.graphbolt"] = stub
        try:
            import dgl

            dgl.graphbolt = stub  # so `dgl.graphbolt.X` reaches the stub's clear error
        except Exception as err2:  # noqa: BLE001
            _purge_dgl_modules()
            _state.error = f"import dgl failed even without dgl.graphbolt: {type(err2).__name__}: {err2}"
            raise ImportError(_state.error) from err2
        warnings.warn(
            f"gatx: `import dgl` failed inside dgl.graphbolt ({first}), which this DGL build cannot load "
            f"on torch {torch.__version__}. gatx imported DGL with dgl.graphbolt replaced by a stub that "
            "raises if used; DGL's core kernels (used by gatx) work as usual.",
            RuntimeWarning,
            stacklevel=2,
        )
    import dgl

    _state.module = dgl
    return dgl


def availability() -> str | None:
    """None when DGL imports, else the reason it does not."""
    try:
        import_dgl()
    except ImportError as err:
        return str(err)
    return None


def _cuda_ok() -> bool:
    if _state.cuda is None:
        dgl = import_dgl()
        try:
            dgl.graph(([0], [0]), device="cuda")
            _state.cuda = True
        except Exception:  # noqa: BLE001
            _state.cuda = False
    return _state.cuda


def reasons(graph: Graph, *tensors: Tensor | None, op: str = "", **opts: Any) -> list[str]:
    """Why DGL cannot run this input (empty list: it can)."""
    why = availability()
    if why is not None:
        return [why]
    out = []
    device = graph.device
    if device.type == "cuda":
        if not _cuda_ok():
            out.append("this DGL build has no CUDA support")
    elif device.type != "cpu":
        out.append(f"DGL runs on cpu and cuda only, got {device}")
    for t in tensors:
        if t is not None and t.is_floating_point():
            ok = (torch.float32, torch.float64) if device.type == "cpu" else (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            if t.dtype not in ok:
                out.append(f"DGL on {device.type} does not support {t.dtype}")
                break
    return out


def gat_score(graph: Graph, el: Tensor, er: Tensor) -> Tensor:
    return import_dgl().ops.u_add_v(graph.to_dgl(), el, er)


def dot_score(graph: Graph, q: Tensor, k: Tensor) -> Tensor:
    return import_dgl().ops.u_dot_v(graph.to_dgl(), k, q).squeeze(-1)


def edge_softmax(graph: Graph, scores: Tensor) -> Tensor:
    return import_dgl().ops.edge_softmax(graph.to_dgl(), scores)


def aggregate(graph: Graph, attn: Tensor, v: Tensor) -> Tensor:
    return import_dgl().ops.u_mul_e_sum(graph.to_dgl(), v, attn.unsqueeze(-1))
