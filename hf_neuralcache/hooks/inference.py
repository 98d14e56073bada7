"""An inference cache: an identical request returns the stored result of `generate()` without running the model.

The key is a BLAKE2b digest of the model fingerprint, the namespace, the input ids and attention mask as given (a
batch is one request), and every generation setting (the whole effective `GenerationConfig`, including the cache
implementation, plus any plain extra argument). A call whose output depends on something that cannot be keyed (a
`logits_processor`, `stopping_criteria`, `prefix_allowed_tokens_fn`, an assistant model, `inputs_embeds`, a cache
object passed in, hidden states or attentions requested) bypasses the cache.

What is never cached:

- more than `sampled_answers` answers of a sampled call (`do_sample=True`): the first `sampled_answers` calls (4 by
  default) run the model and are stored, later ones get one of those answers at random (see `samples.py`); with
  `sampled_answers=0` sampled calls bypass the cache;
- prompts the `cacheable` predicate refuses; the default, [`is_time_dependent`], refuses prompts that ask about the
  present ("What day is today?", "latest news", "current price", ...). It sees the last user turn of a chat prompt
  (the whole prompt otherwise) and needs the text: pass `tokenizer=` (or use `attach` with a tokenizer); without one
  every prompt is cacheable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from transformers.generation import utils as generation_utils

from .fingerprint import digest, model_fingerprint
from .generate import last_user_turn
from .remote import remote_tier
from .samples import DEFAULT_SAMPLED_ANSWERS, SampleSlots, sampled_answers_setting
from .storage import Counters, StoreBackedCache, TieredStore

logger = logging.getLogger("hf_neuralcache.hooks")

__all__ = ["InferenceCache", "is_time_dependent"]

_GiB = 1 << 30

_TIME_DEPENDENT = re.compile(
    r"\b(?:today|tonight|tomorrow|yesterday|right\s+now|at\s+the\s+moment|these\s+days|nowadays|currently"
    r"|current(?:ly)?\s+(?:date|time|year|month|day|weather|price|rate|events?|news|president|leader|status)"
    r"|latest|most\s+recent|breaking|this\s+(?:week|month|year|morning|afternoon|evening|weekend)"
    r"|(?:what|which)\s+(?:day|date|time|year|month)\s+is\s+it|what\s+time|weather|forecast"
    r"|stock\s+price|exchange\s+rate|news|(?:how\s+(?:long|many\s+days)\s+(?:until|since|ago)))\b",
    re.IGNORECASE,
)

# generate() outputs a hit can rebuild (transformers' own classes; nothing else is instantiated from an entry)
_OUTPUT_CLASSES = (
    "GenerateDecoderOnlyOutput",
    "GenerateBeamDecoderOnlyOutput",
    "GenerateEncoderDecoderOutput",
    "GenerateBeamEncoderDecoderOutput",
)
_UNCACHEABLE_FIELDS = (
    "hidden_states",
    "attentions",
    "decoder_hidden_states",
    "decoder_attentions",
    "cross_attentions",
    "encoder_hidden_states",
    "encoder_attentions",
)


def entry_from_output(output) -> tuple[dict, dict] | None:
    """`(tensors, meta)` storing a generate() output, or `None` for an output that cannot be stored."""
    if isinstance(output, torch.Tensor):
        return {"sequences": output}, {"output": "tensor"}
    name = type(output).__name__
    if name not in _OUTPUT_CLASSES:
        return None
    tensors, fields = {}, {}
    for field_name, value in output.items():
        if field_name in ("past_key_values", "cache") or value is None:
            continue
        if field_name in _UNCACHEABLE_FIELDS:
            return None
        if isinstance(value, torch.Tensor):
            tensors[field_name], fields[field_name] = value, "tensor"
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            tensors.update({f"{field_name}.{i}": v for i, v in enumerate(value)})
            fields[field_name] = len(value)
        else:
            return None
    return tensors, {"output": name, "fields": fields}


def _fits(tensors: dict, meta: dict) -> bool:
    """Whether a stored output's tensors are the ones its metadata lists, with `sequences` a 2D token tensor."""
    if meta.get("output") == "tensor":
        listed = {"sequences": "tensor"}
    elif meta.get("output") in _OUTPUT_CLASSES and isinstance(meta.get("fields"), dict):
        listed = meta["fields"]
    else:
        return False
    names = set()
    for name, spec in listed.items():
        if spec == "tensor":
            names.add(name)
        elif isinstance(spec, int) and not isinstance(spec, bool) and 0 <= spec <= 100_000:
            names.update(f"{name}.{i}" for i in range(spec))
        else:
            return False
    sequences = tensors.get("sequences")
    ok = sequences is None or (sequences.dim() == 2 and sequences.dtype == torch.long)
    # the semantic cache keeps its request's embedding and (guard "strict+learned") word-piece states beside them
    return ok and names == set(tensors) - {"new_tokens", "embedding", "equivalence_states"}


