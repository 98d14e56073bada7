"""Cache backends: one file, one `Cache` class each."""

from .base import NeuralCache
from .page_table import PageBudgetExceededError
from .paged import PagedKVCache
from .sliding_window import SinkWindowLayer, SlidingWindowKVCache
from .tensor_cache import TensorCache

__all__ = [
    "NeuralCache",
    "PageBudgetExceededError",
    "PagedKVCache",
    "SinkWindowLayer",
    "SlidingWindowKVCache",
    "TensorCache",
]
