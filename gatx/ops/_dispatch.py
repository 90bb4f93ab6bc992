"""Backend choice for ``gatx.ops``: a forced backend runs or raises with its reasons; ``None`` picks."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

from torch import Tensor

from ..graph import Graph

log = logging.getLogger("gatx")

# Preference order for backend=None: fastest first; "torch" runs everything.
BACKENDS = ("structured", "blocks", "triton", "fused", "dgl", "torch")
_logged: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given input; the message lists why."""


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {name!r}")
    return importlib.import_module(f"gatx.backends.{name}")


def select(backend: str | None, graph: Graph, *tensors: Tensor | None, op: str, **opts: Any) -> ModuleType:
    """The backend module that runs ``op`` on this input.

    Every backend module defines ``reasons(graph, *tensors, op=..., **opts) -> list[str]`` (why it
    cannot run; empty when it can) and, for each op it runs, a function of that name. A module
    chosen for ``"sparse_attention"`` that has no such function runs it as its primitives composed.
    """
    if backend is not None:
        mod = backend_module(backend)
        why = mod.reasons(graph, *tensors, op=op, **opts)
        if why:
            raise BackendUnavailable(f"backend {backend!r} cannot run this input: " + "; ".join(why))
        return mod
    for name in BACKENDS:
        mod = backend_module(name)
        why = mod.reasons(graph, *tensors, op=op, **opts)
        if not why:
            return mod
        for reason in why:
            if (name, reason) not in _logged:
                _logged.add((name, reason))
                log.info("gatx: backend %r skipped: %s", name, reason)
    raise AssertionError("the torch backend runs every input")  # pragma: no cover
