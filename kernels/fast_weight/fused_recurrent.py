"""Fused Triton decode step of the training-free Tensor Cache memory (`"moment"` and `"mean"`): one pass.

One program per `(sequence, KV head)`, the group's `g` query heads as the rows of its tiles:

1. window attention over the layer's layout (sinks, ring), online softmax: [`attention_rows`];
2. the write of the pair leaving the window, in registers: every moment `x <- lam x + w x_pair`;
3. the memory read of the updated moments (`log Z = log n + s.mu`, `out = mu_v + C s`, see `naive.moment_read`);
4. the log-sum-exp merge of window and memory, stored once;
5. with `WRITE`, the updated moments stored (to fresh tensors or in place: each program reads its own slice
   before it writes it).

The read comes after the write because in the training-free mode query `t` sees, through the memory, every
position `<= t - window`, the pair this step evicts included (`prefix = m` in `naive.moment_read`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..window_attention.prefill import attention_rows, block_d, precision, upcast

__all__ = ["moment_decode_step", "read_and_merge"]


@triton.jit
def read_and_merge(s, count, key_sum, value_sum, vk_s, acc, m_w, l_w, HAS_VK: tl.constexpr):
    """Read the moments of each row and merge them with its window softmax. Returns `(out, lse)`, natural log.

    `s` `[M, D]` the scaled queries; per row the moments it sees: `count` `[M]`, `key_sum` `[M, D]`,
    `value_sum` `[M, Dv]`, `vk_s` `[M, Dv]` (`sum v k^T` applied to `s`); `acc`, `m_w` (log2), `l_w` the window's
    online-softmax state. The read is the one of `naive.moment_read` (`"moment"`, or `"mean"` without `HAS_VK`).
    """
    safe = tl.maximum(count, 1e-30)
    mu, mu_v = key_sum / safe[:, None], value_sum / safe[:, None]
    s_mu = tl.sum(s * mu, 1)  # [M]
    mem = mu_v
    if HAS_VK:
        mem = mem + vk_s / safe[:, None] - mu_v * s_mu[:, None]
    lse_mem = tl.where(count > 0, (tl.log(safe) + s_mu) * 1.4426950408889634, float("-inf"))  # log2 units
    # (Z_w out_w + Z_mem out_mem) / (Z_w + Z_mem), through the larger log-denominator
    top = tl.maximum(m_w, lse_mem)
    top = tl.where(top == float("-inf"), 0.0, top)
    z_w = tl.exp2(m_w - top)  # acc and l_w are relative to 2^m_w
    z_mem = tl.where(count > 0, tl.exp2(lse_mem - top), 0.0)
    denom = l_w * z_w + z_mem
    nonzero = denom > 0
    out = (acc * z_w[:, None] + mem * z_mem[:, None]) / tl.where(nonzero, denom, 1.0)[:, None]
    lse = tl.where(nonzero, (top + tl.log2(tl.where(nonzero, denom, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def _moment_decode_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, valid_ptr, sink_ptr, qpos_ptr, out_ptr, lse_ptr,
    n_ptr, ks_ptr, vs_ptr, vk_ptr, ek_ptr, ev_ptr, w_ptr, log_decay_ptr, n_out, ks_out, vs_out, vk_out,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sn, stride_vlb, stride_vln, stride_skb, stride_skn,
    stride_ob, stride_oh, stride_od, stride_lb, stride_lh,
    stride_ekb, stride_ekh, stride_ekd, stride_evb, stride_evh, stride_evd, stride_wb,
    n_kv_heads, n_keys, window, scaling, softcap,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_PAIR: tl.constexpr, HAS_VK: tl.constexpr, WRITE: tl.constexpr,
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
    # 1. the window
    acc, m_w, l_w = attention_rows(
        q, q_pos, row_ok,
        k_ptr + b * stride_kb + hkv * stride_kh, v_ptr + b * stride_vb + hkv * stride_vh,
        stride_kn, stride_kd, stride_vn, stride_vd,
        slot_ptr + b * stride_sb, valid_ptr + b * stride_vlb, sink_ptr + b * stride_skb,
        stride_sn, stride_vln, stride_skn,
        0, n_keys, window, scaling, softcap,
        D, DV, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, SOFTCAP, PRECISION, UPCAST,
    )  # fmt: skip
    # 2. the moments, with the evicted pair written (state tensors are contiguous, see moment_decode_step)
    bh = b * n_kv_heads + hkv
    count = tl.load(n_ptr + bh)
    key_sum = tl.load(ks_ptr + bh * D + offs_d, mask=d_ok, other=0.0)
    value_sum = tl.load(vs_ptr + bh * DV + offs_dv, mask=dv_ok, other=0.0)
    vk_offs = bh * DV * D + offs_dv[:, None] * D + offs_d[None, :]
    vk_mask = dv_ok[:, None] & d_ok[None, :]
    if HAS_VK:
        value_key = tl.load(vk_ptr + vk_offs, mask=vk_mask, other=0.0)  # [BLOCK_DV, BLOCK_D]
    if HAS_PAIR:
        lam = tl.exp(tl.load(log_decay_ptr + hkv))
        w = tl.load(w_ptr + b * stride_wb).to(tl.float32)
        ek = tl.load(ek_ptr + b * stride_ekb + hkv * stride_ekh + offs_d * stride_ekd, mask=d_ok, other=0.0)
        ev = tl.load(ev_ptr + b * stride_evb + hkv * stride_evh + offs_dv * stride_evd, mask=dv_ok, other=0.0)
        ek, ev = ek.to(tl.float32), ev.to(tl.float32)
        count = lam * count + w
        key_sum = lam * key_sum + w * ek
        value_sum = lam * value_sum + w * ev
        if HAS_VK:
            value_key = lam * value_key + w * (ev[:, None] * ek[None, :])
    if WRITE:
        tl.store(n_out + bh, count)
        tl.store(ks_out + bh * D + offs_d, key_sum, mask=d_ok)
        tl.store(vs_out + bh * DV + offs_dv, value_sum, mask=dv_ok)
        if HAS_VK:
            tl.store(vk_out + vk_offs, value_key, mask=vk_mask)
    # 3. the memory read and 4. the merge
    s = q.to(tl.float32) * scaling  # [BLOCK_M, BLOCK_D]
    vk_s = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if HAS_VK:
        vk_s = tl.dot(s, tl.trans(value_key), input_precision="ieee")  # [BLOCK_M, BLOCK_DV]
    rows0 = tl.zeros([BLOCK_M], tl.float32)
    out, lse = read_and_merge(
        s, rows0 + count, rows0[:, None] + key_sum[None, :], rows0[:, None] + value_sum[None, :], vk_s,
        acc, m_w, l_w, HAS_VK,
    )  # fmt: skip
    tl.store(
        out_ptr + b * stride_ob + head[:, None] * stride_oh + offs_dv[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + head * stride_lh, lse, mask=row_ok)


def moment_decode_step(
    query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, state, keys, values, weights, log_decay,
    out_state=None,
):  # fmt: skip
    """Run the fused step on checked inputs: `(out [B, Hq, 1, Dv] float32, lse [B, Hq, 1])`.

    `keys`, `values` `[B, Hkv, m, D]` and `weights` `[B, m]` hold the `m <= 1` pair this step evicts; `out_state`, a
    `MomentState` of contiguous float32 tensors (it may be `state` itself), receives the moments after the write, or
    `None` to skip the write. Use [`hf_neuralcache.kernels.fast_weight.moment_decode`], which checks its inputs.
    """
    batch, hq, _, d = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[-1]
    out = query.new_empty(batch, hq, 1, dv, dtype=torch.float32)
    lse = query.new_empty(batch, hq, 1, dtype=torch.float32)
    has_pair, has_vk = keys.shape[2] == 1, state.value_key is not None
    if has_pair:
        ek, ev, w = keys[:, :, 0], values[:, :, 0], weights[:, 0]
    else:  # unused placeholders of the right rank
        ek, ev, w = state.key_sum, state.value_sum, state.count[:, 0]
    target = out_state if out_state is not None else state
    vk_in = state.value_key if has_vk else state.key_sum
    vk_out = target.value_key if has_vk else target.key_sum
    _moment_decode_kernel[(batch * hkv,)](
        query, key, value, slots, valid, sink, q_slots, out, lse,
        state.count, state.key_sum, state.value_sum, vk_in, ek, ev, w, log_decay,
        target.count, target.key_sum, target.value_sum, vk_out,
        query.stride(0), query.stride(1), query.stride(3),
        *key.stride(), *value.stride(), *slots.stride(), *valid.stride(), *sink.stride(),
        out.stride(0), out.stride(1), out.stride(3), lse.stride(0), lse.stride(1),
        *ek.stride(), *ev.stride(), w.stride(0),
        hkv, n_k, window, scaling, 1.0 if softcap is None else float(softcap),
        G=hq // hkv, D=d, DV=dv, BLOCK_M=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=32 if max(d, dv) >= 128 else 64, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv),
        SOFTCAP=softcap is not None, PRECISION=precision(query.dtype), UPCAST=upcast(query),
        HAS_PAIR=has_pair, HAS_VK=has_vk, WRITE=out_state is not None, num_warps=8 if max(d, dv) >= 128 else 4,
    )  # fmt: skip
    return out, lse
