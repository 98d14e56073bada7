"""Cache backends: one file, one `Cache` class each."""

from .base import NeuralCache
from .sliding_window import SinkWindowLayer, SlidingWindowKVCache

__all__ = ["NeuralCache", "SinkWindowLayer", "SlidingWindowKVCache"]
