"""generate() hooks: a persistent prefix (prefill) KV cache and an inference cache, and the storage they share.

Use them per call, `model.generate(ids, prefix_cache=pc, inference_cache=ic)`, or for every call of a model (stock
pipelines included) with [`attach`].
"""

from .generate import attach, detach
from .inference import InferenceCache, is_time_dependent
from .prefix import PrefixCache

__all__ = ["InferenceCache", "PrefixCache", "attach", "detach", "is_time_dependent"]
