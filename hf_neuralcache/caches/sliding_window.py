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

from .base import AttentionState, BatchOps, Layout, NeuralCache, Option, Step, check_options, check_sinks_fit, compiling

__all__ = ["SinkWindowLayer", "SlidingWindowKVCache"]


class SinkWindowLayer(BatchOps, CacheLayerMixin):
    """One layer of [`SlidingWindowKVCache`]: attention sinks plus a ring buffer of the most recent tokens.

    The state has a fixed shape from the first `update` on: keys and values `[B, H, sink_tokens + window, D]`, the
    position table `slots` `[B, sink_tokens + window]` (the position each entry holds, `-1` when empty or padding)
    and the 0-d `length` tensor. A one-token forward (the decode step) reads and writes them with tensor ops only,
    which is what makes the layer compileable.

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

    is_compileable = True
    is_croppable = True

    def __init__(self, window: int, sink_tokens: int, is_sliding: bool = False, max_rollback: int = 256):
        super().__init__()
        self.window = window
        self.sink_tokens = sink_tokens
        self.max_rollback = max_rollback
        self.is_sliding = is_sliding
        self.capacity = window  # ring entries, allocated at once: a fixed shape
        self._seen = 0  # Python mirror of `length`; None after a compiled step advanced `length`
        self.length: torch.Tensor | None = None  # 0-d long: tokens written so far, the absolute slots 0 .. seen - 1
        self.slots: torch.Tensor | None = None  # [B, S + W] long: position held by each entry, -1 = none or padding
        self.sinks_full = sink_tokens == 0
        self.record_past = False
        self.journal: tuple | None = None  # (first slot, keys, values, slots) evicted

    @property
    def policy(self) -> tuple[int, int]:
        return self.window, self.sink_tokens

    @property
    def seen(self) -> int:
        """Tokens written so far, as a Python int (read from `length` once after compiled decode steps)."""
        if self._seen is None:
            self._seen = int(self.length)
        return self._seen

    @property
    def sink_slots(self) -> torch.Tensor | None:
        """`[B, S]`: the positions of the sinks, `-1` where a sequence has no such sink yet (a view of `slots`)."""
        return None if self.slots is None else self.slots[:, : self.sink_tokens]

    def _set_seen(self, seen: int) -> None:
        self._seen = seen
        self.length.fill_(seen)

    # ---- state ----------------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, head_dim = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        size = self.sink_tokens + self.window
        self.keys = key_states.new_zeros((batch, heads, size, head_dim))  # finite: masked entries still enter QK^T
        self.values = value_states.new_zeros((batch, value_states.shape[1], size, value_states.shape[-1]))
        self.slots = torch.full((batch, size), -1, dtype=torch.long, device=self.device)
        self.length = torch.zeros((), dtype=torch.long, device=self.device)
        self._seen = 0
        self._mark_static()
        self.is_initialized = True

    def _mark_static(self) -> None:
        """Fixed addresses for the state a compiled (CUDA-graph) decode step mutates in place, as StaticLayer does."""
        if not compiling():
            for tensor in (self.keys, self.values, self.slots, self.length):
                torch._dynamo.mark_static_address(tensor)

    # ---- the layout of what `update` returns ----------------------------------------------------------------------
    def layout(self, step: Step, batch_size: int, device: torch.device) -> Layout:
        """Where the keys that `update` returns for `step` come from, and which ones each query sees.

        One new token is written first and the buffer itself is returned; several new tokens are returned after
        the buffer as it was (the first ones may need entries the last ones evict).
        """
        cached = step.layouts.get(self.policy)
        if cached is not None:
            return cached
        if step.q_length == 1:
            layout = self._decode_layout(step, batch_size, device)
        else:
            layout = self._chunk_layout(step, batch_size, device)
        step.layouts[self.policy] = layout
        return layout

    def _decode_layout(self, step: Step, batch_size: int, device: torch.device) -> Layout:
        """The layout after writing one token, from tensors only: `slots` is the position table after the write."""
        sinks, window = self.sink_tokens, self.window
        if self.is_initialized:
            table, position = self.slots, self.length
        else:  # first forward: no state yet
            table = torch.full((batch_size, sinks + window), -1, dtype=torch.long, device=device)
            position = torch.zeros((), dtype=torch.long, device=device)
        entry = torch.arange(sinks + window, device=device)
        new = position.expand(batch_size)  # [B]: the new token's position, -1 if it is padding
        if step.new_real is not None:
            new = torch.where(step.new_real.to(device), new, -1)
        slots = torch.where(entry == sinks + position % window, new.unsqueeze(1), table)  # [B, S + W]
        if sinks:
            sink_slots, ring = slots[:, :sinks], slots[:, sinks:]
            filled = (sink_slots >= 0).sum(-1, keepdim=True)  # [B, 1]: sinks are filled in order
            joins = (entry[:sinks] == filled) & (new.unsqueeze(1) >= 0)  # the new token becomes a sink
            sink_slots = torch.where(joins, position, sink_slots)
            slots = torch.cat([sink_slots, ring], 1)
            recent_sink = (ring.unsqueeze(-1) == sink_slots.unsqueeze(1)).any(-1)
            sink = torch.cat([torch.ones_like(sink_slots, dtype=torch.bool), recent_sink], 1)
        else:
            sink = torch.zeros_like(slots, dtype=torch.bool)
        # a sink still inside the recent range is also in the ring: count it once, there
        duplicate = (entry < sinks) & (slots > position - window)
        valid = (slots >= 0) & ~duplicate
        return Layout(slots, valid, sink, step.q_slots.to(device), window)

    def _chunk_layout(self, step: Step, batch_size: int, device: torch.device) -> Layout:
        """The layout of several new tokens: the buffer as it was, then the new keys."""
        seen, q = step.seen, step.q_length
        ranks = step.ranks(batch_size, device) if not self.sinks_full else None
        new_slots = torch.arange(seen, seen + q, device=device).expand(batch_size, -1)
        new_sink = ranks < self.sink_tokens if ranks is not None else torch.zeros_like(new_slots, dtype=torch.bool)
        if seen == 0:  # nothing held yet: the new keys alone
            return Layout(new_slots, step.real(new_slots), new_sink, step.q_slots.to(device), self.window)
        sink_slots, ring = self.sink_slots, self.slots[:, self.sink_tokens :]
        recent_sink = (ring.unsqueeze(-1) == sink_slots.unsqueeze(1)).any(-1)
        slots = torch.cat([sink_slots, ring, new_slots], 1)
        sink = torch.cat([torch.ones_like(sink_slots, dtype=torch.bool), recent_sink, new_sink], 1)
        is_sink_part = torch.arange(slots.shape[1], device=device) < self.sink_tokens
        duplicate = is_sink_part & (slots >= max(0, seen - self.window))
        valid = (slots >= 0) & ~duplicate & step.real(slots)
        return Layout(slots, valid, sink, step.q_slots.to(device), self.window)

    # ---- writing --------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step | None = None, **kwargs):
        """Write `key_states`/`value_states` (`[B, H, q, D]`) and return the keys and values to attend to."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if step is None:  # used outside a NeuralCache: no padding information
            step = Step(self.length.clone() if q == 1 else self.seen, q, -1, None)
        layout = self.layout(step, key_states.shape[0], key_states.device)
        if q == 1:
            self._write_one(key_states, value_states, layout)
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

    def _write_one(self, key_states: torch.Tensor, value_states: torch.Tensor, layout: Layout) -> None:
        """The decode step: tensor ops on the fixed-shape state, in place (no Python that depends on the data)."""
        sinks = self.sink_tokens
        if self.record_past and self.max_rollback and not compiling() and self.seen >= self.window:
            self._journal_evicted(self.seen - self.window, self.seen - self.window + 1, key_states, value_states)
        entry = (sinks + self.length % self.window).view(1)
        self.keys.index_copy_(2, entry, key_states)
        self.values.index_copy_(2, entry, value_states)
        if not self.sinks_full:  # the new token may become a sink
            joins = (layout.slots[:, :sinks] != self.slots[:, :sinks])[:, None, :, None]  # [B, 1, S, 1]
            self.keys[:, :, :sinks] = torch.where(joins, key_states, self.keys[:, :, :sinks])
            self.values[:, :, :sinks] = torch.where(joins, value_states, self.values[:, :, :sinks])
        self.slots.copy_(layout.slots)
        self.length.add_(1)
        if compiling():
            self._seen = None  # read back from `length` when eager code needs it
        else:
            self._seen += 1
            if not self.sinks_full:
                self.sinks_full = bool((self.sink_slots >= 0).all())

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step) -> None:
        seen, q, sinks = self.seen, key_states.shape[-2], self.sink_tokens
        if not self.sinks_full:
            ranks = step.ranks(key_states.shape[0], key_states.device).to(key_states.device)
            rows, cols = (ranks < sinks).nonzero(as_tuple=True)
            if rows.numel():
                pos = ranks[rows, cols]
                self.keys[rows, :, pos] = key_states[rows, :, cols]
                self.values[rows, :, pos] = value_states[rows, :, cols]
                self.slots[rows, pos] = seen + cols
            self.sinks_full = bool((self.sink_slots >= 0).all())
        after = seen + q
        evict_from, evict_to = max(0, seen - self.window), max(0, after - self.window)
        if self.record_past and self.max_rollback and evict_to > evict_from:
            self._journal_evicted(evict_from, evict_to, key_states, value_states, step)
        kept = min(q, self.window)
        positions = torch.arange(after - kept, after, device=self.keys.device)
        ring_index = sinks + positions % self.window
        self.keys.index_copy_(2, ring_index, key_states[:, :, q - kept :])
        self.values.index_copy_(2, ring_index, value_states[:, :, q - kept :])
        held = positions.expand(key_states.shape[0], -1)
        self.slots.index_copy_(1, ring_index, torch.where(step.real(held), held, -1))
        self._set_seen(after)

    def _journal_evicted(
        self, start: int, stop: int, key_states: torch.Tensor, value_states: torch.Tensor, step: Step | None = None
    ) -> None:
        """Save the entries with slots `start .. stop - 1`, about to leave the window, for `crop`.

        A crop of n tokens restores at most the n latest evictions, so only the last `max_rollback` are kept.
        """
        if stop - start >= self.max_rollback:  # everything journaled before is older still
            start, self.journal = stop - self.max_rollback, None
        old = torch.arange(start, max(start, min(stop, self.seen)), device=self.keys.device)  # still in the ring
        index = self.sink_tokens + old % self.window
        parts_k, parts_v = [self.keys.index_select(2, index)], [self.values.index_select(2, index)]
        parts_s = [self.slots.index_select(1, index)]
        if stop > self.seen:  # new tokens that never enter the ring
            parts_k.append(key_states[:, :, max(0, start - self.seen) : stop - self.seen])
            parts_v.append(value_states[:, :, max(0, start - self.seen) : stop - self.seen])
            through = torch.arange(max(start, self.seen), stop, device=self.keys.device).expand(self.slots.shape[0], -1)
            parts_s.append(torch.where(step.real(through), through, -1))
        if self.journal is None:
            first, keys, values, slots = start, torch.cat(parts_k, 2), torch.cat(parts_v, 2), torch.cat(parts_s, 1)
        else:
            first, keys, values, slots = self.journal
            keys, values = torch.cat([keys, *parts_k], 2), torch.cat([values, *parts_v], 2)
            slots = torch.cat([slots, *parts_s], 1)
        drop = keys.shape[2] - self.max_rollback
        if drop > 0:
            first, keys, values, slots = first + drop, keys[:, :, drop:], values[:, :, drop:], slots[:, drop:]
        self.journal = (first, keys, values, slots)

    # ---- rollback and batch operations ----------------------------------------------------------------------------
    def activate_past_recording(self, **kwargs) -> None:
        """Journal evicted entries until the next `crop`, so that `crop` can restore them (not under compile).
        `kwargs` (transformers >= 5.25 passes `recurrent_states_to_keep`, for linear-attention layers) do not apply:
        the journal is bounded by `max_rollback`."""
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
        first = self.journal[0] if self.journal is not None else None
        if restore_to > restore_from and (first is None or restore_from < first):
            raise RuntimeError(
                f"Cannot remove {-tokens_to_remove} tokens: the window of {self.window} tokens has moved past "
                "positions that are no longer held. Call `cache.activate_past_recording()` before the forward "
                "passes you may want to roll back (generate does this for assisted decoding); it keeps the "
                f"last max_rollback={self.max_rollback} evicted tokens (a cache_config option)."
            )
        self.slots.masked_fill_(self.slots >= target, -1)  # entries of removed tokens, sinks included
        if restore_to > restore_from:
            _, keys, values, slots = self.journal
            positions = torch.arange(restore_from, restore_to, device=self.keys.device)
            index = self.sink_tokens + positions % self.window
            self.keys.index_copy_(2, index, keys[:, :, positions - first])
            self.values.index_copy_(2, index, values[:, :, positions - first])
            self.slots.index_copy_(1, index, slots[:, positions - first])
        self.sinks_full = bool((self.sink_slots >= 0).all())
        self._set_seen(target)
        self.journal = None

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values, self.slots = fn(self.keys), fn(self.values), fn(self.slots)
        if self.journal is not None:
            self.journal = (self.journal[0], *(fn(t) for t in self.journal[1:]))
        self._mark_static()

    def reset(self) -> None:
        self.keys = self.values = self.slots = self.length = self.journal = None
        self._seen = 0
        self.sinks_full = self.sink_tokens == 0
        self.is_initialized = False

    # ---- sizes ----------------------------------------------------------------------------------------------------
    def get_seq_length(self) -> int | torch.Tensor:
        """Tokens written so far: an int, or under torch.compile the 0-d `length` tensor (as StaticLayer does)."""
        if not self.is_initialized:
            return 0
        return self.length if compiling() else self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.seen == 0 and query_length > 1:
            return query_length, 0
        return self.sink_tokens + self.window + (query_length if query_length > 1 else 0), 0

    def memory_bytes(self) -> int:
        """Bytes held by this layer: keys, values, the position table and the rollback journal."""
        tensors = [self.keys, self.values, self.slots]
        if self.journal is not None:
            tensors += list(self.journal[1:])
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def __repr__(self):
        seen = self.seen if self.is_initialized else 0
        return f"SinkWindowLayer(window={self.window}, sink_tokens={self.sink_tokens}, seen={seen})"


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
    >>> from hf_neuralcache import CACHE_KWARG  # "cache" (transformers >= 5.24) or "past_key_values"
    >>> from hf_neuralcache.models import tiny_model
    >>> model = tiny_model("llama")
    >>> cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=8, sink_tokens=2)
    >>> out = model(torch.arange(20).unsqueeze(0), **{CACHE_KWARG: cache})
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
        check_sinks_fit(self.cache_name, window, sink_tokens)
        self.window, self.sink_tokens = window, sink_tokens
        layers = []
        for layer_type, native_window in decoder_layer_types(config, self.cache_name):
            sliding = layer_type == "sliding_attention"
            if sliding and native_window <= window:
                layers.append(SinkWindowLayer(native_window, 0, is_sliding=True, max_rollback=max_rollback))
            else:
                layers.append(SinkWindowLayer(window, sink_tokens, is_sliding=sliding, max_rollback=max_rollback))
        super().__init__(layers)
