"""Triton window attention for one query per sequence (decode), split along the keys for long windows.

Decode has one query per sequence, so the `g = Hq / Hkv` heads of a KV group are the rows of the tile (padded to
16 for `tl.dot`) and each K/V tile is read once per group. With few `(batch, KV head)` programs and many keys the
key range is split (flash-decoding): each split writes a partial output and log-sum-exp, merged in float32 after.
The kernel itself is the one of [`prefill`] (same inner loop, [`attention_rows`]).
"""

from __future__ import annotations

import torch
import triton

from .prefill import launch

__all__ = ["decode", "num_splits"]

TARGET_PROGRAMS = 128  # about one wave of programs on a big GPU
MIN_KEYS_PER_SPLIT = 256


def num_splits(batch: int, kv_heads: int, keys: int) -> int:
    """Key ranges to split one decode step into: enough programs for one wave, at least 256 keys each."""
    by_programs = triton.cdiv(TARGET_PROGRAMS, batch * kv_heads)
    by_keys = max(1, keys // MIN_KEYS_PER_SPLIT)
    return max(1, min(by_programs, by_keys, 64))


def decode(query, key, value, slots, valid, sink, q_slots, window, scaling, softcap=None, out_dtype=None, splits=None):
    """Window attention for `query` `[B, Hq, 1, D]`: `(out [B, Hq, 1, Dv], lse [B, Hq, 1])`, inputs already checked.

    Use [`hf_neuralcache.kernels.window_attention.attend`], which checks its inputs and picks this kernel.
    `splits` (the number of key ranges) defaults to [`num_splits`].
    """
    batch, hq, _, _ = query.shape
    hkv, n_k, dv = key.shape[1], key.shape[2], value.shape[-1]
    splits = splits or num_splits(batch, hkv, n_k)
    block_m = max(16, triton.next_power_of_2(hq // hkv))
    out_dtype = out_dtype or query.dtype
    part_dtype = out_dtype if splits == 1 else torch.float32
    out = query.new_empty(batch, hq, 1, splits, dv, dtype=part_dtype)
    lse = query.new_empty(batch, hq, 1, splits, dtype=torch.float32)
    launch(query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, out, lse, splits, block_m)
    if splits == 1:
        return out.squeeze(3), lse.squeeze(3)
    total = torch.logsumexp(lse, dim=-1)  # [B, Hq, 1]; -inf where no split saw a key
    weight = torch.exp(lse - torch.where(torch.isfinite(total), total, 0.0).unsqueeze(-1))  # 0 for empty splits
    merged = (weight.unsqueeze(-1) * out).sum(3)
    return merged.to(out_dtype), total
