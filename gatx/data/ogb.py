"""OGB node-property-prediction datasets (ogbn-arxiv, ogbn-products) from OGB's published zip files.

Each dataset is one zip from ``https://snap.stanford.edu/ogb/data/nodeproppred/`` (the URLs of OGB's
``ogb/nodeproppred/master.csv``), fetched through :func:`gatx.data.fetch`: the same data root
(``root=`` / ``$GATX_DATA_DIR`` / the checkout's ``datasets/``), mirror, atomic download and
checksum rules as the Planetoid files, cached as ``<root>/ogb/<download_name>.zip``. OGB publishes
no checksums, so the manifest pins none: the first load records the zip's sha256 beside it
(trust on first use) and later loads are checked against that record.

The zip is read in place (nothing is extracted); its layout, as OGB's own reader expects it::

    <download_name>/raw/edge.csv.gz            E lines "src,dst"
    <download_name>/raw/num-node-list.csv.gz   one line: N
    <download_name>/raw/node-feat.csv.gz       N lines of F comma-separated floats
    <download_name>/raw/node-label.csv.gz      N lines: the class
    <download_name>/split/<split>/{train,valid,test}.csv.gz   node ids, one per line

Edges are kept as OGB gives them: ogbn-arxiv is directed (``src`` cites ``dst``; most models use
it symmetrised), ogbn-products gets both directions of each edge, as OGB's loaders add them
(``add_inverse_edge``). Parsing takes a while (about a minute for ogbn-products), so the tensors are
cached next to the zip as ``<download_name>.gatx.pt`` (written atomically, rebuilt when the zip
changes).

>>> from gatx.data.ogb import load_ogb
>>> arxiv = load_ogb("ogbn-arxiv")  # doctest: +SKIP
>>> arxiv.num_nodes, arxiv.graph.num_edges, arxiv.features.shape[1], arxiv.num_classes  # doctest: +SKIP
(169343, 1166243, 128, 40)
"""
from __future__ import annotations

import gzip
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import DataError, fetch
from ..graph import Graph
from .synthetic import NodeDataset

__all__ = ["OGB_NODE_DATASETS", "OGBSpec", "load_ogb"]

_CACHE_VERSION = 1


class OGBSpec(NamedTuple):
    """What OGB's ``master.csv`` says about one node-property dataset."""

    download_name: str
    split: str
    add_inverse_edge: bool
    num_nodes: int
    num_classes: int


OGB_NODE_DATASETS: dict[str, OGBSpec] = {
    "ogbn-arxiv": OGBSpec("arxiv", "time", False, 169343, 40),
    "ogbn-products": OGBSpec("products", "sales_ranking", True, 2449029, 47),
}


def _read_csv(archive: zipfile.ZipFile, member: str, dtype: type, zip_path: Path) -> np.ndarray:
    """A gzip-compressed numeric CSV member of ``archive`` as a 2-D array (rows, columns)."""
    try:
        raw = archive.open(member)
    except KeyError:
        raise DataError(
            f"{zip_path} has no member {member!r}: it is not an OGB node-property zip of the expected layout "
            f"(delete it to download it again)"
        ) from None
    with raw, gzip.open(raw, "rt") as text:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "loadtxt: input contained no data", UserWarning)  # an empty split
                return np.loadtxt(text, delimiter=",", dtype=dtype, ndmin=2)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"{zip_path}: cannot parse {member} as a gzip CSV of numbers ({err})") from None


