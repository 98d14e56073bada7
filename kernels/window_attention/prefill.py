"""Triton window attention over a cache's layout (sinks, ring, new tokens), flash-style, for a block of queries.

The kernel never sees a dense `[B, q, K]` mask: it takes the layout the cache already has, the absolute position
of every key (`slots [B, K]`), whether it is real (`valid`), whether it is a sink (`sink`), the query positions
(`q_slots [q]`) and `window`, and applies the rule of [`window_visibility`] tile by tile:

    visible(i, j) = j <= i  and  valid  and  (i - j < window  or  sink)

GQA is handled by packing: the `g = Hq / Hkv` query heads that share a KV head become rows of one tile, row
`r = t * g + h` holding query `t` of head `h`, so each K/V tile is loaded once per group. One program computes
`BLOCK_M` rows against the keys `[k_lo, k_hi)` of its split with an online softmax (fp32 accumulation, `exp2`),
skipping key tiles that no row of the tile sees (keys outside the band cost one load of their positions).

[`attention_rows`] is the shared inner loop: the decode kernel ([`decode`]) and the fused Tensor Cache decode step
(`kernels/fast_weight/fused_recurrent.py`) call it too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["attention_rows", "block_d", "launch", "precision", "prefill", "upcast"]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def attention_rows(
    q,  # [BLOCK_M, BLOCK_D] query rows, input dtype
    q_pos,  # [BLOCK_M] int64 absolute position of each row's query
    row_ok,  # [BLOCK_M] bool
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    slot_base,
    valid_base,
    sink_base,
    stride_sn,
    stride_vln,
    stride_skn,
    k_lo,
    k_hi,
    window,
    scaling,
    softcap,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Online softmax of `q` over keys `[k_lo, k_hi)`: returns `(acc [M, DV], m [M], l [M])`, `m` in log2 units."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lowest = q_pos - window  # keys above this are in the band
    if UPCAST:  # Triton's interpreter computes tl.dot of bfloat16 wrongly: give it float32
        q = q.to(tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_k = offs_n < k_hi
        slot = tl.load(slot_base + offs_n * stride_sn, mask=in_k, other=-1)
        ok = tl.load(valid_base + offs_n * stride_vln, mask=in_k, other=0) != 0
        is_sink = tl.load(sink_base + offs_n * stride_skn, mask=in_k, other=0) != 0
        vis = (slot[None, :] <= q_pos[:, None]) & ((slot[None, :] > lowest[:, None]) | is_sink[None, :])
        vis = vis & (ok & in_k)[None, :] & row_ok[:, None]  # [BLOCK_M, BLOCK_N]
        if tl.max(vis.to(tl.int32)) > 0:  # band skipping: a tile no row sees costs only its positions
            k = tl.load(
                k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=in_k[:, None] & (offs_d < D)[None, :],
                other=0.0,
            )
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling  # [BLOCK_M, BLOCK_N] fp32
            if SOFTCAP:  # softcap * tanh(s / softcap), tanh through exp (no libdevice: runs in the interpreter)
                e = tl.exp(-2.0 * tl.abs(s) / softcap)  # in (0, 1]: no overflow
                s = tl.where(s < 0, -softcap, softcap) * (1.0 - e) / (1.0 + e)
            s = tl.where(vis, s * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v = tl.load(
                v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=in_k[:, None] & (offs_dv < DV)[None, :],
                other=0.0,
            )
            if UPCAST:
                v = v.to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _window_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, valid_ptr, sink_ptr, qpos_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sn, stride_vlb, stride_vln, stride_skb, stride_skn,
    stride_ob, stride_oh, stride_ot, stride_os, stride_od,
    stride_lb, stride_lh, stride_lt, stride_ls,
    n_kv_heads, n_queries, n_keys, split_size, window, scaling, softcap,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hkv = pid_bh // n_kv_heads, pid_bh % n_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = query t * G + head h of the group
    t, h = rows // G, rows % G
    row_ok = t < n_queries
    head = hkv * G + h
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    q_pos = tl.load(qpos_ptr + t, mask=row_ok, other=0)
    k_lo = pid_s * split_size
    k_hi = tl.minimum(k_lo + split_size, n_keys)
    acc, m_i, l_i = attention_rows(
        q, q_pos, row_ok,
        k_ptr + b * stride_kb + hkv * stride_kh, v_ptr + b * stride_vb + hkv * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        slot_ptr + b * stride_sb, valid_ptr + b * stride_vlb, sink_ptr + b * stride_skb,
        stride_sn, stride_vln, stride_skn,
        k_lo, k_hi, window, scaling, softcap,
        D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, SOFTCAP, PRECISION, UPCAST,
    )  # fmt: skip
    seen_any = l_i > 0
    out = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    lse = tl.where(seen_any, (m_i + tl.log2(tl.where(seen_any, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    offs_dv = tl.arange(0, BLOCK_DV)
    o_rows = b * stride_ob + head * stride_oh + t * stride_ot + pid_s * stride_os
    tl.store(
        out_ptr + o_rows[:, None] + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv < DV)[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + head * stride_lh + t * stride_lt + pid_s * stride_ls, lse, mask=row_ok)


def precision(dtype: torch.dtype) -> str:
    """`tl.dot` precision: exact fp32 products for fp32 inputs (no TF32), the native tensor-core path otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast(tensor: torch.Tensor) -> bool:
    """Whether to feed `tl.dot` float32: bfloat16 under Triton's interpreter (its bfloat16 `tl.dot` is wrong)."""
    return tensor.dtype == torch.bfloat16 and not tensor.is_cuda


def block_d(dim: int) -> int:
    """Tile width of a head dimension: a power of two, at least 16 (`tl.dot`'s minimum)."""
    return max(16, triton.next_power_of_2(dim))


def launch(query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, out, lse, splits, block_m):
    """Run the kernel; `out` is `[B, Hq, q, S, Dv]` and `lse` `[B, Hq, q, S]` for `S = splits` key ranges."""
    batch, hq, n_q, d = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = hq // hkv
    block_n = 32 if max(d, dv) >= 128 else 64
    split_size = triton.cdiv(triton.cdiv(n_k, splits), block_n) * block_n
    grid = (triton.cdiv(n_q * g, block_m), batch * hkv, splits)
    _window_kernel[grid](
        query, key, value, slots, valid, sink, q_slots, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *slots.stride(), *valid.stride(), *sink.stride(),
        *out.stride(), *lse.stride(),
        hkv, n_q, n_k, split_size, window, scaling, 1.0 if softcap is None else float(softcap),
        G=g, D=d, DV=dv, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
        SOFTCAP=softcap is not None, PRECISION=precision(query.dtype), UPCAST=upcast(query),
    )  # fmt: skip


def prefill(query, key, value, slots, valid, sink, q_slots, window, scaling, softcap=None, out_dtype=None):
    """Window attention for a block of queries: `(out [B, Hq, q, Dv], lse [B, Hq, q])`, inputs already checked.

    Use [`hf_neuralcache.kernels.window_attention.attend`], which checks its inputs and picks this kernel.
    """
    batch, hq, n_q, _ = query.shape
    out = query.new_empty(batch, hq, n_q, 1, value.shape[-1], dtype=out_dtype or query.dtype)
    lse = query.new_empty(batch, hq, n_q, 1, dtype=torch.float32)
    block_m = 64 if max(query.shape[-1], value.shape[-1]) <= 64 else 32
    block_m = min(block_m, max(16, triton.next_power_of_2(n_q * (hq // key.shape[1]))))
    launch(query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, out, lse, 1, block_m)
    return out.squeeze(3), lse.squeeze(3)
