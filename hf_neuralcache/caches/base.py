"""What every hf_neuralcache cache shares: option checking, the per-forward step, the attention mask and memory.

transformers builds one attention mask per forward from `Cache.get_mask_sizes`, which can only describe a
contiguous range of positions. Our caches return keys in their own order (sinks, a ring, new tokens), so
`hf_neuralcache.registry` routes mask creation for our caches to [`NeuralCache.attention_mask`], which builds the
exact mask from the positions the cache will return. The same information is attached to the key tensor that
`update` returns, which is how the `"neuralcache"` attention function reaches the layer's state (see
[`AttentionState`]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import sdpa_mask

from ..kernels.window_attention import window_visibility

__all__ = ["AttentionState", "BatchOps", "NeuralCache", "Option", "check_options", "check_sinks_fit", "compiling"]

MASK_TAG = "_neuralcache_mask"  # set on the masks our hook builds, so that they pass through it again unchanged


def compiling() -> bool:
    """`True` while torch.compile traces: the decode step then keeps all its state in tensors."""
    return torch.compiler.is_compiling()



class BatchOps:
    """Beam search and batch edits of a layer, all through its `_apply_batch(fn)` (`fn` maps a `[B, ...]` tensor)."""

    def _apply_batch(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the sequences for beam search."""
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

@dataclass(frozen=True)
class Option:
    """One `cache_config` key of a backend: its type, default, the check on its value and what it means."""

    type: type
    default: Any
    check: Callable[[Any], bool]
    allowed: str
    doc: str


def check_options(cache_name: str, spec: dict[str, Option], given: dict[str, Any]) -> dict[str, Any]:
    """Validate `cache_config` for `cache_name` and fill in defaults.

    Raises:
        `ValueError`: naming the bad key or value and what is allowed.
    """
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ValueError(
            f"Unknown cache_config key(s) {unknown} for cache_implementation={cache_name!r}; "
            f"allowed keys: {sorted(spec)}."
        )
    values = {}
    for key, option in spec.items():
        value = given.get(key, option.default)
        # bool is an int subclass: `window=True` is a mistake, not 1
        wrong_type = not isinstance(value, option.type) or (option.type is int and isinstance(value, bool))
        if wrong_type or not option.check(value):
            raise ValueError(
                f"Invalid cache_config[{key!r}] = {value!r} for cache_implementation={cache_name!r}: "
                f"expected {option.allowed}."
            )
        values[key] = value
    return values


def check_sinks_fit(cache_name: str, window: int, sink_tokens: int) -> None:
    """Raise a `ValueError` when `sink_tokens` exceeds `window` (the sinks are a few first tokens kept beside the
    window, as in StreamingLLM's 4 sinks next to a window of hundreds or thousands)."""
    if sink_tokens > window:
        raise ValueError(
            f"Invalid cache_config for cache_implementation={cache_name!r}: sink_tokens={sink_tokens} is larger than "
            f"window={window}; expected sink_tokens <= window (StreamingLLM: 4 sinks beside a window of 256 or more)."
        )


@dataclass
class Layout:
    """Where each key a layer returns in this forward comes from, and which keys each query sees.

    `slots`, `valid` and `sink` are `[B, K]`; `q_slots` is `[q]`. `visible` (`[B, q, K]`) is built on first use:
    a causal prefill that SDPA masks by itself never needs it. (Not a `functools.cached_property`: its lock
    stops torch.compile.)
    """

    slots: torch.Tensor
    valid: torch.Tensor
    sink: torch.Tensor
    q_slots: torch.Tensor
    window: int
    _visible: torch.Tensor | None = None
    overlaid: bool = False  # `visible` carries a model's mask overlay (image tokens): kernels must read `visible`

    @property
    def visible(self) -> torch.Tensor:
        if self._visible is None:
            self._visible = window_visibility(self.q_slots, self.slots, self.valid, self.sink, self.window)
        return self._visible

    def overlay(self, mask_function: Callable) -> torch.Tensor:
        """Apply a transformers mask function (`(batch, head, q_pos, kv_pos) -> bool`, index-based) to `visible`.

        transformers composes a model's own mask as `(causal | or_overlay) & and_overlay` over absolute positions, for
        example bidirectional attention inside an image block (Gemma 3). Keys this cache holds stay visible where that
        function allows them; held keys *after* a query become visible where the function says so.
        """
        batch = self.slots.shape[0]
        device = self.slots.device
        b = torch.arange(batch, device=device).view(-1, 1, 1)  # [B, 1, 1]
        q = self.q_slots.to(device).view(1, -1, 1)  # [1, q, 1]
        k = self.slots.clamp(min=0).unsqueeze(1)  # [B, 1, K]
        allowed = torch.as_tensor(mask_function(b, torch.zeros((), dtype=torch.long, device=device), q, k))
        future = self.valid.unsqueeze(1) & (k > q)  # [B, q, K]
        self._visible = (self.visible | future) & allowed.to(device=device, dtype=torch.bool)
        self.overlaid = True
        return self._visible


