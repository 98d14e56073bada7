"""The one place that touches transformers internals.

`register()` (called by `import hf_neuralcache`, idempotent) does four things:

1. adds our cache names to `generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS`, the allow-list that
   `GenerationConfig.validate` checks;
2. wraps `GenerationMixin._prepare_cache_for_generation` so that `generate` builds our cache for our names (and
   calls the original for every other name);
3. wraps `masking_utils._preprocess_mask_arguments`, through which every mask creator of transformers passes, so
   that a forward with one of our caches gets the mask the cache computes (any other forward is untouched);
4. registers the `"neuralcache"` attention function and, as its mask function, transformers' SDPA mask.

If transformers lacks any of these, `register()` raises [`IncompatibleTransformersError`] naming the supported
range.
"""

from __future__ import annotations

import functools
import logging

import torch
import transformers
from packaging.version import Version

from .hooks.generate import hooks_for_call, on_cache_prepared
from .hooks.generate import run as run_hooks

__all__ = [
    "register_attention",
    "CACHE_KWARG",
    "SUPPORTED_TRANSFORMERS",
    "IncompatibleTransformersError",
    "available_caches",
    "create_cache",
    "decoder_layer_types",
    "register",
]

logger = logging.getLogger(__name__)

SUPPORTED_TRANSFORMERS = ">=5.17,<6"
ATTENTION_NAME = "neuralcache"


