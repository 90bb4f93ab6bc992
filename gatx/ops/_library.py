"""gatx's fused CPU kernel as ``torch.library`` custom operators, for ``torch.compile``.

``torch.compile`` cannot trace the ctypes call inside :class:`gatx.backends.fused._FusedAttention`
(nor an autograd.Function that holds a :class:`gatx.Graph`), so while it traces, the fused backend
calls these operators instead. They take only tensors and scalars -- the graph enters as its CSR
(edges grouped by dst: ``indptr``, ``src``, ``perm``) and CSC (grouped by src: ``csc_indptr``,
``csc_dst``, ``csc_perm``) tensors -- and each has a fake (meta) implementation that gives the output
shapes from the inputs (``num_dst = indptr.numel() - 1``, ``E = src.numel()``) and a registered
autograd formula:

- ``gatx::fused_attention2(indptr, src, perm, csc_indptr, csc_dst, csc_perm, q, k, v, bias?,
  edge_weight?, keep?, num_src, dot, scale, slope, keep_scale, want_attn, out_bias?) -> (out, stat,
  attn)``: ``out`` (num_dst, H, Dv), plus the (H, Dv) ``out_bias`` when given, the per-row
  log-sum-exp ``stat`` (num_dst, 2, H) that backward reads, ``attn`` (E, H) (or (0, H) unless
  ``want_attn``). The CSC tensors are only kept for backward (pass empty ones when no input needs a
  gradient).
- ``gatx::fused_attention2_backward(..., stat, fwd_out, g_out, g_attn?, ..., needs, out_bias?) -> (dq,
  dk, dv, dbias, dedge_weight, dout_bias)``: the kernel's backward (one pass over the src rows given
  the forward's output ``fwd_out`` and no attention gradient, else a pass over the dst rows and one
  over the src rows); an entry of ``needs`` (five flags, and a sixth for ``out_bias``) that is False
  or missing gives an empty (0,) tensor in its place.

``keep`` is the (E, H) uint8 dropout keep-mask (drawn by the caller, scaled by ``keep_scale``).
Higher-order gradients (``create_graph=True``) recompute the forward as differentiable torch ops,
as the eager path does. Eager calls do not go through these operators (they skip the dispatcher's
per-call cost); both paths run the same kernel passes (:func:`gatx.backends.fused.forward_pass`).

>>> import torch, gatx
>>> from gatx.ops import _library
>>> g = gatx.Graph(torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0]))
>>> csr, csc = g.csr(), g.csc()
>>> q, k, v = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2, 4)
>>> out, stat, attn = torch.ops.gatx.fused_attention2(
...     csr.indptr, csr.src, csr.perm, csc.indptr, csc.dst, csc.perm, q, k, v, None, None, None,
...     3, False, 1.0, 0.2, 1.0, True)
>>> out.shape, attn.shape
(torch.Size([3, 2, 4]), torch.Size([3, 2]))
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..backends import fused as _fused

__all__ = ["fused_attention", "fused_attention_backward"]

# AOTAutograd's on-disk cache keys a compiled backward on the forward graph, which names only
# gatx::fused_attention2: a change to the backward (its op's arguments, _backward) must rename the ops,
# or a cached graph calls the new backward op with the old arguments (renamed from gatx::fused_attention
# when out_bias came in).
_TENSORS = 12  # leading tensor arguments of fused_attention (graph tensors, q, k, v, bias, edge_weight, keep)


@torch.library.custom_op("gatx::fused_attention2", mutates_args=(), device_types="cpu")
def fused_attention(
    indptr: Tensor, src: Tensor, perm: Tensor, csc_indptr: Tensor, csc_dst: Tensor, csc_perm: Tensor,
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, edge_weight: Tensor | None, keep: Tensor | None,
    num_src: int, dot: bool, scale: float, slope: float, keep_scale: float, want_attn: bool,
    out_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    ob = out_bias.contiguous() if out_bias is not None else None
    out, stat, attn = _fused.forward_pass((indptr, src, perm, num_src), q, k, v, bias, edge_weight, keep, dot, scale,
                                          slope, keep_scale, want_attn, ob)
    stat[:, 1].zero_()  # scratch space of the backward's dst pass: defined values, so the op is deterministic
    return out, stat, attn


@fused_attention.register_fake
def _fused_attention_fake(indptr, src, perm, csc_indptr, csc_dst, csc_perm, q, k, v, bias, edge_weight, keep,
                          num_src, dot, scale, slope, keep_scale, want_attn, out_bias=None):
    num_dst, H, Dv = indptr.shape[0] - 1, v.shape[1], v.shape[2]
    out = v.new_empty((num_dst, H, Dv))
    stat = v.new_empty((num_dst, 2, H))
    attn = v.new_empty((src.shape[0], H) if want_attn else (0, H))
    return out, stat, attn


@torch.library.custom_op("gatx::fused_attention2_backward", mutates_args=(), device_types="cpu")
def fused_attention_backward(
    indptr: Tensor, src: Tensor, perm: Tensor, csc_indptr: Tensor, csc_dst: Tensor, csc_perm: Tensor,
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, edge_weight: Tensor | None, keep: Tensor | None,
    stat: Tensor, fwd_out: Tensor, g_out: Tensor, g_attn: Tensor | None, num_src: int, dot: bool, scale: float,
    slope: float, keep_scale: float, needs: list[bool], out_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    num_dst = indptr.numel() - 1
    csc = (csc_indptr, csc_dst, csc_perm, num_dst)
    stat = stat.clone()  # the dst pass writes its row term into stat's second half; inputs stay untouched
    ob = out_bias.contiguous() if out_bias is not None else None
    needs6 = tuple(needs[:5]) + (ob is not None and _needs_out_bias(needs),)
    grads = _fused.backward_pass((indptr, src, perm, num_src), csc, q, k, v, bias, edge_weight, keep, stat, g_out,
                                 g_attn, needs6, dot, scale, slope, keep_scale, fwd_out=fwd_out, ob=ob)
    return tuple(g if g is not None else v.new_empty(0) for g in grads)


def _needs_out_bias(needs: list[bool]) -> bool:
    return len(needs) > 5 and bool(needs[5])


@fused_attention_backward.register_fake
def _fused_attention_backward_fake(indptr, src, perm, csc_indptr, csc_dst, csc_perm, q, k, v, bias, edge_weight, keep,
                                   stat, fwd_out, g_out, g_attn, num_src, dot, scale, slope, keep_scale, needs,
                                   out_bias=None):
    like = (q, k, v, bias, edge_weight, out_bias)
    return tuple(torch.empty_like(t) if need and t is not None else v.new_empty(0)
                 for t, need in zip(like, list(needs[:5]) + [_needs_out_bias(needs)]))


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    # out_bias comes after the six scalars; a traced call leaves the default out (eager calls pass it as None)
    out_bias = inputs[_TENSORS + 6] if len(inputs) > _TENSORS + 6 else None
    ctx.save_for_backward(*inputs[:_TENSORS], output[1], output[0], out_bias)
    ctx.consts = inputs[_TENSORS:_TENSORS + 5]  # num_src, dot, scale, slope, keep_scale
    ctx.mark_non_differentiable(output[1])


def _backward(ctx: Any, g_out: Tensor | None, g_stat: Tensor | None, g_attn: Tensor | None) -> tuple:
    indptr, src, perm, csc_indptr, csc_dst, csc_perm, q, k, v, bias, ew, keep, stat, fwd_out, out_bias = ctx.saved_tensors
    num_src, dot, scale, slope, keep_scale = ctx.consts
    need_ob = len(ctx.needs_input_grad) > _TENSORS + 6 and bool(ctx.needs_input_grad[_TENSORS + 6])  # see _setup_context
    needs = tuple(bool(n) for n in ctx.needs_input_grad[6:11]) + (need_ob,)  # q, k, v, bias, ew, out_bias
    none = (None,) * 6
    g_attn = g_attn if g_attn is not None and g_attn.numel() else None
    if g_out is None and g_attn is None:
        return none + (None,) * 13
    if torch.is_grad_enabled():  # create_graph=True: differentiable recompute over the edges in CSR order
        num_dst = indptr.numel() - 1
        rows = torch.repeat_interleave(torch.arange(num_dst, device=indptr.device), indptr.diff(),
                                       output_size=src.numel())  # (E,) dst of each edge in CSR order
        edge_dst = torch.empty_like(rows).index_copy_(0, perm, rows)  # (E,) in edge-id order
        edge_src = torch.empty_like(src).index_copy_(0, perm, src)
        grads = _fused.recompute_backward(edge_src, edge_dst, num_dst, needs, q, k, v, bias, ew, keep, dot, scale,
                                          slope, keep_scale, g_out, g_attn)
        return none + grads[:5] + (None,) * 7 + grads[5:]
    if g_out is None:
        g_out = v.new_zeros((indptr.numel() - 1,) + tuple(v.shape[1:]))
    got = torch.ops.gatx.fused_attention2_backward(
        indptr, src, perm, csc_indptr, csc_dst, csc_perm, q, k, v, bias, ew, keep, stat, fwd_out, g_out.contiguous(),
        g_attn.contiguous() if g_attn is not None else None, num_src, dot, scale, slope, keep_scale,
        list(needs), out_bias,
    )
    grads = tuple(g if need else None for g, need in zip(got, needs))
    return none + grads[:5] + (None,) * 7 + grads[5:]


fused_attention.register_autograd(_backward, setup_context=_setup_context)
