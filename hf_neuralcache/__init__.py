"""hf_neuralcache: cache backends for Hugging Face transformers' `generate()`.

`import hf_neuralcache` registers the cache names (`cache_implementation=`) and the `"neuralcache"` attention
implementation with transformers; that registration is the import's one side effect.
"""

from .caches import NeuralCache, PageBudgetExceededError, PagedKVCache, SlidingWindowKVCache, TensorCache
from .hooks import InferenceCache, PrefixCache, attach, detach
from .registry import IncompatibleTransformersError, available_caches, create_cache, register
from .semantic.cache import SemanticCache

__version__ = "0.1.0"

__all__ = [
    "IncompatibleTransformersError",
    "InferenceCache",
    "NeuralCache",
    "PageBudgetExceededError",
    "PagedKVCache",
    "PrefixCache",
    "SemanticCache",
    "SlidingWindowKVCache",
    "TensorCache",
    "__version__",
    "attach",
    "available_caches",
    "create_cache",
    "detach",
]

register()
