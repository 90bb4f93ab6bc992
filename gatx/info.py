"""``python -m gatx.info``: versions, devices, and which backends can run (and why not)."""
from __future__ import annotations

import platform

import torch

from . import __version__
from .graph import Graph
from .ops._dispatch import BACKENDS, backend_module


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "not installed"


def report() -> str:
    lines = [
        f"gatx {__version__}",
        f"python {platform.python_version()} on {platform.platform()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, cuda: "
        + (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "none"),
        f"dgl {_version('dgl')}, torch_geometric {_version('torch_geometric')}",
        "backends:",
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in BACKENDS:
        mod = backend_module(name)
        for dev in devices:
            g = Graph(torch.tensor([0]), torch.tensor([0])).to(dev)
            why = mod.reasons(g, torch.zeros(1, 1, device=dev))
            lines.append(f"  {name:10s} {dev:4s} " + ("usable" if not why else "unusable: " + "; ".join(why)))
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
