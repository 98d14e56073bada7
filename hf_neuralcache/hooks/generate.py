"""How the hooks join `generate()`: `prefix_cache=` / `inference_cache=` arguments and [`attach`] / [`detach`].

`hf_neuralcache.registry` wraps `GenerationMixin.generate`; a call with no hook (none passed, none attached) goes
straight to transformers. With hooks, [`run`] parses the call once into a [`Request`], asks the inference cache
for a stored result, and otherwise plans the prefix cache's loads and runs transformers' generate. The prefix K/V is
put into the generation cache right after transformers builds it (the registry's `_prepare_cache_for_generation`
wrapper calls [`on_cache_prepared`]), so generate's own prefill only computes the tokens that were not loaded; the
prompt's K/V is captured from that prefill to store its new chunks.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache

logger = logging.getLogger("hf_neuralcache.hooks")

__all__ = ["attach", "detach", "Request", "run"]

HOOK_ARGUMENTS = ("prefix_cache", "inference_cache", "semantic_cache")
_ATTRIBUTE = "_neuralcache_hooks"
_pending: contextvars.ContextVar = contextvars.ContextVar("hf_neuralcache_prefix_plan", default=None)
# arguments of generate() whose effect on the output cannot be keyed
_UNKEYABLE = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "assistant_model",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
)
_CHAT_USER_MARKERS = (
    "<|im_start|>user",
    "<|start_header_id|>user<|end_header_id|>",
    "[INST]",
    "<start_of_turn>user",
    "<|user|>",
    "<|User|>",
)


@dataclass
class Hooks:
    prefix_cache: object = None
    inference_cache: object = None
    semantic_cache: object = None
    tokenizer: object = None

    def any(self) -> bool:
        return any(getattr(self, name) is not None for name in HOOK_ARGUMENTS)


def attach(model, prefix_cache=None, inference_cache=None, semantic_cache=None, tokenizer=None):
    """Make every `model.generate(...)` call (stock pipelines included) use these caches until [`detach`].

    Args:
        model (`PreTrainedModel`): A generative transformers model.
        prefix_cache ([`PrefixCache`], *optional*): Reuses the K/V of cached prompt prefixes.
        inference_cache ([`InferenceCache`], *optional*): Returns stored results of identical requests.
        semantic_cache (*optional*): Returns stored answers of requests that mean the same.
        tokenizer (*optional*): Decodes prompts for the caches' predicates and the semantic match.

    Returns:
        The same `model`. A call can still override a cache with `prefix_cache=...` or switch it off for one call
        with `prefix_cache=False` (the same for the others).

    Example:

    ```python
    >>> import tempfile, hf_neuralcache
    >>> from hf_neuralcache.models import tiny_model
    >>> cache = hf_neuralcache.InferenceCache(tempfile.mkdtemp())
    >>> model = hf_neuralcache.attach(tiny_model("llama"), inference_cache=cache)
    >>> hf_neuralcache.detach(model) is model
    True
    ```
    """
    if not hasattr(model, "generate"):
        raise ValueError(f"attach expects a generative transformers model, got {type(model).__name__}")
    hooks = Hooks(prefix_cache, inference_cache, semantic_cache, tokenizer)
    _check_types(hooks)
    setattr(model, _ATTRIBUTE, hooks)
    return model


def detach(model):
    """Undo [`attach`]: `model.generate` runs without hooks again. Returns `model`."""
    model.__dict__.pop(_ATTRIBUTE, None)
    return model


@functools.cache
def _hook_types() -> dict:
    from . import InferenceCache, PrefixCache

    expected = {"prefix_cache": PrefixCache, "inference_cache": InferenceCache}
    from ..semantic.cache import SemanticCache

    expected["semantic_cache"] = SemanticCache
    return expected


def _check_types(hooks: Hooks) -> None:
    for name, cls in _hook_types().items():
        value = getattr(hooks, name)
        if value is not None and not isinstance(value, cls):
            raise ValueError(f"{name} must be an hf_neuralcache.{cls.__name__}, got {type(value).__name__}")


_signature = functools.cache(inspect.signature)


def hooks_for_call(model, kwargs: dict) -> Hooks | None:
    """The hooks of this call (attached ones, overridden by call arguments), popping our arguments from `kwargs`."""
    attached = getattr(model, _ATTRIBUTE, None)
    if attached is None and not any(name in kwargs for name in HOOK_ARGUMENTS):
        return None
    hooks = copy.copy(attached) if attached is not None else Hooks()
    for name in HOOK_ARGUMENTS:
        if name in kwargs:
            value = kwargs.pop(name)
            setattr(hooks, name, None if value is False else value)
    _check_types(hooks)
    return hooks if hooks.any() else None


@dataclass
class Request:
    """One generate() call as the hooks see it."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    generation_config: GenerationConfig
    streamer: object
    tokenizer: object
    extra: dict = field(default_factory=dict)  # plain extra arguments, part of the inference key
    uncacheable: str | None = None  # why the output cannot be keyed
    no_prefix: str | None = None  # why the prefix cache cannot take part

    def text(self, fallback_tokenizer=None) -> str | None:
        """The prompt(s) as text, one row per line, or `None` without a tokenizer."""
        tokenizer = self.tokenizer or fallback_tokenizer
        if tokenizer is None or self.input_ids is None:
            return None
        rows = [ids[mask.bool()] for ids, mask in zip(self.input_ids, self.attention_mask, strict=True)]
        return "\n".join(tokenizer.decode(row) for row in rows)


