"""Triton kernel that writes new K/V into their pages: one program per (token, KV head), one row of D each."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["write_pages"]


@triton.jit
def _write_kernel(
    KEY,
    VALUE,
    SLOTS,
    K_PAGES,
    V_PAGES,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kp,
    stride_kph,
    stride_kt,
    stride_vp,
    stride_vph,
    stride_vt,
    PAGE: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    n, h = tl.program_id(0), tl.program_id(1)
    slot = tl.load(SLOTS + n)
    page, offset = slot // PAGE, slot % PAGE
    d = tl.arange(0, BLOCK_D)
    k = tl.load(KEY + n * stride_kn + h * stride_kh + d, mask=d < D)
    tl.store(K_PAGES + page * stride_kp + h * stride_kph + offset * stride_kt + d, k, mask=d < D)
    dv = tl.arange(0, BLOCK_DV)
    v = tl.load(VALUE + n * stride_vn + h * stride_vh + dv, mask=dv < DV)
    tl.store(V_PAGES + page * stride_vp + h * stride_vph + offset * stride_vt + dv, v, mask=dv < DV)


def write_pages(
    k_pages: torch.Tensor, v_pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write `key`/`value` (`[N, H, D]`) at the flat `slots` (`[N]`); the contract of `write_pages_naive`.

    The last dimension of `key`, `value` and of the pools must be contiguous.
    """
    tokens, heads, dim = key.shape
    dim_v = value.shape[-1]
    key, value = key.to(k_pages.dtype), value.to(v_pages.dtype)
    _write_kernel[(tokens, heads)](
        key,
        value,
        slots,
        k_pages,
        v_pages,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_pages.stride(0),
        k_pages.stride(1),
        k_pages.stride(2),
        v_pages.stride(0),
        v_pages.stride(1),
        v_pages.stride(2),
        PAGE=k_pages.shape[2],
        D=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        DV=dim_v,
        BLOCK_DV=triton.next_power_of_2(dim_v),
    )
