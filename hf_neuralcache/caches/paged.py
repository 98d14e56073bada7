"""`paged_kv`: a KV cache stored in fixed-size pages, with page tables and copy-on-write sharing (like vLLM).

Each layer holds one pool of pages `[num_pages, Hkv, page_size, D]` for keys and one for values; a
[`PageTable`] shared by all layers maps each sequence's tokens to pages (token `t` of row `b` lives at page
`table[b, t // page_size]`, offset `t % page_size`) and counts how many rows hold each page.

- Memory grows one page at a time; the pool tensor itself grows by at least an eighth when it is full (a copy of
  the pool a logarithmic number of times, never per step). With `max_pages` set, a step that needs more raises
  [`PageBudgetExceededError`] and leaves the cache unchanged.
- Rows that hold the same pages and write the same tokens share the pages: the `num_beams` copies of a prompt
  that beam search (or `num_return_sequences`) makes hold it once. `reorder_cache`, `batch_select_indices` and
  `batch_repeat_interleave` only rewrite the table and the reference counts. A row that writes into a page that
  others still hold copies that one page first (copy-on-write).
- `crop` releases the pages past the kept tokens; a partly kept page stays, its stale tail is overwritten.
- With `attn_implementation="neuralcache"` the Triton kernels read K/V in place through the table. With any other
  attention implementation `update` gathers each row's pages into a contiguous tensor, a copy of the whole cache
  per layer and step (what `DynamicCache` costs too: it concatenates every step).
"""

from __future__ import annotations

import sys
import weakref

import torch
import torch.nn.functional as F
from transformers.cache_utils import CacheLayerMixin

from ..kernels.paged_attention import gather_pages, paged_attention, write_pages
from ..kernels.window_attention import window_attention
from .base import AttentionState, Layout, NeuralCache, Option, Step, check_options
from .page_table import PageBudgetExceededError, PageTable

__all__ = ["PageBudgetExceededError", "PagedKVCache", "PagedLayer"]