def _cache_kwarg() -> str:
    """The `model_kwargs` key generate() keeps the cache under: `"cache"` from transformers 5.24, else
    `"past_key_values"` (read from transformers' own list of cache names)."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
    except ImportError:  # pragma: no cover - depends on the installed version
        return "past_key_values"
    return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"


CACHE_KWARG = _cache_kwarg()

# name -> (dotted path of the class, or None while not implemented, one line for `available_caches`)
_CACHES: dict[str, tuple[str | None, str]] = {
    "paged_kv": (
        "hf_neuralcache.caches.paged.PagedKVCache",
        "paged KV cache: block pool, page tables, copy-on-write sharing",
    ),
    "sliding_window_kv": (
        "hf_neuralcache.caches.sliding_window.SlidingWindowKVCache",
        "attention sinks + sliding window: bounded memory on any decoder",
    ),
    "tensor_cache": (
        "hf_neuralcache.caches.tensor_cache.TensorCache",
        "window + fixed-size fast-weight memory of evicted tokens (Tensor Cache)",
    ),
}
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


class IncompatibleTransformersError(ImportError):
    """The installed transformers lacks an internal that hf_neuralcache hooks into."""


def available_caches() -> dict[str, str]:
    """The cache names `import hf_neuralcache` registers, each with one line saying what it is and its status.

    Example:

    ```python
    >>> import hf_neuralcache
    >>> hf_neuralcache.available_caches()["sliding_window_kv"]
    'attention sinks + sliding window: bounded memory on any decoder'
    ```
    """
    return {
        name: line if path is not None else f"{line} (not implemented yet)" for name, (path, line) in _CACHES.items()
    }


def _implemented() -> list[str]:
    return [name for name, (path, _) in _CACHES.items() if path is not None]


def _cache_class(name: str):
    if not isinstance(name, str) or name not in _CACHES:
        raise ValueError(
            f"Unknown hf_neuralcache cache {name!r}; available: {sorted(_CACHES)} "
            f"(transformers' own names such as 'dynamic' or 'static' are built by transformers)."
        )
    path, _ = _CACHES[name]
    if path is None:
        raise NotImplementedError(f"cache_implementation={name!r} is not implemented yet; available: {_implemented()}.")
    module, _, cls = path.rpartition(".")
    return getattr(__import__(module, fromlist=[cls]), cls)


def create_cache(name: str, config, **cache_config):
    """Build the cache `generate(cache_implementation=name, cache_config=cache_config)` would build.

    Use it to pass `past_key_values=` to a manual decoding loop or a teacher-forced evaluation, as you would
    `DynamicCache(config=model.config)`.

    Args:
        name (`str`):
            One of the names of [`available_caches`].
        config (`PreTrainedConfig`):
            The model's config (`model.config`).
        **cache_config:
            The backend's options, for example `window=1024, sink_tokens=4` for `sliding_window_kv`.

    Raises:
        `ValueError`: for an unknown name, an unknown option, a bad value or an unsupported model.
        `NotImplementedError`: for a registered name that is not implemented yet.

    Example:

    ```python
    >>> import hf_neuralcache
    >>> from hf_neuralcache.models import tiny_model
    >>> model = tiny_model("llama")
    >>> cache = hf_neuralcache.create_cache("sliding_window_kv", model.config, window=16)
    >>> type(cache).__name__
    'SlidingWindowKVCache'
    ```
    """
    from .caches.base import check_options

    cls = _cache_class(name)
    return cls(config, **check_options(name, cls.options, cache_config))


def decoder_layer_types(config, cache_name: str) -> list[tuple[str, int | None]]:
    """`(layer type, native sliding window or None)` for each decoder layer of `config`.

    Raises:
        `ValueError`: for encoder-decoder models and layer types our caches do not handle.
    """
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"cache_implementation={cache_name!r} supports decoder-only models; {config.model_type!r} is an "
            "encoder-decoder model. Use transformers' own caches for it."
        )
    text = config.get_text_config(decoder=True)
    if text is not config:
        # e.g. Gemma 3 with images: its masks add overlays (bidirectional image blocks) that our mask does not apply
        raise ValueError(
            f"cache_implementation={cache_name!r} supports text-only decoder models; {config.model_type!r} is a "
            f"composite (multimodal) model. Load its text model alone (for example with AutoModelForCausalLM on a "
            f"{text.model_type!r} checkpoint) or use transformers' own caches."
        )
    n_layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(n_layers, int):
        raise ValueError(
            f"cache_implementation={cache_name!r} needs a decoder config with `num_hidden_layers`; "
            f"{type(text).__name__} has none."
        )
    layer_types = getattr(text, "layer_types", None)
    if layer_types is None:
        if getattr(text, "sliding_window", None) is not None:
            layer_types = ["sliding_attention"] * n_layers
        elif getattr(text, "attention_chunk_size", None) is not None:
            layer_types = ["chunked_attention"] * n_layers
        else:
            layer_types = ["full_attention"] * n_layers
    unsupported = sorted(set(layer_types) - set(_SUPPORTED_LAYER_TYPES))
    if unsupported or getattr(text, "kv_sharing_modes", None):
        found = unsupported or ["shared KV layers"]
        raise ValueError(
            f"cache_implementation={cache_name!r} supports layers of type {list(_SUPPORTED_LAYER_TYPES)}; "
            f"{config.model_type!r} has {found}."
        )
    window = getattr(text, "sliding_window", None)
    if "sliding_attention" in layer_types and not (isinstance(window, int) and window >= 1):
        raise ValueError(
            f"{config.model_type!r} declares sliding_attention layers but its config has sliding_window={window!r}; "
            "expected an int >= 1."
        )
    return [(t, window if t == "sliding_attention" else None) for t in layer_types]


# ---- the patches --------------------------------------------------------------------------------------------------
def _incompatible(what: str) -> IncompatibleTransformersError:
    return IncompatibleTransformersError(
        f"hf_neuralcache supports transformers {SUPPORTED_TRANSFORMERS}; the installed {transformers.__version__} "
        f"lacks {what}. Install a supported version: pip install 'transformers{SUPPORTED_TRANSFORMERS}'."
    )


def _internals():
    """Import everything we hook into, or raise one clear error."""
    try:
        from transformers import masking_utils
        from transformers.generation import configuration_utils
        from transformers.generation.utils import GenerationMixin
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError as err:  # pragma: no cover - depends on the installed version
        raise _incompatible(f"a module or name hf_neuralcache imports ({err})") from err
    for owner, attr in (
        (configuration_utils, "ALL_CACHE_IMPLEMENTATIONS"),
        (GenerationMixin, "_prepare_cache_for_generation"),
        (masking_utils, "_preprocess_mask_arguments"),
    ):
        if not hasattr(owner, attr):
            raise _incompatible(f"`{owner.__name__}.{attr}`")
    return (
        configuration_utils,
        GenerationMixin,
        masking_utils,
        ALL_MASK_ATTENTION_FUNCTIONS,
        (
            AttentionInterface,
            AttentionMaskInterface,
            sdpa_mask,
        ),
    )


def _wrap_prepare_cache(original):
    @functools.wraps(original)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        name = generation_config.cache_implementation
        given = model_kwargs.get(CACHE_KWARG)
        if given is not None and generation_config.is_assistant and getattr(given, "cache_name", None) == name:
            return  # an assistant model's next round of candidates reuses the cache this hook built for it
        if name not in _CACHES or given is not None or generation_config.use_cache is False:
            # transformers raises its own error for a cache passed together with a cache_implementation
            result = original(self, generation_config, model_kwargs, *args, **kwargs)
            on_cache_prepared(self, generation_config, model_kwargs)
            return result
        if not self._supports_default_dynamic_cache():
            raise ValueError(
                f"cache_implementation={name!r} needs a model that uses transformers' `Cache`; "
                f"{type(self).__name__} manages its own state."
            )
        cache_config = generation_config.cache_config or {}
        if not isinstance(cache_config, dict):
            raise ValueError(
                f"cache_config for cache_implementation={name!r} must be a dict of options, "
                f"got {type(cache_config).__name__}: {cache_config!r}."
            )
        cache = create_cache(name, self.config, **cache_config)
        if getattr(cache, "params", None) is not None and self.config._attn_implementation == "sdpa":
            # a learned memory saved with the model (generation_config) must work with no other argument; the
            # "neuralcache" attention is SDPA for every call without a cache of ours, so the switch is safe
            logger.info("tensor_cache learned memory: switching attn_implementation 'sdpa' -> %r", ATTENTION_NAME)
            self.set_attn_implementation(ATTENTION_NAME)
        if hasattr(cache, "check_model"):  # a fitted memory (tensor_cache "learned") is for one model's weights
            cache.check_model(self)
        if generation_config.is_assistant:  # its candidates get rolled back with `crop`
            cache.activate_past_recording()
        model_kwargs[CACHE_KWARG] = cache
        on_cache_prepared(self, generation_config, model_kwargs)

    _prepare_cache_for_generation.__neuralcache_original__ = original
    return _prepare_cache_for_generation


def _wrap_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        hooks = hooks_for_call(self, kwargs)
        if hooks is None:
            return original(self, *args, **kwargs)
        return run_hooks(original, self, args, kwargs, hooks)

    generate.__neuralcache_original__ = original
    return generate


def _wrap_preprocess_mask(original, mask_functions):
    # transformers returns this tuple (all but the first two entries None) for a ready 4D mask; our mask is one
    early_exit = original(None, None, torch.zeros(1, 1, 1, 1), None, None, None)
    if not (isinstance(early_exit, tuple) and early_exit[0] is True):
        raise _incompatible("the early exit of `masking_utils._preprocess_mask_arguments` for 4D masks")

    @functools.wraps(original)
    def _preprocess_mask_arguments(config, inputs_embeds, attention_mask, past_key_values, *args, **kwargs):
        from .caches.base import MASK_TAG, NeuralCache

        if not isinstance(past_key_values, NeuralCache):
            return original(config, inputs_embeds, attention_mask, past_key_values, *args, **kwargs)
        if getattr(attention_mask, MASK_TAG, False):  # ours, built before the forward (generate, compileable cache)
            return (True, attention_mask, *early_exit[2:])
        layer_idx = kwargs.get("layer_idx", args[1] if len(args) > 1 else None) or 0
        impl = config._attn_implementation
        interface = mask_functions._global_mapping.get(impl)
        if interface is None or "flash" in impl:
            raise ValueError(
                f"cache_implementation={past_key_values.cache_name!r} builds its own attention mask, which "
                f"attn_implementation={impl!r} cannot take; "
                f"use 'sdpa', 'eager', 'flex_attention' or '{ATTENTION_NAME}'."
            )
        mask = past_key_values.attention_mask(config, inputs_embeds, attention_mask, layer_idx, interface)
        return (True, mask, *early_exit[2:])

    _preprocess_mask_arguments.__neuralcache_original__ = original
    return _preprocess_mask_arguments


def register_attention(name: str, function) -> None:
    """Register an attention function under `name` with transformers (SDPA's mask), e.g. for recording q/k/v."""
    *_, (attn, attn_mask, sdpa_mask) = _internals()
    attn.register(name, function)
    attn_mask.register(name, sdpa_mask)


def register() -> None:
    """Register our cache names, the generate and mask hooks and the `"neuralcache"` attention. Idempotent."""
    from .attention import neuralcache_attention_forward

    configuration_utils, GenerationMixin, masking_utils, mask_functions, (attn, attn_mask, sdpa_mask) = _internals()
    if transformers.__version__ and not Version(transformers.__version__) >= Version("5.17"):
        raise _incompatible("the generation and masking internals of 5.17")
    if Version(transformers.__version__) >= Version("6"):
        logger.warning("hf_neuralcache is tested with transformers %s", SUPPORTED_TRANSFORMERS)

    missing = tuple(name for name in _CACHES if name not in configuration_utils.ALL_CACHE_IMPLEMENTATIONS)
    configuration_utils.ALL_CACHE_IMPLEMENTATIONS = configuration_utils.ALL_CACHE_IMPLEMENTATIONS + missing
    if not hasattr(GenerationMixin._prepare_cache_for_generation, "__neuralcache_original__"):
        GenerationMixin._prepare_cache_for_generation = _wrap_prepare_cache(
            GenerationMixin._prepare_cache_for_generation
        )
    if not hasattr(GenerationMixin.generate, "__neuralcache_original__"):
        GenerationMixin.generate = _wrap_generate(GenerationMixin.generate)
    if not hasattr(masking_utils._preprocess_mask_arguments, "__neuralcache_original__"):
        masking_utils._preprocess_mask_arguments = _wrap_preprocess_mask(
            masking_utils._preprocess_mask_arguments, mask_functions
        )
    attn.register(ATTENTION_NAME, neuralcache_attention_forward)
    attn_mask.register(ATTENTION_NAME, sdpa_mask)
