"""Paged attention: K/V stored in fixed-size pages addressed through a page table per sequence.

`naive.py` is the PyTorch reference; `decode.py` (split-K decode), `prefill.py` (several queries per sequence) and
`write.py` (new K/V into pages) are the Triton kernels. The functions here pick one: the Triton kernels for CUDA
tensors, and also on the CPU while Triton's interpreter is on (`TRITON_INTERPRET=1`, how the tests run them);
the reference otherwise (and always without Triton installed). The Triton modules are imported on first use, so a
CPU-only install never needs Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import triton_available, triton_interpreting
from .naive import gather_pages, paged_attention_naive, paged_visibility, write_pages_naive

__all__ = [
    "gather_pages",
    "interpreting",
    "paged_attention",
    "paged_attention_naive",
    "paged_visibility",
    "use_triton",
    "write_pages",
    "write_pages_naive",
]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`, read by Triton itself); `False`
    without Triton."""
    return triton_interpreting()


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels run for `tensor`: on CUDA, or on the CPU under Triton's interpreter (never
    without Triton installed)."""
    return (tensor.is_cuda and triton_available()) or (tensor.device.type == "cpu" and interpreting())


def write_pages(
    k_pages: torch.Tensor, v_pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write `key`/`value` (`[N, H, D]`, one row per token) at the flat `slots` (`[N]`, `page * page_size + offset`).

    Args:
        k_pages (`torch.Tensor` of shape `[num_pages, H, page_size, D]`): Key pool, written in place.
        v_pages (`torch.Tensor` of shape `[num_pages, H, page_size, Dv]`): Value pool, written in place.
        key (`torch.Tensor` of shape `[N, H, D]`): New keys.
        value (`torch.Tensor` of shape `[N, H, Dv]`): New values.
        slots (`torch.LongTensor` of shape `[N]`): Where each token goes; distinct.
    """
    if use_triton(k_pages):
        from .write import write_pages as triton_write

        triton_write(k_pages, v_pages, key, value, slots)
    else:
        write_pages_naive(k_pages, v_pages, key, value, slots)


def paged_attention(
    query: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_start: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
    max_len: int | None = None,
) -> torch.Tensor:
    """Attention of the last `q` positions of each sequence over its pages, read in place.

    One query per sequence runs the split-K decode kernel, several run the prefill kernel; see
    [`paged_attention_naive`] for the arguments and the exact definition.

    Args:
        max_len (`int`, *optional*): `seq_lens.max()` when the caller knows it (saves a device sync on decode).

    Example:

    ```python
    >>> import torch
    >>> from hf_neuralcache.kernels.paged_attention import paged_attention
    >>> k_pages = v_pages = torch.randn(4, 2, 16, 64)  # 4 pages of 16 tokens, 2 KV heads, head_dim 64
    >>> table, seq_lens, kv_start = torch.tensor([[2, 0]]), torch.tensor([20]), torch.tensor([0])
    >>> paged_attention(torch.randn(1, 4, 1, 64), k_pages, v_pages, table, seq_lens, kv_start, 0.125).shape
    torch.Size([1, 4, 1, 64])
    ```
    """
    if not use_triton(query):
        return _gathered_attention(
            query, k_pages, v_pages, table, seq_lens, kv_start, scaling, softcap, window, max_len
        )
    if query.shape[2] == 1:
        from .decode import paged_decode

        return paged_decode(
            query, k_pages, v_pages, table, seq_lens, kv_start, scaling, softcap, window, max_len=max_len
        )
    from .prefill import paged_prefill

    return paged_prefill(query, k_pages, v_pages, table, seq_lens, kv_start, scaling, softcap, window)


def _gathered_attention(query, k_pages, v_pages, table, seq_lens, kv_start, scaling, softcap, window, max_len):
    """Without Triton: gather the pages and run SDPA (the reference itself for soft-capping, which SDPA lacks)."""
    if softcap is not None:
        return paged_attention_naive(query, k_pages, v_pages, table, seq_lens, kv_start, scaling, softcap, window)
    length = max_len if max_len is not None else int(seq_lens.max())
    keys, values = gather_pages(k_pages, table, length), gather_pages(v_pages, table, length)
    q_length, mask, empty = query.shape[2], None, None
    if q_length > 1 or window is not None or bool((kv_start > 0).any()) or bool((seq_lens != length).any()):
        mask = paged_visibility(seq_lens, kv_start, q_length, length, window).unsqueeze(1)  # [B, 1, q, K]
        empty = ~mask.any(-1, keepdim=True)  # queries that see nothing get zeros, as in the reference
        mask = mask | empty
    out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out if empty is None else out.masked_fill(empty, 0.0)