class PagedLayer(CacheLayerMixin):
    """One layer of [`PagedKVCache`]: the key and value page pools, addressed through the cache's [`PageTable`].

    Args:
        pages (`PageTable`):
            The page table shared by all layers of the cache.
        sliding_window (`int`, *optional*):
            The model's own sliding window for this layer (keys further back are masked, still stored);
            `None` for full attention.
    """

    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, pages: PageTable, sliding_window: int | None = None):
        super().__init__()
        self.pages = pages
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.window = sliding_window or sys.maxsize  # what NeuralCache.attention_mask reads
        self.seen = 0
        self.k_pages: torch.Tensor | None = None  # [num_pages, Hkv, page_size, D]
        self.v_pages: torch.Tensor | None = None

    @property
    def policy(self) -> tuple[str, int]:
        return "paged", self.window

    # ---- a read-only contiguous view, for code that reads `layer.keys` / `layer.values` -----------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """Every held key, gathered from the pages into a new contiguous `[B, Hkv, seen, D]` tensor (as
        `DynamicLayer.keys`); `None` before the first `update`. A copy: writing into it does not change the cache."""
        return self._gathered(self.k_pages)

    @property
    def values(self) -> torch.Tensor | None:
        """Every held value as a new contiguous `[B, Hkv, seen, Dv]` tensor; see [`keys`]."""
        return self._gathered(self.v_pages)

    @keys.setter
    def keys(self, value) -> None:
        _refuse_write(value)

    @values.setter
    def values(self, value) -> None:
        _refuse_write(value)

    def _gathered(self, pool: torch.Tensor | None) -> torch.Tensor | None:
        if pool is None:
            return None
        table = self.pages.table
        if table.shape[1] == 0:  # nothing written yet
            return pool.new_zeros(table.shape[0], pool.shape[1], 0, pool.shape[-1])
        return gather_pages(pool, table.to(pool.device), self.seen)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, heads, _, dim = key_states.shape
        size = self.pages.page_size
        self.dtype, self.device = key_states.dtype, key_states.device
        self.k_pages = key_states.new_zeros(0, heads, size, dim)
        self.v_pages = value_states.new_zeros(0, value_states.shape[1], size, value_states.shape[-1])
        value_bytes = value_states.shape[1] * value_states.shape[-1] * value_states.element_size()
        self.pages.page_bytes += size * (heads * dim * key_states.element_size() + value_bytes)  # over all layers
        self.is_initialized = True

    def _grow(self) -> None:
        """Follow the pool size of the page table (new pages are zeros: finite, never attended to)."""
        missing = self.pages.capacity - self.k_pages.shape[0]
        if missing > 0:
            self.k_pages = torch.cat([self.k_pages, self.k_pages.new_zeros(missing, *self.k_pages.shape[1:])])
            self.v_pages = torch.cat([self.v_pages, self.v_pages.new_zeros(missing, *self.v_pages.shape[1:])])

    # ---- the layout of what `update` returns (the fallback path) ---------------------------------------------------
    def layout(self, step: Step, batch_size: int, device: torch.device) -> Layout:
        """Keys come back in order, positions `0 .. seen + q - 1`; a query sees the real ones up to itself."""
        cached = step.layouts.get(self.policy)
        if cached is None:
            slots = torch.arange(step.seen + step.q_length, device=device).expand(batch_size, -1)
            cached = Layout(
                slots, step.real(slots), torch.zeros_like(slots, dtype=torch.bool), step.q_slots.to(device), self.window
            )
            step.layouts[self.policy] = cached
        return cached

    # ---- writing --------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, step: Step | None = None, **kwargs):
        """Write `key_states`/`value_states` (`[B, H, q, D]`) into pages and return what attention reads.

        Returns the new keys themselves when the `"neuralcache"` attention reads the pages in place, else all keys
        and values of every row, gathered from the pages into `[B, H, seen + q, D]`.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if step is None:  # used outside a NeuralCache: no padding information
            step = Step(self.seen, q, -1, None)
        plan = self.pages.plan_for(self.seen, key_states, value_states, step.padding)
        on = plan.on(self.k_pages.device)
        self._grow()
        if on["src"] is not None:  # copy-on-write before writing
            self.k_pages[on["dst"]] = self.k_pages[on["src"]]
            self.v_pages[on["dst"]] = self.v_pages[on["src"]]
        keys, values = key_states, value_states
        if on["rows"] is not None:  # one row per group of rows sharing their pages
            keys, values = keys[on["rows"]], values[on["rows"]]
        write_pages(
            self.k_pages,
            self.v_pages,
            keys.transpose(1, 2).reshape(-1, *keys.shape[1:2], keys.shape[-1]),  # [R * q, H, D]
            values.transpose(1, 2).reshape(-1, *values.shape[1:2], values.shape[-1]),
            on["slots"],
        )
        self.seen += q
        layout = self.layout(step, key_states.shape[0], key_states.device)
        if self.pages.in_place or plan.start == 0:  # the new keys are all there is, or the kernels read the pages
            keys, values = key_states, value_states
        else:
            keys, values = (
                gather_pages(self.k_pages, on["table"], self.seen),
                gather_pages(self.v_pages, on["table"], self.seen),
            )
        keys._neuralcache_state = AttentionState(weakref.ref(self), layout, step)
        return keys, values

    # ---- attention (the "neuralcache" implementation) -------------------------------------------------------------
    def attention(self, query, key, value, state: AttentionState, scaling: float, softcap: float | None = None):
        """Attention of this forward's queries (`[B, Hq, q, D]`) over the pages; returns `[B, Hq, q, Dv]`.

        A prompt (nothing held before) attends to its own contiguous keys with SDPA; later steps run the paged
        kernels on the pages in place. Padding anywhere but at the start falls back to gathering the pages.
        """
        step, plan = state.step, self.pages.plan
        if step.seen == 0:
            return self._prompt_attention(query, key, value, state, scaling, softcap)
        on = plan.on(query.device)
        if plan.kv_start is None or state.layout.overlaid:  # padding after real tokens, a model's overlay: exact mask
            keys, values = (
                gather_pages(self.k_pages, on["table"], self.seen),
                gather_pages(self.v_pages, on["table"], self.seen),
            )
            return window_attention(query, keys, values, state.layout.visible.to(query.device), scaling, softcap)
        return paged_attention(
            query,
            self.k_pages,
            self.v_pages,
            on["table"],
            on["seq_lens"],
            on["kv_start"],
            scaling,
            softcap,
            self.sliding_window,
            max_len=self.seen,
        )

    def _prompt_attention(self, query, key, value, state, scaling, softcap):
        if softcap is not None:
            return window_attention(query, key, value, state.layout.visible.to(query.device), scaling, softcap)
        if state.step.padding is None and self.sliding_window is None and not state.layout.overlaid:
            causal = query.shape[2] > 1
            return F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling, enable_gqa=True)
        visible = state.layout.visible.to(query.device)  # [B, q, K]
        alone = ~visible.any(-1, keepdim=True)  # padding queries: let them see themselves (their output is unused)
        visible = visible | (alone & torch.eye(*visible.shape[1:], dtype=torch.bool, device=query.device))
        mask = visible.unsqueeze(1)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)

    # ---- sizes ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.k_pages = self.v_pages = None
        self.seen = 0
        self.is_initialized = False

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def memory_bytes(self) -> int:
        """Bytes of this layer's key and value pools (every allocated page, used or free)."""
        return sum(t.numel() * t.element_size() for t in (self.k_pages, self.v_pages) if t is not None)

    def __repr__(self):
        return f"PagedLayer(page_size={self.pages.page_size}, seen={self.seen}, pages={self.pages.capacity})"


