"""Entry points of the training-free memory kernels: check the inputs once, then run Triton or the reference.

Triton runs for CUDA tensors (or under `TRITON_INTERPRET=1`): the `"mean"` and `"moment"` memories, the learned
memory (from its features) and the paper mode's decode step; the `"gaussian"` memory and CPU tensors take the
PyTorch reference in `naive.py`.
"""

from __future__ import annotations

import torch

from ..dispatch import use_triton
from ..window_attention.dispatch import check_layout_inputs, layout_on
from ..window_attention.naive import window_visibility
from . import naive
from .naive import LearnedState, MomentState

__all__ = [
    "fast_weight_decode",
    "learned_decode",
    "learned_prefill",
    "learned_write_features",
    "moment_decode",
    "moment_prefill",
    "moment_write",
]

FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_pairs(state, keys, values, weights, log_decay, max_pairs: int | None = None) -> None:
    """Raise a `ValueError` ("expected ..., got ...") for pairs that do not fit `state` (moments or `A`)."""
    if isinstance(state, MomentState):
        (batch, heads, d), dv, anchor = state.key_sum.shape, state.value_sum.shape[-1], state.count
    else:
        if state.dim() != 4 or state.dtype != torch.float32:
            raise ValueError(f"expected A of shape [B, H, D, Dv] in float32, got {state.dtype} {tuple(state.shape)}")
        (batch, heads, d, dv), anchor = state.shape, state
    if keys.dim() != 4 or keys.shape[:2] != (batch, heads) or keys.shape[-1] != d:
        raise ValueError(f"expected keys of shape [{batch}, {heads}, m, {d}], got {tuple(keys.shape)}")
    m = keys.shape[2]
    if values.shape != (batch, heads, m, dv):
        raise ValueError(f"expected values of shape {(batch, heads, m, dv)}, got {tuple(values.shape)}")
    if weights.shape != (batch, m):
        raise ValueError(f"expected weights of shape {(batch, m)}, got {tuple(weights.shape)}")
    if log_decay.shape != (heads,):
        raise ValueError(f"expected log_decay of shape ({heads},), got {tuple(log_decay.shape)}")
    if max_pairs is not None and m > max_pairs:
        raise ValueError(f"expected at most {max_pairs} evicted pair per decode step, got {m}")
    devices = {t.device for t in (anchor, keys, values, weights, log_decay)}
    if len(devices) != 1:
        raise ValueError(f"expected state, pairs and log_decay on one device, got {sorted(map(str, devices))}")


def _fresh(state: MomentState) -> MomentState:
    """Empty tensors shaped like `state` for a kernel to write into (the journal keeps `state` itself)."""
    empty = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return MomentState(*(None if t is None else empty(t) for t in state))


def _contiguous(state: MomentState) -> MomentState:
    return MomentState(*(None if t is None else t.contiguous() for t in state))


def _check_out(state: MomentState, out: MomentState) -> None:
    """Raise a `ValueError` unless `out` can receive `state`'s moments in place (same shapes, contiguous float32)."""
    for name, a, b in zip(MomentState._fields, state, out, strict=True):
        if (a is None) != (b is None) or (
            a is not None and (b.shape != a.shape or b.dtype != torch.float32 or not b.is_contiguous())
        ):
            got = None if b is None else f"{b.dtype} {tuple(b.shape)} contiguous={b.is_contiguous()}"
            expected = None if a is None else f"float32 {tuple(a.shape)} contiguous"
            raise ValueError(f"expected out.{name} {expected}, got {got}")


def _copy_into(out: MomentState, new: MomentState) -> MomentState:
    for a, b in zip(out, new, strict=True):
        if a is not None and a is not b:
            a.copy_(b)
    return out


