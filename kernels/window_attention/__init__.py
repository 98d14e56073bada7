"""Window (band + attention sinks) attention: the PyTorch reference in `naive.py`."""

from .naive import window_attention, window_visibility

__all__ = ["window_attention", "window_visibility"]
