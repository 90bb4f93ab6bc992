"""gatx.data: parsing the real Planetoid / MNIST files, and the download path against a local server.

Files come from ../shared/datasets (the ``shared_datasets`` fixture); downloads go to a server on
127.0.0.1 serving copies of them. Nothing here touches any other network address.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
import socket
import threading
import warnings
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gatx import data
from gatx.data import ChecksumError, DownloadError, load_mnist, load_planetoid, row_normalize
from gatx.data_manifest import FILES

CORA = [f"planetoid/cora/ind.cora.{p}" for p in ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")]


# ---------------------------------------------------------------------------------- parsing
def check_split(ds, per_class: int) -> None:
    train, val, test = ds.train_mask, ds.val_mask, ds.test_mask
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()
    counts = torch.bincount(ds.labels[train], minlength=ds.num_classes)
    assert counts.tolist() == [per_class] * ds.num_classes, f"train nodes per class: {counts.tolist()}"


def check_graph(g, nodes: int, edges: int) -> None:
    assert (g.num_src, g.num_dst, g.num_edges) == (nodes, nodes, edges)
    assert not (g.src == g.dst).any(), "self-loops must be removed"
    key = g.src * nodes + g.dst
    assert key.unique().numel() == edges, "duplicate edges"
    assert torch.equal(key.sort().values, (g.dst * nodes + g.src).sort().values), "graph is not symmetric"


def test_cora_counts(shared_datasets):
    ds = load_planetoid("Cora", shared_datasets, download=False)
    assert ds.features.shape == (2708, 1433) and ds.features.layout == torch.sparse_csr
    assert ds.num_classes == 7 and ds.labels.shape == (2708,) and ds.labels.dtype == torch.int64
    check_graph(ds.graph, 2708, 10556)
    assert [int(m.sum()) for m in (ds.train_mask, ds.val_mask, ds.test_mask)] == [140, 500, 1000]
    check_split(ds, 20)
    density = ds.features._nnz() / (2708 * 1433)
    assert 0.012 < density < 0.014, f"density {density}"
    assert set(ds.features.values().unique().tolist()) == {1.0}, "Cora features are binary bag-of-words"
    assert "train/val/test=140/500/1000" in repr(ds)


def test_citeseer_counts_and_padding(shared_datasets):
    ds = load_planetoid("citeseer", shared_datasets, download=False)
    assert ds.features.shape == (3327, 3703) and ds.num_classes == 6
    check_graph(ds.graph, 3327, 9104)
    assert [int(m.sum()) for m in (ds.train_mask, ds.val_mask, ds.test_mask)] == [120, 500, 1000]
    check_split(ds, 20)
    empty = torch.bincount(
        torch.repeat_interleave(torch.arange(3327), ds.features.crow_indices().diff()), minlength=3327
    ) == 0
    padded = empty & ~(ds.train_mask | ds.val_mask | ds.test_mask) & (torch.arange(3327) >= 2312)
    assert int(padded.sum()) == 15, "CiteSeer's 15 missing test-range nodes are padded with zero rows"


@pytest.mark.parametrize("name", ["cora", "citeseer"])
def test_matches_pyg_reader(shared_datasets, name):
    """Independent reference: PyG's own Planetoid reader on the same files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planetoid = pytest.importorskip("torch_geometric.io.planetoid")
        ref = planetoid.read_planetoid_data(str(shared_datasets / "planetoid" / name), name)
    ds = load_planetoid(name, shared_datasets, download=False)
    diff = (ds.features.to_dense() - ref.x).abs().max().item()
    assert diff == 0, f"features max diff {diff}"
    assert torch.equal(ds.labels, ref.y)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(ds, f"{split}_mask"), getattr(ref, f"{split}_mask")), split
    n = ds.labels.numel()
    ours = torch.sort(ds.graph.src * n + ds.graph.dst).values
    theirs = torch.sort(ref.edge_index[0] * n + ref.edge_index[1]).values
    assert torch.equal(ours, theirs), f"{ours.numel()} edges vs PyG's {theirs.numel()}"


@pytest.mark.parametrize("layout", [torch.sparse_csr, torch.sparse_coo, torch.strided])
def test_row_normalize(layout):
    x = torch.rand(6, 5) * (torch.rand(6, 5) < 0.5)
    x[2] = 0
    ref = x / x.sum(1, keepdim=True).clamp_min(1e-30)
    xs = x.to_sparse(layout=layout) if layout != torch.strided else x
    out = row_normalize(xs)
    assert out.layout == layout
    diff = (out.to_dense() - ref).abs().max().item()
    assert diff < 1e-6, f"max diff {diff}"