def moment_write(
    state: MomentState,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    log_decay: torch.Tensor,
    out: MomentState | None = None,
) -> MomentState:
    """Add `m` evicted pairs to the moments with the weighted-sum scan (equal to `m` token-by-token writes).

    Same contract as [`naive.moment_write`]; runs the chunked Triton kernel (`chunk.py`) for CUDA tensors (or under
    `TRITON_INTERPRET=1`) and the `"mean"`/`"moment"` memories, the reference otherwise.

    Args:
        state (`MomentState`): The moments before the pairs (not modified).
        keys (`torch.Tensor` of shape `[B, H, m, D]`): Evicted keys, oldest first.
        values (`torch.Tensor` of shape `[B, H, m, Dv]`): Evicted values.
        weights (`torch.Tensor` of shape `[B, m]`): 1 for a real pair, 0 for a sink or padding (the decay ticks).
        log_decay (`torch.Tensor` of shape `[H]`): `log(lam)` per head.
        out (`MomentState`, *optional*): Contiguous float32 tensors to write the moments after into; may be `state`
            itself (fixed-shape state updated in place). New tensors when `None`.

    Returns:
        `MomentState`: the moments after the pairs (`out` when given).
    """
    _check_pairs(state, keys, values, weights, log_decay)
    if out is not None:
        _check_out(state, out)
    if keys.shape[2] == 0 or state.key_key is not None or not use_triton(keys):
        new = naive.moment_write(state, keys, values, weights, log_decay)
        return new if out is None else _copy_into(out, new)
    from .chunk import moment_write_chunk  # imported on first use: see kernels/dispatch.py

    state = _contiguous(state)
    return moment_write_chunk(state, keys, values, weights.float(), log_decay.float(), out or _fresh(state))


def moment_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    sink: torch.Tensor,
    q_slots: torch.Tensor,
    window: int,
    scaling: float,
    state: MomentState,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    log_decay: torch.Tensor,
    softcap: float | None = None,
    write: bool = False,
    out: MomentState | None = None,
) -> tuple[torch.Tensor, torch.Tensor, MomentState | None]:
    """One decode step of the training-free Tensor Cache: window attention, memory read and merge in one kernel.

    The memory is read after the pair this step evicts is written (the training-free mode's query sees every
    position `<= t - window` through the memory). On CUDA tensors (or under `TRITON_INTERPRET=1`) with the
    `"mean"` or `"moment"` memory this is one Triton kernel (`fused_recurrent.py`), which also stores the moments
    after the write when `write=True`; otherwise the reference functions of `naive.py`.

    Args:
        query (`torch.Tensor` of shape `[B, Hq, 1, D]`): The step's query.
        key, value, slots, valid, sink, q_slots, window: The window's keys/values and layout, as for
            [`hf_neuralcache.kernels.window_attention.attend`].
        scaling (`float`): Multiplier of the dot products.
        state (`MomentState`): The moments before this step.
        keys (`torch.Tensor` of shape `[B, Hkv, m, D]`), values (`[B, Hkv, m, Dv]`), weights (`[B, m]`): The pair
            this step evicts, `m` 0 or 1.
        log_decay (`torch.Tensor` of shape `[Hkv]`): `log(lam)` per KV head.
        softcap (`float`, *optional*): Logit soft-capping of the window (the memory's estimate ignores it).
        write (`bool`, *optional*, defaults to `False`): Also return the moments after the write.
        out (`MomentState`, *optional*): Contiguous float32 tensors that receive the moments after the write (implies
            `write`); may be `state` itself, updated in place by the same kernel.

    Returns:
        `(out, lse, state_after)`: `out` `[B, Hq, 1, Dv]` float32, `lse` `[B, Hq, 1]`, and the moments after the
        write, in new tensors or `out` (`None` unless `write` or `out`).
    """
    check_layout_inputs(query, key, value, slots, valid, sink, q_slots, window)
    if query.shape[2] != 1:
        raise ValueError(f"expected one query per sequence ([B, Hq, 1, D]), got {tuple(query.shape)}")
    _check_pairs(state, keys, values, weights, log_decay, max_pairs=1)
    if state.key_sum.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"expected a state for {tuple(key.shape[:2])} sequences/heads, got {tuple(state.key_sum.shape[:2])}"
        )
    if out is not None:
        _check_out(state, out)
        write = True
    slots, valid, sink, q_slots = layout_on(query.device, query.shape[0], slots, valid, sink, q_slots)
    m = keys.shape[2]
    if state.key_key is not None or not use_triton(query):
        visible = window_visibility(q_slots, slots, valid, sink, window)
        result, lse = naive.window_attention_lse(query, key, value, visible, scaling, softcap)
        prefix = torch.tensor([m], device=query.device)
        mem, mem_lse = naive.moment_read(state, query, keys, values, weights, prefix, log_decay, scaling)
        result, lse = naive.merge_softmax(result, lse, mem, mem_lse)
        after = (naive.moment_write(state, keys, values, weights, log_decay) if m else state) if write else None
        return result, lse, (after if out is None else _copy_into(out, after))
    from .fused_recurrent import moment_decode_step  # imported on first use: see kernels/dispatch.py

    state = _contiguous(state)
    after = (out or _fresh(state)) if write else None
    result, lse = moment_decode_step(
        query, key, value, slots, valid, sink, q_slots, window, scaling, softcap,
        state, keys, values, weights.float(), log_decay.float(), out_state=after,
    )  # fmt: skip
    return result, lse, after


