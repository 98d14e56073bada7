"""The `"neuralcache"` attention implementation.

Registered with transformers' `AttentionInterface` by `import hf_neuralcache`; choose it with
`from_pretrained(..., attn_implementation="neuralcache")` or `model.set_attn_implementation("neuralcache")`.

transformers calls `past_key_values.update(...)` in the attention module and then the attention function, without
passing the cache. Our caches tag the key tensor that `update` returns with an [`AttentionState`] (the layer and
the positions of the keys it returned), and this function reads it back from `key`. On CUDA tensors (or under
`TRITON_INTERPRET=1`) window attention runs the Triton kernels of `hf_neuralcache.kernels.window_attention`
over that layout; on the CPU the PyTorch reference. A key without the tag, from any
other cache or none, goes to transformers' SDPA function unchanged, so with no cache of ours in play the
`"neuralcache"` implementation is exactly `"sdpa"`.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .caches.base import AttentionState
from .kernels.dispatch import use_triton
from .kernels.window_attention import attend, window_attention

__all__ = ["ATTENTION_NAME", "attention_state", "neuralcache_attention_forward"]


ATTENTION_NAME = "neuralcache"


def attention_state(key: torch.Tensor) -> AttentionState | None:
    """The [`AttentionState`] an hf_neuralcache layer attached to `key` in this forward, or `None`."""
    return getattr(key, "_neuralcache_state", None)


def neuralcache_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
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

    Returns:
        `tuple[torch.Tensor, None]`: the output `[B, q, Hq, Dv]` and no attention weights.
    """
    state = attention_state(key)
    if state is None or (dropout > 0.0 and module.training):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
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
