"""Triton kernels of the ``triton`` backend (imported only when that backend runs: it imports triton).

The same algorithm as the fused CPU kernel (``gatx/csrc/fused_attention.cpp``), one program per row:

- ``fwd_kernel``, rows = dst nodes of the CSR: edge blocks of ``BLOCK_E`` in-edges are gathered by
  index (keys, values, bias, edge weight, keep-mask), scored, and folded into an online softmax
  (running max ``m``, normaliser ``l``, output accumulator); the row log-sum-exp is stored for
  backward; a second sweep writes the attention when it is returned.
- ``bwd_dst_kernel`` (pass A), rows = dst nodes: ``delta_i = <g_i, out_i> (+ sum_e a_e ga_e)``, then
  one sweep recomputing every score for the gradients of q, the bias (hence given logits) and the
  edge weight.
- ``bwd_src_kernel`` (pass B), rows = src nodes of the transposed CSR (``Graph.csc()``): gradients
  of k and v summed per program, so no atomics and a deterministic result.

Notation (per head h): additive ``z = k_j + q_i + b_e``, ``s = LeakyReLU(z)``; dot
``s = scale <q_i, k_j> + b_e``; given ``s = b_e`` (the host folds ``scale * logits`` into b).
``p = exp(s - lse_i)``, ``c = keep_e * keep_scale * w_e``, ``a = p c``, ``out_i = sum_e a v_j``.
Backward with ``g = dL/dout``, ``ga = dL/da``: ``da = <g_i, v_j> + ga``, ``ds = p (c da - delta_i)``,
``dz = ds * (z > 0 ? 1 : slope)``, ``dv_j = sum_e a g_i``, ``dw_e = p keep keep_scale da``.

Arithmetic runs in the dtype of the ``lse`` buffer: float32 for float16 / bfloat16 / float32 inputs,
float64 for float64 inputs; loads are converted up and stores converted back to the output dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton import knobs

ADDITIVE, DOT, GIVEN = 0, 1, 2
#: whether these kernels run in Triton's CPU interpreter (fixed when this module is first imported)
INTERPRETED = bool(knobs.runtime.interpret)


@triton.jit
def _node_row(ptr, row, offs_h, offs_d, hmask, dmask, H, D, MODE: tl.constexpr, CT: tl.constexpr):
    """The fixed node's q or k terms as a (1, BH) (additive) or (1, BH, BD) (dot) tile; zeros (given)."""
    if MODE == 1:
        x = tl.load(ptr + (row * H + offs_h[:, None]) * D + offs_d[None, :], mask=hmask[:, None] & dmask[None, :], other=0.0)
        return x.to(CT)[None, :, :]
    elif MODE == 0:
        return tl.load(ptr + row * H + offs_h, mask=hmask, other=0.0).to(CT)[None, :]
    else:
        return tl.zeros([1, offs_h.shape[0]], CT)


@triton.jit
def _block(start, stop, nbr, eids, fixed, node_ptr, b_ptr, w_ptr, keep_ptr, offs_e, offs_h, offs_d, hmask, dmask,
           H, D, scale, slope, keep_scale, MODE: tl.constexpr, HAS_BIAS: tl.constexpr, W_MODE: tl.constexpr,
           HAS_KEEP: tl.constexpr, CT: tl.constexpr):
    """One block of a row's edges, positions ``start + offs_e`` below ``stop``.

    ``fixed`` is the row's own q (rows = dst) or k (rows = src) tile; ``node_ptr`` the other side's.
    Returns (nodes, eid, emask, valid, tile, s, fac, c, kd): the other endpoints (BE,), edge ids,
    the edge mask, the (BE, BH) mask, the other side's (BE, BH[, BD]) tile, the scores (-inf where
    invalid), ds/dz, c = keep * keep_scale * w and kd = keep * keep_scale.
    """
    pos = start + offs_e
    emask = pos < stop
    valid = emask[:, None] & hmask[None, :]
    nodes = tl.load(nbr + pos, mask=emask, other=0)
    e = tl.load(eids + pos, mask=emask, other=0)
    if HAS_BIAS:
        b = tl.load(b_ptr + e[:, None] * H + offs_h[None, :], mask=valid, other=0.0).to(CT)
    else:
        b = tl.zeros(valid.shape, CT)
    if MODE == 1:
        off = (nodes[:, None, None] * H + offs_h[None, :, None]) * D + offs_d[None, None, :]
        tile = tl.load(node_ptr + off, mask=valid[:, :, None] & dmask[None, None, :], other=0.0).to(CT)
        s = tl.sum(fixed * tile, axis=2) * scale + b
        fac = tl.where(valid, 1.0, 1.0).to(CT)
    elif MODE == 0:
        tile = tl.load(node_ptr + nodes[:, None] * H + offs_h[None, :], mask=valid, other=0.0).to(CT)
        z = (tile + fixed) + b
        fac = tl.where(z > 0, 1.0, slope).to(CT)
        s = z * fac
    else:
        tile = fixed
        s = b
        fac = tl.where(valid, 1.0, 1.0).to(CT)
    s = tl.where(valid, s, float("-inf"))
    if HAS_KEEP:
        kd = tl.load(keep_ptr + e[:, None] * H + offs_h[None, :], mask=valid, other=0).to(CT) * keep_scale
    else:
        kd = tl.where(valid, 1.0, 0.0).to(CT)
    if W_MODE == 1:
        c = kd * tl.load(w_ptr + e, mask=emask, other=0.0).to(CT)[:, None]
    elif W_MODE == 2:
        c = kd * tl.load(w_ptr + e[:, None] * H + offs_h[None, :], mask=valid, other=0.0).to(CT)
    else:
        c = kd
    return nodes, e, emask, valid, tile, s, fac, c, kd


