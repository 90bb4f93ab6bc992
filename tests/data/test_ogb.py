"""gatx.data.ogb against a 127.0.0.1 server holding small zips in OGB's node-property layout.

The zips are written here with the layout of OGB's published files (``<name>/raw/*.csv.gz``,
``<name>/split/<split>/*.csv.gz``); nothing touches any other network address.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import socket
import threading
import warnings
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from gatx.data import ENV_DIR, ChecksumError, DataError, DownloadError
from gatx.data.ogb import OGB_NODE_DATASETS, load_ogb
from gatx.data_manifest import FILES


def csv_gz(rows: np.ndarray, fmt: str) -> bytes:
    text = "\n".join(",".join(fmt % v for v in np.atleast_1d(r)) for r in rows) + "\n"
    return gzip.compress(text.encode())


def write_ogb_zip(path, name="arxiv", n=40, e=120, f=5, classes=4, seed=0, drop=None, bad_edge=False):
    """A small zip in OGB's layout; returns the arrays written."""
    spec = OGB_NODE_DATASETS[f"ogbn-{name}"]
    rng = np.random.default_rng(seed)
    edge = rng.integers(0, n, (e, 2))
    if bad_edge:
        edge[3, 1] = n + 5
    feat = rng.standard_normal((n, f)).astype(np.float32)
    label = rng.integers(0, classes, (n, 1))
    perm = rng.permutation(n)
    split = {"train": perm[:20], "valid": perm[20:30], "test": perm[30:]}
    members = {
        "raw/edge.csv.gz": csv_gz(edge, "%d"), "raw/num-node-list.csv.gz": csv_gz(np.array([[n]]), "%d"),
        "raw/num-edge-list.csv.gz": csv_gz(np.array([[e]]), "%d"), "raw/node-feat.csv.gz": csv_gz(feat, "%.9g"),
        "raw/node-label.csv.gz": csv_gz(label, "%d"), "RELEASE_v1.txt": b"",
        **{f"split/{spec.split}/{k}.csv.gz": csv_gz(v[:, None], "%d") for k, v in split.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for member, raw in members.items():
            if member != drop:
                z.writestr(f"{spec.download_name}/{member}", raw)
    return edge, feat, label[:, 0], split


@pytest.fixture
def server(tmp_path):
    """(mirror URL, served folder, request log) of an HTTP server on 127.0.0.1."""
    served, log = tmp_path / "served", []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            log.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, log
    httpd.shutdown()
    httpd.server_close()


def test_manifest_entries():
    for name, spec in OGB_NODE_DATASETS.items():
        entry = FILES[f"ogb/{spec.download_name}.zip"]
        assert entry.url == f"https://snap.stanford.edu/ogb/data/nodeproppred/{spec.download_name}.zip", name
        assert entry.sha256 is None, "nothing pinned: no copy of OGB's files could be hashed here"


def test_download_parse_then_cached(server, tmp_path):
    mirror, served, log = server
    edge, feat, label, split = write_ogb_zip(served / "ogb" / "arxiv.zip")
    root = tmp_path / "root"
    with pytest.warns(RuntimeWarning, match="no pinned sha256"):  # trust on first use, recorded
        ds = load_ogb("ogbn-arxiv", root, mirror=mirror)
    assert log == ["/ogb/arxiv.zip"]
    assert ds.name == "ogbn-arxiv" and ds.num_nodes == 40 and ds.num_classes == 40  # OGB's 40 arxiv classes
    assert torch.equal(ds.graph.src, torch.from_numpy(edge[:, 0])) and torch.equal(ds.graph.dst, torch.from_numpy(edge[:, 1]))
    assert torch.equal(ds.features, torch.from_numpy(feat)), "float32 features survive the CSV round trip"
    assert torch.equal(ds.labels, torch.from_numpy(label))
    for got, part in [(ds.train_idx, "train"), (ds.val_idx, "valid"), (ds.test_idx, "test")]:
        assert torch.equal(got, torch.from_numpy(split[part])), part
    record = root / "ogb" / "arxiv.zip.sha256"
    assert record.read_text().split()[0] == hashlib.sha256((root / "ogb" / "arxiv.zip").read_bytes()).hexdigest()
    assert (root / "ogb" / "arxiv.gatx.pt").is_file(), "parsed tensors are cached beside the zip"
    assert not [p for p in root.rglob("*.part")], "no temporary files left"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked against the record now: no warning
        again = load_ogb("arxiv", root, mirror=mirror)
    assert len(log) == 1 and torch.equal(again.features, ds.features) and torch.equal(again.graph.src, ds.graph.src)


def test_products_gets_both_edge_directions(server, tmp_path):
    mirror, served, _ = server
    edge, *_ = write_ogb_zip(served / "ogb" / "products.zip", name="products", n=30, e=50)
    with pytest.warns(RuntimeWarning):
        ds = load_ogb("ogbn-products", tmp_path / "root", mirror=mirror, cache=False)
    assert ds.graph.num_edges == 100 and ds.num_classes == 47
    assert torch.equal(ds.graph.src, torch.from_numpy(np.concatenate([edge[:, 0], edge[:, 1]])))
    assert torch.equal(ds.graph.dst, torch.from_numpy(np.concatenate([edge[:, 1], edge[:, 0]])))
    assert not (tmp_path / "root" / "ogb" / "products.gatx.pt").exists(), "cache=False writes no cache"


def test_data_dir_from_environment(server, tmp_path, monkeypatch):
    mirror, served, _ = server
    write_ogb_zip(served / "ogb" / "arxiv.zip")
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "env"))
    with pytest.warns(RuntimeWarning):
        load_ogb("ogbn-arxiv", mirror=mirror)
    assert (tmp_path / "env" / "ogb" / "arxiv.zip").is_file()


