"""``python -m gatx.info``: versions, devices, and which backends can run what here (and why not).

Each backend in :data:`gatx.ops.BACKENDS` is asked (through its ``reasons()``) whether it can run
``sparse_attention`` on a small general graph, and, where it cannot, on each kind of structured
graph that gatx builds (grid graphs and region-routed graphs from :mod:`gatx.vision`). A backend that
runs only structured graphs is reported as what it is for, not as broken: ``backend=None`` simply
passes other graphs on to the next backend in the list.

>>> "backends" in report()
True
"""
from __future__ import annotations

import platform
import sys
import warnings
from typing import Callable

import torch

from . import __version__
from .graph import Graph
from .ops._dispatch import BACKENDS, backend_module


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - not installed, or broken metadata
        return "not installed"


def _dgl_line() -> str:
    """DGL's version and how it imports here, stated as a fact (gatx's workaround is expected)."""
    from .backends.dgl import import_dgl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the workaround's one warning is replaced by the sentence below
        try:
            dgl = import_dgl()
        except ImportError as err:
            return f"dgl {_version('dgl')}: not usable ({err})"
    stub = sys.modules.get("dgl.graphbolt")
    if stub is not None and (getattr(stub, "__doc__", "") or "").startswith("Stub installed by gatx"):
        return (f"dgl {dgl.__version__}: imported through gatx.import_dgl with dgl.graphbolt stubbed out (this DGL "
                f"build has no graphbolt library for torch {torch.__version__}); DGL's core kernels, which gatx "
                "uses, work")
    return f"dgl {dgl.__version__}"


# Probe inputs: (what the graphs are, a builder of (graph, q, k, v) on a device). The first is any graph.
def _general(device: str) -> tuple[Graph, ...]:
    g = Graph(torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 0, 1]), 3, 3).to(device)
    q = torch.zeros(3, 1, 4, device=device)  # (N, H, D)
    return g, q, q, q


def _grid(device: str) -> tuple[Graph, ...]:
    from .vision import neighborhood_graph

    g = neighborhood_graph(7, 7, kernel_size=3, device=device)
    q = torch.zeros(g.num_dst, 1, 4, device=device)
    return g, q, q, q


def _routed(device: str) -> tuple[Graph, ...]:
    from .vision import routed_region_graph

    idx = torch.tensor([[[1], [0], [3], [2]]], device=device)  # (B, R, topk): 4 regions of a 4x4 map
    g = routed_region_graph(idx, (4, 4), 2)
    q = torch.zeros(g.num_dst, 1, 4, device=device)
    return g, q, q, q


PROBES: list[tuple[str, Callable[[str], tuple[Graph, ...]]]] = [
    ("any graph", _general),
    ("grid graphs from gatx.vision (neighborhood_graph, window_graph)", _grid),
    ("region-routed graphs from gatx.vision.routed_region_graph", _routed),
]


def _reasons(name: str, probe: Callable[[str], tuple[Graph, ...]], device: str) -> list[str]:
    """Why backend ``name`` cannot run ``sparse_attention`` on the probe's input (empty: it can)."""
    try:
        graph, q, k, v = probe(device)
        return list(backend_module(name).reasons(graph, q, k, v, op="sparse_attention", score="dot"))
    except Exception as err:  # noqa: BLE001 - a backend or probe that breaks is reported, never fatal here
        return [f"could not be checked: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"]


def backend_status(name: str, device: str) -> str:
    """One line: usable, usable for a kind of structured graph (what the backend is for), or why not."""
    general = _reasons(name, PROBES[0][1], device)
    if not general:
        return "usable"
    structured = [what for what, probe in PROBES[1:] if not _reasons(name, probe, device)]
    if structured:
        return ("usable for " + " and ".join(structured)
                + "; backend=None passes other graphs on to the next backend")
    return "unusable: " + "; ".join(general)


def report() -> str:
    cuda = torch.cuda.is_available()
    lines = [
        f"gatx {__version__}",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda: "
        + (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if cuda else "none"),
        f"{_dgl_line()}; torch_geometric {_version('torch_geometric')}; triton {_version('triton')}",
        "backends (backend=None takes the first one, in this order, that can run the input; torch runs all):",
    ]
    for name in BACKENDS:
        for dev in ["cpu"] + (["cuda"] if cuda else []):
            lines.append(f"  {name:10s} {dev:4s} {backend_status(name, dev)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
