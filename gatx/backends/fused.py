"""Fused CPU backend: one pass per destination row computes the scores, the softmax and the sum.

``sparse_attention`` runs as a single C++/OpenMP kernel over the graph's CSR (edges grouped by dst):
for each dst node it computes every in-edge's score, the row's max and normaliser, and the weighted
sum of the source values, without materialising any (E, H) tensor. Only the per-row log-sum-exp
(num_dst, H) is kept for backward, which recomputes the scores (as FlashAttention does) in two
passes: one over dst rows (gradients of q, bias, edge_weight and the row terms), one over src rows
of the transposed graph (gradients of k and v, no atomics).

The kernel (``gatx/csrc/fused_attention.cpp``, plain C++ with no torch headers) is compiled on first
use with the system C++ compiler (``$CXX``, else ``c++`` / ``g++`` / ``clang++``; a one-line notice on
stderr, 15-35 s once per machine) and cached in ``$GATX_CACHE_DIR`` (default ``~/.cache/gatx``) under
the rules of :mod:`gatx.backends.fused_build` (private folder, atomic write, size and sha256 checked
before loading); it is loaded with ctypes. Any failure to build or load becomes a reason, so gatx
falls back to the other backends. The kernel checks its indices' bounds itself on every call.

The library also runs GATv2's per-edge vector score for ``GATv2Conv`` from the node rows (and the edge
features' term, when given) over the CSR and CSC, without the (E, H, D) pre-activations that written
out make four (E, H, D) tensors with the LeakyReLU, the product and their gradients (:func:`gat2_score`);
and GATv2's whole attention as one kernel, the score computed per edge inside the forward's pass over
the CSR and the backward's second one (:func:`gat2_attention`, no (E, H) scores either).

Dropout draws a (E, H) keep-mask with ``torch.bernoulli_``, consuming the RNG exactly as
``F.dropout`` on the (E, H) attention does: with the same seed the fused and composed backends drop
the same edges. The mask (one byte per entry) is the only (E, H) tensor kept for backward.

Higher-order gradients (``torch.autograd.grad(..., create_graph=True)``, e.g. a gradient penalty):
the backward then recomputes the forward as differentiable torch ops (same math, same dropout mask)
and differentiates that, so second-order terms are exact, at the torch backend's cost for that step.
Limits: no forward-mode AD, CPU only. The kernel runs float32 and float64; float16 / bfloat16 inputs run
in float32 copies (twice their bytes, kept for backward) and the results are cast back: measured on
10k nodes / 110k edges, 8 heads x 8, fwd+bwd, 4x faster than the torch backend's half path.

Under ``torch.compile`` (``fullgraph=True`` works) the kernel runs through the custom operators
``gatx::fused_attention2`` / ``gatx::fused_attention2_backward`` of :mod:`gatx.ops._library`, which take
the graph's CSR / CSC tensors instead of the Graph (built inside the trace when not cached yet, and
then cached on the Graph); eager calls keep this module's autograd.Function (no dispatcher cost).
A compiled function cannot be differentiated twice (a torch.compile limit); eager double backward works.

Why plain C++ through ctypes (measured on 100k nodes / 2.1M edges, 8 heads x 8, this 2-core box):
the same forward written in numba (prange) ran 3.5x slower than this kernel and took ~9 s to JIT;
torch.compile of the gather / scatter formulation took 29 s to compile and ran fwd+bwd 11x slower;
a torch C++ extension needs torch's headers (42 s to compile an empty one here, against 14 s for
all of this kernel) and ninja, for no gain in the kernel itself.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch
from torch import Tensor

from ..graph import Graph
from ..ops._bias import add_out_bias
from ..ops._layout import side_by_side
from .fused_build import GatxKernelCacheWarning, build, cache_dir
from ..ops import _library  # noqa: F401  - registers the gatx::fused_attention2 custom ops (used while compiling)

NAME = "fused"
_DTYPES = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)  # run in float32 copies
TAKES_SHARED_VALUES = True  # sparse_attention takes v of one head that every head reads (not while compiling)
TAKES_OUT_BIAS = True  # sparse_attention(out_bias=...): added in the forward pass, its gradient summed in the single backward pass
_ABI = 11  # gatx_fused_abi_version() of the matching source
__all__ = ["GatxKernelCacheWarning", "availability", "build", "cache_dir", "gat2_attention", "gat2_attention_backward",
           "gat2_fits", "gat2_score", "keep_mask", "load", "reasons", "sparse_attention"]


class _State:
    lib: Any = None
    error: str | None = None
    tried: bool = False
    lock = threading.Lock()


_state = _State()


def _declare(fn: Any) -> None:
    i64, ptr, dbl, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int
    fn.restype = c_int
    fn.argtypes = [c_int, c_int, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int, ptr,
                   dbl, dbl, dbl, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, c_int, c_int,
                   ptr, ptr, ptr, ptr]


def _declare_score(fn: Any) -> None:
    """The argument types of GATv2's score entry points (see :func:`gat2_score`)."""
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    fn.restype = c_int
    fn.argtypes = [c_int, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ctypes.c_double, ptr, ptr,
                   ptr, ptr, ptr, c_int]


