"""Window (band + attention sinks) attention: the PyTorch reference in `naive.py`, Triton kernels in `decode.py`
and `prefill.py`, and [`attend`], the checked entry point that picks between them."""

from .dispatch import attend
from .naive import window_attention, window_visibility

__all__ = ["attend", "window_attention", "window_visibility"]
