"""Triton kernels of the learned Tensor Cache memory (`mode="learned"`): fused decode, chunked write, fused prefill.

The memory of one `(sequence, KV head)` is a linear-attention state, `values` `[2F, Dv]` = `sum_i lam^(t-i) eta w_i
phi(k_i) v_i^T` and `mass` `[2F]` = `sum_i lam^(t-i) eta w_i phi(k_i)`, read `num = phi(q) values`,
`den = phi(q) mass` (in units of the window's softmax mass). The feature map `phi` is computed in PyTorch before
the kernels (`naive.learned_features`): they take the features `fq` `[B, Hq, q, 2F]` and `fk` `[B, Hkv, m, 2F]`, so
the map can change without touching them. Window and memory share one normaliser:

    out = (Z_w out_w + Z_w num) / (Z_w (1 + den)) = (out_w + num) / (1 + den),   lse = lse_w + log(1 + den)

which is `merge_softmax(out_w, lse_w, num / den, lse_w + log den)` of `naive.learned_read` ([`merge_mass`]).

* **Decode** (one program per `(sequence, KV head)`, the group's `g` query heads as rows, as in
  `fused_recurrent.py`): window attention ([`attention_rows`]), the write of the pair leaving the window
  (`x <- lam x + eta w x_pair`), the read of the updated state and the merge. The state is written once per KV
  head, in place when asked (each program reads its own slice, tile by tile, before it writes it).
* **Write**: `m` pairs with the weighted-sum scan, `x <- lam^m x + eta sum_j lam^(m-1-j) w_j x_j`, one matmul per
  tile of pairs. One program per `(sequence, KV head, tile of Dv)`; the first `Dv` tile also writes `mass`.
* **Prefill** (one program per `(tile of query rows, sequence, KV head)`): window attention, then the state row `t`
  sees, the old state decayed `lam^prefix[t]` plus the chunk's pairs `j < prefix[t]` weighted
  `eta lam^(prefix[t]-1-j) w_j`, read and merged: no `[B, Hq, q, m]` tensor in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..window_attention.prefill import attention_rows, block_d, precision, upcast

__all__ = ["learned_decode_step", "learned_prefill_chunk", "learned_write_chunk", "merge_mass"]

LN2 = 0.6931471805599453


def _block_f(features: int) -> int:
    """Tile of the feature dimension: at most 64 features a tile (the decode loops over tiles)."""
    return min(block_d(features), 64)


@triton.jit
def merge_mass(acc, m_w, l_w, num, den):
    """Merge each row's window softmax (`acc`, `m_w` in log2, `l_w`) with its memory read. Returns `(out, lse)`.

    `num` `[M, Dv]` = `phi(q) values` and `den` `[M]` = `phi(q) mass`; a memory with `den <= 1e-30` is empty (as in
    `naive.learned_read`), and a row that sees no window key gets `out` 0 and `lse` `-inf` (as `merge_softmax`).
    """
    seen = l_w > 0
    l_safe = tl.where(seen, l_w, 1.0)
    full = den > 1e-30
    den = tl.where(full, den, 0.0)
    num = tl.where(full[:, None], num, 0.0)
    out = (acc / l_safe[:, None] + num) / (1.0 + den)[:, None]
    out = tl.where(seen[:, None], out, 0.0)
    lse = tl.where(seen, (m_w + tl.log2(l_safe)) * 0.6931471805599453 + tl.log(1.0 + den), float("-inf"))
    return out, lse


@triton.jit
def _learned_decode_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, valid_ptr, sink_ptr, qpos_ptr, out_ptr, lse_ptr,
    fq_ptr, s_ptr, z_ptr, fk_ptr, ev_ptr, w_ptr, log_decay_ptr, rate_ptr, s_out, z_out,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sn, stride_vlb, stride_vln, stride_skb, stride_skn,
    stride_ob, stride_oh, stride_od, stride_lb, stride_lh,
    stride_fqb, stride_fqh, stride_fqf,
    stride_fkb, stride_fkh, stride_fkf, stride_evb, stride_evh, stride_evd, stride_wb,
    n_kv_heads, n_keys, window, scaling, softcap,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_F: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    HAS_PAIR: tl.constexpr, WRITE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, hkv = pid // n_kv_heads, pid % n_kv_heads
    h = tl.arange(0, BLOCK_M)
    row_ok = h < G
    head = hkv * G + h
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d < D)[None, :],
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
    # 2. the write of the leaving pair and 3. the read, one tile of features at a time (state contiguous)
    bh = b * n_kv_heads + hkv
    if HAS_PAIR:
        lam = tl.exp(tl.load(log_decay_ptr + hkv))
        p = tl.load(rate_ptr + hkv) * tl.load(w_ptr + b * stride_wb).to(tl.float32)  # eta * w
        ev = tl.load(ev_ptr + b * stride_evb + hkv * stride_evh + offs_dv * stride_evd, mask=dv_ok, other=0.0)
        ev = ev.to(tl.float32)
    num = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        s_offs = bh * F * DV + offs_f[:, None] * DV + offs_dv[None, :]
        s_mask = f_ok[:, None] & dv_ok[None, :]
        values = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0)  # [BLOCK_F, BLOCK_DV]
        mass = tl.load(z_ptr + bh * F + offs_f, mask=f_ok, other=0.0)  # [BLOCK_F]
        if HAS_PAIR:
            fk = tl.load(fk_ptr + b * stride_fkb + hkv * stride_fkh + offs_f * stride_fkf, mask=f_ok, other=0.0)
            pf = p * fk.to(tl.float32)
            values = lam * values + pf[:, None] * ev[None, :]
            mass = lam * mass + pf
        if WRITE:
            tl.store(s_out + s_offs, values, mask=s_mask)
            tl.store(z_out + bh * F + offs_f, mass, mask=f_ok)
        fq = tl.load(
            fq_ptr + b * stride_fqb + head[:, None] * stride_fqh + offs_f[None, :] * stride_fqf,
            mask=row_ok[:, None] & f_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_M, BLOCK_F]
        num += tl.dot(fq, values, input_precision="ieee")
        den += tl.sum(fq * mass[None, :], 1)
    # 4. the merge, one normaliser
    out, lse = merge_mass(acc, m_w, l_w, num, den)
    tl.store(
        out_ptr + b * stride_ob + head[:, None] * stride_oh + offs_dv[None, :] * stride_od,
        out,
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + head * stride_lh, lse, mask=row_ok)


def learned_decode_step(
    query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, state, fq, fk, values, weights,
    log_decay, write_rate, out_state=None,
):  # fmt: skip
    """Run the fused step on checked inputs: `(out [B, Hq, 1, Dv] float32, lse [B, Hq, 1])`.

    `state` is a `LearnedState` of contiguous float32 tensors; `fk` `[B, Hkv, m, 2F]`, `values` `[B, Hkv, m, Dv]`
    and `weights` `[B, m]` hold the `m <= 1` pair this step evicts; `out_state` (may be `state` itself) receives the
    state after the write, or `None` to skip the write. Use [`hf_neuralcache.kernels.fast_weight.learned_decode`].
    """
    batch, hq, _, d = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[-1]
    features = state.mass.shape[-1]
    out = query.new_empty(batch, hq, 1, dv, dtype=torch.float32)
    lse = query.new_empty(batch, hq, 1, dtype=torch.float32)
    has_pair = fk.shape[2] == 1
    if has_pair:
        ek, ev, w = fk[:, :, 0], values[:, :, 0], weights[:, 0]
    else:  # unused placeholders of the right rank
        ek, ev, w = state.mass, state.mass, state.mass[:, 0]
    target = out_state if out_state is not None else state
    fq1 = fq[:, :, 0]  # [B, Hq, 2F]
    wide = max(d, dv) >= 128
    _learned_decode_kernel[(batch * hkv,)](
        query, key, value, slots, valid, sink, q_slots, out, lse,
        fq1, state.values, state.mass, ek, ev, w, log_decay, write_rate, target.values, target.mass,
        query.stride(0), query.stride(1), query.stride(3),
        *key.stride(), *value.stride(), *slots.stride(), *valid.stride(), *sink.stride(),
        out.stride(0), out.stride(1), out.stride(3), lse.stride(0), lse.stride(1),
        *fq1.stride(), *ek.stride(), *ev.stride(), w.stride(0),
        hkv, n_k, window, scaling, 1.0 if softcap is None else float(softcap),
        G=hq // hkv, D=d, DV=dv, F=features, BLOCK_M=max(16, triton.next_power_of_2(hq // hkv)),
        BLOCK_N=32 if wide else 64, BLOCK_D=block_d(d), BLOCK_DV=block_d(dv), BLOCK_F=_block_f(features),
        SOFTCAP=softcap is not None, PRECISION=precision(query.dtype), UPCAST=upcast(query),
        HAS_PAIR=has_pair, WRITE=out_state is not None, num_warps=8 if wide else 4,
    )  # fmt: skip
    return out, lse


@triton.jit
def _learned_write_kernel(
    s_ptr, z_ptr, fk_ptr, v_ptr, w_ptr, log_decay_ptr, rate_ptr, s_out, z_out,
    stride_kb, stride_kh, stride_km, stride_kf, stride_vb, stride_vh, stride_vm, stride_vd, stride_wb, stride_wm,
    n_heads, m,
    F: tl.constexpr, DV: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid, pid_v = tl.program_id(0), tl.program_id(1)
    b, h = pid // n_heads, pid % n_heads
    log_decay, eta = tl.load(log_decay_ptr + h), tl.load(rate_ptr + h)
    offs_f = tl.arange(0, BLOCK_F)
    offs_dv = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    f_ok, dv_ok = offs_f < F, offs_dv < DV
    values = tl.zeros([BLOCK_F, BLOCK_DV], tl.float32)
    mass = tl.zeros([BLOCK_F], tl.float32)
    for j0 in range(0, m, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < m
        w = tl.load(w_ptr + b * stride_wb + offs_j * stride_wm, mask=j_ok, other=0.0).to(tl.float32)
        p = tl.where(j_ok, eta * tl.exp(log_decay * (m - 1 - offs_j).to(tl.float32)) * w, 0.0)  # [BLOCK_J]
        fk = tl.load(
            fk_ptr + b * stride_kb + h * stride_kh + offs_j[:, None] * stride_km + offs_f[None, :] * stride_kf,
            mask=j_ok[:, None] & f_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_ptr + b * stride_vb + h * stride_vh + offs_j[:, None] * stride_vm + offs_dv[None, :] * stride_vd,
            mask=j_ok[:, None] & dv_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        pf = p[:, None] * fk  # [BLOCK_J, BLOCK_F]
        values += tl.dot(tl.trans(pf), v, input_precision="ieee")  # [BLOCK_F, BLOCK_DV]
        mass += tl.sum(pf, 0)
    old = tl.exp(log_decay * m)  # lam^m
    bh = b * n_heads + h
    s_offs = bh * F * DV + offs_f[:, None] * DV + offs_dv[None, :]
    s_mask = f_ok[:, None] & dv_ok[None, :]
    tl.store(s_out + s_offs, old * tl.load(s_ptr + s_offs, mask=s_mask, other=0.0) + values, mask=s_mask)
    if pid_v == 0:
        z_offs = bh * F + offs_f
        tl.store(z_out + z_offs, old * tl.load(z_ptr + z_offs, mask=f_ok, other=0.0) + mass, mask=f_ok)


def learned_write_chunk(state, fk, values, weights, log_decay, write_rate, out_state):
    """Write `m` pairs into `state` on checked inputs; the state after goes to `out_state` (may be `state`).

    Use [`hf_neuralcache.kernels.fast_weight.learned_write_features`], which checks its inputs.
    """
    batch, heads, m, features = fk.shape
    dv = values.shape[-1]
    block_dv = min(block_d(dv), 64)
    grid = (batch * heads, triton.cdiv(dv, block_dv))
    _learned_write_kernel[grid](
        state.values, state.mass, fk, values, weights, log_decay, write_rate, out_state.values, out_state.mass,
        *fk.stride(), *values.stride(), *weights.stride(),
        heads, m,
        F=features, DV=dv, BLOCK_J=16 if features >= 128 else 32, BLOCK_F=block_d(features), BLOCK_DV=block_dv,
        num_warps=8 if features >= 128 else 4,
    )  # fmt: skip
    return out_state


@triton.jit
def _learned_prefill_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, valid_ptr, sink_ptr, qpos_ptr, prefix_ptr, out_ptr, lse_ptr,
    fq_ptr, s_ptr, z_ptr, fk_ptr, ev_ptr, w_ptr, log_decay_ptr, rate_ptr,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_sn, stride_vlb, stride_vln, stride_skb, stride_skn,
    stride_ob, stride_oh, stride_ot, stride_od, stride_lb, stride_lh, stride_lt,
    stride_fqb, stride_fqh, stride_fqt, stride_fqf,
    stride_fkb, stride_fkh, stride_fkm, stride_fkf, stride_evb, stride_evh, stride_evm, stride_evd,
    stride_wb, stride_wm,
    n_kv_heads, n_queries, n_keys, m, window, scaling, softcap,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_FS: tl.constexpr,
    SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hkv = pid_bh // n_kv_heads, pid_bh % n_kv_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = query t * G + head h of the group
    t, h = rows // G, rows % G
    row_ok = t < n_queries
    head = hkv * G + h
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < DV
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_d < D)[None, :],
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
    # the state row r sees: the old state decayed lam^prefix[t], plus the chunk's first prefix[t] pairs
    seen = tl.load(prefix_ptr + t, mask=row_ok, other=0)  # [BLOCK_M]
    log_decay, eta = tl.load(log_decay_ptr + hkv), tl.load(rate_ptr + hkv)
    old = tl.exp(log_decay * seen.to(tl.float32))  # [BLOCK_M]
    fq_rows = fq_ptr + b * stride_fqb + head[:, None] * stride_fqh + t[:, None] * stride_fqt  # [BLOCK_M, 1]
    bh = b * n_kv_heads + hkv
    num = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    den = tl.zeros([BLOCK_M], tl.float32)
    for f0 in range(0, F, BLOCK_FS):  # the old state, one tile of features at a time (state contiguous)
        offs_f = f0 + tl.arange(0, BLOCK_FS)
        f_ok = offs_f < F
        fq = tl.load(fq_rows + offs_f[None, :] * stride_fqf, mask=row_ok[:, None] & f_ok[None, :], other=0.0)
        fq = fq.to(tl.float32)  # [BLOCK_M, BLOCK_FS]
        values = tl.load(
            s_ptr + bh * F * DV + offs_f[:, None] * DV + offs_dv[None, :],
            mask=f_ok[:, None] & dv_ok[None, :],
            other=0.0,
        )  # [BLOCK_FS, BLOCK_DV]
        mass = tl.load(z_ptr + bh * F + offs_f, mask=f_ok, other=0.0)
        num += tl.dot(fq, values, input_precision="ieee")
        den += tl.sum(fq * mass[None, :], 1)
    num, den = old[:, None] * num, old * den
    offs_f = tl.arange(0, BLOCK_F)
    f_ok = offs_f < F
    fq = tl.load(fq_rows + offs_f[None, :] * stride_fqf, mask=row_ok[:, None] & f_ok[None, :], other=0.0)
    fq = fq.to(tl.float32)  # [BLOCK_M, BLOCK_F]: every feature, for the chunk's pairs
    for j0 in range(0, m, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < m
        w = tl.load(w_ptr + b * stride_wb + offs_j * stride_wm, mask=j_ok, other=0.0).to(tl.float32)
        age = seen[:, None] - 1 - offs_j[None, :]  # [BLOCK_M, BLOCK_J]
        weight = eta * tl.exp(log_decay * tl.maximum(age, 0).to(tl.float32)) * w[None, :]
        weight = tl.where((age >= 0) & j_ok[None, :], weight, 0.0)
        fk = tl.load(
            fk_ptr + b * stride_fkb + hkv * stride_fkh + offs_j[:, None] * stride_fkm + offs_f[None, :] * stride_fkf,
            mask=j_ok[:, None] & f_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_J, BLOCK_F]
        v = tl.load(
            ev_ptr + b * stride_evb + hkv * stride_evh + offs_j[:, None] * stride_evm + offs_dv[None, :] * stride_evd,
            mask=j_ok[:, None] & dv_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_J, BLOCK_DV]
        scores = weight * tl.dot(fq, tl.trans(fk), input_precision="ieee")  # [BLOCK_M, BLOCK_J]
        num += tl.dot(scores, v, input_precision="ieee")
        den += tl.sum(scores, 1)
    out, lse = merge_mass(acc, m_w, l_w, num, den)
    tl.store(
        out_ptr + b * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_ot + offs_dv[None, :] * stride_od,
        out,
        mask=row_ok[:, None] & dv_ok[None, :],
    )
    tl.store(lse_ptr + b * stride_lb + head * stride_lh + t * stride_lt, lse, mask=row_ok)


def learned_prefill_chunk(
    query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, state, fq, fk, values, weights, prefix,
    log_decay, write_rate,
):  # fmt: skip
    """Window attention + learned read at per-query prefixes + merge, on checked inputs: `(out, lse)` float32.

    Use [`hf_neuralcache.kernels.fast_weight.learned_prefill`], which checks its inputs and picks this kernel.
    """
    batch, hq, n_q, d = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[-1]
    features = state.mass.shape[-1]
    g = hq // hkv
    out = query.new_empty(batch, hq, n_q, dv, dtype=torch.float32)
    lse = query.new_empty(batch, hq, n_q, dtype=torch.float32)
    wide = max(d, dv, features) >= 128
    block_m = min(16 if wide else 32, max(16, triton.next_power_of_2(n_q * g)))
    grid = (triton.cdiv(n_q * g, block_m), batch * hkv)
    _learned_prefill_kernel[grid](
        query, key, value, slots, valid, sink, q_slots, prefix, out, lse,
        fq, state.values, state.mass, fk, values, weights, log_decay, write_rate,
        *query.stride(), *key.stride(), *value.stride(), *slots.stride(), *valid.stride(), *sink.stride(),
        *out.stride(), *lse.stride(), *fq.stride(), *fk.stride(), *values.stride(), *weights.stride(),
        hkv, n_q, n_k, fk.shape[2], window, scaling, 1.0 if softcap is None else float(softcap),
        G=g, D=d, DV=dv, F=features, BLOCK_M=block_m, BLOCK_N=32 if wide else 64, BLOCK_J=16 if wide else 32,
        BLOCK_D=block_d(d), BLOCK_DV=block_d(dv), BLOCK_F=block_d(features), BLOCK_FS=_block_f(features),
        SOFTCAP=softcap is not None, PRECISION=precision(query.dtype), UPCAST=upcast(query), num_warps=8 if wide else 4,
    )  # fmt: skip
    return out, lse
