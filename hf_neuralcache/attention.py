"""The `"neuralcache"` attention implementation.

Registered with transformers' `AttentionInterface` by `import hf_neuralcache`; choose it with
`from_pretrained(..., attn_implementation="neuralcache")` or `model.set_attn_implementation("neuralcache")`.

transformers calls `past_key_values.update(...)` in the attention module and then the attention function, without
passing the cache. Our caches tag the key tensor that `update` returns with an [`AttentionState`] (the layer and
the positions of the keys it returned), and this function reads it back from `key`. On CUDA tensors (or under
`TRITON_INTERPRET=1`) window attention runs the Triton kernels of `hf_neuralcache.kernels.window_attention`
over that layout; on the CPU the PyTorch reference. A key without the tag, from any
other cache or none, goes to what the model would run without `"neuralcache"`: transformers' SDPA function, or the
model's own eager function where the call carries what SDPA cannot take (`softcap`, Gemma 2). So with no cache of
ours in play, `"neuralcache"` computes what the model's default implementation computes.

Layers whose memory changes the attention output (`tensor_cache`) need this function whatever implementation the
model was loaded with: [`routed_attention`] wraps the model's attention function (`"sdpa"`, `"eager"`, ...) so that
their tagged keys come here, and every other call goes to the model's function unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from .caches.base import AttentionState
from .kernels.dispatch import use_triton
from .kernels.window_attention import attend, window_attention

__all__ = [
    "ATTENTION_NAME",
    "attention_state",
    "mask_format",
    "needs_eager",
    "neuralcache_attention_forward",
    "neuralcache_mask",
    "routed_attention",
]


ATTENTION_NAME = "neuralcache"


def attention_state(key: torch.Tensor) -> AttentionState | None:
    """The [`AttentionState`] an hf_neuralcache layer attached to `key` in this forward, or `None`."""
    return getattr(key, "_neuralcache_state", None)


def needs_eager(config) -> bool:
    """Whether a model runs eager attention by default because it soft-caps attention logits, which SDPA refuses
    (Gemma 2: `attn_logit_softcapping`)."""
    return getattr(config, "attn_logit_softcapping", None) is not None


def mask_format(config) -> Callable:
    """transformers' mask function whose format the `"neuralcache"` fallback takes for `config`: `sdpa_mask`
    (boolean), or `eager_mask` (float) for a model that needs eager attention."""
    return eager_mask if needs_eager(config) else sdpa_mask


def neuralcache_mask(*args, config=None, **kwargs):
    """The mask function of the `"neuralcache"` implementation: transformers' mask in the format of the attention the
    model runs without a cache of ours (see [`mask_format`]). Same signature as `transformers.masking_utils.sdpa_mask`.
    """
    return mask_format(config)(*args, config=config, **kwargs)


def neuralcache_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    fallback: Callable | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for the `"neuralcache"` implementation, same contract as transformers' attention functions.

    Args:
        module (`torch.nn.Module`): The calling attention module.
        query (`torch.Tensor` of shape `[B, Hq, q, D]`): Query states.
        key (`torch.Tensor` of shape `[B, Hkv, K, D]`): Key states as the cache returned them.
        value (`torch.Tensor` of shape `[B, Hkv, K, Dv]`): Value states.
        attention_mask (`torch.Tensor`, *optional*): The mask transformers built (used on the SDPA path).
        dropout (`float`, *optional*, defaults to 0.0): Attention dropout (SDPA path only).
        scaling (`float`, *optional*): Multiplier of the dot products, defaults to `D ** -0.5`.
        fallback (`Callable`, *optional*): The model's own eager attention function (transformers' `default` of
            `AttentionInterface.get_interface`), run for keys of no cache of ours when SDPA cannot take the call.

    Returns:
        `tuple[torch.Tensor, None]`: the output `[B, q, Hq, Dv]` and no attention weights.
    """
    state = attention_state(key)
    if state is None or (dropout > 0.0 and module.training):
        # what the model runs without "neuralcache": SDPA, or its eager function (with the eager mask that
        # `neuralcache_mask` built) where the model soft-caps logits, which SDPA refuses
        config = getattr(module, "config", None)
        soft_capped = needs_eager(config) if config is not None else kwargs.get("softcap") is not None
        eager = fallback is not None and soft_capped
        function = fallback if eager else sdpa_attention_forward
        return function(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = state.layer()
    if hasattr(layer, "attention"):  # a layer with more than a window (tensor_cache): window merged with its memory
        out = layer.attention(query, key, value, state, scaling, softcap=kwargs.get("softcap"))
        return out.transpose(1, 2).contiguous(), None
    layout = state.layout
    if use_triton(query) and not layout.overlaid:  # Triton over the layout itself: no dense [B, q, K] mask
        out = attend(query, key, value, layout.slots, layout.valid, layout.sink, layout.q_slots, layout.window,
                     scaling, softcap=kwargs.get("softcap"))  # fmt: skip
    else:
        visible = layout.visible.to(query.device)  # layers of a split model may sit on other devices
        out = window_attention(query, key, value, visible, scaling, softcap=kwargs.get("softcap"))
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def routed_attention(function: Callable, eager: Callable | None) -> Callable:
    """`function` (the attention function a model resolved) with the keys of layers that own their attention
    (`tensor_cache`) sent to [`neuralcache_attention_forward`]; every other call goes to `function` unchanged.

    The decision reads the tag on the key tensor only: no switch, nothing shared between threads or models.

    Args:
        function (`Callable`): The attention function transformers resolved for the model's implementation.
        eager (`Callable`, *optional*): The model's own eager function (the fallback of `"neuralcache"`).
    """
    if function is neuralcache_attention_forward:
        return functools.partial(neuralcache_attention_forward, fallback=eager)

    @functools.wraps(function)
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        state = attention_state(key)
        if state is not None and state.owns_attention:
            return neuralcache_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        return function(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__neuralcache_routed__ = function
    return attention
