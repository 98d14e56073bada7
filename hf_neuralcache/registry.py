"""The one place that touches transformers internals.

`register()` (called by `import hf_neuralcache`, idempotent) does these things:

1. adds our cache names to `generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS`, the allow-list that
   `GenerationConfig.validate` checks;
2. wraps `GenerationMixin._prepare_cache_for_generation` so that `generate` builds our cache for our names, or for
   the settings a checkpoint saved under `generation_config.hf_neuralcache` (and calls the original otherwise);
3. wraps `GenerationConfig.save_pretrained` so that a checkpoint keeps our settings under that key, never in
   transformers' own `cache_implementation` (see `hf_neuralcache.saved_settings`): plain transformers loads it;
4. wraps `masking_utils._preprocess_mask_arguments`, through which every mask creator of transformers passes, and
   the mask functions of `"sdpa"`, `"eager"`, `"flex_attention"` and `"neuralcache"`, so that a forward with one
   of our caches gets the mask the cache computes, with the model's own overlays (image blocks) applied; any other
   forward is untouched;
5. registers the `"neuralcache"` attention function (its mask function: transformers' SDPA mask, or eager's for a
   model that soft-caps logits, see `hf_neuralcache.attention.neuralcache_mask`), and wraps
   `AttentionInterface.get_interface` so that the keys of layers that compute their own attention (`tensor_cache`)
   reach them whatever attention implementation the model uses (`hf_neuralcache.attention.routed_attention`).

If transformers lacks any of these, `register()` raises [`IncompatibleTransformersError`] naming the supported
range.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
import transformers
from packaging.version import Version

from .attention import ATTENTION_NAME, neuralcache_attention_forward, neuralcache_mask, routed_attention
from .hooks.generate import hooks_for_call, on_cache_prepared
from .hooks.generate import run as run_hooks
from .registry_masks import MASK_IMPLEMENTATIONS, wrap_mask_function, wrap_preprocess_mask
from .saved_settings import for_saving, saved_settings

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
        "window + fixed-size fast-weight memory of evicted tokens (Tensor Cache; experimental)",
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

    For a composite model (Gemma 3, LLaVA, Qwen2-VL...) these are the layers of its text decoder, the one part that
    uses the generation cache.

    Raises:
        `ValueError`: for encoder-decoder models and layer types our caches do not handle.
    """
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"cache_implementation={cache_name!r} supports decoder-only models; {config.model_type!r} is an "
            "encoder-decoder model. Use transformers' own caches for it."
        )
    text = config.get_text_config(decoder=True)  # the text decoder of a composite (vision-language) model
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
        from transformers import GenerationConfig, masking_utils
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
        (AttentionInterface, "get_interface"),
        (GenerationConfig, "save_pretrained"),
    ):
        if not hasattr(owner, attr):
            raise _incompatible(f"`{owner.__name__}.{attr}`")
    return (
        configuration_utils,
        GenerationMixin,
        GenerationConfig,
        masking_utils,
        ALL_MASK_ATTENTION_FUNCTIONS,
        (AttentionInterface, AttentionMaskInterface, sdpa_mask),
    )


def _settings_for_call(generation_config) -> str | None:
    """The cache name for this generate call: the call's (or the model's) `cache_implementation`, else the one a
    checkpoint saved under `generation_config.hf_neuralcache` (applied to this call's copy of the config)."""
    name = generation_config.cache_implementation
    saved = saved_settings(generation_config)
    if name is None and saved is not None:
        name, cache_config = saved
        generation_config.cache_implementation = name
        if generation_config.cache_config is None:
            generation_config.cache_config = cache_config
    elif name is None and generation_config.cache_config is not None and generation_config.use_cache is not False:
        warnings.warn(
            f"cache_config={generation_config.cache_config!r} is ignored: no cache_implementation is set, so "
            "generate() uses transformers' default cache. Pass cache_implementation= with it, for example "
            f"cache_implementation='sliding_window_kv' (hf_neuralcache's caches: {sorted(_CACHES)}).",
            UserWarning,
            stacklevel=4,
        )
    return name


def _wrap_prepare_cache(original):
    @functools.wraps(original)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        given = model_kwargs.get(CACHE_KWARG)
        name = generation_config.cache_implementation if given is not None else _settings_for_call(generation_config)
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
        if hasattr(cache, "check_model"):  # a fitted memory (tensor_cache "learned") is for one model's weights
            cache.check_model(self)
        if generation_config.is_assistant:  # its candidates get rolled back with `crop`
            cache.activate_past_recording()
        model_kwargs[CACHE_KWARG] = cache
        on_cache_prepared(self, generation_config, model_kwargs)

    _prepare_cache_for_generation.__neuralcache_original__ = original
    return _prepare_cache_for_generation