def test_mnist_test_split(shared_datasets):
    images, labels = load_mnist("test", shared_datasets, download=False)
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8 and int(images.max()) == 255
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_mnist("val", shared_datasets)


def test_manifest_pins_the_shared_files(shared_datasets):
    for rel in [r for r, e in FILES.items() if e.sha256 is not None]:
        raw = (shared_datasets / rel).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == FILES[rel].sha256 and len(raw) == FILES[rel].bytes, rel
    assert all(e.url.startswith("https://") for e in FILES.values())


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(data.ENV_DIR, raising=False)
    assert data.data_dir() == Path(__file__).resolve().parents[1] / "datasets"  # the checkout's datasets/
    monkeypatch.setenv(data.ENV_DIR, str(tmp_path / "env"))
    assert data.data_dir() == tmp_path / "env"
    assert data.data_dir(tmp_path / "arg") == tmp_path / "arg"


# ---------------------------------------------------------------------------------- downloads
class _Handler(SimpleHTTPRequestHandler):
    """Serves a directory; paths in ``interrupt`` get a Content-Length larger than what is sent."""

    def __init__(self, *args, interrupt=(), log=None, **kwargs):
        self.interrupt, self.log = interrupt, log
        super().__init__(*args, **kwargs)

    def do_GET(self):
        self.log.append(self.path)
        if "nolength:" + self.path.lstrip("/") in self.interrupt:  # cut short, no Content-Length to tell
            body = Path(self.directory, self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.lstrip("/") in self.interrupt:
            body = Path(self.directory, self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, shared_datasets):
    """(mirror URL, served folder, request log, set of paths to interrupt) for a 127.0.0.1 server."""
    served = tmp_path / "served"
    shutil.copytree(shared_datasets / "planetoid" / "cora", served / "planetoid" / "cora")
    log, interrupt = [], set()
    handler = functools.partial(_Handler, directory=str(served), interrupt=interrupt, log=log)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, log, interrupt
    httpd.shutdown()
    httpd.server_close()


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file() and not p.name.startswith("ind."))


def test_download_success_then_cached(server, tmp_path):
    mirror, _, log, _ = server
    root = tmp_path / "root"
    ds = load_planetoid("cora", root, mirror=mirror)
    assert ds.graph.num_edges == 10556
    assert sorted(log) == sorted(f"/{rel}" for rel in CORA)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(CORA)
    load_planetoid("cora", root, mirror=mirror)
    assert len(log) == len(CORA), "cached files must not be downloaded again"


def test_download_uses_env_mirror(server, tmp_path, monkeypatch):
    mirror, _, log, _ = server
    monkeypatch.setenv(data.ENV_MIRROR, mirror)
    monkeypatch.setenv(data.ENV_DIR, str(tmp_path / "envroot"))
    assert load_planetoid("cora").features.shape == (2708, 1433)
    assert (tmp_path / "envroot" / CORA[0]).is_file() and len(log) == len(CORA)


def test_download_404_lists_missing_files(server, tmp_path):
    mirror, served, _, _ = server
    (served / CORA[6]).unlink()  # ind.cora.graph is not on the server
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="404") as err:
        load_planetoid("cora", root, mirror=mirror)
    msg = str(err.value)
    assert str(root / CORA[6]) in msg and f"{mirror}/{CORA[6]}" in msg and str(root / CORA[7]) in msg
    assert not (root / CORA[6]).exists() and leftovers(root) == []


def test_download_corrupt_bytes_are_not_kept(server, tmp_path):
    mirror, served, _, _ = server
    target = served / CORA[2]
    raw = bytearray(target.read_bytes())
    raw[1000] ^= 0xFF
    target.write_bytes(bytes(raw))
    root = tmp_path / "root"
    with pytest.raises(ChecksumError, match="sha256"):
        load_planetoid("cora", root, mirror=mirror)
    assert not (root / CORA[2]).exists() and leftovers(root) == []


def test_download_interrupted_transfer(server, tmp_path):
    mirror, _, _, interrupt = server
    interrupt.add(CORA[2])
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="interrupted|IncompleteRead"):
        load_planetoid("cora", root, mirror=mirror)
    assert not (root / CORA[2]).exists() and leftovers(root) == []
    interrupt.clear()
    assert load_planetoid("cora", root, mirror=mirror).graph.num_edges == 10556  # a retry completes