def last_user_turn(text: str | None) -> str | None:
    """The text after the last user marker of a chat template (the whole text when there is none)."""
    if text is None:
        return None
    cut = max((text.rfind(marker) + len(marker) for marker in _CHAT_USER_MARKERS if marker in text), default=0)
    return text[cut:]


def parse_request(original, model, args: tuple, kwargs: dict, hooks: Hooks) -> Request:
    """Read the call's inputs and effective generation settings the way generate() would use them."""
    bound = _signature(original).bind(model, *args, **kwargs).arguments
    extra_kwargs = dict(bound.pop("kwargs", {}))
    base = bound.get("generation_config") or model.generation_config
    config = copy.copy(base)  # shallow: update() replaces attributes, never mutates them
    unused = config.update(**extra_kwargs)
    input_ids = bound.get("inputs")
    if input_ids is None:
        input_ids = unused.pop("input_ids", None)
    mask = unused.pop("attention_mask", None)
    tokenizer = unused.pop("tokenizer", None)
    request = Request(input_ids, mask, config, bound.get("streamer"), tokenizer or hooks.tokenizer)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        request.uncacheable = request.no_prefix = "no 2D input_ids"
        return request
    if mask is None:  # the mask generate() infers: padding where pad_token_id occurs, unless it is also an eos
        pad, eos = config.pad_token_id, config.eos_token_id
        eos = set(eos) if isinstance(eos, list | tuple) else {eos}
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            mask = (input_ids != pad).long()
        else:
            mask = torch.ones_like(input_ids)
    request.attention_mask = mask
    for name in _UNKEYABLE:
        if bound.get(name) is not None:
            request.uncacheable = f"{name} given"
    if bound.get("custom_generate") is not None:
        request.no_prefix = "custom_generate given"
    if tokenizer is not None and config.stop_strings:
        request.extra["tokenizer"] = [getattr(tokenizer, "name_or_path", ""), len(tokenizer)]
    for name, value in unused.items():
        if value is None or isinstance(value, bool | int | float | str):
            request.extra[name] = value
        else:
            request.uncacheable = request.uncacheable or f"argument {name!r} given"
            if name in ("past_key_values", "cache", "inputs_embeds"):
                request.no_prefix = f"{name} given"
    if config.use_cache is False:
        request.no_prefix = "use_cache=False"
    if model.config.is_encoder_decoder:
        request.no_prefix = "encoder-decoder model"
    return request


def _safely(cache, op: str, fn, *args, default=None):
    """`fn(*args)`, or `default` when it raises: a cache can make a request faster, never make it fail.

    Storage failures are already misses inside the store; anything that still escapes a hook (a damaged entry of an
    unexpected shape, a bug) is counted on `cache` and logged once, and the request goes on without it.
    """
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - the request must not fail because of a cache
        from .disk import CorruptEntryError, UnsafeEntryError, is_corruption

        storage = isinstance(err, OSError) and not isinstance(err, CorruptEntryError | UnsafeEntryError)
        storage = storage or (type(err).__module__ == "sqlite3" and not is_corruption(err))
        cache.note_failure("storage" if storage else "integrity", op, err)
        logger.debug("hf_neuralcache: %s failed", op, exc_info=True)
        return default


def run(original, model, args: tuple, kwargs: dict, hooks: Hooks):
    """Run one generate() call through the hooks (see the module docstring)."""
    from .fingerprint import UnkeyableModelError, pinned

    request = parse_request(original, model, args, kwargs, hooks)
    inference, prefix, semantic = hooks.inference_cache, hooks.prefix_cache, hooks.semantic_cache
    caches = [c for c in (inference, prefix, semantic) if c is not None]
    pin = pinned(model)  # the weights are checked once per call, whatever number of caches asks
    try:
        pin.__enter__()
    except UnkeyableModelError as err:
        for cache in caches:
            cache.note_failure("skipped", "fingerprint", err)
        return original(model, *args, **kwargs)
    except Exception as err:  # noqa: BLE001 - e.g. a weight that cannot be read; generate as without caches
        for cache in caches:
            cache.note_failure("integrity", "fingerprint", err)
        return original(model, *args, **kwargs)
    try:
        return _run_checked(original, model, args, kwargs, request, inference, prefix, semantic)
    finally:
        pin.__exit__(None, None, None)


