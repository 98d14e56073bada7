"""Where a kernel runs: Triton for CUDA tensors (or any tensor under Triton's interpreter), else the reference.

The Triton modules are imported on first use, not with the package: `triton.jit` decides at decoration time
whether a kernel is compiled or interpreted, and a CPU-only run never needs them.
"""

from __future__ import annotations

import torch

from ..env import triton_interpret

__all__ = ["use_triton"]


def use_triton(tensor: torch.Tensor) -> bool:
    """`True` when `tensor` is on a CUDA device, or `TRITON_INTERPRET=1` is set (tests on the CPU)."""
    return tensor.is_cuda or triton_interpret()
