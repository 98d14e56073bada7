"""Tensor Cache memory (fast weights and training-free moments): the PyTorch reference in `naive.py`."""

from .naive import (
    MomentState,
    decay_matrix,
    fast_weight_read,
    fast_weight_write,
    merge_softmax,
    moment_read,
    moment_state,
    moment_write,
    window_attention_lse,
)

__all__ = [
    "MomentState",
    "decay_matrix",
    "fast_weight_read",
    "fast_weight_write",
    "merge_softmax",
    "moment_read",
    "moment_state",
    "moment_write",
    "window_attention_lse",
]
