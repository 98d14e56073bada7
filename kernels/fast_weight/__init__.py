"""Tensor Cache memory (fast weights and training-free moments).

`naive.py` is the PyTorch reference. The Triton kernels of the training-free memory are `fused_recurrent.py` (the
fused decode step) and `chunk.py` (the chunked write and the fused prefill read), those of the learned memory
`learned.py` (fused decode step, chunked write, fused prefill read; they take the feature map's outputs), and for
the paper mode `paper_recurrent.py` (the fused decode step); [`moment_decode`], [`moment_prefill`], [`moment_write`],
[`learned_decode`], [`learned_prefill`], [`learned_write_features`] and [`fast_weight_decode`] are their checked
entry points, which run Triton for CUDA tensors (or under `TRITON_INTERPRET=1`) and the reference otherwise.
`moment_write` here is that dispatching entry point; `naive.moment_write` is the reference it is tested against.
`learned_write` and `learned_read` are the references of the learned memory from its parameters (`LearnedMemory`).
"""

from .dispatch import (
    fast_weight_decode,
    learned_decode,
    learned_prefill,
    learned_write_features,
    moment_decode,
    moment_prefill,
    moment_write,
)
from .naive import (
    LearnedMemory,
    LearnedState,
    MomentState,
    decay_matrix,
    fast_weight_read,
    fast_weight_write,
    learned_features,
    learned_read,
    learned_state,
    learned_write,
    merge_softmax,
    moment_read,
    moment_state,
    window_attention_lse,
)

__all__ = [
    "LearnedMemory",
    "LearnedState",
    "MomentState",
    "decay_matrix",
    "fast_weight_decode",
    "fast_weight_read",
    "fast_weight_write",
    "learned_decode",
    "learned_features",
    "learned_prefill",
    "learned_read",
    "learned_state",
    "learned_write",
    "learned_write_features",
    "merge_softmax",
    "moment_decode",
    "moment_prefill",
    "moment_read",
    "moment_state",
    "moment_write",
    "window_attention_lse",
]
