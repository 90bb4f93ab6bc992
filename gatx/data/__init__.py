"""Dataset loaders: the Planetoid citation graphs (Cora, CiteSeer, PubMed) and MNIST.

Files come from their canonical URLs (listed in :mod:`gatx.data_manifest` with their checksums),
are verified, written atomically (a failed or corrupt download leaves no file behind) and cached
under the data root, in the same layout as ``../shared/datasets``::

    <root>/planetoid/<name>/ind.<name>.<part>      <root>/mnist/<file>.gz

The root is ``root=`` if given, else ``$GATX_DATA_DIR``, else the repository's ``datasets/`` folder
(when gatx runs from a checkout), else ``$XDG_CACHE_HOME/gatx`` (``~/.cache/gatx``).
``mirror=`` (or ``$GATX_DATA_MIRROR``) replaces the canonical URLs by ``<mirror>/<same path>``: any
HTTP(S) server or ``file://`` folder with that layout (``python -m http.server`` in a data root is one).

>>> from gatx.data import load_planetoid
>>> cora = load_planetoid("cora")  # doctest: +SKIP
>>> cora.graph.num_edges, cora.features.shape, cora.num_classes  # doctest: +SKIP
(10556, torch.Size([2708, 1433]), 7)
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import sys
import tempfile
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..data_manifest import FILES, Entry
from ..graph import Graph

__all__ = [
    "Planetoid", "load_planetoid", "load_mnist", "row_normalize", "data_dir", "fetch",
    "DataError", "DownloadError", "ChecksumError",
]

ENV_DIR = "GATX_DATA_DIR"
ENV_MIRROR = "GATX_DATA_MIRROR"
_REPO_DATASETS = Path(__file__).resolve().parents[2] / "datasets"
_PLANETOID_PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
_CHUNK = 1 << 20


class DataError(OSError):
    """A dataset file is missing, cannot be downloaded, or is not the file the manifest describes."""


class DownloadError(DataError):
    """Files are missing and could not be downloaded; the message lists each file, its URL and path."""


class ChecksumError(DataError):
    """A file's size or hash differs from the manifest (corrupt or truncated)."""


# ---------------------------------------------------------------------------------- files
def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root``, else ``$GATX_DATA_DIR``, else the repo's ``datasets/``, else ``~/.cache/gatx``."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    if (_REPO_DATASETS / "README.md").is_file():
        return _REPO_DATASETS
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gatx"


def _mirror(mirror: str | None) -> str | None:
    base = mirror if mirror is not None else os.environ.get(ENV_MIRROR) or None
    if base is not None and urllib.parse.urlsplit(base).scheme not in ("http", "https", "file"):
        raise ValueError(f"mirror must be an http://, https:// or file:// URL, got {base!r}")
    return base


def _url(rel: str, mirror: str | None) -> str:
    return FILES[rel].url if mirror is None else mirror.rstrip("/") + "/" + rel


def _hashes(path: Path) -> tuple[int, str, str]:
    sha, md5, n = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
            n += len(chunk)
    return n, sha.hexdigest(), md5.hexdigest()


def _mismatch(entry: Entry, size: int, sha: str, md5: str, recorded: str | None = None) -> str | None:
    """What differs from the manifest (or the trust-on-first-use record), or None."""
    if entry.bytes is not None and size != entry.bytes:
        return f"expected {entry.bytes} bytes, got {size}"
    want = entry.sha256 or recorded
    if want is not None and sha != want:
        return f"expected sha256 {want}, got {sha}"
    if entry.md5 is not None and md5 != entry.md5:
        return f"expected md5 {entry.md5}, got {md5}"
    return None