def _run_checked(original, model, args: tuple, kwargs: dict, request, inference, prefix, semantic):
    key = _safely(inference, "key", inference.key, model, request) if inference is not None else None
    if inference is not None:
        hit = _safely(inference, "lookup", inference.get, key, request)
        if hit is not None:
            return hit
    if semantic is not None:
        hit = _safely(semantic, "lookup", semantic.get, model, request)
        if hit is not None:
            return hit
    plan = None
    if prefix is not None and request.no_prefix is None:
        config = request.generation_config
        regime = {
            "cache": config.cache_implementation or "dynamic",
            "cache_config": _content_keyed(config.cache_config or {}, model.config),
            "attn": model.config._attn_implementation,
        }
        plan = _safely(prefix, "plan", prefix.plan, model, regime, request.input_ids, request.attention_mask)
    token = _pending.set((model, plan)) if plan is not None else None
    start = time.perf_counter()
    try:
        output = original(model, *args, **kwargs)
    finally:
        if token is not None:
            _pending.reset(token)
        if plan is not None and plan.cache_object is not None:
            plan.cache_object.__dict__.pop("update", None)
    seconds = time.perf_counter() - start
    if plan is not None:
        _safely(prefix, "store", prefix.finish, plan)
    if inference is not None:
        _safely(inference, "store", inference.put, key, request, output, seconds)
    if semantic is not None:
        _safely(semantic, "store", semantic.put, model, request, output, seconds)
    return output


# ---- the prefix cache inside generate -------------------------------------------------------------------------------
def on_cache_prepared(model, generation_config, model_kwargs: dict) -> None:
    """Called by the registry right after generate() built its cache: load the planned prefix and start capturing."""
    pending = _pending.get()
    if pending is None or pending[0] is not model or generation_config.is_assistant:
        return
    plan = pending[1]
    _pending.set(None)  # one generate() call, one plan
    from ..caches.base import NeuralCache
    from ..registry import CACHE_KWARG

    cache = model_kwargs.get(CACHE_KWARG)
    rebuilt = type(cache) is DynamicCache or (isinstance(cache, NeuralCache) and cache.rebuilds_from_kv)
    if not rebuilt or cache.get_seq_length() != 0:  # (a cache whose state needs the queries cannot load K/V)
        logger.info("hf_neuralcache: prefix cache skipped for a %s", type(cache).__name__)
        for row in plan.rows:
            row.load = 0
        plan.common = 0
        return
    plan.expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    width = len(plan.rows[0].tokens) + plan.rows[0].pad
    layers = model.config.get_text_config().num_hidden_layers
    _safely(plan.cache, "load", plan.cache.load, plan, _layer_devices(model, layers), model.dtype)
    if not plan.loaded:  # nothing loaded (or the load failed): the prefill computes every token
        plan.common, plan.loaded = 0, None
        for row in plan.rows:
            row.load = 0
    if plan.loaded:  # shapes were checked against the model by load(): these updates cannot fail
        mask = model_kwargs.get("attention_mask")
        if isinstance(cache, NeuralCache):
            cache.observe_forward(None if mask is None else mask[:, : plan.common], plan.common)
        for layer, (keys, values) in enumerate(plan.loaded):
            if plan.expand > 1:  # beams / num_return_sequences: generate expanded the batch before this point
                keys, values = keys.repeat_interleave(plan.expand, 0), values.repeat_interleave(plan.expand, 0)
            cache.update(keys, values, layer)
    plan.capture_tokens = width - plan.common
    plan.cache_object = cache
    _capture_prefill(cache, plan, layers)


def _layer_devices(model, layers: int) -> list:
    """The device of each decoder layer (layers of a model split with `device_map` sit on several)."""
    try:
        devices = [next(layer.parameters()).device for layer in model.get_decoder().layers]
    except (AttributeError, StopIteration, TypeError):
        devices = []
    if len(devices) != layers or any(d.type == "meta" for d in devices):
        return [model.device] * layers
    return devices


def _capture_prefill(cache, plan, layers: int) -> None:
    """Wrap `cache.update` (on this instance only) to keep the K/V of the prompt tokens the prefill computes."""
    update = cache.update

    def capturing_update(key_states, value_states, layer_idx, *args, **kwargs):
        got = plan.captured.setdefault(layer_idx, [])
        have = sum(k.shape[-2] for k, _ in got)
        if have < plan.capture_tokens:
            if plan.prefill_started is None:
                plan.prefill_started = time.perf_counter()
            got.append((key_states, value_states))
            if layer_idx == layers - 1 and have + key_states.shape[-2] >= plan.capture_tokens:
                if key_states.device.type == "cuda":
                    torch.cuda.synchronize(key_states.device)
                plan.prefill_seconds = time.perf_counter() - plan.prefill_started
                cache.__dict__.pop("update", None)
        return update(key_states, value_states, layer_idx, *args, **kwargs)

    cache.update = capturing_update


def _content_keyed(cache_config: dict, model_config) -> dict:
    """`cache_config` with fitted-parameter paths/objects replaced by a digest of their content (a refit into the same
    folder must not reuse K/V computed with the old parameters)."""
    from ..caches.tensor_cache_params import content_digest

    keyed = dict(cache_config)
    for name in ("params", "paper_params"):
        if keyed.get(name) is not None:
            keyed[name] = content_digest(keyed[name], model_config)
    return keyed