def test_offline_error_names_files_urls_and_paths(tmp_path):
    with socket.socket() as s:  # a port with nothing listening: connection refused, like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    with pytest.raises(DownloadError) as err:
        load_planetoid("cora", root, mirror=f"http://127.0.0.1:{port}")
    msg = str(err.value)
    assert "8 data file(s) missing" in msg and data.ENV_DIR in msg
    assert all(str(root / rel) in msg and f"127.0.0.1:{port}/{rel}" in msg for rel in CORA)
    with pytest.raises(DownloadError, match="download=False") as err:
        load_planetoid("cora", root, download=False)
    assert all(FILES[rel].url in str(err.value) for rel in CORA), "canonical URLs when no mirror is set"
    assert leftovers(root) == []
    with pytest.raises(ValueError, match="mirror"):
        load_planetoid("cora", root, mirror="ftp://example")


def test_corrupt_cached_file_is_set_aside_then_redownloaded(server, tmp_path, shared_datasets):
    mirror, _, _, _ = server
    root = tmp_path / "root"
    for rel in CORA:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_datasets / rel, root / rel)
    truncated = root / CORA[2]
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(ChecksumError, match="corrupt or truncated"):
        load_planetoid("cora", root, download=False)
    assert not truncated.exists() and truncated.with_name(truncated.name + ".corrupt").exists()
    assert load_planetoid("cora", root, mirror=mirror).graph.num_edges == 10556


def test_unpinned_file_is_recorded_on_first_use(server, tmp_path, monkeypatch):
    """Files without a pinned checksum (PubMed, MNIST train) are trusted on first use, then checked."""
    mirror, _, _, _ = server
    rel = CORA[0]
    monkeypatch.setitem(FILES, rel, FILES[rel]._replace(bytes=None, sha256=None))
    root = tmp_path / "root"
    with pytest.warns(RuntimeWarning, match="no pinned sha256"):
        load_planetoid("cora", root, mirror=mirror)
    record = (root / rel).with_name("ind.cora.x.sha256")
    assert record.read_text().split()[0] == hashlib.sha256((root / rel).read_bytes()).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # verified against the record: no warning the second time
        load_planetoid("cora", root, download=False)
    (root / rel).write_bytes((root / rel).read_bytes() + b"\0")
    with pytest.raises(ChecksumError, match="expected sha256"):
        load_planetoid("cora", root, download=False)


def test_unpinned_download_cut_short_without_length_is_not_trusted(server, tmp_path, monkeypatch):
    """A transfer the server ends early without Content-Length must be parsed before it is trusted."""
    mirror, _, _, interrupt = server
    for rel in CORA:  # PubMed's situation: nothing pinned
        monkeypatch.setitem(FILES, rel, FILES[rel]._replace(bytes=None, sha256=None))
    interrupt.add("nolength:" + CORA[0])
    root = tmp_path / "root"
    with pytest.raises(ChecksumError, match="not a readable dataset file.*not kept"):
        load_planetoid("cora", root, mirror=mirror)
    assert not root.exists(), "a failed first download leaves no file and no new (empty) folder"
    interrupt.clear()
    with pytest.warns(RuntimeWarning, match="no pinned sha256"):
        assert load_planetoid("cora", root, mirror=mirror).graph.num_edges == 10556  # a retry completes
    assert (root / "planetoid" / "cora" / "ind.cora.x.sha256").is_file()


def test_unpinned_file_found_in_place_must_parse_before_it_is_trusted(tmp_path, shared_datasets, monkeypatch):
    rel = CORA[6]  # the adjacency pickle
    monkeypatch.setitem(FILES, rel, FILES[rel]._replace(bytes=None, sha256=None))
    root = tmp_path / "root"
    for r in CORA:
        (root / r).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_datasets / r, root / r)
    bad = root / rel
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(ChecksumError, match="not a readable dataset file"):
        load_planetoid("cora", root, download=False)
    assert not bad.exists() and bad.with_name(bad.name + ".corrupt").exists(), "set aside, not trusted"
    assert not bad.with_name(bad.name + ".sha256").exists()


def test_failed_download_leaves_no_new_folder(server, tmp_path):
    mirror, served, _, _ = server
    (served / CORA[0]).unlink()  # 404 for the first file
    root = tmp_path / "root"
    with pytest.raises(DownloadError, match="404"):
        load_planetoid("cora", root, mirror=mirror)
    assert not root.exists()
    root.mkdir()
    with pytest.raises(DownloadError):
        load_planetoid("cora", root, mirror=mirror)
    assert list(root.iterdir()) == [], "only the folders this call created are removed, never an existing one"
