"""The mask half of `hf_neuralcache.registry` (split off to keep files short; only the registry imports it).

transformers builds a forward's masks in `masking_utils`: every mask creator calls `_preprocess_mask_arguments`, then
the mask function registered for the attention implementation (`sdpa_mask`, `eager_mask`...), with the model's
mask function composed of the causal mask and its overlays. [`wrap_preprocess_mask`] and [`wrap_mask_function`]
send a forward with one of our caches to [`NeuralCache.attention_mask`][hf_neuralcache.caches.base.NeuralCache]:

- a one-token forward (a decode step) gets the cache's mask through the early exit of the preprocess function;
- a forward of several tokens lets transformers compose the model's mask function, and the wrapped mask function
  hands it to the cache, which applies it at the positions of its keys (Gemma 3's bidirectional image blocks).

Every forward with another cache, or none, goes to transformers' functions unchanged.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .attention import ATTENTION_NAME, mask_format, neuralcache_mask
from .caches.base import MASK_TAG, NeuralCache

__all__ = ["MASK_IMPLEMENTATIONS", "wrap_mask_function", "wrap_preprocess_mask"]

# the mask functions our caches build masks for; a flash attention takes no mask of that kind
MASK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", ATTENTION_NAME)
_MASK_REQUEST = "_neuralcache_mask_request"  # on the 2D mask handed from the preprocess hook to a mask function


def wrap_preprocess_mask(original, mask_functions, early_exit: tuple):
    """`masking_utils._preprocess_mask_arguments` that gives a forward with one of our caches the cache's mask.

    `early_exit` is what the original returns for a ready 4D mask (the registry checked it).
    """
    # (config, inputs_embeds, attention_mask, cache, position_ids, layer_idx, ...); the cache is `cache` from 5.24,
    # `past_key_values` before, and callers pass it by position or by keyword (Gemma 3 and 4 do)
    names = list(inspect.signature(original).parameters)
    cache_name = names[3]

    @functools.wraps(original)
    def _preprocess_mask_arguments(*args, **kwargs):
        cache = args[3] if len(args) > 3 else kwargs.get(cache_name)
        if not isinstance(cache, NeuralCache):
            return original(*args, **kwargs)
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        config, inputs_embeds, attention_mask = bound["config"], bound["inputs_embeds"], bound.get("attention_mask")
        if getattr(attention_mask, MASK_TAG, False):  # ours, built before the forward (generate, compileable cache)
            return (True, attention_mask, *early_exit[2:])
        layer_idx = bound.get("layer_idx") or 0
        impl = config._attn_implementation
        interface = mask_functions._global_mapping.get(impl)
        if interface is None or "flash" in impl:
            raise ValueError(
                f"cache_implementation={cache.cache_name!r} builds its own attention mask, which "
                f"attn_implementation={impl!r} cannot take; "
                f"use 'sdpa', 'eager', 'flex_attention' or '{ATTENTION_NAME}'."
            )
        original_interface = _concrete(getattr(interface, "__neuralcache_original__", interface), config)
        q_length = inputs_embeds.shape[1]
        if q_length == 1 or not hasattr(interface, "__neuralcache_original__"):  # decode step: no image to overlay
            mask = cache.attention_mask(config, inputs_embeds, attention_mask, layer_idx, original_interface)
            return (True, mask, *early_exit[2:])
        # Several tokens: transformers composes the model's mask function (with its overlays) and calls the mask
        # function of `impl`, whose wrapper hands it to the cache. Sizes in absolute positions: 0 .. seen + q - 1.
        seen = int(cache.layers[layer_idx].get_seq_length())
        if attention_mask is None:
            handle = torch.ones(inputs_embeds.shape[0], seen + q_length, dtype=torch.bool, device=inputs_embeds.device)
        else:
            handle = attention_mask.view_as(attention_mask)  # a new tensor object: the caller's mask stays untagged
        setattr(handle, _MASK_REQUEST, (cache, layer_idx, inputs_embeds, attention_mask))
        return (False, handle, None, q_length, seen + q_length, seen, 0)

    _preprocess_mask_arguments.__neuralcache_original__ = original
    return _preprocess_mask_arguments


def _concrete(mask_function, config):
    """transformers' own mask function behind `mask_function` (`"neuralcache"`'s picks SDPA's or eager's format)."""
    return mask_format(config) if mask_function is neuralcache_mask else mask_function


def wrap_mask_function(original):
    """A mask function of transformers (`sdpa_mask`, `eager_mask`...) that sends our caches' requests to the cache."""

    @functools.wraps(original)
    def mask_function(*args, **kwargs):
        request = getattr(kwargs.get("attention_mask"), _MASK_REQUEST, None)
        if request is None:
            return original(*args, **kwargs)
        cache, layer_idx, inputs_embeds, attention_mask = request
        # transformers allows skipping the causal mask unless the model overlays it (or asks for the full mask)
        overlay = None if kwargs.get("allow_is_causal_skip", True) else kwargs["mask_function"]
        config = kwargs["config"]
        concrete = _concrete(original, config)
        return cache.attention_mask(config, inputs_embeds, attention_mask, layer_idx, concrete, overlay)

    mask_function.__neuralcache_original__ = original
    return mask_function
