"""DGL backend: DGL's fused sparse kernels (gSDDMM, edge softmax, gSpMM) through ``dgl.ops``.

DGL 2.1.0, the newest Linux wheel, fails to import on recent torch for reasons that do not touch its
core kernels: ``dgl.graphbolt`` needs a ``libgraphbolt_pytorch_<torch version>.so`` that was never
built for that torch (and, with torchdata >= 0.10, the removed ``torchdata.datapipes``). Only when a
plain ``import dgl`` fails inside ``dgl.graphbolt`` does :func:`import_dgl` retry with that one
subpackage replaced by a stub that raises a clear error when anything in it is touched, and warn
once. Any other failure is reported as a reason, and gatx runs on its own backends.
"""
from __future__ import annotations

import importlib.abc
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


class GatxDGLWorkaroundWarning(RuntimeWarning):
    """DGL was imported with ``dgl.graphbolt`` replaced by a stub (its library does not fit this torch).

    A fact, not a fault: DGL's core kernels work as usual. Emitted once per process; silence it with
    ``warnings.filterwarnings("ignore", category=gatx.GatxDGLWorkaroundWarning)``.
    """


class GraphboltUnavailable(AttributeError):
    """Raised when code touches ``dgl.graphbolt.<name>`` after gatx stubbed it out."""


class GraphboltImportError(ImportError):
    """Raised by ``from dgl.graphbolt import <name>`` (or ``import dgl.graphbolt.<sub>``) under the stub."""


def _graphbolt_message(name: str) -> str:
    return (
        f"dgl.graphbolt.{name} is unavailable: DGL {_dgl_version()} ships no graphbolt library for "
        f"torch {torch.__version__}, so gatx replaced dgl.graphbolt with a stub to use DGL's core "
        "kernels. Install a DGL build that matches your torch to use GraphBolt."
    )


class _GraphboltFinder(importlib.abc.MetaPathFinder):
    """Makes ``from dgl.graphbolt import X`` raise the stub's explanation instead of "unknown location".

    ``from package import X`` first tries ``X`` as a submodule when the attribute is missing; this
    finder answers for ``dgl.graphbolt.*`` while the stub is installed, and for nothing else.
    """

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        stub = sys.modules.get("dgl.graphbolt")
        if fullname.startswith("dgl.graphbolt.") and getattr(stub, "__gatx_stub__", False):
            raise GraphboltImportError(_graphbolt_message(fullname[len("dgl.graphbolt."):]), name=fullname)
        return None


def _graphbolt_stub() -> types.ModuleType:
    stub = types.ModuleType("dgl.graphbolt")
    stub.__doc__ = "Stub installed by gatx: the real dgl.graphbolt cannot load on this torch."
    stub.__path__ = []  # a package, so `from dgl.graphbolt import X` asks the finder above
    stub.__gatx_stub__ = True

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise GraphboltUnavailable(_graphbolt_message(name))

    stub.__getattr__ = __getattr__  # module-level __getattr__ (PEP 562)
    if not any(isinstance(f, _GraphboltFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _GraphboltFinder())
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
    """A working ``dgl`` module, also where a plain ``import dgl`` fails on this torch (public: ``gatx.import_dgl``).

    Where DGL 2.1's ``dgl.graphbolt`` cannot load (no library for this torch), DGL is imported with
    that one subpackage replaced by a stub that explains itself when touched, and a
    :class:`GatxDGLWorkaroundWarning` is emitted once. Afterwards a plain ``import dgl`` in the same
    process returns this module. Raises ImportError with the reason when DGL cannot be imported.

    >>> dgl = gatx.import_dgl()  # doctest: +SKIP
    >>> g = gatx.Graph.from_dgl(dgl.graph(([0, 1], [1, 2])))  # doctest: +SKIP
    """
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
            f"gatx: DGL {_dgl_version()}'s dgl.graphbolt cannot load on torch {torch.__version__} ({first}); "
            "DGL was imported with dgl.graphbolt replaced by a stub that explains itself if used. DGL's core "
            "kernels (used by gatx) work as usual. Filter this with category=gatx.GatxDGLWorkaroundWarning.",
            GatxDGLWorkaroundWarning,
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


class _EdgeSoftmax(torch.autograd.Function):
    """DGL's edge-softmax kernel forward; a backward written in differentiable torch ops.

    DGL's own backward is first-order only (a gradient penalty through it came out wrong); this one
    is ``a * (g - sum_row(a * g))`` on the saved output, so higher-order gradients are exact.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, graph: Graph) -> Tensor:
        a = import_dgl().ops.edge_softmax(graph.to_dgl(), scores)
        ctx.save_for_backward(a)
        ctx.graph = graph
        return a

    @staticmethod
    def backward(ctx, grad: Tensor):
        (a,) = ctx.saved_tensors
        dst = ctx.graph.dst
        ga = grad * a  # (E, H, ...)
        row = ga.new_zeros((ctx.graph.num_dst,) + tuple(ga.shape[1:])).index_add(0, dst, ga)  # (N_dst, H, ...)
        return ga - a * row.index_select(0, dst), None


def edge_softmax(graph: Graph, scores: Tensor) -> Tensor:
    """DGL's edge softmax, with gatx's rule for a dst row whose scores are all -inf: 0 attention, 0 gradient.

    (DGL alone gives NaN there, from exp(-inf - (-inf)); the other backends give 0.)
    """
    neg = torch.isneginf(scores)
    if bool(neg.any()):  # one cheap pass; the rest runs only when some score is -inf
        live = scores.new_zeros((graph.num_dst,) + tuple(scores.shape[1:])).index_add_(0, graph.dst, (~neg).to(scores.dtype))
        dead = (live == 0).index_select(0, graph.dst)  # (E, H, ...): edges of rows without a finite score
        if bool(dead.any()):
            a = _EdgeSoftmax.apply(torch.where(dead, torch.zeros_like(scores), scores), graph)
            return torch.where(dead, torch.zeros_like(a), a)
    return _EdgeSoftmax.apply(scores, graph)


def aggregate(graph: Graph, attn: Tensor, v: Tensor) -> Tensor:
    return import_dgl().ops.u_mul_e_sum(graph.to_dgl(), v, attn.unsqueeze(-1))