@dataclass
class Step:
    """What one forward of the model needs to know, shared by all layers of a cache.

    A one-token forward (the decode step) may get `seen` as a copy of the layers' 0-d `length` tensor and the new
    token's realness as `new_real`: then nothing in it depends on Python ints that change every step, so
    torch.compile traces one graph for all decode steps.
    """

    seen: int | torch.Tensor  # tokens in the cache before this forward
    q_length: int
    version: int
    padding: torch.Tensor | None  # [B, seen + q_length] bool, True = real token; None = no padding
    new_real: torch.Tensor | None = None  # decode step only: [B] bool, is the new token real; None = yes
    layouts: dict = field(default_factory=dict)
    _ranks: torch.Tensor | None = None

    @property
    def q_slots(self) -> torch.Tensor:
        if isinstance(self.seen, torch.Tensor):
            return self.seen.view(1) + torch.arange(self.q_length, device=self.seen.device)
        return torch.arange(self.seen, self.seen + self.q_length)

    def real(self, slots: torch.Tensor) -> torch.Tensor:
        """`[B, K]` bool: is the token at each slot a real token (not padding)? Empty slots (-1) count as real."""
        if self.padding is None:
            return torch.ones(slots.shape, dtype=torch.bool, device=slots.device)
        return self.padding.gather(1, slots.clamp(min=0).to(self.padding.device)).to(slots.device)

    def ranks(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """`[B, q]`: how many real tokens precede each new token in its sequence (a huge number for padding)."""
        if self._ranks is None:
            slots = torch.arange(self.seen, self.seen + self.q_length, device=device)
            if self.padding is None:
                self._ranks = slots.unsqueeze(0).expand(batch_size, -1)
            else:
                pad = self.padding[:, : self.seen + self.q_length].to(device)
                counts = pad.long().cumsum(-1)[:, self.seen :] - 1
                self._ranks = torch.where(pad[:, self.seen :], counts, torch.iinfo(torch.long).max)
        return self._ranks


@dataclass
class AttentionState:
    """Attached to the key tensor a layer's `update` returns, as `key._neuralcache_state`.

    transformers does not pass the cache to attention functions; the key tensor is the one object that travels
    from `Cache.update` to the attention function of the same layer in the same forward. Tagging it keeps the
    hand-over local to that tensor: no global registry, so several models, caches and threads in one process
    never see each other's state, and assisted decoding (two models, two caches) works unchanged.
    """

    layer: Any  # weakref.ref to the layer: the tag may sit on the layer's own buffer
    layout: Layout
    step: Step

    @property
    def owns_attention(self) -> bool:
        """Whether the layer must compute attention itself (its memory changes the output), whatever the model's
        attention implementation: then `hf_neuralcache.registry` routes the attention call to the layer."""
        return bool(getattr(self.layer(), "owns_attention", False))


def _tagged(mask):
    """Mark a mask our hook built: generate builds the masks of a compileable cache before calling the model, and
    the model's own mask creation then passes it on as it is."""
    if mask is not None:
        setattr(mask, MASK_TAG, True)
    return mask


class NeuralCache(Cache):
    """Base class of the hf_neuralcache caches: a transformers [`~transformers.Cache`] of our own layers.

    Subclasses set `cache_name` and `options` and build their layers in `__init__`.
    """

    cache_name: ClassVar[str]
    options: ClassVar[dict[str, Option]]

    #: Whether feeding stored K/V through `update` rebuilds the state a prefill would leave (the prefix cache's
    #: load). False for a cache that also keeps what the queries chose (tensor_cache's retained tokens).
    rebuilds_from_kv = True

    def __init__(self, layers: list):
        super().__init__(layers=layers)
        self._version = 0
        self._step: Step | None = None
        # (version, q_length, seen or None for a decode step, the new token's realness [B] or None)
        self._observed: tuple | None = None
        self._observed_padding: torch.Tensor | None = None  # the whole 2D mask: eager code only
        self._observed_source: torch.Tensor | None = None  # the caller's 2D mask it was read from

    # ---- the per-forward step -------------------------------------------------------------------------------------
    def observe_forward(self, attention_mask: torch.Tensor | None, q_length: int) -> None:
        """Record the 2D padding mask of the coming forward (called by the mask hook before the layers run).

        Under torch.compile, and for a one-token forward, only tensors are recorded (the new token's column of the
        mask), so that the decode step has no data-dependent Python.
        """
        observed = self._observed is not None and self._observed[:2] == (self._version, q_length)
        if observed and (attention_mask is None or attention_mask is self._observed_source):
            # this forward was observed already: generate builds the masks before calling the model, and a model
            # with several layer types builds one mask per type (keep the step: its layouts may carry an overlay)
            return
        source = attention_mask
        self._step = None
        seen = self._seen_for(q_length)
        padding = real = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"{self.cache_name} builds its own attention mask and needs a 2D padding mask "
                    f"[batch, tokens]; got a {attention_mask.dim()}D attention_mask."
                )
            if not compiling() and attention_mask.shape[-1] < self.get_seq_length() + q_length:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} tokens, but the cache holds "
                    f"{self.get_seq_length()} and the input adds {q_length}: expected at least "
                    f"{self.get_seq_length() + q_length} columns."
                )
            attention_mask = attention_mask.bool()
            if q_length == 1:  # the decode step: the new token's column, read at a tensor position
                position = seen if isinstance(seen, torch.Tensor) else torch.tensor(seen)
                real = attention_mask.index_select(1, position.view(1).to(attention_mask.device)).squeeze(1)
                padding = None if compiling() else attention_mask
            elif not bool(attention_mask[:, : seen + q_length].all()):
                padding = attention_mask
        self._observed = (self._version, q_length, None if q_length == 1 else seen, real)
        self._observed_padding, self._observed_source = padding, source

    def _seen_for(self, q_length: int, layer_idx: int = 0) -> int | torch.Tensor:
        """Tokens held before a forward of `q_length`: for a decode step, a copy of the layer's `length` tensor once
        it has one (a copy: `update` advances `length` in place before attention reads the query positions)."""
        layer = self.layers[layer_idx]
        length = getattr(layer, "length", None)  # fixed-shape layers count in a tensor; the paged layer in an int
        if q_length == 1 and layer.is_initialized and isinstance(length, torch.Tensor):
            return length.clone()
        return layer.get_seq_length()

    def step(self, seen: int | torch.Tensor, q_length: int) -> Step:
        """The shared [`Step`] for a forward that starts at `seen` with `q_length` new tokens.

        A decode step (`q_length == 1`) is matched by the cache's version alone: `seen` may be a tensor there.
        """
        step = self._step
        same = step is not None and step.q_length == q_length and step.version == self._version
        if not (same and (q_length == 1 or step.seen == seen)):
            padding = real = None
            observed = self._observed
            if observed is not None and observed[:2] == (self._version, q_length):
                if q_length == 1 or observed[2] == seen:
                    real, padding = observed[3], (None if compiling() else self._observed_padding)
            step = self._step = Step(seen, q_length, self._version, padding, real)
        return step

    def invalidate(self) -> None:
        """Forget per-forward state; called after anything that changes the cache outside a forward."""
        self._version += 1
        self._step = None
        self._observed = self._observed_padding = self._observed_source = None

    # ---- transformers' Cache API ----------------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        q_length = key_states.shape[-2]
        step = self.step(self._seen_for(q_length, layer_idx), q_length)
        out = layer.update(key_states, value_states, step=step)
        if layer_idx == len(self.layers) - 1:  # the forward is done with the step: do not keep its masks alive
            self._step = self._observed = self._observed_padding = self._observed_source = None
        return out

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.invalidate()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.invalidate()

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self.invalidate()

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.invalidate()

    def reset(self):
        super().reset()
        self.invalidate()

    # ---- the attention mask ---------------------------------------------------------------------------------------
    def attention_mask(
        self,
        config,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layer_idx: int,
        mask_interface: Callable,
        mask_function: Callable | None = None,
    ):
        """The attention mask for the layers that share `layer_idx`'s policy, in `mask_interface`'s format.

        Returns `None` when every returned key is visible to the (single) query, so SDPA can skip the mask (not
        under torch.compile, where that test would be data-dependent).

        Args:
            mask_function (`Callable`, *optional*):
                The model's own mask function, given when it overlays the causal mask (for example bidirectional
                image blocks in Gemma 3); see [`Layout.overlay`].
        """
        q_length = inputs_embeds.shape[1]
        self.observe_forward(attention_mask, q_length)
        layer = self.layers[layer_idx]
        step = self.step(self._seen_for(q_length, layer_idx), q_length)
        layout = layer.layout(step, inputs_embeds.shape[0], inputs_embeds.device)
        visible = layout.visible if mask_function is None else layout.overlay(mask_function)
        if mask_interface is sdpa_mask:  # boolean format: hand over the mask itself, or nothing when SDPA can skip it
            if mask_function is None and q_length == 1 and not compiling() and bool(visible.all()):
                return None
            if mask_function is None and 1 < q_length <= layer.window and step.seen == 0 and step.padding is None:
                return None  # a plain causal prefill: SDPA's is_causal, no [q, q] mask
            return _tagged(visible.unsqueeze(1))
        return _tagged(
            mask_interface(
                batch_size=visible.shape[0],
                q_length=q_length,
                kv_length=visible.shape[-1],
                q_offset=0,
                kv_offset=0,
                mask_function=lambda b, h, q, k: visible[b, q, k],
                attention_mask=None,
                allow_is_causal_skip=False,
                dtype=inputs_embeds.dtype,
                config=config,
                use_vmap=False,
                device=inputs_embeds.device,
            )
        )

    # ---- reporting ------------------------------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of device memory the cache holds now (keys, values and bookkeeping of every layer)."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def __repr__(self):
        return f"{type(self).__name__}(layers={len(self.layers)}, seen={self.get_seq_length()})"