def moment_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    sink: torch.Tensor,
    q_slots: torch.Tensor,
    window: int,
    scaling: float,
    state: MomentState,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    prefix: torch.Tensor,
    log_decay: torch.Tensor,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of queries of the training-free Tensor Cache: window attention, memory read and merge in one kernel.

    Query `t` reads the memory after the first `prefix[t]` of the chunk's evicted pairs (on top of `state`, the
    moments before the chunk), which makes a chunked prefill equal token-by-token decoding. On CUDA tensors (or
    under `TRITON_INTERPRET=1`) with the `"mean"` or `"moment"` memory this is one Triton kernel (`chunk.py`) that
    never materialises the `[B, Hq, q, m]` weights; otherwise the reference functions of `naive.py`. The write of
    the chunk's pairs is [`moment_write`].

    Args:
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): The chunk's queries.
        key, value, slots, valid, sink, q_slots, window: The window's keys/values and layout, as for
            [`hf_neuralcache.kernels.window_attention.attend`].
        scaling (`float`): Multiplier of the dot products.
        state (`MomentState`): The moments before the chunk.
        keys (`torch.Tensor` of shape `[B, Hkv, m, D]`), values (`[B, Hkv, m, Dv]`), weights (`[B, m]`): The pairs
            the chunk evicts, oldest first.
        prefix (`torch.LongTensor` of shape `[q]`): Pairs of the chunk written when each query reads, `0 .. m`.
        log_decay (`torch.Tensor` of shape `[Hkv]`): `log(lam)` per KV head.
        softcap (`float`, *optional*): Logit soft-capping of the window (the memory's estimate ignores it).

    Returns:
        `(out, lse)`: `out` `[B, Hq, q, Dv]` float32 and `lse` `[B, Hq, q]`.
    """
    check_layout_inputs(query, key, value, slots, valid, sink, q_slots, window)
    _check_pairs(state, keys, values, weights, log_decay)
    if state.key_sum.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"expected a state for {tuple(key.shape[:2])} sequences/heads, got {tuple(state.key_sum.shape[:2])}"
        )
    if prefix.shape != (query.shape[2],) or prefix.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"expected integer prefix of shape ({query.shape[2]},), got {prefix.dtype} {tuple(prefix.shape)}"
        )
    slots, valid, sink, q_slots = layout_on(query.device, query.shape[0], slots, valid, sink, q_slots)
    prefix = prefix.to(query.device)
    if state.key_key is not None or not use_triton(query):
        visible = window_visibility(q_slots, slots, valid, sink, window)
        out, lse = naive.window_attention_lse(query, key, value, visible, scaling, softcap)
        mem, mem_lse = naive.moment_read(state, query, keys, values, weights, prefix, log_decay, scaling)
        return naive.merge_softmax(out, lse, mem, mem_lse)
    from .chunk import moment_prefill_chunk  # imported on first use: see kernels/dispatch.py

    return moment_prefill_chunk(
        query, key, value, slots, valid, sink, q_slots, window, scaling, softcap,
        _contiguous(state), keys, values, weights.float(), prefix, log_decay.float(),
    )  # fmt: skip


def fast_weight_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    sink: torch.Tensor,
    q_slots: torch.Tensor,
    window: int,
    scaling: float,
    state: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    decay: torch.Tensor,
    write_rate: torch.Tensor,
    rule: str,
    softcap: float | None = None,
    write: bool = False,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One decode step of the Tensor Cache paper mode: window attention, the read `r = q A`, and the write.

    The read comes before the write of the pair this step evicts, as in the paper. On CUDA tensors (or under
    `TRITON_INTERPRET=1`) this is one Triton kernel (`paper_recurrent.py`); otherwise the reference functions.

    Args:
        query (`torch.Tensor` of shape `[B, Hq, 1, D]`): The step's query.
        key, value, slots, valid, sink, q_slots, window: The window's keys/values and layout, as for
            [`hf_neuralcache.kernels.window_attention.attend`].
        scaling (`float`): Multiplier of the window's dot products (the read `q A` is raw).
        state (`torch.Tensor` of shape `[B, Hkv, D, Dv]`): `A` before this step, float32.
        keys (`torch.Tensor` of shape `[B, Hkv, m, D]`), values (`[B, Hkv, m, Dv]`), weights (`[B, m]`): The pair
            this step evicts, `m` 0 or 1.
        decay (`torch.Tensor` of shape `[Hkv]`): `lam` per KV head.
        write_rate (`torch.Tensor` of shape `[Hkv]`): `eta` per KV head.
        rule (`str`): `"outer"` or `"delta"`.
        softcap (`float`, *optional*): Logit soft-capping of the window.
        write (`bool`, *optional*, defaults to `False`): Also return `A` after the write.
        out (`torch.Tensor`, *optional*): A contiguous float32 tensor shaped like `state` (or `state` itself) that
            receives `A` after the write (implies `write`).

    Returns:
        `(window_out, r, state_after)`: the window's softmax output and the read, `[B, Hq, 1, Dv]` float32 each, and
        `A` after the write (new tensor or `out`; `None` unless `write` or `out`).
    """
    check_layout_inputs(query, key, value, slots, valid, sink, q_slots, window)
    if query.shape[2] != 1:
        raise ValueError(f"expected one query per sequence ([B, Hq, 1, D]), got {tuple(query.shape)}")
    _check_pairs(state, keys, values, weights, decay, max_pairs=1)
    if state.shape[:2] != key.shape[:2] or write_rate.shape != decay.shape:
        raise ValueError(
            f"expected A for {tuple(key.shape[:2])} sequences/heads and write_rate of shape {tuple(decay.shape)}, "
            f"got {tuple(state.shape[:2])} and {tuple(write_rate.shape)}"
        )
    if rule not in ("outer", "delta"):
        raise ValueError(f"expected rule 'outer' or 'delta', got {rule!r}")
    if out is not None:
        if out.shape != state.shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(
                f"expected out float32 {tuple(state.shape)} contiguous, got {out.dtype} {tuple(out.shape)}"
            )
        write = True
    slots, valid, sink, q_slots = layout_on(query.device, query.shape[0], slots, valid, sink, q_slots)
    if not use_triton(query):
        visible = window_visibility(q_slots, slots, valid, sink, window)
        window_out, _ = naive.window_attention_lse(query, key, value, visible, scaling, softcap)
        before = torch.zeros(1, dtype=torch.long, device=query.device)  # read before this step's pair
        r = naive.fast_weight_read(state, query, keys, values, weights, before, decay, write_rate, rule)
        after = None
        if write:
            after = naive.fast_weight_write(state, keys, values, weights, decay, write_rate, rule)
            after = after if out is None else out.copy_(after)
        return window_out, r, after
    from .paper_recurrent import fast_weight_decode_step  # imported on first use: see kernels/dispatch.py

    state = state.contiguous()
    after = (torch.empty_like(state) if out is None else out) if write else None
    window_out, r = fast_weight_decode_step(
        query, key, value, slots, valid, sink, q_slots, window, scaling, softcap,
        state, keys, values, weights.float(), decay.float(), write_rate.float(), rule, out_state=after,
    )  # fmt: skip
    return window_out, r, after


# ---- learned memory -----------------------------------------------------------------------------------------------
def _check_learned(state, features, values, weights, log_decay, write_rate, max_pairs: int | None = None) -> None:
    """Raise a `ValueError` ("expected ..., got ...") for pairs and rates that do not fit a `LearnedState`."""
    if not isinstance(state, LearnedState):
        raise ValueError(f"expected state a LearnedState, got {type(state).__name__}")
    if state.values.dim() != 4 or state.mass.shape != state.values.shape[:3]:
        raise ValueError(
            f"expected state.values [B, H, 2F, Dv] and state.mass [B, H, 2F], got {tuple(state.values.shape)} and "
            f"{tuple(state.mass.shape)}"
        )
    if state.values.dtype != torch.float32 or state.mass.dtype != torch.float32:
        raise ValueError(f"expected a float32 state, got {state.values.dtype} and {state.mass.dtype}")
    batch, heads, n_features, dv = state.values.shape
    if n_features > 256:
        raise ValueError(f"expected at most 256 features (2F), got {n_features}")
    if features.dim() != 4 or features.shape[:2] != (batch, heads) or features.shape[-1] != n_features:
        raise ValueError(f"expected key features of shape [{batch}, {heads}, m, {n_features}], got "
                         f"{tuple(features.shape)}")  # fmt: skip
    if features.dtype not in FEATURE_DTYPES:
        raise ValueError(f"expected key features of a dtype among {FEATURE_DTYPES}, got {features.dtype}")
    m = features.shape[2]
    if values.shape != (batch, heads, m, dv):
        raise ValueError(f"expected values of shape {(batch, heads, m, dv)}, got {tuple(values.shape)}")
    if weights.shape != (batch, m):
        raise ValueError(f"expected weights of shape {(batch, m)}, got {tuple(weights.shape)}")
    if log_decay.shape != (heads,) or write_rate.shape != (heads,):
        raise ValueError(
            f"expected log_decay and write_rate of shape ({heads},), got {tuple(log_decay.shape)} and "
            f"{tuple(write_rate.shape)}"
        )
    if max_pairs is not None and m > max_pairs:
        raise ValueError(f"expected at most {max_pairs} evicted pair per decode step, got {m}")
    devices = {t.device for t in (state.values, state.mass, features, values, weights, log_decay, write_rate)}
    if len(devices) != 1:
        raise ValueError(f"expected state, pairs and rates on one device, got {sorted(map(str, devices))}")


def _check_learned_read(query, key, state, query_features) -> None:
    """Raise a `ValueError` unless `state` belongs to the window's sequences/heads and `query_features` to `query`."""
    if state.mass.shape[:2] != key.shape[:2]:
        raise ValueError(
            f"expected a state for {tuple(key.shape[:2])} sequences/heads, got {tuple(state.mass.shape[:2])}"
        )
    expected = (*query.shape[:3], state.mass.shape[-1])
    if query_features.shape != expected:
        raise ValueError(f"expected query features of shape {expected}, got {tuple(query_features.shape)}")
    if query_features.dtype not in FEATURE_DTYPES or query_features.device != query.device:
        raise ValueError(
            f"expected query features of a dtype among {FEATURE_DTYPES} on {query.device}, got "
            f"{query_features.dtype} on {query_features.device}"
        )
    if state.mass.device != query.device:
        raise ValueError(f"expected the state on {query.device}, got {state.mass.device}")


def _check_learned_out(state: LearnedState, out: LearnedState) -> None:
    """Raise a `ValueError` unless `out` can receive `state`'s sums in place (same shapes, contiguous float32)."""
    for name, a, b in zip(LearnedState._fields, state, out, strict=True):
        if b.shape != a.shape or b.dtype != torch.float32 or not b.is_contiguous() or b.device != a.device:
            raise ValueError(
                f"expected out.{name} float32 {tuple(a.shape)} contiguous on {a.device}, got {b.dtype} "
                f"{tuple(b.shape)} contiguous={b.is_contiguous()} on {b.device}"
            )


def _learned_fresh(state: LearnedState) -> LearnedState:
    return LearnedState(*(torch.empty_like(t, memory_format=torch.contiguous_format) for t in state))


def _learned_contiguous(state: LearnedState) -> LearnedState:
    return LearnedState(*(t.contiguous() for t in state))


def _learned_copy_into(out: LearnedState, new: LearnedState) -> LearnedState:
    for a, b in zip(out, new, strict=True):
        if a is not b:
            a.copy_(b)
    return out


def learned_write_features(
    state: LearnedState,
    features: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    log_decay: torch.Tensor,
    write_rate: torch.Tensor,
    out: LearnedState | None = None,
) -> LearnedState:
    """Add `m` evicted pairs to the learned memory with the weighted-sum scan (equal to `m` token-by-token writes).

    `x <- lam^m x + eta sum_j lam^(m-1-j) w_j x_j` for `x = phi(k) v^T` and `phi(k)`, the keys' features given
    (`naive.learned_features`), as [`naive.learned_write_features`]. Runs the chunked Triton kernel (`learned.py`)
    for CUDA tensors (or under `TRITON_INTERPRET=1`), the reference otherwise.

    Args:
        state (`LearnedState`): The sums before the pairs (not modified).
        features (`torch.Tensor` of shape `[B, H, m, 2F]`): `phi(k)` of the evicted keys, oldest first.
        values (`torch.Tensor` of shape `[B, H, m, Dv]`): Evicted values.
        weights (`torch.Tensor` of shape `[B, m]`): 1 for a real pair, 0 for a sink or padding (the decay ticks).
        log_decay (`torch.Tensor` of shape `[H]`): `log(lam)` per head.
        write_rate (`torch.Tensor` of shape `[H]`): `eta` per head.
        out (`LearnedState`, *optional*): Contiguous float32 tensors to write the sums after into; may be `state`
            itself (updated in place). New tensors when `None`.

    Returns:
        `LearnedState`: the sums after the pairs (`out` when given).

    Example:

    ```python
    >>> import torch
    >>> from hf_neuralcache.kernels.fast_weight import learned_state, learned_write_features
    >>> state = learned_state(1, 2, 8, 4)  # B=1, Hkv=2, 2F=8, Dv=4
    >>> fk, v = torch.rand(1, 2, 3, 8), torch.randn(1, 2, 3, 4)
    >>> after = learned_write_features(state, fk, v, torch.ones(1, 3), torch.zeros(2), torch.full((2,), 0.5))
    >>> after.values.shape, after.mass.shape
    (torch.Size([1, 2, 8, 4]), torch.Size([1, 2, 8]))
    ```
    """
    _check_learned(state, features, values, weights, log_decay, write_rate)
    if out is not None:
        _check_learned_out(state, out)
    if features.shape[2] == 0 or not use_triton(features):
        new = naive.learned_write_features(state, features, values, weights, log_decay, write_rate)
        return new if out is None else _learned_copy_into(out, new)
    from .learned import learned_write_chunk  # imported on first use: see kernels/dispatch.py

    state = _learned_contiguous(state)
    return learned_write_chunk(
        state, features, values, weights.float(), log_decay.float(), write_rate.float(), out or _learned_fresh(state)
    )


def learned_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    sink: torch.Tensor,
    q_slots: torch.Tensor,
    window: int,
    scaling: float,
    state: LearnedState,
    query_features: torch.Tensor,
    features: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    log_decay: torch.Tensor,
    write_rate: torch.Tensor,
    softcap: float | None = None,
    write: bool = False,
    out: LearnedState | None = None,
) -> tuple[torch.Tensor, torch.Tensor, LearnedState | None]:
    """One decode step of the learned Tensor Cache: window attention, write, memory read and merge in one kernel.

    The pair this step evicts is written first, then `phi(q)` reads the state (`prefix = m` in
    [`naive.learned_read_features`]), merged with the window in one normaliser. On CUDA tensors (or under
    `TRITON_INTERPRET=1`) one Triton kernel (`learned.py`) per `(sequence, KV head)`, which also stores the state
    after the write when `write=True` (once per KV head, whatever the GQA group); otherwise the reference functions.

    Args:
        query (`torch.Tensor` of shape `[B, Hq, 1, D]`): The step's query.
        key, value, slots, valid, sink, q_slots, window: The window's keys/values and layout, as for
            [`hf_neuralcache.kernels.window_attention.attend`].
        scaling (`float`): Multiplier of the window's dot products.
        state (`LearnedState`): The sums before this step.
        query_features (`torch.Tensor` of shape `[B, Hq, 1, 2F]`): `phi(q)` (`naive.learned_features`).
        features (`torch.Tensor` of shape `[B, Hkv, m, 2F]`), values (`[B, Hkv, m, Dv]`), weights (`[B, m]`):
            `phi(k)`, the value and the weight of the pair this step evicts, `m` 0 or 1.
        log_decay (`torch.Tensor` of shape `[Hkv]`), write_rate (`[Hkv]`): `log(lam)` and `eta` per KV head.
        softcap (`float`, *optional*): Logit soft-capping of the window.
        write (`bool`, *optional*, defaults to `False`): Also return the state after the write.
        out (`LearnedState`, *optional*): Contiguous float32 tensors that receive the state after the write (implies
            `write`); may be `state` itself, updated in place by the same kernel.

    Returns:
        `(out, lse, state_after)`: `out` `[B, Hq, 1, Dv]` float32, `lse` `[B, Hq, 1]`, and the state after the
        write, in new tensors or `out` (`None` unless `write` or `out`).
    """
    check_layout_inputs(query, key, value, slots, valid, sink, q_slots, window)
    if query.shape[2] != 1:
        raise ValueError(f"expected one query per sequence ([B, Hq, 1, D]), got {tuple(query.shape)}")
    _check_learned(state, features, values, weights, log_decay, write_rate, max_pairs=1)
    _check_learned_read(query, key, state, query_features)
    if out is not None:
        _check_learned_out(state, out)
        write = True
    slots, valid, sink, q_slots = layout_on(query.device, query.shape[0], slots, valid, sink, q_slots)
    m = features.shape[2]
    if not use_triton(query):
        visible = window_visibility(q_slots, slots, valid, sink, window)
        result, lse = naive.window_attention_lse(query, key, value, visible, scaling, softcap)
        prefix = torch.tensor([m], device=query.device)
        rates = (log_decay, write_rate)
        mem, log_mass = naive.learned_read_features(state, query_features, features, values, weights, prefix, *rates)
        result, lse = naive.merge_softmax(result, lse, mem, lse + log_mass)
        after = None
        if write:
            after = naive.learned_write_features(state, features, values, weights, *rates) if m else state
        return result, lse, (after if out is None else _learned_copy_into(out, after))
    from .learned import learned_decode_step  # imported on first use: see kernels/dispatch.py

    state = _learned_contiguous(state)
    after = (out or _learned_fresh(state)) if write else None
    result, lse = learned_decode_step(
        query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, state, query_features,
        features, values, weights.float(), log_decay.float(), write_rate.float(), out_state=after,
    )  # fmt: skip
    return result, lse, after