def load() -> Any:
    """The compiled library (building it on first use), or raise OSError with the reason."""
    if _state.lib is not None:
        return _state.lib
    with _state.lock:
        if _state.lib is None and not _state.tried:
            _state.tried = True
            try:
                lib = ctypes.CDLL(str(build()))
                if lib.gatx_fused_abi_version() != _ABI:
                    raise OSError("stale fused_attention library (ABI version mismatch); clear the gatx cache")
                _declare(lib.gatx_fused_f32)
                _declare(lib.gatx_fused_f64)
                _declare_score(lib.gatx_gat2_score_f32)
                _declare_score(lib.gatx_gat2_score_f64)
                _state.lib = lib
            except Exception as err:  # noqa: BLE001 - every failure becomes a reason
                _state.error = f"the fused CPU kernel is unavailable: {type(err).__name__}: {err}"
    if _state.lib is None:
        raise OSError(_state.error)
    return _state.lib


def availability() -> str | None:
    """None when the kernel library builds and loads, else the reason it does not."""
    try:
        load()
    except OSError as err:
        return str(err)
    return None


def _traced_availability() -> str:
    """:func:`availability` for torch.compile's tracer: Dynamo calls it at trace time instead of tracing
    it (the ctypes load and its lock cannot be traced) and takes the result as a constant ("" = available).

    Marked by the flag ``torch.compiler.assume_constant_result`` sets, without importing
    ``torch._dynamo`` (seconds, and it imports triton) when the fused backend is imported.
    """
    return availability() or ""


_traced_availability._dynamo_marked_constant = True  # type: ignore[attr-defined]


def reasons(graph: Graph, *tensors: Tensor | None, op: str = "", **opts: Any) -> list[str]:
    """Why the fused backend cannot run this input (empty list: it can)."""
    out = []
    if op and op != "sparse_attention":
        out.append(f"the fused backend runs only sparse_attention, not {op}")
    if graph.device.type != "cpu":
        out.append(f"the fused backend runs on cpu only, got {graph.device}")
    floats = [t for t in tensors if t is not None and t.is_floating_point()]
    dtypes = {t.dtype for t in floats}
    if any(t is not None and not t.is_floating_point() for t in tensors):
        out.append("the fused backend needs floating-point inputs (edge_weight included)")
    if dtypes - set(_DTYPES) - set(_HALF):
        out.append(f"the fused backend supports float32, float64, float16 and bfloat16, got {sorted(map(str, dtypes - set(_DTYPES) - set(_HALF)))}")
    elif len(dtypes) > 1:
        out.append(f"the fused backend needs one dtype for all inputs, got {sorted(map(str, dtypes))}")
    if any(t is not None and (t.is_sparse or t.layout != torch.strided) for t in tensors):
        out.append("the fused backend needs dense (strided) tensors")
    score = opts.get("score")
    if score == "given":
        logits = opts.get("logits")
        if logits is not None and logits.dim() != 2:
            out.append(f"the fused backend needs logits of shape (E, H), got {tuple(logits.shape)}")
    elif score is not None and len(tensors) >= 3:
        q, k, v = tensors[:3]
        want = 3 if score == "dot" else 2
        if q.dim() != want or k.dim() != want:
            out.append(f"the fused backend needs q and k of {want} dims for score={score!r}, got {q.dim()} and {k.dim()}")
        if v.dim() != 3:
            out.append(f"the fused backend needs v of shape (num_src, H, D), got {tuple(v.shape)}")
    heads = tensors[2].shape[1] if len(tensors) >= 3 and tensors[2].dim() >= 2 else None
    bias, ew = opts.get("bias"), opts.get("edge_weight")
    if bias is not None and (bias.dim() != 2 or bias.shape[1] not in (1, heads)):
        out.append(f"the fused backend needs bias of shape (E, H) or (E, 1), got {tuple(bias.shape)}")
    if ew is not None and ew.dim() == 2 and ew.shape[1] not in (1, heads):
        out.append(f"the fused backend needs edge_weight of shape (E,), (E, H) or (E, 1), got {tuple(ew.shape)}")
    if not out:
        why = _traced_availability() if torch.compiler.is_compiling() else availability()
        if why:
            out.append(why)
    return out


def _shared_values(q: Tensor, v: Tensor) -> bool:
    """v has one head that the scores' several heads all read (q's heads are the scores')."""
    return v.shape[1] == 1 and q.shape[1] != 1


