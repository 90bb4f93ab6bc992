"""Checksum manifest of every file :mod:`gatx.data` can download: path in the data root -> source.

Paths mirror the cache layout (``<root>/planetoid/<name>/ind.<name>.<part>``, ``<root>/mnist/<file>``).
``sha256`` and ``bytes`` were computed from byte-identical copies of the canonical files (see
``datasets/README.md`` for where they came from). ``None`` means *not verified here*:

- PubMed (all 8 files): no copy was available to hash, so nothing is pinned. The loader keeps a
  trust-on-first-use record (``<file>.sha256``) and verifies later loads against it.
- MNIST train: pinned by the MD5 that torchvision publishes for these files (the same source whose
  test-set MD5s match the hashed test files); size and sha256 are recorded on first use as above.

This is a Python module (not JSON) so that it ships inside the installed package with no packaging
configuration. Edit it only with hashes computed from real files, never from memory.
"""
from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    """Where one file comes from and what its bytes must be (``None``: not pinned)."""

    url: str
    bytes: int | None
    sha256: str | None
    md5: str | None = None


_PLANETOID = "https://github.com/kimiyoung/planetoid/raw/master/data/"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"

FILES: dict[str, Entry] = {
    "planetoid/cora/ind.cora.x": Entry(
        _PLANETOID + "ind.cora.x", 22119, "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab"
    ),
    "planetoid/cora/ind.cora.tx": Entry(
        _PLANETOID + "ind.cora.tx", 148025, "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a"
    ),
    "planetoid/cora/ind.cora.allx": Entry(
        _PLANETOID + "ind.cora.allx", 257305, "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543"
    ),
    "planetoid/cora/ind.cora.y": Entry(
        _PLANETOID + "ind.cora.y", 4054, "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1"
    ),
    "planetoid/cora/ind.cora.ty": Entry(
        _PLANETOID + "ind.cora.ty", 28135, "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad"
    ),
    "planetoid/cora/ind.cora.ally": Entry(
        _PLANETOID + "ind.cora.ally", 47959, "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71"
    ),
    "planetoid/cora/ind.cora.graph": Entry(
        _PLANETOID + "ind.cora.graph", 59847, "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d"
    ),
    "planetoid/cora/ind.cora.test.index": Entry(
        _PLANETOID + "ind.cora.test.index", 5000, "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875"
    ),
    "planetoid/citeseer/ind.citeseer.x": Entry(
        _PLANETOID + "ind.citeseer.x", 31087, "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6"
    ),
    "planetoid/citeseer/ind.citeseer.tx": Entry(
        _PLANETOID + "ind.citeseer.tx", 260321, "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21"
    ),
    "planetoid/citeseer/ind.citeseer.allx": Entry(
        _PLANETOID + "ind.citeseer.allx", 595021, "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668"
    ),
    "planetoid/citeseer/ind.citeseer.y": Entry(
        _PLANETOID + "ind.citeseer.y", 3014, "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924"
    ),
    "planetoid/citeseer/ind.citeseer.ty": Entry(
        _PLANETOID + "ind.citeseer.ty", 24135, "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce"
    ),
    "planetoid/citeseer/ind.citeseer.ally": Entry(
        _PLANETOID + "ind.citeseer.ally", 55623, "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95"
    ),
    "planetoid/citeseer/ind.citeseer.graph": Entry(
        _PLANETOID + "ind.citeseer.graph", 61987, "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7"
    ),
    "planetoid/citeseer/ind.citeseer.test.index": Entry(
        _PLANETOID + "ind.citeseer.test.index", 5000, "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4"
    ),
    "planetoid/pubmed/ind.pubmed.x": Entry(_PLANETOID + "ind.pubmed.x", None, None),
    "planetoid/pubmed/ind.pubmed.tx": Entry(_PLANETOID + "ind.pubmed.tx", None, None),
    "planetoid/pubmed/ind.pubmed.allx": Entry(_PLANETOID + "ind.pubmed.allx", None, None),
    "planetoid/pubmed/ind.pubmed.y": Entry(_PLANETOID + "ind.pubmed.y", None, None),
    "planetoid/pubmed/ind.pubmed.ty": Entry(_PLANETOID + "ind.pubmed.ty", None, None),
    "planetoid/pubmed/ind.pubmed.ally": Entry(_PLANETOID + "ind.pubmed.ally", None, None),
    "planetoid/pubmed/ind.pubmed.graph": Entry(_PLANETOID + "ind.pubmed.graph", None, None),
    "planetoid/pubmed/ind.pubmed.test.index": Entry(_PLANETOID + "ind.pubmed.test.index", None, None),
    "mnist/train-images-idx3-ubyte.gz": Entry(_MNIST + "train-images-idx3-ubyte.gz", None, None, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "mnist/train-labels-idx1-ubyte.gz": Entry(_MNIST + "train-labels-idx1-ubyte.gz", None, None, "d53e105ee54ea40749a09fcbcd1e9432"),
    "mnist/t10k-images-idx3-ubyte.gz": Entry(
        _MNIST + "t10k-images-idx3-ubyte.gz", 1648877,
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", "9fb629c4189551a2d022fa330f9573f3",
    ),
    "mnist/t10k-labels-idx1-ubyte.gz": Entry(
        _MNIST + "t10k-labels-idx1-ubyte.gz", 4542,
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", "ec29112dd5afa0611ce80d1b7f02629c",
    ),
}

# OGB node-property zips (gatx.data.ogb), URLs from OGB's ogb/nodeproppred/master.csv. OGB publishes
# no checksums and no copy could be downloaded here to hash, so nothing is pinned: trust on first use.
# (Third-party code cites sha256 49f85c801589ecdcc52cfaca99693aaea7b8af16a9ac3f41dd85a5f3193fe276 for
# arxiv.zip and 5ea0a112edaec2141c0a2a612dd4aed58df97ff3e1ab1a0ca8238f43cbbb50a8 for products.zip;
# not verified against the files, so not pinned.)
_OGB = "https://snap.stanford.edu/ogb/data/nodeproppred/"
FILES.update({
    "ogb/arxiv.zip": Entry(_OGB + "arxiv.zip", None, None),
    "ogb/products.zip": Entry(_OGB + "products.zip", None, None),
})
