"""Triton cross-attention over injected states, with chunk-level RoPE applied inside the kernel.

Computes exactly `sharedctx.ops.chunk_cross_attention_reference`::

    q' = rope(q, query_pos)            # (B, H, T, D)   every query of batch row b at chunk position query_pos[b]
    k' = rope(k, key_pos)              # (B, Hkv, S, D) state s of row b at chunk position key_pos[b, s]
    out = softmax(q' k'^T * scale, masked by key_mask) v      # (B, H, T, D), no causal mask

without writing q' or k' to memory: each program loads its tile of q or k, computes cos/sin from
``inv_freq`` and the integer positions in float32 (the same single rounding as `rope_cos_sin`), rotates
the two halves of the head dimension in registers (LLaMA ``rotate_half``), casts back to the input dtype
(as `apply_rope` does) and feeds tensor-core dots with float32 accumulation.

Layout of the work. Grouped-query heads share a program: the ``G = H // Hkv`` query heads of one key/value
head and their ``T`` tokens form ``G * T`` rows (row ``r`` is head ``kvh * G + r // T``, token ``r % T``),
so each key tile is loaded and rotated once per group, and decoding (``T = 1``) fills a tile with the
group's heads instead of wasting 15 of 16 rows. When those programs cannot fill the GPU (decoding over
long contexts), the keys are split across programs and the partial results are merged with their
log-sum-exps (flash-decoding).

Backward (`ChunkCrossAttention`): Triton, flash-attention-2 style, from the saved output and log-sum-exp;
one kernel accumulates dK and dV per key tile over all rows of its group (no atomics), one accumulates dQ
per row tile; gradients of the rotated tensors are rotated back by the transpose of the rotation.
``delta = rowsum(dO * O)`` is one torch reduction.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["ChunkCrossAttention", "triton_chunk_cross_attention", "INTERPRET"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _cos_sin(pos, inv_freq, rope_scaling, PRECISE_TRIG: tl.constexpr):
    """``pos (N,)`` int, ``inv_freq (BH,)`` float32 -> ``cos, sin (N, BH)`` float32 times ``rope_scaling``."""
    ang = pos.to(tl.float32)[:, None] * inv_freq[None, :]
    if PRECISE_TRIG:  # libdevice cosf/sinf: tl.cos may lower to the approximate cos.approx.f32
        c = libdevice.cos(ang)
        s = libdevice.sin(ang)
    else:  # the interpreter (numpy) has no libdevice and is exact anyway
        c = tl.cos(ang)
        s = tl.sin(ang)
    return c * rope_scaling, s * rope_scaling


@triton.jit
def _cast(x, ty: tl.constexpr, EMULATE: tl.constexpr):
    """``x.to(ty)`` rounding to nearest even. ``EMULATE`` (interpreter only): the interpreter truncates
    float32 -> bfloat16, so round the float32 bits first (RTNE) and the truncation is then exact."""
    if EMULATE:
        if ty == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
    return x.to(ty)


@triton.jit
def _rotate(x1, x2, c, s, EMULATE: tl.constexpr):
    """RoPE on the halves ``x = [x1, x2]``: ``[x1 c - x2 s, x2 c + x1 s]``, float32 in, input dtype out."""
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    return _cast(x1f * c - x2f * s, x1.dtype, EMULATE), _cast(x2f * c + x1f * s, x1.dtype, EMULATE)


@triton.jit
def _dot(a, b, INTERPRETER: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` with float32 accumulation.

    ``INTERPRETER``: the interpreter's numpy dot cannot multiply bfloat16; products of two fp16/bf16
    numbers are exact in float32, so upcasting first is the same arithmetic as a tensor-core dot.
    ``IEEE``: float32 inputs multiply in full precision instead of TF32.
    """
    if INTERPRETER:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_kernel(
    Q, K, V, KPOS, QPOS, MASK, INV_FREQ, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ps,
    stride_mb, stride_ms,
    stride_osp, stride_ob, stride_oh, stride_ot, stride_od,
    stride_lsp, stride_lb, stride_lh, stride_lt,
    Hkv, T, S, keys_per_split, qk_scale, rope_scaling,
    GROUPS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATE: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISE_TRIG: tl.constexpr, INTERPRETER: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_sp = tl.program_id(2)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)  row r = g * T + t
    row_ok = rows < GROUPS * T
    h = kvh * GROUPS + rows // T
    t = rows % T
    offs_d = tl.arange(0, BLOCK_H)  # (BH,) one half of the head dimension
    d_ok = offs_d < HALF

    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q_msk = row_ok[:, None] & d_ok[None, :]
    q1 = tl.load(q_ptrs, mask=q_msk, other=0.0)  # (BM, BH)
    q2 = tl.load(q_ptrs + HALF * stride_qd, mask=q_msk, other=0.0)  # (BM, BH)
    if ROTATE:
        inv = tl.load(INV_FREQ + offs_d, mask=d_ok, other=0.0)  # (BH,)
        qpos = tl.load(QPOS + b + tl.zeros([BLOCK_M], dtype=tl.int64))  # (BM,) the same for every row
        qc, qs = _cos_sin(qpos, inv, rope_scaling, PRECISE_TRIG)
        q1, q2 = _rotate(q1, q2, qc, qs, INTERPRETER)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2
    acc1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)

    lo = pid_sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, S)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        n_ok = offs_n < hi
        kv_msk = n_ok[:, None] & d_ok[None, :]
        k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
        k1 = tl.load(k_ptrs, mask=kv_msk, other=0.0)  # (BN, BH)
        k2 = tl.load(k_ptrs + HALF * stride_kd, mask=kv_msk, other=0.0)
        if ROTATE:
            kpos = tl.load(KPOS + b * stride_pb + offs_n * stride_ps, mask=n_ok, other=0)
            kc, ks = _cos_sin(kpos, inv, rope_scaling, PRECISE_TRIG)
            k1, k2 = _rotate(k1, k2, kc, ks, INTERPRETER)
        s = _dot(q1, tl.trans(k1), INTERPRETER, IEEE) + _dot(q2, tl.trans(k2), INTERPRETER, IEEE)  # (BM, BN)
        s = s * qk_scale
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0) != 0)
        s = tl.where(valid[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no real state yet: avoid -inf - -inf
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])  # (BM, BN)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
        v1 = tl.load(v_ptrs, mask=kv_msk, other=0.0)  # (BN, BH)
        v2 = tl.load(v_ptrs + HALF * stride_vd, mask=kv_msk, other=0.0)
        pv = _cast(p, v1.dtype, INTERPRETER)
        acc1 = acc1 * alpha[:, None] + _dot(pv, v1, INTERPRETER, IEEE)
        acc2 = acc2 * alpha[:, None] + _dot(pv, v2, INTERPRETER, IEEE)
        m_i = m_new

    has = l_i > 0.0  # False for a row of a batch row without any real state (in this split)
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    o_ptrs = (O + pid_sp * stride_osp + b * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_ot
              + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, _cast(acc1 * inv_l[:, None], O.dtype.element_ty, INTERPRETER), mask=q_msk)
    tl.store(o_ptrs + HALF * stride_od, _cast(acc2 * inv_l[:, None], O.dtype.element_ty, INTERPRETER), mask=q_msk)
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))  # log2 units
    tl.store(LSE + pid_sp * stride_lsp + b * stride_lb + h * stride_lh + t * stride_lt, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, KPOS, QPOS, MASK, INV_FREQ, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ps,
    stride_mb, stride_ms,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    Hkv, T, S, sm_scale, qk_scale, rope_scaling,
    GROUPS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATE: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISE_TRIG: tl.constexpr, INTERPRETER: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)
    H = Hkv * GROUPS

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    offs_d = tl.arange(0, BLOCK_H)
    d_ok = offs_d < HALF
    kv_msk = n_ok[:, None] & d_ok[None, :]
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
    k1 = tl.load(k_ptrs, mask=kv_msk, other=0.0)  # (BN, BH)
    k2 = tl.load(k_ptrs + HALF * stride_kd, mask=kv_msk, other=0.0)
    v_ptrs = V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    v1 = tl.load(v_ptrs, mask=kv_msk, other=0.0)
    v2 = tl.load(v_ptrs + HALF * stride_vd, mask=kv_msk, other=0.0)
    valid = n_ok
    if HAS_MASK:
        valid = valid & (tl.load(MASK + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0) != 0)
    inv = tl.zeros([BLOCK_H], dtype=tl.float32)
    kc = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    ks = kc
    qc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    qs = qc
    if ROTATE:
        inv = tl.load(INV_FREQ + offs_d, mask=d_ok, other=0.0)
        kpos = tl.load(KPOS + b * stride_pb + offs_n * stride_ps, mask=n_ok, other=0)
        kc, ks = _cos_sin(kpos, inv, rope_scaling, PRECISE_TRIG)
        k1, k2 = _rotate(k1, k2, kc, ks, INTERPRETER)
        qpos = tl.load(QPOS + b + tl.zeros([BLOCK_M], dtype=tl.int64))
        qc, qs = _cos_sin(qpos, inv, rope_scaling, PRECISE_TRIG)

    dk1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dv1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dv2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    for start_m in range(0, GROUPS * T, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < GROUPS * T
        h = kvh * GROUPS + rows // T
        t = rows % T
        msk = row_ok[:, None] & d_ok[None, :]
        q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q1 = tl.load(q_ptrs, mask=msk, other=0.0)  # (BM, BH)
        q2 = tl.load(q_ptrs + HALF * stride_qd, mask=msk, other=0.0)
        if ROTATE:
            q1, q2 = _rotate(q1, q2, qc, qs, INTERPRETER)
        do_ptrs = (DO + b * stride_dob + h[:, None] * stride_doh + t[:, None] * stride_dot
                   + offs_d[None, :] * stride_dod)
        do1 = tl.load(do_ptrs, mask=msk, other=0.0)
        do2 = tl.load(do_ptrs + HALF * stride_dod, mask=msk, other=0.0)
        lt = (b * H + h) * T + t  # LSE, DELTA: contiguous (B, H, T) float32
        lse = tl.load(LSE + lt, mask=row_ok, other=float("inf"))  # +inf: probability 0
        delta = tl.load(DELTA + lt, mask=row_ok, other=0.0)

        s = _dot(q1, tl.trans(k1), INTERPRETER, IEEE) + _dot(q2, tl.trans(k2), INTERPRETER, IEEE)  # (BM, BN)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where(valid[None, :], p, 0.0)
        pt = tl.trans(_cast(p, v1.dtype, INTERPRETER))  # (BN, BM)
        dv1 += _dot(pt, do1, INTERPRETER, IEEE)
        dv2 += _dot(pt, do2, INTERPRETER, IEEE)
        dp = _dot(do1, tl.trans(v1), INTERPRETER, IEEE) + _dot(do2, tl.trans(v2), INTERPRETER, IEEE)  # (BM, BN)
        ds = tl.trans(_cast(p * (dp - delta[:, None]), q1.dtype, INTERPRETER))  # (BN, BM) dL/d(scores before scale)
        dk1 += _dot(ds, q1, INTERPRETER, IEEE)
        dk2 += _dot(ds, q2, INTERPRETER, IEEE)

    dk1 *= sm_scale
    dk2 *= sm_scale
    if ROTATE:  # gradient of the unrotated keys: the transpose of the rotation
        dk1, dk2 = dk1 * kc + dk2 * ks, dk2 * kc - dk1 * ks
    dk_ptrs = DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(dk_ptrs, _cast(dk1, DK.dtype.element_ty, INTERPRETER), mask=kv_msk)
    tl.store(dk_ptrs + HALF * stride_dkd, _cast(dk2, DK.dtype.element_ty, INTERPRETER), mask=kv_msk)
    dv_ptrs = DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    tl.store(dv_ptrs, _cast(dv1, DV.dtype.element_ty, INTERPRETER), mask=kv_msk)
    tl.store(dv_ptrs + HALF * stride_dvd, _cast(dv2, DV.dtype.element_ty, INTERPRETER), mask=kv_msk)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, KPOS, QPOS, MASK, INV_FREQ, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pb, stride_ps,
    stride_mb, stride_ms,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    Hkv, T, S, sm_scale, qk_scale, rope_scaling,
    GROUPS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATE: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISE_TRIG: tl.constexpr, INTERPRETER: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    kvh = (pid_bh % Hkv).to(tl.int64)
    H = Hkv * GROUPS

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUPS * T
    h = kvh * GROUPS + rows // T
    t = rows % T
    offs_d = tl.arange(0, BLOCK_H)
    d_ok = offs_d < HALF
    msk = row_ok[:, None] & d_ok[None, :]
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q1 = tl.load(q_ptrs, mask=msk, other=0.0)  # (BM, BH)
    q2 = tl.load(q_ptrs + HALF * stride_qd, mask=msk, other=0.0)
    inv = tl.zeros([BLOCK_H], dtype=tl.float32)
    qc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    qs = qc
    if ROTATE:
        inv = tl.load(INV_FREQ + offs_d, mask=d_ok, other=0.0)
        qpos = tl.load(QPOS + b + tl.zeros([BLOCK_M], dtype=tl.int64))
        qc, qs = _cos_sin(qpos, inv, rope_scaling, PRECISE_TRIG)
        q1, q2 = _rotate(q1, q2, qc, qs, INTERPRETER)
    do_ptrs = DO + b * stride_dob + h[:, None] * stride_doh + t[:, None] * stride_dot + offs_d[None, :] * stride_dod
    do1 = tl.load(do_ptrs, mask=msk, other=0.0)
    do2 = tl.load(do_ptrs + HALF * stride_dod, mask=msk, other=0.0)
    lt = (b * H + h) * T + t
    lse = tl.load(LSE + lt, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + lt, mask=row_ok, other=0.0)

    dq1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    for start_n in range(0, S, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        kv_msk = n_ok[:, None] & d_ok[None, :]
        k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd
        k1 = tl.load(k_ptrs, mask=kv_msk, other=0.0)
        k2 = tl.load(k_ptrs + HALF * stride_kd, mask=kv_msk, other=0.0)
        if ROTATE:
            kpos = tl.load(KPOS + b * stride_pb + offs_n * stride_ps, mask=n_ok, other=0)
            kc, ks = _cos_sin(kpos, inv, rope_scaling, PRECISE_TRIG)
            k1, k2 = _rotate(k1, k2, kc, ks, INTERPRETER)
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
        v1 = tl.load(v_ptrs, mask=kv_msk, other=0.0)
        v2 = tl.load(v_ptrs + HALF * stride_vd, mask=kv_msk, other=0.0)
        valid = n_ok
        if HAS_MASK:
            valid = valid & (tl.load(MASK + b * stride_mb + offs_n * stride_ms, mask=n_ok, other=0) != 0)

        s = _dot(q1, tl.trans(k1), INTERPRETER, IEEE) + _dot(q2, tl.trans(k2), INTERPRETER, IEEE)  # (BM, BN)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        p = tl.where(valid[None, :], p, 0.0)
        dp = _dot(do1, tl.trans(v1), INTERPRETER, IEEE) + _dot(do2, tl.trans(v2), INTERPRETER, IEEE)
        ds = _cast(p * (dp - delta[:, None]), k1.dtype, INTERPRETER)  # (BM, BN)
        dq1 += _dot(ds, k1, INTERPRETER, IEEE)
        dq2 += _dot(ds, k2, INTERPRETER, IEEE)

    dq1 *= sm_scale
    dq2 *= sm_scale
    if ROTATE:
        dq1, dq2 = dq1 * qc + dq2 * qs, dq2 * qc - dq1 * qs
    dq_ptrs = DQ + b * stride_dqb + h[:, None] * stride_dqh + t[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, _cast(dq1, DQ.dtype.element_ty, INTERPRETER), mask=msk)
    tl.store(dq_ptrs + HALF * stride_dqd, _cast(dq2, DQ.dtype.element_ty, INTERPRETER), mask=msk)


INTERPRET = not isinstance(_fwd_kernel, triton.runtime.JITFunction)
"""True when the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""


def _check(q, k, v, key_pos, query_pos, inv_freq, key_mask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B,H,T,D) and k, v (B,Hkv,S,D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D or H % k.shape[1]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}: need the same B and D and H % Hkv == 0")
    if D % 2:
        raise ValueError(f"RoPE needs an even head dimension, got D={D}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the triton backend runs float16, bfloat16 and float32, not {q.dtype}")
    if key_mask is not None and key_mask.shape != (B, k.shape[2]):
        raise ValueError(f"key_mask must be (B, S)={(B, k.shape[2])}, got {tuple(key_mask.shape)}")
    if key_pos is not None:
        if query_pos is None:
            raise ValueError("query_pos is required when key_pos is given")
        if key_pos.shape != (B, k.shape[2]) or query_pos.shape != (B,):
            raise ValueError(f"key_pos must be (B, S) and query_pos (B,), got {tuple(key_pos.shape)}, {tuple(query_pos.shape)}")
        if inv_freq.shape != (D // 2,):
            raise ValueError(f"inv_freq must be (D/2,)={(D // 2,)}, got {tuple(inv_freq.shape)}")


def _blocks(rows: int, S: int, half: int) -> tuple[int, int, int]:
    """``BLOCK_M`` rows, ``BLOCK_N`` keys, ``BLOCK_H`` (half head dim, padded to a power of two >= 16)."""
    block_h = max(16, triton.next_power_of_2(half))
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_n = min(64 if block_h <= 32 else 32, max(16, triton.next_power_of_2(S)))
    return block_m, block_n, block_h


def _num_splits(programs: int, S: int, block_n: int, device: torch.device) -> int:
    """Split the keys when the (batch, kv head, row tile) programs cannot fill the GPU (decoding)."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(S, 8 * block_n), triton.cdiv(2 * sms, programs)))


class _Args:
    """Tensors and launch constants shared by the forward and backward launches."""

    def __init__(self, q, k, v, key_pos, query_pos, inv_freq, key_mask, attention_scaling, scaling):
        B, H, T, D = q.shape
        self.B, self.H, self.T, self.D, self.Hkv, self.S = B, H, T, D, k.shape[1], k.shape[2]
        self.groups = H // self.Hkv
        self.half = D // 2
        self.sm_scale = D ** -0.5 if scaling is None else float(scaling)
        self.rotate = key_pos is not None
        self.rope_scaling = float(attention_scaling)
        dummy = torch.zeros(1, 1, dtype=torch.int32, device=q.device)
        self.key_pos = key_pos if self.rotate else dummy
        self.query_pos = query_pos if self.rotate else dummy
        self.inv_freq = (inv_freq.to(device=q.device, dtype=torch.float32).contiguous() if self.rotate
                         else torch.zeros(1, dtype=torch.float32, device=q.device))
        self.has_mask = key_mask is not None
        self.mask = key_mask.view(torch.uint8) if self.has_mask else dummy
        self.block_m, self.block_n, self.block_h = _blocks(self.groups * T, self.S, self.half)
        self.consts = dict(
            GROUPS=self.groups, HALF=self.half, BLOCK_H=self.block_h, BLOCK_M=self.block_m, BLOCK_N=self.block_n,
            ROTATE=self.rotate, HAS_MASK=self.has_mask, PRECISE_TRIG=not INTERPRET, INTERPRETER=INTERPRET,
            IEEE=q.dtype == torch.float32,
        )
        if not INTERPRET:
            self.consts.update(num_warps=4, num_stages=2)

    def strides(self, q, k, v):
        return (*q.stride(), *k.stride(), *v.stride(), self.key_pos.stride(0), self.key_pos.stride(-1),
                self.mask.stride(0), self.mask.stride(-1))


def _forward(q, k, v, a: _Args, num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out (B, H, T, D)`` in q's dtype and ``lse (B, H, T)`` float32 in log2 units (-inf: no state)."""
    B, H, T, D, S = a.B, a.H, a.T, a.D, a.S
    row_tiles = triton.cdiv(a.groups * T, a.block_m)
    splits = num_splits or _num_splits(row_tiles * B * a.Hkv, S, a.block_n, q.device)
    per_split = triton.cdiv(triton.cdiv(max(S, 1), splits), a.block_n) * a.block_n
    splits = max(1, triton.cdiv(S, per_split))
    if splits == 1:
        out = torch.empty(1, B, H, T, D, dtype=q.dtype, device=q.device)
    else:
        out = torch.empty(splits, B, H, T, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(splits, B, H, T, dtype=torch.float32, device=q.device)
    qk_scale = a.sm_scale * LOG2E
    _fwd_kernel[(row_tiles, B * a.Hkv, splits)](
        q, k, v, a.key_pos, a.query_pos, a.mask, a.inv_freq, out, lse,
        *a.strides(q, k, v), *out.stride(), *lse.stride(),
        a.Hkv, T, S, per_split, qk_scale, a.rope_scaling, **a.consts,
    )
    if splits == 1:
        return out[0], lse[0]
    # merge the splits by their log-sum-exps (log2 units); a split without a real state has -inf
    total = torch.logsumexp(lse * LN2, dim=0) / LN2  # (B, H, T)
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    weight = torch.exp2(lse - safe)  # (splits, B, H, T); 0 for empty splits
    merged = (weight[..., None] * out).sum(0)  # (B, H, T, D)
    return merged.to(q.dtype), total


def _backward(do, q, k, v, out, lse, a: _Args):
    B, H, T, D, S = a.B, a.H, a.T, a.D, a.S
    delta = (do.float() * out.float()).sum(-1).contiguous()  # (B, H, T)
    lse = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse).contiguous()
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    args = (q, k, v, a.key_pos, a.query_pos, a.mask, a.inv_freq, do, lse, delta)
    common = (*a.strides(q, k, v), *do.stride())
    scales = (a.Hkv, T, S, a.sm_scale, a.sm_scale * LOG2E, a.rope_scaling)
    _bwd_dkdv_kernel[(triton.cdiv(S, a.block_n), B * a.Hkv)](
        *args, dk, dv, *common, *dk.stride(), *dv.stride(), *scales, **a.consts,
    )
    _bwd_dq_kernel[(triton.cdiv(a.groups * T, a.block_m), B * a.Hkv)](
        *args, dq, *common, *dq.stride(), *scales, **a.consts,
    )
    return dq, dk, dv


class ChunkCrossAttention(torch.autograd.Function):
    """Autograd wrapper: Triton forward and Triton backward (gradients for q, k, v)."""

    @staticmethod
    def forward(ctx, q, k, v, key_pos, query_pos, inv_freq, key_mask, attention_scaling, scaling, num_splits):
        a = _Args(q, k, v, key_pos, query_pos, inv_freq, key_mask, attention_scaling, scaling)
        out, lse = _forward(q, k, v, a, num_splits)
        ctx.save_for_backward(q, k, v, out, lse, key_pos, query_pos, inv_freq, key_mask)
        ctx.consts = (attention_scaling, scaling)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, key_pos, query_pos, inv_freq, key_mask = ctx.saved_tensors
        a = _Args(q, k, v, key_pos, query_pos, inv_freq, key_mask, *ctx.consts)
        dq, dk, dv = _backward(do, q, k, v, out, lse, a)
        return dq, dk, dv, None, None, None, None, None, None, None


def triton_chunk_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_pos: torch.Tensor | None,
    query_pos: torch.Tensor | None,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    key_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Chunk-RoPE cross-attention in one Triton kernel (same contract as `chunk_cross_attention_reference`).

    Args:
        q: ``(B, H, T, D)`` queries before chunk rotation; any strides.
        k: ``(B, Hkv, S, D)`` keys with their within-node rotation, before chunk rotation; ``H % Hkv == 0``.
        v: ``(B, Hkv, S, D)`` values. q, k, v share one dtype: float16, bfloat16 or float32.
        key_pos: ``(B, S)`` integer chunk position of each state, or None for no chunk rotation at all.
        query_pos: ``(B,)`` integer chunk position of the queries (required with ``key_pos``).
        inv_freq: ``(D/2,)`` RoPE inverse frequencies; ``attention_scaling`` multiplies cos and sin.
        key_mask: ``(B, S)`` bool, True where a state is real; None means all are.
        scaling: softmax scale, default ``D ** -0.5``.
        num_splits: split the keys over this many programs (default: chosen from the GPU's size).
    Returns:
        ``(B, H, T, D)`` in q's dtype; zeros for a batch row without any real state. Differentiable in q, k, v.
    """
    _check(q, k, v, key_pos, query_pos, inv_freq, key_mask)
    if key_pos is not None:
        key_pos = key_pos.to(q.device)
        query_pos = query_pos.to(q.device).contiguous()
    if key_mask is not None:
        key_mask = key_mask.to(device=q.device, dtype=torch.bool)
    if q.shape[2] == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape)
    if k.shape[2] == 0:  # no state at all: every row is empty
        return q.new_zeros(q.shape) + 0 * q
    return ChunkCrossAttention.apply(q, k, v, key_pos, query_pos, inv_freq, key_mask, attention_scaling, scaling, num_splits)