@triton.jit
def _values(ptr, rows, valid, offs_h, offs_d, dmask, H, D, CT: tl.constexpr):
    """(BE, BH, BD) tile of the (N, H, D) tensor at ``rows``."""
    off = (rows[:, None, None] * H + offs_h[None, :, None]) * D + offs_d[None, None, :]
    return tl.load(ptr + off, mask=valid[:, :, None] & dmask[None, None, :], other=0.0).to(CT)


@triton.jit
def fwd_kernel(indptr, nbr, eids, q_ptr, k_ptr, v_ptr, b_ptr, w_ptr, keep_ptr, out_ptr, lse_ptr, attn_ptr,
               H, Dk, Dv, scale: tl.float64, slope: tl.float64, keep_scale: tl.float64,
               MODE: tl.constexpr, HAS_BIAS: tl.constexpr, W_MODE: tl.constexpr, HAS_KEEP: tl.constexpr,
               WANT_ATTN: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr,
               BLOCK_DV: tl.constexpr):
    CT = lse_ptr.dtype.element_ty
    scale, slope, keep_scale = tl.full([], scale, CT), tl.full([], slope, CT), tl.full([], keep_scale, CT)
    row = tl.program_id(0).to(tl.int64)
    p0 = tl.load(indptr + row)
    p1 = tl.load(indptr + row + 1)
    offs_e, offs_h = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_H)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    hmask, dkm, dvm = offs_h < H, offs_dk < Dk, offs_dv < Dv
    qi = _node_row(q_ptr, row, offs_h, offs_dk, hmask, dkm, H, Dk, MODE, CT)
    m = tl.full([BLOCK_H], float("-inf"), CT)
    l = tl.zeros([BLOCK_H], CT)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], CT)
    for start in range(p0, p1, BLOCK_E):
        j, e, emask, valid, kt, s, fac, c, kd = _block(
            start, p1, nbr, eids, qi, k_ptr, b_ptr, w_ptr, keep_ptr, offs_e, offs_h, offs_dk, hmask, dkm, H, Dk,
            scale, slope, keep_scale, MODE, HAS_BIAS, W_MODE, HAS_KEEP, CT)
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new).to(CT)  # all -inf so far: weights 0
        alpha = tl.exp(m - m_use)
        p = tl.exp(s - m_use[None, :])
        vt = _values(v_ptr, j, valid, offs_h, offs_dv, dvm, H, Dv, CT)
        acc = acc * alpha[:, None] + tl.sum((p * c)[:, :, None] * vt, axis=0)
        l = l * alpha + tl.sum(p, axis=0)
        m = m_new
    m_fin = tl.where(m == float("-inf"), 0.0, m).to(CT)
    l_safe = tl.where(l > 0, l, 1.0).to(CT)  # an empty row: out 0, lse 0
    lse = m_fin + tl.log(l_safe)
    tl.store(lse_ptr + row * H + offs_h, lse, mask=hmask)
    out = acc / l_safe[:, None]
    tl.store(out_ptr + (row * H + offs_h[:, None]) * Dv + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=hmask[:, None] & dvm[None, :])
    if WANT_ATTN:
        for start in range(p0, p1, BLOCK_E):
            j, e, emask, valid, kt, s, fac, c, kd = _block(
                start, p1, nbr, eids, qi, k_ptr, b_ptr, w_ptr, keep_ptr, offs_e, offs_h, offs_dk, hmask, dkm, H, Dk,
                scale, slope, keep_scale, MODE, HAS_BIAS, W_MODE, HAS_KEEP, CT)
            a = tl.exp(s - lse[None, :]) * c
            tl.store(attn_ptr + e[:, None] * H + offs_h[None, :], a.to(attn_ptr.dtype.element_ty), mask=valid)