def _gat2_args(graph: Graph, fs: Tensor, fd: Tensor, attn: Tensor, ee: Tensor | None) -> tuple[Tensor | None, ...]:
    """(fs, fd, attn, ee) contiguous, as GATv2's kernels (:func:`gat2_score`, :func:`gat2_attention`) read
    them, after checking their shapes and dtype."""
    H, D = attn.shape
    E = graph.num_edges
    if (fs.shape != (graph.num_src, H, D) or fd.shape != (graph.num_dst, H, D) or (ee is not None and ee.shape != (E, H, D))
            or len({t.dtype for t in (fs, fd, attn, ee) if t is not None}) != 1 or fs.dtype not in _DTYPES):
        raise ValueError(f"GATv2's fused kernels need float32 / float64 fs (num_src, H, D), fd (num_dst, H, D), "
                         f"ee (E, H, D) and attn (H, D) of one dtype, got {tuple(fs.shape)}, {tuple(fd.shape)}, "
                         f"{tuple(ee.shape) if ee is not None else None}, {tuple(attn.shape)}")
    return tuple(t.contiguous() if t is not None else None for t in (fs, fd, attn, ee))


def gat2_score(graph: Graph, fs: Tensor, fd: Tensor, attn: Tensor, slope: float, ee: Tensor | None = None,
               g: Tensor | None = None, need: tuple[bool, ...] = (False,) * 4) -> Any:
    """GATv2's edge scores from the node rows, ``(leaky_relu(fs[src] + fd[dst] (+ ee), slope) * attn).sum(-1)``
    (E, H), for float32 / float64 ``fs`` (num_src, H, D), ``fd`` (num_dst, H, D), an optional per-edge term
    ``ee`` (E, H, D) (edge features) and ``attn`` (H, D) of one dtype, without making the (E, H, D)
    pre-activations: one pass over the graph's CSR. With ``g`` (dL/ds, (E, H)) instead, the backward
    (dfs, dfd, dattn, dee), each computed when ``need`` asks for it (None otherwise): dfd, dattn and dee
    from one pass over the CSR, dfs from one over the CSC."""
    fs, fd, attn, ee = _gat2_args(graph, fs, fd, attn, ee)
    lib = load()
    fn = lib.gatx_gat2_score_f32 if fs.dtype == torch.float32 else lib.gatx_gat2_score_f64
    H, D = attn.shape
    ns, nd, E = graph.num_src, graph.num_dst, graph.num_edges
    threads = torch.get_num_threads()
    csr = graph.csr()

    def call(which: int, rows: tuple[Tensor, Tensor, Tensor], n_rows: int, n_other: int, a: Tensor, b: Tensor,
             **out: Tensor | None) -> None:
        rc = fn(which, n_rows, n_other, E, H, D, _ptr(rows[0]), _ptr(rows[1]), _ptr(rows[2]), _ptr(a), _ptr(b),
                _ptr(ee), _ptr(attn), slope, _ptr(g), _ptr(out.get("s")), _ptr(out.get("drow")),
                _ptr(out.get("dedge")), _ptr(out.get("dattn")), threads)
        if rc == 2:
            raise ValueError("the graph's indices are out of range or its CSR is inconsistent (were they written "
                             "through .data or numpy after the Graph was built?); build a new Graph")
        if rc == 3:
            raise MemoryError("the fused kernel could not allocate its buffers")
        assert rc == 0, f"gat2_score kernel returned {rc}"

    by_dst = (csr.indptr, csr.src, csr.perm)
    if g is None:
        s = fs.new_empty((E, H))
        call(0, by_dst, nd, ns, fd, fs, s=s)
        return s
    g = g.to(fs.dtype).contiguous()
    if g.shape != (E, H):
        raise ValueError(f"gat2_score's gradient must have shape {(E, H)}, got {tuple(g.shape)}")
    need_fs, need_fd, need_attn, need_ee = need
    dfs = dfd = dattn = dee = None
    if need_fd or need_attn or (need_ee and ee is not None):
        dfd = torch.empty_like(fd)
        dattn = attn.new_empty((H, D)) if need_attn else None
        dee = torch.empty_like(ee) if need_ee and ee is not None else None
        call(1, by_dst, nd, ns, fd, fs, drow=dfd, dattn=dattn, dedge=dee)
    if need_fs:
        c = graph.csc()
        dfs = torch.empty_like(fs)
        call(1, (c.indptr, c.dst, c.perm), ns, nd, fs, fd, drow=dfs)
    return dfs, dfd if need_fd else None, dattn, dee


def gat2_fits(num_src: int, width: int, dtype: torch.dtype) -> bool:
    """Whether :func:`gat2_attention_backward` runs on every thread: it sums fs's gradient into one
    (num_src, width) buffer per thread, and the kernel takes fewer threads past 1 GiB of them."""
    item = torch.empty((), dtype=dtype).element_size()
    return num_src * width * item * torch.get_num_threads() <= 1 << 30


