"""Shared test fixtures.

Real data (Cora, CiteSeer, the MNIST test split) is read from ``$GATX_TEST_DATA``, else
``../shared/datasets`` beside the repository; tests never download. Tests that need it skip, with a
reason saying how to get it, when it is missing, unless ``GATX_REQUIRE_TEST_DATA=1`` (set by
``.ci/run``): then they fail, so CI cannot pass by skipping them.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "GATX_REQUIRE_TEST_DATA"
# the files the tests read, as laid out under a gatx data root (datasets/README.md)
TEST_DATA_FILES = [f"planetoid/{name}/ind.{name}.{part}" for name in ("cora", "citeseer")
                   for part in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]
TEST_DATA_FILES += [f"mnist/t10k-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
GET_TEST_DATA = (
    "to get it, download the files once with gatx's checksummed loaders: python -c \"import gatx.data as d; "
    "r = '/path/to/testdata'; d.load_planetoid('cora', r); d.load_planetoid('citeseer', r); d.load_mnist('test', r)\" "
    "and run the tests with GATX_TEST_DATA=/path/to/testdata (or put the files in ../shared/datasets)"
)


def shared_datasets_dir() -> Path:
    """``$GATX_TEST_DATA`` if set, else ``../shared/datasets`` beside the repository."""
    return Path(os.environ.get("GATX_TEST_DATA", REPO.parent / "shared" / "datasets"))


def missing_test_data(root: Path) -> str | None:
    """Why ``root`` cannot serve as the test data directory (None: it can)."""
    if not root.is_dir():
        return f"test data directory {root} does not exist"
    missing = [rel for rel in TEST_DATA_FILES if not (root / rel).is_file()]
    if missing:
        return f"{len(missing)} test data file(s) missing under {root}, e.g. {', '.join(missing[:3])}"
    return None


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real-data root; skips the test (fails it under ``GATX_REQUIRE_TEST_DATA=1``) when incomplete."""
    path = shared_datasets_dir()
    why = missing_test_data(path)
    if why is not None:
        message = f"needs real data: {why}; {GET_TEST_DATA}"
        if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
            pytest.fail(f"{message} ({REQUIRE_ENV} is set, so missing test data is an error)", pytrace=False)
        pytest.skip(message)
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
