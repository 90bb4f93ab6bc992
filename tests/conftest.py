"""Shared test fixtures. Data for tests comes from ../shared/datasets (never downloaded in tests)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_datasets_dir() -> Path:
    """``$GATX_TEST_DATA`` if set, else ``../shared/datasets`` beside the repository."""
    return Path(os.environ.get("GATX_TEST_DATA", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    path = shared_datasets_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"test data directory {path} is missing (set GATX_TEST_DATA to its location)")
    return path


def dgl_or_none():
    """The dgl module through gatx's importer, or None where DGL cannot be imported."""
    from gatx.backends.dgl import import_dgl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return import_dgl()
        except ImportError:
            return None


def usable_backends(op: str = "sparse_attention", **opts) -> list[str]:
    """Backends that can run ``op`` on plain float32 CPU input here (the torch backend always)."""
    from gatx import Graph
    from gatx.ops import BACKENDS, select

    g = Graph(torch.tensor([0]), torch.tensor([0]))
    out = []
    for name in BACKENDS:
        try:
            select(name, g, torch.zeros(1, 1, 1), op=op, **opts)
            out.append(name)
        except Exception:  # noqa: BLE001 - unusable here
            pass
    return out


def random_graph(n_src=9, n_dst=7, e=40, seed=0, self_loops=False):
    """A seeded random (bipartite when n_src != n_dst) graph, optionally with self-loops."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n_src, (e,), generator=gen)
    dst = torch.randint(0, n_dst, (e,), generator=gen)
    if self_loops:
        loop = torch.arange(min(n_src, n_dst))
        src, dst = torch.cat([src, loop]), torch.cat([dst, loop])
    from gatx import Graph

    return Graph(src, dst, n_src, n_dst)