def _parse(zip_path: Path, spec: OGBSpec, name: str) -> dict[str, torch.Tensor]:
    base = f"{spec.download_name}/"
    with zipfile.ZipFile(zip_path) as archive:
        n = int(_read_csv(archive, base + "raw/num-node-list.csv.gz", np.int64, zip_path).sum())
        edge = _read_csv(archive, base + "raw/edge.csv.gz", np.int64, zip_path)  # (E, 2)
        feat = _read_csv(archive, base + "raw/node-feat.csv.gz", np.float32, zip_path)  # (N, F)
        label = _read_csv(archive, base + "raw/node-label.csv.gz", np.int64, zip_path)  # (N, 1)
        split = {
            part: _read_csv(archive, f"{base}split/{spec.split}/{part}.csv.gz", np.int64, zip_path).reshape(-1)
            for part in ("train", "valid", "test")
        }
    problems = []
    if edge.shape[1] != 2:
        problems.append(f"edge.csv has {edge.shape[1]} columns, expected 2 (src,dst)")
    elif edge.size and (edge.min() < 0 or edge.max() >= n):
        problems.append(f"edge ids must lie in [0, {n}), got [{edge.min()}, {edge.max()}]")
    if feat.shape[0] != n:
        problems.append(f"node-feat has {feat.shape[0]} rows for {n} nodes")
    if label.shape != (n, 1):
        problems.append(f"node-label has shape {label.shape}, expected ({n}, 1)")
    for part, idx in split.items():
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            problems.append(f"split {part} refers to nodes outside [0, {n})")
    if problems:
        raise DataError(f"{zip_path} ({name}) is inconsistent: " + "; ".join(problems))
    src, dst = edge[:, 0], edge[:, 1]
    if spec.add_inverse_edge:  # OGB's loaders add the reverse of every edge
        src, dst = np.concatenate([src, edge[:, 1]]), np.concatenate([dst, edge[:, 0]])
    return {
        "num_nodes": torch.tensor(n), "src": torch.from_numpy(np.ascontiguousarray(src)),
        "dst": torch.from_numpy(np.ascontiguousarray(dst)), "features": torch.from_numpy(feat),
        "labels": torch.from_numpy(label[:, 0].copy()),
        **{f"{part}_idx": torch.from_numpy(idx) for part, idx in split.items()},
    }


def _stamp(path: Path) -> torch.Tensor:
    st = path.stat()
    return torch.tensor([_CACHE_VERSION, st.st_size, st.st_mtime_ns])


def _save_atomic(obj: dict, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_ogb(
    name: str, root: str | os.PathLike | None = None, *, mirror: str | None = None, download: bool = True,
    cache: bool = True,
) -> NodeDataset:
    """ogbn-arxiv or ogbn-products with OGB's standard split, as a :class:`~gatx.data.synthetic.NodeDataset`.

    Args:
        name: ``"ogbn-arxiv"`` or ``"ogbn-products"`` (``"arxiv"`` / ``"products"`` also work).
        root: data root (default ``$GATX_DATA_DIR``, else the checkout's ``datasets/``, else
            ``~/.cache/gatx``); the zip lives at ``<root>/ogb/<download_name>.zip``.
        mirror: base URL of a mirror that serves ``<mirror>/ogb/<download_name>.zip`` instead of
            OGB's URL (default ``$GATX_DATA_MIRROR``).
        download: fetch a missing zip (default True); if it cannot, :class:`gatx.data.DownloadError`
            lists the file, its URL and where to put it.
        cache: reuse / write the parsed tensors beside the zip (default True).

    Shapes:
        ``graph``: N nodes, E edges (both directions for ogbn-products); ``features`` (N, F) float32;
        ``labels`` (N,) int64; ``train_idx`` / ``val_idx`` / ``test_idx`` int64 node ids.
    """
    key = name.lower() if name.lower().startswith("ogbn-") else f"ogbn-{name.lower()}"
    spec = OGB_NODE_DATASETS.get(key)
    if spec is None:
        raise ValueError(f"name must be one of {sorted(OGB_NODE_DATASETS)}, got {name!r}")
    (zip_path,) = fetch([f"ogb/{spec.download_name}.zip"], root, mirror=mirror, download=download)
    cached = zip_path.with_name(f"{spec.download_name}.gatx.pt")
    data = None
    if cache and cached.is_file():
        try:
            data = torch.load(cached, weights_only=True)
            if not torch.equal(data.get("stamp", torch.empty(0)), _stamp(zip_path)):
                data = None
        except Exception:  # noqa: BLE001 - an unreadable cache is rebuilt from the zip
            data = None
    if data is None:
        try:
            data = _parse(zip_path, spec, key)
        except zipfile.BadZipFile as err:
            raise DataError(f"{zip_path} is not a readable zip ({err}); delete it to download it again") from None
        if cache:
            _save_atomic({**data, "stamp": _stamp(zip_path)}, cached)
    n = int(data["num_nodes"])
    labels = data["labels"]
    graph = Graph(data["src"], data["dst"], n, n)
    return NodeDataset(
        key, graph, data["features"], labels, data["train_idx"], data["valid_idx"], data["test_idx"],
        max(spec.num_classes, int(labels.max()) + 1 if labels.numel() else 0),
    )