def test_offline_error_lists_file_url_and_path(tmp_path):
    with socket.socket() as s:  # nothing listening on this port: like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    with pytest.raises(DownloadError) as err:
        load_ogb("ogbn-products", root, mirror=f"http://127.0.0.1:{port}")
    msg = str(err.value)
    assert str(root / "ogb" / "products.zip") in msg and f"127.0.0.1:{port}/ogb/products.zip" in msg and ENV_DIR in msg
    with pytest.raises(DownloadError, match="download=False") as err:
        load_ogb("ogbn-arxiv", root, download=False)
    assert "https://snap.stanford.edu/ogb/data/nodeproppred/arxiv.zip" in str(err.value)
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()], "nothing half-written"


def test_changed_zip_is_refused(server, tmp_path):
    mirror, served, _ = server
    write_ogb_zip(served / "ogb" / "arxiv.zip")
    root = tmp_path / "root"
    with pytest.warns(RuntimeWarning):
        load_ogb("ogbn-arxiv", root, mirror=mirror)
    write_ogb_zip(root / "ogb" / "arxiv.zip", seed=1)  # different bytes than the recorded sha256
    with pytest.raises(ChecksumError, match="expected sha256"):
        load_ogb("ogbn-arxiv", root, download=False)


@pytest.mark.parametrize("drop, bad_edge, match", [
    ("raw/node-feat.csv.gz", False, "has no member 'arxiv/raw/node-feat.csv.gz'"),
    ("split/time/valid.csv.gz", False, "split/time/valid.csv.gz"),
    (None, True, r"edge ids must lie in \[0, 40\)"),
])
def test_malformed_zip(tmp_path, drop, bad_edge, match):
    root = tmp_path / "root"
    write_ogb_zip(root / "ogb" / "arxiv.zip", drop=drop, bad_edge=bad_edge)
    with pytest.warns(RuntimeWarning), pytest.raises(DataError, match=match):
        load_ogb("ogbn-arxiv", root, download=False)


def test_bad_name():
    with pytest.raises(ValueError, match="ogbn-arxiv"):
        load_ogb("ogbn-mag")
