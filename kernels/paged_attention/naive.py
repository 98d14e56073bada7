"""PyTorch reference for paged attention: the definition the Triton kernels are checked against.

K/V live in a pool of pages per layer, `k_pages`/`v_pages` of shape `[num_pages, Hkv, page_size, D]` (FlashInfer's
"HND" layout: one page of one head is a contiguous `[page_size, D]` block). Sequence `b` holds its token `t` at
page `table[b, t // page_size]`, offset `t % page_size`. A sequence of `seq_lens[b]` tokens whose first
`kv_start[b]` tokens are padding asks `q` queries, its last `q` positions; the query at absolute position `i` sees
the key at position `j` when

    kv_start[b] <= j <= i  and  (window is None  or  i - j < window)

This reference gathers the pages into a contiguous tensor (what the kernels avoid) and computes in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["gather_pages", "paged_attention_naive", "write_pages_naive"]


def gather_pages(pages: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of every sequence as a contiguous `[B, H, length, D]` tensor.

    Args:
        pages (`torch.Tensor` of shape `[num_pages, H, page_size, D]`): A page pool.
        table (`torch.LongTensor` of shape `[B, n]`): Page table, `n * page_size >= length`.
        length (`int`): Tokens to return per sequence.
    """
    batch, n = table.shape
    _, heads, page_size, dim = pages.shape
    rows = pages.reshape(pages.shape[0], -1)  # one row per page: a 2D gather is much faster than a 4D index
    gathered = F.embedding(table.reshape(-1), rows).view(batch, n, heads, page_size, dim)  # [B, n, H, P, D]
    return gathered.transpose(1, 2).reshape(batch, heads, n * page_size, dim)[:, :, :length]


def write_pages_naive(
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write `key`/`value` (`[N, H, D]`, one row per token) at the flat `slots` (`[N]`, `page * page_size + offset`)."""
    page_size = k_pages.shape[2]
    page, offset = slots // page_size, slots % page_size
    k_pages[page, :, offset] = key.to(k_pages.dtype)  # advanced indices around a slice: [N, H, D]
    v_pages[page, :, offset] = value.to(v_pages.dtype)


def paged_visibility(
    seq_lens: torch.Tensor, kv_start: torch.Tensor, q_length: int, length: int, window: int | None
) -> torch.Tensor:
    """`[B, q, length]` bool: which of the first `length` positions each of the last `q_length` queries sees."""
    i = (seq_lens.view(-1, 1) - q_length + torch.arange(q_length, device=seq_lens.device)).unsqueeze(-1)  # [B, q, 1]
    j = torch.arange(length, device=seq_lens.device).view(1, 1, -1)  # [1, 1, K]
    visible = (j <= i) & (j >= kv_start.view(-1, 1, 1))
    if window is not None:
        visible &= j > i - window
    return visible


def paged_attention_naive(
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
    """Attention of the last `q` positions of each sequence over its pages.

    Args:
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): Queries; `Hq` a multiple of `Hkv` (GQA).
        k_pages (`torch.Tensor` of shape `[num_pages, Hkv, page_size, D]`): Key pool.
        v_pages (`torch.Tensor` of shape `[num_pages, Hkv, page_size, Dv]`): Value pool.
        table (`torch.LongTensor` of shape `[B, n]`): Page table; entries past a sequence's length are ignored.
        seq_lens (`torch.LongTensor` of shape `[B]`): Tokens held per sequence, the queries' own included.
        kv_start (`torch.LongTensor` of shape `[B]`): Leading padding tokens per sequence (never attended to).
        scaling (`float`): Multiplier of the dot products.
        softcap (`float`, *optional*): Logit soft-capping, `softcap * tanh(logits / softcap)`.
        window (`int`, *optional*): Sliding window (the query's own position included); `None` for full attention.

    Returns:
        `torch.Tensor` of shape `[B, Hq, q, Dv]` in the dtype of `query`; a query that sees no key gets zeros.
    """
    batch, q_heads, q_length, _ = query.shape
    length = int(seq_lens.max())
    keys = gather_pages(k_pages, table, length).float()  # [B, Hkv, K, D]
    values = gather_pages(v_pages, table, length).float()
    groups = q_heads // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = torch.matmul(query.float(), keys.transpose(-1, -2)) * scaling  # [B, Hq, q, K]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = paged_visibility(seq_lens, kv_start, q_length, length, window).unsqueeze(1)  # [B, 1, q, K]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows without any visible key
    return torch.matmul(probs, values).to(query.dtype)