def _with_saved_settings(model, kwargs: dict) -> dict:
    """`kwargs` of a generate call, plus the cache settings the model's checkpoint saved (see `saved_settings`) when
    the call sets neither a cache nor a generation config, so that the hooks see the cache generate will build."""
    saved = saved_settings(getattr(model, "generation_config", None))
    cache_given = any(kwargs.get(name) is not None for name in (CACHE_KWARG, "past_key_values"))
    if saved is None or cache_given or kwargs.get("use_cache") is False or "generation_config" in kwargs:
        return kwargs
    if kwargs.get("cache_implementation") is not None or model.generation_config.cache_implementation is not None:
        return kwargs
    name, cache_config = saved
    extra = {"cache_implementation": name}
    if kwargs.get("cache_config") is None and model.generation_config.cache_config is None and cache_config:
        extra["cache_config"] = cache_config
    return {**kwargs, **extra}


def _wrap_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        kwargs = _with_saved_settings(self, kwargs)
        hooks = hooks_for_call(self, kwargs)
        if hooks is None:
            return original(self, *args, **kwargs)
        return run_hooks(original, self, args, kwargs, hooks)

    generate.__neuralcache_original__ = original
    return generate


def _wrap_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        return original(for_saving(self, tuple(_CACHES)), *args, **kwargs)

    save_pretrained.__neuralcache_original__ = original
    return save_pretrained


def _wrap_get_interface(original):
    @functools.wraps(original)
    def get_interface(self, attn_implementation, default):
        return routed_attention(original(self, attn_implementation, default), default)

    get_interface.__neuralcache_original__ = original
    return get_interface


def _wrap_once(owner, attr: str, wrap, *args) -> None:
    current = getattr(owner, attr)
    if not hasattr(current, "__neuralcache_original__"):
        setattr(owner, attr, wrap(current, *args))


def register_attention(name: str, function) -> None:
    """Register an attention function under `name` with transformers (SDPA's mask), e.g. for recording q/k/v."""
    *_, (attn, attn_mask, sdpa_mask) = _internals()
    attn.register(name, function)
    attn_mask.register(name, sdpa_mask)


def register() -> None:
    """Register our cache names, the generate, save and mask hooks and the `"neuralcache"` attention. Idempotent."""
    configuration_utils, GenerationMixin, GenerationConfig, masking_utils, mask_functions, interfaces = _internals()
    attn, attn_mask, _ = interfaces
    if transformers.__version__ and not Version(transformers.__version__) >= Version("5.17"):
        raise _incompatible("the generation and masking internals of 5.17")
    if Version(transformers.__version__) >= Version("6"):
        logger.warning("hf_neuralcache is tested with transformers %s", SUPPORTED_TRANSFORMERS)

    missing = tuple(name for name in _CACHES if name not in configuration_utils.ALL_CACHE_IMPLEMENTATIONS)
    configuration_utils.ALL_CACHE_IMPLEMENTATIONS = configuration_utils.ALL_CACHE_IMPLEMENTATIONS + missing
    _wrap_once(GenerationMixin, "_prepare_cache_for_generation", _wrap_prepare_cache)
    _wrap_once(GenerationMixin, "generate", _wrap_generate)
    _wrap_once(GenerationConfig, "save_pretrained", _wrap_save_pretrained)
    preprocess = masking_utils._preprocess_mask_arguments
    if not hasattr(preprocess, "__neuralcache_original__"):
        # transformers returns this tuple (all but the first two entries None) for a ready 4D mask; ours is one
        early_exit = preprocess(None, None, torch.zeros(1, 1, 1, 1), None, None, None)
        if not (isinstance(early_exit, tuple) and early_exit[0] is True):
            raise _incompatible("the early exit of `masking_utils._preprocess_mask_arguments` for 4D masks")
        masking_utils._preprocess_mask_arguments = wrap_preprocess_mask(preprocess, mask_functions, early_exit)
    _wrap_once(attn, "get_interface", _wrap_get_interface)
    attn.register(ATTENTION_NAME, neuralcache_attention_forward)
    if ATTENTION_NAME not in mask_functions._global_mapping:
        attn_mask.register(ATTENTION_NAME, neuralcache_mask)
    for name in MASK_IMPLEMENTATIONS:
        function = mask_functions._global_mapping.get(name)
        if function is not None and not hasattr(function, "__neuralcache_original__"):
            attn_mask.register(name, wrap_mask_function(function))
