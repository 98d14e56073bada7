"""Triton split-K decode attention that reads K/V in place through the page table.

One program per (sequence, KV head, split): it loads the `G = Hq / Hkv` query heads that share the KV head (GQA),
walks its share of the sequence `BLOCK_N` tokens at a time (each token's page looked up in the page table, so a
block may span several pages and pages of any size work), and keeps an online softmax. A second kernel merges the
splits through their log-sum-exp. Nothing is gathered into a contiguous tensor. Checked against `naive.py`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import interpreting

__all__ = ["paged_decode"]


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _page_tile(PTR, page, t, kv_head, stride_p, stride_h, stride_t, stride_c, cols, n_cols, valid, PAGE: tl.constexpr):
    """`[N, C]` tile of a page pool: token `t` of the block at slot `t % PAGE` of its page `page`."""
    return tl.load(
        PTR + page[:, None] * stride_p + kv_head * stride_h + (t % PAGE)[:, None] * stride_t + cols[None, :] * stride_c,
        mask=valid[:, None] & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def _online_softmax(m, denom, acc, s, v, PRECISION: tl.constexpr):
    """One key block of an online softmax: masked scores `s` `[R, N]`, values `v` `[N, Dv]`."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    denom = denom * alpha + tl.sum(p, 1)
    return m_new, denom, acc


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    TABLE,
    SEQ_LENS,
    KV_START,
    O_PART,
    LSE_PART,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kp,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vp,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_tb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    scaling,
    softcap,
    window,
    split_len,
    GROUPS: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    lo = tl.maximum(tl.load(KV_START + b), split * split_len)
    if WINDOW:
        lo = tl.maximum(lo, seq_len - window)
    hi = tl.minimum(seq_len, (split + 1) * split_len)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    heads = kv_head * GROUPS + g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=(g[:, None] < GROUPS) & (d[None, :] < D),
        other=0.0,
    )  # [G, D]
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
    start = (lo // BLOCK_N) * BLOCK_N
    for block in range(start, hi, BLOCK_N):
        t = block + tl.arange(0, BLOCK_N)
        valid = (t >= lo) & (t < hi)
        page = tl.load(TABLE + b * stride_tb + t // PAGE, mask=valid, other=0).to(tl.int64)  # no int32 overflow
        k = _page_tile(K, page, t, kv_head, stride_kp, stride_kh, stride_kt, stride_kd, d, D, valid, PAGE)  # [N, D]
        v = _page_tile(V, page, t, kv_head, stride_vp, stride_vh, stride_vt, stride_vd, dv, DV, valid, PAGE)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling  # [G, N]
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(valid[None, :], s, float("-inf"))
        m, denom, acc = _online_softmax(m, denom, acc, s, v, PRECISION)
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    lse = tl.where(denom == 0.0, float("-inf"), m + tl.log(tl.where(denom == 0.0, 1.0, denom)))
    tl.store(
        O_PART + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + dv[None, :],
        out,
        mask=(g[:, None] < GROUPS) & (dv[None, :] < DV),
    )
    tl.store(LSE_PART + b * stride_lb + heads * stride_lh + split, lse, mask=g < GROUPS)


@triton.jit
def _merge_splits_kernel(
    O_PART,
    LSE_PART,
    OUT,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_b,
    stride_h,
    SPLITS: tl.constexpr,
    S_PAD: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, S_PAD)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + s, mask=s < SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(lse - top)  # [S]
    part = tl.load(
        O_PART + b * stride_ob + h * stride_oh + s[:, None] * stride_os + dv[None, :],
        mask=(s[:, None] < SPLITS) & (dv[None, :] < DV),
        other=0.0,
    )  # [S, Dv]
    total = tl.sum(weight, 0)
    out = tl.sum(part * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(OUT + b * stride_b + h * stride_h + dv, out.to(OUT.dtype.element_ty), mask=dv < DV)


def _splits_for(batch: int, kv_heads: int, max_len: int, block_n: int, target_programs: int = 264) -> int:
    """Enough splits along the sequence to fill the GPU (about 2 programs per SM of an H100), each >= 4 blocks."""
    per_sequence = max(1, math.ceil(target_programs / (batch * kv_heads)))
    return max(1, min(per_sequence, math.ceil(max_len / (4 * block_n))))


def paged_decode(
    query: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_start: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
    num_splits: int | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Decode attention (one query per sequence) over pages; same contract as `paged_attention_naive` with `q=1`.

    Args:
        num_splits (`int`, *optional*): Splits along the sequence; chosen from the shape when `None`.
        max_len (`int`, *optional*): `seq_lens.max()` if the caller knows it (saves a device sync).
    """
    batch, q_heads, _, dim = query.shape
    _, kv_heads, page, _ = k_pages.shape
    dim_v = v_pages.shape[-1]
    groups = q_heads // kv_heads
    block_n = 64 if dim <= 64 else 32
    if max_len is None:
        max_len = int(seq_lens.max())
    splits = num_splits or _splits_for(batch, kv_heads, max_len, block_n)
    split_len = math.ceil(max(max_len, 1) / splits / block_n) * block_n
    q = query[:, :, 0]  # [B, Hq, D]
    o_part = torch.empty(batch, q_heads, splits, dim_v, device=query.device, dtype=torch.float32)
    lse_part = torch.empty(batch, q_heads, splits, device=query.device, dtype=torch.float32)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    upcast = query.dtype == torch.bfloat16 and interpreting()  # numpy, under the interpreter, has no bf16 matmul
    _decode_split_kernel[(batch, kv_heads, splits)](
        q,
        k_pages,
        v_pages,
        table,
        seq_lens,
        kv_start,
        o_part,
        lse_part,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        *k_pages.stride(),
        *v_pages.stride(),
        table.stride(0),
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        scaling,
        softcap or 0.0,
        window or 0,
        split_len,
        GROUPS=groups,
        G_PAD=max(16, triton.next_power_of_2(groups)),
        D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        DV=dim_v,
        BLOCK_DV=max(16, triton.next_power_of_2(dim_v)),
        PAGE=page,
        BLOCK_N=block_n,
        SOFTCAP=softcap is not None,
        WINDOW=window is not None,
        PRECISION=precision,
        UPCAST=upcast,
    )
    out = torch.empty(batch, q_heads, 1, dim_v, device=query.device, dtype=query.dtype)
    _merge_splits_kernel[(batch, q_heads)](
        o_part,
        lse_part,
        out,
        o_part.stride(0),
        o_part.stride(1),
        o_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        out.stride(0),
        out.stride(1),
        SPLITS=splits,
        S_PAD=max(2, triton.next_power_of_2(splits)),
        DV=dim_v,
        BLOCK_DV=max(16, triton.next_power_of_2(dim_v)),
    )
    return out
