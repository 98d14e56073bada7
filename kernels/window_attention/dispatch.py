"""The entry point of window attention over a cache layout: checks the inputs once, then picks the kernel."""

from __future__ import annotations

import torch

from ..dispatch import use_triton
from .naive import window_attention, window_visibility

__all__ = ["attend", "check_layout_inputs"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(name: str, tensor: torch.Tensor, expected: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"expected {name} of shape {expected}, got {tuple(tensor.shape)}")


def check_layout_inputs(query, key, value, slots, valid, sink, q_slots, window) -> None:
    """Raise a `ValueError` ("expected ..., got ...") for inputs [`attend`] and the fused kernels cannot take."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _shape(name, t, "[B, H, n, D]", t.dim() == 4)
    batch, hq, n_q, d = query.shape
    _shape("key", key, f"[{batch}, Hkv, K, {d}] with {hq} % Hkv == 0", key.shape[0] == batch and key.shape[-1] == d)
    _shape("key", key, f"Hkv dividing Hq = {hq}", key.shape[1] > 0 and hq % key.shape[1] == 0)
    _shape("value", value, f"{tuple(key.shape[:3])} + (Dv,)", value.shape[:3] == key.shape[:3])
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"expected query, key and value of one dtype among {DTYPES}, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"expected key and value on {query.device}, got {key.device} and {value.device}")
    if d > 256 or value.shape[-1] > 256:
        raise ValueError(f"expected head dims <= 256, got D={d}, Dv={value.shape[-1]}")
    n_k = key.shape[2]
    for name, t, dtypes in (
        ("slots", slots, (torch.int64, torch.int32)),
        ("valid", valid, (torch.bool,)),
        ("sink", sink, (torch.bool,)),
    ):
        fits = t.dim() == 2 and t.shape[0] in (1, batch) and t.shape[1] == n_k
        _shape(name, t, f"[{batch}, {n_k}] or [1, {n_k}]", fits)
        if t.dtype not in dtypes:
            raise ValueError(f"expected {name} of dtype {dtypes}, got {t.dtype}")
    _shape("q_slots", q_slots, f"[{n_q}]", q_slots.dim() == 1 and q_slots.shape[0] == n_q)
    if q_slots.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expected integer q_slots, got {q_slots.dtype}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"expected window an int >= 1, got {window!r}")


def layout_on(device: torch.device, batch: int, slots, valid, sink, q_slots):
    """The layout tensors on `device`, with a batch of 1 broadcast to `batch` (a stride-0 view, no copy)."""
    move = lambda t: t.to(device, non_blocking=True).expand(batch, -1)  # noqa: E731
    return move(slots), move(valid), move(sink), q_slots.to(device, non_blocking=True)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    sink: torch.Tensor,
    q_slots: torch.Tensor,
    window: int,
    scaling: float,
    softcap: float | None = None,
    return_lse: bool = False,
):
    """Window attention with sinks and GQA over a cache's layout, without a dense mask.

    Query `i` sees key `j` when `slots[j] <= q_slots[i]`, `valid[j]`, and `q_slots[i] - slots[j] < window` or
    `sink[j]` (the rule of [`window_visibility`]). On CUDA tensors (or under `TRITON_INTERPRET=1`) this runs the
    Triton kernels, decode for one query and prefill otherwise (online softmax, float32 accumulation); elsewhere the
    PyTorch reference.

    Args:
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): Query states, float16, bfloat16 or float32.
        key (`torch.Tensor` of shape `[B, Hkv, K, D]`): Key states in the dtype of `query`; `Hkv` divides `Hq`.
        value (`torch.Tensor` of shape `[B, Hkv, K, Dv]`): Value states in the dtype of `query`.
        slots (`torch.LongTensor` of shape `[B, K]`): Absolute position of each key (`-1` for an empty entry).
        valid (`torch.BoolTensor` of shape `[B, K]`): `False` for empty entries and padding.
        sink (`torch.BoolTensor` of shape `[B, K]`): `True` for the sequence's sink tokens.
        q_slots (`torch.LongTensor` of shape `[q]`): Absolute positions of the queries.
        window (`int`): Most recent positions a query sees, its own included.
        scaling (`float`): Multiplier of the dot products.
        softcap (`float`, *optional*): Logit soft-capping, `softcap * tanh(logits / softcap)`.
        return_lse (`bool`, *optional*, defaults to `False`): Also return the log-sum-exp, and `out` in float32.

    Returns:
        `torch.Tensor` `[B, Hq, q, Dv]` in the dtype of `query`, or with `return_lse` `(out, lse)`: float32 `out` and
        `lse` `[B, Hq, q]` (`-inf`, with `out` 0, for a query that sees no key).

    Example:

    ```python
    >>> import torch
    >>> from hf_neuralcache.kernels.window_attention import attend
    >>> q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    >>> slots = torch.arange(6).unsqueeze(0)
    >>> valid, sink = torch.ones(1, 6, dtype=torch.bool), slots == 0
    >>> out, lse = attend(q, k, v, slots, valid, sink, torch.tensor([5]), 3, 8**-0.5, return_lse=True)
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 1, 8]), torch.Size([1, 4, 1]))
    ```
    """
    check_layout_inputs(query, key, value, slots, valid, sink, q_slots, window)
    slots, valid, sink, q_slots = layout_on(query.device, query.shape[0], slots, valid, sink, q_slots)
    if not use_triton(query):
        visible = window_visibility(q_slots, slots, valid, sink, window)
        if return_lse:
            from ..fast_weight.naive import window_attention_lse  # here: fast_weight imports this module

            return window_attention_lse(query, key, value, visible, scaling, softcap)
        return window_attention(query, key, value, visible, scaling, softcap)
    from .decode import decode  # imported on first use: see kernels/dispatch.py
    from .prefill import prefill

    kernel = decode if query.shape[2] == 1 else prefill
    out, lse = kernel(
        query, key, value, slots, valid, sink, q_slots, window, scaling, softcap,
        out_dtype=torch.float32 if return_lse else query.dtype,
    )  # fmt: skip
    return (out, lse) if return_lse else out
