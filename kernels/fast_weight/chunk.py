"""Chunked prefill of the training-free Tensor Cache memory (`"moment"` and `"mean"`) in Triton: write and read.

**Write.** `m` pairs enter with the in-chunk weighted-sum scan: every moment becomes `lam^m x + sum_j lam^(m-1-j)
w_j x_j` (the pair `j` has aged `m - 1 - j` ticks when the chunk ends), which is exactly `m` token-by-token writes
and has no chunk-mean cross terms. The value-key moment is one matmul per tile of pairs, `(p * V)^T K`. One program
per `(sequence, KV head, tile of Dv)`; the programs of the first `Dv` tile also write `count` and `sum k`.

**Read (fused prefill).** Query `t` of a chunk reads the memory after the first `prefix[t]` of the chunk's evicted
pairs, so chunked prefill equals token-by-token decoding. One program per `(tile of query rows, sequence, KV head)`
does the window attention of its rows ([`attention_rows`]), then the moments each row sees, the old state decayed
by `lam^prefix[t]` plus the chunk's pairs weighted by `P[t, j] = lam^(prefix[t]-1-j) w_j` for `j < prefix[t]` (tiles
of pairs, `tl.dot`), reads them and merges with the window ([`read_and_merge`]): no `[B, Hq, q, m]` tensor in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..window_attention.prefill import attention_rows, block_d, precision, upcast
from .fused_recurrent import read_and_merge

__all__ = ["moment_prefill_chunk", "moment_write_chunk"]


@triton.jit
def _moment_write_kernel(
    n_ptr, ks_ptr, vs_ptr, vk_ptr, k_ptr, v_ptr, w_ptr, log_decay_ptr, n_out, ks_out, vs_out, vk_out,
    stride_kb, stride_kh, stride_km, stride_kd, stride_vb, stride_vh, stride_vm, stride_vd, stride_wb, stride_wm,
    n_heads, m,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_VK: tl.constexpr,
):  # fmt: skip
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = pid // n_heads, pid % n_heads
    log_decay = tl.load(log_decay_ptr + h)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok, dv_ok = offs_d < D, offs_dv < DV
    first_tile = pid_v == 0
    count = tl.zeros([BLOCK_J], tl.float32)
    key_sum = tl.zeros([BLOCK_D], tl.float32)
    value_sum = tl.zeros([BLOCK_DV], tl.float32)
    value_key = tl.zeros([BLOCK_DV, BLOCK_D], tl.float32)
    for j0 in range(0, m, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < m
        w = tl.load(w_ptr + b * stride_wb + offs_j * stride_wm, mask=j_ok, other=0.0).to(tl.float32)
        p = tl.where(j_ok, tl.exp(log_decay * (m - 1 - offs_j).to(tl.float32)) * w, 0.0)  # [BLOCK_J]
        k = tl.load(
            k_ptr + b * stride_kb + h * stride_kh + offs_j[:, None] * stride_km + offs_d[None, :] * stride_kd,
            mask=j_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + offs_j[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
            mask=j_ok[:, None] & dv_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        pv = p[:, None] * v  # [BLOCK_J, BLOCK_DV]
        value_sum += tl.sum(pv, 0)
        count += p
        key_sum += tl.sum(p[:, None] * k, 0)
        if HAS_VK:
            value_key += tl.dot(tl.trans(pv), k, input_precision="ieee")  # [BLOCK_DV, BLOCK_D]
    old = tl.exp(log_decay * m)  # lam^m
    bh = b * n_heads + h
    vs_offs = bh * DV + offs_dv
    tl.store(vs_out + vs_offs, old * tl.load(vs_ptr + vs_offs, mask=dv_ok, other=0.0) + value_sum, mask=dv_ok)
    if HAS_VK:
        vk_offs = bh * DV * D + offs_dv[:, None] * D + offs_d[None, :]
        vk_mask = dv_ok[:, None] & d_ok[None, :]
        tl.store(vk_out + vk_offs, old * tl.load(vk_ptr + vk_offs, mask=vk_mask, other=0.0) + value_key, mask=vk_mask)
    if first_tile:
        ks_offs = bh * D + offs_d
        tl.store(ks_out + ks_offs, old * tl.load(ks_ptr + ks_offs, mask=d_ok, other=0.0) + key_sum, mask=d_ok)
        tl.store(n_out + bh, old * tl.load(n_ptr + bh) + tl.sum(count, 0))


def moment_write_chunk(state, keys, values, weights, log_decay, out_state):
    """Write `m` pairs into `state` on checked inputs; the moments after go to `out_state` (may be `state`).

    Use [`hf_neuralcache.kernels.fast_weight.moment_write`], which checks its inputs and picks this kernel.
    """
    batch, heads, m, d = keys.shape
    dv = values.shape[-1]
    block_dv = min(block_d(dv), 64)
    has_vk = state.value_key is not None
    vk_in = state.value_key if has_vk else state.key_sum
    vk_out = out_state.value_key if has_vk else out_state.key_sum
    grid = (batch * heads, triton.cdiv(dv, block_dv))
    _moment_write_kernel[grid](
        state.count, state.key_sum, state.value_sum, vk_in, keys, values, weights, log_decay,
        out_state.count, out_state.key_sum, out_state.value_sum, vk_out,
        *keys.stride(), *values.stride(), *weights.stride(),
        heads, m,
        D=d, DV=dv, BLOCK_J=16 if d >= 128 else 32, BLOCK_D=block_d(d), BLOCK_DV=block_dv, HAS_VK=has_vk,
        num_warps=8 if d >= 128 else 4,
    )  # fmt: skip
    return out_state


@triton.jit
def _moment_prefill_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, valid_ptr, sink_ptr, qpos_ptr, prefix_ptr, out_ptr, lse_ptr,
    n_ptr, ks_ptr, vs_ptr, vk_ptr, ek_ptr, ev_ptr, w_ptr, log_decay_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sn, stride_vlb, stride_vln, stride_skb, stride_skn,
    stride_ob, stride_oh, stride_ot, stride_od, stride_lb, stride_lh, stride_lt,
    stride_ekb, stride_ekh, stride_ekm, stride_ekd, stride_evb, stride_evh, stride_evm, stride_evd,
    stride_wb, stride_wm,
    n_kv_heads, n_queries, n_keys, m, window, scaling, softcap,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_VK: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hkv = pid_bh // n_kv_heads, pid_bh % n_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = query t * G + head h of the group
    t, h = rows // G, rows % G
    row_ok = t < n_queries
    head = hkv * G + h
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    d_ok, dv_ok = offs_d < D, offs_dv < DV
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = tl.load(qpos_ptr + t, mask=row_ok, other=0)
    acc, m_w, l_w = attention_rows(
        q, q_pos, row_ok,
        k_ptr + b * stride_kb + hkv * stride_kh, v_ptr + b * stride_vb + hkv * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        slot_ptr + b * stride_sb, valid_ptr + b * stride_vlb, sink_ptr + b * stride_skb,
        stride_sn, stride_vln, stride_skn,
        0, n_keys, window, scaling, softcap,
        D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, SOFTCAP, PRECISION, UPCAST,
    )  # fmt: skip
    # the moments row r sees: the old state decayed lam^prefix[t], plus the chunk's first prefix[t] pairs
    s = q.to(tl.float32) * scaling  # [BLOCK_M, BLOCK_D]
    seen = tl.load(prefix_ptr + t, mask=row_ok, other=0)  # [BLOCK_M]
    log_decay = tl.load(log_decay_ptr + hkv)
    old = tl.exp(log_decay * seen.to(tl.float32))  # [BLOCK_M]
    bh = b * n_kv_heads + hkv
    count = old * tl.load(n_ptr + bh)
    key_sum = old[:, None] * tl.load(ks_ptr + bh * D + offs_d, mask=d_ok, other=0.0)[None, :]
    value_sum = old[:, None] * tl.load(vs_ptr + bh * DV + offs_dv, mask=dv_ok, other=0.0)[None, :]
    vk_s = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if HAS_VK:
        value_key = tl.load(
            vk_ptr + bh * DV * D + offs_dv[:, None] * D + offs_d[None, :],
            mask=dv_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [BLOCK_DV, BLOCK_D]
        vk_s = old[:, None] * tl.dot(s, tl.trans(value_key), input_precision="ieee")
    for j0 in range(0, m, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < m
        w = tl.load(w_ptr + b * stride_wb + offs_j * stride_wm, mask=j_ok, other=0.0).to(tl.float32)
        age = seen[:, None] - 1 - offs_j[None, :]  # [BLOCK_M, BLOCK_J]
        weight = tl.exp(log_decay * tl.maximum(age, 0).to(tl.float32)) * w[None, :]
        weight = tl.where((age >= 0) & j_ok[None, :], weight, 0.0)
        k = tl.load(
            ek_ptr + b * stride_ekb + hkv * stride_ekh + offs_j[:, None] * stride_ekm + offs_d[None, :] * stride_ekd,
            mask=j_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            ev_ptr + b * stride_evb + hkv * stride_evh + offs_j[:, None] * stride_evm + offs_dv[None, :] * stride_evd,
            mask=j_ok[:, None] & dv_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        count += tl.sum(weight, 1)
        key_sum += tl.dot(weight, k, input_precision="ieee")
        value_sum += tl.dot(weight, v, input_precision="ieee")
        if HAS_VK:
            dots = tl.dot(s, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_J]
            vk_s += tl.dot(weight * dots, v, input_precision="ieee")
    out, lse = read_and_merge(s, count, key_sum, value_sum, vk_s, acc, m_w, l_w, HAS_VK)
    tl.store(
        out_ptr + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + offs_dv[None, :] * stride_od,
        out,
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + head * stride_lh + t * stride_lt, lse, mask=row_ok)


def moment_prefill_chunk(
    query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, state, keys, values, weights, prefix,
    log_decay,
):  # fmt: skip
    """Window attention + memory read at per-query prefixes + merge, on checked inputs: `(out, lse)` float32.

    Use [`hf_neuralcache.kernels.fast_weight.moment_prefill`], which checks its inputs and picks this kernel.
    """
    batch, hq, n_q, d = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[-1]
    g = hq // hkv
    out = query.new_empty(batch, hq, n_q, dv, dtype=torch.float32)
    lse = query.new_empty(batch, hq, n_q, dtype=torch.float32)
    wide = max(d, dv) >= 128
    block_m = min(16 if wide else 32, max(16, triton.next_power_of_2(n_q * g)))
    has_vk = state.value_key is not None
    grid = (triton.cdiv(n_q * g, block_m), batch * hkv)
    _moment_prefill_kernel[grid](
        query, key, value, slots, valid, sink, q_slots, prefix, out, lse,
        state.count, state.key_sum, state.value_sum, state.value_key if has_vk else state.key_sum,
        keys, values, weights, log_decay,
        *query.stride(), *key.stride(), *value.stride(), *slots.stride(), *valid.stride(), *sink.stride(),
        *out.stride(), *lse.stride(), *keys.stride(), *values.stride(), *weights.stride(),
        hkv, n_q, n_k, keys.shape[2], window, scaling, 1.0 if softcap is None else float(softcap),
        G=g, D=d, DV=dv, BLOCK_M=block_m, BLOCK_N=32 if wide else 64, BLOCK_J=16 if wide else 32,
        BLOCK_D=block_d(d), BLOCK_DV=block_d(dv), SOFTCAP=softcap is not None, PRECISION=precision(query.dtype),
        UPCAST=upcast(query), HAS_VK=has_vk, num_warps=8 if wide else 4,
    )  # fmt: skip
    return out, lse
