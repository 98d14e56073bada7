"""Chunked Triton write of evicted pairs into the training-free Tensor Cache memory (`"moment"` and `"mean"`).

`m` pairs enter with the in-chunk weighted-sum scan: every moment becomes `lam^m x + sum_j lam^(m-1-j) w_j x_j`
(the pair `j` has aged `m - 1 - j` ticks when the chunk ends), which is exactly `m` token-by-token writes and has
no chunk-mean cross terms. The value-key moment is one matmul per tile of pairs, `(p * V)^T K`. One program per
`(sequence, KV head, tile of Dv)`; the programs of the first `Dv` tile also write `count` and `sum k`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..window_attention.prefill import block_d

__all__ = ["moment_write_chunk"]


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
    )  # fmt: skip
    return out_state
