"""PyTorch reference for window attention with attention sinks.

This is the definition the caches and the Triton kernels are checked against. A query at absolute position `i`
sees a cached key at absolute position `j` when

    j <= i  and  the key is a real token (not padding)  and  (i - j < window  or  the key is a sink)

where the sinks of a sequence are its first `sink_tokens` real tokens. With `sink_tokens=0` this is the
sliding-window mask transformers uses for its own sliding layers (`q_idx - kv_idx < sliding_window`).
"""

from __future__ import annotations

import torch


def window_visibility(
    q_slots: torch.Tensor,
    kv_slots: torch.Tensor,
    kv_valid: torch.Tensor,
    kv_sink: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Which cached keys each query may attend to.

    Args:
        q_slots (`torch.LongTensor` of shape `[q]`):
            Absolute positions of the queries.
        kv_slots (`torch.LongTensor` of shape `[B, K]`):
            Absolute position of each key in the order the cache returns them; `-1` for an empty entry.
        kv_valid (`torch.BoolTensor` of shape `[B, K]`):
            `False` for empty entries, padding tokens and entries that duplicate another entry.
        kv_sink (`torch.BoolTensor` of shape `[B, K]`):
            `True` where the key is one of the sequence's sink tokens.
        window (`int`):
            How many of the most recent positions (the query's own included) a query sees.

    Returns:
        `torch.BoolTensor` of shape `[B, q, K]`: `True` where the query attends to the key.
    """
    i = q_slots.view(1, -1, 1)  # [1, q, 1]
    j = kv_slots.unsqueeze(1)  # [B, 1, K]
    # comparisons only: no [B, q, K] integer temporaries on long prompts
    in_band = j > (i - window)
    return (j <= i) & (in_band | kv_sink.unsqueeze(1)) & kv_valid.unsqueeze(1)


def window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention restricted to `visible`, computed in float32.

    Args:
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): Query states.
        key (`torch.Tensor` of shape `[B, Hkv, K, D]`): Key states; `Hq` must be a multiple of `Hkv` (GQA).
        value (`torch.Tensor` of shape `[B, Hkv, K, Dv]`): Value states.
        visible (`torch.BoolTensor` of shape `[B, q, K]`): Output of [`window_visibility`].
        scaling (`float`): Multiplier of the dot products, usually `D ** -0.5`.
        softcap (`float`, *optional*): Logit soft-capping (Gemma 2), `softcap * tanh(logits / softcap)`.

    Returns:
        `torch.Tensor` of shape `[B, Hq, q, Dv]` in the dtype of `query`. A query that sees no key gets zeros.
    """
    groups = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(groups, dim=1)  # [B, Hq, K, D]
    v = value.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling  # [B, Hq, q, K]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    mask = visible.unsqueeze(1)  # [B, 1, q, K]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows without any visible key
    return torch.matmul(probs, v).to(query.dtype)
