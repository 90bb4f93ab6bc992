"""Triton backend: ``sparse_attention`` as fused GPU kernels (scores, online softmax, aggregation).

The same algorithm as the fused CPU backend, written in Triton (``triton_kernels.py``): one program
per dst row of the CSR gathers its in-edges' keys / values by index in blocks, keeps an online
softmax in float32 (float64 for float64 inputs), and saves only the row log-sum-exp (num_dst, H).
Backward recomputes the scores: pass A over dst rows gives the gradients of q, the bias (or the given
logits) and the edge weight; pass B over src rows of the transposed CSR (``Graph.csc()``) sums the
gradients of k and v per program, without atomics (deterministic).

Runs on CUDA tensors: float32, float64, float16 and bfloat16 (the half types load and store in their
own dtype and accumulate in float32).
With ``TRITON_INTERPRET=1`` in the environment before triton is first imported, Triton's interpreter
runs the same kernels on CPU tensors (slowly: for tests; ``backend=None`` then picks this backend for
CPU inputs too, as the variable asks). Triton is imported only when this backend is asked to run an
input it accepts, never on ``import gatx``.

Dropout draws its (E, H) keep-mask with ``F.dropout`` on a tensor of ones of the attention's shape,
dtype and device, so the RNG stream and the mask are those of the composed backends' ``F.dropout``
on the attention under the same seed.

Limits: first-order gradients only (no double backward, no forward-mode AD); one dtype for all
floating inputs; ``H * max(Dk, Dv)`` at most 4096 after rounding each up to a power of two.

    >>> import torch, gatx
    >>> g = gatx.Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])).to("cuda")  # doctest: +SKIP
    >>> q = k = v = torch.randn(3, 4, 16, device="cuda")  # doctest: +SKIP
    >>> gatx.ops.sparse_attention(g, q, k, v, backend="triton").shape  # doctest: +SKIP
    torch.Size([3, 4, 16])
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import Graph

NAME = "triton"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MAX_TILE = 4096  # BLOCK_H * max(BLOCK_DK, BLOCK_DV): one row's heads x features, held in registers
_EDGE_TILE = 2048  # BLOCK_E * BLOCK_H * max(BLOCK_DK, BLOCK_DV): sm_90 cubins use <= 168 registers (4096: up to 255 + spills)
_MODES = {"additive": 0, "dot": 1, "given": 2}


def _env_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _kernels() -> Any:
    """The kernel module (imports triton)."""
    from . import triton_kernels

    return triton_kernels


def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (fixed once triton_kernels is imported)."""
    mod = sys.modules.get(f"{__package__}.triton_kernels")
    return mod.INTERPRETED if mod is not None else _env_interpret()


