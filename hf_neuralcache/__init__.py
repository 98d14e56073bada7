"""hf_neuralcache: cache backends for Hugging Face transformers' `generate()`.

`import hf_neuralcache` registers the cache names (`cache_implementation=`) and the `"neuralcache"` attention
implementation with transformers; that registration is the import's one side effect.

`CACHE_KWARG` is the name under which the installed transformers takes and returns the cache object: `"cache"` from
transformers 5.24 (which deprecates `past_key_values`), `"past_key_values"` before. Pass a cache to a forward
as `model(ids, **{CACHE_KWARG: cache})` and read it from a `generate` output as `out[CACHE_KWARG]`.
"""

from .caches import NeuralCache, PageBudgetExceededError, PagedKVCache, SlidingWindowKVCache, TensorCache
from .caches.retention_fit import RetentionParams, fit_retention
from .caches.tensor_cache_fit import fit_tensor_cache
from .caches.tensor_cache_params import TensorCacheParams
from .hooks import InferenceCache, PrefixCache, attach, detach
from .registry import CACHE_KWARG, IncompatibleTransformersError, available_caches, create_cache, register
from .semantic.cache import SemanticCache

__version__ = "0.1.0"

__all__ = [
    "CACHE_KWARG",
    "IncompatibleTransformersError",
    "InferenceCache",
    "NeuralCache",
    "PageBudgetExceededError",
    "PagedKVCache",
    "PrefixCache",
    "RetentionParams",
    "SemanticCache",
    "SlidingWindowKVCache",
    "TensorCache",
    "TensorCacheParams",
    "__version__",
    "attach",
    "available_caches",
    "create_cache",
    "detach",
    "fit_retention",
    "fit_tensor_cache",
]

register()
