"""Triton attention of several new tokens per sequence over pages: chunked prefill and multi-token steps.

One program per (sequence, query head, block of `BLOCK_M` queries). The queries are the last `q` positions of
each sequence (their K/V already written to the pages); the program walks the keys the block can see, `BLOCK_N`
tokens at a time through the page table, with a causal (and optional sliding-window) mask and an online softmax,
like FlashAttention. Assisted decoding's verification step (a few candidate tokens) and later prompt chunks use
it. Checked against `naive.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .decode import _online_softmax, _page_tile, _tanh

__all__ = ["paged_prefill"]


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    TABLE,
    SEQ_LENS,
    KV_START,
    OUT,
    stride_qb,
    stride_qh,
    stride_qt,
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
    stride_ot,
    q_length,
    scaling,
    softcap,
    window,
    GROUPS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b, head, block_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kv_head = head // GROUPS
    seq_len = tl.load(SEQ_LENS + b)
    kv_start = tl.load(KV_START + b)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index among the q new tokens
    pos = seq_len - q_length + rows  # [M] absolute positions of the queries
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * stride_qb + head * stride_qh + rows[:, None] * stride_qt + d[None, :] * stride_qd,
        mask=(rows[:, None] < q_length) & (d[None, :] < D),
        other=0.0,
    )  # [M, D]
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo = kv_start
    if WINDOW:
        lo = tl.maximum(lo, seq_len - q_length + block_m * BLOCK_M - window + 1)
    hi = tl.minimum(seq_len, seq_len - q_length + (block_m + 1) * BLOCK_M)
    for block in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        t = block + tl.arange(0, BLOCK_N)
        in_seq = (t >= kv_start) & (t < seq_len)
        page = tl.load(TABLE + b * stride_tb + t // PAGE, mask=in_seq, other=0).to(tl.int64)  # no int32 overflow
        k = _page_tile(K, page, t, kv_head, stride_kp, stride_kh, stride_kt, stride_kd, d, D, in_seq, PAGE)  # [N, D]
        v = _page_tile(V, page, t, kv_head, stride_vp, stride_vh, stride_vt, stride_vd, dv, DV, in_seq, PAGE)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling  # [M, N]
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        seen = in_seq[None, :] & (t[None, :] <= pos[:, None])
        if WINDOW:
            seen = seen & (t[None, :] > pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m, denom, acc = _online_softmax(m, denom, acc, s, v, PRECISION)
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(
        OUT + b * stride_ob + head * stride_oh + rows[:, None] * stride_ot + dv[None, :],
        out.to(OUT.dtype.element_ty),
        mask=(rows[:, None] < q_length) & (dv[None, :] < DV),
    )


def paged_prefill(
    query: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_start: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of the last `q` positions of each sequence over its pages; the contract of `paged_attention_naive`."""
    batch, q_heads, q_length, dim = query.shape
    _, kv_heads, page, _ = k_pages.shape
    dim_v = v_pages.shape[-1]
    block_m = 16 if q_length <= 16 else 64
    block_n = 64 if dim <= 64 else 32
    out = torch.empty(batch, q_heads, q_length, dim_v, device=query.device, dtype=query.dtype)
    _prefill_kernel[(batch, q_heads, triton.cdiv(q_length, block_m))](
        query,
        k_pages,
        v_pages,
        table,
        seq_lens,
        kv_start,
        out,
        *query.stride(),
        *k_pages.stride(),
        *v_pages.stride(),
        table.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        q_length,
        scaling,
        softcap or 0.0,
        window or 0,
        GROUPS=q_heads // kv_heads,
        D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        DV=dim_v,
        BLOCK_DV=max(16, triton.next_power_of_2(dim_v)),
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SOFTCAP=softcap is not None,
        WINDOW=window is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        UPCAST=query.dtype == torch.bfloat16 and interpreting(),
    )
    return out