def gat2_attention(graph: Graph, fs: Tensor, fd: Tensor, attn: Tensor, ee: Tensor | None, slope: float,
                   keep: Tensor | None, keep_scale: float, want_attn: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """GATv2's attention in one pass over the CSR, the score computed per edge as it is used:
    ``out[i] = sum_e a_e * fs[src_e]`` with ``a`` the dst-row softmax of ``(leaky_relu(fs[src] + fd[dst] (+ ee),
    slope) * attn).sum(-1)`` (times the dropout ``keep`` mask and ``keep_scale``), for ``fs`` (num_src, H, D),
    ``fd`` (num_dst, H, D), ``attn`` (H, D), ``ee`` (E, H, D) or None. Neither the (E, H) scores nor any
    (E, H, D) tensor is made unless ``want_attn``. Returns (out (num_dst, H, D), the per-row statistics its
    backward reads, the attention ``a`` (E, H) when ``want_attn``, else None)."""
    fs, fd, attn, ee = _gat2_args(graph, fs, fd, attn, ee)
    H, D = attn.shape
    csr = graph.csr()
    out, stat = fs.new_empty((graph.num_dst, H, D)), fs.new_empty((graph.num_dst, 2, H))
    a = fs.new_empty((graph.num_edges, H)) if want_attn else None
    _call(0, False, (csr.indptr, csr.src, csr.perm, graph.num_src), fd, fs, fs, None, None, keep, keep_scale, 1.0, slope,
          stat, out=out, attn=a, v2=(attn, ee, None, None))
    return out, stat, a


def gat2_attention_backward(graph: Graph, fs: Tensor, fd: Tensor, attn: Tensor, ee: Tensor | None, slope: float,
                            keep: Tensor | None, keep_scale: float, stat: Tensor, out: Tensor, g: Tensor,
                            need: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients (dfs, dfd, dattn, dee) of :func:`gat2_attention` for its output's gradient ``g``, each
    where ``need`` (four flags) asks, in one more pass over the CSR that recomputes each edge's score and
    softmax weight from ``stat``. fs's gradient is summed in per-thread buffers (see :func:`gat2_fits`) and
    attn's per thread: their last bits can change with the thread count and from run to run, as with the
    attention kernel's single backward pass."""
    fs, fd, attn, ee = _gat2_args(graph, fs, fd, attn, ee)
    csr = graph.csr()
    dfs = torch.empty_like(fs) if need[0] else None
    dfd = torch.empty_like(fd) if need[1] else None
    dattn = torch.empty_like(attn) if need[2] else None
    dee = torch.empty_like(ee) if need[3] and ee is not None else None
    _call(1, False, (csr.indptr, csr.src, csr.perm, graph.num_src), fd, fs, fs, None, None, keep, keep_scale, 1.0, slope,
          stat, g=g.to(fs.dtype).contiguous(), o=out, out=dfs, dq=dfd, v2=(attn, ee, dattn, dee))
    return dfs, dfd, dattn, dee


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None and t.numel() else None


def _rows(t: Tensor) -> Tensor:
    """``t`` as the kernel reads node rows: each row contiguous, rows ``t.stride(0)`` elements apart (a
    column slice of a wider buffer, e.g. GATConv's [feat | el | er] projection, is read in place)."""
    if t.dim() >= 2 and t.shape[0] > 1 and t.stride(0) >= t[0].numel() and t[0].is_contiguous():
        return t
    return t.contiguous()


def _row_stride(t: Tensor | None, width: int) -> int:
    """The row stride (elements) of a tensor that :func:`_rows` accepts; ``width`` where any stride will do."""
    return t.stride(0) if t is not None and t.dim() >= 2 and t.shape[0] > 1 else width


def _call(which: int, dot: bool, rows: tuple[Tensor, Tensor, Tensor], q: Tensor, k: Tensor, v: Tensor,
          bias: Tensor | None, ew: Tensor | None, keep: Tensor | None, keep_scale: float, scale: float,
          slope: float, stat: Tensor, *, g: Tensor | None = None, ga: Tensor | None = None,
          out: Tensor | None = None, attn: Tensor | None = None, dk: Tensor | None = None,
          dw: Tensor | None = None, o: Tensor | None = None, dq: Tensor | None = None, ob: Tensor | None = None,
          dob: Tensor | None = None, v2: tuple[Tensor, Tensor | None, Tensor | None, Tensor | None] | None = None) -> None:
    """One kernel pass: ``which`` 0 forward, 1 backward over dst rows, 2 backward over src rows, 3 the
    whole backward in one pass over src rows.

    ``ob``, a contiguous (H, Dv) output bias: the forward adds it to every output row; pass 3 then takes
    ``o`` as including it and writes its gradient (the sum of ``g``'s rows) into ``dob`` when given.

    ``v2 = (av, ee, dav, dee)``: GATv2's vector score (the kernel's mode 2), with q the dst rows, k and v
    the same src rows (H, D each), ``av`` GATv2's (H, D) attention vector, ``ee`` the optional per-edge term
    (E, H, D). Pass 0 is the forward; pass 1 is then GATv2's whole backward over the dst rows, with the
    forward's output ``o``: the src rows' gradient into ``out``, the dst rows' into ``dq``, attn's and ee's
    into ``dav`` and ``dee`` (each optional).

    Pass 3 takes the CSC ``rows`` (as pass 2), the output gradient ``g`` and the forward's output ``o``
    (no attention gradient ``ga``), and writes ``out`` = dv, ``dk``, ``dq``, ``attn`` = dbias and ``dw``
    (each optional); it replaces passes 1 + 2 (their gather of v per edge goes: the row term of the
    softmax gradient is ``<g, o>``), and overwrites ``stat``'s second half as pass 1 does."""
    if which == 3 and (ga is not None or g is None or o is None):
        raise ValueError("the single backward pass (which=3) needs g and the forward's output o, and no attention "
                         "gradient ga; run passes 1 and 2 instead")
    lib = load()
    fn = lib.gatx_fused_f32 if v.dtype == torch.float32 else lib.gatx_fused_f64
    indptr, nbr, eid, n_other = rows
    H, Dv = q.shape[1], v.shape[2]  # heads: the scores' (v may have one head that every head reads)
    shared = _shared_values(q, v)
    Dk = q.shape[2] if dot or v2 is not None else 1
    kw, vw = H * Dk, (1 if shared else H) * Dv  # the widths of a row of q or k, and of v
    # row strides of q, k, v, out, dk, dq (rows of each are contiguous: see _rows)
    strides = (ctypes.c_int64 * 6)(_row_stride(q, kw), _row_stride(k, kw), _row_stride(v, vw),
                                   _row_stride(out, H * Dv if which == 0 else kw if which == 1 else vw),
                                   _row_stride(dk, kw), _row_stride(dq, kw))
    rc = fn(which, 2 if v2 is not None else int(dot), indptr.numel() - 1, n_other, nbr.numel(), H, Dk, Dv, _ptr(indptr), _ptr(nbr), _ptr(eid),
            _ptr(q), _ptr(k), _ptr(v), _ptr(bias), _ptr(ew), int(ew is not None and ew.dim() == 2), _ptr(keep),
            keep_scale, scale, slope, _ptr(g), _ptr(ga), _ptr(stat), _ptr(out), _ptr(attn), _ptr(dk), _ptr(dw),
            _ptr(o), _ptr(dq), _ptr(ob), _ptr(dob), strides, torch.get_num_threads(), int(shared),
            *(map(_ptr, v2) if v2 is not None else (None,) * 4))
    if rc == 2:  # the kernel's own bounds check: indices changed behind the Graph's back (e.g. through .data)
        raise ValueError("the graph's indices are out of range or its CSR is inconsistent (were they written "
                         "through .data or numpy after the Graph was built?); build a new Graph")
    if rc == 3:
        raise MemoryError("the fused kernel could not allocate its per-thread buffers; use fewer threads "
                          "(torch.set_num_threads) or another backend")
    assert rc == 0, f"fused kernel returned {rc}"


def forward_pass(csr: tuple[Tensor, Tensor, Tensor, int], q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                 ew: Tensor | None, keep: Tensor | None, dot: bool, scale: float, slope: float, keep_scale: float,
                 want_attn: bool, ob: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel's forward over ``csr = (indptr, src, perm, num_src)``: (out (num_dst, H, Dv), the per-row
    log-sum-exp ``stat`` (num_dst, 2, H) that backward reads, attn (E, H), or (0, H) unless ``want_attn``);
    ``ob``, a contiguous (H, Dv) output bias, is added to ``out``."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    indptr, src = csr[0], csr[1]
    H, Dv = q.shape[1], v.shape[2]  # v may have one head, shared by all
    num_dst = indptr.numel() - 1
    out = v.new_empty((num_dst, H, Dv))
    stat = v.new_empty((num_dst, 2, H))  # per-row log-sum-exp; backward adds its row term
    attn = v.new_empty((src.numel(), H) if want_attn else (0, H))
    _call(0, dot, csr, q, k, v, bias, ew, keep, keep_scale, scale, slope, stat, out=out, attn=attn if want_attn else None,
          ob=ob)
    return out, stat, attn


def backward_pass(csr: tuple[Tensor, Tensor, Tensor, int], csc: Any, q: Tensor, k: Tensor, v: Tensor,
                  bias: Tensor | None, ew: Tensor | None, keep: Tensor | None, stat: Tensor, g_out: Tensor | None,
                  g_attn: Tensor | None, needs: tuple[bool, ...], dot: bool, scale: float, slope: float,
                  keep_scale: float, fwd_out: Tensor | None = None, stacked: bool = False,
                  ob: Tensor | None = None, edge_src: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """First-order gradients (dq, dk, dv, dbias, dew, dout_bias), None where ``needs`` (six flags) is False.

    One kernel pass over the dst rows (``csr``) for q, bias and edge_weight, one over the src rows for
    k and v; ``csc`` is ``(indptr, dst, perm, num_dst)`` or a callable returning it (built only when
    k or v need a gradient). Given the forward's output ``fwd_out`` and no attention gradient, one
    pass over the src rows computes them all (pass 3 of :func:`_call`: ~0.65x the time of the two).

    ``stacked``: when v, k and q are the column slices ``[v | k | q]`` of one buffer (GATConv's projection
    :func:`gatx.nn._utils.scored_projection`), dv, dk and dq are written the same way into one new
    buffer, so that the projection's backward runs one product for all three (see :func:`_side_by_side_grads`).

    ``ob``: the contiguous (H, Dv) output bias the forward added (``fwd_out`` includes it); its gradient,
    the sum of ``g_out``'s rows, is summed by the single pass as it reads them.

    Shared values (v of one head, additive scores) without v's gradient: the dst pass alone, whose
    per-edge score gradients (E, H) are summed into dk by src (``edge_src``, each edge's src node by edge
    id): a src pass would gather a dst row's H x Dv gradient for every edge."""
    need_q, need_k, need_v, need_b, need_w, need_ob = needs
    q, k, v = _rows(q), _rows(k), _rows(v)
    num_dst = csr[0].numel() - 1
    g_out = g_out.contiguous() if g_out is not None else v.new_zeros((num_dst, q.shape[1], v.shape[2]))
    g_attn = g_attn.contiguous() if g_attn is not None and g_attn.numel() else None
    args = (q, k, v, bias, ew, keep, keep_scale, scale, slope, stat)
    grads = _side_by_side_grads(q, k, v) if stacked and need_q and need_k and need_v else None
    dq, dk, dv = grads if grads is not None else (q.new_empty(q.shape) if need_q else None,
                                                   k.new_empty(k.shape) if need_k else None,
                                                   v.new_empty(v.shape) if need_v else None)
    db = torch.empty_like(bias) if need_b else None
    dw = torch.empty_like(ew) if need_w else None
    dob = torch.empty_like(ob) if need_ob else None
    # the single pass groups dq's sums by thread (rows handed out dynamically: the last bits can change from
    # run to run); torch.use_deterministic_algorithms asks for passes 1 + 2, whose bits never do
    if _shared_values(q, v) and not dot and not need_v and edge_src is not None:
        dz = db if db is not None else (v.new_empty((edge_src.numel(), q.shape[1])) if need_k else None)
        if dob is not None:
            torch.sum(g_out, 0, out=dob)
        _call(1, dot, csr, *args, g=g_out, ga=g_attn, out=dq, attn=dz, dw=dw)
        if need_k:
            dk = torch.zeros_like(k).index_add_(0, edge_src, dz)
        return dq, dk, dv, db, dw, dob
    if fwd_out is not None and g_attn is None and (need_k or need_v) and not torch.are_deterministic_algorithms_enabled():
        _call(3, dot, csc() if callable(csc) else csc, *args, g=g_out, o=fwd_out, out=dv, dk=dk, dq=dq, attn=db, dw=dw,
              ob=ob, dob=dob)
        return dq, dk, dv, db, dw, dob
    if dob is not None:
        torch.sum(g_out, 0, out=dob)
    _call(1, dot, csr, *args, g=g_out, ga=g_attn, out=dq, attn=db, dw=dw)
    if need_k or need_v:
        _call(2, dot, csc() if callable(csc) else csc, *args, g=g_out, ga=g_attn, out=dv, dk=dk)
    return dq, dk, dv, db, dw, dob


def _side_by_side_grads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(dq, dk, dv): column slices ``[dv | dk | dq]`` of one new buffer when v, k and q are laid out that
    way in one buffer (:func:`~gatx.ops._layout.side_by_side`), else None."""
    base = side_by_side(v, k, q)
    if base is None:
        return None
    buf = torch.empty_like(base)  # (N, S)
    lo, hi = v[0].numel(), v[0].numel() + k[0].numel()
    return buf[:, hi:].view(q.shape), buf[:, lo:hi].view(k.shape), buf[:, :lo].view(v.shape)


class _FusedAttention(torch.autograd.Function):
    """(out, attn) = fused sparse attention; saves the inputs and the per-row log-sum-exp only."""

    @staticmethod
    def forward(ctx, q, k, v, bias, ew, keep, graph, dot, scale, slope, keep_scale, want_attn, ob):
        csr = graph.csr()
        out, stat, attn = forward_pass((csr.indptr, csr.src, csr.perm, graph.num_src), q, k, v, bias, ew, keep, dot,
                                       scale, slope, keep_scale, want_attn, ob)
        ctx.save_for_backward(q, k, v, bias, ew, keep, stat, out, ob)  # out: the single backward pass reads it
        ctx.graph, ctx.dot, ctx.scale, ctx.slope, ctx.keep_scale = graph, dot, scale, slope, keep_scale
        ctx.set_materialize_grads(False)
        if not want_attn:
            ctx.mark_non_differentiable(attn)
        return out, attn

    @staticmethod
    def backward(ctx, g_out, g_attn):
        q, k, v, bias, ew, keep, stat, out, ob = ctx.saved_tensors
        graph = ctx.graph
        if g_out is None and g_attn is None:
            return (None,) * 13
        consts = (ctx.dot, ctx.scale, ctx.slope, ctx.keep_scale)
        needs = tuple(ctx.needs_input_grad[:5]) + (ctx.needs_input_grad[12],)  # q, k, v, bias, ew, ob
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            grads = recompute_backward(graph.src, graph.dst, graph.num_dst, needs, q, k, v, bias, ew, keep, *consts,
                                       g_out, g_attn)
            return grads[:5] + (None,) * 7 + grads[5:]
        csr = graph.csr()

        def csc() -> tuple[Tensor, Tensor, Tensor, int]:
            c = graph.csc()
            return c.indptr, c.dst, c.perm, graph.num_dst

        grads = backward_pass((csr.indptr, csr.src, csr.perm, graph.num_src), csc, q, k, v, bias, ew, keep, stat, g_out,
                              g_attn, needs, *consts, fwd_out=out, stacked=True, ob=ob, edge_src=graph.src)
        return grads[:5] + (None,) * 7 + grads[5:]


def reference(src: Tensor, dst: Tensor, num_dst: int, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
              ew: Tensor | None, keep: Tensor | None, dot: bool, scale: float, slope: float,
              keep_scale: float) -> tuple[Tensor, Tensor]:
    """The kernel's forward as differentiable torch ops (same math, same -inf row rule) over the (E,)
    edges ``src -> dst`` in edge-id order: (out, attn)."""
    N, H = num_dst, k.shape[1]  # v may have one head, read by every head
    if dot:
        s = (q.index_select(0, dst) * k.index_select(0, src)).sum(-1) * scale  # (E, H)
        s = s + bias if bias is not None else s
    else:
        z = k.index_select(0, src) + q.index_select(0, dst)  # (E, H)
        s = torch.nn.functional.leaky_relu(z + bias if bias is not None else z, slope)
    idx = dst[:, None].expand(-1, H)  # (E, H)
    m = s.detach().new_full((N, H), float("-inf")).scatter_reduce_(0, idx, s.detach(), "amax")  # (N, H)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows: max 0, weights 0
    e = torch.exp(s - m.index_select(0, dst))  # (E, H)
    den = s.new_zeros((N, H)).index_add(0, dst, e)
    a = e / torch.where(den > 0, den, torch.ones_like(den)).index_select(0, dst)  # (E, H)
    if keep is not None:
        a = a * (keep.to(a.dtype) * keep_scale)
    if ew is not None:
        a = a * (ew[:, None] if ew.dim() == 1 else ew)
    out = v.new_zeros((N, H, v.shape[2])).index_add(0, dst, a[..., None] * v.index_select(0, src))
    return out, a


def recompute_backward(src: Tensor, dst: Tensor, num_dst: int, needs: tuple[bool, ...], q: Tensor, k: Tensor,
                       v: Tensor, bias: Tensor | None, ew: Tensor | None, keep: Tensor | None, dot: bool, scale: float,
                       slope: float, keep_scale: float, g_out: Tensor | None, g_attn: Tensor | None) -> tuple:
    """Gradients of (q, k, v, bias, ew, out_bias) through :func:`reference`, with a graph for higher orders
    (``needs``: six flags; the output bias's gradient is the sum of ``g_out``'s rows)."""
    # fresh aliases: a gradient with respect to them counts only the paths through this op, even when
    # the inputs depend on each other (GATConv's el, er and values all come from one projection)
    inputs = tuple(t.view_as(t) if t is not None else None for t in (q, k, v, bias, ew))
    wanted = [i for i, need in enumerate(needs[:5]) if need]
    dob = g_out.sum(0) if needs[5] and g_out is not None else None
    out, a = reference(src, dst, num_dst, *inputs, keep, dot, scale, slope, keep_scale)
    outs, grads = [], []
    if g_out is not None:
        outs.append(out)
        grads.append(g_out)
    if g_attn is not None and g_attn.numel():
        outs.append(a)
        grads.append(g_attn)
    result: list[Tensor | None] = [None] * 5
    if outs and wanted:
        got = torch.autograd.grad(outs, [inputs[i] for i in wanted], grads, create_graph=True, allow_unused=True)
        for i, g in zip(wanted, got):
            result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(result) + (dob,)


def sparse_attention(graph: Graph, q: Tensor | None, k: Tensor | None, v: Tensor, *, score: str,
                     logits: Tensor | None, scale: float | None, bias: Tensor | None, negative_slope: float, edge_weight: Tensor | None, dropout_p: float,
                     return_attention: bool, out_bias: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``gatx.ops.sparse_attention`` as one fused kernel (inputs already validated by the op); the (H, Dv)
    ``out_bias`` is added in the kernel's forward and its gradient summed in its single backward pass
    (float32 / float64 only: half precision adds it to the cast result)."""
    H = logits.shape[1] if score == "given" else q.shape[1]  # v may have one head, read by every head
    keep, keep_scale = keep_mask(graph.num_edges, H, dropout_p)
    E = graph.num_edges
    if score == "given":
        # given logits run as the additive kernel with zero node terms and slope 1:
        # z = 0 + 0 + (scale * logits + bias), s = z exactly; gradients reach logits and bias through autograd
        given = logits * scale if scale != 1.0 else logits
        bias = given + bias if bias is not None else given
        q, k = v.new_zeros((graph.num_dst, H)), v.new_zeros((graph.num_src, H))
        score, scale, negative_slope = "additive", 1.0, 1.0
    half = v.dtype if v.dtype in _HALF else None
    if half is not None:  # the kernel's dtypes are float32 / float64: float32 copies in, results cast back
        q, k, v, bias, edge_weight = (t.float() if t is not None else None for t in (q, k, v, bias, edge_weight))
    q, k, v = _rows(q), _rows(k), _rows(v)  # column slices of a wider buffer are read in place
    bias = bias.expand(E, H).contiguous() if bias is not None else None  # (E, H); (E, 1) broadcasts
    if edge_weight is not None and edge_weight.dim() == 2 and edge_weight.shape[1] == 1 and H != 1:
        edge_weight = edge_weight.squeeze(1)  # (E,): the kernel broadcasts it over the heads
    edge_weight = edge_weight.contiguous() if edge_weight is not None else None
    inside = out_bias is not None and half is None
    ob = out_bias.expand(H, v.shape[2]).contiguous() if inside else None
    consts = (score == "dot", float(scale) if scale is not None else 1.0, float(negative_slope), keep_scale, return_attention)
    if torch.compiler.is_compiling():
        res = _cast(half, _traced(graph, q, k, v, bias, edge_weight, keep, *consts, ob))
    else:
        out, attn = _FusedAttention.apply(q, k, v, bias, edge_weight, keep, graph, *consts, ob)
        res = _cast(half, (out, attn) if return_attention else out)
    return res if inside else add_out_bias(res, out_bias)


def keep_mask(num_edges: int, heads: int, p: float) -> tuple[Tensor | None, float]:
    """Attention dropout's (E, H) keep-mask (uint8; None when ``p`` is 0) and its scale 1 / (1 - p), from the
    same RNG draws as ``F.dropout`` on the (E, H) attention: ``bernoulli_(1 - p)`` on that shape."""
    if p <= 0.0:
        return None, 1.0
    if p >= 1.0:  # F.dropout(p=1) draws nothing and zeroes everything
        return torch.zeros((num_edges, heads), dtype=torch.uint8), 1.0
    keep = torch.empty((num_edges, heads), dtype=torch.bool).bernoulli_(1.0 - p)
    return keep.view(torch.uint8), 1.0 / (1.0 - p)


def _cast(dtype: torch.dtype | None, res: Tensor | tuple[Tensor, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
    """``res`` (a tensor or a tuple of them) cast to ``dtype``; as it is when ``dtype`` is None."""
    if dtype is None:
        return res
    return tuple(t.to(dtype) for t in res) if isinstance(res, tuple) else res.to(dtype)


def _traced(graph: Graph, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, ew: Tensor | None, keep: Tensor | None,
            dot: bool, scale: float, slope: float, keep_scale: float, want_attn: bool,
            ob: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
    """The fused kernel through the ``gatx::fused_attention2`` custom op (what torch.compile traces);
    the graph's CSC is built (in the traced graph, cached on the Graph) only when a gradient is needed."""
    csr = graph.csr()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias, ew, ob)):
        c = graph.csc()
        csc = (c.indptr, c.dst, c.perm)
    else:
        csc = (csr.indptr.new_empty(0),) * 3
    out, _, attn = torch.ops.gatx.fused_attention2(
        csr.indptr, csr.src, csr.perm, *csc, q, k, v, bias, ew, keep, graph.num_src, dot, scale, slope, keep_scale, want_attn,
        ob,
    )
    return (out, attn) if want_attn else out