def _refuse_write(value) -> None:
    if value is not None:  # CacheLayerMixin.__init__ sets None
        raise AttributeError(
            "PagedLayer.keys / .values are read-only views gathered from the page pools; write through "
            "`update()` (or edit `k_pages` / `v_pages` at the slots of `cache.pages.table`)."
        )


def _max_pages_ok(value) -> bool:
    return value is None or (not isinstance(value, bool) and value >= 1)


class PagedKVCache(NeuralCache):
    """A KV cache in fixed-size pages with page tables, reference counts and copy-on-write sharing.

    Exact: the same attention as `DynamicCache`, on any decoder-only model, in every `generate` mode (greedy,
    sampling, beam search with `num_return_sequences`, assisted decoding, chunked prefill, padded batches).
    Beam search holds the prompt once for all beams and reorders beams by rewriting page tables.

    Args:
        config (`PreTrainedConfig`):
            The model's config; its text (decoder) config gives the layers and their types.
        page_size (`int`, *optional*, defaults to 16):
            Tokens per page.
        max_pages (`int`, *optional*):
            Most pages per layer. A step that needs more raises [`PageBudgetExceededError`]; `None` (the default)
            lets the pool grow as needed.

    Example:

    ```python
    >>> import torch
    >>> import hf_neuralcache
    >>> from hf_neuralcache import CACHE_KWARG  # "cache" (transformers >= 5.24) or "past_key_values"
    >>> from hf_neuralcache.models import tiny_model
    >>> model = tiny_model("llama")
    >>> cache = hf_neuralcache.create_cache("paged_kv", model.config, page_size=16)
    >>> out = model(torch.arange(20).unsqueeze(0), **{CACHE_KWARG: cache})
    >>> cache.get_seq_length(), cache.pages.pages_in_use
    (20, 2)
    ```
    """

    cache_name = "paged_kv"
    options = {
        "page_size": Option(int, 16, lambda v: v >= 1, "an int >= 1", "Tokens per page."),
        "max_pages": Option(
            (int, type(None)), None, _max_pages_ok, "None or an int >= 1", "Most pages per layer (None: no limit)."
        ),
    }

    def __init__(self, config, page_size: int = 16, max_pages: int | None = None):
        from ..registry import decoder_layer_types

        check_options(self.cache_name, self.options, {"page_size": page_size, "max_pages": max_pages})
        self.pages = PageTable(page_size, max_pages)
        layers = [PagedLayer(self.pages, window) for _, window in decoder_layer_types(config, self.cache_name)]
        super().__init__(layers)

    def attention_mask(self, config, inputs_embeds, attention_mask, layer_idx, mask_interface, mask_function=None):
        """No mask for the `"neuralcache"` attention (the kernels mask by position); else the exact mask."""
        from ..registry import ATTENTION_NAME

        # in place only without autograd: a training forward with dropout would send the new keys alone to SDPA;
        # and not with a model's mask overlay (image blocks), which needs the exact mask
        in_place = getattr(config, "_attn_implementation", None) == ATTENTION_NAME and not torch.is_grad_enabled()
        self.pages.in_place = in_place and mask_function is None
        if self.pages.in_place:
            self.observe_forward(attention_mask, inputs_embeds.shape[1])
            return None
        return super().attention_mask(config, inputs_embeds, attention_mask, layer_idx, mask_interface, mask_function)

    # ---- batch operations and rollback: page-table updates ----------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor):
        """Beam search: row `i` becomes row `beam_idx[i]`; no K/V is copied."""
        self.pages.select(beam_idx)
        self.invalidate()

    def batch_select_indices(self, indices: torch.Tensor):
        self.pages.select(indices)
        self.invalidate()

    def batch_repeat_interleave(self, repeats: int):
        self.pages.select(torch.arange(self.pages.table.shape[0]).repeat_interleave(repeats))
        self.invalidate()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative int, as transformers calls it)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        target = max(0, self.get_seq_length() + tokens_to_remove)
        if tokens_to_remove:
            self.pages.crop(target)
            for layer in self.layers:
                layer.seen = min(layer.seen, target)
        self.invalidate()

    def activate_past_recording(self, **kwargs) -> None:
        """Nothing to do: every token stays in its page until `crop` releases it. `kwargs` (transformers >= 5.25 passes
        `recurrent_states_to_keep`, for linear-attention layers) do not apply."""

    def reset(self):
        self.pages.reset()
        self.pages.page_bytes = 0
        for layer in self.layers:
            layer.reset()
        self.invalidate()

    def memory_bytes(self) -> int:
        """Bytes held now: every layer's page pools plus the page table and reference counts."""
        table = self.pages.table.numel() * 8 + self.pages.refs.numel() * 8
        return sum(layer.memory_bytes() for layer in self.layers) + table
