"""How a checkpoint keeps its hf_neuralcache settings: in a key of its own, so plain transformers can load it.

transformers' `GenerationConfig.validate` refuses a `cache_implementation` it does not know. A checkpoint whose
`generation_config.json` said `"cache_implementation": "sliding_window_kv"` could not be loaded by anyone without
`import hf_neuralcache`. So `save_pretrained` (wrapped by `hf_neuralcache.registry`) writes our cache name and its
`cache_config` under the key `"hf_neuralcache"` instead, with a line saying what it is:

```json
"hf_neuralcache": {
  "cache_implementation": "sliding_window_kv",
  "cache_config": {"window": 1024, "sink_tokens": 4},
  "note": "..."
}
```

transformers keeps keys it does not know as attributes of the loaded `GenerationConfig` and leaves them unchecked,
so plain transformers loads the checkpoint and generates with its default cache; with `hf_neuralcache` imported,
`generate` uses the saved cache unless the call names a `cache_implementation` of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Collection

__all__ = ["SETTINGS_KEY", "for_saving", "saved_settings"]

SETTINGS_KEY = "hf_neuralcache"
NOTE = (
    "Cache settings of the hf_neuralcache plugin (pip install hf-neuralcache). With `import hf_neuralcache`, "
    "generate() uses this cache; without it, transformers ignores this key and uses its default cache."
)


def for_saving(generation_config, names: Collection[str]):
    """The config to write: `generation_config` itself, or a copy with our cache settings moved to `SETTINGS_KEY`.

    Args:
        generation_config (`GenerationConfig`): The config `save_pretrained` was called on (left unchanged).
        names (`Collection[str]`): The cache names hf_neuralcache registers.
    """
    name = getattr(generation_config, "cache_implementation", None)
    if name not in names:
        return generation_config
    saved = copy.deepcopy(generation_config)
    unchanged = getattr(generation_config, "_original_object_hash", None) == hash(generation_config)
    setattr(saved, SETTINGS_KEY, {"cache_implementation": name, "cache_config": saved.cache_config, "note": NOTE})
    saved.cache_implementation = saved.cache_config = None
    saved._from_model_config = False  # transformers drops unknown keys of a config marked as made from config.json
    if unchanged:  # transformers validates an unchanged loaded config leniently when saving it back: keep that
        saved._original_object_hash = hash(saved)
    return saved


def saved_settings(generation_config) -> tuple[str, dict | None] | None:
    """`(cache_implementation, cache_config)` saved under `SETTINGS_KEY`, or `None` when there are none.

    Raises:
        `ValueError`: when the key holds something else than what [`for_saving`] writes.
    """
    settings = getattr(generation_config, SETTINGS_KEY, None)
    if settings is None:
        return None
    if not isinstance(settings, dict) or not isinstance(settings.get("cache_implementation"), str):
        raise ValueError(
            f"generation_config.{SETTINGS_KEY} must be a dict with a 'cache_implementation' string (and optionally "
            f"'cache_config'), as `save_pretrained` writes it; got {settings!r}. Fix or remove that key of "
            "generation_config.json."
        )
    return settings["cache_implementation"], settings.get("cache_config")