@functools.lru_cache(maxsize=1)
def _installed() -> bool:
    """Whether triton can be imported (looked up once: a search of sys.path on every call costs as much
    as a small attention call)."""
    return importlib.util.find_spec("triton") is not None


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def reasons(graph: Graph, *tensors: Tensor | None, op: str = "", **opts: Any) -> list[str]:
    """Why the triton backend cannot run this input (empty list: it can). Imports triton only when
    the input is otherwise acceptable."""
    out = []
    if op and op != "sparse_attention":
        out.append(f"the triton backend runs only sparse_attention, not {op}")
    if not _installed():
        return out + ["triton is not installed (pip install 'gatx[triton]')"]
    interp = interpreted()
    if graph.device.type != "cuda" and not interp:  # the common case on CPU: say so and stop (hot path)
        return out + [f"the triton backend runs on cuda tensors, got {graph.device} (set TRITON_INTERPRET=1 "
                      "before importing triton to run its kernels in Triton's CPU interpreter)"]
    present = [t for t in tensors if t is not None]
    if any(not t.is_floating_point() for t in present):
        out.append("the triton backend needs floating-point inputs (edge_weight included)")
    dtypes = {t.dtype for t in present if t.is_floating_point()}
    if dtypes - set(_DTYPES):
        out.append(f"the triton backend supports float32, float64, float16 and bfloat16, got {sorted(map(str, dtypes - set(_DTYPES)))}")
    elif len(dtypes) > 1:
        out.append(f"the triton backend needs one dtype for all inputs, got {sorted(map(str, dtypes))}")
    if any(t.layout != torch.strided for t in present):
        out.append("the triton backend needs dense (strided) tensors")
    if any(t.device != graph.device for t in present):
        out.append(f"the triton backend needs every tensor on the graph's device {graph.device}")
    score = opts.get("score")
    v = tensors[2] if len(tensors) >= 3 else None
    if score == "given":
        logits = opts.get("logits")
        if logits is not None and logits.dim() != 2:
            out.append(f"the triton backend needs logits of shape (E, H), got {tuple(logits.shape)}")
    elif score is not None and v is not None:
        q, k = tensors[:2]
        want = 3 if score == "dot" else 2
        if q is None or k is None:
            out.append(f"the triton backend needs q and k for score={score!r}")
        elif q.dim() != want or k.dim() != want:
            out.append(f"the triton backend needs q and k of {want} dims for score={score!r}, got {q.dim()} and {k.dim()}")
    if score is not None and v is not None:
        if v.dim() != 3:
            out.append(f"the triton backend needs v of shape (num_src, H, D), got {tuple(v.shape)}")
        else:
            dk = tensors[0].shape[-1] if score == "dot" and tensors[0] is not None else 1
            tile = _pow2(v.shape[1]) * max(_pow2(dk), _pow2(v.shape[2]))
            if tile > _MAX_TILE:
                out.append(f"the triton backend holds H x D per row in registers: H={v.shape[1]}, D={max(dk, v.shape[2])} "
                           f"rounds up to {tile} > {_MAX_TILE}; use backend='torch'")
    heads = v.shape[1] if v is not None and v.dim() >= 2 else None
    bias, ew = opts.get("bias"), opts.get("edge_weight")
    if bias is not None and (bias.dim() != 2 or bias.shape[1] not in (1, heads)):
        out.append(f"the triton backend needs bias of shape (E, H) or (E, 1), got {tuple(bias.shape)}")
    if ew is not None and ew.dim() == 2 and ew.shape[1] not in (1, heads):
        out.append(f"the triton backend needs edge_weight of shape (E,), (E, H) or (E, 1), got {tuple(ew.shape)}")
    if not out:
        try:
            _kernels()
        except Exception as err:  # noqa: BLE001 - a broken triton install becomes a reason
            out.append(f"triton could not be imported: {type(err).__name__}: {err}")
    return out


