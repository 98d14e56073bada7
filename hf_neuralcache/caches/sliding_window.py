"""`sliding_window_kv`: keep the first `sink_tokens` tokens and the last `window` tokens of every layer.

Per layer and sequence the cache holds two parts in one buffer `[B, H, sink_tokens + window, D]`:

    | sinks: the sequence's first `sink_tokens` real tokens | ring: the last `window` tokens, slot % window |

A query at position `i` attends to the sinks and to the positions `i - window + 1 .. i` (StreamingLLM).
Keys keep the RoPE positions they were computed with: nothing is re-rotated, so positions keep growing past the
window (and past the model's trained length on very long runs).

Rollback: while past recording is on (transformers turns it on for assisted decoding), every entry the ring
evicts goes to a journal until the next `crop`, so `crop(-n)` restores the window exactly. Without recording,
`crop` works until the first eviction and then raises.
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import CacheLayerMixin

from .base import AttentionState, Layout, NeuralCache, Option, Step, check_options

__all__ = ["SinkWindowLayer", "SlidingWindowKVCache"]


class SinkWindowLayer(CacheLayerMixin):
    """One layer of [`SlidingWindowKVCache`]: attention sinks plus a ring buffer of the most recent tokens.

    Args:
        window (`int`):
            Number of most recent positions a query sees, its own included.
        sink_tokens (`int`):
            Number of first real tokens of each sequence that every query keeps seeing.
        is_sliding (`bool`, *optional*, defaults to `False`):
            `True` for a layer that the model itself defines as sliding-window; transformers builds a separate mask
            for those.
        max_rollback (`int`, *optional*, defaults to 256):
            While past recording is on, how many evicted entries are kept so that `crop` can restore them.
    """

    is_compileable = False
    is_croppable = True

    def __init__(self, window: int, sink_tokens: int, is_sliding: bool = False, max_rollback: int = 256):
        super().__init__()
        self.window = window
        self.sink_tokens = sink_tokens
        self.max_rollback = max_rollback
        self.is_sliding = is_sliding
        self.seen = 0  # tokens written so far: the absolute slots 0 .. seen - 1
        self.capacity = 0  # ring entries allocated, grows up to `window`
        self.sink_slots: torch.Tensor | None = None  # [B, S], -1 where no sink yet
        self.sinks_full = sink_tokens == 0
        self.record_past = False
        self.journal: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (first slot, keys, values) evicted

    @property
    def policy(self) -> tuple[int, int]:
        return self.window, self.sink_tokens

    # ---- state ----------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(
            (batch, heads, self.sink_tokens, head_dim)
        )  # finite: masked entries still enter QK^T
        self.values = value_states.new_zeros((batch, value_states.shape[1], self.sink_tokens, value_states.shape[-1]))
        self.sink_slots = torch.full((batch, self.sink_tokens), -1, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def _capacity_for(self, needed: int) -> int:
        """Ring entries allocated once `needed` tokens are written: doubling, at most `window`."""
        if needed <= self.capacity:
            return self.capacity
        return min(self.window, max(needed, 2 * self.capacity))

    def _grow(self, needed: int) -> None:
        """Make room for `needed` ring entries (at most `window`), keeping what is there."""
        new_capacity = self._capacity_for(needed)
        if new_capacity == self.capacity:
            return
        pad = new_capacity - self.capacity
        self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], pad, self.keys.shape[-1])], 2)
        self.values = torch.cat(
            [self.values, self.values.new_zeros(*self.values.shape[:2], pad, self.values.shape[-1])], 2
        )
        self.capacity = new_capacity

    # ---- the layout of what `update` returns ----------------------------------------------------------------------
    def layout(self, step: Step, batch_size: int, device: torch.device) -> Layout:
        """Where the keys that `update` returns for `step` come from, and which ones each query sees.

        One new token is written first and the buffer itself is returned; several new tokens are returned after
        the buffer as it was (the first ones may need entries the last ones evict).
        """
        cached = step.layouts.get(self.policy)
        if cached is not None:
            return cached
        seen, q = step.seen, step.q_length
        if self.sink_slots is None:  # first forward: no state yet
            sink_slots = torch.full((batch_size, self.sink_tokens), -1, dtype=torch.long, device=device)
            capacity = 0
        else:
            sink_slots, capacity = self.sink_slots, self.capacity
        ranks = step.ranks(batch_size, device) if not self.sinks_full else None
        new_slots = torch.arange(seen, seen + q, device=device).expand(batch_size, -1)
        if q == 1:
            after = seen + 1
            if ranks is not None:  # the new token may become a sink
                sink_slots = sink_slots.clone()
                rows = (ranks[:, 0] < self.sink_tokens).nonzero().flatten()
                sink_slots[rows, ranks[rows, 0]] = seen
            capacity = self._capacity_for(after)
            ring = self._slots_for(capacity, after, device).expand(batch_size, -1)
            lowest_recent = max(0, after - self.window)
            recent_sink = (ring.unsqueeze(-1) == sink_slots.unsqueeze(1)).any(-1)
            slots = torch.cat([sink_slots, ring], 1)
            sink = torch.cat([torch.ones_like(sink_slots, dtype=torch.bool), recent_sink], 1)
        elif seen == 0:  # nothing held yet: the new keys alone
            new_sink = ranks < self.sink_tokens if ranks is not None else torch.zeros_like(new_slots, dtype=torch.bool)
            layout = Layout(new_slots, step.real(new_slots), new_sink, step.q_slots.to(device), self.window)
            step.layouts[self.policy] = layout
            return layout
        else:
            ring = self._slots_for(capacity, seen, device).expand(batch_size, -1)
            lowest_recent = max(0, seen - self.window)
            recent_sink = (ring.unsqueeze(-1) == sink_slots.unsqueeze(1)).any(-1)
            new_sink = ranks < self.sink_tokens if ranks is not None else torch.zeros_like(new_slots, dtype=torch.bool)
            slots = torch.cat([sink_slots, ring, new_slots], 1)
            sink = torch.cat([torch.ones_like(sink_slots, dtype=torch.bool), recent_sink, new_sink], 1)
        is_sink_part = torch.arange(slots.shape[1], device=device) < self.sink_tokens
        # a sink still inside the recent range is also in the ring: count it once, there
        duplicate = is_sink_part & (slots >= lowest_recent)
        valid = (slots >= 0) & ~duplicate & step.real(slots)
        layout = Layout(slots, valid, sink, step.q_slots.to(device), self.window)
        step.layouts[self.policy] = layout
        return layout

    def _slots_for(self, capacity: int, seen: int, device: torch.device) -> torch.Tensor:
        r = torch.arange(capacity, device=device)
        held = r + self.window * torch.div(seen - 1 - r, self.window, rounding_mode="floor")
        return torch.where(r < seen, held, -1)

    # ---- writing --------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step | None = None, **kwargs):
        """Write `key_states`/`value_states` (`[B, H, q, D]`) and return the keys and values to attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if step is None:  # used outside a NeuralCache: no padding information
            step = Step(self.seen, q, -1, None)
        layout = self.layout(step, key_states.shape[0], key_states.device)
        if q == 1:
            self._write(key_states, value_states, step)
            keys, values = self.keys, self.values
        elif self.seen == 0:
            keys, values = key_states, value_states
            self._write(key_states, value_states, step)
        else:
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            self._write(key_states, value_states, step)
        keys._neuralcache_state = AttentionState(weakref.ref(self), layout, step)
        return keys, values

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step) -> None:
        seen, q, sinks = self.seen, key_states.shape[-2], self.sink_tokens
        if not self.sinks_full:
            ranks = step.ranks(key_states.shape[0], key_states.device).to(key_states.device)
            rows, cols = (ranks < sinks).nonzero(as_tuple=True)
            if rows.numel():
                pos = ranks[rows, cols]
                self.keys[rows, :, pos] = key_states[rows, :, cols]
                self.values[rows, :, pos] = value_states[rows, :, cols]
                self.sink_slots[rows, pos] = seen + cols
            self.sinks_full = bool((self.sink_slots >= 0).all())
        after = seen + q
        self._grow(after)
        evict_from, evict_to = max(0, seen - self.window), max(0, after - self.window)
        if self.record_past and self.max_rollback and evict_to > evict_from:
            self._journal_evicted(evict_from, evict_to, key_states, value_states)
        kept = min(q, self.window)
        ring_index = sinks + torch.arange(after - kept, after, device=self.keys.device) % self.window
        self.keys.index_copy_(2, ring_index, key_states[:, :, q - kept :])
        self.values.index_copy_(2, ring_index, value_states[:, :, q - kept :])
        self.seen = after

    def _journal_evicted(self, start: int, stop: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Save the entries with slots `start .. stop - 1`, about to leave the window, for `crop`.

        A crop of n tokens restores at most the n latest evictions, so only the last `max_rollback` are kept.
        """
        if stop - start >= self.max_rollback:  # everything journaled before is older still
            start, self.journal = stop - self.max_rollback, None
        old = torch.arange(start, max(start, min(stop, self.seen)), device=self.keys.device)  # still in the ring
        parts_k = [self.keys.index_select(2, self.sink_tokens + old % self.window)]
        parts_v = [self.values.index_select(2, self.sink_tokens + old % self.window)]
        if stop > self.seen:  # new tokens that never enter the ring
            parts_k.append(key_states[:, :, max(0, start - self.seen) : stop - self.seen])
            parts_v.append(value_states[:, :, max(0, start - self.seen) : stop - self.seen])
        if self.journal is None:
            first, keys, values = start, torch.cat(parts_k, 2), torch.cat(parts_v, 2)
        else:
            first, keys, values = self.journal
            keys, values = torch.cat([keys, *parts_k], 2), torch.cat([values, *parts_v], 2)
        drop = keys.shape[2] - self.max_rollback
        if drop > 0:
            first, keys, values = first + drop, keys[:, :, drop:], values[:, :, drop:]
        self.journal = (first, keys, values)

    # ---- rollback and batch operations ----------------------------------------------------------------------------
    def activate_past_recording(self) -> None:
        """Journal evicted entries until the next `crop`, so that `crop` can restore them."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens, restoring the entries they had evicted."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if not self.is_initialized or tokens_to_remove == 0:
            self.journal = None
            return
        seen, target = self.seen, max(0, self.seen + tokens_to_remove)
        restore_from, restore_to = max(0, target - self.window), max(0, min(target, seen - self.window))
        if restore_to > restore_from:
            first = self.journal[0] if self.journal is not None else None
            if first is None or restore_from < first:
                raise RuntimeError(
                    f"Cannot remove {-tokens_to_remove} tokens: the window of {self.window} tokens has moved past "
                    "positions that are no longer held. Call `cache.activate_past_recording()` before the forward "
                    "passes you may want to roll back (generate does this for assisted decoding); it keeps the "
                    f"last max_rollback={self.max_rollback} evicted tokens (a cache_config option)."
                )
            _, keys, values = self.journal
            slots = torch.arange(restore_from, restore_to, device=self.keys.device)
            index = self.sink_tokens + slots % self.window
            self.keys.index_copy_(2, index, keys[:, :, slots - first])
            self.values.index_copy_(2, index, values[:, :, slots - first])
        self.sink_slots.masked_fill_(self.sink_slots >= target, -1)
        self.sinks_full = bool((self.sink_slots >= 0).all())
        self.seen = target
        self.journal = None

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values, self.sink_slots = fn(self.keys), fn(self.values), fn(self.sink_slots)
        if self.journal is not None:
            self.journal = (self.journal[0], fn(self.journal[1]), fn(self.journal[2]))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the sequences for beam search."""
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def reset(self) -> None:
        self.keys = self.values = self.sink_slots = self.journal = None
        self.seen, self.capacity = 0, 0
        self.sinks_full = self.sink_tokens == 0
        self.is_initialized = False

    # ---- sizes ----------------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.seen == 0 and query_length > 1:
            return query_length, 0
        ring = self._capacity_for(self.seen + 1) if query_length == 1 else self.capacity
        return self.sink_tokens + ring + (query_length if query_length > 1 else 0), 0

    def memory_bytes(self) -> int:
        """Bytes held by this layer: keys, values, sink positions and the rollback journal."""
        tensors = [self.keys, self.values, self.sink_slots]
        if self.journal is not None:
            tensors += list(self.journal[1:])
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __repr__(self):
        return f"SinkWindowLayer(window={self.window}, sink_tokens={self.sink_tokens}, seen={self.seen})"


class SlidingWindowKVCache(NeuralCache):
    """A KV cache with attention sinks and a sliding window: bounded memory on any decoder-only model.

    Every full-attention layer keeps the first `sink_tokens` real tokens of each sequence and its last `window`
    tokens (StreamingLLM). Layers the model already defines as sliding-window keep their own trained window
    (without sinks) when it is not wider than `window`; when it is wider they are narrowed to `window` with sinks,
    like the full-attention layers, so that `window` bounds every layer.

    With `window` at least the sequence length the cache is exact (the same outputs as `DynamicCache`).

    Args:
        config (`PreTrainedConfig`):
            The model's config; its text (decoder) config gives the layers and their types.
        window (`int`, *optional*, defaults to 1024):
            Number of most recent positions each query attends to, its own included.
        sink_tokens (`int`, *optional*, defaults to 4):
            Number of first tokens of each sequence that stay visible to every query.
        max_rollback (`int`, *optional*, defaults to 256):
            While past recording is on (assisted decoding), the most tokens one `crop` can remove once they have
            pushed others out of the window. Bounds the extra memory that recording costs.

    Example:

    ```python
    >>> import torch
    >>> import hf_neuralcache
    >>> from hf_neuralcache.models import tiny_model
    >>> model = tiny_model("llama")
    >>> cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=8, sink_tokens=2)
    >>> out = model(torch.arange(20).unsqueeze(0), past_key_values=cache)
    >>> cache.get_seq_length(), cache.layers[0].capacity
    (20, 8)
    ```
    """

    cache_name = "sliding_window_kv"
    options = {
        "window": Option(int, 1024, lambda v: v >= 1, "an int >= 1", "Most recent positions each query sees."),
        "sink_tokens": Option(
            int, 4, lambda v: v >= 0, "an int >= 0", "First tokens of each sequence that stay visible."
        ),
        "max_rollback": Option(
            int, 256, lambda v: v >= 0, "an int >= 0", "Evicted tokens kept for `crop` while recording the past."
        ),
    }

    def __init__(self, config, window: int = 1024, sink_tokens: int = 4, max_rollback: int = 256):
        from ..registry import decoder_layer_types

        given = {"window": window, "sink_tokens": sink_tokens, "max_rollback": max_rollback}
        check_options(self.cache_name, self.options, given)  # also when constructed directly, not by name
        self.window, self.sink_tokens = window, sink_tokens
        layers = []
        for layer_type, native_window in decoder_layer_types(config, self.cache_name):
            sliding = layer_type == "sliding_attention"
            if sliding and native_window <= window:
                layers.append(SinkWindowLayer(native_window, 0, is_sliding=True, max_rollback=max_rollback))
            else:
                layers.append(SinkWindowLayer(window, sink_tokens, is_sliding=sliding, max_rollback=max_rollback))
        super().__init__(layers)