def output_from_entry(tensors: dict, meta: dict, device, sequences: torch.Tensor | None = None):
    """Rebuild what generate() returned from a stored entry (fresh tensors on `device`), or `None` if unknown.

    `sequences` replaces the stored `sequences` (the semantic cache puts the new request's prompt in front).
    """
    if not _fits(tensors, meta):
        return None
    if meta.get("output") == "tensor":
        return sequences if sequences is not None else tensors["sequences"].to(device, copy=True)
    fields = {}
    for name, spec in meta["fields"].items():
        if spec == "tensor":
            fields[name] = tensors[name].to(device, copy=True)
        else:
            fields[name] = tuple(tensors[f"{name}.{i}"].to(device, copy=True) for i in range(spec))
    if sequences is not None:
        fields["sequences"] = sequences
    return getattr(generation_utils, meta["output"])(**fields)


def _answers(output, request) -> bool:
    """Whether `output`'s sequences start with the request's prompt (one row per returned sequence)."""
    sequences = output if isinstance(output, torch.Tensor) else output.get("sequences")
    prompt = request.input_ids
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.shape[0] % prompt.shape[0]:
        return False
    if sequences.shape[1] < prompt.shape[1]:
        return False
    repeat = sequences.shape[0] // prompt.shape[0]
    return torch.equal(sequences[:, : prompt.shape[1]].cpu(), prompt.cpu().repeat_interleave(repeat, 0))


def stream(request, output) -> None:
    """Hand a stored output to the call's streamer as generate() would: the prompt, each new token, `end()`."""
    if request.streamer is None:
        return
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    request.streamer.put(request.input_ids.cpu())
    for token in sequences[0, request.input_ids.shape[1] :].cpu():
        request.streamer.put(token.reshape(1))
    request.streamer.end()


def is_time_dependent(text: str | None) -> bool:
    """The default predicate: `True` when the prompt asks about the present (its answer changes with time).

    Example:

    ```python
    >>> from hf_neuralcache.hooks.inference import is_time_dependent
    >>> is_time_dependent("What day is today?"), is_time_dependent("What is the capital of France?")
    (True, False)
    ```
    """
    return bool(text) and _TIME_DEPENDENT.search(text) is not None