def learned_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    valid: torch.Tensor,
    sink: torch.Tensor,
    q_slots: torch.Tensor,
    window: int,
    scaling: float,
    state: LearnedState,
    query_features: torch.Tensor,
    features: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    prefix: torch.Tensor,
    log_decay: torch.Tensor,
    write_rate: torch.Tensor,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of queries of the learned Tensor Cache: window attention, memory read and merge in one kernel.

    Query `t` reads the state after the first `prefix[t]` of the chunk's evicted pairs (on top of `state`, the sums
    before the chunk), which makes a chunked prefill equal token-by-token decoding. On CUDA tensors (or under
    `TRITON_INTERPRET=1`) one Triton kernel (`learned.py`) that never materialises the `[B, Hq, q, m]` weights;
    otherwise the reference functions. The write of the chunk's pairs is [`learned_write_features`].

    Args:
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): The chunk's queries.
        key, value, slots, valid, sink, q_slots, window: The window's keys/values and layout, as for
            [`hf_neuralcache.kernels.window_attention.attend`].
        scaling (`float`): Multiplier of the window's dot products.
        state (`LearnedState`): The sums before the chunk.
        query_features (`torch.Tensor` of shape `[B, Hq, q, 2F]`): `phi(q)` of the chunk's queries.
        features (`torch.Tensor` of shape `[B, Hkv, m, 2F]`), values (`[B, Hkv, m, Dv]`), weights (`[B, m]`):
            `phi(k)`, values and weights of the pairs the chunk evicts, oldest first.
        prefix (`torch.LongTensor` of shape `[q]`): Pairs of the chunk written when each query reads, `0 .. m`.
        log_decay (`torch.Tensor` of shape `[Hkv]`), write_rate (`[Hkv]`): `log(lam)` and `eta` per KV head.
        softcap (`float`, *optional*): Logit soft-capping of the window.

    Returns:
        `(out, lse)`: `out` `[B, Hq, q, Dv]` float32 and `lse` `[B, Hq, q]`.
    """
    check_layout_inputs(query, key, value, slots, valid, sink, q_slots, window)
    _check_learned(state, features, values, weights, log_decay, write_rate)
    _check_learned_read(query, key, state, query_features)
    if prefix.shape != (query.shape[2],) or prefix.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"expected integer prefix of shape ({query.shape[2]},), got {prefix.dtype} {tuple(prefix.shape)}"
        )
    slots, valid, sink, q_slots = layout_on(query.device, query.shape[0], slots, valid, sink, q_slots)
    prefix = prefix.to(query.device)
    if not use_triton(query):
        visible = window_visibility(q_slots, slots, valid, sink, window)
        out, lse = naive.window_attention_lse(query, key, value, visible, scaling, softcap)
        pairs = (features, values, weights, prefix, log_decay, write_rate)
        mem, log_mass = naive.learned_read_features(state, query_features, *pairs)
        return naive.merge_softmax(out, lse, mem, lse + log_mass)
    from .learned import learned_prefill_chunk  # imported on first use: see kernels/dispatch.py

    return learned_prefill_chunk(
        query, key, value, slots, valid, sink, q_slots, window, scaling, softcap, _learned_contiguous(state),
        query_features, features, values, weights.float(), prefix, log_decay.float(), write_rate.float(),
    )  # fmt: skip
