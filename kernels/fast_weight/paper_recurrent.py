"""Fused Triton decode step of the Tensor Cache paper mode (fast weights `A`, outer or delta rule): one pass.

One program per `(sequence, KV head)`, the group's `g` query heads as the rows of its tiles:

1. window attention over the layer's layout, online softmax ([`attention_rows`]), normalised;
2. the raw read `r = q A` of the fast weights *before* this step's write (the paper reads, then writes);
3. with `WRITE`, the write of the pair leaving the window: `A <- lam A + eta w k_hat^T u`, `k_hat = k / |k|`,
   `u = v` (outer rule) or `u = v - k_hat A` (delta rule), stored to fresh tensors or in place.

The fusion with the window output (`attn + sigmoid(g) tc_proj(r)`) needs all heads (`tc_proj` mixes them), so the
kernel returns the window output and `r` apart.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..window_attention.prefill import attention_rows, block_d, precision, upcast

__all__ = ["fast_weight_decode_step"]


@triton.jit
def _fast_weight_decode_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, valid_ptr, sink_ptr, qpos_ptr, out_ptr, r_ptr,
    a_ptr, a_out, ek_ptr, ev_ptr, w_ptr, decay_ptr, rate_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sn, stride_vlb, stride_vln, stride_skb, stride_skn,
    stride_ob, stride_oh, stride_od,
    stride_ekb, stride_ekh, stride_ekd, stride_evb, stride_evh, stride_evd, stride_wb,
    n_kv_heads, n_keys, window, scaling, softcap,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_PAIR: tl.constexpr, DELTA: tl.constexpr, WRITE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, hkv = pid // n_kv_heads, pid % n_kv_heads
    h = tl.arange(0, BLOCK_M)
    row_ok = h < G
    head = hkv * G + h
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    d_ok, dv_ok = offs_d < D, offs_dv < DV
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = tl.load(qpos_ptr + h * 0)  # one query position, broadcast to the rows
    acc, m_w, l_w = attention_rows(
        q, q_pos, row_ok,
        k_ptr + b * stride_kb + hkv * stride_kh, v_ptr + b * stride_vb + hkv * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        slot_ptr + b * stride_sb, valid_ptr + b * stride_vlb, sink_ptr + b * stride_skb,
        stride_sn, stride_vln, stride_skn,
        0, n_keys, window, scaling, softcap,
        D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, SOFTCAP, PRECISION, UPCAST,
    )  # fmt: skip
    out = acc / tl.where(l_w > 0, l_w, 1.0)[:, None]  # 0 for a row that sees no key
    # the read, before the write; A is contiguous [B, H, D, Dv] float32
    bh = b * n_kv_heads + hkv
    a_offs = bh * D * DV + offs_d[:, None] * DV + offs_dv[None, :]
    a_mask = d_ok[:, None] & dv_ok[None, :]
    fast = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)  # [BLOCK_D, BLOCK_DV]
    r = tl.dot(q.to(tl.float32), fast, input_precision="ieee")  # [BLOCK_M, BLOCK_DV]
    o_offs = b * stride_ob + head[:, None] * stride_oh + offs_dv[None, :] * stride_od
    o_mask = row_ok[:, None] & dv_ok[None, :]
    tl.store(out_ptr + o_offs, out, mask=o_mask)
    tl.store(r_ptr + o_offs, r, mask=o_mask)
    if WRITE:
        if HAS_PAIR:
            k = tl.load(ek_ptr + b * stride_ekb + hkv * stride_ekh + offs_d * stride_ekd, mask=d_ok, other=0.0)
            v = tl.load(ev_ptr + b * stride_evb + hkv * stride_evh + offs_dv * stride_evd, mask=dv_ok, other=0.0)
            k, v = k.to(tl.float32), v.to(tl.float32)
            k_hat = k / tl.maximum(tl.sqrt(tl.sum(k * k, 0)), 1e-6)
            u = v
            if DELTA:
                u = v - tl.sum(k_hat[:, None] * fast, 0)  # v - k_hat A
            lam = tl.load(decay_ptr + hkv)
            eta_w = tl.load(rate_ptr + hkv) * tl.load(w_ptr + b * stride_wb).to(tl.float32)
            fast = lam * fast + eta_w * (k_hat[:, None] * u[None, :])
        tl.store(a_out + a_offs, fast, mask=a_mask)


def fast_weight_decode_step(
    query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, state, keys, values, weights, decay,
    write_rate, rule, out_state=None,
):  # fmt: skip
    """Run the fused paper step on checked inputs: `(out, r)`, both `[B, Hq, 1, Dv]` float32.

    `state` is `A` `[B, Hkv, D, Dv]` (contiguous float32); `keys`, `values` `[B, Hkv, m, D]` and `weights` `[B, m]`
    hold the `m <= 1` pair this step evicts; `out_state` (it may be `state`) receives `A` after the write, or `None`
    to skip it. Use [`hf_neuralcache.kernels.fast_weight.fast_weight_decode`], which checks its inputs.
    """
    batch, hq, _, d = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[-1]
    out = query.new_empty(batch, hq, 1, dv, dtype=torch.float32)
    r = torch.empty_like(out)
    has_pair = keys.shape[2] == 1
    if has_pair:
        ek, ev, w = keys[:, :, 0], values[:, :, 0], weights[:, 0]
    else:  # unused placeholders of the right rank
        ek, ev, w = state[:, :, 0], state[:, :, 0], decay.new_zeros(batch)
    _fast_weight_decode_kernel[(batch * hkv,)](
        query, key, value, slots, valid, sink, q_slots, out, r,
        state, state if out_state is None else out_state, ek, ev, w, decay, write_rate,
        query.stride(0), query.stride(1), query.stride(3),
        *key.stride(), *value.stride(), *slots.stride(), *valid.stride(), *sink.stride(),
        out.stride(0), out.stride(1), out.stride(3),
        *ek.stride(), *ev.stride(), w.stride(0),
        hkv, n_k, window, scaling, 1.0 if softcap is None else float(softcap),
        G=hq // hkv, D=d, DV=dv, BLOCK_M=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=32 if max(d, dv) >= 128 else 64, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
        SOFTCAP=softcap is not None, PRECISION=precision(query.dtype), UPCAST=upcast(query),
        HAS_PAIR=has_pair, DELTA=rule == "delta", WRITE=out_state is not None,
        num_warps=8 if max(d, dv) >= 128 else 4,
    )  # fmt: skip
    return out, r
