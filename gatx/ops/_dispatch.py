"""Backend choice for ``gatx.ops``: a forced backend runs or raises with its reasons; ``None`` picks."""
from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..graph import Graph
from ._bias import TableBias

log = logging.getLogger("gatx")

# Preference order for backend=None: fastest first; "torch" runs everything.
BACKENDS = ("structured", "blocks", "triton", "fused", "dgl", "torch")
# Backends whose Python code torch.compile cannot trace (DGL's C API, Triton launches from an
# autograd.Function): while compiling, automatic choice skips them and forcing one raises.
_UNTRACEABLE = {
    "dgl": "DGL's kernels cannot be traced by torch.compile",
    "triton": "the triton backend is not traced by torch.compile yet",
}
_logged: set[tuple[str, str]] = set()
_modules: dict[str, ModuleType] = {}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given input; the message lists why."""


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {name!r}")
    if torch.compiler.is_compiling():  # not via the cache: a dict filled during a trace is a guard that fails next call
        return _import(name)
    mod = _modules.get(name)
    if mod is None:
        mod = _modules[name] = _import(name)
    return mod


def _import(name: str) -> ModuleType:
    """Import a backend module on first use, by import statements that torch.compile can trace
    (it refuses ``importlib.import_module``)."""
    if name == "structured":
        from ..backends import structured as mod
    elif name == "blocks":
        from ..backends import blocks as mod
    elif name == "triton":
        from ..backends import triton as mod
    elif name == "fused":
        from ..backends import fused as mod
    elif name == "dgl":
        from ..backends import dgl as mod
    else:
        from ..backends import torch as mod
    return mod


def takes_table_bias(mod: ModuleType) -> bool:
    """Whether a backend module takes a :class:`~gatx.ops.TableBias` as ``bias`` (else it gets the per-edge tensor)."""
    return getattr(mod, "TAKES_TABLE_BIAS", False)


def takes_out_bias(mod: ModuleType) -> bool:
    """Whether a backend module's ``sparse_attention`` takes ``out_bias`` (else the op adds it to the result)."""
    return getattr(mod, "TAKES_OUT_BIAS", False)


def takes_shared_values(mod: ModuleType) -> bool:
    """Whether a backend module's ``sparse_attention`` takes v of one head read by every head (else the op
    gives it v expanded to the scores' heads)."""
    return getattr(mod, "TAKES_SHARED_VALUES", False)


def _reasons(name: str, graph: Graph, tensors: tuple[Tensor | None, ...], op: str, opts: dict[str, Any]) -> list[str]:
    if torch.compiler.is_compiling() and name in _UNTRACEABLE:
        return [_UNTRACEABLE[name]]
    mod = backend_module(name)
    bias = opts.get("bias")
    if isinstance(bias, TableBias) and not takes_table_bias(mod):  # it would get the (E, H) tensor: ask about that
        per_edge = bias.stand_in()
        tensors = tuple(per_edge if t is bias else t for t in tensors)
        opts = {**opts, "bias": per_edge}
    return mod.reasons(graph, *tensors, op=op, **opts)


def select(backend: str | None, graph: Graph, *tensors: Tensor | None, op: str, **opts: Any) -> ModuleType:
    """The backend module that runs ``op`` on this input.

    Every backend module defines ``reasons(graph, *tensors, op=..., **opts) -> list[str]`` (why it
    cannot run; empty when it can) and, for each op it runs, a function of that name. A module
    chosen for ``"sparse_attention"`` that has no such function runs it as its primitives composed.

    While ``torch.compile`` traces, the choice depends only on what the trace guards on (shapes,
    dtypes, devices, the graph's structure object): backends that cannot be traced are skipped
    (forcing one raises) and nothing is logged.
    """
    if backend is not None:
        mod = backend_module(backend)
        why = _reasons(backend, graph, tensors, op, opts)
        if why:
            raise BackendUnavailable(f"backend {backend!r} cannot run this input: " + "; ".join(why))
        return mod
    for name in BACKENDS:
        why = _reasons(name, graph, tensors, op, opts)
        if not why:
            return backend_module(name)
        if torch.compiler.is_compiling():
            continue
        for reason in why:
            if (name, reason) not in _logged:
                _logged.add((name, reason))
                log.info("gatx: backend %r skipped: %s", name, reason)
    raise AssertionError("the torch backend runs every input")  # pragma: no cover