@triton.jit
def bwd_dst_kernel(indptr, nbr, eids, q_ptr, k_ptr, v_ptr, b_ptr, w_ptr, keep_ptr, out_ptr, g_ptr, ga_ptr,
                   lse_ptr, delta_ptr, dq_ptr, db_ptr, dw_ptr,
                   H, Dk, Dv, scale: tl.float64, slope: tl.float64, keep_scale: tl.float64,
                   MODE: tl.constexpr, HAS_BIAS: tl.constexpr, W_MODE: tl.constexpr, HAS_KEEP: tl.constexpr,
                   HAS_GA: tl.constexpr, WANT_DQ: tl.constexpr, WANT_DB: tl.constexpr, WANT_DW: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    CT = lse_ptr.dtype.element_ty
    scale, slope, keep_scale = tl.full([], scale, CT), tl.full([], slope, CT), tl.full([], keep_scale, CT)
    row = tl.program_id(0).to(tl.int64)
    p0 = tl.load(indptr + row)
    p1 = tl.load(indptr + row + 1)
    offs_e, offs_h = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_H)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    hmask, dkm, dvm = offs_h < H, offs_dk < Dk, offs_dv < Dv
    qi = _node_row(q_ptr, row, offs_h, offs_dk, hmask, dkm, H, Dk, MODE, CT)
    hv = (row * H + offs_h[:, None]) * Dv + offs_dv[None, :]
    hvm = hmask[:, None] & dvm[None, :]
    gi = tl.load(g_ptr + hv, mask=hvm, other=0.0).to(CT)  # (BH, BDV)
    lse = tl.load(lse_ptr + row * H + offs_h, mask=hmask, other=0.0)
    # sum_e a_e <g_i, v_j> = <g_i, out_i>: no sweep over the edges unless the attention has a gradient
    delta = tl.sum(gi * tl.load(out_ptr + hv, mask=hvm, other=0.0).to(CT), axis=1)
    if HAS_GA:
        for start in range(p0, p1, BLOCK_E):
            j, e, emask, valid, kt, s, fac, c, kd = _block(
                start, p1, nbr, eids, qi, k_ptr, b_ptr, w_ptr, keep_ptr, offs_e, offs_h, offs_dk, hmask, dkm, H, Dk,
                scale, slope, keep_scale, MODE, HAS_BIAS, W_MODE, HAS_KEEP, CT)
            ga = tl.load(ga_ptr + e[:, None] * H + offs_h[None, :], mask=valid, other=0.0).to(CT)
            delta += tl.sum(tl.exp(s - lse[None, :]) * c * ga, axis=0)
    tl.store(delta_ptr + row * H + offs_h, delta, mask=hmask)
    if WANT_DQ or WANT_DB or WANT_DW:
        if MODE == 1:
            dq = tl.zeros([BLOCK_H, BLOCK_DK], CT)
        else:
            dq = tl.zeros([BLOCK_H], CT)
        for start in range(p0, p1, BLOCK_E):
            j, e, emask, valid, kt, s, fac, c, kd = _block(
                start, p1, nbr, eids, qi, k_ptr, b_ptr, w_ptr, keep_ptr, offs_e, offs_h, offs_dk, hmask, dkm, H, Dk,
                scale, slope, keep_scale, MODE, HAS_BIAS, W_MODE, HAS_KEEP, CT)
            p = tl.exp(s - lse[None, :])
            da = tl.sum(gi[None, :, :] * _values(v_ptr, j, valid, offs_h, offs_dv, dvm, H, Dv, CT), axis=2)
            if HAS_GA:
                da += tl.load(ga_ptr + e[:, None] * H + offs_h[None, :], mask=valid, other=0.0).to(CT)
            dz = p * (c * da - delta[None, :]) * fac
            if WANT_DB:
                tl.store(db_ptr + e[:, None] * H + offs_h[None, :], dz.to(db_ptr.dtype.element_ty), mask=valid)
            if WANT_DW:
                dwt = p * da * kd
                if W_MODE == 2:
                    tl.store(dw_ptr + e[:, None] * H + offs_h[None, :], dwt.to(dw_ptr.dtype.element_ty), mask=valid)
                else:
                    tl.store(dw_ptr + e, tl.sum(dwt, axis=1).to(dw_ptr.dtype.element_ty), mask=emask)
            if WANT_DQ:
                if MODE == 1:
                    dq += tl.sum(dz[:, :, None] * kt, axis=0) * scale
                else:
                    dq += tl.sum(dz, axis=0)
        if WANT_DQ:
            if MODE == 1:
                tl.store(dq_ptr + (row * H + offs_h[:, None]) * Dk + offs_dk[None, :], dq.to(dq_ptr.dtype.element_ty),
                         mask=hmask[:, None] & dkm[None, :])
            else:
                tl.store(dq_ptr + row * H + offs_h, dq.to(dq_ptr.dtype.element_ty), mask=hmask)