def _record(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _trust_on_first_use(path: Path, sha: str, how: str) -> None:
    """Record the hash of a file the manifest does not pin, so later loads detect changes."""
    try:
        _record(path).write_text(f"{sha}  {path.name}\n")
        where = f"recorded in {_record(path)}"
    except OSError as err:
        where = f"not recorded ({err})"
    warnings.warn(
        f"gatx: {path.name} has no pinned sha256 in gatx/data_manifest.py, so it was {how} without a "
        f"verified checksum; its sha256 {sha} was {where} and later loads are checked against it",
        RuntimeWarning, stacklevel=4,
    )


Check = Callable[[Path], Any]


def _parse_or_discard(check: Check | None, path: Path, what: str) -> None:
    """Run ``check`` (a parser that raises on a malformed file) on an unpinned file before it is trusted."""
    if check is None:
        return
    try:
        check(path)
    except Exception as err:  # noqa: BLE001 - any parser failure means the bytes are not the dataset file
        raise ChecksumError(
            f"{what} is not a readable dataset file ({type(err).__name__}: {err}); "
            "the transfer was probably cut short (the file has no pinned checksum to tell), so it was not "
            "kept; load again to retry"
        ) from err


def _download(url: str, dest: Path, entry: Entry, check: Check | None = None) -> None:
    """Stream ``url`` to a temporary file beside ``dest``, verify (and parse, when unpinned), rename into place.

    On any failure nothing stays behind: no partial file, and no folder that this call created.
    """
    created = []  # folders this call creates, deepest first, removed again if the download fails
    folder = dest.parent
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download_into(url, dest, entry, check)
    except BaseException:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (another file landed there) or gone: keep the rest
        raise


def _download_into(url: str, dest: Path, entry: Entry, check: Check | None) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        print(f"gatx: downloading {url} -> {dest}", file=sys.stderr)
        sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
        request = urllib.request.Request(url, headers={"User-Agent": "gatx-data"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=60) as resp:
            length = resp.headers.get("Content-Length")
            while chunk := resp.read(_CHUNK):
                out.write(chunk)
                sha.update(chunk)
                md5.update(chunk)
                size += len(chunk)
            if length is not None and length.strip().isdigit() and size != int(length):
                raise DownloadError(f"transfer interrupted: received {size} of {length} bytes")
        bad = _mismatch(entry, size, sha.hexdigest(), md5.hexdigest())
        if bad is not None:
            raise ChecksumError(
                f"{url} does not match the checksum manifest for {dest.name} ({bad}): the download is "
                "corrupt or truncated and was discarded; retry, or fetch the file from the canonical URL "
                f"{entry.url}"
            )
        if entry.sha256 is None:
            _parse_or_discard(check, tmp, f"the download from {url}")
        os.replace(tmp, dest)
        if entry.sha256 is None:
            _trust_on_first_use(dest, sha.hexdigest(), f"downloaded from {url}")
    finally:
        tmp.unlink(missing_ok=True)


def _verify(path: Path, rel: str, check: Check | None = None) -> None:
    """Check a cached file against the manifest; a bad file is renamed ``*.corrupt`` so it is not reused."""
    entry = FILES[rel]
    size, sha, md5 = _hashes(path)
    record = _record(path)
    recorded = record.read_text().split()[0] if entry.sha256 is None and record.is_file() else None
    bad = _mismatch(entry, size, sha, md5, recorded)
    if bad is None and entry.sha256 is None and recorded is None:
        try:  # first use of an unpinned file found in place: it must parse before it is trusted
            _parse_or_discard(check, path, str(path))
        except ChecksumError as err:
            bad = str(err).split("; the transfer")[0]
    if bad is None:
        if entry.sha256 is None and recorded is None:
            _trust_on_first_use(path, sha, "used")
        return
    quarantine = path.with_name(path.name + ".corrupt")
    try:
        os.replace(path, quarantine)
        kept = f"it was moved to {quarantine} and will be downloaded again on the next load"
    except OSError:
        kept = "delete it and load again to download a fresh copy"
    raise ChecksumError(f"{path} is corrupt or truncated ({bad}); {kept} (source: {entry.url})")


def fetch(
    files: Sequence[str], root: str | os.PathLike | None = None, *, mirror: str | None = None,
    download: bool = True, check: Check | None = None,
) -> list[Path]:
    """Verified local paths of manifest files (keys of ``gatx.data_manifest.FILES``), downloading missing ones.

    ``check(path)`` is a parser that raises on a malformed file; a file the manifest does not pin is
    parsed with it before its hash is recorded as trusted (so a download cut short without a
    Content-Length is discarded, not trusted). Raises :class:`DownloadError` (listing every missing
    file, its URL and where to put it) when a file is missing and cannot be downloaded,
    :class:`ChecksumError` when a file is corrupt or does not parse.
    """
    unknown = [rel for rel in files if rel not in FILES]
    if unknown:
        raise ValueError(f"not in the checksum manifest (gatx/data_manifest.py): {unknown}")
    base, folder = _mirror(mirror), data_dir(root)
    paths = [folder / rel for rel in files]
    for rel, path in zip(files, paths):
        if path.is_file():
            continue
        reason = "downloads are disabled (download=False)"
        if download:
            url = _url(rel, base)
            try:
                _download(url, path, FILES[rel], check)
                continue
            except (OSError, HTTPException) as err:
                if isinstance(err, ChecksumError):
                    raise
                reason = f"downloading {url} failed: {err}"
        missing = [(r, p) for r, p in zip(files, paths) if not p.is_file()]
        lines = "\n".join(f"  {p}\n      <- {_url(r, base)}" for r, p in missing)
        raise DownloadError(
            f"{len(missing)} data file(s) missing under {folder} and not downloaded: {reason}.\n"
            f"Download each file to the path shown (e.g. curl -L -o <path> <url>):\n{lines}\n"
            f"or point root= / ${ENV_DIR} at a folder that holds them in this layout, or ${ENV_MIRROR} at a mirror."
        )
    for rel, path in zip(files, paths):
        _verify(path, rel, check)
    return paths


# ---------------------------------------------------------------------------------- Planetoid
_ALLOWED_GLOBALS = {
    ("collections", "defaultdict"), ("__builtin__", "list"), ("__builtin__", "dict"), ("__builtin__", "object"),
    ("builtins", "list"), ("builtins", "dict"), ("builtins", "object"), ("copy_reg", "_reconstructor"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
}


class _PlanetoidUnpickler(pickle.Unpickler):
    """Loads the Planetoid pickles (numpy arrays, scipy CSR, adjacency dicts) and refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if name == "csr_matrix" and module.startswith("scipy.sparse"):
            import scipy.sparse as sp

            return sp.csr_matrix  # the public name: no deprecation warning for scipy.sparse.csr
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a Planetoid pickle")
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return _PlanetoidUnpickler(f, encoding="latin1").load()


def _read_planetoid_file(path: Path) -> Any:
    """One Planetoid file parsed: the test index as int64, else the pickle (raises if malformed)."""
    if "test.index" in path.name:  # also the download's temporary name, .ind.<name>.test.index.<random>.part
        return np.array(path.read_text().split(), dtype=np.int64)
    return _unpickle(path)


@dataclass(frozen=True, repr=False)
class Planetoid:
    """A Planetoid citation graph with the public split (20 train nodes per class, 500 val, 1000 test).

    ``graph`` is symmetric, without duplicate edges or self-loops, its edges sorted by (dst, src);
    ``features`` is the raw (N, F) float32 bag-of-words (TF-IDF for PubMed) as a sparse CSR tensor
    (``row_normalize`` it as the GAT paper does, ``.to_dense()`` for a dense copy); ``labels`` (N,)
    int64; the masks (N,) bool.
    """

    name: str
    graph: Graph
    features: Tensor
    labels: Tensor
    train_mask: Tensor
    val_mask: Tensor
    test_mask: Tensor
    num_classes: int

    def __repr__(self) -> str:
        n, f = self.features.shape
        split = "/".join(str(int(m.sum())) for m in (self.train_mask, self.val_mask, self.test_mask))
        return (
            f"Planetoid({self.name!r}, nodes={n}, edges={self.graph.num_edges}, features={f}, "
            f"classes={self.num_classes}, train/val/test={split})"
        )


def _edges(adjacency: dict, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Symmetric, deduplicated, loop-free edges of an adjacency dict, sorted by (dst, src)."""
    src = np.fromiter((u for u, vs in adjacency.items() for _ in vs), dtype=np.int64)
    dst = np.fromiter((v for vs in adjacency.values() for v in vs), dtype=np.int64)
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= num_nodes):
        raise ValueError(f"the Planetoid graph refers to nodes outside [0, {num_nodes})")
    src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    keep = src != dst
    key = np.unique(dst[keep] * num_nodes + src[keep])  # sorted by dst, then src
    return torch.from_numpy(key % num_nodes), torch.from_numpy(key // num_nodes)


def load_planetoid(
    name: str, root: str | os.PathLike | None = None, *, mirror: str | None = None, download: bool = True
) -> Planetoid:
    """Cora, CiteSeer or PubMed with the public split, built as PyG and DGL build it.

    Node order is ``allx`` then ``tx`` with the test rows put at their ``test.index`` positions;
    CiteSeer's 15 isolated test-range nodes missing from ``tx`` get zero features (label 0, in no
    split). Cora: 2708 nodes, 1433 features, 7 classes, 10556 edges, 140/500/1000.
    """
    import scipy.sparse as sp

    key = name.lower()
    if key not in ("cora", "citeseer", "pubmed"):
        raise ValueError(f"name must be 'cora', 'citeseer' or 'pubmed', got {name!r}")
    paths = fetch([f"planetoid/{key}/ind.{key}.{p}" for p in _PLANETOID_PARTS], root, mirror=mirror,
                  download=download, check=_read_planetoid_file)
    x, tx, allx, y, ty, ally, adjacency, test_index = (_read_planetoid_file(p) for p in paths)
    test_sorted = np.sort(test_index)

    lo = int(test_sorted[0])
    span = int(test_sorted[-1]) - lo + 1
    if span > tx.shape[0]:  # gaps in the test range (CiteSeer): pad the missing nodes with zeros
        rows, coo = test_sorted - lo, tx.tocoo()
        tx = sp.csr_matrix((coo.data, (rows[coo.row], coo.col)), shape=(span, tx.shape[1]))
        ty_full = np.zeros((span, ty.shape[1]), dtype=ty.dtype)
        ty_full[rows] = ty
        ty = ty_full
    feats = sp.vstack([allx, tx]).tocsr()
    onehot = np.vstack([ally, ty])
    order = np.arange(feats.shape[0])
    order[test_index] = test_sorted  # node test_index[i] takes row test_sorted[i], as PyG / DGL do
    feats = feats[order]
    feats.sum_duplicates()
    feats.sort_indices()
    labels = torch.from_numpy(onehot[order].argmax(1).astype(np.int64))

    n = feats.shape[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        features = torch.sparse_csr_tensor(
            torch.from_numpy(feats.indptr.astype(np.int64)), torch.from_numpy(feats.indices.astype(np.int64)),
            torch.from_numpy(feats.data.astype(np.float32)), (n, feats.shape[1]), check_invariants=True,
        )
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    masks[0][: y.shape[0]] = True
    masks[1][y.shape[0] : y.shape[0] + 500] = True
    masks[2][torch.from_numpy(test_sorted)] = True
    src, dst = _edges(adjacency, n)
    graph = Graph(src, dst, n, n)
    return Planetoid(key, graph, features, labels, *masks, num_classes=onehot.shape[1])


def row_normalize(features: Tensor) -> Tensor:
    """Each row divided by its sum (PyG's ``NormalizeFeatures``); zero rows stay zero; keeps the layout."""
    if features.layout == torch.sparse_csr:
        crow, col, val = features.crow_indices(), features.col_indices(), features.values()
        rows = torch.repeat_interleave(torch.arange(features.shape[0]), crow.diff())
        total = torch.zeros(features.shape[0], dtype=val.dtype).index_add_(0, rows, val)
        total = torch.where(total == 0, torch.ones_like(total), total)
        with warnings.catch_warnings():  # gatx's own CSR tensor: not the user's concern
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            return torch.sparse_csr_tensor(crow, col, val / total[rows], features.shape, check_invariants=False)
    if features.layout == torch.sparse_coo:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            csr = features.coalesce().to_sparse_csr()
        return row_normalize(csr).to_sparse_coo()
    total = features.sum(-1, keepdim=True)
    return features / torch.where(total == 0, torch.ones_like(total), total)


# ---------------------------------------------------------------------------------- MNIST
def _read_idx(path: Path) -> np.ndarray:
    """A gzip-compressed IDX file (uint8 data) as a numpy array."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes), file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def load_mnist(
    split: str = "test", root: str | os.PathLike | None = None, *, mirror: str | None = None, download: bool = True
) -> tuple[Tensor, Tensor]:
    """MNIST ``"train"`` (60k) or ``"test"`` (10k): images (N, 28, 28) uint8 and labels (N,) int64."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = fetch(
        [f"mnist/{prefix}-images-idx3-ubyte.gz", f"mnist/{prefix}-labels-idx1-ubyte.gz"], root,
        mirror=mirror, download=download, check=_read_idx,
    )
    x, y = _read_idx(images), _read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"MNIST {split}: images {x.shape} and labels {y.shape} do not match")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))