def _blocks(H: int, Dk: int, Dv: int) -> dict[str, Any]:
    """Tile sizes (powers of two): all heads and features of a row, and 1 to 64 edges per block."""
    bh, bdk, bdv = _pow2(H), _pow2(Dk), _pow2(Dv)
    block_e = max(1, min(64, _EDGE_TILE // (bh * max(bdk, bdv))))
    # FMA contraction stated explicitly (Triton 3.9 warns when it is left to its changing default)
    return dict(BLOCK_E=block_e, BLOCK_H=bh, BLOCK_DK=bdk, BLOCK_DV=bdv, enable_fp_fusion=True)


class _TritonAttention(torch.autograd.Function):
    """(out, attn) = sparse attention; saves the inputs, the output and the row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, bias, ew, keep, graph, mode, scale, slope, keep_scale, want_attn):
        kern = _kernels()
        N, H, Dv = graph.num_dst, v.shape[1], v.shape[2]
        Dk = q.shape[2] if mode == 1 else 1
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        out = v.new_empty((N, H, Dv))
        lse = torch.empty((N, H), dtype=acc, device=v.device)
        attn = v.new_empty((graph.num_edges, H) if want_attn else (0, H))
        w_mode = 0 if ew is None else (2 if ew.dim() == 2 else 1)
        if N:
            csr = graph.csr()
            kern.fwd_kernel[(N,)](
                csr.indptr, csr.src, csr.perm, _or(q, v), _or(k, v), v, _or(bias, v), _or(ew, v), _or(keep, v),
                out, lse, attn if want_attn else out, H, Dk, Dv, scale, slope, keep_scale,
                MODE=mode, HAS_BIAS=bias is not None, W_MODE=w_mode, HAS_KEEP=keep is not None, WANT_ATTN=want_attn,
                **_blocks(H, Dk, Dv))
        ctx.save_for_backward(q, k, v, bias, ew, keep, out, lse)
        ctx.graph, ctx.mode, ctx.scale, ctx.slope, ctx.keep_scale, ctx.w_mode = graph, mode, scale, slope, keep_scale, w_mode
        ctx.set_materialize_grads(False)
        if not want_attn:
            ctx.mark_non_differentiable(attn)
        return out, attn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_attn):
        q, k, v, bias, ew, keep, out, lse = ctx.saved_tensors
        graph, mode = ctx.graph, ctx.mode
        need_q, need_k, need_v, need_b, need_w = ctx.needs_input_grad[:5]
        if g_out is None and g_attn is None:
            return (None,) * 12
        kern = _kernels()
        H, Dv = v.shape[1], v.shape[2]
        Dk = q.shape[2] if mode == 1 else 1
        g = g_out.contiguous() if g_out is not None else torch.zeros_like(out)
        ga = g_attn.contiguous() if g_attn is not None and g_attn.numel() else None
        dq = torch.empty_like(q) if need_q and q is not None else None
        db = torch.empty_like(bias) if need_b else None
        dw = torch.empty_like(ew) if need_w else None
        dk = torch.empty_like(k) if need_k and k is not None else None
        dv = torch.empty_like(v) if need_v and g_out is not None else None  # v reaches only the output
        delta = torch.empty_like(lse)
        common = dict(MODE=mode, HAS_BIAS=bias is not None, W_MODE=ctx.w_mode, HAS_KEEP=keep is not None,
                      HAS_GA=ga is not None, **_blocks(H, Dk, Dv))
        scalars = (H, Dk, Dv, ctx.scale, ctx.slope, ctx.keep_scale)
        ins = (_or(q, v), _or(k, v), v, _or(bias, v), _or(ew, v), _or(keep, v))
        if graph.num_dst:
            csr = graph.csr()
            kern.bwd_dst_kernel[(graph.num_dst,)](
                csr.indptr, csr.src, csr.perm, *ins, out, g, _or(ga, v), lse, delta, _or(dq, v), _or(db, v),
                _or(dw, v), *scalars, WANT_DQ=dq is not None, WANT_DB=db is not None, WANT_DW=dw is not None, **common)
        if (dk is not None or dv is not None) and graph.num_src:
            csc = graph.csc()
            kern.bwd_src_kernel[(graph.num_src,)](
                csc.indptr, csc.dst, csc.perm, *ins, g, _or(ga, v), lse, delta, _or(dk, v), _or(dv, v), *scalars,
                WANT_DK=dk is not None, WANT_DV=dv is not None, **common)
        return dq, dk, dv, db, dw, None, None, None, None, None, None, None


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """``t``, or a placeholder pointer for an absent input (its kernel branch is compiled out)."""
    return t if t is not None else dummy


def sparse_attention(graph: Graph, q: Tensor | None, k: Tensor | None, v: Tensor, *, score: str,
                     logits: Tensor | None, scale: float | None, bias: Tensor | None, negative_slope: float,
                     edge_weight: Tensor | None, dropout_p: float,
                     return_attention: bool) -> Tensor | tuple[Tensor, Tensor]:
    """``gatx.ops.sparse_attention`` as Triton kernels (inputs already validated by the op)."""
    E, H = graph.num_edges, v.shape[1]
    keep, keep_scale = None, 1.0
    if dropout_p > 0.0:
        # the mask of F.dropout on the (E, H) attention under the same RNG state (same draws, any device)
        keep = (F.dropout(v.new_ones((E, H)), dropout_p, training=True) != 0).view(torch.uint8)
        keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    if score == "given":
        # s = scale * logits + bias goes to the kernel as its bias; autograd carries dbias to both
        given = logits * scale if scale != 1.0 else logits
        bias = given + bias if bias is not None else given
        q = k = None
    q = q.contiguous() if q is not None else None
    k = k.contiguous() if k is not None else None
    bias = bias.expand(E, H).contiguous() if bias is not None else None  # (E, H); (E, 1) broadcasts
    if edge_weight is not None and edge_weight.dim() == 2 and edge_weight.shape[1] == 1:
        edge_weight = edge_weight.squeeze(1)  # (E,): one weight for every head
    edge_weight = edge_weight.contiguous() if edge_weight is not None else None
    out, attn = _TritonAttention.apply(
        q, k, v.contiguous(), bias, edge_weight, keep, graph, _MODES[score],
        float(scale) if scale is not None and score != "given" else 1.0, float(negative_slope), keep_scale,
        return_attention,
    )
    return (out, attn) if return_attention else out