@triton.jit
def bwd_src_kernel(indptr, nbr, eids, q_ptr, k_ptr, v_ptr, b_ptr, w_ptr, keep_ptr, g_ptr, ga_ptr, lse_ptr, delta_ptr,
                   dk_ptr, dv_ptr, H, Dk, Dv, scale: tl.float64, slope: tl.float64, keep_scale: tl.float64,
                   MODE: tl.constexpr, HAS_BIAS: tl.constexpr, W_MODE: tl.constexpr, HAS_KEEP: tl.constexpr,
                   HAS_GA: tl.constexpr, WANT_DK: tl.constexpr, WANT_DV: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    CT = lse_ptr.dtype.element_ty
    scale, slope, keep_scale = tl.full([], scale, CT), tl.full([], slope, CT), tl.full([], keep_scale, CT)
    col = tl.program_id(0).to(tl.int64)  # a src node; nbr holds the dst of each of its out-edges
    p0 = tl.load(indptr + col)
    p1 = tl.load(indptr + col + 1)
    offs_e, offs_h = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_H)
    offs_dk, offs_dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    hmask, dkm, dvm = offs_h < H, offs_dk < Dk, offs_dv < Dv
    kj = _node_row(k_ptr, col, offs_h, offs_dk, hmask, dkm, H, Dk, MODE, CT)
    hv = (col * H + offs_h[:, None]) * Dv + offs_dv[None, :]
    hvm = hmask[:, None] & dvm[None, :]
    vj = tl.load(v_ptr + hv, mask=hvm, other=0.0).to(CT)  # (BH, BDV)
    if MODE == 1:
        dk = tl.zeros([BLOCK_H, BLOCK_DK], CT)
    else:
        dk = tl.zeros([BLOCK_H], CT)
    dv = tl.zeros([BLOCK_H, BLOCK_DV], CT)
    for start in range(p0, p1, BLOCK_E):
        i, e, emask, valid, qt, s, fac, c, kd = _block(
            start, p1, nbr, eids, kj, q_ptr, b_ptr, w_ptr, keep_ptr, offs_e, offs_h, offs_dk, hmask, dkm, H, Dk,
            scale, slope, keep_scale, MODE, HAS_BIAS, W_MODE, HAS_KEEP, CT)
        p = tl.exp(s - tl.load(lse_ptr + i[:, None] * H + offs_h[None, :], mask=valid, other=0.0))
        gt = _values(g_ptr, i, valid, offs_h, offs_dv, dvm, H, Dv, CT)  # (BE, BH, BDV)
        if WANT_DV:
            dv += tl.sum((p * c)[:, :, None] * gt, axis=0)
        if WANT_DK:
            da = tl.sum(gt * vj[None, :, :], axis=2)
            if HAS_GA:
                da += tl.load(ga_ptr + e[:, None] * H + offs_h[None, :], mask=valid, other=0.0).to(CT)
            delta = tl.load(delta_ptr + i[:, None] * H + offs_h[None, :], mask=valid, other=0.0)
            dz = p * (c * da - delta) * fac
            if MODE == 1:
                dk += tl.sum(dz[:, :, None] * qt, axis=0) * scale
            else:
                dk += tl.sum(dz, axis=0)
    if WANT_DV:
        tl.store(dv_ptr + hv, dv.to(dv_ptr.dtype.element_ty), mask=hvm)
    if WANT_DK:
        if MODE == 1:
            tl.store(dk_ptr + (col * H + offs_h[:, None]) * Dk + offs_dk[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=hmask[:, None] & dkm[None, :])
        else:
            tl.store(dk_ptr + col * H + offs_h, dk.to(dk_ptr.dtype.element_ty), mask=hmask)
