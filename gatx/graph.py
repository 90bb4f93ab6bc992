"""``gatx.Graph``: an immutable directed graph for attention, edges run src (key) -> dst (query)."""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._graph_checks import as_count as _as_count
from ._graph_checks import as_index as _as_index
from ._graph_checks import checked_grouping, is_sorted, stable_order
from ._graph_checks import structure_edges as _structure_edges
from ._graph_checks import tensors_of as _tensors_of
from ._modes import normal, outside_inference, version

__all__ = ["Graph", "CSR", "CSC"]


def _counts(ids: Tensor, n: int) -> Tensor:
    """(n,) int64 occurrences of each id in [0, n): ``bincount`` eagerly; a fixed-size ``index_add``
    while ``torch.compile`` traces (bincount's output size depends on the data)."""
    if not torch.compiler.is_compiling():
        return torch.bincount(ids, minlength=n)
    return torch.zeros(n, dtype=torch.int64, device=ids.device).index_add_(0, ids, torch.ones_like(ids))


def _offsets(counts: Tensor) -> Tensor:
    """(n + 1,) row offsets ``[0, cumsum(counts)]`` of (n,) int64 counts."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


class CSR(NamedTuple):
    """The graph's edges grouped by destination node.

    ``indptr`` (num_dst + 1,) row offsets; ``perm`` (E,) edge ids in row order (stable, so edges of
    one row keep their original order); ``src`` (E,) the source of each edge in row order.
    """

    indptr: Tensor
    perm: Tensor
    src: Tensor


class CSC(NamedTuple):
    """The graph's edges grouped by source node (the transpose of :class:`CSR`).

    ``indptr`` (num_src + 1,) row offsets; ``perm`` (E,) edge ids in row order (stable); ``dst`` (E,)
    the destination of each edge in row order.
    """

    indptr: Tensor
    perm: Tensor
    dst: Tensor


class Graph:
    """An immutable directed graph: attention runs over each dst node's incoming edges.

    Edge ``e`` runs from ``src[e]`` (a key / message source, in ``[0, num_src)``) to ``dst[e]``
    (a query, in ``[0, num_dst)``). Homogeneous graphs have ``num_src == num_dst``; bipartite graphs
    and DGL sampling blocks (``is_block=True``: the first ``num_dst`` source nodes are the
    destination nodes) are first class. Input is validated here, once; kernels trust a ``Graph``.

    A Graph owns its indices: ``src`` and ``dst`` are copied (int64) at construction, so the
    caller may reuse its tensors. The tensors a Graph hands out (``src``, ``dst``, ``csr()``,
    ``csc()``, ``in_degrees()``, the ``structure``'s tensors) must not be written to: each access
    compares their version counters with the ones recorded when they were made (O(1)) and raises
    ``ValueError`` if one changed, so an in-place write can never reach a kernel or a backward.

    Args:
        src: (E,) int source ids.
        dst: (E,) int destination ids.
        num_src: number of source nodes; default ``num_dst``, or ``max id + 1`` over src and dst when
            neither count is given (homogeneous).
        num_dst: number of destination nodes; default ``num_src``.
        is_block: the graph is a DGL-style block (dst nodes are a prefix of the src nodes).
        structure: optional description of a regular structure (set by ``gatx.vision`` builders),
            used by kernels that have a dense-batched fast path; refused unless it describes exactly
            these edges.

    Shapes:
        ``src``, ``dst``: (E,); ``in_degrees()``: (num_dst,).

    >>> g = Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
    >>> g.num_src, g.num_dst, g.num_edges
    (3, 3, 3)
    """

    __slots__ = ("_src", "_dst", "_num_src", "_num_dst", "_is_block", "_structure", "_csr", "_csc", "_dgl", "_in_deg",
                 "_zero_in", "_guards")

    def __init__(
        self,
        src: Tensor,
        dst: Tensor,
        num_src: int | None = None,
        num_dst: int | None = None,
        *,
        is_block: bool = False,
        structure: Any = None,
    ) -> None:
        src = _as_index(src, "src")
        dst = _as_index(dst, "dst")
        if src.numel() != dst.numel():
            raise ValueError(
                f"src and dst must have one entry per edge, got {src.numel()} sources and "
                f"{dst.numel()} destinations"
            )
        if src.device != dst.device:
            raise ValueError(
                f"src and dst must be on the same device, got {src.device} and {dst.device}; "
                "move them with .to(device)"
            )
        max_src = int(src.max()) if src.numel() else -1
        max_dst = int(dst.max()) if dst.numel() else -1
        min_id = min(int(src.min()), int(dst.min())) if src.numel() else 0
        if min_id < 0:
            raise ValueError(f"node ids must be non-negative, got {min_id}")
        if num_src is None and num_dst is None:
            num_src = num_dst = max(max_src, max_dst) + 1
        elif num_src is None:
            num_src = num_dst
        elif num_dst is None:
            num_dst = num_src
        num_src = _as_count(num_src, "num_src")
        num_dst = _as_count(num_dst, "num_dst")
        if max_src >= num_src:
            raise ValueError(
                f"src ids must be < num_src={num_src}, got max id {max_src}; "
                "pass a larger num_src or fix the edge list"
            )
        if max_dst >= num_dst:
            raise ValueError(
                f"dst ids must be < num_dst={num_dst}, got max id {max_dst}; "
                "pass a larger num_dst or fix the edge list"
            )
        if is_block and num_dst > num_src:
            raise ValueError(
                f"a block's dst nodes are a prefix of its src nodes, so num_dst ({num_dst}) "
                f"must be <= num_src ({num_src})"
            )
        if structure is not None:
            described = _structure_edges(structure)
            if described is not None and not (
                described[0].numel() == src.numel()
                and torch.equal(described[0].to(src.device), src) and torch.equal(described[1].to(dst.device), dst)
            ):
                raise ValueError(
                    f"structure {structure!r} does not describe this graph's edges (it holds "
                    f"{described[0].numel()} edges, the graph {src.numel()}, or they differ); pass the "
                    "structure only with the graph it was built for (e.g. gatx.vision.neighborhood_graph's)"
                )
        self._init(src, dst, num_src, num_dst, is_block, structure)

    @outside_inference  # the graph's caches are built on first use and may serve autograd later
    def _init(self, src: Tensor, dst: Tensor, num_src: int, num_dst: int, is_block: bool, structure: Any) -> None:
        """Set the fields from indices this graph owns and that are known to be valid."""
        src, dst = normal(src), normal(dst)  # inference tensors: no version to guard, refused by autograd
        self._src = src
        self._dst = dst
        self._num_src = int(num_src)
        self._num_dst = int(num_dst)
        self._is_block = bool(is_block)
        self._structure = structure
        self._csr: CSR | None = None
        self._csc: CSC | None = None
        self._dgl: Any = None
        self._in_deg: Tensor | None = None
        self._zero_in: int | None = None
        self._guards: dict[str, tuple[tuple[str, Tensor, int], ...]] = {}
        self._guard("edges", [("src", src), ("dst", dst)])
        if structure is not None:
            self._guard("structure", [(f"structure.{name}", t) for name, t in _tensors_of(structure)])

    @classmethod
    def _trusted(cls, src: Tensor, dst: Tensor, num_src: int, num_dst: int, *, is_block: bool = False,
                 structure: Any = None) -> "Graph":
        """A graph from int64 indices that gatx itself derived from a validated graph (no checks, no copy)."""
        graph = cls.__new__(cls)
        graph._init(src, dst, num_src, num_dst, is_block, structure)
        return graph

    @classmethod
    def _trusted_csr(cls, indptr: Tensor, src: Tensor, dst: Tensor, num_src: int, *, perm: Tensor | None = None,
                     structure: Any = None) -> "Graph":
        """:meth:`from_csr` for int64 indices that a gatx builder derived from validated input (no checks,
        no copy): ``dst`` and optionally ``perm`` (``arange(E)``, edges in row order) are given, so the
        CSR is known without a sort."""
        graph = cls._trusted(src, dst, num_src, indptr.numel() - 1, structure=structure)
        graph._csr = CSR(indptr, perm if perm is not None else torch.arange(src.numel(), device=src.device), src)
        return graph

    # ------------------------------------------------------------------ immutability
    def _guard(self, group: str, named: list[tuple[str, Tensor]]) -> None:
        if torch.compiler.is_compiling():  # version counters are not traceable; see _verify
            return
        self._guards[group] = tuple((name, t, version(t)) for name, t in named)

    def _verify(self, group: str) -> None:
        """Raise if a tensor of ``group`` was written in place since it was recorded (O(1) per tensor).

        Skipped while ``torch.compile`` traces (a version counter is runtime state a compiled graph
        cannot guard on): inside a compiled function an in-place write to a graph's tensors is not
        detected here, but the fused kernel still bounds-checks its indices on every call, and the
        next eager use of the graph raises.
        """
        if torch.compiler.is_compiling():
            return
        for name, t, recorded in self._guards.get(group, ()):
            # None: an inference tensor (no counter); -1: written before this graph was copied (see __setstate__)
            if recorded is not None and (recorded < 0 or t._version != recorded):
                raise ValueError(
                    f"graph.{name} was modified in place after the Graph was built; a Graph is immutable "
                    "(kernels and backward passes rely on its validated indices). Build a new Graph "
                    "(e.g. Graph(new_src, new_dst, ...)) instead of writing into one; a graph from a "
                    "gatx.vision builder must not be written to either"
                )

    def __getstate__(self) -> dict[str, Any]:
        """For pickle, ``copy.deepcopy`` and ``torch.save``: the fields, and per guarded tensor whether it is
        still intact (a copy's tensors start new version counters, so the versions themselves mean nothing
        there)."""
        state = {name: getattr(self, name) for name in self.__slots__ if name != "_guards"}
        state["_guards"] = {group: tuple((name, t, recorded is None or t._version == recorded)
                                         for name, t, recorded in entries) for group, entries in self._guards.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy guards its own tensors from their current versions; a tensor that was already written in
        place before the copy stays refused."""
        guards = state.pop("_guards")
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._guards = {group: tuple((name, t, version(t) if intact else -1) for name, t, intact in entries)
                        for group, entries in guards.items()}

    def is_intact(self) -> bool:
        """False when a tensor this graph handed out was modified in place (it then refuses to be used)."""
        try:
            for group in self._guards:
                self._verify(group)
        except ValueError:
            return False
        return True

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: int | tuple[int, int] | None = None) -> "Graph":
        """From a PyG-style ``edge_index`` of shape (2, E): row 0 is the source, row 1 the target.

        ``num_nodes`` is an int (homogeneous) or a ``(num_src, num_dst)`` pair (bipartite).
        """
        if not isinstance(edge_index, Tensor):
            edge_index = torch.as_tensor(edge_index)
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(
                f"edge_index must have shape (2, E) (row 0 = source, row 1 = target), "
                f"got {tuple(edge_index.shape)}"
            )
        if isinstance(num_nodes, tuple):
            return cls(edge_index[0], edge_index[1], num_nodes[0], num_nodes[1])
        return cls(edge_index[0], edge_index[1], num_nodes, num_nodes)

    @classmethod
    def from_csr(cls, indptr: Tensor, src: Tensor, num_src: int | None = None, *, structure: Any = None) -> "Graph":
        """From edges already grouped by destination: dst node ``i`` has the in-edges
        ``indptr[i]:indptr[i + 1]``, whose sources are ``src[indptr[i]:indptr[i + 1]]``.

        Edge ids follow that order, so the CSR is known without a sort (what a graph built per
        forward pass, e.g. by routing, wants). ``num_src`` defaults to ``num_dst = len(indptr) - 1``;
        ``structure`` is attached as in :class:`Graph`.

        >>> g = Graph.from_csr(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1]))
        >>> g.dst.tolist(), g.num_src
        ([0, 0, 1], 2)
        """
        indptr = _as_index(indptr, "indptr")
        if indptr.numel() == 0 or int(indptr[0]) != 0:
            raise ValueError(f"indptr must start at 0 and have num_dst + 1 entries, got {indptr[:1].tolist()}")
        counts = indptr.diff()  # (num_dst,)
        if counts.numel() and int(counts.min()) < 0:
            raise ValueError("indptr must be non-decreasing (it holds row offsets)")
        src_t = _as_index(src, "src")
        if int(indptr[-1]) != src_t.numel():
            raise ValueError(f"indptr[-1] must equal the number of edges, got {int(indptr[-1])} and {src_t.numel()} sources")
        num_dst = counts.numel()
        dst = torch.repeat_interleave(torch.arange(num_dst, device=indptr.device), counts)  # (E,)
        graph = cls(src_t, dst.to(src_t.device), num_src if num_src is not None else num_dst, num_dst, structure=structure)
        graph._in_deg = counts.to(src_t.device)
        graph._guard("in_deg", [("in_degrees()", graph._in_deg)])
        graph._csr = CSR(indptr.to(src_t.device), torch.arange(src_t.numel(), device=src_t.device), graph._src)
        graph._guard("csr", [("csr().indptr", graph._csr.indptr), ("csr().perm", graph._csr.perm)])
        return graph

    @classmethod
    def from_dgl(cls, g: Any) -> "Graph":
        """From a homogeneous ``dgl.DGLGraph`` or a sampling block; edge ids are kept.

        Validated like any other input (a block whose ids exceed its node counts is refused); the
        indices are copied, so later changes to ``g`` (``g.add_edges``) do not reach this graph.
        """
        if len(g.canonical_etypes) != 1:
            raise ValueError(
                f"gatx needs a graph with one edge type, got {len(g.canonical_etypes)}: "
                f"{g.canonical_etypes}; select one with g[etype]"
            )
        src, dst = g.edges(order="eid")
        n_src, n_dst = g.num_src_nodes(), g.num_dst_nodes()
        if not g.is_block and n_src != n_dst and len(g.ntypes) == 1:
            raise ValueError(f"unexpected DGL graph with {n_src} src and {n_dst} dst nodes")
        graph = cls(src, dst, n_src, n_dst, is_block=g.is_block)
        graph._dgl = g  # reused for its cached CSR / CSC while it still matches (see _dgl_graph)
        return graph

    @classmethod
    def from_scipy(cls, matrix: Any) -> "Graph":
        """From a scipy sparse matrix of shape (num_src, num_dst): entry (i, j) is an edge i -> j.

        Edges come in the order of ``matrix.tocoo()``, so ``matrix.tocoo().data`` lines up with them.
        """
        import scipy.sparse as sp

        if not sp.issparse(matrix):
            raise ValueError(f"expected a scipy.sparse matrix, got {type(matrix).__name__}")
        coo = matrix.tocoo()
        n_src, n_dst = coo.shape
        return cls(torch.from_numpy(coo.row.astype("int64")), torch.from_numpy(coo.col.astype("int64")), n_src, n_dst)

    @classmethod
    def from_networkx(cls, nx_graph: Any) -> "Graph":
        """From a networkx graph; nodes are numbered in ``nx_graph.nodes`` order.

        An undirected graph gives two directed edges per edge (one per direction), as DGL and PyG do.
        """
        import networkx as nx

        if not isinstance(nx_graph, nx.Graph):
            raise ValueError(f"expected a networkx graph, got {type(nx_graph).__name__}")
        index = {node: i for i, node in enumerate(nx_graph.nodes)}
        pairs = [(index[u], index[v]) for u, v in nx_graph.edges()]
        if not nx_graph.is_directed():
            pairs = pairs + [(v, u) for u, v in pairs if u != v]
        t = torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)
        n = len(index)
        return cls(t[:, 0], t[:, 1], n, n)

    def _dgl_graph(self) -> Any:
        """The wrapped DGL graph while it still has this graph's counts (a user may mutate it), else None."""
        g = self._dgl
        if g is not None and (g.num_edges() != self.num_edges or g.num_src_nodes() != self._num_src
                              or g.num_dst_nodes() != self._num_dst):
            self._dgl = g = None
        return g

    def _dgl_graph_with(self, fmt: str) -> Any:
        """The wrapped DGL graph when it has already built the sparse format ``fmt`` (so reading it
        is cheaper than sorting here; asking DGL to build one costs more than the sort), else None."""
        g = self._dgl_graph()
        return g if g is not None and fmt in g.formats()["created"] else None

    @outside_inference
    def to_dgl(self) -> Any:
        """This graph as a ``dgl.DGLGraph`` (a block when bipartite or ``is_block``); edge ids kept."""
        self._verify("edges")
        if self._dgl_graph() is not None:
            return self._dgl
        from .backends.dgl import import_dgl

        dgl = import_dgl()
        if self._is_block or self._num_src != self._num_dst:
            g = dgl.create_block(  # DGL shares index memory: give it copies, so a write to graph.src cannot reach it
                (self._src.clone(), self._dst.clone()), num_src_nodes=self._num_src, num_dst_nodes=self._num_dst, device=self._src.device
            )
        else:
            g = dgl.graph((self._src.clone(), self._dst.clone()), num_nodes=self._num_src, device=self._src.device)
        self._dgl = g
        return g

    # ------------------------------------------------------------------ properties
    @property
    def src(self) -> Tensor:
        """(E,) int64 source ids (read-only: a Graph is immutable)."""
        self._verify("edges")
        return self._src

    @property
    def dst(self) -> Tensor:
        """(E,) int64 destination ids (read-only)."""
        self._verify("edges")
        return self._dst

    @property
    def num_src(self) -> int:
        return self._num_src

    @property
    def num_dst(self) -> int:
        return self._num_dst

    @property
    def num_edges(self) -> int:
        return self._src.numel()

    @property
    def is_block(self) -> bool:
        return self._is_block

    @property
    def is_homogeneous(self) -> bool:
        return not self._is_block and self._num_src == self._num_dst

    @property
    def structure(self) -> Any:
        if self._structure is not None:
            self._verify("edges")
            self._verify("structure")
        return self._structure

    @property
    def device(self) -> torch.device:
        return self._src.device

    @property
    def edge_index(self) -> Tensor:
        """(2, E) PyG-style edge index (a new tensor)."""
        self._verify("edges")
        return torch.stack([self._src, self._dst])

    @outside_inference
    def in_degrees(self) -> Tensor:
        """(num_dst,) number of incoming edges of each dst node."""
        self._verify("edges")
        if self._in_deg is None:
            self._in_deg = _counts(self._dst, self._num_dst)
            self._guard("in_deg", [("in_degrees()", self._in_deg)])
        self._verify("in_deg")
        return self._in_deg

    def _num_zero_in_degree(self) -> int:
        """How many dst nodes have no incoming edge (cached: the in-degrees cannot change unnoticed).

        GAT layers check this on every call, as DGL's do; counting it once per graph saves one compare
        and one sum over the nodes per call (small parallel regions that cost a scheduler wait each
        when other processes share the cores).
        """
        degrees = self.in_degrees()  # raises if the edges or the cached degrees were written in place
        if self._zero_in is None:
            self._zero_in = int((degrees == 0).sum())
        return self._zero_in

    @outside_inference
    def csr(self) -> CSR:
        """Edges grouped by dst (cached): see :class:`CSR`."""
        self._verify("edges")
        compiling = torch.compiler.is_compiling()
        if self._csr is None and compiling:  # traced: no data-dependent shortcut (sorted check, DGL's copy)
            perm = stable_order(self._dst, self._num_dst)
            self._csr = CSR(_offsets(self.in_degrees()), perm, self._src.index_select(0, perm))
        if self._csr is None:
            indptr = _offsets(self.in_degrees())
            if is_sorted(self._dst):  # e.g. a DGL sampling block: edges come grouped by dst, no sort
                self._csr = CSR(indptr, torch.arange(self.num_edges, device=self.device), self._src)
        if self._csr is None and self._dgl_graph_with("csc") is not None:  # DGL already holds it: no sort
            self._csr = checked_grouping(self._dgl.adj_tensors("csc"), self._src, self._dst, self._num_dst, CSR)
        if self._csr is None:
            perm = stable_order(self._dst, self._num_dst)
            self._csr = CSR(indptr, perm, self._src.index_select(0, perm))
        if compiling:
            return self._csr
        if "csr" not in self._guards or self._guards["csr"][0][1] is not self._csr.indptr:
            self._guard("csr", [(f"csr().{f}", t) for f, t in zip(CSR._fields, self._csr)])
        self._verify("csr")
        return self._csr

    @outside_inference
    def csc(self) -> CSC:
        """Edges grouped by src (cached): see :class:`CSC`."""
        self._verify("edges")
        compiling = torch.compiler.is_compiling()
        if self._csc is None and not compiling and self._dgl_graph_with("csr") is not None:  # DGL's "csr" groups by source
            self._csc = checked_grouping(self._dgl.adj_tensors("csr"), self._dst, self._src, self._num_src, CSC)
        if self._csc is None:
            perm = stable_order(self._src, self._num_src)
            self._csc = CSC(_offsets(_counts(self._src, self._num_src)), perm, self._dst.index_select(0, perm))
        if compiling:
            return self._csc
        if "csc" not in self._guards or self._guards["csc"][0][1] is not self._csc.indptr:
            self._guard("csc", [(f"csc().{f}", t) for f, t in zip(CSC._fields, self._csc)])
        self._verify("csc")
        return self._csc

    # ------------------------------------------------------------------ transforms (new graphs)
    def add_self_loops(self) -> "Graph":
        """A new graph with an edge i -> i appended for every dst node i (after the existing edges)."""
        if not self._is_block and self._num_src != self._num_dst:
            raise ValueError(
                f"self-loops need dst nodes that are also src nodes; this bipartite graph has "
                f"{self._num_src} src and {self._num_dst} dst nodes (build it with is_block=True if "
                "its dst nodes are the first src nodes)"
            )
        self._verify("edges")
        loop = torch.arange(self._num_dst, device=self.device)
        return Graph._trusted(
            torch.cat([self._src, loop]), torch.cat([self._dst, loop]), self._num_src, self._num_dst,
            is_block=self._is_block,
        )

    def remove_self_loops(self) -> "Graph":
        """A new graph without the edges i -> i."""
        self._verify("edges")
        keep = self._src != self._dst
        return Graph._trusted(self._src[keep], self._dst[keep], self._num_src, self._num_dst, is_block=self._is_block)

    def reverse(self) -> "Graph":
        """A new graph with every edge reversed (dst -> src)."""
        self._verify("edges")
        return Graph._trusted(self._dst, self._src, self._num_dst, self._num_src)  # shared, both guarded

    def to(self, device: torch.device | str) -> "Graph":
        """This graph on ``device`` (itself when already there); the structure moves only with its builder."""
        device = torch.device(device)
        self._verify("edges")
        if device == self.device:
            return self
        return Graph._trusted(
            self._src.to(device, copy=True), self._dst.to(device, copy=True), self._num_src, self._num_dst,
            is_block=self._is_block, structure=self._structure,
        )

    def __repr__(self) -> str:
        kind = "block" if self._is_block else ("bipartite" if self._num_src != self._num_dst else "homogeneous")
        extra = f", structure={self._structure!r}" if self._structure is not None else ""
        return (
            f"Graph(num_src={self._num_src}, num_dst={self._num_dst}, num_edges={self.num_edges}, "
            f"{kind}, device={self.device}{extra})"
        )
