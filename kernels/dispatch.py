"""Where a kernel runs: Triton for CUDA tensors (or any tensor under Triton's interpreter), else the reference.

The Triton modules are imported on first use, not with the package: `triton.jit` decides at decoration time
whether a kernel is compiled or interpreted, and a CPU-only run never needs them. Triton itself is optional (it
has no macOS or Windows wheels). Compiled for CUDA the kernels need Triton >= 3.2 (`KERNELS_TRITON`, what torch 2.6
pins; `make gpu-check` reports how the installed release does); under Triton's CPU interpreter they need >= 3.9
(`INTERPRETER_TRITON`: older interpreters fail some kernels' tests). Without a suitable Triton every op takes its
PyTorch reference, on CUDA tensors too.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..env import triton_interpret

__all__ = ["INTERPRETER_TRITON", "KERNELS_TRITON", "triton_available", "triton_interpreting", "use_triton"]

KERNELS_TRITON = (3, 2)
INTERPRETER_TRITON = (3, 9)


@functools.cache
def _triton_version() -> tuple[int, ...] | None:
    """`(major, minor)` of the installed triton, `None` when `import triton` fails."""
    try:
        import triton
    except ImportError:
        return None
    from packaging.version import Version

    return Version(triton.__version__).release[:2]


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports and is recent enough for the kernels (checked once; warns once when it is too old)."""
    version = _triton_version()
    if version is None:
        return False
    if version < KERNELS_TRITON:
        found, needed = ".".join(map(str, version)), ".".join(map(str, KERNELS_TRITON))
        warnings.warn(
            f"hf_neuralcache's Triton kernels need triton >= {needed}, found {found}: using the PyTorch path "
            f"(correct, slower). pip install 'triton>={needed}' (with a torch release built for it) to use them.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: `triton.knobs.runtime.interpret` (Triton >= 3.4, which
    also sees a value set in code), else `TRITON_INTERPRET=1`; `False` without a Triton the kernels can use."""
    version = _triton_version()
    if version is None or version < INTERPRETER_TRITON:
        return False
    import triton

    knobs = getattr(triton, "knobs", None)  # triton < 3.4 has no knobs and reads TRITON_INTERPRET itself
    return bool(knobs.runtime.interpret) if knobs is not None else triton_interpret()


def use_triton(tensor: torch.Tensor) -> bool:
    """`True` when a Triton the kernels can use is installed and `tensor` is on a CUDA device, or
    `TRITON_INTERPRET=1` is set with a Triton whose interpreter runs them (tests on the CPU)."""
    if tensor.is_cuda:
        return triton_available()
    return triton_interpret() and triton_available() and _triton_version() >= INTERPRETER_TRITON