class InferenceCache(StoreBackedCache):
    """Whole-result cache for `generate()`, used through `inference_cache=` or [`attach`].

    Args:
        directory (`str` or `os.PathLike`): Folder of the disk tier (shared by processes).
        namespace (`str`, *optional*): Separates tenants completely.
        ttl (`float` or `Callable[[str | None], float | None]`, *optional*): Seconds an entry lives; a callable gets
            the prompt text (or `None`) and returns the TTL of that entry. `None`: entries live until evicted.
        sampled_answers (`int`, *optional*, defaults to 4): Answers kept per sampled (`do_sample=True`) request;
            once that many are stored, a call gets one of them at random. `0`: sampled calls bypass the cache.
        cache_sampled (`bool`, *optional*): The older switch: `False` is `sampled_answers=0`, `True` keeps at
            least one.
        cacheable (`Callable[[str | None], bool]`, *optional*): Whether a prompt may be cached; defaults to
            `not is_time_dependent(text)`.
        tokenizer (*optional*): Decodes prompts for `cacheable` and `ttl` when the call brings no tokenizer.
        disk_bytes (`int`, *optional*, defaults to 1 GiB): Bound of the disk tier.
        ram_bytes (`int`, *optional*, defaults to 64 MiB): Bound of the RAM tier; 0 disables it.
        eviction_policy (`str`, *optional*, defaults to `"least-recently-used"`): Or `"least-frequently-used"`.
        secret (`str` or `bytes`, *optional*): Key with which every entry is MACed and verified (HMAC-SHA256), for a
            folder writable by others; defaults to `HF_NEURALCACHE_SECRET`, unset: checksums only.
        remote (`str` or [`RedisTier`], *optional*): A shared tier on Redis behind the disk tier
            (`"redis://host:6379/0"`, `"rediss://..."`, `"unix:///path"`; credentials from the URL or
            `HF_NEURALCACHE_REDIS_USERNAME` / `HF_NEURALCACHE_REDIS_PASSWORD`): a local miss looks there, a hit fills
            the local tiers, writes go there in the background. A failing server costs a request at most about
            0.1 s, then is skipped for a while (see the "Sharing caches across machines" docs page).
        remote_bytes (`int`, *optional*): Bound of this cache's kind and namespace in Redis; `None` leaves it to the
            server's `maxmemory` policy.

    `stats()` counts `hits`, `misses`, `bypassed` (calls that cannot be keyed; `bypassed_by` gives the reasons, each
    also logged once), `not_cacheable`, `bytes_stored` and
    `seconds_saved` (the generate time the hits would have cost), and the failures `storage_errors`,
    `integrity_errors` and `skipped` (never raised).

    Example:

    ```python
    >>> import tempfile
    >>> from hf_neuralcache import InferenceCache
    >>> cache = InferenceCache(tempfile.mkdtemp(), ttl=3600)
    >>> cache.stats()["entries"]
    0
    ```
    """

    def __init__(
        self,
        directory,
        namespace: str | None = None,
        ttl: float | Callable | None = None,
        sampled_answers: int = DEFAULT_SAMPLED_ANSWERS,
        cache_sampled: bool | None = None,
        cacheable: Callable[[str | None], bool] | None = None,
        tokenizer=None,
        disk_bytes: int = _GiB,
        ram_bytes: int = 64 << 20,
        eviction_policy: str = "least-recently-used",
        secret: str | bytes | None = None,
        remote=None,
        remote_bytes: int | None = None,
    ):
        if ttl is not None and not callable(ttl) and (not isinstance(ttl, int | float) or ttl <= 0):
            raise ValueError(f"ttl must be seconds > 0, a callable or None, got {ttl!r}")
        if namespace is not None and not isinstance(namespace, str):
            raise ValueError(f"namespace must be a str or None, got {type(namespace).__name__}")
        tier = remote_tier(remote, "inference", namespace, max_bytes=remote_bytes)
        self.store = TieredStore(directory, "inference", disk_bytes, ram_bytes, eviction_policy, secret, remote=tier)
        self.namespace = namespace
        self.ttl = ttl
        self.sampled_answers = sampled_answers_setting(sampled_answers, cache_sampled)
        self.cacheable = cacheable or (lambda text: not is_time_dependent(text))
        self.tokenizer = tokenizer
        self.counters = Counters(
            self.store, ("hits", "misses", "bypassed", "not_cacheable", "bytes_stored", "seconds_saved")
        )

    # ---- keys ---------------------------------------------------------------------------------------------------
    def key(self, model, request) -> str | None:
        """The key of `request` (a parsed generate() call), or `None` when the call must bypass the cache."""
        if request.uncacheable:
            self.bypass(request.uncacheable)
            return None
        config = request.generation_config
        if config.do_sample and not self.sampled_answers:
            self.bypass("sampling with sampled_answers=0")
            return None
        if any(getattr(config, f"output_{name}", False) for name in ("hidden_states", "attentions")):
            self.bypass("hidden states or attentions requested")
            return None
        ids = request.input_ids.cpu()
        mask = request.attention_mask.cpu()
        fingerprint = model_fingerprint(model)
        self.store.use_model(fingerprint)
        return digest(
            "inference",
            fingerprint,
            self.namespace or "",
            config.to_dict(),
            request.extra,
            list(ids.shape),
            ids.numpy().tobytes(),
            mask.to(torch.int8).numpy().tobytes(),
        )

    # ---- lookups and stores -------------------------------------------------------------------------------------
    def get(self, key: str | None, request):
        """The stored output for `key` rebuilt as generate() returns it, streamed to `request.streamer`, or `None`."""
        if key is None:
            return None
        if request.generation_config.do_sample:
            key = SampleSlots(self.store, key, self.sampled_answers).pick()
            if key is None:  # still collecting this request's answers
                self.counters.add("misses", 1)
                return None
        entry = self.store.get(key)
        if entry is None:
            self.counters.add("misses", 1)
            return None
        output = output_from_entry(entry.tensors, entry.meta, request.input_ids.device)
        if output is None or not _answers(output, request):  # a correct checksum but not an answer to this request
            self.store.failed("integrity", "check", ValueError("stored output does not answer the request"))
            self.store.delete(key)
            self.counters.add("misses", 1)
            return None
        self.counters.add("hits", 1)
        self.counters.add("seconds_saved", entry.meta.get("seconds", 0.0))
        stream(request, output)
        return output

    def put(self, key: str | None, request, output, seconds: float) -> None:
        """Store `output` of the call `request` under `key` (no-op for a bypassed or non-cacheable call)."""
        if key is None:
            return
        text = last_user_turn(request.text(self.tokenizer))
        if not self.cacheable(text):
            self.counters.add("not_cacheable", 1)
            return
        stored = entry_from_output(output)
        if stored is None:
            return
        tensors, meta = stored
        meta["seconds"] = seconds
        if request.generation_config.do_sample:
            key = SampleSlots(self.store, key, self.sampled_answers).free()
            if key is None:  # every slot filled meanwhile (another process)
                return
        ttl = self.ttl(text) if callable(self.ttl) else self.ttl
        self.counters.add("bytes_stored", self.store.put(key, tensors, meta, expire=ttl))

    def __repr__(self):
        return f"InferenceCache({str(self.store.directory)!r})"
